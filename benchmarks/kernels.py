"""Time slimfx's Triton kernels against torch on Llama-3-8B-shaped linears (GPU only).

    .venv/bin/python benchmarks/kernels.py [--json out.json] [--ms 1,16,2048] [--quick]

Per weight shape N×K (4096×4096, 14336×4096, 4096×14336) and rows M (1, 16, 2048), bf16:

- ``dense``            torch ``F.linear`` on the bf16 weight;
- ``slimfx int4 g128`` ``slimfx_kernels::quant_linear_triton`` (asymmetric, uint8 zeros);
- ``tinygemm int4 g128`` torch's own ``torch._weight_int4pack_mm`` (weights packed with
  ``torch._convert_weight_to_int4pack``, inner_k_tiles=8), or "unavailable: <reason>";
- at M=1 also ``slimfx int8 ch`` (per-channel), low-rank r=256 (fused and tiled) and r=512,
  ``torch 2×linear`` for the same factors, ``slimfx 2:4`` (Triton GEMV) and, at M=2048,
  ``torch 2:4`` (``to_sparse_semi_structured``).

Each row reports GPU time per call from a CUDA graph replaying calls round-robin over enough
weight copies (≥ 200 MB in all, so the 50 MB L2 cannot serve the weights), the eager time
from ``triton.testing.do_bench`` (L2 flushed before each call; includes launch overhead when
the GPU outruns Python), the bytes the method must read, and the HBM limit: those bytes over
the copy bandwidth measured in the same run (a device-to-device copy). Ratios: ``×dense`` is
dense time / method time (speed-up), ``×tiny`` the same against tinygemm, ``bw%`` is
limit / time. Every method's output is checked
once against a dense computation of the same weights; a mismatch is printed in the row.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = {"q/o/down-in": (4096, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
ROTATE_BYTES = 200 * 2**20  # round-robin over this many bytes of weights (4× the H100 L2)
MAX_COPIES = 32
CHECK_TOL = 2e-2  # relative to max |ref|: bf16 output rounding plus summation order

Runner = Callable[[Tensor], Tensor]


@dataclass
class Method:
    """One way to compute y = x Wᵀ. ``build(seed)`` returns ``(run, reference)``; both map x
    to y, ``reference`` with a plain dense matmul of the same (dequantized) weights."""

    name: str
    family: str
    weight_bytes: int
    build: Callable[[int], tuple[Runner, Runner]]


@dataclass
class Row:
    """One timed (shape, M, method)."""

    shape: str
    N: int
    K: int
    M: int
    method: str
    family: str
    weight_bytes: int
    us_graph: float | None = None
    us_eager: float | None = None
    us_bw_limit: float | None = None
    x_dense: float | None = None
    x_tinygemm: float | None = None
    bw_frac: float | None = None
    max_rel_err: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------- weights


def _gen(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def dense_method(N: int, K: int, dtype: torch.dtype, device: torch.device) -> Method:
    def build(seed: int) -> tuple[Runner, Runner]:
        w = (torch.randn(N, K, generator=_gen(seed, device), device=device) / K**0.5).to(dtype)
        return (lambda x: F.linear(x, w)), (lambda x: F.linear(x, w))

    return Method("dense", "dense", 2 * N * K, build)


def _quant_tensors(
    N: int, K: int, bits: int, G: int | None, symmetric: bool, dtype: torch.dtype,
    device: torch.device, seed: int,
) -> dict:
    from slimfx.kernels.quant_linear.reference import n_groups, pack_int4

    g = _gen(seed, device)
    q = torch.randint(0, 1 << bits, (N, K), generator=g, device=device)
    ng = n_groups(K, G)
    scales = (torch.rand(N, ng, generator=g, device=device) * 0.02 / K**0.5).to(dtype)
    zeros = None if symmetric else torch.randint(
        0, 1 << bits, (N, ng), generator=g, device=device).to(torch.uint8)
    qweight = pack_int4(q) if bits == 4 else q.to(torch.uint8)
    return {"q": q, "qweight": qweight, "scales": scales, "zeros": zeros}


def quant_method(
    N: int, K: int, bits: int, G: int | None, symmetric: bool, dtype: torch.dtype,
    device: torch.device,
) -> Method:
    from slimfx.kernels.quant_linear.reference import dequantize, n_groups

    def build(seed: int) -> tuple[Runner, Runner]:
        t = _quant_tensors(N, K, bits, G, symmetric, dtype, device, seed)
        qw, s, z = t["qweight"], t["scales"], t["zeros"]
        op = torch.ops.slimfx_kernels.quant_linear_triton

        def ref(x: Tensor) -> Tensor:
            return F.linear(x, dequantize(qw, s, z, bits, G, K).to(x.dtype))

        return (lambda x: op(x, qw, s, z, None, bits, G)), ref

    ng = n_groups(K, G)
    nbytes = math.ceil(bits * N * K / 8) + 2 * N * ng + (0 if symmetric else N * ng)
    g = "ch" if G is None else f"g{G}"
    return Method(f"slimfx int{bits} {g}", f"int{bits}", nbytes, build)


def tinygemm_method(N: int, K: int, G: int, dtype: torch.dtype, device: torch.device) -> Method:
    """torch's tinygemm int4 kernel on the same codes/scales/zeros as ``slimfx int4``.

    tinygemm computes w = (q − 8)·s + zf per group with a float zero ``zf``; the uint8 zero
    point z maps to zf = (8 − z)·s. Since torch 2.5 ``_convert_weight_to_int4pack`` takes uint8
    (N × K/2) with the even column in the HIGH nibble (the opposite of slimfx's ONNX order);
    older versions take int32 (N × K) codes. Both are tried.
    """
    from slimfx.kernels.quant_linear.reference import dequantize

    def build(seed: int) -> tuple[Runner, Runner]:
        if dtype != torch.bfloat16:
            raise RuntimeError("tinygemm needs bf16 activations")
        t = _quant_tensors(N, K, 4, G, False, dtype, device, seed)
        q, s, z = t["q"], t["scales"], t["zeros"]
        try:
            packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
            w = torch._convert_weight_to_int4pack(packed, 8)
        except (RuntimeError, TypeError):
            w = torch._convert_weight_to_int4pack(q.to(torch.int32).contiguous(), 8)
        zf = (8.0 - z.float()) * s.float()
        sz = torch.stack([s.float().t(), zf.t()], dim=-1).to(torch.bfloat16).contiguous()

        def ref(x: Tensor) -> Tensor:
            return F.linear(x, dequantize(t["qweight"], s, z, 4, G, K).to(x.dtype))

        return (lambda x: torch._weight_int4pack_mm(x, w, G, sz)), ref

    ng = K // G
    return Method(f"tinygemm int4 g{G}", "int4", N * K // 2 + 4 * N * ng, build)


def lowrank_method(
    N: int, K: int, r: int, dtype: torch.dtype, device: torch.device, path: str
) -> Method:
    def build(seed: int) -> tuple[Runner, Runner]:
        from slimfx.kernels.lowrank_linear import triton_kernel as lk

        g = _gen(seed, device)
        U = (torch.randn(N, r, generator=g, device=device) / r**0.5).to(dtype)
        V = (torch.randn(r, K, generator=g, device=device) / K**0.5).to(dtype)

        def ref(x: Tensor) -> Tensor:
            return F.linear(F.linear(x, V), U)

        run: Runner = {
            "auto": lambda x: torch.ops.slimfx_kernels.lowrank_linear_triton(x, U, V, None),
            "tiled": lambda x: lk.lowrank_linear_tiled(x, U, V),
            "torch": ref,
        }[path]
        return run, ref

    label = {"auto": "slimfx", "tiled": "slimfx tiled", "torch": "torch 2×linear"}[path]
    if path == "auto":
        label += " fused" if r <= 256 else " tiled"
    return Method(f"{label} lowrank r={r}", "lowrank", 2 * r * (N + K), build)


def sparse_method(N: int, K: int, dtype: torch.dtype, device: torch.device, path: str) -> Method:
    def build(seed: int) -> tuple[Runner, Runner]:
        from slimfx.kernels import sparse24_linear as sp
        from slimfx.kernels.sparse24_linear.reference import densify_sparse24, pack_sparse24

        w = torch.randn(N, K, generator=_gen(seed, device), device=device) / K**0.5
        values, meta = pack_sparse24(w.to(dtype))
        dense = densify_sparse24(values, meta, K)
        del w

        def ref(x: Tensor) -> Tensor:
            return F.linear(x, dense.to(x.dtype))

        if path == "triton":
            return (lambda x: torch.ops.slimfx_kernels.sparse24_linear_triton(
                x, values, meta, None)), ref
        ok, why = sp.supports_semi_structured(torch.empty(32, K, dtype=dtype, device=device),
                                              values, meta)
        if not ok:
            raise RuntimeError(why)
        return (lambda x: sp.run_semi_structured(x, values, meta)), ref

    name = "slimfx 2:4" if path == "triton" else "torch 2:4 semi-structured"
    return Method(name, "sparse24", N * K + N * K // 8, build)


def methods_for(N: int, K: int, M: int, dtype: torch.dtype, device: torch.device) -> list[Method]:
    """The methods timed for one (shape, M): dense baseline first, tinygemm second."""
    ms = [
        dense_method(N, K, dtype, device),
        tinygemm_method(N, K, 128, dtype, device),
        quant_method(N, K, 4, 128, False, dtype, device),
    ]
    if M == 1:
        ms += [
            quant_method(N, K, 8, None, True, dtype, device),
            lowrank_method(N, K, 256, dtype, device, "auto"),
            lowrank_method(N, K, 256, dtype, device, "tiled"),
            lowrank_method(N, K, 256, dtype, device, "torch"),
            lowrank_method(N, K, 512, dtype, device, "auto"),
            sparse_method(N, K, dtype, device, "triton"),
        ]
    if M >= 32:
        ms.append(sparse_method(N, K, dtype, device, "semi"))
    return ms


# ----------------------------------------------------------------------------------- timing


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the HBM limit we compare to."""
    from triton.testing import do_bench

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def check(run: Runner, ref: Runner, x: Tensor) -> float:
    """max |run(x) − ref(x)| / max |ref(x)|."""
    y, r = run(x).float(), ref(x).float()
    return ((y - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


def time_method(
    method: Method, x: Tensor, quick: bool
) -> tuple[float | None, float | None, float, str]:
    """(µs per call in a CUDA graph over rotated copies, µs eager, rel. error, note)."""
    from triton.testing import do_bench, do_bench_cudagraph

    copies = max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(method.weight_bytes, 1))))
    if quick:
        copies = min(copies, 4)
    runs = []
    run0, ref0 = method.build(0)
    err = check(run0, ref0, x)
    runs.append(run0)
    del ref0
    for seed in range(1, copies):
        runs.append(method.build(seed)[0])
    note = "" if err <= CHECK_TOL else f"MISMATCH rel err {err:.2e}"

    def rotated() -> None:
        for run in runs:
            run(x)

    us_graph = None
    try:
        us_graph = do_bench_cudagraph(rotated, rep=20 if quick else 100) * 1e3 / len(runs)
    except Exception as e:  # graph capture can fail for ops that sync or allocate oddly
        note = (note + "; " if note else "") + f"graph: {type(e).__name__}: {e}"[:120]
    us_eager = do_bench(lambda: run0(x), warmup=5 if quick else 25, rep=20 if quick else 100,
                        return_mode="median") * 1e3
    return us_graph, us_eager, err, note


