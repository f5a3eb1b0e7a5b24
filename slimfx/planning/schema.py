"""The plan JSON schema, checked field by field before a ``Plan`` is built from it.

``check_plan_dict(d)`` raises ``ValueError`` naming the offending field (``version``,
``decisions['fc1'].rank``, ``shapes['fc1']``) and what it should hold; ``Plan.load`` prefixes
the file name. Decision fields are checked against the registered config class of their
``kind`` (unknown fields, missing ``kind``); their values are then checked by the config's own
``__post_init__``. Shapes are accepted as ``[out, in]`` pairs or as objects (a shape record).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from slimfx.planning.configs import DECISIONS

__all__ = ["check_plan_dict", "check_decision_dict"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_decision_dict(where: str, d: Any) -> None:
    """One decision's JSON: an object with a known ``kind`` and only that config's fields."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be an object, got a JSON {type(d).__name__}")
    kind = d.get("kind")
    if not isinstance(kind, str):
        raise ValueError(f"{where}.kind must be a string naming the form, got {kind!r}")
    if kind not in DECISIONS:
        raise ValueError(f"{where}.kind {kind!r} is unknown; known: {', '.join(sorted(DECISIONS))}")
    if "version" in d and not _is_int(d["version"]):
        raise ValueError(f"{where}.version must be an integer, got {d['version']!r}")
    known = {f.name for f in dataclasses.fields(DECISIONS[kind])} | {"kind", "version"}
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        raise ValueError(
            f"{where} has unknown field(s) {unknown} for kind {kind!r}; known: "
            f"{', '.join(sorted(known))}"
        )


def check_plan_dict(d: Any) -> None:
    """The top level of a plan JSON: ``format``, integer ``version``, an object ``meta``, an
    object ``decisions`` of decision objects, an object ``shapes`` of ``[out, in]`` pairs."""
    if not isinstance(d, Mapping):
        raise ValueError(f"not a slimfx plan (a JSON {type(d).__name__}, not an object)")
    if "version" in d and not (_is_int(d["version"]) and d["version"] >= 1):
        raise ValueError(
            f"not a slimfx plan (version={d['version']!r}): field 'version' must be a positive "
            f"integer, got {d['version']!r}"
        )
    if "meta" in d and not isinstance(d["meta"], Mapping):
        raise ValueError(f"field 'meta' must be an object, got {d['meta']!r}")
    if "decisions" not in d:
        raise ValueError("field 'decisions' is missing (an object: site FQN → decision)")
    dec = d["decisions"]
    if not isinstance(dec, Mapping):
        raise ValueError(f"field 'decisions' must be an object, got a JSON {type(dec).__name__}")
    for k, v in dec.items():
        check_decision_dict(f"decisions[{k!r}]", v)
    shapes = d.get("shapes", {})
    if not isinstance(shapes, Mapping):
        raise ValueError(f"field 'shapes' must be an object, got a JSON {type(shapes).__name__}")
    for k, v in shapes.items():
        if isinstance(v, Mapping):
            continue
        if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)):
            raise ValueError(f"shapes[{k!r}] must be [out_features, in_features], got {v!r}")
