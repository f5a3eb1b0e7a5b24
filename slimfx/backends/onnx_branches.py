"""Exported choices made lazy: each ``slimfx.branch::OneTokenOr`` marker becomes an ONNX ``If``.

A low-rank KV layer attends one-token calls absorbed and longer calls over rebuilt values
(:class:`~slimfx.forms.kv.lowrank.LowRankKVAttention`). In an exported step graph the call
length is symbolic, so both paths are traced as plain code and ``slimfx::one_token_or`` picks
one (tracing a ``torch.cond`` over them took twice as long, per layer). Translated, the pick is
a marker ``OneTokenOr(cond, one, more)`` with both paths computed before it; :func:`lazy_branches`
moves the nodes that only one path needs into that branch of an ``If`` on ``cond``, so ONNX
Runtime runs the chosen path alone. Nodes both paths (or anything else) read stay outside and
run once; a branch reads them from the enclosing graph, as ONNX subgraphs may.

A node moves into a branch when every consumer of each of its outputs is a node that moves
too, or the marker through that branch's input, and none of its outputs is a graph output.
Computed in reverse graph order (the graph is topologically sorted, consumers come later), so
a node's consumers are decided before it.
"""

from __future__ import annotations

from typing import Any

from slimfx.backends.onnx_ops import BRANCH_DOMAIN

__all__ = ["lazy_branches"]


def _ancestors(value: Any) -> set[Any]:
    """Every node ``value`` depends on within its graph (subgraph reads not followed)."""
    seen: set[Any] = set()
    todo = [value.producer()]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo += [v.producer() for v in node.inputs if v is not None]
    return seen


def _exclusive(order: list[Any], value: Any, marker: Any, slot: int) -> list[Any]:
    """The nodes only ``value``'s path needs, in graph order: ``value`` reaches the rest of
    the graph through input ``slot`` of ``marker`` alone."""
    ancestors = _ancestors(value)
    own: set[Any] = set()

    def only_here(node: Any) -> bool:
        for out in node.outputs:
            if out.is_graph_output():
                return False
            for user, idx in out.uses():  # a subgraph's reader is never in ``own``
                if user not in own and not (user is marker and idx == slot):
                    return False
        return True

    for node in reversed(order):  # ancestors of a main-graph value are main-graph nodes
        if node in ancestors and only_here(node):
            own.add(node)
    return [n for n in order if n in own]


def _branch(name: str, nodes: list[Any], value: Any) -> Any:
    import onnx_ir as ir

    graph = nodes[0].graph if nodes else None
    for n in nodes:
        graph.remove(n)
    if value.producer() not in nodes:  # computed outside (shared): the branch passes it on
        ident = ir.Node("", "Identity", [value], num_outputs=1)
        ident.outputs[0].name = f"{value.name}_{name}"
        ident.outputs[0].type, ident.outputs[0].shape = value.type, value.shape
        nodes = [*nodes, ident]
        value = ident.outputs[0]
    return ir.Graph([], [value], nodes=nodes, name=name)


def lazy_branches(model: Any) -> int:
    """Replace every ``OneTokenOr`` marker of ``model`` (an ``onnx_ir.Model``) by an ``If``
    whose branches compute what only that path needs; returns how many."""
    import onnx_ir as ir

    graph = model.graph
    markers = [n for n in graph if n.domain == BRANCH_DOMAIN]
    for k, marker in enumerate(markers):
        cond, one, more = marker.inputs
        order = list(graph)
        own_one = _exclusive(order, one, marker, 1)
        own_more = _exclusive(order, more, marker, 2)
        then_g = _branch(f"one_token_{k}", own_one, one)
        else_g = _branch(f"more_tokens_{k}", own_more, more)
        node = ir.Node(
            "", "If", [cond], num_outputs=1,
            attributes=[ir.AttrGraph("then_branch", then_g), ir.AttrGraph("else_branch", else_g)],
        )  # fmt: skip
        out = marker.outputs[0]
        node.outputs[0].type, node.outputs[0].shape = out.type, out.shape
        graph.insert_before(marker, node)
        out.replace_all_uses_with(node.outputs[0], replace_graph_outputs=True)
        node.outputs[0].name = out.name
        graph.remove(marker, safe=True)
    model.opset_imports.pop(BRANCH_DOMAIN, None)
    return len(markers)
