"""Triton lowering: slimfx ops → slimfx_kernels::*_triton ops where a kernel accepts the call,
the reference op (with the reason) where none does; graphs (node replacement) and
module-swapped models (class switch). CPU runs the kernels under TRITON_INTERPRET=1 (set by
tests/conftest.py), so shapes stay tiny."""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from _helpers import needs_triton_kernels
from torch import fx, nn

from slimfx.backends.triton_lowering import (
    LOWERED_FROM_KEY,
    TritonLowRankLinear,
    TritonQuantLinear,
    TritonSparse24Linear,
    lower_to_triton,
    unlower,
)
from slimfx.ir.find import discover_linear_sites
from slimfx.ir.modules import LowRankLinear
from slimfx.ir.modules_quant import QuantLinear
from slimfx.ir.verify import ORIGIN_KEY, verify
from slimfx.passes import apply_plan
from slimfx.planning.configs import LowRankConfig, LowRankQuantConfig, QuantConfig, Sparse24Config
from slimfx.planning.plan import Plan


def _skip_reason() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton not installed ({e})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "no CUDA and TRITON_INTERPRET unset: no Triton kernel can run"
    return ""


if _skip_reason():
    pytest.skip(_skip_reason(), allow_module_level=True)

REF_LOWRANK = torch.ops.slimfx.lowrank_linear.default
REF_QUANT = torch.ops.slimfx.quant_linear.default
K_LOWRANK = torch.ops.slimfx_kernels.lowrank_linear_triton.default
K_QUANT = torch.ops.slimfx_kernels.quant_linear_triton.default
# Kernel and reference both accumulate in fp32, in different orders: agreement to round-off,
# bounded as a fraction of the largest output (tests/kernels uses the same 1e-5 for fp32).
REL_TOL = 1e-5


def close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = (y - ref).abs().max().item()
    assert err <= REL_TOL * ref.abs().max().item(), err


def count(gm: fx.GraphModule, target: object) -> int:
    return sum(n.op == "call_function" and n.target == target for n in gm.graph.nodes)


def swapped(quant: QuantConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Linear(32→32) quantized, ReLU, Linear(32→8) at rank 4: the model optimize() returns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype).eval()
    plan = Plan({"0": quant, "2": LowRankConfig(4, "svd")})
    out, _ = apply_plan(model, plan, discover_linear_sites(model))
    return out


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 32, generator=torch.Generator().manual_seed(1))


def test_graph_nodes_lowered_and_match_reference(x) -> None:
    needs_triton_kernels()
    model = swapped(QuantConfig(bits=4, group_size=16))
    batch = torch.export.Dim("batch", min=1, max=64)  # symbolic sizes: checked at their hints
    gm = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
    assert count(gm, REF_QUANT) == 1 and count(gm, REF_LOWRANK) == 1

    gm, result = lower_to_triton(gm)
    assert result.modified
    assert count(gm, REF_QUANT) == 0 and count(gm, REF_LOWRANK) == 0
    assert count(gm, K_QUANT) == 1 and count(gm, K_LOWRANK) == 1
    assert {(r.fqn, r.status, r.extra["kernel"]) for r in result.records} == {
        ("0", "applied", "quant_linear_triton"),
        ("2", "applied", "lowrank_linear_triton_fused"),
    }
    for node in gm.graph.nodes:
        if node.target in (K_QUANT, K_LOWRANK):
            assert node.meta[ORIGIN_KEY]["pass"] == "lower_to_triton"
            assert node.meta[LOWERED_FROM_KEY]["op"].startswith("slimfx.")
    verify(gm)
    with torch.no_grad():
        for rows in (3, 20):  # 20 rows: the op takes its tiled path, same graph
            xi = torch.randn(rows, 32, generator=torch.Generator().manual_seed(rows))
            close(gm(xi), model(xi))


def test_graph_fallback_keeps_reference_op_with_reason(x) -> None:
    needs_triton_kernels()
    model = swapped(QuantConfig(bits=4, group_size=8))  # the kernel wants groups of ≥ 16
    gm = torch.export.export(model, (x,)).module()
    gm, result = lower_to_triton(gm)
    status = {r.fqn: (r.status, r.reason) for r in result.records}
    assert status["2"][0] == "applied"
    assert status["0"][0] == "fallback"
    assert "quant_linear_triton: group_size 8 is not a power of two ≥ 16" in status["0"][1]
    assert count(gm, REF_QUANT) == 1 and count(gm, K_QUANT) == 0 and count(gm, K_LOWRANK) == 1
    with torch.no_grad():
        close(gm(x), model(x))


def test_graph_of_unsupported_dtype_is_left_as_is(x) -> None:
    model = swapped(QuantConfig(bits=8, group_size=None), dtype=torch.float64)
    gm = torch.export.export(model, (x.double(),)).module()
    code = gm.code
    gm, result = lower_to_triton(gm)
    assert not result.modified and gm.code == code
    assert [r.status for r in result.records] == ["fallback", "fallback"]
    assert all("x dtype torch.float64 unsupported" in r.reason for r in result.records)


