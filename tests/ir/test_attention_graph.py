"""Attention sites from the captured graph: SDPA nodes traced to their q/k/v/o linear sites,
equal to the module-level sites on Hugging Face models, found in a plain PyTorch block with
other names and GQA, and refused (with the reason) where a projection is not a linear site."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimfx.ir.attention_graph import find_graph_attention_sites
from slimfx.ir.capture import capture
from slimfx.ir.find import find_linear_sites, inspect_attention_sites


def _sites(model, *args, **kwargs):
    captured = capture(model, args, kwargs, fallback=False)
    return find_graph_attention_sites(captured, model, find_linear_sites(captured, model))


def test_hf_llama_graph_sites_equal_the_module_sites(tiny_llama_captured):
    model, ids, captured = tiny_llama_captured
    sites, rejected = find_graph_attention_sites(
        captured, model, find_linear_sites(captured, model)
    )
    assert not rejected and sites == inspect_attention_sites(model)[0]


class _Block(nn.Module):
    """A plain GQA attention block: 4 query heads, 2 kv heads of 8 dims, names of its own."""

    def __init__(self, gate_k: bool = False) -> None:
        super().__init__()
        self.wq, self.wk, self.wv = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)
        self.wo = nn.Linear(32, 32)
        self.gate_k = gate_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, 4, 8).transpose(1, 2)
        k = self.wk(x).view(B, T, 2, 8).transpose(1, 2)
        if self.gate_k:  # keys that also depend on the queries' projection: not one site each
            k = k + self.wq(x).view(B, T, 4, 8).transpose(1, 2)[:, :2]
        v = self.wv(x).view(B, T, 2, 8).transpose(1, 2)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, 32))


class _Net(nn.Module):
    def __init__(self, gate_k: bool = False) -> None:
        super().__init__()
        self.attn = _Block(gate_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def test_a_plain_gqa_block_with_its_own_names_is_found():
    sites, rejected = _sites(_Net(), torch.randn(1, 5, 32))
    assert not rejected and len(sites) == 1
    s = sites[0]
    assert dict(s.projections) == {"q": "attn.wq", "k": "attn.wk", "v": "attn.wv", "o": "attn.wo"}
    assert (s.fqn, s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size) == ("attn", 4, 2, 8, 32)
    assert s.causal and s.rope_dim == 0 and s.module_type == "_Block"


def test_keys_from_two_projections_are_refused_with_the_reason():
    sites, rejected = _sites(_Net(gate_k=True), torch.randn(1, 5, 32))
    assert sites == [] and len(rejected) == 1
    assert "k reaches ['attn.wk', 'attn.wq']" in next(iter(rejected.values()))


@pytest.mark.parametrize("family", ["qwen3"])
def test_qk_norm_blocks_trace_through_the_norm(family):
    import transformers as tf

    cfg = tf.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    model = tf.Qwen3ForCausalLM(cfg).eval()
    sites, rejected = _sites(model, input_ids=torch.randint(0, 64, (1, 6)), use_cache=False)
    assert not rejected and sites == inspect_attention_sites(model)[0]
    assert sites[0].qk_norm is not None


def test_a_kv_budget_names_graph_attention_outside_hf_modules():
    import slimfx
    from slimfx.planning.problem import Budget

    with pytest.raises(ValueError, match=r"the graph has attention at attn, but KV forms run in"):
        slimfx.optimize(
            _Net(), Budget(kv=0.5), calibration=[torch.randn(1, 5, 32)], progress=False
        )
