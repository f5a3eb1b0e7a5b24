"""The low-rank attention's absorbed decode (value latent contracted with the attention weights,
then each head's rows of v_up) equals rebuilding V: Qwen2 (k/v biases), 2 latent groups, sink
tokens, a left-padded batch, eager and sdpa attention."""

from __future__ import annotations

import pytest
import torch
from _helpers import lowrank_decode, lowrank_qwen2

from slimfx.forms.kv.cache import KVCache
from slimfx.forms.kv.config import KVLatentQuantConfig, KVLowRankConfig
from slimfx.forms.kv.lowrank import LowRankKVAttention

pytestmark = pytest.mark.usefixtures("one_thread")

FORMS = [
    KVLatentQuantConfig(16, 24, 2, "whitened", 4, 4, 2, sink=2, axis="channel"),
    KVLowRankConfig(16, 24, 2, "attention", sink=3),
]


def _model(attn: str):
    model = lowrank_qwen2(attn, FORMS)
    return model


@pytest.mark.parametrize(("attn", "static"), [("eager", False), ("sdpa", False), ("sdpa", True)])
def test_absorbed_decode_equals_rebuilding_v(attn, static):
    """Also on the branch-free static layers, whose absorbed step corrects the sinks' rows by
    their exact values (no shape-dependent slice: the ONNX export's path)."""
    model = _model(attn)
    assert not model.model.layers[0].self_attn.training  # the rewrite keeps eval mode
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second row left-padded by 3
    calls = []
    orig = LowRankKVAttention._absorbed

    def spy(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        return orig(self, *a, **k)

    LowRankKVAttention._absorbed = spy
    try:
        got = lowrank_decode(model, ids, mask, FORMS, absorb=True, static=static)
        n_absorbed = len(calls)
        want = lowrank_decode(model, ids, mask, FORMS, absorb=False, static=static)
    finally:
        LowRankKVAttention._absorbed = orig
    assert n_absorbed == 12 * 2 and len(calls) == n_absorbed  # every decode call, both layers
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_a_2d_padding_mask_takes_the_rebuilding_path():
    """Attention implementations that take a 2-D padding mask (flash attention's) are not
    absorbed: the one-token step rebuilds V and hands the mask to the implementation, and
    gives what the 4-D mask gives."""
    from transformers.modeling_utils import AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def two_d(module, q, k, v, mask, **kw):  # noqa: ANN001, ANN003, ANN202
        assert mask.dim() == 2  # (B, S) ones / zeros
        add = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(mask == 0, float("-inf"))
        return eager_attention_forward(module, q, k, v, add[:, None, None, :], **kw)

    AttentionInterface.register("slimfx_test_2d", two_d)
    model = _model("eager")
    attn = model.model.layers[0].self_attn
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    outs = []
    for impl in ("eager", "slimfx_test_2d"):
        cache = KVCache(FORMS)
        pos = (mask[:, :9].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            model(ids, attention_mask=mask[:, :9], position_ids=pos, past_key_values=cache)
            h = torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(2))
            p = pos[:, -1:] + 1
            rope = model.model.rotary_emb(h, p)
            four_d = torch.zeros(2, 1, 1, 10).masked_fill(mask[:, None, None, :] == 0, -torch.inf)
            model.config._attn_implementation = impl
            try:
                m = four_d if impl == "eager" else mask
                outs.append(attn(h, rope, m, past_key_values=cache, position_ids=p)[0])
            finally:
                model.config._attn_implementation = "eager"
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-5)
