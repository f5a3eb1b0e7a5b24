"""Measured attention steps over each KV-cache / MLA form, into a :class:`MeasuredCache`.

:func:`measure_attention` builds a one-layer Llama of each :class:`AttentionShape`, gives its
attention the form of each decision (the compressed cache, the low-rank k/v projections, the
MLA block — fitted on random tokens: a timing needs the shapes, not good factors), fills the
cache to each context by prefill and times one decode step of ``tokens`` new tokens: the
attention module's forward **minus its linear sites' forwards** (``q_proj`` and ``o_proj``
always, ``k_proj`` / ``v_proj`` unless the form owns them), so the entry covers what the
decision's ``step_work`` prices — the cache read and rebuild, the attention, the projections
the form owns. Contexts are measured in increasing order on one growing cache.

A quantized cache's steps read its store in place (``use_fused_decode``: the Triton kernel on
CUDA, as the ``h100`` target assumes; the torch op ``kv_decode_attention_folded`` elsewhere);
an MLA block runs its decode kernel on CUDA (``MLAAttention.decode_kernel``); every other form
runs the eager modules as ``optimize`` returns them. Each entry names what ran.

``cost.attention_price.attention_latency`` prices an option from these entries: the measured step at
the context asked for, interpolated linearly between measured contexts (an attention step is
affine in its context), extrapolated from the two largest above them and scaled by the
roofline below them.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from slimfx.cost.cache_file import where_measured
from slimfx.cost.target import MeasuredCache, measured_dtype
from slimfx.planning.configs import Decision
from slimfx.planning.shapes import AttentionShape

__all__ = [
    "DEFAULT_ATTENTION_SHAPES",
    "DEFAULT_CONTEXTS",
    "default_attention_decisions",
    "measure_attention",
    "parse_attention_shapes",
]

#: SmolLM2-135M's attention (hidden 576, 9 query heads over 3 kv heads of 64, full RoPE)
DEFAULT_ATTENTION_SHAPES: tuple[AttentionShape, ...] = (AttentionShape(576, 9, 3, 64, 64),)
#: contexts measured by default: the usual decode range, a factor of 4 apart (the step is affine
#: in the context only while its working set stays in the same level of the memory hierarchy)
DEFAULT_CONTEXTS: tuple[int, ...] = (1024, 4096, 16384)


def parse_attention_shapes(text: str | None) -> list[AttentionShape]:
    """``"576:9:3:64,2048:32:8:64"`` (hidden : heads : kv heads : head_dim) → shapes with full
    RoPE; ``None`` or ``"smollm2"`` → :data:`DEFAULT_ATTENTION_SHAPES`; ``"none"`` → ``[]``."""
    if text is None or text.strip().lower() == "smollm2":
        return list(DEFAULT_ATTENTION_SHAPES)
    if text.strip().lower() == "none":
        return []
    shapes = []
    for part in text.split(","):
        try:
            hidden, heads, kv, hd = (int(v) for v in part.split(":"))
            shapes.append(AttentionShape(hidden, heads, kv, hd, hd))
        except ValueError as e:
            raise ValueError(
                f"bad attention shape {part!r}: write HIDDEN:HEADS:KV_HEADS:HEAD_DIM, e.g. "
                f"576:9:3:64 (comma-separated) — {e}"
            ) from None
    return shapes


def default_attention_decisions(shape: AttentionShape) -> list[Decision]:
    """What the solver is offered at a site of ``shape``: the default KV-cache candidates
    (``forms.kv.candidates.default_kv_forms``; the low-rank ones also with int8 factors, as a
    budget that counts weights offers them) and the MLA ladder (``forms.mla.plan``)."""
    from dataclasses import replace

    from slimfx.forms.kv.candidates import default_kv_forms
    from slimfx.forms.mla.candidates import _configs
    from slimfx.forms.mla.plan import MLA_LADDER, ladder_context

    kv = default_kv_forms(shape)
    out: list[Decision] = [*kv, *(replace(d, factor_bits=8) for d in kv if d.owns)]
    try:
        ctx = ladder_context(shape.head_dim)
        out += _configs(shape, MLA_LADDER["rank_fractions"], ctx, "shape")  # type: ignore[arg-type]
    except ValueError:
        pass  # MLA cannot convert this shape: nothing of it to time
    return out


def _model(shape: AttentionShape, max_tokens: int):  # noqa: ANN202
    """A one-layer float32 Llama on the CPU whose attention has ``shape`` (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape.rope_dim != shape.head_dim or shape.sliding_window is not None:
        raise ValueError(
            f"attention steps are timed on a Llama block: full RoPE and no sliding window, got "
            f"rope_dim={shape.rope_dim} of {shape.head_dim}, sliding_window={shape.sliding_window}"
        )
    cfg = LlamaConfig(
        hidden_size=shape.hidden_size, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, num_hidden_layers=1,
        intermediate_size=64, vocab_size=256, max_position_embeddings=max_tokens,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


def _apply(
    model: nn.Module,
    decision: Decision,
    fused: bool | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Any, dict[str, Any]]:
    """Give ``model``'s one attention block ``decision`` — fitted on the CPU in float32, as
    ``optimize`` fits, then moved to ``device`` / ``dtype`` — and its decode path (``fused``:
    see :func:`measure_attention`); ``(the cache to decode with, info)``."""
    from transformers import DynamicCache

    from slimfx.forms.kv.apply import apply_kv_plan
    from slimfx.forms.kv.cache import KVCache
    from slimfx.forms.kv.calibrate import attention_grams
    from slimfx.forms.kv.config import KVDecision, KVDenseConfig, KVQuantConfig
    from slimfx.forms.mla.cache import MLALatentCache
    from slimfx.forms.mla.candidates import apply_mla
    from slimfx.forms.mla.config import MLAConfig
    from slimfx.ir.find import inspect_attention_sites

    sites, _ = inspect_attention_sites(model)
    fqn = sites[0].fqn
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 256, (1, 64), generator=g) for _ in range(4)]
    info = {"runtime": "torch eager", "kernel": "torch"}
    if isinstance(decision, MLAConfig):
        apply_mla(model, sites, {fqn: decision}, calib)
        model.to(device, dtype)
        if fused or (fused is None and device.type == "cuda"):
            dict(model.named_modules())[fqn].decode_kernel = True
            info = {"runtime": "triton", "kernel": "mla_decode"}
        return MLALatentCache(1, latent_bits=decision.latent_bits), info
    if not isinstance(decision, KVDecision):
        raise ValueError(f"{decision.short()} is not an attention-site decision")
    if isinstance(decision, KVDenseConfig):
        model.to(device, dtype)
        return DynamicCache(), info
    grams = attention_grams(model, sites, calib) if decision.owns else None
    apply_kv_plan(model, {fqn: decision}, sites, grams)
    model.to(device, dtype)
    if fused is not False and isinstance(decision, KVQuantConfig):
        from slimfx.forms.kv.fused import use_fused_decode

        use_fused_decode(model, kernel=fused)
        if fused or device.type == "cuda":
            info = {"runtime": "triton", "kernel": "kv_decode_attention"}
        else:
            info = {"runtime": "torch eager", "kernel": "kv_decode_attention_folded"}
    return KVCache([decision]), info


