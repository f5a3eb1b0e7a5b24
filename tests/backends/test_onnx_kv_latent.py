"""ONNX Runtime decode over the low-rank KV caches (``slimfx.backends.onnx_kv_latent``).

A tiny random Llama (2–3 layers, 2 kv heads × head_dim 16; mix A's with large attention
biases, as Qwen2's k/v projections have) has its attention rewritten by
``apply_lowrank_kv`` (factors fitted on random calibration tokens), is exported with per-layer
``kv_latent_quant`` / ``kv_lowrank`` / ``kv_quant`` / ``kv_dense`` forms and driven by
:class:`OrtKVDecoder`; the reference is the same torch model called step by step with slimfx's
``KVCache``. Checked: logits of every call (prefill, 1-token calls from the first token so the
sink tokens arrive across calls, decode steps crossing several flushes), the latent store
against the torch layer's (codes within one step, scales within one float16 ulp), the sink
buffer and latent window against the torch layer's, bytes against ``config.cache_bytes``,
the graph's inputs, and the refusals (model unchanged).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _helpers import (
    codes_close,
    kv_ort_matches_torch,
    kv_padded_ort_matches_torch,
    kv_torch_calls,
    left_padded,
)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")

from slimfx.backends.onnx_graph import OnnxExportError  # noqa: E402
from slimfx.backends.onnx_kv import export_forms, export_onnx_kv  # noqa: E402
from slimfx.backends.onnx_kv_decoder import OrtKVDecoder  # noqa: E402
from slimfx.backends.onnx_kv_latent import latent_store_names  # noqa: E402
from slimfx.forms.kv.calibrate import attention_grams, fit_site  # noqa: E402
from slimfx.forms.kv.config import (  # noqa: E402
    KVLatentQuantConfig,
    KVLowRankConfig,
    KVQuantConfig,
)
from slimfx.forms.kv.lowrank import apply_lowrank_kv  # noqa: E402
from slimfx.ir.find import inspect_attention_sites  # noqa: E402
from slimfx.planning.shapes import AttentionShape  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4  # as tests/backends/test_onnx_kv.py: fp32 both sides, another summation order
SHAPE = AttentionShape(64, 4, 2, 16)

FORMS_A = {
    # per-channel latent, mixed int4/int2 widths, 2 sink tokens, blocks of 4 tokens
    0: KVLatentQuantConfig(
        16, 24, 2, "whitened", 4, 4, 2, sink=2, axis="channel", low_bits=2, key_low=8,
        value_low=8,
    ),
    # 16-bit latent, 3 sink tokens, the block's own weights as int8 rows
    1: KVLowRankConfig(16, 24, 2, "attention", sink=3, factor_bits=8),
}  # fmt: skip
_PER_TOKEN = KVLatentQuantConfig(24, 16, 2, "attention", 8, 4, 3)
FORMS_B = {
    # per-token int8 latent, a window of 3 recent tokens, no sinks
    0: _PER_TOKEN,
    # a layer left dense: KIVI's cache over the original projections
    1: KVQuantConfig(4, 4, key_group=4, value_group=16, residual=2, sink=1),
    # layer 2 shares layer 0's form: one group of two layers
    2: _PER_TOKEN,
}


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (1, 24), generator=g) for _ in range(3)]


def _rewritten(forms: dict, layers: int = 2, seed: int = 0, bias: bool = False):
    """A tiny Llama whose layers with a low-rank form in ``forms`` are rewritten; ``bias``:
    with attention biases drawn large (N(0, 0.5): Qwen2-style k/v biases the rebuilt K/V,
    the absorbed step's value bias and the sinks' exact K/V must carry)."""
    from slimfx.models import tiny_llama

    model = tiny_llama(seed=seed, num_hidden_layers=layers, attention_bias=bias)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if bias and n.endswith("_proj.bias"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    sites, _ = inspect_attention_sites(model)
    low = {s.fqn: forms[i] for i, s in enumerate(sites) if forms[i].kind != "kv_quant"
           and forms[i].kind != "kv_dense"}  # fmt: skip
    todo = [s for s in sites if s.fqn in low]
    grams = attention_grams(model, todo, _calib())
    factors = {s.fqn: fit_site(model, s, grams[s.fqn], low[s.fqn]) for s in todo}
    apply_lowrank_kv(model, todo, low, factors)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name → (model, KVExportResult, OrtKVDecoder) for the two per-layer form mixes."""
    out = {}
    d = tmp_path_factory.mktemp("onnx_kv_latent")
    torch.set_num_threads(1)
    for name, forms in (("A", FORMS_A), ("B", FORMS_B)):
        model = _rewritten(forms, layers=len(forms), bias=name == "A")
        res = export_onnx_kv(model, d / f"tiny_{name}.onnx", forms)
        out[name] = (model, res, OrtKVDecoder(res.path, threads=1))
    return out


