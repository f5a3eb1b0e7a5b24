"""Capture: export with module paths on nodes, readable failures, the module fallback, verify."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import slimfx.ir.ops  # noqa: F401  (registers torch.ops.slimfx.*)
from slimfx.ir.capture import (
    FQN_KEY,
    ORIGIN_KEY,
    Captured,
    CaptureError,
    capture,
    normalize_module_path,
)
from slimfx.ir.find import discover_linear_sites, find_linear_sites
from slimfx.ir.verify import VerificationError, verify


class DataDependentBranch(nn.Module):
    """Two linears read the same tensor; a Python branch on a tensor value blocks export."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8, bias=False)
        self.c = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if x.sum() > 0:
            h = x * 2
        return self.c(self.a(h) + self.b(h))


def _assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks, f"forward hook left on {name!r}"
        assert not m._forward_pre_hooks, f"forward pre-hook left on {name!r}"
        assert not m._backward_hooks, f"backward hook left on {name!r}"


def _call_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"]


# --------------------------------------------------------------------------- export path


def test_capture_tiny_llama_stamps_val_and_fqn(tiny_llama_captured):
    model, ids, cap = tiny_llama_captured
    assert cap.method == "export" and cap.fallback_reason is None
    assert cap.gm is cap.program.graph_module
    modules = dict(model.named_modules())
    nodes = _call_nodes(cap.gm)
    assert nodes
    for n in nodes:
        assert "val" in n.meta, n.name
        assert n.meta[FQN_KEY] in modules, (n.name, n.meta[FQN_KEY])
    linears = [n for n in nodes if n.target == torch.ops.aten.linear.default]
    params = cap.program.graph_signature.inputs_to_parameters
    # each linear's module path is the module that owns the weight it reads
    assert [n.meta[FQN_KEY] for n in linears] == [
        params[n.args[1].name].removesuffix(".weight") for n in linears
    ]
    sdpa = [n for n in nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert [n.meta[FQN_KEY] for n in sdpa] == [
        "model.layers.0.self_attn",
        "model.layers.1.self_attn",
    ]


def test_captured_program_matches_eager(tiny_llama_captured):
    model, ids, cap = tiny_llama_captured
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        got = cap.program.module()(input_ids=ids, use_cache=False).logits
    # same fp32 ops in the same order; allow for reassociation in decomposed kernels
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_capture_tiny_mlp_fqns(tiny_mlp):
    x = torch.randn(3, 16)
    cap = capture(tiny_mlp, (x,))
    assert cap.method == "export"
    by_target = [(n.target, n.meta[FQN_KEY]) for n in _call_nodes(cap.gm)]
    assert by_target == [
        (torch.ops.aten.linear.default, "0"),
        (torch.ops.aten.relu.default, "1"),
        (torch.ops.aten.linear.default, "2"),
        (torch.ops.aten.relu.default, "3"),
        (torch.ops.aten.linear.default, "4"),
    ]
    verify(cap.gm)


def test_capture_strict_mode_paths_are_normalized(tiny_mlp):
    cap = capture(tiny_mlp, (torch.randn(3, 16),), strict=True)
    fqns = [
        n.meta[FQN_KEY] for n in _call_nodes(cap.gm) if n.target == torch.ops.aten.linear.default
    ]
    assert fqns == ["0", "2", "4"]


def test_capture_leaves_model_unchanged(tiny_llama, tiny_ids):
    tiny_llama.train()
    tiny_llama.model.layers[1].eval()  # a mixed pattern of flags must come back as it was
    flags = {name: m.training for name, m in tiny_llama.named_modules()}
    before = copy.deepcopy(tiny_llama.state_dict())
    cap = capture(tiny_llama, (), {"input_ids": tiny_ids, "use_cache": False})
    assert cap.method == "export"
    assert {name: m.training for name, m in tiny_llama.named_modules()} == flags
    after = tiny_llama.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    _assert_no_hooks(tiny_llama)
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight


# --------------------------------------------------------------------------- failures


def test_capture_failure_names_the_construct():
    model = DataDependentBranch()
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(2, 8),), fallback=False)
    msg = str(info.value)
    assert "data-dependent" in msg
    assert "if x.sum() > 0:" in msg  # the offending source line
    assert "test_capture.py:" in msg  # and where it is
    assert "example inputs" in msg and "module-level discovery" in msg
    assert info.value.location is not None and "test_capture.py" in info.value.location


def test_capture_failure_without_inputs_says_to_pass_them():
    with pytest.raises(CaptureError) as info:
        capture(DataDependentBranch(), fallback=False)
    msg = str(info.value)
    assert "forward() did not accept the example inputs" in msg
    assert "missing" in msg  # the TypeError's own words are kept


