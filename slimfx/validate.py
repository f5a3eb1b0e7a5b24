"""Input checks for the public entry points, run before any work starts.

Every check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, wrong
value) with a message that names the argument — and for calibration the batch index — and
says what was expected. Nothing here changes the user's model; ``check_batches`` returns new
batch objects when it casts (dtype / device), with a note for the report.

- :func:`check_model`: ``nn.Module``, not TorchScript, not on the ``meta`` device, not already
  rewritten by slimfx; a ``torch.compile`` wrapper is unwrapped to its ``_orig_mod``.
- :func:`calibration_items` / :func:`check_batches`: the container, then every batch's
  tensors against the model (dtype, device, width, token-id range, finiteness, emptiness).
- :func:`check_options`: target / workload / families / seq_len / include / exclude.
- :func:`direct_weight_readers`: sites whose parent module reads the child's ``weight``
  itself (``nn.MultiheadAttention.out_proj``); swapping those would break the parent.
- :func:`read_json_object`: a JSON file that must hold an object, errors naming the file.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimfx.cost.batches import Piece, is_hf, unpad

__all__ = [
    "check_model",
    "unwrap_compiled",
    "rewritten_modules",
    "calibration_items",
    "check_batches",
    "check_options",
    "direct_weight_readers",
    "read_json_object",
]

_BATCH_KINDS = "a tensor, a dict of keyword tensors, a tuple of positional tensors, or a text"


# --------------------------------------------------------------------------- the model


def unwrap_compiled(model: Any) -> Any:
    """The eager module under a ``torch.compile`` wrapper (``_orig_mod``), else ``model``."""
    inner = getattr(model, "_orig_mod", None)
    while isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        model, inner = inner, getattr(inner, "_orig_mod", None)
    return model


def rewritten_modules(model: nn.Module) -> list[str]:
    """FQNs of the modules of ``model`` that are slimfx forms (a rewritten model)."""
    return [
        name
        for name, m in model.named_modules()
        if type(m).__module__.startswith("slimfx.") and name
    ]


def check_model(model: Any, *, what: str = "optimize", allow_rewritten: bool = False) -> nn.Module:
    """``model`` checked for ``what`` (and unwrapped from ``torch.compile``).

    Raises ``TypeError`` for a non-module or a TorchScript module, ``ValueError`` for a model
    with tensors on the ``meta`` device or (unless ``allow_rewritten``) one that already holds
    slimfx modules: optimizing a rewritten model again does not compose plans, so it is
    refused with what to do instead."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{what}: model is a TorchScript module ({type(model).__name__}); slimfx rewrites "
            "eager nn.Modules — pass the module before torch.jit.script / trace"
        )
    model = unwrap_compiled(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be a torch.nn.Module, got {type(model).__name__}")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(
            f"{what}: {len(meta)} tensor(s) of the model are on the 'meta' device (e.g. "
            f"{meta[0]}): they hold no values to compress. Load real weights first (e.g. "
            "from_pretrained without a meta/empty-weights context, or model.to_empty(...) and "
            "load_state_dict)"
        )
    if not allow_rewritten:
        done = rewritten_modules(model)
        if done:
            raise ValueError(
                f"{what}: this model was already rewritten by slimfx ({len(done)} site(s), e.g. "
                f"{done[0]!r}); optimizing it again would not compose with the first plan. "
                "Optimize the original dense model in one call instead (include=/exclude= pick "
                "the sites, one budget covers them), or replay a combined plan on it with "
                "optimize(original, plan=...)"
            )
    return model


