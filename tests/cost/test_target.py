"""Targets, the roofline latency, and the measured-latency cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimfx.cost.target import (
    TARGETS,
    MeasuredCache,
    Target,
    estimate_latency,
    latency,
    launches,
    storage,
    target_of,
    workload_of,
)
from slimfx.ir.sites import LinearSite
from slimfx.planning.configs import (
    DenseConfig,
    LowRankConfig,
    LowRankQuantConfig,
    QuantConfig,
    Sparse24Config,
    Sparse24LowRankConfig,
)
from slimfx.planning.shapes import LinearShape

ALL = [
    DenseConfig(),
    LowRankConfig(16),
    QuantConfig(4, 128),
    QuantConfig(8, None, symmetric=True),
    QuantConfig(3, 64),
    Sparse24Config(),
    LowRankQuantConfig(8, 4, 128),
    Sparse24LowRankConfig(8),
]


def _site(in_f: int, out_f: int, dtype: str = "torch.float32") -> LinearSite:
    return LinearSite("lin", in_f, out_f, dtype, False, "lin.weight", "lin")


@pytest.mark.parametrize("decision", ALL, ids=lambda d: d.short())
@pytest.mark.parametrize("shape", [(256, 512), (4096, 11008), (130, 70)])
def test_storage_agrees_with_reference_bytes(decision, shape) -> None:  # noqa: ANN001
    floats, ints = storage(decision, LinearShape(*shape))
    assert 2 * floats + ints == decision.weight_bytes(LinearShape(*shape))


def _roof(decision, in_f, out_f, tgt, wl) -> float:  # noqa: ANN001
    """Latency minus the launch overhead: the roofline term alone."""
    return (
        estimate_latency(decision, LinearShape(in_f, out_f), False, tgt, wl)
        - launches(decision) * tgt.launch_s
    )


@pytest.mark.parametrize("target", ["cpu", "h100"])
@pytest.mark.parametrize("rank", [64, 512, 1024])
def test_decode_latency_follows_bytes(target: str, rank: int) -> None:
    tgt, n = TARGETS[target], 4096
    dense, lr = DenseConfig(), LowRankConfig(rank)
    # memory bound: bytes / bandwidth exceeds flops / peak for both forms at one token
    for d in (dense, lr):
        floats, _ = storage(d, LinearShape(n, n))
        flops = d.flops(LinearShape(n, n), 1)
        assert floats * tgt.float_bytes / tgt.bandwidth_Bps > flops / tgt.peak_flops
    ratio = _roof(lr, n, n, tgt, "decode") / _roof(dense, n, n, tgt, "decode")
    byte_ratio = lr.weight_bytes(LinearShape(n, n)) / dense.weight_bytes(LinearShape(n, n))
    # the ratio differs from the byte ratio only by one token's activations (in + out + 2r
    # floats), ≤ 1.6% of the smallest form's weights here (r = 64: 8320 vs 524288 floats)
    assert ratio == pytest.approx(byte_ratio, rel=0.02)
    assert launches(lr) == 2 and launches(dense) == 1


def test_prefill_dense_is_compute_bound_on_h100() -> None:
    tgt, n = TARGETS["h100"], 4096
    dense = DenseConfig()
    t = workload_of("prefill").tokens
    flops_s = dense.flops(LinearShape(n, n), t) / tgt.peak_flops
    bytes_s = (n * n + t * 2 * n) * tgt.float_bytes / tgt.bandwidth_Bps
    assert flops_s > bytes_s
    assert _roof(dense, n, n, tgt, "prefill") == pytest.approx(flops_s, rel=1e-12)
    lr = LowRankConfig(1024)  # saves half the FLOPs: compute bound too, ratio = FLOP ratio
    ratio = _roof(lr, n, n, tgt, "prefill") / _roof(dense, n, n, tgt, "prefill")
    nn_ = LinearShape(n, n)
    assert ratio == pytest.approx(lr.flops(nn_, t) / dense.flops(nn_, t), rel=1e-12)


def test_quantized_forms_pay_dequantization_at_prefill() -> None:
    tgt, n = TARGETS["h100"], 4096
    q = QuantConfig(4, 128)
    t = workload_of("prefill").tokens
    expect = q.flops(LinearShape(n, n), t) / (tgt.peak_flops * tgt.dequant_efficiency)
    assert _roof(q, n, n, tgt, "prefill") == pytest.approx(expect, rel=1e-12)
    # at decode the int4 form reads ~a quarter of the bytes
    ratio = _roof(q, n, n, tgt, "decode") / _roof(DenseConfig(), n, n, tgt, "decode")
    assert 0.25 < ratio < 0.3


def test_fp32_cpu_reads_four_bytes_per_float() -> None:
    cpu = TARGETS["cpu"]
    lat = _roof(DenseConfig(), 1024, 1024, cpu, "decode")
    assert lat == pytest.approx((1024 * 1024 + 2048) * 4 / cpu.bandwidth_Bps, rel=1e-12)
    assert "ASSUMPTION" in cpu.notes


def test_unknown_names_and_bad_targets() -> None:
    with pytest.raises(KeyError, match="known: \\['cpu', 'h100', 'ort-cpu'\\]"):
        target_of("tpu")
    with pytest.raises(KeyError, match="decode"):
        workload_of("batch")
    with pytest.raises(ValueError, match="bandwidth_Bps"):
        Target("x", 0.0, 1e9, 0.0)


def test_measured_cache_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "lat.json"
    cache = MeasuredCache(path)
    site = _site(64, 32)
    d = LowRankConfig(8)
    key = MeasuredCache.key("linear", 1, 64, 32, "torch.float32", d, "cpu")
    cache.put(key, 1.25e-5, torch_device="cpu")
    cache.save()
    data = json.loads(path.read_text())
    assert data["entries"][0]["decision"] == "lowrank r=8" and data["version"] == 1

    again = MeasuredCache(path)
    assert len(again) == 1 and again.get(key) == 1.25e-5
    assert again.info[key] == {"torch_device": "cpu"}
    assert latency(d, site, "cpu", "decode", again) == (1.25e-5, "measured")
    secs, src = latency(d, site, "cpu", "prefill", again)  # not measured for prefill
    assert src == "roofline"
    assert secs == estimate_latency(d, LinearShape(64, 32), False, "cpu", "prefill")
    # a plain-SVD factorization of the same rank runs the same kernels: same measurement
    assert latency(LowRankConfig(8, "svd"), site, "cpu", "decode", again)[1] == "measured"
    assert latency(LowRankConfig(9), site, "cpu", "decode", again)[1] == "roofline"
    assert latency(d, _site(32, 64), "cpu", "decode", again)[1] == "roofline"


def test_lookup_falls_back_to_the_targets_compute_dtype(tmp_path: Path) -> None:
    cache = MeasuredCache(tmp_path / "h100.json")
    d = DenseConfig()
    cache.put(MeasuredCache.key("linear", 1, 64, 32, "torch.bfloat16", d, "h100"), 2e-6)
    assert latency(d, _site(64, 32, "torch.float32"), "h100", "decode", cache) == (2e-6, "measured")
    # the CPU target computes in float32: a bf16 entry for another target name never matches
    assert latency(d, _site(64, 32, "torch.float32"), "cpu", "decode", cache)[1] == "roofline"


def test_cache_of_paths_and_targets(tmp_path: Path) -> None:
    """``optimize(latency_cache=...)`` takes a path; a missing file and a file with no entry
    for the target are clear errors (a wrong target name would price nothing, silently)."""
    with pytest.raises(FileNotFoundError, match="calibrate-target"):
        MeasuredCache.of(tmp_path / "missing.json", "cpu")
    path = tmp_path / "c.json"
    cache = MeasuredCache(path)
    key = MeasuredCache.key("linear", 1, 64, 32, "torch.float32", DenseConfig(), "ort-cpu")
    cache.put(key, 1e-5, runtime="onnxruntime 1.2", accuracy_level=4, threads=2)
    cache.save()
    assert MeasuredCache.of(None) is None
    got = MeasuredCache.of(str(path), "ort-cpu")
    assert got is not None and len(got) == 1 and got.targets() == ["ort-cpu"]
    assert MeasuredCache.of(got, TARGETS["ort-cpu"]) is got
    with pytest.raises(ValueError, match="no measurement for target 'cpu' \\(it has: ort-cpu\\)"):
        MeasuredCache.of(path, "cpu")
    assert got.describe("ort-cpu") == (
        "1 entries in c.json: onnxruntime 1.2, accuracy_level 4, 2 threads"
    )


def _one_entry(path: Path, **over) -> None:  # noqa: ANN003
    rec = {"op": "linear", "N": 1, "K": 64, "M": 32, "dtype": "torch.float32",
           "decision": "dense", "device": "cpu", "seconds": 1e-5, **over}  # fmt: skip
    path.write_text(json.dumps({"version": 1, "entries": [rec]}))


@pytest.mark.parametrize(
    "over,why",
    [
        ({"seconds": float("nan")}, r"entry 0 \(linear dense\): seconds nan is not a positive"),
        ({"seconds": -1.0}, r"entry 0 \(linear dense\): seconds -1.0 is not a positive"),
        ({"seconds": "fast"}, r"entry 0: could not convert string to float: 'fast'"),
        ({"N": None}, r"entry 0 has no|entry 0: "),
    ],
)
def test_a_cache_entry_that_is_not_a_measurement_is_refused_naming_it(tmp_path, over, why):
    """NaN seconds made a memory budget of 0 B 'infeasible' with an unasked-for memory limit,
    negative ones priced every site at -1 s; a missing field was a bare KeyError."""
    path = tmp_path / "c.json"
    _one_entry(path, **over)
    if over == {"N": None}:
        rec = json.loads(path.read_text())
        del rec["entries"][0]["N"]
        path.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match=rf"c.json: not a latency cache \(({why})"):
        MeasuredCache(path)


def test_a_cache_file_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    for data in ({"version": "1", "entries": []}, {"version": 1, "entries": {"a": 1}}):
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match="'version' must be an integer and 'entries' a list"):
            MeasuredCache(path)


def test_two_writers_of_one_cache_keep_each_others_entries(tmp_path: Path) -> None:
    """Two calibrations into one file: each read it once and wrote its own copy over it, so
    the last writer dropped the first's entries (and both used one temp file)."""
    path = tmp_path / "c.json"
    a, b = MeasuredCache(path), MeasuredCache(path)
    ka = MeasuredCache.key("linear", 1, 64, 32, "torch.float32", DenseConfig(), "cpu")
    kb = MeasuredCache.key("linear", 1, 64, 64, "torch.float32", DenseConfig(), "cpu")
    a.put(ka, 1e-5, runtime="torch eager")
    a.save()
    b.put(kb, 2e-5, runtime="torch eager")
    b.put(ka, 3e-5, runtime="torch eager")  # b measured ka too, later: its value wins
    b.save()
    disk = MeasuredCache(path)
    assert disk.entries == {ka: 3e-5, kb: 2e-5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.json.lock"]


def test_a_cache_measured_by_another_runtime_is_noted() -> None:
    from slimfx.cost.target import runtime_mismatch

    assert runtime_mismatch(["torch eager"], None) == ""
    assert runtime_mismatch(["onnxruntime 1.24"], "onnx") == ""
    assert runtime_mismatch([], "onnx") == ""
    note = runtime_mismatch(["torch eager", "triton"], "onnx")
    assert note.startswith("latency cache measured with torch eager, triton, not onnxruntime, "
                           "which runs this model (backend='onnx')")  # fmt: skip
    assert "not torch eager" in runtime_mismatch(["onnxruntime 1.24"], "compile")
