"""Plan: site FQN → Decision, with the shapes it was made for. Versioned JSON round-trip.

A Plan is the only thing the passes need: a hand-written Plan applied to a model reproduces
a rewrite without the cost model or the solver running at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimfx.planning.configs import Decision, DenseConfig, decision_from_dict
from slimfx.planning.schema import check_plan_dict

__all__ = ["Plan", "PLAN_FORMAT", "PLAN_VERSION"]

PLAN_FORMAT = "slimfx.plan"
PLAN_VERSION = 1


@dataclass
class Plan(Mapping[str, Decision]):
    """An immutable-by-convention mapping of site FQN to Decision.

    ``shapes`` maps FQN to ``(out_features, in_features)`` of the dense weight the decision
    was made for; replaying a plan on a model whose shapes differ is an error.
    ``meta`` is free-form provenance (budget, workload, solver, model class).
    """

    decisions: dict[str, Decision] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k, v in self.decisions.items():
            if not isinstance(v, Decision):
                raise TypeError(f"plan entry {k!r} is {type(v).__name__}, not a Decision")
        self.shapes = {k: tuple(v) for k, v in self.shapes.items()}  # type: ignore[misc]

    def __getitem__(self, fqn: str) -> Decision:
        return self.decisions[fqn]

    def __iter__(self) -> Iterator[str]:
        return iter(self.decisions)

    def __len__(self) -> int:
        return len(self.decisions)

    def rewrites(self) -> dict[str, Decision]:
        """The entries that change something (everything but dense)."""
        return {k: v for k, v in self.decisions.items() if not isinstance(v, DenseConfig)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "meta": self.meta,
            "decisions": {k: self.decisions[k].to_dict() for k in sorted(self.decisions)},
            "shapes": {k: list(self.shapes[k]) for k in sorted(self.shapes)},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping):
            raise ValueError(f"not a slimfx plan (a JSON {type(d).__name__}, not an object)")
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a slimfx plan (format={d.get('format')!r})")
        check_plan_dict(d)  # every field typed, errors naming the field
        if d.get("version", 0) > PLAN_VERSION:
            raise ValueError(
                f"plan version {d['version']} is newer than this slimfx reads ({PLAN_VERSION})"
            )
        return cls(
            {k: _decision(k, v) for k, v in d["decisions"].items()},
            {k: tuple(v) for k, v in d.get("shapes", {}).items()},
            dict(d.get("meta", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a slimfx plan (not JSON: {e})") from e
        return cls.from_dict(d)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            return cls.from_json(Path(path).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: {e}") from e

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return self.decisions == other.decisions and self.shapes == other.shapes


def _decision(fqn: str, d: Mapping[str, Any]) -> Decision:
    """``decision_from_dict`` with the field named in its error."""
    try:
        return decision_from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise ValueError(f"decisions[{fqn!r}]: {e}") from e
