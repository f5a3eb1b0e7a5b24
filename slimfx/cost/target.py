"""Hardware targets, workloads, and the latency of one linear in one compressed form.

Roofline estimate for a linear of ``in → out`` over ``T`` tokens (the workload)::

    t = max(bytes_read / bandwidth,  flops / (peak · efficiency)) + launches · launch_s

- ``bytes_read``: weight tensors at the target's ``float_bytes`` for floating-point parts
  (dense weight, low-rank factors, quantization scales, 2:4 kept values, bias) and at their
  true widths for integer codes, zero points and 2:4 indices; plus activations
  T·(in + out)·float_bytes, plus T·r·float_bytes written and read back between the two
  factors of a low-rank product.
- ``flops``: ``decision.flops(in, out, T)``.
- ``efficiency``: 1.0 for dense / low-rank / sparse forms; forms with quantized codes pay
  ``target.dequant_efficiency`` on the compute term (dequantization in the inner loop) —
  an assumption until measured.
- ``launches``: kernels per forward: dense 1, low-rank 2, quant 1, 2:4 1, composite forms
  the sum of their parts.

Decode (T = 1) is memory bound, so a form's latency ratio to dense follows its byte ratio;
prefill (T = 2048) on an H100 is compute bound for dense, so only FLOPs saved count there.

Measured micro-benchmarks replace the roofline where present: :class:`MeasuredCache` is a
JSON file keyed by (op, N = tokens, K = in, M = out, dtype, decision, target), written by
:func:`measure_target` (the ``slimfx calibrate-target`` command).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimfx.ir.sites import LinearSite
from slimfx.planning.configs import (
    Decision,
    DenseConfig,
    LowRankConfig,
    LowRankQuantConfig,
    QuantConfig,
    Sparse24Config,
    Sparse24LowRankConfig,
)

__all__ = [
    "Target",
    "TARGETS",
    "target_of",
    "Workload",
    "WORKLOADS",
    "workload_of",
    "storage",
    "launches",
    "estimate_latency",
    "MeasuredCache",
    "latency",
    "measure_target",
    "runtime_label",
    "compute_dtype",
    "DEFAULT_SHAPES",
    "default_decisions",
]


@dataclass(frozen=True)
class Target:
    """Roofline numbers of one device.

    ``bandwidth_Bps``: memory bandwidth (bytes/s). ``peak_flops``: dense peak in the compute
    dtype (FLOP/s). ``launch_s``: fixed overhead per kernel / op call. ``float_bytes``: bytes
    of a floating-point element as the target runs it (4 for fp32 CPUs, 2 for bf16 GPUs).
    ``dequant_efficiency``: fraction of peak reached by kernels that dequantize on the fly.
    """

    name: str
    bandwidth_Bps: float
    peak_flops: float
    launch_s: float
    float_bytes: int = 2
    notes: str = ""
    dequant_efficiency: float = 0.7

    def __post_init__(self) -> None:
        for f in ("bandwidth_Bps", "peak_flops"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{f} must be > 0, got {getattr(self, f)}")
        if self.launch_s < 0 or self.float_bytes not in (1, 2, 4, 8):
            raise ValueError("launch_s must be ≥ 0 and float_bytes one of 1, 2, 4, 8")
        if not 0 < self.dequant_efficiency <= 1:
            raise ValueError(f"dequant_efficiency must be in (0, 1], got {self.dequant_efficiency}")


_CPU = Target(
    "cpu",
    bandwidth_Bps=20e9,
    peak_flops=200e9,
    launch_s=5e-6,
    float_bytes=4,
    notes=(
        "ASSUMPTIONS, not measurements: a conservative laptop/server CPU running fp32 — "
        "20 GB/s memory bandwidth, 200 GFLOP/s fp32, 5 µs per op call; dequantization "
        "efficiency 0.7 assumed. Replace with `slimfx calibrate-target --target cpu` "
        "measurements."
    ),
)

TARGETS: dict[str, Target] = {
    "cpu": _CPU,
    "ort-cpu": dataclasses.replace(
        _CPU,
        name="ort-cpu",
        notes=(
            "ONNX Runtime's CPU provider (the onnx backend). Roofline numbers are the cpu "
            "target's assumptions, and they cannot know ORT's kernels (its int8 MatMulNBits at "
            "accuracy_level 0 is slower than fp32 MatMul on x86): measure them with "
            "`slimfx calibrate-target --backend onnx --target ort-cpu` and pass the file as "
            "latency_cache."
        ),
    ),
    "h100": Target(
        "h100",
        bandwidth_Bps=3.35e12,
        peak_flops=989e12,
        launch_s=4e-6,
        float_bytes=2,
        notes=(
            "H100 SXM published figures: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16 tensor core; "
            "~4 µs launch overhead and dequantization efficiency 0.7 are assumptions."
        ),
    ),
}


def target_of(target: str | Target) -> Target:
    """A :class:`Target` from its name (KeyError lists the known ones) or itself."""
    if isinstance(target, Target):
        return target
    try:
        return TARGETS[target]
    except KeyError:
        raise KeyError(f"unknown target {target!r}; known: {sorted(TARGETS)}") from None


@dataclass(frozen=True)
class Workload:
    """How many tokens one forward of a linear processes (decode: 1, prefill: many)."""

    name: str
    tokens: int

    def __post_init__(self) -> None:
        if not (isinstance(self.tokens, int) and self.tokens >= 1):
            raise ValueError(f"workload tokens must be an int ≥ 1, got {self.tokens}")


WORKLOADS: dict[str, Workload] = {
    "decode": Workload("decode", 1),
    "prefill": Workload("prefill", 2048),
}


def workload_of(workload: str | Workload) -> Workload:
    """A :class:`Workload` from its name (KeyError lists the known ones) or itself."""
    if isinstance(workload, Workload):
        return workload
    try:
        return WORKLOADS[workload]
    except KeyError:
        raise KeyError(f"unknown workload {workload!r}; known: {sorted(WORKLOADS)}") from None


# --------------------------------------------------------------------------- roofline


def _quant_storage(q: QuantConfig, in_f: int, out_f: int) -> tuple[int, int]:
    groups = out_f * q.n_groups(in_f)
    ints = math.ceil(q.bits * in_f * out_f / 8) + (0 if q.symmetric else groups)
    return groups, ints


def storage(decision: Decision, in_f: int, out_f: int) -> tuple[int, int]:
    """``(float elements, integer bytes)`` the weight is stored in (bias excluded).

    For the known kinds, ``2·floats + ints == decision.weight_bytes(in, out)``; an unknown
    kind is priced as if its reference bytes were all 16-bit floats.
    """
    if isinstance(decision, DenseConfig):
        return in_f * out_f, 0
    if isinstance(decision, LowRankConfig):
        return decision.rank * (in_f + out_f), 0
    if isinstance(decision, QuantConfig):
        return _quant_storage(decision, in_f, out_f)
    if isinstance(decision, Sparse24Config):
        kept = in_f * out_f // 2
        return kept, math.ceil(2 * kept / 8)
    if isinstance(decision, LowRankQuantConfig):
        f, i = _quant_storage(decision.quant, in_f, out_f)
        return f + decision.rank * (in_f + out_f), i
    if isinstance(decision, Sparse24LowRankConfig):
        kept = in_f * out_f // 2
        return kept + decision.rank * (in_f + out_f), math.ceil(2 * kept / 8)
    return decision.weight_bytes(in_f, out_f) // 2, 0


def launches(decision: Decision) -> int:
    """Kernel launches (op calls) per forward of the form."""
    if isinstance(decision, LowRankConfig):
        return 2
    if isinstance(decision, (LowRankQuantConfig, Sparse24LowRankConfig)):
        return 3
    return 1


def _rank(decision: Decision) -> int:
    return int(getattr(decision, "rank", 0)) if decision.kind != "dense" else 0


def _quantized(decision: Decision) -> bool:
    return isinstance(decision, (QuantConfig, LowRankQuantConfig))


def estimate_latency(
    decision: Decision,
    in_f: int,
    out_f: int,
    has_bias: bool,
    target: str | Target,
    workload: str | Workload,
) -> float:
    """Roofline seconds of one forward of the linear in form ``decision`` (module docstring)."""
    tgt, wl = target_of(target), workload_of(workload)
    t = wl.tokens
    floats, ints = storage(decision, in_f, out_f)
    if has_bias:
        floats += out_f
    acts = t * (in_f + out_f) + 2 * t * _rank(decision)
    bytes_read = (floats + acts) * tgt.float_bytes + ints
    eff = tgt.dequant_efficiency if _quantized(decision) else 1.0
    flops = decision.flops(in_f, out_f, t)
    roof = max(bytes_read / tgt.bandwidth_Bps, flops / (tgt.peak_flops * eff))
    return roof + launches(decision) * tgt.launch_s


# --------------------------------------------------------------------------- measurements

_KEY_FIELDS = ("op", "N", "K", "M", "dtype", "decision", "device")

#: decision fields that change the stored values but not the layout or the kernels run
_VALUE_ONLY_FIELDS = ("method", "mask", "compensate")


def runtime_label(decision: Decision) -> str:
    """``decision.short()`` with value-only fields (``method``, ``mask``, ``compensate``) set
    to their defaults: a whitened and a plain rank-64 factorization run the same kernels in
    the same time, so they share one measurement."""
    if not dataclasses.is_dataclass(decision):
        return decision.short()
    reset = {
        f.name: f.default
        for f in dataclasses.fields(decision)
        if f.name in _VALUE_ONLY_FIELDS and f.default is not dataclasses.MISSING
    }
    return dataclasses.replace(decision, **reset).short() if reset else decision.short()


def compute_dtype(target: Target) -> torch.dtype:
    """The dtype a target runs floating-point weights in: float32 for 4-byte floats,
    bfloat16 for 2-byte ones (what ``measure_target`` times by default)."""
    return {4: torch.float32, 8: torch.float64}.get(target.float_bytes, torch.bfloat16)


class MeasuredCache:
    """Measured seconds per (op, N = tokens, K = in, M = out, dtype, decision, device) in a
    JSON file. ``device`` is the target name the measurement stands for (``cpu``, ``h100``)."""

    version = 1

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.entries: dict[tuple[Any, ...], float] = {}
        self.info: dict[tuple[Any, ...], dict[str, Any]] = {}
        if self.path.exists():
            self.load()

    @staticmethod
    def key(
        op: str, N: int, K: int, M: int, dtype: str, decision: Decision | str, device: str
    ) -> tuple[str, int, int, int, str, str, str]:
        """The lookup key; ``decision`` may be a Decision (its :func:`runtime_label`) or a
        label string used as is."""
        d = runtime_label(decision) if isinstance(decision, Decision) else str(decision)
        return (str(op), int(N), int(K), int(M), str(dtype), d, str(device))

    @classmethod
    def of(
        cls, cache: MeasuredCache | str | os.PathLike[str] | None, target: str | Target | None = None
    ) -> MeasuredCache | None:
        """``optimize``'s ``latency_cache=``: ``None``, a cache, or the path of a cache file.

        A missing file is a ``FileNotFoundError``; a cache with no measurement for ``target``
        (a file calibrated for another target name) a ``ValueError`` that lists the names it
        holds — it would price nothing, silently."""
        if cache is None:
            return None
        if not isinstance(cache, MeasuredCache):
            path = Path(cache)
            if not path.is_file():
                raise FileNotFoundError(
                    f"latency cache {str(path)!r} does not exist; write it with "
                    "`slimfx calibrate-target --out FILE` on the device it should price"
                )
            cache = cls(path)
        if target is not None:
            name = target.name if isinstance(target, Target) else str(target)
            have = cache.targets()
            if name not in have:
                raise ValueError(
                    f"latency cache {str(cache.path)!r} holds no measurement for target "
                    f"{name!r} (it has: {', '.join(have) or 'none'}); pass target= one of "
                    "those, or calibrate this one"
                )
        return cache

    def targets(self) -> list[str]:
        """The target names the cache holds measurements for."""
        return sorted({k[6] for k in self.entries})

    def describe(self, target: str) -> str:
        """One line on what measured ``target``'s entries: runtimes, accuracy levels, threads,
        torch devices (from the info saved with each entry)."""
        infos = [self.info.get(k, {}) for k in self.entries if k[6] == target]
        parts = []
        for field_, fmt in (
            ("runtime", "{}"),
            ("torch_device", "on {}"),
            ("accuracy_level", "accuracy_level {}"),
            ("threads", "{} threads"),
        ):
            vals = sorted({str(i[field_]) for i in infos if i.get(field_) is not None})
            if vals:
                parts.append(fmt.format("/".join(vals)))
        return f"{len(infos)} entries in {self.path.name}" + (
            ": " + ", ".join(parts) if parts else ""
        )

    def load(self) -> MeasuredCache:
        """Read the file (replacing what is in memory)."""
        data = json.loads(self.path.read_text())
        if data.get("version", 1) > self.version:
            raise ValueError(
                f"{self.path}: cache version {data['version']} is newer than {self.version}"
            )
        self.entries, self.info = {}, {}
        for rec in data.get("entries", []):
            k = self.key(*(rec[f] for f in _KEY_FIELDS))
            self.entries[k] = float(rec["seconds"])
            extra = {f: v for f, v in rec.items() if f not in _KEY_FIELDS and f != "seconds"}
            if extra:
                self.info[k] = extra
        return self

    def save(self) -> None:
        """Write the file atomically (sorted, stable JSON)."""
        records = []
        for k in sorted(self.entries):
            rec: dict[str, Any] = dict(zip(_KEY_FIELDS, k))
            rec["seconds"] = self.entries[k]
            rec.update(self.info.get(k, {}))
            records.append(rec)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"version": self.version, "entries": records}, indent=1))
        os.replace(tmp, self.path)

    def get(self, key: tuple[Any, ...]) -> float | None:
        """Seconds for ``key`` (from :meth:`key`), or ``None``."""
        return self.entries.get(self.key(*key))

    def put(self, key: tuple[Any, ...], seconds: float, **info: Any) -> None:
        """Record a measurement; ``info`` (e.g. the torch device) is saved alongside."""
        k = self.key(*key)
        self.entries[k] = float(seconds)
        if info:
            self.info[k] = info

    def __len__(self) -> int:
        return len(self.entries)


def latency(
    decision: Decision,
    site: LinearSite,
    target: str | Target,
    workload: str | Workload,
    cache: MeasuredCache | None = None,
) -> tuple[float, str]:
    """``(seconds, "measured" | "roofline")`` for one forward of ``site`` in form ``decision``.

    The cache is looked up under the site's dtype, then under the target's compute dtype (a
    model loaded in float32 for planning and deployed in bfloat16 on a GPU finds the bf16
    measurements).
    """
    tgt, wl = target_of(target), workload_of(workload)
    if cache is not None:
        for dtype in dict.fromkeys((site.dtype, str(compute_dtype(tgt)))):
            key = MeasuredCache.key(
                "linear", wl.tokens, site.in_features, site.out_features, dtype, decision, tgt.name
            )
            got = cache.get(key)
            if got is not None:
                return got, "measured"
    return (
        estimate_latency(decision, site.in_features, site.out_features, site.has_bias, tgt, wl),
        "roofline",
    )


def _build_module(
    decision: Decision,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module:
    """The slimfx module of ``decision`` for ``weight``. ``svd``: the weight's (U, S, Vh), so a
    plain low-rank ladder costs one SVD per shape rather than one per rank (timings only need
    factors of the right shapes)."""
    out_f, in_f = weight.shape
    if isinstance(decision, DenseConfig):
        lin = nn.Linear(
            in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        lin.weight.data.copy_(weight)
        if bias is not None:
            lin.bias.data.copy_(bias)
        return lin
    from slimfx.ir.modules import module_for
    from slimfx.numerics import factorize

    cls = module_for(decision)
    if svd is not None and isinstance(decision, LowRankConfig) and decision.rank <= len(svd[1]):
        U, S, Vh = svd
        r = decision.rank
        tensors = {"U": U[:, :r] * S[:r], "V": Vh[:r]}
    else:
        tensors = factorize(weight.float().cpu(), decision, None)
    tensors = {
        k: v.to(weight.device, weight.dtype if v.is_floating_point() else v.dtype)
        for k, v in tensors.items()
    }
    mod = cls.empty(decision, in_f, out_f, bias is not None, weight.dtype, weight.device)
    return mod.load_factors(tensors, bias)


def _time(
    fn: Callable[[], Any], device: torch.device, repeats: int, min_s: float, max_s: float
) -> float:
    """Median seconds of ``fn`` after warm-up: at least 3 runs and ``min_s`` in total, at most
    ``repeats`` runs unless that is shorter than ``min_s``, stopping early past ``max_s``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    if time.perf_counter() - start < 0.05:  # cheap: warm caches and clocks a little more
        for _ in range(2):
            fn()
        sync()
    times: list[float] = []
    total = 0.0
    while True:
        start = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - start
        times.append(dt)
        total += dt
        n = len(times)
        if n >= 3 and total >= min_s and (n >= repeats or total >= max_s):
            break
        if n >= 1000:
            break
    return statistics.median(times)


