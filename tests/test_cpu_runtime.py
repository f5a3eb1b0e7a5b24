"""optimize() and load() return models whose quantized linears run torch's packed CPU kernels;
the report names the runtime and each site's kernel; the cpu roofline prices what runs."""

from __future__ import annotations

import pytest
import torch
from _helpers import calib_tokens as _calib

import slimfx
from slimfx.cost.target import estimate_latency
from slimfx.ir.modules import SlimLinear
from slimfx.planning.configs import DenseConfig, LowRankConfig, QuantConfig, Sparse24Config
from slimfx.planning.shapes import LinearShape


def _packed(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, SlimLinear) and "_cpu_packed" in m.__dict__]


@pytest.fixture(scope="module")
def optimized():
    from slimfx.models import tiny_llama

    model = tiny_llama()
    new = slimfx.optimize(model, 0.3, calibration=_calib(), progress=False,
                          families=("int8", "int4", "sparse24"), fisher=False)
    return model, new


def test_optimize_installs_kernels_and_reports_them(optimized):
    model, new = optimized
    rep = slimfx.report_of(new)
    assert rep.runtime == "torch-eager"
    assert "(torch-eager on cpu/decode," in rep.headline()
    applied = [s for s in rep.sites if s.status == "applied"]
    quant = [s for s in applied if s.decision["kind"] == "quant"]
    sparse = [s for s in applied if s.decision["kind"] == "sparse24"]
    assert quant, "the tiny model should take quantized forms at 0.3"
    for s in quant:
        bits = s.decision["bits"]
        assert s.runtime == f"int{bits}pack (bfloat16 activations)", s.runtime
        rt = s.extra["cpu_runtime"]  # the choice with its reason
        assert rt["kernel"] == f"int{bits}pack" and "activations rounded to bfloat16" in rt["reason"]
    for s in sparse:
        assert s.runtime.endswith("slower than dense in eager")
    if sparse:
        assert any("slower than the dense layer" in n for n in rep.notes)
    assert set(_packed(new)) == {s.fqn for s in quant}
    md = rep.to_markdown()
    assert "| runs as |" in md and ("int4pack" in md or "int8pack" in md)
    # the report round-trips with its runtime fields
    back = slimfx.Report.from_dict(rep.to_dict())
    assert back.runtime == "torch-eager" and back.sites[0].runtime == rep.sites[0].runtime


def test_packed_logits_close_to_reference_ops(optimized):
    _, new = optimized
    ids = _calib(1, 24, seed=5)[0]
    with torch.no_grad():
        fast = new(ids).logits
        n = slimfx.release_cpu(new)
        ref = new(ids).logits
        slimfx.prepare_cpu(new)
    assert n > 0
    rel = float((fast - ref).norm() / ref.norm())
    assert 0 < rel < 1e-2, rel  # bf16 activations at each packed layer, through 2 blocks


def test_save_load_packs_and_state_dict_is_unchanged(optimized, tmp_path):
    _, new = optimized
    keys = set(new.state_dict())
    assert not any("packed" in k for k in keys)
    slimfx.save(new, tmp_path / "m")
    loaded = slimfx.load(tmp_path / "m")
    assert set(_packed(loaded)) == set(_packed(new))
    plain = slimfx.load(tmp_path / "m", cpu_kernels=False)
    assert _packed(plain) == []
    ids = _calib(1, 16, seed=6)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, new(ids).logits)


def test_cpu_kernels_false_and_backend_name_the_runtime():
    from slimfx.models import tiny_llama

    model = tiny_llama()
    new = slimfx.optimize(model, 0.4, calibration=_calib(), progress=False, fisher=False,
                          families=("int8", "int4"), cpu_kernels=False, backend="onnx")
    rep = slimfx.report_of(new)
    assert rep.runtime == "onnxruntime" and "(onnxruntime on cpu/decode," in rep.headline()
    assert _packed(new) == []
    quant = [s for s in rep.sites if s.status == "applied"]
    assert quant and all(s.runtime.startswith("reference op") for s in quant)


