"""Sites fitted side by side on the cores of one process.

A site's candidate fits (eigen-decompositions, Cholesky factors, GPTQ) are LAPACK and BLAS
calls that scale poorly over intra-op threads at these sizes; two sites fitted at once, each
on one thread, use two cores fully. ``site_pool`` runs a per-site function on a few threads
of this process (the ops release the GIL), with torch's intra-op threads set to one for the
duration, and yields the results in the order of the sites — every number the same as a
one-thread run. More than one *process* is torch.distributed's job (``slimfx.stream``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["MAX_DEFAULT_WORKERS", "default_workers", "site_pool"]

T = TypeVar("T")
R = TypeVar("R")

#: the default never runs more sites at once than this (each holds its own fit temporaries:
#: a few in × in float64 matrices of its widest input).
MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """torch's intra-op thread count, at most :data:`MAX_DEFAULT_WORKERS`."""
    return max(1, min(torch.get_num_threads(), MAX_DEFAULT_WORKERS))


def site_pool(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int | None = None,
    key: Callable[[T], Hashable] | None = None,
) -> Iterator[R]:
    """``fn(item)`` for every item, in order. ``workers``: tasks run at once (default
    :func:`default_workers`); with one worker everything runs here, on torch's threads as
    they are. ``key``: consecutive items with the same key form one task, run one after the
    other on one thread (sites that read one Gram: what ``fn`` caches for the first — a
    damped Gram, its factorization — serves the rest). An exception in ``fn`` is raised here
    when its item's turn comes; tasks not started yet are cancelled."""
    n = default_workers() if workers is None else int(workers)
    if n < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    runs: list[list[T]] = []
    for item in items:
        if key is not None and runs and key(runs[-1][-1]) == key(item):
            runs[-1].append(item)
        else:
            runs.append([item])

    def task(run: list[T]) -> list[R]:
        return [fn(item) for item in run]

    if n == 1 or len(runs) <= 1:
        for run in runs:
            yield from task(run)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=min(n, len(runs)), thread_name_prefix="slimfx-fit")
    try:
        futures = [pool.submit(task, run) for run in runs]
        for f in futures:
            yield from f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
