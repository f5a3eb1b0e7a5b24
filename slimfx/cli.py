"""Command line: ``slimfx optimize``, ``slimfx report``, ``slimfx export``,
``slimfx calibrate-target``.

    slimfx optimize --model smollm2 --budget 0.8 --calib lee --out out/smol
    slimfx optimize --model smollm2 --kv 0.25 --context 8192 --kv-forms default,mla --out out/kv
    slimfx optimize --model ckpt/ --budget 0.3 --out out/big   # a checkpoint dir, streamed
    torchrun --nproc-per-node 2 -m slimfx optimize --model ckpt/ --budget 0.3 --out out/big
    slimfx report out/smol              # the short table; --markdown, --plot, --diff OTHER
    slimfx export out/smol --onnx out/smol.onnx [--kv-cache]   # ONNX for onnxruntime
"""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path

from slimfx.planning.configs import DEFAULT_FAMILIES

__all__ = ["main"]


def _load_model(name: str):
    from slimfx import models

    if name == "smollm2":
        return models.load_smollm2()
    if name == "tiny":
        import transformers  # noqa: F401

        return models.tiny_llama(), None
    raise SystemExit(f"unknown --model {name!r}; known: smollm2, tiny")


def _calibration(tokenizer, name: str, n: int, seq_len: int, model=None):
    import torch

    if tokenizer is None:  # the tiny random model: random ids are all it can take
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        return [torch.randint(0, vocab, (1, seq_len), generator=g) for _ in range(n)], None
    from slimfx.data.text import calibration_batches, heldout_windows

    return (
        calibration_batches(tokenizer, name=name, n=n, seq_len=seq_len),
        heldout_windows(tokenizer, name=name, n=max(2, n // 2), seq_len=seq_len),
    )


def _families(a: argparse.Namespace) -> tuple[str, ...]:
    """``--families``, comma-separated, spaces around the names dropped ("int4, int8")."""
    text = ",".join(DEFAULT_FAMILIES) if a.families is None else a.families
    return tuple(f.strip() for f in text.split(",") if f.strip())


def _check_optimize_args(a: argparse.Namespace):
    """Every ``slimfx optimize`` argument checked before the model loads: the budget, the
    plan file, names, counts, the latency cache and the output directory."""
    import slimfx
    from slimfx.io import check_save_target
    from slimfx.planning.problem import Budget
    from slimfx.validate import check_options

    if a.model not in ("smollm2", "tiny") and not Path(a.model).is_dir():
        raise ValueError(
            f"unknown --model {a.model!r}; known: smollm2, tiny, or a checkpoint directory"
        )
    if a.bits is not None and a.budget is not None:
        raise ValueError("give --budget or --bits, not both")
    for flag, v in (("--seq-len", a.seq_len), ("--n-calib", a.n_calib)):
        if v < 1:
            raise ValueError(f"{flag} must be ≥ 1, got {v}")
    from slimfx.data.text import CORPORA

    streamed = Path(a.model).is_dir()
    if streamed:
        unsupported = [flag for flag, on in (("--plan", a.plan), ("--backend", a.backend),
                       ("--eval", a.eval), ("--onnx", a.onnx)) if on]
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)}: not available with a checkpoint "
                             "directory (the streamed optimize)")
    if a.calib not in CORPORA and not (streamed and a.calib == "random"):
        raise ValueError(f"unknown --calib {a.calib!r}; known: {', '.join(sorted(CORPORA))}")
    if a.model == "tiny":  # random weights, no tokenizer: random ids, no held-out text
        given = [f for f, on in (("--eval", a.eval), (f"--calib {a.calib}", a.calib != "lee"))
                 if on]
        if given:
            raise ValueError(f"{', '.join(given)}: the tiny random model calibrates on random "
                             "token ids and has no held-out text (use --model smollm2)")
    if a.plan and a.families is not None:
        raise ValueError("--families chooses the solver's candidates; a replayed --plan has "
                         "its forms already: give one of them")
    check_options(target=a.target, workload=a.workload, families=_families(a),
                  seq_len=a.seq_len)
    cache_only = a.kv is not None or a.total_bytes is not None
    if a.kv_forms is not None:
        a.kv_forms = _kv_forms(a.kv_forms)
        if not cache_only:
            raise ValueError("--kv-forms chooses among KV-cache forms: give --kv or --total-bytes "
                             "(with --context) too")
        if streamed:
            raise ValueError("--kv-forms: the streamed optimize of a checkpoint directory takes "
                             "no KV budget")
    memory = a.budget if a.budget is not None or a.bits or a.latency or cache_only else 0.8
    memory = None if memory is None else Budget.of(memory).memory  # a fraction in (0, 1]
    budget = Budget(
        memory=memory, bits=a.bits, latency=a.latency, kv=a.kv, total_bytes=a.total_bytes,
        context=a.context, batch=a.batch,
    )  # fmt: skip
    plan = slimfx.Plan.load(a.plan) if a.plan else None
    given = a.budget is not None or a.bits or a.latency or a.kv or a.total_bytes
    if plan is not None and not given:  # the replay reports the plan's own budget
        from slimfx.api import DEFAULT_BUDGET

        budget = DEFAULT_BUDGET  # type: ignore[assignment]
    if a.latency_cache and not Path(a.latency_cache).is_file():
        raise FileNotFoundError(f"--latency-cache {a.latency_cache}: no such file")
    check_save_target(Path(a.out), a.overwrite)
    return budget, plan


