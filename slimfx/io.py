"""Saving and loading rewritten models, all or nothing, checked on load.

``slimfx.save(model, dir)`` writes ``plan.json`` (what was rewritten), ``slimfx.safetensors``
(every tensor, compressed forms included; shared tensors stored once), ``report.json`` when the
model has a report, for a Hugging Face model its ``config.json``, and the manifest
``slimfx.json`` with the SHA-256 of every other file. ``slimfx.load(dir)`` verifies those
hashes, rebuilds the architecture (from the HF config, or from a skeleton ``model=`` you pass),
swaps in empty slimfx modules of the planned shapes, and loads the tensors. The weights file
is not named ``model.safetensors`` on purpose: ``from_pretrained`` on a save then fails ("no
file named model.safetensors") instead of building the dense model with the rewritten weights
missing and randomly initialized. Saves of format version 1 (``model.safetensors``) still load.
``torch.save`` / ``torch.load(weights_only=False)`` of the whole module also works.

Atomicity: every file is written (and fsynced) into a temporary directory beside ``dir``,
which then replaces ``dir`` in one step — an atomic exchange of the two directories
(``renameat2(RENAME_EXCHANGE)``) where the OS offers it, else two renames with the old save
parked at ``.<name>.slimfx-old`` in between, which ``load`` and the next ``save`` put back if
an interruption left ``dir`` missing. An interrupted save (an exception, ``KeyboardInterrupt``)
therefore leaves either the old save or the new one at ``dir``, never a mix; leftover
temporary directories are removed by the next save to the same place.

Safety: ``save`` refuses to replace a non-empty directory that is not an earlier slimfx save
(or that holds files slimfx did not write) unless ``overwrite=True`` (CLI ``--overwrite``), and
a path that is a file. ``load(verify=False)`` skips the hashing (reading every byte once) for
speed; a mismatch otherwise raises ``ValueError`` naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from slimfx import files
from slimfx.passes.swap import empty_like_plan
from slimfx.passes.transaction import transaction
from slimfx.planning.plan import Plan

__all__ = ["save", "load", "is_slimfx_save", "check_save_target", "SAVE_FORMAT", "WEIGHTS_FILE"]

SAVE_FORMAT = "slimfx.save"
SAVE_VERSION = 2
#: the weights of a save (format version 2; version 1 named them ``model.safetensors``, which
#: ``from_pretrained`` read as a dense checkpoint with weights missing)
WEIGHTS_FILE = "slimfx.safetensors"
_V1_WEIGHTS_FILE = "model.safetensors"
#: files an earlier save (or the CLI beside it) may hold without ``overwrite=True``
#: the generation settings of a model that generates (written beside config.json)
GENERATION_CONFIG = "generation_config.json"

#: a checkpoint's tokenizer files, which the streamed optimize copies into its output (so
#: ``AutoTokenizer.from_pretrained(out)`` works as on the checkpoint)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

_OWN_FILES = {
    "plan.json",
    "report.json",
    WEIGHTS_FILE,
    _V1_WEIGHTS_FILE,
    "config.json",
    "slimfx.json",
    "report.md",
    "report.png",
    "generation_config.json",
    *TOKENIZER_FILES,
}


def _manifest(d: Path) -> dict[str, Any] | None:
    """The manifest of a directory ``save`` wrote, or ``None`` when it has none."""
    from slimfx.validate import read_json_object

    p = d / "slimfx.json"
    if not p.is_file():
        return None
    info = read_json_object(p, "slimfx save manifest")
    if info.get("format", SAVE_FORMAT) != SAVE_FORMAT or "model_class" not in info:
        raise ValueError(f"{p}: not a slimfx save manifest (no model_class / wrong format)")
    version = info.get("version", 1)
    if not isinstance(version, int) or version > SAVE_VERSION:
        raise ValueError(f"{p}: save format version {version!r}; this slimfx reads versions up "
                         f"to {SAVE_VERSION}: saved by a newer slimfx, upgrade it to load this save")
    return info


def manifest_info(model_class: str, hf: bool) -> dict[str, Any]:
    """The manifest fields of a save written now (``files.finish`` adds the checksums)."""
    info: dict[str, Any] = {
        "format": SAVE_FORMAT,
        "version": SAVE_VERSION,
        "model_class": model_class,
    }
    if hf:
        info["hf"] = True
    return info


def weights_path(d: Path, info: Mapping[str, Any]) -> Path:
    """The weights file of the save at ``d`` with manifest ``info`` (its format version names
    it)."""
    return d / (WEIGHTS_FILE if info.get("version", 1) >= 2 else _V1_WEIGHTS_FILE)


def _own_names(d: Path) -> tuple[set[str], bool]:
    """The file names a save at ``d`` may hold (its manifest's too), and whether it has a
    readable manifest."""
    try:
        info = _manifest(d)
    except ValueError:
        info = None
    return _OWN_FILES | set((info or {}).get("files", {})), info is not None


def is_slimfx_save(directory: str | Path) -> bool:
    """Whether ``directory`` holds an earlier ``slimfx.save`` and nothing else."""
    d = Path(directory)
    own, manifest = _own_names(d)
    return manifest and all(p.name in own for p in d.iterdir())


def check_save_target(d: Path, overwrite: bool = False) -> Path:
    """The directory ``save(..., overwrite=overwrite)`` writes for ``d``, checked before any
    work (``files.writable_target``): ``FileExistsError`` for a file there or a non-empty
    directory that is not an earlier slimfx save, ``ValueError`` where no save could replace
    it."""
    return files.writable_target(d, "slimfx.save", overwrite, is_slimfx_save,
                                 " that is not an earlier slimfx save",
                                 own=_own_names(files.target(d))[0])


def save(
    model: nn.Module,
    directory: str | Path,
    *,
    overwrite: bool = False,
    extras: Mapping[str, Callable[[Path], Any]] | None = None,
) -> Path:
    """Write a rewritten model (from ``optimize``) to ``directory``, all or nothing.

    - ``overwrite``: replace a non-empty directory that is not an earlier slimfx save (its
      whole content is replaced). An earlier slimfx save is always replaced.
    - ``extras``: file name → writer called with the file's path inside the new save (the CLI
      writes ``report.md`` and ``report.png`` this way); hashed like every file.

    A ``torch.compile`` wrapper is unwrapped (its ``_orig_mod`` is saved). Raises
    ``ValueError`` for a model without a slimfx report, ``FileExistsError`` for a target it
    may not replace (before anything is written)."""
    from safetensors.torch import save_model

    from slimfx.api import REPORT_ATTR
    from slimfx.validate import check_model

    model = check_model(model, what="save", allow_rewritten=True)
    rep = getattr(model, REPORT_ATTR, None)
    if rep is None:
        raise ValueError("save() expects a model returned by slimfx.optimize (it carries the plan)")
    plan = Plan.from_dict(rep.meta["plan"])
    for name in extras or {}:
        if name in ("slimfx.json", "plan.json", WEIGHTS_FILE) or Path(name).name != name:
            raise ValueError(f"extras: {name!r} is not a free file name in a save")
    d = check_save_target(directory, overwrite)  # "." and "out/" resolved; before any work
    with files.writing(d) as tmp:
        plan.save(tmp / "plan.json")
        rep.save(tmp / "report.json")
        save_model(model, str(tmp / WEIGHTS_FILE))
        hf = hasattr(model, "config") and hasattr(model.config, "to_json_string")
        info = manifest_info(f"{type(model).__module__}.{type(model).__qualname__}", hf)
        if hf:
            (tmp / "config.json").write_text(model.config.to_json_string())
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "to_json_string"):  # eos ids, lengths, penalties
            (tmp / GENERATION_CONFIG).write_text(gen.to_json_string(use_diff=False))
        for name, write in (extras or {}).items():
            write(tmp / name)
        return files.finish(tmp, d, "slimfx.json", info)


def _verify(d: Path, info: Mapping[str, Any]) -> None:
    listed = info.get("files")
    if listed is None:  # a save from before checksums: nothing to verify against
        warnings.warn(
            f"{d / 'slimfx.json'} lists no file checksums (a save from before they were "
            "recorded, or an edited manifest): nothing was verified; save it again to add them",
            stacklevel=3,
        )
        return
    if not isinstance(listed, Mapping):
        raise ValueError(f"{d / 'slimfx.json'}: field 'files' must be an object")
    for name, digest in listed.items():
        p = d / name
        if not p.is_file():
            raise ValueError(f"{p}: listed in slimfx.json but missing; the save is incomplete")
        got = files.sha256(p)
        if got != digest:
            raise ValueError(
                f"{p}: SHA-256 mismatch (slimfx.json records {str(digest)[:16]}…, the file "
                f"hashes to {got[:16]}…): the file changed after slimfx.save wrote it "
                "(corrupted or edited). Save again, or load(..., verify=False) to skip the check"
            )


def _hf_skeleton(d: Path, saved_class: str) -> nn.Module:
    """A fresh Hugging Face model of the saved class, from the saved ``config.json``: the
    manifest's ``model_class`` when it is a transformers class (only ``transformers.*`` is
    imported), else the config's first ``architectures`` entry."""
    import importlib

    import transformers

    cfg = transformers.AutoConfig.from_pretrained(d, trust_remote_code=False)

    def model_class(obj: Any) -> type | None:
        ok = isinstance(obj, type) and issubclass(obj, transformers.PreTrainedModel)
        return obj if ok else None

    module, _, name = saved_class.rpartition(".")
    cls = None
    if module == "transformers" or module.startswith("transformers."):
        try:
            cls = model_class(getattr(importlib.import_module(module), name, None))
        except ImportError:
            cls = None
    for arch in [] if cls is not None else list(getattr(cfg, "architectures", None) or []):
        cls = model_class(getattr(transformers, arch, None))
        if cls is not None:
            break
    if cls is None:
        raise ValueError(
            f"{d}: saved from {saved_class or 'an unnamed class'}, which is not a transformers "
            "model class this transformers version has (nor is any of the config's "
            "architectures): pass model= (a fresh instance of it)"
        )
    return cls._from_config(cfg)


