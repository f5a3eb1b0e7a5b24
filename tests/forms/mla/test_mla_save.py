"""Save / load of a converted tiny Llama: same logits, same greedy tokens, checked files."""

from __future__ import annotations

import json

import pytest
import torch

from forms.mla._tiny import calib_batches, eval_ids, tiny_gqa_llama
from slimfx.forms.mla.cache import MLALatentCache
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import convert_model
from slimfx.forms.mla.module import MLAAttention
from slimfx.forms.mla.save import load_converted, save_converted

pytest.importorskip("safetensors")


def _converted(kv_heads=2, **kw):
    model = tiny_gqa_llama(kv_heads, attention_bias=kw.pop("attention_bias", False))
    cfg = MLAConfig(**{**dict(rank=12, rope_pairs=2, method="pca"), **kw})
    convert_model(model, cfg, calib_batches())
    return model, cfg


def _generate(model, cache=None):
    prompt = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              past_key_values=cache)


@pytest.mark.parametrize("kw", [{}, {"latent_bits": 8, "attention_bias": True}])
def test_saved_model_loads_with_equal_logits_and_tokens(tmp_path, kw):
    model, cfg = _converted(**kw)
    ids = eval_ids()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    ref_tokens = _generate(model, MLALatentCache(2, latent_bits=cfg.latent_bits))
    save_converted(model, tmp_path / "m")
    loaded = load_converted(tmp_path / "m")
    assert all(isinstance(b.self_attn, MLAAttention) for b in loaded.model.layers)
    assert loaded.model.layers[0].self_attn.mla_config == cfg
    with torch.no_grad():
        got = loaded(ids, use_cache=False).logits
    # the same fp32 tensors in the same modules: bit-identical
    assert torch.equal(got, ref)
    out = _generate(loaded, MLALatentCache(2, latent_bits=cfg.latent_bits))
    assert torch.equal(out, ref_tokens)


def test_only_given_layers_converted_round_trip(tmp_path):
    model = tiny_gqa_llama(3)
    convert_model(model, {1: MLAConfig(rank=10, rope_pairs=1)}, calib_batches())
    save_converted(model, tmp_path / "m")
    info = json.loads((tmp_path / "m" / "mla.json").read_text())
    assert list(info["layers"]) == ["1"] and info["layers"]["1"]["rank"] == 10
    loaded = load_converted(tmp_path / "m")
    assert not isinstance(loaded.model.layers[0].self_attn, MLAAttention)
    assert torch.equal(_generate(loaded), _generate(model))


def test_bf16_model_loads_in_bf16(tmp_path):
    model, _ = _converted()
    model = model.to(torch.bfloat16)
    save_converted(model, tmp_path / "m")
    loaded = load_converted(tmp_path / "m")
    assert loaded.model.layers[0].self_attn.kv_down.weight.dtype == torch.bfloat16
    ref_sd, got_sd = model.state_dict(), loaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    # ``.to(bfloat16)`` also cast the rotary ``inv_freq`` buffer (not saved: non-persistent);
    # the model built from config in bf16 keeps it fp32 as transformers does. Same buffer on
    # both sides, then the logits are bit-identical.
    model.model.rotary_emb.inv_freq = loaded.model.rotary_emb.inv_freq.clone()
    ids = eval_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_refuses_unconverted_model_and_foreign_directory(tmp_path):
    with pytest.raises(ValueError, match="no MLAAttention"):
        save_converted(tiny_gqa_llama(2), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    model, _ = _converted()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not an earlier MLA save \(notes\.txt\)") as e:
        save_converted(model, tmp_path / "b")
    assert "CLI" not in str(e.value)  # save_converted has no command line
    assert (tmp_path / "b" / "notes.txt").read_text() == "keep me"


def test_resave_replaces_and_corruption_is_detected(tmp_path):
    model, _ = _converted()
    d = save_converted(model, tmp_path / "m")
    save_converted(model, d)  # an earlier MLA save is replaced without overwrite=True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left
    blob = d / "slimfx.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        load_converted(d)


def test_load_into_converted_skeleton_is_refused(tmp_path):
    model, _ = _converted()
    save_converted(model, tmp_path / "m")
    with pytest.raises(ValueError, match="already converted"):
        load_converted(tmp_path / "m", model=model)


def test_a_state_dict_with_q_mix_per_query_head_loads_into_the_per_group_block(tmp_path):
    """Saves made before q_mix was stored once per kv group hold one map per query head: they
    load (each group's map taken once) and compute the same logits; a state dict whose heads of
    a group differ is refused by the strict load."""
    model, cfg = _converted(kv_heads=2)
    ids = eval_ids()
    with torch.no_grad():
        ref = model(ids).logits
    old = {k: v.clone() for k, v in model.state_dict().items()}
    for i, blk in enumerate(model.model.layers):
        assert blk.self_attn.q_mix.shape[0] == 2  # per kv group now
        old[f"model.layers.{i}.self_attn.q_mix"] = blk.self_attn.query_mix().clone()  # 6 maps
    fresh, _ = _converted(kv_heads=2)
    fresh.load_state_dict(old, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ref, atol=0, rtol=0)
    old["model.layers.0.self_attn.q_mix"][1] += 1.0  # head 1 differs from head 0 of its group
    with pytest.raises(RuntimeError, match="size mismatch for model.layers.0.self_attn.q_mix"):
        fresh.load_state_dict(old, strict=True)


def test_from_pretrained_refuses_an_mla_save_and_version_1_saves_still_load(tmp_path):
    """The weights are not ``model.safetensors``: ``from_pretrained`` built the dense model
    with the converted attention's weights missing; now it fails. A version-1 save still
    loads."""
    from transformers import AutoModelForCausalLM

    model, _ = _converted()
    d = save_converted(model, tmp_path / "m")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(d)
    (d / "slimfx.safetensors").rename(d / "model.safetensors")
    info = json.loads((d / "mla.json").read_text())
    info["files"]["model.safetensors"] = info["files"].pop("slimfx.safetensors")
    (d / "mla.json").write_text(json.dumps({**info, "version": 1}))
    ids = eval_ids()
    with torch.no_grad():
        assert torch.equal(load_converted(d)(ids, use_cache=False).logits,
                           model(ids, use_cache=False).logits)