def _kv_forms(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ("default", "mla")]
    if not names or bad:
        raise ValueError(f"--kv-forms takes default and/or mla, comma-separated; got {text!r}")
    return list(dict.fromkeys(names))


def _init_distributed() -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): gloo on CPU, nccl
    when each rank has a GPU. False when not launched by torchrun."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _checkpoint_calibration(a: argparse.Namespace):
    """The streamed run's calibration: the corpus through the checkpoint's tokenizer, or
    seeded random ids with ``--calib random`` (random-weight checkpoints, smoke tests)."""

    import torch

    if a.calib == "random":
        from transformers import AutoConfig

        try:  # the text config's vocabulary (a config.json without model_type: named)
            vocab = AutoConfig.from_pretrained(a.model).get_text_config().vocab_size
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"--model {a.model}: config.json does not describe a model "
                             f"transformers knows ({e})") from None
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (1, a.seq_len), generator=g) for _ in range(a.n_calib)]
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {a.model}: no tokenizer in the checkpoint directory ({e}); "
                         "pass --calib random for random token ids") from None
    from slimfx.data.text import calibration_batches

    return calibration_batches(tok, name=a.calib, n=a.n_calib, seq_len=a.seq_len)


def _saved_report(path: Path):
    """The report.json written beside ``path`` (in the save being written)."""
    import json

    from slimfx.report import Report

    return Report.from_dict(json.loads((path.parent / "report.json").read_text()))


def _report_md(path: Path) -> None:
    path.write_text(_saved_report(path).to_markdown())


def _report_png(path: Path) -> None:
    _saved_report(path).plot(path)


#: what the CLI writes beside a save: the report as markdown and as a plot (from report.json)
_REPORT_FILES = {"report.md": _report_md, "report.png": _report_png}


def cmd_optimize_checkpoint(a: argparse.Namespace, budget) -> int:
    """``slimfx optimize --model DIR``: the layer-streamed optimize (``slimfx.stream``), on
    every rank of a torchrun launch."""
    from slimfx.stream import optimize_checkpoint

    dist = _init_distributed()
    calib = _checkpoint_calibration(a)
    t0 = time.perf_counter()
    res = optimize_checkpoint(
        a.model, budget, calibration=calib, out=a.out, target=a.target, workload=a.workload,
        families=_families(a), fisher=a.fisher,
        sensitivity=a.sensitivity or "fisher",  # what a block-by-block backward gives
        latency_cache=a.latency_cache, overwrite=a.overwrite, progress=not a.quiet,
        sequential=a.sequential, extras=_REPORT_FILES,
    )  # fmt: skip
    if res.report is not None:  # rank 0 wrote
        print(res.report)
        print(f"optimize (streamed{', distributed' if dist else ''}) took "
              f"{time.perf_counter() - t0:.1f} s, peak RSS {res.peak_rss_mb:.0f} MB")
        print(f"wrote {res.out}/plan.json, report.json, report.md, report.png, "
              "slimfx.safetensors")
    if dist:
        import torch.distributed as tdist

        tdist.destroy_process_group()
    return 0


