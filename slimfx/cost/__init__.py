"""slimfx.cost: calibration statistics, targets and latency, candidates, the budget problem.

Candidate families are offered by the forms (``slimfx.forms``: ``Form.families``) and looked up
through ``families.family``; nothing here needs importing to register them.
"""

from slimfx.cost.calibration import CalibrationStats, collect_stats, prepare_batches
from slimfx.cost.candidates import build_problem, lowrank_candidates, lowrank_ranks
from slimfx.cost.families import FAMILIES, Candidate, SiteContext, family, register_family
from slimfx.cost.measure import measure_target
from slimfx.cost.sequential import find_blocks, run_sequential
from slimfx.cost.target import (
    TARGETS,
    WORKLOADS,
    MeasuredCache,
    Target,
    Workload,
    estimate_latency,
    latency,
    target_of,
    workload_of,
)

__all__ = [
    "CalibrationStats",
    "collect_stats",
    "prepare_batches",
    "find_blocks",
    "run_sequential",
    "Target",
    "TARGETS",
    "target_of",
    "Workload",
    "WORKLOADS",
    "workload_of",
    "estimate_latency",
    "MeasuredCache",
    "latency",
    "measure_target",
    "build_problem",
    "lowrank_candidates",
    "lowrank_ranks",
    "SiteContext",
    "Candidate",
    "FAMILIES",
    "family",
    "register_family",
]
