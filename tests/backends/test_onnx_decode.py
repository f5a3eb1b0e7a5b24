"""The decode-step export (``export_onnx(..., kv_cache=True)``) and its ONNX Runtime session.

A tiny Llama rewritten by a hand-written Plan (low-rank, int4, int8, 2:4) is exported once as
``ids + KV cache → logits + KV cache`` and checked for: graph inputs/outputs and their dynamic
axes; the slimfx op translations (same MatMulNBits count as the plain export); prefill logits,
one decode step after a torch-computed cache, and greedy generation against the torch model.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from _helpers import left_padded
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")

from slimfx.api import find_sites  # noqa: E402
from slimfx.backends.onnx import OnnxExportError, export_onnx  # noqa: E402
from slimfx.backends.ort import ort_session  # noqa: E402
from slimfx.passes.swap import apply_plan  # noqa: E402
from slimfx.planning.configs import LowRankConfig, QuantConfig, Sparse24Config  # noqa: E402
from slimfx.planning.plan import Plan  # noqa: E402

L0, L1 = "model.layers.0", "model.layers.1"
PLAN = {
    f"{L0}.self_attn.q_proj": LowRankConfig(8, "svd"),
    f"{L0}.mlp.up_proj": QuantConfig(4, 32, False),
    f"{L1}.mlp.gate_proj": QuantConfig(8, None, True),
    f"{L1}.mlp.down_proj": Sparse24Config("magnitude", False),
}
# fp32 throughout; MatMulNBits at accuracy_level 0 dequantizes to fp32 and sums in another
# order than torch: logits (|logit| ≲ 2 here) agree to ~1e-6. 1e-4 still catches a wrong
# cache position or a dropped cache (those move logits by > 1e-2).
ATOL = 1e-4


@pytest.fixture(scope="module")
def decode(tmp_path_factory):
    """``(rewritten model, ExportResult, OrtModel)`` of the decode-step export."""
    from slimfx.models import tiny_llama

    model = tiny_llama(seed=3)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    sites, _ = find_sites(model, ((), {"input_ids": ids, "use_cache": False}))
    new, res = apply_plan(model, Plan(dict(PLAN), {}), sites)
    assert {r.fqn for r in res.applied()} == set(PLAN)
    path = tmp_path_factory.mktemp("onnx_kv") / "tiny_kv.onnx"
    result = export_onnx(new, path, (ids[:1, :1],), kv_cache=True)  # (1, 1): still dynamic
    return new, result, ort_session(path, threads=1)


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_io_names_and_dynamic_axes(decode):
    model, result, ort_model = decode
    layers = model.config.num_hidden_layers
    assert ort_model.kv_cache
    assert ort_model.input_names == ["input_ids", "attention_mask"] + [
        f"past_{kv}_{i}" for i in range(layers) for kv in ("key", "value")
    ]
    assert ort_model.output_names[0] == "logits"
    assert ort_model.output_names[1:] == [
        f"present_{kv}_{i}" for i in range(layers) for kv in ("key", "value")
    ]
    g = onnx.load(str(result.path), load_external_data=False).graph
    assert _dims(g.input[0]) == ["batch", "seq"]
    assert _dims(g.input[1]) == ["batch", "total"]  # past_seq + seq
    assert _dims(g.input[2]) == ["batch", 2, "past_seq", 16]  # 2 kv heads, head_dim 16
    assert _dims(g.output[0]) == ["batch", "seq", 256]


def test_slimfx_sites_translated_like_the_plain_export(decode):
    _, result, _ = decode
    assert result.op_counts["MatMulNBits"] == 2  # int4 and int8 sites
    assert set(result.sites) == set(PLAN)
    assert "2:4 densified" in result.sites[f"{L1}.mlp.down_proj"]
    assert result.sites[f"{L0}.self_attn.q_proj"].count("MatMul") >= 1


def test_prefill_and_one_decode_step_match_torch(decode):
    model, _, ort_model = decode
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 256, (2, 7), generator=g)
    nxt = torch.randint(0, 256, (2, 1), generator=g)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        ref_step = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    logits, present = ort_model.step(prompt)  # empty cache: a prefill
    np.testing.assert_allclose(logits, out.logits.numpy(), atol=ATOL, rtol=0)
    assert present[0].shape == (2, 2, 7, 16)
    step_logits, present2 = ort_model.step(nxt, present)
    np.testing.assert_allclose(step_logits, ref_step.logits.numpy(), atol=ATOL, rtol=0)
    assert present2[0].shape == (2, 2, 8, 16)
    # the cache the graph returns is the cache torch holds
    k_torch = ref_step.past_key_values.layers[1].keys.numpy()
    np.testing.assert_allclose(present2[2], k_torch, atol=ATOL, rtol=0)
    # ort_model(ids) on a decode-step graph: an empty cache, the logits only
    np.testing.assert_allclose(ort_model(prompt.numpy()), out.logits.numpy(), atol=ATOL, rtol=0)


def test_decoding_without_the_cache_would_differ(decode):
    """The step uses the cache: feeding a zero cache of the same length changes the logits."""
    model, _, ort_model = decode
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(6))
    _, present = ort_model.step(prompt)
    nxt = np.array([[17]])
    good = ort_model.step(nxt, present)[0]
    zeros = ort_model.step(nxt, [np.zeros_like(p) for p in present])[0]
    assert np.abs(good - zeros).max() > 1e-2


def test_greedy_generation_matches_hf_generate(decode):
    model, _, ort_model = decode
    prompt = torch.tensor([[5, 77, 140, 9, 201, 33]])
    ref = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = ort_model.generate(prompt, 12)
    assert got.shape == (1, 18)
    assert torch.equal(got, ref)
    assert torch.equal(ort_model.generate(prompt, 0), prompt)


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(decode):
    """Prompts of different lengths in one batch, left-padded under their attention mask:
    ONNX Runtime's greedy tokens are HF ``generate()``'s on the same batch and each row's are
    those of its prompt alone; the real positions' prefill logits are the unpadded prompt's."""
    model, _, ort_model = decode
    ids, mask = left_padded(11, (9, 4, 6))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=0)  # fmt: skip
    got = ort_model.generate(ids, 8, attention_mask=mask)
    assert torch.equal(got, ref)
    for r in range(3):
        alone = ids[r : r + 1, int((mask[r] == 0).sum()) :]
        assert torch.equal(got[r, -8:], ort_model.generate(alone, 8)[0, -8:])
    logits, _ = ort_model.step(ids, attention_mask=mask)
    with torch.no_grad():
        alone = model(ids[1:2, 5:]).logits[0].numpy()
    np.testing.assert_allclose(logits[1, 5:], alone, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(ort_model(ids.numpy(), mask.numpy()), logits)  # (ids, mask)
    # the padded and unpadded graph: an all-ones mask is the default
    np.testing.assert_array_equal(
        ort_model.step(ids)[0], ort_model.step(ids, attention_mask=np.ones_like(mask))[0]
    )


def test_generation_ends_rows_at_the_end_token_as_hf_generate(decode):
    """With ``eos_token_id``, a row that emitted it continues with ``pad_token_id`` and
    decoding stops once every row has (fewer than ``max_new_tokens`` then): HF ``generate()``'s
    tokens, padded batch included."""
    model, _, ort_model = decode
    ids, mask = left_padded(11, (9, 4, 6))
    free = ort_model.generate(ids, 10, attention_mask=mask)
    eos = int(free[1, 9 + 2])  # row 1's third new token ends it; others end later or not
    want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                          eos_token_id=eos, pad_token_id=7)  # fmt: skip
    got = ort_model.generate(ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(got, want)
    assert (got[1, 9 + 3 :] == 7).all() and got.shape[1] <= 9 + 10
    # every row ending at once stops decoding there
    first = [int(t) for t in free[:, 9]]
    short = ort_model.generate(ids, 10, attention_mask=mask, eos_token_id=first)
    assert short.shape[1] == 9 + 1


def test_a_bad_attention_mask_is_refused(decode):
    _, _, ort_model = decode
    ids = np.ones((2, 3), np.int64)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 2\); this step needs "
                       r"\(2, 3\)"):  # fmt: skip
        ort_model.step(ids, attention_mask=np.ones((2, 2)))
    with pytest.raises(ValueError, match="values other than 0 and 1"):
        ort_model.step(ids, attention_mask=np.full((2, 3), 2))
    _, present = ort_model.step(ids)
    with pytest.raises(ValueError, match=r"this step needs \(2, 4\)"):  # cached + new tokens
        ort_model.step(ids[:, :1], present, attention_mask=np.ones((2, 1)))
    right = np.array([[1, 1, 1], [1, 1, 0]])  # generation would continue after the padding
    with pytest.raises(ValueError, match=r"row\(s\) 1 do not end in tokens.*pad prompts on the "
                       "left"):  # fmt: skip
        ort_model.generate(ids, 2, attention_mask=right)
    assert ort_model.generate(ids, 2, attention_mask=np.array([[1, 0, 1], [0, 1, 1]])).shape == (
        2, 5)  # a hole: positions by the running count, as generate() takes it


def test_kv_cache_needs_a_causal_lm(tmp_path):
    with pytest.raises(OnnxExportError, match="kv_cache=True exports a Hugging Face causal LM"):
        export_onnx(nn.Linear(4, 4), tmp_path / "x.onnx", (torch.randn(2, 4),), kv_cache=True)


def test_step_on_a_graph_without_cache_inputs_says_so(tmp_path):
    res = export_onnx(nn.Sequential(nn.Linear(4, 4)), tmp_path / "p.onnx", (torch.randn(2, 4),))
    plain = ort_session(res.path)
    assert not plain.kv_cache
    with pytest.raises(ValueError, match="export it with kv_cache=True"):
        plain.step(np.zeros((1, 1), dtype=np.int64))


def test_wrong_cache_length_is_refused(decode):
    _, _, ort_model = decode
    with pytest.raises(ValueError, match="past has 1 tensors, the graph takes 4"):
        ort_model.step(np.array([[1]]), [np.zeros((1, 2, 1, 16), np.float32)])


def test_op_counter_sanity(decode):
    """The export's op counts are the saved graph's (guards the decode path's bookkeeping)."""
    _, result, _ = decode
    g = onnx.load(str(result.path), load_external_data=False).graph
    assert Counter(n.op_type for n in g.node) == Counter(result.op_counts)


def test_the_step_attends_without_expanding_or_transposing_the_cache(decode, tmp_path):
    """GQA (4 query / 2 kv heads): the step graph groups the query heads by kv head instead
    of expanding K/V to every head (``repeat_kv``: a rank-5 ``Expand`` per K and V) and
    transposing the expanded keys. The one ``Transpose`` of the cached keys per layer feeds
    the score ``MatMul`` directly, and ONNX Runtime folds it into a ``FusedMatMul`` with
    ``transB``. The rewritten model's attention function is restored."""
    import onnxruntime as ort

    model, result, _ = decode
    g = onnx.shape_inference.infer_shapes(
        onnx.load(str(result.path), load_external_data=False)
    ).graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.value_info, *g.output]}
    assert not [n.name for n in g.node if n.op_type == "Expand" and rank[n.output[0]] == 5]
    shapes = {v.name: _dims(v) for v in [*g.value_info, *g.input, *g.output]}
    users = {i: n.op_type for n in g.node for i in n.input}
    def over_cache(dims: list) -> bool:  # (batch, heads, cached + new tokens, head_dim)
        return len(dims) == 4 and isinstance(dims[2], str) and dims[2] != "seq"

    cached = [n for n in g.node if n.op_type == "Transpose" and over_cache(shapes[n.input[0]])]
    assert len(cached) == 2 and {users[n.output[0]] for n in cached} == {"MatMul"}
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(result.path), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph
    fused = [n for n in opt.node if n.op_type == "FusedMatMul"
             and any(a.name == "transB" and a.i == 1 for a in n.attribute)]  # fmt: skip
    assert len(fused) >= 2
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("rep, Tq, Tk", [(1, 5, 5), (3, 1, 9), (2, 4, 11)])
@pytest.mark.parametrize("masked", ["bool", "additive", "none"])
def test_grouped_attention_equals_sdpa(rep, Tq, Tk, masked):
    """``onnx_attention.grouped_attention`` = SDPA over K/V repeated per query head (the
    transformers path), with a bool / additive padding mask or none (causal, the queries the
    last ``Tq`` positions)."""
    import torch.nn.functional as F

    from slimfx.backends.onnx_attention import grouped_attention

    g = torch.Generator().manual_seed(rep * 100 + Tq + Tk)
    B, Hkv, D = 2, 2, 8
    q = torch.randn(B, Hkv * rep, Tq, D, generator=g)
    k, v = torch.randn(B, Hkv, Tk, D, generator=g), torch.randn(B, Hkv, Tk, D, generator=g)
    causal = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    keep = causal[None, None].expand(B, 1, Tq, Tk).clone()
    keep[1, :, :, :2] = False  # row 1: two pad tokens on the left
    mask = {"bool": keep, "additive": torch.zeros(B, 1, Tq, Tk).masked_fill(~keep, -1e9),
            "none": None}[masked]  # fmt: skip
    ref_mask = causal if masked == "none" else keep
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=ref_mask, scale=0.3
    ).transpose(1, 2)
    got, _ = grouped_attention(nn.Module(), q, k, v, mask, scaling=0.3)
    if masked == "additive":  # a query that sees no token (a pad query): no defined output
        sees = ref_mask.any(-1)[:, 0]  # (B, Tq)
        got, want = got[sees], want[sees]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)  # bool: such rows 0, as sdpa


