"""torch.distributed for the streamed optimize: batches sharded over ranks, statistics reduced
in batch order, candidate fits spread over ranks.

Calibration batch ``b`` belongs to rank ``b mod world``; each rank runs its own batches through
every block (its share of the activations is all it holds). At a block boundary each rank's
per-batch statistics (Gram matrices, Fisher moments) are summed **in batch order** on every
rank — the order a single process sums them in — so the reduced statistics, and with them the
candidates, the plan and the written tensors, are bit for bit those of one process (a sum over
ranks' partial sums would differ in the last bits). The Grams travel batch by batch, each
broadcast by its owner and added at once (``Comm.ordered_sum``: one batch's Grams in flight,
not all of a block's); the small Fisher moments are gathered.
The candidate fits are split over ranks by input group (``statistics.assign_groups``) and
gathered; rank 0 solves, broadcasts the plan and writes. Works with any backend ``torch.distributed`` offers (gloo on
CPU; nccl moves the gathered objects through the GPU).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Comm", "ordered_sum"]

T = TypeVar("T")


class Comm:
    """This process's rank and the world size (1 without an initialized process group)."""

    def __init__(self) -> None:
        on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if on else 0
        self.world = dist.get_world_size() if on else 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def mine(self, n: int) -> list[int]:
        """The indices among ``range(n)`` this rank owns (round-robin)."""
        return list(range(self.rank, n, self.world))

    def gather(self, local: dict[int, T]) -> dict[int, T]:
        """Every rank's ``index → object`` merged (each index owned by one rank)."""
        if not self.active:
            return dict(local)
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, local)
        merged: dict[int, T] = {}
        for p in parts:
            merged.update(p)
        return merged

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def min(self, value: int) -> int:
        """The smallest ``value`` over ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def ordered_sum(self, local: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """:func:`ordered_sum` over every rank's ``batch → {key: tensor}`` (each batch owned
        by one rank), the same bits on every rank, with one batch's tensors in flight at a
        time: batch by batch in order, its owner broadcasts each tensor and every rank adds it
        to its accumulator — not every batch's tensors gathered at once (a block's per-batch
        Grams, pickled, were most of a rank's peak)."""
        if not self.active:
            return ordered_sum(local)
        meta = self.gather(
            {b: [(k, tuple(v.shape), v.dtype) for k, v in t.items()] for b, t in local.items()}
        )
        nccl = dist.get_backend() == "nccl"
        dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        out: dict[str, torch.Tensor] = {}
        for b in sorted(meta):
            owner = b % self.world
            for k, shape, dtype in meta[b]:
                if b in local:
                    t = local[b][k].to(dev)
                else:
                    t = torch.empty(shape, dtype=dtype, device=dev)
                dist.broadcast(t, src=owner)
                _accumulate(out, k, t.cpu())
        return out


def ordered_sum(per_batch: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per key, the sum over batches in batch order, started from zero as an accumulator
    that sees the batches one after the other."""
    out: dict[str, torch.Tensor] = {}
    for b in sorted(per_batch):
        for k, v in per_batch[b].items():
            _accumulate(out, k, v)
    return out


def _accumulate(out: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """``out[key] += value``, the first value added to a zero accumulator (the bits a
    single process's running sum has)."""
    if key in out:
        out[key] += value
    else:
        out[key] = torch.zeros_like(value) + value
