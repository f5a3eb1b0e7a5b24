"""Capture: a trained ``nn.Module`` → a torch.export graph whose nodes know their module path.

``capture(model, args, kwargs)`` runs ``torch.export.export`` (non-strict by default; Hugging
Face causal LMs included, called as ``kwargs={"input_ids": ids, "use_cache": False}``) and
stamps ``meta["slimfx.fqn"]`` on every ``call_function`` node: the dotted path of the innermost
module the op ran in (``model.layers.0.self_attn.q_proj``), a key of ``model.named_modules()``
(``""`` for the root). ``meta["val"]`` comes from torch.export.

When export fails, ``capture`` either raises a :class:`CaptureError` that names the failing
construct and says what to do, or (``fallback=True``) returns a :class:`Captured` with
``method="module"``: site finding then works on the module tree (``discover_linear_sites``).

The user's model is left as it was: the export runs in eval mode and every submodule's training
flag is restored afterwards; no hooks are registered.
"""

from __future__ import annotations

import os
import re
import sysconfig
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "eval_mode",
    "FQN_KEY",
    "ORIGIN_KEY",
    "CaptureError",
    "Captured",
    "capture",
    "is_slimfx_op",
    "normalize_module_path",
    "stamp_fqns",
]

#: node.meta key holding the module path (FQN) a node came from.
FQN_KEY = "slimfx.fqn"
#: node.meta key holding the provenance of a slimfx op node: {"pass", "rule", "site"}.
ORIGIN_KEY = "slimfx.origin"

_ADVICE = (
    "What to do: pass example inputs that match the model's forward (capture(model, args=..., "
    "kwargs=...)); make the failing construct traceable (e.g. torch.cond instead of a Python "
    "branch on a tensor value); or rely on module-level discovery: capture(..., fallback=True) "
    "returns method='module' and find_linear_sites / discover_linear_sites find the nn.Linear "
    "layers without a graph."
)


class CaptureError(RuntimeError):
    """torch.export could not capture the model.

    Attributes: ``construct`` (what failed, in words), ``location`` (``file:line in fn: code``
    of the user code that failed, or ``None``), ``detail`` (the first useful lines of the
    export error).
    """

    def __init__(self, message: str, *, construct: str, location: str | None, detail: str) -> None:
        super().__init__(message)
        self.construct = construct
        self.location = location
        self.detail = detail


@dataclass
class Captured:
    """The result of :func:`capture`.

    - ``program``: the ``torch.export.ExportedProgram`` (``None`` for ``method="module"``).
    - ``gm``: ``program.graph_module``, the lifted graph (parameters and buffers are
      placeholders, mapped to FQNs by ``program.graph_signature``); ``program.module()`` gives a
      runnable copy with the same node names and meta.
    - ``method``: ``"export"`` or ``"module"`` (export failed; use module-level discovery).
    - ``fallback_reason``: the :class:`CaptureError` text when ``method == "module"``.
    - ``example_args`` / ``example_kwargs``: the inputs given to ``capture``, so module-level
      discovery can run the model once to group linears that read the same tensor.
    """

    program: torch.export.ExportedProgram | None
    gm: torch.fx.GraphModule | None
    method: Literal["export", "module"]
    fallback_reason: str | None = None
    example_args: tuple[Any, ...] = ()
    example_kwargs: dict[str, Any] | None = field(default=None, repr=False)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Within the block every submodule of ``model`` is in eval mode; each one's own training
    flag is restored afterwards, also on an error (the user's model is left as it was)."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def capture(
    model: nn.Module,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    strict: bool = False,
    fallback: bool = True,
    dynamic_shapes: Any = None,
) -> Captured:
    """Export ``model`` called as ``model(*args, **kwargs)`` and stamp module paths on nodes.

    ``strict`` is passed to ``torch.export.export`` (non-strict by default: plain Python runs,
    tensors are traced). On failure: ``fallback=False`` raises :class:`CaptureError`;
    ``fallback=True`` returns ``Captured(method="module", fallback_reason=<message>)``.
    The model runs in eval mode during export; its training flags are restored afterwards.
    """
    if not isinstance(args, tuple):
        args = (args,)
    with eval_mode(model):
        try:
            program = torch.export.export(
                model, args, kwargs, strict=strict, dynamic_shapes=dynamic_shapes
            )
        except Exception as exc:  # noqa: BLE001 - every export failure becomes a CaptureError
            err = _capture_error(model, exc)
            if not fallback:
                raise err from exc
            return Captured(
                program=None,
                gm=None,
                method="module",
                fallback_reason=str(err),
                example_args=args,
                example_kwargs=kwargs,
            )
    gm = program.graph_module
    stamp_fqns(gm, model)
    return Captured(
        program=program,
        gm=gm,
        method="export",
        fallback_reason=None,
        example_args=args,
        example_kwargs=kwargs,
    )


