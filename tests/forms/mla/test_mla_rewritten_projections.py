"""MLA over a block whose q_proj / o_proj a weights budget already rewrote (int4, low-rank):
the conversion takes them as they are — it calls them and fits on their dense equivalent — so
``Budget(memory=…, kv=…)`` may give one block both a linear form on q/o and MLA on k/v."""

from __future__ import annotations

import pytest
import torch

import slimfx
from forms.mla._tiny import calib_batches, eval_ids, qwen2_with_biases, tiny_gqa_llama
from slimfx.forms.kv.config import KVDenseConfig
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import convert_model, describe_block
from slimfx.forms.mla.module import MLAAttention
from slimfx.ir.modules import SlimLinear, module_for
from slimfx.numerics import factorize
from slimfx.planning.configs import LowRankConfig, QuantConfig
from slimfx.planning.problem import Budget

ATOL = 1e-5  # as the full-rank test of test_mla_convert (fp32, factors fitted in float64)
D_HEAD = 16


def _rewrite(lin: torch.nn.Linear, decision) -> SlimLinear:
    t = factorize(lin.weight.detach(), decision)
    mod = module_for(decision).empty(decision, lin.in_features, lin.out_features,
                                     lin.bias is not None)
    return mod.load_factors(t, lin.bias)


def _with_rewritten_q_o(kv_heads: int, model=None):
    """A tiny model whose every block has an int4 q_proj and a low-rank o_proj (``model``:
    that model, else a Llama with ``kv_heads``)."""
    model = tiny_gqa_llama(kv_heads) if model is None else model
    for blk in model.model.layers:
        attn = blk.self_attn
        attn.q_proj = _rewrite(attn.q_proj, QuantConfig(4, 16, False))
        attn.o_proj = _rewrite(attn.o_proj, LowRankConfig(rank=24))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("kv_heads", [1, 2, "qwen2-biases"])
def test_full_rank_conversion_of_a_block_with_rewritten_q_o_equals_that_block(kv_heads):
    """Llama with 1 or 2 kv heads, and Qwen2 with large q/k/v biases (3 kv heads; the int4
    q_proj keeps its bias)."""
    base = None
    if kv_heads == "qwen2-biases":
        base, kv_heads = qwen2_with_biases(), 3
    model = _with_rewritten_q_o(kv_heads, base)
    dense = qwen2_with_biases() if base is not None else tiny_gqa_llama(kv_heads)
    ids = eval_ids()
    ref = _logits(model, ids)
    q_o = [(b.self_attn.q_proj, b.self_attn.o_proj) for b in model.model.layers]
    cfg = MLAConfig(rank=kv_heads * D_HEAD, rope_pairs=D_HEAD // 2, method="whitened",
                    rope_select="norm")
    res = convert_model(model, cfg, calib_batches())
    assert res.converted == [0, 1] and not res.rejected
    for blk, (q, o) in zip(model.model.layers, q_o):
        assert isinstance(blk.self_attn, MLAAttention)
        assert blk.self_attn.q_proj is q and blk.self_attn.o_proj is o  # kept, not densified
    torch.testing.assert_close(_logits(model, ids), ref, atol=ATOL, rtol=0)
    # the rewritten projections really differ from the dense ones (the test can fail)
    assert (ref - _logits(dense, ids)).abs().max() > 1e-3


def test_absorbed_equals_unabsorbed_and_folding_with_a_low_rank_o_proj():
    model = _with_rewritten_q_o(2)
    convert_model(model, MLAConfig(rank=10, rope_pairs=2), calib_batches())
    ids = eval_ids()
    attn = model.model.layers[0].self_attn
    for blk in model.model.layers:
        blk.self_attn.absorb = "never"
    unabsorbed = _logits(model, ids)
    for blk in model.model.layers:
        blk.self_attn.absorb = "always"
    torch.testing.assert_close(_logits(model, ids), unabsorbed, atol=ATOL, rtol=0)
    ctx = torch.randn(2, 6, 3, 10)
    w_o_lat, bias = attn.absorbed_weights()  # through the low-rank o_proj's U·V
    with torch.no_grad():
        folded = torch.einsum("bhtr,hdr->btd", ctx, w_o_lat) + bias
        torch.testing.assert_close(attn._latent_to_output(ctx), folded, atol=1e-5, rtol=0)