def cmd_optimize(a: argparse.Namespace) -> int:
    import slimfx

    budget, plan = _check_optimize_args(a)
    if Path(a.model).is_dir():
        return cmd_optimize_checkpoint(a, budget)
    model, tok = _load_model(a.model)
    calib, held = _calibration(tok, a.calib, a.n_calib, a.seq_len, model)
    t0 = time.perf_counter()
    new = slimfx.optimize(
        model,
        budget,
        calibration=calib,
        plan=plan,
        target=a.target,
        workload=a.workload,
        families=_families(a),
        sequential=a.sequential,
        fisher=a.fisher,
        sensitivity=a.sensitivity or "geo",
        progress=not a.quiet,
        latency_cache=a.latency_cache,
        backend=a.backend,
        kv_forms=a.kv_forms,
    )
    rep = slimfx.report_of(new)
    print(rep)
    print(f"optimize took {time.perf_counter() - t0:.1f} s")
    from slimfx.io import save

    out = Path(a.out)
    save(new, out, overwrite=a.overwrite, extras=_REPORT_FILES)
    if a.eval and held is not None:
        from slimfx.eval import perplexity

        w, kv = held, bool(rep.kv_sites)
        p0 = perplexity(model, w, progress=not a.quiet)
        p1 = perplexity(new, w, progress=not a.quiet, decode=kv)
        how = ", slimfx decoded token by token through its compressed KV cache" if kv else ""
        print(f"perplexity ({a.calib}, {w.shape[0]}×{w.shape[1]} held-out tokens{how}): "
              f"dense {p0:.3f} → slimfx {p1:.3f}")
    if a.onnx:
        print(_export(new, a, calib[0][:, :16]))
    print(f"wrote {out}/plan.json, report.json, report.md, report.png, slimfx.safetensors")
    return 0


def _read_report(path: str):
    from slimfx.report import Report
    from slimfx.validate import read_json_object

    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.exists():
        raise FileNotFoundError(f"{path}: no report.json found")
    d = read_json_object(p, "slimfx report")
    if d.get("format") == "slimfx.plan":
        raise ValueError(f"{path} is a plan, not a report: `slimfx report` reads report.json")
    try:
        return Report.from_dict(d)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{p}: not a valid slimfx report ({type(e).__name__}: {e})") from e


def cmd_report(a: argparse.Namespace) -> int:
    if a.diff and (a.plot or a.markdown):
        raise ValueError("--diff prints what changed between two reports; --plot and "
                         "--markdown write one report: give them in another call")
    rep = _read_report(a.path)
    if a.diff:
        other = _read_report(a.diff)
        print(diff_reports(rep, other))
        return 0
    print(rep.to_markdown() if a.markdown else rep)
    if a.plot:
        rep.plot(a.plot)
        print(f"wrote {a.plot}")
    return 0


def diff_reports(a, b) -> str:
    """Per-site differences between two reports (decision, bytes, measured SQNR), the KV
    cache's attention layers included (form, bytes per token)."""
    lines = [f"A: {a.headline()}", f"B: {b.headline()}"]
    sb = {s.fqn: s for s in b.sites}
    for s in a.sites:
        o = sb.get(s.fqn)
        if o is None:
            lines.append(f"- {s.fqn}: only in A")
        elif o.chosen != s.chosen:
            sq = lambda e: "" if e.measured_sqnr_db is None else f" {e.measured_sqnr_db:.1f} dB"  # noqa: E731
            lines.append(f"~ {s.fqn}: {s.chosen}{sq(s)} → {o.chosen}{sq(o)}")
    lines += [f"+ {f}: only in B" for f in sb if f not in {s.fqn for s in a.sites}]
    ka, kb = {k.fqn: k for k in a.kv_sites}, {k.fqn: k for k in b.kv_sites}
    per_token = lambda k: f"{k.chosen} ({k.kv_bytes_per_token_after:.0f} B/token)"  # noqa: E731
    for fqn, k in ka.items():
        o = kb.get(fqn)
        if o is None:
            lines.append(f"- {fqn} (KV cache {k.chosen}): only in A")
        elif o.chosen != k.chosen:
            lines.append(f"~ {fqn}: {per_token(k)} → {per_token(o)}")
    lines += [f"+ {f} (KV cache {k.chosen}): only in B" for f, k in kb.items() if f not in ka]
    if len(lines) == 2:
        lines.append("same decisions at every site")
    return "\n".join(lines)


