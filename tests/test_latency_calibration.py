"""Measured latencies for a deployment target (slimfx.latency_calibration) and the solver using them.

ONNX Runtime is timed on the one-linear exports of each form (what the onnx backend deploys):
the entries carry the runtime, the accuracy level and the ops the export holds, and the export
computes what the module does. A synthetic cache in which ORT's int8 kernel is slow shows the
solver avoiding int8 under a latency budget where the roofline would pick it.
"""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import needs_triton_kernels

import slimfx
from slimfx.cost.measure import DEFAULT_SHAPES, default_decisions
from slimfx.cost.target import MeasuredCache, latency
from slimfx.ir.modules import module_for
from slimfx.ir.sites import LinearSite
from slimfx.latency_calibration import calibrate_target, parse_shapes
from slimfx.numerics import factorize
from slimfx.planning.configs import DenseConfig, LowRankConfig, QuantConfig, Sparse24Config
from slimfx.planning.problem import Budget
from slimfx.planning.shapes import LinearShape

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _module(decision, in_f: int = 64, out_f: int = 32, dtype=torch.float32):  # noqa: ANN001, ANN202
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) / 8
    mod = module_for(decision).empty(decision, in_f, out_f, False, dtype, torch.device("cpu"))
    tensors = {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in factorize(w, decision).items()
    }
    return mod.load_factors(tensors, None)


@pytest.mark.parametrize(
    "decision, ops",
    [
        (LowRankConfig(8), "MatMul 2"),
        (QuantConfig(4, 32, False), "MatMulNBits 1"),
        (QuantConfig(8, None, True), "MatMulNBits 1"),
    ],
    ids=lambda v: v.short() if hasattr(v, "short") else v,
)
def test_onnx_runner_runs_the_export_of_the_form(decision, ops, tmp_path) -> None:  # noqa: ANN001
    from slimfx.backends.ort_timing import OnnxLinearRunner

    runner = OnnxLinearRunner(threads=1, accuracy_level=0, workdir=tmp_path)
    mod = _module(decision)
    fn, info = runner(mod)
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = mod(x)
    got = torch.from_numpy(fn(x)[0])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert info["ops"] == ops and info["accuracy_level"] == 0 and info["threads"] == 1
    assert info["runtime"].startswith("onnxruntime ")


def test_onnx_runner_refuses_dense_fallbacks_and_bf16(tmp_path) -> None:  # noqa: ANN001
    from slimfx.backends.ort_timing import OnnxLinearRunner

    temp = OnnxLinearRunner(threads=1)  # files go to a temporary folder, gone once opened
    fn, _ = temp(_module(LowRankConfig(8)))
    assert not any(temp.workdir.iterdir()) and fn(torch.randn(3, 64))[0].shape == (3, 32)
    runner = OnnxLinearRunner(threads=1, workdir=tmp_path)
    with pytest.raises(ValueError, match="runs this form dense"):
        runner(_module(Sparse24Config("magnitude", False)))
    with pytest.raises(ValueError, match="float32"):
        runner(_module(LowRankConfig(8), dtype=torch.bfloat16))


def test_calibrate_onnx_writes_ort_measurements(tmp_path) -> None:  # noqa: ANN001
    """The onnx backend measures under the target's name with ORT's info; a form ORT runs
    dense (2:4) is left to the roofline; the cache prices a site of that shape."""
    out = tmp_path / "ort.json"
    ds = [DenseConfig(), LowRankConfig(8), QuantConfig(4, 32, False), Sparse24Config()]
    cache = calibrate_target(
        "ort-cpu", out=out, backend="onnx", shapes=[(64, 32)], decisions=ds,
        workloads=["decode"], threads=1, accuracy_level=4, progress=False,
        repeats=3, min_s=0.0, max_copies=4,
    )
    assert cache.targets() == ["ort-cpu"] and len(cache) == 3
    labels = {k[5]: cache.info[k] for k in cache.entries}
    assert set(labels) == {"dense", "lowrank r=8", "int4 g32 asym rtn"}
    assert labels["int4 g32 asym rtn"]["ops"] == "MatMulNBits 4"  # four copies in one graph
    assert all(i["accuracy_level"] == 4 and i["copies"] == 4 for i in labels.values())
    # where it was measured: ORT's threads (not torch's), torch's version, the machine
    assert all(i["threads"] == 1 and i["torch"] == torch.__version__ and i["machine"]
               for i in labels.values())  # fmt: skip
    site = LinearSite("lin", 64, 32, "torch.float32", False, "lin.weight", "lin")
    reread = MeasuredCache.of(out, "ort-cpu")
    assert latency(QuantConfig(4, 32, False, "gptq"), site, "ort-cpu", "decode", reread)[1] == (
        "measured"
    )
    assert latency(Sparse24Config(), site, "ort-cpu", "decode", reread)[1] == "roofline"
    assert "accuracy_level 4" in reread.describe("ort-cpu")
    assert f"torch {torch.__version__}" in reread.describe("ort-cpu")


