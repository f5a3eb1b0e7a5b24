"""The Triton decode kernel inside Hugging Face attention (``slimfx.forms.kv.fused``).

A tiny random Llama (4 query / 2 kv heads, head_dim 16) decodes over a ``KVCache`` of
``kv_quant`` layers three ways: plain (``update`` dequantizes the store, sdpa attends), fused
with the torch op, fused with the Triton kernel (interpreted on the CPU). Logits of
every call must agree; the fused runs must never dequantize the store and must call
``decode_attention`` once per layer and decode step.
"""

from __future__ import annotations

import pytest
import torch

from . import kernels_interpreted_or_cuda, triton_skip_reason

_why = triton_skip_reason()
if _why:
    pytest.skip(_why, allow_module_level=True)

pytest.importorskip("transformers")

from slimfx.forms.kv.cache import KVCache, QuantizedKVLayer  # noqa: E402
from slimfx.forms.kv.config import KVDenseConfig, KVQuantConfig  # noqa: E402
from slimfx.forms.kv.fused import FUSED_ATTENTION, use_fused_decode  # noqa: E402
from slimfx.kernels.kv_attention import triton_kernel as tk  # noqa: E402

_why = kernels_interpreted_or_cuda(tk._kv_decode_split_kernel)
if _why:
    pytest.skip(_why, allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")

# fp32 model: kernel, reference and sdpa differ only in summation order (~2e-7 seen on logits
# of magnitude ≲ 2); 1e-5 still catches a dropped sink, a token read twice or a wrong scale.
ATOL = 1e-5
STEPS = 12


def _model():
    from slimfx.models import tiny_llama

    return tiny_llama(seed=3)


def _decode(model, forms, ids, fused: bool, kernel: bool = True):
    """Logits of the prefill and of ``STEPS`` greedy steps; counts of ``_dequantize`` and
    ``decode_attention`` calls during the decode steps."""
    cache = KVCache(forms)
    handle = use_fused_decode(model, kernel=kernel) if fused else None
    counts = {"dequantize": 0, "decode_attention": 0}
    orig_deq, orig_att = QuantizedKVLayer._dequantize, QuantizedKVLayer.decode_attention

    def deq(self):  # noqa: ANN001, ANN202
        counts["dequantize"] += 1
        return orig_deq(self)

    def att(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        counts["decode_attention"] += 1
        return orig_att(self, *a, **k)

    out = []
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            out.append(logits)
            QuantizedKVLayer._dequantize, QuantizedKVLayer.decode_attention = deq, att
            for _ in range(STEPS):
                nxt = logits[:, -1].argmax(-1)[:, None]
                logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
                out.append(logits)
    finally:
        QuantizedKVLayer._dequantize, QuantizedKVLayer.decode_attention = orig_deq, orig_att
        if handle is not None:
            handle.undo()
    return out, counts


@pytest.mark.parametrize(
    "forms",
    [
        # int4/int2, blocks of 8, sink 2 and residual 4: the store grows during the steps
        [KVQuantConfig(4, 2, 8, 8, residual=4, sink=2)] * 2,
        # one 16-bit layer (sdpa), one int8 layer with blocks of 4 and no residual
        [KVDenseConfig(), KVQuantConfig(8, 8, 4, 16)],
    ],
    ids=["int4-int2-sink", "dense+int8"],
)
@pytest.mark.parametrize("batch,prompt", [(1, 13), (2, 7)])
def test_fused_decode_matches_the_torch_path(forms, batch, prompt):
    model = _model()
    ids = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(5))
    ref, plain = _decode(model, forms, ids, fused=False)
    quant_layers = sum(isinstance(f, KVQuantConfig) for f in forms)
    assert plain["decode_attention"] == 0 and plain["dequantize"] > 0
    for kernel in (False, True):
        got, counts = _decode(model, forms, ids, fused=True, kernel=kernel)
        assert counts == {"dequantize": 0, "decode_attention": STEPS * quant_layers}
        for i, (g, r) in enumerate(zip(got, ref)):
            torch.testing.assert_close(g, r, atol=ATOL, rtol=0, msg=f"kernel={kernel} call {i}")
    assert model.config._attn_implementation != FUSED_ATTENTION  # undo() restored it


@pytest.mark.parametrize("kernel", [False, True])
def test_padded_decode_steps_apply_the_mask(kernel):
    """A left-padded batch: the torch op applies the mask; with the kernel asked for, the step
    goes to the torch op and says why. Logits equal the plain path's (store dequantized, sdpa
    with the mask)."""
    model = _model()
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in row 1
    forms = [KVQuantConfig(4, 4, 4, 16, residual=2, sink=1)] * 2
    runs = []
    for fused in (False, True):
        cache, m = KVCache(forms), mask
        handle = use_fused_decode(model, kernel=kernel) if fused else None
        out = []
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=m, past_key_values=cache).logits
                for _ in range(6):
                    m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
                    nxt = logits[:, -1:].argmax(-1)
                    logits = model(input_ids=nxt, attention_mask=m, past_key_values=cache).logits
                    out.append(logits)
            paths = {getattr(la.self_attn, "last_decode_path", None) for la in model.model.layers}
        finally:
            if handle is not None:
                handle.undo()
        runs.append(out)
    assert all(la.n_stored > 0 for la in cache.layers)
    for g, r in zip(*runs[::-1]):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=0)
    assert paths == {"torch: a padding mask (the kernel takes none)" if kernel else "torch"}
    q = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="takes no mask"):
        cache.layers[0].decode_attention(q, 0.25, kernel=True, mask=m[:, None, None].bool())


