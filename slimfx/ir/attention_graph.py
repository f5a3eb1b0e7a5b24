"""Attention sites found in the captured graph: each scaled-dot-product-attention node traced back
to the linear sites that make its queries, keys and values and forward to the one that reads its
output.

Backwards, the trace walks through whatever lies between a projection and the attention —
views and transposes, RoPE (``mul``/``add``/``cat``/``neg``/slices with cos/sin), a per-head q/k
norm, GQA's ``expand``/``reshape`` of keys and values — and stops at the first linear site on
each path (cos/sin, masks and positions reach no linear). Forwards, it walks through views and
transposes to the linear that reads the attention output. A node whose q, k, v and output do not
each reach exactly one linear site is not a site; the reason is returned.

Heads and head_dim come from the node's fake tensors (``q``: ``(B, H, T, D)``); kv-heads from
k_proj's width. Where the projections sit in a Hugging Face attention module, RoPE, sliding
window, layer index and q/k norm come from that module (``ir.find.describe_attention``), so a
graph site equals the module-level one; elsewhere they are unknown (``rope_dim=0``).
"""

from __future__ import annotations

import operator
from collections import deque
from typing import Any

import torch
from torch import fx, nn

from slimfx.ir.capture import Captured
from slimfx.ir.match import LINEAR_TARGETS, node_module_path
from slimfx.ir.sites import AttentionSite, LinearSite

__all__ = ["find_graph_attention_sites", "SDPA_TARGETS"]

SDPA_TARGETS = frozenset(
    {
        torch.ops.aten.scaled_dot_product_attention.default,
        torch.nn.functional.scaled_dot_product_attention,
    }
)
_VIEW_NAMES = frozenset(
    {"view", "reshape", "transpose", "permute", "contiguous", "clone", "_unsafe_view", "flatten"}
)
_MAX_STEPS = 400  # nodes visited per backward trace (an attention block has a few dozen)


def _op_name(node: fx.Node) -> str:
    t = node.target
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0]


def _back(start: Any, linear_of: dict[str, str]) -> set[str]:
    """Linear-site fqns first reached walking back from ``start`` (not through a linear)."""
    found: set[str] = set()
    if not isinstance(start, fx.Node):
        return found
    seen, todo = {start}, deque([start])
    while todo and len(seen) < _MAX_STEPS:
        n = todo.popleft()
        if n.op == "call_function" and n.target in LINEAR_TARGETS:
            if n.name in linear_of:
                found.add(linear_of[n.name])
            continue
        for a in [*n.args, *n.kwargs.values()]:
            for x in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(x, fx.Node) and x not in seen:
                    seen.add(x)
                    todo.append(x)
    return found


def _forward(node: fx.Node, linear_of: dict[str, str]) -> set[str]:
    """Linear-site fqns reading ``node``'s output through views and transposes only."""
    found: set[str] = set()
    todo = deque([node])
    while todo:
        n = todo.popleft()
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target in LINEAR_TARGETS:
                if u.name in linear_of:
                    found.add(linear_of[u.name])
            elif _op_name(u) in _VIEW_NAMES or u.target is operator.getitem:
                todo.append(u)
    return found


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(d) for d in val.shape) if val is not None and hasattr(val, "shape") else None


def find_graph_attention_sites(
    captured: Captured, model: nn.Module, linear_sites: list[LinearSite]
) -> tuple[list[AttentionSite], dict[str, str]]:
    """``(sites, rejected)``: an ``AttentionSite`` per attention node of ``captured`` whose
    q/k/v/o trace to one linear site each (module docstring), and per other attention node
    (by node name) why not. Empty when the capture fell back to module-level discovery."""
    from slimfx.ir.find import describe_attention

    if captured.method != "export" or captured.program is None:
        return [], {}
    params = dict(captured.program.graph_signature.inputs_to_parameters)
    by_weight = {s.weight: s.fqn for s in linear_sites}
    linear_of = {  # every call of a site's linear (a module may be called twice)
        n.name: by_weight[params[w.name]]
        for n in captured.program.graph.nodes
        if n.op == "call_function"
        and n.target in LINEAR_TARGETS
        and isinstance(w := n.args[1], fx.Node)
        and params.get(w.name) in by_weight
    }
    by_fqn = {s.fqn: s for s in linear_sites}
    modules = dict(model.named_modules())
    sites: list[AttentionSite] = []
    rejected: dict[str, str] = {}
    for node in captured.program.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        q, k, v = (node.args[i] if len(node.args) > i else None for i in range(3))
        roles = {"q": _back(q, linear_of), "k": _back(k, linear_of), "v": _back(v, linear_of)}
        roles["o"] = _forward(node, linear_of)
        bad = {r: sorted(f) for r, f in roles.items() if len(f) != 1}
        qshape = _shape(q)
        if bad or qshape is None or len(qshape) != 4:
            why = ", ".join(f"{r} reaches {f or 'no linear site'}" for r, f in bad.items())
            why = why or "the query has no (batch, heads, tokens, head_dim) shape"
            path = node_module_path(node, modules)  # the module it ran in, where known
            rejected[node.name if path is None else f"{node.name} in {path}"] = why
            continue
        proj = {r: next(iter(f)) for r, f in roles.items()}
        heads, head_dim = qshape[1], qshape[3]
        kv_heads = by_fqn[proj["k"]].out_features // head_dim
        parent = proj["q"].rpartition(".")[0]
        hf = describe_attention(modules[parent], parent) if parent in modules else None
        if isinstance(hf, AttentionSite) and dict(hf.projections) == proj:
            sites.append(hf)
            continue
        sites.append(
            AttentionSite(
                fqn=parent,
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                causal=bool(node.kwargs.get("is_causal", False))
                or (len(node.args) > 5 and bool(node.args[5])),
                projections=tuple(proj.items()),
                hidden_size=by_fqn[proj["q"]].in_features,
                module_type=type(modules[parent]).__name__ if parent in modules else None,
            )
        )
    return sites, rejected