# --------------------------------------------------------------------------- module paths

_GETATTR = re.compile(r"getattr\(\s*([^(),]+?)\s*,\s*['\"]([^'\"]+)['\"]\s*\)")
_MODULES_ITEM = re.compile(r"\._modules\[\s*['\"]([^'\"]+)['\"]\s*\]")
_INDEX = re.compile(r"\[\s*['\"]?([^\]'\"]+?)['\"]?\s*\]")
_ROOT = re.compile(r"^(?:L\[\s*['\"]self['\"]\s*\]|self(?=$|[.\[]))")
_MANGLED_ROOT = re.compile(r"^L__self___?")
_CALL_SUFFIX = re.compile(r"@\d+$")


def normalize_module_path(path: str, modules: dict[str, nn.Module] | None = None) -> str:
    """Plain dotted module name for a path as torch.export / dynamo write it.

    ``L['self'].model.layers[0].mlp`` / ``getattr(L['self'].model.layers, '0').mlp`` /
    ``L__self__model.layers.0.mlp@1`` / ``model.layers.0.mlp`` → ``model.layers.0.mlp``; the root
    module is ``""``. With ``modules`` (``dict(model.named_modules())``), a mangled path such as
    ``L__self___model_layers_0_mlp`` is resolved to the module whose dotted name it spells.
    """
    s = _CALL_SUFFIX.sub("", path.strip())
    prev = None
    while prev != s:
        prev, s = s, _GETATTR.sub(r"\1.\2", s)
    s = _MODULES_ITEM.sub(r".\1", s)
    s = _MANGLED_ROOT.sub("", s, count=1)
    s = _ROOT.sub("", s, count=1)
    s = _INDEX.sub(r".\1", s)
    s = s.strip(".")
    if modules is not None and s not in modules:
        mangled = {name.replace(".", "_"): name for name in modules}
        s = mangled.get(s.replace(".", "_"), s)
    return s


def _innermost_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, value = list(stack.items())[-1]
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return value[0]
    return key