def test_calibrate_rejects_bad_requests(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="unknown backend 'tvm'"):
        calibrate_target("x", out=tmp_path / "a.json", backend="tvm")
    with pytest.raises(ValueError, match="ONNX Runtime's CPU provider"):
        calibrate_target("x", out=tmp_path / "a.json", backend="onnx", device="meta")
    with pytest.raises(ValueError, match="float32"):
        calibrate_target("x", out=tmp_path / "a.json", backend="onnx", dtype=torch.bfloat16)
    # no Triton kernel runs on this CPU without the interpreter: every entry would have timed
    # the reference ops under a "triton" runtime (and the cache priced plans as if measured)
    with monkeypatch.context() as m:
        m.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="backend triton on cpu: no Triton kernel runs"):
            calibrate_target("cpu", out=tmp_path / "a.json", backend="triton")
    assert not (tmp_path / "a.json").exists()
    # a typo'd target name is refused by the CLI (optimize(target=...) refused it after the run)
    from slimfx.cli import main

    assert main(["calibrate-target", "--target", "h1OO", "--out", str(tmp_path / "b.json")]) == 2
    assert "unknown target 'h1OO' (did you mean 'h100'?)" in capsys.readouterr().err
    assert parse_shapes(None) == list(DEFAULT_SHAPES) == parse_shapes("SmolLM2")
    assert parse_shapes("576x1536, 8x4") == [(576, 1536), (8, 4)]
    with pytest.raises(ValueError, match="IN x OUT"):
        parse_shapes("576*1536")


# ------------------------------------------------------------------- the solver with the cache

TINY_SHAPES = [(64, 64), (64, 32), (64, 128), (128, 64)]  # tiny_llama's q/o, k/v, gate/up, down


def _slow_int8_cache(path, **info) -> MeasuredCache:  # noqa: ANN001
    """What ORT's CPU provider at accuracy_level 0 looks like: int4 MatMulNBits at half the
    dense time, int8 MatMulNBits ten times slower than dense, low-rank by its bytes."""
    cache = MeasuredCache(path)
    for in_f, out_f in TINY_SHAPES:
        dense = 1e-8 * in_f * out_f
        for d in default_decisions(in_f, out_f):
            if isinstance(d, QuantConfig):
                t = dense * (10.0 if d.bits == 8 else 0.5)
            else:
                t = dense * d.weight_bytes(LinearShape(in_f, out_f)) / (2 * in_f * out_f)
            key = MeasuredCache.key("linear", 1, in_f, out_f, "torch.float32", d, "ort-cpu")
            cache.put(key, t, runtime="synthetic", **info)
    cache.save()
    return cache


def _calib(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (1, 32), generator=g) for _ in range(n)]


def test_measured_latencies_steer_the_solver(tmp_path) -> None:  # noqa: ANN001
    from slimfx.models import tiny_llama

    path = tmp_path / "ort.json"
    _slow_int8_cache(path)
    kw = dict(calibration=_calib(), target="ort-cpu", backend="onnx",
              families=("int8", "int4"), exclude=["lm_head"], progress=False)
    model = tiny_llama()
    roof = slimfx.report_of(slimfx.optimize(model, Budget(latency=0.9), **kw))
    meas = slimfx.report_of(
        slimfx.optimize(model, Budget(latency=0.9), latency_cache=str(path), **kw)
    )
    int8 = lambda r: sum(s.decision.get("bits") == 8 for s in r.sites)  # noqa: E731
    # the roofline prices int8 by its bytes (half of dense) and picks it for its lower error;
    # the measurements say it is 10× slower than dense: never under a latency budget
    assert int8(roof) > 0 and int8(meas) == 0
    assert {s.latency_source for s in roof.sites} == {"roofline"}
    assert any("does not know ONNX Runtime's kernels" in n for n in roof.notes)
    assert {s.latency_source for s in meas.sites} == {"measured"}
    assert meas.totals["est_latency_ratio"] <= 0.9 + 1e-9
    note = next(n for n in meas.notes if n.startswith("latency: "))
    assert "options measured (" in note and "synthetic" in note
    # the synthetic runtime is not the ONNX Runtime backend=onnx deploys on: said so
    assert any(n.startswith("latency cache measured with synthetic, not onnxruntime")
               for n in meas.notes)  # fmt: skip
    with pytest.raises(ValueError, match="no measurement for target 'cpu'"):
        slimfx.optimize(model, Budget(latency=0.9), **{**kw, "target": "cpu"},
                        latency_cache=path)


