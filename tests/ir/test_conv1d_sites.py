"""transformers' ``Conv1D`` (GPT-2's linear layers: weight stored in × out, ``addmm(b, x, W)``)
is a linear site like ``nn.Linear``: found in the exported graph and in the module tree with
its out × in shape, rewritten by the module swap, the compile backend and the streamed path,
saved, loaded and exported — the dense model's numbers where the rewrite is exact."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import slimfx
from slimfx.backends import compile as sc
from slimfx.backends.graph_sites import as_linear_calls
from slimfx.ir.capture import capture
from slimfx.ir.find import discover_linear_sites, find_linear_sites
from slimfx.ir.match import is_conv1d, linear_weight
from slimfx.passes import apply_plan
from slimfx.passes.rules.lowrank import LinearToLowRank
from slimfx.planning.configs import LowRankConfig, QuantConfig
from slimfx.planning.plan import Plan

tf = pytest.importorskip("transformers")

SHAPES = {  # (out, in) of each Conv1D of a block at n_embd 64
    "attn.c_attn": (192, 64),
    "attn.c_proj": (64, 64),
    "mlp.c_fc": (256, 64),
    "mlp.c_proj": (64, 256),
}


def _gpt2(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=layers, n_head=4, n_positions=128,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def _calib(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 32), generator=g) for _ in range(n)]


IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_graph_and_module_tree_find_the_same_conv1d_sites_with_out_in_shapes() -> None:
    model = _gpt2()
    graph = find_linear_sites(capture(model, (IDS,)), model)
    tree = discover_linear_sites(model, (IDS,))
    want = {f"transformer.h.{i}.{k}": s for i in range(2) for k, s in SHAPES.items()}
    for sites in (graph, tree):
        got = {s.fqn: s.shape for s in sites if s.fqn != "lm_head"}
        assert got == want
        assert all(s.has_bias for s in sites if s.fqn in want)
    conv = model.get_submodule("transformer.h.0.attn.c_attn")
    assert is_conv1d(conv) and not is_conv1d(model.lm_head)
    w = linear_weight(conv)
    assert w.shape == (192, 64) and w.data_ptr() == conv.weight.data_ptr()  # a view


def test_full_rank_low_rank_of_every_conv1d_is_the_dense_model() -> None:
    """A transposition mistake on the square c_proj (64 × 64) would pass every shape check:
    a full-rank factorization of every site must give the dense logits."""
    model = _gpt2()
    sites = discover_linear_sites(model, (IDS,))
    plan = Plan({s.fqn: LowRankConfig(min(s.shape), "svd") for s in sites if s.fqn != "lm_head"})
    rules = {"lowrank": LinearToLowRank(require_savings=False)}
    small, res = apply_plan(model, plan, sites, rules=rules)
    assert [r.status for r in res.records if r.fqn in plan.decisions] == ["applied"] * 8
    assert not any(is_conv1d(m) for m in small.modules())  # all eight replaced
    torch.testing.assert_close(_logits(small), _logits(model), atol=2e-4, rtol=1e-4)


def test_gpt2_optimize_generate_save_load_onnx(tmp_path) -> None:
    model = _gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = slimfx.optimize(model, budget=0.5, calibration=_calib(), backend="onnx",
                            cpu_kernels=False)  # ORT computes in fp32: compare like with like
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = slimfx.report_of(small)
    assert report.totals["rewritten"] == 8 and report.totals["bytes_ratio"] <= 0.5
    rel = (_logits(small) - _logits(model)).norm() / _logits(model).norm()
    assert rel < 0.05
    out = small.generate(IDS, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)

    slimfx.save(small, tmp_path / "m")
    loaded = slimfx.load(tmp_path / "m", cpu_kernels=False)
    torch.testing.assert_close(_logits(loaded), _logits(small), atol=1e-5, rtol=1e-5)

    slimfx.export_onnx(small, tmp_path / "m.onnx", (IDS,))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: IDS.numpy()})[0]
    np.testing.assert_allclose(got, _logits(small).numpy(), atol=1e-4, rtol=1e-4)


def test_as_linear_calls_turns_each_addmm_into_the_same_linear() -> None:
    """In a dynamo graph each Conv1D runs ``addmm(b, x, W)``; the rewrite makes it
    ``linear(x, t(W), b)``: four per block, same output."""
    model = _gpt2(layers=1)
    modules = dict(model.named_modules())
    counts = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
        counts.append(as_linear_calls(gm, dict(zip(ph, example_inputs)), modules))
        addmm = [n for n in gm.graph.nodes if n.target in (torch.addmm, torch.ops.aten.addmm.default)]
        assert not addmm
        return gm.forward

    torch._dynamo.reset()
    try:
        out = torch.compile(model, backend=backend)(IDS).logits
    finally:
        torch._dynamo.reset()
    assert counts == [4]
    torch.testing.assert_close(out, _logits(model), atol=1e-5, rtol=1e-5)


def test_compile_backend_rewrites_conv1d_like_the_module_swap() -> None:
    torch._dynamo.reset()
    sc.clear_sessions()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _gpt2()
        plan = Plan({f"transformer.h.{i}.{k}": QuantConfig(8, None, True) if k.startswith("mlp")
                     else LowRankConfig(16, "svd") for i in range(2) for k in SHAPES})  # fmt: skip
        swapped = slimfx.optimize(model, plan=plan, calibration=_calib(), cpu_kernels=False,
                                  fisher=False)  # fmt: skip
        be = slimfx.backend(plan=plan, model=model, calibration=_calib(), cpu_kernels=False,
                            fisher=False)  # fmt: skip
        compiled = torch.compile(model, backend=be)
        torch.testing.assert_close(_logits(compiled), _logits(swapped), atol=1e-4, rtol=1e-4)
        rep = sc.report_of_compiled(compiled)
        applied = [e.fqn for e in rep.sites if e.status == "applied"]
        assert sorted(applied) == sorted(plan.decisions)
    finally:
        torch.set_num_threads(n)
        torch._dynamo.reset()
        sc.clear_sessions()


def test_streamed_checkpoint_of_gpt2_matches_in_memory(tmp_path) -> None:
    from slimfx.stream import optimize_checkpoint

    model = _gpt2()
    model.save_pretrained(tmp_path / "ckpt")
    res = optimize_checkpoint(tmp_path / "ckpt", 0.5, calibration=_calib(), out=tmp_path / "out",
                              progress=False)  # fmt: skip
    mem = slimfx.optimize(model, budget=0.5, calibration=_calib(), sensitivity="fisher")
    assert res.plan.decisions == Plan.from_dict(slimfx.report_of(mem).meta["plan"]).decisions
    loaded = slimfx.load(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded), _logits(mem), atol=1e-4, rtol=1e-4)
