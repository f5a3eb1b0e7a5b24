"""Calibration statistics: input Gram matrices per site group and optional Fisher sensitivity.

For a linear ``y = x Wᵀ + b`` whose inputs over the calibration tokens are the rows of X
(tokens × in), the activation-aware error of an approximation Ŵ is

    ‖(W − Ŵ) Xᵀ‖²_F = tr(E G Eᵀ),   E = W − Ŵ,   G = XᵀX  (in × in)

so the Gram matrix G is all the error proxies need. It is accumulated in float64 batch by
batch from forward-pre-hooks (activations are never stored), once per *group*: sites that
read the same input tensor (q/k/v, gate/up) share one G.

Sensitivity (``fisher=True``): with g = ∂L/∂y the gradient of the loss at the site's output,
the diagonal-Fisher estimate of the loss change caused by an output perturbation δy is
½ Σ_i E[g_i²] δy_i². For a relative perturbation of 100% (δy_i² ≈ E[y_i²]) this gives

    s_site = Σ_i E[g_i²] · E[y_i²]

which is normalized so the mean over sites is 1.0; the problem builder multiplies each
option's relative output error by it. Gradients are taken with ``torch.autograd.grad`` with
respect to the site outputs, so no parameter ``.grad`` is ever written.

``estimator="probe"`` replaces that product by the second-order loss change of two probe
compressions per unit of relative error, median normalized with a floor
(``slimfx.cost.sensitivity``); ``"kfac"`` is its Kronecker-factored approximation,
``"probe-kind"`` weighs each option kind by its own probe, and ``"geo"`` — what ``optimize``
uses by default for a causal LM — is the geometric mean of the Fisher and probe weights, both
from the probe pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimfx.cost.batches import (  # model_device … prepare_batches: re-exported (see __all__)
    STACK_TOKENS,
    NoLossError,
    call_model,
    check_batches,
    is_hf,
    model_device,
    naming_batch,
    prepare_batches,
    stack_windows,
    to_device,
)
from slimfx.cost.hooks import OutputHooks
from slimfx.cost.probe_loss import measured_raw
from slimfx.cost.sensitivity import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    ProbeRecorder,
    describe,
    probe_weights,
    robust_normalize,
)
from slimfx.ir.capture import eval_mode
from slimfx.ir.match import linear_weight
from slimfx.ir.sites import LinearSite

__all__ = [
    "CalibrationStats",
    "collect_stats",
    "collect_planning_stats",
    "collect_sensitivity",
    "is_causal_lm",
    "prepare_batches",
    "GramRecorder",
    "call_model",
    "check_batches",
    "is_hf",
    "model_device",
    "to_device",
]

#: float64 elements converted at once when accumulating a Gram (bounds the temporary copy).
_CHUNK_ELEMS = 1 << 22


@dataclass
class CalibrationStats:
    """What calibration measured.

    - ``grams``: group → XᵀX (in × in, float64, CPU), summed over every token the group saw.
    - ``tokens``: group → number of input rows accumulated into its Gram.
    - ``site_group``: site FQN → group name.
    - ``sensitivity``: site FQN → loss sensitivity weight, or ``None``: the Fisher product
      (mean over sites 1.0) or a probe estimate (median 1.0, floored; ``estimator``).
    - ``seconds``: wall time of the collection.
    - ``estimator``: which sensitivity estimate (``None`` without one).
    - ``sensitivity_scale``: loss change per unit of (weight · relative output error), in the
      loss's units (probe estimators; 1.0 otherwise): weight · scale · rel_err predicts ΔL.
    - ``kind_sensitivity``: site FQN → decision kind → weight, for estimators that weigh each
      kind of option by its own probe ("probe-kind"); kinds not listed use ``sensitivity``.
    """

    grams: dict[str, Tensor]
    tokens: dict[str, int]
    site_group: dict[str, str]
    sensitivity: dict[str, float] | None = None
    seconds: float = 0.0
    damp: float = 0.01
    estimator: str | None = None
    sensitivity_scale: float = 1.0
    kind_sensitivity: dict[str, dict[str, float]] | None = None

    def fit_gram(self, fqn: str) -> Tensor | None:
        """The Gram used to fit and to estimate: XᵀX + damp · mean(diag) · I.

        The ridge (1% by default, GPTQ's usual damping) keeps directions the calibration
        never excited from counting as free: without it, a Gram of fewer tokens than inputs
        is singular and activation-aware fits look lossless on calibration data and fail on
        anything else."""
        g = self.gram(fqn)
        if g is None or self.damp == 0:
            return g
        lam = self.damp * float(g.diagonal().mean())
        out = g.clone()  # = g + lam·I: the off-diagonal sums gain +0.0 (exact), no n² identity
        out.diagonal().add_(lam)
        return out

    def group_fit_grams(self) -> Callable[[str], Tensor | None]:
        """``fit_gram`` that keeps, per thread, the last group's result: consecutive sites of
        one group (q/k/v, gate/up) get the same object — formed once, and its GPTQ factor is
        cached by identity — and the previous group's is dropped when another is read."""
        last = threading.local()

        def fit(fqn: str) -> Tensor | None:
            group = self.group_of(fqn)
            if getattr(last, "group", None) != group:
                last.group, last.gram = group, None  # the previous group's is freed first
                last.gram = self.fit_gram(fqn)
            return last.gram

        return fit

    def underdetermined(self) -> dict[str, tuple[int, int]]:
        """Groups that saw fewer tokens than input features: group → (tokens, in_features)."""
        return {
            grp: (self.tokens.get(grp, 0), g.shape[0])
            for grp, g in self.grams.items()
            if self.tokens.get(grp, 0) < g.shape[0]
        }

    def silent(self) -> dict[str, list[str]]:
        """Groups whose every calibration input was exactly zero (a Gram of trace 0 over the
        tokens they saw): group → the sites reading it. No candidate's error can be measured
        there — each would measure 0."""
        dead = {grp for grp, g in self.grams.items()
                if self.tokens.get(grp, 0) > 0 and not bool(g.diagonal().abs().sum() > 0)}  # fmt: skip
        out: dict[str, list[str]] = {grp: [] for grp in sorted(dead)}
        for fqn, grp in self.site_group.items():
            if grp in out:
                out[grp].append(fqn)
        return {grp: sites or [grp] for grp, sites in out.items()}

    def check_not_silent(self) -> None:
        """Raise a ``ValueError`` naming the sites :meth:`silent` finds (the solver would take
        their smallest form as exact: a broken data loader gave a broken model)."""
        sites = [f for fs in self.silent().values() for f in fs]
        if sites:
            raise ValueError(
                f"the calibration inputs of {len(sites)} site(s) ({', '.join(sites[:3])}"
                f"{' …' if len(sites) > 3 else ''}) are all zero: every candidate's error there "
                "would measure 0 — calibrate on real data, or exclude= those sites"
            )

    def group_of(self, fqn: str) -> str:
        """The group whose Gram ``fqn`` reads (the FQN itself for an unknown site)."""
        return self.site_group.get(fqn, fqn)

    def gram(self, fqn: str) -> Tensor | None:
        """XᵀX of the input of site ``fqn`` (summed over tokens), or ``None`` if not measured."""
        return self.grams.get(self.group_of(fqn))

    def mean_gram(self, fqn: str) -> Tensor | None:
        """XᵀX / tokens: the second-moment matrix of the site's input, or ``None``."""
        g = self.gram(fqn)
        if g is None:
            return None
        n = self.tokens.get(self.group_of(fqn), 0)
        return g / max(n, 1)

    def sensitivity_of(self, fqn: str) -> float:
        """The site's sensitivity weight (1.0 when none was measured)."""
        if self.sensitivity is None:
            return 1.0
        return float(self.sensitivity.get(fqn, 1.0))

    def sensitivity_for(self, fqn: str, kind: str) -> float:
        """The weight of an option of decision ``kind`` at site ``fqn``: its per-kind weight
        when one was measured, the site's :meth:`sensitivity_of` otherwise."""
        per = (self.kind_sensitivity or {}).get(fqn)
        if per is not None and kind in per:
            return float(per[kind])
        return self.sensitivity_of(fqn)

    def nbytes(self) -> int:
        """Memory held by the Gram matrices."""
        return sum(g.numel() * g.element_size() for g in self.grams.values())


# --------------------------------------------------------------------------- helpers


def accumulate_gram(gram: Tensor, x: Tensor) -> int:
    """``gram += XᵀX`` for ``x`` flattened to (tokens × in). Each chunk's product is formed in
    float32 (a chunk of a few thousand tokens loses nothing that matters there, and fp64
    matmul is several times slower on CPU) and summed into the float64 accumulator, where
    precision matters: across many batches. Chunks bound the temporary copy and never span
    two rows of a (batch, seq, in) input, so windows stacked into one batch
    (``cost.batches.stack_windows``) add the same bits as when run one by one. Returns the
    number of rows added."""
    x = x.detach()
    per_row = [x] if x.dim() < 3 else list(x.reshape(-1, *x.shape[-2:]))
    for xr in per_row:
        x2 = xr.reshape(-1, xr.shape[-1])
        rows = max(1, _CHUNK_ELEMS // max(1, x2.shape[1]))
        for start in range(0, x2.shape[0], rows):
            c = x2[start : start + rows].to(torch.float32)
            gram.add_(c.T @ c)  # widened to float64 inside the add (the same bits as .to())
    return int(x.numel() // max(1, x.shape[-1]))


def _first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in ("input", "x", "hidden_states"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    for v in kwargs.values():
        if isinstance(v, Tensor):
            return v
    return None


def _module(modules: Mapping[str, nn.Module], fqn: str) -> nn.Module:
    try:
        return modules[fqn]
    except KeyError:
        raise ValueError(f"site {fqn!r} is not a module of the model") from None


class GramRecorder:
    """Forward-pre-hooks that accumulate one input Gram per group of ``sites``.

    Only the first member of each group (in ``sites`` order) is hooked: the other members
    read the same tensor. Use as a context manager; hooks are removed on exit, exception or not.
    """

    def __init__(self, modules: Mapping[str, nn.Module], sites: Sequence[LinearSite]) -> None:
        self.site_group = {s.fqn: s.group for s in sites}
        self.leaders: dict[str, LinearSite] = {}
        for s in sites:
            self.leaders.setdefault(s.group, s)
        self.modules = {g: _module(modules, s.fqn) for g, s in self.leaders.items()}
        self.grams: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {g: 0 for g in self.leaders}
        self._handles: list[Any] = []

    def _hook(self, group: str, in_features: int) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _first_tensor(args, kwargs)
            if x is None:
                return
            if x.shape[-1] != in_features:
                raise ValueError(
                    f"input of {self.leaders[group].fqn!r} has {x.shape[-1]} features, "
                    f"the site says {in_features}"
                )
            g = self.grams.get(group)
            if g is None:
                g = self.grams[group] = torch.zeros(
                    in_features, in_features, dtype=torch.float64, device=x.device
                )
            self.tokens[group] += accumulate_gram(g, x)

        return hook

    def __enter__(self) -> GramRecorder:
        for group, site in self.leaders.items():
            h = self.modules[group].register_forward_pre_hook(
                self._hook(group, site.in_features), with_kwargs=True
            )
            self._handles.append(h)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def stats(
        self, sensitivity: dict[str, float] | None = None, seconds: float = 0.0
    ) -> CalibrationStats:
        """The accumulated Grams (moved to CPU) as ``CalibrationStats``."""
        grams = {g: t.cpu() for g, t in self.grams.items()}
        return CalibrationStats(
            grams, dict(self.tokens), dict(self.site_group), sensitivity, seconds
        )


class _FisherRecorder(OutputHooks):
    """Forward hooks on every site: E[y_i²] per output unit and the outputs for autograd."""

    def __init__(self, modules: Mapping[str, nn.Module], sites: Sequence[LinearSite]) -> None:
        self.sites = list(sites)
        self.modules = {s.fqn: _module(modules, s.fqn) for s in sites}
        self.y2 = {s.fqn: torch.zeros(s.out_features, dtype=torch.float64) for s in sites}
        self.g2 = {s.fqn: torch.zeros(s.out_features, dtype=torch.float64) for s in sites}
        self.rows = {s.fqn: 0 for s in sites}
        self.outputs: list[tuple[str, Tensor]] = []

    def _hook(self, fqn: str) -> Callable[..., Tensor | None]:
        def hook(_mod: nn.Module, _args: tuple[Any, ...], out: Any) -> Tensor | None:
            if not isinstance(out, Tensor):
                return None
            y = out.detach().reshape(-1, out.shape[-1]).to(torch.float64)
            self.y2[fqn] += (y * y).sum(0).cpu()
            self.rows[fqn] += y.shape[0]
            replaced = None
            if not out.requires_grad:  # frozen model: make the output a leaf to reach it
                out = replaced = out.detach().requires_grad_(True)
            self.outputs.append((fqn, out))
            return replaced

        return hook

    def backward(self, loss: Tensor) -> None:
        """Squared output gradients of this batch's loss, without touching ``param.grad``."""
        if not self.outputs:
            return
        tensors = [t for _, t in self.outputs]
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for (fqn, _), g in zip(self.outputs, grads):
            if g is not None:
                g = g.detach().reshape(-1, g.shape[-1]).to(torch.float64)
                self.g2[fqn] += (g * g).sum(0).cpu()
        self.outputs.clear()

    def sensitivity(self) -> dict[str, float]:
        raw = {}
        for s in self.sites:
            n = max(self.rows[s.fqn], 1)
            raw[s.fqn] = float(((self.g2[s.fqn] / n) * (self.y2[s.fqn] / n)).sum())
        mean = sum(raw.values()) / max(len(raw), 1)
        if not (mean > 0 and torch.isfinite(torch.tensor(mean))):
            return {k: 1.0 for k in raw}
        return {k: v / mean for k, v in raw.items()}

    def _clear(self) -> None:
        self.outputs.clear()


def _loss_of(
    model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Tensor] | None
) -> Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    out = call_model(model, batch, labels=True)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if not isinstance(loss, Tensor):
        raise NoLossError(
            "fisher=True needs a loss: the model returned none for labels=input_ids; calibrate "
            "with dict batches holding the labels the model's loss takes (optimize), pass "
            "loss_fn(model, batch) -> scalar tensor (collect_stats), or fisher=False"
        )
    if not bool(torch.isfinite(loss.detach()).all()):  # NaN gradients would weight every site
        raise NoLossError(
            f"the batch's loss is {loss.detach().float().mean().item()} — labels with no target "
            "token (all -100), or a forward that overflows — so it gives no loss sensitivity"
        )
    return loss


# --------------------------------------------------------------------------- public API


def _begin(
    model: nn.Module, sites: Iterable[LinearSite], batches: Iterable[Any]
) -> tuple[list[Any], list[LinearSite], float, dict[str, nn.Module]]:
    """A calibration pass's checked batches and sites, its start time and the model's
    modules by name."""
    batches, sites = check_batches(batches), list(sites)
    if not sites:
        raise ValueError("no sites to calibrate")
    return batches, sites, time.perf_counter(), dict(model.named_modules())


def collect_stats(
    model: nn.Module,
    sites: Sequence[LinearSite],
    batches: Iterable[Any],
    *,
    fisher: bool = False,
    progress: bool = True,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    estimator: str = "fisher",
) -> CalibrationStats:
    """Input Gram matrices (one per group) and, with ``fisher=True``, per-site sensitivity.

    ``estimator`` (with ``fisher=True``): "fisher" — Σ E[g²]E[y²], mean 1 (the historical
    weighting); "probe" / "kfac" / "probe-kind" / "geo" — from the loss change of probe
    compressions per unit relative error, median 1 with a floor (:mod:`slimfx.cost.sensitivity`;
    one pass as well, plus two probe matmuls per site and batch); "measured" — the probes run
    through the model.

    ``batches``: token-id tensors (B, L) (a Hugging Face model is called as
    ``model(input_ids=ids)``), input tensors for plain models, dicts of keyword arguments, or
    tuples of positional ones; texts go through :func:`prepare_batches` first. The model runs
    in eval mode; afterwards every training flag is restored, every hook removed (also on an
    exception), and no parameter's ``.grad`` or ``requires_grad`` has changed.

    Without ``fisher`` one no-grad forward per batch. With it, one forward with autograd per
    batch (the Grams are accumulated in the same pass) and a gradient of the loss — the
    model's LM loss (``labels=input_ids``) or ``loss_fn(model, batch)`` — with respect to the
    site outputs.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown sensitivity estimator {estimator!r}; one of {ESTIMATORS}")
    if fisher and estimator == "measured":
        return _collect_measured(model, sites, batches, progress, loss_fn)
    if fisher and estimator != "fisher":
        stats, _ = collect_sensitivity(
            model, sites, batches, estimator=estimator, progress=progress, loss_fn=loss_fn
        )
        return stats
    batches, sites, start, modules = _begin(model, sites, batches)
    grams = GramRecorder(modules, sites)
    fish = _FisherRecorder(modules, sites) if fisher else None
    bar = tqdm(batches, desc="calibration", unit="batch", disable=not progress, leave=False)
    with eval_mode(model), grams:
        if fish is None:
            with torch.no_grad():
                for i, batch in enumerate(bar):
                    with naming_batch(i, batch, model):
                        call_model(model, batch)
        else:
            with fish, torch.enable_grad():
                for i, batch in enumerate(bar):
                    with naming_batch(i, batch, model):
                        loss = _loss_of(model, batch, loss_fn)
                        fish.backward(loss)
                    del loss
    sens = fish.sensitivity() if fish is not None else None
    stats = grams.stats(sens, time.perf_counter() - start)
    stats.estimator = "fisher" if fish is not None else None
    return stats


def _collect_measured(
    model: nn.Module,
    sites: Sequence[LinearSite],
    batches: Iterable[Any],
    progress: bool,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None,
) -> CalibrationStats:
    """Grams (no-grad pass) and the measured probe sensitivity (``slimfx.cost.probe_loss``)."""
    if loss_fn is not None:
        raise ValueError("estimator='measured' compares the model's logits; with loss_fn use "
                         "estimator='probe'")
    start = time.perf_counter()
    batches = check_batches(batches)
    stats = collect_stats(model, sites, batches, progress=progress)
    with eval_mode(model):
        raw = measured_raw(model, list(sites), batches, call_model, stats.fit_gram)
    stats.sensitivity, stats.sensitivity_scale = robust_normalize(raw)
    stats.estimator, stats.seconds = "measured", time.perf_counter() - start
    return stats


def collect_sensitivity(
    model: nn.Module,
    sites: Sequence[LinearSite],
    batches: Iterable[Any],
    *,
    estimator: str = "probe",
    progress: bool = True,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    extra: Mapping[str, Mapping[str, Tensor]] | None = None,
    stack_tokens: int | None = STACK_TOKENS,
) -> tuple[CalibrationStats, ProbeRecorder]:
    """One forward + backward pass per batch: the Grams and a :class:`ProbeRecorder`'s
    moments; the stats carry ``estimator``'s normalized weights (see
    :mod:`slimfx.cost.sensitivity`). The recorder is returned for its per-probe predictions.
    The loss is the model's LM loss (``labels=input_ids``) or ``loss_fn(model, batch)``.
    ``extra``: more ΔWs per site to evaluate exactly in the same pass (``ProbeRecorder``).
    ``stack_tokens``: with the model's own LM loss, consecutive token windows of one shape run
    stacked, up to this many tokens per pass (``cost.batches.stack_windows``: the same sums,
    fewer and larger products); ``None`` runs each batch alone."""
    batches, sites, start, modules = _begin(model, sites, batches)
    stacked = stack_tokens is not None and loss_fn is None
    if stacked:
        batches = stack_windows(batches, stack_tokens)
    weights = {s.fqn: linear_weight(_module(modules, s.fqn)) for s in sites}
    grams = GramRecorder(modules, sites)
    rec = ProbeRecorder(modules, sites, weights, extra)
    bar = tqdm(batches, desc="calibration", unit="batch", disable=not progress, leave=False)
    with eval_mode(model), grams, rec, torch.enable_grad():
        for i, batch in enumerate(bar):
            with naming_batch(i, batch, model, "stacked calibration batch" if stacked else None):
                loss = _loss_of(model, batch, loss_fn)
                rec.backward(loss)
            del loss
    stats = grams.stats(None, 0.0)

    fit = stats.group_fit_grams()  # q/k/v read one damped Gram

    def gram_of(fqn: str) -> tuple[Tensor | None, int]:
        return fit(fqn), stats.tokens.get(stats.group_of(fqn), 0)

    stats.sensitivity, stats.sensitivity_scale, stats.kind_sensitivity = probe_weights(
        rec, estimator, gram_of)
    stats.estimator = estimator
    stats.seconds = time.perf_counter() - start
    return stats, rec


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face model that generates from its own ids (a causal LM: it returns a loss for
    labels=ids); not an encoder-decoder (T5, BART, Whisper), whose labels are another text."""
    can = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    return (
        config is not None
        and not getattr(config, "is_encoder_decoder", False)
        and callable(can)
        and bool(can())
    )


def collect_planning_stats(
    model: nn.Module,
    sites: Sequence[LinearSite],
    batches: Sequence[Any],
    fisher: bool | None,
    progress: bool = True,
    estimator: str = DEFAULT_ESTIMATOR,
) -> tuple[CalibrationStats, str | None]:
    """:func:`collect_stats` for a solve, and a note for the report (or ``None``).

    ``fisher=None`` (``optimize``'s default): loss sensitivity for a causal LM calibrated on
    token ids or an encoder-decoder calibrated with ``labels`` in every dict batch, none
    otherwise; when that default cannot take a loss it falls back to unweighted
    errors and the note says why. ``True`` / ``False`` are obeyed (``True`` raises as usual).
    ``estimator``: how the sensitivity is estimated (:data:`~slimfx.cost.sensitivity.ESTIMATORS`;
    "geo", the default, the geometric mean of the Fisher and probe weights; "fisher", the
    historical Σ E[g²]E[y²])."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown sensitivity estimator {estimator!r}; one of {ESTIMATORS}")
    if fisher is not None:
        stats = collect_stats(
            model, sites, batches, fisher=fisher, progress=progress, estimator=estimator
        )
        return stats, None
    ids = all(
        (isinstance(b, Tensor) and not b.is_floating_point())
        or (isinstance(b, dict) and "input_ids" in b)
        for b in batches
    )
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    labelled = all(isinstance(b, dict) and "labels" in b for b in batches)
    if not ((is_causal_lm(model) and ids) or (seq2seq and labelled)):
        if seq2seq:
            note = ("sensitivity: errors unweighted — an encoder-decoder's loss needs its "
                    "target text: calibrate with dict batches holding labels= (the target ids) "
                    "to weight each site by its loss sensitivity")
        else:  # an encoder, a model that is no LM, float inputs: no loss of its own to weigh
            note = (f"sensitivity: errors unweighted — {type(model).__name__} calibrated on "
                    f"{'these batches' if ids else 'non-token inputs'} is not a causal LM, "
                    "whose loss the default weighs by; fisher=True weighs by the model's own "
                    "loss where its forward returns one")
        return collect_stats(model, sites, batches, fisher=False, progress=progress), note
    try:
        stats = collect_stats(
            model, sites, batches, fisher=True, progress=progress, estimator=estimator
        )
    except NoLossError as e:  # a model or batch without a loss; its own errors propagate
        note = (f"sensitivity: loss sensitivity (the causal-LM default) unavailable — {e}; "
                "errors unweighted")
        return collect_stats(model, sites, batches, fisher=False, progress=progress), note
    how = describe(estimator)
    return stats, (
        "sensitivity: each site's error weighted by its loss sensitivity on the calibration "
        f"text — {how} (the default for a causal LM, and for an encoder-decoder calibrated "
        "with labels; fisher=False turns it off)"
    )
