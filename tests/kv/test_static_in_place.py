"""Decode steps over a *static* quantized cache read in place
(``kernels.kv_attention.static_step``, ``StaticQuantizedKVLayer`` in fused mode).

The op against attention over what the plain static ``update`` returns (the whole
preallocated store dequantized, full-length K/V under the static mask); inside a Hugging Face
model the tokens and logits of the plain static path, a padded batch included; under
``torch.compile`` one graph over steps that grow the store, the op in it, and no full-length
read."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimfx.forms.kv.config import KVQuantConfig
from slimfx.forms.kv.fused import use_fused_decode
from slimfx.forms.kv.static_cache import StaticKVCache, StaticQuantizedKVLayer
from slimfx.kernels.kv_attention.static_step import static_read_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(cfg, M, B, H, D, prompt, g):  # noqa: ANN001, ANN202
    """Two static layers holding the same ``prompt`` tokens; the second in fused mode."""
    plain, fused = StaticQuantizedKVLayer(cfg, M), StaticQuantizedKVLayer(cfg, M)
    k, v = torch.randn(B, H, prompt, D, generator=g), torch.randn(B, H, prompt, D, generator=g)
    plain.update(k, v)
    fused.update(k, v)
    fused.fused_decode = True
    return plain, fused


@pytest.mark.parametrize(
    "cfg, H, rep",
    [
        (KVQuantConfig(4, 4, 8, 8, 4, sink=3), 2, 2),  # sinks, GQA
        (KVQuantConfig(2, 4, 4, 4, 2), 1, 4),  # no sinks, mixed widths, MQA
        (KVQuantConfig(8, 8, 4, 16, 0, sink=2), 3, 1),  # int8, no residual, MHA
    ],
)
@pytest.mark.parametrize("rows", [0, 1 << 30], ids=["folded", "dequantized"])
def test_static_step_equals_attention_over_the_plain_update(cfg, H, rep, rows, monkeypatch):
    """Every step from a 5-token prompt to the end of the preallocation (blocks leave the
    window on the way), a left-padded row hidden by the mask: the in-place step equals SDPA
    over the plain layer's full-length K/V under the same static mask."""
    from slimfx.kernels.kv_attention import folded

    monkeypatch.setattr(folded, "DEQUANTIZE_ROWS", rows)
    M, B, D, scale = 40, 2, 16, 0.3
    g = torch.Generator().manual_seed(0)
    plain, fused = _pair(cfg, M, B, H, D, 5, g)
    err = 0.0
    for t in range(5, M):
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        q = torch.randn(B, H * rep, 1, D, generator=g)
        mask = (torch.arange(M) <= t).view(1, 1, 1, M).expand(B, 1, 1, M).clone()
        mask[1, ..., :2] = False  # row 1: two pad tokens on the left
        K, V = plain.update(k, v)
        want = F.scaled_dot_product_attention(
            q, K, V, attn_mask=mask, scale=scale, enable_gqa=True
        ).squeeze(2)
        fused.update(k, v)
        got = fused.decode_attention(q, scale, mask=mask)
        err = max(err, float((got - want).abs().max()))
    assert err < 2e-6
    assert int(fused.cumulative_length) == M


def test_read_plan_by_hand():
    # 20 tokens before the call, sink 2, residual 4, blocks of 4, a ring of 12: the store
    # holds ⌊(20 − 2 − 4)/4⌋·4 = 12 rows, the window positions 14 … 20 (slots p mod 12)
    assert static_read_plan(20, 2, 4, 4, 12) == (2, 12, [2, 3, 4, 5, 6, 7, 8])
    assert static_read_plan(0, 3, 4, 4, 12) == (1, 0, [])  # the first token: a sink
    assert static_read_plan(5, 0, 0, 4, 8) == (0, 4, [4, 5])


def _tiny():
    from slimfx.models import tiny_llama

    return tiny_llama(seed=3)


def _count_reads(monkeypatch):  # noqa: ANN202
    """Calls of the static layers' full-length read (the whole store dequantized)."""
    from slimfx.forms.kv import static_cache

    calls = []
    orig = static_cache._StaticStoreLayer._read

    def read(self, n0):  # noqa: ANN001, ANN202
        calls.append(int(n0))
        return orig(self, n0)

    monkeypatch.setattr(static_cache._StaticStoreLayer, "_read", read)
    return calls


