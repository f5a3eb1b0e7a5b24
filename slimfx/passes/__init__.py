"""slimfx.passes: apply a Plan to a model (module swap) or to a captured graph (graph rewrite).

A pass applies decisions; it never picks them. Rules (``slimfx.passes.rules``) say whether a
decision fits a site and build its replacement; passes validate the whole plan first, then
edit, and return a truthful ``PassResult``. Pipelines are lists run by ``PassManager``.
"""

from slimfx.passes.base import (
    RULES,
    PassResult,
    Rule,
    SiteRecord,
    Verdict,
    register_rule,
    rule_for,
)
from slimfx.passes.graph_rewrite import apply_plan_exported, apply_plan_graph, linear_nodes
from slimfx.passes.manager import (
    ApplyPlan,
    ApplyPlanGraph,
    DumpInstrument,
    Instrument,
    Pass,
    PassManager,
    TimingInstrument,
    VerifyInstrument,
)
from slimfx.passes.swap import apply_plan, empty_like_plan
from slimfx.passes.validate import validate_plan

__all__ = [
    "RULES",
    "PassResult",
    "Rule",
    "SiteRecord",
    "Verdict",
    "register_rule",
    "rule_for",
    "apply_plan",
    "empty_like_plan",
    "validate_plan",
    "apply_plan_graph",
    "apply_plan_exported",
    "linear_nodes",
    "Pass",
    "Instrument",
    "PassManager",
    "TimingInstrument",
    "VerifyInstrument",
    "DumpInstrument",
    "ApplyPlan",
    "ApplyPlanGraph",
]
