"""ONNX Runtime's decode over the compressed KV cache of a model with sliding-window layers.

A tiny Qwen2 (4 layers: full, sliding with a window of 6, full, full) keeps KIVI-style quantized
caches on layers 0 and 3 and 16-bit caches on the sliding layer and on layer 2 — two groups of
one form that hold different tokens. The step graph's window layer keeps
the last ``window - 1`` tokens, as transformers' sliding cache layer does — ONNX Runtime held
every token there before — and every call's logits stay torch's, unpadded and left-padded,
across steps well past the window. A compressed form on the sliding layer is refused; a model
optimized under a KV budget exports and generates its own tokens in ONNX Runtime.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import kv_ort_matches_torch, kv_padded_ort_matches_torch, left_padded

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
tf = pytest.importorskip("transformers")

from slimfx.backends.onnx_graph import OnnxExportError  # noqa: E402
from slimfx.backends.onnx_kv import export_onnx_kv  # noqa: E402
from slimfx.backends.onnx_kv_decoder import OrtKVDecoder  # noqa: E402
from slimfx.forms.kv.cache import KVCache  # noqa: E402
from slimfx.forms.kv.config import KVDenseConfig, KVQuantConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4  # as tests/backends/test_onnx_kv.py
WINDOW = 6
_INT4 = KVQuantConfig(4, 4, key_group=4, value_group=16, residual=2, sink=1)
FORMS = {0: _INT4, 1: KVDenseConfig(), 2: KVDenseConfig(), 3: _INT4}


def _model():
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, use_sliding_window=True,
                         sliding_window=WINDOW,
                         layer_types=["full_attention", "sliding_attention"] + ["full_attention"] * 2)  # fmt: skip
    model = tf.Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    res = export_onnx_kv(model, tmp_path_factory.mktemp("kv_sliding") / "q.onnx", FORMS)
    return model, OrtKVDecoder(res.path, threads=1)


def test_the_sliding_layer_keeps_its_window_and_logits_match(exported):
    model, dec = exported
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = kv_ort_matches_torch(model, dec, FORMS, ids, steps=14, atol=ATOL)
    assert dec.seq_length == 23
    # the window layer holds the last 5 tokens in a group of its own; the full layers all 23
    assert [idx for _, idx in dec.groups] == [[0, 3], [1], [2]]
    keys, values = dec.layer_window(1)
    assert keys.shape[2] == values.shape[2] == WINDOW - 1
    assert dec.layer_window(2)[0].shape[2] == 23
    torch_cache = KVCache.for_model(model, FORMS)  # transformers' sliding layer: the same 5
    with torch.no_grad():
        model(input_ids=ids, past_key_values=torch_cache, use_cache=True)
    assert torch_cache.layers[1].keys.shape[2] == WINDOW - 1
    assert dec.layer_stored_tokens(0) + dec.layer_window(0)[0].shape[2] == 23
    assert cache.layers[0].get_seq_length() == 23


def test_a_left_padded_batch_past_the_window_matches_torch_generate(exported):
    model, dec = exported
    ids, mask = left_padded(4, (11, 3, 7))
    kv_padded_ort_matches_torch(model, dec, FORMS, ids, mask, steps=12, atol=ATOL)
    assert dec.layer_window(1)[0].shape[2] == WINDOW - 1


def test_a_compressed_form_on_the_sliding_layer_is_refused(tmp_path):
    model = _model()
    with pytest.raises(OnnxExportError, match="layer 1: kv int4 .*sliding-window attention "
                       r"\(window 6\) is not supported"):  # fmt: skip
        export_onnx_kv(model, tmp_path / "x.onnx", _INT4)
    assert not (tmp_path / "x.onnx").exists()


def test_optimize_with_a_kv_budget_then_onnx_runtime_generates_its_tokens(tmp_path):
    """The user's path on a model mixing sliding and full layers: ``optimize`` with a KV
    budget compresses the full layers only (the sliding ones keep their 16-bit window, priced
    at it), ``export_onnx_kv`` exports what the model carries, and ONNX Runtime — a left-padded
    batch, the prompt in chunks — generates HF ``generate()``'s tokens, the sliding layers
    holding their window."""
    import slimfx

    cfg = tf.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, use_sliding_window=True, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 256, (1, 64), generator=g) for _ in range(6)]
    small = slimfx.optimize(model, slimfx.Budget(kv=0.4, context=128), calibration=calib,
                            progress=False)  # fmt: skip
    res = export_onnx_kv(small, tmp_path / "q.onnx")
    assert [f.kind for f in res.forms][::2] == ["kv_dense", "kv_dense"]  # the sliding layers
    assert all(f.kind != "kv_dense" for f in res.forms[1::2])
    dec = OrtKVDecoder(res.path, threads=1)
    ids = torch.randint(1, 256, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    want = small.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                          pad_token_id=0)  # fmt: skip
    got = dec.generate(ids, 16, attention_mask=mask, pad_token_id=0, prefill_chunk=7)
    assert torch.equal(got, want)  # torch in, torch out
    assert dec.layer_window(0)[0].shape[2] == dec.layer_window(2)[0].shape[2] == 7