def _export(model, a: argparse.Namespace, ids) -> str:
    """``--onnx`` (``--kv-cache``): the decode step over the cache the model keeps — 16-bit
    (``export_onnx``), compressed KV caches (``onnx_kv.export_onnx_kv``: a step graph and
    its flush graphs) or MLA's latent cache (``onnx_mla.export_mla_onnx``)."""
    from slimfx.backends.onnx import export_onnx
    from slimfx.backends.onnx_mla import cache_kinds

    mla, compressed = cache_kinds(model) if a.kv_cache else ([], [])
    if not (mla or compressed):
        return str(export_onnx(model, a.onnx, (ids,), kv_cache=a.kv_cache,
                               accuracy_level=a.accuracy_level))
    if mla:
        from slimfx.backends.onnx_mla import export_mla_onnx

        # refuses a mix with compressed KV caches
        res = export_mla_onnx(model, a.onnx, ids, accuracy_level=a.accuracy_level)
        return (f"wrote {res.path}: the decode step over the MLA latent cache of layer(s) "
                f"{', '.join(map(str, res.mla_layers))} ({res.cache_bytes_per_token} B/token); "
                "slimfx.backends.onnx_mla.latent_ort_session runs it" + _notes(res.notes))
    from slimfx.backends.onnx_kv import export_onnx_kv

    res = export_onnx_kv(model, a.onnx, accuracy_level=a.accuracy_level)
    flush = "".join(f", {p.name}" for p in res.flush_paths)
    return (f"wrote {res.path.name}{flush} in {res.path.parent}: the decode step over the "
            f"compressed KV cache of layer(s) {', '.join(map(str, compressed))}; "
            "slimfx.backends.onnx_kv_decoder.OrtKVDecoder runs it" + _notes(res.notes))


def _notes(notes: list[str]) -> str:
    return "".join(f"\nnote: {n}" for n in notes)


def cmd_export(a: argparse.Namespace) -> int:
    import slimfx

    onnx_only = [f for f, on in (("--kv-cache", a.kv_cache), ("--accuracy-level", a.accuracy_level))
                 if on]
    ds_only = [f for f, on in (("--drop-latent-rounding", a.drop_latent_rounding),
                               ("--overwrite", a.overwrite), ("--untie-head", a.untie_head),
                               ("--rms-norm-eps", a.rms_norm_eps is not None),
                               ("--rtol", a.rtol is not None)) if on]
    if (a.deepseek and onnx_only) or (a.onnx and ds_only):
        raise ValueError(f"{', '.join(onnx_only if a.deepseek else ds_only)} does not apply to "
                         f"{'--deepseek' if a.deepseek else '--onnx'}")
    try:
        model = slimfx.load(a.dir, verify=not a.no_verify)
    except ValueError as e:
        if "pass model=" not in str(e):
            raise
        raise SystemExit(
            f"slimfx export: {e}. The command line rebuilds Hugging Face models only: in Python, "
            "slimfx.load(dir, model=<a fresh instance>) and slimfx.export_onnx(...)"
        ) from e
    if a.deepseek:
        print(_export_deepseek(model, a))
        return 0
    import torch

    # batch 2: torch.export fixes an example axis of size 1, so a batch-1 example would too
    print(_export(model, a, torch.zeros(2, 16, dtype=torch.long)))
    return 0


def _export_deepseek(model, a: argparse.Namespace) -> str:
    """``--deepseek DIR``: every block MLA → a DeepSeek-V3 checkpoint (``forms/mla/deepseek``)."""
    from slimfx.forms.mla.deepseek import DeepSeekMismatch, export_deepseek_v3

    try:
        info = export_deepseek_v3(model, a.deepseek, overwrite=a.overwrite,
                                  drop_latent_rounding=a.drop_latent_rounding,
                                  untie_head=a.untie_head, rms_norm_eps=a.rms_norm_eps,
                                  rtol=a.rtol)
    except DeepSeekMismatch as e:
        raise ValueError(str(e)) from e  # reported as an error, not a traceback
    lines = [f"wrote {info.path}: a DeepSeek-V3 checkpoint (kv_lora_rank {info.kv_lora_rank}, "
             f"qk_rope_head_dim {info.qk_rope_head_dim}, {info.cache_values} cache values per "
             f"token and layer); logits within {info.max_abs_logit_diff:.2g} of the model's "
             f"(scale {info.logit_scale:.3g})"]
    held = info.converted_cache_values
    if min(held) < info.cache_values:
        lines.append(f"  padding: the blocks hold {min(held)}–{max(held)} values per token, the "
                     f"checkpoint {info.cache_values} (one shape for every layer)")
    lines += [f"  engines: {n}" for n in info.engine_notes]
    return "\n".join(lines)


