"""How the streamed optimize splits a block's candidate fits over ranks (``assign_groups``)."""

from __future__ import annotations

from slimfx.ir.sites import LinearSite
from slimfx.stream.statistics import assign_groups


def _site(name: str, out: int, inp: int, group: str) -> LinearSite:
    pre = "model.layers.0."
    return LinearSite(pre + name, inp, out, "torch.float32", False, pre + name + ".weight",
                      pre + group)  # fmt: skip


def _smollm2_block() -> list[LinearSite]:
    """SmolLM2-135M's block: hidden 576, 9 heads / 3 kv heads of 64, MLP 1536."""
    return [
        _site("self_attn.q_proj", 576, 576, "qkv"),
        _site("self_attn.k_proj", 192, 576, "qkv"),
        _site("self_attn.v_proj", 192, 576, "qkv"),
        _site("self_attn.o_proj", 576, 576, "o"),
        _site("mlp.gate_proj", 1536, 576, "gate_up"),
        _site("mlp.up_proj", 1536, 576, "gate_up"),
        _site("mlp.down_proj", 576, 1536, "down"),
    ]


def test_one_rank_fits_everything() -> None:
    assert assign_groups(_smollm2_block(), 1) == [0] * 7


def test_groups_stay_together_and_the_widest_fit_goes_alone() -> None:
    sites = _smollm2_block()
    owner = assign_groups(sites, 2)
    by_group: dict[str, set[int]] = {}
    for s, r in zip(sites, owner):
        by_group.setdefault(s.group, set()).add(r)
    assert all(len(r) == 1 for r in by_group.values())  # a group's sites share its Gram
    # down_proj (in 1536: the one 1536³ factorization) on one rank, the rest on the other —
    # measured per block: 0.49 s against 0.12 + 0.07 + 0.24 s
    assert owner == [1, 1, 1, 1, 1, 1, 0]


def test_more_ranks_than_groups_leaves_ranks_idle_deterministically() -> None:
    sites = _smollm2_block()
    owner = assign_groups(sites, 6)
    assert owner == assign_groups(list(sites), 6)
    assert len(set(owner)) == 4  # four groups: two ranks fit nothing
    assert sorted(set(owner)) == [0, 1, 2, 3]
