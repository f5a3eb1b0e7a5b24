"""The one graph matcher: which nodes compute a linear, with what, in which module.

Every graph consumer — the site finder (``ir.find``), the graph rewrite
(``passes.graph_rewrite``), the torch.compile backend's site mapping
(``backends.graph_sites``), the Triton lowering and the ONNX export — reads a graph through
these functions::

    aten.linear(x, W, b) | torch._C._nn.linear(x, W, b) | F.linear(x, W, b)
        linear_nodes(gm)          the nodes, in graph order
        linear_args(node)         (x, W, b), by position or keyword
        node_module_path(node)    the module the node ran in (meta["slimfx.fqn"], else the
                                  innermost nn_module_stack entry, dynamo's root stripped)
        weight_is(W, "a.b.weight") whether the W node is that parameter (get_attr, a lifted
                                  export placeholder p_a_b_weight, a dynamo placeholder)
        weight_owner(...)         the module owning this use of a weight tensor
        linear_weight(module)     a linear module's weight as out × in (a transformers
                                  ``Conv1D`` — GPT-2's layers — stores it in × out and runs
                                  ``addmm(b, x, W)``; ``is_conv1d`` tells it apart)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from slimfx.ir.capture import FQN_KEY, normalize_module_path

__all__ = [
    "LINEAR_TARGETS",
    "linear_nodes",
    "linear_args",
    "node_module_path",
    "weight_is",
    "weight_owner",
    "is_conv1d",
    "is_linear_module",
    "linear_weight",
]

#: call_function targets that compute ``x Wᵀ + b``.
LINEAR_TARGETS: frozenset[Any] = frozenset(
    {torch.ops.aten.linear.default, torch._C._nn.linear, torch.nn.functional.linear}
)

_DYNAMO_ROOT = re.compile(r"^L\[\s*['\"]\w+['\"]\s*\]\.?")


def linear_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The linear call nodes of ``gm`` (not of nested sub-graphs), in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_TARGETS]


def linear_args(node: fx.Node) -> tuple[Any, Any, Any]:
    """``(x, weight, bias)`` of a linear call, whether passed by position or keyword."""
    a, k = node.args, node.kwargs
    x = a[0] if len(a) > 0 else k.get("input")
    w = a[1] if len(a) > 1 else k.get("weight")
    b = a[2] if len(a) > 2 else k.get("bias")
    return x, w, b


def node_module_path(node: fx.Node, modules: Mapping[str, nn.Module] | None = None) -> str | None:
    """The module path a node ran in: ``meta["slimfx.fqn"]``, else the innermost
    ``nn_module_stack`` entry with the dynamo root (``L['self']`` / ``L['<any name>']``)
    stripped and normalized (against ``modules`` when given, which resolves mangled
    spellings); ``None`` when the graph does not say. The root module is ``""``."""
    fqn = node.meta.get(FQN_KEY)
    if isinstance(fqn, str):
        return fqn
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    value = list(stack.values())[-1]
    path = value[0] if isinstance(value, tuple) else str(value)
    return normalize_module_path(_DYNAMO_ROOT.sub("", path, count=1), dict(modules or {}) or None)


def weight_is(node: Any, weight_fqn: str) -> bool:
    """Whether ``node`` (a get_attr or placeholder) is the parameter ``weight_fqn``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return str(node.target) == weight_fqn
    if node.op != "placeholder":
        return False
    *mods, pname = weight_fqn.split(".")
    target = str(node.target)
    if target == "p_" + weight_fqn.replace(".", "_"):  # torch.export (lifted)
        return True
    # dynamo: L_<self arg name>_modules_<m1>_modules_<m2>_parameters_<name>_
    suffix = "".join(f"_modules_{m}" for m in mods) + f"_parameters_{pname}_"
    m = re.fullmatch(r"L_(\w+?)" + re.escape(suffix), target)
    return bool(m) and "_modules_" not in m.group(1) and "_parameters_" not in m.group(1)


def is_conv1d(module: Any) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (GPT-2, GPT-2-derived models): a linear
    whose weight is stored in × out (``nf`` outputs) and applied as ``addmm(b, x, W)``."""
    w = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(w, Tensor)
        and w.dim() == 2
        and w.shape[1] == module.nf
    )


def is_linear_module(module: Any) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D``: the modules a linear site may be."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> Tensor:
    """The weight of a linear module as out × in (a view, not a copy): ``module.weight``, or
    its transpose for a ``Conv1D``. Every reader of a site's weight values goes through this;
    identity checks (ties, aliases) keep using ``module.weight``."""
    w = module.weight
    return w.t() if is_conv1d(module) else w


def _has_2d_weight(module: nn.Module | None, tensor: Tensor) -> bool:
    w = getattr(module, "weight", None)
    return w is tensor and isinstance(w, Tensor) and w.dim() == 2


def weight_owner(
    modules: Mapping[str, nn.Module], node: fx.Node, tensor: Tensor, names: Iterable[str]
) -> str | None:
    """The module that owns this use of ``tensor`` (a weight the linear ``node`` multiplies by).

    The node's own module when its 2-D ``.weight`` is ``tensor`` (an ``nn.Linear`` or a module
    calling ``F.linear(x, self.weight)``); else an ``nn.Linear`` whose weight is that tensor,
    looked up by ``names`` (the parameter FQNs ``tensor`` is known by). A weight borrowed from
    another kind of module (an embedding used as the output projection inside a parent's
    forward) has no owner: ``None``.
    """
    path = node_module_path(node, modules)
    if path is not None and _has_2d_weight(modules.get(path), tensor):
        return path
    for name in names:
        if name == "weight" or name.endswith(".weight"):
            cand = name.rpartition(".")[0]
            mod = modules.get(cand)
            if is_linear_module(mod) and mod.weight is tensor:
                return cand
    return None
