"""The torch decode step over a quantized KV store read in place
(``kernels.kv_attention.folded``) and ``use_fused_decode`` on the CPU, where it is the default.

Needs no Triton: the op is plain torch. Numerics against the reference (which dequantizes the
whole store) across widths, groups, chunk boundaries, GQA and masks; inside a Hugging Face
model, tokens and logits against the plain path (``update`` dequantizes, sdpa attends)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimfx.forms.kv.cache import KVCache, QuantizedKVLayer
from slimfx.forms.kv.config import KVQuantConfig
from slimfx.forms.kv.fused import use_fused_decode
from slimfx.kernels.kv_attention.folded import kv_decode_attention_folded
from slimfx.kernels.kv_attention.reference import dequantize_store, kv_decode_attention_reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def always_folded(monkeypatch):
    """The tiny stores of these tests would be dequantized (``DEQUANTIZE_ROWS``): fold them."""
    from slimfx.kernels.kv_attention import folded

    monkeypatch.setattr(folded, "DEQUANTIZE_ROWS", 0)


def _store(B, H, N, D, kb, vb, G, Gv, Nw, seed=0):
    g = torch.Generator().manual_seed(seed)

    def u8(bits):
        return torch.randint(0, 256, (B, H, N, D * bits // 8), dtype=torch.uint8, generator=g)

    def f16(*shape, lo):
        return (torch.rand(*shape, generator=g) + lo).half()

    return (
        u8(kb), f16(B, H, N // G, D, lo=0.1), f16(B, H, N // G, D, lo=-0.5),
        u8(vb), f16(B, H, N, D // Gv, lo=0.1), f16(B, H, N, D // Gv, lo=-0.5),
        torch.randn(B, H, Nw, D, generator=g), torch.randn(B, H, Nw, D, generator=g),
    )  # fmt: skip


@pytest.mark.parametrize(
    "kb,vb,G,Gv,N,Nw,H,rep,chunk",
    [
        (4, 4, 32, 64, 2048, 5, 3, 3, 512),  # SmolLM2's heads, four chunks
        (8, 8, 16, 32, 96, 1, 1, 4, 40),  # chunk not a multiple of the key group, MQA
        (4, 2, 8, 16, 72, 7, 2, 3, 32),  # mixed widths, 4 value groups, last chunk short
        (2, 4, 16, 8, 48, 2, 2, 1, 4),  # chunk below the key group, int2 keys, MHA
        (2, 2, 32, 64, 0, 3, 3, 3, 1024),  # empty store: the window alone
    ],
)
@pytest.mark.parametrize("rows", [0, 1 << 30], ids=["folded", "dequantized"])
def test_folded_step_equals_the_reference(kb, vb, G, Gv, N, Nw, H, rep, chunk, rows):
    D, B = 64, 2
    store = _store(B, H, N, D, kb, vb, G, Gv, Nw)
    q = torch.randn(B, H * rep, D, generator=torch.Generator().manual_seed(1))
    ref = kv_decode_attention_reference(q, *store, kb, vb, G, Gv, 0.125)
    got = kv_decode_attention_folded(
        q, *store, kb, vb, G, Gv, 0.125, chunk=chunk, dequantize_rows=rows
    )
    assert got.shape == ref.shape and got.dtype == q.dtype
    # fp32 summation order only; random int8 codes with scales ~1 give scores of hundreds, whose
    # last-bit differences move the softmax by ~1e-5 relative (seen: 2e-5)
    torch.testing.assert_close(got, ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("rows", [0, 1 << 30], ids=["folded", "dequantized"])
@pytest.mark.parametrize("additive", [False, True])
def test_mask_hides_exactly_its_tokens_in_the_layers_order(additive, rows):
    """Mask columns follow the layer's order — ``sink`` window tokens, the store, the rest of the
    window — and the masked tokens are dropped from attention (against attention over the
    dequantized cache without them)."""
    B, H, rep, D, N, Nw, sink = 2, 2, 2, 32, 64, 6, 2
    kb, vb, G, Gv = 4, 4, 16, 32
    store = _store(B, H, N, D, kb, vb, G, Gv, Nw, seed=3)
    q = torch.randn(B, H * rep, D, generator=torch.Generator().manual_seed(4))
    keep = torch.ones(B, sink + N + Nw - sink, dtype=torch.bool)
    keep[1, :4] = False  # row 1: both sinks and two store tokens padded away
    keep[0, sink + 10] = False
    k, v = dequantize_store(*store[:6], kb, vb, G, Gv)
    kw, vw = store[6:]
    k = torch.cat([kw[:, :, :sink], k, kw[:, :, sink:]], 2)
    v = torch.cat([vw[:, :, :sink], v, vw[:, :, sink:]], 2)
    mask = keep[:, None, None]
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    got = kv_decode_attention_folded(
        q, *store, kb, vb, G, Gv, 0.2, mask=mask, sink=sink, chunk=32, dequantize_rows=rows
    )
    for b in range(B):
        kk, vv = k[b][:, keep[b]], v[b][:, keep[b]]
        ref = F.scaled_dot_product_attention(
            q[b].view(H, rep, 1, D), kk[:, None], vv[:, None], scale=0.2
        ).view(H * rep, D)
        torch.testing.assert_close(got[b], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="the mask covers 69 tokens, the cache holds 70"):
        kv_decode_attention_folded(q, *store, kb, vb, G, Gv, 0.2, mask=mask[..., 1:], sink=sink)


@pytest.mark.usefixtures("always_folded")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_step_equals_attention_over_what_update_returned(dtype):
    """A real layer (sinks, residual window, blocks moving into the store during the steps):
    ``decode_attention(kernel=False)`` in fused mode equals sdpa over the plain layer's
    ``update`` output, and the fused layer never dequantizes its store."""
    cfg = KVQuantConfig(4, 2, 8, 16, residual=3, sink=2)
    plain, fused = QuantizedKVLayer(cfg), QuantizedKVLayer(cfg)
    g = torch.Generator().manual_seed(0)
    B, Hkv, Hq, D = 2, 2, 6, 32
    for step in range(40):
        n = 11 if step == 0 else 1
        k, v = (torch.randn(B, Hkv, n, D, generator=g).to(dtype) for _ in range(2))
        keys, values = plain.update(k, v)
        fused.fused_decode = step > 0
        fused.update(k, v)
        if step == 0:
            continue
        q = torch.randn(B, Hq, D, generator=g).to(dtype)
        ref = F.scaled_dot_product_attention(
            q[:, :, None], keys, values, scale=0.3, enable_gqa=True
        )[:, :, 0]
        got = fused.decode_attention(q, 0.3, kernel=False)
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)
    assert fused.n_stored == plain.n_stored > 24


def _count_dequantize(monkeypatch) -> list:  # noqa: ANN001
    """From now on, one entry per ``QuantizedKVLayer._dequantize`` call (the plain path)."""
    calls: list = []
    orig = QuantizedKVLayer._dequantize
    monkeypatch.setattr(QuantizedKVLayer, "_dequantize", lambda self: calls.append(1) or orig(self))
    return calls


def _tiny():
    from slimfx.models import tiny_llama

    return tiny_llama(seed=3)


@pytest.mark.usefixtures("always_folded")
def test_cpu_default_is_the_torch_op_and_generate_gives_the_same_tokens(monkeypatch):
    """``use_fused_decode(model)`` on the CPU: every decode step runs the torch op (recorded in
    ``last_decode_path``), no store is dequantized, and greedy tokens equal the plain path's —
    for a left-padded batch too."""
    model = _tiny()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    forms = [KVQuantConfig(4, 4, 4, 16, residual=2, sink=1)] * 2
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, attention_mask=mask)
    with torch.no_grad():
        ref = model.generate(ids, past_key_values=KVCache(forms), **kw)
        calls = _count_dequantize(monkeypatch)
        handle = use_fused_decode(model)
        cache = KVCache(forms)
        try:
            got = model.generate(ids, past_key_values=cache, **kw)
            paths = {la.self_attn.last_decode_path for la in model.model.layers}
        finally:
            handle.undo()
    assert torch.equal(got, ref)
    assert paths == {"torch"} and calls == []
    assert all(la.n_stored > 0 for la in cache.layers)
    assert not any(hasattr(la.self_attn, "last_decode_path") for la in model.model.layers)


def test_a_model_switched_to_another_attention_keeps_reading_the_store():
    """After ``use_fused_decode`` the caller switches the model to sdpa: the hooks still run,
    but no layer may enter fused mode (its ``update`` would hand sdpa the window alone)."""
    model = _tiny()
    ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(8))
    forms = [KVQuantConfig(4, 4, 4, 16)] * 2

    def run():  # noqa: ANN202
        cache = KVCache(forms)
        out = [model(input_ids=ids, past_key_values=cache).logits[:, -1]]
        for t in range(4):
            out.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
        return torch.stack(out), cache

    with torch.no_grad():
        ref, _ = run()
        handle = use_fused_decode(model)
        model.set_attn_implementation("sdpa")
        try:
            got, cache = run()
        finally:
            handle.undo()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert not any(la.fused_decode for la in cache.layers) and cache.layers[0].n_stored == 20


def test_cpu_step_benchmark_runs_every_form(tmp_path, capsys):
    """``benchmarks/kv_cpu_step.py`` on a short context: a row per form with the three paths
    timed and the in-place step checked against the reference."""
    import json

    from _helpers import load_benchmark

    bench = load_benchmark("kv_cpu_step")
    out = tmp_path / "r.json"
    args = ["--contexts", "100", "--batches", "2", "--heads", "4,2,64", "--reps", "1"]
    assert bench.main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["form"] for r in rows] == [f[0] for f in bench.FORMS]
    assert all(r["rel_err"] < 1e-4 and set(r["ms"]) == {"dense", "plain", "in_place"} for r in rows)
    assert capsys.readouterr().out.count("| 100 | 2 |") == len(bench.FORMS)


def test_attention_arguments_the_step_lacks_are_refused():
    """A soft-capped or sink-logit attention call in fused mode raises instead of attending
    without them (the layer has returned only its window by then)."""
    from slimfx.forms.kv.fused import _KERNEL_ATTR, _LAYER_ATTR, fused_attention

    layer = QuantizedKVLayer(KVQuantConfig(4, 4, 4, 16))
    k = torch.randn(1, 2, 12, 16)
    layer.update(k, k)
    layer.fused_decode = True
    layer.update(k[:, :, :1], k[:, :, :1])
    module = torch.nn.Module()
    setattr(module, _LAYER_ATTR, layer)  # what use_fused_decode's hook binds
    setattr(module, _KERNEL_ATTR, False)
    q = torch.randn(1, 4, 1, 16)
    out, _ = fused_attention(module, q, None, None, None, scaling=0.25)
    assert out.shape == (1, 1, 4, 16) and module.last_decode_path == "torch"
    for kw in ({"softcap": 30.0}, {"s_aux": torch.zeros(4)}):
        with pytest.raises(ValueError, match=f"has no {next(iter(kw))}"):
            fused_attention(module, q, None, None, None, scaling=0.25, **kw)


def test_small_stores_are_dequantized_large_ones_folded(monkeypatch):
    """``DEQUANTIZE_ROWS`` picks the path: a store of at most that many rows (tokens × batch ×
    kv heads) is dequantized, a larger one never is."""
    from slimfx.kernels.kv_attention import folded, reference

    calls = []
    orig = reference.dequantize_store
    monkeypatch.setattr(reference, "dequantize_store", lambda *a: calls.append(1) or orig(*a))
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2))
    for n, expect in (
        (folded.DEQUANTIZE_ROWS // 4, 1),
        (folded.DEQUANTIZE_ROWS // 4 + 32, 0),
    ):  # int4
        calls.clear()
        store = _store(2, 2, n, 64, 4, 4, 32, 64, 3)
        got = kv_decode_attention_folded(q, *store, 4, 4, 32, 64, 0.125)
        ref = kv_decode_attention_reference(q, *store, 4, 4, 32, 64, 0.125)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert len(calls) == expect + 1  # + the reference's own call


def test_a_compiled_forward_keeps_the_plain_path(monkeypatch):
    """Under ``torch.compile`` (dynamo; ``backend="eager"`` keeps it fast) the layers are not
    put in fused mode unless the kernel was asked for: the plain path runs (the store
    dequantized by ``update``) and the tokens equal the eager in-place run's."""
    model = _tiny()
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(9))
    forms = [KVQuantConfig(4, 4, 4, 16)] * 2
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)  # few shapes: quick
    handle = use_fused_decode(model)
    try:
        with torch.no_grad():
            ref = model.generate(ids, past_key_values=KVCache(forms), **kw)
            calls = _count_dequantize(monkeypatch)
            eager_forward = model.forward
            model.forward = torch.compile(eager_forward, backend="eager")
            cache = KVCache(forms)
            got = model.generate(ids, past_key_values=cache, **kw)
    finally:
        handle.undo()
        torch._dynamo.reset()
    assert torch.equal(got, ref)
    assert calls and not any(la.fused_decode for la in cache.layers)
