"""``slimfx optimize --model DIR``: the streamed optimize from the command line, one process
or torchrun with two; broken checkpoints and unsupported flags refused before any write."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import slimfx  # noqa: E402
from slimfx.cli import main  # noqa: E402

from ._util import build, calibration, save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--budget", "0.4", "--calib", "random", "--n-calib", "5", "--seq-len", "32", "--quiet"]


def test_cli_streams_a_checkpoint_directory(tmp_path: Path, capsys) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tie=True)
    out = tmp_path / "out"
    assert main(["optimize", "--model", str(ckpt), *ARGS, "--no-fisher", "--out", str(out)]) == 0
    assert "optimize (streamed) took" in capsys.readouterr().out
    # --calib random is seeded ids, the same batches as the tests' calibration()
    ref = slimfx.optimize(
        build(True), 0.4, calibration=calibration(5, 32), fisher=False, progress=False
    )
    loaded = slimfx.load(out)
    assert loaded.slimfx_report.meta["plan"] == slimfx.report_of(ref).meta["plan"]
    a, b = ref.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)
    # the report files the in-memory CLI writes (hashed like every file), and its runtime
    saved = slimfx.Report.from_dict(json.loads((out / "report.json").read_text()))
    assert (out / "report.md").read_text() == saved.to_markdown()
    rep = loaded.slimfx_report
    assert (out / "report.png").stat().st_size > 1000
    assert rep.runtime == "torch-eager" and "torch-eager on" in rep.headline()


def test_cli_refuses_a_missing_shard_before_writing(tmp_path: Path, capsys) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tie=False, shard="60KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[0]
    (ckpt / gone).unlink()
    out = tmp_path / "out"
    assert main(["optimize", "--model", str(ckpt), *ARGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"shard file(s) listed in model.safetensors.index.json are missing: {gone}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # a config.json transformers cannot read: named, rc 2 (a KeyError traceback)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["model_type"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert main(["optimize", "--model", str(ckpt), *ARGS, "--out", str(out)]) == 2
    assert "config.json does not describe a model transformers knows" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, named",
    [(["--plan", "p.json"], "--plan"), (["--eval", "--backend", "onnx"], "--backend, --eval")],
)
def test_cli_refuses_flags_the_streamed_path_lacks(tmp_path: Path, capsys, flags, named) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tie=True)
    assert (
        main(["optimize", "--model", str(ckpt), *ARGS, *flags, "--out", str(tmp_path / "o")]) == 2
    )
    assert f"{named}: not available with a checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="no torchrun",
)
def test_torchrun_two_ranks_equal_one(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tie=False)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["optimize", "--model", str(ckpt), *ARGS, "--out", str(one)]) == 0
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "slimfx", "optimize",
         "--model", str(ckpt), *ARGS, "--out", str(two)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "optimize (streamed, distributed) took" in proc.stdout
    a, b = slimfx.load(one), slimfx.load(two)
    assert a.slimfx_report.meta["plan"] == b.slimfx_report.meta["plan"]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and set(sa) == set(sb)
