"""Linear layers that are not a plain ``nn.Linear`` call: Falcon's ``FalconLinear``
(``x @ W.T`` then ``+ b``) is a site; a MoE router (``F.linear`` on its weight, then softmax and
top-k in the same forward) is not one for the module swap — it stays dense with the reason —
while a module that only applies ``F.linear`` to its weight still is. Cache geometry and
int32 calibration ids on the families that exposed them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimfx
from slimfx.backends.onnx_decode import cache_geometry
from slimfx.ir.capture import capture
from slimfx.ir.find import find_linear_sites, wider_than_linear
from slimfx.planning.configs import LowRankConfig
from slimfx.planning.plan import Plan

tf = pytest.importorskip("transformers")


def _calib(n: int = 2, vocab: int = 256) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 32), generator=g) for _ in range(n)]


IDS = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))


def _falcon(**kw):  # noqa: ANN003, ANN202
    torch.manual_seed(0)
    cfg = tf.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          **kw)  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def test_falcon_linear_is_a_site_and_rewrites_exactly_at_full_rank() -> None:
    model = _falcon(bias=True)
    sites = find_linear_sites(capture(model, (IDS,), {"use_cache": False}), model)
    names = [s.fqn for s in sites if s.fqn != "lm_head"]
    assert len(names) == 8 and "transformer.h.0.mlp.dense_4h_to_h" in names
    by = {s.fqn: s for s in sites}
    assert by["transformer.h.0.mlp.dense_4h_to_h"].shape == (64, 256)
    assert by["transformer.h.0.mlp.dense_4h_to_h"].has_bias  # added after the matmul
    from slimfx.passes import apply_plan
    from slimfx.passes.rules.lowrank import LinearToLowRank

    plan = Plan({n: LowRankConfig(min(by[n].shape), "svd") for n in names})
    small, _ = apply_plan(model, plan, sites, rules={"lowrank": LinearToLowRank(require_savings=False)})
    with torch.no_grad():
        torch.testing.assert_close(small(IDS).logits, model(IDS).logits, atol=2e-4, rtol=1e-4)


def test_falcon_optimizes_under_a_budget() -> None:
    model = _falcon()
    small = slimfx.optimize(model, 0.5, calibration=_calib(), progress=False)
    assert slimfx.report_of(small).totals["rewritten"] == 8
    assert small.generate(IDS, max_new_tokens=3, do_sample=False).shape == (1, 13)


class _Router(nn.Module):
    """A MoE-style router: the product, then softmax and top-k, in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(F.linear(x, self.weight).softmax(-1), 2)


