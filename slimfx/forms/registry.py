"""The form registry: one :class:`Form` per decision kind, the one place every layer looks a
kind up.

A form gathers everything a decision kind needs: its config class (bytes, FLOPs, launches,
storage and whether it needs calibration statistics: methods of the config), its numerics
(factorize / reconstruct), the slimfx op and module that run it, the rule that applies it, its
ONNX translation and capability probe, its Triton lowering and kernels, the candidate families
that offer it, the layouts ``calibrate-target`` times, and its report label and colour.

**Pieces from higher layers are named, not imported.** A piece is either the object itself
or a reference ``"package.module:attribute"`` resolved (imported) the first time a layer asks
for it, so this package imports nothing above ``slimfx.planning`` and every layer may import
it. A layer asks only for pieces of its own layer or below (numerics: factorize; ir: module;
passes: rule; backends: ONNX, Triton, kernels; cost: families, timed layouts). A piece a form
does not have is :class:`NotSupported` with the reason, which is what a backend reports.

Unknown kinds raise :class:`UnknownFormError` (a ``KeyError`` whose message names the kind and
the registered ones), so no layer prices, builds or exports a kind it does not know.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from slimfx.planning.configs import DECISIONS, Decision

__all__ = [
    "Form",
    "NotSupported",
    "UnknownFormError",
    "PIECES",
    "register_form",
    "unregister_form",
    "form_of",
    "forms",
    "form_of_op",
    "resolve",
]


class UnknownFormError(KeyError):
    """A lookup of a decision kind (or op) no registered form has."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class NotSupported:
    """A piece a form does not have, and why (what a backend or a caller reports)."""

    reason: str

    def __post_init__(self) -> None:
        if not self.reason:
            raise ValueError("NotSupported needs a reason")


#: a piece: the object, a ``"module:attribute"`` reference, or ``NotSupported(reason)``
Piece = Any

#: names of the pieces every form must give (an object, a reference or ``NotSupported``).
PIECES: tuple[str, ...] = (
    "op",
    "factorize",
    "reconstruct",
    "module",
    "rule",
    "onnx_translation",
    "onnx_probe",
    "triton_lowering",
    "kernels",
    "timed",
)


