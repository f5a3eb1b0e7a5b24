"""Two ranks (torch.distributed, gloo on CPU) give the single process's plan and tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import slimfx  # noqa: E402
from slimfx.stream import optimize_checkpoint  # noqa: E402

from ._util import calibration, save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

_SPAWN = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
import torch.distributed as dist
import torch.multiprocessing as mp


def work(rank, world):
    from stream._util import calibration
    from slimfx.stream import optimize_checkpoint

    dist.init_process_group("gloo", init_method="file://{init}", rank=rank, world_size=world)
    try:
        res = optimize_checkpoint({ckpt!r}, 0.4, calibration=calibration(n=7), fisher={fisher},
                                  out={out!r}, progress=False, sequential={sequential})
        assert (res.report is None) == (rank > 0)
        print(f"rank {{rank}}: {{len(res.plan.rewrites())}} rewrites, "
              f"{{res.blocks_computed}} blocks", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(work, args=(2,), nprocs=2)
"""


def _two_ranks(
    tmp_path: Path, ckpt: Path, out: Path, fisher: bool, sequential: bool = False
) -> str:
    script = tmp_path / "spawn.py"
    script.write_text(
        _SPAWN.format(
            root=str(ROOT),
            tests=str(ROOT / "tests"),
            ckpt=str(ckpt),
            out=str(out),
            fisher=fisher,
            sequential=sequential,
            init=str(tmp_path / "pg"),
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# in the slow run only (the default run is at its time limit): the default run keeps two ranks
# = one process through torchrun and the CLI (tests/stream/test_cli.py, Fisher-weighted)
@pytest.mark.slow
@pytest.mark.parametrize("fisher", [False, True], ids=["plain", "fisher"])
def test_two_ranks_equal_one(tmp_path: Path, fisher: bool) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tie=False)
    one = optimize_checkpoint(
        ckpt, 0.4, calibration=calibration(n=7), fisher=fisher, out=tmp_path / "one", progress=False
    )
    log = _two_ranks(tmp_path, ckpt, tmp_path / "two", fisher)
    assert "rank 0:" in log and "rank 1:" in log
    two = slimfx.load(tmp_path / "two")
    assert two.slimfx_report.meta["plan"] == one.plan.to_dict()
    assert len(one.plan.rewrites()) >= 15
    a, b = slimfx.load(tmp_path / "one").state_dict(), two.state_dict()
    assert set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    got = {s.fqn: s.sensitivity for s in two.slimfx_report.sites}
    # the saved report keeps 6 decimals of each sensitivity
    assert got == {s.fqn: round(s.sensitivity, 6) for s in one.report.sites}
    assert not (tmp_path / ".two.slimfx-work").exists()


@pytest.mark.slow  # the default run is at its time limit: sequential mode is tested in one process
def test_two_ranks_sequential_equal_one(tmp_path: Path) -> None:
    """Sequential mode under torch.distributed: the statistics and candidates are spread over
    the ranks, rank 0 refits each block on the rewritten prefix and writes — the same plan and
    tensors as one process (and not the non-sequential tensors)."""
    ckpt = save_checkpoint(tmp_path / "ckpt", tie=False)
    kw = dict(calibration=calibration(n=7), fisher=True, progress=False)
    one = optimize_checkpoint(ckpt, 0.4, out=tmp_path / "one", sequential=True, **kw)
    optimize_checkpoint(ckpt, 0.4, out=tmp_path / "plain", **kw)
    log = _two_ranks(tmp_path, ckpt, tmp_path / "two", True, sequential=True)
    assert "rank 0:" in log and "rank 1:" in log
    two = slimfx.load(tmp_path / "two")
    assert two.slimfx_report.meta["plan"] == one.plan.to_dict()
    assert any(n.startswith("sequential:") for n in two.slimfx_report.notes)
    a, b = slimfx.load(tmp_path / "one").state_dict(), two.state_dict()
    assert set(a) == set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    c = slimfx.load(tmp_path / "plain").state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)  # sequential refits changed something
