"""Reports: what was planned, why, what was applied, and what it measured.

A ``Report`` joins, per site, the options considered, the chosen one and the runner-up, bytes
before/after, the estimated error and the measured one (SQNR of the layer's output on
held-out batches), what the pass did (or why it rejected), and time spent. Outputs: ``str``
(short table), ``to_markdown()``, stable ``to_json()`` and ``plot()`` (PNG).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SiteEntry", "KVEntry", "Report", "REPORT_FORMAT"]

REPORT_FORMAT = "slimfx.report"
REPORT_VERSION = 1


#: plot colour of a kind no registered form has (a report loaded without the form's plugin).
_UNKNOWN_COLOUR = "#8c564b"


def _form_styles() -> tuple[dict[str, str], dict[str, str]]:
    """Kind → plot colour and kind → legend label, from the registered forms (``slimfx.forms``,
    imported here only: the report stays a leaf the backends may import)."""
    from slimfx import forms

    registered = forms.forms()
    return {f.kind: f.colour for f in registered}, {f.kind: f.label for f in registered}


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _r(x: float | None, nd: int = 6) -> float | None:
    if x is None:
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
    return round(float(x), nd)


@dataclass
class SiteEntry:
    """One site's line in the report.

    ``est_error``: the chosen form's estimated relative output error ‖(W−Ŵ)X‖²/‖WX‖² on the
    calibration inputs — comparable with ``measured_sqnr_db`` (−10·log10) on held-out ones.
    ``sensitivity``: the weight the solver gave this site's errors (loss sensitivity: median
    1 for the probe estimators, mean 1 for the Fisher product; 1.0 without one);
    ``candidates[i]["error"]`` are unweighted too. ``loss_change`` (``measure_loss=True``):
    ``{"predicted", "measured"}`` loss change of this site's chosen form on held-out batches.
    """

    fqn: str
    shape: tuple[int, int]
    group: str = ""
    chosen: str = "dense"
    decision: dict[str, Any] = field(default_factory=dict)
    runner_up: str | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    est_error: float = 0.0
    sensitivity: float = 1.0
    measured_sqnr_db: float | None = None
    measured_rel_error: float | None = None
    latency_before_s: float = 0.0
    latency_after_s: float = 0.0
    latency_source: str = "roofline"
    status: str = "skipped"
    reason: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    loss_change: dict[str, float | None] | None = None
    runtime: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        for k in ("est_error", "sensitivity", "measured_sqnr_db", "measured_rel_error", "seconds"):
            d[k] = _r(d[k])
        for k in ("latency_before_s", "latency_after_s"):
            d[k] = _r(d[k], 12)
        d["candidates"] = [
            {**c, "error": _r(c.get("error")), "latency_s": _r(c.get("latency_s"), 12)}
            for c in self.candidates
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiteEntry:
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        return cls(**d)


def _ratio(after: float, before: float) -> str:
    """``after / before`` as ``×0.52`` (``–`` when nothing was priced)."""
    return f"×{after / before:.2f}" if before > 0 else "–"


@dataclass
class KVEntry:
    """One attention site's KV cache in the report.

    Bytes per token are one sequence's cache of this layer per token of context (at the
    budget's ``context`` when it gave one, else the steady state); ``cache_bytes_*`` that
    cache at the context (``None`` without one). ``weight_bytes_after``: the k/v projections
    a low-rank cache owns (their linear entries then say ``owned by``). ``est_error``: the
    block output's relative error with this cache on calibration inputs (unweighted; the
    solver summed ``sensitivity ×`` it). ``latency_*_s``: one attention step of the workload
    at the context with the 16-bit cache / the chosen form (the cache read, rebuilds and the
    projections the form owns), ``latency_source`` where the chosen form's came from
    (``cost.attention_price.attention_latency``: ``measured``, ``measured, extrapolated``,
    ``measured, roofline-scaled`` or ``roofline``). ``decode_step``: what runs this layer's one-token steps in the returned model
    (``forms.kv.fused.decode_step_label``: a quantized store read in place or dequantized every
    step, …)."""

    fqn: str
    layer: int | None = None
    chosen: str = "kv dense"
    decision: dict[str, Any] = field(default_factory=dict)
    kv_bytes_per_token_before: float = 0.0
    kv_bytes_per_token_after: float = 0.0
    cache_bytes_before: int | None = None
    cache_bytes_after: int | None = None
    weight_bytes_after: int = 0
    owns: list[str] = field(default_factory=list)
    est_error: float = 0.0
    sensitivity: float = 1.0
    status: str = "skipped"
    candidates: list[dict[str, Any]] = field(default_factory=list)
    latency_before_s: float = 0.0
    latency_after_s: float = 0.0
    latency_source: str = "roofline"
    decode_step: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in (
            "est_error",
            "sensitivity",
            "kv_bytes_per_token_before",
            "kv_bytes_per_token_after",
        ):
            d[k] = _r(d[k])
        for k in ("latency_before_s", "latency_after_s"):
            d[k] = _r(d[k], 12)
        d["candidates"] = [{**c, "error": _r(c.get("error"))} for c in self.candidates]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVEntry:
        return cls(**d)


@dataclass
class Report:
    """The whole run. ``sites`` in graph order; ``totals`` computed by ``finalize``."""

    sites: list[SiteEntry] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    target: str = "cpu"
    workload: str = "decode"
    solver: str = ""
    capture: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    frontier: list[tuple[float, float, int]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    kv_sites: list[KVEntry] = field(default_factory=list)
    #: what the latency estimates assume runs the model: "torch-eager", "torch-compile",
    #: "triton" or "onnxruntime" ("" in reports written before it was recorded)
    runtime: str = ""

    # ----------------------------------------------------------------- totals
    def finalize(self, params_before: int | None = None, params_after: int | None = None) -> Report:
        """Compute the totals from the site entries (and the model's parameter counts)."""
        dense = sum(s.bytes_before for s in self.sites)
        after = sum(s.bytes_after for s in self.sites)
        after += sum(k.weight_bytes_after for k in self.kv_sites)  # owned k/v projections
        lat0 = sum(s.latency_before_s for s in [*self.sites, *self.kv_sites])
        lat1 = sum(s.latency_after_s for s in [*self.sites, *self.kv_sites])
        applied = [s for s in self.sites if s.status == "applied"]
        self.totals = {
            "sites": len(self.sites),
            "rewritten": len(applied),
            "rejected": sum(s.status == "rejected" for s in self.sites),
            "bytes_before": dense,
            "bytes_after": after,
            "bytes_ratio": _r(after / dense if dense else 1.0),
            "bits_per_weight": _r(16 * after / dense if dense else 16.0, 3),
            # the solver's objective: each site's error weighted by its sensitivity
            "est_error_sum": (
                _r(sum(s.sensitivity * s.est_error for s in self.sites)) if self.estimated
                else None  # a replayed plan: nothing estimated
            ),
            "est_latency_ratio": _r(lat1 / lat0 if lat0 else 1.0),
            "latency_sources": sorted({s.latency_source for s in self.sites}),
        }
        if self.kv_sites:
            self.totals.update(self._kv_totals())
        if params_before is not None:
            self.totals["params_before"] = params_before
        if params_after is not None:
            self.totals["params_after"] = params_after
        sq = [s.measured_sqnr_db for s in applied if s.measured_sqnr_db is not None]
        if sq:
            self.totals["measured_sqnr_db_min"] = _r(min(sq), 2)
            self.totals["measured_sqnr_db_median"] = _r(sorted(sq)[len(sq) // 2], 2)
        return self

    def _kv_totals(self) -> dict[str, Any]:
        ks = self.kv_sites
        b0 = sum(k.kv_bytes_per_token_before for k in ks)
        b1 = sum(k.kv_bytes_per_token_after for k in ks)
        out: dict[str, Any] = {
            "kv_sites": len(ks),
            "kv_compressed": sum(k.status == "applied" for k in ks),
            "kv_bytes_per_token_before": _r(b0, 2),
            "kv_bytes_per_token_after": _r(b1, 2),
            "kv_ratio": _r(b1 / b0 if b0 else 1.0),
            "kv_latency_sources": sorted({k.latency_source for k in ks}),
        }
        if all(k.cache_bytes_after is not None for k in ks):
            batch = int(self.budget.get("batch") or 1)
            out["kv_cache_bytes_before"] = batch * sum(k.cache_bytes_before or 0 for k in ks)
            out["kv_cache_bytes_after"] = batch * sum(k.cache_bytes_after or 0 for k in ks)
        return out

    def _kv_headline(self, t: dict[str, Any]) -> str:
        if "kv_ratio" not in t:
            return ""
        at = ""
        if "kv_cache_bytes_after" in t:
            b = self.budget
            at = (
                f", {_mb(t['kv_cache_bytes_before'])} → {_mb(t['kv_cache_bytes_after'])} at "
                f"{b.get('batch') or 1} × {b.get('context')} tokens"
            )
        return (
            f"; KV cache {t['kv_bytes_per_token_before']:.0f} → "
            f"{t['kv_bytes_per_token_after']:.0f} B/token ({t['kv_ratio']:.3f}{at}; "
            f"{t['kv_compressed']}/{t['kv_sites']} layers compressed)"
        )

    def _kv_lines(self) -> list[str]:
        """The KV cache per layer for the short table: one line per chosen form with its layers
        and bytes per token."""
        forms: dict[str, list[KVEntry]] = {}
        for k in self.kv_sites:
            forms.setdefault(k.chosen, []).append(k)
        out = []
        for chosen, ks in forms.items():
            where = ", ".join(k.fqn if k.layer is None else str(k.layer) for k in ks)
            per = sorted({f"{k.kv_bytes_per_token_after:.1f}" for k in ks})
            out.append(f"KV cache {chosen}: {len(ks)} layer(s) [{where}], "
                       f"{'/'.join(per)} B/token each")  # fmt: skip
        return out

    def _kv_markdown(self) -> list[str]:
        if not self.kv_sites:
            return []
        ctx = self.budget.get("context")
        head = [
            "layer", "site", "chosen", "B/token", "of dense", f"cache @ {ctx or '–'} tokens",
            "weights", "est.err", "latency", "latency from", "decode step", "status",
        ]  # fmt: skip
        out = ["", "## KV cache", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k in self.kv_sites:
            frac = k.kv_bytes_per_token_after / max(k.kv_bytes_per_token_before, 1e-12)
            out.append(
                "| " + " | ".join([
                    "" if k.layer is None else str(k.layer), k.fqn, k.chosen,
                    f"{k.kv_bytes_per_token_before:.0f} → {k.kv_bytes_per_token_after:.1f}",
                    f"{frac:.3f}",
                    "–" if k.cache_bytes_after is None else _mb(k.cache_bytes_after),
                    _mb(k.weight_bytes_after) if k.owns else "–",
                    self._err(k.est_error), _ratio(k.latency_after_s, k.latency_before_s),
                    k.latency_source, k.decode_step or "–", k.status,
                ]) + " |"
            )  # fmt: skip
        return out

    @property
    def estimated(self) -> bool:
        """False for a replayed plan's report: no cost model ran (errors read "–")."""
        return self.meta.get("estimated", True) is not False

    def _err(self, value: float) -> str:
        return f"{value:.4f}" if self.estimated else "–"

    def site(self, fqn: str) -> SiteEntry:
        for s in self.sites:
            if s.fqn == fqn:
                return s
        raise KeyError(fqn)

    # ---------------------------------------------------------------- outputs
    def _rows(self, sites: list[SiteEntry], full: bool = False) -> list[list[str]]:
        rows = []
        for s in sites:
            sq = "" if s.measured_sqnr_db is None else f"{s.measured_sqnr_db:.1f}"
            row = [
                s.fqn,
                f"{s.shape[0]}×{s.shape[1]}",
                s.chosen,
                s.runner_up or "",
                f"{s.bytes_after / max(s.bytes_before, 1):.2f}",
                self._err(s.est_error),
                sq,
            ]
            if full:
                lat = s.latency_after_s / s.latency_before_s if s.latency_before_s else 1.0
                row += [f"{s.sensitivity:.2f}", f"{lat:.2f}", s.latency_source, s.runtime]
            # a skipped site's reason is shown unless it only repeats "dense" (older reports)
            row.append(s.status + (f": {s.reason}" if s.reason not in ("", "dense") else ""))
            rows.append(row)
        return rows

    _HEAD = ["site", "shape", "chosen", "runner-up", "bytes", "est.err", "SQNR dB", "status"]
    #: the markdown table adds each site's error weight and estimated latency (× its dense)
    _FULL_HEAD = [*_HEAD[:-1], "sensitivity", "latency", "latency from", "runs as", "status"]

    def headline(self) -> str:
        t = self.totals or self.finalize().totals
        b = self.budget
        lim = ", ".join(f"{k}={v}" for k, v in b.items() if v is not None) or "none"
        return (
            f"slimfx: {t['rewritten']}/{t['sites']} sites rewritten; budget {lim}; "
            f"bytes {_mb(t['bytes_before'])} → {_mb(t['bytes_after'])} "
            f"({t['bytes_ratio']:.3f}, {t['bits_per_weight']:.2f} bits/weight); "
            f"est. latency ×{t['est_latency_ratio']:.3f} ("
            f"{self.runtime + ' on ' if self.runtime else ''}{self.target}/{self.workload}, "
            f"{'/'.join(t['latency_sources'])}){self._kv_headline(t)}"
        )

    def __str__(self) -> str:
        """A short table: the headline and the first rows (all rewritten sites up to 12)."""
        lines = [self.headline()]
        shown = [s for s in self.sites if s.status != "skipped"][:12]
        if shown:
            rows = [self._HEAD, *self._rows(shown)]
            widths = [min(max(len(r[i]) for r in rows), 44) for i in range(len(self._HEAD))]
            for r in rows:
                lines.append("  ".join(c[:44].ljust(w) for c, w in zip(r, widths)).rstrip())
            more = sum(s.status != "skipped" for s in self.sites) - len(shown)
            if more > 0:
                lines.append(f"… {more} more rewritten sites (to_markdown() lists all)")
        dense = [s.fqn for s in self.sites if s.status == "skipped" and s.chosen == "dense"]
        if dense and shown:  # kept dense: the solver's choice under the budget, or a reason
            lines.append(f"… {len(dense)} site(s) kept dense, e.g. {dense[0]} "
                         "(to_markdown() lists each with its reason)")
        lines += self._kv_lines()
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        t = self.totals or self.finalize().totals
        out = ["# slimfx report", "", self.headline(), ""]
        out += ["| total | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in t.items()]
        if self.capture:
            out += ["", f"Capture: {self.capture}"]
        head = self._FULL_HEAD
        out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += [
            "| " + " | ".join(c.replace("|", "/") for c in r) + " |"
            for r in self._rows(self.sites, full=True)
        ]
        out += self._kv_markdown()
        if self.notes:
            out += ["", "## Notes", *[f"- {n}" for n in self.notes]]
        if self.timings:
            out += ["", "## Timings (s)", *[f"- {k}: {v:.2f}" for k, v in self.timings.items()]]
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "budget": self.budget,
            "target": self.target,
            "workload": self.workload,
            "runtime": self.runtime,
            "solver": self.solver,
            "capture": self.capture,
            "totals": self.totals or self.finalize().totals,
            "notes": list(self.notes),
            "timings": {k: _r(v, 3) for k, v in self.timings.items()},
            "frontier": [[_r(f, 4), _r(e), int(b)] for f, e, b in self.frontier],
            "meta": self.meta,
            "sites": [s.to_dict() for s in self.sites],
            **({"kv_sites": [k.to_dict() for k in self.kv_sites]} if self.kv_sites else {}),
        }

    def to_json(self) -> str:
        """Stable JSON: sorted keys, rounded floats — diffable between runs."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        if d.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a slimfx report (format={d.get('format')!r})")
        return cls(
            sites=[SiteEntry.from_dict(s) for s in d["sites"]],
            budget=d.get("budget", {}),
            target=d.get("target", ""),
            workload=d.get("workload", ""),
            runtime=d.get("runtime", ""),
            solver=d.get("solver", ""),
            capture=d.get("capture", {}),
            notes=list(d.get("notes", [])),
            timings=dict(d.get("timings", {})),
            frontier=[tuple(x) for x in d.get("frontier", [])],
            totals=dict(d.get("totals", {})),
            meta=dict(d.get("meta", {})),
            kv_sites=[KVEntry.from_dict(k) for k in d.get("kv_sites", [])],
        )

    @classmethod
    def load(cls, path: str | Path) -> Report:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    # ------------------------------------------------------------------- plot
    def plot(self, path: str | Path) -> Path:
        """PNG with two panels: bits per weight (and rank) chosen per layer, and the
        error-vs-budget frontier of the solved problem with the chosen point marked; with KV
        sites a third: each attention layer's cache bytes per token, 16-bit and chosen."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = 3 if self.kv_sites else 2
        fig, axes = plt.subplots(1, n, figsize=(7 * n, 4.5))
        ax1, ax2 = axes[0], axes[1]
        xs = range(len(self.sites))
        bits = self._bits_per_weight()
        colors, labels = _form_styles()
        kinds = [s.decision.get("kind", "dense") for s in self.sites]
        ax1.bar(xs, bits, color=[colors.get(k, _UNKNOWN_COLOUR) for k in kinds], width=0.9,
                hatch=["//" if s.chosen.startswith("owned by") else "" for s in self.sites])  # fmt: skip
        for i, s in enumerate(self.sites):
            r = s.decision.get("rank")
            if r is not None and len(self.sites) <= 80:
                ax1.text(i, bits[i], str(r), ha="center", va="bottom", fontsize=5, rotation=90)
        ax1.set_xlabel("site (graph order)")
        ax1.set_ylabel("bits per weight (16 = dense)")
        ax1.set_title("Chosen form per layer (rank annotated; hatched: owned by a KV cache)")
        from matplotlib.patches import Patch

        present = [k for k in colors if k in kinds]
        if any(k not in colors for k in kinds):
            colors["?"], labels["?"] = _UNKNOWN_COLOUR, "unregistered kind"
            present.append("?")
        ax1.legend(handles=[Patch(color=colors[k], label=labels[k]) for k in present], fontsize=7)
        if self.frontier:
            f = [p[0] for p in self.frontier]
            e = [p[1] for p in self.frontier]
            ax2.plot(f, e, "o-", ms=3, label="solver optimum")
            t = self.totals or self.finalize().totals
            ax2.plot([t["bytes_ratio"]], [t["est_error_sum"]], "r*", ms=12, label="chosen")
            ax2.set_yscale("log")
            ax2.legend()
        else:
            why = "a replayed plan: no cost model ran" if not self.estimated else "no frontier"
            ax2.text(0.5, 0.5, why, ha="center", va="center", transform=ax2.transAxes)
        ax2.set_xlabel("memory budget (fraction of dense 16-bit bytes)")
        ax2.set_ylabel("summed estimated error")
        ax2.set_title("Error–budget frontier")
        if self.kv_sites:
            self._plot_kv(axes[2], colors, labels)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def _bits_per_weight(self) -> list[float]:
        """Each linear site's bits per weight; a k/v projection a low-rank KV cache owns has
        no bytes of its own (0 in ``bytes_after``): it shows its share of the owner's weight
        bytes (its projections' factors), split by their 16-bit bytes."""
        share: dict[str, float] = {}
        before = {s.fqn: s.bytes_before for s in self.sites}
        for k in self.kv_sites:
            total = sum(before.get(f, 0) for f in k.owns)
            for f in k.owns:
                if total:
                    share[f] = k.weight_bytes_after * before.get(f, 0) / total
        return [16 * share.get(s.fqn, s.bytes_after) / max(s.bytes_before, 1) for s in self.sites]

    def _plot_kv(self, ax: Any, colors: dict[str, str], labels: dict[str, str]) -> None:
        """Per attention layer: the 16-bit cache's bytes per token (outline) and the chosen
        form's (bar, coloured by kind)."""
        from matplotlib.patches import Patch

        ks = self.kv_sites
        xs = range(len(ks))
        kinds = [k.decision.get("kind", "kv_dense") for k in ks]
        ax.bar(xs, [k.kv_bytes_per_token_before for k in ks], width=0.9, fill=False,
               edgecolor="0.5", label="16-bit")  # fmt: skip
        ax.bar(xs, [k.kv_bytes_per_token_after for k in ks], width=0.9,
               color=[colors.get(k, _UNKNOWN_COLOUR) for k in kinds])  # fmt: skip
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("attention layer")
        ax.set_ylabel("KV cache bytes per token")
        ctx = f" (at {self.budget['context']} tokens)" if self.budget.get("context") else ""
        ax.set_title(f"KV cache per layer{ctx}")
        present = list(dict.fromkeys(kinds))
        handles = [Patch(color=colors.get(k, _UNKNOWN_COLOUR), label=labels.get(k, k))
                   for k in present]  # fmt: skip
        ax.legend(handles=[Patch(fill=False, edgecolor="0.5", label="16-bit"), *handles],
                  fontsize=7)  # fmt: skip