#: SmolLM2-135M's linear shapes (in, out): q/o, k/v, gate/up, down, lm_head — the project's
#: reference model; pass the shapes of your own model's sites for exact matches.
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = (
    (576, 576),
    (576, 192),
    (576, 1536),
    (1536, 576),
    (576, 49152),
)


def default_decisions(in_f: int, out_f: int) -> list[Decision]:
    """Dense, the low-rank ladder the ``lowrank`` family offers for this shape, and the int8 /
    int4 layouts the quantization families offer (GPTQ and RTN share a layout and so one
    measurement: :func:`runtime_label`)."""
    from slimfx.cost.candidates import lowrank_ranks  # candidates imports this module
    from slimfx.cost.family_quant import INT4_CONFIGS, INT8_CONFIGS, quant_fits

    return [
        DenseConfig(),
        *(LowRankConfig(r) for r in lowrank_ranks(in_f, out_f)),
        *(d for d in INT8_CONFIGS + INT4_CONFIGS if quant_fits(d, in_f)),
    ]


#: ``runner(module) -> (callable, info)``: what to time for one built module, and what to
#: record beside its measurements (the runtime, the kernel that ran, …).
Runner = Callable[[nn.Module], tuple[Callable[[torch.Tensor], Any], dict[str, Any]]]