class _Plain(nn.Module):
    """Not an nn.Linear either, but its forward is only the product: a site."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.plain = _Plain()
        self.gate = _Router()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.plain(self.proj(x))
        w, idx = self.gate(h)
        return h * w.sum(-1, keepdim=True) + idx.sum(-1, keepdim=True)


def test_a_router_stays_dense_with_the_reason_and_a_functional_linear_is_a_site() -> None:
    torch.manual_seed(0)
    model = _Gated().eval()
    x = torch.randn(4, 8, 16)
    cap = capture(model, (x,))
    sites = find_linear_sites(cap, model)
    assert {s.fqn for s in sites} == {"proj", "plain", "gate"}  # the graph sees three products
    wide = wider_than_linear(cap, model, sites)
    assert set(wide) == {"gate"} and "softmax" in wide["gate"] and "stays dense" in wide["gate"]
    small = slimfx.optimize(model, 0.5, calibration=[x, x + 1], progress=False)
    rep = slimfx.report_of(small)
    assert {e.fqn for e in rep.sites} == {"proj", "plain"}
    assert any(n.startswith("gate: a _Router whose forward computes more") for n in rep.notes)
    assert isinstance(small.gate, _Router)
    with torch.no_grad():
        assert small(x).shape == model(x).shape


def test_mixtral_routers_stay_dense_and_the_model_generates() -> None:
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    small = slimfx.optimize(model, 0.5, calibration=_calib(), progress=False)
    rep = slimfx.report_of(small)
    assert not any(".mlp.gate" in e.fqn for e in rep.sites)
    assert any(".mlp.gate: a " in n and "stays dense" in n for n in rep.notes)
    assert small.generate(IDS, max_new_tokens=3, do_sample=False).shape == (1, 13)


@pytest.mark.parametrize(
    ("build", "kv"),
    [
        (lambda: tf.FalconConfig(num_attention_heads=4), 1),  # multi_query by default
        (lambda: tf.FalconConfig(num_attention_heads=4, new_decoder_architecture=True,
                                 num_kv_heads=2), 4),  # fmt: skip  (cached expanded)
        (lambda: tf.GPTBigCodeConfig(n_head=4, multi_query=True), 1),
        (lambda: tf.GPTBigCodeConfig(n_head=4, multi_query=False), 4),
        (lambda: tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2), 2),
    ],
)
def test_cache_geometry_knows_multi_query_configs(build, kv) -> None:  # noqa: ANN001
    assert cache_geometry(build())[1] == kv


@pytest.mark.parametrize("new_arch", [False, True], ids=["multi-query", "new-decoder"])
def test_falcon_decode_step_export_runs_in_onnxruntime(tmp_path, new_arch) -> None:
    model = _falcon(new_decoder_architecture=True, num_kv_heads=2) if new_arch else _falcon()
    heads = model(IDS, use_cache=True).past_key_values.layers[0].keys.shape[1]
    assert cache_geometry(model.config)[1] == heads
    slimfx.export_onnx(model, tmp_path / "f.onnx", (IDS,), kv_cache=True)
    got = slimfx.ort_session(str(tmp_path / "f.onnx")).generate(IDS, 4)
    want = model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert got.tolist() == want.tolist()


def test_int32_ids_calibrate_with_the_loss() -> None:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    calib = [c.to(torch.int32) for c in _calib()]
    small = slimfx.optimize(model, 0.5, calibration=calib, progress=False, sensitivity="fisher")
    assert any("loss sensitivity" in n and "unavailable" not in n
               for n in slimfx.report_of(small).notes)  # fmt: skip


def test_moe_expert_tensors_outside_every_site_are_noted() -> None:
    torch.manual_seed(0)
    cfg = tf.Qwen2MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=4, num_experts_per_tok=2)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    small = slimfx.optimize(model, 0.6, calibration=_calib(), progress=False)
    note = next(n for n in slimfx.report_of(small).notes if n.startswith("weights: "))
    assert "batched MoE experts" in note and "experts" in note and "outside the budget" in note


def test_mixtral_exports_to_onnx_with_batched_experts_and_keeps_its_choice(tmp_path) -> None:
    """The default grouped expert kernel traces to a custom op ONNX has no function for; the
    export runs the experts as batched matmuls and puts the config's choice back."""
    import numpy as np

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    before = model.config._experts_implementation
    slimfx.export_onnx(model, tmp_path / "moe.onnx", (IDS,))
    assert model.config._experts_implementation == before
    om = slimfx.ort_session(str(tmp_path / "moe.onnx"))
    ids = IDS[:, :7]
    with torch.no_grad():
        want = model(ids, use_cache=False).logits.numpy()
    np.testing.assert_allclose(om(ids.numpy()), want, atol=1e-5, rtol=1e-5)


def test_a_parent_reading_only_a_childs_weight_dtype_keeps_it_dense() -> None:
    """T5's feed-forward reads ``self.wo.weight.dtype`` — no graph node shows it, the source
    does: the site stays dense with the reason (rewritten, the parent would crash)."""
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
    model = tf.T5EncoderModel(cfg).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    small = slimfx.optimize(model, 0.5, calibration=[ids, ids.flip(0)], progress=False)
    rep = slimfx.report_of(small)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo"
    assert wo not in {e.fqn for e in rep.sites}
    assert any(n.startswith(wo + ": left dense") for n in rep.notes)
    with torch.no_grad():
        assert small(ids).last_hidden_state.shape == (2, 12, 64)


class _Scaled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight.T) * 0.5 + self.bias


class _SoftmaxRouter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16))
        self.act = nn.Softmax(-1)  # the extra work in a child module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.linear(x, self.weight))


class _BiasAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16))
        self.bias = nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.bias


class _AlphaBias(_BiasAfter):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(F.linear(x, self.weight), self.bias, alpha=3)


class _BiasTwice(_BiasAfter):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.bias


class _LoRA(nn.Linear):
    """A LoRA-style wrapper whose B is itself a scaling Linear subclass: the wrapper and its
    B stay dense (the innermost module's forward is what a site must compute), A is a site."""

    def __init__(self) -> None:
        super().__init__(16, 16)
        self.lora_A = nn.Linear(16, 4, bias=False)
        self.lora_B = _Scaled(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x))