def _first_leaf(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first registered module holding parameters of its own."""
    for name, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            return name, m
    return None


def _embedding(model: nn.Module) -> nn.Embedding | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            return emb
    first = _first_leaf(model)
    return first[1] if first is not None and isinstance(first[1], nn.Embedding) else None


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    dtype = device = None
    for p in model.parameters():
        device = device or p.device
        if p.is_floating_point():
            return p.dtype, p.device
    return dtype, device


# --------------------------------------------------------------------------- calibration


#: families whose position ids start after the padding index (RoBERTa's layout)
_PADDING_OFFSET = re.compile(r"roberta|camembert|longformer|data2vec-text|xmod|ibert|luke|mpnet")


def window_length(model: nn.Module, items: Sequence[Any], seq_len: int, notes: list[str]) -> int:
    """The token window texts are cut into: ``seq_len``, or the model's
    ``max_position_embeddings`` where that is shorter (with a note) — a 77-position text
    encoder cannot run the default 256-token windows."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and _PADDING_OFFSET.search(str(getattr(config, "model_type", ""))):
        limit -= int(getattr(config, "pad_token_id", None) or 1) + 1  # positions start after it
    texts = any(isinstance(c, str) for c in items)
    if texts and isinstance(limit, int) and 0 < limit < seq_len:
        notes.append(f"calibration: texts cut into {limit}-token windows, the model's "
                     f"max_position_embeddings (seq_len={seq_len} asked for longer ones)")
        return limit
    ids = [m[1] for m in map(_main_input, items) if m is not None and m[1].dim() >= 1
           and not m[1].is_floating_point()]  # fmt: skip  (token ids, not features)
    longest = max((t.shape[-1] for t in ids), default=0)
    if isinstance(limit, int) and 0 < limit < longest:  # RoPE runs past it, off its training
        notes.append(f"calibration: batches of up to {longest} tokens, past the model's "
                     f"max_position_embeddings ({limit}): the statistics include positions it "
                     "was not trained for")  # fmt: skip
    return seq_len


def calibration_items(calibration: Any, name: str = "calibration") -> list[Any]:
    """The batches of ``calibration`` as a list: a list, tuple or generator of batches; a bare
    tensor or a bare dict (one batch of keyword tensors) is one batch, and so is a batch of one
    tensor (``(ids,)``, ``[ids]``: what a DataLoader over a TensorDataset yields). Each batch must be
    {_BATCH_KINDS}; anything else is a ``TypeError`` naming the batch index."""
    if isinstance(calibration, (str, bytes)):
        raise TypeError(f"{name} must be a list of batches or strings, not one string")
    if isinstance(calibration, (Tensor, Mapping)):
        items = [calibration]
    elif isinstance(calibration, Iterable):
        items = list(calibration)
    else:
        raise TypeError(
            f"{name} must be a list, tuple or generator of batches ({_BATCH_KINDS}), got "
            f"{type(calibration).__name__}"
        )
    for i, b in enumerate(items):
        if isinstance(b, (tuple, list)) and len(b) == 1 and isinstance(b[0], Tensor):
            # a DataLoader over a TensorDataset yields [ids]: the same batch as the tensor (a
            # Hugging Face model then gets it as input_ids, not as its first positional arg)
            items[i] = b = b[0]
        if isinstance(b, (Tensor, str)):
            continue
        if isinstance(b, Mapping):
            bad = [k for k in b if not isinstance(k, str)]
            if bad:
                raise TypeError(f"{name} batch {i}: dict keys must be argument names, got {bad[0]!r}")
            continue
        if isinstance(b, (tuple, list)) and b and any(isinstance(t, Tensor) for t in b):
            continue
        raise TypeError(f"{name} batch {i}: expected {_BATCH_KINDS}, got {type(b).__name__}")
    return items


def _tensors_of(batch: Any) -> list[tuple[str, Tensor]]:
    if isinstance(batch, Tensor):
        return [("the tensor", batch)]
    if isinstance(batch, Mapping):
        return [(f"{k!r}", v) for k, v in batch.items() if isinstance(v, Tensor)]
    return [(f"argument {j}", t) for j, t in enumerate(batch) if isinstance(t, Tensor)]


def _main_input(batch: Any) -> tuple[str, Tensor] | None:
    """The tensor a model's first layer reads: the batch, ``input_ids`` / the first tensor."""
    if isinstance(batch, Tensor):
        return "the tensor", batch
    if isinstance(batch, Mapping):
        for key in ("input_ids", "inputs_embeds", "input", "x"):
            if isinstance(batch.get(key), Tensor):
                return repr(key), batch[key]
        return None
    if batch and isinstance(batch[0], Tensor):
        return "argument 0", batch[0]
    return None


def _runs(model: nn.Module, batch: Any) -> bool:
    """Whether ``model`` takes ``batch`` (one no-grad forward): the width check above reads
    the first *registered* linear, which need not be the first one the forward calls (or a
    ``Flatten`` may come first). It runs in eval mode (no batch-norm statistics move, no
    dropout) and every module's mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    except Exception:  # noqa: BLE001 - any failure means the batch does not fit
        return False
    finally:
        for m, mode in modes:
            m.training = mode
    return True


def _rebuild(batch: Any, fn: Any) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return type(batch)(fn(t) if isinstance(t, Tensor) else t for t in batch)


def _forward_names(model: nn.Module) -> tuple[set[str], bool]:
    """``model.forward``'s named parameters, and whether it takes ``**kwargs`` too."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set(), False
    var = inspect.Parameter.VAR_KEYWORD
    return {p.name for p in params if p.kind != var}, any(p.kind == var for p in params)


def check_batches(
    model: nn.Module, batches: Sequence[Any], notes: list[str] | None = None,
    name: str = "calibration",
) -> list[Any]:
    """Check prepared batches against ``model``; return them (cast where that is safe).

    Per batch ``i``: no tensor is empty (a zero-token batch would report a perfect rewrite
    measured on nothing); floating tensors are finite; a model that takes token ids (an
    embedding first) gets integer ids in ``[0, vocab)``; a model whose first layer is a linear
    gets floating input of that width. Floating inputs of another dtype than the model's are
    cast to it and tensors on another device moved to it, each with one note in ``notes``."""
    dtype, device = _model_dtype_device(model)
    emb = _embedding(model)
    first = _first_leaf(model)
    linear = first[1] if first is not None and isinstance(first[1], nn.Linear) else None
    cast: set[str] = set()
    out: list[Any] = []
    width: tuple[int, int] | None = None
    floats_run = False  # a float batch ran through a model with an embedding
    pads = [0, 0]  # padding positions of the attention masks: removed, kept
    total, kept = 0, []  # positions of the masks; batches whose padding stays
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    hf = is_hf(model)  # takes rows of any length (its own masks and positions)

    def fix(t: Tensor) -> Tensor:
        if device is not None and t.device != device:
            cast.add(f"moved from {t.device} to the model's {device}")
            t = t.to(device)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            cast.add(f"cast from {t.dtype} to the model's {dtype}")
            t = t.to(dtype)
        return t

    named, loose = _forward_names(model)
    stray: set[str] = set()
    for i, b in enumerate(batches):
        if isinstance(b, str):
            raise TypeError(f"{name} batch {i}: a text needs a tokenizer= to become token ids")
        if isinstance(b, Mapping) and loose:  # **kwargs would swallow a misspelled key
            stray |= {str(k) for k in b if k not in named}
        tensors = _tensors_of(b)
        if not tensors:
            raise TypeError(f"{name} batch {i}: holds no tensor (expected {_BATCH_KINDS})")
        for where, t in tensors:
            if t.numel() == 0:
                raise ValueError(
                    f"{name} batch {i}: {where} is empty (shape {tuple(t.shape)}); every batch "
                    "needs at least one token"
                )
            if t.is_floating_point() and not torch.isfinite(t).all():
                n = int((~torch.isfinite(t)).sum())
                raise ValueError(
                    f"{name} batch {i}: {where} has {n} NaN/inf value(s) of {t.numel()}; "
                    "calibration must be finite"
                )
        main = _main_input(b)
        floats_run = floats_run or bool(
            main is not None and emb is not None and main[1].is_floating_point()
            and _runs(model, _rebuild(b, fix))
        )  # an embedding that is not the input's (Whisper's features, a positional table)
        if main is not None and emb is not None and main[0] != "'inputs_embeds'" and not (
            floats_run and main[1].is_floating_point()
        ):
            where, t = main
            if t.is_floating_point() or t.dtype == torch.bool:
                raise TypeError(
                    f"{name} batch {i}: {where} is {t.dtype}, but {type(model).__name__} takes "
                    "token ids (an integer tensor, e.g. torch.long)"
                    + ("; run on this batch as features, it fails too" if emb is not None
                       and t.is_floating_point() else "")
                )  # fmt: skip
            if t.dim() > 2 and hf:  # (batch, seq) ids; the capture would fail in its tracer
                raise ValueError(
                    f"{name} batch {i}: {where} has shape {tuple(t.shape)}; token ids are "
                    "(batch, seq) or (seq,)"
                )
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= emb.num_embeddings:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{name} batch {i}: token id {bad} is outside [0, {emb.num_embeddings}) "
                    f"(the model's embedding has {emb.num_embeddings} rows)"
                )
        elif main is not None and linear is not None:
            where, t = main
            if not t.is_floating_point():
                raise TypeError(
                    f"{name} batch {i}: {where} is {t.dtype}, but the model's first layer "
                    f"({first[0]}, a Linear) takes floating-point features"
                )
            if (t.dim() == 0 or t.shape[-1] != linear.in_features) and not _runs(
                model, _rebuild(b, fix)
            ):
                raise ValueError(
                    f"{name} batch {i}: {where} has shape {tuple(t.shape)}, but the model's "
                    f"first layer ({first[0]}) takes {linear.in_features} features in the last "
                    "dimension"
                )
        elif main is not None and main[1].is_floating_point() and main[1].dim() >= 1:
            w = main[1].shape[-1]
            if width is not None and w != width[1]:
                raise ValueError(
                    f"{name} batch {i}: {main[0]} has {w} features in the last dimension, "
                    f"batch {width[0]} has {width[1]}"
                )
            width = width or (i, w)

        rows, why = unpad(b, seq2seq) if hf else (None, "")
        for piece in rows or [b]:
            r = _rebuild(piece, fix)
            if isinstance(r, dict):  # errors and fit / held-out splits count the user's batches
                r = Piece(r)
                r.origin, r.rows = i, getattr(piece, "rows", None)
            out.append(r)
        mask = b.get("attention_mask") if isinstance(b, Mapping) else None
        if isinstance(mask, Tensor) and mask.dim() == 2 and mask.numel():
            n = int((mask == 0).sum())
            pads[0 if rows else 1] += n
            if n and not hf:
                why = "not a Hugging Face model: its rows may need their padded length"
            if why:
                kept.append(f"batch {i}: {why}")
            total += mask.numel()
    if cast and notes is not None:
        notes.append(f"{name}: floating inputs {' and '.join(sorted(cast))}")
    if pads[0] and notes is not None:
        notes.append(
            f"{name}: padded batches split into their rows without the padding ({pads[0]} of "
            f"{total} positions were padding, attention_mask 0), so that statistics, errors "
            "and the loss see real tokens at the positions generate() gives them"
        )
    if pads[1] and notes is not None:
        notes.append(
            f"{name}: {pads[1]} of {total} positions are padding (attention_mask 0) in batches "
            f"kept as they are ({'; '.join(kept[:3])}{' …' if len(kept) > 3 else ''}): their "
            "activations count in the statistics like real tokens"
        )
    if stray and notes is not None:
        notes.append(
            f"{name}: batch key(s) {sorted(stray)} are not named arguments of "
            f"{type(model).__name__}.forward — they go to its **kwargs, where the model may "
            "ignore them (a misspelled key?)"
        )
    return out


