"""What a checkpoint directory can hold that the streamed optimize must not get wrong: layers
that attend differently (each block got block 0's mask), weights saved again under the same
file names (a resume reused the old statistics), NaN weights (a misleading error, late), float
tensors stored in another float type (a crash mid-run) or as integers, a shard that is not
safetensors (a traceback naming no file), both weight layouts (read in another order than
``from_pretrained``), a ``work=`` folder inside ``out``; and the tokenizer files it copies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

import slimfx  # noqa: E402
from slimfx.stream import CheckpointError, optimize_checkpoint  # noqa: E402

from ._util import build, calibration, save_checkpoint  # noqa: E402


def _run(ckpt: Path, out: Path, **kw):  # noqa: ANN003, ANN202
    return optimize_checkpoint(ckpt, 0.5, calibration=calibration(3), out=out, progress=False,
                               fisher=False, **kw)  # fmt: skip


def _rewrite(ckpt: Path, fn) -> None:  # noqa: ANN001 - edit model.safetensors' tensors
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_layers_that_attend_differently_are_refused(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                      sliding_window=4, max_window_layers=1)  # fmt: skip
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"its layers attend differently \(full_attention "
                       r"×1, sliding_attention ×1\).*optimize them in memory"):  # fmt: skip
        _run(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_saved_again_under_the_same_names_are_not_resumed_from(tmp_path: Path) -> None:
    ckpt, work = save_checkpoint(tmp_path / "ckpt"), tmp_path / "work"
    first = _run(ckpt, tmp_path / "a", work=work, keep_work=True)
    _rewrite(ckpt, lambda t: t["model.layers.1.mlp.up_proj.weight"].mul_(3.0))
    os.utime(ckpt / "model.safetensors", ns=(1, 1))  # whatever the clock: another stamp
    again = _run(ckpt, tmp_path / "b", work=work)
    assert any("held another run's statistics; started over" in n for n in again.report.notes)
    assert again.plan.to_dict() != first.plan.to_dict() or again.report.sites != first.report.sites


def test_nan_weights_are_named_before_anything_is_written(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt")
    _rewrite(ckpt, lambda t: t["model.layers.1.self_attn.q_proj.weight"].__setitem__((0, 0),
                                                                                     float("nan")))
    with pytest.raises(ValueError, match=r"1 weight\(s\) contain NaN or inf: "
                       r"model.layers.1.self_attn.q_proj.weight"):  # fmt: skip
        _run(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_floats_stored_in_another_type_are_cast_and_integers_refused(tmp_path: Path) -> None:
    """A bf16 checkpoint with its norms stored in float32 loads with from_pretrained (cast to
    the model's type): streamed too (it crashed mid-run). A float weight stored as int8 is
    refused up front, named."""
    ckpt = tmp_path / "ckpt"
    build().to(torch.bfloat16).save_pretrained(ckpt)
    _rewrite(ckpt, lambda t: t.update({k: v.float() for k, v in t.items() if "norm" in k}))
    res = _run(ckpt, tmp_path / "out")
    assert len(res.plan.rewrites()) > 0 and slimfx.load(tmp_path / "out").dtype == torch.bfloat16
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight":
                                       t["model.layers.0.self_attn.q_proj.weight"].to(torch.int8)}))
    with pytest.raises(CheckpointError, match=r"type mismatch: model.layers.0.self_attn.q_proj"
                       r".weight: stored as I8, the model's .* is torch.bfloat16"):  # fmt: skip
        _run(ckpt, tmp_path / "out2")


def test_a_broken_shard_is_named(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors"):
        _run(ckpt, tmp_path / "out")


def test_both_layouts_are_read_as_from_pretrained_reads_them(tmp_path: Path) -> None:
    """Shards of one model and a model.safetensors of another: from_pretrained reads the
    single file, the streamed run read the shards."""
    ckpt = save_checkpoint(tmp_path / "ckpt", shard="60KB")
    other = tmp_path / "other"
    build(seed=1).save_pretrained(other)
    (ckpt / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    res = _run(ckpt, tmp_path / "out")
    ref = slimfx.optimize(build(seed=1), 0.5, calibration=calibration(3), fisher=False,
                          progress=False)  # fmt: skip
    assert res.plan.to_dict() == slimfx.report_of(ref).meta["plan"]


def test_a_work_folder_inside_out_is_refused_and_tokenizer_files_are_copied(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"work=.* is inside out .*: give a work folder"):
        _run(ckpt, tmp_path / "out", work=tmp_path / "out" / "w")
    tok = {"model_max_length": 32, "tokenizer_class": "PreTrainedTokenizerFast"}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok))
    (ckpt / "chat_template.jinja").write_text("{{ messages }}")
    _run(ckpt, tmp_path / "out")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / name).read_bytes() == (ckpt / name).read_bytes()
    slimfx.load(tmp_path / "out")  # the manifest covers them
    assert (tmp_path / "out" / "slimfx.safetensors").is_file()  # not from_pretrained's name
    with pytest.raises(CheckpointError, match=r"a slimfx save \(already rewritten\)"):
        _run(tmp_path / "out", tmp_path / "out2")


def test_the_streamed_report_has_the_in_memory_notes(tmp_path: Path) -> None:
    """The include/exclude and roofline-latency notes the in-memory report carries (the
    streamed report left them out)."""
    ckpt = save_checkpoint(tmp_path / "ckpt")
    kw = dict(calibration=calibration(3), fisher=False, exclude=["*mlp*"], progress=False)
    res = optimize_checkpoint(ckpt, slimfx.Budget(latency=0.95), out=tmp_path / "out", **kw)
    ref = slimfx.report_of(slimfx.optimize(build(), slimfx.Budget(latency=0.95), **kw))
    for start in ("include/exclude left out 9 linear site(s)", "latency budget priced by the "
                  "cpu roofline"):  # fmt: skip
        assert any(n.startswith(start) for n in ref.notes)
        assert any(n.startswith(start) for n in res.report.notes), start
