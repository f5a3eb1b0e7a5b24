"""The static compressed caches: reads equal the dynamic cache's token for token (sink tokens,
chunked prefill after a past, per-channel and per-token latents), a decode step traces into
one graph (torch.compile fullgraph), generate() with a static cache gives the dynamic cache's
tokens for every form."""

from __future__ import annotations

import pytest
import torch
from _helpers import compiled_static_steps

from slimfx.forms.kv.cache import KVCache, QuantizedKVLayer, QuantizedLatentLayer
from slimfx.forms.kv.config import (
    KVDenseConfig,
    KVLatentQuantConfig,
    KVLowRankConfig,
    KVQuantConfig,
)
from slimfx.forms.kv.static_cache import (
    StaticKVCache,
    StaticLatentLayer,
    StaticQuantizedKVLayer,
    StaticQuantizedLatentLayer,
    static_layer_for,
)

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = KVLatentQuantConfig(
    16, 24, 2, "whitened", 4, 4, 2, sink=2, axis="channel", low_bits=2, key_low=8, value_low=8
)


@pytest.mark.parametrize(
    "cfg, chunks",
    [
        (KVQuantConfig(4, 4, 4, 8, 0), (1,) * 30),
        (KVQuantConfig(2, 8, 4, 16, 5), (1,) * 31),
        (KVQuantConfig(4, 2, 8, 8, 3), (13,) + (1,) * 20),  # prefill longer than the ring
        (KVQuantConfig(4, 4, 4, 8, 2, sink=3), (1,) * 30),  # sink tokens
        (KVQuantConfig(4, 4, 4, 8, 1, sink=2), (5, 9, 1, 1, 11, 1, 1)),  # chunks after a past
    ],
)
def test_static_reads_equal_the_dynamic_cache(cfg, chunks):
    g = torch.Generator().manual_seed(0)
    dyn, sta = QuantizedKVLayer(cfg), StaticQuantizedKVLayer(cfg, max_cache_len=47)
    n = 0
    for T in chunks:
        k = torch.randn(2, 2, T, 16, generator=g)
        v = torch.randn(2, 2, T, 16, generator=g)
        dk, dv = dyn.update(k, v)
        sk, sv = sta.update(k, v)
        n += T
        assert sk.shape == (2, 2, 47, 16) and int(sta.get_seq_length()) == n
        torch.testing.assert_close(sk[:, :, :n], dk, atol=0, rtol=0)
        torch.testing.assert_close(sv[:, :, :n], dv, atol=0, rtol=0)
    assert dyn.n_stored > 0  # the store was exercised


@pytest.mark.parametrize(
    "cfg, chunks",
    [
        (MIXED, (1,) * 30),
        (MIXED, (7, 1, 10, 1, 1, 6)),
        (KVLatentQuantConfig(24, 16, 2, "attention", 8, 4, 3), (1,) * 20),  # per token
        (KVLatentQuantConfig(24, 16, 2, "attention", 4, 8, 0, sink=1), (9, 1, 1, 4, 1)),
    ],
)
def test_static_latent_reads_equal_the_dynamic_cache(cfg, chunks):
    g = torch.Generator().manual_seed(1)
    dyn, sta = QuantizedLatentLayer(cfg), StaticQuantizedLatentLayer(cfg, max_cache_len=45)
    n = 0
    for T in chunks:
        lk = torch.randn(2, 1, T, cfg.key_rank, generator=g)
        lv = torch.randn(2, 1, T, cfg.value_rank, generator=g)
        pos = torch.arange(n, n + T).unsqueeze(0)
        dk, dv = dyn.update(lk, lv, positions=pos)
        sk, sv = sta.update(lk, lv, positions=pos)
        n += T
        assert sk.shape == (2, 1, 45, cfg.key_rank)
        torch.testing.assert_close(sk[:, :, :n], dk, atol=0, rtol=0)
        torch.testing.assert_close(sv[:, :, :n], dv, atol=0, rtol=0)
    assert dyn.n_stored > 0
    assert torch.equal(sta.positions, torch.arange(45).expand(2, 45))


def test_a_decode_step_compiles_into_one_graph():
    cfg = KVQuantConfig(4, 4, 4, 8, 2, sink=2)
    g = torch.Generator().manual_seed(1)
    eager, comp = StaticQuantizedKVLayer(cfg, 32), StaticQuantizedKVLayer(cfg, 32)
    k0, v0 = torch.randn(1, 2, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    eager.update(k0, v0)
    comp.update(k0, v0)  # prefill stays eager, as in transformers
    torch._dynamo.reset()
    step = torch.compile(lambda k, v: comp.update(k, v), fullgraph=True, backend="eager")
    for _ in range(12):  # crosses block flushes without a graph break or a recompile
        k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
        want = eager.update(k, v)
        got = step(k, v)
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)


