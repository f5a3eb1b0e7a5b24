"""ONNX export of a (rewritten) model and an ONNX Runtime session that runs it.

    res = export_onnx(model, "model.onnx", (ids,))        # ExportResult: op counts, notes, bytes
    ort_model = ort_session("model.onnx", threads=4)
    logits = ort_model(ids)                                 # torch in → torch out; numpy → numpy

How each slimfx form is exported (``slimfx.backends.onnx_ops`` has the translations):

- low-rank → two MatMul (+ Add bias), with ``Vᵀ`` / ``Uᵀ`` stored pre-transposed;
- int4 / int8 weight-only → ``com.microsoft::MatMulNBits`` (block = the largest power of two
  ≥ 16 dividing the group; per-channel groups become blocks with repeated scales), or a dense
  MatMul when no such block exists (noted);
- 2:4 sparse (and 2:4 + low-rank) → a dense MatMul: ONNX Runtime has no 2:4 kernel, so those
  sites ship and run dense, and the notes (and the model's slimfx report) say so;
- int4/int8 + low-rank → MatMulNBits + two MatMul + Add.

Pipeline: ``torch.export`` (Hugging Face causal LMs are called as ``model(input_ids=ids,
use_cache=False).logits``; dynamic batch and sequence axes) → a check that every slimfx op has
a translation (else :class:`OnnxExportError` naming the op and the site) → ``torch.onnx.export``
with the translation table → the fold markers replaced by re-laid-out initializers → save
(external data above 1.5 GB or when asked) → ``onnx.checker.check_model(path)``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.backends import onnx_decode, onnx_ops
from slimfx.backends.onnx_attention import export_attention
from slimfx.backends.onnx_graph import (
    _REPORT_ATTR,
    WRAP,
    OnnxExportError,
    _fold_markers,
    _markers_by_site,
    _rename_axes,
    _site_summary,
    densified_notes,
    export_path,
    inside_save_notes,
    linear_time_rewrites,
    save_graph,
    write_files,
)
from slimfx.backends.ort import OrtModel, ort_session
from slimfx.ir.capture import eval_mode
from slimfx.ir.match import node_module_path
from slimfx.passes.base import PassResult
from slimfx.passes.manager import PassManager, TimingInstrument
from slimfx.planning.shapes import LinearShape

# OrtModel and ort_session live in slimfx.backends.ort; re-exported here for one import line.
__all__ = ["ExportResult", "OnnxExportError", "OrtModel", "export_onnx", "ort_session"]



@dataclass
class ExportResult:
    """What ``export_onnx`` wrote.

    - ``path`` / ``data_path``: the ``.onnx`` file and its external data file (or ``None``).
    - ``file_bytes``: bytes on disk, both files together.
    - ``op_counts``: ONNX op type → count in the saved graph (``MatMulNBits``, ``MatMul``, …).
    - ``sites``: slimfx site FQN → how it was exported (e.g. ``MatMulNBits bits=4 block=32``).
    - ``notes``: sites exported dense and other caveats, one line each.
    - ``report_bytes``: reference bytes (16-bit floats, ``Decision.bytes``) of the rewritten
      sites; ``site_file_bytes``: bytes of the initializers those sites read in the file.
    """

    path: Path
    data_path: Path | None
    file_bytes: int
    op_counts: dict[str, int]
    sites: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    report_bytes: int = 0
    site_file_bytes: int = 0
    seconds: float = 0.0
    accuracy_level: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per export stage

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "data_path": None if self.data_path is None else str(self.data_path),
            "file_bytes": self.file_bytes,
            "op_counts": dict(sorted(self.op_counts.items())),
            "sites": dict(self.sites),
            "notes": list(self.notes),
            "report_bytes": self.report_bytes,
            "site_file_bytes": self.site_file_bytes,
            "seconds": round(self.seconds, 2),
            "accuracy_level": self.accuracy_level,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }

    def __str__(self) -> str:
        keys = ("MatMulNBits", "MatMul", "Gemm", "Add")
        ops = ", ".join(f"{k} {self.op_counts[k]}" for k in keys if self.op_counts.get(k))
        data = f" + {self.data_path.name}" if self.data_path else ""
        lines = [
            f"wrote {self.path}{data}: {self.file_bytes / 1e6:.2f} MB; {ops}; "
            f"{len(self.sites)} slimfx site(s) exported in {self.seconds:.1f} s"
        ]
        if self.sites:
            lines.append(
                f"rewritten sites: {self.site_file_bytes / 1e6:.2f} MB in the file vs "
                f"{self.report_bytes / 1e6:.2f} MB in the report (16-bit reference)"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ capture


class _LogitsOnly(nn.Module):
    """``ids → model(input_ids=ids, use_cache=False).logits`` for a Hugging Face causal LM."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, WRAP, model)

    def forward(self, input_ids: Tensor) -> Tensor:
        out = getattr(self, WRAP)(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]


