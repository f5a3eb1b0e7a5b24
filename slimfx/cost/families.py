"""Candidate families: for one site, which decisions to offer and their relative errors.

A family is a function ``(SiteContext) -> list[Candidate]``. It proposes decisions and
estimates each one's *relative output error* tr(E G Eᵀ)/tr(W G Wᵀ) (unweighted; the problem
builder multiplies by the site's sensitivity and adds bytes and latency). A form offers its
families by name (``Form.families`` in ``slimfx.forms``); :func:`register_family` adds one
outside any form (e.g. another ladder of an existing kind). ``build_problem`` asks the
families the user enabled through :func:`family`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from slimfx import forms
from slimfx.ir.sites import LinearSite
from slimfx.planning.configs import Decision
from slimfx.planning.shapes import LinearShape

__all__ = [
    "SiteContext",
    "Candidate",
    "Family",
    "FAMILIES",
    "register_family",
    "family",
    "family_names",
]


@dataclass
class SiteContext:
    """Everything a family may look at for one site."""

    site: LinearSite
    weight: Tensor  # out × in, the dense weight as loaded
    gram: Tensor | None  # in × in float64 XᵀX, None without calibration
    workload: str = "decode"
    #: the families offered for this site in this problem (a family may leave out what
    #: another one offers better at the same layout)
    families: tuple[str, ...] = ()
    #: values the site's families share (e.g. the quantization families' error denominator),
    #: filled by the first family that needs one; lives as long as the context (one site)
    shared: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> LinearShape:
        """The site's shape object (what decisions are priced against)."""
        return LinearShape(self.site.in_features, self.site.out_features)


@dataclass(frozen=True)
class Candidate:
    """A proposed decision and its estimated relative output error (≥ 0)."""

    decision: Decision
    error: float
    note: str = ""


Family = Callable[[SiteContext], list[Candidate]]

#: families registered with :func:`register_family`, outside any form.
_EXTRA: dict[str, Family] = {}


class _Families(Mapping[str, Family]):
    """Name → family: the forms' families (in registration order), then :func:`register_family`
    ones. A read-only view of the registry (``FAMILIES["int4"]``, ``"lowrank" in FAMILIES``)."""

    def __getitem__(self, name: str) -> Family:
        for f in forms.forms():
            if name in f.families:
                return f.family(name)
        return _EXTRA[name]

    def __iter__(self) -> Iterator[str]:
        names = [n for f in forms.forms() for n in f.families]
        return iter(names + [n for n in _EXTRA if n not in names])

    def __len__(self) -> int:
        return sum(1 for _ in self)


FAMILIES: Mapping[str, Family] = _Families()


def register_family(name: str, fn: Family) -> Family:
    """Register a candidate family under ``name`` outside any form (a form offers its own
    through ``Form.families``); a name a form already offers is a ``ValueError``."""
    owner = next((f.kind for f in forms.forms() if name in f.families), None)
    if owner is not None:
        raise ValueError(f"family {name!r} is already offered by form {owner!r}")
    _EXTRA[name] = fn
    return fn


def family_names() -> list[str]:
    """Every family name: the forms' (in registration order), then the others."""
    return list(FAMILIES)


def family(name: str) -> Family:
    """The candidate family ``name``; ``KeyError`` lists the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(
            f"unknown candidate family {name!r}; registered: {sorted(family_names())}"
        ) from None
