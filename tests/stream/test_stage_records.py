"""The stage records of ``optimize``: resident memory around each stage (``MemoryInstrument``)
and each candidate family's seconds, next to the seconds per stage."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")

import slimfx  # noqa: E402
from slimfx.passes.base import PassResult  # noqa: E402
from slimfx.passes.manager import PassManager  # noqa: E402
from slimfx.stages import MemoryInstrument, rss_mb, trim_heap  # noqa: E402

from ._util import build, calibration  # noqa: E402

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or rss_mb() is None,
    reason="resident memory is read from /proc/self/status (Linux)",
)


@linux_only
def test_memory_instrument_sees_a_stage_peak_that_was_freed() -> None:
    held: list[torch.Tensor] = []

    def spike(_: object) -> PassResult:  # 256 MB touched, then freed within the stage
        t = torch.ones(64 * 2**20)
        del t
        trim_heap()  # whether the allocator keeps freed pages depends on what ran before
        return PassResult("spike")

    def keep(_: object) -> PassResult:  # 128 MB kept past the stage
        held.append(torch.ones(32 * 2**20))
        return PassResult("keep")

    ins = MemoryInstrument()
    PassManager([spike, keep], [ins]).run(None)
    s, k = ins.memory["spike"], ins.memory["keep"]
    assert ins.peak_is_stage  # clear_refs worked: each stage's peak is its own
    # the spike's peak is ≥ 256 MB over its start though nothing stays (slack: allocator, 16 MB)
    assert s["peak"] - s["rss_before"] >= 240
    assert abs(s["rss_after"] - s["rss_before"]) < 64
    # the kept tensor shows in the RSS after, and the peak was reset: not the spike's 256 MB
    assert k["rss_after"] - k["rss_before"] >= 120
    assert k["peak"] - k["rss_before"] < 200
    if "anon_after" in k:  # the kept tensor is anonymous memory (no file behind it)
        assert k["anon_after"] - k["anon_before"] >= 120
    assert held
    # the process's peak over the run is the spike's, though the last stage's reset hid it
    # from the kernel's high-water mark (and from ru_maxrss)
    assert ins.peak_mb >= s["peak"] - 1.0
    assert ins.peak_mb - k["peak"] >= 100


@linux_only
def test_memory_instrument_peak_sees_a_spike_between_stages() -> None:
    ins = MemoryInstrument()
    PassManager([lambda _: PassResult("a")], [ins]).run(None)
    base = ins.memory["<lambda>"]["rss_after"]
    t = torch.ones(64 * 2**20)  # 256 MB between two stages, freed before the next
    del t
    trim_heap()
    PassManager([lambda _: PassResult("b")], [ins]).run(None)
    assert ins.peak_mb - base >= 240


def test_copy_for_apply_shares_only_the_rewritten_weights() -> None:
    from slimfx.planning.configs import DenseConfig, LowRankConfig
    from slimfx.planning.plan import Plan
    from slimfx.site_selection import find_sites
    from slimfx.stages import _copy_sharing

    model = build(tie=True)
    sites, _ = find_sites(model, ((calibration(1)[0],), {}))
    by = {s.fqn: s for s in sites}
    q, o, head = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "lm_head"
    plan = Plan({q: LowRankConfig(4), o: DenseConfig(), head: LowRankConfig(4)},
                {k: by[k].site_shape for k in (q, o, head)})  # fmt: skip
    copy = _copy_sharing(model, plan, sites)
    mods, cmods = dict(model.named_modules()), dict(copy.named_modules())
    assert cmods[q].weight is mods[q].weight  # rewritten: read once, never copied
    assert cmods[o].weight is not mods[o].weight  # dense: the copy owns it
    assert cmods[head].weight is not mods[head].weight  # tied to the embedding: copied
    assert cmods[head].weight is cmods["model.embed_tokens"].weight  # and still tied


def test_optimize_records_memory_and_family_seconds_per_stage() -> None:
    from slimfx.pool import default_workers

    families = ("lowrank", "int8", "int4", "int4_gptq")
    new = slimfx.optimize(
        build(), 0.4, calibration=calibration(), families=families, progress=False
    )
    rep = slimfx.report_of(new)
    secs = rep.meta["candidate_seconds"]
    assert list(secs) == list(families)
    assert all(v >= 0 for v in secs.values())
    # seconds summed over the workers that fit sites side by side (slimfx.pool)
    assert sum(secs.values()) <= rep.timings["candidates"] * default_workers() + 0.05
    if rss_mb() is None:
        pytest.skip("no /proc/self/status: memory per stage is not recorded (Linux only)")
    mem = rep.meta["stage_memory_mb"]
    stages = [k for k in rep.timings if k != "total"]
    assert list(mem) == stages  # one record per timed stage, in run order
    for rec in mem.values():
        assert rec["peak"] >= max(rec["rss_before"], rec["rss_after"]) - 1.0  # kB rounding


@linux_only
def test_streamed_optimize_records_memory_per_stage(tmp_path) -> None:
    from slimfx.stream import optimize_checkpoint

    from ._util import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "ckpt")
    res = optimize_checkpoint(
        ckpt, 0.4, calibration=calibration(), out=tmp_path / "out", progress=False
    )
    stages = ["load_head", "calibration+candidates", "fisher", "solve", "apply+write"]
    assert list(res.memory) == stages
    assert all(r["peak"] >= r["rss_before"] - 1.0 for r in res.memory.values())
    assert res.peak_rss_mb >= max(r["peak"] for r in res.memory.values()) - 0.1
    assert slimfx.load(tmp_path / "out").slimfx_report.meta["stage_memory_mb"] == res.memory


@linux_only
def test_trim_heap_returns_freed_heap_pages() -> None:
    from slimfx.stages import trim_heap

    # 2000 tensors of 96 KiB: below glibc's mmap threshold, so they live on the heap, and
    # freeing them leaves the pages resident until the heap is trimmed
    held = [torch.ones(24 * 1024) for _ in range(2000)]
    keep = torch.ones(16)  # allocated last: the heap's top stays in use (no automatic trim)
    before = rss_mb()["rss"]
    del held
    freed = rss_mb()["rss"]
    if not trim_heap():
        pytest.skip("no glibc malloc_trim here")
    after = rss_mb()["rss"]
    assert before - after >= 150  # ~190 MB were freed; trimming gives most of it back
    assert after <= freed
    assert keep.sum() == 16


def test_fit_gram_is_the_damped_gram_bit_for_bit() -> None:
    from slimfx.cost.calibration import CalibrationStats

    g_ = torch.Generator().manual_seed(0)
    X = torch.randn(300, 577, dtype=torch.float64, generator=g_)
    X[:, 0] = 0.0  # an input that never fires: a zero row and column in the Gram
    g = X.T @ X
    st = CalibrationStats({"grp": g}, {"grp": 300}, {"site": "grp"})
    lam = 0.01 * float(g.diagonal().mean())
    ref = g + lam * torch.eye(577, dtype=torch.float64)  # the definition (XᵀX + λ·mean·I)
    got = st.fit_gram("site")
    assert torch.equal(got.view(torch.int64), ref.view(torch.int64))  # same bits, signs of 0
    assert torch.equal(st.grams["grp"], g)  # the stored Gram is not damped in place


@pytest.mark.parametrize(
    "family", ["lowrank", "int4_gptq", "sparse24", "lowrank_quant", "sparse24_lowrank"]
)
def test_optimize_leaves_the_callers_weights_unchanged_though_apply_shares_them(
    family: str,
) -> None:
    # apply reads the weights it replaces from the caller's model (stages._copy_sharing):
    # no form may write into them. One family at a time, so its own forms are built.
    model = build(tie=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = slimfx.optimize(model, 0.85, calibration=calibration(), families=(family,),
                          fisher=False, progress=False)  # fmt: skip
    plan = slimfx.report_of(new).meta["plan"]["decisions"]
    assert sum(d["kind"] != "dense" for d in plan.values()) >= 3  # built from shared weights
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
def test_compact_probes_rebuild_the_probe_deltas_bit_for_bit(shape) -> None:
    from slimfx.cost.sensitivity import _CompactProbes
    from slimfx.numerics.quant import dequantize, quantize_rtn

    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    out_f, in_f = shape
    # the probes by their definition: int4 RTN at group 128 (or the largest of 64 / 32 that
    # divides in); the SVD truncated at a quarter of the dense bytes
    g = next(k for k in (128, 64, 32) if in_f % k == 0)
    Wq = dequantize(quantize_rtn(W, 4, g, False), 4, g, False, in_f)
    r = int(0.25 * in_f * out_f // (in_f + out_f))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    svd = W - (U[:, :r] * S[:r]) @ Vh[:r]
    probes = _CompactProbes(W)
    first = probes.deltas()
    assert torch.equal(first["int4_g128"].view(torch.int32), (W - Wq).view(torch.int32))
    # the truncation comes from an eigen-decomposition: the SVD's to float32 rounding
    torch.testing.assert_close(first["lowrank_0.25"], svd, rtol=0, atol=2e-4 * W.abs().max())
    for _ in range(2):  # every read rebuilds the same bits
        got = probes.deltas()
        for k, v in first.items():
            assert torch.equal(got[k].view(torch.int32), v.view(torch.int32)), k
    held = sum(t.numel() * t.element_size() for t in (*probes.q.values(), probes.left,
               probes.right))  # fmt: skip
    assert held <= 0.25 * 2 * W.numel() * 4  # ≤ a quarter of the two float32 ΔWs
