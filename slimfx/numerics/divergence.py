"""The KL divergence of next-token distributions, the loss change the measured estimators read
(``cost.probe_loss``: a probe-compressed site; ``forms.mla.measured``: one converted block)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["kl_sum"]


def kl_sum(ref_logprobs: Tensor, logprobs: Tensor) -> tuple[float, int]:
    """``(Σ KL(ref ‖ new), positions)`` over every position of log-probabilities ``(..., V)``
    (log-softmax over the last dim, float32): divide for the mean per token."""
    total = float((ref_logprobs.exp() * (ref_logprobs - logprobs)).sum())
    return total, ref_logprobs.numel() // ref_logprobs.shape[-1]
