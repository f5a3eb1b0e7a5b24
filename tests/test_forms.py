"""The form registry: every registered kind has every piece (or says why not), and every layer
asked about a kind no form has gives a clear error naming it — never a default price."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from slimfx import api, forms
from slimfx.backends import capabilities, onnx_ops, triton_lowering
from slimfx.cost.families import FAMILIES
from slimfx.cost.target import estimate_latency
from slimfx.forms.mla.module import dense_weight
from slimfx.ir.modules import SlimLinear, module_for
from slimfx.ir.sites import LinearSite
from slimfx.kernels import Kernel, kernels_of, select
from slimfx.numerics import factorize, form_error, reconstruct
from slimfx.passes.base import Rule, rule_for
from slimfx.planning.configs import DECISIONS, Decision, LowRankConfig, decision_from_dict
from slimfx.planning.shapes import KV_BYTES_PER_TOKEN, WEIGHT_BYTES, AttentionShape, LinearShape
from slimfx.report import Report, SiteEntry

BUILTIN = ("dense", "lowrank", "quant", "sparse24", "lowrank_quant", "sparse24_lowrank")
REGISTERED = forms.forms()
LINEAR = tuple(f for f in REGISTERED if f.site_kind == "linear")
ATTENTION = tuple(f for f in REGISTERED if f.site_kind == "attention")
ATTENTION_KINDS = ("kv_dense", "kv_quant", "kv_lowrank", "kv_latent_quant", "mla")


def test_every_existing_kind_is_registered_once() -> None:
    kinds = [f.kind for f in REGISTERED]
    assert kinds[: len(BUILTIN)] == list(BUILTIN) and len(set(kinds)) == len(kinds)
    for f in REGISTERED:
        assert DECISIONS[f.kind] is f.config and f.config.kind == f.kind


@pytest.mark.parametrize("form", REGISTERED, ids=lambda f: f.kind)
def test_every_piece_is_there_or_says_why_not(form: forms.Form) -> None:
    for piece in forms.PIECES:
        if form.has(piece):
            assert form.get(piece) is not None, piece
        else:
            assert form.why_not(piece), f"{form.kind}: {piece} is NotSupported without a reason"
            with pytest.raises(NotImplementedError, match=re.escape(form.why_not(piece))):
                form.get(piece)
    assert form.label and re.fullmatch(r"#[0-9a-f]{6}", form.colour)
    for name in form.families:
        assert callable(form.family(name)) and FAMILIES[name] is form.family(name)


@pytest.mark.parametrize("form", LINEAR, ids=lambda f: f.kind)
def test_pieces_agree_with_each_other(form: forms.Form) -> None:
    if form.native:  # dense: torch's own layer; every backend runs it, nothing else to check
        assert not any(form.has(p) for p in ("op", "module", "rule", "onnx_translation"))
        return
    op = form.op_packet()
    assert op is getattr(torch.ops.slimfx, form.op_name)
    module = form.get("module")
    assert issubclass(module, SlimLinear) and module.decision_kind == form.kind
    rule = form.get("rule")
    assert isinstance(rule, Rule) and rule.kind == form.kind
    assert form.has("onnx_translation"), "every built-in op exports (maybe dense)"
    if form.has("triton_lowering"):
        low = form.get("triton_lowering")
        assert low.op == form.op_name and low.reference is module
        assert issubclass(low.lowered, module)
    if form.has("kernels"):
        ks = form.get("kernels")
        assert ks and all(isinstance(k, Kernel) and k.op == form.op_name for k in ks)
        assert kernels_of(form.op_name) == list(ks)


@pytest.mark.parametrize("form", LINEAR, ids=lambda f: f.kind)
def test_every_config_prices_itself(form: forms.Form) -> None:
    d = form.config() if form.kind != "lowrank" else LowRankConfig(4)
    shape = LinearShape(128, 32)
    floats, ints = d.storage(shape)
    assert d.weight_bytes(shape) == 2 * floats + ints > 0
    assert d.costs(shape, bias=True) == {WEIGHT_BYTES: d.weight_bytes(shape) + 2 * 32}
    assert d.flops(shape, 3) > 0 and d.launches() >= 1
    assert isinstance(d.needs_gram(), bool) and isinstance(d.dequantizes, bool)
    assert api.needs_gram(d) == d.needs_gram()
    W = torch.randn(32, 128)
    assert reconstruct(d, factorize(W, d)).shape == W.shape
    err = form_error(W, d)
    assert err == 0.0 if form.kind == "dense" else 0.0 < err < 1.0


@pytest.mark.parametrize("form", [f for f in LINEAR if not f.native], ids=lambda f: f.kind)
def test_a_rewritten_linears_dense_weight_is_what_its_forward_multiplies_by(
    form: forms.Form,
) -> None:
    """``forms.mla.module.dense_weight``: what MLA fits on when a weights budget rewrote the q/o
    projections of a block it converts."""
    d = form.config() if form.kind != "lowrank" else LowRankConfig(4)
    torch.manual_seed(0)
    W, b = torch.randn(32, 128), torch.randn(32)
    m = form.get("module").empty(d, 128, 32, True).load_factors(factorize(W, d), b)
    with torch.no_grad():
        want = (m(torch.eye(128)) - b).T
    got = dense_weight(m)
    assert got.shape == (32, 128) and not torch.allclose(got, W, atol=1e-4)  # not the original
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_dense_weight_of_plain_layers() -> None:
    lin = torch.nn.Linear(8, 4)
    assert dense_weight(lin) is lin.weight
    with pytest.raises(TypeError, match="ReLU is not a linear module"):
        dense_weight(torch.nn.ReLU())


def test_a_linear_form_refuses_another_shape_kind() -> None:
    att = AttentionShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
    for f in LINEAR:
        with pytest.raises(TypeError, match=f"{f.kind!r} prices linear sites .* attention"):
            f.config().weight_bytes(att) if f.kind != "lowrank" else LowRankConfig(2).flops(att)


def test_the_attention_forms_are_registered_with_slimfx_forms() -> None:
    assert tuple(f.kind for f in ATTENTION) == ATTENTION_KINDS
    assert set(REGISTERED) == set(LINEAR) | set(ATTENTION)


@pytest.mark.parametrize("form", ATTENTION, ids=lambda f: f.kind)
def test_attention_form_pieces_agree_and_price_an_attention_shape(form: forms.Form) -> None:
    """An attention form prices an ``AttentionShape`` (both budget dimensions) and refuses a
    linear one; the module swap has no rule for it (the form says what applies it instead);
    its module is a torch module; its kernels are found by the op they implement."""
    from torch import nn

    assert not form.has("rule") and "not rewritten by the module swap" in form.why_not("rule")
    assert not form.has("onnx_translation") and "not yet" in form.why_not("onnx_translation")
    with pytest.raises(KeyError, match=re.escape(form.why_not("rule"))):
        rule_for(form.config())
    if form.has("module"):
        assert issubclass(form.get("module"), nn.Module)
    if form.has("kernels"):
        ks = form.get("kernels")
        assert form.kernel_op and all(isinstance(k, Kernel) and k.op == form.kernel_op for k in ks)
        assert kernels_of(form.kernel_op) == list(ks) and forms.form_of_op(form.kernel_op) is form
    shape = AttentionShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, rope_dim=16)
    d = form.config(16, 16) if form.kind in ("kv_lowrank", "kv_latent_quant") else form.config()
    if form.kind == "mla":
        d = form.config(rank=16, rope_pairs=2)
    costs = d.costs(shape)
    assert set(costs) == {WEIGHT_BYTES, KV_BYTES_PER_TOKEN} and costs[KV_BYTES_PER_TOKEN] > 0
    assert costs[WEIGHT_BYTES] == d.weight_bytes(shape) >= 0
    with pytest.raises(TypeError, match=f"{form.kind!r} prices attention sites .* linear"):
        d.weight_bytes(LinearShape(64, 32))


def test_kernels_of_the_attention_kernel_folders() -> None:
    assert [k.op for k in kernels_of("kv_attention")] == ["kv_attention"]
    assert [k.op for k in kernels_of("mla_decode")] == ["mla_decode"]
    kernel, why = select("kv_attention", torch.zeros(1, 4, 16))  # arguments missing: declined
    assert kernel is None and why and "kv_attention_triton_split" in why[0]


# ------------------------------------------------------------------ a kind no form has


@dataclass(frozen=True)
class Ghost(Decision):
    """A decision config with no form (never registered)."""

    kind: ClassVar[str] = "ghost"


GHOST = Ghost()
SITE = LinearSite("fc", 64, 32, "torch.float32", False, "fc.weight", "fc")
UNKNOWN = r"no form registered for decision kind 'ghost'; registered: dense, kv_dense, kv_"


def test_lookups_of_an_unknown_kind_name_it_and_the_registered_ones() -> None:
    with pytest.raises(forms.UnknownFormError, match=UNKNOWN) as e:
        forms.form_of("ghost")
    assert isinstance(e.value, KeyError) and str(e.value).startswith("no form registered")
    for call in (
        lambda: factorize(torch.randn(4, 8), GHOST),
        lambda: reconstruct(GHOST, {}),
        lambda: module_for(GHOST),
        lambda: rule_for(GHOST),
        lambda: api.needs_gram(GHOST),
    ):
        with pytest.raises(forms.UnknownFormError, match=UNKNOWN):
            call()
    with pytest.raises(ValueError, match="unknown decision kind 'ghost'"):
        decision_from_dict({"kind": "ghost"})


@pytest.mark.parametrize("backend", capabilities.BACKENDS)
def test_every_backend_refuses_an_unknown_kind_clearly(backend: str) -> None:
    with pytest.raises(forms.UnknownFormError, match=UNKNOWN):
        capabilities.supports(backend, SITE, GHOST)


def test_the_cost_model_never_prices_an_unknown_form_by_default() -> None:
    # the old ladder priced an unknown kind as 16-bit with one launch; now the config must say
    for call, what in (
        (lambda: GHOST.weight_bytes(LinearShape(64, 32)), "storage"),
        (lambda: estimate_latency(GHOST, LinearShape(64, 32), False, "cpu", "decode"), "storage"),
        (lambda: GHOST.flops(LinearShape(64, 32)), "flops"),
        (lambda: GHOST.launches(), "launches"),
    ):
        with pytest.raises(
            NotImplementedError, match=f"'ghost' \\(Ghost\\) does not define {what}"
        ):
            call()


def test_kernels_onnx_and_triton_name_what_they_do_not_know() -> None:
    kernel, reasons = select("ghost_linear", torch.zeros(1, 8))
    assert kernel is None and "no kernels registered for op 'ghost_linear'" in reasons[0]
    assert onnx_ops.translation_name(torch.ops.aten.mm.default) is None
    assert "no registered form runs slimfx::ghost_linear" in onnx_ops.why_untranslated(
        "ghost_linear"
    )
    low, why = triton_lowering.lowering_of_op("ghost_linear")
    assert low is None and why.startswith("no Triton lowering for slimfx::ghost_linear")
    low, why = triton_lowering.lowering_of_op("quant_lowrank_linear")
    assert low is None and "no Triton kernel for slimfx::quant_lowrank_linear" in why


def test_a_report_with_an_unregistered_kind_still_plots(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("matplotlib")
    rep = Report(
        sites=[
            SiteEntry("a", (32, 64), decision={"kind": "ghost"}, bytes_before=4, bytes_after=2),
            SiteEntry(
                "b",
                (32, 64),
                decision={"kind": "lowrank", "rank": 2},
                bytes_before=4,
                bytes_after=1,
            ),
        ]
    )
    assert rep.plot(tmp_path / "p.png").stat().st_size > 0


def test_the_plot_gives_kv_owned_projections_their_share_of_the_factors() -> None:
    """k/v projections a low-rank KV cache replaced hold no bytes of their own; the bits panel
    shows the owner's factor bytes split between them by their 16-bit sizes (it drew 0)."""
    from slimfx.report import KVEntry

    owned = {"kind": "kv_lowrank", "rank": 8}
    rep = Report(
        sites=[
            SiteEntry("q", (64, 64), decision={"kind": "int8"}, bytes_before=800, bytes_after=400),
            SiteEntry("k", (32, 64), chosen="owned by attn", decision=owned, bytes_before=400),
            SiteEntry("v", (16, 64), chosen="owned by attn", decision=owned, bytes_before=200),
        ],
        kv_sites=[KVEntry("attn", weight_bytes_after=150, owns=["k", "v"])],
    )
    assert rep._bits_per_weight() == [8.0, 16 * 100 / 400, 16 * 50 / 200]


def test_registering_twice_or_with_a_mismatched_config_is_refused() -> None:
    lowrank = forms.form_of("lowrank")
    with pytest.raises(ValueError, match="'lowrank' already has a registered form"):
        forms.register_form(forms.Form(**{**_fields(lowrank), "families": {}}))
    with pytest.raises(ValueError, match="its config LowRankConfig has kind 'lowrank'"):
        forms.Form(**{**_fields(lowrank), "kind": "other"})
    with pytest.raises(ValueError, match="piece 'rule' is None"):
        forms.Form(**{**_fields(lowrank), "rule": None})
    with pytest.raises(ValueError, match="NotSupported needs a reason"):
        forms.NotSupported("")


def _fields(form: forms.Form) -> dict:
    from dataclasses import fields

    return {f.name: getattr(form, f.name) for f in fields(form) if f.name != "_cache"}
