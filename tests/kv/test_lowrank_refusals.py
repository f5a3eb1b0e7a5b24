"""The direct low-rank API refuses the blocks the planner refuses, model unchanged: a block whose
rewritten form would compute another attention (q/k norms — HunYuan's ``key_layernorm`` among
them —, interleaved RoPE found on a probe call) or that has no plain k/v projections (fused
qkv). Before, ``apply_lowrank_kv`` rewrote Qwen3 / Cohere / HunYuan blocks into other models
(up to 0.29 off at full rank) and ``fit_site`` failed on Phi-3 with ``KeyError: None``. Also the
site facts those refusals read: Gemma 3's per-layer-type RoPE parameters."""

from __future__ import annotations

import pytest
import torch

from slimfx.forms.kv.calibrate import attention_grams, fit_site
from slimfx.forms.kv.config import KVLowRankConfig
from slimfx.forms.kv.lowrank import apply_lowrank_kv
from slimfx.ir.find import inspect_attention_sites

pytestmark = pytest.mark.usefixtures("one_thread")

_SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)  # fmt: skip
FORM = KVLowRankConfig(8, 16, 2, "attention", sink=2)


def _model(family: str, model: str = "", **kw):
    import transformers as tf

    torch.manual_seed(0)
    cfg = getattr(tf, f"{family}Config")(**_SMALL, **kw)
    return getattr(tf, model or f"{family}ForCausalLM")(cfg).eval()


@pytest.mark.parametrize(
    ("family", "kw", "match"),
    [
        ("Qwen3", {"head_dim": 16}, r"normalizes its queries/keys per head \(k_norm\)"),
        ("HunYuanDenseV1", {"head_dim": 16}, r"per head \(key_layernorm\)"),
        ("Cohere", {}, r"differs from the Llama-style attention a low-rank cache rebuilds by"),
    ],
)
def test_blocks_the_rewrite_would_change_are_refused_and_the_model_kept(family, kw, match):
    model = _model(family, **kw)
    sites, _ = inspect_attention_sites(model)
    calib = [torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))]
    grams = attention_grams(model, sites, calib)
    factors = {s.fqn: fit_site(model, s, grams[s.fqn], FORM) for s in sites}
    before = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        apply_lowrank_kv(model, sites, {s.fqn: FORM for s in sites}, factors)
    assert [type(m) for m in model.modules()] == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_fused_qkv_block_is_refused_by_name_when_fitted():
    model = _model("Phi3", pad_token_id=0)
    sites, _ = inspect_attention_sites(model)
    assert sites[0].cache_only
    with pytest.raises(ValueError, match="only quantized caches, which keep the block's own"):
        fit_site(model, sites[0], torch.eye(64, dtype=torch.float64), FORM)
    with pytest.raises(ValueError, match="only quantized caches"):
        apply_lowrank_kv(model, sites, {sites[0].fqn: FORM}, {sites[0].fqn: {}})


def test_site_facts_of_per_layer_type_rope_and_renamed_qk_norms():
    gemma3 = _model("Gemma3Text", "Gemma3ForCausalLM", head_dim=16,
                    layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    sites, _ = inspect_attention_sites(gemma3)
    assert [s.rope_dim for s in sites] == [16, 16]  # was 0: read as a model without RoPE
    assert [s.qk_norm for s in sites] == ["k_norm", "k_norm"]  # the keys' norm named first
    hunyuan = _model("HunYuanDenseV1", head_dim=16)
    assert inspect_attention_sites(hunyuan)[0][0].qk_norm == "key_layernorm"


def test_the_probe_runs_at_full_float32_precision(tiny_llama):
    """Reduced-precision float32 matmuls (TF32 on a GPU, bf16 inner products on an AMX CPU)
    moved a Llama block's probe by ~3e-3 and refused it as another attention; the probe runs
    at "highest" and the caller's setting is restored."""
    sites, _ = inspect_attention_sites(tiny_llama)
    calib = [torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))]
    grams = attention_grams(tiny_llama, sites, calib)
    factors = {s.fqn: fit_site(tiny_llama, s, grams[s.fqn], FORM) for s in sites}
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        done = apply_lowrank_kv(tiny_llama, sites, {s.fqn: FORM for s in sites}, factors)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert done == [s.fqn for s in sites]
