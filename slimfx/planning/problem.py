"""The budget problem in numbers only: per site a list of options, and the user's budget.

A ``BudgetProblem`` is what the cost model hands to a solver. It carries no tensors and no
torch: each ``Option`` is a decision with its reference bytes, error (on one common scale),
FLOPs and estimated latency for the workload the user asked for.

Beyond one linear per site:

- an option costs in several budget dimensions (``Option.costs``: ``weight_bytes`` — also
  ``Option.bytes`` — and ``kv_bytes_per_token``, see ``slimfx.planning.shapes``), and a
  ``Budget`` caps each (``memory``/``bits`` on weight bytes, ``kv`` on KV-cache bytes per token);
- an option may own other sites (``Option.covers``: an attention conversion owning its k/v
  projections). Its costs and error then include theirs, and an owned site takes no option of
  its own when an owning option is chosen: each owned site is covered by exactly one of its
  own options or by one owning option (``slimfx.planning.solve``).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from slimfx.planning.configs import Decision, DenseConfig, decision_from_dict
from slimfx.planning.shapes import (
    KV_BYTES_PER_TOKEN,
    KV_CACHE_BYTES,
    TOTAL_BYTES,
    WEIGHT_BYTES,
    Shape,
    shape_from_dict,
)

__all__ = ["Option", "SiteOptions", "BudgetProblem", "Budget", "InfeasibleBudgetError"]


class InfeasibleBudgetError(ValueError):
    """Raised when no choice of options meets the budget; names the smallest achievable.
    ``limits``: the budget dimensions that cannot be met (``"memory"``, ``"latency"``,
    ``"kv"``, ``"total"``; together when each alone is reachable)."""

    def __init__(self, message: str, limits: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.limits = tuple(limits)


@dataclass(frozen=True)
class Option:
    """One way to realize one site.

    ``bytes``: reference bytes the site stores in this form (16-bit floats, true integer
    widths, metadata included; a tied weight's extra copy included). ``error``: estimated
    relative output error (activation-aware, times sensitivity when known). ``latency_s``:
    estimated seconds per forward for the workload. ``source``: how latency was obtained
    (``roofline`` or ``measured``).

    ``costs``: bytes per budget dimension (``slimfx.planning.shapes.DIMENSIONS``); its
    ``weight_bytes`` entry is ``bytes`` (filled in when absent, an error when different).
    ``covers``: names of other sites this option owns — its costs and error include theirs,
    and they take no option of their own when it is chosen. ``weight``: the loss-sensitivity
    weight ``error`` carries when it is not its site's (a per-kind weight); ``None``: the
    site's ``sensitivity``.
    """

    decision: Decision
    bytes: int
    error: float
    flops: int = 0
    latency_s: float = 0.0
    source: str = "roofline"
    costs: Mapping[str, int] = field(default_factory=dict)
    covers: tuple[str, ...] = ()
    weight: float | None = None

    def __post_init__(self) -> None:
        costs = {str(k): int(v) for k, v in dict(self.costs).items()}
        if costs.setdefault(WEIGHT_BYTES, int(self.bytes)) != int(self.bytes):
            raise ValueError(
                f"option {self.decision.short()}: costs[{WEIGHT_BYTES!r}]={costs[WEIGHT_BYTES]} "
                f"differs from bytes={self.bytes}"
            )
        if any(v < 0 for v in costs.values()):
            raise ValueError(f"option {self.decision.short()}: negative cost in {costs}")
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "covers", tuple(self.covers))

    def cost(self, dimension: str) -> int:
        """Bytes in ``dimension`` (0 for a dimension this option does not touch)."""
        return self.costs.get(dimension, 0)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "decision": self.decision.to_dict(),
            "bytes": self.bytes,
            "error": self.error,
            "flops": self.flops,
            "latency_s": self.latency_s,
            "source": self.source,
        }
        if set(self.costs) != {WEIGHT_BYTES}:
            d["costs"] = dict(sorted(self.costs.items()))
        if self.covers:
            d["covers"] = list(self.covers)
        if self.weight is not None:
            d["weight"] = self.weight
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Option:
        d = dict(d)
        d["decision"] = decision_from_dict(d["decision"])
        d["covers"] = tuple(d.get("covers", ()))
        return cls(**d)


@dataclass
class SiteOptions:
    """The options of one site. ``dense_bytes`` / ``dense_latency_s`` are the site's
    reference (its dense form at 16 bits) against which fractions are taken. ``sensitivity``:
    the weight the options' errors already carry (a Fisher loss sensitivity; 1.0 without one)
    — ``option.error / sensitivity`` is the site's own relative output error. ``kind`` /
    ``shape``: the site's kind and shape object (recorded in the plan); ``dense_costs``: the
    dense reference per budget dimension (``weight_bytes`` is ``dense_bytes``)."""

    name: str
    options: list[Option]
    dense_bytes: int
    dense_latency_s: float = 0.0
    sensitivity: float = 1.0
    kind: str = "linear"
    shape: Shape | None = None
    dense_costs: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"site {self.name!r} has no options")
        self.dense_costs = {str(k): int(v) for k, v in self.dense_costs.items()}
        if self.dense_costs.setdefault(WEIGHT_BYTES, int(self.dense_bytes)) != self.dense_bytes:
            raise ValueError(f"site {self.name!r}: dense_costs disagree with dense_bytes")
        if self.shape is not None and self.shape.kind != self.kind:
            raise ValueError(f"site {self.name!r} is {self.kind!r} with a {self.shape.kind} shape")
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
    - ``latency``: a fraction (0, 1] of the dense estimated latency for the workload; with
      ``kv`` or ``total_bytes`` the attention steps over the cache at ``context`` (and
      ``batch``) count too, so ``context`` is required.
    - ``max_error``: a cap on each site's estimated relative output error.
    - ``kv``: a fraction (0, 1] of the attention sites' dense 16-bit KV cache: its bytes per
      token at ``context`` tokens when given (the 16-bit residual window and sink tokens
      counted), else the steady state (the compressed store alone, the limit as the context
      grows).
    - ``total_bytes``: one byte count for the sites' weights *and* the KV cache of ``batch``
      sequences of ``context`` tokens (both required): weights and cache trade against each
      other. Embeddings, norms and other parameters that are not sites are not counted.
    - ``context`` / ``batch``: where the cache is counted (tokens per sequence, sequences);
      with ``latency``, also how long and how many the sequences are that each attention step
      reads (linears are priced at the workload's tokens whatever the batch: at decode their
      weights, read once, dominate).

    Given only ``max_error``, the solver minimizes bytes; otherwise it minimizes the summed
    error under the limits.
    """

    memory: float | None = None
    bits: float | None = None
    latency: float | None = None
    max_error: float | None = None
    kv: float | None = None
    total_bytes: float | None = None
    context: int | None = None
    batch: int | None = None

    def __post_init__(self) -> None:
        for name in ("memory", "bits", "latency", "max_error", "kv", "total_bytes"):  # numbers only
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise TypeError(f"Budget.{name} must be a number, got {v!r} ({type(v).__name__})")
            if v is not None and not isinstance(v, (int, float)):  # numpy's float32, …
                object.__setattr__(self, name, v := float(v))
            if v is not None and not math.isfinite(v):
                raise ValueError(f"Budget.{name} must be finite, got {v!r}")
        if self.kv is not None and not (
            isinstance(self.kv, (int, float)) and not isinstance(self.kv, bool) and 0 < self.kv <= 1
        ):
            raise ValueError(f"kv budget is a fraction in (0, 1] of the dense cache, got {self.kv!r}")
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
        self._check_cache_fields()

    def _check_cache_fields(self) -> None:
        for name in ("context", "batch"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"Budget.{name} is a number of tokens/sequences ≥ 1, got {v!r}")
        if self.total_bytes is not None:
            if self.total_bytes <= 1:
                raise ValueError(
                    f"total_bytes is a byte count (weights + KV cache), got {self.total_bytes!r};"
                    " for fractions use memory= (weights) and kv= (cache)"
                )
            if self.context is None:
                raise ValueError(
                    "Budget(total_bytes=…) counts the KV cache at context= tokens per sequence "
                    "(and batch= sequences, default 1): give context="
                )
        elif self.latency is not None and self.kv is not None and self.context is None:
            raise ValueError(
                "Budget(latency=…, kv=…) prices each attention step's read of the KV cache, "
                "which grows with its length: give context= (tokens per sequence)"
            )
        elif (self.context is not None or self.batch is not None) and self.kv is None:
            raise ValueError(
                "context= / batch= say where the KV cache is counted: they need kv= or total_bytes="
            )
        if self.batch is not None and self.total_bytes is None and self.latency is None:
            raise ValueError(
                "batch= scales the cache in total_bytes= only, and the attention steps of a "
                "latency= budget (kv= is a fraction of the cache, the same for every batch size)"
            )

    @property
    def prices_weights(self) -> bool:
        """Whether this budget limits weight bytes (``memory``, ``bits``, ``total_bytes``) or
        minimizes bytes (``max_error`` alone, or no limit at all)."""
        if any(v is not None for v in (self.memory, self.bits, self.total_bytes)):
            return True
        return self.latency is None and self.kv is None

    @property
    def prices_cache(self) -> bool:
        """Whether this budget counts the KV cache (``kv`` or ``total_bytes``)."""
        return self.kv is not None or self.total_bytes is not None

    @classmethod
    def of(cls, budget: float | Budget | None) -> Budget:
        """``optimize(budget=0.5)`` → ``Budget(memory=0.5)``, with the fraction checked."""
        if budget is None:
            return cls()
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
            raise TypeError(f"budget must be a fraction in (0, 1] or a Budget, got {budget!r}")
        if not (0 < budget <= 1):
            raise ValueError(
                f"budget={budget} is not a fraction in (0, 1]; use Budget(memory=bytes) for "
                "an absolute byte count"
            )
        return cls(memory=float(budget))  # numpy's float32 (a Real, not a float) too

    def memory_bytes(self, dense_bytes: int) -> float | None:
        """The byte limit for a problem whose dense reference is ``dense_bytes``."""
        if self.bits is not None:
            return dense_bytes * self.bits / 16.0
        if self.memory is None:
            return None
        return dense_bytes * self.memory if self.memory <= 1 else float(self.memory)

    def caps(self, dense: Mapping[str, int]) -> dict[str, float]:
        """Byte caps per budget dimension for a problem whose dense reference is ``dense``."""
        out: dict[str, float] = {}
        mem = self.memory_bytes(int(dense.get(WEIGHT_BYTES, 0)))
        if mem is not None:
            out[WEIGHT_BYTES] = mem
        if self.kv is not None:
            dim = KV_CACHE_BYTES if KV_CACHE_BYTES in dense else KV_BYTES_PER_TOKEN
            out[dim] = self.kv * dense.get(dim, 0)
        if self.total_bytes is not None:
            out[TOTAL_BYTES] = float(self.total_bytes)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("memory", "bits", "latency", "max_error")}
        for k in ("kv", "total_bytes", "context", "batch"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


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
        owned = self.owners()
        for s in self.sites:
            for o in s.options:
                bad = [c for c in o.covers if c not in names or c == s.name]
                if bad:
                    raise ValueError(
                        f"site {s.name!r}: option {o.decision.short()} covers {bad}, which are "
                        "not other sites of this problem"
                    )
                if o.covers and s.name in owned:
                    raise ValueError(
                        f"site {s.name!r} is owned by {sorted(owned[s.name])} and owns sites "
                        "itself; ownership is one level deep"
                    )

    def owners(self) -> dict[str, set[str]]:
        """Owned site → the sites with an option that owns it."""
        out: dict[str, set[str]] = {}
        for s in self.sites:
            for o in s.options:
                for c in o.covers:
                    out.setdefault(c, set()).add(s.name)
        return out

    @property
    def covering(self) -> bool:
        """Whether some option owns other sites (only the MILP solves such a problem)."""
        return any(o.covers for s in self.sites for o in s.options)

    @property
    def dense_bytes(self) -> int:
        return sum(s.dense_bytes for s in self.sites)

    @property
    def dense_costs(self) -> dict[str, int]:
        """The dense reference per budget dimension, summed over sites."""
        out: dict[str, int] = {}
        for s in self.sites:
            for k, v in s.dense_costs.items():
                out[k] = out.get(k, 0) + v
        return out

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
                    _site_dict(s)
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
                s.get("kind", "linear"),
                shape_from_dict(s["shape"]) if s.get("shape") else None,
                dict(s.get("dense_costs", {})),
            )
            for s in d["sites"]
        ]
        return cls(sites, d["workload"], d["target"], d.get("meta", {}))


def _site_dict(s: SiteOptions) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": s.name,
        "dense_bytes": s.dense_bytes,
        "dense_latency_s": s.dense_latency_s,
        "sensitivity": s.sensitivity,
        "options": [o.to_dict() for o in s.options],
    }
    if s.kind != "linear" or s.shape is not None:
        d["kind"] = s.kind
        d["shape"] = None if s.shape is None else s.shape.to_dict()
    if set(s.dense_costs) != {WEIGHT_BYTES}:
        d["dense_costs"] = dict(sorted(s.dense_costs.items()))
    return d


def allowed(site: SiteOptions, max_error: float | None) -> list[Option]:
    """Options of ``site`` within the per-site error cap (dense is always allowed)."""
    if max_error is None:
        return list(site.options)
    keep = [o for o in site.options if o.error <= max_error or isinstance(o.decision, DenseConfig)]
    return keep or list(site.options)
