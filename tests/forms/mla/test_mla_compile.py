"""A converted model's decode step with the static latent cache under ``torch.compile``
(inductor, CPU): one graph, no recompilation across steps, the eager model's tokens — with
16-bit and int8 factors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from forms.mla._tiny import calib_batches, tiny_gqa_llama
from slimfx.forms.mla.cache import MLAStaticLatentCache
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import convert_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, STEPS, MAX_LEN = 6, 8, 24


def _greedy(model, step):
    """Eager prefill into a fresh static cache, then ``STEPS`` one-token steps via ``step``."""
    prompt = torch.randint(3, 256, (2, PROMPT), generator=torch.Generator().manual_seed(7))
    cache = MLAStaticLatentCache(model.config.num_hidden_layers, MAX_LEN)
    with torch.no_grad():
        out = model(prompt, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(PROMPT))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks, logits = [tok], []
        for p in range(PROMPT, PROMPT + STEPS):
            lg = step(tok, cache, torch.tensor([p]))
            tok = lg.argmax(-1, keepdim=True)
            toks.append(tok)
            logits.append(lg)
    return torch.cat(toks, 1), torch.stack(logits), prompt


def test_static_latent_cache_decode_step_compiles_and_matches_eager():
    pytest.importorskip("torch._inductor")
    model = tiny_gqa_llama(2)
    cfg = MLAConfig(rank=12, rope_pairs=2)  # layer 1 with int8 factors: both kinds compile
    convert_model(model, {0: cfg, 1: replace(cfg, factor_bits=8)}, calib_batches())

    def step(tok, cache, pos):
        return model(tok, past_key_values=cache, use_cache=True, cache_position=pos).logits[:, -1]

    ref_tokens, ref_logits, prompt = _greedy(model, step)
    assert model.model.layers[0].self_attn.last_decode_path == "torch"  # the absorbed form ran
    with torch.no_grad():  # eager static steps = the cache-free forward (no mask was passed)
        seq = torch.cat([prompt, ref_tokens[:, :STEPS]], 1)
        full = model(seq, use_cache=False).logits[:, PROMPT:]
    torch.testing.assert_close(ref_logits.transpose(0, 1), full, atol=2e-5, rtol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")  # a graph break raises
    with torch._dynamo.config.patch(error_on_recompile=True):
        tokens, logits, _ = _greedy(model, compiled)
    assert torch.equal(tokens, ref_tokens)
    # inductor fuses and reorders fp32 reductions: measured ≤ 3e-7 on these logits (|.| ≤ 1)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
