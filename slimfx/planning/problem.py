"""The budget problem in numbers only: per site a list of options, and the user's budget.

A ``BudgetProblem`` is what the cost model hands to a solver. It carries no tensors and no
torch: each ``Option`` is a decision with its reference bytes, error (on one common scale),
FLOPs and estimated latency for the workload the user asked for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from slimfx.planning.configs import Decision, DenseConfig, decision_from_dict

__all__ = ["Option", "SiteOptions", "BudgetProblem", "Budget", "InfeasibleBudgetError"]


class InfeasibleBudgetError(ValueError):
    """Raised when no choice of options meets the budget; names the smallest achievable."""


@dataclass(frozen=True)
class Option:
    """One way to realize one site.

    ``bytes``: reference bytes the site stores in this form (16-bit floats, true integer
    widths, metadata included; a tied weight's extra copy included). ``error``: estimated
    relative output error (activation-aware, times sensitivity when known). ``latency_s``:
    estimated seconds per forward for the workload. ``source``: how latency was obtained
    (``roofline`` or ``measured``).
    """

    decision: Decision
    bytes: int
    error: float
    flops: int = 0
    latency_s: float = 0.0
    source: str = "roofline"

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision.to_dict(),
            "bytes": self.bytes,
            "error": self.error,
            "flops": self.flops,
            "latency_s": self.latency_s,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Option:
        d = dict(d)
        d["decision"] = decision_from_dict(d["decision"])
        return cls(**d)


@dataclass
class SiteOptions:
    """The options of one site. ``dense_bytes`` / ``dense_latency_s`` are the site's
    reference (its dense form at 16 bits) against which fractions are taken. ``sensitivity``:
    the weight the options' errors already carry (a Fisher loss sensitivity; 1.0 without one)
    — ``option.error / sensitivity`` is the site's own relative output error."""

    name: str
    options: list[Option]
    dense_bytes: int
    dense_latency_s: float = 0.0
    sensitivity: float = 1.0

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"site {self.name!r} has no options")
        for o in self.options:
            if not (math.isfinite(o.error) and o.error >= 0):
                raise ValueError(f"site {self.name!r}: option {o.decision.short()} has error {o.error}")

    def index_of(self, decision: Decision) -> int:
        for i, o in enumerate(self.options):
            if o.decision == decision:
                return i
        raise KeyError(f"{decision.short()} is not an option of {self.name}")

    def dense_index(self) -> int | None:
        for i, o in enumerate(self.options):
            if isinstance(o.decision, DenseConfig):
                return i
        return None


@dataclass(frozen=True)
class Budget:
    """What the user allows.

    - ``memory``: a fraction (0, 1] of the rewritable linears' dense 16-bit bytes, or an
      absolute byte count when > 1.
    - ``bits``: effective bits per weight over the rewritable linears (scales, zeros, masks
      and factors counted); ``bits=4`` is the same as ``memory=0.25``.
    - ``latency``: a fraction (0, 1] of the dense estimated latency for the workload.
    - ``max_error``: a cap on each site's estimated relative output error.

    Given only ``max_error``, the solver minimizes bytes; otherwise it minimizes the summed
    error under the limits.
    """

    memory: float | None = None
    bits: float | None = None
    latency: float | None = None
    max_error: float | None = None

    def __post_init__(self) -> None:
        for name in ("memory", "bits", "latency", "max_error"):  # numbers only: no str, no bool
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError(f"Budget.{name} must be a number, got {v!r} ({type(v).__name__})")
            if v is not None and not math.isfinite(v):
                raise ValueError(f"Budget.{name} must be finite, got {v!r}")
        if self.memory is not None:
            if not (isinstance(self.memory, (int, float)) and math.isfinite(self.memory)):
                raise ValueError(f"memory budget must be a number, got {self.memory!r}")
            if self.memory <= 0:
                raise ValueError(f"memory budget must be > 0, got {self.memory}")
        if self.bits is not None and not (0 < self.bits <= 16):
            raise ValueError(f"bits must be in (0, 16], got {self.bits}")
        if self.latency is not None and not (0 < self.latency <= 1):
            raise ValueError(f"latency budget is a fraction in (0, 1], got {self.latency}")
        if self.max_error is not None and not (self.max_error >= 0):
            raise ValueError(f"max_error must be ≥ 0, got {self.max_error}")
        if self.memory is not None and self.bits is not None:
            raise ValueError("give memory or bits, not both")

    @classmethod
    def of(cls, budget: float | Budget | None) -> Budget:
        """``optimize(budget=0.5)`` → ``Budget(memory=0.5)``, with the fraction checked."""
        if budget is None:
            return cls()
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(f"budget must be a fraction in (0, 1] or a Budget, got {budget!r}")
        if not (0 < budget <= 1):
            raise ValueError(
                f"budget={budget} is not a fraction in (0, 1]; use Budget(memory=bytes) for "
                "an absolute byte count"
            )
        return cls(memory=float(budget))

    def memory_bytes(self, dense_bytes: int) -> float | None:
        """The byte limit for a problem whose dense reference is ``dense_bytes``."""
        if self.bits is not None:
            return dense_bytes * self.bits / 16.0
        if self.memory is None:
            return None
        return dense_bytes * self.memory if self.memory <= 1 else float(self.memory)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("memory", "bits", "latency", "max_error")}


@dataclass
class BudgetProblem:
    """Sites × options, plus the workload they were priced for."""

    sites: list[SiteOptions]
    workload: str = "decode"
    target: str = "cpu"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("duplicate site names in BudgetProblem")

    @property
    def dense_bytes(self) -> int:
        return sum(s.dense_bytes for s in self.sites)

    @property
    def dense_latency_s(self) -> float:
        return sum(s.dense_latency_s for s in self.sites)

    def min_bytes(self, max_error: float | None = None) -> int:
        return sum(min(o.bytes for o in allowed(s, max_error)) for s in self.sites)

    def site(self, name: str) -> SiteOptions:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(
            {
                "workload": self.workload,
                "target": self.target,
                "meta": self.meta,
                "sites": [
                    {
                        "name": s.name,
                        "dense_bytes": s.dense_bytes,
                        "dense_latency_s": s.dense_latency_s,
                        "sensitivity": s.sensitivity,
                        "options": [o.to_dict() for o in s.options],
                    }
                    for s in self.sites
                ],
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> BudgetProblem:
        d = json.loads(text)
        sites = [
            SiteOptions(
                s["name"],
                [Option.from_dict(o) for o in s["options"]],
                s["dense_bytes"],
                s["dense_latency_s"],
                s.get("sensitivity", 1.0),
            )
            for s in d["sites"]
        ]
        return cls(sites, d["workload"], d["target"], d.get("meta", {}))


def allowed(site: SiteOptions, max_error: float | None) -> list[Option]:
    """Options of ``site`` within the per-site error cap (dense is always allowed)."""
    if max_error is None:
        return list(site.options)
    keep = [o for o in site.options if o.error <= max_error or isinstance(o.decision, DenseConfig)]
    return keep or list(site.options)
