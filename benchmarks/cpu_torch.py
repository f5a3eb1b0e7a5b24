"""slimfx's rewritten models run in PyTorch on the CPU: packed int8/int4 kernels vs dense, in one
run, side by side (issue "Faster in PyTorch on the CPU too").

    python benchmarks/cpu_torch.py --part linears            # per linear, weights rotated
    python benchmarks/cpu_torch.py --part generate           # SmolLM2 generate(), eager/compile
    python benchmarks/cpu_torch.py --part generate --no-compile --budgets 0.3

**linears**: SmolLM2's linear shapes and 4096×4096, 1 and 256 rows, fp32 and bf16 activations:
dense ``F.linear`` vs the slimfx modules (int8 per channel and g128, int4 g32/g64/g128, low-rank at the
same bytes as int4 g32) as ``optimize`` returns them (packed kernels installed) and the
reference op they replace; each timed over enough copies of the weight to overflow the caches
(so decode times are memory-bound, as in a model), next to the copy-bandwidth floor: the
stored bytes at this box's measured read bandwidth (a sum over 256 MiB; the copy bandwidth is
printed too).

**generate**: SmolLM2-135M (fp32, real weights) optimized on the lee news text at each budget
(saved under ``--cache`` and reused), then: held-out perplexity with the packed kernels and with
the reference ops, ``generate()`` decode ms/token and prefill ms for ``--prefill`` tokens, in
eager and under ``torch.compile`` (static cache, inductor), dense vs slimfx; and torchao's
int8 weight-only model if torchao imports (int4 too where it has a CPU path).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dump, run_meta  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096)]  # (in, out)


def _time(fn, reps: int, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    a = torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    s = _time(lambda: b.copy_(a), 10)
    return 2 * a.numel() / s


def read_bandwidth() -> float:
    """Bytes/s read by a sum over 256 MiB of fp32 (what a decode GEMV streams)."""
    a = torch.ones(64 * 2**20, dtype=torch.float32)
    s = _time(lambda: a.sum(), 10)
    return a.numel() * 4 / s


def _modules(in_f: int, out_f: int, seed: int, dtype: torch.dtype) -> dict[str, nn.Module]:
    from slimfx.ir.cpu_runtime import prepare_cpu
    from slimfx.ir.modules import module_for
    from slimfx.numerics import factorize
    from slimfx.planning.configs import LowRankConfig, QuantConfig

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    dense = nn.Linear(in_f, out_f, bias=False)
    dense.weight.data = w
    out: dict[str, nn.Module] = {"dense": dense}
    rank = max(1, int(0.3 * in_f * out_f / (in_f + out_f)))  # ≈ int4 g32's bytes at 16 bits
    cfgs = {"int8 ch": QuantConfig(8, None, True), "int8 g128": QuantConfig(8, 128, False),
            "int4 g32": QuantConfig(4, 32, False),
            "int4 g64": QuantConfig(4, 64, False), "int4 g128": QuantConfig(4, 128, False),
            f"lowrank r={rank}": LowRankConfig(rank)}
    for name, cfg in cfgs.items():
        if cfg.kind == "quant" and cfg.group_size and in_f % cfg.group_size:
            continue
        mod = module_for(cfg).empty(cfg, in_f, out_f, False)
        mod.load_factors(factorize(w, cfg), None)
        out[name] = mod
    for name, mod in list(out.items()):
        mod.to(dtype)
        if hasattr(mod, "qweight"):
            ref = module_for(mod.decision).empty(mod.decision, in_f, out_f, False, dtype)
            ref.load_state_dict(mod.state_dict())
            out[name + " (reference op)"] = ref
            prepare_cpu(mod)
    return out


def _stored_bytes(mod: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*mod.parameters(), *mod.buffers()])


@torch.no_grad()
def part_linears(reps: int, pool_mb: int) -> list[dict]:
    bw, copy = read_bandwidth(), copy_bandwidth()
    print(f"read bandwidth {bw / 1e9:.1f} GB/s, copy {copy / 1e9:.1f} GB/s (read + write), "
          f"threads {torch.get_num_threads()}")
    rows = []
    for in_f, out_f in SHAPES:
        n_copies = max(2, int(pool_mb * 2**20 // (in_f * out_f * 4)))
        for act in (torch.float32, torch.bfloat16):
            copies = [_modules(in_f, out_f, seed, act) for seed in range(n_copies)]
            for rows_m in (1, 256):
                x = torch.randn(rows_m, in_f).to(act)
                line = {"shape": f"{in_f}→{out_f}", "rows": rows_m, "act": str(act)[6:]}
                base = 1.0
                for name in copies[0]:
                    mods = [c[name] for c in copies]
                    it = iter(range(10**9))
                    k = len(mods)
                    r = reps if "reference" not in name or rows_m == 1 else max(2, reps // 10)
                    s = _time(lambda mods=mods, it=it, k=k, x=x: mods[next(it) % k](x), r)
                    if name == "dense":
                        base = s
                    floor = _stored_bytes(mods[0]) / bw
                    rows.append({**line, "form": name, "us": s * 1e6, "x_dense": s / base,
                                 "floor_us": floor * 1e6})
                    print(f"{line['shape']:>11} M={rows_m:<3} {line['act']:>8} {name:<28} "
                          f"{s * 1e6:9.1f} µs  ×{s / base:6.2f} dense   floor {floor * 1e6:7.1f}",
                          flush=True)
            del copies
            gc.collect()
    return rows


# --------------------------------------------------------------------------------- generate


def _decode_ms(model: nn.Module, prompt: torch.Tensor, n: int) -> float:
    kw = {"do_sample": False}
    model.generate(prompt, max_new_tokens=3, min_new_tokens=3, **kw)
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    one = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
    return (time.perf_counter() - t - one) / (n - 1) * 1e3


@torch.no_grad()
def _prefill_ms(model: nn.Module, ids: torch.Tensor) -> float:
    return _time(lambda: model(ids, use_cache=False), 3, warm=1) * 1e3


@torch.no_grad()
def _decode_ms_static(model: nn.Module, prompt: torch.Tensor, n: int, compiled: bool | str,
                      warm: int = 3) -> tuple[float, float]:
    """``(ms per decode step, seconds of warm-up)``: greedy steps over one fixed-size
    ``StaticCache`` (so a compiled forward sees one shape and compiles once), eager or through
    ``torch.compile(model.forward)`` (inductor; ``compiled`` a string: that backend, e.g.
    ``"slimfx"``); the prompt's prefill runs eager."""
    from transformers import StaticCache

    L = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=L + n + warm + 1)
    fwd = (torch.compile(model.forward, backend=compiled) if isinstance(compiled, str)
           else torch.compile(model.forward) if compiled else model.forward)
    out = model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(L))
    tok = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for i in range(warm + n):
        if i == warm:
            t_warm, t0 = time.perf_counter() - t0, time.perf_counter()
        out = fwd(tok, past_key_values=cache, use_cache=True,
                  cache_position=torch.tensor([L + i]))
        tok = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / n * 1e3, t_warm


