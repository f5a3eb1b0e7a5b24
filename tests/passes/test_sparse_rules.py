"""2:4 and combined forms in the passes: the ops (numerics, opcheck, gradients), the modules
(state dicts), the rules (rejections with reasons, op calls), module swap and export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import gen
from torch import nn

from slimfx.ir.find import discover_linear_sites
from slimfx.ir.modules import module_for
from slimfx.ir.modules_sparse import LowRankQuantLinear, Sparse24Linear, Sparse24LowRankLinear
from slimfx.ir.ops import slimfx_ops
from slimfx.ir.sites import LinearSite
from slimfx.numerics import factorize, reconstruct
from slimfx.numerics.quant import dequantize
from slimfx.numerics.sparse import unpack24
from slimfx.passes.base import rule_for
from slimfx.passes.rules.combo import LinearToLowRankQuant, LinearToSparse24LowRank
from slimfx.passes.rules.sparse import LinearToSparse24
from slimfx.planning.configs import (
    LowRankQuantConfig,
    QuantConfig,
    Sparse24Config,
    Sparse24LowRankConfig,
)
from slimfx.planning.plan import Plan

SP = torch.ops.slimfx.sparse24_linear.default
QL = torch.ops.slimfx.quant_lowrank_linear.default
SL = torch.ops.slimfx.sparse24_lowrank_linear.default
SLIM_OPS = (SP, QL, SL)


# one intra-op thread for this module's many small products (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * math.log10(float((ref**2).sum() / ((ref - approx) ** 2).sum()))


def _site(in_f: int, out_f: int = 16, dtype: str = "torch.float32") -> LinearSite:
    return LinearSite("lin", in_f, out_f, dtype, False, "lin.weight", "lin")


def _G(cfg: LowRankQuantConfig, in_f: int) -> int:
    return in_f if cfg.group_size is None else cfg.group_size


def _args(decision, W: torch.Tensor, bias: torch.Tensor | None) -> tuple:  # noqa: ANN001
    """The op's positional args after x, from the factorized tensors."""
    t = factorize(W, decision)
    if isinstance(decision, Sparse24Config):
        return t, (t["values"], t["meta"], bias)
    if isinstance(decision, Sparse24LowRankConfig):
        return t, (t["values"], t["meta"], t["U"], t["V"], bias)
    G = _G(decision, W.shape[1])
    return t, (t["qweight"], t["scales"], t.get("zeros"), t["U"], t["V"], bias, decision.bits, G)


FORMS = [
    (SP, Sparse24Config("magnitude", False)),
    (QL, LowRankQuantConfig(4, 4, 32, False)),
    (QL, LowRankQuantConfig(4, 4, 16, True, "lqlora")),
    (QL, LowRankQuantConfig(2, 8, None, True)),
    (SL, Sparse24LowRankConfig(4, "magnitude")),
]
IDS = [d.short() for _, d in FORMS]


# ------------------------------------------------------------------------------------ ops


def test_ops_are_in_the_vocabulary() -> None:
    for name in ("sparse24_linear", "quant_lowrank_linear", "sparse24_lowrank_linear"):
        assert slimfx_ops()[name] is getattr(torch.ops.slimfx, name)


@pytest.mark.parametrize(("op", "decision"), FORMS, ids=IDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_op_matches_reconstruct_then_linear(op, decision, with_bias: bool) -> None:  # noqa: ANN001
    W = torch.randn(24, 64, generator=gen(0))
    b = torch.randn(24, generator=gen(1)) if with_bias else None
    x = torch.randn(2, 5, 64, generator=gen(2))
    t, args = _args(decision, W, b)
    ref = F.linear(x, reconstruct(decision, t), b)
    # the op adds the low-rank branch separately: equal up to fp32 summation order
    torch.testing.assert_close(op(x, *args), ref, rtol=1e-5, atol=1e-5)


def test_sparse_op_agrees_with_the_kernels_reference() -> None:
    # the 2:4 format is written twice (numerics packs, kernels densify): they must agree
    from slimfx.kernels.sparse24_linear.reference import (
        densify_sparse24,
        sparse24_linear_reference,
    )

    W = torch.randn(24, 64, generator=gen(20))
    t, args = _args(Sparse24Config("magnitude", False), W, None)
    assert torch.equal(
        densify_sparse24(t["values"], t["meta"], 64), unpack24(t["values"], t["meta"], 64)
    )
    x = torch.randn(3, 64, generator=gen(21))
    torch.testing.assert_close(SP(x, *args), sparse24_linear_reference(x, *args))


@pytest.mark.parametrize(("op", "decision"), FORMS, ids=IDS)
def test_op_runs_in_the_input_dtype(op, decision) -> None:  # noqa: ANN001
    _, args = _args(decision, torch.randn(16, 64, generator=gen(3)), None)
    y = op(torch.randn(3, 64, generator=gen(4)).to(torch.bfloat16), *args)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 16)


