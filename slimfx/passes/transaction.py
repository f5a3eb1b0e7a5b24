"""All-or-nothing edits of a module tree: ``optimize(inplace=True)`` as one transaction.

The module swap (``passes.swap.apply_plan``) builds every replacement before it sets any, and
never writes into an existing tensor; what it changes is structure — the ``_modules`` /
``_parameters`` / ``_buffers`` tables of the parents it edits, hook tables, plain attributes
(the report), and the ``tie_word_embeddings`` flags and tied-key tables of a Hugging Face
model it unties. :class:`TreeSnapshot` records exactly that state of every module of a model
(shallow copies: no tensor is copied), and :func:`transaction` restores it when the body
raises anything — ``KeyboardInterrupt`` included — so the model ends either untouched or
fully rewritten with its report. While the restore runs, a ``SIGINT`` is held back (main
thread only) and re-raised after it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from torch import nn

__all__ = ["TreeSnapshot", "transaction", "in_transaction", "run_in_transaction"]

T = TypeVar("T")
_ACTIVE: set[int] = set()


def _is_config(v: Any) -> bool:
    return hasattr(v, "to_dict") and hasattr(v, "to_json_string") and hasattr(v, "__dict__")


class TreeSnapshot:
    """The structural state of every module of ``model`` (and of its configs), restorable."""

    def __init__(self, model: nn.Module) -> None:
        self._mods: list[tuple[nn.Module, dict[str, Any], dict[str, dict]]] = []
        self._configs: dict[int, tuple[Any, dict[str, Any]]] = {}
        for m in model.modules():
            attrs = dict(m.__dict__)
            tables = {k: dict(v) for k, v in attrs.items() if isinstance(v, dict)}
            self._mods.append((m, attrs, tables))
            for v in attrs.values():
                if _is_config(v):
                    self._config(v)

    def _config(self, cfg: Any) -> None:
        if id(cfg) in self._configs:
            return
        self._configs[id(cfg)] = (cfg, dict(cfg.__dict__))
        for v in list(cfg.__dict__.values()):
            if _is_config(v):
                self._config(v)

    def restore(self) -> None:
        """Put every recorded table, attribute and config field back as it was."""
        for m, attrs, tables in self._mods:
            for k, content in tables.items():
                table = attrs[k]
                table.clear()
                table.update(content)
            d = m.__dict__
            for k in [k for k in d if k not in attrs]:
                del d[k]
            d.update(attrs)
        for cfg, fields in self._configs.values():
            d = cfg.__dict__
            for k in [k for k in d if k not in fields]:
                del d[k]
            d.update(fields)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold back SIGINT for the body (main thread only), then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[Any] = []
    try:
        old = signal.signal(signal.SIGINT, lambda *a: got.append(a))
    except (ValueError, TypeError):  # no signal support here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got and callable(old):
            old(*got[0])
        elif got:
            raise KeyboardInterrupt


def in_transaction(model: nn.Module) -> bool:
    """Whether ``model`` is inside a :func:`transaction` now."""
    return id(model) in _ACTIVE


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[TreeSnapshot]:
    """Run the body as one edit of ``model``: any exception restores its structure first."""
    snap = TreeSnapshot(model)
    _ACTIVE.add(id(model))
    try:
        yield snap
    except BaseException:
        with _sigint_held():
            snap.restore()
        raise
    finally:
        _ACTIVE.discard(id(model))


def run_in_transaction(
    model: nn.Module, fn: Callable[..., T], arguments: Mapping[str, Any]
) -> T:
    """``fn(**arguments)`` inside :func:`transaction` on ``model`` (``optimize`` calls itself
    this way when ``inplace=True``)."""
    with transaction(model):
        return fn(**arguments)
