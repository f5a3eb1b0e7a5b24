"""Factorization math: pure functions of tensors, shared by the cost model and the passes.

``factorize(W, decision, gram)`` turns a dense weight into the tensors of a compressed form;
``reconstruct(decision, tensors)`` gives the dense matrix that form computes. The cost model
uses them to measure errors, the passes to build modules and graph constants, so estimate and
rewrite agree by construction. Imports nothing from slimfx but ``planning.configs``.

Storage formats (``out`` × ``in`` weight; shared with ``slimfx.ir.ops`` and the kernels):

- lowrank:  ``U`` (out × r), ``V`` (r × in), weight dtype.            W ≈ U @ V
- quant, bits=4: ``qweight`` uint8 (out × ceil(in/2)); column j sits in byte j//2, low nibble
  for even j, high nibble for odd j (ONNX MatMulNBits order). ``scales`` (out × n_groups),
  weight dtype. ``zeros`` uint8 (out × n_groups), integer zero points, or absent when
  symmetric (then the code is offset by 8). Dequantized w = (q − z) · s, group g covering
  columns [g·G, (g+1)·G).
- quant, bits=8: ``qweight`` uint8 (out × in), zero point 128 when symmetric, same scales/zeros.
- sparse24: ``values`` (out × in/2) weight dtype, the two kept weights of every group of four
  in column order; ``meta`` uint8 (out × in/8): per group of four, two 2-bit positions
  (first kept in bits 0-1, second in bits 2-3), two groups per byte (even group low nibble).
- lowrank_quant: the quant tensors plus ``U``, ``V``: W ≈ deq(q) + U @ V.
- sparse24_lowrank: the sparse24 tensors plus ``U``, ``V``: W ≈ S + U @ V.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from slimfx.planning.configs import Decision

__all__ = [
    "factorize",
    "reconstruct",
    "relative_output_error",
    "register_form",
    "FACTORIZERS",
    "RECONSTRUCTORS",
]

Factorizer = Callable[[Tensor, Decision, "Tensor | None"], dict[str, Tensor]]
Reconstructor = Callable[[Decision, dict[str, Tensor]], Tensor]

FACTORIZERS: dict[str, Factorizer] = {}
RECONSTRUCTORS: dict[str, Reconstructor] = {}


def register_form(kind: str, factorizer: Factorizer, reconstructor: Reconstructor) -> None:
    """Register how a decision kind is computed from, and turned back into, a dense weight."""
    FACTORIZERS[kind] = factorizer
    RECONSTRUCTORS[kind] = reconstructor


def _ensure_loaded() -> None:
    # Importing the form modules registers them; done lazily to keep import order simple.
    from slimfx.numerics import lowrank  # noqa: F401

    for name in ("quant", "sparse", "combo"):  # present once the other forms land
        try:
            __import__(f"slimfx.numerics.{name}")
        except ModuleNotFoundError as e:  # pragma: no cover
            if e.name != f"slimfx.numerics.{name}":
                raise


def factorize(weight: Tensor, decision: Decision, gram: Tensor | None = None) -> dict[str, Tensor]:
    """Tensors of ``decision``'s form for ``weight`` (out × in). ``gram`` is the input Gram
    matrix XᵀX (in × in, float64) for activation-aware forms; ``None`` means identity."""
    _ensure_loaded()
    if decision.kind not in FACTORIZERS:
        raise KeyError(f"no factorizer for decision kind {decision.kind!r}; known: {sorted(FACTORIZERS)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has NaN or inf entries; cannot factorize")
    return FACTORIZERS[decision.kind](weight, decision, gram)


def reconstruct(decision: Decision, tensors: dict[str, Tensor]) -> Tensor:
    """The dense (out × in) matrix the compressed form computes."""
    _ensure_loaded()
    return RECONSTRUCTORS[decision.kind](decision, tensors)


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