@pytest.mark.parametrize(("op", "decision"), FORMS, ids=IDS)
def test_opcheck(op, decision) -> None:  # noqa: ANN001
    _, args = _args(decision, torch.randn(16, 64, generator=gen(5)), None)
    b = torch.randn(16, generator=gen(6), requires_grad=True)
    x = torch.randn(3, 64, generator=gen(7), requires_grad=True)
    args = tuple(
        a.clone().requires_grad_(True)
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a
        for a in args
    )
    bias_at = 2 if op is SP else (4 if op is SL else 5)
    with_bias = (*args[:bias_at], b, *args[bias_at + 1 :])
    torch.library.opcheck(op, (x, *with_bias))
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(op, (x.detach(), *plain))


@pytest.mark.parametrize(("op", "decision"), FORMS, ids=IDS)
def test_gradients_match_autograd_through_the_dense_weight(op, decision) -> None:  # noqa: ANN001
    W = torch.randn(12, 64, generator=gen(8))
    t, args = _args(decision, W, torch.randn(12, generator=gen(9)))
    x = torch.randn(2, 3, 64, generator=gen(10))
    grad = torch.randn(2, 3, 12, generator=gen(11))
    names = [n for n in ("values", "scales", "U", "V") if n in t]

    def run(use_op: bool) -> list[torch.Tensor]:
        xs = x.clone().requires_grad_(True)
        leaves = {n: t[n].clone().requires_grad_(True) for n in names}
        b = args[2 if op is SP else (4 if op is SL else 5)].clone().requires_grad_(True)
        if use_op:
            a = list(args)
            for i, v in enumerate(a):
                for n in names:
                    if v is t[n]:
                        a[i] = leaves[n]
            a[2 if op is SP else (4 if op is SL else 5)] = b
            y = op(xs, *a)
        else:  # differentiate through an explicit dense reconstruction
            if "values" in leaves:
                dense = unpack24(leaves["values"], t["meta"], 64)
            else:
                G = _G(decision, 64)
                ones = {**t, "scales": torch.ones_like(t["scales"])}
                centered = dequantize(
                    ones, decision.bits, decision.group_size, decision.symmetric, 64
                )
                dense = centered * leaves["scales"].repeat_interleave(G, dim=1)
            if "U" in leaves:
                dense = dense + leaves["U"] @ leaves["V"]
            y = F.linear(xs, dense, b)
        y.backward(grad)
        return [xs.grad, b.grad] + [leaves[n].grad for n in names]

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fake_rejects_bad_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 64)
        with pytest.raises(Exception, match="meta must be out × in/8"):
            SP(x, torch.empty(8, 32), torch.empty(8, 4, dtype=torch.uint8), None)
        with pytest.raises(Exception, match="U must be out × r"):
            SL(
                x,
                torch.empty(8, 32),
                torch.empty(8, 8, dtype=torch.uint8),
                torch.empty(9, 2),
                torch.empty(2, 64),
                None,
            )


# --------------------------------------------------------------------------------- modules


MODULE_FORMS = [
    (Sparse24Linear, Sparse24Config()),
    (LowRankQuantLinear, LowRankQuantConfig(4, 4, 32, False)),
    (LowRankQuantLinear, LowRankQuantConfig(4, 8, None, True)),
    (Sparse24LowRankLinear, Sparse24LowRankConfig(4)),
]


@pytest.mark.parametrize(("cls", "cfg"), MODULE_FORMS, ids=[c.short() for _, c in MODULE_FORMS])
def test_module_state_dict_round_trip(cls, cfg) -> None:  # noqa: ANN001
    assert module_for(cfg) is cls
    lin = nn.Linear(64, 16)
    mod = rule_for(cfg).build_module(_site(64), lin, cfg)
    assert isinstance(mod, cls)
    sd = mod.state_dict()
    fresh = cls.empty(cfg, 64, 16, True, torch.float32)
    assert {k: (v.shape, v.dtype) for k, v in fresh.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in sd.items()
    }
    fresh.load_state_dict(sd)
    x = torch.randn(4, 64, generator=gen(12))
    assert torch.equal(fresh(x), mod(x))
    t = {k: v for k, v in sd.items() if k != "bias"}
    torch.testing.assert_close(mod(x), F.linear(x, reconstruct(cfg, t), lin.bias))
    # integer tensors are buffers, float factors parameters
    params = {n for n, _ in mod.named_parameters()}
    assert params == {"bias"} | ({"values"} & set(sd)) | ({"U", "V"} & set(sd))
    assert all(sd[n].dtype == torch.uint8 for n in ("meta", "qweight", "zeros") if n in sd)


