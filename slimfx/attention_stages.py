"""The attention half of ``optimize``'s stages: KV-cache forms under the same budget.

Called from ``slimfx.stages`` when the budget counts the KV cache (``Budget(kv=…)`` or
``Budget(total_bytes=…, context=…)``) or a replayed plan has attention decisions:

- ``find``: the model's attention sites (``ir.find.inspect_attention_sites``: Hugging Face
  Llama / Qwen2 / Gemma-style blocks; the modules it refuses are noted with the reason);
- ``collect``: the inputs each block receives on the first ``KV_ERROR_BATCHES`` calibration
  batches (what the candidates' errors replay);
- ``add_options``: each site's KV candidates (``forms.kv.candidates``) joined to the linear
  problem — errors weighted by the site's o_proj sensitivity, costs in weight bytes, KV bytes
  per token and (with a context) the cache bytes at that context; low-rank caches own the
  site's k_proj / v_proj; every option's latency is one attention step of the workload at the
  context (``cost.target.estimate_attention_latency``: the cache read, rebuilds, and the
  projections an owning form replaces), so a latency budget sees the cache too;
- ``apply``: the chosen KV forms applied to the rewritten model (``forms.kv.apply``);
- ``explain_infeasible`` (``explaining_infeasible`` around the solve): an infeasible cache
  budget's error, with the layers and reasons that limit the cache.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from slimfx.cost.batches import batch_units, first_batches
from slimfx.planning.problem import BudgetProblem, InfeasibleBudgetError

if TYPE_CHECKING:
    from slimfx.ir.sites import AttentionSite
    from slimfx.stages import Planning

__all__ = [
    "wanted", "note_unpriced", "find", "collect", "add_options", "apply", "split",
    "explain_infeasible", "explaining_infeasible",
]  # fmt: skip


def wanted(pl: Planning) -> bool:
    """Whether this run prices or applies KV-cache forms."""
    plan = pl.options.plan
    if plan is not None:  # decisions of attention-kind forms (KV caches, MLA)
        return bool(split(plan)[1])
    return pl.budget.prices_cache


def note_unpriced(pl: Planning) -> None:
    """A run that prices no KV form (:func:`wanted` false): ``kv_forms=`` given anyway is
    noted as not offered."""
    forms = pl.options.kv_forms
    if forms is not None and pl.options.plan is None:
        given = ", ".join(f if isinstance(f, str) else f.short() for f in forms)
        pl.notes.append(
            f"kv_forms [{given}] not offered: this budget does not count the KV cache (give it "
            "kv= or total_bytes=)"
        )


def find(pl: Planning, graph_sites: list[AttentionSite] = ()) -> None:  # type: ignore[assignment]
    """Fill ``pl.attention_sites`` (the Hugging Face attention modules, which hold a cache
    layer); attention found in the captured graph (``graph_sites``) outside such a module is
    noted with why its cache stays 16-bit. A budget on the cache with no site is an error."""
    from slimfx.ir.find import inspect_attention_sites

    assert pl.model is not None
    sites, rejected = inspect_attention_sites(pl.model)
    for fqn, why in rejected.items():
        pl.notes.append(f"{fqn}: not an attention site for the KV cache — {why}")
    known = {s.fqn for s in sites} | set(rejected)
    for g in graph_sites:
        if g.fqn not in known:
            pl.notes.append(
                f"{g.fqn}: attention in the graph (q/k/v/o = "
                f"{', '.join(f for _, f in g.projections)}) keeps its cache: KV forms run in "
                "Hugging Face attention modules (a layer_idx into a transformers Cache)"
            )
    for node, why in pl.capture.get("attention_rejected", {}).items():
        inside = node.rpartition(" in ")[2]  # "<node> in <module>": a site found there is one
        if not any(inside == s.fqn or inside.startswith(f"{s.fqn}.") for s in sites):
            pl.notes.append(f"graph attention node {node}: not a site — {why}")
    _note_unbound_windows(pl, sites)
    if not sites:
        why = "; ".join(f"{k}: {v}" for k, v in list(rejected.items())[:3]) or (
            "no module with q_proj/k_proj/v_proj/o_proj (a Hugging Face Llama/Qwen2/Gemma-style "
            "attention block)"
        )
        if graph_sites:
            why += (
                f"; the graph has attention at {', '.join(g.fqn for g in graph_sites[:3])}, but "
                "KV forms run in Hugging Face attention modules (a layer_idx into a "
                "transformers Cache)"
            )
        raise ValueError(
            f"the budget counts the KV cache but the model has no attention site: {why}"
        )
    pl.attention_sites = sites


def _note_unbound_windows(pl: Planning, sites: list[AttentionSite]) -> None:
    """Layers whose configured sliding window reaches ``max_position_embeddings`` are sites of
    full attention (``ir.find.unbound_window``); say so, and what differs past the window."""
    from slimfx.ir.find import _raw_sliding_window, unbound_window

    config = getattr(pl.model, "config", None)
    win = unbound_window(config)
    if win is None:
        return
    full = [
        s.fqn
        for s in sites
        if _raw_sliding_window(pl.model.get_submodule(s.fqn), config, s.layer_idx) is not None
    ]
    if full:
        pl.notes.append(
            f"sliding_window={win} reaches max_position_embeddings="
            f"{config.max_position_embeddings}: {len(full)} attention layer(s) ({full[0]}{', …' if len(full) > 1 else ''}) are priced and compressed as full "
            f"attention (the window drops no token within the model's positions; a compressed "
            f"cache keeps every token, also past {win}, where transformers' would drop the oldest)"
        )


def collect(pl: Planning) -> None:
    """The block inputs the KV candidates' errors are measured on. First each block the
    forms would rewrite is checked against its reimplementation (``calibrate.
    simulation_mismatch``): one that differs becomes cache-only, with the difference in the
    reason, rather than priced and rewritten as a block it is not."""
    import dataclasses

    from slimfx.forms.kv.calibrate import (
        SIMULATION_TOLERANCE,
        capture_attention_inputs,
        simulation_mismatch,
    )
    from slimfx.forms.kv.candidates import KV_ERROR_BATCHES

    assert pl.model is not None
    batches = first_batches(pl.fit_batches, KV_ERROR_BATCHES)  # the user's first batches
    if not batches:
        raise ValueError("pricing KV-cache forms needs calibration batches (calibration=...)")
    diff = simulation_mismatch(pl.model, pl.attention_sites)
    bad = {f: d for f, d in diff.items() if not d <= SIMULATION_TOLERANCE}
    if bad:
        pl.attention_sites = [
            dataclasses.replace(s, cache_only=(
                f"{s.module_type or 'the block'}'s output differs from the Llama-style block "
                f"slimfx rewrites by {bad[s.fqn]:.1e} (relative, float32, on a probe call: "
                "another RoPE layout or attention variant)"
            )) if s.fqn in bad else s
            for s in pl.attention_sites
        ]  # fmt: skip
        pl.notes.append(
            f"{len(bad)} attention site(s) (e.g. {next(iter(bad))}) compute their attention "
            "otherwise than the Llama-style block the low-rank caches and MLA rebuild: priced by "
            "replaying the block itself, quantized caches only"
        )
    pl.attention_inputs = capture_attention_inputs(pl.model, pl.attention_sites, batches)
    _drop_unreplayable(pl)
    pl.notes.append(
        f"KV cache: candidate errors measured on {len(batch_units(batches))} calibration "
        "batch(es) per attention site, in the steady state (every past token beyond the sinks "
        "read from the compressed store, as at long context)"
    )


def _drop_unreplayable(pl: Planning) -> None:
    """Cache-only sites whose block does not attend as the site says (``replay.check_replay``
    on the first calibration call: DeepSeek's own latent attention, a block that computes its
    attention itself) are no sites for the KV cache: dropped with the reason — an error when
    none is left."""
    from slimfx.forms.kv.replay import check_replay

    assert pl.model is not None
    dropped = {}
    for s in pl.attention_sites:
        calls = pl.attention_inputs.get(s.fqn) or []
        why = check_replay(pl.model, s, calls[0]) if s.cache_only and calls else None
        if why:
            dropped[s.fqn] = why
            pl.notes.append(f"{s.fqn}: not an attention site for the KV cache — {why}")
    if not dropped:
        return
    pl.attention_sites = [s for s in pl.attention_sites if s.fqn not in dropped]
    for f in dropped:
        pl.attention_inputs.pop(f, None)
    if not pl.attention_sites:
        f, why = next(iter(dropped.items()))
        raise ValueError(
            f"the budget counts the KV cache but the model has no attention site: {f}: {why}"
            + (f" (and {len(dropped) - 1} more)" if len(dropped) > 1 else "")
        )


def _bias_bytes(pl: Planning, fqns: list[str]) -> int:
    mods = dict(pl.model.named_modules())  # type: ignore[union-attr]
    return sum(
        2 * mods[f].bias.numel()
        for f in fqns
        if f in mods and getattr(mods[f], "bias", None) is not None
    )


def _forms(kv_forms: Any, shape: Any) -> tuple[list | None, bool]:
    """``(KV configs or None for the defaults, whether MLA is offered)`` from ``kv_forms``:
    KV-cache configs, ``"default"`` (``default_kv_forms``) and ``"mla"`` (``MLA_LADDER``)."""
    from slimfx.forms.kv.candidates import default_kv_forms
    from slimfx.forms.kv.config import KVDecision

    if kv_forms is None:
        return None, False
    if isinstance(kv_forms, str):
        raise TypeError('kv_forms takes a list (e.g. ["default", "mla"]), not one string')
    out: list = []
    mla = False
    for f in kv_forms:
        if f == "default":
            out += default_kv_forms(shape)
        elif f == "mla":
            mla = True
        elif isinstance(f, KVDecision):
            out.append(f)
        else:
            raise ValueError(
                f"kv_forms entry {f!r} is not a KV-cache config (slimfx.forms.kv.config), "
                '"default" or "mla"'
            )
    return out, mla


def add_options(pl: Planning) -> None:
    """Join every attention site's KV (and MLA) options to ``pl.problem``."""
    from slimfx.cost.candidates import time_attention_site
    from slimfx.cost.target import workload_of
    from slimfx.forms.kv.candidates import cache_only_reason, kv_site_options
    from slimfx.forms.kv.config import KVDecision
    from slimfx.forms.mla.plan import mla_options
    from slimfx.planning.problem import SiteOptions

    assert pl.problem is not None and pl.model is not None
    linear = {s.name for s in pl.problem.sites}
    context = pl.budget.context
    longest = getattr(getattr(pl.model, "config", None), "max_position_embeddings", None)
    if context is not None and isinstance(longest, int) and context > longest:
        pl.notes.append(
            f"context={context} exceeds the model's max_position_embeddings={longest}: the "
            "cache is priced at that context, longer than the model was made for"
        )
    added = []
    kl = _MeasuredKL(pl)
    mla_offered = False
    for site in pl.attention_sites:
        o_fqn, k_fqn, v_fqn = (site.projection(r) for r in ("o", "k", "v"))
        weight = pl.problem.site(o_fqn).sensitivity if o_fqn in linear else 1.0
        if o_fqn not in linear:
            what = "its output projection" if o_fqn is None else o_fqn.rpartition(".")[2]
            pl.notes.append(
                f"{site.fqn}: {what} is not a linear site of this problem, so its loss "
                "sensitivity is unknown: the KV candidates' errors are unweighted (1.0)"
            )
        gram = pl.stats.fit_gram(k_fqn) if pl.stats is not None and k_fqn in linear else None
        forms, mla = _forms(pl.options.kv_forms, site.site_shape)
        inputs = pl.attention_inputs.get(site.fqn, [])
        so, refused = kv_site_options(
            pl.model,
            site,
            inputs,
            gram,
            weight=weight,
            context=context,
            forms=forms,
            linear_sites=linear,
            bias_bytes=_bias_bytes(pl, [str(k_fqn), str(v_fqn)]),
            int8_factors=pl.budget.prices_weights,
        )
        if mla and site.cache_only:
            refused["mla"] = cache_only_reason(site)
        elif mla:
            mla_offered = True
            opts, why = mla_options(
                pl.model, site, inputs, None, weight=weight, context=context,
                linear_sites=linear, measure=kl.measure(site), fit_inputs=kl.fit_inputs(site),
                int8_factors=pl.budget.prices_weights,
            )  # fmt: skip
            if why:
                refused["mla"] = why
            so = SiteOptions(
                so.name, [*so.options, *opts], so.dense_bytes, so.dense_latency_s,
                so.sensitivity, so.kind, so.shape, so.dense_costs,
            )  # fmt: skip
        for short, why in refused.items():
            pl.kv_refused.setdefault(why, []).append(f"{site.fqn} ({short})")
        added.append(so)
    lowrank_offered = any(isinstance(o.decision, KVDecision) and o.decision.owns
                          for so in added for o in so.options)  # fmt: skip
    if (mla_offered or lowrank_offered) and not pl.budget.prices_weights:
        what = " and ".join(w for w, on in (("MLA", mla_offered), ("low-rank caches",
                            lowrank_offered)) if on)  # fmt: skip
        pl.notes.append(
            f"{what} with int8 factors not offered: this budget does not count weight bytes, "
            "which is all they save (they add error)"
        )
    for why, where in pl.kv_refused.items():  # entries "fqn (form)"
        n_sites = len({w.split(" (", 1)[0] for w in where})
        pl.notes.append(
            f"KV candidates not offered: {len(where)} form(s) at {n_sites} site(s) (e.g. "
            f"{where[0]}): {why}"
        )
    # every option's latency: one attention step of the workload for the budget's batch at its
    # context; without a context the cache read is not priced (a step attends over its own
    # tokens only), and a latency budget then needs one (``Budget`` refuses it)
    wl = workload_of(pl.options.workload)
    if context is None:
        pl.notes.append(
            "attention latencies: no context= given, so the KV cache read is not priced (each "
            "step attends over its own tokens); the projections a low-rank or MLA form "
            "replaces are"
        )
    step = (pl.options.target, wl, context or wl.tokens, pl.budget.batch or 1, pl.cache)
    added = [time_attention_site(so, *step) for so in kl.reprice(added)]
    if pl.cache is not None:
        src = Counter(o.source for so in added for o in so.options)
        pl.notes.append(
            f"attention steps: {src.get('measured', 0)} of {src.total()} options measured, "
            f"{src.get('measured, extrapolated', 0)} extrapolated along the measured contexts "
            f"or batches, {src.get('measured, roofline-scaled', 0)} scaled from a measurement "
            "by the roofline, the rest from the roofline"
        )
    p = pl.problem
    pl.problem = BudgetProblem(
        [*p.sites, *added], p.workload, p.target,
        {**p.meta, "kv_context": context, "kv_batch": pl.budget.batch or 1},
    )


