"""The mutation API of the IR graph: uses and edges stay in sync, graph outputs keep their names, renames and
replacements reach into subgraphs, and a subgraph's reads of enclosing values (implicit inputs) never go
stale."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder, assert_same_outputs, ops, seeded_feeds
from onnx import TensorProto

from llmc.errors import IRError
from llmc.ir import Graph, from_onnx, structural_hash, to_onnx, to_text, verify

FLOAT, BOOL = TensorProto.FLOAT, TensorProto.BOOL


def chain() -> Graph:
    """x -> Exp -> e -> Neg -> y (graph output); e is also read twice by Mul -> m (graph output)."""
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    b.node("Exp", ["x"], ["e"])
    b.node("Neg", ["e"], ["y"])
    b.node("Mul", ["e", "e"], ["m"])
    b.output("y", FLOAT, [3])
    b.output("m", FLOAT, [3])
    return b.ir()


def with_if() -> Graph:
    """``a = Exp(x)``, read inside both branches of an If (the else branch nests another If)."""
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    b.input("cond", BOOL, [])
    b.node("Exp", ["x"], ["a"])
    then = b.sub("then")
    then.node("Add", ["a", "x"], ["then_y"])
    then.output("then_y", FLOAT, [3])
    other = b.sub("else")
    inner = other.sub("inner")
    inner.node("Neg", ["a"], ["inner_y"])
    inner.output("inner_y", FLOAT, [3])
    other.node("If", ["cond"], ["else_y"], then_branch=inner.graph(), else_branch=inner.graph())
    other.output("else_y", FLOAT, [3])
    b.node("If", ["cond"], ["y"], then_branch=then.graph(), else_branch=other.graph())
    b.output("y", FLOAT, [3])
    return b.ir()


def branches(graph: Graph):
    node = graph.find("If")[0]
    return node, node.subgraphs["then_branch"], node.subgraphs["else_branch"]


def test_a_value_used_twice_by_one_node_is_two_edges():
    graph = chain()
    mul = graph.find("Mul")[0]
    assert graph.uses("e") == [(graph.find("Neg")[0], 0), (mul, 0), (mul, 1)]
    assert graph.consumers("e") == [graph.find("Neg")[0], mul]
    exp = graph.producer("e")
    assert graph.nx.number_of_edges(exp.id, mul.id) == 2
    graph.set_input(mul, 1, "x")
    assert graph.nx.number_of_edges(exp.id, mul.id) == 1 and (mul, 1) in graph.uses("x")


def test_set_input_pads_absent_slots():
    graph = chain()
    neg = graph.find("Neg")[0]
    graph.set_input(neg, 2, "x")
    assert neg.inputs == ("e", "", "x") and neg.input(1) == "" and neg.input(7) == ""


def test_replace_all_uses_of_a_graph_output_keeps_its_name():
    graph = chain()
    before = to_onnx(graph)
    neg = graph.find("Neg")[0]
    # y := e: Exp's value takes the name "y"; Neg's value gets a fresh name
    graph.replace_all_uses("y", "e")
    assert graph.outputs == ["y", "m"]
    assert graph.producer("y").op_type == "Exp"
    assert graph.find("Mul")[0].inputs == ("y", "y")
    assert neg.inputs == ("y",) and neg.outputs[0] not in ("y", "e") and not graph.is_used(neg.outputs[0])
    graph.remove_node(neg)
    verify(graph)
    assert graph.values["y"].dtype == FLOAT
    feeds = seeded_feeds(before)
    out = assert_same_outputs(to_onnx(graph), to_onnx(graph), feeds)
    np.testing.assert_allclose(out["y"], np.exp(feeds["x"]), rtol=1e-6)


def test_replace_all_uses_with_a_graph_input_inserts_an_identity():
    graph = chain()
    graph.replace_all_uses("m", "x")  # an input cannot be renamed: an Identity keeps the output "m"
    assert graph.outputs == ["y", "m"]
    assert graph.producer("m").op_type == "Identity" and graph.producer("m").inputs == ("x",)
    graph.remove_node(graph.find("Mul")[0])
    verify(graph)


def test_replace_all_uses_reaches_into_subgraphs():
    graph = with_if()
    node, then, other = branches(graph)
    graph.add_node("Sin", ["x"], ["s"])
    graph.replace_all_uses("a", "s")
    assert then.find("Add")[0].inputs == ("s", "x")
    inner = other.find("If")[0]
    assert inner.subgraphs["then_branch"].find("Neg")[0].inputs == ("s",)
    assert node.implicit_inputs == ("cond", "s", "x") and inner.implicit_inputs == ("s",)
    assert not graph.is_used("a")
    graph.remove_node(graph.find("Exp")[0])
    verify(graph)


def test_rename_value_inside_subgraphs():
    graph = with_if()
    node, then, other = branches(graph)
    graph.rename_value("a", "renamed")
    assert graph.producer("renamed").op_type == "Exp"
    assert then.find("Add")[0].inputs == ("renamed", "x")
    assert other.find("If")[0].implicit_inputs == ("renamed",)
    assert (node, -2) in graph.uses("renamed") and not graph.uses("a")
    with pytest.raises(IRError, match="taken"):
        graph.rename_value("renamed", "x")
    # a rename inside a subgraph stays inside it
    then.rename_value("then_y", "then_sum")
    assert then.outputs == ["then_sum"]
    verify(graph)


def test_remove_node_refuses_while_outputs_are_used():
    graph = with_if()
    exp = graph.find("Exp")[0]
    with pytest.raises(IRError, match=r"'a' is still used by .*If.*\(at node Exp#\d+ -> a\)"):
        graph.remove_node(exp)  # read only by the branches: an implicit use
    neg = chain().find("Neg")[0]
    with pytest.raises(IRError, match="a graph output"):
        neg.graph.remove_node(neg)
    other = chain()
    with pytest.raises(IRError, match="does not belong"):
        other.remove_node(neg)
    graph.remove_node(exp, force=True)
    with pytest.raises(IRError, match="'a'"):
        verify(graph)


def test_implicit_inputs_follow_subgraph_changes():
    graph = with_if()
    node, then, other = branches(graph)
    assert node.implicit_inputs == ("a", "cond", "x")
    graph.add_node("Cos", ["x"], ["c"])
    added = then.add_node("Add", ["then_y", "c"], ["then_sum"])
    assert node.implicit_inputs == ("a", "c", "cond", "x")
    assert (node, -2) in graph.uses("c") and graph.consumers("c") == [node]
    with pytest.raises(IRError):
        graph.remove_node(graph.find("Cos")[0])
    then.remove_node(added)
    assert node.implicit_inputs == ("a", "cond", "x") and not graph.is_used("c")
    then.set_input(then.find("Add")[0], 0, "x")
    assert node.implicit_inputs == ("a", "cond", "x")  # the else branch still reads a
    verify(graph)


def test_implicit_inputs_follow_changes_two_scopes_down():
    graph = with_if()
    node, _, other = branches(graph)
    inner_if = other.find("If")[0]
    deep = inner_if.subgraphs["else_branch"]
    graph.add_node("Cos", ["x"], ["c"])
    deep.add_node("Add", ["inner_y", "c"], ["deep_sum"])  # reads a new outer value two scopes down
    assert inner_if.implicit_inputs == ("a", "c")
    assert node.implicit_inputs == ("a", "c", "cond", "x")  # stays ("a", "cond", "x"): stale
    with pytest.raises(IRError):  # so this succeeds, and leaves deep reading an undefined "c"
        graph.remove_node(graph.find("Cos")[0])


def test_values_defined_inside_a_subgraph_are_not_implicit_inputs():
    graph = with_if()
    node, then, _ = branches(graph)
    then.add_node("Relu", ["then_y"], ["local"])
    then.add_node("Abs", ["local"], ["local2"])
    assert "local" not in node.implicit_inputs and "then_y" not in node.implicit_inputs


def test_add_node_refuses_a_second_definition():
    graph = chain()
    with pytest.raises(IRError, match="defined twice"):
        graph.add_node("Abs", ["x"], ["e"])


def test_generated_names_are_unique_and_deterministic():
    names = []
    for _ in range(2):
        graph = with_if()
        _, then, _ = branches(graph)
        node = graph.add_node("Relu", ["x"], 2, name="r")
        names.append((node.outputs, then.unique_name("then_y"), graph.unique_name("fresh")))
    assert names[0] == names[1]
    (a, b), taken, fresh = names[0]
    assert len({a, b, taken}) == 3 and taken != "then_y" and fresh == "fresh"


def test_node_order_is_stable_and_topological():
    graph = chain()
    neg = graph.find("Neg")[0]
    graph.add_node("Abs", ["e"], ["early"], order=neg.order - 0.5)
    assert ops(graph) == ["Exp", "Abs", "Neg", "Mul"]
    assert to_text(graph) == to_text(graph)


def test_structural_hash_tracks_changes_not_identity():
    graph = chain()
    h = structural_hash(graph)
    assert structural_hash(from_onnx(to_onnx(graph))) == h
    graph.add_initializer("w", np.ones(3, np.float32))
    h2 = structural_hash(graph)
    assert h2 != h
    graph.set_initializer("w", np.ones(3, np.float32))  # same bytes, new entry: the hash moves
    assert structural_hash(graph) != h2
    graph.find("Mul")[0].set_attr("unused", 1)
    assert structural_hash(graph) != h2


def test_weights_are_read_only():
    graph = chain()
    name = graph.add_initializer("w", np.ones(3, np.float32))
    with pytest.raises(ValueError):
        graph.initializers[name][0] = 2.0