def test_the_report_follows_prepare_cpu_release_cpu_and_load(tmp_path):
    """The "runs as" column and the slower-than-dense note are rewritten when the packed path
    is switched on or off or a save is loaded (they kept what optimize had installed)."""
    from slimfx.models import tiny_llama

    new = slimfx.optimize(tiny_llama(), 0.6, calibration=_calib(), progress=False,
                          fisher=False, families=("int8",), cpu_kernels=False)  # fmt: skip
    rep = slimfx.report_of(new)
    quant = [s for s in rep.sites if s.status == "applied"]

    def slow_notes():
        return [n for n in rep.notes if "slower than the dense layer" in n]

    assert all(s.runtime.startswith("reference op") for s in quant) and len(slow_notes()) == 1
    slimfx.prepare_cpu(new)
    assert all(s.runtime.startswith("int8pack") for s in quant) and slow_notes() == []
    slimfx.release_cpu(new)
    assert all(s.runtime.startswith("reference op") for s in quant) and len(slow_notes()) == 1
    slimfx.save(new, tmp_path / "m")
    back = slimfx.report_of(slimfx.load(tmp_path / "m"))  # load packs them
    assert all(back.site(s.fqn).runtime.startswith("int8pack") for s in quant)
    assert not [n for n in back.notes if "slower than the dense layer" in n]


def test_an_int8_linear_whose_width_the_kernel_cannot_take_runs_the_reference_op():
    """in_features 70: torch's int8 kernel crashed the process on the first forward; the site
    now runs the reference op (the reason: ``test_kernel_choice_reasons``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(70, 128)).eval()
    x = torch.randn(64, 70)
    new = slimfx.optimize(model, 0.6, calibration=[x], families=("int8",), progress=False)
    (site,) = slimfx.report_of(new).sites
    assert site.chosen.startswith("int8") and site.runtime.startswith("reference op")
    with torch.no_grad():
        assert float((new(x) - model(x)).norm() / model(x).norm()) < 0.02


def test_cpu_roofline_prices_the_reference_ops():
    shape = LinearShape(576, 1536)
    t = {name: estimate_latency(d, shape, False, "cpu", "decode") for name, d in {
        "dense": DenseConfig(), "int4": QuantConfig(4, 32, False),
        "sparse": Sparse24Config(), "lowrank": LowRankConfig(64),
        "int4 no kernel": QuantConfig(4, 48, False),  # no packed kernel takes group 48
    }.items()}
    assert t["int4"] < 0.5 * t["dense"] and t["lowrank"] < t["dense"]
    assert t["sparse"] > t["dense"] and t["int4 no kernel"] > t["dense"]
    # ONNX Runtime's target is not priced as PyTorch's reference ops
    ort = estimate_latency(Sparse24Config(), shape, False, "ort-cpu", "decode")
    assert ort < t["dense"]


def test_calibrate_torch_backend_times_the_packed_kernels(tmp_path):
    cache = slimfx.calibrate_target(
        "cpu", out=tmp_path / "c.json", backend="torch", shapes=[(64, 32)],
        decisions=[QuantConfig(4, 32, False), QuantConfig(8, None, True)],
        workloads=["decode"], progress=False, repeats=3, min_s=0.0, max_s=0.05,
    )
    kernels = sorted(str(i.get("kernel")) for i in cache.info.values())
    assert kernels == ["int4pack (bfloat16 activations)", "int8pack (bfloat16 activations)"]


def test_sparse_sites_are_reported_slower_than_dense():
    from slimfx.models import tiny_llama

    new = slimfx.optimize(tiny_llama(), 0.6, calibration=_calib(), progress=False, fisher=False,
                          families=("sparse24",))
    rep = slimfx.report_of(new)
    sparse = [s for s in rep.sites if s.status == "applied"]
    assert sparse and all(s.decision["kind"] == "sparse24" for s in sparse)
    for s in sparse:
        assert s.runtime == "reference op (float32 activations); slower than dense in eager"
        # the cpu roofline prices the per-call rebuild: slower than the dense layer
        assert s.latency_after_s > s.latency_before_s
    note = next(n for n in rep.notes if "slower than the dense layer" in n)
    assert f"{len(sparse)} rewritten linear(s)" in note and "densified" in note
    assert _packed(new) == []
