"""End-to-end batch-1 decode speed of a Llama-3.2-1B-shaped model: dense vs torch int4 vs slimfx.

    .venv/bin/python benchmarks/e2e_decode.py                      # GPU: the full measurement
    .venv/bin/python benchmarks/e2e_decode.py --device cpu --tiny  # CPU smoke test (< 2 min)

The model is built in code (``LlamaConfig``: hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP
8192, vocab 128256, tied embeddings — 2.47 GB of bf16 weights; random N(0, 0.02²) weights,
seeded). Decoding is greedy over a Hugging Face ``StaticCache``: the prompt is prefilled
eagerly (which also allocates the cache outside any compiled region), then one step per token
— ``model(token, position_ids, past_key_values)`` plus the argmax — runs through
``torch.compile(mode="reduce-overhead")`` (CUDA graphs). ``cache_position`` is passed only to
transformers versions whose forward takes it (≤ 4.x); newer ones keep the position in the cache.

Variants, each on its own copy of the same weights:

- ``dense``   bf16 ``nn.Linear``;
- ``int4``    every decoder ``nn.Linear`` swapped to torch's tinygemm int4 kernel
  (``torch._weight_int4pack_mm``, asymmetric group 128, float zero point — what torchao's int4
  weight-only does); on CPU ``_weight_int4pack_mm_for_cpu``;
- ``slimfx``  ``slimfx.optimize(budget, workload="decode", target="h100", families=int4,int8,
  backend="triton")`` on tiny random-token calibration, then ``lower_to_triton`` (on CPU the
  reference ops run: the Triton kernels need a GPU or the far too slow interpreter);
- ``floor``   the same linears replaced by free views (``FreeLinear``): what the decode step costs
  when the rewritten linears cost nothing — a measured upper bound on any linear-only rewrite.

``lm_head`` is tied to the embedding (as in Llama-3.2-1B): by default it stays dense in every
variant (slimfx would have to keep a dense copy for the embedding, so a budget over it is a
budget over bytes it cannot save); ``--lm-head int4`` unties it and rewrites it in ``int4`` and
``slimfx`` (inside the budget) and ``floor`` too.

Per variant: tokens/s (median of ``--runs`` runs of ``--tokens`` steps), weight bytes read per
token and the copy-bandwidth limit (weights + the KV cache the static cache attends over, over
the measured device-to-device copy bandwidth), a ``torch.profiler`` breakdown of each token's
time (linears, attention, other kernels, copies, and the gap = wall − kernel time), the
linears alone timed in a CUDA graph, and the speed-up bound (L+R)/(L·ratio+R) of rewriting only
the linears. ``--json PATH`` writes everything (after every variant, so a run cut short keeps
what it measured). One variant failing (printed traceback, ``FAILED`` row) does not stop the rest.

On the GPU, from the repository root (slimfx need not be installed; it needs numpy and tqdm,
scipy for the exact solver — greedy without it — and triton for its kernels)::

    python benchmarks/e2e_decode.py --json e2e_decode.json       # all four variants
    python benchmarks/e2e_decode.py --variants dense,int4,slimfx  # skip the floor (one compile)

Each variant compiles once (about a minute for 16 layers, not measured here); slimfx adds its
``optimize`` (capture, calibration, candidates; ``--families`` with ``lowrank`` or
``int4_gptq`` costs more).
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=8192, vocab_size=128256)
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=256)
VARIANTS = ("dense", "int4", "slimfx", "floor")
INT4_CHECK_TOL = 2e-2  # max |err| / max |ref|: bf16 output rounding plus summation order


# ------------------------------------------------------------------------------------ model


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0,
                std: float = 0.02) -> nn.Module:
    """A ``LlamaForCausalLM`` of ``shape`` with seeded N(0, std²) linear/embedding weights
    (norms at 1), in eval mode. No bos/eos/pad ids: greedy decoding never stops early."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, tie_word_embeddings=True, rope_theta=500000.0,
                      max_position_embeddings=131072, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=g)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model.to(device=device, dtype=dtype).eval()


def untie_lm_head(model: nn.Module) -> None:
    """Give ``lm_head`` its own copy of the embedding so it can be rewritten alone."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def decoder_linears(model: nn.Module, with_lm_head: bool) -> list[str]:
    """FQNs of the ``nn.Linear`` modules a variant rewrites: every one in the decoder layers,
    plus ``lm_head`` when asked."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and (n != "lm_head" or with_lm_head)]


def _set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


# ------------------------------------------------------------------------ torch int4 swap