def is_slimfx_op(target: object) -> bool:
    """True for ``torch.ops.slimfx.*`` ops (overloads or packets)."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target.namespace == "slimfx"
    return False


def stamp_fqns(gm: torch.fx.GraphModule, model: nn.Module | None = None) -> int:
    """Set ``meta["slimfx.fqn"]`` on every call_function node of ``gm`` and its subgraphs.

    The module path is the innermost entry of ``meta["nn_module_stack"]``, normalized by
    :func:`normalize_module_path` (against ``model.named_modules()`` when ``model`` is given);
    nodes with no stack get ``""`` (the root). Returns the number of nodes stamped.

    A slimfx op node that has no ``meta["slimfx.origin"]`` came from a module swap done before
    capture (a ``LowRankLinear`` calls ``slimfx::lowrank_linear``); it gets
    ``{"pass": "module_swap", "rule": <module class>, "site": <module path>}``.
    """
    modules = dict(model.named_modules()) if model is not None else None
    count = 0
    for sub in gm.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            if node.op != "call_function":
                continue
            path = _innermost_path(node)
            fqn = "" if path is None else normalize_module_path(path, modules)
            node.meta[FQN_KEY] = fqn
            if is_slimfx_op(node.target) and ORIGIN_KEY not in node.meta:
                owner = modules.get(fqn) if modules is not None else None
                rule = type(owner).__name__ if owner is not None else "unknown"
                node.meta[ORIGIN_KEY] = {"pass": "module_swap", "rule": rule, "site": fqn}
            count += 1
    return count


# --------------------------------------------------------------------------- error messages

_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+)(?:, in (\S+))?')
_GRAPH_COMMENT = re.compile(r"# File: (\S+?):(\d+) in (\S+), code: (.+)")
_NOISE = ("For more information", "For C++", "If you suspect", "For extended logs", "def forward")


def _first_useful_lines(text: str, limit: int = 3) -> str:
    out: list[str] = []
    for line in text.strip().splitlines():
        line = line.rstrip()
        if not line.strip():
            if out:
                break
            continue
        if line.lstrip().startswith(_NOISE):
            continue
        out.append(line.strip())
        if len(out) == limit:
            break
    detail = " ".join(out)
    return detail if len(detail) <= 400 else detail[:397] + "..."


_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"])


def _is_torch_file(path: str) -> bool:
    """Frames of torch itself or of the standard library: never the user's failing construct."""
    p = path.replace("\\", "/")
    if "/torch/" in p or "/site-packages/torch" in p or "/_export/" in p:
        return True
    return os.path.realpath(path).startswith(_STDLIB + os.sep)


def _location(exc: BaseException) -> str | None:
    """``file:line in fn: code`` of the user code that failed, from the message or traceback."""
    text = str(exc)
    lines = text.splitlines()
    marker = next(
        (i for i, ln in enumerate(lines) if "following call raised this error" in ln), None
    )
    search = lines[marker + 1 :] if marker is not None else lines
    found: tuple[str, str, str | None, str] | None = None
    for i, ln in enumerate(search):
        m = _USER_FRAME.search(ln)
        if m and not _is_torch_file(m.group(1)):
            code = next((c.strip() for c in search[i + 1 : i + 3] if c.strip()), "")
            if code.startswith("File "):
                code = ""
            found = (m.group(1), m.group(2), m.group(3), code)
            if marker is not None:
                break
    if found is None:
        for ln in lines:
            g = _GRAPH_COMMENT.search(ln)
            if g and not _is_torch_file(g.group(1)):
                found = (g.group(1), g.group(2), g.group(3), g.group(4).strip())
    if found is None:
        frames = [
            f for f in traceback.extract_tb(exc.__traceback__) if not _is_torch_file(f.filename)
        ]
        frames = [f for f in frames if not f.filename.endswith("slimfx/ir/capture.py")]
        if frames:
            f = frames[-1]
            found = (f.filename, str(f.lineno), f.name, (f.line or "").strip())
    if found is None:
        return None
    file, line, fn, code = found
    loc = f"{file}:{line}" + (f" in {fn}" if fn else "")
    return f"{loc}: {code}" if code else loc


def _construct(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc)
    if "data-dependent" in text or "DataDependent" in name or "GuardOnDataDependent" in name:
        return (
            "data-dependent Python control flow (a Python branch, bool(), int() or .item() on "
            "a tensor's value)"
        )
    if "DynamicOutputShape" in name or "dynamic output shape" in text.lower():
        return "an op whose output shape depends on tensor values"
    if isinstance(exc, TypeError) and "argument" in text:
        return "the call: forward() did not accept the example inputs"
    if "Unsupported" in name:
        return "a Python construct the tracer does not support"
    return f"an unexpected {name}"


def _capture_error(model: nn.Module, exc: BaseException) -> CaptureError:
    construct = _construct(exc)
    location = _location(exc)
    detail = _first_useful_lines(str(exc)) or type(exc).__name__
    msg = [
        f"torch.export could not capture {type(model).__name__} ({type(exc).__name__}): "
        f"failing construct: {construct}.",
        f"  {detail}",
    ]
    if location:
        msg.append(f"  at {location}")
    msg.append(_ADVICE)
    return CaptureError("\n".join(msg), construct=construct, location=location, detail=detail)