def test_a_rewritten_k_or_v_proj_is_refused_by_name():
    model = _with_rewritten_q_o(2)
    attn = model.model.layers[0].self_attn
    assert not isinstance(describe_block(attn, model.config, 0), str)  # q/o rewritten: a site
    attn.k_proj = _rewrite(attn.k_proj, QuantConfig(4, 16, False))
    why = describe_block(attn, model.config, 0)
    assert isinstance(why, str) and "no nn.Linear k_proj " in why and "q_proj" not in why
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 0: .*no nn.Linear k_proj"):
        convert_model(model, MLAConfig(rank=8, rope_pairs=2), calib_batches())
    assert not any(isinstance(b.self_attn, MLAAttention) for b in model.model.layers)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_weights_and_kv_budget_with_mla_rewrites_q_o_and_converts_k_v(tmp_path):
    """Budget(memory=…, kv=…) with MLA offered: the plan's q/o linear forms and the block's MLA
    conversion both apply (the conversion used to refuse the rewritten q/o at the end of
    optimize), the model generates, saves and loads with the same logits and tokens."""
    from slimfx.models import tiny_llama

    calib = [b[:, :48] for b in calib_batches(4, 48, seed=7)]
    out = slimfx.optimize(tiny_llama(), Budget(memory=0.5, kv=0.6), calibration=calib,
                          kv_forms=[KVDenseConfig(), "mla"], progress=False)  # fmt: skip
    layers = out.model.layers
    assert any(isinstance(b.self_attn, MLAAttention) for b in layers), "no block took MLA"
    rewritten = [
        f"model.layers.{i}.self_attn.{p}"
        for i, b in enumerate(layers) if isinstance(b.self_attn, MLAAttention)
        for p in ("q_proj", "o_proj") if isinstance(getattr(b.self_attn, p), SlimLinear)
    ]  # fmt: skip
    assert rewritten, "the memory budget should rewrite an MLA block's q_proj or o_proj"
    chosen = {s.fqn: s.chosen for s in slimfx.report_of(out).sites}
    assert all(chosen[f] != "dense" for f in rewritten)
    ids = eval_ids()[:1, :9]
    want = out.generate(ids, max_new_tokens=8, do_sample=False)
    slimfx.save(out, tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    torch.testing.assert_close(_logits(back, ids), _logits(out, ids), atol=0, rtol=0)
    assert back.generate(ids, max_new_tokens=8, do_sample=False).tolist() == want.tolist()


def test_mla_export_carries_the_accuracy_level_of_the_quantized_q_o(tmp_path):
    """``export_mla_onnx(..., accuracy_level=4)``: the MatMulNBits an int4 q_proj inside an MLA
    block becomes takes ONNX Runtime's int8-activation compute; the step still follows torch
    (logits within what int8 activations cost). (The default level is checked against torch's
    tokens through ``optimize`` in ``tests/kv/test_kv_budget_export.py``.)"""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from slimfx.backends.onnx_mla import export_mla_onnx, latent_ort_session

    torch.set_num_threads(1)
    model = _with_rewritten_q_o(2, tiny_gqa_llama(2, num_hidden_layers=1))
    convert_model(model, MLAConfig(rank=10, rope_pairs=2), calib_batches())
    ids = eval_ids()[:1, :9]
    res = export_mla_onnx(model, tmp_path / "m.onnx", ids, accuracy_level=4)
    nbits = [n for n in onnx.load(str(res.path)).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1  # the int4 q_proj (o_proj is low-rank: two MatMul)
    assert [a.i for a in nbits[0].attribute if a.name == "accuracy_level"] == [4]
    logits, _ = latent_ort_session(res.path, threads=1).step(ids)
    ref = _logits(model, ids)
    err = (torch.as_tensor(logits) - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05  # int8 activations: close, not equal