def quantize_int4(w: Tensor, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Asymmetric group-wise int4 in tinygemm's form: codes ``q`` uint8 (N × K) in [0, 15] and
    ``scales_and_zeros`` (K/G × N × 2) in ``dtype`` with w ≈ (q − 8)·s + z per group, where
    s = (max − min)/15 and z = min + 8·s (a float zero point: the group's minimum is exact)."""
    N, K = w.shape
    if K % group:
        raise ValueError(f"in_features {K} is not a multiple of group {group}")
    wg = w.detach().float().reshape(N, K // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = ((hi - lo) / 15).clamp_min(1e-8)
    q = ((wg - lo.unsqueeze(-1)) / s.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    sz = torch.stack([s.t(), (lo + 8 * s).t()], dim=-1).to(dtype).contiguous()
    return q.reshape(N, K), sz


def dequantize_int4(q: Tensor, sz: Tensor, group: int) -> Tensor:
    """The float32 weight (N × K) that ``quantize_int4``'s codes stand for, from the stored
    (rounded) scales and zeros — what the int4 kernel computes with."""
    s = sz[..., 0].float().t().repeat_interleave(group, dim=1)
    z = sz[..., 1].float().t().repeat_interleave(group, dim=1)
    return (q.float() - 8) * s + z


#: Layouts ``torch._convert_weight_to_int4pack`` has taken on CUDA: uint8 (N × K/2) since torch
#: 2.5 (torchao puts the even column in the high nibble), int32 (N × K) codes before.
CUDA_INT4_PACKINGS = {
    "uint8, even column in the high nibble": lambda q: (q[:, ::2] << 4) | q[:, 1::2],
    "uint8, even column in the low nibble": lambda q: q[:, ::2] | (q[:, 1::2] << 4),
    "int32 codes (torch < 2.5)": lambda q: q.to(torch.int32),
}
_CHOSEN_PACKING: dict[str, str] = {}


def cuda_int4_packing(device: torch.device, inner_k_tiles: int = 8) -> str:
    """The entry of ``CUDA_INT4_PACKINGS`` this torch's CUDA int4 matmul reads, found once by
    running each on a small random weight against x·deq(W)ᵀ (so a layout change between torch
    versions cannot silently scramble the weights)."""
    if "cuda" in _CHOSEN_PACKING:
        return _CHOSEN_PACKING["cuda"]
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(64, 256, generator=g, device=device).to(torch.bfloat16)
    q, sz = quantize_int4(w, 128, torch.bfloat16)
    x = torch.randn(8, 256, generator=g, device=device).to(torch.bfloat16)
    ref = F.linear(x.float(), dequantize_int4(q, sz, 128))
    tried = []
    for name, pack in CUDA_INT4_PACKINGS.items():
        try:
            packed = torch._convert_weight_to_int4pack(pack(q).contiguous(), inner_k_tiles)
            y = torch._weight_int4pack_mm(x, packed, 128, sz).float()
        except (RuntimeError, TypeError) as e:
            tried.append(f"{name}: {type(e).__name__}")
            continue
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        if err <= INT4_CHECK_TOL:
            _CHOSEN_PACKING["cuda"] = name
            return name
        tried.append(f"{name}: rel err {err:.2e}")
    raise RuntimeError("no known layout makes torch._weight_int4pack_mm compute x·deq(W)ᵀ: "
                       + "; ".join(tried))


def pack_int4(q: Tensor, inner_k_tiles: int = 8) -> Tensor:
    """Codes (N × K) → the packed layout of torch's int4 matmul on ``q.device``: on CPU
    ``_convert_weight_to_int4pack_for_cpu`` of int32 codes; on CUDA the layout
    :func:`cuda_int4_packing` found."""
    if q.device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(),
                                                         inner_k_tiles)
    pack = CUDA_INT4_PACKINGS[cuda_int4_packing(q.device, inner_k_tiles)]
    return torch._convert_weight_to_int4pack(pack(q).contiguous(), inner_k_tiles)


class TorchInt4Linear(nn.Module):
    """``y = x · deq(W)ᵀ + b`` through torch's own int4 kernel (``_weight_int4pack_mm``, the
    tinygemm kernel torchao's int4 weight-only uses; ``…_for_cpu`` on CPU)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, group: int = 128,
                 inner_k_tiles: int = 8) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group = group
        q, sz = quantize_int4(weight, group, weight.dtype)
        self.register_buffer("packed", pack_int4(q, inner_k_tiles))
        self.register_buffer("scales_and_zeros", sz)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group,
                                                  self.scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm(x2, self.packed, self.group, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 g{self.group}"


def check_int4(mod: TorchInt4Linear, weight: Tensor, seed: int = 0) -> float:
    """max |mod(x) − x·deq(W)ᵀ| / max |x·deq(W)ᵀ| on 4 random rows (deq from the same codes)."""
    q, sz = quantize_int4(weight, mod.group, weight.dtype)
    g = torch.Generator(device=weight.device).manual_seed(seed)
    x = torch.randn(4, mod.in_features, generator=g, device=weight.device).to(weight.dtype)
    ref = F.linear(x.float(), dequantize_int4(q, sz, mod.group))
    y = mod(x).float()
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def swap_int4(model: nn.Module, fqns: list[str], group: int) -> float:
    """Replace each named ``nn.Linear`` by a ``TorchInt4Linear`` (in place); returns the
    :func:`check_int4` error of the first one."""
    err = float("nan")
    for i, fqn in enumerate(fqns):
        lin = model.get_submodule(fqn)
        mod = TorchInt4Linear(lin.weight, lin.bias, group)
        if i == 0:
            err = check_int4(mod, lin.weight)
        _set_module(model, fqn, mod)
    return err


class FreeLinear(nn.Module):
    """A linear that costs (almost) nothing: ``x`` tiled to ``out_features`` along the last dim.
    Numerically meaningless; used only to time the decode step without the linears."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        reps = -(-self.out_features // self.in_features)
        y = x if reps == 1 else x.repeat(*([1] * (x.dim() - 1)), reps)
        return y[..., : self.out_features].contiguous()


def swap_free(model: nn.Module, fqns: list[str]) -> None:
    """Replace each named linear by a :class:`FreeLinear` (in place)."""
    for fqn in fqns:
        lin = model.get_submodule(fqn)
        _set_module(model, fqn, FreeLinear(lin.in_features, lin.out_features))


# --------------------------------------------------------------------------------- slimfx


def slimfx_model(model: nn.Module, args: argparse.Namespace, device: torch.device,
                 with_lm_head: bool) -> dict:
    """``slimfx.optimize`` ``model`` in place at ``args.budget`` on random-token calibration,
    then lower to Triton where it can; returns what happened (plan counts, lowering, notes)."""
    import slimfx
    from slimfx.ir.modules import SlimLinear

    n, L = (int(v) for v in args.calib.lower().split("x"))
    g = torch.Generator().manual_seed(args.seed + 1)
    vocab = model.config.vocab_size
    calib = [torch.randint(0, vocab, (1, L), generator=g).to(device) for _ in range(n)]
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    backend = "triton" if device.type == "cuda" or interp else "eager"
    t0 = time.perf_counter()
    slimfx.optimize(model, budget=args.budget, calibration=calib, workload="decode",
                    target=args.target, families=tuple(args.families.split(",")),
                    backend=backend, inplace=True, progress=False, seq_len=L,
                    exclude=None if with_lm_head else ["lm_head"])
    report = slimfx.report_of(model)
    info: dict[str, Any] = {
        "optimize_s": round(time.perf_counter() - t0, 1),
        "summary": str(report).splitlines()[0],
        "chosen": dict(Counter(m.decision.short() for m in model.modules()
                               if isinstance(m, SlimLinear))),
        "backend": backend,
    }
    if backend == "triton":
        from slimfx.backends.triton_lowering import lower_to_triton

        _, res = lower_to_triton(model)
        status = Counter(r.status for r in res.records)
        info["lowering"] = dict(status)
        bad = [f"{r.fqn}: {r.reason}" for r in res.records if r.status != "applied"]
        if bad:
            info["fallbacks"] = bad[:5]
        info["kernel_path"] = f"Triton ({status['applied']} lowered, {status['fallback']} not)"
    else:
        info["kernel_path"] = ("reference ops (CPU: Triton lowering skipped; "
                               "TRITON_INTERPRET=1 would run the kernels, far too slowly)")
    return info


# --------------------------------------------------------------------------------- decode


def make_static_cache(model: nn.Module, max_len: int, device: torch.device,
                      dtype: torch.dtype) -> Any:
    """A batch-1 ``StaticCache`` of ``max_len`` positions, whatever the transformers version
    calls its arguments (``max_batch_size`` / ``batch_size``; device and dtype when taken)."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw: dict[str, Any] = {"config": model.config, "max_cache_len": max_len}
    if "max_batch_size" in params:
        kw["max_batch_size"] = 1
    elif "batch_size" in params:
        kw["batch_size"] = 1
    for name, val in (("device", device), ("dtype", dtype)):
        if name in params:
            kw[name] = val
    return StaticCache(**kw)


def _takes_cache_position(model: nn.Module) -> bool:
    return "cache_position" in inspect.signature(type(model).forward).parameters


def decode_step(model: nn.Module, token: Tensor, position_ids: Tensor,
                cache_position: Tensor | None, cache: Any) -> tuple[Tensor, Tensor]:
    """One greedy step: ``(next token (1, 1), logits (1, V))``. The function compiled."""
    kw = {} if cache_position is None else {"cache_position": cache_position}
    out = model(input_ids=token, position_ids=position_ids, past_key_values=cache,
                use_cache=True, **kw)
    logits = out.logits[:, -1]
    return logits.argmax(-1, keepdim=True), logits


class Decoder:
    """Greedy batch-1 decoding over a ``StaticCache``: eager prefill, then :meth:`step` runs
    :func:`decode_step`, compiled when ``compile_mode`` is given. Positions only move forward
    (a new :meth:`prefill` starts a new cache)."""

    def __init__(self, model: nn.Module, max_cache_len: int, compile_mode: str | None = None,
                 compile_backend: str = "inductor", fullgraph: bool = False) -> None:
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.max_cache_len = max_cache_len
        self.with_cache_position = _takes_cache_position(model)
        self.fn = decode_step
        if compile_mode is not None:
            kw: dict[str, Any] = {"backend": compile_backend, "fullgraph": fullgraph}
            if compile_backend == "inductor":
                kw["mode"] = compile_mode
            self.fn = torch.compile(decode_step, **kw)
        self.positions = torch.arange(max_cache_len, device=self.device)
        self.cache: Any = None
        self.token: Tensor | None = None
        self.pos = 0

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> Tensor:
        """Fill a fresh cache with ``prompt`` (1 × P); returns the last position's logits."""
        P = prompt.shape[1]
        self.cache = make_static_cache(self.model, self.max_cache_len, self.device, self.dtype)
        kw = {"cache_position": self.positions[:P]} if self.with_cache_position else {}
        out = self.model(input_ids=prompt, position_ids=self.positions[:P].unsqueeze(0),
                         past_key_values=self.cache, use_cache=True, **kw)
        logits = out.logits[:, -1]
        self.token = logits.argmax(-1, keepdim=True)
        self.pos = P
        return logits

    @torch.no_grad()
    def step(self) -> tuple[Tensor, Tensor]:
        """Feed the last token; returns ``(next token, logits)`` (logits valid until the next
        step: CUDA graphs reuse their output memory)."""
        if self.pos >= self.max_cache_len:
            raise RuntimeError(f"static cache full ({self.max_cache_len} positions)")
        pos = self.positions[self.pos : self.pos + 1]
        if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
            torch.compiler.cudagraph_mark_step_begin()
        tok, logits = self.fn(self.model, self.token, pos.unsqueeze(0),
                              pos if self.with_cache_position else None, self.cache)
        self.token = tok.clone()
        self.pos += 1
        return self.token, logits


def greedy_tokens(model: nn.Module, prompt: Tensor, n: int, max_cache_len: int = 64) -> list:
    """``n`` greedy tokens after ``prompt`` from :class:`Decoder` (eager)."""
    dec = Decoder(model, max_cache_len)
    dec.prefill(prompt)
    out = [int(dec.token)]
    for _ in range(n - 1):
        out.append(int(dec.step()[0]))
    return out


# -------------------------------------------------------------------------------- measure


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a same-device copy, read + write counted (median of 20 after warm-up; CUDA
    events on GPU)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            t = time.perf_counter() - t0
        if i >= 5:
            times.append(t)
    return 2 * nbytes / statistics.median(times)


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear-like modules (dense, torch int4, slimfx, free), in module order."""
    from slimfx.ir.modules import SlimLinear

    kinds = (nn.Linear, TorchInt4Linear, FreeLinear, SlimLinear)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def _tensor_bytes(tensors: Any) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers read per decoded token: everything but the embedding
    table (one row is gathered), unless ``lm_head`` reads it as its tied weight."""
    emb = model.get_input_embeddings().weight
    tied = getattr(model.get_output_embeddings(), "weight", None) is emb
    return _tensor_bytes(t for t in (*model.parameters(), *model.buffers())
                         if tied or t is not emb)


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the linear-like modules' tensors (``lm_head`` included)."""
    return _tensor_bytes(t for _, m in linear_modules(model)
                         for t in (*m.parameters(), *m.buffers()))


def kv_bytes_per_step(cfg: Any, max_cache_len: int, dtype: torch.dtype) -> int:
    """K and V bytes a static-cache step attends over (every position, masked or not)."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    elt = torch.empty(0, dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * max_cache_len * head_dim * elt


def time_decode(dec: Decoder, tokens: int, runs: int) -> list[float]:
    """ms per token of each run of ``tokens`` steps."""
    out = []
    for _ in range(runs):
        _sync(dec.device)
        t0 = time.perf_counter()
        for _ in range(tokens):
            dec.step()
        _sync(dec.device)
        out.append((time.perf_counter() - t0) * 1e3 / tokens)
    return out


@torch.no_grad()
def time_linears(model: nn.Module, reps: int = 20) -> tuple[float, str]:
    """ms for one token's worth of the model's linears alone (each on a random 1-row input,
    in module order): a replayed CUDA graph on GPU (eager if capture fails), eager on CPU."""
    mods = linear_modules(model)
    p = next(model.parameters())
    xs = [torch.randn(1, 1, m.in_features, device=p.device).to(p.dtype) for _, m in mods]

    def run_all() -> None:
        for (_, m), x in zip(mods, xs):
            m(x)

    how = "eager"
    fn = run_all
    if p.device.type == "cuda":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                run_all()
        torch.cuda.current_stream().wait_stream(s)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run_all()
            fn, how = graph.replay, "cuda graph"
        except Exception as e:  # noqa: BLE001 - fall back to eager timing, and say why
            how = f"eager (graph capture failed: {type(e).__name__})"
    fn()
    _sync(p.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(p.device)
    return (time.perf_counter() - t0) * 1e3 / reps, how


_COPY = ("memcpy", "memset")
_ATTN = ("fmha", "flash", "attention", "attn", "sdpa")
_LINEAR = ("gemm", "gemv", "xmma", "nvjet", "tinygemm", "int4pack", "cutlass", "splitk",
           "matmul", "triton_tem", "quant_gemv", "lowrank", "sparse24", "dot_kernel", "cublas",
           "_mm", "addmm", "aten::mm", "aten::linear", "quant_linear")


def bucket_of(name: str) -> str:
    """``copy`` / ``attention`` / ``linear`` / ``rest`` from a kernel or op name (heuristic:
    the profile prints each bucket's top names so a wrong guess shows). slimfx's split-K
    partial-sum reduction (a torch sum inside its op) lands in ``rest``; the "linears alone"
    timing covers the whole op."""
    n = name.lower()
    for bucket, keys in (("copy", _COPY), ("attention", _ATTN), ("linear", _LINEAR)):
        if any(k in n for k in keys):
            return bucket
    return "rest"


def _work_items(prof: Any, device: torch.device) -> list[tuple[str, float]]:
    """(name, µs) per unit of work: GPU kernels/copies on CUDA; on CPU each op's self time,
    named by its outermost ancestor that is a linear or attention op (else its own name)."""
    from torch.autograd import DeviceType

    items = []
    for e in prof.events():
        if getattr(e, "is_user_annotation", False) or "annotation" in str(
                getattr(e, "activity_type", "")):
            continue  # record_function ranges (also mirrored on the GPU timeline): not work
        on_gpu = e.device_type == DeviceType.CUDA
        if device.type == "cuda":
            if on_gpu:
                items.append((e.name, e.time_range.elapsed_us()))
            continue
        if on_gpu:
            continue
        name, a = e.name, e.cpu_parent
        while a is not None:
            if bucket_of(a.name) in ("linear", "attention"):
                name = a.name
            a = a.cpu_parent
        items.append((name, float(e.self_cpu_time_total)))
    return items


def profile_decode(dec: Decoder, steps: int, wall_ms: float) -> dict:
    """Per-token ms of each bucket over ``steps`` profiled steps; ``gap`` = wall time − all
    kernel (CPU: op) time, the wall being ``wall_ms`` (the unprofiled median) on GPU and the
    profiled steps' own on CPU. Also the top names of each bucket."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if dec.device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    _sync(dec.device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            dec.step()
        _sync(dec.device)
    prof_wall = (time.perf_counter() - t0) * 1e3 / steps
    per: dict[str, float] = defaultdict(float)
    names: dict[str, Counter] = defaultdict(Counter)
    count = 0
    for name, us in _work_items(prof, dec.device):
        b = bucket_of(name)
        per[b] += us / 1e3 / steps
        names[b][name[:90]] += us / 1e3 / steps
        count += 1
    work = sum(per.values())
    out = {b: per.get(b, 0.0) for b in ("linear", "attention", "rest", "copy")}
    # GPU kernel durations do not change under the profiler, so the gap is taken against the
    # unprofiled wall time; CPU op times do (profiler overhead), so there against its own wall.
    out["gap"] = (wall_ms if dec.device.type == "cuda" else prof_wall) - work
    out["kernel_ms"] = work
    out["items_per_token"] = count / steps
    out["profiled_wall_ms"] = prof_wall
    out["top"] = {b: [(n, round(v, 4)) for n, v in c.most_common(4)] for b, c in names.items()}
    if count == 0:
        out["note"] = "the profiler recorded no kernels (CUDA graphs hidden from CUPTI?)"
    return out


def _compile_counters() -> dict:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def measure(name: str, model: nn.Module, args: argparse.Namespace, prompt: Tensor,
            bw: float, dense_logits: Tensor | None) -> dict:
    """Compile, warm up, time, profile one variant; returns its row."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    dev = prompt.device
    dec = Decoder(model, args.max_cache_len, args.compile_mode, args.compile_backend,
                  args.fullgraph)
    logits = dec.prefill(prompt).float()
    row: dict[str, Any] = {"variant": name, "weight_bytes": weight_bytes(model),
                           "linear_bytes": linear_bytes(model)}
    if dense_logits is not None and name != "floor":
        row["logits_cos"] = F.cosine_similarity(logits, dense_logits, dim=-1).item()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        dec.step()
    _sync(dev)
    row["warmup_s"] = round(time.perf_counter() - t0, 1)
    row.update(_compile_counters())
    ms = time_decode(dec, args.tokens, args.runs)
    row["ms_runs"] = ms
    row["ms_per_token"] = statistics.median(ms)
    row["tok_s"] = 1e3 / row["ms_per_token"]
    kv = kv_bytes_per_step(model.config, args.max_cache_len, dec.dtype)
    row["bw_limit_ms"] = (row["weight_bytes"] + kv) / bw * 1e3
    if args.profile_steps > 0:
        try:
            row["profile"] = profile_decode(dec, args.profile_steps, row["ms_per_token"])
        except Exception as e:  # noqa: BLE001 - the timing stands without the profile
            row["profile"] = {"note": f"profiler failed: {type(e).__name__}: {e}"[:200]}
    row["linears_alone_ms"], row["linears_alone_how"] = time_linears(model)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {row['tok_s']:.1f} tok/s "
          f"({row['ms_per_token']:.3f} ms/token; warm-up/compile {row['warmup_s']} s; "
          f"{row['graphs']} graph(s), {row['graph_breaks']} break(s), "
          f"{row['cudagraph_skips']} cudagraph skip(s))", flush=True)
    del dec
    return row


# --------------------------------------------------------------------------------- report


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def bounds(rows: list[dict], bw: float) -> dict:
    """The speed-up a linear-only rewrite can reach, from the dense row: T = its ms/token, L =
    its linears' ms/token (profiled kernels, and timed alone), R = T − L, ratio = a variant's
    linear bytes / dense's; bound = T / (L·ratio + R), and T / R as ratio → 0. With a ``floor``
    row also the measured T / T_floor and T / (T_floor + the variant's linear bytes / bw)."""
    by = {r["variant"]: r for r in rows if "ms_per_token" in r}
    dense = by.get("dense")
    if dense is None:
        return {}
    T = dense["ms_per_token"]
    Ls = {"profiled": dense.get("profile", {}).get("linear"),
          "alone": dense.get("linears_alone_ms")}
    out: dict[str, Any] = {"T_dense_ms": T, "L_ms": Ls, "variants": {}}
    for how, L in Ls.items():
        if L:
            out[f"rest_cap_{how}"] = T / max(T - L, 1e-9)
    floor = by.get("floor")
    if floor:
        out["floor_ms"] = floor["ms_per_token"]
        out["floor_speedup"] = T / floor["ms_per_token"]
    for name, r in by.items():
        if name in ("dense", "floor"):
            continue
        ratio = r["linear_bytes"] / dense["linear_bytes"]
        v: dict[str, Any] = {"byte_ratio": ratio}
        for how, L in Ls.items():
            if L:
                v[f"bound_{how}"] = T / (L * ratio + max(T - L, 0.0))
        if floor:
            v["floor_plus_bw"] = T / (floor["ms_per_token"] + r["linear_bytes"] / bw * 1e3)
        out["variants"][name] = v
    return out


def render(meta: dict, rows: list[dict], bnd: dict) -> str:
    """The markdown tables and the bound, as printed."""
    by = {r["variant"]: r for r in rows if "ms_per_token" in r}
    d_ms = by["dense"]["ms_per_token"] if "dense" in by else None
    i_ms = by["int4"]["ms_per_token"] if "int4" in by else None
    lines = [
        f"device {meta['device']} · torch {meta['torch']} · transformers {meta['transformers']}"
        f" · triton {meta['triton']} · python {meta['python']}",
        f"model {meta['shape']} {meta['dtype']} · prompt {meta['prompt_len']} · static cache "
        f"{meta['max_cache_len']} · {meta['tokens']} tokens × {meta['runs']} runs (median) · "
        f"compile: {meta['compile']} · copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s",
        "",
        "| variant | tok/s | ×dense | ×torch-int4 | weight GB | BW-limit ms/token | "
        "measured ms/token | logits cos vs dense | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "ms_per_token" not in r:
            lines.append(f"| {r['variant']} | — | — | — | — | — | — | — | FAILED: "
                         f"{r.get('error', '')} |")
            continue
        ms = r["ms_per_token"]
        lines.append(
            f"| {r['variant']} | {r['tok_s']:.1f} | {_f(d_ms and d_ms / ms, '.2f')} | "
            f"{_f(i_ms and i_ms / ms, '.2f')} | {r['weight_bytes'] / 1e9:.3f} | "
            f"{r['bw_limit_ms']:.3f} | {ms:.3f} | {_f(r.get('logits_cos'), '.4f')} | "
            f"{r.get('note', '')} |")
    lines += ["", "Where each token's time goes (ms/token; profiled kernels on GPU, op self "
              "time on CPU; gap = wall − kernel time):", "",
              "| variant | linears | attention | rest | copies | gap | kernels/token | "
              "linears alone |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r.get("profile")
        if not p or "kernel_ms" not in p:
            if p:
                lines.append(f"| {r['variant']} | {p.get('note', '')} |||||||")
            continue
        lines.append(
            f"| {r['variant']} | {p['linear']:.3f} | {p['attention']:.3f} | {p['rest']:.3f} | "
            f"{p['copy']:.3f} | {p['gap']:.3f} | {p['items_per_token']:.0f} | "
            f"{r['linears_alone_ms']:.3f} ({r['linears_alone_how']}) |")
    lines.append("")
    for r in rows:
        top = r.get("profile", {}).get("top", {})
        for b in ("linear", "attention", "rest", "copy"):
            if top.get(b):
                named = "; ".join(f"{n} {v:.3f}" for n, v in top[b])
                lines.append(f"  {r['variant']:<7} {b:<9} top: {named}")
    if bnd:
        T, L = bnd["T_dense_ms"], bnd["L_ms"]
        lines += ["", f"Bound of a linear-only rewrite (dense T = {T:.3f} ms/token; linears L = "
                  f"{_f(L['profiled'], '.3f')} profiled, {_f(L['alone'], '.3f')} timed alone; "
                  f"R = T − L): rest-only cap T/R = {_f(bnd.get('rest_cap_profiled'), '.2f')}× "
                  f"(profiled L), {_f(bnd.get('rest_cap_alone'), '.2f')}× (L alone)"]
        if "floor_ms" in bnd:
            lines.append(f"  floor (rewritten linears free) measured {bnd['floor_ms']:.3f} "
                         f"ms/token → at most {bnd['floor_speedup']:.2f}× dense")
        for name, v in bnd["variants"].items():
            lines.append(
                f"  {name:<7} linear bytes ×{v['byte_ratio']:.3f} of dense → bound "
                f"(L+R)/(L·ratio+R) = {_f(v.get('bound_profiled'), '.2f')}× (profiled L), "
                f"{_f(v.get('bound_alone'), '.2f')}× (L alone); floor + its linear bytes at "
                f"copy bandwidth: {_f(v.get('floor_plus_bw'), '.2f')}×")
    if "slimfx" in by and d_ms:
        s = by["slimfx"]["ms_per_token"]
        ok_d, ok_i = d_ms / s >= 2.0, i_ms is not None and i_ms / s >= 1.6
        lines += ["", f"target slimfx ≥ 2× dense: {'MET' if ok_d else 'NOT MET'} "
                  f"({d_ms / s:.2f}×); ≥ 1.6× torch-int4: "
                  f"{'MET' if ok_i else 'NOT MET'} ({_f(i_ms and i_ms / s, '.2f')}×)"
                  + (" — CPU smoke run: these timings say nothing about the GPU target"
                     if meta["device"].startswith("cpu") else "")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--tiny", action="store_true", help="tiny config (hidden 128, 2 layers, 4 "
                   "heads, 2 KV heads, MLP 256, vocab 256) for a smoke test")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {VARIANTS}")
    p.add_argument("--tokens", type=int, default=None, help="decode steps per run (128; tiny 8)")
    p.add_argument("--runs", type=int, default=None, help="timed runs, median kept (5; tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="steps before timing (5; tiny 2)")
    p.add_argument("--profile-steps", type=int, default=None, help="profiled steps (8; tiny 2; "
                   "0: no profile)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-cache-len", type=int, default=None, help="static cache length "
                   "(default: every step of the run, rounded up to 256)")
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--families", default="int4,int8", help="slimfx candidate families (e.g. "
                   "int4,int8,lowrank,int4_gptq — the last two cost optimize time)")
    p.add_argument("--calib", default=None, help="slimfx calibration NxL random-token batches "
                   "(2x64; tiny 2x32)")
    p.add_argument("--target", default="h100", help="slimfx cost-model target")
    p.add_argument("--lm-head", choices=["dense", "int4"], default="dense",
                   help="int4: untie lm_head and rewrite it in int4/slimfx/floor too")
    p.add_argument("--group", type=int, default=128, help="torch int4 group size")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--no-compile", action="store_true", help="run the decode step eagerly")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default "
                   "reduce-overhead on cuda; cpu runs eagerly unless given)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--fullgraph", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write meta, rows and bound here")
    return p.parse_args(argv)


def _defaults(args: argparse.Namespace, device: torch.device) -> None:
    small = args.tiny
    for name, big, tiny in (("tokens", 128, 8), ("runs", 5, 3), ("warmup", 5, 2),
                            ("profile_steps", 8, 2), ("calib", "2x64", "2x32")):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else big)
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    if args.no_compile:
        args.compile_mode = None
    elif args.compile_mode is None and device.type == "cuda":
        args.compile_mode = "reduce-overhead"
    steps = args.warmup + args.runs * args.tokens + max(args.profile_steps, 0)
    if args.max_cache_len is None:
        args.max_cache_len = 256 * math.ceil((args.prompt_len + steps + 1) / 256)
    elif args.max_cache_len < args.prompt_len + steps + 1:
        raise SystemExit(f"--max-cache-len {args.max_cache_len} < the "
                         f"{args.prompt_len + steps + 1} positions this run decodes")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # run as a script from a checkout where slimfx is not installed
        sys.path.insert(0, root)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    _defaults(args, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {VARIANTS}")
    if args.compile_mode:
        compile_note = f"torch.compile(mode={args.compile_mode!r}, backend={args.compile_backend})"
    else:
        compile_note = ("none (eager decode step" + (": CUDA graphs need a GPU, so CPU runs "
                        "eagerly unless --compile-mode is given)" if device.type == "cpu"
                        else ")"))
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    shape = TINY if args.tiny else LLAMA_1B
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        "threads)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": triton_version, "python": platform.python_version(),
        "shape": ("tiny " if args.tiny else "Llama-3.2-1B-shaped ") + "×".join(
            str(shape[k]) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "intermediate_size", "vocab_size")),
        "dtype": args.dtype, "prompt_len": args.prompt_len, "max_cache_len": args.max_cache_len,
        "tokens": args.tokens, "runs": args.runs, "compile": compile_note,
        "lm_head": args.lm_head, "budget": args.budget, "families": args.families,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    t_start = time.perf_counter()
    base = build_model(shape, device, dtype, args.seed)
    with_lm_head = args.lm_head == "int4"
    if with_lm_head:
        untie_lm_head(base)
    fqns = decoder_linears(base, with_lm_head)
    bw = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    meta["copy_bandwidth_GBps"] = bw / 1e9
    g = torch.Generator().manual_seed(args.seed + 2)
    prompt = torch.randint(0, shape["vocab_size"], (1, args.prompt_len), generator=g).to(device)
    dense_logits = Decoder(base, args.max_cache_len).prefill(prompt).float()
    print(f"[{time.strftime('%H:%M:%S')}] built {meta['shape']} on {meta['device']}; "
          f"{len(fqns)} linears to rewrite; compile: {compile_note}", flush=True)

    rows: list[dict] = []
    for name in variants:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: preparing", flush=True)
        model = copy.deepcopy(base)
        extra: dict[str, Any] = {}
        try:
            if name == "int4":
                err = swap_int4(model, fqns, args.group)
                extra["int4_check_rel_err"] = err
                layout = f"; packing: {_CHOSEN_PACKING['cuda']}" if "cuda" in _CHOSEN_PACKING else ""
                extra["note"] = (f"{len(fqns)} linears; kernel check rel err {err:.1e}"
                                 + ("" if err <= INT4_CHECK_TOL else " MISMATCH") + layout)
            elif name == "slimfx":
                info = slimfx_model(model, args, device, with_lm_head)
                extra["slimfx"] = info
                chosen = ", ".join(f"{k}×{v}" for k, v in sorted(info["chosen"].items()))
                extra["note"] = f"{chosen}; {info['kernel_path']}; optimize {info['optimize_s']} s"
                print(f"  {info['summary']}", flush=True)
            elif name == "floor":
                swap_free(model, fqns)
                extra["note"] = f"{len(fqns)} linears → free views (timing only)"
            row = measure(name, model, args, prompt, bw, dense_logits)
            row.update(extra)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
            import traceback

            traceback.print_exc()
            row = {"variant": name, "error": f"{type(e).__name__}: {e}"[:300], **extra}
        rows.append(row)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        meta["total_s"] = round(time.perf_counter() - t_start, 1)
        if args.json:  # after every variant: a run cut short keeps what it measured
            args.json.write_text(json.dumps({"meta": meta, "rows": rows,
                                             "bound": bounds(rows, bw)}, indent=1, default=str))
    bnd = bounds(rows, bw)
    print()
    print(render(meta, rows, bnd))
    print(f"\ntotal {meta['total_s']} s" + (f"; wrote {args.json}" if args.json else ""))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