def test_module_swapped_model_switches_class_and_matches(x) -> None:
    needs_triton_kernels()
    model = swapped(QuantConfig(bits=4, group_size=16))
    with torch.no_grad():
        ref = model(x)
    keys = list(model.state_dict())
    out, result = lower_to_triton(model)
    assert out is model and result.modified
    assert type(model[0]) is TritonQuantLinear and type(model[2]) is TritonLowRankLinear
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], LowRankLinear)
    assert list(model.state_dict()) == keys  # FQNs and state_dict keys unchanged
    assert model[2].slimfx_lowering["kernel"] == "lowrank_linear_triton_fused"
    with torch.no_grad():
        close(model(x), ref)
        # the class switch survives deepcopy and pickling
        close(copy.deepcopy(model)(x), ref)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        close(torch.load(buf, weights_only=False)(x), ref)
    unlower(model)
    assert type(model[0]) is QuantLinear and type(model[2]) is LowRankLinear


def test_module_call_with_unchecked_dtype_warns_and_runs_reference(x) -> None:
    needs_triton_kernels()
    model = swapped(QuantConfig(bits=4, group_size=16))
    lower_to_triton(model)
    low = model[2]
    low.double()
    with torch.no_grad(), pytest.warns(UserWarning, match="float64 unsupported"):
        y = low(torch.relu(x).double())
    assert y.dtype == torch.float64
    assert (torch.float64, torch.device("cpu")) in low.slimfx_lowering["declined"]


def test_a_forward_that_needs_gradients_runs_the_reference_op_with_a_warning(x) -> None:
    """The kernel ops have no backward: with grad mode on and a weight (or the input) that
    requires grad, a lowered module ran the kernel and its output carried no gradient to the
    low-rank factors. The reference op runs instead (the same gradients as never lowered),
    with one warning per module; under no_grad the kernel runs."""
    needs_triton_kernels()
    model = swapped(QuantConfig(bits=4, group_size=16))
    ref = copy.deepcopy(model)
    lower_to_triton(model)
    with pytest.warns(UserWarning, match=r"TritonLowRankLinear: gradients may flow .* the "
                      r"reference op runs"):  # fmt: skip
        model(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(model[2].U.grad, ref[2].U.grad)
    assert model[2].slimfx_lowering["grad_warned"]
    calls, want = [], ref(x).detach()
    real = LowRankLinear.forward
    LowRankLinear.forward = lambda self, x: calls.append(1) or real(self, x)
    try:
        with torch.no_grad():
            close(model(x), want)
    finally:
        LowRankLinear.forward = real
    assert calls == []  # the kernel, not the reference op, under no_grad


def test_module_of_unsupported_dtype_stays_with_reason() -> None:
    model = swapped(QuantConfig(bits=8, group_size=None), dtype=torch.float64)
    _, result = lower_to_triton(model)
    assert not result.modified
    assert type(model[0]) is QuantLinear and type(model[2]) is LowRankLinear
    assert [r.status for r in result.records] == ["fallback", "fallback"]
    assert all("x dtype torch.float64 unsupported" in r.reason for r in result.records)


def test_sparse24_graph_and_module_lowered(x) -> None:
    needs_triton_kernels()
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 16)).eval()
    plan = Plan({"0": Sparse24Config(mask="magnitude", compensate=False)})
    model, _ = apply_plan(dense, plan, discover_linear_sites(dense))
    with torch.no_grad():
        ref = model(x)
    gm = torch.export.export(model, (x,)).module()
    gm, result = lower_to_triton(gm)
    assert [(r.status, r.extra["kernel"]) for r in result.records] == [
        ("applied", "sparse24_linear_triton_gemv")
    ]
    assert count(gm, torch.ops.slimfx_kernels.sparse24_linear_triton.default) == 1
    with torch.no_grad():
        close(gm(x), ref)
    _, result = lower_to_triton(model)
    assert type(model[0]) is TritonSparse24Linear and result.records[0].status == "applied"
    with torch.no_grad():
        close(model(x), ref)


def test_combined_form_has_no_lowering_and_says_so(x) -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 16)).eval()
    plan = Plan({"0": LowRankQuantConfig(rank=2, bits=4, group_size=16)})
    model, _ = apply_plan(dense, plan, discover_linear_sites(dense))
    gm = torch.export.export(model, (x,)).module()
    code = gm.code
    gm, result = lower_to_triton(gm)
    (rec,) = result.records
    assert rec.status == "fallback" and rec.reason.startswith("no Triton lowering for slimfx::")
    assert gm.code == code
    _, result = lower_to_triton(model)
    (rec,) = result.records
    assert rec.status == "fallback" and "no Triton-lowered form of LowRankQuantLinear" in rec.reason


def test_optimize_for_the_triton_backend_runs_its_kernels(tmp_path) -> None:
    """optimize(backend="triton") priced the Triton runtime but returned the reference modules
    (nothing lowered them): its linears now run the Triton kernels, the report says which, and
    load() lowers a saved one again."""
    needs_triton_kernels()
    import slimfx
    from slimfx.backends.triton_lowering import _Lowered
    from slimfx.models import tiny_llama

    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 256, (1, 32), generator=gen) for _ in range(3)]
    model = tiny_llama()
    out = slimfx.optimize(model, 0.5, calibration=calib, backend="triton", progress=False)
    rep = slimfx.report_of(out)
    plan = slimfx.Plan.from_dict(rep.meta["plan"])
    ref = slimfx.optimize(model, plan=plan, calibration=calib, cpu_kernels=False, progress=False)
    lowered = {n for n, m in out.named_modules() if isinstance(m, _Lowered)}
    assert lowered and lowered == {s.fqn for s in rep.sites if s.status == "applied"}
    assert all(rep.site(n).runtime.startswith("triton ") for n in lowered)
    ids = torch.randint(0, 256, (1, 5), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(out(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    slimfx.save(out, tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    assert {n for n, m in back.named_modules() if isinstance(m, _Lowered)} == lowered
