"""Modules that replace ``nn.Linear`` in a module swap. Each forward calls one slimfx op.

Every class can be built empty from ``(decision, in_features, out_features, bias, dtype)``
(for loading a saved rewritten model) and filled from the tensors that
``slimfx.numerics.factorize`` returns.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimfx.ir import ops
from slimfx.planning.configs import Decision, LowRankConfig

__all__ = ["SlimLinear", "LowRankLinear", "MODULES", "module_for"]


class SlimLinear(nn.Module):
    """Base of rewritten linears: remembers its decision and the dense shape it replaces."""

    decision_kind: str = "abstract"

    def __init__(self, decision: Decision, in_features: int, out_features: int) -> None:
        super().__init__()
        self.decision = decision
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def empty(
        cls,
        decision: Decision,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> SlimLinear:
        """An instance with correctly shaped, uninitialized tensors (for load_state_dict)."""
        raise NotImplementedError

    def load_factors(self, tensors: dict[str, Tensor], bias: Tensor | None) -> SlimLinear:
        """Copy the tensors ``factorize`` produced (names match parameters/buffers)."""
        for name, t in tensors.items():
            getattr(self, name).data = t.detach().clone()
        if bias is not None:
            self.bias.data = bias.detach().clone()
        return self

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.decision.short()}"


class LowRankLinear(SlimLinear):
    """``y = x Vᵀ Uᵀ + b`` via ``slimfx::lowrank_linear``."""

    decision_kind = "lowrank"

    def __init__(
        self,
        decision: LowRankConfig,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(decision, in_features, out_features)
        r = decision.rank
        self.U = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.V = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        )

    @classmethod
    def empty(cls, decision, in_features, out_features, bias, dtype=torch.float32, device=None):  # noqa: ANN001
        return cls(decision, in_features, out_features, bias, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return ops.lowrank_linear(x, self.U, self.V, self.bias)


#: decision kind → module class; the quantized/sparse forms register themselves here too.
MODULES: dict[str, type[SlimLinear]] = {"lowrank": LowRankLinear}


def module_for(decision: Decision) -> type[SlimLinear]:
    """The module class that realizes ``decision`` (KeyError names the kind when none)."""
    try:
        return MODULES[decision.kind]
    except KeyError:
        raise KeyError(
            f"no module realizes decision kind {decision.kind!r}; known: {sorted(MODULES)}"
        ) from None

import slimfx.ir.modules_quant  # noqa: E402,F401  (registers MODULES["quant"])
import slimfx.ir.modules_sparse  # noqa: E402,F401  (registers the 2:4 and combined forms)