def _ids(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _store_matches(dec, layer, i: int, form) -> None:
    assert dec.layer_stored_tokens(i) == layer.n_stored > 0
    for name, arr in zip(latent_store_names(form), dec.layer_store(i)):
        t = layer.store[name].numpy()
        assert arr.dtype == t.dtype and arr.nbytes == t.nbytes, name
        a = arr.reshape(t.shape)
        if name.endswith("codes"):
            tail = "tail" in name
            codes_close(a, t, form.low_bits if tail else form.bits, name)
        else:
            np.testing.assert_allclose(a, t, rtol=2**-10, atol=2**-24, err_msg=name)


@pytest.mark.parametrize("name", ["A", "B"])
def test_logits_every_step_match_torch_kvcache(exported, name):
    model, _, dec = exported[name]
    forms = FORMS_A if name == "A" else FORMS_B
    cache = kv_ort_matches_torch(model, dec, forms, _ids(2, 11), steps=30, atol=ATOL)
    if name == "A":  # the k/v biases: in the rebuilt K/V, the absorbed step, the sinks
        assert all(la.self_attn.k_bias is not None for la in model.model.layers)
    for i, f in forms.items():
        layer = cache.layers[i]
        if isinstance(f, KVLatentQuantConfig):
            _store_matches(dec, layer, i, f)
        if f.kind in ("kv_latent_quant", "kv_lowrank"):  # the latent window: 16-bit rows
            for got_w, want_w in zip(dec.layer_window(i), (layer.keys, layer.values)):
                np.testing.assert_allclose(got_w, want_w.squeeze(1).numpy(), atol=ATOL, rtol=0)
        if getattr(f, "sink", 0) and f.kind != "kv_quant":
            sink = dec.layer_sink(i)
            np.testing.assert_allclose(sink[0], layer.sink_keys.numpy(), atol=ATOL, rtol=0)
            np.testing.assert_allclose(sink[1], layer.sink_values.numpy(), atol=ATOL, rtol=0)
        else:
            assert dec.layer_sink(i) is None


def test_one_token_calls_from_the_start_and_generate(exported):
    """The sink tokens arrive one call at a time (the held buffer fills across calls), then
    greedy decoding: every call's logits and the generated tokens are torch's."""
    model, _, dec = exported["A"]
    ids = _ids(1, 9, seed=7)
    chunks = list(ids.split(1, dim=1))
    ref, fed, _ = kv_torch_calls(model, FORMS_A, chunks, steps=10)
    dec.reset(1)
    for c, r in zip(chunks, ref):
        np.testing.assert_allclose(dec.step(c), r.numpy(), atol=ATOL, rtol=0)
    seq = dec.generate(ids, 11, prefill_chunk=4)
    want = torch.cat([ids, *fed, ref[-1][:, -1].argmax(-1)[:, None]], dim=1)
    np.testing.assert_array_equal(seq, want.numpy())



@pytest.mark.parametrize("name", ["A", "B"])
def test_a_left_padded_batch_rotates_rebuilt_keys_at_its_position_ids(exported, name):
    """Prompts of 13, 5 and 9 tokens left-padded into one batch: the graph rotates the rebuilt
    keys at the position ids the mask gives, as the torch layer (at cache positions they were
    0.19 off in these logits), and keeps each row's own first tokens as its sinks, as the torch
    layer; the real positions' logits of the prefill and of 24 greedy steps are torch's with the
    same forms, the tokens HF ``generate()``'s, also with the prefill in chunks of 4."""
    ids, mask = left_padded(3, (13, 5, 9))
    model, _, dec = exported[name]
    forms = {"A": FORMS_A, "B": FORMS_B}[name]
    got = kv_padded_ort_matches_torch(model, dec, forms, ids, mask, 24, ATOL)
    # a chunked prefill: the 5-token row's first two chunks are all padding, its sinks come later
    chunked = dec.generate(ids, 24, attention_mask=mask, prefill_chunk=4, pad_token_id=0,
                           eos_token_id=model.generation_config.eos_token_id)  # fmt: skip
    np.testing.assert_array_equal(chunked, got)

@pytest.mark.parametrize("tokens", [5, 17, 40])
def test_cache_bytes_are_what_the_config_prices(exported, tokens):
    """After ``flush()`` store + latent window + sink buffer hold the config's bytes (the
    float32 latent and sink entries at twice their 16-bit price)."""
    _, _, dec = exported["A"]
    dec.reset(1)
    dec.step(_ids(1, tokens, seed=tokens))
    dec.flush()
    total_16 = 0
    for i, f in FORMS_A.items():
        q = f.quantized_tokens(tokens) if isinstance(f, KVLatentQuantConfig) else 0
        store = sum(a.nbytes for a in dec.layer_store(i) or ())
        window = sum(w.nbytes for w in dec.layer_window(i))
        sink = dec.layer_sink(i).nbytes
        assert dec.layer_stored_tokens(i) == q
        assert window == 2 * 2 * (f.key_rank + f.value_rank) * (tokens - q)
        assert store + (window + sink) // 2 == f.cache_bytes(SHAPE, tokens)
        total_16 += f.cache_bytes(SHAPE, tokens)
    assert dec.store_nbytes() + (dec.window_nbytes() + dec.sink_nbytes()) // 2 == total_16


def test_graph_inputs(exported):
    """A latent window per group, the latent store's segments (uint8 codes, float16
    scales/minimums, a dynamic block axis) and a static-length sink buffer."""
    _, res, _ = exported["A"]
    g = onnx.load(str(res.path)).graph

    def dims(name):
        t = {i.name: i for i in g.input}[name].type.tensor_type
        return t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

    names = [i.name for i in g.input]
    store = [f"{p}_{t}_0" for p in ("k", "k_tail", "v", "v_tail") for t in ("codes", "scale", "min")]
    assert names == ["input_ids", "attention_mask", "window_0", "window_1", *store, "sink_0",
                     "sink_1"]  # fmt: skip
    f = FORMS_A[0]
    assert dims("window_0")[1] == [1, "batch", "window_0", 40]
    # key latent: 2 groups × (4 channels at 4 bits + 4 at 2 bits)
    assert dims("k_codes_0") == (onnx.TensorProto.UINT8, [1, "batch", "blocks_0", 4, 4])
    assert dims("k_tail_codes_0")[1] == [1, "batch", "blocks_0", 4, 2]
    assert dims("v_scale_0") == (onnx.TensorProto.FLOAT16, [1, "batch", "blocks_0", 16])
    assert dims("sink_0")[1] == [1, 2, "batch", 2, f.sink, 16]
    assert dims("sink_1")[1][4] == FORMS_A[1].sink
    outs = [o.name for o in g.output]
    assert outs == ["logits", "present_window_0", "present_window_1", "present_sink_0",
                    "present_sink_1"]  # fmt: skip
    assert len(res.flush_paths) == 1  # the 16-bit latent has no store to flush into
    # layer 1's int8 factors: its codes are int8 initializers (one each: down, up and the
    # sinks' projections), dequantized in the graph
    attn = exported["A"][0].model.layers[1].self_attn
    codes = [m.codes for m in attn.modules() if hasattr(m, "codes")]
    inits = [onnx.numpy_helper.to_array(t) for t in g.initializer
             if t.data_type == onnx.TensorProto.INT8]  # fmt: skip
    assert len(codes) == 6 and len(inits) == 6
    assert sorted(int(a.sum()) for a in inits) == sorted(int(c.sum()) for c in codes)
    assert sum(n.op_type == "DequantizeLinear" for n in g.node) >= 4
    # one If per low-rank layer (slimfx::one_token_or on the call length, made an If after
    # the export): one-token calls attend over the value latent (absorbed: einsums with the
    # latent and v_up, no value rebuilt), longer ones over rebuilt values (the attention's two
    # MatMuls); no marker of the pick is left
    assert all(n.domain != "slimfx.branch" for n in g.node)
    assert "slimfx.branch" not in {o.domain for o in onnx.load(str(res.path)).opset_import}
    ifs = [n for n in g.node if n.op_type == "If"]
    assert len(ifs) == 2
    for n in ifs:
        ops = {a.name: [x.op_type for x in a.g.node] for a in n.attribute}
        assert ops["then_branch"].count("MatMul") == 0 and ops["then_branch"].count("Einsum") >= 3
        assert ops["else_branch"].count("MatMul") == 2
    # B: layers 0 and 2 share a latent form (one group, stacked on the layer axis), layer 1 a
    # quantized cache; KIVI's sinks sit in its window
    _, res_b, dec_b = exported["B"]
    names_b = [i.name for i in onnx.load(str(res_b.path)).graph.input]
    assert names_b[:4] == ["input_ids", "attention_mask", "window_0", "window_1"]
    assert "sink_0" not in names_b
    assert dims_of(res_b.path, "window_0")[:2] == [2, "batch"]
    assert [idx for _, idx in dec_b.groups] == [[0, 2], [1]]
    assert res_b.forms == [FORMS_B[i] for i in range(3)]
    assert len(res_b.flush_paths) == 2


def dims_of(path, name):  # noqa: ANN001, ANN201
    t = {i.name: i for i in onnx.load(str(path)).graph.input}[name].type.tensor_type
    return [d.dim_param or d.dim_value for d in t.shape.dim]


def test_layers_sharing_a_form_store_alike(exported):
    """Layers 0 and 2 of B (one group): after a prompt and one-token steps each holds the
    torch layer's stored tokens and store (read back per layer from the stacked arrays)."""
    model, _, dec = exported["B"]
    ref, fed, cache = kv_torch_calls(model, FORMS_B, [_ids(1, 6, seed=3)], steps=14)
    dec.reset(1)
    got = [dec.step(_ids(1, 6, seed=3))] + [dec.step(t) for t in fed]
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r.numpy(), atol=ATOL, rtol=0)
    for i in (0, 2):
        _store_matches(dec, cache.layers[i], i, FORMS_B[i])


