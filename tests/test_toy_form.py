"""A form registered from this file alone (no library file edited): a toy "scaled" linear,
W ≈ s · (q − 128) with int8 codes q and one 16-bit scale s per row.

The solver is offered it through its family and picks it, the swap applies it, the report shows
it; the ONNX export and the Triton lowering refuse it, each with the reason the form gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import slimfx
from slimfx import forms
from slimfx.backends import capabilities
from slimfx.backends.triton_lowering import lower_graph, lower_to_triton
from slimfx.cost.families import Candidate, SiteContext
from slimfx.ir.find import discover_linear_sites
from slimfx.ir.modules import SlimLinear
from slimfx.numerics import relative_output_error
from slimfx.passes import apply_plan
from slimfx.passes.base import Rule
from slimfx.planning.configs import Decision
from slimfx.planning.plan import Plan
from slimfx.planning.shapes import LinearShape

KIND = "toy_scaled"
NO_ONNX = "toy form: no ONNX translation (a test form)"
NO_TRITON = "toy form: no Triton kernel (a test form)"


@torch.library.custom_op("slimfx::toy_scaled_linear", mutates_args=())
def toy_scaled_linear(
    x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``x @ (s · (q − 128))ᵀ + b``."""
    w = (codes.to(torch.float32) - 128.0) * scale.to(torch.float32)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


@toy_scaled_linear.register_fake
def _(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@dataclass(frozen=True)
class ScaledConfig(Decision):
    """int8 codes with one scale per row (a toy: the quant form already covers it)."""

    kind: ClassVar[str] = KIND

    def storage(self, shape: LinearShape) -> tuple[int, int]:
        return shape.out_features, shape.numel  # the scales (16-bit), the codes (1 byte each)

    def flops(self, shape: LinearShape, tokens: int = 1) -> int:
        return 2 * tokens * shape.numel

    def launches(self) -> int:
        return 1


def factorize_scaled(weight: Tensor, decision: Decision, gram: Tensor | None) -> dict[str, Tensor]:
    w = weight.detach().to(torch.float32)
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12).to(weight.dtype)
    q = torch.round(w / scale.to(torch.float32)).clamp(-127, 127) + 128
    return {"codes": q.to(torch.uint8), "scale": scale}


def reconstruct_scaled(decision: Decision, tensors: dict[str, Tensor]) -> Tensor:
    return (tensors["codes"].to(torch.float32) - 128) * tensors["scale"].to(torch.float32)


class ScaledLinear(SlimLinear):
    decision_kind = KIND

    def __init__(
        self,
        decision: ScaledConfig,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(decision, in_features, out_features)
        u8 = {"dtype": torch.uint8, "device": device}
        self.register_buffer("codes", torch.zeros(out_features, in_features, **u8))
        self.scale = nn.Parameter(torch.ones(out_features, 1, dtype=dtype, device=device))
        self._init_bias(bias, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return toy_scaled_linear(x, self.codes, self.scale, self.bias)


class LinearToScaled(Rule):
    kind = KIND
    name = "LinearToScaled"

    def op_call(self, decision: Decision, tensors: dict[str, Tensor]):  # noqa: ANN201
        return torch.ops.slimfx.toy_scaled_linear.default, ["codes", "scale"], {}


def scaled_candidates(ctx: SiteContext) -> list[Candidate]:
    d = ScaledConfig()
    approx = reconstruct_scaled(d, factorize_scaled(ctx.weight, d, None))
    return [Candidate(d, relative_output_error(ctx.weight, approx, ctx.gram), "toy")]


TOY = forms.Form(
    kind=KIND,
    config=ScaledConfig,
    label="scaled (toy)",
    colour="#17becf",
    op=toy_scaled_linear,
    factorize=factorize_scaled,
    reconstruct=reconstruct_scaled,
    module=ScaledLinear,
    rule=LinearToScaled(),
    onnx_translation=forms.NotSupported(NO_ONNX),
    onnx_probe=forms.NotSupported(NO_ONNX),
    triton_lowering=forms.NotSupported(NO_TRITON),
    kernels=forms.NotSupported(NO_TRITON),
    timed=forms.NotSupported("toy form: not timed"),
    families={KIND: scaled_candidates},
)


@pytest.fixture(scope="module")
def registered():
    slimfx.register_form(TOY)
    yield TOY
    forms.unregister_form(KIND)


@pytest.fixture(scope="module")
def optimized(registered):  # noqa: ANN001
    from slimfx.models import tiny_llama

    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, 256, (1, 32), generator=g) for _ in range(4)]
    model = tiny_llama()
    new = slimfx.optimize(model, 0.6, calibration=calib, families=(KIND,), progress=False)
    return model, new, calib


