"""The static quantized cache: reads equal the dynamic cache's, a decode step traces into one
graph (torch.compile fullgraph), generate() greedy int8 tokens equal dense."""

from __future__ import annotations

import pytest
import torch

from slimfx.forms.kv.cache import QuantizedKVLayer
from slimfx.forms.kv.config import KVDenseConfig, KVLowRankConfig, KVQuantConfig
from slimfx.forms.kv.static_cache import StaticKVCache, StaticQuantizedKVLayer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "cfg, chunks",
    [
        (KVQuantConfig(4, 4, 4, 8, 0), (1,) * 30),
        (KVQuantConfig(2, 8, 4, 16, 5), (1,) * 31),
        (KVQuantConfig(4, 2, 8, 8, 3), (13,) + (1,) * 20),  # prefill longer than the ring
    ],
)
def test_static_reads_equal_the_dynamic_cache(cfg, chunks):
    g = torch.Generator().manual_seed(0)
    dyn, sta = QuantizedKVLayer(cfg), StaticQuantizedKVLayer(cfg, max_cache_len=48)
    n = 0
    for T in chunks:
        k = torch.randn(2, 2, T, 16, generator=g)
        v = torch.randn(2, 2, T, 16, generator=g)
        dk, dv = dyn.update(k, v)
        sk, sv = sta.update(k, v)
        n += T
        assert sk.shape == (2, 2, 48, 16) and int(sta.get_seq_length()) == n
        torch.testing.assert_close(sk[:, :, :n], dk, atol=0, rtol=0)
        torch.testing.assert_close(sv[:, :, :n], dv, atol=0, rtol=0)
    assert dyn.n_stored > 0  # the store was exercised


def test_a_decode_step_compiles_into_one_graph():
    cfg = KVQuantConfig(4, 4, 4, 8, 2)
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


def test_static_generate_int8_equals_dense(tiny_llama, tiny_ids):
    ids = tiny_ids[:1]
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    dense = tiny_llama.generate(ids, **kw)
    forms = [KVQuantConfig(8, 8, 4, 16, 2), KVDenseConfig()]
    got = tiny_llama.generate(ids, past_key_values=StaticKVCache(forms, 32), **kw)
    assert torch.equal(got, dense)


def test_static_refusals():
    with pytest.raises(ValueError, match="must be a multiple of key_group 32"):
        StaticQuantizedKVLayer(KVQuantConfig(), 40)
    with pytest.raises(TypeError, match="no static cache layer for kv_lowrank"):
        StaticKVCache([KVLowRankConfig()], 64)
