"""Peak memory and wall time of ``optimize`` in memory vs streamed vs streamed on 2 ranks (issue 13).

Models: a random-weight Llama-architecture checkpoint (SmolLM2's tokenizer and vocabulary,
``--layers`` × hidden ``--hidden``, saved as safetensors by this script) and SmolLM2-135M's
own checkpoint directory. Each configuration runs in a fresh process, so its peak resident
memory (the kernel's high-water mark, read around every stage) is its own:

  inmem    ``AutoModelForCausalLM.from_pretrained`` + ``slimfx.optimize`` + ``slimfx.save``
  stream   ``slimfx.stream.optimize_checkpoint`` on one process
  dist     the same under ``torchrun --standalone --nproc-per-node 2`` (one thread per rank)

Same calibration (``--n-calib`` windows of ``--seq-len`` tokens of the lee corpus, the last
one held out), budget, default families and Fisher sensitivity in all three; the plans are
compared. Prints one Markdown table per model and writes ``--json``.

    OMP_NUM_THREADS=2 python benchmarks/scale.py [--models random,smollm2] [--layers 12]
        [--hidden 1024] [--n-calib 8] [--seq-len 256] [--budget 0.3] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _calibration(model_dir: str, n: int, seq_len: int) -> list:
    from transformers import AutoTokenizer

    from slimfx.data.text import calibration_batches
    from slimfx.models import smollm2_cache_dir

    tok_dir = model_dir if (Path(model_dir) / "tokenizer.json").is_file() else smollm2_cache_dir()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    return calibration_batches(tok, name="lee", n=n, seq_len=seq_len)


def _hwm_mb() -> float:
    """The kernel's resident high-water mark (since the last reset), MB."""
    from slimfx.stage_memory import rss_mb

    return rss_mb()["hwm"]


def _peak_mb(before: float, memory: dict[str, dict[str, float]], *more: float) -> float:
    """The worker's peak resident MB: the high-water mark before ``optimize`` (loading), every
    stage's own peak, the mark at the end and ``more`` (the streamed run's own peak, which also
    sees between its stages). Not ``ru_maxrss``: the stages reset the mark, after which
    ``ru_maxrss`` knows only the last stage's peak."""
    return max([before, _hwm_mb(), *more] + [r["peak"] for r in memory.values()])


def worker(a: argparse.Namespace) -> None:
    """One configuration in this process; prints ``RESULT {json}``."""
    import torch

    calib = _calibration(a.model_dir, a.n_calib, a.seq_len)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"mode": a.worker}
    if a.worker == "inmem":
        from transformers import AutoModelForCausalLM

        import slimfx

        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
        t_load = time.perf_counter() - t0
        before = _hwm_mb()
        # the streamed engine computes the Fisher weighting ("geo" needs every site at once)
        new = slimfx.optimize(model, a.budget, calibration=calib, progress=False,
                              sensitivity="fisher")
        slimfx.save(new, a.out, overwrite=True)
        rep = slimfx.report_of(new)
        out.update(plan=rep.meta["plan"]["decisions"], timings={"load": t_load, **rep.timings},
                   memory=rep.meta.get("stage_memory_mb", {}))  # fmt: skip
    else:
        import torch.distributed as dist

        from slimfx.stream import optimize_checkpoint

        if a.worker == "dist":
            dist.init_process_group("gloo")
        before = _hwm_mb()
        res = optimize_checkpoint(
            a.model_dir, a.budget, calibration=calib, out=a.out, dtype=torch.float32,
            overwrite=True, progress=False,
        )  # fmt: skip
        out.update(plan=res.plan.to_dict()["decisions"], timings=res.timings,
                   memory=res.memory, parts=res.parts, own_peak=[res.peak_rss_mb],
                   rank=dist.get_rank() if a.worker == "dist" else 0)  # fmt: skip
        if a.worker == "dist":
            dist.destroy_process_group()
    peak = _peak_mb(before, out["memory"], *out.pop("own_peak", ()))
    out.update(wall_s=time.perf_counter() - t0, peak_rss_mb=peak)
    print("RESULT " + json.dumps(out), flush=True)