@pytest.mark.parametrize(
    ("cls", "site"),
    [(_Scaled, False), (_SoftmaxRouter, False), (_BiasAfter, True), (_AlphaBias, False),
     (_BiasTwice, False), (_LoRA, False)],
    ids=["scale-after-product", "softmax-child", "bias-added-after", "bias-times-alpha",
         "bias-twice", "lora-wrapper"],
)  # fmt: skip
def test_what_a_module_computes_beyond_its_product_decides_if_it_is_a_site(cls, site) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Linear(16, 16)
            self.m = cls(16, 16) if cls is _Scaled else cls()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(self.pre(x))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(4, 8, 16)
    small = slimfx.optimize(net, 0.6, calibration=[x, x + 1], progress=False, cpu_kernels=False)
    rep = slimfx.report_of(small)
    assert ("m" in {e.fqn for e in rep.sites}) is site
    assert any(n.startswith("m: a ") for n in rep.notes) is not site
    if cls is _LoRA:
        assert "m.lora_A" in {e.fqn for e in rep.sites}
        assert any(n.startswith("m.lora_B: a _Scaled") for n in rep.notes)
    with torch.no_grad():
        ref = net(x)
        rel = float((small(x) - ref).norm() / ref.norm())
    assert rel < 0.05  # the module's own computation kept (a dropped scale or softmax is ≫)


_SPELLINGS = {
    "T": lambda w: w.T,
    "t()": lambda w: w.t(),
    "transpose": lambda w: w.transpose(0, 1),
    "permute": lambda w: w.permute(1, 0),
    "torch.transpose": lambda w: torch.transpose(w, -1, -2),
}


def _compile_rewrites_like_optimize(net: nn.Module, names: tuple[str, str], x: torch.Tensor):
    """The compile backend rewrites ``net``'s two linears (rank-8 SVD) as optimize's module
    swap does: same output, both sites applied."""
    from slimfx.backends import compile as sc

    plan = Plan({n: LowRankConfig(8, "svd") for n in names})
    torch._dynamo.reset()
    try:
        swapped = slimfx.optimize(net, plan=plan, calibration=[x], cpu_kernels=False,
                                  progress=False, fisher=False)  # fmt: skip
        be = slimfx.backend(plan=plan, model=net, calibration=[x], cpu_kernels=False,
                            inner="aot_eager", fisher=False)  # fmt: skip
        compiled = torch.compile(net, backend=be)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), swapped(x), atol=1e-5, rtol=1e-5)
        rep = sc.report_of_compiled(compiled)
        assert {e.fqn: e.status for e in rep.sites} == dict.fromkeys(names, "applied")
    finally:
        torch._dynamo.reset()
        sc.clear_sessions()


@pytest.mark.parametrize("spell", sorted(_SPELLINGS))
def test_every_spelling_of_x_at_w_transposed_is_rewritten_under_compile(spell: str) -> None:
    class MyLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ _SPELLINGS[spell](self.weight) + self.bias

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = MyLinear(32, 64), MyLinear(64, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    _compile_rewrites_like_optimize(Net().eval(), ("a", "b"), torch.randn(2, 5, 32))


def test_an_addmm_linear_subclass_is_rewritten_under_compile_as_by_optimize() -> None:
    """``torch.addmm(b, x, W.T)`` in an nn.Linear subclass: optimize rewrote it, the compile
    backend left it dense ("not in any compiled graph", though it was in one)."""

    class AddmmLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addmm(self.bias, x, self.weight.t())

    torch.manual_seed(0)
    net = nn.Sequential(AddmmLinear(32, 64), nn.ReLU(), AddmmLinear(64, 32)).eval()
    _compile_rewrites_like_optimize(net, ("0", "2"), torch.randn(6, 32))


def test_without_a_graph_a_linear_with_its_own_forward_stays_dense() -> None:
    from slimfx.ir.capture import Captured
    from slimfx.ir.find import discover_linear_sites

    net = nn.Sequential(nn.Linear(16, 16), _Scaled(16, 16))
    sites = discover_linear_sites(net)
    wide = wider_than_linear(Captured(program=None, gm=None, method="module"), net, sites)
    assert set(wide) == {"1"} and "no captured graph" in wide["1"]


def test_a_weight_read_the_source_scan_misses_is_named_when_it_fails() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blk = nn.ModuleList([nn.Linear(16, 16)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.blk[0].weight  # an alias: neither the scan nor the graph sees the read
            return self.blk[0](x.to(w.dtype))

    torch.manual_seed(0)
    x = torch.randn(4, 8, 16)
    with pytest.raises(AttributeError, match=r"Block reads the `weight` of a rewritten layer "
                                             r"inside it \(blk.0\).*exclude="):  # fmt: skip
        slimfx.optimize(Block().eval(), 0.5, calibration=[x, x + 1], progress=False)
