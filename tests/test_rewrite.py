"""The rewrite engine: matching (commutative, bound variables, constants), checks with reasons, rewriting,
rule stamping, near-miss reasons, and rule sets named from a spec."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from llmc.ir import Graph, from_onnx, to_onnx, verify
from llmc.rewrite import RULE_KEY, Match, Op, RewriteRule, RuleSet, Var


def _graph(nodes, inputs, outputs, inits=()) -> Graph:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def _run(graph: Graph, feeds):
    sess = ort.InferenceSession(to_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _matmul_add_graph(extra_use: bool = False, swap: bool = False) -> Graph:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    add_inputs = ["b", "mm"] if swap else ["mm", "b"]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
        helper.make_node("Add", add_inputs, ["y"], name="add"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    if extra_use:
        nodes.append(helper.make_node("Relu", ["mm"], ["z"], name="relu"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    return _graph(nodes, [x], outputs, [w, b])


def _to_gemm(b, m: Match):
    return b.op1("Gemm", [m["x"], m["w"], m["b"]])


def _rank2(graph: Graph, m: Match) -> str | None:
    shape = graph.shape(m["x"])
    return None if shape is not None and len(shape) == 2 else f"input '{m['x']}' is not 2-D"


GEMM = RewriteRule(
    "matmul-add-to-gemm",
    Op("Add", Op("MatMul", Var("x"), Var("w", constant=True), name="mm"), Var("b", constant=True)),
    _to_gemm,
    check=_rank2,
)
RULES = RuleSet("test-gemm", [GEMM])


def test_rule_fires_in_both_operand_orders_and_stamps_its_name() -> None:
    for swap in (False, True):
        graph = _matmul_add_graph(swap=swap)
        x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
        before = _run(graph, {"x": x})
        report = RULES.apply(graph)
        verify(graph)
        assert report.hits["matmul-add-to-gemm"] == 1
        nodes = graph.nodes()
        assert [n.op_type for n in nodes] == ["Gemm"]
        assert nodes[0].metadata[RULE_KEY] == "matmul-add-to-gemm"
        assert graph.outputs == ["y"]  # the interface name is kept
        np.testing.assert_allclose(_run(graph, {"x": x})[0], before[0], rtol=1e-5, atol=1e-6)


def test_near_miss_reports_why() -> None:
    graph = _matmul_add_graph(extra_use=True)
    report = RULES.apply(graph)
    assert not report.hits
    assert len(report.misses) == 1
    assert "also used by relu (Relu)" in report.misses[0].reason
    assert report.misses[0].site == "add (Add)"


def test_check_rejects_with_reason() -> None:
    graph = _matmul_add_graph()
    graph.values["x"].shape = None
    report = RULES.apply(graph)
    assert not report.hits and report.misses[0].reason == "input 'x' is not 2-D"


def test_bound_variable_must_be_the_same_value() -> None:
    silu = RewriteRule(
        "silu",
        Op("Mul", Var("x"), Op("Sigmoid", Var("x"))),
        lambda b, m: b.op1("Neg", [b.op1("Neg", [m["x"]])]),
    )
    ok = _graph(
        [helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Mul", ["s", "a"], ["y"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    assert RuleSet("s", [silu]).apply(ok).hits["silu"] == 1
    other = _graph(
        [helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Mul", ["s", "c"], ["y"])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    report = RuleSet("s", [silu]).apply(other)
    assert not report.hits and "must be the same value" in report.misses[0].reason


def test_rule_set_named_in_a_pipeline_runs_as_a_pass() -> None:
    from llmc.pass_manager import run_pipeline

    graph = _matmul_add_graph()
    report = run_pipeline(graph, ["test_rewrite:RULES"])
    record = report.records[0]
    assert record.name == "rules" and record.stats["fused"] == 1
    assert record.details["fused"] == {"matmul-add-to-gemm": 1}
    assert isinstance(onnx.printer.to_text(to_onnx(graph)), str)
