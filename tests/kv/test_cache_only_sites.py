"""Cache-only attention sites: decoder blocks without separate q/k/v/o linears (Phi-3's fused
qkv_proj, Phi's dense, OPT's out_proj, GPT-2's Conv1D, GPT-NeoX's query_key_value and its
cache passed as layer_past) take the quantized caches, priced by
replaying the block through its own forward with the attention function simulating the cache;
the forms that rewrite the block (low-rank, MLA) are refused with the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicCache

import slimfx
from slimfx.forms.kv.calibrate import capture_attention_inputs
from slimfx.forms.kv.candidates import _errors
from slimfx.forms.kv.config import KVDenseConfig, KVQuantConfig
from slimfx.forms.kv.replay import BlockCall
from slimfx.ir.find import describe_cache_attention, inspect_attention_sites
from slimfx.planning.problem import Budget

pytestmark = pytest.mark.usefixtures("one_thread")

_SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
FORMS = [KVQuantConfig(4, 4, 16, 16, sink=2), KVQuantConfig(2, 2, 16, 16, residual=8)]


def _model(family: str):  # noqa: ANN202
    import transformers as tf

    torch.manual_seed(0)
    if family == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**_SMALL, pad_token_id=0)).eval()
    if family == "opt":
        cfg = tf.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                           num_attention_heads=4, word_embed_proj_dim=64)  # fmt: skip
        return tf.OPTForCausalLM(cfg).eval()
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)).eval()
    if family == "neox":
        cfg = tf.GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
        return tf.GPTNeoXForCausalLM(cfg).eval()
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_SMALL)).eval()
    raise ValueError(family)


def _calib(n=3, length=40):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (1, length), generator=g) for _ in range(n)]


def test_sites_of_blocks_without_llama_projections():
    import transformers as tf

    sites, rejected = inspect_attention_sites(_model("phi3"))
    assert not rejected and len(sites) == 2
    s = sites[1]
    assert (bool(s.cache_only), s.num_heads, s.num_kv_heads, s.head_dim, s.layer_idx) == (
        True, 4, 2, 16, 1,
    )  # fmt: skip
    assert s.projections == (("o", "model.layers.1.self_attn.o_proj"),)  # qkv_proj is fused
    gpt2 = inspect_attention_sites(_model("gpt2"))[0][0]
    assert gpt2.cache_only and gpt2.projection("o") == "transformer.h.0.attn.c_proj"
    assert not inspect_attention_sites(_model("llama"))[0][0].cache_only

    neox = inspect_attention_sites(_model("neox"))[0][0]  # the cache comes as layer_past
    assert (bool(neox.cache_only), neox.head_dim, neox.rope_dim) == (True, 16, 4)
    assert neox.projection("o") == "gpt_neox.layers.0.attention.dense"

    class NoCache(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer_idx, self.num_heads, self.head_dim, self.is_causal = 0, 2, 16, True

        def forward(self, hidden_states):
            return hidden_states

    assert "takes no past_key_values / layer_past" in describe_cache_attention(NoCache())
    bert = tf.BertModel(tf.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4))  # fmt: skip
    sites, rejected = inspect_attention_sites(bert)
    assert not sites and "not causal" in next(iter(rejected.values()))


def test_the_replayed_block_error_equals_the_block_simulation_on_llama():
    """The replay (the block's own forward, the attention function simulating the cache) gives
    the error block_forward gives a Llama block, where both apply."""
    model = _model("llama")
    site = inspect_attention_sites(model)[0][0]
    batches = _calib()
    inputs = capture_attention_inputs(model, [site], batches)[site.fqn]
    whole = dataclasses.replace(site, cache_only="replayed")
    calls = capture_attention_inputs(model, [whole], batches)[site.fqn]
    assert all(isinstance(c, BlockCall) for c in calls)
    forms = [KVDenseConfig(), *FORMS]
    want = _errors(model, site, inputs, forms, {})
    got = _errors(model, whole, calls, forms, {})
    assert want[0] == got[0] == 0.0 and min(want[1:]) > 1e-4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    assert model.config._attn_implementation == "sdpa"  # restored after the replay


@pytest.mark.parametrize("family", ["phi3", "opt", "gpt2", "neox"])
def test_a_kv_budget_compresses_their_caches_and_generates(family, tmp_path):
    model = _model(family)
    out = slimfx.optimize(
        model, Budget(memory=0.8, kv=0.4, context=512), calibration=_calib(4, 48),
        progress=False, kv_forms=["default", "mla", *FORMS],
    )  # fmt: skip
    rep = slimfx.report_of(out)
    assert [k.status for k in rep.kv_sites] == ["applied", "applied"]
    assert rep.totals["kv_ratio"] <= 0.4
    notes = " ".join(rep.notes)
    assert "no separate q_proj/k_proj/v_proj/o_proj linears" in notes  # low-rank, MLA refused
    # a graph attention node inside a found site is not "not a site" (GPT-2's Conv1D addmm
    # reaches no linear the graph tracer knows: it said so for sites that got a cache form)
    assert "graph attention node" not in notes
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=60, min_new_tokens=60, do_sample=False, attention_mask=mask)
    cache = DynamicCache()
    got = out.generate(ids, past_key_values=cache, **kw)  # in place (optimize installs it)
    assert all(type(la).__name__ == "QuantizedKVLayer" for la in cache.layers)
    assert sum(la.n_stored > 0 for la in cache.layers) == 2
    slimfx.save(out, tmp_path / "s")
    back = slimfx.load(tmp_path / "s")
    out.set_attn_implementation("sdpa")  # the plain path: store dequantized, sdpa
    plain = out.generate(ids, **kw)
    assert got.tolist() == plain.tolist()
    assert out.generate(ids, cache_implementation="static", **kw).tolist() == plain.tolist()
    assert back.generate(ids, **kw).tolist() == plain.tolist()


def test_a_block_that_does_not_attend_as_its_site_says_is_no_site():
    """The replay checks each cache-only site on a calibration call before pricing: keys of
    another shape than the site's (its cache bytes would be priced wrong too) or no call of the
    attention interface drop the site, with the reason; none left is an error."""
    import transformers as tf

    from slimfx.forms.kv.replay import check_replay

    model = _model("phi3")
    site = inspect_attention_sites(model)[0][0]
    calls = capture_attention_inputs(model, [site], _calib(2))[site.fqn]
    assert check_replay(model, site, calls[0]) is None
    wrong = dataclasses.replace(site, num_kv_heads=1)  # a config that misstates the kv heads
    assert "attends with 4 query and 2 key heads of 16 dims, not the 1 kv heads" in (
        check_replay(model, wrong, calls[0])
    )
    assert model.config._attn_implementation == "sdpa"

    class OwnAttention(nn.Module):  # attention computed in its own code
        def __init__(self) -> None:
            super().__init__()
            self.layer_idx, self.num_heads, self.head_dim = 0, 2, 16
            self.config = model.config
            self.o_proj = nn.Linear(32, 32)

        def forward(self, hidden_states, past_key_values=None, **kwargs):
            return self.o_proj(hidden_states), None

    own = OwnAttention()
    site = describe_cache_attention(own, "own")
    assert site.cache_only and site.num_heads == 2
    holder = nn.Module()
    holder.own = own
    holder.config = model.config
    holder.set_attn_implementation = model.set_attn_implementation
    why = check_replay(holder, site, BlockCall((torch.randn(1, 5, 32),), {}))
    assert "does not call transformers' attention interface" in why
    why = check_replay(holder, site, BlockCall((torch.randn(1, 5, 7),), {}))  # wrong width
    assert "its forward raised RuntimeError" in why
    assert model.config._attn_implementation == "sdpa"

    # DeepSeek-V3 (its own latent attention: keys of 24 dims where the config says 8) and
    # Falcon (attention in its own code) are no KV sites: optimize says why, nothing changes
    ds = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2)).eval()  # fmt: skip
    with pytest.raises(ValueError, match=r"no attention site: .*keys? heads of 24 dims, not the"):
        slimfx.optimize(ds, Budget(total_bytes=1e6, context=256), calibration=_calib(2),
                        progress=False)  # fmt: skip
    falcon = tf.FalconForCausalLM(tf.FalconConfig(vocab_size=256, hidden_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(ValueError, match="does not call transformers' attention interface"):
        slimfx.optimize(falcon.eval(), Budget(kv=0.5, context=256), calibration=_calib(2),
                        progress=False)  # fmt: skip


def test_encoder_decoder_and_encoder_blocks_are_no_kv_sites_and_lms_are_causal():
    import transformers as tf

    bart = tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=256, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64))  # fmt: skip
    sites, rejected = inspect_attention_sites(bart)
    assert not sites
    assert "EncoderDecoderCache" in rejected["model.decoder.layers.0.self_attn"]
    assert "not causal" in rejected["model.encoder.layers.0.self_attn"]
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=256, hidden_size=64, n_layer=1,
                                               n_head=4))  # fmt: skip
    sites, rejected = inspect_attention_sites(bloom)  # causal: a …ForCausalLM
    assert not rejected and sites[0].cache_only and sites[0].causal


def test_a_fused_qkv_block_exports_its_quantized_cache_to_onnxruntime(tmp_path):
    """Phi-3's step graph over its quantized caches (export_onnx_kv) runs in onnxruntime with
    torch's greedy tokens: nothing in the export needs separate projections."""
    pytest.importorskip("onnxruntime")
    from slimfx.backends.onnx_kv import export_onnx_kv
    from slimfx.backends.onnx_kv_decoder import OrtKVDecoder

    out = slimfx.optimize(
        _model("phi3"), Budget(kv=0.4, context=512), calibration=_calib(4, 48), progress=False,
        kv_forms=FORMS,
    )  # fmt: skip
    res = export_onnx_kv(out, tmp_path / "kv.onnx")
    assert [f.kind for f in res.forms] == ["kv_quant", "kv_quant"]
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    want = out.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert OrtKVDecoder(res.path).generate(ids, 30).tolist() == want.tolist()


def test_a_block_unlike_its_reimplementation_becomes_cache_only():
    """Cohere rotates interleaved pairs, which the Llama-style reimplementation (what prices
    the candidates and what a low-rank block computes) does not: the check at calibration
    measures the difference, and the site is priced by replaying the block and offered the
    quantized caches only — not rewritten into a block that computes something else."""
    import transformers as tf

    from slimfx.forms.kv.calibrate import simulation_mismatch

    torch.manual_seed(0)
    cohere = tf.CohereForCausalLM(tf.CohereConfig(**_SMALL)).eval()
    diff = simulation_mismatch(cohere, inspect_attention_sites(cohere)[0])
    assert len(diff) == 2 and min(diff.values()) > 1e-3
    llama = _model("llama")
    assert max(simulation_mismatch(llama, inspect_attention_sites(llama)[0]).values()) < 1e-6

    out = slimfx.optimize(cohere, Budget(kv=0.4, context=512), calibration=_calib(4, 48),
                          progress=False, kv_forms=["default", "mla"])  # fmt: skip
    rep = slimfx.report_of(out)
    assert {k.decision.get("kind") for k in rep.kv_sites} == {"kv_quant"}
    notes = " ".join(rep.notes)
    assert "2 attention site(s) (e.g. model.layers.0.self_attn) compute their attention" in notes
    assert "CohereAttention's output differs from the Llama-style block" in notes
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False)
    got = out.generate(ids, **kw)
    out.set_attn_implementation("sdpa")
    assert out.generate(ids, **kw).tolist() == got.tolist()


