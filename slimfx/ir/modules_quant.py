"""``QuantLinear``: the module-swap form of a weight-only quantized linear.

    y = x @ deq(W)ᵀ + b   via   slimfx::quant_linear(x, qweight, scales, zeros?, bias?, bits, G)

Buffers (persistent, so ``state_dict`` / ``load_state_dict`` round-trip): ``qweight`` uint8
(out × in/2 for int4, out × in for int8), ``scales`` (out × n_groups) in the weight dtype,
``zeros`` uint8 (out × n_groups) when asymmetric (``None`` and absent from the state dict when
symmetric). ``bias`` is a Parameter when present. ``G`` is the config's group size, or
``in_features`` for a per-channel config.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimfx.ir import ops_quant
from slimfx.ir.modules import MODULES, SlimLinear
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
        if decision.bits not in (4, 8):
            raise ValueError(f"bits {decision.bits} has no kernel (quant_linear runs 4 or 8)")
        G = in_features if decision.group_size is None else decision.group_size
        if in_features % G:
            raise ValueError(f"in_features {in_features} is not a multiple of group size {G}")
        self.bits = decision.bits
        self.group_size = G
        n_groups = in_features // G
        width = (in_features + 1) // 2 if decision.bits == 4 else in_features
        u8 = {"dtype": torch.uint8, "device": device}
        self.register_buffer("qweight", torch.zeros(out_features, width, **u8))
        self.register_buffer(
            "scales", torch.ones(out_features, n_groups, dtype=dtype, device=device)
        )
        zeros = None if decision.symmetric else torch.zeros(out_features, n_groups, **u8)
        self.register_buffer("zeros", zeros)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        )

    @classmethod
    def empty(cls, decision, in_features, out_features, bias, dtype=torch.float32, device=None):  # noqa: ANN001
        return cls(decision, in_features, out_features, bias, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return ops_quant.quant_linear(
            x, self.qweight, self.scales, self.zeros, self.bias, self.bits, self.group_size
        )

    def dequantized_weight(self) -> Tensor:
        """The dense weight (out × in) in the scales' dtype, for inspection and tests."""
        w = ops_quant.dequantize_weight(
            self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features
        )
        return w.to(self.scales.dtype)


MODULES["quant"] = QuantLinear
