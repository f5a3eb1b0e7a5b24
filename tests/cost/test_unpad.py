"""Padded calibration batches are split into rows without their padding (``cost.batches.unpad``,
applied by ``validate.check_batches``): left-padded rows put pad tokens at the first positions
and shift the real ones', which corrupts every statistic (SmolLM2 at budget 0.3: held-out
perplexity 57.3 with left-padded calibration vs 34.6 on the same texts unpadded)."""

from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx import validate
from slimfx.cost.batches import call_model, unpad

tf = pytest.importorskip("transformers")

V = 100


def _padded(lengths: list[int], side: str, t: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(t - n, t) if side == "left" else slice(0, n)
        ids[i, cols] = torch.randint(3, V, (n,), generator=g)
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("side", ["left", "right"])
def test_rows_keep_their_tokens_and_equal_lengths_share_a_batch(side: str) -> None:
    b = _padded([5, 12, 5, 8], side)
    b["token_type_ids"] = torch.arange(12).expand(4, 12) * b["attention_mask"]
    b["row_scale"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b["flag"] = "kept"
    rows, why = unpad(b)
    assert why == ""
    assert [r["input_ids"].shape for r in rows] == [(2, 5), (1, 12), (1, 8)]
    real = [b["input_ids"][i][b["attention_mask"][i] == 1] for i in range(4)]
    assert torch.equal(rows[0]["input_ids"], torch.stack([real[0], real[2]]))
    assert torch.equal(rows[1]["input_ids"][0], real[1])
    assert torch.equal(rows[2]["input_ids"][0], real[3])
    assert all(bool((r["attention_mask"] == 1).all()) for r in rows)
    assert torch.equal(rows[0]["row_scale"], torch.tensor([1.0, 3.0]))
    assert torch.equal(rows[0]["token_type_ids"][1], b["token_type_ids"][2][b["attention_mask"][2] == 1])
    assert rows[2]["flag"] == "kept"


def test_broadcast_position_ids_and_float_masks_split_too() -> None:
    b = _padded([5, 12], "right")
    rows, _ = unpad({**b, "position_ids": torch.arange(12)[None]})
    assert [r["position_ids"].tolist() for r in rows] == [[list(range(5))], [list(range(12))]]
    rows, _ = unpad({**b, "attention_mask": b["attention_mask"].float()})
    assert [r["input_ids"].shape for r in rows] == [(1, 5), (1, 12)]


def test_batches_that_cannot_be_split_stay_as_they_are_with_the_reason() -> None:
    b = _padded([5, 12], "right")
    assert unpad({"input_ids": b["input_ids"]}) == (None, "")  # no mask
    assert unpad(_padded([12, 12], "right")) == (None, "")  # no padding

    def why(batch: dict) -> str:
        rows, reason = unpad(batch)
        assert rows is None and reason
        return reason

    holed = {k: v.clone() for k, v in b.items()}
    holed["attention_mask"][1, 4] = 0  # packed sequences: a hole inside a row
    assert why(holed) == "row 1's mask has a hole (packed sequences?)"
    empty = {k: v.clone() for k, v in b.items()}
    empty["attention_mask"][0] = 0
    assert why(empty) == "row 0 is all padding"
    assert why({**b, "other": torch.zeros(3, 2)}) == "'other' has 3 rows, the mask 2"
    assert "other than 0 and 1" in why({**b, "attention_mask": b["attention_mask"] * 2})
    assert unpad({**b, "attention_mask": b["attention_mask"][:, None, None]}) == (None, "")
    # a mask over audio frames (Whisper's features), not tokens
    frames = {"input_features": torch.zeros(2, 8, 12), "attention_mask": b["attention_mask"]}
    assert why(frames) == "no input_ids / inputs_embeds: its mask need not be over tokens"
    # an unknown tensor as long as the tokens: per token or not cannot be told
    assert "'extra' has an axis as long as the mask (12)" in why({**b, "extra": b["input_ids"]})
    assert unpad({**b, "extra": b["input_ids"][:, :5]})[0] is not None


def test_labels_per_token_only_where_they_are_token_targets() -> None:
    b = _padded([5, 12], "right")
    # a causal LM's / token classifier's labels: cut with the tokens
    rows, _ = unpad({**b, "labels": b["input_ids"].clone()})
    assert [r["labels"].shape for r in rows] == [(1, 5), (1, 12)]
    # a sequence classifier's labels (n,) and float multi-label targets (n, t): per row
    rows, _ = unpad({**b, "labels": torch.tensor([0, 1])})
    assert [r["labels"].tolist() for r in rows] == [[0], [1]]
    rows, _ = unpad({**b, "labels": torch.rand(2, 12)})
    assert [r["labels"].shape for r in rows] == [(1, 12), (1, 12)]
    # an encoder-decoder's target side, of another length or padded to the source's length
    for length in (6, 12):
        tgt = {"labels": torch.full((2, length), 7), "decoder_attention_mask": torch.ones(2, length)}
        rows, _ = unpad({**b, **tgt}, seq2seq=True)
        assert [r["labels"].shape for r in rows] == [(1, length), (1, length)]
        assert [r["input_ids"].shape for r in rows] == [(1, 5), (1, 12)]
    rows, _ = unpad({**b, "labels": torch.full((2, 6), 7)})  # not per token: kept per row
    assert [r["labels"].shape for r in rows] == [(1, 6), (1, 6)]


def test_padding_is_no_target_when_labels_come_from_the_ids() -> None:
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, labels=None):  # noqa: ANN001, ANN201
            seen["labels"] = labels
            return input_ids

    b = _padded([5, 12], "left")
    call_model(Probe(), b, labels=True)
    want = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    assert torch.equal(seen["labels"], want)


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def _site_errors(model: torch.nn.Module, calibration: list, heldout: list) -> dict:
    torch.manual_seed(0)
    rep = slimfx.report_of(slimfx.optimize(model, 0.5, calibration=calibration, heldout=heldout,
                                           progress=False))  # fmt: skip
    return rep, {s.fqn: ([c["error"] for c in s.candidates], s.sensitivity) for s in rep.sites}


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_calibration_plans_as_its_rows_unpadded(side: str) -> None:
    """The same real tokens, padded into one batch or given row by row: the same statistics,
    errors and loss weights, hence the same plan (left padding moved every one before)."""
    model = _llama()
    b = _padded([7, 12, 9], side)
    rows = [b["input_ids"][i][b["attention_mask"][i] == 1][None] for i in range(3)]
    rep, padded = _site_errors(model, [b], rows)  # every batch fits (held-out ones given)
    _, plain = _site_errors(model, rows, rows)
    assert padded.keys() == plain.keys() and padded
    for fqn, (errors, weight) in plain.items():
        assert padded[fqn][0] == pytest.approx(errors, rel=1e-4, abs=1e-9), fqn
        assert padded[fqn][1] == pytest.approx(weight, rel=1e-4), fqn
    assert any("split into their rows without the padding (8 of 36 positions" in n
               for n in rep.notes)  # fmt: skip


def test_batches_kept_padded_are_named_in_a_note() -> None:
    model = _llama()
    b = _padded([7, 12], "right")
    b["attention_mask"][1, 3] = 0
    notes: list[str] = []
    out = validate.check_batches(model, [_padded([12, 12], "left"), b], notes)
    assert len(out) == 2 and out[1]["input_ids"].shape == (2, 12)
    assert any("6 of 48 positions are padding (attention_mask 0) in batches kept as they are "
               "(batch 1: row 1's mask has a hole" in n for n in notes), notes  # fmt: skip


def test_the_users_batches_are_what_fit_and_held_out_splits_and_errors_count() -> None:
    """A padded batch splits into pieces of one user batch: one batch stays one (fit = held
    out, as before), the held-out share is taken in user batches, errors name the user's."""
    from slimfx.cost.batches import CalibrationBatchError, batch_units
    from slimfx.site_selection import _split_heldout

    notes: list[str] = []
    model = _llama()
    pieces = validate.check_batches(model, [_padded([5, 12, 12, 7], "right")], notes)
    assert [p["input_ids"].shape for p in pieces] == [(1, 5), (2, 12), (1, 7)]
    assert [(p.origin, p.rows) for p in pieces] == [(0, (0,)), (0, (1, 2)), (0, (3,))]
    fit, held, note = _split_heldout(pieces, None)
    assert fit == held == pieces and note.startswith("only one calibration batch")
    many = validate.check_batches(model, [_padded([5, 12], "left", seed=i) for i in range(8)])
    assert len(many) == 16 and len(batch_units(many)) == 8
    fit, held, _ = _split_heldout(many, None)
    assert [p.origin for p in held] == [7, 7] and len(fit) == 14

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4,
                                            n_positions=16)).eval()  # fmt: skip
    calib = [_padded([5, 12], "right", t=12), _padded([20, 8], "right", t=20)]
    with pytest.raises(CalibrationBatchError, match=r"calibration batch 1 \(its row\(s\) 0 "
                       r"without padding: input_ids: \(1, 20\)"):  # fmt: skip
        slimfx.optimize(gpt2, 0.5, calibration=calib, progress=False)