class _NoCache(nn.Module):
    """``model(*args, use_cache=False)``: a Hugging Face model that keeps a cache (an
    encoder-decoder) returns no cache object the export cannot carry."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        setattr(self, WRAP, model)

    def forward(self, *args: Any) -> Any:
        return getattr(self, WRAP)(*args, use_cache=False)


def _keeps_cache(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "use_cache", None) is not None


@contextmanager
def traceable_experts(model: nn.Module) -> Iterator[None]:
    """Within the block, a Hugging Face mixture-of-experts model runs its experts as batched
    matmuls: its default grouped kernel traces to a custom op ONNX has no function for
    (``transformers::grouped_mm_fallback``). Each config's choice is restored on exit."""
    cfgs = {
        id(c): c
        for m in model.modules()
        if (c := getattr(m, "config", None)) is not None and hasattr(c, "_experts_implementation")
    }
    saved = {k: c._experts_implementation for k, c in cfgs.items()}
    try:
        for c in cfgs.values():
            if c._experts_implementation in (None, "grouped_mm"):
                c._experts_implementation = "batched_mm"
        yield
    finally:
        for k, c in cfgs.items():
            c._experts_implementation = saved[k]


def _is_hf_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM (exported as ids → logits); an encoder-decoder is not one."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and hasattr(model, "generate")
        and not getattr(config, "is_encoder_decoder", False)
    )


def _check_example_fits(model: nn.Module, example_inputs: Sequence[Any]) -> None:
    """Run ``model`` eagerly on ``example_inputs`` once: inputs it cannot take (a wrong
    width, a wrong dtype) raise a ``ValueError`` that blames the inputs, not a later export
    error about a layer."""
    shapes = [
        f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        for t in example_inputs
    ]
    kw = {"use_cache": False} if _is_hf_lm(model) or _keeps_cache(model) else {}
    if _is_hf_lm(model) and len(example_inputs) == 1 and isinstance(example_inputs[0], Tensor):
        if example_inputs[0].dim() == 1:  # ids of one row: the export adds the batch axis too
            example_inputs = (example_inputs[0][None],)
    try:
        with torch.no_grad():
            model(*example_inputs, **kw)
    except Exception as e:  # noqa: BLE001 - any failure here is the inputs' (or the model's)
        raise ValueError(
            f"export_onnx: the example inputs [{', '.join(shapes)}] do not fit the model — "
            f"running it on them fails ({type(e).__name__}: {str(e)[:300]}); pass inputs of "
            "the shape and dtype the model takes"
        ) from e