# --------------------------------------------------------------------------- options


def check_options(
    *,
    target: Any = "cpu",
    workload: Any = "decode",
    families: Any = None,
    seq_len: Any = 256,
    include: Any = None,
    exclude: Any = None,
    solver: Any = "auto",
    sensitivity: Any = "geo",
    backend: Any = None,
    example_inputs: Any = None,
) -> None:
    """Names and numbers of ``optimize``'s options, checked before any work: unknown names
    raise ``ValueError`` listing the known ones (a solver, estimator or backend typo surfaced
    after calibration, minutes in)."""
    from slimfx.backends.capabilities import BACKENDS
    from slimfx.cost.families import FAMILIES
    from slimfx.cost.sensitivity import ESTIMATORS
    from slimfx.cost.target import TARGETS, WORKLOADS, Target, Workload
    from slimfx.planning.solve import METHODS

    for name, known, value in (("solver", METHODS, solver), ("sensitivity", ESTIMATORS,
                               sensitivity), ("backend", (None, *BACKENDS), backend)):  # fmt: skip
        if not isinstance(value, (str, type(None))) or value not in known:
            names = ", ".join(repr(k) for k in known)
            raise ValueError(f"unknown {name} {value!r}; known: {names}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError(
            "example_inputs is a tuple of the model's positional arguments, e.g. (ids,); got "
            f"{type(example_inputs).__name__}"
        )
    if include is not None and not isinstance(include, str) and len(list(include)) == 0:
        raise ValueError("include=[] selects no site: pass None (every site) or patterns")

    if not isinstance(target, Target):
        if not isinstance(target, str):
            raise TypeError(f"target must be a name or a Target, got {type(target).__name__}")
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; known: {', '.join(sorted(TARGETS))}")
    if not isinstance(workload, Workload):
        if not isinstance(workload, str) or workload not in WORKLOADS:
            raise ValueError(
                f"unknown workload {workload!r}; known: {', '.join(sorted(WORKLOADS))}"
            )
    if families is not None:
        if isinstance(families, str):
            raise TypeError(f"families takes a list of names, not one string ({families!r})")
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ValueError(
                f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; known: "
                f"{', '.join(sorted(FAMILIES))}"
            )
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int ≥ 1, got {seq_len!r}")
    for label, pats in (("include", include), ("exclude", exclude)):
        if isinstance(pats, str):
            raise TypeError(f"{label} takes a list of patterns, not one string")
        for p in pats or ():
            if not isinstance(p, str):
                raise TypeError(f"{label} patterns must be strings, got {p!r}")


