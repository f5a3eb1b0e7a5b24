"""Module swap (``apply_plan``) with the low-rank rule: the module before, op counts after,
numerics against eager (full rank: equal; real rank: the predicted error), rejections with
their reasons, plan validation, tied weights, generate() and the save/load route."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from slimfx.ir.find import discover_linear_sites
from slimfx.ir.modules import LowRankLinear
from slimfx.numerics import reconstruct, relative_output_error
from slimfx.numerics.lowrank import lowrank_error_curve
from slimfx.passes import apply_plan, empty_like_plan
from slimfx.passes.rules.lowrank import LinearToLowRank
from slimfx.planning.configs import DenseConfig, LowRankConfig
from slimfx.planning.plan import Plan

FULL_RANK_RULES = {"lowrank": LinearToLowRank(require_savings=False)}
# Full rank in fp32: U, V are float64 SVD factors rounded to fp32 (≈6e-8 relative each) and
# the product runs as two matmuls, so outputs agree with the dense layer to ~1e-6.
FP32_FULL_RANK = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine, 2-thread LAPACK calls (SVD) were
    measured 250× slower than 1-thread ones. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher (a linear shows up as mm / addmm)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def op_counts(model: nn.Module, *args, **kwargs) -> Counter[str]:
    with torch.no_grad(), OpCounter() as c:
        model(*args, **kwargs)
    return c.counts


def layer_inputs(model: nn.Module, fqns: list[str], *args, **kwargs) -> dict[str, torch.Tensor]:
    """Each listed layer's input in one forward, flattened to (tokens, in)."""
    mods = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        mods[f].register_forward_pre_hook(
            lambda _m, a, f=f: seen.setdefault(f, a[0].detach().reshape(-1, a[0].shape[-1]))
        )
        for f in fqns
    ]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(snap)
    for k, v in snap.items():
        assert torch.equal(now[k], v), k


def full_plan(sites, make) -> Plan:
    return Plan({s.fqn: make(s) for s in sites}, {s.fqn: s.shape for s in sites})