def _export_program(
    model: nn.Module, example_inputs: Sequence[Any], dynamic: bool, kv_cache: bool = False
) -> tuple[torch.export.ExportedProgram, list[str] | None, list[str] | None, dict[str, str]]:
    """``(program, input names, output names, {dim symbol: axis name})``."""
    hf = _is_hf_lm(model)
    args = tuple(example_inputs)
    if kv_cache and not hf:
        raise OnnxExportError(
            "kv_cache=True exports a Hugging Face causal LM's decode step (a model with a "
            f"config and generate()); {type(model).__name__} is not one"
        )
    if kv_cache:
        return _export_decode_step(model, args, dynamic)
    if hf:
        what = "a Hugging Face causal LM is exported as ids → logits"
        args = (_example_ids(args, dynamic, what),)
        wrapped: nn.Module = _LogitsOnly(model)
        # AUTO, not named dims: torch 2.11's export turns a stride check of the attention into
        # a guard named dims reject; that both axes stay dynamic is checked after the export
        auto = torch.export.Dim.AUTO
        shapes: Any = ({0: auto, 1: auto},) if dynamic else None
        in_names, out_names = ["input_ids"], ["logits"]
    else:
        wrapped = _NoCache(model) if _keeps_cache(model) else model
        in_names = out_names = None
        shapes = None
        if dynamic:  # every axis but a float input's last (its features); ids: all of them
            args = _grown(model, args)
            auto = torch.export.Dim.AUTO
            shapes = tuple(
                {d: auto for d in range(a.dim() - (1 if a.is_floating_point() else 0))}
                if isinstance(a, Tensor) and a.dim() > 1
                else None
                for a in args
            )
            if isinstance(wrapped, _NoCache):  # forward(*args): one entry holding them all
                shapes = (shapes,)
    program = _export_in_eval_mode(model, wrapped, args, shapes)
    names: dict[str, str] = {}
    if hf and dynamic:
        ph = [n for n in program.graph.nodes if n.op == "placeholder"]
        user = [n for n in ph if n.name == "input_ids"] or ph[-1:]
        val = user[0].meta.get("val") if user else None
        if val is not None:
            for axis, dim in zip(("batch", "seq"), val.shape):
                if isinstance(dim, torch.SymInt):
                    names[str(dim)] = axis
                else:  # the ids → logits export (the decode step returned above)
                    raise OnnxExportError(
                        f"the export fixed the {axis} axis of input_ids at {dim} (the model's "
                        "code specializes it), so the ONNX graph would take only that size; "
                        "export with dynamic=False to accept a fixed shape"
                    )
    return program, in_names, out_names, names


def _grown(model: nn.Module, args: tuple) -> tuple:
    """``args`` with a batch axis of 1 repeated to 2 — every tensor input of ≥ 2 dims, when all
    of them have batch 1 — so the export keeps the batch axis dynamic (torch.export fixes an
    axis its example has at size 1); the given ``args`` when the model does not take that."""
    ts = [a for a in args if isinstance(a, Tensor) and a.dim() >= 2]
    if not ts or any(t.shape[0] != 1 for t in ts):
        return args
    grown = tuple(
        a.repeat(2, *([1] * (a.dim() - 1))) if isinstance(a, Tensor) and a.dim() >= 2 else a
        for a in args
    )
    try:
        with torch.no_grad(), eval_mode(model):
            model(*grown, **({"use_cache": False} if _keeps_cache(model) else {}))
    except Exception:  # noqa: BLE001 - a model tied to batch 1 keeps its example
        return args
    return grown


def _example_ids(args: tuple, dynamic: bool, what: str) -> Tensor:
    """The (batch, seq) int64 ids a causal LM export traces with; ``what`` opens the error."""
    if len(args) != 1 or not isinstance(args[0], Tensor) or args[0].is_floating_point():
        raise OnnxExportError(
            f"{what}: pass example_inputs=(ids,) with one integer tensor of shape (batch, seq)"
        )
    ids = args[0].long()
    ids = ids[None] if ids.dim() == 1 else ids
    if dynamic:  # torch.export specializes axes of size 0 and 1: give it ≥ 2 of each
        ids = ids.repeat(2 if ids.shape[0] < 2 else 1, 2 if ids.shape[1] < 2 else 1)
    return ids