def test_refusals_and_model_unchanged(tmp_path):
    model = _rewritten(FORMS_A)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OnnxExportError, match="layer 0: its attention rebuilds K/V from a "
                       "latent .*not kv_quant"):  # fmt: skip
        export_onnx_kv(model, tmp_path / "x.onnx", {0: KVQuantConfig(), 1: FORMS_A[1]})
    other = KVLowRankConfig(8, 24, 2, "attention", sink=3)
    with pytest.raises(OnnxExportError, match=r"layer 1: kv lowrank k8 v24 g2 attention s3 "
                       r"does not match the layer's factors \(kv lowrank k16 v24"):  # fmt: skip
        export_onnx_kv(model, tmp_path / "x.onnx", {0: FORMS_A[0], 1: other})
    assert not (tmp_path / "x.onnx").exists()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the same factors with a quantized latent cache are accepted; with 16-bit factors not
    quant = KVLatentQuantConfig(16, 24, 2, "attention", 8, 8, 0, sink=3, factor_bits=8)
    assert export_forms(model, {0: FORMS_A[0], 1: quant}) == [FORMS_A[0], quant]
    with pytest.raises(OnnxExportError, match=r"does not match the layer's factors \(kv "
                       r"lowrank k16 v24 g2 attention s3 f8\)"):  # fmt: skip
        export_forms(model, {0: FORMS_A[0], 1: dataclasses.replace(quant, factor_bits=16)})
    assert export_forms(model) == [FORMS_A[0], FORMS_A[1]]  # unmarked: the modules' forms
