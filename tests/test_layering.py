"""Layering: every import inside slimfx points down the one-way flow (docs/ARCHITECTURE.md).

The checker parses each ``slimfx/**/*.py`` with ``ast`` (imports inside functions and under
``TYPE_CHECKING`` count too), resolves relative imports, and checks each slimfx import against
the rule of the importing file's package. Top-level modules (``slimfx/api.py``, ...) may import
everything; a package with no rule is itself a failure, so a new package must get one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "slimfx"

_SOLVE = "slimfx.planning.solve"
_PLANNING_NOT_SOLVE = ("slimfx.planning", (_SOLVE,))
#: the bottom every layer may import: the storage formats and the site pool (leaves) and the
#: form registry (which imports only planning's configs and shapes; it names other layers'
#: pieces as strings and resolves them on demand — see slimfx/forms/registry.py).
_BASE = ("slimfx.formats", "slimfx.pool", "slimfx.forms")

#: package → (allowed prefixes, each either "name" or (name, denied sub-prefixes)).
RULES: dict[str, tuple] = {
    "planning": ("slimfx.planning",),
    "forms": ("slimfx.forms", "slimfx.planning.configs", "slimfx.planning.shapes"),
    "numerics": ("slimfx.numerics", "slimfx.planning.configs", *_BASE),
    "ir": ("slimfx.ir", "slimfx.planning.configs", "slimfx.planning.shapes", *_BASE),
    "cost": ("slimfx.cost", "slimfx.ir", _PLANNING_NOT_SOLVE, "slimfx.numerics", *_BASE),
    "passes": ("slimfx.passes", "slimfx.ir", _PLANNING_NOT_SOLVE, "slimfx.numerics", *_BASE),
    "kernels": ("slimfx.kernels", "slimfx.ir", *_BASE),
    "backends": (
        *_BASE,
        "slimfx.backends",
        "slimfx.ir",
        "slimfx.kernels",
        "slimfx.passes",
        "slimfx.numerics",
        _PLANNING_NOT_SOLVE,
        "slimfx.report",  # a leaf (imports nothing from slimfx): backends report what they ran
        "slimfx.files",  # a leaf: exports write their files all or nothing
    ),
    # layer-streamed optimize: the in-memory pipeline's pieces run one block at a time, so it
    # orchestrates like the top level, but neither the api nor the cli import it back
    "stream": (
        *_BASE,
        "slimfx.stream",
        "slimfx.cost",
        "slimfx.ir",
        "slimfx.passes",
        "slimfx.planning",
        "slimfx.numerics",
        "slimfx.report",
        "slimfx.report_builder",
        "slimfx.loss_check",  # the report's sensitivity-floor warning, as optimize gives it
        "slimfx.stages",
        "slimfx.validate",
        "slimfx.io",
        "slimfx.files",
    ),
    "models": ("slimfx.models",),
    "data": ("slimfx.data",),
    "eval": ("slimfx.eval",),
}

#: a form folder (``slimfx/forms/<name>/``: every vertical piece of one form — config, numerics,
#: module, cache, rewrite) may import the generic layers below it and the registry, never the
#: solver; the generic layers reach a folder only through the registry.
FORM_FOLDER: tuple = (
    "slimfx.forms",
    "slimfx.files",
    "slimfx.ir",
    "slimfx.numerics",
    "slimfx.kernels",
    "slimfx.formats",
    _PLANNING_NOT_SOLVE,
)


def _is_form_folder(parts: list[str]) -> bool:
    return len(parts) >= 3 and parts[1] == "forms" and (PACKAGE / "forms" / parts[2]).is_dir()


#: top-level modules that are leaves (the others orchestrate and may import everything).
LEAVES: dict[str, tuple] = {
    "slimfx.formats": (),  # storage formats: imports nothing from slimfx
    "slimfx.files": (),  # all-or-nothing directory writes: imports nothing from slimfx
    "slimfx.pool": (),  # per-site work on threads: imports nothing from slimfx
    "slimfx.report": ("slimfx.forms",),  # labels and colours come from the form registry
}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_name(path: Path) -> str:
    """``slimfx/ir/find.py`` → ``slimfx.ir.find``; ``slimfx/ir/__init__.py`` → ``slimfx.ir``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, dotted target)`` of every import in ``source``, relative imports resolved.

    ``from X import a`` yields ``X.a`` (``a`` may be a submodule); ``from X import *`` yields X.
    """
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                out.append((node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"))
    return out


def _allowed(target: str, rule: tuple) -> bool:
    for entry in rule:
        prefix, denied = (entry, ()) if isinstance(entry, str) else entry
        if _under(target, prefix) and not any(_under(target, d) for d in denied):
            return True
    return False


def check_source(source: str, module: str, is_package: bool = False) -> list[str]:
    """Violations of the layering rules by the imports of ``source`` (module ``module``)."""
    parts = module.split(".")
    if parts[0] != "slimfx":
        raise ValueError(f"{module} is not inside slimfx")
    if module in LEAVES:
        rule, pkg = (module, *LEAVES[module]), module
    elif len(parts) == 1 or (len(parts) == 2 and not is_package):
        return []  # slimfx/__init__.py and top-level modules orchestrate: they may import all
    elif _is_form_folder(parts):
        rule, pkg = FORM_FOLDER, f"slimfx.forms.{parts[2]}"
    else:
        pkg = parts[1]
        if pkg not in RULES:
            return [f"{module}: package slimfx.{pkg} has no layering rule; add one to RULES"]
        rule = RULES[pkg]
    problems = []
    for line, target in imported_names(source, module, is_package):
        if _under(target, "slimfx") and not _allowed(target, rule):
            name = pkg if pkg.startswith("slimfx.") else f"slimfx.{pkg}"
            problems.append(f"{module}:{line} imports {target} ({name} may not)")
    return problems


def _package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_package_respects_layering():
    problems = []
    for path in _package_files():
        problems += check_source(
            path.read_text(), module_name(path), is_package=path.name == "__init__.py"
        )
    assert not problems, "layering violations:\n" + "\n".join(problems)


def test_checker_sees_the_whole_package():
    mods = {module_name(p) for p in _package_files()}
    assert {"slimfx.ir.capture", "slimfx.ir.find", "slimfx.planning.configs"} <= mods


@pytest.mark.parametrize(
    "module, source",
    [
        ("slimfx.passes.lowrank", "from slimfx.cost import estimate"),
        ("slimfx.passes.lowrank", "from slimfx.planning.solve import solve"),
        ("slimfx.passes.lowrank", "from slimfx.planning import solve"),
        ("slimfx.passes.rules.lowrank", "from ...cost.stats import gram"),
        ("slimfx.ir.find", "import slimfx.numerics"),
        ("slimfx.ir.find", "from slimfx.planning.plan import Plan"),
        ("slimfx.numerics.svd", "from slimfx.planning import Plan"),
        ("slimfx.planning.plan", "from slimfx.ir.sites import LinearSite"),
        ("slimfx.kernels.lowrank.triton", "from slimfx.passes import manager"),
        ("slimfx.backends.onnx", "from slimfx.cost import target"),
        ("slimfx.models.tiny", "from slimfx.ir import capture"),
        ("slimfx.data.calib", "import slimfx"),
        ("slimfx.ir.find", "def f():\n    from slimfx.api import optimize\n"),  # lazy import
        ("slimfx.forms.registry", "from slimfx.ir.modules import SlimLinear"),
        ("slimfx.forms.lowrank", "from slimfx.numerics import factorize"),
        ("slimfx.formats", "from slimfx.planning.configs import QuantConfig"),
        ("slimfx.report", "from slimfx.cost import target"),
        ("slimfx.newpkg.thing", "import torch"),  # a package with no rule
        ("slimfx.forms.kv.config", "from slimfx.planning.solve import solve"),
        ("slimfx.forms.kv.cache", "from slimfx.cost import target"),
        ("slimfx.forms.mla.convert", "from slimfx.cost import calibration"),
        ("slimfx.forms.mla.numerics", "from slimfx.planning.solve import solve"),
        ("slimfx.stream.optimize", "from slimfx.api import optimize"),
        ("slimfx.stream.optimize", "from slimfx.backends import onnx"),
    ],
)
def test_checker_catches_violation(module, source):
    assert check_source(source, module), f"{module}: {source!r} should be rejected"


@pytest.mark.parametrize(
    "module, source",
    [
        (
            "slimfx.passes.lowrank",
            "from slimfx.planning.plan import Plan\nfrom slimfx.ir import ops",
        ),
        ("slimfx.passes.lowrank", "from slimfx.planning import Plan, configs"),
        ("slimfx.cost.stats", "from slimfx.numerics import factorize\nimport slimfx.ir.find"),
        ("slimfx.ir.modules", "from . import ops\nfrom ..planning.configs import Decision"),
        ("slimfx.numerics.svd", "from slimfx.planning.configs import LowRankConfig"),
        (
            "slimfx.backends.eager",
            "from slimfx.kernels import registry\nfrom slimfx.passes import x",
        ),
        ("slimfx.api", "from slimfx.planning.solve import solve\nfrom slimfx.cost import estimate"),
        ("slimfx.planning.solve", "from .problem import BudgetProblem\nimport numpy"),
        ("slimfx.forms.builtin", "from slimfx.planning.configs import QuantConfig"),
        ("slimfx.numerics.quant", "from slimfx import formats\nfrom slimfx.forms import form_of"),
        ("slimfx.kernels.quant_linear.reference", "from slimfx.formats import pack_codes"),
        ("slimfx.report", "from slimfx import forms"),
        ("slimfx.forms.kv.cache", "from slimfx.planning.shapes import AttentionShape"),
    ],
)
def test_checker_accepts_allowed_imports(module, source):
    assert check_source(source, module) == []


def test_relative_import_in_package_init_resolves_to_the_package():
    # in slimfx/passes/__init__.py, "from . import x" means slimfx.passes.x
    assert imported_names("from . import rules", "slimfx.passes", is_package=True) == [
        (1, "slimfx.passes.rules")
    ]
    assert check_source("from ..cost import x", "slimfx.passes", is_package=True)


# ---------------------------------------------------------------- the form registry's pieces

#: piece → the package its built-in implementations live in, and the packages that may ask the
#: registry for it (its own and those above it): forms names pieces as strings, so the import
#: rules above cannot see these edges; this table is their rule.
PIECE_LAYERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "factorize": ("numerics", ("numerics", "cost", "passes", "backends")),
    "reconstruct": ("numerics", ("numerics", "cost", "passes", "backends")),
    "op": ("ir", ("ir", "kernels", "passes", "backends")),
    "module": ("ir", ("ir", "cost", "passes", "backends")),
    "rule": ("passes", ("passes", "backends")),
    "kernels": ("kernels", ("kernels", "backends")),
    "onnx_translation": ("backends", ("backends",)),
    "onnx_probe": ("backends", ("backends",)),
    "triton_lowering": ("backends", ("backends",)),
    "timed": ("cost", ("cost",)),
    "families": ("cost", ("cost",)),
}


def test_piece_table_covers_every_piece():
    from slimfx.forms import PIECES

    assert set(PIECES) | {"families"} == set(PIECE_LAYERS)


def test_builtin_pieces_live_in_their_layer():
    from slimfx import forms

    problems = []
    for form in forms.forms()[:6]:
        for piece, (layer, _) in PIECE_LAYERS.items():
            refs = list(form.families.values()) if piece == "families" else [getattr(form, piece)]
            for ref in refs:
                if isinstance(ref, str) and not ref.startswith(f"slimfx.{layer}"):
                    problems.append(f"{form.kind}.{piece} = {ref!r} is not in slimfx.{layer}")
    assert not problems, "\n".join(problems)


def _asked_pieces(source: str) -> list[tuple[int, str]]:
    """``(line, piece)`` of every ``<x>.get("piece")`` / ``.has`` / ``.why_not`` call."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "has", "why_not")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value in PIECE_LAYERS
        ):
            out.append((node.lineno, node.args[0].value))
    return out


def test_layers_ask_the_registry_only_for_pieces_at_or_below_them():
    problems = []
    for path in _package_files():
        module = module_name(path)
        parts = module.split(".")
        if len(parts) < 3 or parts[1] == "forms":
            continue
        for line, piece in _asked_pieces(path.read_text()):
            if parts[1] not in PIECE_LAYERS[piece][1]:
                problems.append(f"{module}:{line} asks for the {piece!r} piece")
    assert not problems, "pieces asked above their layer:\n" + "\n".join(problems)


def test_piece_checker_catches_a_layer_asking_too_high():
    src = 'form.get("rule")\nform.has("factorize")\nd.get("rank")\n'
    assert _asked_pieces(src) == [(1, "rule"), (2, "factorize")]
