"""collect_stats / prepare_batches: Grams against XᵀX from directly captured inputs, the
model left as it was, and the Fisher sensitivity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfx.cost.batches import CalibrationBatchError
from slimfx.cost.calibration import CalibrationStats, collect_stats, prepare_batches
from slimfx.ir.sites import LinearSite

from . import direct_grams, hooks_left, llama_sites, plain_sites

# collect_stats forms each chunk's XᵀX in float32 (then sums chunks in float64); the reference
# is a float64 product of the same inputs: agreement to float32 rounding of a short sum.
RTOL = 5e-5


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gram_matches_direct_xtx_mlp(tiny_mlp: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)]
    sites = plain_sites(tiny_mlp)
    stats = collect_stats(tiny_mlp, sites, batches, progress=False)
    ref = direct_grams(tiny_mlp, [s.fqn for s in sites], batches, tiny_mlp)
    assert set(stats.grams) == {"0", "2", "4"}
    for s in sites:
        G, n = ref[s.fqn]
        assert stats.gram(s.fqn).dtype == torch.float64
        torch.testing.assert_close(stats.gram(s.fqn), G, rtol=RTOL, atol=RTOL * 1e-1)
        assert stats.tokens[s.group] == n == 4 + 2 * 5
        torch.testing.assert_close(stats.mean_gram(s.fqn), G / n, rtol=RTOL, atol=RTOL * 1e-1)
    assert stats.nbytes() == 8 * (16 * 16 + 32 * 32 + 32 * 32)
    assert stats.sensitivity is None and stats.gram("nope") is None


def test_gram_one_per_group_llama(tiny_llama: nn.Module, tiny_ids: torch.Tensor) -> None:
    sites = llama_sites(tiny_llama, tiny_ids)
    batches = [tiny_ids, tiny_ids.flip(1)]
    stats = collect_stats(tiny_llama, sites, batches, progress=False)
    groups = {s.group for s in sites}
    assert set(stats.grams) == groups
    assert len(groups) == 2 * 4 + 1  # per layer: qkv, o, gate/up, down; plus lm_head
    q = "model.layers.0.self_attn.q_proj"
    assert stats.gram("model.layers.0.self_attn.v_proj") is stats.gram(q)
    assert stats.site_group["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    # A hook on every member separately sees the very Gram the group's one hook accumulated.
    call = lambda b: tiny_llama(input_ids=b, use_cache=False)  # noqa: E731
    ref = direct_grams(tiny_llama, [s.fqn for s in sites], batches, call)
    for s in sites:
        G, n = ref[s.fqn]
        torch.testing.assert_close(stats.gram(s.fqn), G, rtol=RTOL, atol=RTOL * 1e-1)
        assert stats.tokens[s.group] == n == 2 * tiny_ids.numel()


def test_empty_calibration_is_rejected(tiny_mlp: nn.Module) -> None:
    sites = plain_sites(tiny_mlp)
    with pytest.raises(ValueError, match="calibration is empty"):
        collect_stats(tiny_mlp, sites, [], progress=False)
    with pytest.raises(ValueError, match="calibration is empty"):
        prepare_batches([])
    with pytest.raises(ValueError, match="need a tokenizer"):
        collect_stats(tiny_mlp, sites, ["some text"], progress=False)


class _CharTokenizer:
    """A stand-in tokenizer: one id per character (code point mod 256)."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_prepare_batches_windows_texts() -> None:
    texts = ["abcdefg", "hijklmnopq"]  # 17 ids → two windows of 8, tail of 1 dropped
    out = prepare_batches(texts, _CharTokenizer(), seq_len=8)
    assert [tuple(b.shape) for b in out] == [(1, 8), (1, 8)]
    assert out[0].dtype == torch.long
    assert torch.equal(torch.cat(out, 1)[0], torch.tensor([ord(c) for c in "abcdefghijklmnop"]))
    short = prepare_batches("abc", _CharTokenizer(), seq_len=8)
    assert len(short) == 1 and short[0].shape == (1, 3)
    with pytest.raises(ValueError, match="tokenizer"):
        prepare_batches(texts)
    ids = torch.arange(5)
    assert prepare_batches([ids])[0].shape == (1, 5)