@contextmanager
def explaining_infeasible(pl: Planning) -> Iterator[None]:
    """Within the block an ``InfeasibleBudgetError`` is re-raised as
    :func:`explain_infeasible` words it."""
    try:
        yield
    except InfeasibleBudgetError as exc:
        raise explain_infeasible(pl, exc) from None


def explain_infeasible(pl: Planning, exc: InfeasibleBudgetError) -> InfeasibleBudgetError:
    """``exc`` with what limits the cache, for a budget that counts it: the attention layers
    left with the 16-bit cache alone, and each reason a KV form was refused (the report's notes
    never reach a user whose budget fails)."""
    if not pl.budget.prices_cache or pl.problem is None:
        return exc
    if not {"kv", "total"} & set(exc.limits):
        return exc  # a memory / latency limit alone: the cache is not what limits it
    kinds = [so for so in pl.problem.sites if so.kind == "attention"]
    fixed = [so.name for so in kinds if len(so.options) == 1]
    parts = []
    if fixed:
        parts.append(
            f"{len(fixed)} of {len(kinds)} attention layer(s) can take no KV form and keep the "
            f"16-bit cache ({', '.join(fixed[:3])}{' …' if len(fixed) > 3 else ''})"
        )
    for why, where in list(pl.kv_refused.items())[:4]:  # entries "fqn (form)"
        sites = {w.split(" (", 1)[0] for w in where}
        parts.append(f"{len(where)} form(s) refused at {len(sites)} site(s), e.g. {where[0]}: {why}")
    if not parts:
        return exc
    return InfeasibleBudgetError(f"{exc}. What limits the cache: " + "; ".join(parts), exc.limits)


