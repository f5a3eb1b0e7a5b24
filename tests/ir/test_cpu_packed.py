"""The packed CPU path of the quantized linears: numerics against the reference op, kernel
choice and its reasons, repacking when codes change, and the graph paths left unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimfx.ir import cpu_packed
from slimfx.ir.cpu_runtime import cpu_runtimes, prepare_cpu, release_cpu, runtime_of
from slimfx.ir.modules import module_for
from slimfx.ir.modules_quant import QuantLinear
from slimfx.ir.modules_sparse import LowRankQuantLinear
from slimfx.ir.ops_quant import quant_linear
from slimfx.ir.sites import LinearSite
from slimfx.passes.rules.quant import LinearToQuant
from slimfx.planning.configs import (
    LowRankConfig,
    LowRankQuantConfig,
    QuantConfig,
    Sparse24Config,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _site(in_f: int, out_f: int) -> LinearSite:
    return LinearSite("lin", in_f, out_f, "torch.float32", True, "lin.weight", "lin")


def _quant(cfg: QuantConfig, in_f: int = 128, out_f: int = 48, seed: int = 0) -> QuantLinear:
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=_gen(seed)) * 0.05)
        lin.bias.copy_(torch.randn(out_f, generator=_gen(seed + 1)))
    return LinearToQuant().build_module(_site(in_f, out_f), lin, cfg)


def _reference(mod: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return quant_linear(x, mod.qweight, mod.scales, mod.zeros, mod.bias, mod.bits, mod.group_size)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


CONFIGS = [
    QuantConfig(4, 32, False), QuantConfig(4, 64, True), QuantConfig(4, 128, False),
    QuantConfig(4, None, False),  # per channel: through group 128 with repeated scales
    QuantConfig(8, None, True), QuantConfig(8, None, False), QuantConfig(8, 32, False),
    QuantConfig(8, 64, True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.short())
@pytest.mark.parametrize("rows", [1, 5, 40, 70])  # 40: grouped int8 rebuilds for one GEMM
@pytest.mark.parametrize("dequant_rows", [None, 64])  # 70 rows: the dequantize-then-GEMM path
def test_packed_matches_reference(cfg: QuantConfig, rows: int, dequant_rows: int | None) -> None:
    mod = _quant(cfg)
    x = torch.randn(rows, 128, generator=_gen(3))
    with torch.no_grad():
        ref = _reference(mod, x)
        exact = prepare_cpu(mod, activations="model", dequant_rows=dequant_rows)[""]
        y_model = mod(x)
        rt = prepare_cpu(mod, dequant_rows=dequant_rows)[""]
        y = mod(x)
    assert rt.kernel == ("int4pack" if cfg.bits == 4 else "int8pack") and not rt.slower_than_dense
    assert rt.activations == "bfloat16" and exact.activations == "float32"
    assert y.dtype == torch.float32 and y.shape == ref.shape
    # fp32 activations: the kernels' own accumulation order only (the prefill path is exact)
    assert _rel(y_model, ref) < 1e-5
    # bf16 at the boundary: scales, zero offsets and x rounded to bf16 (≈ 2^-9 each)
    assert _rel(y, ref) < 8e-3
    # ... an order of magnitude below what the codes themselves cost against the dense layer
    lin_err = _rel(ref, F.linear(x, _dense_of(mod), mod.bias.detach()))
    if cfg.bits == 4:
        assert _rel(y, ref) < 0.2 * lin_err


def _dense_of(mod: QuantLinear) -> torch.Tensor:
    return torch.randn(mod.out_features, mod.in_features, generator=_gen(0)) * 0.05


def test_leading_dims_bf16_model_and_no_grad_fallback() -> None:
    mod = _quant(QuantConfig(4, 32, False))
    prepare_cpu(mod)
    x = torch.randn(2, 3, 128, generator=_gen(4))
    with torch.no_grad():
        assert mod(x).shape == (2, 3, 48)
        torch.testing.assert_close(mod(x)[1], mod(x[1]))
    # a forward that needs x's gradient runs the reference op (its autograd)
    xg = x.clone().requires_grad_(True)
    y = mod(xg)
    assert torch.equal(y, _reference(mod, xg))
    y.sum().backward()
    assert xg.grad is not None
    # a bf16 model runs the kernel in its own dtype; its dense bf16 GEMM wins at prefill
    half = _quant(QuantConfig(4, 32, False)).to(torch.bfloat16)
    rt = prepare_cpu(half)[""]
    assert rt.activations == "bfloat16" and rt.slower_at_prefill and not rt.slower_than_dense
    assert rt.caveat() == "; slower than dense at prefill"
    many = _quant(QuantConfig(8, 16, False)).to(torch.bfloat16)  # 8 groups of 16
    rt8 = runtime_of(many)
    assert rt8.slower_than_dense and "8 groups" in rt8.reason
    assert not runtime_of(_quant(QuantConfig(8, 16, False))).slower_than_dense  # fp32 model
    with torch.no_grad():
        xb = x.to(torch.bfloat16)
        assert _rel(half(xb), _reference(half, xb)) < 1e-2


@pytest.mark.parametrize("cfg", [QuantConfig(8, None, True), QuantConfig(8, 32, False),
                                 QuantConfig(4, 32, False)], ids=lambda c: c.short())
@pytest.mark.parametrize("width", [127, 129, 96])
def test_wrong_width_input_is_refused(cfg: QuantConfig, width: int) -> None:
    """The int8 kernel runs per group on slices of x: a wider or narrower input must raise,
    never read the first ``in`` columns of it (as the reference op would refuse it too)."""
    mod = _quant(cfg)
    prepare_cpu(mod)
    with torch.no_grad(), pytest.raises(RuntimeError, match=rf"takes 128 input features, "
                                                            rf"got an input of width {width}"):
        mod(torch.randn(2, width))


def test_repacks_when_codes_change_and_release() -> None:
    a, b = _quant(QuantConfig(4, 32, False), seed=0), _quant(QuantConfig(4, 32, False), seed=7)
    prepare_cpu(a)
    x = torch.randn(1, 128, generator=_gen(5))
    with torch.no_grad():
        before = a(x)
        a.load_state_dict(b.state_dict())  # copies in place: the packed copy is stale
        after = a(x)
        assert _rel(after, _reference(b, x)) < 8e-3
        assert _rel(after, before) > 0.1
        a.qweight.zero_()  # written in place
        assert _rel(a(x), _reference(a, x)) < 8e-3
    from slimfx.ir.cpu_runtime import packed_bytes

    # int4 g32: the codes again (in·out / 2) plus bf16 scale and offset per group
    assert packed_bytes(a) == 48 * 128 // 2 + (128 // 32) * 48 * 2 * 2
    assert release_cpu(a) == 1 and release_cpu(a) == 0 and packed_bytes(a) == 0
    with torch.no_grad():
        assert torch.equal(a(x), _reference(a, x))


def test_kernel_choice_reasons() -> None:
    assert cpu_packed.cpu_kernel_for(4, 32, 128, 40) == (
        None, "out_features 40 is not a multiple of 16 (int4 pack layout)")
    kernel, why = cpu_packed.cpu_kernel_for(4, 48, 96, 32)
    assert kernel is None and "group size 48" in why
    assert cpu_packed.cpu_kernel_for(4, 96, 96, 32)[0] == "int4pack"  # per channel, via 32
    assert cpu_packed.cpu_kernel_for(8, 48, 96, 40)[0] == "int8pack"
    # int8: each call's K (a group, or in_features per channel) a multiple of 16 — torch's
    # kernel crashed the process at in_features 70 and returned garbage at 8
    assert cpu_packed.cpu_kernel_for(8, 128, 80, 40)[0] == "int8pack"  # per channel, 80
    for bits_group, width in (((8, 128), 70), ((8, 8), 64), ((8, 24), 72)):
        kernel, why = cpu_packed.cpu_kernel_for(*bits_group, width, 32)
        assert kernel is None and "not a multiple of 16" in why, (bits_group, width)
    odd = _quant(QuantConfig(4, 32, False), out_f=40)
    rt = prepare_cpu(odd)[""]
    assert rt.kernel == "reference op" and rt.slower_than_dense and "multiple of 16" in rt.reason
    with torch.no_grad():
        x = torch.randn(1, 128, generator=_gen(6))
        assert torch.equal(odd(x), _reference(odd, x))
    with pytest.raises(ValueError, match="activation policy"):
        prepare_cpu(odd, activations="fp8")
    with pytest.raises(ValueError, match="dequant_rows"):
        prepare_cpu(odd, dequant_rows=0)


def test_other_forms_runtime_records() -> None:
    lr = module_for(LowRankConfig(8)).empty(LowRankConfig(8), 64, 32, False)
    assert runtime_of(lr).kernel == "two GEMMs" and not runtime_of(lr).slower_than_dense
    sp = module_for(Sparse24Config()).empty(Sparse24Config(), 64, 32, False)
    rt = runtime_of(sp)
    assert rt.kernel == "reference op" and rt.slower_than_dense and "sparse24" in rt.reason
    model = nn.Sequential(lr, sp)
    assert set(cpu_runtimes(model)) == {"0", "1"}


def test_lowrank_quant_packed_matches_reference() -> None:
    cfg = LowRankQuantConfig(8, 4, 32, False)
    mod = LowRankQuantLinear.empty(cfg, 128, 48, True)
    with torch.no_grad():
        for t in (mod.U, mod.V, mod.bias):
            t.copy_(torch.randn(t.shape, generator=_gen(t.numel())) * 0.1)
        mod.qweight.copy_(torch.randint(0, 256, mod.qweight.shape, generator=_gen(1)))
        mod.scales.copy_(torch.rand(mod.scales.shape, generator=_gen(2)) * 0.01)
        mod.zeros.copy_(torch.randint(0, 16, mod.zeros.shape, generator=_gen(3)))
        x = torch.randn(3, 128, generator=_gen(4))
        ref = mod(x)
        rt = prepare_cpu(mod)[""]
        assert rt.kernel == "int4pack + two GEMMs"
        assert _rel(mod(x), ref) < 8e-3


def test_export_traces_the_reference_op() -> None:
    mod = _quant(QuantConfig(4, 32, False))
    prepare_cpu(mod)
    ep = torch.export.export(mod, (torch.randn(2, 128),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "slimfx.quant_linear.default" in targets
    assert not any("int4pack" in t for t in targets)
