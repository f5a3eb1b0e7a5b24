"""Forward hooks a user registered on a module that a rewrite replaces run on its replacement
(they were dropped: a hook scaling a linear's output by 3 vanished, 23% off the hooked model),
and the report says so; with ``inplace=True`` the user's handle still removes them."""

from __future__ import annotations

import pytest
import torch

import slimfx
from slimfx.ir.modules import SlimLinear, carry_hooks
from slimfx.planning.problem import Budget

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (1, 24), generator=g) for _ in range(3)]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("inplace", [False, True])
def test_a_hook_on_a_rewritten_linear_runs_on_its_replacement(tiny_llama, inplace):
    lin = tiny_llama.model.layers[0].mlp.down_proj
    seen = []
    h = lin.register_forward_hook(lambda m, i, o: o * 3)
    p = lin.register_forward_pre_hook(lambda m, a: seen.append(type(m).__name__))
    ids = _calib()[0][:, :10]
    with torch.no_grad():
        hooked_ref = tiny_llama(ids).logits
    out = slimfx.optimize(tiny_llama, Budget(memory=0.5), calibration=_calib(), inplace=inplace,
                          progress=False, cpu_kernels=False)  # fmt: skip
    new = out.model.layers[0].mlp.down_proj
    assert isinstance(new, SlimLinear)
    seen.clear()
    with torch.no_grad():
        got = out(ids).logits
    assert seen == [type(new).__name__]  # the pre-hook ran on the replacement
    assert _rel(got, hooked_ref) < 0.05  # the compression error, not the 3× the hook adds
    notes = slimfx.report_of(out).notes
    assert any("1 rewritten module(s) had forward hooks (e.g. model.layers.0.mlp.down_proj)"
               in n for n in notes)  # fmt: skip
    h.remove()
    p.remove()
    with torch.no_grad():
        after = out(ids).logits
    # in place: the handles remove the hooks from the replacement; a copy keeps its own
    assert torch.equal(after, got) != inplace


def test_carry_hooks_keeps_the_replacements_own_hooks_and_the_order():
    old, new = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    order = []
    new.register_forward_hook(lambda m, i, o: order.append("new"))
    old.register_forward_hook(lambda m, i, o: order.append("a"))
    old.register_forward_hook(lambda m, i, o: order.append("b"), always_call=True)
    carry_hooks(old, new)
    new(torch.ones(1, 4))
    assert order == ["new", "a", "b"] and len(new._forward_hooks_always_called) == 1
