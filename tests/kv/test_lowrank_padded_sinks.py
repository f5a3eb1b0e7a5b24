"""Sink tokens of the low-rank caches in a padded batch: each row's sinks are its own first
real tokens, not the first cache columns (which hold a left-padded row's padding). With a
16-bit latent nothing else couples the rows, so every row of a padded batch decodes exactly
as its prompt alone — dynamic and static caches, without a cache, eager and sdpa attention,
a prompt shorter than the sinks (its last sink arrives while decoding) and a mask with a hole.
Before, the padded rows' real first tokens were rebuilt from the latent (SmolLM2 at 3/4 of the
cache: +3.9% perplexity on padded rows)."""

from __future__ import annotations

import pytest
import torch
from _helpers import left_padded, lowrank_qwen2

from slimfx.forms.kv.cache import KVCache
from slimfx.forms.kv.config import KVLowRankConfig
from slimfx.forms.kv.sinks import merge_sinks, real_columns
from slimfx.forms.kv.static_cache import StaticKVCache

pytestmark = pytest.mark.usefixtures("one_thread")

FORMS = [KVLowRankConfig(8, 16, 2, "attention", sink=3), KVLowRankConfig(16, 8, 1, sink=2)]
STEPS = 7


def _model(attn: str):
    model = lowrank_qwen2(attn, FORMS)
    model.generation_config.eos_token_id = None  # every row runs all steps
    return model


def _generate(model, ids, mask, cache):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                             max_new_tokens=STEPS, output_logits=True, pad_token_id=0,
                             return_dict_in_generate=True)  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


def _batch():
    """Prompts of 9, 2 (shorter than 3 sinks) and 6 tokens, left-padded, and a fourth row with
    a hole: its second column is padding."""
    ids, mask = left_padded(7, (9, 2, 6, 9))
    mask[3, 1] = 0
    return ids, mask


@pytest.mark.parametrize(("attn", "static"), [("eager", False), ("sdpa", False), ("sdpa", True)])
def test_each_padded_row_decodes_as_its_prompt_alone(attn, static):
    model = _model(attn)
    ids, mask = _batch()
    cache = StaticKVCache(FORMS, ids.shape[1] + STEPS) if static else KVCache(FORMS)
    toks, logits = _generate(model, ids, mask, cache)
    for r in range(ids.shape[0]):
        alone = ids[r][mask[r].bool()][None]
        want_toks, want = _generate(model, alone, torch.ones_like(alone), KVCache(FORMS))
        assert toks[r].tolist() == want_toks[0].tolist(), f"row {r}"
        torch.testing.assert_close(logits[r], want[0], atol=2e-5, rtol=1e-5, msg=f"row {r}")
    if not static:  # each row's slot 0 holds its first real token's exact value
        first = ids[torch.arange(4), [int(mask[r].nonzero()[0]) for r in range(4)]]
        layer0 = model.model.layers[0]
        with torch.no_grad():
            want = layer0.self_attn.v_proj(layer0.input_layernorm(model.model.embed_tokens(first)))
        got = cache.layers[0].sink_values[:, :, 0].reshape(4, -1)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_without_a_cache_the_padded_rows_equal_their_prompts_alone():
    model = _model("sdpa")
    ids, mask = _batch()
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() passes them
        got = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        for r in range(ids.shape[0]):
            keep = mask[r].bool()
            want = model(ids[r][keep][None], use_cache=False).logits[0]
            torch.testing.assert_close(got[r][keep], want, atol=2e-5, rtol=1e-5)


def test_real_columns_and_slots():
    """The real columns from each kind of mask; slot ``j`` = the row's ``j``-th real column,
    written from the call or kept from before, placed at its column."""
    m2 = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 1, 1]])
    causal = torch.ones(5, 5).tril().bool()
    m4 = causal[None, None] & m2.bool()[:, None, None, :]  # (B, 1, T, S) as transformers
    add = torch.zeros(2, 1, 5, 5).masked_fill(~m4, torch.finfo(torch.float32).min)
    for mask in (m2, m4, add):
        assert real_columns(mask, 2, 5, 5).tolist() == m2.bool().tolist()
    assert real_columns(None, 2, 5, 3).tolist() == [[True] * 3 + [False] * 2] * 2
    with pytest.warns(UserWarning, match="cannot be read for padding; the sinks are the first"):
        assert real_columns(object(), 2, 5, 5).all()  # (flex attention's block mask)
    # 2 sinks; columns 0–2 cached before with slot 0 of row 1 written (its column 0)
    k = torch.zeros(2, 1, 5, 1)
    held = torch.full((2, 2, 1, 2, 1), -1.0)
    held[:, 1, :, 0] = 7.0
    ek = torch.arange(1.0, 3.0).view(1, 1, 2, 1).expand(2, 1, 2, 1) * 10  # columns 3, 4
    out, sinks, present = merge_sinks(k, None, ek, ek, held, 3, 2, m2.bool())
    # row 0: real columns 2, 3, 4 → slot 0 = column 2 (cached before: held), slot 1 = column 3
    assert sinks.col.tolist() == [[2, 3], [0, 2]] and sinks.has.all()
    assert present[0, 0, 0, :, 0].tolist() == [-1.0, 10.0]
    assert present[0, 1, 0, :, 0].tolist() == [7.0, -1.0]  # row 1: both slots from before
    assert out[0, 0, :, 0].tolist() == [0.0, 0.0, -1.0, 10.0, 0.0]
    assert out[1, 0, :, 0].tolist() == [7.0, 0.0, -1.0, 0.0, 0.0]


def test_beam_search_reorders_the_static_sinks():
    """Beams split while the 2-token row's last sink is still being written: the static
    layers reorder their sinks' exact K/V and slot positions with the beams (they did not:
    a beam read another beam's sink, a different token), as the dynamic layers do."""
    model = _model("sdpa")
    ids, mask = _batch()
    kw = dict(attention_mask=mask, num_beams=2, num_return_sequences=2, do_sample=False,
              max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        want = model.generate(ids, past_key_values=KVCache(FORMS), **kw)
        got = model.generate(ids, past_key_values=StaticKVCache(FORMS, ids.shape[1] + 6), **kw)
    assert got.sequences.tolist() == want.sequences.tolist()
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-5, rtol=0)