@pytest.mark.parametrize("example_len", [8, 24], ids=["example-inside-window", "beyond-window"])
def test_sliding_window_steps_past_the_window_match_the_full_forward(tmp_path, example_len):
    """transformers' sliding-window cache layer crops itself with a Python branch: traced at
    the example's length it froze one branch into the step graph (logits off by up to 0.3 past
    the window). The step's window layers crop in sizes instead: each keeps the last
    ``window - 1`` tokens as transformers' cache does (ONNX Runtime held every token before),
    from prompts inside and beyond the window, and the logits are the full forward's. Once
    every layer's window is full the cache no longer says how many tokens came before: a step
    without the mask is refused, not run at the wrong positions."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, sliding_window=16)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 256, (1, 28), generator=torch.Generator().manual_seed(5))
    export_onnx(model, tmp_path / "swa.onnx", (ids[:, :example_len],), kv_cache=True)
    om = ort_session(str(tmp_path / "swa.onnx"))
    assert om.windows == {0: 16, 1: 16}
    assert [i.shape[2] for i in om.session.get_inputs()[2:]] == ["window_16_past"] * 4
    with torch.no_grad():
        full = model(ids, use_cache=False).logits.numpy()
    for prompt in (6, 20):
        logits, past = om.step(ids[:, :prompt])
        np.testing.assert_allclose(logits[0], full[0, :prompt], atol=2e-5, rtol=1e-4)
        assert [p.shape[2] for p in past] == [min(prompt, 15)] * 4
        for t in range(prompt, 28):
            mask = np.ones((1, t + 1), np.int64)
            logits, past = om.step(ids[:, t : t + 1], past, attention_mask=mask)
            np.testing.assert_allclose(logits[:, -1], full[:, t], atol=2e-5, rtol=1e-4)
            assert past[0].shape[2] == min(t + 1, 15)
    with pytest.raises(ValueError, match="sliding window and it is full.*pass attention_mask"):
        om.step(ids[:, :1], past)
    with pytest.raises(ValueError, match="layer 0 keeps a sliding window of 16 .*holds 15, "
                       "but attention_mask has 10 columns for a call of 1"):  # fmt: skip
        om.step(ids[:, :1], past, attention_mask=np.ones((1, 10), np.int64))
    _, early = om.step(ids[:, :5])  # windows not yet full: the cache says 5 came before
    assert om.step(ids[:, 5:6], early)[1][0].shape[2] == 6


def test_gemma2_soft_cap_and_sliding_window_under_padding(tmp_path):
    """Gemma 2 (eager attention: transformers runs it there) with a soft-cap that bites (sharp
    q/k, cap 2) and a window of 4: the step graph applies the cap as the model does — the
    export's attention function once dropped it (0.13 off in these logits) — and a left-padded
    batch generates HF ``generate()``'s tokens, its real positions' logits torch's."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, max_position_embeddings=128, sliding_window=4,
                          attn_logit_softcapping=2.0, final_logit_softcapping=1.0)  # fmt: skip
    model = tf.Gemma2ForCausalLM(cfg).eval()
    model.set_attn_implementation("eager")  # 5.17 defaults Gemma 2 to sdpa (no soft-cap)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(15)
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(11, (9, 4, 6))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=pos).logits
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = model(ids, attention_mask=mask, position_ids=pos).logits
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = 2.0
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=0)  # fmt: skip
    real = mask.bool().numpy()
    assert (ref - uncapped).abs().numpy()[real].max() > 1e-2  # the cap matters here
    export_onnx(model, tmp_path / "g2.onnx", (ids[:1, :4],), kv_cache=True)
    om = ort_session(tmp_path / "g2.onnx", threads=1)
    got, present = om.step(ids, attention_mask=mask)
    np.testing.assert_allclose(got[real], ref.numpy()[real], atol=ATOL, rtol=0)
    # the sliding layer 0 keeps its window's last 3 tokens, the global layer 1 all 9
    assert om.windows == {0: 4} and [p.shape[2] for p in present] == [3, 3, 9, 9]
    assert [i.shape[2] for i in om.session.get_inputs()[2:]] == (["window_4_past"] * 2
                                                                 + ["past_seq"] * 2)  # fmt: skip
    assert torch.equal(om.generate(ids, 6, attention_mask=mask), want)


