"""Running a model block by block: the head around stored hidden states, and the backward
through one block at a time.

The decoder blocks are the chain ``cost.sequential`` finds (children of the model's
``ModuleList`` run one after the other). Block 0's inputs come from ``cost.sequential``'s
capture (the model's own forward, stopped at block 0), so the embedding, the position
embeddings and the mask are the model's. The part *after* the blocks (final norm, head, loss)
is run by the model's own forward too, with every block swapped for a stand-in
(:func:`replayed`): the first returns the stored last hidden state of the batch, the others
pass it on. So sites outside the blocks see exactly the tensors they see in a full forward.

The backward (:func:`block_backward`): with ``g`` = ∂L/∂(block output), the block reruns with
its input ``x`` a leaf that requires grad and the scalar ``⟨out, g⟩`` is differentiated: its
gradient at every tensor inside the block is the full model's ∂L/∂(that tensor) (the chain rule
with the true upstream gradient), and ∂/∂x is the next ``g`` going up.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.cost.calibration import to_device
from slimfx.cost.sequential import _output, _with_stream

__all__ = ["replayed", "block_backward", "stream_of", "Inputs"]

#: one calibration batch's (args, kwargs) of a block call
Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def stream_of(inputs: Inputs) -> Tensor:
    """The hidden state a block call carries (first positional, or ``hidden_states=``)."""
    args, kwargs = inputs
    if args and isinstance(args[0], Tensor):
        return args[0]
    return kwargs["hidden_states"]


class _Replay(nn.Module):
    """Stands in for a block: returns the next stored hidden state (the first block of the
    chain) or its input unchanged (the others), shaped like the real block's output."""

    def __init__(self, states: list[Tensor] | None, as_tuple: bool) -> None:
        super().__init__()
        self.states = states
        self.as_tuple = as_tuple
        self.calls = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.states is not None:
            h = self.states[self.calls]
            self.calls += 1
        else:
            h = args[0] if args and isinstance(args[0], Tensor) else kwargs["hidden_states"]
            if isinstance(h, tuple):
                h = h[0]
        return (h,) if self.as_tuple else h


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, child = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), child


@contextmanager
def replayed(
    model: nn.Module, chain: Sequence[str], states: list[Tensor], as_tuple: bool = False
) -> Iterator[None]:
    """Within the block, the model's forward skips its blocks: the first of ``chain`` returns
    ``states[k]`` on the k-th call, the others pass the hidden state on. Restored on exit."""
    saved = []
    try:
        for i, name in enumerate(chain):
            parent, child = _parent(model, name)
            saved.append((parent, child, parent._modules[child]))
            parent._modules[child] = _Replay(states if i == 0 else None, as_tuple)
        yield
    finally:
        for parent, child, mod in saved:
            parent._modules[child] = mod


def block_backward(
    block: nn.Module, inputs: Inputs, grad_out: Tensor, recorder: Any, device: torch.device
) -> Tensor:
    """Rerun ``block`` on ``inputs`` with autograd, hand the recorder the gradient of
    ⟨output, ``grad_out``⟩ (``recorder.backward``) and return ∂/∂(block input)."""
    args, kwargs = to_device(inputs[0], device), to_device(inputs[1], device)
    x = stream_of((args, kwargs)).detach().requires_grad_(True)
    a, kw = _with_stream(args, kwargs, x)
    with torch.enable_grad():
        out = _output(block(*a, **kw))
        surrogate = (out * grad_out.to(out.device, out.dtype)).sum()
        (g_in,) = torch.autograd.grad(surrogate, x, retain_graph=True)
        recorder.backward(surrogate)
    return g_in.detach()
