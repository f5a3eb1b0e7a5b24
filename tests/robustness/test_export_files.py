"""ONNX exports write their files all or nothing: a failure while writing leaves the previous
export byte for byte (no truncated file, no temporary folder), a successful re-export replaces
every file of the set and removes a previous export's extra flush graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from slimfx.backends import onnx_kv  # noqa: E402
from slimfx.backends.onnx import export_onnx  # noqa: E402
from slimfx.forms.kv.config import KVQuantConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_failed_export_leaves_the_previous_file(tmp_path, monkeypatch):
    import onnx

    path = tmp_path / "m.onnx"
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    export_onnx(model, path, (torch.randn(2, 16),), external_data=True)
    before = _snapshot(tmp_path)
    assert set(before) == {"m.onnx", "m.onnx.data"}

    def broken(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx.checker, "check_model", broken)  # after the files are written
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(nn.Sequential(nn.Linear(16, 8)), path, (torch.randn(2, 16),), external_data=True)
    assert _snapshot(tmp_path) == before  # old model and data, no temporary folder
    # a successful export without external data removes the previous one's data file (it
    # would be left beside a model that does not read it), and leaves other files alone
    monkeypatch.undo()
    (tmp_path / "other.onnx.data").write_bytes(b"not ours")
    export_onnx(model, path, (torch.randn(2, 16),), external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "other.onnx.data"]
    assert onnx.load(str(path)).graph.initializer[0].data_location == onnx.TensorProto.DEFAULT


def test_kv_export_set_is_all_or_nothing(tmp_path, monkeypatch):
    """A previous set of three files (step graph, two flush graphs; their contents do not
    matter) survives an export interrupted after its first graph; a complete export of one
    flush graph then replaces the set and drops the stale second flush graph. (One layer, and
    each graph's ONNX translation replaced by a small file: what is checked is the files.)"""
    from slimfx.models import tiny_llama

    model, path = tiny_llama(seed=3, num_hidden_layers=1), tmp_path / "kv.onnx"
    (tmp_path / "kv.flush.onnx.bak").write_bytes(b"not a flush graph of this export")
    for i, name in enumerate(["kv.onnx", "kv.flush0.onnx", "kv.flush1.onnx"]):
        (tmp_path / name).write_bytes(bytes([i]) * 100)
    before = _snapshot(tmp_path)

    calls = []

    def write(program, path, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        path.write_bytes(b"graph " + path.name.encode())  # what is checked is the files
        return []  # no site exported dense

    def fail_on_second(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(a[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write(*a, **k)

    monkeypatch.setattr(onnx_kv, "_to_onnx", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        onnx_kv.export_onnx_kv(model, path, KVQuantConfig(2, 2, 4, 16))
    assert len(calls) == 2  # the step graph was written (to the temporary folder) first
    assert _snapshot(tmp_path) == before
    monkeypatch.setattr(onnx_kv, "_to_onnx", write)
    one = onnx_kv.export_onnx_kv(model, path, KVQuantConfig(2, 2, 4, 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kv.flush.onnx.bak", "kv.flush0.onnx", "kv.onnx"
    ]
    assert one.flush_paths == [tmp_path / "kv.flush0.onnx"]
    assert all((tmp_path / n).read_bytes() != before[n] for n in ("kv.onnx", "kv.flush0.onnx"))
