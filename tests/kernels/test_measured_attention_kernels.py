"""``measure_attention`` with the fused decode kernels (what it runs on CUDA; here the Triton
interpreter on tiny shapes): the quantized cache's and the MLA latent's one-token steps go
through their kernels, and each entry says so."""

from __future__ import annotations

import pytest

from slimfx.cost.measure_attention import measure_attention
from slimfx.cost.target import MeasuredCache
from slimfx.forms.kv.config import KVDenseConfig, KVQuantConfig
from slimfx.forms.mla.config import MLAConfig
from slimfx.planning.shapes import AttentionShape

from . import triton_skip_reason

pytestmark = pytest.mark.skipif(bool(triton_skip_reason()), reason=triton_skip_reason() or "")


def test_fused_steps_run_the_kernels(tmp_path) -> None:
    shape = AttentionShape(64, 4, 2, 16, 16)
    forms = [KVDenseConfig(), KVQuantConfig(4, 4, 8, 16, 0, 0), MLAConfig(rank=12, rope_pairs=2)]
    cache = measure_attention(
        "cpu", [shape], forms, (24,), tmp_path / "f.json", steps=1, fused=True, progress=False
    )
    info = {
        d.kind: cache.info[MeasuredCache.attention_key(shape, 1, 24, 1, "torch.float32", d, "cpu")]
        for d in forms
    }
    assert info["kv_dense"]["runtime"] == "torch eager" and "decode_path" not in info["kv_dense"]
    assert info["kv_quant"]["kernel"] == "kv_decode_attention"
    assert info["kv_quant"]["decode_path"] == "triton"
    assert info["mla"]["kernel"] == "mla_decode" and info["mla"]["decode_path"] == "triton"
