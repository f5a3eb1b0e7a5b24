"""Finding and selecting what ``optimize`` plans over: capture and linear sites (with the
graph's attention sites), include/exclude patterns, tied sites, weight checks, the held-out
split, and how a model is called on a calibration batch. Used by ``slimfx.stages``."""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from slimfx import validate
from slimfx.cost.batches import batch_units, naming_batch
from slimfx.ir.capture import capture as capture_graph
from slimfx.ir.find import find_linear_sites, graph_weight_readers, wider_than_linear
from slimfx.ir.sites import LinearSite

__all__ = ["find_sites", "select_sites"]


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "generate")


def _keywords(model: nn.Module, batch: Mapping) -> dict:
    """A dict batch as a Hugging Face model's keywords: no cache object returned (an
    encoder-decoder's would stop the capture), integer labels as int64 (the loss's targets)."""
    kw = dict(batch)
    if _is_hf(model) and getattr(model.config, "use_cache", None) is not None:
        kw.setdefault("use_cache", False)
    lab = kw.get("labels")
    if isinstance(lab, Tensor) and not lab.is_floating_point() and lab.dtype != torch.long:
        kw["labels"] = lab.long()
    return kw


def _example_call(model: nn.Module, batch: Any, max_tokens: int = 16) -> tuple[tuple, dict]:
    """Arguments for capturing ``model`` from one calibration batch (trimmed for speed)."""
    if isinstance(batch, Mapping):  # labels kept: an encoder-decoder's decoder reads them
        return (), _keywords(model, batch)
    if _is_hf(model) and isinstance(batch, Tensor) and not batch.is_floating_point():
        return (), {"input_ids": batch[:1, :max_tokens], "use_cache": False}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**_keywords(model, batch))
    if _is_hf(model) and isinstance(batch, Tensor) and not batch.is_floating_point():
        return model(input_ids=batch, use_cache=False)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _unfound_linears(model: nn.Module, known: set[str]) -> dict[str, str]:
    """``nn.Linear`` modules that are neither sites nor already left alone with a reason: why
    (their weight parametrized, or never called; one module under several names is a site
    that the tied-weight rule keeps dense, with its own note)."""
    from torch.nn.utils import parametrize

    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or name in known:
            continue
        if parametrize.is_parametrized(m):
            out[name] = ("not a site: its weight is parametrized (torch.nn.utils.parametrize, "
                         "weight_norm), which a rewrite would drop")  # fmt: skip
        else:
            out[name] = "not a site: the captured forward never calls it"
    return out


def find_sites(
    model: nn.Module, example: tuple[tuple, dict], attention: list | None = None
) -> tuple[list[LinearSite], dict[str, Any]]:
    """Capture ``model`` and find its linear sites; the second value says how. ``attention``:
    a list to fill with the attention sites of the captured graph
    (``ir.attention_graph``; their refusals go to ``info["attention_rejected"]``)."""
    t0 = time.perf_counter()
    captured = capture_graph(model, example[0], example[1], fallback=True)
    call = example[1] or example[0]  # module discovery runs the model on the first batch
    with naming_batch(0, call if len(example[0]) != 1 else example[0][0], model):
        sites = find_linear_sites(captured, model)
    info = {"method": captured.method, "seconds": round(time.perf_counter() - t0, 2)}
    if attention is not None:
        from slimfx.ir.attention_graph import find_graph_attention_sites

        found, refused = find_graph_attention_sites(captured, model, sites)
        attention.extend(found)
        if refused:
            info["attention_rejected"] = refused
    # a parent reading a child's weight (MHA's out_proj): the graph says whether a value read
    # runs (BLOOM's is in a branch its default config skips); metadata reads (T5's
    # `wo.weight.dtype`) leave no node, so the source decides those, as without a graph
    fqns = [s.fqn for s in sites]
    scanned = validate.direct_weight_readers(model, fqns)
    seen = graph_weight_readers(captured, model, sites)
    left = scanned if seen is None else {f: scanned.get(f, why) for f, why in seen.items()}
    left |= validate.direct_weight_readers(model, fqns, metadata=True)
    left |= wider_than_linear(captured, model, sites)  # e.g. a MoE router
    left |= _unfound_linears(model, {s.fqn for s in sites} | set(left))
    if left:
        sites = [s for s in sites if s.fqn not in left]
        info["left_alone"] = left
    if captured.fallback_reason:
        info["fallback_reason"] = captured.fallback_reason
    uncovered = _uncovered(model)
    if uncovered:
        info["uncovered"] = uncovered
    return sites, info


def _uncovered(model: nn.Module) -> str | None:
    """What a report must say when a large share of the weights sits in tensors no linear site
    can hold: 3-D (or larger) parameters, e.g. the batched expert weights of a
    mixture-of-experts layer."""
    total = sum(p.numel() for p in model.parameters())
    big = [(n, p.numel()) for n, p in model.named_parameters() if p.dim() >= 3]
    share = sum(k for _, k in big) / max(total, 1)
    if share < 0.01:
        return None
    big.sort(key=lambda nk: "expert" not in nk[0])  # name an expert tensor where there is one
    kind = "batched MoE experts" if "expert" in big[0][0] else "e.g. convolutions"
    return (f"{sum(k for _, k in big):,} parameters ({share:.0%} of the model) are in "
            f"{len(big)} tensor(s) of 3 or more dimensions, e.g. {big[0][0]} ({kind}): no "
            "linear site holds them, so they stay as they are and outside the budget")