def test_a_graph_without_the_mask_input_runs_unpadded_and_refuses_padding(tmp_path):
    """A decode-step graph written before the mask input existed (here a stand-in of that
    layout: ids and a one-layer cache in, logits and the grown cache out) still steps and
    generates unpadded batches; a mask with padding is refused by name, not dropped."""
    from onnx import TensorProto, helper

    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    cache = ["batch", 1, "past", 2]
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["x"], to=f),
        helper.make_node("Unsqueeze", ["x", "axes"], ["x3"]),  # (batch, seq, 1) "logits"
        helper.make_node("Concat", ["x3", "x3", "x3"], ["logits"], axis=-1),
        helper.make_node("Unsqueeze", ["x3", "one"], ["x4"]),  # (batch, 1, seq, 1)
        helper.make_node("Concat", ["x4", "x4"], ["kv"], axis=-1),
        helper.make_node("Concat", ["past_key_0", "kv"], ["present_key_0"], axis=2),
        helper.make_node("Concat", ["past_value_0", "kv"], ["present_value_0"], axis=2),
    ]
    graph = helper.make_graph(
        nodes, "old_step",
        [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
         helper.make_tensor_value_info("past_key_0", f, cache),
         helper.make_tensor_value_info("past_value_0", f, cache)],
        [helper.make_tensor_value_info("logits", f, ["batch", "seq", 3]),
         helper.make_tensor_value_info("present_key_0", f, cache),
         helper.make_tensor_value_info("present_value_0", f, cache)],
        [helper.make_tensor("axes", i64, [1], [-1]), helper.make_tensor("one", i64, [1], [1])],
    )  # fmt: skip
    path = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    om = ort_session(path, threads=1)
    assert om.kv_cache and "attention_mask" not in om.input_names
    ids = np.array([[0, 1, 2], [2, 0, 1]])  # argmax of logits [x, x, x] is 0: tokens 0
    logits, present = om.step(ids)
    assert logits.shape == (2, 3, 3) and present[0].shape == (2, 1, 3, 2)
    assert om.generate(ids, 2).shape == (2, 5)
    om.step(ids, attention_mask=np.ones((2, 3)))  # all ones: no padding, runs
    with pytest.raises(ValueError, match="no attention_mask input.*unpadded batches only"):
        om.generate(ids, 2, attention_mask=np.array([[0, 1, 1], [1, 1, 1]]))


