"""Hugging Face models that are not causal LMs — encoders, classifiers, encoder-decoders —
through the user's flows: load without ``model=``, ONNX at another length, the default
sensitivity weighting, calibration the model cannot run, padding."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import slimfx
from slimfx.cost.batches import CalibrationBatchError

tf = pytest.importorskip("transformers")

V = 200


def _bert(cls=None, positions: int = 64):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=positions)  # fmt: skip
    return (cls or tf.BertForSequenceClassification)(cfg).eval()


def _bart():  # noqa: ANN202
    torch.manual_seed(0)
    cfg = tf.BartConfig(vocab_size=V, d_model=64, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_position_embeddings=64)  # fmt: skip
    return tf.BartForConditionalGeneration(cfg).eval()


def _ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def _seq2seq_batch(seed: int, labels: bool = False) -> dict:
    b = {"input_ids": _ids(2, 12, seed=seed), "decoder_input_ids": _ids(2, 6, seed=seed + 50)}
    if labels:
        b["labels"] = _ids(2, 6, seed=seed + 90)
    return b


@pytest.mark.parametrize("build", [_bert, _bart], ids=["bert-classifier", "bart"])
def test_load_without_model_rebuilds_the_saved_class(tmp_path, build) -> None:  # noqa: ANN001
    model = build()
    calib = [_seq2seq_batch(i) for i in range(2)] if build is _bart else [_ids(2, 16, seed=i)
                                                                         for i in range(2)]  # fmt: skip
    small = slimfx.optimize(model, 0.5, calibration=calib, progress=False, cpu_kernels=False)
    slimfx.save(small, tmp_path / "m")
    loaded = slimfx.load(tmp_path / "m", cpu_kernels=False)
    assert type(loaded) is type(model)
    batch = calib[0]
    with torch.no_grad():
        got = loaded(**batch) if isinstance(batch, dict) else loaded(batch)
        want = small(**batch) if isinstance(batch, dict) else small(batch)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=1e-6)


def test_load_names_an_unknown_class_instead_of_guessing(tmp_path, monkeypatch) -> None:
    small = slimfx.optimize(_bert(), 0.5, calibration=[_ids(2, 16)], progress=False)
    slimfx.save(small, tmp_path / "m")
    man = tmp_path / "m" / "slimfx.json"
    info = json.loads(man.read_text())
    info["model_class"] = "mypackage.models.Custom"  # not transformers: never imported
    man.write_text(json.dumps(info))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelClass"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    import importlib

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: imported.append(name) or real(name, *a))  # fmt: skip
    with pytest.raises(ValueError, match="mypackage.models.Custom.*pass model="):
        slimfx.load(tmp_path / "m", verify=False)
    assert not any(n.startswith("mypackage") for n in imported)


@pytest.mark.parametrize("batch", [1, 2])
def test_onnx_of_an_encoder_runs_other_batch_sizes_and_lengths(tmp_path, batch) -> None:
    """A batch-1 example (the CLI's) too: torch.export fixes an axis its example has at 1."""
    small = slimfx.optimize(_bert(tf.BertModel), 0.5, calibration=[_ids(2, 16)] * 2,
                            progress=False, cpu_kernels=False)  # fmt: skip
    slimfx.export_onnx(small, tmp_path / "e.onnx", (_ids(batch, 16),))
    sess = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    ids = _ids(3, 21, seed=7)
    (got, *_) = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        want = small(ids).last_hidden_state
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_encoder_decoder_exports_and_runs_in_onnxruntime_at_another_shape(tmp_path) -> None:
    small = slimfx.optimize(_bart(), 0.5, calibration=[_seq2seq_batch(i) for i in range(2)],
                            progress=False, cpu_kernels=False)  # fmt: skip
    ids, dec = _ids(2, 12), _ids(2, 6, seed=2)
    slimfx.export_onnx(small, tmp_path / "s.onnx", (ids, None, dec))
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    ids, dec = _ids(3, 9, seed=3), _ids(3, 4, seed=4)
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, [ids.numpy(), dec.numpy()])))[0]
    with torch.no_grad():
        want = small(ids, None, dec, use_cache=False).logits
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_encoder_decoder_is_weighted_only_with_its_target_text() -> None:
    """labels=input_ids is a causal LM's loss, not an encoder-decoder's: without labels in the
    batches the default is unweighted, saying how to weight; with them, weighted."""
    plain = slimfx.optimize(_bart(), 0.5, calibration=[_seq2seq_batch(i) for i in range(2)],
                            progress=False)  # fmt: skip
    notes = " ".join(slimfx.report_of(plain).notes)
    assert "errors unweighted" in notes and "labels=" in notes
    assert {e.sensitivity for e in slimfx.report_of(plain).sites} == {1.0}
    weighted = slimfx.optimize(_bart(), 0.5, progress=False,
                               calibration=[_seq2seq_batch(i, labels=True) for i in range(2)])
    rep = slimfx.report_of(weighted)
    assert any("weighted by its loss sensitivity" in n for n in rep.notes)
    assert len({round(e.sensitivity, 6) for e in rep.sites}) > 1


