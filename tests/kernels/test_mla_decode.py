"""mla_decode: Triton split-sequence latent decode attention vs the plain-torch reference."""

from __future__ import annotations

import pytest
import torch

from . import DEVICE, assert_close_scaled, kernels_interpreted_or_cuda, triton_skip_reason

_why = triton_skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)

import slimfx.kernels.mla_decode  # noqa: E402,F401  (registers the custom op)
from slimfx.kernels.mla_decode import triton_kernel as tk  # noqa: E402
from slimfx.kernels.mla_decode.reference import mla_decode_reference  # noqa: E402

_why = kernels_interpreted_or_cuda(tk._mla_split_kernel)
if _why:
    pytest.skip(_why, allow_module_level=True)


def make(B, H, K, S, R, P, dtype, int8=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {
        "q_lat": torch.randn(B, H, R, generator=g) * 0.3,
        "q_rope": torch.randn(B, H, P, generator=g),
        "k_rope": torch.randn(B, S, K, P, generator=g),
    }
    lat = torch.randn(B, S, R, generator=g)
    t = {k: v.to(dtype) for k, v in t.items()}
    if int8:
        scales = lat.abs().amax(-1) / 127
        t["latent"] = torch.round(lat / scales[..., None]).to(torch.int8)
        t["latent_scales"] = scales.to(dtype)
    else:
        t["latent"] = lat.to(dtype)
        t["latent_scales"] = None
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in t.items()}


# (B, H, K, S, R, P): odd lengths, a rank that is not a power of two (20, 36), GQA 1/2/3 kv
# heads, MHA (K = H), no RoPE key (P = 0), more heads than one block (H = 18 > 16)
SHAPES = [
    (1, 6, 2, 37, 20, 4),
    (2, 9, 3, 53, 36, 8),
    (1, 4, 1, 17, 16, 2),
    (2, 4, 4, 29, 24, 0),
    (1, 18, 3, 21, 20, 4),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}K{}S{}R{}P{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_reference(shape, dtype, splits):
    B, H, K, S, R, P = shape
    t = make(B, H, K, S, R, P, dtype)
    lengths = torch.tensor([S, max(1, S - 6)][:B], dtype=torch.int32, device=DEVICE)
    args = (t["q_lat"], t["q_rope"], t["latent"], None, t["k_rope"], lengths, 0.125)
    ref = mla_decode_reference(*args)
    out = tk.mla_decode(*args, num_splits=splits)
    assert_close_scaled(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_latent_matches_reference(dtype):
    t = make(2, 9, 3, 45, 20, 4, dtype, int8=True)
    lengths = torch.tensor([45, 30], dtype=torch.int32, device=DEVICE)
    args = (t["q_lat"], t["q_rope"], t["latent"], t["latent_scales"], t["k_rope"], lengths, 0.2)
    out = tk.mla_decode(*args, num_splits=2)
    assert_close_scaled(out, mla_decode_reference(*args), dtype)


def test_empty_splits_and_zero_length():
    """More splits than tiles leaves programs with nothing to read; a length-0 row gives 0."""
    t = make(2, 4, 2, 9, 16, 2, torch.float32)
    lengths = torch.tensor([9, 0], dtype=torch.int32, device=DEVICE)
    args = (t["q_lat"], t["q_rope"], t["latent"], None, t["k_rope"], lengths, 0.5)
    out = tk.mla_decode(*args, num_splits=5)
    assert_close_scaled(out, mla_decode_reference(*args), torch.float32)
    assert torch.count_nonzero(out[1]) == 0


def test_the_mla_form_names_this_kernel_and_select_runs_it():
    """``kernels.select("mla_decode", q_lat, **tensors)`` finds the kernel through the ``mla``
    form and runs the opaque op."""
    from slimfx.kernels import select

    t = make(1, 6, 2, 19, 20, 4, torch.float32)
    lengths = torch.tensor([19], dtype=torch.int32, device=DEVICE)
    kw = dict(q_rope=t["q_rope"], latent=t["latent"], latent_scales=None, k_rope=t["k_rope"],
              lengths=lengths, scale=0.3)
    kernel, declined = select("mla_decode", t["q_lat"], **kw)
    assert kernel is not None and not declined and kernel.name == "mla_decode_triton_split"
    ref = mla_decode_reference(t["q_lat"], *kw.values())
    assert_close_scaled(kernel.run(t["q_lat"], **kw), ref, torch.float32)


def test_custom_op_runs_and_has_a_fake():
    t = make(1, 6, 2, 19, 20, 4, torch.float32)
    lengths = torch.tensor([19], dtype=torch.int32, device=DEVICE)
    args = (t["q_lat"], t["q_rope"], t["latent"], None, t["k_rope"], lengths, 0.3)
    ok, why = tk.supports(*args)
    assert ok, why
    out = tk.run(*args)
    assert_close_scaled(out, mla_decode_reference(*args), torch.float32)
    torch.library.opcheck(
        torch.ops.slimfx_kernels.mla_decode_triton, (*args, 2),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_supports_rejections():
    t = make(1, 6, 2, 8, 20, 4, torch.float32)
    lengths = torch.tensor([8], dtype=torch.int32, device=DEVICE)
    ok, why = tk.supports(t["q_lat"], t["q_rope"], t["latent"].half(), None, t["k_rope"], lengths)
    assert not ok and "latent dtype" in why
    bad_k = t["k_rope"][:, :, :1].repeat(1, 1, 4, 1)  # 6 heads over 4 kv heads
    ok, why = tk.supports(t["q_lat"], t["q_rope"], t["latent"], None, bad_k, lengths)
    assert not ok and "do not group" in why
    ok, why = tk.supports(t["q_lat"], t["q_rope"], t["latent"], t["latent"][..., 0], t["k_rope"],
                          lengths)
    assert not ok and "int8" in why
