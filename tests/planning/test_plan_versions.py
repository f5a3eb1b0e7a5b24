"""Plan versions: v1 plans ([out, in] shape lists) still load; newer or bad versions say why."""

from __future__ import annotations

import json

import pytest

from slimfx.planning.configs import LowRankConfig, QuantConfig
from slimfx.planning.plan import PLAN_FORMAT, PLAN_VERSION, Plan
from slimfx.planning.shapes import LinearShape

# a plan as slimfx wrote it before shape objects (version 1)
V1 = {
    "format": PLAN_FORMAT,
    "version": 1,
    "meta": {"solver": "milp"},
    "decisions": {
        "fc1": LowRankConfig(4, "svd").to_dict(),
        "fc2": QuantConfig(4, 32).to_dict(),
    },
    "shapes": {"fc1": [32, 16], "fc2": [8, 32]},
}


def test_version_1_plan_loads_with_shapes_converted(tmp_path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps(V1))
    plan = Plan.load(path)
    assert plan.shapes == {"fc1": LinearShape(16, 32), "fc2": LinearShape(32, 8)}
    assert plan["fc1"] == LowRankConfig(4, "svd") and plan.owned_by == {}
    # saved again, it is a current plan with the same content
    again = json.loads(plan.to_json())
    assert again["version"] == PLAN_VERSION == 2
    assert again["shapes"]["fc1"] == {"kind": "linear", "in_features": 16, "out_features": 32}
    assert Plan.from_json(plan.to_json()) == plan


def test_newer_version_names_the_version_needed() -> None:
    d = {**V1, "version": PLAN_VERSION + 1}
    with pytest.raises(
        ValueError,
        match=r"plan version 3 is newer than this slimfx reads \(2\): "
        r"reading it needs a slimfx that reads plan version 3",
    ):
        Plan.from_dict(d)


@pytest.mark.parametrize("version", ["2", 0, True])
def test_bad_version_is_not_a_plan(version) -> None:
    with pytest.raises(ValueError, match=r"not a slimfx plan \(version="):
        Plan.from_dict({**V1, "version": version})


def test_unknown_shape_kind_is_named() -> None:
    d = {**V1, "version": 2, "shapes": {"fc1": {"kind": "conv", "k": 3}}}
    with pytest.raises(ValueError, match="unknown site kind 'conv'"):
        Plan.from_dict(d)
