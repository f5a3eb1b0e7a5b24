"""``slimfx::one_token_or`` and the export pass that makes its marker an ONNX ``If``
(``slimfx.backends.onnx_branches.lazy_branches``); the exporter's optimizer without its
quadratic rules (``onnx_graph.linear_time_rewrites``).

A hand-built graph: a node both paths read, a node of one path another output also reads, and a
path whose ``Reshape`` fails for some lengths — so running the graph in ONNX Runtime shows which
branch ran. Checked: what moves into each branch and what stays, the marker and its opset
import gone, the outputs for both call lengths, and that the path not chosen does not run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ir = pytest.importorskip("onnx_ir")

from onnx import TensorProto, helper  # noqa: E402

import slimfx.ir.ops  # noqa: E402, F401  (registers slimfx::one_token_or)
from slimfx.backends.onnx_branches import lazy_branches  # noqa: E402
from slimfx.backends.onnx_ops import BRANCH_DOMAIN  # noqa: E402


def _marked() -> onnx.ModelProto:
    """``shared = 2x``; one path ``a1 = shared + 1`` (also read by the output ``side =
    relu(a1)``), ``one = -a1``; the other ``more = reshape(reshape(shared, [-1, 3]), [-1]) ·
    x`` (fails unless the length is a multiple of 3); ``y = OneTokenOr(n == 1, one, more)``."""
    f = TensorProto.FLOAT
    c = helper.make_tensor
    nodes = [
        helper.make_node("Constant", [], ["two"], value=c("two", f, [], [2.0])),
        helper.make_node("Constant", [], ["c1"], value=c("c1", f, [], [1.0])),
        helper.make_node("Constant", [], ["k1"], value=c("k1", TensorProto.INT64, [], [1])),
        helper.make_node("Constant", [], ["s3"], value=c("s3", TensorProto.INT64, [2], [-1, 3])),
        helper.make_node("Constant", [], ["s1"], value=c("s1", TensorProto.INT64, [1], [-1])),
        helper.make_node("Mul", ["x", "two"], ["shared"]),
        helper.make_node("Add", ["shared", "c1"], ["a1"]),
        helper.make_node("Neg", ["a1"], ["one"]),
        helper.make_node("Relu", ["a1"], ["side"]),
        helper.make_node("Reshape", ["shared", "s3"], ["b1"]),
        helper.make_node("Reshape", ["b1", "s1"], ["b2"]),
        helper.make_node("Mul", ["b2", "x"], ["more"]),
        helper.make_node("Equal", ["n", "k1"], ["cond"]),
        helper.make_node("OneTokenOr", ["cond", "one", "more"], ["y"], domain=BRANCH_DOMAIN),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", f, ["L"]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", f, ["L"]),
         helper.make_tensor_value_info("side", f, ["L"])],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(BRANCH_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.fixture(scope="module")
def lazy():  # noqa: ANN201
    model = ir.serde.deserialize_model(_marked())
    assert lazy_branches(model) == 1
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_each_branch_holds_what_only_its_path_needs(lazy) -> None:  # noqa: ANN001
    g = lazy.graph
    assert all(n.domain != BRANCH_DOMAIN for n in g.node)
    assert BRANCH_DOMAIN not in {o.domain for o in lazy.opset_import}
    (node,) = [n for n in g.node if n.op_type == "If"]
    ops = {a.name: [x.op_type for x in a.g.node] for a in node.attribute}
    # a1 feeds the `side` output as well: it stays outside, only Neg is the one-token path's
    # own; the reshapes' shape constants move with them
    assert ops == {"then_branch": ["Neg"],
                   "else_branch": ["Constant", "Constant", "Reshape", "Reshape", "Mul"]}
    outside = [n.op_type for n in g.node if n.op_type != "If"]
    assert sorted(outside) == ["Add", "Constant", "Constant", "Constant", "Equal", "Mul", "Relu"]
    assert [o.name for o in g.output] == ["y", "side"]


def test_ort_runs_the_chosen_path_alone(lazy) -> None:  # noqa: ANN001
    sess = ort.InferenceSession(lazy.SerializeToString(), providers=["CPUExecutionProvider"])
    x4 = np.arange(4, dtype=np.float32)
    y, side = sess.run(None, {"x": x4, "n": np.array(1, dtype=np.int64)})
    np.testing.assert_array_equal(y, -(2 * x4 + 1))
    np.testing.assert_array_equal(side, np.maximum(2 * x4 + 1, 0))
    x6 = np.arange(6, dtype=np.float32) - 2
    y, _ = sess.run(None, {"x": x6, "n": np.array(5, dtype=np.int64)})
    np.testing.assert_array_equal(y, 2 * x6 * x6)
    # a length of 4 cannot take the [-1, 3] reshape: the graph fails only where that path runs
    with pytest.raises(Exception, match="(?i)reshape"):
        sess.run(None, {"x": x4, "n": np.array(2, dtype=np.int64)})


def test_a_path_computed_outside_passes_through_an_identity() -> None:
    """``one`` is the shared node itself (read by the other path too): the then-branch only
    passes it on."""
    proto = _marked()
    marker = proto.graph.node[-1]
    marker.input[1] = "shared"
    model = ir.serde.deserialize_model(proto)
    lazy_branches(model)
    out = ir.serde.serialize_model(model)
    (node,) = [n for n in out.graph.node if n.op_type == "If"]
    then = {a.name: a.g for a in node.attribute}["then_branch"]
    assert [n.op_type for n in then.node] == ["Identity"]
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(sess.run(None, {"x": x, "n": np.array(1)})[0], 2 * x)


def test_one_token_or_picks_by_length_and_copies() -> None:
    one, more = torch.zeros(2, 3), torch.ones(2, 3)
    got = torch.ops.slimfx.one_token_or(1, one, more)
    assert torch.equal(got, one) and got.data_ptr() != one.data_ptr()
    assert torch.equal(torch.ops.slimfx.one_token_or(4, one, more), more)
    with pytest.raises(ValueError, match="differ"):
        torch.ops.slimfx.one_token_or(1, one, torch.ones(3, 2))


def test_the_exports_optimizer_runs_without_its_quadratic_rules_then_all_again() -> None:
    """``linear_time_rewrites``: inside, the rewriter's default rules keep only patterns of one
    output node (``SlicesSplit``, matched against every node pair, is gone); after the block —
    also one left by an error — the very same rule list is back."""
    from onnxscript import rewriter

    from slimfx.backends.onnx_graph import linear_time_rewrites

    before = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(before, tuple):  # the exports then leave the optimizer as it is
        pytest.skip("this onnxscript has no default rule list to filter")
    names = [r.name for r in before]
    assert "SlicesSplit" in names
    with linear_time_rewrites():
        inside = rewriter._DEFAULT_REWRITE_RULES
        assert all(len(r._target_pattern.output_nodes) == 1 for r in inside)
        assert [r.name for r in inside] == [n for n in names if n != "SlicesSplit"]
    assert rewriter._DEFAULT_REWRITE_RULES is before
    with pytest.raises(RuntimeError), linear_time_rewrites():
        raise RuntimeError("export failed")
    assert rewriter._DEFAULT_REWRITE_RULES is before
