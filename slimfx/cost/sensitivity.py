"""Loss sensitivity of each site: the weight the solver puts on each site's error.

The solver sums, over sites, ``weight · relative output error`` of the chosen form, so a
site's weight should be *the loss increase per unit of relative output error*. The estimates
below all come from one forward + backward pass per calibration batch:

- ``fisher`` (the historical one): Σᵢ E[gᵢ²]·E[yᵢ²] over the site's output units, g = ∂L/∂y.
  It assumes the error of output unit i scales with yᵢ. Behind a scale-invariant norm (a
  post-norm after the linear, qk-norm after a query / key projection) g is orthogonal to y
  token by token, so units with a large y carry a small g and the product says little.
- ``kfac`` (Kronecker-factored): for a *probe* error ΔW of the site,
  ½·tr(ΔW Σₓ ΔWᵀ Σ_g) with Σₓ = E[x xᵀ] the input second moment (the Gram already collected)
  and Σ_g the **diagonal** of E[ĝ ĝᵀ] (ĝ = T·g: the gradient of the per-token loss); the full
  out × out Σ_g of every site would not fit (a 1536-wide projection alone is 19 MB in fp64).
- ``probe``: the exact token-wise second-order change ½·E_t[(ĝ_tᵀ ΔW x_t)²] of the same
  probe, accumulated during the backward pass — no Kronecker assumption, so the orthogonality
  of g and y behind a norm is seen exactly. The best single-site predictor here, but on
  SmolLM2 its plans at budgets 0.3 / 0.35 are 4.9% / 0.5% worse than Fisher's.
- ``probe-kind``: the probe weight per decision kind — a quantized option weighted by the
  int4 probe's ratio, a low-rank option by the low-rank probe's (:func:`kind_weights`).
- ``geo`` (``optimize``'s default for a causal LM, :data:`DEFAULT_ESTIMATOR`): the geometric
  mean of the Fisher and probe weights (:func:`combine_geometric`). On SmolLM2 it plans no
  worse than both Fisher and unweighted errors at every budget measured, where the probe alone
  loses at 0.3 (``benchmarks/RESULTS.md``); it ranks single-site losses better than Fisher,
  but below the probe alone on a post-norm / qk-norm decoder.

The probes are two compressions the solver actually offers, built from the weight alone (so
one pass suffices): int4 round-to-nearest at group 128 (asymmetric; 64 / 32 / per-row when
128 does not divide the input) and a plain-SVD truncation at a quarter of the dense bytes.
A probe-based weight is ``ΔL̂(probe) / rel_err(probe)``, with rel_err the activation-aware
relative error the candidates report (damped Gram); the two probes are combined by their
geometric mean (quantization-like and low-rank-like errors differ in direction, and neither
should dominate).

Normalization (:func:`robust_normalize`): weights are divided by their **median** (not the
mean), so no single very sensitive site can drive every other weight to ≈0, and raised to a
floor of :data:`FLOOR` × median: below it the estimate is dominated by gradient noise of a
few thousand calibration tokens (and a site can be cheap only up to a point: its error still
propagates). The raw median is kept (``scale``) so ``weight · scale · rel_err`` is a
predicted loss change in the loss's own units.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.cost.hooks import OutputHooks
from slimfx.ir.sites import LinearSite
from slimfx.numerics.quant import dequantize, quantize_rtn

__all__ = [
    "DEFAULT_ESTIMATOR",
    "ESTIMATORS",
    "FLOOR",
    "KIND_PROBE",
    "PROBES",
    "ProbeRecorder",
    "combine_geometric",
    "describe",
    "energy",
    "exact_error",
    "geometric_mean",
    "kfac_error",
    "kind_weights",
    "probe_weights",
    "probe_deltas",
    "relative_error",
    "robust_normalize",
]

#: the estimators: a :class:`ProbeRecorder` computes all but "measured", which runs the
#: probes (``slimfx.cost.probe_loss``).
ESTIMATORS = ("geo", "probe", "probe-kind", "kfac", "fisher", "measured")
#: what ``optimize`` uses for a causal LM (``sensitivity=``).
DEFAULT_ESTIMATOR = "geo"
#: the probe compressions: int4 RTN g128 and a plain low-rank at this fraction of dense bytes.
PROBES = ("int4_g128", "lowrank_0.25")
LOWRANK_PROBE_FRACTION = 0.25
#: the probe that stands for each decision kind in per-kind weights ("probe-kind").
KIND_PROBE = {"quant": "int4_g128", "lowrank": "lowrank_0.25"}
#: weights below this fraction of the median are raised to it.
FLOOR = 0.05
#: the int4 probe's product x·ΔWᵀ in bfloat16 (True), float32 (False), or bfloat16 where the
#: device multiplies it natively (None: CUDA, or a CPU with AVX512-BF16/AMX — 4.5× float32's
#: speed on the dev box). Measured on SmolLM2 (15 × 256 tokens): the probe's sums move by
#: ≤ 0.4% and the sites' weights by ≤ 0.1% (median 0.008%), far inside the estimate's own
#: noise; calibration 34.6 → 31.4 s.
PROBE_BF16: bool | None = None


def _probe_in_bf16(x: Tensor) -> bool:
    if x.dtype != torch.float32:
        return False
    if PROBE_BF16 is not None:
        return PROBE_BF16
    if x.device.type == "cuda":
        return True
    fast = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return x.device.type == "cpu" and fast is not None and bool(fast())


def probe_deltas(weight: Tensor) -> dict[str, Tensor]:
    """ΔW = W − Ŵ (float32, out × in) of each probe compression of ``weight``."""
    return _CompactProbes(weight).deltas()


class _Deltas(Mapping[str, dict[str, Tensor]]):
    """``ProbeRecorder.deltas``: each site's ΔWs, rebuilt when read (nothing cached)."""

    def __init__(
        self, probes: Mapping[str, _CompactProbes], extra: Mapping[str, dict[str, Tensor]]
    ) -> None:
        self.probes, self.extra = probes, extra

    def __getitem__(self, fqn: str) -> dict[str, Tensor]:
        return {**self.probes[fqn].deltas(), **self.extra.get(fqn, {})}

    def __iter__(self) -> Iterator[str]:
        return iter(self.probes)

    def __len__(self) -> int:
        return len(self.probes)


