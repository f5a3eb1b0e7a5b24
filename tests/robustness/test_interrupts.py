"""Interruptions: a save interrupted anywhere leaves a directory that loads to the old or the
new save; ``optimize(inplace=True)`` interrupted anywhere leaves the model untouched or fully
rewritten with its report.

Two ways to interrupt "at a random point":

- *step injection*: a ``sys.settrace`` hook raises ``KeyboardInterrupt`` at the k-th line
  executed in slimfx's own code (k drawn from the number of lines one uninterrupted call
  runs), so every statement of the save / rewrite path is a possible point;
- *a timer*: the writes are slowed down (each fsync sleeps) and a ``threading.Timer`` delivers
  a real SIGINT to the main thread (``_thread.interrupt_main``) after a random delay.
"""

from __future__ import annotations

import _thread
import copy
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import slimfx
from robustness._util import Frozen, feats, mlp, out_of
from slimfx import files
from slimfx import io as sio
from slimfx.planning.configs import LowRankConfig, QuantConfig
from slimfx.planning.plan import Plan

TRIALS = 100
X = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
SLIMFX = str(Path(sio.__file__).parent)


class LineInterrupt:
    """Raise ``KeyboardInterrupt`` at the ``k``-th line executed in files under ``root``
    (once); with ``k=None`` only count the lines."""

    def __init__(self, k: int | None, root: str = SLIMFX) -> None:
        self.k, self.root, self.count, self.fired = k, root, 0, False

    def _local(self, frame, event, arg):  # noqa: ANN001, ANN202
        if event == "line":
            self.count += 1
            if not self.fired and self.k is not None and self.count >= self.k:
                self.fired = True
                raise KeyboardInterrupt(f"injected at line event {self.count}")
        return self._local

    def _global(self, frame, event, arg):  # noqa: ANN001, ANN202
        if frame.f_code.co_filename.startswith(self.root):
            return self._local
        return None

    def __enter__(self) -> LineInterrupt:
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


@pytest.fixture(autouse=True)
def no_disk_flush(monkeypatch):
    """fsync makes each save ~50 ms on this file system; these tests are about interruptions
    of the process, not power loss, so the flush is skipped (the calls still happen)."""
    monkeypatch.setattr(files, "fsync", lambda path: None)


@pytest.fixture(scope="module")
def two_models():
    """Two different rewrites of one MLP (different decisions, different outputs)."""
    base = mlp()
    q8, q4 = QuantConfig(bits=8, group_size=32), QuantConfig(bits=4, group_size=32)
    a = slimfx.optimize(base, plan=Plan({"0": q8}), example_inputs=(X,), progress=False)
    b = slimfx.optimize(base, plan=Plan({"0": LowRankConfig(rank=8, method="svd"), "2": q4}),
                        example_inputs=(X,), progress=False)
    outs = {"a": out_of(a, X), "b": out_of(b, X)}
    assert not torch.equal(outs["a"], outs["b"])
    return {"a": a, "b": b}, outs


def _loaded_as(d: Path, outs: dict[str, torch.Tensor]) -> str:
    """Which save ``d`` loads to ('a' or 'b'); anything else fails the test."""
    y = out_of(sio.load(d, mlp(7)), X)
    hits = [k for k, o in outs.items() if torch.equal(y, o)]
    assert len(hits) == 1, "the directory loads to neither the old nor the new save"
    return hits[0]


def _no_leftovers(d: Path) -> None:
    """Nothing but ``d`` beside it: a save removes what interrupted saves left behind."""
    assert [p.name for p in d.parent.iterdir()] == [d.name]


def test_save_interrupted_at_every_step_keeps_old_or_new(two_models, tmp_path):
    models, outs = two_models
    d = tmp_path / "m"
    sio.save(models["a"], d)
    with LineInterrupt(None) as counter:
        sio.save(models["b"], d)
    n = counter.count
    assert n > 100
    rng = random.Random(0)
    current, seen = "b", {"old": 0, "new": 0}
    for t in range(TRIALS):
        new = "a" if current == "b" else "b"
        # even trials: any line; odd trials: the last 6% (the last fsyncs and the commit)
        k = rng.randrange(1, n + 1) if t % 2 == 0 else rng.randrange(int(0.94 * n), n + 1)
        try:
            with LineInterrupt(k):
                sio.save(models[new], d)
        except KeyboardInterrupt:
            pass
        got = _loaded_as(d, outs)
        assert got in (current, new)
        seen["new" if got == new else "old"] += 1
        current = got
    assert seen["old"] > 10 and seen["new"] > 10, seen  # both sides of the commit were hit
    sio.save(models["a"], d)
    _no_leftovers(d)
    assert _loaded_as(d, outs) == "a"