def test_gpt_oss_learned_sinks_are_in_the_step_graph(tmp_path):
    """GPT-OSS hands its attention function learned sink logits (``s_aux``, one per query
    head): the export's attention takes them as the model's eager function does — dropped, the
    logits were 0.41 off — and a left-padded batch generates HF ``generate()``'s tokens."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                          sliding_window=4, max_position_embeddings=128,
                          layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    model = tf.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)
    model.generation_config.eos_token_id = None
    ids, mask = left_padded(11, (9, 4, 6))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=0)  # fmt: skip
    export_onnx(model, tmp_path / "oss.onnx", (ids[:1, :4],), kv_cache=True)
    om = ort_session(tmp_path / "oss.onnx", threads=1)
    real = mask.bool().numpy()
    got = om.step(ids, attention_mask=mask)[0]
    np.testing.assert_allclose(got[real], ref.logits.numpy()[real], atol=ATOL, rtol=0)
    assert torch.equal(om.generate(ids, 6, attention_mask=mask), want)


def test_past_length_reads_the_tokens_seen_from_full_layers_or_the_mask():
    """The step's tokens before the call: a full layer's length; with window layers alone,
    their length until a window is full, then the mask's; a window layer holding other than
    its window's share of them is named."""
    from slimfx.backends.onnx_decode import past_length

    assert past_length([5, 5], {}, None, 1) == 5
    assert past_length([3, 7], {0: 4}, None, 1) == 7  # layer 0 holds its window's last 3
    assert past_length([2, 2], {0: 4, 1: 4}, None, 1) == 2  # windows not full yet
    assert past_length([3, 3], {0: 4, 1: 4}, 10, 1) == 9  # full: the mask says 9
    with pytest.raises(ValueError, match="sliding window and it is full.*pass attention_mask"):
        past_length([3, 3], {0: 4, 1: 4}, None, 1)
    with pytest.raises(ValueError, match=r"layer 0 keeps a sliding window of 4 \(the last 3 "
                       r"tokens\) and holds 2, but the full layers hold 7 \(it would hold 3\)"):
        past_length([2, 7], {0: 4}, None, 1)
    with pytest.raises(ValueError, match="full layers hold different lengths"):
        past_length([5, 6], {}, None, 1)