_TIED_WHY = (
    "any rewrite keeps a dense copy, so under a bytes budget it stays dense and outside the "
    "budget (include=[...] or a latency budget offers it)"
)


def _drop_tied_sites(
    sites: list[LinearSite], notes: list[str], keep: Collection[str] = (), why: str = _TIED_WHY
) -> list[LinearSite]:
    """Leave tied sites (an ``lm_head`` sharing the embedding's weight) out of a bytes budget.

    Rewriting a tied weight keeps a dense copy for its other user, so under a memory/bits
    budget no form of it saves a byte: counted in the budget, its dense bytes would only shrink
    what the other linears may keep (SmolLM2 at budget 0.3: 0.11 of their bytes instead of 0.3).
    ``include=[...]`` naming it, or a latency budget (decode reads the whole head every token),
    offers it again. A replayed plan passes the sites it decides as ``keep``: a tied site it
    does not decide was left out of its solve, and left out again the replay reports the sites
    and totals the solve did."""
    tied = [s for s in sites if s.tied and s.fqn not in keep]
    if not tied or len(tied) == len(sites):
        return sites
    for s in tied:
        notes.append(f"{s.fqn}: weight tied to {', '.join(s.tied)} — {why}")
    return [s for s in sites if s not in tied]


def select_sites(
    sites: list[LinearSite], include: Sequence[str] | None, exclude: Sequence[str] | None,
    notes: list[str] | None = None,
) -> list[LinearSite]:
    """Filter sites by glob patterns; a pattern matching nothing raises (a typo would
    otherwise silently optimize nothing or everything). ``notes``: gets a line naming the
    sites the patterns left out."""
    for label, pats in (("include", include), ("exclude", exclude)):
        if isinstance(pats, str):
            raise TypeError(f"{label} takes a list of patterns, not one string")
        for p in pats or ():
            if not any(fnmatch.fnmatchcase(s.fqn, p) for s in sites):
                raise ValueError(f"{label} pattern {p!r} matches no linear site of this model")
    keep = [
        s
        for s in sites
        if (not include or any(fnmatch.fnmatchcase(s.fqn, p) for p in include))
        and not any(fnmatch.fnmatchcase(s.fqn, p) for p in exclude or ())
    ]
    if not keep:
        raise ValueError("include/exclude leave no linear site to optimize")
    out = [s.fqn for s in sites if s not in keep]
    if out and notes is not None:
        notes.append(
            f"include/exclude left out {len(out)} linear site(s) (e.g. {', '.join(out[:3])}): "
            "they stay as they are, outside the report"
        )
    return keep


def _check_weights(model: nn.Module, sites: Sequence[LinearSite]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    bad = [
        s.weight for s in sites if s.weight in params and not torch.isfinite(params[s.weight]).all()
    ]
    if bad:
        raise ValueError(
            f"{len(bad)} weight(s) contain NaN or inf: {', '.join(bad[:5])}"
            f"{' …' if len(bad) > 5 else ''}. Fix the checkpoint before optimizing."
        )


def _split_heldout(batches: list, heldout: Sequence | None) -> tuple[list, list, str | None]:
    if heldout is not None:
        return batches, list(heldout), None
    units = batch_units(batches)  # the user's batches (a padded one split into its rows)
    if len(units) >= 2:
        k = max(1, len(units) // 8)
        return sum(units[:-k], []), sum(units[-k:], []), None
    return batches, batches, "only one calibration batch: the measured SQNR uses the same batch"


def _needs_gram(decision: Any) -> bool:
    from slimfx.api import needs_gram  # the api owns the list of activation-aware forms

    return needs_gram(decision)


@torch.no_grad()
def measure_site_errors(
    model: nn.Module,
    dense: Mapping[str, tuple[Tensor, Tensor | None]],
    batches: Sequence,
    call: Callable[[Any], Any] | None = None,
    what: str = "held-out batch",
    first: int = 0,
) -> dict[str, tuple[float, float]]:
    """(SQNR dB, relative error) of each rewritten layer's output on ``batches``: the
    rewritten module against the dense weight it replaced, on the same inputs. ``call(batch)``
    runs one batch (default: ``model`` called on it as a calibration batch); an error names
    batch ``first + i`` as ``what``."""
    mods = dict(model.named_modules())
    acc: dict[str, list[float]] = {k: [0.0, 0.0] for k in dense}
    handles = []

    def hook(name: str) -> Callable:
        W, b = dense[name]

        def fn(mod: nn.Module, args: tuple, out: Tensor) -> None:
            ref = torch.nn.functional.linear(args[0].to(W.dtype), W, b).double()
            acc[name][0] += float((ref * ref).sum())
            acc[name][1] += float(((ref - out.double()) ** 2).sum())

        return fn

    try:
        for name in dense:
            handles.append(mods[name].register_forward_hook(hook(name)))
        for i, b in enumerate(batches):
            with naming_batch(first + i, b, model, what):
                _call(model, b) if call is None else call(b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for k, (sig, err) in acc.items():
        rel = err / sig if sig > 0 else float("nan")
        out[k] = (10 * math.log10(sig / err) if err > 0 else float("inf"), rel)
    return out
