"""KV configs: exact bytes against the real cache tensors, JSON round trip, rejection reasons."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from slimfx.forms.kv.cache import LatentLayer, QuantizedKVLayer, QuantizedLatentLayer
from slimfx.forms.kv.config import (
    KVDenseConfig,
    KVLatentQuantConfig,
    KVLowRankConfig,
    KVQuantConfig,
    dense_fraction,
)
from slimfx.planning.configs import decision_from_dict
from slimfx.planning.shapes import KV_BYTES_PER_TOKEN, WEIGHT_BYTES, AttentionShape, LinearShape

SHAPE = AttentionShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, rope_dim=16)
SMOL = AttentionShape(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, rope_dim=64)


def _feed(layer, chunks, width_k, width_v, heads, **kw):
    gen = torch.Generator().manual_seed(0)
    for n in chunks:
        k = torch.randn(1, heads, n, width_k, generator=gen).half()
        v = torch.randn(1, heads, n, width_v, generator=gen).half()
        if kw:
            kw = {"positions": torch.arange(layer.get_seq_length(), layer.get_seq_length() + n)}
        layer.update(k, v, **kw)


@pytest.mark.parametrize(
    "cfg",
    [
        KVQuantConfig(8, 8, 4, 16, 0),
        KVQuantConfig(4, 2, 8, 8, 5),
        KVQuantConfig(2, 2, 4, 4, 3),
        KVQuantConfig(4, 4, 32, 16, 0),  # fewer tokens than one block: all 16-bit
        KVQuantConfig(4, 4, 4, 8, 2, sink=3),
    ],
)
@pytest.mark.parametrize("chunks", [(7,), (1,) * 23, (9, 1, 1, 1, 5, 1)])
def test_quant_bytes_equal_the_real_cache_tensors(cfg, chunks):
    layer = QuantizedKVLayer(cfg)
    _feed(layer, chunks, 16, 16, SHAPE.num_kv_heads)
    n = sum(chunks)
    assert layer.get_seq_length() == n
    assert layer.n_stored == cfg.quantized_tokens(n - chunks[-1])  # flushed before the last call
    layer.flush()
    assert layer.n_stored == cfg.quantized_tokens(n)
    assert layer.nbytes() == cfg.cache_bytes(SHAPE, n)
    priced = cfg.costs(SHAPE, context=n)[KV_BYTES_PER_TOKEN] * n
    assert priced == pytest.approx(layer.nbytes(), rel=1e-12)  # bytes/token × tokens, a float


def test_steady_state_costs_are_the_real_cache_bytes_of_a_full_store():
    """With no 16-bit window or sink and whole key blocks every token is quantized, so the
    steady-state price ``costs(shape)`` times the tokens is exactly what the cache holds."""
    cfg = KVQuantConfig(4, 2, 8, 8, 0)
    layer = QuantizedKVLayer(cfg)
    _feed(layer, (5, 11, 8), 16, 16, SHAPE.num_kv_heads)
    layer.flush()
    assert layer.n_stored == 24 and layer.nbytes() == cfg.costs(SHAPE)[KV_BYTES_PER_TOKEN] * 24
    lr = KVLowRankConfig(key_rank=8, value_rank=16, groups=2)
    latent = LatentLayer(lr)
    _feed(latent, (7, 1, 4), 8, 16, 1, positions=True)
    assert latent.nbytes() == lr.costs(SHAPE)[KV_BYTES_PER_TOKEN] * 12


@pytest.mark.parametrize("chunks", [(7,), (1,) * 13])
def test_lowrank_and_latent_quant_bytes_equal_the_real_cache_tensors(chunks):
    lr = KVLowRankConfig(key_rank=8, value_rank=16, groups=2)
    layer = LatentLayer(lr)
    _feed(layer, chunks, 8, 16, 1, positions=True)
    n = sum(chunks)
    assert layer.nbytes() == lr.cache_bytes(SHAPE, n) == 2 * 24 * n
    lq = KVLatentQuantConfig(8, 16, 2, "attention", bits=4, group=4, residual=3)
    layer = QuantizedLatentLayer(lq)
    _feed(layer, chunks, 8, 16, 1, positions=True)
    layer.flush()
    assert layer.n_stored == max(0, n - 3)
    assert layer.nbytes() == lq.cache_bytes(SHAPE, n)
    ch = KVLatentQuantConfig(8, 16, 2, "attention", bits=2, group=4, residual=1, axis="channel")
    layer = QuantizedLatentLayer(ch)
    _feed(layer, chunks, 8, 16, 1, positions=True)
    layer.flush()
    assert layer.n_stored == (n - 1) // 4 * 4
    assert layer.nbytes() == ch.cache_bytes(SHAPE, n)


@pytest.mark.parametrize("chunks", [(7,), (1,) * 13, (9, 1, 1, 1, 5, 1)])
@pytest.mark.parametrize(
    "cfg, stores",
    [
        # keys 4 channels at 4 bits + 4 at 2, values 8 + 8: both stores per role
        (
            KVLatentQuantConfig(8, 16, 1, "whitened", 4, 4, 1, axis="channel", low_bits=2,
                                key_low=4, value_low=8),
            {"k": 4, "k_tail": 4, "v": 8, "v_tail": 8},
        ),
        # 2 groups, every key channel in the 2-bit tail: the keys have no full-width store
        (
            KVLatentQuantConfig(8, 16, 2, "whitened", 8, 4, 2, axis="channel",
                                low_bits=2, key_low=8, value_low=8),
            {"k_tail": 8, "v": 8, "v_tail": 8},
        ),
    ],
)
def test_mixed_width_latent_bytes_equal_the_real_cache_tensors(cfg, stores, chunks):
    layer = QuantizedLatentLayer(cfg)
    _feed(layer, chunks, cfg.key_rank, cfg.value_rank, 1, positions=True)
    layer.flush()
    n = sum(chunks)
    assert layer.n_stored == cfg.quantized_tokens(n)
    assert layer.nbytes() == cfg.cache_bytes(SHAPE, n)
    if layer.n_stored:
        got = {k[: -len("_codes")]: v.shape[-1] for k, v in layer.store.items() if "codes" in k}
        bits = {"k": cfg.bits, "v": cfg.bits, "k_tail": cfg.low_bits, "v_tail": cfg.low_bits}
        assert got == {k: c * bits[k] // 8 for k, c in stores.items()}  # packed bytes per token
    # steady state: codes at their widths + one fp16 (scale, min) per channel per block
    w = cfg.key_rank + cfg.value_rank
    code_bits = sum(c * bits for c, bits in (
        (w - cfg.key_low - cfg.value_low, cfg.bits), (cfg.key_low + cfg.value_low, cfg.low_bits)
    ))  # fmt: skip
    assert cfg.steady_bytes_per_token(SHAPE) == code_bits / 8 + 4 * w / cfg.group


def _stored(cfg, k, v):
    layer = QuantizedLatentLayer(cfg)
    layer.update(k, v, positions=torch.arange(k.shape[2]))
    layer.flush()
    assert layer.n_stored == k.shape[2]
    return layer._dequantize()


def test_mixed_width_store_is_each_channel_at_its_own_width():
    """Per-channel ranges make the channels independent: the mixed store's full-width channels
    are bit for bit what a uniform ``bits`` store gives them and its tail what a ``low_bits``
    store gives; the split follows each head group's channel order."""
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(1, 1, 8, 16, generator=g) for _ in "kv")
    mixed = KVLatentQuantConfig(16, 16, 2, "whitened", 8, 8, 0, axis="channel", low_bits=2,
                                key_low=8, value_low=8)  # fmt: skip
    got = _stored(mixed, k, v)  # per group of 8 channels: 4 at 8 bits, then 4 at 2 bits
    for bits, cols in ((8, [0, 1, 2, 3, 8, 9, 10, 11]), (2, [4, 5, 6, 7, 12, 13, 14, 15])):
        uniform = KVLatentQuantConfig(8, 8, 1, "whitened", bits, 8, 0, axis="channel")
        want = _stored(uniform, k[..., cols], v[..., cols])
        assert torch.equal(got[0][..., cols], want[0]) and torch.equal(got[1][..., cols], want[1])
    assert not torch.equal(got[0], _stored(replace(mixed, low_bits=0, key_low=0, value_low=0),
                                           k, v)[0])  # fmt: skip