@pytest.fixture
def mlp_x() -> torch.Tensor:
    return torch.randn(256, 16, generator=torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------- tiny MLP


def test_module_before_and_op_counts_after(tiny_mlp: nn.Module, mlp_x: torch.Tensor) -> None:
    sites = discover_linear_sites(tiny_mlp)
    assert [s.fqn for s in sites] == ["0", "2", "4"]
    before = op_counts(tiny_mlp, mlp_x)
    assert before["slimfx.lowrank_linear.default"] == 0
    assert before["aten.addmm.default"] + before["aten.mm.default"] == 3

    plan = Plan({"0": LowRankConfig(4, "svd"), "2": LowRankConfig(8, "svd"), "4": DenseConfig()})
    new, result = apply_plan(tiny_mlp, plan, sites)

    assert type(new) is type(tiny_mlp) and new is not tiny_mlp
    assert [type(m).__name__ for m in new] == [
        "LowRankLinear",
        "ReLU",
        "LowRankLinear",
        "ReLU",
        "Linear",
    ]
    after = op_counts(new, mlp_x)
    assert after["slimfx.lowrank_linear.default"] == 2
    assert after["aten.addmm.default"] + after["aten.mm.default"] == 1
    assert result.name == "apply_plan" and result.modified
    status = {r.fqn: (r.status, r.reason) for r in result.records}
    assert status == {"0": ("applied", ""), "2": ("applied", ""), "4": ("skipped", "dense")}
    for rec in result.applied():
        mod = new.get_submodule(rec.fqn)
        assert rec.decision == plan[rec.fqn].short()
        # bytes_after is what the new module really stores, priced at 16 bits per value
        assert rec.bytes_after == 2 * sum(p.numel() for p in mod.parameters())
        assert rec.bytes_before == 2 * sum(
            p.numel() for p in tiny_mlp.get_submodule(rec.fqn).parameters()
        )
        assert rec.seconds >= 0


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_full_rank_output_equals_dense(
    tiny_mlp: nn.Module, mlp_x: torch.Tensor, method: str
) -> None:
    """At r = min(in, out) U·V = W exactly (up to rounding), so the rewritten model computes
    what the dense one does. The registered rule rejects full rank (it saves no bytes); the
    test passes an unregistered ``LinearToLowRank(require_savings=False)`` through ``rules``,
    so the whole pass — validation, factorization, module build, swap — is exercised."""
    sites = discover_linear_sites(tiny_mlp)
    plan = full_plan(sites, lambda s: LowRankConfig(min(s.in_features, s.out_features), method))
    grams = {
        f: x.double().T @ x.double()
        for f, x in layer_inputs(tiny_mlp, ["0", "2", "4"], mlp_x).items()
    }
    new, result = apply_plan(tiny_mlp, plan, sites, grams, rules=FULL_RANK_RULES)
    assert len(result.applied()) == 3
    with torch.no_grad():
        torch.testing.assert_close(new(mlp_x), tiny_mlp(mlp_x), **FP32_FULL_RANK)


@pytest.mark.parametrize("method", ["svd", "whitened"])
def test_real_rank_error_equals_prediction(
    tiny_mlp: nn.Module, mlp_x: torch.Tensor, method: str
) -> None:
    """Per layer, fed the dense model's own input X: ‖y' − y‖² / ‖y − b‖² equals the
    numerics' prediction tr(E G Eᵀ)/tr(W G Wᵀ) with G = XᵀX."""
    sites = discover_linear_sites(tiny_mlp)
    ranks = {"0": 5, "2": 8, "4": 3}
    inputs = layer_inputs(tiny_mlp, list(ranks), mlp_x)
    grams = {f: x.double().T @ x.double() for f, x in inputs.items()}
    plan = Plan({f: LowRankConfig(r, method) for f, r in ranks.items()})
    new, result = apply_plan(tiny_mlp, plan, sites, grams)
    assert len(result.applied()) == 3
    for fqn, r in ranks.items():
        dense, low = tiny_mlp.get_submodule(fqn), new.get_submodule(fqn)
        X, G = inputs[fqn], grams[fqn]
        with torch.no_grad():
            y, y_low = dense(X).double(), low(X).double()
        b = 0.0 if dense.bias is None else dense.bias.detach().double()
        measured = float((y_low - y).pow(2).sum() / (y - b).pow(2).sum())
        W_hat = reconstruct(plan[fqn], {"U": low.U.detach(), "V": low.V.detach()})
        predicted = relative_output_error(dense.weight, W_hat, G)
        curve = lowrank_error_curve(dense.weight, G, method)[r].item()
        assert 0.0 < measured < 1.0
        # fp32 forward vs float64 prediction: observed agreement ~1e-8 relative (errors are
        # ~0.1-0.5, far above fp32 rounding); 1e-5 leaves room for other BLAS builds.
        assert measured == pytest.approx(predicted, rel=1e-5), fqn
        # the curve gives the same number from one SVD (the factors are rounded to fp32)
        assert measured == pytest.approx(curve, rel=1e-5), fqn


def test_rejects_rank_not_saving_bytes(tiny_mlp: nn.Module) -> None:
    sites = discover_linear_sites(tiny_mlp)
    snap = snapshot(tiny_mlp)
    plan = Plan({"0": LowRankConfig(4), "2": LowRankConfig(16)})  # 16·(32+32) = 32·32
    with pytest.raises(ValueError, match="saves no bytes") as err:
        apply_plan(tiny_mlp, plan, sites, inplace=True)
    assert "2 [lowrank r=16]" in str(err.value) and "'0'" not in str(err.value)
    assert_unchanged(tiny_mlp, snap)
    assert not any(isinstance(m, LowRankLinear) for m in tiny_mlp.modules())

    new, result = apply_plan(tiny_mlp, plan, sites, strict=False)
    rec = {r.fqn: r for r in result.records}
    assert rec["2"].status == "rejected" and "saves no bytes" in rec["2"].reason
    assert rec["2"].bytes_after == rec["2"].bytes_before
    assert rec["0"].status == "applied" and result.modified
    assert isinstance(new[0], LowRankLinear) and type(new[2]) is nn.Linear
    assert torch.equal(new[2].weight, tiny_mlp[2].weight)  # the rejected site stayed dense


def test_rejects_rank_above_min_dim(tiny_mlp: nn.Module) -> None:
    sites = discover_linear_sites(tiny_mlp)
    plan = Plan({"4": LowRankConfig(9)})  # layer 4 is 32 → 8
    with pytest.raises(ValueError, match=r"rank 9 exceeds min\(in, out\) = 8"):
        apply_plan(tiny_mlp, plan, sites, rules=FULL_RANK_RULES)  # even without the byte test
    new, result = apply_plan(tiny_mlp, plan, sites, strict=False)
    assert [(r.fqn, r.status) for r in result.records] == [("4", "rejected")]
    assert "exceeds min(in, out) = 8" in result.records[0].reason
    assert result.modified is False  # truthful: nothing was applied
    assert type(new[4]) is nn.Linear


def test_unknown_fqn_is_named_with_a_suggestion(tiny_llama: nn.Module) -> None:
    sites = discover_linear_sites(tiny_llama)
    plan = Plan(
        {"model.layers.0.self_attn.q_prj": LowRankConfig(4), "nothing.like.it": LowRankConfig(4)}
    )
    with pytest.raises(ValueError) as err:
        apply_plan(tiny_llama, plan, sites)
    msg = str(err.value)
    assert (
        "'model.layers.0.self_attn.q_prj' (did you mean 'model.layers.0.self_attn.q_proj'?)" in msg
    )
    assert "'nothing.like.it'" in msg


def test_shape_mismatch_names_site_and_shapes(tiny_mlp: nn.Module) -> None:
    sites = discover_linear_sites(tiny_mlp)
    plan = Plan({"2": LowRankConfig(4)}, shapes={"2": (32, 16)})
    with pytest.raises(ValueError, match=r"'2'.*\(32, 16\).*\(32, 32\)"):
        apply_plan(tiny_mlp, plan, sites)


def test_nan_weight_raises_and_leaves_model_untouched(tiny_mlp: nn.Module) -> None:
    sites = discover_linear_sites(tiny_mlp)
    with torch.no_grad():
        tiny_mlp[2].weight[3, 1] = float("nan")
    snap = snapshot(tiny_mlp)
    plan = Plan({"0": LowRankConfig(4), "2": LowRankConfig(4)})
    with pytest.raises(ValueError, match=r"parameter '2\.weight'.*NaN or inf"):
        apply_plan(tiny_mlp, plan, sites, inplace=True, strict=False)
    assert type(tiny_mlp[0]) is nn.Linear  # "0" precedes "2" but was not touched either
    now = tiny_mlp.state_dict()
    for k, v in snap.items():
        torch.testing.assert_close(now[k], v, atol=0, rtol=0, equal_nan=True)


def test_input_model_untouched_unless_inplace(tiny_mlp: nn.Module) -> None:
    sites = discover_linear_sites(tiny_mlp)
    snap = snapshot(tiny_mlp)
    params = [id(p) for p in tiny_mlp.parameters()]
    plan = Plan({"0": LowRankConfig(4), "2": LowRankConfig(8)})
    new, _ = apply_plan(tiny_mlp, plan, sites)
    assert new is not tiny_mlp
    assert_unchanged(tiny_mlp, snap)
    assert [id(p) for p in tiny_mlp.parameters()] == params
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in tiny_mlp.modules())

    same, result = apply_plan(tiny_mlp, plan, sites, inplace=True)
    assert same is tiny_mlp and result.modified and isinstance(tiny_mlp[0], LowRankLinear)