def test_save_without_atomic_exchange_still_keeps_old_or_new(two_models, tmp_path, monkeypatch):
    """Where the OS has no directory exchange, the two-rename commit parks the old save and
    ``load`` puts it back when an interruption fell between the renames."""
    models, outs = two_models
    monkeypatch.setattr(files, "exchange", lambda a, b: False)
    d = tmp_path / "m"
    sio.save(models["a"], d)
    with LineInterrupt(None) as counter:
        sio.save(models["b"], d)
    n, rng, current = counter.count, random.Random(1), "b"
    for _ in range(TRIALS // 2):
        new = "a" if current == "b" else "b"
        try:
            with LineInterrupt(rng.randrange(1, n + 1)):
                sio.save(models[new], d)
        except KeyboardInterrupt:
            pass
        current = _loaded_as(d, outs)
        assert (d / "slimfx.json").exists()


@pytest.fixture
def ctrl_c_raises():  # noqa: ANN201
    """SIGINT raises ``KeyboardInterrupt`` in this process, as in an interactive session. A
    process started in the background by a non-interactive shell inherits SIGINT ignored, and
    ``_thread.interrupt_main`` then does nothing (0 of 100 timers interrupted a save)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_save_interrupted_by_sigint_timer_keeps_old_or_new(two_models, tmp_path, monkeypatch):
    models, outs = two_models
    def slow_fsync(path: Path) -> None:
        time.sleep(0.002)

    monkeypatch.setattr(files, "fsync", slow_fsync)
    d = tmp_path / "m"
    sio.save(models["a"], d)
    spans = []
    for _ in range(3):
        t0 = time.perf_counter()
        sio.save(models["b"], d)
        spans.append(time.perf_counter() - t0)
    span = min(spans)  # the machine is shared: the fastest run bounds the delay
    rng, current, interrupted = random.Random(2), "b", 0
    for _ in range(TRIALS):
        new = "a" if current == "b" else "b"
        timer = threading.Timer(rng.uniform(0, span), _thread.interrupt_main)
        try:
            timer.start()
            sio.save(models[new], d)
            timer.cancel()
            timer.join()
            time.sleep(0.001)  # a SIGINT that arrived at the very end is delivered here
        except KeyboardInterrupt:
            interrupted += 1
        timer.join()
        got = _loaded_as(d, outs)
        assert got in (current, new)
        current = got
    assert interrupted > 20, interrupted  # most timers fire inside the save


# --------------------------------------------------------------------------- in place


def _rewrite(model: torch.nn.Module) -> torch.nn.Module:
    plan = Plan({"0": LowRankConfig(rank=8), "2": QuantConfig(bits=4, group_size=32)})
    return slimfx.optimize(model, plan=plan, calibration=feats(2), inplace=True,
                           progress=False)


def test_inplace_optimize_interrupted_anywhere_is_all_or_nothing():
    pristine = mlp()
    done = _rewrite(copy.deepcopy(pristine))
    want = out_of(done, X)
    with LineInterrupt(None) as counter:
        _rewrite(copy.deepcopy(pristine))
    n = counter.count
    rng = random.Random(3)
    outcome = {"untouched": 0, "rewritten": 0}
    for _ in range(TRIALS):
        model = copy.deepcopy(pristine)
        frozen = Frozen(model, X)
        try:
            with LineInterrupt(rng.randrange(1, n + n // 10)):
                _rewrite(model)
        except KeyboardInterrupt:
            pass
        if getattr(model, "slimfx_report", None) is None:
            frozen.check()
            outcome["untouched"] += 1
        else:
            assert slimfx.report_of(model).sites
            assert type(model[0]).__name__ == "LowRankLinear"
            assert type(model[2]).__name__ == "QuantLinear"
            assert torch.equal(out_of(model, X), want)
            outcome["rewritten"] += 1
    assert outcome["untouched"] > 50 and outcome["rewritten"] > 0, outcome


def test_an_interrupted_save_removes_the_parent_directories_it_made(tmp_path):
    d = tmp_path / "a" / "b" / "m"
    with pytest.raises(KeyboardInterrupt):
        with files.writing(d) as tmp:
            (tmp / "weights").write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # a parent that holds something else (or existed before) stays
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("user file")
    with pytest.raises(RuntimeError):
        with files.writing(d):
            raise RuntimeError("failed")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["mine.txt"]