def test_the_solver_picks_it_and_the_swap_applies_it(optimized) -> None:  # noqa: ANN001
    model, new, calib = optimized
    rep = slimfx.report_of(new)
    applied = [s for s in rep.sites if s.status == "applied"]
    assert applied and {s.decision["kind"] for s in applied} == {KIND}
    swapped = [m for m in new.modules() if isinstance(m, ScaledLinear)]
    assert len(swapped) == rep.totals["rewritten"] == len(applied)
    assert rep.totals["bytes_after"] <= 0.6 * rep.totals["bytes_before"] + 1
    # priced bytes are the stored ones: 1 byte per code + a 16-bit scale per row (+ bias)
    for s in applied:
        m = new.get_submodule(s.fqn)
        stored = (
            m.codes.numel()
            + 2 * m.scale.numel()
            + (2 * m.bias.numel() if m.bias is not None else 0)
        )
        assert s.bytes_after == stored
    with torch.no_grad():
        ref, got = model(calib[0]).logits, new(calib[0]).logits
    # int8 per-row codes: the logits move by well under 1% of their scale
    assert (got - ref).abs().max() <= 0.01 * ref.abs().max()


def test_the_report_shows_it(optimized, tmp_path) -> None:  # noqa: ANN001
    _, new, _ = optimized
    rep = slimfx.report_of(new)
    assert KIND in str(rep) and KIND in rep.to_markdown()
    assert rep.plot(tmp_path / "r.png").stat().st_size > 0
    from slimfx.report import _form_styles

    colours, labels = _form_styles()
    assert colours[KIND] == "#17becf" and labels[KIND] == "scaled (toy)"


def test_onnx_export_refuses_it_with_the_forms_reason(optimized, tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("onnxscript")
    from slimfx.backends.onnx import OnnxExportError, export_onnx

    _, new, calib = optimized
    with pytest.raises(
        OnnxExportError, match=r"slimfx::toy_scaled_linear at site .*" + re.escape(NO_ONNX)
    ):
        export_onnx(new, tmp_path / "m.onnx", (calib[0][:, :8],))
    site = next(s for s in discover_linear_sites(nn.Linear(64, 32)))
    ok, why = capabilities.supports("onnx", site, ScaledConfig())
    assert not ok and why == f"no ONNX translation for decision kind {KIND!r}: {NO_ONNX}"
    assert capabilities.supports("eager", site, ScaledConfig()) == (
        True,
        "slimfx::toy_scaled_linear (CPU reference)",
    )


def test_triton_lowering_refuses_it_with_the_forms_reason(registered, monkeypatch) -> None:  # noqa: ANN001
    lin = nn.Sequential(nn.Linear(64, 32))
    sites = discover_linear_sites(lin)
    model, _ = apply_plan(lin, Plan({"0": ScaledConfig()}), sites)
    assert isinstance(model[0], ScaledLinear)
    _, res = lower_to_triton(model)
    (rec,) = res.records
    assert rec.status == "fallback"
    assert rec.reason == f"no Triton-lowered form of ScaledLinear: {NO_TRITON}"
    assert type(model[0]) is ScaledLinear  # left as it was
    gm = torch.export.export(model, (torch.randn(2, 64),)).module()
    _, res = lower_graph(gm)
    (rec,) = res.records
    assert rec.status == "fallback"
    assert rec.reason == f"no Triton lowering for slimfx::toy_scaled_linear: {NO_TRITON}"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = capabilities.supports("triton", sites[0], ScaledConfig(), device="cpu")
    assert not ok and why == f"triton: {NO_TRITON}"


def test_a_plan_naming_it_round_trips_and_a_second_form_is_refused(registered) -> None:  # noqa: ANN001
    plan = Plan({"0": ScaledConfig()}, shapes={"0": (32, 64)})
    assert Plan.from_json(plan.to_json())["0"] == ScaledConfig()
    assert forms.register_form(TOY) is TOY  # the same object again: nothing changes
    other = forms.Form(
        **{
            **{k: getattr(TOY, k) for k in forms.Form.__dataclass_fields__ if k != "_cache"},
            "families": {},
        }
    )
    with pytest.raises(ValueError, match=f"decision kind {KIND!r} already has a registered form"):
        forms.register_form(other)