def test_generate_over_a_static_cache_reads_in_place_and_gives_the_plain_tokens(monkeypatch):
    """``use_fused_decode`` with a ``StaticKVCache`` (and with transformers' ``StaticCache``
    upgraded by the form's hook): greedy tokens and logits equal the plain static path's for a
    left-padded batch; decode steps never read the whole store (only the prefill does)."""
    from transformers.cache_utils import StaticCache

    from slimfx.forms.kv.apply import _mark

    model = _tiny()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    forms = [KVQuantConfig(4, 4, 4, 16, residual=2, sink=1)] * 2
    kw = dict(max_new_tokens=14, min_new_tokens=14, do_sample=False, attention_mask=mask,
              output_logits=True, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        want = model.generate(ids, past_key_values=StaticKVCache(forms, 30), **kw)
        reads = _count_reads(monkeypatch)
        handle = use_fused_decode(model)
        try:
            got = model.generate(ids, past_key_values=StaticKVCache(forms, 30), **kw)
            paths = {la.self_attn.last_decode_path for la in model.model.layers}
            assert reads == [0, 0]  # the prefill of each layer
            for layer, f in zip(model.model.layers, forms):
                _mark(layer.self_attn, f)
            hf = StaticCache(config=model.config, max_cache_len=30)
            via_hf = model.generate(ids, past_key_values=hf, **kw)
        finally:
            handle.undo()
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert paths == {"torch"}
    assert isinstance(hf.layers[0], StaticQuantizedKVLayer)
    assert torch.equal(via_hf.sequences, want.sequences)


def test_a_compiled_decode_step_is_one_graph_with_the_op(monkeypatch):
    """A whole-model decode step compiled with ``fullgraph`` over 12 steps that move blocks
    into the store: one graph (no recompile), calling the static op once per layer and never
    the full-length read; logits equal the eager in-place steps'."""
    from _helpers import compiled_static_steps
    from torch._dynamo.testing import EagerAndRecordGraphs

    model = _tiny()
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(8))
    forms = [KVQuantConfig(4, 4, 4, 16, residual=2, sink=1)] * 2
    handle = use_fused_decode(model)
    rec = EagerAndRecordGraphs()
    reads = _count_reads(monkeypatch)
    try:
        comp = compiled_static_steps(model, ids, forms, 30, 12, rec, atol=1e-6)
    finally:
        handle.undo()
        torch._dynamo.reset()
    assert len(rec.graphs) == 1
    code = rec.graphs[0].code
    assert code.count("kv_decode_attention_static") == 2
    assert reads == [0] * 4  # the prefills (2 caches × 2 layers); no step, eager or traced
    assert int(comp.layers[0].cumulative_length) == 22


def test_inductor_compiles_the_in_place_layer_step():
    """Inductor (not only dynamo) compiles a layer's fused update + static op; equal to eager
    over steps that flush blocks."""
    cfg = KVQuantConfig(4, 4, 4, 8, 2, sink=3)
    g = torch.Generator().manual_seed(2)
    eager, comp = _pair(cfg, 32, 1, 2, 16, 6, g)
    eager.fused_decode = True

    def step(layer, q, k, v):  # noqa: ANN001, ANN202
        layer.update(k, v)
        return layer.decode_attention(q, 0.25)

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: step(comp, q, k, v), fullgraph=True, dynamic=False)
    try:
        for _ in range(10):
            q = torch.randn(1, 4, 1, 16, generator=g)
            k, v = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
            torch.testing.assert_close(compiled(q, k, v), step(eager, q, k, v), atol=1e-6, rtol=0)
    finally:
        torch._dynamo.reset()


def test_a_static_cache_on_cuda_keeps_the_plain_path_unless_asked(monkeypatch):
    """The static op reads the token count on the host, which a CUDA graph cannot capture:
    with ``kernel=None`` a layer on CUDA is not put in fused mode (checked through the device
    test the hook uses); an explicit choice routes it; the op carries the tag that keeps
    inductor's CUDA graphs out of such a step."""
    from slimfx.forms.kv import fused
    from slimfx.kernels.kv_attention.static_step import kv_decode_attention_static

    model = _tiny()
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    forms = [KVQuantConfig(4, 4, 4, 16, residual=2, sink=1)] * 2
    monkeypatch.setattr(fused, "_on_cuda", lambda layer: True)
    for kernel, want in ((None, False), (False, True)):
        handle = use_fused_decode(model, kernel=kernel)
        cache = StaticKVCache(forms, 12)
        try:
            with torch.no_grad():
                out = model(ids, past_key_values=cache, use_cache=True)
                model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            routed = [la.fused_decode for la in cache.layers]
        finally:
            handle.undo()
        assert routed == [want, want]
    if hasattr(torch.Tag, "cudagraph_unsafe"):
        assert torch.Tag.cudagraph_unsafe in kv_decode_attention_static._opoverload.tags


def test_static_step_benchmark_runs_eager(tmp_path, capsys):
    """``benchmarks/kv_static_step.py`` eagerly on a short context (compiling is its slow part):
    a row per variant, the in-place step checked against the plain one."""
    import json

    from _helpers import load_benchmark

    bench = load_benchmark("kv_static_step")
    out = tmp_path / "r.json"
    args = ["--contexts", "100", "--forms", "int4,int2", "--room", "40", "--reps", "1"]
    assert bench.main([*args, "--no-compile", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == [
        "dense", "dynamic dense", "plain int4", "in place int4", "plain int2", "in place int2"
    ]  # fmt: skip
    assert all(r["rel_err"] < 1e-4 and r["compiled_ms"] is None for r in rows)
    assert capsys.readouterr().out.count("| 100 | 140 |") == 6
    with pytest.raises(SystemExit, match="unknown forms"):
        bench.main(["--forms", "int5", "--no-compile"])
