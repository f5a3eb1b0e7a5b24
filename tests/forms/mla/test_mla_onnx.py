"""ONNX export of a converted tiny Llama's decode step with the latent cache, run by ONNX
Runtime: prefill and every decode step's logits against torch, greedy tokens, graph layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import left_padded

from forms.mla._tiny import calib_batches, tiny_gqa_llama
from slimfx.forms.mla.cache import MLALatentCache
from slimfx.forms.mla.config import MLAConfig
from slimfx.forms.mla.convert import convert_model
from slimfx.forms.mla.module import MLAAttention

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.usefixtures("one_thread")

from slimfx.backends.onnx_graph import OnnxExportError  # noqa: E402
from slimfx.backends.onnx_mla import export_mla_onnx, latent_ort_session  # noqa: E402
from slimfx.backends.ort import ort_session  # noqa: E402

STEPS = 6
# fp32 everywhere; ORT fuses and reorders the reductions: measured ≤ 6e-7 on these logits
# (|logits| ≤ 1.6); 1e-4 leaves room for other CPUs' kernels without hiding a wrong formula
# (dropping the causal mask moves the prefill logits of the first model by 0.6).
ATOL = 1e-4


def _prompt(batch=2, length=6):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(7))


def _torch_steps(model, prompt, tokens, latent_bits=16):
    """Logits of the prefill's last position and of each decode step fed ``tokens``."""
    cache = MLALatentCache(model.config.num_hidden_layers, latent_bits=latent_bits)
    with torch.no_grad():
        out = [model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in tokens.T[:-1]:
            out.append(model(t[:, None], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(out)


def _ort_steps(sess, prompt):
    """ORT greedy decoding through its own cache: the logits per step and the tokens."""
    logits, past = sess.step(prompt)
    out, toks = [logits[:, -1]], []
    for _ in range(STEPS):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        toks.append(nxt)
        if len(toks) < STEPS:
            logits, past = sess.step(nxt, past)
            out.append(logits[:, -1])
    return torch.from_numpy(np.stack(out)), torch.from_numpy(np.concatenate(toks, 1)), past


def _float_expands(path) -> list[str]:  # noqa: ANN001
    """The graph's ``Expand`` nodes whose output is a float tensor (the mask's integer and
    boolean broadcasts aside)."""
    import onnx

    g = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    def rotary(n):  # noqa: ANN001, ANN202  transformers 5.17's RoPE broadcasts inv_freq by Expand
        scopes = {p.key: p.value for p in n.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
        return "rotary_emb" in scopes

    return [n.name for n in g.node if n.op_type == "Expand" and types.get(n.output[0]) in floats
            and not rotary(n)]  # fmt: skip


def _factor_code_elements(attn) -> int:
    """Code entries of an int8-factor block as an export stores them: q_mix per stored map
    (the exporter keeps one copy of equal constants)."""
    heads = attn.q_mix_rows.codes.view(attn.q_mix_heads, -1)
    return sum(getattr(attn, n).codes.numel() for n in ("kv_down", "k_rope_proj", "k_up", "v_up")
               ) + torch.unique(heads, dim=0).numel()


def _byte_initializer_elements(path) -> int:
    """Elements of the graph's int8 and uint8 initializers (the cache carries no initializer)."""
    import onnx

    g = onnx.load(str(path)).graph
    one_byte = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sum(int(np.prod(t.dims)) for t in g.initializer if t.data_type in one_byte)


def _axes_are_named(path, cfg: MLAConfig, kv_heads: int) -> None:
    """The graph's dynamic axes carry readable names; the latent and RoPE-key widths stay."""
    import onnx

    g = onnx.load(str(path)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in g.input}  # fmt: skip
    assert dims["input_ids"] == ["batch", "seq"]
    assert dims["attention_mask"] == ["batch", "total"]  # past_seq + seq
    assert dims["past_key_0"] == ["batch", 1, "past_seq", cfg.rank]
    assert dims["past_value_1"] == ["batch", 1, "past_seq", 2 * kv_heads * cfg.rope_pairs]


@pytest.mark.parametrize(
    "kv_heads,kw",
    [(2, {"factor_bits": 8}), (3, {"rope_pairs": 0, "rank": 9}),
     (1, {"latent_bits": 8, "rope_pairs": 3})],
)
def test_ort_decode_with_latent_cache_matches_torch(tmp_path, kv_heads, kw):
    model = tiny_gqa_llama(kv_heads, attention_bias=kw.get("latent_bits") == 8)
    cfg = MLAConfig(**{**dict(rank=12, rope_pairs=2), **kw})
    convert_model(model, cfg, calib_batches())
    prompt = _prompt()
    res = export_mla_onnx(model, tmp_path / "m.onnx", prompt)
    int8 = cfg.latent_bits == 8
    # a 16-bit latent graph runs in the plain OrtModel; the int8 one needs its typed cache
    sess = (latent_ort_session if int8 else ort_session)(res.path, threads=1)
    assert sess.kv_cache and res.mla_layers == [0, 1]
    ort_logits, ort_tokens, past = _ort_steps(sess, prompt)
    ref = _torch_steps(model, prompt, ort_tokens, cfg.latent_bits)
    torch.testing.assert_close(ort_logits, ref, atol=ATOL, rtol=0)
    # the graph's cache is the latent: (B, 1, S, r) — int8 codes + one scale per token for an
    # int8 latent — and the RoPE key (B, 1, S, 2·K·p)
    S = prompt.shape[1] + STEPS - 1
    assert past[0].shape == (2, 1, S, cfg.rank)
    assert past[1].shape == (2, 1, S, 2 * kv_heads * cfg.rope_pairs)
    rope_bytes = 4 * 2 * kv_heads * cfg.rope_pairs  # fp32 model: floats take 4 bytes
    if int8:
        assert past[0].dtype == np.int8 and past[2].shape == (2, 1, S, 1)
        assert [p.shape for p in past[3:6]] == [p.shape for p in past[:3]]
        assert res.cache_bytes_per_token == 2 * (cfg.rank + 4 + rope_bytes)
    else:
        assert res.cache_bytes_per_token == 2 * (4 * cfg.rank + rope_bytes)
    # the float32 cache is wider than the report's 16-bit price: the result says so
    assert any(n.startswith("the graph holds the latent cache in torch.float32 like the model "
                            f"({res.cache_bytes_per_token} B/token") for n in res.notes)  # fmt: skip
    # attention runs over the latent: no per-head keys or values are expanded or rebuilt
    assert _float_expands(res.path) == [] and res.op_counts["Softmax"] == 2
    if cfg.factor_bits == 8:  # ORT holds the factors as the int8 codes torch holds: the
        # products over the hidden states and q_mix's per head as 8-bit MatMulNBits (latent,
        # RoPE rows and 6 heads per layer), k_up / v_up as DequantizeLinear of int8 codes
        assert _byte_initializer_elements(res.path) == sum(
            _factor_code_elements(b.self_attn) for b in model.model.layers
        )
        assert res.op_counts["MatMulNBits"] == 2 * (2 + 2)  # q_mix: one per kv group
        assert res.op_counts["DequantizeLinear"] == 2 * 2
    _axes_are_named(res.path, cfg, kv_heads)
    # the model in torch is the one it was: its MLA blocks are back after the export
    assert all(isinstance(b.self_attn, MLAAttention) for b in model.model.layers)
    with torch.no_grad():
        hf = model.generate(prompt, max_new_tokens=STEPS, do_sample=False, pad_token_id=0,
                            past_key_values=MLALatentCache(2, latent_bits=cfg.latent_bits))
    assert torch.equal(sess.generate(prompt, STEPS), hf)
    # a left-padded batch of prompts of 7, 3 and 5 tokens under its attention mask: HF
    # generate()'s tokens, each row's those of its prompt alone, the real positions' prefill
    # logits torch's
    ids, mask = left_padded(9, (7, 3, 5))
    cache = MLALatentCache(2, latent_bits=cfg.latent_bits)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                            pad_token_id=0, past_key_values=cache)  # fmt: skip
        ref = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=MLALatentCache(2, latent_bits=cfg.latent_bits)).logits
    got = sess.generate(ids, STEPS, attention_mask=mask)
    assert torch.equal(got, hf)
    for r in range(3):
        alone = ids[r : r + 1, int((mask[r] == 0).sum()) :]
        assert torch.equal(got[r, -STEPS:], sess.generate(alone, STEPS)[0, -STEPS:])
    real = mask.bool()
    torch.testing.assert_close(torch.from_numpy(sess.step(ids, attention_mask=mask)[0])[real],
                               ref[real], atol=ATOL, rtol=0)  # fmt: skip
    if int8:  # the plain OrtModel cannot feed int8 codes: it says so through ORT's type check
        with pytest.raises(Exception, match="(?i)type"):
            ort_session(res.path, threads=1).step(prompt)


def test_partially_converted_model_keeps_kv_cache_for_other_layers(tmp_path):
    model = tiny_gqa_llama(2)
    convert_model(model, {0: MLAConfig(rank=10, rope_pairs=2)}, calib_batches())
    prompt = _prompt(batch=1, length=5)
    res = export_mla_onnx(model, tmp_path / "m.onnx", prompt)
    assert [(c.name, c.heads, c.width) for c in res.cache_layout] == [
        ("past_key_0", 1, 10), ("past_value_0", 1, 8),
        ("past_key_1", 2, 16), ("past_value_1", 2, 16),
    ]
    sess = ort_session(res.path, threads=1)
    ort_logits, ort_tokens, past = _ort_steps(sess, prompt)
    assert past[2].shape == (1, 2, 5 + STEPS - 1, 16)  # layer 1: plain keys
    torch.testing.assert_close(ort_logits, _torch_steps(model, prompt, ort_tokens), atol=ATOL,
                               rtol=0)


def test_a_mix_of_mla_layers_and_compressed_kv_caches_is_refused_by_both_exports(tmp_path):
    """Neither decode-step export holds both kinds of compressed cache: the MLA export would
    give the other layer a 16-bit cache and the KV export traced the MLA block into a shape
    error; each now refuses with the layers and the other export's name."""
    from slimfx.backends.onnx_kv import export_onnx_kv
    from slimfx.forms.kv.apply import apply_kv_plan
    from slimfx.forms.kv.config import KVQuantConfig
    from slimfx.ir.find import inspect_attention_sites

    model = tiny_gqa_llama(2)
    convert_model(model, {0: MLAConfig(rank=10, rope_pairs=2)}, calib_batches())
    with pytest.raises(OnnxExportError, match=r"layer\(s\) 0 are MLA layers.*export_mla_onnx"):
        export_onnx_kv(model, tmp_path / "kv.onnx")  # MLA + 16-bit: the MLA export's job
    sites, _ = inspect_attention_sites(model)
    apply_kv_plan(model, {s.fqn: KVQuantConfig(4, 4, 8, 8) for s in sites}, sites)
    with pytest.raises(OnnxExportError, match=r"layer\(s\) 1 keep a compressed KV cache"):
        export_mla_onnx(model, tmp_path / "m.onnx", _prompt())
    with pytest.raises(OnnxExportError, match=r"layer\(s\) 1 keeping a compressed KV cache"):
        export_onnx_kv(model, tmp_path / "kv.onnx")
    assert not list(tmp_path.iterdir())


def test_refuses_unconverted_and_bf16_models(tmp_path):
    with pytest.raises(OnnxExportError, match="no MLAAttention"):
        export_mla_onnx(tiny_gqa_llama(2), tmp_path / "a.onnx", _prompt())
    model = tiny_gqa_llama(2)
    convert_model(model, MLAConfig(rank=10, rope_pairs=2), calib_batches())
    with pytest.raises(OnnxExportError, match="bfloat16"):
        export_mla_onnx(model.to(torch.bfloat16), tmp_path / "b.onnx", _prompt())
    assert not (tmp_path / "b.onnx").exists()


def test_a_sliding_layer_left_unconverted_keeps_its_window(tmp_path):
    """A Qwen2 whose second layer attends over a sliding window of 4 (MLA refuses such a
    layer): the first converted, the second keeps its keys and values — only the last 3
    tokens in ONNX Runtime, as transformers' sliding cache layer does (the graph held every
    token before) — and every step's logits past the window are torch's."""
    import transformers as tf

    cfg = tf.Qwen2Config(hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                         intermediate_size=128, num_hidden_layers=2, vocab_size=256,
                         use_sliding_window=True, sliding_window=4,
                         layer_types=["full_attention", "sliding_attention"])  # fmt: skip
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(cfg).eval()
    convert_model(model, {0: MLAConfig(rank=12, rope_pairs=2)}, calib_batches())
    assert [isinstance(b.self_attn, MLAAttention) for b in model.model.layers] == [True, False]
    prompt = _prompt(batch=2, length=7)
    res = export_mla_onnx(model, tmp_path / "m.onnx", prompt)
    sess = latent_ort_session(res.path, threads=1)
    assert sess.windows == {1: 4}
    ort_logits, ort_tokens, past = _ort_steps(sess, prompt)
    assert past[0].shape[2] == 7 + STEPS - 1 and past[2].shape[2] == 3  # latent; window
    torch.testing.assert_close(ort_logits, _torch_steps(model, prompt, ort_tokens), atol=ATOL,
                               rtol=0)
