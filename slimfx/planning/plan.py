"""Plan: site FQN → Decision, with the shapes it was made for. Versioned JSON round-trip.

A Plan is the only thing the passes need: a hand-written Plan applied to a model reproduces
a rewrite without the cost model or the solver running at all.

Versions: 2 stores each site's shape object (``{"kind": "linear", "in_features": …}``) and
which sites a decision of another site owns (``owned_by``); 1 stored ``[out, in]`` lists and
still loads (converted). A newer version fails, naming the version needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimfx.planning.configs import Decision, DenseConfig, decision_from_dict
from slimfx.planning.schema import check_plan_dict
from slimfx.planning.shapes import LinearShape, Shape, shape_from_dict

__all__ = ["Plan", "PLAN_FORMAT", "PLAN_VERSION", "as_shape"]

PLAN_FORMAT = "slimfx.plan"
PLAN_VERSION = 2


def as_shape(value: Any) -> Shape:
    """A site shape object from a shape object, its dict, or a legacy ``(out, in)`` pair."""
    if isinstance(value, Mapping):
        return shape_from_dict(dict(value))
    if hasattr(value, "kind") and hasattr(value, "to_dict"):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        out_f, in_f = value
        return LinearShape(int(in_f), int(out_f))
    raise ValueError(f"not a site shape: {value!r} (a shape object, its dict, or (out, in))")


@dataclass
class Plan(Mapping[str, Decision]):
    """An immutable-by-convention mapping of site FQN to Decision.

    ``shapes`` maps FQN to the site's shape object (``LinearShape`` / ``AttentionShape``) the
    decision was made for (a legacy ``(out_features, in_features)`` pair is converted);
    replaying a plan on a model whose shapes differ is an error. ``owned_by`` maps a site that
    takes no decision of its own to the site whose decision owns it (an attention conversion
    owning its k/v projections). ``meta`` is free-form provenance (budget, workload, solver).
    """

    decisions: dict[str, Decision] = field(default_factory=dict)
    shapes: dict[str, Shape] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    owned_by: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k, v in self.decisions.items():
            if not isinstance(v, Decision):
                raise TypeError(f"plan entry {k!r} is {type(v).__name__}, not a Decision")
        self.shapes = {k: as_shape(v) for k, v in self.shapes.items()}
        for owned, owner in self.owned_by.items():
            if owner not in self.decisions:
                raise ValueError(f"site {owned!r} is owned by {owner!r}, which has no decision")
            if owned in self.decisions:
                raise ValueError(
                    f"site {owned!r} is owned by {owner!r}'s decision and has one of its own"
                )

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
            "shapes": {k: self.shapes[k].to_dict() for k in sorted(self.shapes)},
            "owned_by": dict(sorted(self.owned_by.items())),
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
        version = d.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"not a slimfx plan (version={version!r})")
        if version > PLAN_VERSION:
            raise ValueError(
                f"plan version {version} is newer than this slimfx reads ({PLAN_VERSION}): "
                f"reading it needs a slimfx that reads plan version {version}"
            )
        shapes = d.get("shapes", {})
        if version == 1:  # [out, in] lists
            shapes = {k: LinearShape(int(v[1]), int(v[0])) for k, v in shapes.items()}
        return cls(
            {k: _decision(k, v) for k, v in d["decisions"].items()},
            {k: as_shape(v) for k, v in shapes.items()},
            dict(d.get("meta", {})),
            dict(d.get("owned_by", {})),
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
        return (
            self.decisions == other.decisions
            and self.shapes == other.shapes
            and self.owned_by == other.owned_by
        )


def _decision(fqn: str, d: Mapping[str, Any]) -> Decision:
    """``decision_from_dict`` with the field named in its error."""
    try:
        return decision_from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise ValueError(f"decisions[{fqn!r}]: {e}") from e
