"""Calibration batches: texts cut into token windows, batches moved to the model's device, and
one way to call a model on a batch (Hugging Face keywords, dicts, tuples, tensors). Shared by the
calibration statistics (``cost.calibration``), sequential mode and the stages."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "STACK_TOKENS",
    "stack_windows",
    "model_device", "to_device", "is_hf", "call_model", "check_batches", "prepare_batches",
    "naming_batch", "CalibrationBatchError", "NoLossError", "unpad", "Piece", "batch_units",
    "first_batches",
]  # fmt: skip


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move the tensors inside nested tuples / lists / dicts to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


#: a CPU allocation failure is a plain RuntimeError: these words in its message
_OOM = re.compile(r"out of memory|not enough memory|can't allocate memory|cannot allocate memory"
                  r"|DefaultCPUAllocator", re.IGNORECASE)


class CalibrationBatchError(ValueError):
    """The model failed on a calibration batch; the message names the batch and its shapes."""


class NoLossError(ValueError):
    """The batch or the model gives no loss to weight by (no labels, no LM head): the default
    weighting falls back to unweighted errors; ``fisher=True`` raises it."""


def _shapes(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"{tuple(batch.shape)} {batch.dtype}"
    if isinstance(batch, Mapping):
        items = batch.items()
    elif isinstance(batch, (tuple, list)):
        items = enumerate(batch)
    else:
        return type(batch).__name__
    return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in items if isinstance(v, Tensor))


def _positions_hint(model: nn.Module, batch: Any) -> str:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if isinstance(limit, int) and isinstance(ids, Tensor) and ids.dim() >= 1:
        if not ids.is_floating_point() and ids.shape[-1] > limit:
            return (f"; the model takes at most {limit} positions and this batch has "
                    f"{ids.shape[-1]}: calibrate on shorter windows (seq_len={limit} or less)")
    return ""


def _weight_reader_error(e: AttributeError) -> AttributeError:
    """``e`` (a missing ``weight``), or — where a module's own code read it from a slimfx
    rewrite of its child — an error naming that module and its rewritten children."""
    from slimfx.ir.modules import SlimLinear

    if "'weight'" not in str(e):
        return e
    tb, selves = e.__traceback__, []
    while tb is not None:
        selves.append(tb.tb_frame.f_locals.get("self"))
        tb = tb.tb_next
    parent = next((m for m in reversed(selves)
                   if isinstance(m, nn.Module) and not isinstance(m, SlimLinear)), None)  # fmt: skip
    kids = [n for n, c in parent.named_modules() if isinstance(c, SlimLinear)] if parent else []
    if not kids:
        return e
    shown = ", ".join(kids[:3]) + (f" and {len(kids) - 3} more" if len(kids) > 3 else "")
    return AttributeError(
        f"{type(parent).__name__} reads the `weight` of a rewritten layer inside it ({shown}) "
        "instead of calling it, and a slimfx rewrite holds no dense weight: keep that layer "
        f"dense with optimize(..., exclude=[...]) — ({e})"
    )


@contextmanager
def naming_batch(
    i: int, batch: Any, model: nn.Module, what: str | None = None
) -> Iterator[None]:
    """An error raised while ``model`` runs calibration batch ``i`` (``what`` names the kind,
    e.g. stacked windows; default "calibration batch") becomes a
    :class:`CalibrationBatchError` naming the batch, its shapes and, where the batch is
    longer than the model's positions, that limit. Out-of-memory and interrupts pass as they
    are."""
    origin, rows = getattr(batch, "origin", None), getattr(batch, "rows", None)
    if origin is not None:
        i = origin
    part = "" if rows is None else f"its row(s) {', '.join(map(str, rows))} without padding: "
    try:
        yield
    except (CalibrationBatchError, NoLossError):
        raise
    except AttributeError as e:
        raise _weight_reader_error(e) from e
    except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as e:
        if isinstance(e, torch.OutOfMemoryError) or _OOM.search(str(e)):
            raise
        raise CalibrationBatchError(
            f"{what or 'calibration batch'} {i} ({part}{_shapes(batch)}): running the model on it "
            f"failed — {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            f"{_positions_hint(model, batch)}"
        ) from e


#: dict keys holding one entry per token (shape ``(batch, tokens, …)``) in a padded batch;
#: ``labels`` only where they are integer and shaped so (:func:`_kinds`)
_PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
              "special_tokens_mask")


def _kinds(batch: Mapping, n: int, t: int, seq2seq: bool) -> tuple[set[str], set[str]]:
    """``(per-token keys, keys known to be per row)`` of a padded batch of ``n`` rows of ``t``
    positions. Labels are per token when integer and ``(n, t)`` (a causal LM's, a token
    classifier's); a sequence classifier's ``(n,)`` / float multi-label targets and a
    sequence-to-sequence model's target side (``labels``, ``decoder_*``) are per row."""
    per_token = {k for k in _PER_TOKEN if isinstance(batch.get(k), Tensor)}
    per_row: set[str] = set()
    lab = batch.get("labels")
    if isinstance(lab, Tensor):
        if (not seq2seq and not lab.is_floating_point() and lab.dim() >= 2
                and tuple(lab.shape[:2]) == (n, t)):  # fmt: skip
            per_token.add("labels")
        else:
            per_row.add("labels")
    if seq2seq:
        per_row |= {k for k in batch if k.startswith("decoder_")}
    return per_token, per_row


class Piece(dict):
    """Rows of a user's calibration batch ``origin``, as one batch (keyword arguments): the
    rows ``rows`` of it without their padding (:func:`unpad`; ``rows`` ``None``: all of it,
    as given). Errors name the user's batch; splits into fit and held-out batches and "the
    first k batches" count the user's batches (:func:`batch_units`)."""

    origin: int | None = None
    rows: tuple[int, ...] | None = None


def batch_units(batches: Sequence[Any]) -> list[list[Any]]:
    """``batches`` grouped into the user's batches: consecutive :class:`Piece` s of one origin
    together, anything else alone."""
    units: list[list[Any]] = []
    for b in batches:
        origin = getattr(b, "origin", None)
        if units and origin is not None and getattr(units[-1][0], "origin", None) == origin:
            units[-1].append(b)
        else:
            units.append([b])
    return units


def first_batches(batches: Sequence[Any], k: int) -> list[Any]:
    """The pieces of the first ``k`` of the user's batches (:func:`batch_units`)."""
    return [b for unit in batch_units(batches)[:k] for b in unit]


def unpad(batch: Any, seq2seq: bool = False) -> tuple[list[Piece] | None, str]:
    """``(batches, "")``: a padded dict batch as batches without padding; ``(None, "")``
    where it holds no padding mask or no padding; ``(None, why)`` where it cannot be split.

    Each row keeps the positions its 2-D 0/1 ``attention_mask`` marks, which must be one run
    (left, right or both sides padded); rows of equal length go back into one batch, in the
    order they came. The per-token keys (:func:`_kinds`; a ``(1, t)`` one is broadcast) are
    cut to the run; other tensors with the batch's leading size are taken row by row. Padding
    positions would otherwise run through the model like tokens: left-padded rows put pad
    tokens at the first positions and shift the real ones'."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, Tensor) or mask.dim() != 2 or not mask.numel():
        return None, ""
    keep = mask != 0
    if bool(keep.all()):
        return None, ""
    if not bool(((mask == 0) | (mask == 1)).all()):
        return None, "its attention_mask holds values other than 0 and 1"
    if not any(isinstance(batch.get(k), Tensor) for k in ("input_ids", "inputs_embeds")):
        return None, "no input_ids / inputs_embeds: its mask need not be over tokens"
    n, t = keep.shape
    per_token, per_row = _kinds(batch, n, t, seq2seq)
    full = {}
    for k, v in batch.items():
        if not isinstance(v, Tensor):
            continue
        if k in per_token and v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == t:
            v = v.expand(n, *v.shape[1:])  # broadcast position_ids
        if v.dim() == 0 or v.shape[0] != n:
            return None, f"{k!r} has {v.shape[0] if v.dim() else 'no'} rows, the mask {n}"
        if k in per_token and tuple(v.shape[:2]) != (n, t):
            return None, f"{k!r} of shape {tuple(v.shape)} does not match the mask's {(n, t)}"
        if k not in per_token | per_row and t in v.shape[1:]:
            return None, (f"{k!r} has an axis as long as the mask ({t}): whether it is per "
                          "token cannot be told")
        full[k] = v
    spans = []
    for i, row in enumerate(keep):
        idx = row.nonzero().flatten()
        if idx.numel() == 0:
            return None, f"row {i} is all padding"
        if idx.numel() != int(idx[-1] - idx[0]) + 1:
            return None, f"row {i}'s mask has a hole (packed sequences?)"
        spans.append((int(idx[0]), int(idx[-1]) + 1))
    groups: dict[int, list[int]] = {}
    for i, (a, b) in enumerate(spans):
        groups.setdefault(b - a, []).append(i)
    out = []
    for rows in groups.values():
        part = Piece()
        part.rows = tuple(rows)
        for k, v in batch.items():
            if k not in full:
                part[k] = v
            elif k in per_token:
                part[k] = torch.cat([full[k][i : i + 1, spans[i][0] : spans[i][1]] for i in rows])
            else:
                part[k] = v[rows]
        out.append(part)
    return out, ""


def is_hf(model: nn.Module) -> bool:
    """A Hugging Face style model (called with ``input_ids=`` keyword)."""
    return hasattr(model, "config")


def _takes(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` accepts the keyword ``name`` (or any keyword)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def call_model(model: nn.Module, batch: Any, *, labels: bool = False) -> Any:
    """Run ``model`` on one calibration batch.

    A token-id tensor goes in as ``model(input_ids=ids)`` for a Hugging Face model (one with a
    ``config``; ``use_cache=False`` when it has a cache), as ``model(x)`` otherwise; a dict is
    passed as keyword arguments, a tuple / list as positional ones. ``labels=True`` adds
    ``labels=input_ids`` for a Hugging Face language-model loss.
    """
    batch = to_device(batch, model_device(model))
    if labels and not _takes(model, "labels"):
        raise NoLossError(f"{type(model).__name__}.forward takes no labels= (no built-in loss): "
                          "fisher=True needs loss_fn(model, batch) (collect_stats) there")
    if isinstance(batch, dict):
        kwargs = dict(batch)
        if labels and "labels" not in kwargs:
            if "input_ids" not in kwargs:
                raise NoLossError("fisher=True on a dict batch needs 'input_ids' or 'labels'")
            ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and isinstance(ids, Tensor) and mask.shape == ids.shape:
                ids = ids.masked_fill(mask == 0, -100)  # padding is no target of the loss
            kwargs["labels"] = ids
        lab = kwargs.get("labels")
        if isinstance(lab, Tensor) and not lab.is_floating_point() and lab.dtype != torch.long:
            kwargs["labels"] = lab.long()  # the loss takes int64 targets
        return model(**kwargs)
    if isinstance(batch, (tuple, list)):
        if labels:
            raise NoLossError("fisher=True on a tuple batch needs loss_fn")
        return model(*batch)
    if isinstance(batch, Tensor):
        if is_hf(model) and not batch.is_floating_point():
            kwargs: dict[str, Any] = {"input_ids": batch}
            if getattr(model.config, "use_cache", None) is not None:
                kwargs["use_cache"] = False
            if labels:
                kwargs["labels"] = batch.long()  # the loss takes int64 targets
            return model(**kwargs)
        if labels:
            raise NoLossError("fisher=True on a model without an LM loss needs loss_fn")
        return model(batch)
    raise TypeError(f"unsupported calibration batch type {type(batch).__name__}")


def check_batches(batches: Iterable[Any] | None) -> list[Any]:
    """The batches as a list; rejects an empty calibration and raw strings."""
    batches = [] if batches is None else list(batches)
    if not batches:
        raise ValueError(
            "calibration is empty: give at least one batch (token-id tensors, input tensors, "
            "dicts of model kwargs, or texts through prepare_batches(texts, tokenizer))"
        )
    if any(isinstance(b, str) for b in batches):
        raise ValueError(
            "calibration texts need a tokenizer: turn them into token ids with "
            "prepare_batches(texts, tokenizer, seq_len) first"
        )
    return batches


#: token windows stacked into one forward + backward of the sensitivity pass, at most.
STACK_TOKENS = 512


def stack_windows(batches: Sequence[Any], max_tokens: int = STACK_TOKENS) -> list[Any]:
    """Consecutive token-id batches of one shape stacked along the batch axis, at most
    ``max_tokens`` tokens per stack; anything else (dicts, float inputs, other shapes) passes
    unchanged and ends a stack. For a causal LM without padding a stack computes what its
    windows do one by one — every token attends within its own row and the loss is the mean
    over the stack's tokens — in larger matrix products and fewer Python-level hook calls."""
    out: list[Any] = []
    run: list[Tensor] = []

    def flush() -> None:
        if run:
            out.append(run[0] if len(run) == 1 else torch.cat(run, 0))
            run.clear()

    for b in batches:
        stackable = isinstance(b, Tensor) and b.dim() == 2 and not b.is_floating_point()
        if not stackable:
            flush()
            out.append(b)
            continue
        if run and (b.shape[1:] != run[0].shape[1:] or b.dtype != run[0].dtype
                    or (sum(t.shape[0] for t in run) + b.shape[0]) * b.shape[1] > max_tokens):
            flush()
        run.append(b)
    flush()
    return out


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    enc = tokenizer(text)
    ids = enc["input_ids"] if isinstance(enc, Mapping) or hasattr(enc, "keys") else enc
    if isinstance(ids, Tensor):
        return [int(i) for i in ids.reshape(-1).tolist()]
    if ids and isinstance(ids[0], (list, tuple)):  # a batch of one
        ids = ids[0]
    return [int(i) for i in ids]


def prepare_batches(calibration: Any, tokenizer: Any = None, seq_len: int = 256) -> list[Any]:
    """Calibration input as a list of model batches.

    Texts (a string or a list of strings) are tokenized with ``tokenizer`` (a callable
    returning ``input_ids``, e.g. a Hugging Face tokenizer), concatenated, and cut into
    ``(1, seq_len)`` LongTensor windows (a shorter tail is dropped unless it is the only
    window). Tensors, dicts and tuples pass through (a 1-D id tensor gains a batch dim).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be ≥ 1, got {seq_len}")
    if isinstance(calibration, (str, Tensor, dict)):
        calibration = [calibration]
    items = [] if calibration is None else list(calibration)
    if not items:
        raise ValueError("calibration is empty: give at least one text or batch")
    texts = [c for c in items if isinstance(c, str)]
    if texts and len(texts) != len(items):
        raise TypeError("calibration mixes texts and tensors; give one kind")
    if not texts:
        return [c.unsqueeze(0) if isinstance(c, Tensor) and c.dim() == 1 else c for c in items]
    if tokenizer is None:
        raise ValueError("calibration texts need a tokenizer: prepare_batches(texts, tokenizer)")
    ids: list[int] = []
    for t in texts:
        ids.extend(_token_ids(tokenizer, t))
    if not ids:
        raise ValueError("calibration is empty: the texts produced no tokens")
    full = len(ids) // seq_len
    if full == 0:
        return [torch.tensor([ids], dtype=torch.long)]
    flat = torch.tensor(ids[: full * seq_len], dtype=torch.long)
    return [w.unsqueeze(0) for w in flat.view(full, seq_len)]
