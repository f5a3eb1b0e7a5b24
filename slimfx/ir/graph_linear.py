"""How a linear looks in an exported graph, and what else a linear's module may compute there.

``match_linear`` is the one reading of a node as x·Wᵀ (+b) for the site finder
(``ir.find.find_linear_sites``)::

    aten.linear(x, W, b?)                      W a parameter
    aten.mm(x', aten.t(W))                     x' = view(x)   (decomposed graphs)
    aten.addmm(b, x', aten.permute(W, [1, 0]))
    aten.addmm(b, x', W)                       W of a transformers Conv1D (stored in × out)
    aten.matmul(x, W.T)                        in an nn.Linear subclass (Falcon's FalconLinear;
                                               its bias, if any, is added after)

Two checks decide which found sites the module swap may replace: ``wider_than_linear`` (a
module whose forward computes more than its product and its own bias — a MoE router) and
``graph_weight_readers`` (a weight the graph reads outside its module's call — MHA's
``out_proj``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimfx.ir.capture import FQN_KEY, Captured
from slimfx.ir.match import is_conv1d
from slimfx.ir.sites import LinearSite

__all__ = [
    "match_linear", "transposed_of", "adds_own_bias", "wider_than_linear",
    "graph_weight_readers",
]  # fmt: skip

_aten = torch.ops.aten
_LINEAR = {_aten.linear.default}
_MM = {_aten.mm.default}
_MATMUL = {_aten.matmul.default}
_ADDMM = {_aten.addmm.default}
_VIEWS = {_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default}


def _param_of(node: Any, params: dict[str, str]) -> str | None:
    """Parameter FQN when ``node`` is a lifted parameter placeholder."""
    if isinstance(node, torch.fx.Node) and node.op == "placeholder":
        return params.get(node.name)
    return None


_T_FUNCTIONS = (torch.t, _aten.t.default, _aten.numpy_T.default)
_TRANSPOSE = ("transpose", torch.transpose, _aten.transpose.int)
_PERMUTE = ("permute", torch.permute, _aten.permute.default)


def transposed_of(node: Any) -> Any:
    """``W`` when ``node`` is its 2-D transpose, in an export or a dynamo graph: ``t(W)``,
    ``W.T``, ``W.mT``, ``W.t()``, ``W.transpose(0, 1)``, ``W.permute(1, 0)`` (aten op, torch
    function or method); else ``None``."""
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    if not node.args:
        return None
    w, rest, t = node.args[0], tuple(node.args[1:]), node.target
    dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    mod2 = [d % 2 for d in dims] if all(isinstance(d, int) for d in dims) else []
    if t is getattr:
        return w if rest in (("T",), ("mT",)) else None
    if t in _T_FUNCTIONS or (t == "t" and not rest):
        return w
    if t in _TRANSPOSE and sorted(mod2) == [0, 1]:
        return w
    if t in _PERMUTE and mod2 == [1, 0]:
        return w
    return None


def _transposed_param(node: Any, params: dict[str, str]) -> str | None:
    """Parameter FQN when ``node`` is the 2-D transpose of a lifted parameter."""
    return _param_of(transposed_of(node), params)


def _strip_views(node: Any) -> Any:
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node


def match_linear(
    node: torch.fx.Node, params: dict[str, str]
) -> tuple[str, Any, bool | None, bool] | None:
    """``(weight FQN, input key node, has_bias, in_out)`` when ``node`` computes x·Wᵀ (+b);
    ``in_out``: the weight enters untransposed (``addmm(b, x, W)``), a site only when its
    module is a ``Conv1D``; ``has_bias`` ``None``: a ``matmul`` whose bias (if any) its module
    adds after, a site only in an ``nn.Linear`` subclass."""
    if node.op != "call_function":
        return None
    if node.target in _LINEAR:
        w = _param_of(node.args[1], params)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return (w, node.args[0], bias is not None, False) if w else None
    if node.target in _MM:
        w = _transposed_param(node.args[1], params)
        return (w, _strip_views(node.args[0]), False, False) if w else None
    if node.target in _MATMUL:
        w = _transposed_param(node.args[1], params)
        return (w, _strip_views(node.args[0]), None, False) if w else None
    if node.target in _ADDMM:
        w = _transposed_param(node.args[2], params)
        if w:
            return (w, _strip_views(node.args[1]), True, False)
        w = _param_of(node.args[2], params)
        return (w, _strip_views(node.args[1]), True, True) if w else None
    return None


_PASSIVE = _VIEWS | {
    _aten.t.default, _aten.numpy_T.default, _aten.permute.default, _aten.transpose.int,
    _aten.alias.default, _aten.contiguous.default, _aten.to.dtype, _aten._to_copy.default,
    _aten.dropout.default,  # eval mode: the identity the swapped module also computes
}  # fmt: skip
_ADD = {_aten.add.Tensor}


def _bias_add(node: Any, params: dict[str, str], fqn: str) -> bool:
    """Whether ``node`` is ``y + b``: the module's own ``bias`` added (no ``alpha``) to the
    output of its bias-free product (``F.linear(x, W)`` / ``x @ W.T``, through views)."""
    if node.op != "call_function" or node.target not in _ADD or node.kwargs or len(node.args) != 2:
        return False
    own = f"{fqn}.bias" if fqn else "bias"
    bias = [a for a in node.args if _param_of(a, params) == own]
    other = [_strip_views(a) for a in node.args if _param_of(a, params) != own]
    if len(bias) != 1 or len(other) != 1 or not isinstance(other[0], torch.fx.Node):
        return False
    y = other[0]
    if y.op != "call_function" or y.meta.get(FQN_KEY) != fqn:
        return False
    if y.target in _LINEAR:
        return (y.args[2] if len(y.args) > 2 else y.kwargs.get("bias")) is None
    return y.target in _MATMUL | _MM


def adds_own_bias(program: Any, params: dict[str, str], fqn: str) -> bool:
    """Whether the module at ``fqn`` adds its own bias after its product (``_bias_add``)."""
    return any(_bias_add(n, params, fqn) for n in program.graph.nodes)


def _plain_forward(module: nn.Module | None) -> bool:
    """``nn.Linear`` / ``Conv1D`` running their own forward: nothing but the product (+ b)."""
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    return is_conv1d(module) and type(module).__module__.startswith("transformers.")


def wider_than_linear(
    captured: Captured, model: nn.Module, sites: list[LinearSite]
) -> dict[str, str]:
    """FQN → reason for each site whose module's forward (its children included) computes
    more than its product and its own bias add — a MoE router's softmax and top-k, a scale
    after the product in an ``nn.Linear`` subclass. The module swap replaces whole modules,
    so such a site stays dense. Views, casts, eval-mode dropout and adding the module's own
    ``bias`` are part of a linear."""
    modules = dict(model.named_modules())
    wide = {s.fqn for s in sites if not _plain_forward(modules.get(s.fqn))}
    if captured.program is None:  # no graph to read their forwards: leave them dense
        return {f: (f"a {type(modules[f]).__name__} with its own forward, and no captured graph "
                    "to check that it computes only its linear: it stays dense") for f in wide}
    if not wide:
        return {}
    params = dict(captured.program.graph_signature.inputs_to_parameters)
    extra: dict[str, set[str]] = {}
    for node in captured.program.graph.nodes:
        path = node.meta.get(FQN_KEY)
        if node.op != "call_function" or not isinstance(path, str):
            continue
        owners = [f for f in wide if path == f or path.startswith(f + ".")]
        fqn = max(owners, key=len) if owners else None  # the innermost wide module
        if fqn is None or node.target in _PASSIVE | _LINEAR | _MM | _ADDMM | _MATMUL:
            continue
        if _bias_add(node, params, fqn):
            continue
        extra.setdefault(fqn, set()).add(str(getattr(node.target, "__name__", node.target)))
    return {
        fqn: (f"a {type(modules[fqn]).__name__} whose forward computes more than its linear "
              f"({', '.join(sorted(ops)[:3])}): the module swap replaces whole linear modules, so "
              "it stays dense (the torch.compile backend rewrites the product itself)")
        for fqn, ops in extra.items()
    }  # fmt: skip


def graph_weight_readers(
    captured: Captured, model: nn.Module, sites: list[LinearSite]
) -> dict[str, str] | None:
    """FQN → reason for each site whose ``weight`` or ``bias`` the captured graph reads outside
    the site module's own call (``nn.MultiheadAttention`` hands ``out_proj.weight`` to its
    fused forward): a rewritten module there would break the reader. Uses by a module that
    shares the tensor (a tied embedding) do not count. ``None`` without a graph."""
    if captured.program is None:
        return None
    lifted = captured.program.graph_signature.inputs_to_parameters  # placeholder → parameter
    by_param = {p: n for n, p in lifted.items()}
    placeholders = {n.name: n for n in captured.program.graph.nodes if n.op == "placeholder"}
    named = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, str] = {}
    for s in sites:
        own = f"{s.fqn}." if s.fqn else ""
        for attr in ("weight", "bias"):
            tensor = named.get(own + attr)
            aliases = [n for n, p in named.items() if p is tensor] if tensor is not None else []
            ph = next((placeholders.get(by_param[a]) for a in aliases if a in by_param), None)
            owners = {a.rpartition(".")[0] for a in aliases}
            for user in [] if ph is None else list(ph.users):
                path = user.meta.get(FQN_KEY)
                if not isinstance(path, str) or path in owners or path.startswith(own):
                    continue
                out.setdefault(s.fqn, (
                    f"left dense: {path or 'the model'} reads `{s.fqn}.{attr}` outside the "
                    "module's own call, so a rewritten module there would break it"))  # fmt: skip
    return out