def test_inductor_compiles_a_layer_with_sinks_from_its_first_call():
    """The default candidates keep sink tokens: inductor (not only dynamo) compiles the static
    layer's first call — which builds the read indices, writes two tokens and reads every
    position — equal to eager (≈20 s cold). Arange arithmetic as read indices failed
    inductor's index simplification there ("vr must not be None for symbol q1"), in a compiled
    prefill and in a compiled decode step alike, until they became constant tensors."""
    cfg = KVQuantConfig(4, 4, 4, 8, 0, sink=3)
    g = torch.Generator().manual_seed(2)
    eager, comp = StaticQuantizedKVLayer(cfg, 24), StaticQuantizedKVLayer(cfg, 24)
    torch._dynamo.reset()
    step = torch.compile(lambda k, v: comp.update(k, v), fullgraph=True, dynamic=False)
    k, v = torch.randn(1, 2, 2, 16, generator=g), torch.randn(1, 2, 2, 16, generator=g)
    want, got = eager.update(k, v), step(k, v)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)


def test_static_generate_int8_equals_dense(tiny_llama, tiny_ids):
    ids = tiny_ids[:1]
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    dense = tiny_llama.generate(ids, **kw)
    forms = [KVQuantConfig(8, 8, 4, 16, 2, sink=1), KVDenseConfig()]
    got = tiny_llama.generate(ids, past_key_values=StaticKVCache(forms, 30), **kw)
    assert torch.equal(got, dense)


def _low_rank_model():
    """A tiny Llama with layer 0 a mixed-width quantized latent, layer 1 a 16-bit latent, both
    with sink tokens (fitted on random tokens)."""
    from slimfx.forms.kv.calibrate import attention_grams, fit_site
    from slimfx.forms.kv.lowrank import apply_lowrank_kv
    from slimfx.ir.find import inspect_attention_sites
    from slimfx.models import tiny_llama

    forms = [MIXED, KVLowRankConfig(16, 24, 2, "attention", sink=3)]
    model = tiny_llama(seed=0)
    sites, _ = inspect_attention_sites(model)
    g = torch.Generator().manual_seed(5)
    grams = attention_grams(model, sites, [torch.randint(0, 256, (1, 24), generator=g)] * 3)
    factors = {s.fqn: fit_site(model, s, grams[s.fqn], forms[i]) for i, s in enumerate(sites)}
    apply_lowrank_kv(model, sites, {s.fqn: forms[i] for i, s in enumerate(sites)}, factors)
    return model, forms


def test_static_low_rank_caches_generate_the_dynamic_tokens_and_compile():
    """generate() with a static cache of latent layers (built by the cache-upgrade hook from
    transformers' StaticCache, or given) = with the dynamic KVCache; a decode step of the whole
    model traces into one graph (fullgraph) and gives the eager logits over 10 steps."""
    from transformers.cache_utils import StaticCache

    model, forms = _low_rank_model()
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    want = model.generate(ids, past_key_values=KVCache(forms), **kw)
    got = model.generate(ids, past_key_values=StaticKVCache(forms, 24), **kw)
    assert got.tolist() == want.tolist()

    comp = compiled_static_steps(model, ids, forms, 24, 10, "eager", atol=1e-5)
    assert isinstance(comp.layers[1], StaticLatentLayer)
    # transformers' own StaticCache: the hook swaps in the static latent layers
    hf = StaticCache(config=model.config, max_cache_len=24)
    from slimfx.forms.kv.apply import _mark

    for layer, f in zip(model.model.layers, forms):
        _mark(layer.self_attn, f)
    assert model.generate(ids, past_key_values=hf, **kw).tolist() == want.tolist()
    assert isinstance(hf.layers[0], StaticQuantizedLatentLayer)


def test_static_low_rank_caches_rotate_left_padded_rows_at_their_positions():
    """A left-padded row's tokens sit at positions shifted by its padding: the static latent
    layers record the call's position_ids per slot, as the dynamic layers do, so the rebuilt
    keys are rotated alike (with slot indices instead, the padded row's logits moved ~4e-3)."""
    model, forms = _low_rank_model()
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1: three pad tokens on the left
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, attention_mask=mask)
    with torch.no_grad():
        want = model.generate(ids, past_key_values=KVCache(forms), output_logits=True,
                              return_dict_in_generate=True, **kw)  # fmt: skip
        got = model.generate(ids, past_key_values=StaticKVCache(forms, 24), output_logits=True,
                             return_dict_in_generate=True, **kw)  # fmt: skip
    assert got.sequences.tolist() == want.sequences.tolist()
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    cache = StaticKVCache(forms, 24)
    with torch.no_grad():
        pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes
        model(ids, attention_mask=mask, position_ids=pos_ids, past_key_values=cache, use_cache=True)
    pos = cache.layers[1].positions
    assert pos[0, :9].tolist() == list(range(9)) and pos[1, 3:9].tolist() == list(range(6))
    cache.reset()
    assert torch.equal(cache.layers[1].positions, torch.arange(24).repeat(2, 1))