def run_benchmarks(args: argparse.Namespace) -> tuple[list[Row], dict]:
    import slimfx.kernels  # noqa: F401  (registers the slimfx_kernels ops)

    device = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bw = copy_bandwidth(device)
    meta = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "dtype": args.dtype,
        "copy_bandwidth_GBps": bw / 1e9,
    }
    rows: list[Row] = []
    for shape_name, (N, K) in SHAPES.items():
        for M in args.ms:
            x = torch.randn(M, K, device=device).to(dtype)
            dense_us = tiny_us = None
            for method in methods_for(N, K, M, dtype, device):
                row = Row(f"{shape_name} {N}x{K}", N, K, M, method.name, method.family,
                          method.weight_bytes)
                io_bytes = 2 * M * (N + K)  # read x, write y (bf16)
                row.us_bw_limit = (method.weight_bytes + io_bytes) / bw * 1e6
                try:
                    row.us_graph, row.us_eager, row.max_rel_err, row.note = time_method(
                        method, x, args.quick)
                except Exception as e:
                    row.note = f"unavailable: {type(e).__name__}: {e}".splitlines()[0][:160]
                t = row.us_graph if row.us_graph is not None else row.us_eager
                if method.family == "dense":
                    dense_us = t
                if method.name.startswith("tinygemm"):
                    tiny_us = t
                if t:
                    row.x_dense = dense_us / t if dense_us else None
                    row.x_tinygemm = tiny_us / t if tiny_us else None
                    row.bw_frac = row.us_bw_limit / t
                rows.append(row)
                print(_format_row(row), flush=True)
                _write(args.json, meta, rows)  # a step cut short keeps the rows it measured
                torch.cuda.empty_cache()
    return rows, meta