# --------------------------------------------------------------------------- tiny Llama


def test_copy_keeps_tied_weights_tied(tiny_llama: nn.Module) -> None:
    sites = discover_linear_sites(tiny_llama)
    plan = Plan({"model.layers.0.mlp.up_proj": LowRankConfig(8)})
    new, _ = apply_plan(tiny_llama, plan, sites)
    assert new.lm_head.weight is new.model.embed_tokens.weight
    assert new.lm_head.weight is not tiny_llama.lm_head.weight


def test_tied_lm_head_rewrite_unties_cleanly(tiny_llama: nn.Module, tiny_ids: torch.Tensor) -> None:
    sites = discover_linear_sites(tiny_llama)
    head = next(s for s in sites if s.fqn == "lm_head")
    assert head.tied == ("model.embed_tokens.weight",)
    embed = tiny_llama.model.embed_tokens.weight.detach().clone()
    plan = Plan({"lm_head": LowRankConfig(64, "svd")})  # full rank (64 = hidden)
    new, result = apply_plan(tiny_llama, plan, sites, rules=FULL_RANK_RULES)

    (rec,) = result.records
    assert rec.status == "applied"
    assert rec.extra == {"untied": ["model.embed_tokens.weight"], "extra_copy_bytes": 2 * 64 * 256}
    assert isinstance(new.lm_head, LowRankLinear)
    assert torch.equal(new.model.embed_tokens.weight, embed)
    assert new.config.tie_word_embeddings is False and tiny_llama.config.tie_word_embeddings is True
    with torch.no_grad():
        ref = tiny_llama(tiny_ids, use_cache=False).logits
        out = new(tiny_ids, use_cache=False).logits
        torch.testing.assert_close(out, ref, **FP32_FULL_RANK)
        new.tie_weights()  # must neither re-tie nor fail
        assert isinstance(new.lm_head, LowRankLinear) and not hasattr(new.lm_head, "weight")
        torch.testing.assert_close(new(tiny_ids, use_cache=False).logits, out, atol=0, rtol=0)


