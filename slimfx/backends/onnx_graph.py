"""Edits of the exported ONNX IR graph: fold slimfx's ``slimfx.fold`` markers into the
initializers they compute, name the dynamic axes, and summarize what each site became (op types,
file bytes). Used by ``slimfx.backends.onnx.export_onnx``'s pipeline."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from slimfx import files
from slimfx.backends import onnx_ops

__all__ = ["OnnxExportError", "WRAP", "write_files"]

WRAP = "slimfx_wrapped"  # attribute name of the wrapped model inside the export wrapper


class OnnxExportError(ValueError):
    """The model cannot be exported to ONNX as it is (the message says where and why)."""


_REPORT_ATTR = "slimfx_report"  # where slimfx.optimize leaves its report (slimfx.api)


def export_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as the file an export writes, checked before the (slow) export: not a
    directory, in a directory that exists."""
    out = Path(os.path.expanduser(path))
    if out.is_dir():
        raise OnnxExportError(f"{out} is a directory: give the path of the .onnx file to write")
    if not out.parent.is_dir():
        raise OnnxExportError(f"{out.parent} does not exist: create it, or write elsewhere")
    return out


def inside_save_notes(path: Path) -> list[str]:
    """A note when ``path`` lies in a folder ``slimfx.save`` wrote: a later save there replaces
    the whole folder (and refuses to without ``overwrite``, naming this file)."""
    if not (path.parent / "slimfx.json").is_file():
        return []
    return [
        f"{path.name} is inside the slimfx save {path.parent}: a later slimfx.save there "
        "replaces the whole folder, this export included — keep exports beside it"
    ]


@contextlib.contextmanager
def linear_time_rewrites() -> Iterator[None]:
    """Within the block, the exporter's optimizer (``torch.onnx.export(optimize=True)``: the
    onnxscript rewriter's default rules) runs without its rules of several output nodes: those
    are matched by trying each candidate node against every node of the graph (``SlicesSplit``:
    two ``Slice`` of one tensor → a ``Split``), quadratic in the graph's size — on a 30-layer
    decode step with a low-rank KV cache most of the export's time. The rule never matched in
    slimfx's graphs (no ``Split`` in any export, with or without it), so they come out the
    same. Left as it is where the onnxscript version has no such rule list."""
    try:
        from onnxscript import rewriter
    except ImportError:  # pragma: no cover - the exports need onnxscript anyway
        yield
        return
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(rules, tuple):
        yield
        return

    def single_output(rule: Any) -> bool:
        pattern = getattr(rule, "_target_pattern", None)
        return len(getattr(pattern, "output_nodes", ())) <= 1

    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if single_output(r))
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


#: weights above this many bytes go to ``<file>.data`` (protobuf's limit is 2 GB)
EXTERNAL_DATA_THRESHOLD = 1_500_000_000


def save_graph(ir_model: Any, path: Path, external: bool | None = None) -> str | None:
    """Write ``ir_model`` at ``path`` (a fresh folder: no old data file to append to), its
    weights in ``<name>.data`` beside it when ``external`` (``None``: above
    ``EXTERNAL_DATA_THRESHOLD``), and check it; returns the data file's name or ``None``."""
    import onnx
    import onnx_ir as ir

    weight_bytes = sum(
        int(v.const_value.nbytes)
        for v in ir_model.graph.initializers.values()
        if v.const_value is not None
    )
    use = weight_bytes > EXTERNAL_DATA_THRESHOLD if external is None else external
    name = path.name + ".data" if use else None
    ir.save(ir_model, path, external_data=name)
    onnx.checker.check_model(str(path))
    return name


def write_files(
    path: Path, write: Callable[[Path], Any], stale: Callable[[Path], bool] | None = None
) -> None:
    """Write one export's files: ``write(tmp)`` puts them, under their final names, in a fresh
    temporary directory next to ``path`` (a failure or interrupt there leaves the folder as it
    was); then each file is flushed and moved into ``path.parent`` by an atomic rename,
    ``path`` itself last. No file is ever truncated or half-written; only an interrupt between
    two of the renames can leave new companions (external data, flush graphs) beside the old
    ``path`` — the KV decoder checks each flush graph's recorded form against its step graph.
    ``stale(p)``: true for a file of ``path.parent`` that a previous export of ``path`` wrote
    and this one does not (its external data, an extra flush graph); those are removed once
    the new set is in place."""
    tmp = files.tmp_dir(path)
    try:
        write(tmp)
        done = sorted((p for p in tmp.iterdir()), key=lambda p: p.name == path.name)
        for f in done:
            files.fsync(f)
        for f in done:
            os.replace(f, path.parent / f.name)
        files.fsync(path.parent)
    finally:
        files.discard(tmp)
    if stale is not None:
        kept = {f.name for f in done}
        for old in path.parent.iterdir():
            if old.name not in kept and old.is_file() and stale(old):
                old.unlink()


# ------------------------------------------------------------------------- graph passes


def _const(value: Any, marker: Any) -> np.ndarray:
    if value.const_value is None or value.producer() is not None:
        raise OnnxExportError(
            f"{marker.op_type} at {marker.name}: input {value.name!r} is not a constant "
            "initializer; slimfx weights must be parameters or buffers of the model"
        )
    return np.asarray(value.const_value.numpy())


