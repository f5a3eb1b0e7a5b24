"""Hardware targets, workloads, and the latency of one linear in one compressed form.

Roofline estimate for a linear of ``in → out`` over ``T`` tokens (the workload)::

    t = max(bytes_read / bandwidth,  flops / (peak · efficiency)) + launches · launch_s

- ``bytes_read``: weight tensors at the target's ``float_bytes`` for floating-point parts
  (dense weight, low-rank factors, quantization scales, 2:4 kept values, bias) and at their
  true widths for integer codes, zero points and 2:4 indices; plus activations
  T·(in + out)·float_bytes, plus T·r·float_bytes written and read back between the two
  factors of a low-rank product.
- ``flops``: ``decision.flops(shape, T)``.
- ``efficiency``: 1.0 for dense / low-rank / sparse forms; forms whose kernels dequantize
  codes (``decision.dequantizes``) pay ``target.dequant_efficiency`` on the compute term —
  an assumption until measured.
- ``torch_cpu`` targets (``cpu``): a form PyTorch's CPU path runs as a reference op (2:4 forms,
  quantized layouts no packed kernel takes: ``slimfx.ir.cpu_packed``) also writes and reads
  back its dense float weight and pays the elementwise rebuild, every call.
- ``launches``: ``decision.launches()``: dense 1, low-rank 2, quant 1, 2:4 1, composite forms
  the sum of their parts.

Every number comes from the decision's config (``storage``, ``flops``, ``launches``,
``intermediate``, ``dequantizes``): a form that does not define one raises, never a default.

Decode (T = 1) is memory bound, so a form's latency ratio to dense follows its byte ratio;
prefill (T = 2048) on an H100 is compute bound for dense, so only FLOPs saved count there.

Attention steps over a KV cache (KV-cache and MLA decisions): :func:`estimate_attention_latency`
prices ``decision.step_work`` — the cache read, the rebuilt entries, the owned projections —
the same way.

Measured micro-benchmarks replace the roofline where present: :class:`MeasuredCache` is a
JSON file keyed by (op, N = tokens, K = in, M = out, dtype, decision, target), written by
``slimfx.cost.measure.measure_target`` (the ``slimfx calibrate-target`` command).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimfx.cost.cache_file import read_cache, write_cache
from slimfx.ir.sites import LinearSite
from slimfx.planning.configs import Decision
from slimfx.planning.shapes import AttentionShape, LinearShape

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
    "estimate_attention_latency",
    "attention_work",
    "MeasuredCache",
    "latency",
    "runtime_label",
    "compute_dtype",
    "measured_dtype",
    "roofline_caveat",
    "runtime_mismatch",
    "latency_notes",
]


@dataclass(frozen=True)
class Target:
    """Roofline numbers of one device.

    ``bandwidth_Bps``: memory bandwidth (bytes/s). ``peak_flops``: dense peak in the compute
    dtype (FLOP/s). ``launch_s``: fixed overhead per kernel / op call. ``float_bytes``: bytes
    of a floating-point element as the target runs it (4 for fp32 CPUs, 2 for bf16 GPUs).
    ``dequant_efficiency``: fraction of peak reached by kernels that dequantize on the fly.
    ``torch_cpu``: the runtime is PyTorch on the CPU, whose packed int4/int8 kernels read the
    codes directly but whose reference ops (2:4 forms, layouts no packed kernel takes) rebuild
    the dense weight on every call — priced as such. ``fused_attention``: one-token decode
    steps run the fused Triton attention kernels over compressed caches (the int4/int8 KV
    store, the MLA latent) that read the cache in place. ``branchless_attention``: the runtime
    runs one exported step graph (ONNX Runtime), so low-rank caches take their branch-free
    path (values rebuilt, the sinks' exact K/V every step).
    """

    name: str
    bandwidth_Bps: float
    peak_flops: float
    launch_s: float
    float_bytes: int = 2
    notes: str = ""
    dequant_efficiency: float = 0.7
    torch_cpu: bool = False
    fused_attention: bool = False
    branchless_attention: bool = False

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
    torch_cpu=True,
    notes=(
        "ASSUMPTIONS, not measurements: a conservative laptop/server CPU running an fp32 "
        "model in PyTorch — 20 GB/s memory bandwidth, 200 GFLOP/s fp32, 5 µs per op call; "
        "dequantization efficiency 0.7 assumed. On the project's 2-core AVX-512 box the eager "
        "module call itself costs ~15–20 µs, so small linears run closer to dense than this "
        "roofline says (benchmarks/cpu_torch.py). Replace with `slimfx calibrate-target "
        "--backend torch --target cpu` measurements."
    ),
)

TARGETS: dict[str, Target] = {
    "cpu": _CPU,
    "ort-cpu": dataclasses.replace(
        _CPU,
        name="ort-cpu",
        torch_cpu=False,
        branchless_attention=True,
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
        fused_attention=True,
        notes=(
            "H100 SXM published figures: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16 tensor core; "
            "~4 µs launch overhead and dequantization efficiency 0.7 are assumptions; decode "
            "attention over a quantized KV / MLA cache assumes the fused Triton kernels run "
            "(forms.kv.fused.use_fused_decode; MLAAttention.decode_kernel)."
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


def storage(decision: Decision, shape: LinearShape) -> tuple[int, int]:
    """``(float elements, integer bytes)`` the weight is stored in (bias excluded):
    ``decision.storage(shape)``, so ``2·floats + ints == decision.weight_bytes(shape)``."""
    return decision.storage(shape)


def launches(decision: Decision) -> int:
    """Kernel launches (op calls) per forward of the form: ``decision.launches()``."""
    return decision.launches()


def estimate_latency(
    decision: Decision,
    shape: LinearShape,
    has_bias: bool,
    target: str | Target,
    workload: str | Workload,
) -> float:
    """Roofline seconds of one forward of the linear in form ``decision`` (module docstring)."""
    tgt, wl = target_of(target), workload_of(workload)
    t = wl.tokens
    floats, ints = decision.storage(shape)
    in_f, out_f = shape.in_features, shape.out_features
    if has_bias:
        floats += out_f
    acts = t * (in_f + out_f) + 2 * t * decision.intermediate()
    bytes_read = (floats + acts) * tgt.float_bytes + ints
    eff = tgt.dequant_efficiency if decision.dequantizes else 1.0
    flops = decision.flops(shape, t)
    if tgt.torch_cpu and _densified_per_call(decision, shape):
        # PyTorch on the CPU runs this form's reference op: the whole weight is rebuilt in
        # floats (written, then read back by F.linear) on every call, and the rebuild is
        # elementwise work over in·out entries at the dequantization efficiency
        bytes_read += 2 * in_f * out_f * tgt.float_bytes
        flops += _DENSIFY_OPS * in_f * out_f
    roof = max(bytes_read / tgt.bandwidth_Bps, flops / (tgt.peak_flops * eff))
    return roof + decision.launches() * tgt.launch_s


def attention_work(
    decision: Decision,
    shape: AttentionShape,
    target: str | Target,
    workload: str | Workload,
    context: int,
) -> Any:
    """``decision.step_work`` of one sequence's attention step of ``workload`` at ``context``,
    on the path ``target``'s runtime takes (``Target.branchless_attention``)."""
    tgt, wl = target_of(target), workload_of(workload)
    return decision.step_work(shape, context, wl.tokens, branchless=tgt.branchless_attention)


def estimate_attention_latency(
    decision: Decision,
    shape: AttentionShape,
    target: str | Target,
    workload: str | Workload,
    context: int,
    batch: int = 1,
    work: Any = None,
) -> float:
    """Roofline seconds of one attention step with the cache in form ``decision`` (a KV-cache
    or MLA decision): ``batch`` sequences, each with ``workload.tokens`` new tokens and
    ``context`` tokens cached after the step (``decision.step_work``)::

        bytes = batch·(cache_floats·fb + cache_ints + 2·rebuilt·fb) + weight_floats·fb
                + weight_ints
        t = max(bytes / bandwidth, batch·flops / (peak · eff)) + launches · launch_s

    ``eff``: the dequantization efficiency for forms that expand codes; on a target with fused
    attention a one-token step of a form that has the kernel rebuilds nothing and saves the
    two launches of the rebuild. ``work``: :func:`attention_work`'s result when the caller
    has it already."""
    tgt, wl = target_of(target), workload_of(workload)
    w = work if work is not None else attention_work(decision, shape, tgt, wl, context)
    fused = w.fused and tgt.fused_attention and wl.tokens == 1
    rebuilt = 0 if fused else w.rebuilt
    fb = tgt.float_bytes
    bytes_read = batch * (w.cache_floats * fb + w.cache_ints + 2 * rebuilt * fb)
    bytes_read += w.weight_floats * fb + w.weight_ints
    eff = tgt.dequant_efficiency if w.dequantizes else 1.0
    roof = max(bytes_read / tgt.bandwidth_Bps, batch * w.flops / (tgt.peak_flops * eff))
    return roof + max(1, w.launches - (2 if fused else 0)) * tgt.launch_s


#: elementwise operations per weight entry when a reference op rebuilds the dense weight
#: (unpack, subtract the zero point, scale, gather the group's scale / scatter the 2:4 values)
_DENSIFY_OPS = 8


def _densified_per_call(decision: Decision, shape: LinearShape) -> bool:
    """Whether PyTorch on the CPU rebuilds ``decision``'s dense weight on every call: the 2:4
    forms always (no CPU kernel reads the layout), quantized forms whose layout no packed CPU
    kernel takes (``slimfx.ir.cpu_packed.cpu_kernel_for``); dense, low-rank and forms slimfx
    does not know, never."""
    from slimfx.ir.cpu_packed import cpu_kernel_for

    if decision.kind in ("sparse24", "sparse24_lowrank"):
        return True
    quant = getattr(decision, "quant", None)
    core = quant if isinstance(quant, Decision) else decision
    bits = getattr(core, "bits", None)
    if not decision.dequantizes or bits is None:
        return False
    group = getattr(core, "group_size", None) or shape.in_features
    return cpu_kernel_for(bits, group, shape.in_features, shape.out_features)[0] is None


# --------------------------------------------------------------------------- measurements


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


def measured_dtype(target_name: str, device: torch.device) -> torch.dtype:
    """The dtype a calibration times in by default: a known target's compute dtype
    (:func:`compute_dtype`), else bfloat16 on CUDA and float32 elsewhere."""
    if target_name in TARGETS:
        return compute_dtype(TARGETS[target_name])
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
    def attention_key(
        cls, shape: AttentionShape, tokens: int, context: int, batch: int, dtype: str,
        decision: Decision | str, device: str,
    ) -> tuple[str, int, int, int, str, str, str]:
        """The key of one attention step (``measure_attention``): op ``attention:H/HkvxD@hidden``
        (heads, kv heads, head_dim, hidden size; ``~W`` for a sliding window), N = the step's
        tokens, K = the context after it, M = the batch."""
        w = "" if shape.sliding_window is None else f"~{shape.sliding_window}"
        op = (f"attention:{shape.num_heads}/{shape.num_kv_heads}x{shape.head_dim}"
              f"@{shape.hidden_size}{w}")  # fmt: skip
        return cls.key(op, tokens, context, batch, dtype, decision, device)

    def contexts(self, key: tuple[Any, ...]) -> list[tuple[int, float]]:
        """``(context, seconds)`` of every entry equal to the attention ``key`` but for its
        context (K), sorted by context."""
        k = self.key(*key)
        return sorted(
            (e[2], s) for e, s in self.entries.items() if e[:2] == k[:2] and e[3:] == k[3:]
        )

    def batches(self, key: tuple[Any, ...]) -> dict[int, list[tuple[int, float]]]:
        """Per measured batch (M), the ``(context, seconds)`` of every entry equal to the
        attention ``key`` but for its context and batch, sorted by batch and context."""
        k = self.key(*key)
        out: dict[int, list[tuple[int, float]]] = {}
        for e, s in self.entries.items():
            if e[:2] == k[:2] and e[4:] == k[4:]:
                out.setdefault(e[3], []).append((e[2], s))
        return {m: sorted(pts) for m, pts in sorted(out.items())}

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

    def summary(self, target: str) -> dict[str, Any]:
        """What measured ``target``'s entries: the file, the entry count and, from the info
        saved with each entry, the sorted distinct runtimes, torch devices, accuracy levels,
        threads and torch versions (only the fields some entry has)."""
        infos = [self.info.get(k, {}) for k in self.entries if k[6] == target]
        out: dict[str, Any] = {"file": self.path.name, "target": target, "entries": len(infos)}
        for f in ("runtime", "torch_device", "accuracy_level", "threads", "torch"):
            vals = sorted({i[f] for i in infos if i.get(f) is not None}, key=str)
            if vals:
                out[f] = vals
        return out

    def describe(self, target: str) -> str:
        """:meth:`summary` in one line (for report notes)."""
        s = self.summary(target)
        fmt = (("runtime", "{}"), ("torch_device", "on {}"), ("accuracy_level",
               "accuracy_level {}"), ("threads", "{} threads"), ("torch", "torch {}"))
        parts = [f.format("/".join(map(str, s[k]))) for k, f in fmt if k in s]
        return f"{s['entries']} entries in {s['file']}" + (": " + ", ".join(parts) if parts else "")

    def load(self) -> MeasuredCache:
        """Read the file (replacing what is in memory); a file that is not a latency cache,
        or an entry without its fields or with seconds that are not a positive number, is a
        ``ValueError`` naming the file (and the entry)."""
        self.entries, self.info = read_cache(self.path, self.version, self.key)
        return self

    def save(self) -> None:
        """Write the file atomically (sorted, stable JSON), merged with what the file holds
        now: entries another process wrote since this cache was read are kept (this cache's
        own win where both measured the same key; ``cache_file.write_cache``)."""
        self.entries, self.info = write_cache(
            self.path, self.entries, self.info, self.version, self.key
        )

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
    shape = LinearShape(site.in_features, site.out_features)
    return estimate_latency(decision, shape, site.has_bias, tgt, wl), "roofline"


#: the runtime label a latency cache's entries carry for what each backend runs
_BACKEND_RUNTIME = {"onnx": "onnxruntime", "triton": "triton"}


def runtime_mismatch(runtimes: list[str], backend: str | None) -> str:
    """A note when no entry of a latency cache was measured with the runtime ``backend``
    deploys on (``runtimes``: the cache's ``summary``; eager and compile: torch eager), else
    ``''``: the prices are another runtime's."""
    want = _BACKEND_RUNTIME.get(backend or "eager", "torch eager")
    if not runtimes or any(r.startswith(want) for r in runtimes):
        return ""
    return (
        f"latency cache measured with {', '.join(runtimes)}, not {want}, which runs this "
        f"model (backend={backend!r}): its latencies are another runtime's — calibrate with "
        "the same backend (`slimfx calibrate-target --backend …`)"
    )


def latency_notes(
    cache: MeasuredCache | None, sources: Mapping[str, int], target: str, backend: str | None,
    latency_budget: float | None,
) -> list[str]:
    """The report notes on how the linear options were priced: with a cache, how many were
    measured (and by what) and whether by another runtime than ``backend`` deploys on; a
    latency budget without one, the roofline's caveat (``optimize`` and the streamed one)."""
    if cache is not None:
        notes = [f"latency: {sources.get('measured', 0)} of {sum(sources.values())} options "
                 f"measured ({cache.describe(target)}), the rest from the roofline"]  # fmt: skip
        mismatch = runtime_mismatch(cache.summary(target).get("runtime", []), backend)
        return notes + ([mismatch] if mismatch else [])
    return [roofline_caveat(target, backend)] if latency_budget is not None else []


def roofline_caveat(target: str, backend: str | None) -> str:
    """What a roofline-priced latency budget cannot know, for the runtime that will run it."""
    head = f"latency budget priced by the {target} roofline (bytes and FLOPs, no measurement)"
    if backend == "onnx":
        return (
            f"{head}, which does not know ONNX Runtime's kernels (at accuracy_level 0 its int8 "
            "MatMulNBits is slower than dense MatMul on x86): measure them with `slimfx "
            "calibrate-target --backend onnx` and pass latency_cache="
        )
    if target in ("cpu", "ort-cpu") and backend in (None, "eager", "compile"):
        return (
            f"{head}: PyTorch's packed int4/int8 CPU kernels read the codes but do not reach "
            "the bandwidth floor, and the 2:4 forms rebuild their weight every call (priced "
            "so) — measure them with `slimfx calibrate-target --backend torch --target cpu` "
            "and pass latency_cache="
        )
    return f"{head}: measure the device with `slimfx calibrate-target` and pass latency_cache="