def cmd_calibrate_target(a: argparse.Namespace) -> int:
    import torch

    from slimfx.cost.measure_attention import parse_attention_shapes
    from slimfx.cost.target import TARGETS
    from slimfx.latency_calibration import calibrate_target, parse_shapes

    if a.threads is not None and a.threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {a.threads}")
    device = a.device or ("cpu" if a.backend == "onnx" or not torch.cuda.is_available() else "cuda")
    backend = a.backend or ("triton" if device.startswith("cuda") else "eager")
    target = a.target or {"onnx": "ort-cpu"}.get(backend, "h100" if device != "cpu" else "cpu")
    if target not in TARGETS:  # optimize(target=<name>) would refuse it after the long run
        near = difflib.get_close_matches(target, list(TARGETS), n=1, cutoff=0.5)
        raise ValueError(
            f"unknown target {target!r}{f' (did you mean {near[0]!r}?)' if near else ''}; "
            f"known: {', '.join(sorted(TARGETS))}. For a device of your own, calibrate from "
            "Python (slimfx.calibrate_target) and pass optimize(target=slimfx.cost.target.Target(…))"
        )
    cache = calibrate_target(
        target,
        out=a.out,
        backend=backend,
        device=device,
        shapes=parse_shapes(a.shapes),
        threads=a.threads,
        accuracy_level=a.accuracy_level,
        progress=not a.quiet,
        rotate_bytes=int(a.rotate_mb * (1 << 20)),
        attention=parse_attention_shapes(a.attention or "none"),
        contexts=_ints("--contexts", a.contexts),
        batches=_ints("--batches", a.batches),
    )
    print(f"wrote {a.out}: {cache.summary(target)['entries']} measurements for target {target!r} "
          f"(backend {backend} on {device}); use it with "
          f"optimize(..., target={target!r}, latency_cache={str(a.out)!r})")
    return 0


def _ints(flag: str, text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"{flag} takes integers ≥ 1, got {text!r}")
    return vals


