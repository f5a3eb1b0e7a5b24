"""Calibration for the KV forms: the inputs of each attention block and the Gram of them.

:func:`capture_attention_inputs` runs the model on calibration batches (no cache) and keeps,
per attention site, ``(hidden_states, cos, sin)`` as the block received them — what
:func:`~slimfx.forms.kv.simulate.attention_error` replays — or, for a cache-only site, the
whole call (:class:`~slimfx.forms.kv.replay.BlockCall`, replayed through the block itself). :func:`attention_grams` keeps only
``XᵀX`` of those inputs (the shared input of k_proj and v_proj), what the low-rank fit needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.ir.capture import eval_mode
from slimfx.ir.sites import AttentionSite

from .cache import CACHE_KWARGS
from .config import KVDenseConfig

__all__ = [
    "capture_attention_inputs", "attention_grams", "fit_site", "simulation_mismatch",
    "SIMULATION_TOLERANCE", "probe_ids",
]  # fmt: skip


@torch.no_grad()
def _run(
    model: nn.Module, sites: list[AttentionSite], batches: Iterable[Tensor], keep: Any
) -> None:
    mods = dict(model.named_modules())
    handles = []
    for site in sites:

        def hook(_m: nn.Module, args: tuple, kwargs: dict, fqn: str = site.fqn) -> None:
            keep(fqn, args, kwargs)

        handles.append(mods[site.fqn].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for ids in batches:
            if isinstance(ids, Mapping):
                model(**{**ids, "use_cache": False})
            else:
                model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return kwargs.get("hidden_states", args[0] if args else None).detach()


def _tensors(x: Any, fn: Any) -> Any:
    """``x`` with ``fn`` applied to every tensor in it (through tuples, lists and dicts)."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_tensors(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _tensors(v, fn) for k, v in x.items()}
    return x


def capture_attention_inputs(
    model: nn.Module, sites: list[AttentionSite], batches: Iterable[Tensor]
) -> dict[str, list[Any]]:
    """Per site fqn, one ``(hidden, cos, sin)`` per batch — for a cache-only site, whose block
    is replayed as it is (``replay.BlockCall``), the whole call."""
    from .replay import BlockCall

    out: dict[str, list[Any]] = {s.fqn: [] for s in sites}
    whole = {s.fqn for s in sites if s.cache_only}

    def keep(fqn: str, args: tuple, kwargs: dict) -> None:
        if fqn in whole:
            kw = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
            out[fqn].append(BlockCall(*_tensors((args, kw), Tensor.detach)))
            return
        pe = kwargs.get("position_embeddings")
        out[fqn].append((_hidden(args, kwargs), pe[0].detach(), pe[1].detach()))

    _run(model, sites, batches, keep)
    return out


@contextmanager
def full_precision() -> Iterator[None]:
    """float32 matmuls at full precision inside (``"highest"``: no TF32, no bf16 inner
    products), the caller's setting restored after. A caller who set precision through the
    per-backend ``fp32_precision`` API (which torch will not read back as one setting) is left
    as is."""
    try:
        before = torch.get_float32_matmul_precision()
    except RuntimeError:
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


#: the relative difference above which a block is not the one ``simulation_mismatch``
#: reimplements (float32 rounding gives ~1e-7)
SIMULATION_TOLERANCE = 1e-4