def test_generate_on_rewritten_llama(tiny_llama: nn.Module, tiny_ids: torch.Tensor) -> None:
    sites = discover_linear_sites(tiny_llama)
    plan = full_plan(sites, lambda s: LowRankConfig(8, "svd"))
    new, result = apply_plan(tiny_llama, plan, sites)
    assert len(result.applied()) == len(sites) == 15
    assert type(new) is type(tiny_llama)
    prompt = tiny_ids[:1, :5]
    out = new.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], prompt)
    # generate() (KV cache) picks the same tokens as a cache-free greedy loop
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            nxt = new(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_save_load_route(tiny_llama: nn.Module, tiny_ids: torch.Tensor) -> None:
    sites = discover_linear_sites(tiny_llama)
    decisions = {s.fqn: LowRankConfig(8) for s in sites}
    decisions["model.layers.1.mlp.up_proj"] = LowRankConfig(60)  # saves nothing: stays dense
    decisions["model.layers.0.mlp.gate_proj"] = DenseConfig()
    plan = Plan(decisions)
    new, result = apply_plan(tiny_llama, plan, sites, strict=False)
    assert [r.fqn for r in result.rejected()] == ["model.layers.1.mlp.up_proj"]
    state = copy.deepcopy(new.state_dict())

    torch.manual_seed(123)  # a differently initialized model of the same architecture
    fresh = type(tiny_llama)(copy.deepcopy(tiny_llama.config)).eval()
    assert empty_like_plan(fresh, plan, sites) is fresh
    assert [n for n, m in fresh.named_modules() if isinstance(m, LowRankLinear)] == [
        n for n, m in new.named_modules() if isinstance(m, LowRankLinear)
    ]
    fresh.load_state_dict(state)  # strict: every key and shape matches
    with torch.no_grad():
        assert torch.equal(
            fresh(tiny_ids, use_cache=False).logits, new(tiny_ids, use_cache=False).logits
        )