def test_static_refusals():
    with pytest.raises(ValueError, match="max_cache_len 4 must exceed sink 4"):
        StaticQuantizedKVLayer(KVQuantConfig(sink=4), 4)
    with pytest.raises(TypeError, match="no static cache layer for str"):
        static_layer_for("int4", 64)  # type: ignore[arg-type]


class _Looped(StaticQuantizedKVLayer):
    """The traced path's token-by-token writes, run eagerly: the reference of ``_write_many``."""

    def _write_many(self, k, v):  # noqa: ANN001, ANN202
        for i in range(k.shape[-2]):
            self._write_one(k[:, :, i : i + 1], v[:, :, i : i + 1])


class _LoopedLatent(StaticQuantizedLatentLayer):
    _write_many = _Looped._write_many


@pytest.mark.parametrize(
    "make, chunks",
    [
        (lambda M: _Looped(KVQuantConfig(4, 4, 4, 8, 2, sink=3), M), (30, 1, 7, 1, 2)),
        (lambda M: _Looped(KVQuantConfig(2, 8, 4, 16, 5), M), (3, 2, 40)),  # > the ring
        (lambda M: _Looped(KVQuantConfig(8, 8, 8, 16, 0, sink=1), M), (1, 1, 9, 17, 12)),
        (lambda M: _LoopedLatent(MIXED, M), (11, 1, 25, 1)),  # per-channel latent blocks
        (lambda M: _LoopedLatent(
            KVLatentQuantConfig(16, 24, 2, "whitened", 4, 4, 2, sink=2, axis="token"), M),
         (2, 19, 1, 20)),  # per-token latent: blocks of one token
    ],
)
def test_a_prefill_written_in_one_pass_equals_token_by_token(make, chunks):
    """An eager multi-token update writes the call's tokens in one pass (a prefill of 8k
    tokens took 2.9 s per SmolLM2 layer token by token): the state it leaves — ring, sinks,
    every store row a later read uses — and every read equal the token-by-token writes'."""
    M = sum(chunks) + 3
    g = torch.Generator().manual_seed(4)
    ref, got = make(M), make(M)
    got.__class__ = got.__class__.__mro__[1]  # the one-pass write
    n = 0
    for T in chunks:
        c = ref.config
        if isinstance(c, KVLatentQuantConfig):  # latents (B, 1, T, rank) in place of K/V
            k = torch.randn(2, 1, T, c.key_rank, generator=g)
            v = torch.randn(2, 1, T, c.value_rank, generator=g)
        else:
            k, v = torch.randn(2, 2, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g)
        a, b = ref.update(k, v), got.update(k, v)
        n += T
        torch.testing.assert_close(b[0], a[0], atol=0, rtol=0)
        torch.testing.assert_close(b[1], a[1], atol=0, rtol=0)
        for x, y in ((got.keys, ref.keys), (got.values, ref.values),
                     (got.sink_keys, ref.sink_keys), (got.sink_values, ref.sink_values)):  # fmt: skip
            assert torch.equal(x, y)
        ka, va = ref._read(torch.tensor(n - 1))
        kb, vb = got._read(torch.tensor(n - 1))
        assert torch.equal(ka[:, :, :n], kb[:, :, :n]) and torch.equal(va[:, :, :n], vb[:, :, :n])
    assert int(got.cumulative_length) == n


def test_a_traced_chunk_is_not_unrolled_per_token():
    """A compiled multi-token call (transformers compiles chunked prefills over a static cache)
    traces the one-pass write: the graph of a 40-token chunk has the node count of an 8-token
    one (token by token, inductor took 39 s to compile 8 tokens and 398 s for 64), and the
    compiled chunks leave the eager state and reads."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    cfg = KVQuantConfig(4, 4, 4, 8, 2, sink=3)
    g = torch.Generator().manual_seed(6)
    sizes = {}
    for T in (8, 40):
        eager, comp = StaticQuantizedKVLayer(cfg, 96), StaticQuantizedKVLayer(cfg, 96)
        k0, v0 = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
        eager.update(k0, v0)
        comp.update(k0, v0)
        torch._dynamo.reset()
        rec = EagerAndRecordGraphs()
        step = torch.compile(comp.update, fullgraph=True, backend=rec)
        for _ in range(2):  # two chunks: the second starts inside the store
            k, v = torch.randn(1, 2, T, 16, generator=g), torch.randn(1, 2, T, 16, generator=g)
            want, got = eager.update(k, v), step(k, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        for a, b in zip(eager.store.values(), comp.store.values()):
            assert torch.equal(a, b)
        sizes[T] = len(rec.graphs[0].graph.nodes)
    torch._dynamo.reset()
    assert sizes[8] == sizes[40], sizes