def heldout_batches(model: nn.Module, opts: Any, notes: list[str]) -> list[Any]:
    """``optimize(heldout=…)`` as model batches, checked as the calibration is: texts
    tokenized with its ``tokenizer`` into windows of its length (they were refused although a
    tokenizer was given); an empty list refused (it blanked the SQNR column silently)."""
    from slimfx.cost.batches import prepare_batches

    held = calibration_items(opts.heldout, "heldout")
    if not held:
        raise ValueError(
            "heldout is empty: pass held-out batches, or None to hold out part of the calibration"
        )
    seq_len = window_length(model, held, opts.seq_len, notes)
    held = prepare_batches(held, tokenizer=opts.tokenizer, seq_len=seq_len)
    return check_batches(model, held, notes, "heldout")


def option_notes(opts: Any, batches: Sequence[Any], heldout: Sequence[Any] | None) -> list[str]:
    """Notes on options that do less than they seem to: ``sensitivity=`` with ``fisher=False``
    (no weighting runs), held-out batches that are calibration batches (the measured SQNR is
    then not held out)."""
    notes = []
    if opts.fisher is False and opts.sensitivity != "geo":
        notes.append(f"sensitivity={opts.sensitivity!r} is not used: fisher=False leaves every "
                     "site's error unweighted")  # fmt: skip
    same = [i for i, h in enumerate(heldout or ()) if isinstance(h, Tensor) and any(
        isinstance(b, Tensor) and b.shape == h.shape and torch.equal(b, h) for b in batches)]  # fmt: skip
    if same:
        notes.append(f"heldout: {len(same)} of {len(heldout or ())} batch(es) are calibration "
                     f"batches (e.g. batch {same[0]}): their measured SQNR is not held out")  # fmt: skip
    return notes