def _export_in_eval_mode(
    model: nn.Module, wrapped: nn.Module, args: tuple, shapes: Any
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``wrapped`` (non-strict) with ``model`` in eval mode; every module's
    training flag is restored afterwards, so the user's model is left as it was."""
    with eval_mode(model):
        return torch.export.export(wrapped, args, dynamic_shapes=shapes, strict=False)


def _export_decode_step(
    model: nn.Module, args: tuple, dynamic: bool
) -> tuple[torch.export.ExportedProgram, list[str], list[str], dict[str, str]]:
    """The decode-step graph (``slimfx.backends.onnx_decode``): ids + cache → logits + cache."""
    ids = _example_ids(args, dynamic, "kv_cache=True exports the decode step")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    windows = onnx_decode.model_windows(model)
    past = onnx_decode.empty_past(model.config, ids.shape[0], length=3, dtype=dtype)
    for i in range(len(past)):  # a window layer's own length
        past[i] = past[i][:, :, : onnx_decode.example_past_length(windows.get(i // 2))]
    mask = onnx_decode.example_mask(ids.shape[0], onnx_decode.example_past_length(None)
                                    + ids.shape[1])  # fmt: skip
    wrapped = onnx_decode.DecodeStep(model, WRAP, windows)
    auto = torch.export.Dim.AUTO
    shapes: Any = (
        ({0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in past))
        if dynamic
        else None
    )
    with export_attention(model):  # GQA without expanding the cache (onnx_attention)
        program = _export_in_eval_mode(model, wrapped, (ids, mask, tuple(past)), shapes)
    in_names, out_names = onnx_decode.io_names(wrapped.layers)
    names: dict[str, str] = {}
    if dynamic:
        ph = [n for n in program.graph.nodes if n.op == "placeholder"][-len(in_names):]
        for i, node in enumerate(ph):
            val = node.meta.get("val")
            past = onnx_decode.past_axis(windows.get((i - 2) // 2))
            axes = (("batch", "seq") if i == 0 else ("batch", "total") if i == 1
                    else ("batch", None, past, None))  # fmt: skip
            for axis, dim in zip(axes, () if val is None else val.shape):
                if axis and isinstance(dim, torch.SymInt):
                    names.setdefault(str(dim), axis)
    return program, in_names, out_names, names


def _site_of(node: torch.fx.Node) -> str:
    """Module path of the innermost module ``node`` ran in (the wrapper prefix removed)."""
    fqn = node_module_path(node) or ""
    fqn = fqn.removeprefix(WRAP + ".").removeprefix(WRAP)
    return fqn or "<root>"


def _check_translatable(program: torch.export.ExportedProgram) -> None:
    """Raise :class:`OnnxExportError` naming every slimfx-like op with no ONNX translation."""
    missing = []
    for gm in program.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            t = node.target
            if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
                continue
            if not t.namespace.startswith("slimfx") or onnx_ops.translation_name(t) is not None:
                continue
            why = onnx_ops.why_untranslated(t._schema.name.split("::")[1].removesuffix("_triton"))
            missing.append(f"{t._schema.name} at site {_site_of(node)!r} ({why})")
    if missing:
        known = ", ".join(f"slimfx::{k}" for k in onnx_ops.translations())
        raise OnnxExportError(
            f"no ONNX translation for {len(missing)} slimfx op call(s): "
            + "; ".join(missing)
            + f". Ops with a translation: {known} (and their slimfx_kernels::*_triton twins)."
        )


def _reference_bytes(model: nn.Module, fqns: Sequence[str]) -> int:
    mods = dict(model.named_modules())
    total = 0
    for f in fqns:
        m = mods.get(f)
        d = getattr(m, "decision", None)
        if d is not None and hasattr(m, "in_features"):
            shape = LinearShape(m.in_features, m.out_features)
            total += d.bytes(shape, getattr(m, "bias", None) is not None)
    return total


# ------------------------------------------------------------------------------ export


class _Export:
    """One export as a pipeline: each method is a stage run by the pass manager (whose timing
    instrument fills ``ExportResult.timings``); the object passed between them holds the
    options, and the stages keep what they make on ``self``."""

    def __init__(
        self, model: nn.Module, path: Path, args: tuple, dynamic: bool, kv_cache: bool
    ) -> None:
        self.model, self.path, self.args = model, path, args
        self.dynamic, self.kv_cache = dynamic, kv_cache
        self.data_path: Path | None = None
        self.ir_model: Any = None
        self.how: dict[str, str] = {}
        self.site_bytes: dict[str, int] = {}

    def torch_export(self, opts: dict) -> PassResult:
        with torch.no_grad(), traceable_experts(self.model):
            self.program, self.in_names, self.out_names, self.axis_names = _export_program(
                self.model, self.args, self.dynamic, self.kv_cache
            )
        return PassResult("torch_export", True)

    def check_translatable(self, opts: dict) -> PassResult:
        _check_translatable(self.program)
        return PassResult("check_translatable")

    def to_onnx(self, opts: dict) -> PassResult:
        kwargs: dict[str, Any] = {}
        if opts["opset"] is not None:
            kwargs["opset_version"] = opts["opset"]
        with onnx_ops.accuracy_level(opts["accuracy_level"]), linear_time_rewrites():
            prog = torch.onnx.export(
                self.program,
                (),
                dynamo=True,
                custom_translation_table=onnx_ops.translation_table(),
                input_names=self.in_names,
                output_names=self.out_names,
                optimize=True,
                verbose=False,
                **kwargs,
            )
        self.ir_model = prog.model
        if self.kv_cache:  # the step's window layers, for the drivers (onnx_decode.windows_of)
            windows = onnx_decode.model_windows(self.model)
            self.ir_model.metadata_props.update(onnx_decode.windows_meta(windows))
        return PassResult("to_onnx", True)

    def fold_markers(self, opts: dict) -> PassResult:
        self.markers = markers = _markers_by_site(self.ir_model)
        folded = _fold_markers(self.ir_model.graph)  # every slimfx.fold marker → an initializer
        _rename_axes(self.ir_model, self.axis_names)
        self.how, self.site_bytes = _site_summary(self.ir_model, markers)
        return PassResult("fold_markers", bool(folded))

    def save(self, opts: dict) -> PassResult:
        path = self.path
        names: list[str | None] = []

        def write(tmp: Path) -> None:
            names.append(save_graph(self.ir_model, tmp / path.name, opts["external_data"]))

        # a previous export's external data is stale when this one has none (or another name)
        write_files(path, write, stale=lambda p: p.name == path.name + ".data")
        self.data_path = path.with_name(names[0]) if names[0] else None
        return PassResult("save", True)




def _check_cache_is_16bit(model: nn.Module) -> None:
    """``kv_cache=True`` exports a 16-bit cache: a model whose attention keeps a compressed
    cache (``optimize`` with a KV budget) is refused with where its export lives."""
    from slimfx.forms.kv.cache import kv_forms_of
    from slimfx.forms.mla.module import MLAAttention

    kv = kv_forms_of(model)
    if kv:
        layer, form = next(iter(sorted(kv.items())))
        raise OnnxExportError(
            f"{len(kv)} attention layer(s) keep a compressed KV cache (e.g. layer {layer}: "
            f"{form.short()}); kv_cache=True exports a 16-bit cache — export the decode step "
            "over the compressed cache with slimfx.backends.onnx_kv.export_onnx_kv"
        )
    if any(isinstance(m, MLAAttention) for m in model.modules()):
        raise OnnxExportError(
            "MLA layers cache a latent, not keys and values: export the decode step with "
            "slimfx.backends.onnx_mla.export_mla_onnx"
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Sequence[Any] | Tensor,
    *,
    dynamic: bool = True,
    external_data: bool | None = None,
    opset: int | None = None,
    accuracy_level: int = 0,
    kv_cache: bool = False,
) -> ExportResult:
    """Export ``model`` (dense or rewritten by slimfx) to ONNX at ``path``.

    - ``example_inputs``: positional inputs of one call; a Hugging Face causal LM takes
      ``(ids,)`` and is exported as ``input_ids → logits`` (``use_cache=False``).
    - ``kv_cache``: export a causal LM's decode step instead, ``input_ids, past_key_i,
      past_value_i → logits, present_key_i, present_value_i`` (``slimfx.backends.onnx_decode``):
      one graph for prefill (empty cache) and per-token decode; :class:`OrtModel` runs it
      (``step``, ``generate``).
    - ``dynamic``: batch and sequence axes of a causal LM (of other models' inputs, every
      axis of an integer input — token ids — and all but the last of a float one) stay
      symbolic where the model allows, so one file serves any batch and length.
    - ``external_data``: weights in ``<path>.data``; ``None`` = only above 1.5 GB of weights.
    - ``opset``: the default-domain opset (torch's default when ``None``).
    - ``accuracy_level``: MatMulNBits' compute accuracy (0 = float compute, the reference's
      numerics; 4 = int8 activations, faster on CPU, less exact).

    Raises :class:`OnnxExportError` when a slimfx op has no translation (naming the op and the
    site) or the model holds bfloat16 weights (ONNX Runtime's CPU provider has no bfloat16
    MatMul; call ``model.float()`` first). When the model carries a slimfx report
    (``slimfx.report_of``), the export notes are appended to it and every rewritten site's
    entry gets ``extra["onnx"]``.
    """
    t0 = time.perf_counter()
    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    bf16 = [n for n, p in model.named_parameters() if p.dtype == torch.bfloat16]
    if bf16:
        raise OnnxExportError(
            f"{len(bf16)} bfloat16 parameter(s) (e.g. {bf16[0]}): onnxruntime's CPU provider has "
            "no bfloat16 MatMul / MatMulNBits; export model.float() (or .half()) instead"
        )
    _check_example_fits(model, example_inputs)
    onnx_ops.check_accuracy_level(accuracy_level)
    if kv_cache and not dynamic:
        raise ValueError(
            "kv_cache=True needs dynamic=True: the decode step's cache grows by a token each "
            "step (a static graph would fix its length at the example's)"
        )
    if kv_cache:
        _check_cache_is_16bit(model)
    run = _Export(model, export_path(path), tuple(example_inputs), dynamic, kv_cache)
    timing = TimingInstrument()
    stages = [run.torch_export, run.check_translatable, run.to_onnx, run.fold_markers, run.save]
    PassManager(stages, [timing]).run(
        {"opset": opset, "accuracy_level": accuracy_level, "external_data": external_data}
    )
    path, data_path, ir_model, how, site_bytes = (
        run.path, run.data_path, run.ir_model, run.how, run.site_bytes
    )
    counts = Counter(n.op_type for n in ir_model.graph.all_nodes())
    notes = densified_notes(run.markers) + inside_save_notes(path)
    float_dtypes = {str(p.dtype) for p in model.parameters() if p.is_floating_point()}
    if "torch.float32" in float_dtypes and how:
        notes.append(
            "floats are stored in float32 in the file (4 bytes) where the report prices 16-bit "
            "(2 bytes): low-rank factors, scales and biases take twice the report's bytes"
        )
    file_bytes = path.stat().st_size + (data_path.stat().st_size if data_path else 0)
    result = ExportResult(
        path=path,
        data_path=data_path,
        file_bytes=file_bytes,
        op_counts=dict(counts),
        sites=how,
        notes=notes,
        report_bytes=_reference_bytes(model, list(how)),
        site_file_bytes=sum(site_bytes.values()),
        seconds=time.perf_counter() - t0,
        accuracy_level=accuracy_level,
        timings=dict(timing.timings),
    )
    result.notes.extend(_pricing_mismatch(model, accuracy_level))
    _annotate_report(model, result)
    return result


def _pricing_mismatch(model: nn.Module, accuracy_level: int) -> list[str]:
    """A note when the model's plan was priced with ONNX Runtime timings measured at another
    MatMulNBits accuracy level than this export uses (its int8 kernel differs most)."""
    rep = getattr(model, _REPORT_ATTR, None)
    cache = getattr(rep, "meta", {}).get("latency_cache") or {}
    levels = cache.get("accuracy_level")
    if not levels or accuracy_level in levels:
        return []
    return [
        f"the plan was priced with ONNX Runtime timings at accuracy_level "
        f"{'/'.join(map(str, levels))} ({cache.get('file')}) but this export uses "
        f"accuracy_level {accuracy_level}: its speed may differ from the report's estimate "
        "(int8 MatMulNBits most of all) — export with the measured level"
    ]


def _annotate_report(model: nn.Module, result: ExportResult) -> None:
    """Append the export's notes to the model's slimfx report, if it has one."""
    rep = getattr(model, _REPORT_ATTR, None)
    if rep is None or not hasattr(rep, "notes"):
        return
    rep.notes.append(
        f"onnx export {result.path.name}: {result.file_bytes / 1e6:.2f} MB on disk; rewritten "
        f"sites {result.site_file_bytes / 1e6:.2f} MB in the file vs "
        f"{result.report_bytes / 1e6:.2f} MB reference; ops "
        + ", ".join(f"{k} {v}" for k, v in sorted(result.op_counts.items()) if "MatMul" in k)
    )
    rep.notes.extend(f"onnx: {n}" for n in result.notes)
    if isinstance(getattr(rep, "timings", None), dict):
        rep.timings.update({f"onnx:{k}": v for k, v in result.timings.items()})
    for entry in getattr(rep, "sites", []):
        if entry.fqn in result.sites:
            entry.extra["onnx"] = result.sites[entry.fqn]
