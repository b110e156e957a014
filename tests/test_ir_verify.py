"""The verifier: structural problems are IRErrors that name the node; onnx.checker and strict shape inference
failures surface as IRErrors too."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder
from onnx import TensorProto

from llmc.errors import IRError
from llmc.ir import Graph, verify, verify_structure

FLOAT, BOOL = TensorProto.FLOAT, TensorProto.BOOL


def small() -> Graph:
    b = GraphBuilder()
    b.input("x", FLOAT, [2, 3])
    b.initializer("w", np.ones((2, 3), np.float32))
    b.node("Add", ["x", "w"], ["s"], name="add")
    b.node("Relu", ["s"], ["y"])
    b.output("y", FLOAT, [2, 3])
    return b.ir()


def test_a_valid_graph_verifies():
    verify(small())


def test_a_cycle_is_reported_with_its_nodes():
    graph = small()
    relu = graph.find("Relu")[0]
    graph.set_input(graph.find("Add")[0], 1, "y")  # add reads relu, which reads add
    with pytest.raises(IRError, match=r"cycle: .*add \(Add\).*Relu#\d+ -> y"):
        verify(graph)
    assert relu in graph


def test_an_undefined_input_is_reported_with_its_node():
    graph = small()
    graph.set_input(graph.find("Relu")[0], 0, "nowhere")
    with pytest.raises(IRError, match=r"input 0 'nowhere' is not defined.*at node Relu#\d+ -> y"):
        verify_structure(graph)


def test_a_second_definition_is_reported_with_its_node():
    graph = small()
    graph.add_node("Neg", ["x"], ["w"], name="shadow")  # redefines the initializer w
    with pytest.raises(IRError, match=r"'w' redefines a graph input or initializer.*at node shadow \(Neg\)"):
        verify(graph)


def test_a_subgraph_reading_an_undefined_value_names_its_owner():
    b = GraphBuilder()
    b.input("x", FLOAT, [2])
    b.input("cond", BOOL, [])
    b.node("Exp", ["x"], ["a"])
    branch = b.sub("branch")
    branch.node("Neg", ["a"], ["branch_y"])
    branch.output("branch_y", FLOAT, [2])
    b.node("If", ["cond"], ["y"], name="choose", then_branch=branch.graph(), else_branch=branch.graph())
    b.output("y", FLOAT, [2])
    graph = b.ir()
    graph.remove_node(graph.find("Exp")[0], force=True)
    with pytest.raises(IRError, match=r"'a'.*at node (choose \(If\)|Neg#\d+ -> branch_y)"):
        verify(graph)


def test_an_undefined_graph_output_is_reported():
    graph = small()
    graph.outputs.append("ghost")
    with pytest.raises(IRError, match="graph output 'ghost'"):
        verify_structure(graph)


def test_checker_failures_are_ir_errors():
    graph = small()
    graph.find("Relu")[0].set_attr("alpha", 0.5)  # Relu has no such attribute
    with pytest.raises(IRError, match=r"^onnx.checker: .*alpha"):
        verify(graph)
    graph = small()
    graph.add_node("NoSuchOp", ["x"], ["z"])
    with pytest.raises(IRError, match=r"^onnx.checker: .*NoSuchOp"):
        verify(graph)
    verify(graph, check_schemas=False, infer_shapes=False)  # structure alone is fine


def test_shape_inference_failures_are_ir_errors():
    graph = small()
    graph.add_initializer("m", np.ones((4, 4), np.float32))
    graph.add_node("MatMul", ["y", "m"], ["bad"])  # [2, 3] x [4, 4]
    with pytest.raises(IRError, match=r"^shape inference: .*MatMul"):
        verify(graph)
    graph = small()
    graph.values["y"].dtype = TensorProto.INT64  # the output says int64, Relu computes float
    with pytest.raises(IRError, match=r"^shape inference: "):
        verify(graph)


def _if_with_weight(nbytes: int) -> Graph:
    b = GraphBuilder()
    b.input("x", FLOAT, [nbytes // 4])
    b.input("cond", BOOL, [])
    then = b.sub("then")
    then.initializer("w_then", np.ones(nbytes // 4, np.float32))
    then.node("Add", ["x", "w_then"], ["then_y"])
    then.output("then_y", FLOAT, [nbytes // 4])
    other = b.sub("else")
    other.node("Neg", ["x"], ["else_y"])
    other.output("else_y", FLOAT, [nbytes // 4])
    b.node("If", ["cond"], ["y"], then_branch=then.graph(), else_branch=other.graph())
    b.output("y", FLOAT, [nbytes // 4])
    return b.ir()


def test_subgraph_weights_below_the_elision_size_verify():
    verify(_if_with_weight(1024))


def test_subgraph_weights_above_the_elision_size_verify():
    verify(_if_with_weight(1 << 17))  # a valid model: If branches with a 128 KiB weight


def _shadowing() -> Graph:
    b = GraphBuilder()
    b.input("x", FLOAT, [2])
    b.input("cond", BOOL, [])
    b.node("Exp", ["x"], ["a"])
    branch = b.sub("branch")
    branch.node("Neg", ["x"], ["a"], name="shadowing")  # "a" is already the outer Exp's value
    branch.node("Abs", ["a"], ["branch_y"])
    branch.output("branch_y", FLOAT, [2])
    b.node("If", ["cond"], ["y"], then_branch=branch.graph(), else_branch=branch.graph())
    b.node("Add", ["y", "a"], ["z"])
    b.output("z", FLOAT, [2])
    return b.ir()


def test_a_subgraph_redefining_an_outer_value_is_an_error():
    with pytest.raises(IRError, match=r"'a'"):  # today from onnx.checker ("SSA form"), without the node
        verify(_shadowing())


def test_a_subgraph_redefining_an_outer_value_is_reported_with_its_node():
    with pytest.raises(IRError, match=r"'a'.*at node shadowing \(Neg\)"):
        verify_structure(_shadowing())
