"""MLA candidates for the budget solver: per rank the config, the block-output error on the
calibration inputs and the costs; refusals with reasons; applying chosen decisions."""

from __future__ import annotations

import pytest
import torch

from forms.mla._tiny import calib_batches, tiny_gqa_llama
from slimfx.forms.kv.calibrate import attention_grams, capture_attention_inputs
from slimfx.forms.kv.config import KVDenseConfig
from slimfx.forms.kv.simulate import block_forward
from slimfx.forms.mla.candidates import MLAContext, apply_mla, mla_candidates
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import convert_model
from slimfx.forms.mla.module import MLAAttention
from slimfx.ir.find import describe_attention
from slimfx.planning.shapes import KV_BYTES_PER_TOKEN, WEIGHT_BYTES

pytestmark = pytest.mark.usefixtures("one_thread")
D_HEAD = 16


def _sites(model):
    return [describe_attention(b.self_attn, f"model.layers.{i}.self_attn", model.config, i)
            for i, b in enumerate(model.model.layers)]


def _calib(model, sites, n=4):
    batches = calib_batches(n=n)
    return batches, capture_attention_inputs(model, sites, batches), attention_grams(
        model, sites, batches)


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_errors_decrease_with_rank_and_costs_are_the_configs(kv_heads):
    model = tiny_gqa_llama(kv_heads)
    sites = _sites(model)
    _, inputs, grams = _calib(model, sites)
    site = sites[1]
    ctx = MLAContext(base=MLAConfig(rope_pairs=2), latent_bits=(16,))
    cands = mla_candidates(model, site, inputs[site.fqn], grams[site.fqn],
                           rank_fractions=(0.25, 0.5, 0.75, 1.0), context=ctx)
    full = MLAConfig(rope_pairs=2).full_rank(site.site_shape)  # K·(d − 4) + K·d
    assert full == kv_heads * (D_HEAD - 4 + D_HEAD)
    assert [c.rank for c, _, _ in cands] == [round(f * full) for f in (0.25, 0.5, 0.75, 1.0)]
    errors = [e for _, e, _ in cands]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-3  # a quarter of the latent really loses something
    # at full rank only the 6 dropped RoPE pairs per kv head remain: small but not zero
    assert 0 < errors[-1] < errors[0]
    for cfg, _, costs in cands:
        want = cfg.costs(site.site_shape)
        assert costs == {WEIGHT_BYTES: float(want[WEIGHT_BYTES]),
                         KV_BYTES_PER_TOKEN: float(want[KV_BYTES_PER_TOKEN])}
    kv = [costs[KV_BYTES_PER_TOKEN] for _, _, costs in cands]
    assert kv == sorted(kv) and len(set(kv)) == len(kv)