def _slimfx_model(budget: float, cache: Path, calib, tok_model) -> nn.Module:
    import slimfx

    d = cache / f"b{budget}"
    if not (d / "plan.json").exists():
        model = tok_model()
        small = slimfx.optimize(model, budget, calibration=calib, progress=False)
        slimfx.save(small, d)
        del small, model
    return slimfx.load(d)


def _torchao(kind: str, load) -> tuple[nn.Module | None, str]:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception as e:  # noqa: BLE001 - any import failure means "not installed here"
        return None, f"torchao does not import: {e!r}"
    model = load()
    if kind == "int8-bf16":
        model = model.to(torch.bfloat16)
    quantize_(model, Int8WeightOnlyConfig())
    return model, ""


def part_generate(a: argparse.Namespace) -> list[dict]:
    import slimfx
    from slimfx.data.text import calibration_batches, heldout_windows
    from slimfx.eval import perplexity
    from slimfx.models import load_smollm2

    _, tok = load_smollm2()

    def load() -> nn.Module:
        return load_smollm2()[0]

    calib = calibration_batches(tok, name="lee", n=16, seq_len=256)
    held = heldout_windows(tok, name="lee", n=a.n_eval, seq_len=256)
    prompt = tok("The weather in Sydney today is", return_tensors="pt").input_ids
    ids = held[:1, : a.prefill]
    models: dict[str, tuple] = {"dense": (load, "")}
    for b in a.budgets:
        models[f"slimfx b={b}"] = (lambda b=b: _slimfx_model(b, Path(a.cache), calib, load), "")
    for kind in ("int8-fp32", "int8-bf16"):
        models[f"torchao {kind}"] = (lambda kind=kind: _torchao(kind, load)[0], kind)
    rows = []
    for name, (make, _) in models.items():
        model = make()
        if model is None:
            print(f"{name}: skipped ({_torchao('int8-fp32', load)[1]})")
            continue
        model.eval()
        row = {"model": name, "bytes": sum(t.numel() * t.element_size()
                                            for t in [*model.parameters(), *model.buffers()])}
        row["ppl"] = perplexity(model, held)
        if name.startswith("slimfx"):
            from slimfx.ir.cpu_runtime import packed_bytes

            row["packed_bytes"] = packed_bytes(model)
            n = slimfx.release_cpu(model)
            row["ppl_reference_ops"] = perplexity(model, held)
            row["decode_ms_reference_ops"] = _decode_ms(model, prompt, 6)
            slimfx.prepare_cpu(model)
            row["packed_modules"] = n
        row["decode_ms"] = _decode_ms(model, prompt, a.tokens)
        row["prefill_ms"] = _prefill_ms(model, ids)
        row["decode_ms_static"] = _decode_ms_static(model, prompt, a.tokens, False)[0]
        if a.compile and not name.startswith("torchao"):  # torchao: eager only (time)
            ms, warm_s = _decode_ms_static(model, prompt, a.tokens, True)
            row["decode_ms_compile"], row["compile_s"] = ms, warm_s
            torch._dynamo.reset()
            if name.startswith("slimfx"):  # backend="slimfx": its CPU path, then inductor
                ms, warm_s = _decode_ms_static(model, prompt, a.tokens, "slimfx")
                row["decode_ms_compile_slimfx"] = ms
                torch._dynamo.reset()
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()},
              flush=True)
        rows.append(row)
        del model
        gc.collect()
    dense = rows[0]
    for r in rows:
        r["decode_speedup"] = dense["decode_ms"] / r["decode_ms"]
        r["prefill_speedup"] = dense["prefill_ms"] / r["prefill_ms"]
        if "decode_ms_compile" in r:
            r["compile_speedup_vs_dense_eager"] = (
                dense["decode_ms_static"] / r["decode_ms_compile"])
            r["compile_speedup_vs_dense_compile"] = (
                dense["decode_ms_compile"] / r["decode_ms_compile"])
    print("\n| model | MB | ppl (reference ops) | generate() decode ms/tok (×dense tok/s) | "
          "static-cache step, eager ms | compiled ms (×dense eager, ×dense compiled) | "
          f"prefill {a.prefill} ms (×dense) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        comp = (f"{r['decode_ms_compile']:.1f} (×{r['compile_speedup_vs_dense_eager']:.2f}, "
                f"×{r['compile_speedup_vs_dense_compile']:.2f})"
                if "decode_ms_compile" in r else "")
        ref = f" ({r['ppl_reference_ops']:.2f})" if "ppl_reference_ops" in r else ""
        if "decode_ms_compile_slimfx" in r:
            comp += f"; backend='slimfx' {r['decode_ms_compile_slimfx']:.1f}"
        print(f"| {r['model']} | {r['bytes'] / 1e6:.1f} | {r['ppl']:.2f}{ref} | "
              f"{r['decode_ms']:.1f} (×{r['decode_speedup']:.2f}) | {r['decode_ms_static']:.1f} | "
              f"{comp} | {r['prefill_ms']:.0f} (×{r['prefill_speedup']:.2f}) |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["linears", "generate", "all"], default="all")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--pool-mb", type=int, default=96, help="weight copies rotated per shape")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--cache", default="out/cpu_torch", help="optimized models saved here")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens timed")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows: list[dict] = []
    if a.part in ("linears", "all"):
        rows += part_linears(a.reps, a.pool_mb)
    if a.part in ("generate", "all"):
        rows += part_generate(a)
    dump(a.json, run_meta(threads=torch.get_num_threads(), torch=torch.__version__), rows)


if __name__ == "__main__":
    main()
