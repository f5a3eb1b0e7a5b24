"""Lower slimfx ops to the Triton kernel ops of ``slimfx.kernels``.

    slimfx::lowrank_linear(x, U, V, b)               → slimfx_kernels::lowrank_linear_triton(…)
    slimfx::quant_linear(x, q, s, z, b, bits, G)     → slimfx_kernels::quant_linear_triton(…)
    slimfx::sparse24_linear(x, values, meta, b)      → slimfx_kernels::sparse24_linear_triton(…)

Same arguments, same semantics: the kernel ops are opaque ``torch.library`` custom ops around
the Triton launchers, so a lowered graph still runs eagerly, exports and compiles (on CPU only
under ``TRITON_INTERPRET=1``). A node is lowered only when a Triton kernel of its op accepts the
call — ``kernels.select(op, x, **tensors)`` on the node's fake values (shape, dtype, device);
otherwise the reference op stays and the record says why (every kernel's reason). There are no
silent fallbacks: every slimfx op node gets a record, ``applied`` or ``fallback``.

Two targets, one entry point, :func:`lower_to_triton`:

- a ``GraphModule`` (torch.export ``ep.module()``, a dynamo sub-graph, a rewritten graph): each
  slimfx op node is replaced through ``slimfx.ir.graph.replace_node`` (fake value and
  provenance ``{"pass": "lower_to_triton", "rule": <kernel>, "site": <site>}``; the node it
  replaced is kept in ``meta["slimfx.lowered_from"]``). Symbolic sizes are checked at their
  size hints; the kernel op picks its own path (e.g. fused decode or tiled) per call.
- a module-swapped ``nn.Module`` (what ``slimfx.optimize`` returns): each slimfx module whose
  form has a :class:`TritonLowering` (``slimfx.forms``: ``Form.triton_lowering``) and whose
  kernel accepts a one-row input of the module's dtype and device has its class switched to
  the lowering's subclass (:class:`TritonLowRankLinear`, :class:`TritonQuantLinear`,
  :class:`TritonSparse24Linear`) whose ``forward`` calls the kernel op; a form without one
  (the combined forms: no kernel op yet) is recorded as a fallback with its reason. Why a
  class switch rather than a wrapper module: the
  module tree, the FQNs a Plan names and the ``state_dict`` keys stay exactly as they were
  (a saved model loads into an unlowered one and back), ``isinstance(m, LowRankLinear)`` still
  holds, and the module deep-copies and pickles (the subclasses live in this module). The
  module's ``slimfx_lowering`` attribute records the kernel and the (dtype, device) pairs it
  was checked for; a call with another pair is checked again, and one no kernel accepts runs
  the reference op with a warning that gives the reason; so does a call that may need
  gradients (the kernel ops have no backward). :func:`unlower` switches back.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

import slimfx.ir.ops  # noqa: F401  (registers the slimfx::* ops)
from slimfx import forms, kernels
from slimfx.ir.capture import ORIGIN_KEY
from slimfx.ir.graph import finalize, node_value, replace_node
from slimfx.ir.match import node_module_path
from slimfx.ir.modules import LowRankLinear
from slimfx.ir.modules_quant import QuantLinear
from slimfx.ir.modules_sparse import Sparse24Linear
from slimfx.passes.base import PassResult, SiteRecord

__all__ = [
    "TritonLowering",
    "lowering_of_op",
    "lower_to_triton",
    "lower_graph",
    "not_lowered",
    "lower_module",
    "unlower",
    "choose_kernel",
    "TritonLowRankLinear",
    "TritonQuantLinear",
    "TritonSparse24Linear",
    "PASS_NAME",
    "node_module_path",
]

PASS_NAME = "lower_to_triton"
#: node.meta key: the op and provenance of the slimfx node a kernel node replaced.
LOWERED_FROM_KEY = "slimfx.lowered_from"


def _has_op(namespace: str, name: str) -> bool:
    return hasattr(getattr(torch.ops, namespace), name)


def lowering_of_op(op: str) -> tuple[TritonLowering | None, str]:
    """The lowering of slimfx op ``op`` (its form's ``triton_lowering``), or ``None`` and why
    there is none."""
    form = forms.form_of_op(op)
    if form is None:
        return None, f"no Triton lowering for slimfx::{op} (no registered form runs it)"
    if not form.has("triton_lowering"):
        return None, f"no Triton lowering for slimfx::{op}: {form.why_not('triton_lowering')}"
    return form.get("triton_lowering"), ""


def _is_triton(kernel: kernels.Kernel) -> bool:
    return kernel.module.endswith("triton_kernel")


def choose_kernel(op: str, x: Tensor, **tensors: Any) -> tuple[kernels.Kernel | None, str]:
    """The Triton kernel of ``op`` that accepts this call, or ``None`` and why not.

    ``kernels.select`` decides first; when it prefers a kernel that is not a Triton one (e.g.
    torch's semi-structured sparse matmul, which has no graph op of its own), the remaining
    Triton kernels are asked in registry order. The string lists each declining kernel's
    reason (empty when the first choice accepted)."""
    kernel, reasons = kernels.select(op, x, **tensors)
    if kernel is None or _is_triton(kernel):
        return kernel, "; ".join(reasons)
    declined = list(reasons)
    for other in kernels.kernels_of(op):
        if other is kernel or not _is_triton(other):
            continue
        ok, why = other.supports(x, **tensors)
        if ok:
            return other, "; ".join(declined)
        declined.append(f"{other.name}: {why}")
    declined.insert(0, f"{kernel.name}: not a Triton kernel (no graph op to lower to)")
    return None, "; ".join(declined)


# --------------------------------------------------------------------------- graphs


def _op_name(target: Any) -> str | None:
    """``lowrank_linear`` for ``torch.ops.slimfx.lowrank_linear[.default]``, else ``None``."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "slimfx":
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.startswith(
        "slimfx::"
    ):
        return target._qualified_op_name.split("::")[-1]
    return None


def _bind(target: Any, node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name (defaults filled in)."""
    schema = (target if isinstance(target, torch._ops.OpOverload) else target.default)._schema
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            raise ValueError(f"node {node.name}: no value for argument {arg.name!r}")
    return bound


def _hint(n: Any) -> int:
    if isinstance(n, torch.SymInt):
        from torch.fx.experimental import symbolic_shapes as ss

        # torch ≥ 2.13 names it optimization_hint; 2.11 size_hint (its hint_int, kept for
        # older releases, warns FutureWarning there)
        hint = (
            getattr(ss, "optimization_hint", None) or getattr(ss, "size_hint", None) or ss.hint_int
        )
        try:
            return int(hint(n, fallback=1))
        except Exception:  # noqa: BLE001 - a size with no hint at all: assume one row
            return 1
    return int(n)


def _concrete(value: Any) -> Any:
    """A stand-in ``supports()`` can inspect without adding guards: real tensors and fake
    tensors with static sizes as they are; a fake tensor with symbolic sizes as a fresh fake
    tensor of the hinted sizes (same dtype and device); SymInts as their hints."""
    if isinstance(value, torch.SymInt):
        return _hint(value)
    if not isinstance(value, Tensor):
        return value
    if all(isinstance(s, int) for s in value.shape):
        return value
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = [_hint(s) for s in value.shape]
    with FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(shape, dtype=value.dtype, device=value.device)


def _arg_value(gm: fx.GraphModule, a: Any) -> tuple[Any, bool]:
    """``(value, known)``: the tensor (or constant) an argument stands for."""
    if not isinstance(a, fx.Node):
        return a, True
    if a.op == "get_attr":
        obj: Any = gm
        for part in str(a.target).split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, Tensor):
            return obj, True
    v = node_value(a)
    return _concrete(v), v is not None


def _site_of(node: fx.Node) -> str:
    origin = node.meta.get(ORIGIN_KEY)
    if isinstance(origin, dict) and origin.get("site") is not None:
        return str(origin["site"])
    return node_module_path(node) or node.name


def _out_in(node: fx.Node) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear-like node from its fake values (0 when
    unknown)."""
    out, x = node_value(node), node_value(node.args[0]) if node.args else None
    n = _hint(out.shape[-1]) if isinstance(out, Tensor) and out.dim() else 0
    k = _hint(x.shape[-1]) if isinstance(x, Tensor) and x.dim() else 0
    return (n, k)


def lower_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, PassResult]:
    """Replace the slimfx op nodes of ``gm`` (edited in place) by Triton kernel ops where a
    kernel accepts them; see the module docstring. Returns ``(gm, PassResult)`` with one
    record per slimfx op node: ``applied`` (``extra``: kernel, node, declined) or
    ``fallback`` (``reason``: why each kernel declined)."""
    t0 = time.perf_counter()
    records: list[SiteRecord] = []
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name is None:
            continue
        site = _site_of(node)
        shape = {"shape": _out_in(node)}
        t = time.perf_counter()
        lowering, reason = lowering_of_op(name)
        if lowering is None:
            records.append(SiteRecord(site, name, "fallback", reason, extra=shape))
            continue
        bound = _bind(node.target, node)
        values = {k: _arg_value(gm, v) for k, v in bound.items()}
        unknown = [k for k, (_, known) in values.items() if not known]
        if unknown:
            reason = (
                f"no fake value for {', '.join(unknown)} (a graph without meta['val']: capture "
                "with torch.export or run shape propagation first)"
            )
            records.append(SiteRecord(site, name, "fallback", reason, extra=shape))
            continue
        args = {k: v for k, (v, _) in values.items()}
        x = args.pop("x")
        kernel, why = choose_kernel(name, x, **args)
        if kernel is None:
            reason = why or "no kernel accepted"
            records.append(SiteRecord(site, name, "fallback", reason, extra=shape))
            continue
        target = lowering.target()
        schema = target._schema
        new_args = [bound[a.name] for a in schema.arguments]
        before = {"op": str(node.target), "origin": dict(node.meta.get(ORIGIN_KEY) or {})}
        origin = {"pass": PASS_NAME, "rule": kernel.name, "site": site}
        new = replace_node(gm, node, target, new_args, {}, origin=origin, recompile=False)
        new.meta[LOWERED_FROM_KEY] = before
        changed = True
        extra = {
            "kernel": kernel.name,
            "node": new.name,
            "op": f"slimfx_kernels::{lowering.kernel_op}",
            **shape,
        }
        if why:
            extra["declined"] = why
        records.append(SiteRecord(site, name, "applied", "", time.perf_counter() - t, extra=extra))
    if changed:
        finalize(gm)
    return gm, PassResult(
        name=PASS_NAME, modified=changed, records=records, seconds=time.perf_counter() - t0
    )


def not_lowered(
    gm: fx.GraphModule,
    reason: str,
    ops: tuple[str, ...] | None = None,
    pass_name: str = PASS_NAME,
) -> PassResult:
    """The record of a graph left as it is on purpose: every slimfx op node of ``gm`` (of
    ``ops`` only, when given) gets a ``fallback`` record carrying ``reason``, under
    ``pass_name`` (the CPU pack names its own)."""
    records = [
        SiteRecord(_site_of(n), name, "fallback", reason, extra={"shape": _out_in(n)})
        for n in gm.graph.nodes
        if n.op == "call_function"
        and (name := _op_name(n.target)) is not None
        and (ops is None or name in ops)
    ]
    return PassResult(name=pass_name, modified=False, records=records)


# --------------------------------------------------------------------------- modules


def _lowrank_args(mod: nn.Module) -> dict[str, Any]:
    return {"U": mod.U, "V": mod.V, "bias": mod.bias}


def _quant_args(mod: nn.Module) -> dict[str, Any]:
    return {
        "qweight": mod.qweight,
        "scales": mod.scales,
        "zeros": mod.zeros,
        "bias": mod.bias,
        "bits": mod.bits,
        "group_size": mod.group_size,
    }


def _sparse24_args(mod: nn.Module) -> dict[str, Any]:
    return {"values": mod.values, "meta": mod.meta, "bias": mod.bias}


#: warned once per lowered module when a forward may need gradients
GRAD_WARNING = (
    "{}: gradients may flow (grad mode on, the input or a weight requires grad) and the Triton "
    "kernels have no backward: the reference op runs (call the model under torch.no_grad() or "
    "torch.inference_mode() for the kernel)"
)


class _Lowered:
    """Mixin of the lowered module classes: forward through the kernel op when a kernel
    accepts this call's (dtype, device), else the reference op with a warning."""

    _slimfx_lowering: TritonLowering
    slimfx_lowering: dict[str, Any]

    def _kernel_ok(self, x: Tensor) -> bool:
        info = self.slimfx_lowering
        key = (x.dtype, x.device)
        if key in info["checked"]:
            return True
        if key in info["declined"]:
            return False
        kernel, why = _module_check(self, self._slimfx_lowering, *key)  # type: ignore[arg-type]
        if kernel is not None:
            info["checked"].add(key)
            return True
        info["declined"][key] = why
        warnings.warn(
            f"{type(self).__name__}: no Triton kernel for x {x.dtype} on {x.device} ({why}); "
            "running the reference op",
            stacklevel=3,
        )
        return False

    def _grads_may_flow(self, x: Tensor) -> bool:
        """Grad mode on and ``x`` or a weight of this module requires grad: the kernel ops
        have no backward (their output would carry no gradient), so the reference op runs,
        with a warning the first time."""
        params = self.parameters(recurse=False)  # type: ignore[attr-defined]
        if not torch.is_grad_enabled() or not (
            x.requires_grad or any(p.requires_grad for p in params)
        ):
            return False
        if not self.slimfx_lowering.get("grad_warned"):
            self.slimfx_lowering["grad_warned"] = True
            warnings.warn(GRAD_WARNING.format(type(self).__name__), stacklevel=3)
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self._grads_may_flow(x) or not self._kernel_ok(x):
            return super().forward(x)  # type: ignore[misc]
        low = self._slimfx_lowering
        return low.target()(x, **low.args(self))  # type: ignore[arg-type]


@dataclass(frozen=True)
class TritonLowering:
    """One form's Triton lowering: its slimfx op, the kernel op computing the same thing with
    the same named arguments (``torch.ops.slimfx_kernels.<kernel_op>``), the module's
    arguments to that op (``args(module)``, without ``x``), and the kernel-calling subclass of
    the form's module that :func:`lower_module` switches a module's class to.
    """

    op: str
    kernel_op: str
    args: Callable[[nn.Module], dict[str, Any]]
    lowered: type[nn.Module]

    def source(self) -> Any:
        """``torch.ops.slimfx.<op>.default``, or ``None`` while that op is not registered."""
        packet = getattr(torch.ops.slimfx, self.op, None) if _has_op("slimfx", self.op) else None
        return None if packet is None else packet.default

    def target(self) -> Any:
        """``torch.ops.slimfx_kernels.<kernel_op>.default``."""
        return getattr(torch.ops.slimfx_kernels, self.kernel_op).default

    @property
    def reference(self) -> type[nn.Module]:
        """The reference module class the lowered one subclasses."""
        return self.lowered.__mro__[2]


def _module_check(
    mod: nn.Module, lowering: TritonLowering, dtype: torch.dtype, device: torch.device
) -> tuple[kernels.Kernel | None, str]:
    x = torch.empty((1, mod.in_features), dtype=dtype, device=device)
    return choose_kernel(lowering.op, x, **lowering.args(mod))


class TritonLowRankLinear(_Lowered, LowRankLinear):
    """A ``LowRankLinear`` whose forward calls ``slimfx_kernels::lowrank_linear_triton``."""


class TritonQuantLinear(_Lowered, QuantLinear):
    """A ``QuantLinear`` whose forward calls ``slimfx_kernels::quant_linear_triton``."""


class TritonSparse24Linear(_Lowered, Sparse24Linear):
    """A ``Sparse24Linear`` whose forward calls ``slimfx_kernels::sparse24_linear_triton``."""


#: the lowerings the ``lowrank``, ``quant`` and ``sparse24`` forms name (``slimfx.forms``).
LOWRANK = TritonLowering("lowrank_linear", "lowrank_linear_triton", _lowrank_args,
                         TritonLowRankLinear)
QUANT = TritonLowering("quant_linear", "quant_linear_triton", _quant_args, TritonQuantLinear)
SPARSE24 = TritonLowering(
    "sparse24_linear", "sparse24_linear_triton", _sparse24_args, TritonSparse24Linear
)
TritonLowRankLinear._slimfx_lowering = LOWRANK
TritonQuantLinear._slimfx_lowering = QUANT
TritonSparse24Linear._slimfx_lowering = SPARSE24


def _module_dtype_device(mod: nn.Module) -> tuple[torch.dtype, torch.device]:
    floats = [t for t in (*mod.parameters(), *mod.buffers()) if t.is_floating_point()]
    ref = floats[0] if floats else next(iter(mod.parameters()))
    return ref.dtype, ref.device


def _module_lowering(mod: nn.Module) -> tuple[TritonLowering | None, str]:
    """The lowering of a slimfx module's form, or ``None`` and why there is none."""
    no = f"no Triton-lowered form of {type(mod).__name__}"
    try:
        form = forms.form_of(mod.decision)
    except forms.UnknownFormError as e:
        return None, f"{no}: {e}"
    if not form.has("triton_lowering"):
        return None, f"{no}: {form.why_not('triton_lowering')}"
    lowering = form.get("triton_lowering")
    if type(mod) is not lowering.reference:
        return None, f"{no}: its form lowers {lowering.reference.__name__}"
    return lowering, ""


def lower_module(model: nn.Module) -> tuple[nn.Module, PassResult]:
    """Switch the class of every lowerable slimfx module of ``model`` (in place) to its
    kernel-calling subclass when a Triton kernel accepts a one-row input of the module's
    dtype and device; see the module docstring. One record per slimfx module."""
    from slimfx.ir.modules import SlimLinear

    t0 = time.perf_counter()
    records: list[SiteRecord] = []
    changed = False
    for fqn, mod in model.named_modules():
        if not isinstance(mod, SlimLinear):
            continue
        kind = mod.decision.short()
        if isinstance(mod, _Lowered):
            records.append(
                SiteRecord(
                    fqn,
                    kind,
                    "applied",
                    "",
                    extra={"kernel": mod.slimfx_lowering["kernel"], "note": "already lowered"},
                )
            )
            continue
        lowering, reason = _module_lowering(mod)
        if lowering is None:
            records.append(SiteRecord(fqn, kind, "fallback", reason))
            continue
        lowered_cls = lowering.lowered
        t = time.perf_counter()
        dtype, device = _module_dtype_device(mod)
        kernel, why = _module_check(mod, lowering, dtype, device)
        if kernel is None:
            records.append(SiteRecord(fqn, kind, "fallback", why or "no kernel accepted"))
            continue
        mod.__class__ = lowered_cls
        mod.slimfx_lowering = {"kernel": kernel.name, "checked": {(dtype, device)}, "declined": {}}
        changed = True
        extra = {"kernel": kernel.name, "class": lowered_cls.__name__}
        if why:
            extra["declined"] = why
        records.append(SiteRecord(fqn, kind, "applied", "", time.perf_counter() - t, extra=extra))
    return model, PassResult(
        name=PASS_NAME, modified=changed, records=records, seconds=time.perf_counter() - t0
    )


def unlower(model: nn.Module) -> nn.Module:
    """Undo :func:`lower_module` in place: lowered modules get their reference class back."""
    for mod in model.modules():
        if isinstance(mod, _Lowered):
            mod.__class__ = mod._slimfx_lowering.reference
            mod.__dict__.pop("slimfx_lowering", None)
    return model


def lower_to_triton(obj: fx.GraphModule | nn.Module) -> tuple[Any, PassResult]:
    """Lower ``obj``'s slimfx ops to Triton kernel ops where a kernel accepts them.

    A ``GraphModule`` is rewritten node by node (:func:`lower_graph`); any other ``nn.Module``
    has its slimfx modules switched to kernel-calling subclasses (:func:`lower_module`). Both
    edit ``obj`` in place and return ``(obj, PassResult)``; a record per op says which kernel
    runs it or, status ``fallback``, why the reference op stays.
    """
    if isinstance(obj, fx.GraphModule):
        return lower_graph(obj)
    if isinstance(obj, nn.Module):
        return lower_module(obj)
    raise TypeError(
        f"lower_to_triton takes a GraphModule or an nn.Module, not {type(obj).__name__}"
    )