def probe_ids(model: nn.Module, length: int = 32) -> Tensor:
    """``(1, length)`` seeded random token ids within the model's embedding rows, on its
    device: an unpadded call (no mask) for checks that need a forward, not text."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or int(getattr(model.config, "vocab_size", 2))
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return torch.randint(0, vocab, (1, length), generator=g).to(device)


@torch.no_grad()
def simulation_mismatch(model: nn.Module, sites: list[AttentionSite]) -> dict[str, float]:
    """Per site whose block the forms rewrite (not ``cache_only``, no sliding window — those
    take no form): the relative difference ``‖y_sim − y‖ / ‖y‖`` between the block's own
    output ``y`` on a probe call (:func:`probe_ids`: unpadded, causal) and
    :func:`~slimfx.forms.kv.simulate.block_forward`'s dense reimplementation of it ``y_sim``
    (what the candidates are priced with, and what the low-rank block computes) — both in
    float32, on an eval-mode copy of the block. Llama-style blocks differ by rounding (~1e-7);
    a block whose attention is something else (Cohere's interleaved RoPE pairs) by far more.
    Run at full float32 precision (:func:`full_precision`: TF32 / reduced-precision matmuls
    would differ by ~1e-3 and refuse a Llama block)."""
    todo = [s for s in sites if not s.cache_only and s.sliding_window is None]
    calls: dict[str, tuple[tuple, dict]] = {}

    def keep(fqn: str, args: tuple, kwargs: dict) -> None:
        kw = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
        calls.setdefault(fqn, (args, kw))

    with eval_mode(model), full_precision():
        _run(model, todo, [probe_ids(model)], keep)
        return _mismatch(model, todo, calls)


def _mismatch(model: nn.Module, todo: list[AttentionSite], calls: dict) -> dict[str, float]:
    import copy

    from .simulate import block_forward

    mods = dict(model.named_modules())
    out: dict[str, float] = {}
    for s in todo:
        if s.fqn not in calls or calls[s.fqn][1].get("position_embeddings") is None:
            continue
        args, kwargs = _tensors(calls[s.fqn], lambda t: t.float() if t.is_floating_point() else t)
        attn = copy.deepcopy(mods[s.fqn]).float().eval()
        y = attn(*args, **kwargs)
        y = (y[0] if isinstance(y, tuple) else y).double()
        cos, sin = kwargs["position_embeddings"]
        y_sim = block_forward(attn, _hidden(args, kwargs), cos, sin, KVDenseConfig()).double()
        out[s.fqn] = float((y_sim - y).norm() / y.norm().clamp_min(1e-30))
    return out


def attention_grams(
    model: nn.Module, sites: list[AttentionSite], batches: Iterable[Tensor]
) -> dict[str, Tensor]:
    """Per site fqn, the float64 Gram ``XᵀX`` of the block's input over all calibration tokens."""
    out: dict[str, Tensor] = {}

    def keep(fqn: str, args: tuple, kwargs: dict) -> None:
        hidden = _hidden(args, kwargs)
        x = hidden.reshape(-1, hidden.shape[-1]).double()
        out[fqn] = out.get(fqn, 0) + x.T @ x

    _run(model, sites, batches, keep)
    return out


def fit_site(model: nn.Module, site: AttentionSite, gram: Tensor, config: Any) -> dict[str, Tensor]:
    """Low-rank factors of ``site``'s k/v projections for a ``KVLowRankConfig`` or
    ``KVLatentQuantConfig`` (``config.method`` picks the output weighting)."""
    from slimfx.forms.kv.candidates import cache_only_reason
    from slimfx.forms.kv.numerics import fit_lowrank_kv, key_output_weight, value_output_weight

    lr = getattr(config, "lowrank", config)
    why = cache_only_reason(site) if site.cache_only else lr.check(site.site_shape)
    if why:
        raise ValueError(f"{site.fqn}: {why}")
    mods = dict(model.named_modules())
    sh = site.site_shape
    heads = (sh.num_heads, sh.num_kv_heads, sh.head_dim)
    kw = vw = None
    if lr.method == "attention":
        kw = key_output_weight(mods[site.projection("q")].weight, gram, heads, sh.rope_dim)
        vw = value_output_weight(mods[site.projection("o")].weight, heads)
    return fit_lowrank_kv(
        mods[site.projection("k")].weight,
        mods[site.projection("v")].weight,
        gram,
        lr.key_rank,
        lr.value_rank,
        lr.groups,
        kw,
        vw,
    )
