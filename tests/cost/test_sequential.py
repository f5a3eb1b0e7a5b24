"""run_sequential: block-by-block statistics from the rewritten prefix."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimfx.cost.calibration import CalibrationStats, collect_stats
from slimfx.cost.sequential import OnBlock, find_blocks, run_sequential
from slimfx.ir.modules import LowRankLinear
from slimfx.ir.sites import LinearSite
from slimfx.numerics import factorize
from slimfx.planning.configs import LowRankConfig

from . import hooks_left, llama_sites, plain_sites

# The same float32 block computations as a full forward, with Grams summed in float64: the
# two paths may differ only by float32 kernel rounding, far below this.
RTOL = 1e-6


def _record(calls: list) -> OnBlock:
    def on_block(i: int, name: str, sites: list[LinearSite], stats: CalibrationStats) -> None:
        calls.append((i, name, [s.fqn for s in sites], stats))

    return on_block


def _merged(calls: list) -> dict[str, torch.Tensor]:
    return {g: t for *_, st in calls for g, t in st.grams.items()}


def test_find_blocks_llama(tiny_llama: nn.Module, tiny_ids: torch.Tensor) -> None:
    sites = llama_sites(tiny_llama, tiny_ids)
    blocks = find_blocks(tiny_llama, sites)
    assert [name for name, _ in blocks] == ["model.layers.0", "model.layers.1", ""]
    assert [s.fqn for s in blocks[-1][1]] == ["lm_head"]
    assert len(blocks[0][1]) == len(blocks[1][1]) == 7
    assert sum(len(ss) for _, ss in blocks) == len(sites)


def test_find_blocks_mlp_children(tiny_mlp: nn.Module) -> None:
    blocks = find_blocks(tiny_mlp, plain_sites(tiny_mlp))
    assert [(n, [s.fqn for s in ss]) for n, ss in blocks] == [
        ("0", ["0"]),
        ("2", ["2"]),
        ("4", ["4"]),
    ]


class _Experts(nn.Module):
    """A block holding a ModuleList of parallel experts (not a chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + sum(e(x) for e in self.experts)


def test_find_blocks_ignores_nested_expert_lists() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList([_Experts(), _Experts()])
    blocks = find_blocks(model, plain_sites(model))
    assert [n for n, _ in blocks] == ["layers.0", "layers.1"]


def test_noop_matches_collect_stats_llama(tiny_llama: nn.Module, tiny_ids: torch.Tensor) -> None:
    sites = llama_sites(tiny_llama, tiny_ids)
    batches = [tiny_ids, tiny_ids.flip(1)]
    ref = collect_stats(tiny_llama, sites, batches, progress=False)
    calls: list = []
    run_sequential(tiny_llama, sites, batches, _record(calls), progress=False)
    assert [(i, n) for i, n, *_ in calls] == [(0, "model.layers.0"), (1, "model.layers.1"), (2, "")]
    assert [fs for *_, fs, _ in calls] == [
        [s.fqn for s in ss] for _, ss in find_blocks(tiny_llama, sites)
    ]
    assert set(calls[0][3].grams) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.down_proj",
    }
    got = _merged(calls)
    assert set(got) == set(ref.grams)
    for g, G in ref.grams.items():
        torch.testing.assert_close(got[g], G, rtol=RTOL, atol=1e-9 * G.abs().max().item())
    for *_, st in calls:
        assert all(st.tokens[g] == ref.tokens[g] for g in st.grams)
    assert hooks_left(tiny_llama) == 0


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def test_noop_matches_collect_stats_sequential_of_blocks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), _Block(8), nn.GELU(), _Block(8), nn.Linear(8, 3))
    sites = plain_sites(model)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 6, generator=gen), torch.randn(2, 3, 6, generator=gen)]
    ref = collect_stats(model, sites, batches, progress=False)
    calls: list = []
    run_sequential(model, sites, batches, _record(calls), progress=False)
    assert [n for _, n, *_ in calls] == ["0", "1", "3", "4"]  # GELU is glue, run but no call
    got = _merged(calls)
    for g, G in ref.grams.items():
        torch.testing.assert_close(got[g], G, rtol=RTOL, atol=1e-9 * G.abs().max().item())


def _swap_down_proj(model: nn.Module, layer: int) -> None:
    """Module swap: layer's mlp.down_proj → a rank-8 LowRankLinear (plain SVD)."""
    mlp = model.model.layers[layer].mlp
    lin = mlp.down_proj
    d = LowRankConfig(rank=8, method="svd")
    new = LowRankLinear.empty(d, lin.in_features, lin.out_features, False)
    mlp.down_proj = new.load_factors(factorize(lin.weight.detach(), d), None)


def test_rewritten_prefix_feeds_next_block(tiny_llama: nn.Module, tiny_ids: torch.Tensor) -> None:
    sites = llama_sites(tiny_llama, tiny_ids)
    batches = [tiny_ids]
    original = collect_stats(tiny_llama, sites, batches, progress=False)
    swapped = copy.deepcopy(tiny_llama)
    _swap_down_proj(swapped, 0)
    expected = collect_stats(
        swapped,
        [s for s in sites if s.fqn != "model.layers.0.mlp.down_proj"],
        batches,
        progress=False,
    )

    calls: list = []

    def on_block(i: int, name: str, block_sites: list[LinearSite], stats: CalibrationStats) -> None:
        calls.append((i, name, stats))
        if i == 0:
            _swap_down_proj(tiny_llama, 0)

    run_sequential(tiny_llama, sites, batches, on_block, progress=False)
    assert isinstance(tiny_llama.model.layers[0].mlp.down_proj, LowRankLinear)
    q1 = "model.layers.1.self_attn.q_proj"
    block0, block1, tail = (c[2] for c in calls)
    # block 0 was measured before its rewrite; block 1 and lm_head after it
    G0 = original.grams["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(block0.grams["model.layers.0.mlp.down_proj"], G0, rtol=RTOL, atol=0)
    assert not torch.allclose(block1.grams[q1], original.grams[q1], rtol=1e-3)
    torch.testing.assert_close(block1.grams[q1], expected.grams[q1], rtol=RTOL, atol=0)
    torch.testing.assert_close(tail.grams["lm_head"], expected.grams["lm_head"], rtol=RTOL, atol=0)


def test_hooks_and_modes_restored_on_error(tiny_llama: nn.Module, tiny_ids: torch.Tensor) -> None:
    sites = llama_sites(tiny_llama, tiny_ids)
    tiny_llama.train()

    def boom(i: int, *_: object) -> None:
        if i == 1:
            raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        run_sequential(tiny_llama, sites, [tiny_ids], boom, progress=False)
    assert hooks_left(tiny_llama) == 0
    assert all(m.training for m in tiny_llama.modules())
    with pytest.raises(ValueError, match="calibration is empty"):
        run_sequential(tiny_llama, sites, [], boom, progress=False)
