"""``QuantLinear``: the module-swap form of a weight-only quantized linear.

    y = x @ deq(W)ᵀ + b   via   slimfx::quant_linear(x, qweight, scales, zeros?, bias?, bits, G)

Buffers (persistent, so ``state_dict`` / ``load_state_dict`` round-trip): ``qweight`` uint8
(out × ``formats.packed_width(bits, in)``), ``scales`` (out × n_groups) in the weight dtype,
``zeros`` uint8 (out × n_groups) when asymmetric (``None`` and absent from the state dict when
symmetric). ``bias`` is a Parameter when present. ``G`` is the config's group size, or
``in_features`` for a per-channel config.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx.ir import ops_quant
from slimfx.ir.modules import SlimLinear
from slimfx.planning.configs import QuantConfig

__all__ = ["QuantLinear"]


class QuantLinear(SlimLinear):
    """A linear stored as integer codes plus per-group scales (and zero points)."""

    decision_kind = "quant"

    def __init__(
        self,
        decision: QuantConfig,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(decision, in_features, out_features)
        self._init_quant(decision, "quant_linear", dtype, device)
        self._init_bias(bias, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        y = self._packed_product(x)
        if y is not None:
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return ops_quant.quant_linear(
            x, self.qweight, self.scales, self.zeros, self.bias, self.bits, self.group_size
        )

    def dequantized_weight(self) -> Tensor:
        """The dense weight (out × in) in the scales' dtype, for inspection and tests."""
        w = ops_quant.dequantize_weight(
            self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features
        )
        return w.to(self.scales.dtype)

