"""ONNX Runtime decode over the quantized KV cache (``slimfx.backends.onnx_kv``).

A tiny random Llama (2 layers, 2 kv heads × head_dim 16) is exported twice with per-layer
``kv_quant`` / ``kv_dense`` forms and driven by :class:`OrtKVDecoder`; the reference is the same
torch model called step by step with slimfx's ``KVCache`` of the same forms. Checked: logits of
every call (prefill, chunked prefill, 40 greedy decode steps crossing several block flushes and
the sink/residual boundaries), the quantized store arrays ORT holds against the torch layer's
store (equal codes, scales and minimums), their byte counts against ``config.cache_bytes``,
the graph's inputs (uint8 codes, float16 scales, dynamic block axis) and ops, and the refusals.
"""

from __future__ import annotations

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
from slimfx.backends.onnx_kv import (  # noqa: E402
    STORE_NAMES,
    export_forms,
    export_onnx_kv,
)
from slimfx.backends.onnx_kv_decoder import OrtKVDecoder  # noqa: E402
from slimfx.forms.kv.cache import KV_FORM_ATTR, KVCache  # noqa: E402
from slimfx.forms.kv.config import (  # noqa: E402
    KVDenseConfig,
    KVLowRankConfig,
    KVQuantConfig,
)
from slimfx.planning.shapes import AttentionShape  # noqa: E402

# fp32 model and fp32 window on both sides; the store dequantizes with the same float32
# arithmetic (q·scale + min): logits (|logit| ≲ 2) agree to ~5e-7 in practice. 1e-4 still
# catches a wrong block order, a missed flush or a wrong sink split (those move logits by
# > 1e-2).
ATOL = 1e-4
SHAPE = AttentionShape(64, 4, 2, 16)

FORMS_A = {
    # int4 keys / int2 values, sink and residual window: flushes whole blocks of 8 tokens
    0: KVQuantConfig(4, 2, key_group=8, value_group=8, residual=4, sink=2),
    # int8 keys / int4 values, blocks of 4, no window beyond the unfilled block
    1: KVQuantConfig(8, 4, key_group=4, value_group=16, residual=0),
}
_INT2 = KVQuantConfig(2, 2, key_group=8, value_group=16, residual=8, sink=1)
# three layers, 0 and 2 sharing a form (one group, stacked on the layer axis), 1 left 16-bit
FORMS_B = {0: _INT2, 1: KVDenseConfig(), 2: _INT2}


def _model(layers: int = 2):
    from slimfx.models import tiny_llama

    return tiny_llama(seed=3, num_hidden_layers=layers)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name → (model, KVExportResult, OrtKVDecoder) for the two per-layer form mixes."""
    out = {}
    d = tmp_path_factory.mktemp("onnx_kv")
    for name, forms in (("A", FORMS_A), ("B", FORMS_B)):
        model = _model(layers=len(forms))
        res = export_onnx_kv(model, d / f"tiny_{name}.onnx", forms)
        out[name] = (model, res, OrtKVDecoder(res.path, threads=1))
    return out


def _ids(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _code_scales(store, f, role):  # noqa: ANN001, ANN202
    """The float16 scale of every key (``role`` "k") or value code of a torch store."""
    if role == "k":  # one per channel per block of key_group tokens
        return store["k_scale"].repeat_interleave(f.key_group, dim=2)
    return store["v_scale"].repeat_interleave(f.value_group, dim=-1)  # per token per group


@pytest.mark.parametrize("name", ["A", "B"])
def test_logits_every_step_match_torch_kvcache(exported, name):
    model, res, dec = exported[name]
    forms = FORMS_A if name == "A" else FORMS_B
    cache = kv_ort_matches_torch(model, dec, forms, _ids(2, 11), steps=40, atol=ATOL)
    # the store ORT holds is the torch layer's store, reshaped into blocks (not bit-equal:
    # codes_close)
    for i, f in forms.items():
        if not isinstance(f, KVQuantConfig):
            assert dec.layer_store(i) is None
            continue
        layer = cache.layers[i]
        assert dec.layer_stored_tokens(i) == layer.n_stored > 0
        for n, arr in zip(STORE_NAMES, dec.layer_store(i)):
            t = layer.store[n].numpy()
            assert arr.dtype == t.dtype and arr.nbytes == t.nbytes, n
            a = arr.reshape(t.shape)
            if n.endswith("codes"):
                codes_close(a, t, f.key_bits if n[0] == "k" else f.value_bits, n,
                            _code_scales(layer.store, f, n[0]))  # fmt: skip
            else:  # one float16 ulp (2^-10 relative; 2^-24 absolute among subnormals)
                np.testing.assert_allclose(a, t, rtol=2**-10, atol=2**-24, err_msg=n)
        for got_w, want_w in zip(dec.layer_window(i), (layer.keys, layer.values)):
            np.testing.assert_allclose(got_w, want_w.numpy(), atol=ATOL, rtol=0)


def test_chunked_prefill_and_generate_match_torch(exported):
    """The prompt in chunks of 5 (each chunk's call flushes what left the window, like
    ``QuantizedKVLayer.update``), then greedy decoding: same tokens as the torch loop."""
    model, _, dec = exported["A"]
    ids = _ids(1, 23, seed=7)
    chunks = list(ids.split(5, dim=1))
    ref, fed, _ = kv_torch_calls(model, FORMS_A, chunks, steps=12)
    seq = dec.generate(ids, 13, prefill_chunk=5)
    want = torch.cat([ids, *fed, ref[-1][:, -1].argmax(-1)[:, None]], dim=1)
    np.testing.assert_array_equal(seq, want.numpy())
    # the same chunks step by step give the torch logits of every chunk
    dec.reset(1)
    for c, r in zip(chunks, ref):
        np.testing.assert_allclose(dec.step(c), r.numpy(), atol=ATOL, rtol=0)



@pytest.mark.parametrize("name", ["A", "B"])
def test_a_left_padded_batch_matches_torch_generate(exported, name):
    """Prompts of 13, 5 and 9 tokens left-padded into one batch under their attention mask:
    the real positions' logits of the prefill and of 30 greedy steps (across flushes; the
    padding enters the first blocks as it does in torch) are torch's with the same cache
    forms, and the greedy tokens HF ``generate()``'s."""
    model, _, dec = exported[name]
    forms = FORMS_A if name == "A" else FORMS_B
    ids, mask = left_padded(3, (13, 5, 9))
    kv_padded_ort_matches_torch(model, dec, forms, ids, mask, steps=30, atol=ATOL)

