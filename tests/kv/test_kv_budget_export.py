"""What optimize() chose for the attention sites runs in ONNX Runtime: the quantized caches
through backends/onnx_kv, MLA layers through backends/onnx_mla — greedy tokens as in torch.
(A budget-chosen quantized cache through ONNX Runtime: tests/test_cli_commands.py.)"""

from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.forms.kv.config import KVDenseConfig, KVLatentQuantConfig, KVQuantConfig
from slimfx.planning.problem import Budget

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


def _calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (1, 48), generator=g) for _ in range(4)]


def test_optimized_low_rank_cache_runs_in_onnxruntime(tmp_path):
    """A plan whose cache is a quantized low-rank latent (with sink tokens) exports from the
    optimized model as it is and generates torch's tokens in ONNX Runtime. (One layer: each
    low-rank layer adds ~20 s of export, and the ONNX tests check several.)"""
    from slimfx.backends.onnx_kv import export_onnx_kv
    from slimfx.backends.onnx_kv_decoder import OrtKVDecoder
    from slimfx.models import tiny_llama

    lat = KVLatentQuantConfig(16, 16, 2, "whitened", 4, 8, 0, sink=2, axis="channel")
    out = slimfx.optimize(
        tiny_llama(num_hidden_layers=1), Budget(kv=0.45), calibration=_calib(),
        kv_forms=[KVDenseConfig(), lat], progress=False,
    )  # fmt: skip
    assert not any(m.training for m in out.modules())  # rewritten modules in eval mode too
    res = export_onnx_kv(out, tmp_path / "kv.onnx")
    assert res.forms == [lat]
    ids = _calib()[0][:, :9]
    want = out.generate(ids, max_new_tokens=12, do_sample=False)
    assert OrtKVDecoder(res.path).generate(ids, 12).tolist() == want.tolist()


def test_optimized_mla_layers_run_in_onnxruntime(tiny_llama, tmp_path):
    """A weights + KV budget: MLA blocks whose q/o projections are quantized export (their ops
    through the linear forms' translations) and generate torch's tokens in ONNX Runtime."""
    from slimfx.backends.onnx_mla import export_mla_onnx, latent_ort_session
    from slimfx.forms.mla.module import MLAAttention
    from slimfx.ir.modules import SlimLinear

    out = slimfx.optimize(
        tiny_llama, Budget(memory=0.5, kv=0.6), calibration=_calib(),
        kv_forms=[KVDenseConfig(), "mla"], progress=False,
    )  # fmt: skip
    assert not any(m.training for m in out.modules())  # the MLA modules in eval mode too
    mla = [m for m in out.modules() if isinstance(m, MLAAttention)]
    assert mla and any(isinstance(m.q_proj, SlimLinear) for m in mla)
    ids = _calib()[0][:, :9]
    export_mla_onnx(out, tmp_path / "mla.onnx", ids)
    want = out.generate(ids, max_new_tokens=12, do_sample=False)
    got = latent_ort_session(tmp_path / "mla.onnx").generate(ids, 12)
    assert torch.as_tensor(got).tolist() == want.tolist()


def test_the_16bit_cache_export_refuses_a_compressed_cache(tiny_llama, tmp_path):
    from slimfx.backends.onnx import OnnxExportError, export_onnx

    forms = [KVDenseConfig(), KVQuantConfig(4, 4, 8, 16, 0, 0)]
    out = slimfx.optimize(
        tiny_llama, Budget(kv=0.45), calibration=_calib(), kv_forms=forms, progress=False
    )
    with pytest.raises(OnnxExportError, match=r"compressed KV cache .*export_onnx_kv"):
        export_onnx(out, tmp_path / "x.onnx", (_calib()[0][:, :9],), kv_cache=True)
    assert not (tmp_path / "x.onnx").exists()


def test_a_kv_export_notes_dense_sites_and_keeps_large_weights_beside_the_graph(
    tmp_path, monkeypatch
):
    """A 2:4 site goes dense through ONNX Runtime in the decode-step graph too: the result and
    the model's report say so, as export_onnx does (they said nothing). Past the threshold the
    step graph's weights go to ``<file>.data`` as export_onnx's do (one file could not pass
    protobuf's 2 GB); ONNX Runtime reads it, and a smaller export removes the stale file."""
    from slimfx.backends import onnx_graph
    from slimfx.backends.onnx_kv import export_onnx_kv
    from slimfx.backends.onnx_kv_decoder import OrtKVDecoder
    from slimfx.models import tiny_llama
    from slimfx.planning.configs import Sparse24Config
    from slimfx.planning.plan import Plan

    plan = Plan({"model.layers.0.mlp.up_proj": Sparse24Config(),
                 "model.layers.0.self_attn": KVQuantConfig(4, 4, 8, 16, 0, 0)})  # fmt: skip
    out = slimfx.optimize(tiny_llama(num_hidden_layers=1), plan=plan, calibration=_calib(),
                          progress=False)  # fmt: skip
    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_THRESHOLD", 10_000)
    res = export_onnx_kv(out, tmp_path / "kv.onnx")
    want = "exported dense: onnxruntime has no 2:4 kernel — 1 site(s): model.layers.0.mlp.up_proj"
    assert res.notes == [want]
    assert f"onnx kv.onnx: {want}" in slimfx.report_of(out).notes
    data = tmp_path / "kv.onnx.data"
    assert data.stat().st_size > 100_000  # the large initializers (small ones stay inline)
    ids = _calib()[0][:, :9]
    tokens = out.generate(ids, max_new_tokens=6, do_sample=False)
    assert OrtKVDecoder(res.path).generate(ids, 6).tolist() == tokens.tolist()
    # a smaller export (each graph's translation replaced by a small file: what is checked is
    # the files) removes the stale data file
    from slimfx.backends import onnx_kv

    def small(program, path, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        path.write_bytes(b"graph")
        return []

    monkeypatch.setattr(onnx_kv, "_to_onnx", small)
    export_onnx_kv(out, tmp_path / "kv.onnx")
    assert not data.exists() and (tmp_path / "kv.onnx").read_bytes() == b"graph"
