"""Module-swap forms of the 2:4 sparse and combined (core + low-rank) linears.

    Sparse24Linear:        y = x Sᵀ + b              via slimfx::sparse24_linear
    LowRankQuantLinear:    y = x deq(Q)ᵀ + x Vᵀ Uᵀ + b  via slimfx::quant_lowrank_linear
    Sparse24LowRankLinear: y = x Sᵀ + x Vᵀ Uᵀ + b      via slimfx::sparse24_lowrank_linear

Integer tensors are persistent buffers (``meta``, ``qweight``, ``zeros``; ``scales`` too, as in
``QuantLinear``); float weights that can be trained are Parameters (``values``, ``U``, ``V``,
``bias``). ``empty()`` builds the shapes from the config, so a saved state dict loads back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimfx.ir import ops, ops_sparse
from slimfx.ir.modules import SlimLinear, _Device, _param
from slimfx.planning.configs import LowRankQuantConfig, Sparse24Config, Sparse24LowRankConfig

__all__ = ["Sparse24Linear", "LowRankQuantLinear", "Sparse24LowRankLinear"]


def _check_in(in_features: int) -> None:
    if in_features % 8:
        raise ValueError(
            f"in_features {in_features} is not a multiple of 8 (2:4 metadata packs two groups "
            "of four columns per byte)"
        )


class _SparseStorage(SlimLinear):
    """``values`` (Parameter, out × in/2) and ``meta`` (uint8 buffer, out × in/8)."""

    def _init_sparse(self, dtype: torch.dtype, device: _Device) -> None:
        in_f, out_f = self.in_features, self.out_features
        _check_in(in_f)
        self.values = _param(out_f, in_f // 2, dtype=dtype, device=device)
        self.register_buffer(
            "meta", torch.zeros(out_f, in_f // 8, dtype=torch.uint8, device=device)
        )

    def sparse_weight(self) -> Tensor:
        """The dense 2:4 matrix S (out × in) in the values' dtype, for inspection and tests."""
        return ops_sparse.densify24(self.values, self.meta, self.in_features).to(self.values.dtype)


class Sparse24Linear(_SparseStorage):
    """A linear whose weight keeps two of every four input columns."""

    decision_kind = "sparse24"

    def __init__(
        self,
        decision: Sparse24Config,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(decision, in_features, out_features)
        self._init_sparse(dtype, device)
        self._init_bias(bias, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return ops_sparse.sparse24_linear(x, self.values, self.meta, self.bias)


class LowRankQuantLinear(SlimLinear):
    """A quantized weight plus a low-rank correction (LoRC / LQ-LoRA)."""

    decision_kind = "lowrank_quant"

    def __init__(
        self,
        decision: LowRankQuantConfig,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(decision, in_features, out_features)
        self._init_quant(decision, "quant_lowrank_linear", dtype, device)
        self._init_lowrank(decision.rank, dtype, device)
        self._init_bias(bias, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        y = self._packed_product(x)
        if y is not None:
            return y + ops.lowrank_linear(x, self.U, self.V, self.bias)
        return ops_sparse.quant_lowrank_linear(
            x,
            self.qweight,
            self.scales,
            self.zeros,
            self.U,
            self.V,
            self.bias,
            self.bits,
            self.group_size,
        )


class Sparse24LowRankLinear(_SparseStorage):
    """A 2:4 sparse weight plus a low-rank correction (S + L)."""

    decision_kind = "sparse24_lowrank"

    def __init__(
        self,
        decision: Sparse24LowRankConfig,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(decision, in_features, out_features)
        self._init_sparse(dtype, device)
        self._init_lowrank(decision.rank, dtype, device)
        self._init_bias(bias, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return ops_sparse.sparse24_lowrank_linear(
            x, self.values, self.meta, self.U, self.V, self.bias
        )

