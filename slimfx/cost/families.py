"""Candidate families: for one site, which decisions to offer and their relative errors.

A family is a function ``(SiteContext) -> list[Candidate]``. It proposes decisions and
estimates each one's *relative output error* tr(E G Eᵀ)/tr(W G Wᵀ) (unweighted; the problem
builder multiplies by the site's sensitivity and adds bytes and latency). Families register
by name; ``build_problem`` asks the families the user enabled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from slimfx.ir.sites import LinearSite
from slimfx.planning.configs import Decision

__all__ = ["SiteContext", "Candidate", "Family", "FAMILIES", "register_family"]


@dataclass
class SiteContext:
    """Everything a family may look at for one site."""

    site: LinearSite
    weight: Tensor  # out × in, the dense weight as loaded
    gram: Tensor | None  # in × in float64 XᵀX, None without calibration
    workload: str = "decode"


@dataclass(frozen=True)
class Candidate:
    """A proposed decision and its estimated relative output error (≥ 0)."""

    decision: Decision
    error: float
    note: str = ""


Family = Callable[[SiteContext], list[Candidate]]
FAMILIES: dict[str, Family] = {}


def register_family(name: str, fn: Family) -> Family:
    """Register a candidate family under ``name`` (e.g. "lowrank", "int4", "sparse24")."""
    FAMILIES[name] = fn
    return fn
