"""Forward-hook recorders: the registration every calibration recorder shares.

A recorder lists its modules (``self.modules``: name → module) and gives ``_hook(name)``;
entering it registers that hook on every module, leaving it removes them and calls
``_clear()`` (drop whatever a half-finished batch left behind).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["OutputHooks"]


class OutputHooks:
    """Base of the recorders that read each site's output (``register_forward_hook``)."""

    modules: dict[str, nn.Module]

    def _hook(self, name: str) -> Callable[..., Any]:
        raise NotImplementedError

    def _clear(self) -> None:
        """What to drop when the recorder is left (nothing by default)."""

    def __enter__(self) -> Any:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
        self._clear()