def resolve(ref: Piece) -> Any:
    """The object a reference ``"package.module:attr[.attr]"`` names (imported on demand);
    anything else is returned as it is."""
    if not isinstance(ref, str) or ":" not in ref:
        return ref
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True, eq=False)
class Form:
    """Everything one decision kind needs, registered once (see the module docstring).

    - ``kind``, ``config``: the decision kind and its config class (``config.kind == kind``).
    - ``label``, ``colour``: the report's legend label and plot colour (``#rrggbb``).
    - ``op``: the ``torch.library`` custom op the module's forward calls (its ``CustomOpDef``,
      or a reference to it: ``"slimfx.ir.ops_quant:quant_linear"``, whose attribute name is the
      op's name).
    - ``native``: non-empty for a form that *is* a torch layer (dense: ``"nn.Linear"``): it has
      no module, op, rule, lowering or translation of its own, and every backend runs it.
    - ``factorize(weight, decision, gram) -> tensors``; ``reconstruct(decision, tensors) -> W``.
    - ``module``: the ``SlimLinear`` subclass; ``rule``: the ``Rule`` instance.
    - ``onnx_translation``: the onnxscript translation of ``op``; ``onnx_probe(site, decision)
      -> (ok, reason)``: whether the exported graph runs it compressed.
    - ``triton_lowering``: the ``triton_lowering.TritonLowering`` of ``op``; ``kernels``: the
      ``kernels.Kernel`` list of ``op`` in order of preference.
    - ``families``: candidate family name → ``(SiteContext) -> [Candidate]``.
    - ``timed(in_features, out_features) -> [Decision]``: the layouts ``calibrate-target``
      times by default for this form (``[]``: none).
    - ``site_kind``: the kind of site its decisions apply to and are priced against
      (``"linear"``: a ``LinearShape``; ``"attention"``: an ``AttentionShape``).
    - ``kernel_op``: for a form with no slimfx op of its own whose kernels run inside a cache
      or an attention module (``kv_attention``, ``mla_decode``), the op name its kernels
      implement, so :func:`form_of_op` (and ``slimfx.kernels.kernels_of``) find them.
    """

    kind: str
    config: type[Decision]
    label: str
    colour: str
    op: Piece
    factorize: Piece
    reconstruct: Piece
    module: Piece
    rule: Piece
    onnx_translation: Piece
    onnx_probe: Piece
    triton_lowering: Piece
    kernels: Piece
    timed: Piece
    families: Mapping[str, Piece] = field(default_factory=dict)
    native: str = ""
    site_kind: str = "linear"
    kernel_op: str = ""
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.config.kind != self.kind:
            raise ValueError(
                f"form {self.kind!r}: its config {self.config.__name__} has kind "
                f"{self.config.kind!r}"
            )
        for name in PIECES:
            if getattr(self, name) is None:
                raise ValueError(
                    f"form {self.kind!r}: piece {name!r} is None; give it, or "
                    "NotSupported(reason) saying why the form has none"
                )

    def has(self, piece: str) -> bool:
        """Whether the form gives ``piece`` (not ``NotSupported``)."""
        return not isinstance(self._raw(piece), NotSupported)

    def why_not(self, piece: str) -> str:
        """The ``NotSupported`` reason of ``piece`` ('' when the form has it)."""
        raw = self._raw(piece)
        return raw.reason if isinstance(raw, NotSupported) else ""

    def get(self, piece: str) -> Any:
        """The piece, resolved; a ``NotImplementedError`` with the reason when the form has
        none."""
        raw = self._raw(piece)
        if isinstance(raw, NotSupported):
            raise NotImplementedError(f"form {self.kind!r} has no {piece}: {raw.reason}")
        if piece not in self._cache:
            self._cache[piece] = resolve(raw)
        return self._cache[piece]

    def family(self, name: str) -> Callable[..., Any]:
        """The candidate family ``name`` this form offers, resolved."""
        key = f"family:{name}"
        if key not in self._cache:
            self._cache[key] = resolve(self.families[name])
        return self._cache[key]

    @property
    def op_name(self) -> str | None:
        """The op's name without namespace (``quant_linear``), or ``None`` when it has none."""
        if isinstance(self.op, NotSupported):
            return None
        if isinstance(self.op, str):
            return self.op.rpartition(":")[2].rpartition(".")[2]
        return str(getattr(self.op, "_name", None) or getattr(self.op, "__name__", ""))

    def op_packet(self) -> Any:
        """``torch.ops.<namespace>.<name>`` of the op (registering it first)."""
        op = self.get("op")
        qualname = getattr(op, "_qualname", None)
        if qualname is None:
            raise TypeError(f"form {self.kind!r}: op {op!r} is not a torch.library custom op")
        import torch

        namespace, _, name = qualname.partition("::")
        return getattr(getattr(torch.ops, namespace), name)

    def needs_gram(self, decision: Decision) -> bool:
        """Whether realizing ``decision`` (of this form) uses calibration statistics."""
        self._check(decision)
        return decision.needs_gram()

    def _check(self, decision: Decision) -> None:
        if not isinstance(decision, self.config):
            raise TypeError(
                f"form {self.kind!r} takes {self.config.__name__}, got {type(decision).__name__}"
            )

    def _raw(self, piece: str) -> Piece:
        if piece not in PIECES:
            raise ValueError(f"unknown form piece {piece!r}; pieces: {', '.join(PIECES)}")
        return getattr(self, piece)


_FORMS: dict[str, Form] = {}


def register_form(form: Form, *, replace: bool = False) -> Form:
    """Register ``form`` for its kind (its config class too, so plans naming the kind load).

    A second form for a kind already registered is a ``ValueError`` unless ``replace``."""
    if form.kind in _FORMS and _FORMS[form.kind] is not form and not replace:
        raise ValueError(f"decision kind {form.kind!r} already has a registered form")
    known = DECISIONS.get(form.kind)
    if known is not None and known is not form.config and not replace:
        raise ValueError(
            f"decision kind {form.kind!r} is already the config {known.__name__}, not "
            f"{form.config.__name__}"
        )
    for name in form.families:
        for other in _FORMS.values():
            if other.kind != form.kind and name in other.families:
                raise ValueError(f"family {name!r} is already offered by form {other.kind!r}")
    DECISIONS[form.kind] = form.config
    _FORMS[form.kind] = form
    return form


def unregister_form(kind: str) -> None:
    """Remove the form of ``kind`` and its config (for tests that register a toy form)."""
    _FORMS.pop(kind, None)
    DECISIONS.pop(kind, None)


def _unknown(kind: object) -> UnknownFormError:
    return UnknownFormError(
        f"no form registered for decision kind {kind!r}; registered: {', '.join(sorted(_FORMS))}"
    )


def form_of(kind: str | Decision) -> Form:
    """The form of a kind or a decision; :class:`UnknownFormError` names the registered kinds."""
    name = kind.kind if isinstance(kind, Decision) else kind
    try:
        return _FORMS[name]
    except (KeyError, TypeError):
        raise _unknown(name) from None


def forms() -> tuple[Form, ...]:
    """Every registered form, in registration order (the built-in ones first)."""
    return tuple(_FORMS.values())


def form_of_op(op: str) -> Form | None:
    """The form whose op is ``op`` (``"quant_linear"`` or ``"slimfx::quant_linear"``), or
    ``None``."""
    name = op.split("::", 1)[-1]
    for form in _FORMS.values():
        if form.op_name == name or (form.kernel_op and form.kernel_op == name):
            return form
    return None
