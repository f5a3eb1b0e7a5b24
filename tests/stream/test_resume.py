"""A streamed run killed after block k resumes from block k+1 and gives the uninterrupted
run's plan and tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import slimfx  # noqa: E402
from slimfx.stream import FAIL_AFTER_BLOCK_ENV, optimize_checkpoint  # noqa: E402

from ._util import LAYERS, calibration, save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

_RUN = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from stream._util import calibration
from slimfx.stream import optimize_checkpoint
optimize_checkpoint({ckpt!r}, 0.4, calibration=calibration(), fisher={fisher}, out={out!r},
                    progress=False)
"""


def _killed_run(ckpt: Path, out: Path, fisher: bool, after: int) -> subprocess.CompletedProcess:
    code = _RUN.format(
        root=str(ROOT), tests=str(ROOT / "tests"), ckpt=str(ckpt), out=str(out), fisher=fisher
    )
    env = {**os.environ, FAIL_AFTER_BLOCK_ENV: str(after), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(  # plain in the slow run only: the default run is at its time limit
    "fisher", [pytest.param(False, marks=pytest.mark.slow), True], ids=["plain", "fisher"]
)
def test_killed_run_resumes_from_the_next_block(tmp_path: Path, fisher: bool) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tie=False)
    whole = optimize_checkpoint(
        ckpt, 0.4, calibration=calibration(), fisher=fisher, out=tmp_path / "whole", progress=False
    )
    assert whole.blocks_computed == LAYERS

    out = tmp_path / "out"
    proc = _killed_run(ckpt, out, fisher, after=1)
    assert proc.returncode != 0 and "simulated crash after block 1" in proc.stderr
    work = tmp_path / ".out.slimfx-work"
    assert sorted(p.name for p in work.glob("block_*.pt")) == ["block_00000.pt", "block_00001.pt"]
    assert not out.exists()  # nothing that could load as a model

    res = optimize_checkpoint(
        ckpt, 0.4, calibration=calibration(), fisher=fisher, out=out, progress=False
    )
    assert res.blocks_computed == LAYERS - 2  # only block 2 computed again
    assert any(f"resumed at block 2 of {LAYERS}" in n for n in res.notes)
    assert res.plan.to_dict() == whole.plan.to_dict()
    a = slimfx.load(tmp_path / "whole").state_dict()
    b = slimfx.load(out).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not work.exists()  # removed after the successful write


def test_work_of_another_calibration_is_not_reused(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tie=True)
    out = tmp_path / "out"
    proc = _killed_run(ckpt, out, False, after=0)
    assert proc.returncode != 0
    other = calibration(seed=7)
    res = optimize_checkpoint(ckpt, 0.4, calibration=other, fisher=False, out=out, progress=False)
    assert res.blocks_computed == LAYERS
    assert any("held another run's statistics; started over" in n for n in res.notes)
    fresh = optimize_checkpoint(
        ckpt, 0.4, calibration=other, fisher=False, out=tmp_path / "fresh", progress=False
    )
    assert res.plan.to_dict() == fresh.plan.to_dict()


def test_a_work_directory_holding_other_files_is_refused_and_kept(tmp_path: Path) -> None:
    """``work=`` naming a user's folder: refused before anything is written (it was deleted
    with everything in it after the run, or at the start where it held a ``state.json``)."""
    ckpt = save_checkpoint(tmp_path / "ckpt", tie=True)
    for files in ({"notes.txt": "mine"}, {"state.json": '{"key": "x"}', "model.ckpt": "mine"}):
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        for name, text in files.items():
            (scratch / name).write_text(text)
        with pytest.raises(ValueError, match="holds files a streamed run did not write"):
            optimize_checkpoint(ckpt, 0.4, calibration=calibration(), fisher=False,
                                out=tmp_path / "out", work=scratch, progress=False)  # fmt: skip
        assert {p.name: p.read_text() for p in scratch.iterdir()} == files
        assert not (tmp_path / "out").exists()
        for p in scratch.iterdir():
            p.unlink()
        scratch.rmdir()


def test_an_empty_work_directory_given_is_emptied_not_removed(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tie=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    optimize_checkpoint(ckpt, 0.4, calibration=calibration(), fisher=False,
                        out=tmp_path / "out", work=scratch, progress=False)  # fmt: skip
    assert scratch.is_dir() and not any(scratch.iterdir())
    assert slimfx.load(tmp_path / "out") is not None