@pytest.mark.parametrize("tokens", [1, 9, 40, 61])
def test_cache_bytes_are_what_the_config_prices(exported, tokens):
    """After ``flush()`` the store arrays hold exactly the config's quantized bytes and the
    window holds the rest at the model's element size (fp32 here: twice the 16-bit price)."""
    _, _, dec = exported["A"]
    dec.reset(1)
    dec.step(_ids(1, tokens, seed=tokens))
    dec.flush()
    for i, f in FORMS_A.items():
        q = f.quantized_tokens(tokens)
        window_16 = (tokens - q) * SHAPE.kv_bytes_per_token(16)
        store = sum(a.nbytes for a in dec.layer_store(i))
        window = sum(w.nbytes for w in dec.layer_window(i))
        assert dec.layer_stored_tokens(i) == q
        assert store == f.cache_bytes(SHAPE, tokens) - window_16
        assert window == 2 * window_16  # float32 window entries: 4 bytes for the priced 2
    assert dec.cache_nbytes() == dec.store_nbytes() + dec.window_nbytes()
    assert dec.store_nbytes() + dec.window_nbytes() // 2 == sum(
        f.cache_bytes(SHAPE, tokens) for f in FORMS_A.values()
    )


def test_graph_inputs_and_ops(exported):
    """One window input per group of layers sharing a form, six store inputs per quantized
    group: uint8 codes, float16 scales/minimums, a dynamic block axis of its own."""
    _, res, _ = exported["A"]
    g = onnx.load(str(res.path)).graph
    inputs = {i.name: i for i in g.input}
    elem = onnx.TensorProto
    assert len(inputs) == 2 + 2 + 12  # ids, mask; two forms: two groups of one layer
    mask = [d.dim_param or d.dim_value for d in inputs["attention_mask"].type.tensor_type.shape.dim]
    assert inputs["attention_mask"].type.tensor_type.elem_type == elem.INT64
    assert mask == ["batch", "total"]
    for j, f in FORMS_A.items():
        dims = {}
        for n in STORE_NAMES:
            t = inputs[f"{n}_{j}"].type.tensor_type
            assert t.elem_type == (elem.UINT8 if n.endswith("codes") else elem.FLOAT16)
            dims[n] = [d.dim_param or d.dim_value for d in t.shape.dim]
        D = 16
        assert dims["k_codes"] == [1, "batch", 2, f"blocks_{j}", f.key_group, D * f.key_bits // 8]
        assert dims["k_scale"] == dims["k_min"] == [1, "batch", 2, f"blocks_{j}", D]
        assert dims["v_codes"][-1] == D * f.value_bits // 8
        assert dims["v_scale"][-2:] == [f.key_group, D // f.value_group]
        w = [d.dim_param or d.dim_value for d in inputs[f"window_{j}"].type.tensor_type.shape.dim]
        assert w[:4] == [1, 2, "batch", 2] and w[5] == D and w[4] not in (0, 1)
    assert [o.name for o in g.output] == ["logits", "present_window_0", "present_window_1"]
    ops = {n.op_type for n in g.node}
    assert {"BitShift", "BitwiseAnd", "Mul", "Add", "Cast"} <= ops  # unpack + dequantize
    assert "DequantizeLinear" not in ops  # float minimums: not an integer zero point
    assert len(res.flush_paths) == 2 and all(p.exists() for p in res.flush_paths)
    # B: layers 0 and 2 share a form (one group: its window and stores stacked on the layer
    # axis); the 16-bit layer has a window and no store; one quantized group, one flush graph
    _, res_b, dec_b = exported["B"]
    g_b = onnx.load(str(res_b.path)).graph
    names = [i.name for i in g_b.input]
    assert names == ["input_ids", "attention_mask", "window_0", "window_1",
                     *(f"{n}_0" for n in STORE_NAMES)]  # fmt: skip
    stacked = [d.dim_param or d.dim_value for d in g_b.input[2].type.tensor_type.shape.dim]
    assert stacked[:3] == [2, 2, "batch"]
    assert [idx for _, idx in dec_b.groups] == [[0, 2], [1]]
    assert len(res_b.flush_paths) == 1


def test_layers_sharing_a_form_are_stacked(exported):
    """B's layers 0 and 2 (one group): one-token steps after a prompt give torch's logits, and
    each layer's share of the stacked store holds what its torch layer stored."""
    model, _, dec = exported["B"]
    ids = _ids(1, 9, seed=3)
    cache = KVCache([FORMS_B[i] for i in range(3)])
    dec.reset(1)
    with torch.no_grad():
        for c in (ids, *_ids(1, 20, seed=4).split(1, dim=1)):
            ref = model(input_ids=c, past_key_values=cache, use_cache=True).logits
            np.testing.assert_allclose(dec.step(c), ref.numpy(), atol=ATOL, rtol=0)
    for i in (0, 2):
        layer = cache.layers[i]
        assert dec.layer_stored_tokens(i) == layer.n_stored > 0
        for n, arr in zip(STORE_NAMES, dec.layer_store(i)):
            bits = _INT2.key_bits if n[0] == "k" else _INT2.value_bits
            if n.endswith("codes"):
                codes_close(arr.reshape(layer.store[n].shape), layer.store[n].numpy(), bits, n)


def test_refusals_and_model_unchanged(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OnnxExportError, match="layer 0: kv lowrank k8 v8 whitened needs the "
                       "layer's attention rewritten .* k/v projections are dense"):
        export_onnx_kv(model, tmp_path / "x.onnx", KVLowRankConfig(8, 8, 1, "whitened"))
    with pytest.raises(OnnxExportError, match="head_dim 16 is not divisible by the value group 32"):
        export_onnx_kv(model, tmp_path / "x.onnx", KVQuantConfig(4, 4, 8, 32))
    with pytest.raises(OnnxExportError, match="bfloat16"):
        export_onnx_kv(_model().to(torch.bfloat16), tmp_path / "x.onnx", KVQuantConfig())
    assert not (tmp_path / "x.onnx").exists()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_export_forms_reads_the_model(exported):
    model = _model()
    assert export_forms(model) == [KVDenseConfig(), KVDenseConfig()]
    setattr(model.model.layers[1].self_attn, KV_FORM_ATTR, FORMS_A[1])
    assert export_forms(model) == [KVDenseConfig(), FORMS_A[1]]
    # a decoder opened on a fresh cache refuses a batch it was not reset for
    _, _, dec = exported["B"]
    dec.reset(1)
    with pytest.raises(ValueError, match="batch 2 ≠ the cache's 1"):
        dec.step(_ids(2, 3))


def test_the_decoder_checks_its_files(exported, tmp_path):
    """Flush graphs of another export are refused with the reason (each records its form); a
    step graph that records no geometry (exported before it was recorded) reads the kv heads
    and head_dim off its window input and decodes the same logits."""
    import shutil

    _, res, dec = exported["A"]
    for p in [res.path, *res.flush_paths]:
        shutil.copy(p, tmp_path / p.name)
    stem = res.path.stem
    swapped = tmp_path / f"{stem}.flush0.onnx", tmp_path / f"{stem}.flush1.onnx"
    swapped[0].rename(tmp_path / "t")
    swapped[1].rename(swapped[0])
    (tmp_path / "t").rename(swapped[1])
    with pytest.raises(ValueError, match=r"flush0.onnx was exported for kv k8v4 gk4 gv16 r0, "
                       r"but the step graph's group needs kv k4v2 gk8 gv8 r4 s2: the files come "
                       r"from different exports; export again"):  # fmt: skip
        OrtKVDecoder(tmp_path / res.path.name, threads=1)
    for p in res.flush_paths:
        shutil.copy(p, tmp_path / p.name)
    graph = onnx.load(str(tmp_path / res.path.name))
    kept = [m for m in graph.metadata_props if m.key != "slimfx.kv_geometry"]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(tmp_path / res.path.name))
    old = OrtKVDecoder(tmp_path / res.path.name, threads=1)
    assert (old.kv_heads, old.head_dim) == (dec.kv_heads, dec.head_dim) == (2, 16)
    dec.reset(2)
    old.reset(2)
    ids = _ids(2, 5)
    np.testing.assert_array_equal(old.step(ids), dec.step(ids))