def _decode_path(model: nn.Module) -> str:
    """What the last decode step ran, as the attention module records it (an MLA block; a
    quantized cache's in-place step): ``"triton"``, ``"torch"`` or ``"torch: <why>"``."""
    return getattr(model.model.layers[0].self_attn, "last_decode_path", "") or "torch"


def _refusal(decision: Decision, shape: AttentionShape) -> str | None:
    """Why ``decision`` cannot apply at ``shape`` (``None``: it can)."""
    check = getattr(decision, "check", None) or getattr(decision, "reason_invalid", None)
    if check is None:
        return f"{decision.short()} is not an attention-site decision"
    return check(shape)


class _StepClock:
    """Seconds of each forward of ``attn`` minus the forwards of ``inner`` modules it calls.

    On CUDA the hooks record events on the stream (no synchronization inside the step, which
    would add its own wait to the time); the step's end event is waited for after it."""

    def __init__(self, attn: nn.Module, inner: Iterable[nn.Module], cuda: bool = False):
        self.cuda, self.steps = cuda, []
        self._start: Any = None
        self._inner: list[tuple[Any, Any]] = []
        self.handles = [
            attn.register_forward_pre_hook(self._attn_in),
            attn.register_forward_hook(self._attn_out),
        ]
        for m in inner:
            self.handles += [
                m.register_forward_pre_hook(self._inner_in),
                m.register_forward_hook(self._inner_out),
            ]

    def _stamp(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def _attn_in(self, *_: Any) -> None:
        self._inner, self._start = [], self._stamp()

    def _attn_out(self, *_: Any) -> None:
        end = self._stamp()
        if self.cuda:
            end.synchronize()
        inner = sum(self._seconds(a, b) for a, b in self._inner)
        self.steps.append(self._seconds(self._start, end) - inner)

    def _inner_in(self, *_: Any) -> None:
        self._inner.append((self._stamp(), None))

    def _inner_out(self, *_: Any) -> None:
        self._inner[-1] = (self._inner[-1][0], self._stamp())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _linear_sites(attn: nn.Module, decision: Decision) -> list[nn.Module]:
    """The modules of ``attn`` that are linear sites of their own: q_proj and o_proj, and
    k_proj / v_proj unless ``decision`` owns them."""
    owned = set(getattr(decision, "owns", ()))
    roles = ["q", "o"] + [r for r in ("k", "v") if r not in owned]
    mods = [getattr(attn, f"{r}_proj", None) for r in roles]
    return [m for m in mods if isinstance(m, nn.Module)]


@torch.inference_mode()
def _time_steps(
    model: nn.Module,
    cache: Any,
    decision: Decision,
    contexts: Sequence[int],
    tokens: int,
    batch: int,
    steps: int,
    chunk: int,
) -> dict[int, float]:
    """Median attention-step seconds at each context (module docstring)."""
    attn = model.model.layers[0].self_attn
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(2)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (batch, n), generator=g).to(dev)

    out: dict[int, float] = {}
    held = 0
    for ctx in sorted(contexts):
        while held < ctx - tokens:  # prefill up to the step
            n = min(chunk, ctx - tokens - held)
            model(input_ids=ids(n), past_key_values=cache, use_cache=True)
            held += n
        clock = _StepClock(attn, _linear_sites(attn, decision), cuda=dev.type == "cuda")
        try:
            for _ in range(steps + 2):  # two warm-up steps
                model(input_ids=ids(tokens), past_key_values=cache, use_cache=True)
                held += tokens
        finally:
            clock.remove()
        out[ctx] = statistics.median(clock.steps[2:])
    return out