def test_smollm2_fractions_match_the_formula():
    # 23 040 B/token over 30 layers, 768 per layer
    assert SMOL.kv_bytes_per_token() == 768
    int4 = KVQuantConfig(4, 4, 32, 64, 0)
    # per head: keys 64·0.5 + 4·64/32 = 40, values 32 + 4 = 36 → 3·76 = 228
    assert int4.steady_bytes_per_token(SMOL) == 228
    assert dense_fraction(int4, SMOL) == pytest.approx(228 / 768)
    lr = KVLowRankConfig(96, 96)
    assert dense_fraction(lr, SMOL) == 0.5
    # window of 128 tokens + the partial block: 8192 tokens → 8064 quantized
    r = KVQuantConfig(4, 4, 32, 64, 128)
    assert r.quantized_tokens(8192) == 8064
    assert r.cache_bytes(SMOL, 8192) == 8064 * 228 + 128 * 768
    assert r.bytes_per_token(SMOL, 8192) > r.bytes_per_token(SMOL)
    costs = lr.costs(SMOL, context=8192)
    assert costs[KV_BYTES_PER_TOKEN] == 384
    # k, v: 576×192 each dense; factorized 192·(576 + 192) in total (the option owns k and v)
    assert costs[WEIGHT_BYTES] == lr.weight_bytes(SMOL) == 2 * 192 * (576 + 192)
    # steady state by default: the 16-bit window amortized away; a cache-only form owns no weight
    assert r.costs(SMOL) == {KV_BYTES_PER_TOKEN: 228, WEIGHT_BYTES: 0}
    assert r.costs(SMOL, context=8192)[KV_BYTES_PER_TOKEN] == r.cache_bytes(SMOL, 8192) / 8192
    assert KVDenseConfig().cache_bytes(SMOL, 10) == 7680


