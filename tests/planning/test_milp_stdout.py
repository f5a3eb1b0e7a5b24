"""HiGHS's C-level prints are silenced by redirecting file descriptor 1 around each solve;
solves on several threads at once (the report's frontier) must leave stdout as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import slimfx.planning.milp as milp_mod

CODE = """
import random
from concurrent.futures import ThreadPoolExecutor
from slimfx.planning.configs import DenseConfig, QuantConfig, LowRankConfig
from slimfx.planning.problem import Budget, BudgetProblem, Option, SiteOptions
from slimfx.planning.solve import solve
rng = random.Random(0)
sites = [SiteOptions(f"s{i}", [Option(DenseConfig(), 1000, 0.0),
                               Option(QuantConfig(8), 500, rng.random() * 0.01),
                               Option(QuantConfig(4), 250, rng.random() * 0.1),
                               Option(LowRankConfig(8), 300, rng.random() * 0.2)], 1000)
         for i in range(60)]
p = BudgetProblem(sites)
print("before", flush=True)
with ThreadPoolExecutor(4) as ex:
    sols = list(ex.map(lambda f: solve(p, Budget(memory=f), "milp").bytes,
                       [0.3, 0.4, 0.5, 0.6, 0.7, 0.8] * 4))
print("after", len(sols), flush=True)
"""


def test_concurrent_solves_leave_stdout_working(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    root = Path(milp_mod.__file__).parent.parent.parent
    with out.open("w") as f:
        subprocess.run([sys.executable, "-c", CODE], check=True, cwd=root, stdout=f)
    assert out.read_text().split() == ["before", "after", "24"]