def random_checkpoint(path: Path, layers: int, hidden: int) -> dict[str, Any]:
    """A random Llama (SmolLM2's vocabulary, tied embedding) saved with ``save_pretrained``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=4,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    return {"params": n, "block_params": block, "embed_params": cfg.vocab_size * hidden,
            "layers": layers, "hidden": hidden, "intermediate": cfg.intermediate_size}


def _checkpoint_in_child(path: Path, a: argparse.Namespace) -> dict[str, Any]:
    """``random_checkpoint`` in a child process. Built here, the model would raise this
    process's peak resident memory, and Linux carries a process's high-water mark through
    fork + exec into ``ru_maxrss`` of the workers it starts: a 1B model built here made a
    streamed worker report the 4.9 GB of building it as its own peak."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
            f"from scale import random_checkpoint; from pathlib import Path; "
            f"print(json.dumps(random_checkpoint(Path({str(path)!r}), {a.layers}, {a.hidden})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(mode: str, a: argparse.Namespace, model_dir: str, out: str) -> list[dict[str, Any]]:
    args = ["--worker", mode, "--model-dir", model_dir, "--out", out, "--budget", str(a.budget),
            "--n-calib", str(a.n_calib), "--seq-len", str(a.seq_len)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if mode == "dist":
        env["OMP_NUM_THREADS"] = "1"
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--standalone", "--nproc-per-node", "2", __file__, *args]
    else:
        cmd = [sys.executable, __file__, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    for r in rows:
        r["process_wall_s"] = time.perf_counter() - t0
    return rows


def _table(name: str, info: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> str:
    lines = [f"### {name}", "", json.dumps(info), "",
             f"| mode | wall s (optimize) | peak RSS MB | stages (s) | plan = {next(iter(rows))} |",
             "|---|---|---|---|---|"]  # fmt: skip
    ref = next(iter(rows.values()))[0]["plan"]  # the first mode's plan (rank 0's)
    for mode, rs in rows.items():
        for r in rs:
            st = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items() if k != "total")
            if r.get("parts"):  # the streamed stage's parts, summed over blocks
                st += " (" + ", ".join(f"{k.split(': ')[-1]} {v:.1f}"
                                       for k, v in r["parts"].items()) + ")"  # fmt: skip
            label = mode if mode != "dist" else f"dist rank {r['rank']}"
            same = str(r["plan"] == ref)
            lines.append(f"| {label} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {st} | "
                         f"{same} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["inmem", "stream", "dist"], default=None)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--models", default="random,smollm2")
    p.add_argument("--modes", default="inmem,stream,dist")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--n-calib", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    from slimfx.models import smollm2_cache_dir

    tmp = Path(tempfile.mkdtemp(prefix="slimfx-scale-"))
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "args": vars(a),
    }
    try:
        for name in a.models.split(","):
            if name == "random":  # built in a child: see _checkpoint_in_child
                d = tmp / "random"
                info = _checkpoint_in_child(d, a)
            else:
                d, info = Path(smollm2_cache_dir()), {"checkpoint": "SmolLM2-135M"}
            rows = {m: _run(m, a, str(d), str(tmp / f"out-{name}-{m}")) for m in a.modes.split(",")}
            results[name] = {"info": info, "rows": rows}
            print(_table(name, info, rows), flush=True)
            for mode, rs in rows.items():  # each stage's resident MB: before, after, own peak
                for r in rs:
                    mem = ", ".join(f"{k} {v['rss_before']:.0f}/{v['rss_after']:.0f}/"
                                    f"{v['peak']:.0f}" for k, v in r.get("memory", {}).items())
                    print(f"{mode}: stage RSS MB before/after/peak: {mem}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        for v in results.values():
            if isinstance(v, dict) and "rows" in v:
                for rs in v["rows"].values():
                    for r in rs:
                        r["plan"] = len([d for d in r["plan"].values() if d.get("kind") != "dense"])
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
