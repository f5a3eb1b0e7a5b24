"""The linear sites of a dynamo (or export) sub-graph, mapped back to the model's parameters.

Dynamo lifts parameters to graph inputs: the placeholders ``L_self_modules_fc1_parameters_
weight_`` (any name for the root), and the tensors at those positions of ``example_inputs`` are
the parameters themselves. With the model, a linear node's weight is matched to its parameter by
identity; without it, by the placeholder's spelling (mangled names such as ``L__self___fc1_weight``
or ``p_fc1_weight`` against candidate FQNs, e.g. a Plan's). The site is the module that owns the
weight (the node's own module when its ``.weight`` is that tensor, else an ``nn.Linear`` holding
it, as in ``slimfx.ir.find``); linears reading the same input node share a group. A linear whose
weight is computed in the graph, or belongs to no linear module, is left alone and reported.

Two other spellings of a linear become ``linear`` calls first, with the model
(:func:`as_linear_calls`, the same products), so the graph rewrite sees them as any other: a
transformers ``Conv1D`` (GPT-2's layers, weight stored in × out) runs ``addmm(b, x, W)`` →
``linear(x, t(W), b)`` (its site's dense weight is ``W.t()``, ``ir.match.linear_weight``); an
``nn.Linear`` subclass computing ``x @ W.T`` (Falcon's ``FalconLinear``; its bias is added
after) → ``linear(x, W)``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from slimfx.ir.capture import FQN_KEY, normalize_module_path
from slimfx.ir.graph import finalize, node_value, replace_node
from slimfx.ir.graph_linear import transposed_of
from slimfx.ir.match import (
    is_conv1d,
    linear_args,
    linear_nodes,
    node_module_path,
    weight_owner,
)
from slimfx.ir.sites import LinearSite

__all__ = ["GraphSites", "graph_linear_sites", "param_name_from_placeholder", "as_linear_calls"]

_ADDMM = (torch.addmm, torch.ops.aten.addmm.default)
_MATMUL = (torch.matmul, operator.matmul, torch.ops.aten.matmul.default)


@dataclass
class GraphSites:
    """The linear sites of one sub-graph and what the backend needs to rewrite them."""

    sites: list[LinearSite]
    weights: dict[str, Tensor]
    unresolved: list[str]  # "node: why", linears left alone
    #: module path → why a linear node run in it was left alone; such a module stays dense in
    #: this graph even when another of its linear nodes could be rewritten
    left_alone: dict[str, str]


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def param_name_from_placeholder(name: str, candidates: Iterable[str] = ()) -> str | None:
    """Parameter FQN spelled by a graph input or attribute name, or ``None``.

    ``L_self_modules_layers_modules_0_modules_fc_parameters_weight_`` → ``layers.0.fc.weight``
    (dynamo, any name for the root); mangled names (``L__self___fc1_weight``,
    ``l__self___fc1_weight``, ``p_fc1_weight``, ``fc1_weight``) are matched against
    ``candidates`` (parameter FQNs) by their ``_``-joined spelling."""
    s = name
    if "_parameters_" in s and (s.startswith("L_") or s.startswith("l_")):
        body = s[2:].rstrip("_")
        head, _, pname = body.rpartition("_parameters_")
        parts = head.split("_modules_")
        return ".".join([*parts[1:], pname]) if len(parts) > 1 else pname
    mangled = s
    for prefix in ("L__self___", "l__self___", "L__self__", "l__self__", "p_"):
        if mangled.startswith(prefix):
            mangled = mangled[len(prefix) :]
            break
    by_spelling = {c.replace(".", "_"): c for c in candidates}
    return by_spelling.get(mangled)


def _input_tensor(gm: fx.GraphModule, node: Any, inputs: dict[fx.Node, Any]) -> Any:
    """The tensor a placeholder or ``get_attr`` node stands for (``None`` for other nodes)."""
    if isinstance(node, fx.Node) and node.op == "placeholder":
        return inputs.get(node)
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return _attr(gm, str(node.target))
    return None


def as_linear_calls(
    gm: fx.GraphModule, inputs: dict[fx.Node, Any], modules: dict[str, nn.Module]
) -> int:
    """Rewrite each ``addmm(b, x, W)`` whose ``W`` is a ``Conv1D`` module's weight into
    ``linear(x, t(W), b)``, and each ``matmul(x, W.T)`` / ``addmm(b, x, W.T)`` whose ``W`` is
    an ``nn.Linear`` (subclass) module's weight into ``linear(x, W[, b])`` (weights looked up by identity in
    ``modules``); returns how many. ``gm`` is edited in place, recompiled when anything
    changed."""
    conv = {id(m.weight) for m in modules.values() if is_conv1d(m)}
    lin = {id(m.weight) for m in modules.values() if isinstance(m, nn.Linear)}
    done = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_function"]:
        if node.target in _ADDMM and len(node.args) == 3 and not node.kwargs:  # no beta / alpha
            b, x, w = node.args
            if id(_input_tensor(gm, w, inputs)) not in conv:
                wl = transposed_of(w)  # addmm(b, x, W.T) in an nn.Linear subclass
                if wl is None or id(_input_tensor(gm, wl, inputs)) not in lin:
                    continue
                args, rule = (x, wl, b), "addmm(b, x, W.T)"
            else:
                with gm.graph.inserting_before(node):
                    wt = gm.graph.call_function(torch.t, (w,))
                val = node_value(w)
                if isinstance(val, Tensor):
                    wt.meta["val"] = wt.meta["example_value"] = val.t()
                args, rule = (x, wt, b), "Conv1D"
        elif node.target in _MATMUL and len(node.args) == 2 and not node.kwargs:
            x, wt = node.args
            w = transposed_of(wt)
            if w is None or id(_input_tensor(gm, w, inputs)) not in lin:
                continue
            args, rule = (x, w), "x @ W.T"
        else:
            continue
        path = node_module_path(node, modules) or ""
        replace_node(
            gm, node, torch._C._nn.linear, args,
            origin={"pass": "as_linear_calls", "rule": rule, "site": path}, recompile=False,
        )  # fmt: skip
        done += 1
    if done:
        finalize(gm)
    return done


def graph_linear_sites(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    model: nn.Module | None = None,
    candidates: Iterable[str] = (),
) -> GraphSites:
    """The linear sites of ``gm`` (a dynamo or export graph), one per owning module, in graph
    order, with the dense weight tensors to factorize; stamps ``meta["slimfx.fqn"]`` (the
    owner) on every resolved linear node. ``candidates``: parameter FQNs that mangled names
    may spell (used without ``model``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = {n: example_inputs[i] for i, n in enumerate(placeholders) if i < len(example_inputs)}
    names: dict[int, list[str]] = {}
    modules: dict[str, nn.Module] = {}
    if model is not None:
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        modules = dict(model.named_modules())
        as_linear_calls(gm, inputs, modules)
    candidates = list(candidates)

    found: dict[str, dict[str, Any]] = {}
    unresolved: list[tuple[fx.Node, str]] = []
    for node in linear_nodes(gm):
        x, w, b = linear_args(node)
        in_out = isinstance(w, fx.Node) and w.op == "call_function" and w.target is torch.t
        if in_out:  # a Conv1D's weight, turned by as_linear_calls
            w = w.args[0]
        tensor = _input_tensor(gm, w, inputs)
        spelled = str(w.target) if tensor is not None else None
        if not isinstance(tensor, Tensor) or tensor.dim() != 2:
            what = w.op if isinstance(w, fx.Node) else type(w).__name__
            unresolved.append((node, f"weight is not a graph input or attribute ({what})"))
            continue
        if model is not None:
            aliases = names.get(id(tensor), [])
            if not aliases:
                unresolved.append((node, f"weight {spelled} is not a parameter of the model"))
                continue
            owner = weight_owner(modules, node, tensor, aliases)
            tied = tuple(a for a in aliases if a != (f"{owner}.weight" if owner else "weight"))
        else:
            pname = param_name_from_placeholder(spelled or "", candidates)
            owner = pname.rpartition(".")[0] if pname and pname.endswith("weight") else None
            if pname == "weight":
                owner = ""
            tied = ()
        if owner is None:
            unresolved.append((node, f"no linear module owns weight {spelled}"))
            continue
        if in_out and not (model is not None and is_conv1d(modules.get(owner))):
            unresolved.append((node, f"weight {spelled} enters transposed (not a Conv1D's)"))
            continue
        entry = found.setdefault(
            owner,
            {"tensor": tensor, "bias": b is not None, "x": x, "node": node.name, "tied": tied,
             "in_out": in_out},
        )  # fmt: skip
        if entry["tensor"] is not tensor:
            unresolved.append((node, f"module {owner!r} multiplies by two different weights"))
            continue
        node.meta[FQN_KEY] = owner
    for node in gm.graph.nodes:  # dynamo without inlined nn modules keeps nn.Linear calls
        if node.op == "call_module" and isinstance(_attr(gm, str(node.target)), nn.Linear):
            node.meta.setdefault(
                "slimfx.left_alone_path", normalize_module_path(str(node.target), modules or None)
            )
            unresolved.append(
                (
                    node,
                    "nn.Linear called as a submodule (call_module): only linear calls on "
                    "parameters are rewritten (torch._dynamo.config.inline_inbuilt_nn_modules)",
                )
            )

    first_of: dict[Any, str] = {}
    sites = []
    for fqn, e in found.items():
        group = first_of.setdefault(e["x"], fqn)
        out_f, in_f = e["tensor"].t().shape if e["in_out"] else e["tensor"].shape
        sites.append(
            LinearSite(
                fqn=fqn,
                in_features=int(in_f),
                out_features=int(out_f),
                dtype=str(e["tensor"].dtype),
                has_bias=e["bias"],
                weight=f"{fqn}.weight" if fqn else "weight",
                group=group,
                tied=e["tied"],
                node=e["node"],
            )
        )
    left_alone: dict[str, str] = {}
    for node, why in unresolved:
        path = (
            node.meta.get(FQN_KEY)
            or node.meta.get("slimfx.left_alone_path")
            or node_module_path(node)
        )
        if path:
            left_alone.setdefault(path, f"linear node {node.name} left alone: {why}")
    return GraphSites(
        sites=sites,
        weights={fqn: e["tensor"].t() if e["in_out"] else e["tensor"] for fqn, e in found.items()},
        unresolved=[f"{n.name}: {why}" for n, why in unresolved],
        left_alone=left_alone,
    )
