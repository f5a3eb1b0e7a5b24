"""Tiny seeded models and the "model unchanged" check shared by the robustness tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn


def opt(model: nn.Module, calib: list, **kw) -> nn.Module:
    """``slimfx.optimize`` quietly at 0.6 (``budget=`` to change) over int8 by default."""
    import slimfx

    kw.setdefault("families", ("int8",))
    return slimfx.optimize(model, kw.pop("budget", 0.6), calibration=calib, progress=False, **kw)


def mlp(seed: int = 0, widths: tuple[int, ...] = (32, 64, 16)) -> nn.Sequential:
    """A seeded Linear-ReLU stack in eval mode; the global RNG is left alone."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g) / a**0.5)
            lin.bias.copy_(torch.randn(b, generator=g) * 0.1)
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def feats(n: int = 4, rows: int = 16, width: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=g) for _ in range(n)]


def ids(n: int = 3, length: int = 16, vocab: int = 256, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def llama(seed: int = 0) -> nn.Module:
    pytest.importorskip("transformers")
    from slimfx.models import tiny_llama

    return tiny_llama(seed=seed)


def out_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


class Frozen:
    """What "the user's model is bit-identical" means: same module classes, same state_dict
    tensors (exact), same forward output on a fixed input, no slimfx report attached."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model, self.x = model, x
        self.types = [(n, type(m)) for n, m in model.named_modules()]
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.out = out_of(model, x)
        self.report = getattr(model, "slimfx_report", None)

    def check(self) -> None:
        assert [(n, type(m)) for n, m in self.model.named_modules()] == self.types
        state = self.model.state_dict()
        assert state.keys() == self.state.keys()
        for k, v in self.state.items():
            assert torch.equal(state[k], v), k
        assert torch.equal(out_of(self.model, self.x), self.out)
        assert getattr(self.model, "slimfx_report", None) is self.report


def fails_untouched(
    model: nn.Module, x: torch.Tensor, fn: Callable[[], Any], exc: type, match: str
) -> pytest.ExceptionInfo:
    """``fn()`` raises ``exc`` matching ``match`` and leaves ``model`` bit-identical."""
    frozen = Frozen(model, x)
    with pytest.raises(exc, match=match) as info:
        fn()
    frozen.check()
    return info
