"""The save format against what else reads a folder: ``from_pretrained`` must not take a save
for a dense checkpoint (its rewritten weights missing, randomly initialized); saves of the
earlier format still load; a newer format is refused."""

from __future__ import annotations

import json

import pytest
import torch

import slimfx
from slimfx.models import tiny_llama

pytest.importorskip("transformers")


def test_from_pretrained_refuses_a_save_and_version_1_saves_still_load(tmp_path):
    """A save's weights are not ``model.safetensors``: ``from_pretrained`` on it built the
    dense model with every rewritten weight missing (randomly initialized, a warning only);
    now it fails. A version-1 save (``model.safetensors``) still loads;
    a manifest from a newer format is refused."""
    from transformers import AutoModelForCausalLM

    calib = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i))
             for i in range(3)]
    new = slimfx.optimize(tiny_llama(), 0.6, calibration=calib, progress=False)
    d = tmp_path / "m"
    slimfx.save(new, d)
    assert (d / "slimfx.safetensors").is_file() and not (d / "model.safetensors").exists()
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(d)
    x = torch.randint(0, 256, (1, 12))
    info = json.loads((d / "slimfx.json").read_text())
    assert info["version"] == 2
    (d / "slimfx.safetensors").rename(d / "model.safetensors")
    info["files"]["model.safetensors"] = info["files"].pop("slimfx.safetensors")
    (d / "slimfx.json").write_text(json.dumps({**info, "version": 1}))
    torch.testing.assert_close(slimfx.load(d)(x).logits, new(x).logits, rtol=0, atol=0)
    (d / "slimfx.json").write_text(json.dumps({**info, "version": 3}))
    with pytest.raises(ValueError, match="version 3; this slimfx reads versions up to 2"):
        slimfx.load(d)