def test_a_model_not_from_hugging_face_keeps_its_padded_length() -> None:
    """Its rows may need their padded length (a flatten-then-linear head): kept, with why."""

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mix = torch.nn.Embedding(V, 8), torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(12 * 8, 4)

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            h = self.mix(self.emb(input_ids)) * attention_mask[..., None]
            return self.head(h.flatten(1))

    rep = slimfx.report_of(slimfx.optimize(Fixed().eval(), 0.5, progress=False,
                                           calibration=[_padded([5, 12], "right")] * 2))
    assert any("kept as they are (batch 0: not a Hugging Face model" in n for n in rep.notes)


def test_a_4d_mask_is_no_padding() -> None:
    ids = torch.randint(3, V, (2, 6))
    causal = torch.tril(torch.ones(6, 6))[None, None].expand(2, 1, 6, 6).clone()
    notes: list[str] = []
    out = validate.check_batches(_llama(), [{"input_ids": ids, "attention_mask": causal}], notes)
    assert out[0]["attention_mask"].shape == (2, 1, 6, 6) and not any("padding" in n for n in notes)


def test_the_attention_functions_are_restored_however_deep() -> None:
    """A sub-config with sub-configs (T5Gemma 2's encoder: text and vision) comes back as it
    was after a switch of the attention function (one level only on transformers 5.17)."""
    from transformers import CONFIG_MAPPING
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from slimfx.forms.kv.fused import attention_function

    if "t5gemma2" not in CONFIG_MAPPING:
        pytest.skip("transformers without T5Gemma 2")
    with torch.device("meta"):
        model = tf.T5Gemma2ForConditionalGeneration(CONFIG_MAPPING["t5gemma2"]())

    def walk(c, key="top"):  # noqa: ANN001, ANN202
        out = {key: c._attn_implementation}
        for k in c.sub_configs:
            if getattr(c, k, None) is not None:
                out |= walk(getattr(c, k), f"{key}.{k}")
        return out

    try:
        model.set_attn_implementation({"": "sdpa", "encoder": {"": "sdpa", "vision_config": "eager"}})
    except ValueError:
        pytest.skip("this transformers takes no nested attention settings")
    before = walk(model.config)
    assert before["top.encoder.vision_config"] == "eager"
    with attention_function(model, "slimfx_probe", sdpa_attention_forward):
        assert walk(model.config)["top.encoder.vision_config"] == "slimfx_probe"
    assert walk(model.config) == before