def _onnx_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache", action="store_true",
                   help="export the decode step: ids + KV cache → logits + KV cache")
    p.add_argument("--accuracy-level", type=int, default=0, choices=range(5),
                   help="MatMulNBits accuracy_level (0 float compute, 4 int8 activations)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slimfx",
        description="slimfx: optimize a model under a budget, read or diff its report, export "
        "it to ONNX, measure kernel times for latency budgets (calibrate-target).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("optimize", help="optimize a model under a budget and save it")
    o.add_argument("--model", default="smollm2",
                   help="smollm2 | tiny | a Hugging Face checkpoint directory (config.json + "
                   "safetensors), optimized one decoder block at a time (docs/STREAMING.md)")
    o.add_argument("--budget", type=float, default=None,
                   help="fraction of 16-bit bytes (default 0.8 unless --bits, --latency, --kv "
                   "or --total-bytes: those bound the model alone)")
    o.add_argument("--bits", type=float, default=None, help="effective bits/weight instead")
    o.add_argument("--latency", type=float, default=None,
                   help="latency budget: a fraction of the dense linears' time for --workload")
    o.add_argument("--kv", type=float, default=None,
                   help="KV-cache budget: a fraction of the 16-bit cache (per layer forms)")
    o.add_argument("--total-bytes", type=float, default=None,
                   help="one byte budget for the linears' weights + the KV cache")
    o.add_argument("--context", type=int, default=None,
                   help="tokens per sequence the KV cache is counted at")
    o.add_argument("--batch", type=int, default=None, help="sequences (with --total-bytes)")
    o.add_argument("--kv-forms", default=None,
                   help="KV-cache candidates, comma-separated: default (quantized, low-rank and "
                   "quantized-latent caches), mla (training-free MLA conversions); default: "
                   "default")
    o.add_argument("--latency-cache", default=None,
                   help="measured kernel times (`slimfx calibrate-target`) for --target")
    o.add_argument("--backend", default=None, choices=["eager", "compile", "triton", "onnx"],
                   help="what will run the model: only forms it runs natively are offered")
    o.add_argument("--calib", default="lee",
                   help="calibration text: lee (news) | wiki; random (ids) for a directory")
    o.add_argument("--n-calib", type=int, default=16)
    o.add_argument("--seq-len", type=int, default=256)
    o.add_argument("--families", default=None,
                   help="candidate families, comma-separated (default "
                   f"{','.join(DEFAULT_FAMILIES)})")
    o.add_argument("--target", default="cpu")
    o.add_argument("--workload", default="decode", choices=["decode", "prefill"])
    o.add_argument("--sequential", action="store_true")
    o.add_argument("--fisher", action=argparse.BooleanOptionalAction, default=None,
                   help="weight errors by loss sensitivity (default: on for causal LMs)")
    o.add_argument("--sensitivity", default=None,
                   choices=["geo", "probe", "probe-kind", "kfac", "fisher", "measured"],
                   help="how the loss sensitivity is estimated (slimfx.cost.sensitivity; "
                        "default geo, fisher for a checkpoint directory: the streamed backward "
                        "gives the Fisher product only)")
    o.add_argument("--plan", default=None, help="replay this plan.json instead of solving")
    o.add_argument("--eval", action="store_true", help="perplexity before/after on held-out text")
    o.add_argument("--onnx", default=None, help="also export to this .onnx path")
    _onnx_flags(o)
    o.add_argument("--out", required=True)
    o.add_argument("--overwrite", action="store_true",
                   help="replace --out even when it is a non-empty directory that is not a "
                   "slimfx save (an earlier slimfx save is always replaced)")
    o.add_argument("--quiet", action="store_true")
    o.set_defaults(fn=cmd_optimize)
    r = sub.add_parser("report", help="print a saved report (dir or report.json)")
    r.add_argument("path")
    r.add_argument("--markdown", action="store_true")
    r.add_argument("--plot", default=None, help="write the PNG here")
    r.add_argument("--diff", default=None, help="compare with another report")
    r.set_defaults(fn=cmd_report)
    e = sub.add_parser("export", help="export a saved optimized model to ONNX (or, every block "
                       "converted to MLA, as a DeepSeek-V3 checkpoint)")
    e.add_argument("dir")
    to = e.add_mutually_exclusive_group(required=True)
    to.add_argument("--onnx")
    to.add_argument("--deepseek", metavar="DIR",
                    help="write a DeepSeek-V3 checkpoint transformers loads (every block MLA)")
    e.add_argument("--drop-latent-rounding", action="store_true",
                   help="--deepseek: export int8-latent blocks without the rounding")
    e.add_argument("--overwrite", action="store_true",
                   help="--deepseek: replace a non-empty directory")
    e.add_argument("--untie-head", action="store_true",
                   help="--deepseek: write lm_head.weight apart from a tied embedding")
    e.add_argument("--rms-norm-eps", type=float, default=None,
                   help="--deepseek: the config's rms_norm_eps (1e-6 for engines' latent norm)")
    e.add_argument("--rtol", type=float, default=None,
                   help="--deepseek: the logit check's tolerance, relative to the logits' scale")
    e.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 check of the saved files (faster load)")
    _onnx_flags(e)
    e.set_defaults(fn=cmd_export)
    c = sub.add_parser("calibrate-target", help="measure kernel times into a cost cache")
    c.add_argument("--backend", choices=["eager", "torch", "triton", "onnx"], default=None,
                   help="what runs the forms: eager torch, Triton kernels, ONNX Runtime "
                   "(default: triton on CUDA, else torch)")
    c.add_argument("--target", default=None,
                   help="name the measurements price (default: ort-cpu for onnx, h100 on CUDA, "
                   "else cpu)")
    c.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")
    c.add_argument("--shapes", default=None,
                   help="IN x OUT linear shapes, comma-separated, e.g. 2048x2048,2048x8192 "
                   "(default: SmolLM2-135M's)")
    c.add_argument("--attention", default=None,
                   help="also time the KV-cache / MLA attention steps of these shapes: smollm2 "
                   "or HIDDEN:HEADS:KV_HEADS:HEAD_DIM, comma-separated (default: none)")
    c.add_argument("--contexts", default="1024,4096,16384",  # measure_attention.DEFAULT_CONTEXTS
                   help="cached tokens the attention steps are timed at (default %(default)s)")
    c.add_argument("--batches", default="1",
                   help="sequences per attention step (default %(default)s)")
    c.add_argument("--threads", type=int, default=None, help="intra-op threads")
    c.add_argument("--accuracy-level", type=int, default=0, choices=range(5),
                   help="MatMulNBits accuracy_level (onnx): 0 float compute, 4 int8 activations")
    c.add_argument("--rotate-mb", type=float, default=64,
                   help="MiB of weight copies each form is spread over so that caches do not "
                   "flatter small weights (0: one copy)")
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_calibrate_target)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, OSError) as e:  # FileNotFound, FileExists, PermissionError, …
        print(f"slimfx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