def _write(path: Path | None, meta: dict, rows: list[Row]) -> None:
    if path:
        path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))


# ---------------------------------------------------------------------------------- output

_HEADER = (
    f"{'shape':<22} {'M':>5} {'method':<30} {'MB':>7} {'µs graph':>9} {'µs eager':>9} "
    f"{'µs limit':>9} {'×dense':>7} {'×tiny':>6} {'bw%':>5}  note"
)


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _format_row(r: Row) -> str:
    return (
        f"{r.shape:<22} {r.M:>5} {r.method:<30} {r.weight_bytes / 2**20:>7.1f} "
        f"{_f(r.us_graph, '.1f'):>9} {_f(r.us_eager, '.1f'):>9} {_f(r.us_bw_limit, '.1f'):>9} "
        f"{_f(r.x_dense, '.2f'):>7} {_f(r.x_tinygemm, '.2f'):>6} "
        f"{_f(None if r.bw_frac is None else 100 * r.bw_frac, '.0f'):>5}"
        f"  {r.note}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time slimfx Triton kernels vs torch dense, torch tinygemm int4 and the "
        "HBM bandwidth limit on Llama-3-8B-shaped linears. Needs a CUDA GPU."
    )
    p.add_argument("--json", type=Path, default=None, help="write the rows and run info here")
    p.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 2048],
                   help="comma-separated rows of x (default 1,16,2048)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--quick", action="store_true", help="fewer copies and shorter timing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU: torch.cuda.is_available() is False "
              "(the kernels' numerics are tested on CPU by tests/kernels).", file=sys.stderr)
        return 2
    print(_HEADER)
    rows, meta = run_benchmarks(args)
    print(f"copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s on {meta['device']}; "
          "×dense / ×tiny = dense / tinygemm µs over method µs; "
          "bw% = HBM-limit µs / method µs "
          "(graph time where captured, else eager)")
    if args.json:
        _write(args.json, meta, rows)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