def test_cli_latency_budget_with_a_cache(tmp_path, capsys) -> None:  # noqa: ANN001
    from slimfx.cli import main

    path = tmp_path / "ort.json"
    _slow_int8_cache(path)
    out = tmp_path / "o"
    argv = ["optimize", "--model", "tiny", "--latency", "0.9", "--latency-cache", str(path),
            "--target", "ort-cpu", "--backend", "onnx", "--families", "int8,int4",
            "--n-calib", "4", "--seq-len", "32", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["budget"]["latency"] == 0.9 and rep["budget"]["memory"] is None
    assert {s["latency_source"] for s in rep["sites"] if s["fqn"] != "lm_head"} == {"measured"}
    assert main(["optimize", "--model", "tiny", "--budget", "0.5", "--bits", "4",
                 "--out", str(out)]) == 2
    assert "--budget or --bits" in capsys.readouterr().err


def test_cli_calibrate_onnx(tmp_path, capsys) -> None:  # noqa: ANN001
    from slimfx.cli import main

    out = tmp_path / "c.json"
    assert main(["calibrate-target", "--backend", "onnx", "--shapes", "32x16", "--threads", "1",
                 "--rotate-mb", "0", "--quiet", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    cache = MeasuredCache(out)
    assert cache.targets() == ["ort-cpu"]
    # decode and prefill of dense + the low-rank ladder + int8 per-channel and int4 g32 (32
    # columns: no group of 64 or 128)
    assert len(cache) == 2 * len(default_decisions(32, 16))
    labels = {k[5] for k in cache.entries}
    assert {"dense", "int8 ch sym rtn", "int4 g32 asym rtn"} <= labels
    assert not any("g64" in lab or "g128" in lab for lab in labels)
    assert "target 'ort-cpu' (backend onnx on cpu)" in said
    assert {i["copies"] for i in cache.info.values()} == {1}


def test_calibrate_triton_records_the_kernel_that_ran(tmp_path) -> None:  # noqa: ANN001
    """backend triton times the lowered modules (the Triton interpreter on this CPU); each
    entry names the kernel that ran — F.linear for dense."""
    needs_triton_kernels()
    if torch.cuda.is_available():
        pytest.skip("checks the interpreter path")
    ds = [DenseConfig(), LowRankConfig(4), QuantConfig(4, 32, False)]
    cache = calibrate_target(
        "cpu", out=tmp_path / "t.json", backend="triton", shapes=[(64, 32)], decisions=ds,
        workloads=["decode"], progress=False, repeats=3, min_s=0.0, max_copies=2,
    )
    kernels = {k[5]: cache.info[k]["kernel"] for k in cache.entries}
    assert kernels["dense"] == "F.linear"
    assert kernels["lowrank r=4"].startswith("lowrank_linear_triton")
    assert kernels["int4 g32 asym rtn"] == "quant_linear_triton"


def test_export_at_another_accuracy_level_than_measured_says_so(tmp_path) -> None:  # noqa: ANN001
    """The report keeps what priced the plan; exporting at another MatMulNBits accuracy level
    than the timings were measured at is noted (int8's speed differs most between levels)."""
    from slimfx.backends.onnx import export_onnx
    from slimfx.models import tiny_llama

    path = tmp_path / "ort4.json"
    _slow_int8_cache(path, accuracy_level=4, threads=2)
    new = slimfx.optimize(tiny_llama(), Budget(latency=0.9), calibration=_calib(3),
                          target="ort-cpu", backend="onnx", families=("int4",),
                          exclude=["lm_head"], latency_cache=path, progress=False)
    meta = slimfx.report_of(new).meta["latency_cache"]
    assert meta == {"file": "ort4.json", "target": "ort-cpu", "entries": len(
        MeasuredCache(path)), "runtime": ["synthetic"], "accuracy_level": [4], "threads": [2]}
    ids = torch.zeros(1, 8, dtype=torch.long)
    same = export_onnx(new, tmp_path / "a4.onnx", (ids,), accuracy_level=4)
    assert not any("priced with ONNX Runtime timings" in n for n in same.notes)
    other = export_onnx(new, tmp_path / "a0.onnx", (ids,), accuracy_level=0)
    note = next(n for n in other.notes if "priced with ONNX Runtime timings" in n)
    assert "accuracy_level 4 (ort4.json)" in note and "uses accuracy_level 0" in note
    assert other.accuracy_level == 0
    assert any(n == f"onnx: {note}" for n in slimfx.report_of(new).notes)
