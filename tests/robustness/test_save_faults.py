"""Fault injection on saved files: a malformed manifest or report, a bit flip, a foreign or
linked folder, a failed load into the caller's skeleton — each named, the caller's model and
files left as they were."""

from __future__ import annotations

import json

import pytest
import torch

import slimfx
from robustness._util import Frozen, feats, mlp, out_of
from robustness._util import opt as _opt

X = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    new = _opt(mlp(), feats(3))
    d = tmp_path_factory.mktemp("s") / "m"
    slimfx.save(new, d)
    return new, d


def test_malformed_manifest_and_report_name_the_file(saved, tmp_path):
    _, d = saved
    import shutil

    for name in ("slimfx.json", "report.json"):
        c = tmp_path / name.split(".")[0]
        shutil.copytree(d, c)
        (c / name).write_text("{not json")
        with pytest.raises(ValueError, match=rf"{name}: not a valid .*not JSON"):
            slimfx.load(c, mlp(1), verify=False)


def test_cli_report_on_bad_json(saved, tmp_path, capsys):
    from slimfx.cli import main

    (tmp_path / "list.json").write_text("[1, 2]")
    rep = json.loads((saved[1] / "report.json").read_text())
    del rep["sites"]
    (tmp_path / "nosites.json").write_text(json.dumps(rep))
    assert main(["report", str(tmp_path / "list.json")]) == 2
    assert "list.json: not a valid slimfx report (a JSON list, not an object)" in (
        capsys.readouterr().err
    )
    assert main(["report", str(tmp_path / "nosites.json")]) == 2
    assert "nosites.json: not a valid slimfx report (KeyError: 'sites')" in capsys.readouterr().err


def test_cli_flags_that_cannot_go_together_are_refused(saved, tmp_path, capsys):
    from slimfx.cli import main

    assert main(["report", str(saved[1]), "--diff", str(saved[1]), "--plot",
                 str(tmp_path / "p.png")]) == 2  # fmt: skip
    assert "--diff prints what changed" in capsys.readouterr().err
    assert main(["calibrate-target", "--threads", "0", "--out",
                 str(tmp_path / "t.json")]) == 2  # fmt: skip
    assert "--threads must be ≥ 1, got 0" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not a latency cache \(not JSON"):
        from slimfx.cost.target import MeasuredCache

        MeasuredCache(bad).load()


def test_a_failed_load_leaves_the_callers_skeleton_as_it_was(saved, tmp_path):
    """A hand-edited plan.json (verify=False) whose forms no longer match the weights: the load
    fails naming the weights file, and the skeleton passed as model= keeps its own modules (it
    was left half rewritten, with empty factors)."""
    import shutil

    _, d = saved
    c = tmp_path / "edited"
    shutil.copytree(d, c)
    plan = json.loads((c / "plan.json").read_text())
    site = next(k for k, v in plan["decisions"].items() if v["kind"] != "dense")
    plan["decisions"][site] = {"kind": "lowrank", "rank": 3, "method": "svd"}
    (c / "plan.json").write_text(json.dumps(plan))
    skeleton = mlp(1)
    before = [(n, type(m)) for n, m in skeleton.named_modules()]
    with pytest.raises(ValueError, match=r"slimfx.safetensors does not load into the model"):
        slimfx.load(c, skeleton, verify=False)
    assert [(n, type(m)) for n, m in skeleton.named_modules()] == before
    assert out_of(skeleton, X).shape == (2, 16) and not hasattr(skeleton, "slimfx_report")


def test_unverified_loads_name_the_file_and_old_manifests_warn(saved, tmp_path):
    import shutil

    _, d = saved
    c = tmp_path / "cut"
    shutil.copytree(d, c)
    f = c / "slimfx.safetensors"
    f.write_bytes(f.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match=r"slimfx.safetensors does not load .*verify=True\) checks"):
        slimfx.load(c, mlp(1), verify=False)
    m = tmp_path / "nofiles"
    shutil.copytree(d, m)
    info = json.loads((m / "slimfx.json").read_text())
    del info["files"]
    (m / "slimfx.json").write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="lists no file checksums"):
        slimfx.load(m, mlp(1))


