"""sparse24_linear: Triton 2:4 kernel (and the CUDA semi-structured path) vs densify + F.linear."""

from __future__ import annotations

import pytest
import torch

from . import DEVICE, DTYPES, assert_close_scaled, kernels_interpreted_or_cuda, triton_skip_reason

_why = triton_skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)

import slimfx.kernels as sk  # noqa: E402
from slimfx.kernels import sparse24_linear as sp  # noqa: E402
from slimfx.kernels.sparse24_linear import triton_kernel as tk  # noqa: E402
from slimfx.kernels.sparse24_linear.reference import (  # noqa: E402
    densify_sparse24,
    pack_sparse24,
    sparse24_linear_reference,
)

_why = kernels_interpreted_or_cuda(tk._sparse24_kernel)
if _why:
    pytest.skip(_why, allow_module_level=True)


def make_sparse(N: int, K: int, dtype: torch.dtype, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    values, meta = pack_sparse24(torch.randn(N, K, generator=g).to(dtype))
    return values.to(DEVICE), meta.to(DEVICE)


def test_pack_keeps_two_largest_per_group_and_densify_inverts() -> None:
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, 0.0, 0.0, -5.0]])
    values, meta = pack_sparse24(w)
    assert values.tolist() == [[-3.0, 2.0, 4.0, -5.0]]
    # group 0 keeps positions (1, 2) → nibble 1 | 2<<2 = 9; group 1 (0, 3) → 0 | 3<<2 = 12
    assert meta.tolist() == [[9 | 12 << 4]]
    assert densify_sparse24(values, meta, 8).tolist() == [[0, -3.0, 2.0, 0, 4.0, 0, 0, -5.0]]


@pytest.mark.parametrize("M", [1, 3, 33])  # gather GEMV, densified tl.dot, M-blocked tl.dot
@pytest.mark.parametrize("K", [96, 100])  # 96: K % 8 == 0; 100: odd group count, padded meta
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(M: int, K: int, dtype: torch.dtype) -> None:
    N = 40
    values, meta = make_sparse(N, K, dtype, seed=M + K)
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    bias = torch.randn(N, dtype=dtype, device=DEVICE) if (M + K) % 2 else None
    assert tk.supports(x, values, meta, bias) == (True, "")
    y = tk.sparse24_linear(x, values, meta, bias)
    assert_close_scaled(y, sparse24_linear_reference(x, values, meta, bias), dtype)


@pytest.mark.parametrize("M", [1, 4])
def test_split_k(M: int) -> None:
    dtype = torch.bfloat16
    values, meta = make_sparse(24, 256, dtype)
    x = torch.randn(M, 256, dtype=dtype, device=DEVICE)
    bias = torch.randn(24, dtype=dtype, device=DEVICE)
    cfg = tk.Sparse24Config(max_m=16, block_m=1 if M == 1 else 16, block_n=16, block_k=64,
                            split_k=3)
    y = tk.sparse24_linear(x, values, meta, bias, config=cfg)
    assert_close_scaled(y, sparse24_linear_reference(x, values, meta, bias), dtype)


def test_values_in_another_dtype_and_3d_input() -> None:
    values, meta = make_sparse(40, 96, torch.float32)
    x = torch.randn(2, 2, 96, dtype=torch.float16, device=DEVICE)
    y = tk.sparse24_linear(x, values, meta)
    assert y.shape == (2, 2, 40)
    assert_close_scaled(y, sparse24_linear_reference(x, values, meta), torch.float16)


def test_rejections_name_the_problem() -> None:
    values, meta = make_sparse(40, 32, torch.float32)
    ok, why = tk.supports(torch.randn(1, 30, device=DEVICE), values[:, :15], meta[:, :4])
    assert not ok and why == "in_features 30 not a multiple of 4 for 2:4"
    ok, why = tk.supports(torch.randn(1, 32, device=DEVICE), values, meta[:, :3])
    assert not ok and why == "meta must be uint8 (40, 4), got torch.uint8 (40, 3)"
    ok, why = tk.supports(torch.randn(1, 32, device=DEVICE), values[:, :8], meta)
    assert not ok and why == "values has 8 columns; in_features 32 needs 16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only rejection")
def test_semi_structured_declines_without_cuda() -> None:
    values, meta = make_sparse(64, 128, torch.float16)
    x = torch.randn(64, 128, dtype=torch.float16)
    ok, why = sp.supports_semi_structured(x, values, meta)
    assert not ok and why == "CUDA not available (torch semi-structured sparsity is GPU-only)"
    kernel, reasons = sk.select("sparse24_linear", x, values=values, meta=meta, bias=None)
    assert kernel is not None and kernel.name == "sparse24_linear_triton_gemv"
    assert reasons == [f"sparse24_linear_semi_structured: {why}"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparsity needs CUDA")
def test_semi_structured_prefill_on_gpu() -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs sm80+ sparse tensor cores")
    values, meta = make_sparse(64, 128, torch.float16)
    values, meta = values.cuda(), meta.cuda()
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    bias = torch.randn(64, dtype=torch.float16, device="cuda")
    assert sp.supports_semi_structured(x, values, meta, bias) == (True, "")
    y = sp.run_semi_structured(x, values, meta, bias)
    ref = sparse24_linear_reference(x.cpu(), values.cpu(), meta.cpu(), bias.cpu())
    assert_close_scaled(y.cpu(), ref, torch.float16)
    ok, why = sp.supports_semi_structured(x[:1], values, meta, bias)
    assert not ok and why.startswith("M=1 rows < 17")


def test_registry_runs_the_custom_op() -> None:
    values, meta = make_sparse(40, 96, torch.float32)
    x = torch.randn(3, 96, device=DEVICE)
    kernel, _ = sk.select("sparse24_linear", x, values=values, meta=meta, bias=None)
    assert kernel is not None
    assert_close_scaled(kernel.run(x, values=values, meta=meta, bias=None),
                        sparse24_linear_reference(x, values, meta), torch.float32)


def test_custom_op_opcheck_and_export() -> None:
    values, meta = make_sparse(40, 96, torch.float32)
    x = torch.randn(3, 96, device=DEVICE)
    bias = torch.randn(40, device=DEVICE)
    op = torch.ops.slimfx_kernels.sparse24_linear_triton.default
    torch.library.opcheck(op, (x, values, meta, bias))

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.slimfx_kernels.sparse24_linear_triton(x, values, meta, bias)

    ep = torch.export.export(M(), (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == ["slimfx_kernels.sparse24_linear_triton.default"]
