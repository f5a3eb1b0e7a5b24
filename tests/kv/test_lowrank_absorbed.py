"""The low-rank attention's absorbed decode (value latent contracted with the attention weights,
then each head's rows of v_up) equals rebuilding V: Qwen2 (k/v biases), 2 latent groups, sink
tokens, a left-padded batch, eager and sdpa attention."""

from __future__ import annotations

import pytest
import torch
from _helpers import tiny_qwen2_biased

from slimfx.forms.kv.cache import KVCache
from slimfx.forms.kv.calibrate import attention_grams, fit_site
from slimfx.forms.kv.config import KVLatentQuantConfig, KVLowRankConfig
from slimfx.forms.kv.lowrank import LowRankKVAttention, apply_lowrank_kv
from slimfx.ir.find import inspect_attention_sites

pytestmark = pytest.mark.usefixtures("one_thread")

FORMS = [
    KVLatentQuantConfig(16, 24, 2, "whitened", 4, 4, 2, sink=2, axis="channel"),
    KVLowRankConfig(16, 24, 2, "attention", sink=3),
]


def _model(attn: str):
    model = tiny_qwen2_biased(attn)
    sites, _ = inspect_attention_sites(model)
    g = torch.Generator().manual_seed(5)
    grams = attention_grams(model, sites, [torch.randint(3, 256, (1, 24), generator=g)] * 3)
    factors = {s.fqn: fit_site(model, s, grams[s.fqn], FORMS[i]) for i, s in enumerate(sites)}
    apply_lowrank_kv(model, sites, {s.fqn: FORMS[i] for i, s in enumerate(sites)}, factors)
    return model


def _decode(model, ids, mask, absorb: bool, steps: int = 12):
    """Prefill then ``steps`` greedy one-token calls; the logits of every decode call."""
    LowRankKVAttention.absorb_decode = absorb
    try:
        cache, out = KVCache(FORMS), []
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            r = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
            for _ in range(steps):
                tok = r.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(tok)], 1)
                pos = pos[:, -1:] + 1
                r = model(tok, attention_mask=mask, position_ids=pos, past_key_values=cache)
                out.append(r.logits)
    finally:
        LowRankKVAttention.absorb_decode = True
    return torch.cat(out, 1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_absorbed_decode_equals_rebuilding_v(attn):
    model = _model(attn)
    assert not model.model.layers[0].self_attn.training  # the rewrite keeps eval mode
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second row left-padded by 3
    calls = []
    orig = LowRankKVAttention._decode_absorbed

    def spy(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        return orig(self, *a, **k)

    LowRankKVAttention._decode_absorbed = spy
    try:
        got = _decode(model, ids, mask, absorb=True)
        n_absorbed = len(calls)
        want = _decode(model, ids, mask, absorb=False)
    finally:
        LowRankKVAttention._decode_absorbed = orig
    assert n_absorbed == 12 * 2 and len(calls) == n_absorbed  # every decode call, both layers
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