def test_capture_fallback_returns_module_method_and_discovery_groups():
    model = DataDependentBranch()
    flags_before = model.training
    x = torch.randn(2, 8)
    cap = capture(model, (x,), fallback=True)
    assert isinstance(cap, Captured)
    assert cap.method == "module" and cap.program is None and cap.gm is None
    assert "data-dependent" in cap.fallback_reason and "if x.sum() > 0:" in cap.fallback_reason
    sites = find_linear_sites(cap, model)  # dispatches to discover_linear_sites with x
    assert [s.fqn for s in sites] == ["a", "b", "c"]
    assert [s.group for s in sites] == ["a", "a", "c"]  # a and b read the same tensor h
    assert [s.has_bias for s in sites] == [True, False, True]
    assert all(s.node is None for s in sites)
    assert model.training == flags_before
    _assert_no_hooks(model)


def test_discover_without_inputs_gives_one_group_per_linear():
    model = DataDependentBranch()
    sites = discover_linear_sites(model)
    assert [(s.fqn, s.group) for s in sites] == [("a", "a"), ("b", "b"), ("c", "c")]
    assert sites[0].shape == (8, 8) and sites[2].shape == (4, 8)


def test_discover_restores_state_when_forward_raises():
    model = DataDependentBranch().train()
    with pytest.raises(RuntimeError):
        discover_linear_sites(model, (torch.randn(2, 5),))  # wrong width: a(h) fails
    assert model.training
    _assert_no_hooks(model)


# --------------------------------------------------------------------------- module paths


@pytest.mark.parametrize(
    "path, want",
    [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"),
        ("L['self'].model.layers[0].self_attn", "model.layers.0.self_attn"),
        ("getattr(L['self'].model.layers, '3').mlp", "model.layers.3.mlp"),
        ("L__self__model.layers.0.mlp@1", "model.layers.0.mlp"),
        ("L['self']._modules['layers']._modules['2']", "layers.2"),
        ("self_attn.q_proj", "self_attn.q_proj"),
        ("L['self']", ""),
        ("", ""),
    ],
)
def test_normalize_module_path(path, want):
    assert normalize_module_path(path) == want


def test_normalize_resolves_mangled_names_against_modules(tiny_llama):
    modules = dict(tiny_llama.named_modules())
    got = normalize_module_path("L__self___model_layers_1_mlp_up_proj", modules)
    assert got == "model.layers.1.mlp.up_proj"


# --------------------------------------------------------------------------- verify


def test_verify_accepts_captured_llama(tiny_llama_captured):
    _, _, cap = tiny_llama_captured
    verify(cap.gm)  # raises on any broken invariant


def test_verify_lists_every_broken_invariant(tiny_mlp):
    cap = capture(tiny_mlp, (torch.randn(3, 16),))
    gm = cap.gm
    g = gm.graph
    nodes = _call_nodes(gm)
    del nodes[1].meta["val"]  # the first relu lost its fake value
    user = cap.program.graph_signature.user_inputs[0]
    x = next(n for n in g.nodes if n.op == "placeholder" and n.name == user)
    out = next(n for n in g.nodes if n.op == "output")
    with g.inserting_before(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx warns about the dangling get_attr; verify reports it
        ghost = g.get_attr("no_such_tensor")
        lr = g.call_function(torch.ops.slimfx.lowrank_linear.default, (x, ghost, ghost))
        lr.meta["val"] = nodes[0].meta["val"]
    with pytest.raises(VerificationError) as info:
        verify(gm)
    failures = info.value.failures
    kinds = sorted(f.split(":")[0] for f in failures)
    # lint also rejects the dangling get_attr; the table reports it, the origin and the val
    assert kinds == ["get_attr", "graph.lint()", "origin", "val"], failures
    assert any(nodes[1].name in f for f in failures)
    assert str(len(failures)) in str(info.value)
    lr.meta[ORIGIN_KEY] = {"pass": "p", "rule": "r", "site": "4"}
    with pytest.raises(VerificationError) as info:
        verify(gm)
    kinds = sorted(f.split(":")[0] for f in info.value.failures)
    assert kinds == ["get_attr", "graph.lint()", "val"]


def test_verify_reports_lint_failure(tiny_mlp):
    cap = capture(tiny_mlp, (torch.randn(3, 16),))
    g = cap.gm.graph
    relu = _call_nodes(cap.gm)[1]
    first = next(n for n in g.nodes if n.op == "call_function")
    first.prepend(relu)  # relu now runs before the linear it reads
    with pytest.raises(VerificationError) as info:
        verify(cap.gm)
    assert any(f.startswith("graph.lint()") for f in info.value.failures)
