"""Verifier: ``graph.lint()`` plus slimfx invariants, as a table of (predicate, message).

Each :class:`Invariant` is checked on every node of the graph module and of its nested graph
modules (higher-order-op subgraphs). ``verify`` collects every failure and raises one
:class:`VerificationError` listing them all, so a broken pass shows its whole damage at once.
Other layers may append to :data:`INVARIANTS`.

The table: every call_function node has a fake value (``meta["val"]``; dynamo graphs carry
``meta["example_value"]``); every ``slimfx::*`` node has ``meta["slimfx.origin"]`` with
pass/rule/site and a tensor value; every get_attr resolves on the module; ``meta["slimfx.fqn"]``
is a string where present.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from slimfx.ir.capture import FQN_KEY, ORIGIN_KEY, is_slimfx_op

__all__ = ["ORIGIN_KEY", "Invariant", "INVARIANTS", "VerificationError", "verify", "is_slimfx_op"]

_ORIGIN_FIELDS = ("pass", "rule", "site")


class VerificationError(RuntimeError):
    """A graph broke one or more invariants; ``failures`` lists one line per broken one."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = list(failures)
        lines = "\n".join(f"  - {f}" for f in self.failures)
        super().__init__(f"graph verification failed ({len(self.failures)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class Invariant:
    """``check(node, gm)`` is True when ``node`` (of graph module ``gm``) is fine.

    ``message`` is formatted with ``node`` (its name) and ``target``.
    """

    name: str
    check: Callable[[fx.Node, fx.GraphModule], bool]
    message: str


def _value(node: fx.Node) -> object:
    # torch.export writes meta["val"]; dynamo graphs (torch.compile backend) "example_value".
    return node.meta.get("val", node.meta.get("example_value"))


def _has_val(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op != "call_function" or "val" in node.meta or "example_value" in node.meta


def _has_origin(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op != "call_function" or not is_slimfx_op(node.target):
        return True
    origin = node.meta.get(ORIGIN_KEY)
    return isinstance(origin, dict) and all(k in origin for k in _ORIGIN_FIELDS)


def _get_attr_resolves(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op != "get_attr":
        return True
    obj: object = gm
    for part in str(node.target).split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _fqn_is_str(node: fx.Node, gm: fx.GraphModule) -> bool:
    return FQN_KEY not in node.meta or isinstance(node.meta[FQN_KEY], str)


def _slimfx_val_is_tensor(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op != "call_function" or not is_slimfx_op(node.target):
        return True
    return isinstance(_value(node), torch.Tensor)


INVARIANTS: list[Invariant] = [
    Invariant(
        "val",
        _has_val,
        "call_function node {node} ({target}) has no meta['val'] (fake value; dynamo graphs: "
        "meta['example_value']); a pass created it without propagating meta",
    ),
    Invariant(
        "origin",
        _has_origin,
        "slimfx op node {node} ({target}) has no meta['slimfx.origin'] dict with keys "
        "pass/rule/site; rewrite through the graph-editing helper",
    ),
    Invariant(
        "get_attr",
        _get_attr_resolves,
        "get_attr node {node} points at {target!r}, which the graph module does not have",
    ),
    Invariant("fqn", _fqn_is_str, "node {node} has a non-string meta['slimfx.fqn']"),
    Invariant(
        "slimfx_val",
        _slimfx_val_is_tensor,
        "slimfx op node {node} ({target}) has a meta['val'] that is not a tensor",
    ),
]


def verify(gm: fx.GraphModule, invariants: list[Invariant] | None = None) -> None:
    """Lint ``gm`` and check every invariant on every node; raise one error listing all failures.

    ``invariants`` defaults to :data:`INVARIANTS`.
    """
    table = INVARIANTS if invariants is None else invariants
    failures: list[str] = []
    for path, sub in gm.named_modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        where = f"[{path}] " if path else ""
        try:
            sub.graph.lint()
        except Exception as exc:  # noqa: BLE001 - lint failures are reported with the rest
            failures.append(f"{where}graph.lint(): {exc}")
        for node in sub.graph.nodes:
            for inv in table:
                try:
                    ok = inv.check(node, sub)
                except Exception as exc:  # noqa: BLE001 - a crashing predicate is a failure too
                    failures.append(f"{where}{inv.name}: check crashed on {node.name}: {exc!r}")
                    continue
                if not ok:
                    msg = inv.message.format(node=node.name, target=node.target)
                    failures.append(f"{where}{inv.name}: {msg}")
    if failures:
        raise VerificationError(failures)