def check_flags(flags: Mapping[str, Any]) -> None:
    """``optimize``'s on/off keywords (name → value), each a bool — ``inplace="no"`` rewrote
    the caller's model — or ``None`` where the name ends in ``?`` (``fisher``: its automatic
    default)."""
    for name, value in flags.items():
        if not (isinstance(value, bool) or (value is None and name.endswith("?"))):
            raise TypeError(f"{name.rstrip('?')} must be True or False, got {value!r}")


# --------------------------------------------------------------------------- sites


@functools.lru_cache(maxsize=256)
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


_META = r"(dtype|device|shape|size|dim|ndim|numel|stride|is_\w+|requires_grad|data|type)\b"


def direct_weight_readers(
    model: nn.Module, fqns: Iterable[str], metadata: bool = False
) -> dict[str, str]:
    """FQN → reason for every site whose parent module's ``forward`` reads the child's
    ``weight`` (or ``bias``) attribute itself instead of calling the child — e.g.
    ``nn.MultiheadAttention`` hands ``out_proj.weight`` to ``F.multi_head_attention_forward``.
    A slimfx module there has no dense ``weight``, so the parent would fail; such sites are
    left dense (no form keeps a ``weight`` view). ``metadata``: only reads of the tensor's
    metadata (T5's ``self.wo.weight.dtype``, ``isinstance(self.x.weight, …)``) — no graph
    node shows those, so a captured graph cannot clear them."""
    out: dict[str, str] = {}
    for fqn in fqns:
        parent_name, _, child = fqn.rpartition(".")
        if not child:
            continue
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            continue
        src = _forward_source(type(parent))
        ref = rf"self\.{re.escape(child)}\.(weight|bias)"
        by_name = rf"getattr\(\s*self\.{re.escape(child)}\s*,\s*[\"'](weight|bias)[\"']"
        pattern = (
            rf"\b{ref}\s*\.\s*{_META}|\b(isinstance|len|getattr|torch\.is_\w+)\(\s*{ref}"
            rf"|{by_name}"
            if metadata else rf"\b{ref}\b|{by_name}"
        )  # fmt: skip
        if re.search(pattern, src):
            out[fqn] = (
                f"left dense: its parent {type(parent).__name__} reads "
                f"`{child}.weight` directly instead of calling it, so a rewritten module "
                "there would break the parent's forward"
            )
    return out


# --------------------------------------------------------------------------- files


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``ValueError`` naming the file when it is not JSON or not
    an object (``what`` says which file it should have been)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a valid {what} (not JSON: {e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{p}: not a valid {what} (a JSON {type(d).__name__}, not an object)")
    return d
