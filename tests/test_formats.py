"""slimfx.formats: the one storage format, and priced bytes == stored bytes for every form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfx import formats, forms
from slimfx.kernels.quant_linear.reference import dequantize as kernel_dequantize
from slimfx.kernels.sparse24_linear.reference import densify_sparse24
from slimfx.numerics import factorize, reconstruct
from slimfx.passes.base import rule_for
from slimfx.planning.configs import (
    DenseConfig,
    LowRankConfig,
    LowRankQuantConfig,
    QuantConfig,
    Sparse24Config,
    Sparse24LowRankConfig,
)
from slimfx.planning.shapes import LinearShape


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- integer codes


@pytest.mark.parametrize("bits", formats.CODE_BITS)
@pytest.mark.parametrize("k", [1, 3, 8, 13, 64, 96])
def test_codes_round_trip_at_the_priced_width(bits: int, k: int) -> None:
    codes = torch.randint(0, 1 << bits, (5, k), generator=_gen(bits * 100 + k), dtype=torch.uint8)
    packed = formats.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, -(-bits * k // 8)) == (5, formats.packed_width(bits, k))
    assert torch.equal(formats.unpack_codes(packed, bits, k), codes)


def test_int4_is_the_matmulnbits_nibble_order() -> None:
    packed = formats.pack_codes(torch.tensor([[1, 2, 15, 0, 7]], dtype=torch.uint8), 4)
    assert packed.tolist() == [[0x21, 0x0F, 0x07]]  # column j in byte j//2, even j low nibble


def test_int3_and_int2_are_little_endian_bit_streams() -> None:
    # codes 0..7 at 3 bits each: bit stream value sum(c_j << 3j) = 0xFAC688, little endian
    codes = torch.arange(8, dtype=torch.uint8)[None]
    assert formats.pack_codes(codes, 3).tolist() == [[0x88, 0xC6, 0xFA]]
    assert formats.pack_codes(torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8), 2).tolist() == [
        [1 | 2 << 2 | 3 << 4, 3]
    ]


def test_the_configs_offer_exactly_the_packed_widths() -> None:
    # planning may not import torch, so QuantConfig keeps its own tuple: they must agree
    from slimfx.planning.configs import QUANT_BITS

    assert QUANT_BITS == formats.CODE_BITS and set(formats.RUNTIME_BITS) <= set(QUANT_BITS)


def test_codes_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match=r"3-bit codes must lie in \[0, 7\]"):
        formats.pack_codes(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="bits must be one of"):
        formats.packed_width(5, 8)


# --------------------------------------------------------------------------- one format, all readers


def test_numerics_ir_and_kernel_reference_read_the_same_codes() -> None:
    W = torch.randn(12, 64, generator=_gen(1))
    for d in (QuantConfig(4, 32), QuantConfig(8, None, True), QuantConfig(4, 16, True)):
        t = factorize(W, d)
        G = 64 if d.group_size is None else d.group_size
        ref = kernel_dequantize(t["qweight"], t["scales"], t.get("zeros"), d.bits, G, 64)
        mod = rule_for(d).build_module(_site(64, 12), _linear(W), d, tensors=t)
        assert torch.equal(reconstruct(d, t), ref)
        assert torch.equal(mod.dequantized_weight(), ref)


def test_24_meta_pads_half_bytes_and_every_reader_agrees() -> None:
    W = torch.randn(6, 12, generator=_gen(2))  # 3 groups of four: the last byte is half padding
    keep = W.abs().reshape(6, 3, 4).topk(2, -1).indices
    P = torch.zeros_like(W).reshape(6, 3, 4).scatter_(-1, keep, W.reshape(6, 3, 4).gather(-1, keep))
    P = P.reshape(6, 12)
    values, meta = formats.pack24(P)
    assert values.shape == (6, 6) and meta.shape == (6, formats.meta_width(12)) == (6, 2)
    assert torch.equal(formats.densify24(values, meta, 12), P)
    assert torch.equal(densify_sparse24(values, meta, 12), P)


# --------------------------------------------------------------------------- priced == stored


def _site(in_f: int, out_f: int, bias: bool = False):  # noqa: ANN202
    from slimfx.ir.sites import LinearSite

    return LinearSite("lin", in_f, out_f, "torch.float32", bias, "lin.weight", "lin")


def _linear(W: torch.Tensor, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=bias)
    lin.weight.data.copy_(W)
    return lin


def _reference_bytes(tensors: list[torch.Tensor]) -> int:
    """Reference bytes of stored tensors: floating ones at 16 bits, integer ones as stored."""
    return sum(
        2 * t.numel() if t.is_floating_point() else t.numel() * t.element_size() for t in tensors
    )


BUILT = [
    DenseConfig(),
    LowRankConfig(5, "svd"),
    QuantConfig(4, 32),
    QuantConfig(4, 32, True),
    QuantConfig(4, None),
    QuantConfig(8, None, True),
    QuantConfig(8, 16),
    Sparse24Config("magnitude", False),
    LowRankQuantConfig(3, 4, 32),
    LowRankQuantConfig(3, 8, None, True),
    Sparse24LowRankConfig(4, "magnitude"),
]


@pytest.mark.parametrize("decision", BUILT, ids=lambda d: d.short())
@pytest.mark.parametrize("bias", [False, True])
def test_priced_bytes_are_the_built_modules_stored_bytes(decision, bias: bool) -> None:  # noqa: ANN001
    in_f, out_f = 64, 24
    W = torch.randn(out_f, in_f, generator=_gen(3))
    lin = _linear(W, bias)
    if forms.form_of(decision).native:
        mod: nn.Module = lin
    else:
        mod = rule_for(decision).build_module(_site(in_f, out_f, bias), lin, decision)
    stored = [t for n, t in mod.state_dict().items() if n != "bias"]
    shape = LinearShape(in_f, out_f)
    assert _reference_bytes(stored) == decision.weight_bytes(shape)
    assert _reference_bytes(list(mod.state_dict().values())) == decision.bytes(shape, bias)
    floats, ints = decision.storage(shape)
    assert sum(t.numel() for t in stored if t.is_floating_point()) == floats
    assert sum(t.numel() for t in stored if not t.is_floating_point()) == ints


@pytest.mark.parametrize("bits", formats.CODE_BITS)
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_priced_bytes_are_the_factorized_bytes_for_every_bit_width(
    bits: int, group_size: int | None, symmetric: bool
) -> None:
    # 2- and 3-bit codes have no module (no runtime op): their stored tensors are factorize's
    in_f, out_f = 48, 10
    d = QuantConfig(bits, group_size, symmetric)
    t = factorize(torch.randn(out_f, in_f, generator=_gen(bits)), d)
    assert _reference_bytes(list(t.values())) == d.weight_bytes(LinearShape(in_f, out_f))
    assert t["qweight"].shape == (out_f, formats.packed_width(bits, in_f))


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_codes_reconstruct_exactly_what_was_packed(bits: int) -> None:
    W = torch.randn(6, 32, generator=_gen(4))
    d = QuantConfig(bits, 16)
    t = factorize(W, d)
    q = formats.unpack_codes(t["qweight"], bits, 32).to(torch.float32)
    z = t["zeros"].to(torch.float32).repeat_interleave(16, 1)
    s = t["scales"].repeat_interleave(16, 1)
    assert torch.equal(reconstruct(d, t), (q - z) * s)
    assert int(q.max()) < 1 << bits


def test_int3_refuses_a_width_it_cannot_pack_whole() -> None:
    with pytest.raises(ValueError, match="int3 packs 8 codes in 3 bytes: in_features 12"):
        factorize(torch.randn(4, 12), QuantConfig(3, None))