def measure_attention(
    target_name: str,
    shapes: Iterable[AttentionShape] | None = None,
    decisions: Sequence[Decision] | Callable[[AttentionShape], Sequence[Decision]] | None = None,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    path: str | os.PathLike[str] = "latency.json",
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    tokens: int = 1,
    batches: Sequence[int] = (1,),
    steps: int = 7,
    chunk: int = 1024,
    fused: bool | None = None,
    progress: bool = True,
) -> MeasuredCache:
    """Time one attention step of ``tokens`` new tokens for every (shape, decision, batch,
    context) on ``device`` and store the medians of ``steps`` steps in the cache at ``path``
    under ``target_name`` (key: :meth:`MeasuredCache.attention_key`).

    ``decisions``: a list or a function of the shape (default
    :func:`default_attention_decisions`); a decision the shape refuses is skipped.
    ``contexts``: tokens in the cache after the step (at least two give the affine fit
    ``attention_latency`` interpolates). ``fused``: the decode path — ``None`` (default) what
    slimfx runs on ``device`` (module docstring), ``True`` the Triton kernels on any device,
    ``False`` the eager modules (a quantized store dequantized every step). ``dtype``: default the target's compute dtype. ``chunk``: prefill tokens per call.
    """
    from tqdm.auto import tqdm

    dev = torch.device(device)
    dtype = measured_dtype(target_name, dev) if dtype is None else dtype
    ctxs = sorted({int(c) for c in contexts})
    if not ctxs or ctxs[0] <= tokens:
        raise ValueError(f"contexts must exceed the step's {tokens} tokens, got {list(contexts)}")
    shapes = list(DEFAULT_ATTENTION_SHAPES if shapes is None else shapes)
    pick = default_attention_decisions if decisions is None else decisions
    cache = MeasuredCache(path)
    todo = [(s, d, b) for s in shapes for d in (pick(s) if callable(pick) else pick)
            for b in batches if _refusal(d, s) is None]  # fmt: skip
    for shape, decision, batch in tqdm(todo, desc="attention steps", disable=not progress):
        model = _model(shape, ctxs[-1] + (steps + 2) * tokens + 8)
        kv_cache, info = _apply(model, decision, fused, dev, dtype)
        secs = _time_steps(model, kv_cache, decision, ctxs, tokens, batch, steps, chunk)
        if info["kernel"] != "torch":  # what the last step ran: the kernel, or why not
            info["decode_path"] = _decode_path(model)
        for ctx, s in secs.items():
            key = MeasuredCache.attention_key(
                shape, tokens, ctx, batch, str(dtype), decision, target_name
            )
            cache.put(key, s, torch_device=str(dev), steps=steps, **{**where_measured(dev), **info})
        del model, kv_cache
        cache.save()  # after each form: a run cut short keeps what it measured
    cache.save()
    return cache