@pytest.mark.parametrize(
    "cfg",
    [
        KVDenseConfig(),
        KVQuantConfig(2, 8, 16, 32, 128, sink=4),
        KVLowRankConfig(64, 128, 3, "whitened"),
        KVLatentQuantConfig(96, 96, 1, "attention", 4, 32, 16),
        KVLatentQuantConfig(96, 96, 1, "attention", 4, 32, 16, 2, "channel"),
        KVLatentQuantConfig(80, 144, 1, "whitened", 4, 64, 0, 4, "channel", 2, 40, 80),
    ],
)
def test_json_round_trip(cfg):
    back = decision_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and type(back) is type(cfg)


@pytest.mark.parametrize(
    "cfg, shape, reason",
    [
        (
            KVQuantConfig(value_group=12),
            SHAPE,
            "head_dim 16 is not divisible by the value group 12",
        ),
        (
            KVQuantConfig(value_group=16),
            AttentionShape(64, 4, 2, 16, 16, sliding_window=32),
            "sliding-window attention (window 32) is not supported",
        ),
        (KVLowRankConfig(8, 8, groups=3), SHAPE, "3 head groups do not divide num_kv_heads=2"),
        (
            KVLowRankConfig(9, 8, groups=2),
            SHAPE,
            "key_rank 9 is not divisible by the 2 head groups",
        ),
        (KVLowRankConfig(48, 8), SHAPE, "key_rank 48 exceeds the 1×32 dims"),
        (
            KVLatentQuantConfig(8, 8, 1, "attention", 4, 16),
            SHAPE,
            "key_rank per head group (8) is not divisible by group 16",
        ),
        (
            KVLatentQuantConfig(8, 8, 1, "whitened", 4, 4, axis="channel", low_bits=2, key_low=2),
            SHAPE,
            "key latent: 2 channels per head group do not pack at 2 bits",
        ),
    ],
)
def test_rejection_reasons(cfg, shape, reason):
    why = cfg.check(shape)
    assert why is not None and reason in why


