"""Pass manager: run a pipeline (a plain list of passes) with instruments around each pass.

A pass is any callable ``pass_(obj) -> PassResult`` (it edits ``obj`` in place) or
``-> (new_obj, PassResult)`` (it returns a new object, e.g. ``apply_plan`` on a copy). Timing,
verification and graph dumps are instruments — objects with ``before(pass_name, obj)`` and
``after(pass_name, obj, result)`` — never prints inside passes::

    pm = PassManager([ApplyPlanGraph(plan, sites, weights)],
                     instruments=[TimingInstrument(), VerifyInstrument(), DumpInstrument("dump")])
    gm, results = pm.run(gm)
"""

from __future__ import annotations

import functools
import importlib
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, fx, nn

from slimfx.ir.sites import LinearSite
from slimfx.passes.base import PassResult, Rule
from slimfx.passes.graph_rewrite import FactorCache, apply_plan_graph
from slimfx.passes.swap import apply_plan
from slimfx.planning.plan import Plan

__all__ = [
    "Pass",
    "Instrument",
    "PassManager",
    "TimingInstrument",
    "VerifyInstrument",
    "DumpInstrument",
    "ApplyPlan",
    "ApplyPlanGraph",
    "pass_name",
]


@runtime_checkable
class Pass(Protocol):
    """A pass: ``pass_(obj)`` returns its ``PassResult`` or ``(new_obj, PassResult)``."""

    def __call__(self, obj: Any) -> PassResult | tuple[Any, PassResult]: ...


@runtime_checkable
class Instrument(Protocol):
    """Runs around every pass of a ``PassManager``."""

    def before(self, pass_name: str, obj: Any) -> None: ...

    def after(self, pass_name: str, obj: Any, result: PassResult) -> None: ...


def pass_name(p: Any) -> str:
    """A pass's display name: its ``name`` attribute, function name, or class name."""
    name = getattr(p, "name", None)
    if isinstance(name, str) and name:
        return name
    if isinstance(p, functools.partial):
        return pass_name(p.func)
    return getattr(p, "__name__", type(p).__name__)


class PassManager:
    """Runs ``passes`` in order, threading the object through and calling every instrument's
    ``before``/``after`` around each pass. ``run(obj)`` returns ``(obj, results)``."""

    def __init__(self, passes: Sequence[Pass], instruments: Iterable[Instrument] = ()) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.results: list[PassResult] = []

    def run(self, obj: Any) -> tuple[Any, list[PassResult]]:
        """Apply every pass to ``obj``; returns the final object and one result per pass."""
        results: list[PassResult] = []
        for p in self.passes:
            name = pass_name(p)
            for ins in self.instruments:
                ins.before(name, obj)
            out = p(obj)
            if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], PassResult):
                obj, result = out
            elif isinstance(out, PassResult):
                result = out
            else:
                raise TypeError(
                    f"pass {name!r} returned {type(out).__name__}; a pass returns a PassResult "
                    "or (object, PassResult)"
                )
            for ins in reversed(self.instruments):
                ins.after(name, obj, result)
            results.append(result)
        self.results = results
        return obj, results

    __call__ = run

    @property
    def modified(self) -> bool:
        """Whether any pass of the last run changed something."""
        return any(r.modified for r in self.results)


class TimingInstrument:
    """Wall-clock seconds of each pass, in run order (``timings``), plus the total."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []
        self._t0 = 0.0

    def before(self, pass_name: str, obj: Any) -> None:
        self._t0 = time.perf_counter()

    def after(self, pass_name: str, obj: Any, result: PassResult) -> None:
        self.timings.append((pass_name, time.perf_counter() - self._t0))

    @property
    def total(self) -> float:
        return sum(t for _, t in self.timings)

    def summary(self) -> str:
        """One line per pass: ``name  1.234 s``."""
        return "\n".join(f"{name}  {t:.3f} s" for name, t in self.timings)


class VerifyInstrument:
    """After each pass, verify a GraphModule with ``slimfx.ir.verify.verify`` (lint + slimfx
    invariants); plain ``graph.lint()`` when that module is not available. Non-graph objects
    are not checked. A failure raises, naming the pass that broke the graph."""

    def __init__(self) -> None:
        self.checked: list[str] = []

    @staticmethod
    def _verifier() -> Any:
        try:
            return importlib.import_module("slimfx.ir.verify").verify
        except ModuleNotFoundError:  # pragma: no cover - verify ships with slimfx.ir
            return None

    def before(self, pass_name: str, obj: Any) -> None:
        pass

    def after(self, pass_name: str, obj: Any, result: PassResult) -> None:
        if not isinstance(obj, fx.GraphModule):
            return
        verify = self._verifier()
        try:
            if verify is None:
                obj.graph.lint()
            else:
                verify(obj)
        except Exception as e:
            failures = getattr(e, "failures", None)
            if isinstance(failures, list):
                raise type(e)([f"after pass {pass_name!r}: {f}" for f in failures]) from e
            raise RuntimeError(f"after pass {pass_name!r}: graph check failed: {e}") from e
        self.checked.append(pass_name)


class DumpInstrument:
    """Writes ``NN_<pass>.py`` (``gm.code``) into ``directory`` after each pass; for a
    non-graph module, ``NN_<pass>.txt`` with its printed structure. ``paths`` lists them."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []

    def before(self, pass_name: str, obj: Any) -> None:
        pass

    def after(self, pass_name: str, obj: Any, result: PassResult) -> None:
        stem = f"{len(self.paths):02d}_{re.sub(r'[^0-9A-Za-z_.-]', '_', pass_name)}"
        if isinstance(obj, fx.GraphModule):
            path = self.directory / f"{stem}.py"
            path.write_text(obj.code)
        else:
            path = self.directory / f"{stem}.txt"
            path.write_text(str(obj))
        self.paths.append(path)


class ApplyPlan:
    """``apply_plan`` as a pipeline pass: ``ApplyPlan(plan, sites, grams)(model)``."""

    name = "apply_plan"

    def __init__(
        self,
        plan: Plan,
        sites: Iterable[LinearSite],
        grams: Mapping[str, Tensor | None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.plan, self.sites, self.grams, self.kwargs = plan, list(sites), grams, kwargs

    def __call__(self, model: nn.Module) -> tuple[nn.Module, PassResult]:
        return apply_plan(model, self.plan, self.sites, self.grams, **self.kwargs)


class ApplyPlanGraph:
    """``apply_plan_graph`` as a pipeline pass: ``ApplyPlanGraph(plan, sites, weights)(gm)``."""

    name = "apply_plan_graph"

    def __init__(
        self,
        plan: Plan,
        sites: Iterable[LinearSite],
        weights: Mapping[str, Tensor] | None = None,
        grams: Mapping[str, Tensor | None] | None = None,
        *,
        strict: bool = True,
        factor_cache: FactorCache | None = None,
        rules: Mapping[str, Rule] | None = None,
    ) -> None:
        self.plan, self.sites, self.weights, self.grams = plan, list(sites), weights, grams
        self.strict, self.factor_cache, self.rules = strict, factor_cache, rules

    def __call__(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, PassResult]:
        return apply_plan_graph(
            gm,
            self.plan,
            self.sites,
            self.weights,
            self.grams,
            strict=self.strict,
            factor_cache=self.factor_cache,
            rules=self.rules,
        )