def test_bit_flip_is_caught_on_load_and_verify_false_skips(saved, tmp_path):
    import shutil

    new, d = saved
    c = tmp_path / "flip"
    shutil.copytree(d, c)
    f = c / "slimfx.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x10  # a bit in the last tensor's data
    f.write_bytes(bytes(raw))
    skeleton = mlp(1)
    frozen = Frozen(skeleton, X)
    with pytest.raises(ValueError, match=r"slimfx.safetensors: SHA-256 mismatch"):
        slimfx.load(c, skeleton)
    frozen.check()  # checked before the skeleton is touched
    loaded = slimfx.load(c, mlp(1), verify=False)
    assert not torch.equal(out_of(loaded, X), out_of(new, X))


def test_save_refuses_a_foreign_directory_unless_overwrite(saved, tmp_path):
    new, _ = saved
    d = tmp_path / "mine"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"my own checkpoint")
    with pytest.raises(FileExistsError, match=r"not an earlier slimfx save.*overwrite=True"):
        slimfx.save(new, d)
    assert (d / "model.safetensors").read_bytes() == b"my own checkpoint"
    slimfx.save(new, d, overwrite=True)
    assert torch.equal(out_of(slimfx.load(d, mlp(1)), X), out_of(new, X))
    slimfx.save(new, d)  # an earlier slimfx save is replaced without overwrite=
    (d / "extra.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="extra.txt"):
        slimfx.save(new, d)
    with pytest.raises(FileExistsError, match="is a file"):
        slimfx.save(new, d / "extra.txt")
    # the user's files are named before a save's own names; a save without its manifest is
    # said to be one
    (d / "zz-notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"save \(extra\.txt, zz-notes\.txt, plan\.json"):
        slimfx.save(new, d)
    (d / "zz-notes.txt").unlink()
    (d / "extra.txt").unlink()
    (d / "slimfx.json").unlink()
    with pytest.raises(FileExistsError, match=r"slimfx save \([^)]*: no valid manifest\)"):
        slimfx.save(new, d)


def test_a_save_keeps_links_modes_and_the_working_directory(saved, tmp_path, monkeypatch):
    """A symlinked target is saved where it points (it became a real folder, the old save
    left behind the link); the save is readable by others as the umask allows (it was 0700,
    the weights 0600) and an existing folder keeps its mode; the working directory, a folder
    holding it and a mount point are refused (the swap would delete or cannot rename them)."""
    import os
    import stat

    new, _ = saved
    big = tmp_path / "big" / "model"
    slimfx.save(new, big)
    os.chmod(big, 0o750)
    (tmp_path / "proj").mkdir()
    link = tmp_path / "proj" / "model"
    link.symlink_to(big)
    old_umask = os.umask(0o022)
    try:
        slimfx.save(new, link)
        fresh = tmp_path / "fresh"
        slimfx.save(new, fresh)
    finally:
        os.umask(old_umask)
    assert link.is_symlink() and link.resolve() == big.resolve()
    assert not [p for p in (tmp_path / "proj").iterdir() if p != link]  # no leftovers
    assert stat.S_IMODE(big.stat().st_mode) == 0o750  # the folder's own mode kept
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in fresh.iterdir()} == {0o644}
    assert torch.equal(out_of(slimfx.load(link, mlp(1)), X), out_of(new, X))
    monkeypatch.chdir(fresh)
    for target in (".", fresh, tmp_path):
        with pytest.raises(ValueError, match="the working directory: a save replaces"):
            slimfx.save(new, target, overwrite=True)
    assert (fresh / "slimfx.safetensors").is_file()
    monkeypatch.setattr("slimfx.files.os.path.ismount", lambda p: str(p) == str(big))
    with pytest.raises(ValueError, match="is a mount point"):
        slimfx.save(new, big)


def test_export_onnx_blames_a_wrong_width_input(saved, tmp_path):
    pytest.importorskip("onnxscript")
    from slimfx.backends.onnx import export_onnx

    new, _ = saved
    frozen = Frozen(new, X)
    with pytest.raises(ValueError, match=r"example inputs \[\(1, 63\) torch.float32\] do not fit"):
        export_onnx(new, tmp_path / "m.onnx", (torch.randn(1, 63),))
    frozen.check()