@pytest.mark.parametrize("fisher", [False, True])
def test_model_left_unchanged(tiny_llama: nn.Module, tiny_ids: torch.Tensor, fisher: bool) -> None:
    sites = llama_sites(tiny_llama, tiny_ids)
    tiny_llama.train()
    tiny_llama.model.layers[1].eval()  # mixed flags must come back one by one
    flags = {n: m.training for n, m in tiny_llama.named_modules()}
    before = _snapshot(tiny_llama)
    req = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    stats = collect_stats(tiny_llama, sites, [tiny_ids], fisher=fisher, progress=False)
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hooks_left(tiny_llama) == 0
    assert all(p.grad is None for p in tiny_llama.parameters())
    assert {n: p.requires_grad for n, p in tiny_llama.named_parameters()} == req
    assert {n: m.training for n, m in tiny_llama.named_modules()} == flags
    assert (stats.sensitivity is not None) == fisher


def test_hooks_removed_when_the_forward_fails(tiny_mlp: nn.Module) -> None:
    sites = plain_sites(tiny_mlp)
    with pytest.raises(ValueError, match="has 7 features, the site says 16"):
        collect_stats(tiny_mlp, sites, [torch.randn(3, 7)], progress=False)
    assert hooks_left(tiny_mlp) == 0
    # float64 input into float32 weights: the model fails, and the error names the batch
    with pytest.raises(CalibrationBatchError, match=r"batch 0 \(\(3, 16\) torch.float64\)") as e:
        collect_stats(tiny_mlp, sites, [torch.randn(3, 16, dtype=torch.float64)], progress=False)
    assert isinstance(e.value.__cause__, RuntimeError)
    assert hooks_left(tiny_mlp) == 0


def test_llama_sensitivity_is_normalized(tiny_llama: nn.Module, tiny_ids: torch.Tensor) -> None:
    sites = llama_sites(tiny_llama, tiny_ids)
    for p in tiny_llama.parameters():  # a frozen model still gets output gradients
        p.requires_grad_(False)
    stats = collect_stats(tiny_llama, sites, [tiny_ids], fisher=True, progress=False)
    sens = stats.sensitivity
    assert set(sens) == {s.fqn for s in sites}
    assert all(v > 0 for v in sens.values())
    assert sum(sens.values()) / len(sens) == pytest.approx(1.0, rel=1e-12)
    assert all(not p.requires_grad and p.grad is None for p in tiny_llama.parameters())


class _TwoBranches(nn.Module):
    """head(a(x) + b(x)): a and b receive the same output gradient."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        self.b.load_state_dict(self.a.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x) + self.b(x)))


def _site(fqn: str, m: nn.Linear) -> LinearSite:
    return LinearSite(
        fqn, m.in_features, m.out_features, "torch.float32", True, f"{fqn}.weight", fqn
    )


def test_sensitivity_grows_with_output_scale() -> None:
    model = _TwoBranches()
    with torch.no_grad():  # b's output becomes 10× a's; both see the same ∂L/∂y
        model.b.weight.mul_(10)
        model.b.bias.mul_(10)
    sites = [_site(n, getattr(model, n)) for n in ("a", "b", "head")]
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, 8, generator=gen) for _ in range(2)]
    stats = collect_stats(
        model,
        sites,
        batches,
        fisher=True,
        progress=False,
        loss_fn=lambda m, x: m(x).pow(2).mean(),
    )
    sens = stats.sensitivity
    assert sum(sens.values()) / 3 == pytest.approx(1.0, rel=1e-12)
    # Σ E[g²]E[y²] with equal g and y_b = 10·y_a: exactly 100× (up to float32 rounding).
    assert sens["b"] / sens["a"] == pytest.approx(100.0, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_fisher_without_a_loss_asks_for_loss_fn(tiny_mlp: nn.Module) -> None:
    with pytest.raises(ValueError, match="loss_fn"):
        collect_stats(
            tiny_mlp, plain_sites(tiny_mlp), [torch.randn(2, 16)], fisher=True, progress=False
        )
    assert hooks_left(tiny_mlp) == 0


def test_stats_without_sensitivity_weigh_one() -> None:
    stats = CalibrationStats({"g": torch.eye(2, dtype=torch.float64)}, {"g": 0}, {"s": "g"})
    assert stats.sensitivity_of("s") == 1.0
    assert torch.equal(stats.mean_gram("s"), torch.eye(2, dtype=torch.float64))  # no /0