def _fold_markers(graph: Any) -> Counter[str]:
    """Replace every ``slimfx.fold`` marker by the initializer it computes; count them."""
    import onnx_ir as ir

    folded: Counter[str] = Counter()
    used_names = {v.name for v in graph.initializers.values()}
    for node in list(graph):
        if node.domain != onnx_ops.FOLD_DOMAIN:
            continue
        fn, suffix = onnx_ops.FOLDERS[node.op_type]
        ins = [None if v is None else _const(v, node) for v in node.inputs]
        attrs = {k: a.value for k, a in node.attributes.items()}
        arr = fn(ins, attrs)
        base = node.inputs[0].name + suffix
        name, k = base, 1
        while name in used_names:
            name, k = f"{base}.{k}", k + 1
        used_names.add(name)
        tensor = ir.tensor(arr, name=name)
        init = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
        init.const_value = tensor
        graph.register_initializer(init)
        node.outputs[0].replace_all_uses_with(init)
        graph.remove(node, safe=True)
        folded[node.op_type] += 1
    for name in [
        n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()
    ]:
        del graph.initializers[name]
    return folded


def _rename_axes(model: Any, names: Mapping[str, str]) -> None:
    """Give the dynamic axes readable names (``batch``, ``seq``) wherever they appear."""
    import onnx_ir as ir

    if not names:
        return

    def fix(v: Any) -> None:
        if v is None or v.shape is None:
            return
        dims = [
            ir.SymbolicDim(names[d.value])
            if isinstance(d, ir.SymbolicDim) and d.value in names
            else d
            for d in v.shape
        ]
        v.shape = ir.Shape(dims)

    g = model.graph
    for v in [*g.inputs, *g.outputs]:
        fix(v)
    for node in g:
        for v in node.outputs:
            fix(v)


def _fqn_of(node: Any) -> str | None:
    """Site FQN of an ONNX node that a slimfx op translation made, else ``None``."""
    hier = node.metadata_props.get("pkg.torch.onnx.class_hierarchy", "")
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
    if not hier.strip("[]").rsplit(",", 1)[-1].strip(" '\"").startswith("slimfx"):
        return None
    # cumulative module paths, outermost first, then the op's own scope:
    # ['', 'slimfx_wrapped', 'slimfx_wrapped.model', …, '<site fqn>', 'lowrank_linear']
    parts = [p.strip(" '\"") for p in scopes.strip("[]").split(",")]
    fqn = parts[-2] if len(parts) >= 2 else ""
    fqn = fqn.removeprefix(WRAP + ".").removeprefix(WRAP)
    return fqn or "<root>"


def _describe(nodes: list[Any]) -> str:
    """How a site was exported, from its ONNX nodes (``MatMulNBits bits=4 block=32 + 2×MatMul``)."""
    types = Counter(n.op_type for n in nodes)
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    parts = []
    for n in nbits:
        a = n.attributes
        parts.append(f"MatMulNBits bits={a['bits'].value} block={a['block_size'].value}")
    mm = types.get("MatMul", 0)
    if mm:
        parts.append(f"{mm}×MatMul")
    return " + ".join(parts) or ", ".join(types)


def _site_summary(
    model: Any, markers: dict[str, list[str]]
) -> tuple[dict[str, str], dict[str, int]]:
    """Per site: how it was exported and the bytes of the initializers its nodes read."""
    by_site: dict[str, list[Any]] = {}
    for node in model.graph:
        fqn = _fqn_of(node)
        if fqn is not None:
            by_site.setdefault(fqn, []).append(node)
    how: dict[str, str] = {}
    nbytes: dict[str, int] = {}
    for fqn, nodes in by_site.items():
        desc = _describe(nodes)
        if "Dense24T" in markers.get(fqn, []):
            desc = "dense MatMul (2:4 densified: onnxruntime has no 2:4 kernel)"
        elif "DequantT" in markers.get(fqn, []):
            desc = "dense MatMul (quantized weight densified: no MatMulNBits block fits the group)"
        how[fqn] = desc
        seen = {v.name: v for n in nodes for v in n.inputs if v is not None and v.is_initializer()}
        nbytes[fqn] = sum(
            int(v.const_value.nbytes) for v in seen.values() if v.const_value is not None
        )
    return how, nbytes


def densified_notes(markers: dict[str, list[str]]) -> list[str]:
    """The notes for sites a graph exports dense (``_markers_by_site`` before the fold): 2:4
    (no ONNX Runtime kernel) and quantized groups no ``MatMulNBits`` block fits."""
    notes = []
    d24 = sorted(f for f, m in markers.items() if "Dense24T" in m)
    deq = sorted(f for f, m in markers.items() if "DequantT" in m and f not in d24)
    if d24:
        notes.append(
            f"exported dense: onnxruntime has no 2:4 kernel — {len(d24)} site(s): "
            + ", ".join(d24)
        )
    if deq:
        notes.append(
            f"exported dense: no power-of-two MatMulNBits block ≥ 16 divides the group — "
            f"{len(deq)} site(s): " + ", ".join(deq)
        )
    return notes


def annotate_notes(model: Any, path: Path, notes: list[str]) -> None:
    """Append an export's notes to the model's slimfx report, if it has one (as
    ``export_onnx`` does), naming the file."""
    rep = getattr(model, _REPORT_ATTR, None)
    if rep is not None and hasattr(rep, "notes"):
        rep.notes.extend(f"onnx {path.name}: {n}" for n in notes)


def _markers_by_site(model: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node in model.graph:
        if node.domain == onnx_ops.FOLD_DOMAIN:
            out.setdefault(_fqn_of(node) or "<root>", []).append(node.op_type)
    return out
