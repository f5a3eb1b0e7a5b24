"""One decode-attention step: MLA over the latent cache (Triton) vs SDPA over the GQA cache.

    python benchmarks/mla_decode.py [--json out.json] [--contexts 1024,4096,16384,32768]
        [--batches 1,8] [--shape llama3-8b|smollm2]
    python benchmarks/mla_decode.py --device cpu --tiny     # smoke test (Triton interpreter)

Per context length S and batch B, one query token per sequence, bf16:

- ``sdpa gqa``   ``F.scaled_dot_product_attention(q, K, V, enable_gqa=True)`` over the original
  cache (K kv heads × head_dim keys and values per token);
- ``mla bf16``   ``slimfx_kernels::mla_decode_triton`` over the latent (rank R) + the RoPE key
  shared by all heads (P per token), query already absorbed (``q_lat`` = W_ukᵀ q'_nope);
- ``mla int8``   the same with int8 latent codes and one bf16 scale per token.

- ``kv int4``    ``slimfx_kernels::kv_decode_attention_triton`` over the int4 KV cache of the
  original GQA block (keys per channel in 32-token groups, values per token in 32-channel
  groups, float16 scales and minimums, a bf16 window of the last 32 tokens): the quantized
  cache the latent competes with.

The absorbed query/output projections (``W_ukᵀ`` on the query, ``W_uv`` on the r-wide context)
are per-step GEMVs outside the attention and are not timed here. Each row: time per call (``triton.testing.do_bench`` on CUDA,
L2 flushed; wall clock on CPU), the bytes the method must read (cache + queries), the HBM limit
(those bytes over a device-to-device copy bandwidth measured in the same run) and ``bw%`` =
limit / time. Every method is checked once against ``mla_decode_reference`` (MLA rows) or an
fp32 softmax attention (SDPA rows).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth, dump  # noqa: E402
from kv_attention import make_cache  # noqa: E402

SHAPES = {
    # H query heads, K kv heads and head_dim of the original GQA cache; latent rank R and the
    # width P of the one RoPE key the converted block shares across heads (K·2p, p pairs per kv
    # head): the latent cache holds R + P values per token vs 2·K·head_dim
    "llama3-8b": dict(H=32, K=8, d=128, R=448, P=64),  # 1/4 of the cache, 4 pairs per kv head
    "smollm2": dict(H=9, K=3, d=64, R=144, P=48),  # 1/2 of the cache, 8 pairs per kv head
    "tiny": dict(H=6, K=2, d=16, R=20, P=4),
}


def _methods(torch, F, tk, reference, dev, dt, B: int, S: int, shape: dict) -> tuple:
    """``{name: (run, bytes read)}`` and ``{name: fp32 reference}`` for one (B, S)."""
    from functools import partial

    H, K, d, R, P = (shape[k] for k in ("H", "K", "d", "R", "P"))
    scale = d**-0.5
    g = torch.Generator(device=dev).manual_seed(S + B)  # drawn where they are used

    def rnd(*size: int):
        return torch.randn(*size, generator=g, device=dev).to(dt)

    q = rnd(B, H, 1, d)
    keys, vals = rnd(B, K, S, d), rnd(B, K, S, d)
    q_lat, q_rope = rnd(B, H, R) * 0.05, rnd(B, H, P)
    latent, k_rope = rnd(B, S, R), rnd(B, S, 1, P)  # one RoPE key shared by all heads
    codes = torch.randint(-127, 128, (B, S, R), generator=g, device=dev).to(torch.int8)
    scales = (torch.rand(B, S, generator=g, device=dev) * 0.02).to(dt)
    lengths = torch.full((B,), S, dtype=torch.int32, device=dev)
    bf16 = (q_lat, q_rope, latent, None, k_rope, lengths, scale)
    int8 = (q_lat, q_rope, codes, scales, k_rope, lengths, scale)
    q_bytes = B * H * (R + P) * 2

    def sdpa_ref():
        kk = keys.float().repeat_interleave(H // K, 1)
        vv = vals.float().repeat_interleave(H // K, 1)
        return torch.softmax(q.float() @ kk.transpose(-1, -2) * scale, -1) @ vv

    # issue 10's int4 KV cache of the same GQA block (keys per channel in 32-token groups,
    # values per token in 32-channel groups, a 32-token bf16 window), its fused Triton kernel
    from slimfx.kernels.kv_attention import kv_decode_attention_triton
    from slimfx.kernels.kv_attention.reference import kv_decode_attention_reference

    kg, vg, win = (8, 8, 8) if d < 32 else (32, 32, 32)  # the tiny shape: smaller groups
    n_win = min(S, win) + (S - min(S, win)) % kg
    store, k_win, v_win, _, _ = make_cache(B, K, d, S - n_win, n_win, 4, kg, vg, dev, seed=S + B)
    kv4 = (q[:, :, 0], *store, k_win, v_win, 4, 4, kg, vg, scale)
    kv4_bytes = sum(t.numel() * t.element_size() for t in (*store, k_win, v_win)) + B * H * d * 2

    methods = {
        "sdpa gqa": (
            partial(F.scaled_dot_product_attention, q, keys, vals, enable_gqa=True),
            2 * B * S * K * d * 2 + B * H * d * 2,
        ),
        "mla bf16": (partial(tk.mla_decode, *bf16), B * S * (R * 2 + P * 2) + q_bytes),
        "mla int8": (partial(tk.mla_decode, *int8), B * S * (R + 2 + P * 2) + q_bytes),
        "kv int4": (partial(kv_decode_attention_triton, *kv4), kv4_bytes),
    }
    refs = {"sdpa gqa": sdpa_ref, "mla bf16": partial(reference, *bf16),
            "mla int8": partial(reference, *int8),
            "kv int4": partial(kv_decode_attention_reference, *kv4)}
    return methods, refs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch
    import torch.nn.functional as F

    from slimfx.kernels.mla_decode import triton_kernel as tk
    from slimfx.kernels.mla_decode.reference import mla_decode_reference

    if a.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --tiny for the smoke test")
        return 2
    dev = torch.device(a.device)
    shape = SHAPES["tiny" if a.tiny else a.shape]
    contexts = [33, 70] if a.tiny else [int(s) for s in a.contexts.split(",")]
    batches = [1, 2] if a.tiny else [int(s) for s in a.batches.split(",")]
    dt = torch.bfloat16

    if dev.type == "cuda":
        import triton

        def bench(fn) -> float:
            return triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3  # µs

        bw = copy_bandwidth(torch, dev, bench)  # bytes/s (read + write)
        name = torch.cuda.get_device_name(dev)
    else:
        def bench(fn) -> float:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6

        bw, name = float("nan"), f"{platform.machine()} CPU (Triton interpreter)"

    rows = []
    for B in batches:
        for S in contexts:
            methods, refs = _methods(torch, F, tk, mla_decode_reference, dev, dt, B, S, shape)
            for mname, (fn, nbytes) in methods.items():
                out = fn().float()
                ref = refs[mname]().float()
                err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                us = bench(fn)
                limit_us = nbytes / bw * 1e6 if bw == bw else float("nan")
                row = dict(method=mname, batch=B, context=S, us=us, bytes=nbytes,
                           limit_us=limit_us, bw_pct=100 * limit_us / us, rel_err=err,
                           ok=err < 2e-2)
                rows.append(row)
                dump(a.json, dict(device=name, partial=True), rows)  # kept if the step is cut
                print(f"B={B:<2d} S={S:<6d} {mname:9s} {us:10.1f} µs  {nbytes / 1e6:9.3f} MB  "
                      f"limit {limit_us:8.1f} µs  bw {row['bw_pct']:5.1f}%  err {err:.1e}"
                      + ("" if row["ok"] else "  MISMATCH"), flush=True)
    for B in batches:
        for S in contexts:
            base = next(r["us"] for r in rows if r["method"] == "sdpa gqa"
                        and r["batch"] == B and r["context"] == S)
            for r in rows:
                if r["batch"] == B and r["context"] == S:
                    r["x_sdpa"] = r["us"] / base
    meta = dict(device=name, torch=torch.__version__, shape=shape, dtype="bfloat16",
                copy_bandwidth_gbs=bw / 1e9, date=time.strftime("%Y-%m-%d"))
    dump(a.json, meta, rows)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
