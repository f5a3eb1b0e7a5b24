"""The slimfx op vocabulary: registration checks, numerics, gradients, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfx.ir import ops
from slimfx.ir.capture import FQN_KEY, ORIGIN_KEY, capture
from slimfx.ir.modules import LowRankLinear
from slimfx.ir.verify import verify
from slimfx.planning.configs import LowRankConfig

LOWRANK = torch.ops.slimfx.lowrank_linear.default


def _factors(dtype: torch.dtype, bias: bool, requires_grad: bool = False, seed: int = 0):
    """x (2×3×16), U (8×4), V (4×16), b (8) or None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, generator=g)
    U = torch.randn(8, 4, generator=g)
    V = torch.randn(4, 16, generator=g)
    b = torch.randn(8, generator=g) if bias else None
    out = [t if t is None else t.to(dtype).requires_grad_(requires_grad) for t in (x, U, V, b)]
    return tuple(out)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lowrank_linear_opcheck(dtype, bias):
    args = _factors(dtype, bias, requires_grad=True)
    if dtype == torch.bfloat16:
        # opcheck compares eager with an aot-compiled run of the same op; bf16 keeps 8 mantissa
        # bits, so the two may round differently: assert_close's bf16 defaults (rtol 1.6e-2)
        tol = {"rtol": 1.6e-2, "atol": 1e-5}
    else:
        tol = {}  # fp32: assert_close defaults (rtol 1.3e-6, atol 1e-5)
    result = torch.library.opcheck(LOWRANK, args, **tol)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lowrank_linear_matches_dense_product_fp32(bias):
    x, U, V, b = _factors(torch.float32, bias)
    want = x @ (U @ V).T + (b if bias else 0)
    # fp32, inner dims 16 and 4: reassociation (x V^T) U^T vs x (UV)^T differs by a few ulps
    torch.testing.assert_close(LOWRANK(x, U, V, b), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.lowrank_linear(x, U, V, b), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lowrank_linear_bf16_close_to_fp32_reference(bias):
    x, U, V, b = _factors(torch.float32, bias)
    want = x @ (U @ V).T + (b if bias else 0)
    xb, Ub, Vb, bb = _factors(torch.bfloat16, bias)
    got = LOWRANK(xb, Ub, Vb, bb)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # inputs, the intermediate x Vᵀ and the output are each rounded to bf16 (8 mantissa bits);
    # outputs reach |y| ≈ 18, where one bf16 ulp is 0.125: allow one ulp there plus 2% relative
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=0.125)


def test_lowrank_linear_gradients_match_autograd_of_reference():
    x, U, V, b = _factors(torch.float64, True, requires_grad=True)
    assert torch.autograd.gradcheck(LOWRANK, (x, U, V, b))
    y = LOWRANK(x, U, V, b)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, U, V, b), gy)
    want = torch.autograd.grad(torch.nn.functional.linear(x, U @ V, b), (x, U, V, b), gy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)  # float64: default tolerances are tight


def test_lowrank_linear_fake_rejects_rank_mismatch():
    x, U, V, _ = _factors(torch.float32, False)
    V3 = V[:3].clone()  # rank 3 against U's rank 4
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx_, fU, fV = (mode.from_tensor(t) for t in (x, U, V3))
        with pytest.raises(RuntimeError, match="rank"):
            LOWRANK(fx_, fU, fV)


def test_export_of_lowrank_module_keeps_the_op():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 16), LowRankLinear(LowRankConfig(rank=4), 16, 8, bias=True)
    ).eval()
    for p in model[1].parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 16)
    cap = capture(model, (x,), fallback=False)
    nodes = [n for n in cap.gm.graph.nodes if n.target == LOWRANK]
    assert len(nodes) == 1
    (node,) = nodes
    assert node.meta[FQN_KEY] == "1"
    assert node.meta["val"].shape == (2, 8)
    # a module swap done before capture is its provenance
    assert node.meta[ORIGIN_KEY] == {"pass": "module_swap", "rule": "LowRankLinear", "site": "1"}
    verify(cap.gm)
    with torch.no_grad():
        torch.testing.assert_close(cap.program.module()(x), model(x))  # same ops, same order
