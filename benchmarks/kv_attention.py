"""Decode-attention step time over a quantized KV cache (Triton, fused dequantization) vs
PyTorch SDPA over the bf16 cache, and the bytes each reads against the bandwidth limit (a
device-to-device copy measured in the same run unless ``--peak-gbps`` is given).

For each context (default 1k/4k/16k/32k tokens) and batch (1, 8): one query token per sequence,
GQA shape of an 8B Llama by default (32 query heads, 8 kv heads, head_dim 128). The quantized
cache holds ``context − window`` tokens in the store (random codes, float16 scales/minimums;
keys per channel per ``key_group`` tokens, values per token per ``value_group`` channels) and a
bf16 window of ``window`` tokens. Both paths are checked against the torch reference first.
Times: ``triton.testing.do_bench`` medians on CUDA; ``--device cpu --tiny`` runs a smoke test
through the Triton interpreter (tiny shapes, wall-clock, numbers meaningless).

    python benchmarks/kv_attention.py [--bits 4] [--contexts 1024,4096,16384,32768]
        [--batches 1,8] [--peak-gbps GB/s] [--json out.json]
    TRITON_INTERPRET=1 python benchmarks/kv_attention.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth, dump  # noqa: E402


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU interpreter smoke)")
    ap.add_argument("--bits", type=int, default=4, help="key and value bits (2, 4, 8)")
    ap.add_argument("--key-group", type=int, default=32)
    ap.add_argument("--value-group", type=int, default=32)
    ap.add_argument("--window", type=int, default=32, help="16-bit residual tokens")
    ap.add_argument("--heads", default="32,8,128", help="query heads, kv heads, head_dim")
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument(
        "--peak-gbps", type=float, default=0.0,
        help="bandwidth limit in GB/s (default: a device copy measured in the same run)",
    )  # fmt: skip
    ap.add_argument("--json", default="")
    return ap.parse_args(argv)


def make_cache(B, Hkv, D, n_store, n_win, bits, kg, vg, device, seed=0):  # noqa: ANN001, ANN201
    """Random store + bf16 window in the kernel's layout, and the bf16 cache it dequantizes to
    (what SDPA reads)."""
    import torch

    from slimfx.kernels.kv_attention.reference import dequantize_store

    g = torch.Generator(device=device).manual_seed(seed)  # generated where it is used
    pb = D * bits // 8
    kw = {"generator": g, "device": device}

    def f16(*shape: int, lo: float, hi: float) -> torch.Tensor:
        return (torch.rand(*shape, **kw) * (hi - lo) + lo).half()

    def codes(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, **kw)

    store = {
        "k_codes": codes(B, Hkv, n_store, pb),
        "k_scale": f16(B, Hkv, n_store // kg, D, lo=0.01, hi=0.2),
        "k_min": f16(B, Hkv, n_store // kg, D, lo=-1.5, hi=-0.5),
        "v_codes": codes(B, Hkv, n_store, pb),
        "v_scale": f16(B, Hkv, n_store, D // vg, lo=0.01, hi=0.2),
        "v_min": f16(B, Hkv, n_store, D // vg, lo=-1.5, hi=-0.5),
    }
    k_win = torch.randn(B, Hkv, n_win, D, **kw).bfloat16()
    v_win = torch.randn(B, Hkv, n_win, D, **kw).bfloat16()
    names = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")
    k, v = dequantize_store(*(store[n] for n in names), bits, bits, kg, vg)
    dense_k = torch.cat([k.bfloat16(), k_win], 2)
    dense_v = torch.cat([v.bfloat16(), v_win], 2)
    return [store[n] for n in names], k_win, v_win, dense_k, dense_v


def _time(fn, device: str, tiny: bool) -> float:  # noqa: ANN001
    """Median microseconds of ``fn()``."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    reps = 2 if tiny else 5
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return sorted(t)[len(t) // 2] * 1e6


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.nn.functional as F

    if a.device == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks/kv_attention.py needs a CUDA GPU (or --device cpu --tiny)", file=sys.stderr
        )
        return 2
    from slimfx.kernels.kv_attention import kv_decode_attention_triton
    from slimfx.kernels.kv_attention.reference import kv_decode_attention_reference

    Hq, Hkv, D = (int(x) for x in a.heads.split(","))
    contexts = [int(x) for x in a.contexts.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    if a.tiny:
        Hq, Hkv, D, contexts = 4, 2, 32, [80, 161]
        batches = [1, 2] if a.batches == "1,8" else batches
        a.window = min(a.window, 8)
    bits, kg, vg = a.bits, a.key_group if not a.tiny else 8, min(a.value_group, D)
    if not a.peak_gbps:  # the card's own copy bandwidth (read + write), measured now
        a.peak_gbps = (
            copy_bandwidth(torch, a.device, lambda fn: _time(fn, a.device, a.tiny)) / 1e9
            if a.device == "cuda" else float("nan")
        )  # fmt: skip
    rows, bad = [], 0
    for B in batches:
        for ctx in contexts:
            n_win = a.window + (ctx - a.window) % kg
            n_store = ctx - n_win
            store, k_win, v_win, dk, dv = make_cache(
                B, Hkv, D, n_store, n_win, bits, kg, vg, a.device
            )
            q = torch.randn(B, Hq, D, device=a.device).bfloat16()
            scaling = D**-0.5
            args = (q, *store, k_win, v_win, bits, bits, kg, vg, scaling)
            ref = kv_decode_attention_reference(*args).float()
            out = kv_decode_attention_triton(*args).float()
            err = float((out - ref).abs().max() / ref.abs().max())
            q4 = q.unsqueeze(2)

            sdpa = functools.partial(
                F.scaled_dot_product_attention, q4, dk, dv, scale=scaling, enable_gqa=True
            )
            run_q = functools.partial(kv_decode_attention_triton, *args)
            sd_err = float((sdpa().squeeze(2).float() - ref).abs().max() / ref.abs().max())
            us_q = _time(run_q, a.device, a.tiny)
            us_d = _time(sdpa, a.device, a.tiny)
            bytes_q = sum(t.numel() * t.element_size() for t in (*store, k_win, v_win))
            bytes_d = dk.numel() * dk.element_size() * 2
            row = {
                "batch": B,
                "context": ctx,
                "bits": bits,
                "us_quant": us_q,
                "us_sdpa_bf16": us_d,
                "ratio": us_q / us_d,
                "bytes_quant": bytes_q,
                "bytes_bf16": bytes_d,
                "gbps_quant": bytes_q / us_q / 1e3,
                "gbps_sdpa": bytes_d / us_d / 1e3,
                "rel_err_kernel": err,
                "rel_err_sdpa": sd_err,
            }
            rows.append(row)
            dump(a.json, {"partial": True}, rows)  # kept if the step is cut short
            print(
                f"B={B:2d} ctx={ctx:6d} int{bits}: {us_q:9.1f} us ({row['gbps_quant']:7.1f} GB/s, "
                f"{100 * row['gbps_quant'] / a.peak_gbps:5.1f}% of peak)  sdpa bf16: {us_d:9.1f} us "
                f"({row['gbps_sdpa']:7.1f} GB/s)  ratio {row['ratio']:.3f}  err {err:.1e}",
                flush=True,
            )
            if err >= 2e-2:  # recorded, and the run ends non-zero after every row
                bad += 1
                row["mismatch"] = True
                print(f"  MISMATCH: the kernel is {err:.1e} from the reference", flush=True)
    if a.json:
        meta = {
            "device": a.device,
            "tiny": a.tiny,
            "heads": [Hq, Hkv, D],
            "window": a.window,
            "key_group": kg,
            "value_group": vg,
            "peak_gbps": a.peak_gbps,
            "peak_source": "measured device copy" if a.device == "cuda" else "none (CPU)",
        }
        if a.device == "cuda":
            meta["gpu"] = torch.cuda.get_device_name(0)
        dump(a.json, meta, rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
