"""MLA in the budget: priced bytes = the converted block's stored tensors, optimize() with
kv_forms=[..., "mla"] converts the layers the solver picks, and the result saves and loads."""

from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.forms.kv.config import KVDenseConfig
from slimfx.forms.mla.module import MLAAttention
from slimfx.ir.find import inspect_attention_sites
from slimfx.planning.problem import Budget

pytestmark = pytest.mark.usefixtures("one_thread")


def test_optimize_converts_to_mla_and_prices_what_it_stores(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(7)
    calib = [torch.randint(0, 256, (1, 48), generator=g) for _ in range(5)]
    shape = inspect_attention_sites(tiny_llama)[0][0].site_shape
    out = slimfx.optimize(
        tiny_llama, Budget(kv=0.6), calibration=calib, kv_forms=[KVDenseConfig(), "mla"],
        progress=False,
    )  # fmt: skip
    rep = slimfx.report_of(out)
    assert [k.decision["kind"] for k in rep.kv_sites] == ["mla", "mla"]
    assert rep.totals["kv_ratio"] <= 0.6
    attn = out.model.layers[0].self_attn
    assert isinstance(attn, MLAAttention)
    stored = sum(
        2 * t.numel()  # 16-bit reference for every tensor, 2-byte frequency indices
        for n, t in [*attn.named_parameters(), *attn.named_buffers()]
        if not n.startswith(("q_proj.", "o_proj."))
    )
    assert attn.mla_config.weight_bytes(shape) == stored == rep.kv_sites[0].weight_bytes_after
    ids = calib[0][:, :9]
    tokens = out.generate(ids, max_new_tokens=8, do_sample=False)
    slimfx.save(out, tmp_path / "m")
    back = slimfx.load(tmp_path / "m")
    assert isinstance(back.model.layers[1].self_attn, MLAAttention)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, out(ids).logits, rtol=0, atol=0)
    assert back.generate(ids, max_new_tokens=8, do_sample=False).tolist() == tokens.tolist()
    # the plan replays: the same calibration converts the same layers to the same blocks
    plan = slimfx.Plan.from_dict(rep.meta["plan"])
    again = slimfx.optimize(tiny_llama, plan=plan, calibration=calib, progress=False)
    assert isinstance(again.model.layers[0].self_attn, MLAAttention)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, out(ids).logits, rtol=1e-5, atol=1e-5)
