"""lowrank_linear: fused decode kernel and tiled fallback vs two F.linear calls."""

from __future__ import annotations

import pytest
import torch

from . import DEVICE, DTYPES, assert_close_scaled, kernels_interpreted_or_cuda, triton_skip_reason

_why = triton_skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)

import slimfx.kernels as sk  # noqa: E402
from slimfx.kernels.lowrank_linear import triton_kernel as tk  # noqa: E402
from slimfx.kernels.lowrank_linear.reference import lowrank_linear_reference  # noqa: E402

_why = kernels_interpreted_or_cuda(tk._lowrank_fused_kernel)
if _why:
    pytest.skip(_why, allow_module_level=True)


def make_factors(N: int, K: int, r: int, dtype: torch.dtype, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    U = (torch.randn(N, r, generator=g) / r**0.5).to(dtype).to(DEVICE)
    V = (torch.randn(r, K, generator=g) / K**0.5).to(dtype).to(DEVICE)
    return U, V


@pytest.mark.parametrize("M", [1, 3, 33])  # fused FMA, fused tl.dot, tiled
@pytest.mark.parametrize("r", [8, 20])  # one rank block / a partial second block
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(M: int, r: int, dtype: torch.dtype) -> None:
    N, K = 40, 96
    U, V = make_factors(N, K, r, dtype, seed=M + r)
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    bias = torch.randn(N, dtype=dtype, device=DEVICE) if (M + r) % 2 else None
    y = tk.lowrank_linear(x, U, V, bias)
    assert_close_scaled(y, lowrank_linear_reference(x, U, V, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_with_n_slices_and_rank_blocks(dtype: torch.dtype) -> None:
    # 3 rank blocks of 16 (r=40) × 3 N slices: atomics from several programs per output.
    N, K, r = 72, 96, 40
    U, V = make_factors(N, K, r, dtype)
    bias = torch.randn(N, dtype=dtype, device=DEVICE)
    cfg = tk.FusedConfig(max_m=16, block_m=16, block_r=16, block_k=32, block_n=16)
    for M, config in ((1, None), (4, cfg)):
        x = torch.randn(M, K, dtype=dtype, device=DEVICE)
        y = tk.lowrank_linear_fused(x, U, V, bias, config=config, n_split=3)
        assert_close_scaled(y, lowrank_linear_reference(x, U, V, bias), dtype)


def test_tiled_at_decode_shapes_and_3d_input() -> None:
    U, V = make_factors(40, 96, 300, torch.float16)
    x = torch.randn(2, 1, 96, dtype=torch.float16, device=DEVICE)
    y = tk.lowrank_linear(x, U, V, None)  # rank 300 > 256: the op takes the tiled path
    assert y.shape == (2, 1, 40)
    assert_close_scaled(y, lowrank_linear_reference(x, U, V), torch.float16)


def test_factors_in_another_dtype_are_used_in_x_dtype() -> None:
    U, V = make_factors(40, 96, 8, torch.float32)
    x = torch.randn(3, 96, dtype=torch.bfloat16, device=DEVICE)
    ref = lowrank_linear_reference(x, U, V)
    assert_close_scaled(tk.lowrank_linear_fused(x, U, V), ref, x.dtype)
    assert_close_scaled(tk.lowrank_linear_tiled(x, U, V), ref, x.dtype)


def test_fused_rejects_prefill_and_large_rank() -> None:
    U, V = make_factors(40, 96, 8, torch.float32)
    ok, why = tk.supports_fused(torch.randn(33, 96, device=DEVICE), U, V)
    assert not ok and why == "M=33 rows > 16 (the fused kernel is for decode)"
    U3, V3 = make_factors(40, 96, 300, torch.float32)
    ok, why = tk.supports_fused(torch.randn(1, 96, device=DEVICE), U3, V3)
    assert not ok and why == "rank 300 > 256 (intermediate too large for registers)"
    assert tk.supports_tiled(torch.randn(33, 96, device=DEVICE), U3, V3) == (True, "")


def test_rejects_mismatched_shapes() -> None:
    U, V = make_factors(40, 96, 8, torch.float32)
    ok, why = tk.supports_tiled(torch.randn(1, 95, device=DEVICE), U, V)
    assert not ok and why == "V has 96 columns but x has 95 features"
    ok, why = tk.supports_tiled(torch.randn(1, 96, device=DEVICE), U[:, :7], V)
    assert not ok and why == "rank mismatch: U has 7 columns, V has 8 rows"
    ok, why = tk.supports_tiled(torch.randn(1, 96, device=DEVICE), U, V, torch.randn(39))
    assert not ok and why.startswith("bias must be floating (40,)")


def test_registry_prefers_fused_for_decode() -> None:
    U, V = make_factors(40, 96, 8, torch.float32)
    x1 = torch.randn(1, 96, device=DEVICE)
    kernel, reasons = sk.select("lowrank_linear", x1, U=U, V=V, bias=None)
    assert kernel is not None and kernel.name == "lowrank_linear_triton_fused" and reasons == []
    x33 = torch.randn(33, 96, device=DEVICE)
    kernel, reasons = sk.select("lowrank_linear", x33, U=U, V=V, bias=None)
    assert kernel is not None and kernel.name == "lowrank_linear_triton_tiled"
    assert reasons == [
        "lowrank_linear_triton_fused: M=33 rows > 16 (the fused kernel is for decode)"
    ]
    assert_close_scaled(kernel.run(x33, U=U, V=V, bias=None),
                        lowrank_linear_reference(x33, U, V), torch.float32)


def test_custom_op_opcheck_and_export() -> None:
    U, V = make_factors(40, 96, 8, torch.float32)
    x = torch.randn(3, 96, device=DEVICE)
    bias = torch.randn(40, device=DEVICE)
    op = torch.ops.slimfx_kernels.lowrank_linear_triton.default
    torch.library.opcheck(op, (x, U, V, bias))

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.slimfx_kernels.lowrank_linear_triton(x, U, V, bias)

    ep = torch.export.export(M(), (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == ["slimfx_kernels.lowrank_linear_triton.default"]
