"""The compile backend's CPU pass: slimfx's quantized-linear op nodes → torch's packed CPU kernels.

    slimfx::quant_linear(x, q, s, z, b, bits, G)            → packed_linear(x, "int4pack", …, b)
    slimfx::quant_lowrank_linear(x, q, s, z, U, V, b, …)     → packed_linear(x, …) + x·Vᵀ·Uᵀ + b

After ``SlimfxBackend`` rewrites a dynamo graph, the quantized sites are reference op nodes that
would dequantize their whole weight on every call. On a CPU graph (no gradient wanted) this pass
packs each node's codes once, as ``slimfx.prepare_cpu`` packs a module
(``slimfx.ir.cpu_packed``), stores the packed tensors on the graph module and calls
``cpu_packed.packed_linear`` instead, which inductor traces into
``aten._weight_int4pack_mm_for_cpu`` / ``aten._weight_int8pack_mm`` calls: the compiled graph
runs the same kernels as eager. A node no kernel takes keeps its op; the record says why.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, fx
from torch._subclasses.fake_tensor import FakeTensor

from slimfx.backends.triton_lowering import (
    _arg_value,
    _bind,
    _op_name,
    _out_in,
    _site_of,
    not_lowered,
)
from slimfx.ir import cpu_packed
from slimfx.ir.graph import finalize
from slimfx.passes.base import PassResult, SiteRecord

__all__ = [
    "PASS_NAME",
    "GRAD_REASON",
    "LIFTED_REASON",
    "pack_graph_cpu",
    "not_packed",
    "grads_on_cpu",
    "grads_may_flow",
    "wants_cpu_pack",
]

PASS_NAME = "pack_cpu_kernels"
_OPS = ("quant_linear", "quant_lowrank_linear")


def _lowrank_plus(
    x: Tensor, y: Tensor, U: Tensor, V: Tensor, bias: Tensor | None
) -> Tensor:
    """``y + x·Vᵀ·Uᵀ + bias`` (the low-rank correction of a packed quantized core)."""
    return y + torch.nn.functional.linear(torch.nn.functional.linear(x, V), U, bias)


#: why a quantized op whose codes reach the graph as inputs keeps the reference op
LIFTED_REASON = (
    "codes are graph inputs (module buffers torch.compile lifted), not constants to pack: the "
    "reference op runs (exact; slimfx.prepare_cpu(model) packs them before compiling)"
)


def pack_graph_cpu(gm: fx.GraphModule, activations: str = "auto") -> tuple[fx.GraphModule,
                                                                           PassResult]:
    """Replace ``gm``'s quantized-linear op nodes (edited in place) by packed CPU kernel calls
    where a kernel takes the layout. One record per such node: ``applied`` (``extra``: kernel,
    activation dtype) or ``fallback`` with the reason."""
    t0 = time.perf_counter()
    records: list[SiteRecord] = []
    changed = False
    for node in list(gm.graph.nodes):
        name = _op_name(node.target) if node.op == "call_function" else None
        if name not in _OPS:
            continue
        site, shape = _site_of(node), {"shape": _out_in(node)}
        bound = _bind(node.target, node)
        values = {k: _arg_value(gm, v) for k, v in bound.items()}
        q, s, z = (values[k][0] for k in ("qweight", "scales", "zeros"))
        if not all(isinstance(t, Tensor) for t in (q, s)) or (
            bound["zeros"] is not None and not isinstance(z, Tensor)
        ):
            records.append(SiteRecord(site, name, "fallback",
                                      "codes are not constants of the graph", extra=shape))
            continue
        if any(isinstance(t, FakeTensor) for t in (q, s, z)):  # buffers dynamo lifted to inputs
            records.append(SiteRecord(site, name, "fallback", LIFTED_REASON, extra=shape))
            continue
        x_val = values["x"][0]
        if not isinstance(x_val, Tensor) or x_val.device.type != "cpu" or q.device.type != "cpu":
            records.append(SiteRecord(site, name, "fallback", "not on the CPU", extra=shape))
            continue
        bits, group = int(values["bits"][0]), int(values["group_size"][0])
        k = int(x_val.shape[-1])
        try:
            packed = cpu_packed.pack_quant(q, s, z, bits, group, k, activations=activations)
        except ValueError as e:
            records.append(SiteRecord(site, name, "fallback", str(e), extra=shape))
            continue
        t = time.perf_counter()
        with gm.graph.inserting_before(node):
            attrs = []
            for i, tensor in enumerate(packed.kernel_tensors()):
                if tensor is None:
                    attrs.append(None)
                    continue
                attr = f"_slimfx_cpu_{node.name}_{i}"
                gm.register_buffer(attr, tensor)
                attrs.append(gm.graph.get_attr(attr))
            bias = bound["bias"]
            core_bias = bias if name == "quant_linear" else None
            new = gm.graph.call_function(
                cpu_packed.packed_linear,
                (bound["x"], packed.kernel, *attrs, packed.group_size, packed.act_dtype,
                 core_bias),
            )
            if name == "quant_lowrank_linear":
                new = gm.graph.call_function(
                    _lowrank_plus, (bound["x"], new, bound["U"], bound["V"], bias)
                )
        new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        if "val" in node.meta:
            new.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
        records.append(SiteRecord(
            site, name, "applied", "", time.perf_counter() - t,
            extra={"kernel": packed.kernel, "activations": str(packed.act_dtype)[6:], **shape},
        ))
    if changed:
        finalize(gm)
    return gm, PassResult(
        name=PASS_NAME, modified=changed, records=records, seconds=time.perf_counter() - t0
    )


#: why a CPU graph through which gradients may flow keeps the reference quantized ops
GRAD_REASON = (
    "gradients may flow through this graph (grad mode on, inputs that require grad) and the "
    "packed CPU kernels have no backward: the reference op runs, dequantizing its weight on "
    "every call (call the compiled model under torch.no_grad / torch.inference_mode)"
)


def not_packed(gm: fx.GraphModule, reason: str) -> PassResult:
    """A ``fallback`` record carrying ``reason`` for every quantized op node of ``gm``."""
    return not_lowered(gm, reason, ops=_OPS, pass_name=PASS_NAME)


def grads_may_flow(example_inputs: Any) -> bool:
    """Grad mode is on and an input of the graph requires grad (kernel ops have no backward)."""
    return torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in example_inputs
    )


def _on_cpu(example_inputs: Any) -> bool:
    tensors = [t for t in example_inputs if isinstance(t, Tensor)]
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)


def grads_on_cpu(example_inputs: Any) -> bool:
    """A CPU graph that gradients may flow through (what keeps :func:`wants_cpu_pack` off)."""
    return _on_cpu(example_inputs) and grads_may_flow(example_inputs)


def wants_cpu_pack(example_inputs: Any) -> bool:
    """Whether a dynamo graph runs on the CPU without gradients (the pass's precondition)."""
    return _on_cpu(example_inputs) and not grads_may_flow(example_inputs)
