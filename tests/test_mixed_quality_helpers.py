"""The pre-quantized-weight detector (slimfx.eval.grid) and the benchmark's problem filtering
(benchmarks/mixed_quality.py: family of a decision, restricted problems, merged problems)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from slimfx.eval.grid import GridStats, affine_grid_fraction, grid_stats
from slimfx.planning.configs import (
    DenseConfig,
    LowRankConfig,
    LowRankQuantConfig,
    QuantConfig,
    Sparse24Config,
    Sparse24LowRankConfig,
)
from slimfx.planning.problem import Budget, BudgetProblem, Option, SiteOptions
from slimfx.planning.shapes import LinearShape
from slimfx.planning.solve import solve

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    """benchmarks/mixed_quality.py as a module (benchmarks/ is not a package)."""
    name = "mixed_quality_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks/mixed_quality.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _q4_1(out_f: int, in_f: int, seed: int, fp16_weights: bool = False) -> torch.Tensor:
    """A weight dequantized from GGUF Q4_1: per 32-block w = d·q + m, fp16 d and m (m the block
    minimum, d = (max − min)/15 as llama.cpp computes them), codes 0..15 in fp32."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(out_f, in_f // 32, 32, generator=g) * 0.05
    lo, hi = src.amin(-1, keepdim=True), src.amax(-1, keepdim=True)
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    q = torch.round((src - m) / d).clamp(0, 15)
    W = (d * q + m).reshape(out_f, in_f)
    return W.half().float() if fp16_weights else W


def test_q4_1_weight_is_detected_and_gaussian_is_not() -> None:
    W = _q4_1(48, 256, seed=0)
    s = grid_stats(W)
    assert s == GridStats(s.blocks, s.blocks, s.blocks, s.integer_offset)
    assert s.blocks == 48 * 256 // 32
    assert affine_grid_fraction(W) == 1.0
    G = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    assert grid_stats(G) == GridStats(s.blocks, 0, 0, 0)


