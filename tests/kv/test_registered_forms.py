"""The KV-cache and MLA forms as registered forms: the module swap refuses their decisions at an
attention site with the form's own reason, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch

from slimfx import forms
from slimfx.forms.kv.config import KVLowRankConfig, KVQuantConfig
from slimfx.forms.mla.config import MLAConfig
from slimfx.ir.find import inspect_attention_sites
from slimfx.passes.swap import apply_plan
from slimfx.planning.plan import Plan


@pytest.mark.parametrize(
    "decision", [KVQuantConfig(), KVLowRankConfig(16, 16), MLAConfig(rank=16, rope_pairs=2)]
)
def test_module_swap_refuses_an_attention_decision_with_the_form_reason(tiny_llama, decision):
    sites, rejected = inspect_attention_sites(tiny_llama)
    assert not rejected
    site = sites[0]
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    plan = Plan({site.fqn: decision}, {site.fqn: site.site_shape})
    reason = forms.form_of(decision).why_not("rule")
    assert "not rewritten by the module swap" in reason
    new, result = apply_plan(tiny_llama, plan, [site], strict=False)
    assert [(r.fqn, r.status) for r in result.records] == [(site.fqn, "rejected")]
    assert result.records[0].reason == f"{decision.kind}: {reason}"
    assert not result.modified
    with pytest.raises(ValueError, match="1 site\\(s\\) rejected") as e:
        apply_plan(tiny_llama, plan, [site])
    assert reason in str(e.value)
    after = tiny_llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert type(dict(tiny_llama.named_modules())[site.fqn]).__name__ == "LlamaAttention"
