"""Fault injection: bad input to every public entry point raises the stated error type with a
message naming the cause — and leaves the user's model bit-identical (module classes,
state_dict, forward output, no report)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import slimfx
from robustness._util import Frozen, fails_untouched, feats, ids, llama, mlp, out_of
from robustness._util import opt as _opt
from slimfx.planning.configs import DenseConfig, LowRankConfig, QuantConfig
from slimfx.planning.plan import Plan
from slimfx.planning.problem import Budget

X = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
IDS = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(9))
INT8 = QuantConfig(bits=8, group_size=32)


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("inplace", [False, True])
def test_wrong_width_names_batch_and_first_layer(inplace):
    m = mlp()
    calib = [*feats(2), torch.randn(16, 31)]
    fails_untouched(m, X, lambda: _opt(m, calib, inplace=inplace), ValueError,
                    r"calibration batch 2: the tensor has shape \(16, 31\).*first layer \(0\) "
                    r"takes 32 features")


def test_wrong_width_is_named_for_a_model_in_training_mode():
    """A freshly built module is in training mode: the width check still runs it (in eval
    mode, so no batch-norm statistics move) and names the batch; every mode comes back."""
    m = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.Dropout(0.1), nn.Linear(16, 8))
    m.train()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"calibration batch 0: .*takes 32 features"):
        _opt(m, [torch.randn(16, 31)])
    assert all(mod.training for mod in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_float_ids_for_a_language_model():
    m = llama()
    calib = [c.float() for c in ids(2)]
    fails_untouched(m, IDS, lambda: _opt(m, calib), TypeError,
                    r"calibration batch 0: the tensor is torch.float32, but LlamaForCausalLM "
                    r"takes token ids")


@pytest.mark.parametrize("bad, shown", [(256, "256"), (-1, "-1")])
def test_token_ids_outside_vocab(bad, shown):
    m = llama()
    calib = ids(3)
    calib[1][0, 3] = bad
    fails_untouched(m, IDS, lambda: _opt(m, calib), ValueError,
                    rf"calibration batch 1: token id {shown} is outside \[0, 256\)")


def test_token_ids_of_three_dims_are_rejected_before_the_capture():
    m = llama()
    calib = [c[None] for c in ids(2)]
    fails_untouched(m, IDS, lambda: _opt(m, calib), ValueError,
                    r"calibration batch 0: the tensor has shape \(1, \d+, \d+\); token ids are "
                    r"\(batch, seq\) or \(seq,\)")


def test_nan_in_a_batch_is_rejected_before_the_whitening():
    m = mlp()
    calib = feats(3)
    calib[2][0, 0] = float("nan")
    fails_untouched(m, X, lambda: _opt(m, calib, families=("lowrank",)), ValueError,
                    r"calibration batch 2: the tensor has 1 NaN/inf value")


def test_zero_token_batch_is_rejected():
    m = llama()
    calib = [*ids(2), torch.zeros(1, 0, dtype=torch.long)]
    fails_untouched(m, IDS, lambda: _opt(m, calib), ValueError,
                    r"calibration batch 2: the tensor is empty \(shape \(1, 0\)\)")


def test_bad_containers_name_the_batch():
    m = mlp()
    fails_untouched(m, X, lambda: _opt(m, 7), TypeError, r"calibration must be a list, tuple")
    fails_untouched(m, X, lambda: _opt(m, [X, [1, 2]]), TypeError,
                    r"calibration batch 1: expected a tensor, a dict")


def test_bare_dict_is_one_batch_of_kwargs_and_generators_work():
    m = llama()
    batch = {"input_ids": ids(1, 32)[0]}
    new = _opt(m, batch)
    assert slimfx.report_of(new).sites
    new2 = _opt(m, (b for b in ids(2, 32)))
    assert slimfx.report_of(new2).sites


def test_other_float_dtype_is_cast_with_a_note():
    m = mlp()
    frozen = Frozen(m, X)
    new = _opt(m, [f.double() for f in feats(3)])
    frozen.check()
    notes = " ".join(slimfx.report_of(new).notes)
    assert "cast from torch.float64 to the model's torch.float32" in notes


def test_bf16_model_with_fp32_calibration_is_cast_with_a_note():
    m = mlp().to(torch.bfloat16)
    new = _opt(m, feats(3))
    assert "cast from torch.float32 to the model's torch.bfloat16" in " ".join(
        slimfx.report_of(new).notes
    )


# --------------------------------------------------------------------------- the model


def test_meta_model_is_refused():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    with pytest.raises(ValueError, match=r"on the 'meta' device \(e.g. 0.weight\)"):
        _opt(m, feats(2))


def test_torchscript_model_is_refused():
    m = torch.jit.script(mlp())
    with pytest.raises(TypeError, match="TorchScript module"):
        _opt(m, feats(2))


def test_compiled_model_is_unwrapped_and_saves(tmp_path):
    m = mlp()
    compiled = torch.compile(m, backend="eager")
    new = _opt(compiled, feats(3))
    assert type(new) is nn.Sequential
    slimfx.save(torch.compile(new, backend="eager"), tmp_path / "c")  # _orig_mod unwrapped
    loaded = slimfx.load(tmp_path / "c", mlp(5))
    assert torch.equal(out_of(loaded, X), out_of(new, X))


def test_optimizing_an_optimized_model_is_refused_with_what_to_do(tmp_path):
    m = mlp()
    first = _opt(m, feats(3), exclude=["2"])
    fails_untouched(first, X, lambda: _opt(first, feats(3)), ValueError,
                    r"already rewritten by slimfx \(1 site\(s\), e.g. '0'\).*Optimize the "
                    r"original dense model in one call")
    fails_untouched(first, X, lambda: _opt(first, feats(3), inplace=True), ValueError,
                    "already rewritten")
    slimfx.save(first, tmp_path / "first")  # the first pass still saves and loads
    assert torch.equal(out_of(slimfx.load(tmp_path / "first", mlp(3)), X), out_of(first, X))


def test_multihead_attention_out_proj_is_left_alone_with_a_reason():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(1, 8, 32)
    new = slimfx.optimize(m, 0.6, calibration=[torch.randn(2, 8, 32) for _ in range(3)],
                          families=("int8",), inplace=True, progress=False)
    assert new is m
    assert isinstance(m.attn.out_proj, nn.Linear) and type(m.fc) is not nn.Linear
    notes = " ".join(slimfx.report_of(m).notes)
    assert "attn.out_proj: left dense: its parent MultiheadAttention reads `out_proj.weight`" in notes
    assert m(x).shape == (1, 8, 32)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: Budget(bits="4"), TypeError, r"Budget.bits must be a number, got '4' \(str\)"),
        (lambda: Budget(memory=True), TypeError, r"Budget.memory must be a number, got True"),
        (lambda: Budget(latency=float("nan")), ValueError, "Budget.latency must be finite"),
    ],
)
def test_budget_field_types(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"target": "tpu"}, r"unknown target 'tpu'; known: .*cpu"),
        ({"workload": "train"}, r"unknown workload 'train'; known: decode, prefill"),
        ({"families": ("int3",)}, r"unknown family \['int3'\]; known: .*int8"),
        ({"seq_len": 0}, r"seq_len must be an int ≥ 1, got 0"),
        # found before any work (they surfaced after calibration or capture, minutes in)
        ({"solver": "milpp"}, r"unknown solver 'milpp'; known: 'auto', 'milp'"),
        ({"sensitivity": "fishr"}, r"unknown sensitivity 'fishr'; known: 'geo'"),
        ({"backend": "onxx"}, r"unknown backend 'onxx'; known: None, 'eager'"),
        ({"include": []}, r"include=\[\] selects no site: pass None"),
    ],
)
def test_option_names_are_listed(kw, match):
    m = mlp()
    fails_untouched(m, X, lambda: _opt(m, feats(2), **kw), ValueError, match)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"inplace": "no"}, r"inplace must be True or False, got 'no'"),  # it rewrote in place
        ({"fisher": "yes"}, r"fisher must be True or False, got 'yes'"),
        ({"example_inputs": X}, r"example_inputs is a tuple of the model's positional arguments"),
    ],
)
def test_flags_and_example_inputs_are_typed(kw, match):
    m = mlp()
    fails_untouched(m, X, lambda: _opt(m, feats(2), **kw), TypeError, match)


def test_numbers_of_other_types_and_default_families_are_taken():
    """numpy's float32 budget (a Real, not a float) was refused; families=None crashed after
    the capture: the defaults."""
    import numpy as np

    a = slimfx.report_of(_opt(mlp(), feats(2), budget=np.float32(0.6), families=None))
    b = slimfx.report_of(_opt(mlp(), feats(2), budget=0.6, families=None))
    assert a.budget["memory"] == pytest.approx(0.6) and isinstance(a.budget["memory"], float)
    assert [s.chosen for s in a.sites] == [s.chosen for s in b.sites]
    assert Budget(memory=np.float64(0.5), kv=np.float32(0.25)).kv == 0.25


def test_a_dataloader_of_id_tensors_plans_as_the_tensors():
    """A DataLoader over a TensorDataset yields [ids]: a Hugging Face model got it as a
    positional argument — the capture failed, the errors went unweighted ('not a causal LM')
    and 5 of 14 sites chose another form."""
    from torch.utils.data import DataLoader, TensorDataset

    batch = torch.cat(ids(4, 16))
    loader = DataLoader(TensorDataset(batch), batch_size=2)
    runs = [slimfx.report_of(_opt(llama(), c, budget=0.5, families=None))
            for c in (list(batch.split(2)), loader)]  # fmt: skip
    assert runs[1].capture["method"] == "export"
    assert [s.chosen for s in runs[0].sites] == [s.chosen for s in runs[1].sites]
    assert not any("not a causal LM" in n for n in runs[1].notes)


def test_token_batches_past_the_models_positions_are_noted():
    """A RoPE model runs past max_position_embeddings without a word (GPT-2 and BERT fail):
    the statistics then include positions it was not trained for."""
    m = llama()
    n = m.config.max_position_embeddings
    long = [torch.randint(0, 256, (1, n + 8), generator=torch.Generator().manual_seed(1))]
    notes = slimfx.report_of(_opt(m, long, families=None)).notes
    assert any(x.startswith(f"calibration: batches of up to {n + 8} tokens, past the model's "
                            f"max_position_embeddings ({n})") for x in notes)  # fmt: skip
    assert not any("past the model's" in x for x in slimfx.report_of(_opt(llama(), ids(2, 16),
                                                                           families=None)).notes)


def test_heldout_texts_are_tokenized_and_an_empty_heldout_is_refused():
    from slimfx.models import tiny_llama

    def tok(text):  # noqa: ANN001, ANN202 - a tokenizer: ids of the characters
        return {"input_ids": [ord(c) % 256 for c in text]}

    texts = ["the cat sat on the mat " * 8, "a dog ran in the park " * 8]
    kw = dict(calibration=texts, tokenizer=tok, seq_len=32, progress=False)
    rep = slimfx.report_of(slimfx.optimize(tiny_llama(), 0.6, heldout=["held out text " * 10],
                                           **kw))  # fmt: skip
    assert all(s.measured_sqnr_db is not None for s in rep.sites if s.status == "applied")
    m = tiny_llama()
    with pytest.raises(ValueError, match="heldout is empty: pass held-out batches"):
        slimfx.optimize(m, 0.6, heldout=[], **kw)
    note = slimfx.report_of(slimfx.optimize(m, 0.6, fisher=False, sensitivity="probe", **kw))
    assert any(n.startswith("sensitivity='probe' is not used: fisher=False") for n in note.notes)
    # held-out batches that are calibration batches: the SQNR column is not held out — noted
    calib = ids(3, 16)
    rep = slimfx.report_of(_opt(llama(), calib, heldout=[calib[1]], families=None))
    assert "heldout: 1 of 1 batch(es) are calibration batches (e.g. batch 0): their measured " \
        "SQNR is not held out" in rep.notes


def test_failing_inplace_rewrite_rolls_back(monkeypatch):
    """An exception after the swap (here: while measuring) restores the model exactly."""
    from slimfx import stages

    m = mlp()

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(stages, "measure_site_errors", boom)
    fails_untouched(m, X, lambda: _opt(m, feats(3), inplace=True), RuntimeError, "injected")


def test_failing_inplace_rewrite_of_a_tied_head_restores_the_tie(monkeypatch):
    """Rewriting a tied lm_head unties the config; a failure afterwards puts the tie back."""
    from slimfx import stages

    m = llama()
    assert m.config.tie_word_embeddings

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "measure_site_errors", boom)
    plan = Plan({"lm_head": INT8})
    fails_untouched(m, IDS, lambda: slimfx.optimize(m, plan=plan, calibration=ids(3),
                                                    inplace=True, progress=False),
                    KeyboardInterrupt, "^$")
    assert m.config.tie_word_embeddings
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_sequential_inplace_failing_in_a_later_block_rolls_back(monkeypatch):
    from slimfx import stages

    m = llama()
    real, calls = stages.apply_plan, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("block 2 failed")
        return real(*a, **k)

    monkeypatch.setattr(stages, "apply_plan", second_fails)
    fails_untouched(m, IDS, lambda: _opt(m, ids(3), sequential=True, inplace=True),
                    RuntimeError, "block 2 failed")
    assert len(calls) == 2  # the first block had been swapped in before the failure


def test_heldout_is_checked_like_calibration():
    m = mlp()
    held = feats(2)
    held[1][3, 3] = float("inf")
    fails_untouched(m, X, lambda: _opt(m, feats(3), heldout=held), ValueError,
                    r"heldout batch 1: the tensor has 1 NaN/inf value")


# --------------------------------------------------------------------------- plan JSON


def _plan_file(tmp_path, **change):
    d = Plan({"0": INT8, "2": DenseConfig()}, {"0": (64, 32), "2": (16, 64)}).to_dict()
    for k, v in change.items():
        if v is ...:
            del d[k]
        else:
            d[k] = v
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize(
    "change, match",
    [
        ({"version": "1"}, r"field 'version' must be a positive integer, got '1'"),
        ({"version": None}, r"field 'version' must be a positive integer, got None"),
        ({"decisions": ...}, r"field 'decisions' is missing"),
        ({"decisions": {"0": {"kind": "quant", "bits": 8, "colour": 1}}},
         r"decisions\['0'\] has unknown field\(s\) \['colour'\] for kind 'quant'"),
        ({"decisions": {"0": {"bits": 8}}}, r"decisions\['0'\].kind must be a string"),
        ({"decisions": {"0": {"kind": "lowrank", "rank": "8"}}}, r"decisions\['0'\]"),
        ({"shapes": {"0": [64]}}, r"shapes\['0'\] must be \[out_features, in_features\]"),
    ],
)
def test_plan_json_fields_are_typed_and_named(tmp_path, change, match):
    p = _plan_file(tmp_path, **change)
    with pytest.raises(ValueError, match=match) as info:
        Plan.load(p)
    assert str(p) in str(info.value)


def test_cli_bad_plan_and_budget_are_checked_before_the_model_loads(tmp_path, monkeypatch,
                                                                    capsys):
    from slimfx import cli

    def no_load(name):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", no_load)
    bad = _plan_file(tmp_path, version="1")
    ok = tmp_path / "ok"
    ok.mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    base = ["optimize", "--model", "tiny", "--quiet"]
    cases = [
        (["--seq-len", "0", "--out", str(tmp_path / "o")], "--seq-len must be ≥ 1, got 0"),
        (["--budget", "0.5", "--bits", "4", "--out", str(tmp_path / "o")],
         "give --budget or --bits, not both"),
        (["--plan", str(bad), "--out", str(tmp_path / "o")], "field 'version'"),
        (["--target", "tpu", "--out", str(tmp_path / "o")], "unknown target 'tpu'"),
        (["--out", str(tmp_path / "file")], "exists and is a file"),
        (["--out", str(tmp_path / "mine")], "not an earlier slimfx save (notes.txt)"),
        (["--total-bytes", "1e6", "--out", str(tmp_path / "o")], "give context="),
        (["--kv", "0", "--out", str(tmp_path / "o")], "kv budget is a fraction"),
        (["--kv", "0.5", "--batch", "4", "--out", str(tmp_path / "o")], "batch= scales"),
        # flags that were silently ignored
        (["--eval", "--out", str(tmp_path / "o")], "--eval: the tiny random model"),
        (["--calib", "wiki", "--out", str(tmp_path / "o")], "--calib wiki: the tiny random"),
        (["--plan", str(_plan_file(ok)), "--families", "lowrank", "--out",
          str(tmp_path / "o")], "a replayed --plan has its forms already"),
    ]
    for args, msg in cases:
        assert cli.main(base + args) == 2
        assert msg in capsys.readouterr().err, args
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # an --out the save could not write: found before the optimize (it failed after it)
    monkeypatch.setattr("slimfx.files.os.access", lambda p, mode: False)
    assert cli.main(base + ["--out", str(tmp_path / "ro" / "o")]) == 2
    assert f"cannot write to {tmp_path}: no permission" in capsys.readouterr().err


def test_backend_built_for_another_model_raises():
    a, b = mlp(0), mlp(1)
    plan = Plan({"0": LowRankConfig(rank=8), "2": INT8}, {"0": (64, 32), "2": (16, 64)})
    be = slimfx.backend(plan=plan, model=a, inner="eager")
    frozen = Frozen(b, X)
    with pytest.raises(Exception, match=r"weights belong to no module of the model= it was "
                                        r"built for \(Sequential\)"):
        torch.compile(copy.deepcopy(b), backend=be)(X)
    frozen.check()


def test_width_check_runs_the_model_before_blaming_the_input():
    """A Flatten before the first linear: the last dimension is not the linear's width, yet
    the batch fits — no error."""
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 16)).eval()
    new = _opt(m, [torch.randn(4, 8, 8) for _ in range(3)])
    assert slimfx.report_of(new).sites
