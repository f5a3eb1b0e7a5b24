"""Measured attention steps (``slimfx.cost.measure_attention``) and the prices made of them
(``cost.attention_price.attention_latency``): what is timed (the block minus its linear sites), the
lookup between and beyond the measured contexts, and a solver that follows the measurements
where they contradict the roofline."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from torch import nn

import slimfx
from slimfx.cost.attention_price import attention_latency
from slimfx.cost.measure_attention import (
    DEFAULT_ATTENTION_SHAPES,
    _StepClock,
    default_attention_decisions,
    measure_attention,
    parse_attention_shapes,
)
from slimfx.cost.target import MeasuredCache, estimate_attention_latency
from slimfx.forms.kv.config import KVDenseConfig, KVLowRankConfig, KVQuantConfig
from slimfx.forms.mla.config import MLAConfig
from slimfx.planning.problem import Budget
from slimfx.planning.shapes import AttentionShape

from .test_attention_latency import SMOL

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = AttentionShape(64, 4, 2, 16, 16)  # tiny_llama's attention
INT4 = KVQuantConfig(4, 4, 32, 64, 0, 4)
F32 = "torch.float32"


def _put(cache: MeasuredCache, d, shape, points, batch=1, target="cpu") -> None:  # noqa: ANN001
    for ctx, s in points:
        cache.put(MeasuredCache.attention_key(shape, 1, ctx, batch, F32, d, target), s)


def test_the_lookup_interpolates_extrapolates_and_scales_by_the_roofline(tmp_path) -> None:
    cache = MeasuredCache(tmp_path / "a.json")
    _put(cache, INT4, SMOL, [(1024, 1e-3), (8192, 8e-3)])

    def price(ctx: int, d=INT4, shape=SMOL, batch=1, target="cpu"):  # noqa: ANN001, ANN202
        return attention_latency(d, shape, target, "decode", ctx, batch, cache)

    assert price(1024) == (1e-3, "measured") and price(8192) == (8e-3, "measured")
    s, src = price(4096)
    assert src == "measured" and s == pytest.approx(1e-3 + 7e-3 * 3072 / 7168, rel=1e-12)
    s, src = price(16384)  # along the line through the two largest: said so
    assert src == "measured, extrapolated" and s == pytest.approx(8e-3 + 7e-3 * 8192 / 7168, rel=1e-12)
    roof = lambda c: estimate_attention_latency(INT4, SMOL, "cpu", "decode", c)  # noqa: E731
    s, src = price(256)  # below: the smallest measurement scaled by the roofline's ratio
    assert src == "measured, roofline-scaled"
    assert s == pytest.approx(1e-3 * roof(256) / roof(1024), rel=1e-12)
    # another shape, target or layout: not measured → the roofline
    for kw in ({"shape": AttentionShape(576, 9, 9, 64, 64)}, {"target": "h100"},
               {"d": KVQuantConfig(8, 8, 32, 64, 0, 4)}):  # fmt: skip
        s, src = price(4096, **kw)
        assert src == "roofline"
        args = (kw.get("d", INT4), kw.get("shape", SMOL), kw.get("target", "cpu"), "decode")
        assert s == estimate_attention_latency(*args, 4096, kw.get("batch", 1))
    # another batch, one measured: the measured batch's price times the roofline's ratio
    s, src = price(4096, batch=8)
    assert src == "measured, roofline-scaled"
    r = estimate_attention_latency(INT4, SMOL, "cpu", "decode", 4096, 8) / roof(4096)
    assert s == pytest.approx(price(4096)[0] * r, rel=1e-12)
    # two batches measured: linear between them and along the line beyond them
    _put(cache, INT4, SMOL, [(1024, 3e-3), (8192, 20e-3)], batch=4)
    s, src = price(4096, batch=2)
    at1, at4 = price(4096)[0], 3e-3 + 17e-3 * 3072 / 7168
    assert src == "measured" and s == pytest.approx(at1 + (at4 - at1) / 3, rel=1e-12)
    s, src = price(1024, batch=16)
    assert src == "measured, extrapolated" and s == pytest.approx(3e-3 + (3e-3 - 1e-3) * 12 / 3, rel=1e-12)
    assert price(4096, batch=4) == (pytest.approx(at4, rel=1e-12), "measured")
    # a value-only field (the fit method) runs the same step: one measurement serves both
    lr = KVLowRankConfig(64, 128, 1, "whitened", 4)
    _put(cache, lr, SMOL, [(1024, 2e-3)])
    assert attention_latency(
        KVLowRankConfig(64, 128, 1, "attention", 4), SMOL, "cpu", "decode", 1024, 1, cache
    ) == (2e-3, "measured")
    # a line that falls (noise) is not extrapolated: the largest measurement, roofline-scaled
    _put(cache, KVDenseConfig(), SMOL, [(1024, 2e-3), (8192, 1e-3)])
    s, src = attention_latency(KVDenseConfig(), SMOL, "cpu", "decode", 16384, 1, cache)
    assert src == "measured, roofline-scaled" and s > 1e-3
    cache.save()
    again = MeasuredCache(tmp_path / "a.json")
    assert again.entries == cache.entries and again.targets() == ["cpu"]


class _Sleepy(nn.Module):
    def __init__(self, seconds: float, inner: nn.Module | None = None) -> None:
        super().__init__()
        self.seconds, self.q_proj = seconds, inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.q_proj(x) if self.q_proj is not None else x


def test_the_step_clock_leaves_out_the_linear_sites_inside_the_block() -> None:
    inner = _Sleepy(0.06)
    block = _Sleepy(0.01, inner)
    clock = _StepClock(block, [inner])
    for _ in range(3):
        block(torch.zeros(1))
    clock.remove()
    assert len(clock.steps) == 3
    assert all(0.009 < s < 0.04 for s in clock.steps), clock.steps  # 0.01 s, not 0.07 s
    block(torch.zeros(1))
    assert len(clock.steps) == 3  # the hooks are gone


def test_measure_attention_times_each_form_at_each_context(tmp_path) -> None:
    forms = [KVDenseConfig(), KVQuantConfig(4, 4, 8, 16, 0, 0),
             KVLowRankConfig(16, 24, 1, "whitened", 0), MLAConfig(rank=12, rope_pairs=2)]  # fmt: skip
    path = tmp_path / "c.json"
    cache = measure_attention("cpu", [TINY], forms, (40, 72), path, steps=3, progress=False)
    assert len(cache) == 8 and cache.targets() == ["cpu"]
    for d in forms:
        key = MeasuredCache.attention_key(TINY, 1, 40, 1, F32, d, "cpu")
        pts = cache.contexts(key)
        assert [c for c, _ in pts] == [40, 72] and all(s > 0 for _, s in pts)
        assert cache.info[cache.key(*key)]["runtime"] == "torch eager"
        assert attention_latency(d, TINY, "cpu", "decode", 56, 1, cache)[1] == "measured"
    # the quantized cache's steps read the store in place (the torch op on the CPU)
    info = cache.info[cache.key(*MeasuredCache.attention_key(TINY, 1, 40, 1, F32, forms[1], "cpu"))]
    assert info["kernel"] == "kv_decode_attention_folded" and info["decode_path"] == "torch"
    assert MeasuredCache(path).entries == cache.entries  # saved
    # a form the shape refuses is skipped; bad contexts are refused
    sw = AttentionShape(64, 4, 2, 16, 16, sliding_window=32)
    none = measure_attention("cpu", [TINY], [KVQuantConfig(4, 4, 32, 64, 0, 0)], (40,),
                             tmp_path / "n.json", steps=1, progress=False)  # fmt: skip
    assert len(none) == 0  # value_group 64 does not divide head_dim 16
    with pytest.raises(ValueError, match="contexts must exceed"):
        measure_attention("cpu", [TINY], forms, (1,), tmp_path / "x.json", progress=False)
    with pytest.raises(ValueError, match="full RoPE and no sliding window"):
        measure_attention("cpu", [sw], [KVDenseConfig()], (40,), tmp_path / "y.json",
                          progress=False)  # fmt: skip


def test_default_decisions_are_what_the_solver_is_offered() -> None:
    from slimfx.forms.kv.candidates import default_kv_forms

    ds = default_attention_decisions(SMOL)
    kv = default_kv_forms(SMOL)
    assert ds[: len(kv)] == kv
    f8 = [d for d in ds if getattr(d, "factor_bits", 16) == 8 and not isinstance(d, MLAConfig)]
    assert f8 == [dataclasses.replace(d, factor_bits=8) for d in kv if d.owns] and len(f8) == 8
    mla = [d for d in ds if isinstance(d, MLAConfig)]
    assert len(mla) == 12 and {(d.latent_bits, d.factor_bits) for d in mla} == {
        (8, 16), (16, 16), (8, 8), (16, 8)}
    assert {d.rope_pairs for d in mla} == {10}
    assert parse_attention_shapes(None) == list(DEFAULT_ATTENTION_SHAPES) == [SMOL]
    assert parse_attention_shapes("none") == []
    assert parse_attention_shapes("2048:32:8:64") == [AttentionShape(2048, 32, 8, 64, 64)]
    with pytest.raises(ValueError, match="HIDDEN:HEADS:KV_HEADS:HEAD_DIM"):
        parse_attention_shapes("2048:32:8")
    with pytest.raises(ValueError, match="not a multiple"):
        parse_attention_shapes("2048:32:7:64")


FORMS_TINY = [KVDenseConfig(), KVQuantConfig(4, 4, 8, 16, 0, 0),
              KVLowRankConfig(16, 24, 1, "whitened", 0)]  # fmt: skip


def test_measured_steps_steer_the_solver(tiny_llama, tmp_path) -> None:
    """On the cpu roofline every compressed cache's step is slower than the 16-bit one (its
    store is rebuilt every step), so a latency budget of 1.0 with a KV budget is infeasible;
    measurements of a runtime where one compressed step is faster than dense make it feasible
    with that form — the int4 cache in one cache file, the low-rank cache in another — and the
    report says where each price came from; a replayed plan prices it from the cache too."""
    dense, int4, lowrank = FORMS_TINY
    g = torch.Generator().manual_seed(7)
    calib = [torch.randint(0, 256, (1, 32), generator=g) for _ in range(4)]
    b = Budget(latency=1.0, kv=0.7, context=512)
    kw = dict(calibration=calib, kv_forms=FORMS_TINY, families=("int8",), progress=False)
    with pytest.raises(slimfx.InfeasibleBudgetError, match="latency budget 1.000"):
        slimfx.optimize(tiny_llama, b, **kw)
    at512 = 1 + 0.5 * 256 / 768  # the step at 512 tokens, between 256 (×1) and 1024 (×1.5)
    for fast in (int4, lowrank):
        path = tmp_path / f"{fast.kind}.json"
        cache = MeasuredCache(path)
        for d in FORMS_TINY:
            s = 1e-5 if d is dense else 0.8e-5 if d is fast else 8e-4
            _put(cache, d, TINY, [(256, s), (1024, 1.5 * s)])
        cache.save()
        rep = slimfx.report_of(slimfx.optimize(tiny_llama, b, latency_cache=str(path), **kw))
        assert [k.chosen for k in rep.kv_sites] == [fast.short()] * 2
        assert rep.totals["kv_latency_sources"] == ["measured"]
        assert rep.totals["est_latency_ratio"] <= 1.0 + 1e-9
        k0 = rep.kv_sites[0]
        assert k0.latency_before_s == pytest.approx(1e-5 * at512, rel=1e-12)
        assert k0.latency_after_s == pytest.approx(0.8e-5 * at512, rel=1e-12)
        assert any("attention steps: 6 of 6 options measured" in n for n in rep.notes)
        table = rep.to_markdown().split("## KV cache")[1]
        assert "| latency | latency from | decode step |" in table
        assert f"| measured | {k0.decode_step} | applied |" in table and k0.decode_step
    plan = slimfx.Plan.from_dict(rep.meta["plan"])
    again = slimfx.report_of(
        slimfx.optimize(tiny_llama, b, plan=plan, latency_cache=str(path), **kw)
    )
    assert again.kv_sites[0].latency_after_s == pytest.approx(0.8e-5 * at512, rel=1e-12)
    assert again.kv_sites[0].latency_source == "measured"


def test_cli_calibrate_target_times_attention_steps_too(tmp_path, capsys) -> None:
    from slimfx.cli import build_parser, main
    from slimfx.cost.measure_attention import DEFAULT_CONTEXTS

    out = tmp_path / "c.json"
    assert main(["calibrate-target", "--shapes", "32x16", "--attention", "64:4:2:16",
                 "--contexts", "40,72", "--rotate-mb", "0", "--threads", "1", "--quiet",
                 "--out", str(out)]) == 0  # fmt: skip
    cache = MeasuredCache(out)
    ops = {k[0] for k in cache.entries}
    assert ops == {"linear", "attention:4/2x16@64"}
    steps = [k for k in cache.entries if k[0] != "linear"]
    assert {k[2] for k in steps} == {40, 72} and {k[3] for k in steps} == {1}
    assert {k[5] for k in steps} == {
        MeasuredCache.key("x", 1, 1, 1, F32, d, "cpu")[5] for d in default_attention_decisions(TINY)
    }  # every default KV / MLA form of the shape
    assert "target 'cpu'" in capsys.readouterr().out
    assert build_parser().parse_args(["calibrate-target", "--out", "x"]).contexts == ",".join(
        map(str, DEFAULT_CONTEXTS)
    )
    assert main(["calibrate-target", "--attention", "smollm2", "--backend", "onnx",
                 "--out", str(tmp_path / "o.json")]) == 2  # fmt: skip
    assert "leave out attention with backend onnx" in capsys.readouterr().err
    assert main(["calibrate-target", "--attention", "64:4:2:16", "--contexts", "40,x",
                 "--out", str(tmp_path / "o.json")]) == 2  # fmt: skip
    assert "--contexts takes comma-separated integers" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_the_attention_steps_benchmark_runs_on_tiny_shapes(tmp_path) -> None:
    """benchmarks/attention_steps.py (a step of gpu_session.sh): every form measured, each
    held-out context priced from the fit contexts and by the roofline; the measurements kept
    beside the JSON."""
    import json

    from _helpers import load_benchmark

    mod = load_benchmark("attention_steps")
    out = tmp_path / "a.json"
    argv = ["--shape", "64:4:2:16", "--fit", "40,120", "--held", "80", "--steps", "2",
            "--json", str(out)]  # fmt: skip
    assert mod.main(argv) == 0
    got = json.loads(out.read_text())
    assert len(got["rows"]) == len(default_attention_decisions(TINY))
    assert all(r["src@80"] == "measured" and r["fit/meas@80"] > 0 for r in got["rows"])
    assert set(got["meta"]["summary"]) == {"fit@80", "roof@80"}
    kept = MeasuredCache(tmp_path / "a.cache.json")
    assert {k[2] for k in kept.entries} == {40, 80, 120}


def test_attention_batches_benchmark_prices_every_check(tmp_path) -> None:
    """``benchmarks/attention_batches.py`` on a small shape and context: a row per form the
    shape takes, every check batch priced from measurements."""
    import json

    from _helpers import load_benchmark

    bench = load_benchmark("attention_batches")
    out = tmp_path / "b.json"
    args = ["--shape", "256:4:2:64", "--context", "72", "--steps", "1", "--json", str(out)]
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["form"] for r in rows][0] == "kv dense" and len(rows) == 4
    for r in rows:
        assert len(r["priced"]) == len(bench.CHECKS)
        assert all(src.startswith("measured") and x > 0 for x, src in r["priced"].values())