def test_padded_calibration_leaves_llama_blocks_rewritable(tiny_llama):
    """The reimplementation check runs on its own unpadded probe: a padded first calibration
    batch (whose masked rows block_forward does not model) no longer makes every Llama block
    cache-only."""
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 256, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    calib = [{"input_ids": ids, "attention_mask": mask}, *_calib(2, 40)]
    out = slimfx.optimize(tiny_llama, Budget(kv=0.3, context=256), calibration=calib,
                          progress=False)  # fmt: skip
    notes = " ".join(slimfx.report_of(out).notes)
    assert "compute their attention otherwise" not in notes
    assert any(k.owns for k in slimfx.report_of(out).kv_sites)  # a low-rank form was possible


def test_switching_the_attention_function_restores_each_sub_models_own():
    """A multimodal model whose text and vision parts run different attention functions gets
    each back after a replay (or an export) switched them (it came back all 'eager')."""
    import transformers as tf

    from slimfx.forms.kv.replay import SIMULATED_ATTENTION, simulating

    text = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=4,
                rope_scaling={"type": "mrope", "mrope_section": [16, 8, 8]})  # fmt: skip
    cfg = tf.Qwen2VLConfig(text_config=text,
                           vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=256))
    model = tf.Qwen2VLForConditionalGeneration(cfg).eval()
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa", "": "eager"})

    def impls():
        c = model.config
        return c.text_config._attn_implementation, c.vision_config._attn_implementation

    with simulating(model):
        assert impls() == (SIMULATED_ATTENTION, SIMULATED_ATTENTION)
    assert impls() == ("eager", "sdpa")
