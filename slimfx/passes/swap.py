"""Module swap: apply a Plan by replacing each planned ``nn.Linear`` with a slimfx module.

    model.<fqn> = nn.Linear(W, b)   →   model.<fqn> = rule.build_module(site, linear, decision)
                                         e.g. LowRankLinear(U, V, b),  W ≈ U·V

The model keeps its class (a Hugging Face model still ``generate()``s, saves and loads).
Everything is validated before anything changes: an unknown site, a shape that disagrees with
the plan, a NaN/inf weight or (``strict=True``) any rule rejection raises ``ValueError`` and
leaves the model as it was. ``empty_like_plan`` builds the same module structure with empty
tensors, so a saved rewritten model's ``state_dict`` loads into a freshly built model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.ir.match import linear_weight
from slimfx.ir.modules import carry_hooks, module_for
from slimfx.ir.sites import LinearSite
from slimfx.passes.base import (
    PassResult,
    Rule,
    SiteRecord,
    Verdict,
    non_linear_site_reason,
    rule_for,
)
from slimfx.passes.validate import suggest, validate_plan
from slimfx.planning.configs import Decision, DenseConfig
from slimfx.planning.plan import Plan
from slimfx.pool import site_pool

__all__ = ["apply_plan", "empty_like_plan", "validate_plan", "dense_bytes", "resolve_rule"]


def dense_bytes(site: LinearSite) -> int:
    """Reference bytes of the dense linear: 16-bit weight (+ 16-bit bias)."""
    return DenseConfig().bytes(site.site_shape, site.has_bias)


def resolve_rule(decision: Decision, rules: Mapping[str, Rule] | None = None) -> Rule | Verdict:
    """The rule for ``decision`` (``rules`` overrides the registry by kind), or a rejection
    when no rule handles its kind."""
    if rules is not None and decision.kind in rules:
        return rules[decision.kind]
    try:
        return rule_for(decision)
    except KeyError as e:
        return Verdict.reject(str(e.args[0]))


def _check_finite(site: LinearSite, weight: Tensor) -> None:
    if weight.is_floating_point() and not torch.isfinite(weight).all():
        raise ValueError(
            f"parameter {site.weight!r} (site {site.fqn!r}) has NaN or inf entries; "
            "nothing was modified"
        )


def raise_rejections(where: str, rejected: list[SiteRecord]) -> None:
    """The strict-mode error: one line per rejected site with its decision and reason."""
    lines = "\n".join(f"  {r.fqn} [{r.decision}]: {r.reason}" for r in rejected)
    raise ValueError(
        f"{where}: {len(rejected)} site(s) rejected, nothing was modified (a plan: change or "
        f"drop these decisions; {where}(..., strict=False) applies the rest and records "
        f"these):\n{lines}"
    )


@dataclass
class _Job:
    site: LinearSite
    decision: Decision
    rule: Rule


def _dense_linear(model_modules: Mapping[str, nn.Module], site: LinearSite) -> nn.Module:
    """The module at ``site.fqn``, checked to be a dense linear of the site's shape."""
    mod = model_modules.get(site.fqn)
    if mod is None:
        raise ValueError(
            f"site {site.fqn!r} is not a module of this model{suggest(site.fqn, model_modules)}"
        )
    w = getattr(mod, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(
            f"site {site.fqn!r} is a {type(mod).__name__} without a 2-D weight (already rewritten?)"
        )
    w = linear_weight(mod)
    if tuple(w.shape) != site.shape:
        raise ValueError(
            f"site {site.fqn!r}: the module's weight has shape {tuple(w.shape)} but the site says "
            f"{site.shape} (out, in)"
        )
    has_bias = getattr(mod, "bias", None) is not None
    if has_bias != site.has_bias:
        raise ValueError(
            f"site {site.fqn!r}: the module {'has' if has_bias else 'has no'} bias but the site "
            f"says has_bias={site.has_bias}"
        )
    return mod


def _plan_jobs(
    plan: Plan,
    sites: list[LinearSite],
    modules: Mapping[str, nn.Module] | None,
    rules: Mapping[str, Rule] | None,
    *,
    check_weights: bool,
) -> tuple[list[_Job], dict[str, SiteRecord]]:
    """Validate the plan against sites and modules; return the accepted jobs and the
    records of skipped (dense) and rejected sites. Raises on hard errors."""
    site_map = validate_plan(plan, sites)
    jobs: list[_Job] = []
    records: dict[str, SiteRecord] = {}
    for site in site_map.values():
        if site.fqn not in plan:
            continue
        decision = plan[site.fqn]
        if site.kind != "linear":  # attention sites: their forms bring their own passes
            reason = non_linear_site_reason(site, decision)
            records[site.fqn] = SiteRecord(site.fqn, decision.short(), "rejected", reason)
            continue
        before = dense_bytes(site)
        if isinstance(decision, DenseConfig):
            records[site.fqn] = SiteRecord(
                site.fqn, decision.short(), "skipped", "dense", 0.0, before, before
            )
            continue
        weight = None
        if modules is not None:
            weight = linear_weight(_dense_linear(modules, site)).detach()
            if check_weights:
                _check_finite(site, weight)
            else:
                weight = None
        rule = resolve_rule(decision, rules)
        verdict = rule if isinstance(rule, Verdict) else rule.check(site, decision, weight)
        if not verdict.ok:
            records[site.fqn] = SiteRecord(
                site.fqn, decision.short(), "rejected", verdict.reason, 0.0, before, before
            )
            continue
        assert isinstance(rule, Rule)
        jobs.append(_Job(site, decision, rule))
    return jobs, records


def _set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Put ``new`` at ``fqn``; the forward hooks registered on the module it replaces run on
    it (``ir.modules.carry_hooks``)."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    carry_hooks(getattr(parent, child), new)
    setattr(parent, child, new)


def _aliases(model: nn.Module, tensor: Tensor, own: str) -> set[str]:
    """Other parameter names of ``model`` that are the very same tensor as ``tensor``."""
    return {
        name
        for name, p in model.named_parameters(remove_duplicate=False)
        if p is tensor and name != own
    }


def untie(model: nn.Module, names: Iterable[str]) -> None:
    """Stop a Hugging Face model from re-tying ``names`` (parameter FQNs) on a later
    ``tie_weights()``: its configs get ``tie_word_embeddings = False`` and the tied-key tables
    lose the entries that mention them. Plain modules are left alone."""
    names = set(names)
    if not names:
        return
    for prefix, mod in model.named_modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None:
            for c in {id(cfg): cfg, id(_text_config(cfg)): _text_config(cfg)}.values():
                if getattr(c, "tie_word_embeddings", False):
                    c.tie_word_embeddings = False
        table = mod.__dict__.get("all_tied_weights_keys")
        if isinstance(table, dict):
            pre = f"{prefix}." if prefix else ""
            for k in [k for k, v in table.items() if f"{pre}{k}" in names or f"{pre}{v}" in names]:
                del table[k]


def _text_config(cfg: Any) -> Any:
    get = getattr(cfg, "get_text_config", None)
    try:
        return get() if callable(get) else cfg
    except Exception:  # noqa: BLE001 - configs without a text part
        return cfg


def _gram(grams: Mapping[str, Tensor | None] | None, site: LinearSite) -> Tensor | None:
    if grams is None:
        return None
    g = grams.get(site.fqn)
    return grams.get(site.group) if g is None else g


def apply_plan(
    model: nn.Module,
    plan: Plan,
    sites: Iterable[LinearSite],
    grams: Mapping[str, Tensor | None] | None = None,
    *,
    inplace: bool = False,
    strict: bool = True,
    progress: bool = False,
    rules: Mapping[str, Rule] | None = None,
    workers: int | None = None,
) -> tuple[nn.Module, PassResult]:
    """Replace every planned linear of ``model`` by the module its decision calls for.

    - ``sites``: the model's linear sites (``slimfx.ir.find``); the plan may name only these.
    - ``grams``: FQN (or group name) → input Gram matrix XᵀX (in × in, float64) for
      activation-aware decisions; missing or ``None`` means identity.
    - ``inplace=False`` rewrites a deep copy (tied weights stay tied in the copy) and leaves
      ``model`` untouched; ``True`` edits ``model`` itself.
    - ``strict=True``: any rule rejection raises ``ValueError`` listing every rejected site and
      its reason, before anything changes. ``strict=False`` records it as ``rejected`` and keeps
      that site dense.
    - ``rules``: decision kind → Rule, overriding the registered rules (e.g. a
      ``LinearToLowRank(require_savings=False)`` for full-rank checks).
    - ``workers``: sites fitted at once, one thread each (``slimfx.pool.site_pool``; default
      torch's intra-op thread count, at most 4): the same modules as a one-thread run.

    Unknown FQNs, shapes that disagree with the plan or the module, and NaN/inf weights always
    raise ``ValueError``. A rewritten site whose weight was tied to another parameter unties it:
    the other keeps the dense tensor (``extra`` records ``untied`` and ``extra_copy_bytes``).
    Returns ``(model, PassResult(name="apply_plan"))``; ``modified`` is True when a site was
    applied.
    """
    t0 = time.perf_counter()
    sites = list(sites)
    jobs, records = _plan_jobs(plan, sites, dict(model.named_modules()), rules, check_weights=True)
    rejected = [r for r in records.values() if r.status == "rejected"]
    if strict and rejected:
        raise_rejections("apply_plan", rejected)

    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    iterator: Iterable[_Job] = jobs
    if progress and jobs:
        from tqdm.auto import tqdm

        iterator = tqdm(jobs, desc="apply_plan", unit="site")
    # Build every replacement first, then swap them in: a factorization that fails leaves even
    # an in-place model as it was.
    built: list[tuple[_Job, nn.Module]] = []
    aliases: dict[str, set[str]] = {}

    def build(job: _Job) -> tuple[nn.Module, float]:
        t = time.perf_counter()
        linear = modules[job.site.fqn]
        new = job.rule.build_module(job.site, linear, job.decision, _gram(grams, job.site))
        return new, time.perf_counter() - t

    # the sites' fits run side by side, one thread each (slimfx.pool: the same numbers)
    fitted = site_pool(build, jobs, workers, key=lambda job: job.site.group)
    for job, (new, secs) in zip(iterator, fitted, strict=True):
        site, decision = job.site, job.decision
        linear = modules[site.fqn]
        aliases[site.fqn] = _aliases(target, linear.weight, site.weight) | set(site.tied)
        new.train(linear.training)
        new.requires_grad_(linear.weight.requires_grad)
        built.append((job, new))
        records[site.fqn] = SiteRecord(
            site.fqn,
            decision.short(),
            "applied",
            "",
            secs,
            dense_bytes(site),
            decision.bytes(site.site_shape, site.has_bias),
        )
    for job, new in built:
        _set_module(target, job.site.fqn, new)

    if aliases:
        still = {name for name, _ in target.named_parameters(remove_duplicate=False)}
        for fqn, names in aliases.items():
            kept = sorted(n for n in names if n in still)
            if kept:
                site = next(s for s in sites if s.fqn == fqn)
                untie(target, [site.weight, *kept])
                records[fqn].extra.update(
                    untied=kept, extra_copy_bytes=2 * site.in_features * site.out_features
                )

    order = [s.fqn for s in sites if s.fqn in records]
    result = PassResult(
        name="apply_plan",
        modified=bool(jobs),
        records=[records[f] for f in order],
        seconds=time.perf_counter() - t0,
    )
    return target, result


def empty_like_plan(
    model: nn.Module,
    plan: Plan,
    sites: Iterable[LinearSite],
    *,
    rules: Mapping[str, Rule] | None = None,
) -> nn.Module:
    """Give a freshly built ``model`` (in place) the module structure ``apply_plan`` would:
    every planned linear becomes an empty module of its decision's class and shapes, so
    ``model.load_state_dict(saved_rewritten_state_dict)`` works. Decisions a rule rejects from
    the shapes alone (which ``apply_plan(strict=False)`` would have kept dense) stay dense.
    Returns ``model``."""
    sites = list(sites)
    modules = dict(model.named_modules())
    jobs, _ = _plan_jobs(plan, sites, modules, rules, check_weights=False)
    untied: list[str] = []
    for job in jobs:
        site = job.site
        old = modules[site.fqn]
        names = _aliases(model, old.weight, site.weight) | set(site.tied)
        shell = module_for(job.decision).empty(
            job.decision,
            site.in_features,
            site.out_features,
            site.has_bias,
            old.weight.dtype,
            old.weight.device,
        )
        shell.train(old.training)
        _set_module(model, site.fqn, shell)
        if names:
            untied += [site.weight, *names]
    untie(model, untied)
    return model