def test_dense_accepts_sliding_windows_and_bad_values_raise():
    assert KVDenseConfig().check(AttentionShape(64, 4, 2, 16, sliding_window=8)) is None
    with pytest.raises(ValueError, match="key_bits must be one of"):
        KVQuantConfig(key_bits=3)
    with pytest.raises(ValueError, match="residual must be an int"):
        KVQuantConfig(residual=-1)
    with pytest.raises(ValueError, match="method must be one of"):
        KVLowRankConfig(method="svd")
    with pytest.raises(TypeError, match="'kv_quant' prices attention sites .* linear shape"):
        KVQuantConfig().weight_bytes(LinearShape(64, 64))
    with pytest.raises(TypeError, match="'kv_lowrank' prices attention sites"):
        KVLowRankConfig().costs(LinearShape(64, 64))
    ch = dict(axis="channel", key_low=8)
    for kw, msg in (
        (dict(key_low=8), "key_low / value_low need low_bits"),
        (dict(low_bits=2, key_low=8), "mixed widths .* need axis='channel'"),
        (dict(low_bits=4, **ch), "low_bits must be one of .* below bits=4"),
        (dict(low_bits=2, axis="channel"), "needs key_low or value_low > 0"),
        (dict(low_bits=2, axis="channel", value_low=72), "value_low=72 exceeds its latent rank 64"),
        (dict(low_bits=2, axis="channel", groups=2, key_low=5), "not divisible by 2 groups"),
    ):
        with pytest.raises(ValueError, match=msg):
            KVLatentQuantConfig(64, 64, **{"bits": 4, **kw})
    short = KVLatentQuantConfig(80, 144, 1, "whitened", 4, 64, 0, 4, "channel", 2, 40, 64).short()
    assert short == "kv lowrank k80 v144 whitened s4 int4 ch k40v64@int2 g64 r0"


@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_default_forms_are_valid_and_the_mixed_latents_sit_at_their_shares(head_dim, kv_heads):
    from slimfx.forms.kv.candidates import default_kv_forms

    shape = AttentionShape(head_dim * kv_heads * 4, kv_heads * 4, kv_heads, head_dim, head_dim)
    forms = default_kv_forms(shape)
    assert [f.short() for f in forms if f.check(shape)] == []
    mixed = sorted(
        dense_fraction(f, shape) for f in forms if getattr(f, "low_bits", 0)
    )  # steady state: ≈ 1/10, 1/8, 1/4 of the 16-bit cache
    assert len(mixed) == 3
    for got, want in zip(mixed, (0.1, 0.125, 0.25)):
        assert abs(got - want) < 0.035, (mixed, shape)


def test_a_plan_with_attention_decisions_loads_in_a_fresh_process():
    """``import slimfx`` registers every form: Plan.load of a KV / MLA plan failed ("kind
    'kv_quant' is unknown") unless something had imported the form folders first."""
    import json
    import subprocess
    import sys

    from slimfx.forms.mla.config import MLAConfig
    from slimfx.planning.plan import Plan

    plan = Plan({"a.self_attn": KVQuantConfig(4, 4, 32, 64, 0, 0),
                 "b.self_attn": MLAConfig(rank=32, rope_pairs=2)})  # fmt: skip
    code = (
        "import json, sys, slimfx\n"
        "p = slimfx.Plan.from_dict(json.loads(sys.stdin.read()))\n"
        "print(sorted(d.kind for d in p.values()))"
    )
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(plan.to_dict()),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['kv_quant',", "'mla']"]