@pytest.mark.parametrize("bad", [0, 1, 3], ids=["first", "held-out", "fitted"])
def test_a_batch_the_model_cannot_run_is_named_with_the_position_limit(bad: int) -> None:
    """Named by the user's index wherever it fails: capture (the first), the fitted batches'
    statistics, the held-out measurement (the last of 9)."""
    calib = [_ids(2, 16, seed=i) for i in range(9)]
    calib[8 if bad == 1 else bad] = _ids(1, 100)
    model = _bert(tf.BertModel, positions=64)
    want = rf"calibration batch {8 if bad == 1 else bad} \(.*\(1, 100\).*at most 64 positions"
    with pytest.raises(CalibrationBatchError, match=want):
        slimfx.optimize(model, 0.5, calibration=calib, progress=False)


def test_a_model_error_during_the_weighted_pass_is_raised_not_swallowed(monkeypatch) -> None:
    """The default weighting falls back to unweighted errors when there is no loss to take —
    not when the model itself fails (that would hide the error and run every batch twice)."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    real = type(model).forward

    def broken(self, *a, labels=None, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if labels is not None:
            raise RuntimeError("the loss code broke")
        return real(self, *a, **k)

    monkeypatch.setattr(type(model), "forward", broken)
    with pytest.raises(CalibrationBatchError, match="the loss code broke"):
        slimfx.optimize(model, 0.5, calibration=[_ids(2, 16, seed=i) for i in range(3)],
                        progress=False)  # fmt: skip


def test_texts_are_cut_to_the_models_positions_with_a_note() -> None:
    model = _bert(tf.BertModel, positions=40)
    text = " ".join(["word"] * 200)
    small = slimfx.optimize(model, 0.5, calibration=[text], progress=False,
                            tokenizer=lambda t: [5 + (i % 50) for i in range(len(t.split()))])
    notes = " ".join(slimfx.report_of(small).notes)
    assert "40-token windows" in notes


def test_float_features_into_a_model_with_an_embedding_are_taken_when_it_runs_them() -> None:
    class PositionFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Embedding(16, 32)  # registered first, but not the input's
            self.proj = nn.Linear(32, 32)
            self.out = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.proj(x) + self.pos.weight[: x.shape[1]]))

    torch.manual_seed(0)
    x = torch.randn(4, 10, 32)
    small = slimfx.optimize(PositionFirst().eval(), 0.5, calibration=[x, x + 1], progress=False)
    assert slimfx.report_of(small).totals["rewritten"] >= 1
    wide = slimfx.optimize(PositionFirst().eval(), 0.5, progress=False,
                           calibration=[x.double(), x.double() + 1])  # cast first, then run
    assert any("cast from torch.float64" in n for n in slimfx.report_of(wide).notes)
    with pytest.raises(TypeError, match="takes token ids"):  # floats its ids input cannot take
        slimfx.optimize(_bert(tf.BertModel), 0.5, calibration=[torch.rand(2, 16)],
                        progress=False)  # fmt: skip


def test_padding_in_the_calibration_is_removed_and_noted() -> None:
    """An encoder's right-padded rows, unpadded, compute what they did (its mask hid the pads
    from the real tokens); the statistics no longer see the pads."""
    ids = _ids(2, 16)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    model = _bert(tf.BertModel)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).last_hidden_state[1, :10]
        row = model(input_ids=ids[1:, :10]).last_hidden_state[0]
    torch.testing.assert_close(row, full, rtol=1e-5, atol=1e-5)
    small = slimfx.optimize(model, 0.5, progress=False,
                            calibration=[{"input_ids": ids, "attention_mask": mask}] * 2)
    assert any("without the padding (12 of 64 positions" in n
               for n in slimfx.report_of(small).notes)  # fmt: skip


def test_an_encoder_decoder_calibrated_with_labels_only_is_weighted() -> None:
    """Its decoder reads the labels (shifted right): the capture keeps them."""
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=1,
                      num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)  # fmt: skip
    model = tf.T5ForConditionalGeneration(cfg).eval()
    calib = [{"input_ids": _ids(2, 12, seed=i), "labels": _ids(2, 6, seed=i + 9)}
             for i in range(2)]  # fmt: skip
    rep = slimfx.report_of(slimfx.optimize(model, 0.5, calibration=calib, progress=False))
    assert rep.totals["rewritten"] > 0
    assert any("weighted by its loss sensitivity" in n for n in rep.notes)


def test_a_causal_lm_without_labels_falls_back_to_unweighted_errors() -> None:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    real = type(model).forward

    def no_labels(self, input_ids=None, attention_mask=None, use_cache=None):  # noqa: ANN001, ANN202
        return real(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    type(model).forward = no_labels
    try:
        rep = slimfx.report_of(slimfx.optimize(model, 0.5, progress=False,
                                               calibration=[_ids(2, 16, seed=i) for i in range(3)]))
    finally:
        type(model).forward = real
    assert any("unavailable" in n and "takes no labels" in n for n in rep.notes)


@pytest.mark.parametrize("message", [
    "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes",
    "CUDA out of memory. Tried to allocate 2.00 GiB",
])
def test_running_out_of_memory_is_not_blamed_on_the_batch(message: str) -> None:
    from slimfx.cost.batches import naming_batch

    with pytest.raises(RuntimeError, match="allocate") as e:
        with naming_batch(0, _ids(2, 4), nn.Linear(2, 2)):
            raise RuntimeError(message)
    assert not isinstance(e.value, CalibrationBatchError)
