"""Factorization math: pure functions of tensors, shared by the cost model and the passes.

``factorize(W, decision, gram)`` turns a dense weight into the tensors of a compressed form;
``reconstruct(decision, tensors)`` gives the dense matrix that form computes. The cost model
uses them to measure errors, the passes to build modules and graph constants, so estimate and
rewrite agree by construction. Imports from slimfx only ``planning``, ``forms``, ``formats``.

Which function factorizes a kind is the kind's form's business (``slimfx.forms``: its
``factorize`` / ``reconstruct`` pieces, in this package's modules); the tensors are in the
storage formats of ``slimfx.formats``:

- lowrank:  ``U`` (out × r), ``V`` (r × in), weight dtype.            W ≈ U @ V
- quant: ``qweight`` uint8 (out × ceil(bits·in/8), each row's codes a little-endian bit
  stream: int4 column j in byte j//2, low nibble for even j — ONNX MatMulNBits order),
  ``scales`` (out × n_groups) weight dtype, ``zeros`` uint8 (out × n_groups) integer zero
  points, absent when symmetric (offset 2^(bits−1)). Dequantized w = (q − z) · s.
- sparse24: ``values`` (out × in/2) weight dtype, ``meta`` uint8 (out × in/8) 2-bit positions.
- lowrank_quant: the quant tensors plus ``U``, ``V``: W ≈ deq(q) + U @ V.
- sparse24_lowrank: the sparse24 tensors plus ``U``, ``V``: W ≈ S + U @ V.
- dense: ``weight`` (out × in), the weight itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx import forms
from slimfx.planning.configs import Decision

__all__ = [
    "factorize",
    "reconstruct",
    "relative_output_error",
    "form_error",
    "factorize_dense",
    "reconstruct_dense",
]


def factorize_dense(weight: Tensor, decision: Decision, gram: Tensor | None) -> dict[str, Tensor]:
    """The dense form's tensors: the weight itself."""
    return {"weight": weight.detach().clone()}


def reconstruct_dense(decision: Decision, tensors: dict[str, Tensor]) -> Tensor:
    """The dense form's weight."""
    return tensors["weight"]


def factorize(weight: Tensor, decision: Decision, gram: Tensor | None = None) -> dict[str, Tensor]:
    """Tensors of ``decision``'s form for ``weight`` (out × in). ``gram`` is the input Gram
    matrix XᵀX (in × in, float64) for activation-aware forms; ``None`` means identity. An
    unregistered kind raises ``forms.UnknownFormError`` naming the registered ones."""
    fn = forms.form_of(decision).get("factorize")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has NaN or inf entries; cannot factorize")
    return fn(weight, decision, gram)


def reconstruct(decision: Decision, tensors: dict[str, Tensor]) -> Tensor:
    """The dense (out × in) matrix the compressed form computes."""
    return forms.form_of(decision).get("reconstruct")(decision, tensors)


def relative_output_error(weight: Tensor, approx: Tensor, gram: Tensor | None = None) -> float:
    """‖(W − Ŵ)X‖²_F / ‖W X‖²_F computed from the Gram matrix G = XᵀX (X rows are tokens):
    tr(E G Eᵀ) / tr(W G Wᵀ). With ``gram=None`` this is the plain Frobenius ratio."""
    W = weight.detach().to(torch.float64)
    E = W - approx.detach().to(torch.float64)
    if gram is None:
        num, den = (E * E).sum(), (W * W).sum()
    else:
        G = gram.to(torch.float64)
        num, den = ((E @ G) * E).sum(), ((W @ G) * W).sum()
    return float(num / den) if den > 0 else float(num > 0)


def form_error(weight: Tensor, decision: Decision, gram: Tensor | None = None) -> float:
    """The relative output error of realizing ``decision`` on ``weight`` (any registered form):
    its form's factorize, then reconstruct, then :func:`relative_output_error` with ``gram``."""
    approx = reconstruct(decision, factorize(weight, decision, gram))
    return relative_output_error(weight, approx, gram)
