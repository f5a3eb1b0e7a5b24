"""Rules, verdicts and pass records: the vocabulary every pass speaks.

A pass applies decisions; it never picks them. A ``Rule`` handles one decision kind:
``check`` says whether it can apply that decision to that site (a rejection always carries a
reason), ``build_module`` makes the replacement module for a module swap, ``graph_call`` gives
the op and constant tensors for a graph rewrite. Both paths call ``slimfx.numerics.factorize``,
so they agree by construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from slimfx import forms
from slimfx.ir.match import linear_weight
from slimfx.ir.modules import SlimLinear, module_for
from slimfx.ir.sites import LinearSite, Site
from slimfx.numerics import factorize
from slimfx.planning.configs import Decision

__all__ = [
    "Verdict",
    "Rule",
    "RULES",
    "register_rule",
    "rule_for",
    "non_linear_site_reason",
    "SiteRecord",
    "PassResult",
]


@dataclass(frozen=True)
class Verdict:
    """``ok`` or a rejection with its reason."""

    ok: bool
    reason: str = ""

    @classmethod
    def accept(cls) -> Verdict:
        return cls(True)

    @classmethod
    def reject(cls, reason: str) -> Verdict:
        if not reason:
            raise ValueError("a rejection needs a reason")
        return cls(False, reason)


class Rule:
    """Applies one decision kind to a site of kind ``site_kind`` (``"linear"``: a
    ``LinearSite``). Subclasses set ``kind`` and ``name`` and usually override ``check``
    (calling ``super().check`` first) and ``op_call``."""

    kind: str = "abstract"
    name: str = "Rule"
    site_kind: str = "linear"

    def check(self, site: Site, decision: Decision, weight: Tensor | None = None) -> Verdict:
        if decision.kind != self.kind:
            return Verdict.reject(f"{self.name} handles {self.kind!r}, not {decision.kind!r}")
        if site.kind != self.site_kind:
            return Verdict.reject(f"{self.name} rewrites {self.site_kind} sites, not {site.kind}")
        if weight is not None:
            if tuple(weight.shape) != site.shape:
                return Verdict.reject(
                    f"weight shape {tuple(weight.shape)} does not match the site's {site.shape}"
                )
            if not torch.isfinite(weight).all():
                return Verdict.reject("weight has NaN or inf entries")
            if not weight.is_floating_point():
                return Verdict.reject(f"weight dtype {weight.dtype} is not floating point")
        return Verdict.accept()

    def factorize(
        self, weight: Tensor, decision: Decision, gram: Tensor | None
    ) -> dict[str, Tensor]:
        """The form's tensors (see ``slimfx.numerics``), made contiguous: an SVD factor comes
        back column-major, and a module built from it must compute exactly what the same
        module loaded from a ``state_dict`` (always row-major) computes."""
        return {k: t.contiguous() for k, t in factorize(weight, decision, gram).items()}

    def build_module(
        self,
        site: LinearSite,
        linear: nn.Module,
        decision: Decision,
        gram: Tensor | None = None,
        tensors: dict[str, Tensor] | None = None,
    ) -> SlimLinear:
        """The module that replaces ``linear`` (weight and bias read from it)."""
        weight = linear_weight(linear).detach()
        bias = None if getattr(linear, "bias", None) is None else linear.bias.detach()
        tensors = tensors if tensors is not None else self.factorize(weight, decision, gram)
        cls = module_for(decision)
        mod = cls.empty(
            decision, site.in_features, site.out_features, bias is not None, weight.dtype,
            weight.device,
        )
        return mod.load_factors(tensors, bias)

    def op_call(
        self, decision: Decision, tensors: dict[str, Tensor]
    ) -> tuple[Any, list[str], dict[str, Any]]:
        """For a graph rewrite: ``(op overload, ordered names of tensor args after x, extra
        non-tensor kwargs)``; the bias goes last as a tensor arg named ``bias``. A name missing from
        ``tensors`` is passed as ``None`` (an optional tensor arg, e.g. symmetric ``zeros``)."""
        raise NotImplementedError(f"{self.name} has no graph form")


#: rules registered with :func:`register_rule`: overrides of a form's own rule, by kind.
RULES: dict[str, Rule] = {}


def register_rule(rule: Rule) -> Rule:
    """Make ``rule`` the one used for its decision kind (over the form's own rule)."""
    RULES[rule.kind] = rule
    return rule


def rule_for(decision: Decision) -> Rule:
    """The rule for ``decision``'s kind: an override from :func:`register_rule`, else its form's
    ``rule`` (``slimfx.forms``). KeyError names the registered kinds, or why the form has none."""
    if decision.kind in RULES:
        return RULES[decision.kind]
    form = forms.form_of(decision)
    if not form.has("rule"):
        raise KeyError(f"no rule for decision kind {decision.kind!r}: {form.why_not('rule')}")
    return form.get("rule")


def non_linear_site_reason(site: Site, decision: Decision) -> str:
    """Why a linear-site pass (module swap, graph rewrite) does not apply ``decision`` at a site
    of another kind: its form's reason when the form has no rule (a KV-cache or MLA form names
    what applies it instead), else that the pass rewrites linear sites only."""
    try:
        form = forms.form_of(decision)
    except forms.UnknownFormError:
        form = None
    if form is not None and decision.kind not in RULES and not form.has("rule"):
        return f"{form.kind}: {form.why_not('rule')}"
    return f"this pass rewrites linear sites, not {site.kind} sites"


@dataclass
class SiteRecord:
    """What a pass did at one site."""

    fqn: str
    decision: str
    status: str  # "applied" | "rejected" | "skipped"
    reason: str = ""
    seconds: float = 0.0
    bytes_before: int = 0
    bytes_after: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PassResult:
    """A pass's truthful ``modified`` flag and its per-site records."""

    name: str
    modified: bool = False
    records: list[SiteRecord] = field(default_factory=list)
    seconds: float = 0.0

    def applied(self) -> list[SiteRecord]:
        return [r for r in self.records if r.status == "applied"]

    def rejected(self) -> list[SiteRecord]:
        return [r for r in self.records if r.status == "rejected"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modified": self.modified,
            "seconds": self.seconds,
            "records": [r.to_dict() for r in self.records],
        }
