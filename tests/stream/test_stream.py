"""Layer-streamed optimize equals the in-memory one, refuses broken checkpoints before writing,
and never leaves a directory that loads as a complete model after a failed write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import slimfx  # noqa: E402
from slimfx.stream import CheckpointError, optimize_checkpoint  # noqa: E402

from ._util import build, calibration, save_checkpoint  # noqa: E402


def _sites(report):
    return {s.fqn: s for s in report.sites}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("fisher", [False, True], ids=["plain", "fisher"])
def test_streamed_equals_in_memory(tmp_path: Path, tie: bool, fisher: bool) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", tie)
    calib = calibration()
    ref = slimfx.optimize(
        build(tie), 0.4, calibration=calib, fisher=fisher, sensitivity="fisher", progress=False
    )
    res = optimize_checkpoint(
        ckpt, 0.4, calibration=calib, fisher=fisher, out=tmp_path / "out", progress=False
    )
    ref_report = slimfx.report_of(ref)
    assert res.plan.to_dict() == ref_report.meta["plan"]
    assert len(res.plan.rewrites()) >= 15  # the budget rewrites nearly every site: not vacuous
    loaded = slimfx.load(tmp_path / "out")
    gen = "generation_config.json"  # the checkpoint's generation settings, kept
    assert (tmp_path / "out" / gen).read_text() == (ckpt / gen).read_text()
    a, b = ref.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert different == [], "bit-for-bit equality of every tensor"
    # the sensitivities (streamed backward vs one backward through the model) agree exactly
    got, want = _sites(res.report), _sites(ref_report)
    counts = ("params_before", "params_after")
    assert [res.report.totals[k] for k in counts] == [ref_report.totals[k] for k in counts]
    assert {k: got[k].sensitivity for k in got} == {k: want[k].sensitivity for k in want}
    if fisher:
        assert len({round(s.sensitivity, 6) for s in got.values()}) > 3  # not all equal to 1
        assert any("streamed block by block" in n for n in res.notes)
    # measured SQNR of the rewritten sites, taken on the same held-out batch
    for k, s in want.items():
        if s.measured_sqnr_db is not None:
            assert got[k].measured_sqnr_db == pytest.approx(s.measured_sqnr_db, rel=1e-6)
    assert not (tmp_path / ".out.slimfx-work").exists()  # removed after success
    # the loaded model runs and gives the in-memory model's logits
    ids = calib[0]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0
        )


def test_sharded_checkpoint_streams(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", False, shard="60KB")
    assert (ckpt / "model.safetensors.index.json").is_file()
    calib = calibration()
    ref = slimfx.optimize(build(False), 0.5, calibration=calib, fisher=False, progress=False)
    res = optimize_checkpoint(
        ckpt, 0.5, calibration=calib, fisher=False, out=tmp_path / "out", progress=False
    )
    assert res.plan.to_dict() == slimfx.report_of(ref).meta["plan"]


def _assert_nothing_written(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_shard_is_named_before_anything_is_written(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", False, shard="60KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (ckpt / gone).unlink()
    with pytest.raises(CheckpointError, match=f"shard file.*missing: {gone}"):
        optimize_checkpoint(
            ckpt, 0.5, calibration=calibration(), out=tmp_path / "out", progress=False
        )
    _assert_nothing_written(tmp_path)


def test_shape_mismatch_is_named_before_anything_is_written(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", True)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the stored MLP weights are 128 wide
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch: model\.layers\.0\.mlp\.gate_proj"
        r"\.weight: checkpoint \(128, 64\), model \(96, 64\)",
    ):
        optimize_checkpoint(
            ckpt, 0.5, calibration=calibration(), out=tmp_path / "out", progress=False
        )
    _assert_nothing_written(tmp_path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    ckpt = save_checkpoint(tmp_path / "ckpt", True)
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.2\.mlp\.down_proj"):
        optimize_checkpoint(
            ckpt, 0.5, calibration=calibration(), out=tmp_path / "out", progress=False
        )
    _assert_nothing_written(tmp_path)


def test_probe_sensitivity_is_refused_not_replaced(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", True)
    with pytest.raises(ValueError, match="sensitivity='probe' is not available streamed"):
        optimize_checkpoint(
            ckpt,
            0.5,
            calibration=calibration(),
            sensitivity="probe",
            out=tmp_path / "out",
            progress=False,
        )
    _assert_nothing_written(tmp_path)


def test_a_kv_cache_budget_is_refused_not_ignored(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt", True)
    with pytest.raises(ValueError, match="needs the in-memory optimize"):
        optimize_checkpoint(
            ckpt, slimfx.Budget(memory=0.5, kv=0.5), calibration=calibration(),
            out=tmp_path / "out", progress=False,
        )  # fmt: skip
    _assert_nothing_written(tmp_path)


def test_an_output_that_would_replace_the_checkpoint_is_refused(tmp_path: Path) -> None:
    """out = the checkpoint, or a folder holding it, with overwrite=True: the save would delete
    the checkpoint being read — refused before anything is read or written."""
    ckpt = save_checkpoint(tmp_path / "ckpt", True)
    files = {f.name: f.read_bytes() for f in ckpt.iterdir()}
    for out, word in ((ckpt, "is"), (tmp_path, "holds")):
        with pytest.raises(ValueError, match=f"{word} the checkpoint being read .*elsewhere"):
            optimize_checkpoint(ckpt, 0.5, calibration=calibration(), out=out, overwrite=True,
                                progress=False)  # fmt: skip
    assert {f.name: f.read_bytes() for f in ckpt.iterdir()} == files


def test_failed_write_leaves_no_loadable_directory(tmp_path: Path, monkeypatch) -> None:
    from slimfx.stream import writer

    ckpt = save_checkpoint(tmp_path / "ckpt", True)
    calls = {"n": 0}
    real = writer.StreamedSafetensors.write

    def failing(self, tensors):  # the second block's write fails (a full disk, a kill)
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("no space left on device")
        return real(self, tensors)

    monkeypatch.setattr(writer.StreamedSafetensors, "write", failing)
    with pytest.raises(OSError, match="no space"):
        optimize_checkpoint(
            ckpt, 0.5, calibration=calibration(), fisher=False, out=tmp_path / "out", progress=False
        )
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.slimfx-tmp-*"))  # the partial directory is removed
    # an earlier save at the target stays what it was
    monkeypatch.setattr(writer.StreamedSafetensors, "write", real)
    first = optimize_checkpoint(
        ckpt, 0.5, calibration=calibration(), fisher=False, out=tmp_path / "out", progress=False
    )
    before = (tmp_path / "out" / "slimfx.safetensors").read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(writer.StreamedSafetensors, "write", failing)
    with pytest.raises(OSError):
        optimize_checkpoint(
            ckpt, 0.3, calibration=calibration(), fisher=False, out=tmp_path / "out", progress=False
        )
    assert (tmp_path / "out" / "slimfx.safetensors").read_bytes() == before
    assert slimfx.load(tmp_path / "out").slimfx_report.meta["plan"] == first.plan.to_dict()