class _Copies(nn.Module):
    """``copies`` of one built linear with distinct weights (each tensor rolled along its first
    axis), all applied to the same input: one call reads every copy's weights once, so with
    enough copies the weights stream from memory rather than sit in a cache."""

    def __init__(self, module: nn.Module, copies: int) -> None:
        super().__init__()
        self.in_features = int(module.in_features)
        self.out_features = int(module.out_features)
        mods = [module]
        for i in range(1, copies):
            m = copy.deepcopy(module)
            with torch.no_grad():
                for t in [*m.parameters(), *m.buffers()]:
                    if t.dim() and t.shape[0] > 1:
                        t.copy_(torch.roll(t, i % t.shape[0], 0))
            mods.append(m)
        self.copies = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(m(x) for m in self.copies)


def _copies_for(module: nn.Module, rotate_bytes: int, max_copies: int) -> int:
    stored = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    return max(1, min(max_copies, math.ceil(rotate_bytes / max(stored, 1))))


def _eager(module: nn.Module) -> tuple[Callable[[torch.Tensor], Any], dict[str, Any]]:
    return module, {"runtime": "torch eager"}


def measure_target(
    target_name: str,
    shapes: Iterable[tuple[int, int] | LinearSite] | None = None,
    decisions: Sequence[Decision] | Callable[[int, int], Sequence[Decision]] | None = None,
    workloads: Iterable[str | Workload] | None = None,
    path: str | os.PathLike[str] = "latency.json",
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    repeats: int = 10,
    min_s: float = 0.02,
    max_s: float = 1.0,
    progress: bool = True,
    runner: Runner | None = None,
    rotate_bytes: int = 64 << 20,
    max_copies: int = 64,
) -> MeasuredCache:
    """Time each (shape, decision, workload) with the slimfx modules on ``device`` and store
    the median seconds in the cache at ``path`` (entries already there are kept, the ones
    measured again replaced) under ``target_name``.

    ``shapes``: ``(in, out)`` pairs or sites (default :data:`DEFAULT_SHAPES`); ``decisions``:
    a list, or a function ``(in, out) -> decisions`` (default :func:`default_decisions`);
    ``workloads``: default decode and prefill. ``dtype`` defaults to the target's compute
    dtype (:func:`compute_dtype`; float32 for an unknown target on CPU, bfloat16 on CUDA).
    Decisions that do not fit a shape, or have no module yet, are skipped. On CPU this times
    the CPU: the numbers stand for the target only when run on it.

    ``runner(module) -> (fn, info)`` says what runs a built module (default: its eager forward):
    ``fn(x)`` is timed and ``info`` saved with each entry — e.g. the Triton-lowered module, or an
    ONNX Runtime session of the module's export (``slimfx.calibrate``). A runner that raises
    ``ValueError`` for a decision skips it (its runtime cannot run that form).

    Caches: a small weight read again and again sits in the L2 (or a CPU's L3) and times far
    faster than inside a model, where every layer's weights stream from memory. So each form is
    built as several copies with distinct weights — enough to store ``rotate_bytes`` (64 MiB,
    beyond an H100's 50 MB L2), at most ``max_copies`` — run one after the other on the same
    input, and the time of one call divided by the copies is recorded (``copies`` in the
    entry's info). ``rotate_bytes=0`` times one copy.
    """
    from tqdm.auto import tqdm

    dev = torch.device(device)
    if dtype is None:
        if target_name in TARGETS:
            dtype = compute_dtype(TARGETS[target_name])
        else:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = DEFAULT_SHAPES if shapes is None else shapes
    decisions = default_decisions if decisions is None else decisions
    wls = [workload_of(w) for w in (("decode", "prefill") if workloads is None else workloads)]
    cache = MeasuredCache(path)
    run = _eager if runner is None else runner
    gen = torch.Generator().manual_seed(0)
    for shape in tqdm(list(shapes), desc="calibrate-target", disable=not progress, leave=False):
        if isinstance(shape, LinearSite):
            in_f, out_f = shape.in_features, shape.out_features
        else:
            in_f, out_f = shape
        w = torch.randn(out_f, in_f, generator=gen).div_(math.sqrt(in_f)).to(dev, dtype)
        todo = decisions(in_f, out_f) if callable(decisions) else decisions
        svd = None
        if any(isinstance(d, LowRankConfig) for d in todo):
            svd = torch.linalg.svd(w.float().cpu(), full_matrices=False)
        for decision in todo:
            try:
                mod = _build_module(decision, w, None, svd)
            except (KeyError, ValueError):
                continue  # no module for this kind, or the rank does not fit the shape
            n = _copies_for(mod, rotate_bytes, max_copies)
            try:
                fn, info = run(_Copies(mod, n))
            except ValueError:
                continue  # the runtime cannot run this form
            for wl in wls:
                x = torch.randn(wl.tokens, in_f, generator=gen).to(dev, dtype)
                with torch.inference_mode():
                    secs = _time(lambda f=fn, x=x: f(x), dev, repeats, min_s, max_s) / n
                key = MeasuredCache.key(
                    "linear", wl.tokens, in_f, out_f, str(dtype), decision, target_name
                )
                cache.put(key, secs, torch_device=str(dev), copies=n, **info)
            del mod, fn
        cache.save()  # after each shape: a run cut short keeps what it measured
    cache.save()
    return cache
