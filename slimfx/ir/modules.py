"""Modules that replace ``nn.Linear`` in a module swap. Each forward calls one slimfx op.

Every class can be built empty from ``(decision, in_features, out_features, bias, dtype)``
(for loading a saved rewritten model) and filled from the tensors that
``slimfx.numerics.factorize`` returns. Which class realizes a kind is its form's ``module``
(``slimfx.forms``); :func:`module_for` asks the registry.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from slimfx import forms
from slimfx.formats import RUNTIME_BITS, packed_width
from slimfx.ir import cpu_packed, ops
from slimfx.planning.configs import Decision, LowRankConfig, LowRankQuantConfig, QuantConfig

__all__ = ["SlimLinear", "LowRankLinear", "module_for", "carry_hooks", "hooked"]


#: where a module's tensors live (the ``device`` argument of every constructor below)
_Device = torch.device | str | None


def _param(*shape: int, dtype: torch.dtype, device: _Device) -> nn.Parameter:
    """An uninitialized Parameter (filled by ``load_factors`` or ``load_state_dict``)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))


class SlimLinear(nn.Module):
    """Base of rewritten linears: remembers its decision and the dense shape it replaces.

    Subclasses take ``(decision, in_features, out_features, bias, dtype, device)`` and build
    their tensors with the ``_init_*`` helpers below, so each storage (low-rank factors,
    quantized codes, bias) has one layout and one set of names (the state-dict keys).
    """

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
        """An instance with correctly shaped, uninitialized tensors (for load_state_dict).

        Every subclass constructor takes these six arguments, in this order."""
        if cls.decision_kind == "abstract":
            raise NotImplementedError
        make: Any = cls  # the subclass signature, not SlimLinear's three arguments
        return make(decision, in_features, out_features, bias, dtype, device)

    def load_factors(self, tensors: dict[str, Tensor], bias: Tensor | None) -> SlimLinear:
        """Copy the tensors ``factorize`` produced (names match parameters/buffers)."""
        for name, t in tensors.items():
            getattr(self, name).data = t.detach().clone()
        if bias is not None:
            self.bias.data = bias.detach().clone()
        return self

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.decision.short()}"

    # ---- the packed CPU path (slimfx.ir.cpu_runtime installs it; slimfx.ir.cpu_packed runs it)

    def _packed_product(self, x: Tensor) -> Tensor | None:
        """``x @ deq(W)ᵀ`` (no bias) by the packed CPU kernel installed on this module, or
        ``None`` where the reference op must run: nothing installed, ``x`` not on the CPU,
        under ``torch.export`` (graphs and ONNX keep the reference op), or a forward that
        needs ``x``'s gradient. Codes changed since packing are packed again first (eager)."""
        packed = self.__dict__.get("_cpu_packed")
        if packed is None or x.device.type != "cpu" or torch.compiler.is_exporting():
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        q, s, z = self.qweight, self.scales, self.zeros
        if not torch.compiler.is_compiling() and packed.stale(q, s, z):
            packed = cpu_packed.pack_quant(
                q, s, z, self.bits, self.group_size, self.in_features,
                activations=packed.policy, dequant_rows=packed.dequant_rows,
            )
            self.__dict__["_cpu_packed"] = packed
        return packed(x)

    # ---- storage helpers (called from subclass constructors; they fix the tensor names)

    def _init_bias(self, bias: bool, dtype: torch.dtype, device: _Device) -> None:
        """``bias`` (Parameter, out) or ``None``."""
        self.bias = _param(self.out_features, dtype=dtype, device=device) if bias else None

    def _init_lowrank(self, rank: int, dtype: torch.dtype, device: _Device) -> None:
        """``U`` (Parameter, out × rank) and ``V`` (Parameter, rank × in)."""
        self.U = _param(self.out_features, rank, dtype=dtype, device=device)
        self.V = _param(rank, self.in_features, dtype=dtype, device=device)

    def _init_quant(
        self,
        decision: QuantConfig | LowRankQuantConfig,
        op_name: str,
        dtype: torch.dtype,
        device: _Device,
    ) -> None:
        """Integer codes for a weight-only quantized ``decision`` (``bits``, ``group_size``,
        ``symmetric``): attributes ``bits`` and ``group_size`` (``in_features`` when per
        channel), persistent buffers ``qweight`` uint8 (out × ``formats.packed_width``: in/2 for
        int4, in for int8), ``scales`` (out × n_groups, ``dtype``) and ``zeros`` uint8
        (out × n_groups, or ``None`` when symmetric). ``op_name`` names the kernel in the bits error."""
        in_f, out_f = self.in_features, self.out_features
        if decision.bits not in RUNTIME_BITS:
            raise ValueError(f"bits {decision.bits} has no kernel ({op_name} runs 4 or 8)")
        G = in_f if decision.group_size is None else decision.group_size
        if in_f % G:
            raise ValueError(f"in_features {in_f} is not a multiple of group size {G}")
        self.bits, self.group_size = decision.bits, G
        n_groups = in_f // G
        width = packed_width(decision.bits, in_f)
        u8 = {"dtype": torch.uint8, "device": device}
        self.register_buffer("qweight", torch.zeros(out_f, width, **u8))
        self.register_buffer("scales", torch.ones(out_f, n_groups, dtype=dtype, device=device))
        zeros = None if decision.symmetric else torch.zeros(out_f, n_groups, **u8)
        self.register_buffer("zeros", zeros)


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
        self._init_lowrank(decision.rank, dtype, device)
        self._init_bias(bias, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return ops.lowrank_linear(x, self.U, self.V, self.bias)


def module_for(decision: Decision) -> type[SlimLinear]:
    """The module class that realizes ``decision``: its form's ``module``. An unregistered kind
    raises ``forms.UnknownFormError`` (a KeyError naming the registered kinds); a form with no
    module of its own (dense) a KeyError saying so."""
    form = forms.form_of(decision)
    if not form.has("module"):
        why = form.why_not("module")
        raise KeyError(f"no module realizes decision kind {decision.kind!r}: {why}")
    return form.get("module")


#: an ``nn.Module``'s forward-hook tables (hooks, and the flags keyed by hook id)
_HOOK_TABLES = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
)  # fmt: skip


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` (the module a rewrite puts where ``old`` was) the forward hooks and
    pre-hooks registered on ``old``: the very tables when ``new`` has none of its own, so a
    handle the caller kept still removes them; else copies, in order."""
    share = not any(getattr(new, t) for t in _HOOK_TABLES)
    for t in _HOOK_TABLES:
        if share:
            object.__setattr__(new, t, getattr(old, t))
        else:
            getattr(new, t).update(getattr(old, t))


def hooked(model: nn.Module, fqns: Any) -> list[str]:
    """The modules among ``fqns`` that have forward hooks or pre-hooks registered."""
    mods = dict(model.named_modules())
    return [f for f in fqns if f in mods and (mods[f]._forward_hooks or mods[f]._forward_pre_hooks)]
