"""Token windows stacked into one forward + backward of the sensitivity pass: the same Grams
bit for bit and the same statistics (to float32 rounding of the larger products) as one
window at a time; anything that cannot be stacked passes through unchanged."""

from __future__ import annotations

import pytest
import torch

from slimfx.cost.batches import stack_windows
from slimfx.cost.calibration import collect_sensitivity

from . import llama_sites


def _ids(n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, length), generator=g) for _ in range(n)]


def test_stack_windows_groups_consecutive_equal_shapes_up_to_the_token_cap() -> None:
    a = _ids(5, 8)
    out = stack_windows(a, max_tokens=16)
    assert [tuple(t.shape) for t in out] == [(2, 8), (2, 8), (1, 8)]
    assert torch.equal(torch.cat(out), torch.cat(a))
    # another length, a float input and a dict end a stack and pass unchanged
    odd, flt, kw = _ids(1, 5)[0], torch.randn(1, 8), {"input_ids": a[0]}
    out = stack_windows([a[0], a[1], odd, a[2], flt, a[3], kw, a[4]], max_tokens=64)
    assert [tuple(t.shape) if isinstance(t, torch.Tensor) else "dict" for t in out] == [
        (2, 8), (1, 5), (1, 8), (1, 8), (1, 8), "dict", (1, 8)]
    assert out[3] is flt and out[5] is kw
    assert stack_windows(a, max_tokens=4) == a  # a window alone above the cap is kept


def test_stacked_pass_matches_window_by_window(tiny_llama) -> None:  # noqa: ANN001
    batches = _ids(6, 12, seed=3)
    sites = llama_sites(tiny_llama, batches[0])
    alone, rec1 = collect_sensitivity(tiny_llama, sites, batches, estimator="geo",
                                      progress=False, stack_tokens=None)
    stacked, rec2 = collect_sensitivity(tiny_llama, sites, batches, estimator="geo",
                                        progress=False, stack_tokens=36)
    assert alone.grams.keys() == stacked.grams.keys()
    for k, g in alone.grams.items():
        assert torch.equal(g, stacked.grams[k]), k  # every window's XᵀX added as before
    assert alone.tokens == stacked.tokens
    for s in sites:
        assert rec1.rows[s.fqn] == rec2.rows[s.fqn] == 6 * 12
        torch.testing.assert_close(rec1.g2[s.fqn], rec2.g2[s.fqn], rtol=1e-4, atol=1e-12)
        for name, v in rec1.exact[s.fqn].items():
            assert rec2.exact[s.fqn][name] == pytest.approx(v, rel=1e-3, abs=1e-12), name
    for fqn, w in alone.sensitivity.items():
        assert stacked.sensitivity[fqn] == pytest.approx(w, rel=1e-3), fqn


def test_lowrank_probe_through_its_factors_equals_the_full_product(tiny_llama, monkeypatch) -> None:  # noqa: ANN001,E501
    """ĝᵀ(W − L R)x from the site's output and the probe's factors = from the full ΔW."""
    import slimfx.cost.sensitivity as sens

    batches = _ids(3, 12, seed=5)
    sites = llama_sites(tiny_llama, batches[0])
    _, fast = collect_sensitivity(tiny_llama, sites, batches, progress=False)
    monkeypatch.setattr(sens, "_plain_linear", lambda m: False)
    _, full = collect_sensitivity(tiny_llama, sites, batches, progress=False)
    for s in sites:
        for name in ("int4_g128", "lowrank_0.25"):
            a, b = fast.exact[s.fqn][name], full.exact[s.fqn][name]
            assert a == pytest.approx(b, rel=1e-4, abs=1e-12), (s.fqn, name)
