"""Micro-benchmarks into the measured-latency cache (slimfx.cost.measure)."""

from __future__ import annotations

from pathlib import Path

import torch

from slimfx.cost.candidates import lowrank_ranks
from slimfx.cost.measure import measure_target
from slimfx.cost.target import MeasuredCache, latency
from slimfx.ir.sites import LinearSite
from slimfx.planning.configs import DenseConfig, LowRankConfig, QuantConfig


def _site(in_f: int, out_f: int, dtype: str = "torch.float32") -> LinearSite:
    return LinearSite("lin", in_f, out_f, dtype, False, "lin.weight", "lin")


def test_measure_target_default_decisions(tmp_path: Path) -> None:
    cache = measure_target(
        "cpu",
        [(64, 32)],
        None,
        ["decode"],
        tmp_path / "d.json",
        "cpu",
        repeats=3,
        min_s=0.0,
        progress=False,
    )
    # dense + the low-rank ladder + the int8/int4 layouts whose groups divide 64
    labels = {k[5] for k in cache.entries}
    quant = {"int8 ch sym rtn", "int4 g32 asym rtn", "int4 g64 asym rtn"}
    assert len(cache) == 1 + len(lowrank_ranks(64, 32)) + len(quant)
    assert quant <= labels and "int4 g128 asym rtn" not in labels
    site = _site(64, 32)
    for r in lowrank_ranks(64, 32):
        assert latency(LowRankConfig(r, "svd"), site, "cpu", "decode", cache)[1] == "measured"
    # GPTQ stores the same layout as RTN: it runs the same kernel, one measurement serves both
    gptq = QuantConfig(4, 32, False, "gptq")
    assert latency(gptq, site, "cpu", "decode", cache)[1] == "measured"


def test_measure_target_times_cpu_modules(tmp_path: Path) -> None:
    path = tmp_path / "cpu.json"
    decisions = [DenseConfig(), LowRankConfig(8), LowRankConfig(500)]
    cache = measure_target(
        "cpu",
        [(64, 32)],
        decisions,
        ["decode"],
        path,
        "cpu",
        repeats=3,
        min_s=0.0,
        progress=False,
    )
    # rank 500 does not fit a 32×64 weight: skipped
    assert len(cache) == 2
    reloaded = MeasuredCache(path)
    for d in decisions[:2]:
        secs, src = latency(d, _site(64, 32), "cpu", "decode", reloaded)
        assert src == "measured" and 0 < secs < 1.0
    assert latency(decisions[2], _site(64, 32), "cpu", "decode", reloaded)[1] == "roofline"


def test_measure_target_rotates_copies_and_uses_the_runner(tmp_path: Path) -> None:
    """Each form is built as several copies with distinct weights (enough to store
    ``rotate_bytes``), all run by the runner's callable in one timed call; the entry records
    the copies and the runner's info. A runner's ValueError skips the form."""
    seen: list = []

    def runner(module):  # noqa: ANN001, ANN202
        seen.append(module)
        if len(seen) == 3:  # the rank-8 form
            raise ValueError("this runtime cannot run it")
        return module, {"runtime": "fake"}

    decisions = [DenseConfig(), LowRankConfig(4), LowRankConfig(8)]
    dense_bytes = 64 * 32 * 4  # float32
    cache = measure_target(
        "cpu", [(64, 32)], decisions, ["decode"], tmp_path / "c.json", "cpu",
        repeats=3, min_s=0.0, progress=False, runner=runner, rotate_bytes=5 * dense_bytes,
    )
    assert len(seen) == 3 and len(cache) == 2  # the third form was refused by the runner
    dense = seen[0]
    assert len(dense.copies) == 5 and dense.in_features == 64 and dense.out_features == 32
    w = [m.weight for m in dense.copies]
    assert all(not torch.equal(w[0], wi) for wi in w[1:])  # distinct weights, same shape
    assert sorted(w[0].flatten().tolist()) == sorted(w[1].flatten().tolist())  # rolled rows
    outs = dense(torch.randn(3, 64))
    assert len(outs) == 5 and outs[0].shape == (3, 32)
    info = cache.info[MeasuredCache.key("linear", 1, 64, 32, "torch.float32", DenseConfig(), "cpu")]
    assert info["copies"] == 5 and info["runtime"] == "fake"
    # rank-4 factors store 4·(64+32) floats: more copies to reach the same bytes, capped
    assert len(seen[1].copies) == min(64, -(-5 * dense_bytes // (4 * 96 * 4)))
    one = measure_target(
        "cpu", [(64, 32)], decisions[:1], ["decode"], tmp_path / "d.json", "cpu",
        repeats=3, min_s=0.0, progress=False, rotate_bytes=0,
    )
    assert next(iter(one.info.values()))["copies"] == 1