def test_modules_reject_impossible_shapes() -> None:
    with pytest.raises(ValueError, match="not a multiple of 8"):
        Sparse24Linear.empty(Sparse24Config(), 12, 4, False)
    with pytest.raises(ValueError, match="not a multiple of group size 32"):
        LowRankQuantLinear.empty(LowRankQuantConfig(2, 4, 32), 48, 4, False)


# ------------------------------------------------------------------------------------ rules


@pytest.mark.parametrize(
    ("rule", "site", "cfg", "reason"),
    [
        (LinearToSparse24(), _site(36), Sparse24Config(), "in_features 36 is not a multiple of 8"),
        (LinearToSparse24(), _site(64, dtype="torch.int8"), Sparse24Config(), "not floating"),
        (LinearToSparse24(), _site(64), QuantConfig(), "handles 'sparse24', not 'quant'"),
        (
            LinearToLowRankQuant(),
            _site(96),
            LowRankQuantConfig(4, 4, 64),
            "in_features 96 is not a multiple of group size 64",
        ),
        (LinearToLowRankQuant(), _site(64), LowRankQuantConfig(4, 3, 32), "bits 3 has no kernel"),
        (
            LinearToLowRankQuant(),
            _site(33),
            LowRankQuantConfig(4, 4, None),
            "in_features 33 is odd",
        ),
        (
            LinearToLowRankQuant(),
            _site(64),
            LowRankQuantConfig(17, 4, 32),
            "rank 17 exceeds min(in, out) = 16",
        ),
        # 16×64 int4 g32: 512 + 96 B core; rank 12 adds 1920 B ≥ 2048 B dense in total
        (
            LinearToLowRankQuant(),
            _site(64),
            LowRankQuantConfig(12, 4, 32),
            "saves no bytes: core + rank-12 factors = 2528 B ≥ dense 2048 B",
        ),
        (LinearToSparse24LowRank(), _site(36), Sparse24LowRankConfig(2), "not a multiple of 8"),
        (
            LinearToSparse24LowRank(),
            _site(64),
            Sparse24LowRankConfig(6),
            "saves no bytes: core + rank-6 factors = 2112 B ≥ dense 2048 B",
        ),
    ],
)
def test_rejections_carry_reasons(rule, site, cfg, reason: str) -> None:  # noqa: ANN001
    v = rule.check(site, cfg)
    assert not v.ok
    assert reason in v.reason


def test_accepts_supported_forms() -> None:
    W = torch.randn(16, 64)
    for cfg in [
        Sparse24Config(),
        LowRankQuantConfig(4, 4, 32),
        LowRankQuantConfig(2, 8, None, True),
        Sparse24LowRankConfig(4),
    ]:
        assert rule_for(cfg).check(_site(64), cfg, W).ok, cfg
    assert not rule_for(Sparse24Config()).check(_site(64), Sparse24Config(), torch.randn(8, 64)).ok


def test_op_calls() -> None:
    W = torch.randn(16, 64, generator=gen(13))
    assert LinearToSparse24().op_call(Sparse24Config(), {}) == (SP, ["values", "meta"], {})
    cfg = LowRankQuantConfig(4, 8, None, True)
    op, names, extra = LinearToLowRankQuant().op_call(cfg, factorize(W, cfg))
    assert op is QL and names == ["qweight", "scales", "zeros", "U", "V"]
    assert extra == {"bits": 8, "group_size": 64}
    assert LinearToSparse24LowRank().op_call(Sparse24LowRankConfig(2), {}) == (
        SL,
        ["values", "meta", "U", "V"],
        {},
    )


# ------------------------------------------------------------------------------ module swap


MLP_PLAN = Plan(
    {
        "0": Sparse24LowRankConfig(4, "magnitude"),  # 16 → 32
        "2": LowRankQuantConfig(4, 4, 16, False, "lorc"),  # 32 → 32
        "4": Sparse24Config("magnitude", False),  # 32 → 8
    }
)
WANDA_PLAN = Plan(
    {
        "0": Sparse24LowRankConfig(4, "wanda"),
        "2": LowRankQuantConfig(4, 4, 16, False, "lorc"),
        "4": Sparse24Config("wanda", True),
    }
)


def _swap(model: nn.Module, plan: Plan, grams=None) -> nn.Module:  # noqa: ANN001
    from slimfx.passes.swap import apply_plan

    new, result = apply_plan(model, plan, discover_linear_sites(model), grams)
    assert result.modified and len(result.applied()) == len(plan)
    return new