class _MeasuredKL:
    """MLA options priced by the measured KL of converting one block at a time
    (``forms.mla.measured``): ``measure(site)`` is the callback ``mla_options`` hands each
    candidate's converted block to, ``reprice`` puts the KLs on the solver's scale. A model
    whose layers cannot be replayed keeps the block-error proxy, with a note."""

    def __init__(self, pl: Planning) -> None:
        self.pl = pl
        self.replay: Any = None
        self.failed: str | None = None
        self.kls: dict[tuple[str, Any], float] = {}

    def _layer(self, site: AttentionSite) -> int | None:
        """The site's decoder-layer index (``None``: not one MLA converts — ``mla_options``
        refuses the site with its reason)."""
        from slimfx.forms.mla.candidates import site_layer

        try:
            return site_layer(self.pl.model, site)  # type: ignore[arg-type]
        except ValueError:
            return None

    def measure(self, site: AttentionSite) -> Any:
        from slimfx.forms.mla.measured import KL_BATCHES, LayerReplay

        layer = self._layer(site)
        if self.failed is not None or layer is None:
            return None
        if self.replay is None:
            try:
                self.replay = LayerReplay(self.pl.model, first_batches(self.pl.fit_batches,
                                                                       KL_BATCHES))
            except ValueError as e:
                self.failed = str(e)
                return None

        def record(cfg: Any, conv: Any) -> None:
            self.kls[(site.fqn, cfg)] = self.replay.kl(layer, conv)

        return record

    def fit_inputs(self, site: AttentionSite) -> Any:
        """The block's inputs over every calibration batch (one forward up to its layer):
        what ``apply_mla`` fits the conversion on, so the options priced are the blocks
        applied (``None`` for a site MLA refuses)."""
        from slimfx.forms.mla.convert import capture_attention_inputs

        layer = self._layer(site)
        if layer is None:
            return None
        batches = self.pl.fit_batches
        return capture_attention_inputs(self.pl.model, batches, [layer], stop_after=layer)[layer]

    def reprice(self, added: list) -> list:
        from dataclasses import replace

        from slimfx.forms.mla.config import MLAConfig
        from slimfx.forms.mla.measured import KL_BATCHES, rescale

        if self.failed is not None:
            self.pl.notes.append(
                f"MLA options keep the block-error proxy (not measured in the loss): {self.failed}"
            )
        keys = [
            (so.name, o.decision)
            for so in added
            for o in so.options
            if isinstance(o.decision, MLAConfig) and (so.name, o.decision) in self.kls
        ]
        if not keys:
            return added
        proxy = {(so.name, o.decision): o.error for so in added for o in so.options}
        errors, c = rescale([proxy[k] for k in keys], [self.kls[k] for k in keys])
        new = dict(zip(keys, errors))
        self.pl.notes.append(
            f"MLA options priced by the measured KL of converting one block at a time, on "
            f"{KL_BATCHES} calibration batch(es) (forms.mla.measured), times {c:.4g} (the median "
            f"ratio of the block-error proxy to the KL over {len(keys)} options)"
        )
        return [
            replace(so, options=[
                replace(o, error=new[(so.name, o.decision)])
                if (so.name, o.decision) in new else o
                for o in so.options
            ])
            for so in added
        ]  # fmt: skip