def test_no_attention_module_is_refused():
    with pytest.raises(ValueError, match="no attention module"):
        use_fused_decode(torch.nn.Linear(2, 2))


def test_generate_uses_the_kernel_and_gives_the_same_tokens(monkeypatch):
    model = _model()
    calls = []
    orig = QuantizedKVLayer.decode_attention

    def att(self, q, scaling, kernel=True, mask=None):  # noqa: ANN001, ANN202
        calls.append(kernel)
        return orig(self, q, scaling, kernel, mask)

    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(7))
    forms = [KVQuantConfig(4, 4, 4, 16, residual=2, sink=1)] * 2
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, past_key_values=KVCache(forms), **kw)
        handle = use_fused_decode(model, kernel=True)
        monkeypatch.setattr(QuantizedKVLayer, "decode_attention", att)
        cache = KVCache(forms)
        try:
            got = model.generate(ids, past_key_values=cache, **kw)
        finally:
            handle.undo()
    assert torch.equal(got, ref)
    assert calls == [True] * 9 * 2  # 9 decode steps (the 10th token needs none) × 2 layers
    assert all(la.n_stored > 0 for la in cache.layers)  # the steps read a non-empty store


def test_static_layer_steps_through_the_kernel_equal_the_torch_op():
    """A static quantized layer in fused mode: ``kernel=True`` (the Triton kernel inside the
    static op) equals the folded torch step over steps that move blocks into the store; a mask
    hiding a cached token (left padding) sends the step to the torch op inside the op, which
    applies it (a mask the kernel ignored would change the result)."""
    from slimfx.forms.kv.static_cache import StaticQuantizedKVLayer

    cfg = KVQuantConfig(4, 2, 8, 8, residual=4, sink=2)
    M, B, H, D = 48, 2, 2, 16
    g = torch.Generator().manual_seed(9)
    layer = StaticQuantizedKVLayer(cfg, M)
    layer.update(torch.randn(B, H, 7, D, generator=g), torch.randn(B, H, 7, D, generator=g))
    layer.fused_decode = True
    for t in range(7, 30):
        layer.update(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g))
        q = torch.randn(B, 4, D, generator=g)
        mask = (torch.arange(M) <= t).view(1, 1, 1, M).expand(B, 1, 1, M).clone()
        want = layer.decode_attention(q, 0.25, kernel=False, mask=mask)
        got = layer.decode_attention(q, 0.25, kernel=True, mask=mask)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert not layer.step_hides_tokens(mask)
    mask[1, ..., :3] = False
    assert layer.step_hides_tokens(mask)
    want = layer.decode_attention(q, 0.25, kernel=False, mask=mask)
    torch.testing.assert_close(layer.decode_attention(q, 0.25, kernel=True, mask=mask), want)
    unmasked = layer.decode_attention(q, 0.25, kernel=False)
    assert (unmasked[1] - want[1]).abs().max() > 1e-3 and torch.equal(unmasked[0], want[0])