class _CompactProbes:
    """One site's probe compressions kept small — the int4 probe's packed codes, scales and
    zeros, the low-rank probe's two rank-r factors: about 1.5 bytes per weight instead of the
    8 of two float32 ΔWs — and rebuilt each time they are read by the same operations, so
    :meth:`deltas` gives the same ΔWs bit for bit every time (a ``ProbeRecorder`` holds one
    per site for the whole calibration pass)."""

    def __init__(self, weight: Tensor) -> None:
        W = weight.detach().to(torch.float32)
        out_f, in_f = W.shape
        self.W, self.in_f = W, in_f
        self.g = next((k for k in (128, 64, 32) if in_f % k == 0), None)
        self.q = quantize_rtn(W, 4, self.g, False)
        r = max(1, int(LOWRANK_PROBE_FRACTION * in_f * out_f // (in_f + out_f)))
        self.left, self.right = _truncation(W, r)

    def int4_delta(self) -> Tensor:
        """The int4 probe's ΔW = W − Ŵ (float32, out × in), rebuilt."""
        return self.W - dequantize(self.q, 4, self.g, False, self.in_f).to(torch.float32)

    def lowrank_delta(self) -> Tensor:
        """The low-rank probe's ΔW = W − L R (float32, out × in), rebuilt."""
        return self.W - self.left @ self.right

    def deltas(self) -> dict[str, Tensor]:
        """The probes' ΔW = W − Ŵ, float32, out × in."""
        return {"int4_g128": self.int4_delta(), "lowrank_0.25": self.lowrank_delta()}


def _truncation(W: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``(left, right)`` float32 with ``left @ right`` the best rank-``r`` approximation of
    ``W`` (float32; the truncated SVD): the projection onto the top-``r`` singular vectors
    of the smaller side, from the eigen-decomposition of ``W Wᵀ`` or ``Wᵀ W`` (several times
    faster than an SVD on CPU; nothing is divided by a singular value)."""
    if W.shape[0] <= W.shape[1]:
        _, U = torch.linalg.eigh(W @ W.T)
        Ur = U[:, -r:].flip(1).contiguous()
        return Ur, Ur.T @ W
    _, V = torch.linalg.eigh(W.T @ W)
    Vr = V[:, -r:].flip(1)
    return W @ Vr, Vr.T.contiguous()


def _plain_linear(m: nn.Module) -> bool:
    """``m`` computes ``F.linear(x, weight, bias)`` (its output minus the bias is x Wᵀ)."""
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def kfac_error(dW: Tensor, sigma_x: Tensor, sigma_g: Tensor) -> float:
    """tr(ΔW Σₓ ΔWᵀ Σ_g): the Kronecker-factored E[(gᵀ ΔW x)²].

    ``sigma_g``: the out × out matrix E[g gᵀ], or its diagonal (a vector of E[gᵢ²])."""
    dW = dW.to(torch.float64)
    left = dW @ sigma_x.to(torch.float64)  # out × in
    if sigma_g.dim() == 1:
        return float(((left * dW).sum(1) * sigma_g.to(torch.float64)).sum())
    return float(((left @ dW.T) * sigma_g.to(torch.float64)).sum())


def exact_error(dW: Tensor, x: Tensor, g: Tensor) -> float:
    """E_t[(g_tᵀ ΔW x_t)²] over the rows of ``x`` (T × in) and ``g`` (T × out)."""
    d = x.to(torch.float64) @ dW.to(torch.float64).T
    return float(((g.to(torch.float64) * d).sum(-1) ** 2).mean())


def robust_normalize(
    raw: Mapping[str, float], floor: float = FLOOR
) -> tuple[dict[str, float], float]:
    """``(weights, scale)``: ``raw / median`` raised to ``floor``, and the median. Non-finite or
    non-positive medians give all-ones (nothing measured)."""
    vals = [v for v in raw.values() if math.isfinite(v)]
    med = statistics.median(vals) if vals else 0.0
    if not (med > 0 and math.isfinite(med)):
        return {k: 1.0 for k in raw}, 1.0
    out = {}
    for k, v in raw.items():
        w = v / med if math.isfinite(v) else 1.0
        out[k] = max(floor, w)
    return out, med


def energy(M: Tensor, gram: Tensor | None) -> float:
    """tr(M G Mᵀ) (‖M‖²_F without a Gram): the product M·G in float32, the sums in float64
    — the candidates' error arithmetic (``cost.family_quant``; ≤ 2e-7 relative from an
    all-float64 product on SmolLM2's Grams)."""
    if gram is None:
        return float(M.to(torch.float64).square().sum())
    M = M.to(torch.float32)
    return float(((M @ gram.to(torch.float32)) * M).sum(dtype=torch.float64))


def relative_error(
    dW: Tensor, W: Tensor, gram: Tensor | None, den: float | None = None
) -> float:
    """tr(ΔW G ΔWᵀ) / tr(W G Wᵀ) (Frobenius without a Gram): the candidates' relative error.
    ``den``: tr(W G Wᵀ) when already known (:func:`energy`)."""
    den = energy(W, gram) if den is None else den
    return energy(dW, gram) / max(den, 1e-300)


class ProbeRecorder(OutputHooks):
    """Forward hooks on every site keep (input, output); :meth:`backward` takes this batch's
    output gradients and accumulates E[ĝᵢ²], E[yᵢ²] and, per probe, Σ_t (ĝ_tᵀ ΔW x_t)².

    ĝ = T·∂L/∂y with T the batch's token count: the gradient of the per-token loss when L is
    a mean over tokens. Gradients are taken with ``torch.autograd.grad`` with respect to the
    site outputs, so no parameter's ``.grad`` is written. ``extra``: site → name → ΔW of more
    compressions to evaluate exactly in the same pass (they do not enter the weights)."""

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        sites: Sequence[LinearSite],
        weights: Mapping[str, Tensor],
        extra: Mapping[str, Mapping[str, Tensor]] | None = None,
    ) -> None:
        self.sites = list(sites)
        self.modules = {s.fqn: modules[s.fqn] for s in self.sites}
        self.weights = {s.fqn: weights[s.fqn].detach() for s in self.sites}
        self._probes = {s.fqn: _CompactProbes(self.weights[s.fqn]) for s in self.sites}
        self._extra: dict[str, dict[str, Tensor]] = {}
        for fqn, more in (extra or {}).items():  # more ΔWs to evaluate exactly (not weights)
            self._extra[fqn] = {k: v.detach().to(torch.float32) for k, v in more.items()}
        names = list(PROBES)
        z = {s.fqn: torch.zeros(s.out_features, dtype=torch.float64) for s in self.sites}
        self.g2 = {k: v.clone() for k, v in z.items()}
        self.y2 = {k: v.clone() for k, v in z.items()}
        self.exact = {
            s.fqn: dict.fromkeys([*names, *self._extra.get(s.fqn, {})], 0.0) for s in self.sites
        }
        self.rows = {s.fqn: 0 for s in self.sites}
        self._pending: list[tuple[str, Tensor, Tensor]] = []

    @property
    def deltas(self) -> Mapping[str, dict[str, Tensor]]:
        """Site → probe name → ΔW: the probes rebuilt on each read (``_CompactProbes``), then
        the site's ``extra`` ones."""
        return _Deltas(self._probes, self._extra)

    def _hook(self, fqn: str) -> Callable[..., Tensor | None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...], out: Any) -> Tensor | None:
            if not isinstance(out, Tensor) or not args or not isinstance(args[0], Tensor):
                return None
            replaced = None
            if not out.requires_grad:  # frozen model: make the output a leaf to reach it
                out = replaced = out.detach().requires_grad_(True)
            self._pending.append((fqn, args[0].detach(), out))
            return replaced

        return hook

    def backward(self, loss: Tensor) -> None:
        """Accumulate this batch's moments; clears the kept activations."""
        if not self._pending:
            return
        grads = torch.autograd.grad(loss, [o for _, _, o in self._pending], allow_unused=True)
        for (fqn, x, out), g in zip(self._pending, grads):
            if g is None:
                continue
            y = out.detach().reshape(-1, out.shape[-1]).to(torch.float32)
            g = g.detach().reshape(-1, g.shape[-1]).to(torch.float32)
            g = g * g.shape[0]  # per-token loss gradient (L is a mean over the batch's tokens)
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            self.g2[fqn] += g.square().sum(0).to(torch.float64).cpu()
            self.y2[fqn] += y.square().sum(0).to(torch.float64).cpu()
            self.rows[fqn] += g.shape[0]
            for name, gdx in self._probe_products(fqn, x, g, out.detach()):
                self.exact[fqn][name] += float(gdx.to(torch.float64).square().sum())
        self._pending.clear()

    def _probe_products(
        self, fqn: str, x: Tensor, g: Tensor, out: Tensor
    ) -> Iterator[tuple[str, Tensor]]:
        """``(name, ĝ_tᵀ ΔW x_t per token)`` of each probe and extra ΔW. The low-rank probe
        goes through its factors — ĝᵀ(W − L R)x = ĝᵀ(y − b) − (ĝ L)·(R x) — where the site is
        a plain ``nn.Linear`` with a float32/64 output (y − b is x Wᵀ); a full product
        otherwise."""
        probes = self._probes[fqn]
        dev = x.device
        if _probe_in_bf16(x):
            dx = (x.to(torch.bfloat16) @ probes.int4_delta().to(dev, torch.bfloat16).T).float()
        else:
            dx = x @ probes.int4_delta().to(dev).T
        yield "int4_g128", (g * dx).sum(-1)
        mod = self.modules[fqn]
        if _plain_linear(mod) and out.dtype in (torch.float32, torch.float64):
            wx = out.reshape(-1, out.shape[-1]).to(torch.float32)
            if mod.bias is not None:
                wx = wx - mod.bias.detach().to(wx)
            low = (g @ probes.left.to(dev)) * (x @ probes.right.to(dev).T)
            yield "lowrank_0.25", (g * wx).sum(-1) - low.sum(-1)
        else:
            yield "lowrank_0.25", (g * (x @ probes.lowrank_delta().to(dev).T)).sum(-1)
        for name, dW in self._extra.get(fqn, {}).items():
            yield name, (g * (x @ dW.to(dev).T)).sum(-1)

    def _clear(self) -> None:
        self._pending.clear()

    # ------------------------------------------------------------------ estimates

    def predicted(
        self, fqn: str, gram: Tensor | None, tokens: int, kfac: bool = True
    ) -> dict[str, dict[str, float]]:
        """Per probe: ``{"rel": relative error, "probe": ½E[(ĝᵀΔWx)²], "kfac": ½tr(ΔWΣₓΔWᵀΣ_g)}``
        (``kfac`` only when asked and a Gram is given). ``gram``: the site's (damped) input
        Gram summed over ``tokens`` rows."""
        n = max(self.rows[fqn], 1)
        sigma_g = self.g2[fqn] / n
        sigma_x = gram / max(tokens, 1) if gram is not None else None
        out = {}
        W = self.weights[fqn].to(torch.float32)
        g32 = None if gram is None else gram.to(torch.float32)  # once per site, not per probe
        WG = None if g32 is None else W @ g32
        den = energy(W, None) if WG is None else float((WG * W).sum(dtype=torch.float64))
        probes = self._probes[fqn]
        for name, dW in self.deltas[fqn].items():
            if name == "lowrank_0.25" and WG is not None:
                # tr((W − LR) G (W − LR)ᵀ) = tr(W G Wᵀ) − 2 tr(L R G Wᵀ) + tr(L R G Rᵀ Lᵀ):
                # products of the rank-r factors instead of a full out × in × in one
                L, R = probes.left, probes.right
                cross = float(((WG @ R.T) * L).sum(dtype=torch.float64))
                own = float(((L @ ((R @ g32) @ R.T)) * L).sum(dtype=torch.float64))
                rel = max(den - 2.0 * cross + own, 0.0) / max(den, 1e-300)
            else:
                rel = relative_error(dW, W, g32, den)
            rec = {"rel": rel, "probe": 0.5 * self.exact[fqn][name] / n}
            if kfac and sigma_x is not None:
                rec["kfac"] = 0.5 * kfac_error(dW, sigma_x, sigma_g)
            out[name] = rec
        return out

    def ratios(
        self, estimator: str, gram_of: Callable[[str], tuple[Tensor | None, int]]
    ) -> dict[str, dict[str, float]]:
        """Site → probe → loss change per unit relative error of that probe under
        ``estimator`` ("probe" or "kfac"; "kfac" falls back to "probe" without a Gram). A probe
        whose estimate or relative error is not positive is left out."""
        out: dict[str, dict[str, float]] = {}
        for s in self.sites:
            gram, tokens = gram_of(s.fqn)
            est = estimator if (estimator == "probe" or gram is not None) else "probe"
            pred = self.predicted(s.fqn, gram, tokens, kfac=est == "kfac")
            out[s.fqn] = {
                name: p[est] / p["rel"]
                for name, p in pred.items()
                if name in PROBES and p[est] > 0 and p["rel"] > 0
            }
        return out

    def raw(
        self, estimator: str, gram_of: Callable[[str], tuple[Tensor | None, int]]
    ) -> dict[str, float]:
        """Each site's un-normalized weight (loss change per unit relative error) under
        ``estimator`` ("probe", "kfac" or "fisher"). ``gram_of(fqn)`` → (damped Gram, tokens).
        "probe" / "kfac": the geometric mean of the probes' :meth:`ratios`."""
        if estimator not in ("probe", "kfac", "fisher"):
            raise ValueError(f"unknown sensitivity estimator {estimator!r}; one of {ESTIMATORS}")
        if estimator == "fisher":
            raw: dict[str, float] = {}
            for s in self.sites:
                n = max(self.rows[s.fqn], 1)
                raw[s.fqn] = float(((self.g2[s.fqn] / n) * (self.y2[s.fqn] / n)).sum())
            return raw
        return {f: geometric_mean(r.values()) for f, r in self.ratios(estimator, gram_of).items()}


def geometric_mean(values: Iterable[float]) -> float:
    """exp(mean(log v)) of the positive values (0.0 when there are none)."""
    logs = [math.log(v) for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(logs) / len(logs)) if logs else 0.0


def kind_weights(
    ratios: Mapping[str, Mapping[str, float]], scale: float, floor: float = FLOOR
) -> dict[str, dict[str, float]]:
    """Per-kind weights ("probe-kind"): site → decision kind → the ratio of the probe of that
    kind (:data:`KIND_PROBE`) divided by ``scale`` (the median of the sites' combined weights,
    so both kinds stay in one unit: loss per relative error) and raised to ``floor``. A site
    without that probe's ratio gets its combined weight."""
    out: dict[str, dict[str, float]] = {}
    for fqn, r in ratios.items():
        comb = geometric_mean(r.values()) / scale if scale > 0 else 1.0
        out[fqn] = {
            kind: max(floor, (r[probe] / scale) if probe in r and scale > 0 else comb)
            for kind, probe in KIND_PROBE.items()
        }
    return out


def probe_weights(
    rec: ProbeRecorder,
    estimator: str,
    gram_of: Callable[[str], tuple[Tensor | None, int]],
) -> tuple[dict[str, float], float, dict[str, dict[str, float]] | None]:
    """``(site weights, scale, per-kind weights or None)`` of one recorded pass:

    - "probe" / "kfac": the probes' combined ratio through :func:`robust_normalize`;
    - "probe-kind": the same site weights (and scale), plus :func:`kind_weights` — an option
      of a kind with its own probe is weighted by that probe alone;
    - "geo" (the causal-LM default): :func:`combine_geometric` of the Fisher product
      (median-normalized, no floor) and the "probe" weight (median-normalized, floored); the
      scale is the probe's, so ``weight · scale · rel_err`` is still a loss change where the
      two agree;
    - "fisher": Σ E[g²]E[y²], median-normalized without a floor."""
    if estimator == "probe-kind":
        sens, scale = robust_normalize(rec.raw("probe", gram_of))
        return sens, scale, kind_weights(rec.ratios("probe", gram_of), scale)
    if estimator == "geo":
        probe, scale = robust_normalize(rec.raw("probe", gram_of))
        fisher, _ = robust_normalize(rec.raw("fisher", gram_of), floor=0.0)
        return combine_geometric(fisher, probe)[0], scale, None
    if estimator == "fisher":
        return (*robust_normalize(rec.raw("fisher", gram_of), floor=0.0), None)
    if estimator not in ("probe", "kfac"):
        raise ValueError(f"unknown sensitivity estimator {estimator!r}; one of {ESTIMATORS}")
    return (*robust_normalize(rec.raw(estimator, gram_of)), None)


def combine_geometric(
    a: Mapping[str, float], b: Mapping[str, float], floor: float = FLOOR
) -> tuple[dict[str, float], float]:
    """√(a·b) per site of two weightings (each median-normalized first), median-normalized
    again with ``floor``: ``(weights, 1.0)``."""
    na, _ = robust_normalize(a, floor=0.0)
    nb, _ = robust_normalize(b, floor=0.0)
    w, _ = robust_normalize({k: math.sqrt(max(na[k], 0.0) * max(nb[k], 0.0)) for k in na}, floor)
    return w, 1.0


def describe(estimator: str) -> str:
    """How ``estimator`` weighs a site, in words (for the report's note)."""
    return {
        "probe": "the second-order loss change of two probe compressions (int4 g128, low-rank "
        "at 1/4 of the bytes) per unit of relative error, median-normalized, floor "
        f"{FLOOR:g}",
        "probe-kind": "the second-order loss change per unit of relative error of the probe of "
        "each option's own kind (int4 g128 for quantized options, low-rank at 1/4 of the bytes "
        f"for low-rank ones; both for the others), median-normalized, floor {FLOOR:g}",
        "geo": "the geometric mean of the Fisher product Σ E[g²]E[y²] and the probe weight (the "
        "second-order loss change of two probe compressions, int4 g128 and low-rank at 1/4 of "
        f"the bytes, per unit of relative error), median-normalized, floor {FLOOR:g}",
        "kfac": "a Kronecker-factored (diagonal output-gradient) loss change of two probe "
        f"compressions per unit of relative error, median-normalized, floor {FLOOR:g}",
        "fisher": "Σ E[g²]E[y²] (Fisher), mean-normalized",
        "measured": "the measured KL to the dense model of two probe compressions (int4 g128, "
        f"low-rank at 1/4 of the bytes) per unit of relative error, median-normalized, floor "
        f"{FLOOR:g}",
    }[estimator]
