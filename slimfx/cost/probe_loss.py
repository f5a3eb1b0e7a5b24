"""Measured loss sensitivity (``estimator="measured"``, ZipLM / HAWQ style).

Each site is compressed alone by each probe of :mod:`slimfx.cost.sensitivity` (int4 RTN g128,
plain low-rank at 1/4 of the bytes) and the model run on a few calibration windows; the loss
is the KL divergence of the next-token distribution from the dense model's, per token — zero
and stationary at the dense model, so no first-order noise and no gradient is needed. A
site's weight is the geometric mean over the probes of ``KL / rel_err``, then
:func:`~slimfx.cost.sensitivity.robust_normalize` (median 1, floor).

The compressed weight is never written: a forward hook replaces the site's output by
``x (W − ΔW)ᵀ + b``, so tied weights and the model stay untouched. Cost: one forward of
``windows`` batches per site and probe (2 · sites · windows forwards), no backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.cost.sensitivity import PROBES, probe_deltas, relative_error
from slimfx.ir.match import linear_weight
from slimfx.ir.sites import LinearSite
from slimfx.numerics.divergence import kl_sum

__all__ = ["MEASURE_WINDOWS", "measured_raw"]

#: calibration batches the measured estimator runs per site and probe (the first ones).
MEASURE_WINDOWS = 4


def _logprobs(out: Any) -> Tensor:
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if not isinstance(logits, Tensor):
        raise ValueError("the measured sensitivity needs a model that returns logits")
    return torch.log_softmax(logits.float(), -1)


def measured_raw(
    model: nn.Module,
    sites: Sequence[LinearSite],
    batches: Sequence[Any],
    call: Callable[[nn.Module, Any], Any],
    gram_of: Callable[[str], Tensor | None],
    windows: int = MEASURE_WINDOWS,
) -> dict[str, float]:
    """Site → geometric mean over probes of KL(dense ‖ probe-compressed) / rel_err.

    ``call(model, batch)`` runs the model (returns an output with ``logits``); ``gram_of``
    gives the site's damped Gram for the relative error (``None``: Frobenius)."""
    mods = dict(model.named_modules())
    use = list(batches)[: max(1, windows)]
    with torch.no_grad():
        ref = [_logprobs(call(model, b)) for b in use]

        def kl() -> float:
            tot = n = 0.0
            for b, lp_ref in zip(use, ref):
                t, k = kl_sum(lp_ref, _logprobs(call(model, b)))
                tot, n = tot + t, n + k
            return tot / max(n, 1.0)

        raw: dict[str, float] = {}
        for s in sites:
            m = mods[s.fqn]
            W = linear_weight(m).detach()
            deltas = probe_deltas(W)
            gram = gram_of(s.fqn)
            logs = []
            for name in PROBES:
                dW = deltas[name].to(W.dtype)

                def hook(_m: nn.Module, args: tuple, out: Tensor, dW: Tensor = dW) -> Tensor:
                    return out - nn.functional.linear(args[0].to(dW.dtype), dW).to(out.dtype)

                h = m.register_forward_hook(hook)
                try:
                    loss = kl()
                finally:
                    h.remove()
                rel = relative_error(deltas[name], W, gram)
                if loss > 0 and rel > 0:
                    logs.append(math.log(loss / rel))
            raw[s.fqn] = math.exp(sum(logs) / len(logs)) if logs else 0.0
    return raw
