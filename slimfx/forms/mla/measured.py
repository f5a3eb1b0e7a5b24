"""The price of an MLA option in the loss: the KL divergence of the model's next-token
distribution when that one attention block is converted, measured on calibration batches.

Why not the block-output proxy alone: an MLA conversion's relative block error is large (0.03–0.3
on SmolLM2, where KV-cache forms sit at 0.001–0.05), far outside the small-perturbation regime
in which "relative error × loss sensitivity" predicts the loss. Its loss grows faster than the
proxy from rank to rank (layer 1 of SmolLM2: the proxy says rank 81 costs 3.5× rank 162, the
measured KL 7.9×), so a solver reading the proxy trades many low-rank layers for a few high-rank
ones and loses to one uniform rank (``benchmarks/RESULTS.md``). Measured KL sees it.

:class:`LayerReplay` runs the original model once on the batches, keeping every decoder layer's
call (its hidden-state input and keyword arguments: position embeddings, mask) and the
reference log-probabilities; :meth:`LayerReplay.kl` swaps one layer's ``self_attn`` for a
candidate module and replays that layer and the ones after it, then the final norm and head —
no work is repeated for the layers before it. The replay is checked against the recorded
logits when it is built (the last layer replayed as it is): a model whose layers cannot be
replayed this way raises ``ValueError`` instead of giving wrong prices.

:func:`rescale` puts the measured KLs on the solver's scale: every other option's error is a
relative output error times a median-normalized loss sensitivity, not nats, so the MLA options'
errors become ``c · KL`` with ``c`` the median over all MLA options of proxy / KL — the proxy
sets the scale, the measurement the shape across ranks and layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.numerics.divergence import kl_sum

from .convert import _layers

__all__ = ["LayerReplay", "rescale", "KL_BATCHES"]

#: calibration batches the KL of each MLA option is measured on
KL_BATCHES = 4


def _hidden(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class LayerReplay:
    """The original model's decoder-layer calls on ``batches`` (input ids, each ``(1, T)`` or
    ``(B, T)``), replayable from any layer (module docstring)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, batches: Sequence[Tensor]) -> None:
        if not batches:
            raise ValueError("measuring MLA options needs calibration batches")
        self.model = model
        self.layers = _layers(model)
        inner = getattr(model, "model", model)
        self.norm = getattr(inner, "norm", None)
        self.head = getattr(model, "lm_head", None)
        if self.norm is None or self.head is None:
            raise ValueError(
                f"{type(model).__name__}: no model.norm / lm_head to replay the layers into "
                "logits (a Llama-style causal LM is needed to measure MLA options)"
            )
        self.calls: list[list[tuple[tuple, dict]]] = []  # per batch, per layer
        self.ref: list[Tensor] = []
        logits = []
        for ids in batches:
            calls: list[tuple[tuple, dict]] = []
            hooks = [
                layer.register_forward_pre_hook(
                    lambda _m, a, kw, calls=calls: calls.append((a, kw)), with_kwargs=True
                )
                for layer in self.layers
            ]
            try:
                out = model(ids, use_cache=False)
            finally:
                for h in hooks:
                    h.remove()
            if len(calls) != len(self.layers):
                raise ValueError(
                    f"{len(calls)} decoder-layer calls recorded for {len(self.layers)} layers"
                )
            self.calls.append(calls)
            logits.append(out.logits)
            self.ref.append(torch.log_softmax(out.logits.float(), -1))
        last = len(self.layers) - 1
        for lg, got in zip(logits, self._logits(last, self.layers[last].self_attn)):
            scale = float(lg.abs().amax().clamp_min(1.0))
            if not torch.allclose(got, lg, atol=1e-4 * scale, rtol=1e-4):
                raise ValueError(
                    f"{type(model).__name__}: replaying the last decoder layer does not give the "
                    "model's logits; MLA options cannot be measured on this model"
                )

    def _logits(self, layer: int, attn: nn.Module) -> list[Tensor]:
        block = self.layers[layer]
        orig = block.self_attn
        block.self_attn = attn
        try:
            out = []
            for calls in self.calls:
                args, kw = calls[layer]
                h = args[0] if args else kw["hidden_states"]
                for j in range(layer, len(self.layers)):
                    a, k = calls[j]
                    k = {n: v for n, v in k.items() if n != "hidden_states"}
                    h = _hidden(self.layers[j](h, *a[1:], **k))
                out.append(self.head(self.norm(h)))
            return out
        finally:
            block.self_attn = orig

    @torch.no_grad()
    def kl(self, layer: int, attn: nn.Module) -> float:
        """Mean KL(reference ‖ model with ``layers[layer].self_attn = attn``) per token, in nats."""
        total = count = 0.0
        for ref, logits in zip(self.ref, self._logits(layer, attn)):
            t, n = kl_sum(ref, torch.log_softmax(logits.float(), -1))
            total, count = total + t, count + n
        return total / count


def rescale(proxy: Sequence[float], kl: Sequence[float]) -> tuple[list[float], float]:
    """Measured KLs on the proxy's scale: ``(c · max(KL, 0) per option, c)`` with ``c`` the
    median of proxy / KL over the options with both positive (1.0 when none are)."""
    if len(proxy) != len(kl):
        raise ValueError(f"{len(proxy)} proxy errors for {len(kl)} measured KLs")
    ratios = sorted(p / k for p, k in zip(proxy, kl) if p > 0 and k > 0)
    c = ratios[len(ratios) // 2] if ratios else 1.0
    return [c * max(k, 0.0) for k in kl], c