def _grams(model: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """XᵀX (float64) of the input each linear of a Sequential sees for ``x``."""
    grams = {}
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            grams[str(i)] = (x.T @ x).to(torch.float64)
        x = layer(x)
    return grams


def test_swap_tiny_mlp(tiny_mlp: nn.Sequential) -> None:
    x = torch.randn(256, 16, generator=gen(14))
    with torch.no_grad():
        ref = tiny_mlp(x)
        new = _swap(tiny_mlp, MLP_PLAN)
        calibrated = _swap(tiny_mlp, WANDA_PLAN, _grams(tiny_mlp, x))
        got, got_cal = new(x), calibrated(x)
    kinds = [type(new.get_submodule(f)) for f in ("0", "2", "4")]
    assert kinds == [Sparse24LowRankLinear, LowRankQuantLinear, Sparse24Linear]
    assert not any(isinstance(m, nn.Linear) for m in new.modules())
    assert isinstance(tiny_mlp[0], nn.Linear)  # the original is left as it was
    # 2:4 by magnitude on a random 3-layer MLP (no Gram): measured 9.2 dB; with the Gram
    # (Wanda + compensation, GPTQ core) on the same tokens: measured 14.0 dB
    assert _sqnr_db(ref, got) > 7.0
    assert _sqnr_db(ref, got_cal) > _sqnr_db(ref, got) + 3.0


def test_swap_state_dict_loads_into_empty_shells(tiny_mlp: nn.Sequential) -> None:
    from slimfx.passes.swap import empty_like_plan

    new = _swap(tiny_mlp, MLP_PLAN)
    sd = new.state_dict()
    torch.manual_seed(123)
    shell = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(), nn.Linear(32, 8)
    )
    shell = empty_like_plan(shell, MLP_PLAN, discover_linear_sites(shell))
    shell.load_state_dict(sd)
    x = torch.randn(5, 16, generator=gen(15))
    with torch.no_grad():
        assert torch.equal(shell(x), new(x))


def _llama_plan(model: nn.Module) -> Plan:
    sites = [s for s in discover_linear_sites(model) if s.fqn != "lm_head"]  # lm_head is tied
    cfgs = [Sparse24Config(), LowRankQuantConfig(4, 4, 32), Sparse24LowRankConfig(4)]
    return Plan({s.fqn: cfgs[i % 3] for i, s in enumerate(sites)}, {s.fqn: s.shape for s in sites})


def test_swap_tiny_llama_counts_numerics_and_export(
    tiny_llama: nn.Module,
    tiny_ids: torch.Tensor,
) -> None:
    plan = _llama_plan(tiny_llama)
    assert len(plan) == 14
    with torch.no_grad():
        ref = tiny_llama(tiny_ids, use_cache=False).logits
        new = _swap(tiny_llama, plan)  # no Gram: magnitude masks, RTN cores
        got = new(tiny_ids, use_cache=False).logits
    counts = {
        c: sum(isinstance(m, c) for m in new.modules())
        for c in (Sparse24Linear, LowRankQuantLinear, Sparse24LowRankLinear)
    }
    assert counts == {Sparse24Linear: 5, LowRankQuantLinear: 5, Sparse24LowRankLinear: 4}
    # a random tiny Llama, 2:4 (magnitude, no Gram) in 9 of 14 linears: measured 11.1 dB
    assert _sqnr_db(ref, got) > 8.0

    ep = torch.export.export(new, (), {"input_ids": tiny_ids, "use_cache": False}, strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert [sum(t is op for t in targets) for op in SLIM_OPS] == [5, 5, 4]
    linears = [
        n
        for n in ep.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default
    ]
    assert all("lm_head" in str(n.meta.get("nn_module_stack", "")) for n in linears)
    with torch.no_grad():
        torch.testing.assert_close(
            ep.module()(input_ids=tiny_ids, use_cache=False).logits, got, rtol=1e-4, atol=1e-4
        )


def test_graph_rewrite_agrees_with_module_swap(tiny_mlp: nn.Sequential) -> None:
    from slimfx.passes.graph_rewrite import apply_plan_exported

    plan = Plan({**MLP_PLAN.decisions, "2": LowRankQuantConfig(4, 4, 16, True, "lorc")})
    x = torch.randn(8, 16, generator=gen(16))
    ep = torch.export.export(tiny_mlp, (x,))
    gm, result = apply_plan_exported(ep, plan, discover_linear_sites(tiny_mlp))
    assert len(result.applied()) == 3
    targets = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SLIM_OPS]
    assert sorted(str(n.target) for n in targets) == sorted(str(op) for op in SLIM_OPS)
    ql = next(n for n in targets if n.target is QL)
    assert ql.args[3] is None  # symmetric: zeros passed as None
    torch.testing.assert_close(gm(x), _swap(tiny_mlp, plan)(x), rtol=1e-5, atol=1e-5)
