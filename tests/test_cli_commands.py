"""The ``slimfx`` command line: optimize, report, export (ONNX, the decode step over a
compressed or MLA latent cache), the KV-form options checked before any work, and
calibrate-target's refusal without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import slimfx


def test_cli_optimize_and_report(tmp_path, capsys):
    from slimfx.cli import main

    out = tmp_path / "run"
    assert main(["optimize", "--model", "tiny", "--budget", "0.7", "--n-calib", "3",
                 "--seq-len", "32", "--out", str(out), "--quiet"]) == 0
    for f in ("plan.json", "report.json", "report.md", "report.png", "slimfx.safetensors"):
        assert (out / f).exists(), f
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "sites rewritten" in capsys.readouterr().out
    assert main(["report", str(out), "--diff", str(out)]) == 0
    assert "same decisions at every site" in capsys.readouterr().out
    assert main(["report", str(out / "plan.json")]) == 2  # a plan is not a report


def test_cli_optimize_with_a_kv_budget(tmp_path, capsys):
    from slimfx.cli import main

    out = tmp_path / "kv"
    assert main(["optimize", "--model", "tiny", "--kv", "0.5", "--context", "512", "--n-calib",
                 "3", "--seq-len", "32", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "KV cache 256 →" in text and "at 1 × 512 tokens" in text
    rep = slimfx.report_of(slimfx.load(out))
    assert rep.budget == {"memory": None, "bits": None, "latency": None, "max_error": None,
                          "kv": 0.5, "context": 512}
    assert rep.totals["kv_cache_bytes_after"] <= 0.5 * rep.totals["kv_cache_bytes_before"]


def test_cli_onnx_export_runs_in_onnxruntime(tmp_path, capsys):
    """`slimfx optimize ... --onnx` and `slimfx export DIR --onnx [--kv-cache]` write files
    that onnxruntime runs and that agree with the saved torch model."""
    pytest.importorskip("onnxruntime")
    from slimfx.backends.ort import ort_session
    from slimfx.cli import main

    out = tmp_path / "run"
    assert main(["optimize", "--model", "tiny", "--budget", "0.5", "--families", "int4,lowrank",
                 "--n-calib", "3", "--seq-len", "32", "--out", str(out), "--quiet",
                 "--onnx", str(tmp_path / "a.onnx")]) == 0
    assert "MatMulNBits" in capsys.readouterr().out
    assert main(["export", str(out), "--onnx", str(tmp_path / "b.onnx"), "--kv-cache"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = slimfx.load(out, cpu_kernels=False)  # the exact reference ops the export follows
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    plain, kv = ort_session(tmp_path / "a.onnx"), ort_session(tmp_path / "b.onnx")
    assert not plain.kv_cache and kv.kv_cache
    # fp32 both sides, MatMulNBits sums in another order: ~1e-6 on |logits| ≲ 2
    assert (plain(ids) - ref).abs().max() < 1e-4
    assert (kv(ids) - ref).abs().max() < 1e-4
    assert main(["export", str(tmp_path / "missing"), "--onnx", str(tmp_path / "c.onnx")]) == 2


def test_report_diff_and_plot_show_the_kv_cache_layers(tmp_path, capsys):
    """Two runs that differ only in their KV forms are not "the same decisions": the diff
    lists each attention layer whose cache form changed, and the plot has the KV panel."""
    from slimfx.cli import diff_reports, main

    runs = {}
    for name, kv in (("a", "0.6"), ("b", "0.3")):
        runs[name] = tmp_path / name
        assert main(["optimize", "--model", "tiny", "--kv", kv, "--context", "512",
                     "--n-calib", "3", "--seq-len", "32", "--out", str(runs[name]),
                     "--quiet"]) == 0
    a, b = (slimfx.load(runs[n]) for n in "ab")
    ra, rb = slimfx.report_of(a), slimfx.report_of(b)
    changed = [k.fqn for k, o in zip(ra.kv_sites, rb.kv_sites) if k.chosen != o.chosen]
    assert changed  # the budgets differ enough to change a form
    capsys.readouterr()
    assert main(["report", str(runs["a"]), "--diff", str(runs["b"])]) == 0
    text = capsys.readouterr().out
    assert "same decisions at every site" not in text
    for fqn in changed:
        line = next(x for x in text.splitlines() if x.startswith(f"~ {fqn}:"))
        assert "B/token) → " in line
    assert diff_reports(ra, ra).endswith("same decisions at every site")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    calls = []
    real = plt.subplots
    plt.subplots = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        assert ra.plot(tmp_path / "kv.png").stat().st_size > 0
    finally:
        plt.subplots = real
    assert calls == [(1, 3)]


def test_cli_exports_the_decode_step_over_a_compressed_cache(tmp_path, capsys):
    """`--kv-cache` on a model with a KV budget exports the step over its compressed cache
    (plain `export_onnx` refuses one), which runs in onnxruntime with torch's greedy tokens."""
    pytest.importorskip("onnxruntime")
    from slimfx.backends.onnx_kv_decoder import OrtKVDecoder
    from slimfx.cli import main

    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    out = tmp_path / "kv"
    assert main(["optimize", "--model", "tiny", "--kv", "0.4", "--context", "512", "--n-calib",
                 "3", "--seq-len", "32", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--onnx", str(tmp_path / "kv.onnx"), "--kv-cache"]) == 0
    assert "over the compressed KV cache of layer(s) 0, 1" in capsys.readouterr().out
    model = slimfx.load(out)
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    dec = OrtKVDecoder(tmp_path / "kv.onnx")
    got = dec.generate(ids, 8)  # torch in, torch out (it returned numpy), numpy in, numpy out
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    assert isinstance(dec.generate(ids.numpy(), 8), np.ndarray)


@pytest.mark.slow  # the default run is at its time limit; the MLA export runs in test_kv_budget_export
def test_cli_exports_the_mla_decode_step_and_an_accuracy_level(tmp_path, capsys):
    """`--kv-forms mla` reaches the MLA conversions and `--kv-cache` exports their latent step,
    which runs in onnxruntime with torch's greedy tokens; `--accuracy-level` reaches the
    compressed-cache step graph's MatMulNBits."""
    pytest.importorskip("onnxruntime")
    from slimfx.backends.onnx_mla import latent_ort_session
    from slimfx.cli import main

    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    out = tmp_path / "kv"
    assert main(["optimize", "--model", "tiny", "--kv", "0.4", "--context", "512", "--n-calib",
                 "3", "--seq-len", "32", "--out", str(out), "--quiet"]) == 0
    assert main(["export", str(out), "--onnx", str(tmp_path / "x.onnx"), "--kv-cache",
                 "--accuracy-level", "4"]) == 0  # the step graph's MatMulNBits setting
    capsys.readouterr()
    mla = tmp_path / "mla"
    assert main(["optimize", "--model", "tiny", "--kv", "0.6", "--context", "512",
                 "--kv-forms", "mla", "--n-calib", "3", "--seq-len", "32", "--out", str(mla),
                 "--quiet", "--onnx", str(tmp_path / "mla.onnx"), "--kv-cache",
                 "--accuracy-level", "4"]) == 0  # taken (a cache-only budget: no MatMulNBits)
    assert "over the MLA latent cache of layer(s) 0, 1" in capsys.readouterr().out
    model = slimfx.load(mla)
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    got = latent_ort_session(tmp_path / "mla.onnx").generate(ids, 8)
    assert torch.as_tensor(got).tolist() == want.tolist()


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--kv-forms", "mla"], "give --kv or --total-bytes"),
        (["--kv", "0.5", "--context", "64", "--kv-forms", "mla,int4"], "default and/or mla"),
        (["--kv", "0.5", "--context", "64", "--kv-forms", ","], "default and/or mla"),
    ],
)
def test_cli_kv_forms_is_checked_before_any_work(tmp_path, capsys, args, msg):
    from slimfx.cli import main

    out = tmp_path / "never"
    assert main(["optimize", "--model", "tiny", *args, "--out", str(out), "--quiet"]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_calibrate_target_without_cuda_says_so(tmp_path, capsys):
    from slimfx.cli import main

    out = tmp_path / "t.json"
    assert main(["calibrate-target", "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device here" in err and not out.exists()


def test_families_take_spaces_after_the_commas():
    import argparse

    from slimfx.cli import _families

    assert _families(argparse.Namespace(families="int4, int8 ,lowrank,")) == (
        "int4", "int8", "lowrank")  # fmt: skip


def test_cli_exports_an_mla_model_as_a_deepseek_checkpoint(tmp_path, capsys):
    """`export --deepseek` writes a checkpoint transformers loads as DeepSeek-V3 with the saved
    model's logits — its linears rewritten by a weights budget too, which run packed CPU kernels
    (bf16 activations) once loaded: the check compares their exact products —; a model with a
    layer not converted is an error, nothing written."""
    pytest.importorskip("transformers.models.deepseek_v3")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from slimfx.cli import main
    from slimfx.ir.cpu_runtime import cpu_runtimes, reference_ops

    mla = tmp_path / "mla"
    assert main(["optimize", "--model", "tiny", "--budget", "0.5", "--kv", "0.6", "--context",
                 "512", "--kv-forms", "mla", "--n-calib", "3", "--seq-len", "32", "--out",
                 str(mla), "--quiet"]) == 0
    capsys.readouterr()
    # the solver chose int8 latents, which DeepSeek's 16-bit latent cache cannot hold
    assert main(["export", str(mla), "--deepseek", str(tmp_path / "ds")]) == 2
    assert "--drop-latent-rounding" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()
    assert main(["export", str(mla), "--deepseek", str(tmp_path / "ds"),
                 "--drop-latent-rounding"]) == 0
    out = capsys.readouterr().out
    assert "a DeepSeek-V3 checkpoint (kv_lora_rank" in out and "tie_word_embeddings=True" in out
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    model = slimfx.load(mla)
    assert any(r.kernel != "reference op" for r in cpu_runtimes(model).values())  # packed
    for blk in model.model.layers:
        blk.self_attn.latent_bits = 16  # what the checkpoint computes
    with torch.no_grad(), reference_ops(model):
        want = model(ids).logits
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "ds")(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # --untie-head writes lm_head.weight; --rms-norm-eps (the tiny model has 1e-6) changes every
    # norm: refused without --rtol, which the error names
    args = ["export", str(mla), "--deepseek", str(tmp_path / "ds2"), "--drop-latent-rounding",
            "--untie-head", "--rms-norm-eps", "1e-5"]
    assert main(args) == 2
    assert "replaces the source's" in capsys.readouterr().err
    assert not (tmp_path / "ds2").exists()
    assert main([*args, "--rtol", "0.05"]) == 0
    assert "tie_word_embeddings" not in capsys.readouterr().out
    with safe_open(str(tmp_path / "ds2" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    dense = tmp_path / "dense"
    assert main(["optimize", "--model", "tiny", "--kv", "0.5", "--context", "512", "--n-calib",
                 "3", "--seq-len", "32", "--out", str(dense), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(dense), "--deepseek", str(tmp_path / "no")]) == 2
    assert "every layer must be converted to MLA" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert main(["export", str(mla), "--deepseek", str(tmp_path / "ds")]) == 2  # not empty
    capsys.readouterr()
    assert main(["export", str(mla), "--deepseek", str(tmp_path / "x"), "--kv-cache"]) == 2
    assert "--kv-cache does not apply to --deepseek" in capsys.readouterr().err
    assert main(["export", str(mla), "--onnx", str(tmp_path / "x.onnx"), "--overwrite"]) == 2
    assert "--overwrite does not apply to --onnx" in capsys.readouterr().err
    assert main(["export", str(mla), "--onnx", str(tmp_path / "x.onnx"), "--rtol", "1"]) == 2
    assert "--rtol does not apply to --onnx" in capsys.readouterr().err