def split(plan: Any) -> tuple[Any, dict]:
    """The plan's linear part and its KV decisions (``forms.kv.apply.split_plan``)."""
    from slimfx.forms.kv.apply import split_plan

    return split_plan(plan)


def apply(pl: Planning, decisions: dict) -> list[str]:
    """Apply the attention decisions to ``pl.rewritten``: KV forms (low-rank ones fitted from
    k_proj's Gram), then MLA conversions (fitted on the calibration batches through the
    rewritten model, ``forms.mla.candidates.apply_mla``); an MLA decision the fit completed
    (``rope_share``'s chosen ``rope_kept``) replaces the plan's."""
    from slimfx.forms.kv.apply import apply_kv_plan
    from slimfx.forms.mla.candidates import apply_mla
    from slimfx.forms.mla.config import MLAConfig

    assert pl.rewritten is not None
    mla = {k: d for k, d in decisions.items() if isinstance(d, MLAConfig)}
    kv = {k: d for k, d in decisions.items() if k not in mla}
    grams = {}
    for site in pl.attention_sites:
        k = site.projection("k")
        grams[site.fqn] = pl.stats.fit_gram(k) if pl.stats is not None and k else None
    done = apply_kv_plan(pl.rewritten, kv, pl.attention_sites, grams)
    if mla:
        if not pl.fit_batches:
            raise ValueError("MLA decisions are fitted on calibration data: pass calibration=")
        done += apply_mla(pl.rewritten, pl.attention_sites, mla, pl.fit_batches)
        mods = dict(pl.rewritten.named_modules())
        for fqn, asked in mla.items():  # a shared RoPE choice is made while fitting: the plan
            got = getattr(mods.get(fqn), "mla_config", None)  # records it (rope_kept)
            if got is not None and got != asked and pl.plan is not None:
                pl.plan.decisions[fqn] = got
    return done
