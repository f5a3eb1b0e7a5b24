"""Weights a rewritten attention block adds, stored as int8 rows (``factor_bits=8``).

MLA (``MLAConfig``) and the low-rank KV caches (``KVLowRankConfig`` / ``KVLatentQuantConfig``)
add weights of their own — MLA's RoPE key rows, down-projection, key and value up-projections
and q_mix maps; a low-rank cache's down- and up-projections and the k/v projections its sink
tokens keep — which count in the weight budget and crowd the other linears there, so each is
offered as int8 too: symmetric codes with one scale per output row (``scale = max|row| / 127``
rounded to the model's dtype first, so the codes are exact against the stored scale).

:class:`Int8Rows` holds one such tensor (its leading dims flattened into rows) and gives it back
as ``weight``, or as codes and scales (``codes_and_scales``) for a product that applies the row
scales to its output; :class:`Int8Factor` is the projection ``x ↦ x Wᵀ + b`` of one, with the
``in_features`` / ``out_features`` / ``weight`` / ``bias`` of the ``nn.Linear`` it replaces, so
code that reads ``.weight`` runs unchanged. ONNX: ``weight`` read while exporting goes through
``slimfx::dequant_rows`` (``DequantizeLinear`` of the int8 codes); MLA's export block
(``backends/onnx_mla``) lays its products over the hidden states and q_mix out as 8-bit
MatMulNBits instead. Bytes: 1 per code, 2 per row scale (priced as 16-bit, as every float),
biases at 16 bits (``MLAConfig.converted_weight_bytes``, ``KVLowRankConfig.
projection_weight_bytes``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import slimfx.ir.ops  # noqa: F401  (registers slimfx::dequant_rows)

__all__ = ["Int8Rows", "Int8Factor", "quantize_rows", "dequantized"]


def dequantized(w: Tensor, dtype: torch.dtype) -> Tensor:
    """``w`` as :class:`Int8Rows` stores it in a ``dtype`` model (codes · scale, rows along the
    last dim), in ``w``'s dtype: what a fit's candidate with int8 factors computes with."""
    codes, scale = quantize_rows(w.reshape(-1, w.shape[-1]), dtype)
    return (codes.to(scale.dtype) * scale).view(w.shape).to(w.dtype)


def quantize_rows(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes of ``w`` with one ``dtype`` scale per row (last dim reduced):
    ``(codes, scale)`` with ``scale`` of shape ``(*w.shape[:-1], 1)``; a zero row gets a tiny
    scale and zero codes."""
    wf = w.detach().float()
    tiny = torch.finfo(dtype).tiny
    scale = (wf.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(tiny).to(dtype)
    codes = torch.round(wf / scale.float()).clamp_(-127, 127).to(torch.int8)
    return codes, scale


class Int8Rows(nn.Module):
    """One tensor stored as int8 codes ``(rows, n)`` and one scale per row ``(rows,)`` (the
    tensor's leading dims flattened into rows); ``weight`` dequantizes it to its shape."""

    def __init__(self, w: Tensor, dtype: torch.dtype, device: torch.device | None = None) -> None:
        super().__init__()
        self.shape = tuple(int(n) for n in w.shape)
        codes, scale = quantize_rows(w.reshape(-1, w.shape[-1]), dtype)
        self.register_buffer("codes", codes.to(device), persistent=True)
        self.register_buffer("scale", scale[:, 0].to(device), persistent=True)

    @property
    def weight(self) -> Tensor:
        """The dequantized tensor, ``codes · scale``, in the scale's dtype; while exporting,
        through ``slimfx::dequant_rows`` (an ONNX ``DequantizeLinear`` of the int8 codes)."""
        if torch.compiler.is_exporting():
            w = torch.ops.slimfx.dequant_rows(self.codes, self.scale)
        else:
            w = self.codes.to(self.scale.dtype) * self.scale[:, None]
        return w.view(self.shape)

    def codes_and_scales(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The codes in ``dtype`` in the tensor's shape and the scales ``(*shape[:-1])``: a
        product with the tensor is the product with the codes, scaled after — one pass over the
        codes instead of a dequantized copy (the scale is on the small side of the product)."""
        return self.codes.view(self.shape).to(dtype), self.scale.view(self.shape[:-1]).to(dtype)


class Int8Factor(Int8Rows):
    """``F.linear(x, codes · scale, bias)``: an ``nn.Linear`` (out × in) of the converted block
    whose weight is stored as :class:`Int8Rows`; the bias stays in the model's dtype."""

    def __init__(
        self, w: Tensor, b: Tensor | None, dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        super().__init__(w, dtype, device)
        self.out_features, self.in_features = self.shape
        if b is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(b.detach().to(device=device, dtype=dtype).clone())

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_exporting():  # DequantizeLinear of the codes, then MatMul
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        codes, scale = self.codes_and_scales(x.dtype)
        y = F.linear(x, codes) * scale  # (x Cᵀ) · s = x (s C)ᵀ
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 rows")