def test_grid_survives_fp16_storage_but_not_a_finer_grid() -> None:
    # rounding w itself to fp16 moves values by ≤ 2⁻¹¹·|w|: still on the grid within tolerance
    assert affine_grid_fraction(_q4_1(32, 128, seed=2, fp16_weights=True)) == 1.0
    # a 5-bit grid (32 levels) is not a 4-bit one, but is a 5-bit one
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 32, (32, 4, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 31
    W5 = (0.01 * q - 0.1).reshape(32, 128)
    assert affine_grid_fraction(W5, bits=4) == 0.0
    assert affine_grid_fraction(W5, bits=5) == 1.0


def test_blocks_follow_the_block_size() -> None:
    """Q4_1 blocks of 32 have independent (d, m): a 64-wide block spans two grids."""
    W = _q4_1(32, 256, seed=4)
    assert affine_grid_fraction(W, block=32) == 1.0
    assert affine_grid_fraction(W, block=64) < 0.05
    # a trailing partial block is ignored
    assert grid_stats(W[:, :80], block=32).blocks == 32 * 2


def test_unused_top_codes_and_integer_offsets() -> None:
    """Codes 0..9 only (K < 15) still fit; an offset that is a whole number of steps is
    counted as exact in an integer-zero-point format, a fractional one is not."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 10, (16, 2, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 9
    d = 0.0125  # exactly representable in binary: lo/d is exact below
    on_int = (d * (q - 4)).reshape(16, 64)  # lo = −4d
    off = (d * q - 0.3 * d).reshape(16, 64)  # lo = −0.3d
    s_int, s_off = grid_stats(on_int), grid_stats(off)
    assert s_int.affine == s_int.integer_offset == s_int.blocks
    assert s_off.affine == s_off.blocks and s_off.integer_offset == 0


def test_grid_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="block"):
        grid_stats(torch.zeros(2, 8), block=1)
    with pytest.raises(ValueError, match="bits"):
        grid_stats(torch.zeros(2, 8), bits=9)
    assert grid_stats(torch.zeros(2, 8), block=32) == GridStats(0, 0, 0, 0)


# ------------------------------------------------------------------ benchmark helpers


def test_family_of_every_decision_kind() -> None:
    fam = _bench().family_of
    assert fam(DenseConfig()) is None
    assert fam(LowRankConfig(4, "whitened")) == "lowrank"
    assert fam(QuantConfig(8, None, True, "rtn")) == "int8"
    assert fam(QuantConfig(4, 32, False, "rtn")) == "int4"
    assert fam(QuantConfig(4, 32, False, "gptq")) == "int4_gptq"
    assert fam(Sparse24Config("wanda", True)) == "sparse24"
    assert fam(LowRankQuantConfig(8, 4, 64)) == "lowrank_quant"
    assert fam(Sparse24LowRankConfig(8)) == "sparse24_lowrank"


def _problem() -> BudgetProblem:
    """Two 64×64 sites (dense 8192 bytes each) with int4 g32 / g64 RTN, GPTQ g32 and a rank."""

    def opts(scale: float) -> list[Option]:
        ds = [
            (DenseConfig(), 0.0),
            (QuantConfig(4, 32, False, "rtn"), 0.010 * scale),
            (QuantConfig(4, 64, False, "rtn"), 0.014 * scale),
            (QuantConfig(4, 32, False, "gptq"), 0.004 * scale),
            (LowRankConfig(4, "whitened"), 0.5 * scale),
        ]
        return [Option(d, d.weight_bytes(LinearShape(64, 64)), e) for d, e in ds]

    return BudgetProblem([SiteOptions("a", opts(1.0), 8192), SiteOptions("b", opts(3.0), 8192)])


def test_restricted_problem_keeps_dense_and_only_the_variant() -> None:
    b = _bench()
    p = _problem()
    rtn = b.restrict(p, b.Variant("int4", "int4 RTN", ("int4",)))
    assert [o.decision.short() for o in rtn.sites[0].options] == [
        "dense", "int4 g32 asym rtn", "int4 g64 asym rtn"
    ]
    g64 = b.restrict(p, b.Variant("int4_g64", "int4 RTN g64", ("int4",), 64))
    assert [type(o.decision).__name__ for o in g64.sites[1].options] == [
        "DenseConfig", "QuantConfig"
    ]
    assert len(p.sites[0].options) == 5  # the full problem is untouched


def test_solve_cell_reports_infeasible_with_smallest_and_mixed_is_never_worse() -> None:
    b = _bench()
    p = _problem()
    dense = p.dense_bytes
    g32 = QuantConfig(4, 32, False, "rtn").weight_bytes(LinearShape(64, 64)) * 2 / dense
    cell = b.solve_cell(p, b.Variant("int4_g32", "x", ("int4",), 32), 0.25)
    assert cell.status == "infeasible" and cell.smallest == pytest.approx(g32)
    assert cell.smallest > 0.25
    mixed = b.Variant("mixed", "mixed", ("int4", "int4_gptq", "lowrank"))
    for budget in (0.3, 0.6):
        m = b.solve_cell(p, mixed, budget)
        for v in b.make_variants(["int4", "int4_gptq", "lowrank"], groups=True):
            c = b.solve_cell(p, v, budget)
            if c.status == "ok":  # mixed has a superset of options: objective never higher
                assert m.objective <= c.objective + 1e-12
    ok = b.solve_cell(p, b.Variant("int4_gptq", "g", ("int4_gptq",)), 0.3)
    assert ok.picks == {"int4_gptq": 2} and ok.fraction <= 0.3


def test_merge_problems_unions_options_per_site() -> None:
    b = _bench()
    p = _problem()
    lr = b.restrict(p, b.Variant("lowrank", "lowrank", ("lowrank",)))
    q = b.restrict(p, b.Variant("int4", "int4", ("int4",)))
    m = b.merge_problems([lr, q, q])  # a decision offered twice is kept once
    assert [len(s.options) for s in m.sites] == [4, 4]
    assert isinstance(m.sites[0].options[0].decision, DenseConfig)
    assert solve(m, Budget(memory=0.3)).error == pytest.approx(
        solve(b.restrict(p, b.Variant("m", "m", ("int4", "lowrank"))), Budget(memory=0.3)).error
    )
