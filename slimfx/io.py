"""Saving and loading rewritten models.

``slimfx.save(model, dir)`` writes ``plan.json`` (what was rewritten), ``model.safetensors``
(every tensor, compressed forms included; shared tensors stored once), ``report.json`` when the
model has a report, and — for a Hugging Face model — its ``config.json``. ``slimfx.load(dir)``
rebuilds the architecture (from the HF config, or from a skeleton ``model=`` you pass), swaps
in empty slimfx modules of the planned shapes, and loads the tensors. ``torch.save`` /
``torch.load(weights_only=False)`` of the whole module also works.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from slimfx.passes.swap import empty_like_plan
from slimfx.planning.plan import Plan

__all__ = ["save", "load"]


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write a rewritten model (from ``optimize``) to ``directory``."""
    from safetensors.torch import save_model

    from slimfx.api import REPORT_ATTR

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rep = getattr(model, REPORT_ATTR, None)
    if rep is None:
        raise ValueError("save() expects a model returned by slimfx.optimize (it carries the plan)")
    plan = Plan.from_dict(rep.meta["plan"])
    plan.save(d / "plan.json")
    rep.save(d / "report.json")
    save_model(model, str(d / "model.safetensors"))
    info = {"model_class": f"{type(model).__module__}.{type(model).__qualname__}"}
    if hasattr(model, "config") and hasattr(model.config, "to_json_string"):
        (d / "config.json").write_text(model.config.to_json_string())
        info["hf"] = True
    (d / "slimfx.json").write_text(json.dumps(info, indent=1))
    return d


def load(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load what ``save`` wrote. ``model``: a freshly built instance of the original
    architecture (weights are overwritten); optional for Hugging Face models."""
    from safetensors.torch import load_model

    from slimfx.ir.find import discover_linear_sites

    d = Path(directory)
    if not (d / "plan.json").exists():
        raise FileNotFoundError(f"{d} has no plan.json: not a directory written by slimfx.save")
    plan = Plan.load(d / "plan.json")
    info = json.loads((d / "slimfx.json").read_text())
    if model is None:
        if not info.get("hf"):
            raise ValueError("this model is not a Hugging Face model: pass model= (a fresh instance)")
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(d)
        model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    sites = discover_linear_sites(model)
    empty_like_plan(model, plan, sites)
    load_model(model, str(d / "model.safetensors"), strict=True)
    if (d / "report.json").exists():
        from slimfx.api import REPORT_ATTR
        from slimfx.report import Report

        setattr(model, REPORT_ATTR, Report.load(d / "report.json"))
    return model