def load(
    directory: str | Path, model: nn.Module | None = None, *, verify: bool = True,
    cpu_kernels: bool = True,
) -> nn.Module:
    """Load what ``save`` wrote. ``model``: a freshly built instance of the original
    architecture (weights are overwritten); optional for Hugging Face models. ``verify``:
    check every file's SHA-256 against the manifest first (``False`` skips reading each file
    twice); a mismatch raises ``ValueError`` naming the file, before ``model`` is touched.
    ``cpu_kernels``: pack the int4/int8 linears for torch's CPU kernels
    (``slimfx.prepare_cpu``), as ``optimize`` does; ``False`` keeps the reference ops. Quantized
    KV caches are read in place at decode steps, as ``optimize`` installs it
    (``slimfx.forms.kv.fused.install_in_place_decode``)."""
    d = Path(directory).expanduser()
    files.recover(d)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} {'is a file, not' if d.exists() else 'does not exist:'} "
                                "a directory written by slimfx.save")
    if not (d / "plan.json").exists():
        raise FileNotFoundError(f"{d} has no plan.json: not a directory written by slimfx.save")
    info = _manifest(d)
    if info is None:
        raise FileNotFoundError(f"{d} has no slimfx.json: not a directory written by slimfx.save")
    if verify:
        _verify(d, info)
    plan = Plan.load(d / "plan.json")
    report = None
    if (d / "report.json").exists():
        from slimfx.report import Report
        from slimfx.validate import read_json_object

        raw = read_json_object(d / "report.json", "slimfx report")
        try:
            report = Report.from_dict(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{d / 'report.json'}: not a valid slimfx report ({e!r})") from e
    if model is None:
        if not info.get("hf"):
            raise ValueError(
                "this model is not a Hugging Face model: pass model= (a fresh instance)"
            )
        return _build_into(_hf_skeleton(d, str(info.get("model_class", ""))), d, info, plan,
                           report, verify, cpu_kernels)  # fmt: skip
    model = check_skeleton(model)
    # the caller's skeleton: a failure (an edited plan.json, a truncated file) puts its module
    # tree back as it was (it was left half rewritten with empty factors)
    with transaction(model):
        return _build_into(model, d, info, plan, report, verify, cpu_kernels)


def _build_into(
    model: nn.Module, d: Path, info: Mapping[str, Any], plan: Plan, report: Any, verify: bool,
    cpu_kernels: bool,
) -> nn.Module:
    """``load``'s rewrite of the skeleton ``model`` into the saved plan's forms and its weights
    from ``d``."""
    from safetensors.torch import load_model

    from slimfx.forms.kv.apply import empty_kv_like_plan, split_plan
    from slimfx.ir.find import discover_linear_sites

    model.eval()
    sites = discover_linear_sites(model)
    linear, kv = split_plan(plan)
    if kv:  # the attention sites as optimize found them: before the linears are rewritten
        from slimfx.ir.find import inspect_attention_sites

        att = inspect_attention_sites(model)[0]
    empty_like_plan(model, linear, sites)
    if kv:  # attention sites: compressed caches (low-rank k/v modules, cache hooks), MLA
        from slimfx.forms.mla.config import MLAConfig
        from slimfx.forms.mla.plan import empty_mla_like_plan

        mla = {k: c for k, c in kv.items() if isinstance(c, MLAConfig)}
        empty_kv_like_plan(model, {k: c for k, c in kv.items() if k not in mla}, att)
        empty_mla_like_plan(model, mla, att)
    weights = weights_path(d, info)
    try:
        load_model(model, str(weights), strict=True)
    except Exception as e:  # noqa: BLE001 - a file verify=False did not check (truncated, edited)
        raise ValueError(
            f"{weights} does not load into the model its plan.json and "
            f"config.json describe ({type(e).__name__}: {str(e)[:300]})"
            + ("; load(..., verify=True) checks every file against the manifest first"
               if not verify else "")
        ) from e
    if (d / GENERATION_CONFIG).is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(d)
    if report is not None:  # optimized for backend="triton": its kernels again
        from slimfx.api import lower_for_backend

        lower_for_backend(model, report)
    if cpu_kernels:
        from slimfx.ir.cpu_runtime import prepare_cpu

        prepare_cpu(model)
    if kv:  # quantized caches read in place at decode steps, as optimize installs it
        from slimfx.forms.kv.fused import install_in_place_decode

        install_in_place_decode(model)
    if report is not None:
        from slimfx.api import REPORT_ATTR, _refresh_runs_as
        from slimfx.ir.cpu_runtime import cpu_runtimes

        setattr(model, REPORT_ATTR, report)
        _refresh_runs_as(model, cpu_runtimes(model))  # what runs each site in this process
    return model


def check_skeleton(model: Any) -> nn.Module:
    """The ``model=`` of ``load``: a fresh eager module (a compiled wrapper is unwrapped)."""
    from slimfx.validate import check_model

    return check_model(model, what="load", allow_rewritten=True)
