"""Which backend runs which decision (slimfx.backends.capabilities) and the optimize wiring."""

from __future__ import annotations

import pytest
import torch

from slimfx.backends.capabilities import (
    allow_fn,
    check_plan,
    matmul_nbits_block,
    supports,
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
from slimfx.planning.plan import Plan


def _site(fqn: str = "fc", in_f: int = 128, out_f: int = 64, bias: bool = False) -> LinearSite:
    return LinearSite(fqn, in_f, out_f, "torch.float32", bias, f"{fqn}.weight", fqn)


def test_matmul_nbits_block():
    assert matmul_nbits_block(128) == 128
    assert matmul_nbits_block(576) == 64  # 576 = 9 · 64
    assert matmul_nbits_block(96) == 32
    assert matmul_nbits_block(24) is None  # largest power-of-two divisor 8 < 16
    assert matmul_nbits_block(16) == 16


@pytest.mark.parametrize("backend", ["eager", "compile"])
def test_eager_runs_every_form_its_rules_accept(backend):
    s = _site()
    for d in (
        DenseConfig(),
        LowRankConfig(8),
        QuantConfig(4, 32),
        QuantConfig(8, None, True),
        Sparse24Config(),
        LowRankQuantConfig(4),
        Sparse24LowRankConfig(4),
    ):
        ok, why = supports(backend, s, d)
        assert ok, (d, why)
        assert why
    ok, why = supports(backend, s, QuantConfig(3, 32))
    assert not ok and "bits 3" in why
    ok, why = supports(backend, _site(in_f=100), QuantConfig(4, 32))
    assert not ok and "not a multiple of group size 32" in why


def test_onnx_answers():
    s = _site(in_f=96)
    assert supports("onnx", s, LowRankConfig(8)) == (True, "onnx: two MatMul")
    ok, why = supports("onnx", s, QuantConfig(4, 32))
    assert ok and "MatMulNBits bits=4 block=32" in why
    ok, why = supports("onnx", s, QuantConfig(8, None, True))  # per-channel 96 → block 32
    assert ok and "block=32" in why and "scales repeated" in why
    ok, why = supports("onnx", _site(in_f=24), QuantConfig(4, None))
    assert not ok and "no power-of-two block" in why
    ok, why = supports("onnx", _site(), Sparse24Config())
    assert not ok and why == "no: priced as dense — onnxruntime has no 2:4 kernel (exported dense)"
    ok, why = supports("onnx", _site(), Sparse24LowRankConfig(4))
    assert not ok and "2:4" in why
    ok, why = supports("onnx", _site(), LowRankQuantConfig(4, 4, 32))
    assert ok and "two MatMul" in why
    # a decision no backend can apply is refused with eager's reason
    ok, why = supports("onnx", _site(), QuantConfig(2, 32))
    assert not ok and "bits 2" in why


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = supports("triton", _site(), LowRankConfig(8), device="cpu")
    assert (ok, why) == (False, "triton: needs CUDA or TRITON_INTERPRET")
    assert supports("triton", _site(), DenseConfig(), device="cpu")[0]


def test_triton_combined_forms_have_no_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = supports("triton", _site(), LowRankQuantConfig(4), device="cpu")
    assert not ok and "no Triton kernel for slimfx::quant_lowrank_linear" in why


def test_triton_asks_the_kernels(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # the probe goes through kernels.select: on CPU the answer is a kernel name, or the
    # kernels' own reasons (e.g. compiled without the interpreter) — never a silent yes
    ok, why = supports("triton", _site(), QuantConfig(4, 32), device="cpu")
    assert why.startswith("triton: ")
    if ok:
        assert "quant_linear_triton" in why
    else:
        assert "quant_linear_triton:" in why


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        supports("tensorrt", _site(), DenseConfig())


def test_check_plan_names_every_unsupported_site():
    sites = [_site("a"), _site("b"), _site("c", in_f=24), _site("d"), _site("e")]
    plan = Plan(
        {
            "a": Sparse24Config(),
            "b": LowRankConfig(4),
            "c": QuantConfig(4, None),
            "d": Sparse24LowRankConfig(4),
            "e": DenseConfig(),
        },
        {},
    )
    problems = check_plan("onnx", plan, sites)
    assert [p.split(" ", 1)[0] for p in problems] == ["a", "c", "d"]
    assert problems[0].startswith("a [2:4 wanda +comp]: no: priced as dense")
    assert check_plan("eager", plan, sites) == []


def test_allow_fn_filters_and_caches():
    allow = allow_fn("onnx")
    s = _site()
    assert allow(s, LowRankConfig(4)) and not allow(s, Sparse24Config())


def test_allow_fn_keeps_each_refusals_reason():
    allow = allow_fn("onnx")
    s = _site("a")
    assert not allow(s, Sparse24Config()) and not allow(s, Sparse24Config())  # cached
    (why, where), = allow.refused.items()
    assert "priced as dense" in why and where == ["a [2:4 wanda +comp]"]


def test_a_budget_only_the_refused_forms_could_meet_says_the_backend_refused_them(tiny_mlp):
    """Every candidate left out by the backend: the infeasible error says so, with the reason
    (it read "the smallest achievable is 1.000 of dense" alone)."""
    import slimfx
    from slimfx.planning.problem import InfeasibleBudgetError

    batches = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(InfeasibleBudgetError) as e:
        slimfx.optimize(tiny_mlp, 0.6, calibration=batches, families=("sparse24",),
                        backend="onnx", progress=False)  # fmt: skip
    msg = str(e.value)
    assert "smallest achievable is 1.000 of dense" in msg
    assert "(backend onnx left out 9 candidate(s) it cannot run: 9 × no: priced as dense" in msg, msg
    assert "(e.g. 0 [2:4" in msg


def test_optimize_with_backend_onnx(tiny_mlp):
    import slimfx

    torch.manual_seed(0)
    batches = [torch.randn(64, 16) for _ in range(4)]
    new = slimfx.optimize(
        tiny_mlp,
        0.6,
        calibration=batches,
        families=("lowrank", "sparse24"),
        backend="onnx",
        progress=False,
    )
    rep = slimfx.report_of(new)
    assert all(not s.chosen.startswith("2:4") for s in rep.sites)
    assert any("backend onnx" in n and "not offered" in n for n in rep.notes)
    assert rep.meta["backend"] == "onnx"
    # a replayed plan the backend cannot run names every such site
    plan = Plan(
        {"0": Sparse24Config("magnitude", False), "2": Sparse24Config("magnitude", False)}, {}
    )
    with pytest.raises(ValueError) as e:
        slimfx.optimize(tiny_mlp, None, plan=plan, example_inputs=(batches[0],), backend="onnx")
    msg = str(e.value)
    assert "2 site(s)" in msg and "0 [2:4" in msg and "2 [2:4" in msg
    # the same plan runs eagerly
    slimfx.optimize(
        tiny_mlp, None, plan=plan, example_inputs=(batches[0],), backend="eager", progress=False
    )


def test_an_interpreter_too_old_for_the_kernels_is_named(monkeypatch):
    """Triton 3.6's interpreter cannot run the kernels' split loops: on the CPU the kernels
    decline with that reason (lowering falls back and says so) instead of failing mid-run."""
    triton = pytest.importorskip("triton")
    from slimfx.kernels import device_reason, interpreter_reason

    class InterpretedFunction:  # what @triton.jit gives under TRITON_INTERPRET=1
        pass

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    why = interpreter_reason()
    assert why.startswith("Triton 3.6.0's interpreter cannot run loops") and "≥ 3.7" in why
    assert device_reason(torch.zeros(2), InterpretedFunction(), {}) == why
    for version in ("3.7.1", "4.0.0", "3.7.0+git1234"):
        monkeypatch.setattr(triton, "__version__", version)
        assert interpreter_reason() == "" and device_reason(torch.zeros(2), InterpretedFunction(), {}) == ""
