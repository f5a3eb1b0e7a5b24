"""ONNX Runtime's decode over the compressed KV cache of a model with sliding-window layers.

A tiny Qwen2 (4 layers: full, sliding with a window of 6, full, full) keeps KIVI-style quantized
caches on layers 0 and 3 and 16-bit caches on the sliding layer and on layer 2 — two groups of
one form that hold different tokens. The step graph's window layer keeps
the last ``window - 1`` tokens, as transformers' sliding cache layer does — ONNX Runtime held
every token there before — and every call's logits stay torch's, unpadded and left-padded,
across steps well past the window. A compressed form on the sliding layer is refused.
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