def test_full_rank_with_every_rope_pair_kept_has_zero_error():
    model = tiny_gqa_llama(2)
    sites = _sites(model)
    _, inputs, grams = _calib(model, sites)
    site = sites[0]
    ctx = MLAContext(base=MLAConfig(rope_pairs=D_HEAD // 2, rope_select="norm"),
                     latent_bits=(16,))
    [(cfg, err, _)] = mla_candidates(model, site, inputs[site.fqn], grams[site.fqn],
                                     rank_fractions=(1.0,), context=ctx)
    assert cfg.rank == 2 * D_HEAD
    # fp32 block outputs, factors fitted in float64: the relative squared error is rounding
    # only (measured 1.2e-13); 1e-10 is far below any real truncation (≥ 1e-3 above)
    assert err < 1e-10, err


def test_candidate_error_is_the_error_of_the_converted_block():
    """The error of a candidate equals the one of the block convert_model installs with that
    config on the same calibration batches (same definition as kv attention_error)."""
    model = tiny_gqa_llama(2)
    sites = _sites(model)
    batches, inputs, grams = _calib(model, sites)
    site = sites[1]
    cands = mla_candidates(model, site, inputs[site.fqn], grams[site.fqn],
                           rank_fractions=(0.5,), context=MLAContext(MLAConfig(rope_pairs=3)))
    assert [c.latent_bits for c, _, _ in cands] == [16, 8]  # both by default
    assert cands[1][1] > cands[0][1]  # the int8 latent adds its rounding
    cfg, err, _ = cands[1]
    orig = model.model.layers[1].self_attn
    refs = [block_forward(orig, h, c, s, KVDenseConfig()) for h, c, s in inputs[site.fqn]]
    convert_model(model, {1: cfg}, batches)
    conv = model.model.layers[1].self_attn
    num = den = 0.0
    with torch.no_grad():
        for (h, c, s), y in zip(inputs[site.fqn], refs):
            yc = conv(h, position_embeddings=(c, s))[0]
            num += float((yc - y).square().sum())
            den += float(y.square().sum())
    assert err == pytest.approx(num / den, rel=1e-4)


def test_refused_sites_and_variants_give_reasons():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=128, num_hidden_layers=1, vocab_size=256,
                      use_sliding_window=True, sliding_window=8, max_window_layers=0)
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(cfg).eval()
    [site] = _sites(qwen)
    _, inputs, _ = _calib(qwen, [site], n=1)
    with pytest.raises(ValueError, match="MLA refuses this site: sliding-window attention"):
        mla_candidates(qwen, site, inputs[site.fqn])

    model = tiny_gqa_llama(2)
    sites = _sites(model)
    _, inputs, _ = _calib(model, sites, n=1)
    with pytest.raises(ValueError, match="rope_pairs=9 refused: rope_pairs=9 exceeds head_dim/2"):
        mla_candidates(model, sites[0], inputs[sites[0].fqn],
                       context=MLAContext(rope_pairs=(2, 9)))
    with pytest.raises(ValueError, match="no calibration inputs"):
        mla_candidates(model, sites[0], [])
    model.model.layers[0].self_attn.k_norm = torch.nn.Identity()  # a Qwen3-style q/k norm
    with pytest.raises(ValueError, match="MLA refuses this site: unsupported attention variant"):
        mla_candidates(model, sites[0], inputs[sites[0].fqn])


def test_apply_mla_checks_all_then_converts():
    model = tiny_gqa_llama(2)
    sites = _sites(model)
    batches = calib_batches(n=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {sites[0].fqn: MLAConfig(rank=8, rope_pairs=2),
           sites[1].fqn: MLAConfig(rank=999, rope_pairs=2),
           "model.layers.7.self_attn": MLAConfig(rank=8)}
    with pytest.raises(ValueError) as e:
        apply_mla(model, sites, bad, batches)
    msg = str(e.value)
    assert "exceeds the full latent rank 56" in msg and "not one of the given" in msg
    assert not any(isinstance(b.self_attn, MLAAttention) for b in model.model.layers)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    done = apply_mla(model, sites, {sites[1].fqn: MLAConfig(rank=8, rope_pairs=2)}, batches)
    assert done == [sites[1].fqn]
    assert isinstance(model.model.layers[1].self_attn, MLAAttention)
    assert not isinstance(model.model.layers[0].self_attn, MLAAttention)
    assert model.model.layers[1].self_attn.rank == 8


def test_fit_inputs_give_the_block_convert_model_fits():
    """With ``fit_inputs`` = the block's inputs over every calibration batch, the candidate
    handed to ``measure`` is the block ``convert_model`` builds from those batches (what
    ``apply_mla`` applies), although the errors are measured on fewer inputs."""
    from slimfx.forms.mla.convert import capture_attention_inputs as capture_all

    model = tiny_gqa_llama(3)
    sites = _sites(model)
    batches, inputs, grams = _calib(model, sites, n=5)
    site = sites[1]
    x_all = capture_all(model, batches, [1])[1]
    cfg = MLAConfig(rank=30, rope_pairs=2)
    ctx = MLAContext(base=cfg, latent_bits=(16,))
    full = cfg.full_rank(site.site_shape)
    blocks = []
    mla_candidates(model, site, inputs[site.fqn][:2], grams[site.fqn], (30 / full,), ctx,
                   measure=lambda c, m: blocks.append(m.state_dict()), fit_inputs=x_all)
    convert_model(model, {1: cfg}, batches)
    want = model.model.layers[1].self_attn.state_dict()
    assert blocks and blocks[0].keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(blocks[0][k], v, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="fit_inputs is"):
        mla_candidates(model, sites[0], inputs[sites[0].fqn], fit_inputs=x_all[:, :5])
