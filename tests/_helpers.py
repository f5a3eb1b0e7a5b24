"""Seeded test data shared by the numerics, cost and passes tests of the 2:4 and combined
forms. Imported as ``from _helpers import …``: pytest puts ``tests/`` on ``sys.path`` when it
loads ``tests/conftest.py`` (that folder is not a package)."""

from __future__ import annotations

import torch


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def correlated_gram(
    in_f: int, n: int = 1024, seed: int = 0, channel_spread: float = 0.5
) -> torch.Tensor:
    """XᵀX (float64) of ``n`` inputs with correlated channels and log-normal channel scales
    (as LLM activations: a few channels carry most of the energy); ``channel_spread`` is the
    standard deviation of the log scales."""
    g = gen(seed)
    mix = torch.eye(in_f) + 2 * torch.randn(in_f, in_f, generator=g) / in_f**0.5
    X = torch.randn(n, in_f, generator=g) @ mix  # drawn before the scales, as it always was
    X = X * torch.exp(channel_spread * torch.randn(in_f, generator=g))
    return (X.T @ X).to(torch.float64)


def lowrank_plus_noise(out_f: int, in_f: int, seed: int = 1) -> torch.Tensor:
    """A weight that is a rank-8 component plus heavy-tailed noise (1% of entries 4× larger):
    neither low rank nor easy to quantize."""
    g = gen(seed)
    low = torch.randn(out_f, 8, generator=g) @ torch.randn(8, in_f, generator=g) * 0.3
    noise = torch.randn(out_f, in_f, generator=g)
    return low + noise * (1 + 3 * (torch.rand(out_f, in_f, generator=g) < 0.01))
