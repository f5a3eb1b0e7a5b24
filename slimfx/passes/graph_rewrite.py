"""Graph rewrite: apply a Plan to an already captured GraphModule.

    aten.linear(x, W, b)  →  rule.op_call(...)(x, *tensors, b)
    e.g.                      slimfx.lowrank_linear(x, U, V, b),  W ≈ U·V,  U, V graph constants

Works on torch.export graphs (the unlifted ``ep.module()``, parameters as ``get_attr``; or the
lifted ``ep.graph_module``, parameters as placeholders) and on dynamo graphs handed to a
``torch.compile`` backend (``torch._C._nn.linear`` with parameters as placeholders). A site's
linear node is found by, in order: the module path on the node (``meta["slimfx.fqn"]`` or the
innermost ``nn_module_stack`` entry); the weight node (a ``get_attr`` of ``site.weight`` or a
placeholder named after it, ``p_<path>`` / ``L_self_modules_…_parameters_weight_``); the node
name ``site.node``. Every edit goes through ``slimfx.ir.graph`` (fake values + provenance).

Factorization is the same ``rule.factorize`` the module swap uses, so both paths agree by
construction; ``factor_cache`` keeps a weight from being factorized twice across sub-graphs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor, fx

from slimfx.ir.graph import add_constant, finalize, node_value, replace_node
from slimfx.ir.match import LINEAR_TARGETS, linear_args, linear_nodes, node_module_path, weight_is
from slimfx.ir.sites import LinearSite
from slimfx.passes.base import PassResult, Rule, SiteRecord, non_linear_site_reason
from slimfx.passes.swap import dense_bytes, raise_rejections, resolve_rule
from slimfx.passes.validate import validate_plan
from slimfx.planning.configs import Decision, DenseConfig
from slimfx.planning.plan import Plan

__all__ = [
    "apply_plan_graph",
    "apply_plan_exported",
    "linear_nodes",
    "LINEAR_TARGETS",
    "FactorCache",
]

#: (id(dense weight), decision) → (the weight itself, its factor tensors).
FactorCache = MutableMapping[tuple[int, Decision], tuple[Tensor, dict[str, Tensor]]]


def _matches(node: fx.Node, site: LinearSite, site_fqns: frozenset[str]) -> bool:
    """Whether the linear ``node`` computes ``site``: its module path says so; or, when that
    path is unknown or names no site (a parent calling ``F.linear(x, self.child.weight)``),
    its weight node is ``site.weight``; or, with neither, its name is ``site.node``."""
    path = node_module_path(node) or None
    if path is not None and path in site_fqns:
        return path == site.fqn
    _, w, _ = linear_args(node)
    if isinstance(w, fx.Node) and w.op in ("get_attr", "placeholder"):
        return weight_is(w, site.weight)
    return path is None and site.node is not None and node.name == site.node


def _get_attr_tensor(gm: fx.GraphModule, target: str) -> Tensor | None:
    obj: Any = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if isinstance(obj, Tensor) else None


def _dense_weight(
    gm: fx.GraphModule, site: LinearSite, nodes: list[fx.Node], weights: Mapping[str, Tensor] | None
) -> Tensor:
    if weights is not None and site.fqn in weights:
        return weights[site.fqn]
    for node in nodes:
        _, w, _ = linear_args(node)
        if isinstance(w, fx.Node) and w.op == "get_attr":
            t = _get_attr_tensor(gm, str(w.target))
            if t is not None:
                return t
    raise ValueError(
        f"site {site.fqn!r}: no dense weight — its graph weight is an input, so pass "
        f"weights={{{site.fqn!r}: <tensor>}}"
    )


def _cached_factors(
    rule: Rule,
    weight: Tensor,
    decision: Decision,
    gram: Tensor | None,
    cache: FactorCache | None,
) -> tuple[dict[str, Tensor], bool]:
    """The factor tensors and whether they came from ``cache``."""
    key = (id(weight), decision)
    if cache is not None and key in cache:
        cached_weight, tensors = cache[key]
        if cached_weight is weight:  # id() of a freed tensor may be reused
            return tensors, True
    tensors = rule.factorize(weight.detach(), decision, gram)
    if cache is not None:
        cache[key] = (weight, tensors)
    return tensors, False


def apply_plan_graph(
    gm: fx.GraphModule,
    plan: Plan,
    sites: Iterable[LinearSite],
    weights: Mapping[str, Tensor] | None = None,
    grams: Mapping[str, Tensor | None] | None = None,
    *,
    strict: bool = True,
    factor_cache: FactorCache | None = None,
    rules: Mapping[str, Rule] | None = None,
) -> tuple[fx.GraphModule, PassResult]:
    """Replace the planned linears of ``gm`` (edited in place) by slimfx ops.

    - ``weights``: site FQN → dense weight tensor. Needed where the graph takes parameters
      as inputs (lifted export graphs, dynamo graphs); a ``get_attr`` weight is read from
      ``gm`` when the mapping lacks it.
    - ``grams``: FQN (or group) → input Gram matrix XᵀX (float64), ``None`` for identity.
    - ``factor_cache``: a dict shared across calls (e.g. the sub-graphs of one model);
      a (weight, decision) pair already factorized is reused, never recomputed.
    - ``strict`` / ``rules``: as in ``apply_plan``.

    A planned site with no linear node in this graph is recorded as ``skipped`` ("not in this
    graph"), since a graph-broken model spreads its sites over several graphs. Unknown FQNs,
    shapes that disagree and NaN/inf weights raise ``ValueError`` before any edit.
    The weight inputs of rewritten linears are left in place (unused).
    Returns ``(gm, PassResult(name="apply_plan_graph"))``.
    """
    t0 = time.perf_counter()
    sites = list(sites)
    site_map = validate_plan(plan, sites)
    linears = linear_nodes(gm)
    site_fqns = frozenset(site_map)
    records: dict[str, SiteRecord] = {}
    jobs: list[tuple[LinearSite, Decision, Rule, list[fx.Node], Tensor]] = []
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
                site.fqn, "dense", "skipped", "dense", 0.0, before, before
            )
            continue
        nodes = [n for n in linears if _matches(n, site, site_fqns)]
        if not nodes:
            records[site.fqn] = SiteRecord(
                site.fqn, decision.short(), "skipped", "not in this graph", 0.0, before, before
            )
            continue
        weight = _dense_weight(gm, site, nodes, weights)
        if tuple(weight.shape) != site.shape:
            raise ValueError(
                f"site {site.fqn!r}: dense weight has shape {tuple(weight.shape)} but the site "
                f"says {site.shape} (out, in)"
            )
        for node in nodes:
            wval = node_value(linear_args(node)[1])
            if isinstance(wval, Tensor) and tuple(wval.shape) != site.shape:
                raise ValueError(
                    f"site {site.fqn!r}: graph node {node.name} multiplies by a weight of shape "
                    f"{tuple(wval.shape)}, the site says {site.shape} (out, in)"
                )
        if weight.is_floating_point() and not torch.isfinite(weight).all():
            raise ValueError(
                f"parameter {site.weight!r} (site {site.fqn!r}) has NaN or inf entries; "
                "nothing was modified"
            )
        rule = resolve_rule(decision, rules)
        verdict = rule if not isinstance(rule, Rule) else rule.check(site, decision, weight)
        if not verdict.ok:
            records[site.fqn] = SiteRecord(
                site.fqn, decision.short(), "rejected", verdict.reason, 0.0, before, before
            )
            continue
        jobs.append((site, decision, rule, nodes, weight))  # type: ignore[arg-type]

    rejected = [r for r in records.values() if r.status == "rejected"]
    if strict and rejected:
        raise_rejections("apply_plan_graph", rejected)

    # Factorize everything first (the part that can fail on numerics), then edit the graph.
    factors = []
    for site, decision, rule, _, weight in jobs:
        t = time.perf_counter()
        gram = None
        if grams is not None:
            gram = grams.get(site.fqn)
            gram = grams.get(site.group) if gram is None else gram
        tensors, hit = _cached_factors(rule, weight, decision, gram, factor_cache)
        factors.append((tensors, hit, time.perf_counter() - t))

    for (site, decision, rule, nodes, _), (tensors, hit, seconds) in zip(jobs, factors):
        t = time.perf_counter() - seconds
        op, names, extra = rule.op_call(decision, tensors)
        consts = {
            name: add_constant(gm, f"slimfx_{site.fqn}_{name}", tensors[name], recompile=False)
            for name in names
            if name in tensors  # a name the form lacks (symmetric quant: zeros) passes None
        }
        origin = {"pass": "apply_plan_graph", "rule": rule.name, "site": site.fqn}
        new_names = []
        for node in nodes:
            x, _, b = linear_args(node)
            args = (x, *(consts.get(n) for n in names), b)
            new = replace_node(gm, node, op, args, extra, origin=origin, recompile=False)
            new_names.append(new.name)
        records[site.fqn] = SiteRecord(
            site.fqn,
            decision.short(),
            "applied",
            "",
            time.perf_counter() - t,
            dense_bytes(site),
            decision.bytes(site.site_shape, site.has_bias),
            {"nodes": new_names, "factor_cache_hit": hit},
        )
    if jobs:
        finalize(gm)
    order = [s.fqn for s in sites if s.fqn in records]
    return gm, PassResult(
        name="apply_plan_graph",
        modified=bool(jobs),
        records=[records[f] for f in order],
        seconds=time.perf_counter() - t0,
    )


def apply_plan_exported(
    ep: torch.export.ExportedProgram,
    plan: Plan,
    sites: Iterable[LinearSite],
    weights: Mapping[str, Tensor] | None = None,
    grams: Mapping[str, Tensor | None] | None = None,
    *,
    strict: bool = True,
    factor_cache: FactorCache | None = None,
    rules: Mapping[str, Rule] | None = None,
) -> tuple[fx.GraphModule, PassResult]:
    """Rewrite a torch.export program: runs ``apply_plan_graph`` on ``ep.module()`` (a
    runnable, unlifted GraphModule whose weights are ``get_attr`` nodes, so ``weights`` is
    optional) and returns it with the pass record. ``ep`` itself is not changed; the result
    runs eagerly and exports again with its ``slimfx::*`` ops intact."""
    gm = ep.module()
    return apply_plan_graph(
        gm, plan, sites, weights, grams, strict=strict, factor_cache=factor_cache, rules=rules
    )
