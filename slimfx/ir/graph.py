"""The one graph-editing helper: every slimfx rewrite of a GraphModule goes through here.

``replace_node`` swaps one node for a call to another op and keeps the graph honest: the new
node gets a fake value (``meta["val"]``, from the op's fake implementation run on the
arguments' fake values), the module path it came from (``meta["slimfx.fqn"]``) and its
provenance (``meta["slimfx.origin"] = {"pass", "rule", "site"}``). ``add_constant`` registers a
tensor on the module and reads it with a ``get_attr`` node at the start of the graph.

Both leave the graph linted and the module recompiled unless told ``recompile=False`` (a pass
that makes many edits calls :func:`finalize` once at the end).
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from slimfx.ir.capture import FQN_KEY
from slimfx.ir.verify import ORIGIN_KEY

__all__ = ["replace_node", "add_constant", "finalize", "fake_mode_of", "node_value", "ORIGIN_KEY"]

_ORIGIN_FIELDS = ("pass", "rule", "site")
#: meta entries that say where a node came from; copied onto its replacement. (Not
#: ``source_fn_stack`` / ``torch_fn``: the new node no longer computes that function.)
_COPIED_META = ("nn_module_stack", "stack_trace", "from_node")


def node_value(node: Any) -> Any:
    """The example value of ``node``: ``meta["val"]`` (export) or ``meta["example_value"]``
    (dynamo); non-nodes are returned as they are."""
    if isinstance(node, fx.Node):
        if "val" in node.meta:
            return node.meta["val"]
        return node.meta.get("example_value")
    return node


def fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode | None:
    """The FakeTensorMode the graph's fake values were made under, if any."""
    for node in gm.graph.nodes:
        val = node_value(node)
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return None


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint the graph and regenerate the module's code after edits."""
    gm.graph.lint()
    gm.recompile()
    return gm


def _fake_args(
    args: Sequence[Any], kwargs: Mapping[str, Any], mode: FakeTensorMode
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Arguments with nodes replaced by their fake values; ``None`` when one has none."""
    missing = False

    def conv(a: Any) -> Any:
        nonlocal missing
        if isinstance(a, fx.Node):
            v = node_value(a)
            if v is None:
                missing = True
                return None
            a = v
        if isinstance(a, FakeTensor):
            return a if a.fake_mode is mode else mode.from_tensor(a)
        if isinstance(a, Tensor):
            return mode.from_tensor(a)
        return a

    fa = fx.node.map_aggregate(tuple(args), conv)
    fk = fx.node.map_aggregate(dict(kwargs), conv)
    return None if missing else (fa, fk)  # type: ignore[return-value]


def _same_layout(a: Any, b: Any) -> bool:
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.dtype == b.dtype
        and a.device == b.device
        and tuple(a.shape) == tuple(b.shape)
    )


def _derive_val(
    gm: fx.GraphModule, target: Any, args: Sequence[Any], kwargs: Mapping[str, Any], old: Any
) -> Any:
    """Fake output of ``target`` on the arguments' fake values (the old node's value when it
    has the same shape, dtype and device: that keeps symbolic sizes shared with the rest of the
    graph). Falls back to the old value when the arguments carry no fake values."""
    mode = fake_mode_of(gm)
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    converted = _fake_args(args, kwargs, mode)
    if converted is None:
        return old
    fa, fk = converted
    with mode:
        new = target(*fa, **fk)
    if old is not None and _same_layout(new, old):
        return old
    return new


def replace_node(
    gm: fx.GraphModule,
    node: fx.Node,
    target: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    origin: Mapping[str, str],
    recompile: bool = True,
) -> fx.Node:
    """Insert ``call_function(target, args, kwargs)`` before ``node``, route every use of
    ``node`` to it, erase ``node`` and return the new node.

    ``origin`` must name ``pass``, ``rule`` and ``site``; it is stored as
    ``meta["slimfx.origin"]``. The new node's ``meta["val"]`` is derived by running the op's
    fake implementation (a shape error in the rewrite therefore surfaces here, at edit time);
    ``meta["slimfx.fqn"]`` and the module stack / stack trace are copied from ``node``.
    """
    missing = [k for k in _ORIGIN_FIELDS if k not in origin]
    if missing:
        raise ValueError(f"origin must name {_ORIGIN_FIELDS}; missing {missing}")
    if node.graph is not gm.graph:
        raise ValueError(f"node {node.name} does not belong to this graph module")
    kwargs = dict(kwargs or {})
    old_val = node_value(node)
    val = _derive_val(gm, target, args, kwargs, old_val)

    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, tuple(args), kwargs)
    for key in _COPIED_META:
        if key in node.meta:
            new.meta[key] = node.meta[key]
    if val is not None:
        new.meta["val"] = val
        if "example_value" in node.meta:  # a dynamo graph: keep its own key too
            new.meta["example_value"] = val
        if isinstance(val, Tensor) and "tensor_meta" in node.meta:
            from torch.fx.passes.shape_prop import _extract_tensor_metadata

            new.meta["tensor_meta"] = _extract_tensor_metadata(val)
    fqn = node.meta.get(FQN_KEY, origin["site"])
    new.meta[FQN_KEY] = fqn
    new.meta[ORIGIN_KEY] = {k: str(origin[k]) for k in _ORIGIN_FIELDS}

    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    if recompile:
        finalize(gm)
    return new


_UNSAFE = re.compile(r"[^0-9a-zA-Z_]")


def _safe_name(name: str) -> str:
    s = _UNSAFE.sub("_", name) or "_const"
    if s[0].isdigit() or keyword.iskeyword(s):
        s = "_" + s
    return s


def add_constant(
    gm: fx.GraphModule, name: str, tensor: Tensor, *, recompile: bool = True
) -> fx.Node:
    """Register ``tensor`` as a buffer of ``gm`` under a unique, FX-safe version of ``name``
    and return a ``get_attr`` node reading it, placed before the first computing node.

    The node's ``meta["val"]`` is a fake tensor of the graph's fake mode (or a fresh one).
    """
    base = _safe_name(name)
    taken = {n.name for n in gm.graph.nodes} | {str(n.target) for n in gm.graph.nodes}
    attr, i = base, 0
    while hasattr(gm, attr) or attr in taken:
        i += 1
        attr = f"{base}_{i}"
    gm.register_buffer(attr, tensor.detach())

    anchor = next((n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr")), None)
    if anchor is None:  # pragma: no cover - a graph always ends with an output node
        raise ValueError("graph has no output node")
    with gm.graph.inserting_before(anchor):
        node = gm.graph.get_attr(attr)
    mode = fake_mode_of(gm) or FakeTensorMode(allow_non_fake_inputs=True)
    node.meta["val"] = mode.from_tensor(getattr(gm, attr), static_shapes=True)
    if recompile:
        finalize(gm)
    return node
