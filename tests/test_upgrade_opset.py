"""upgrade-opset and fold-weight-transposes, the two cleanups that make a model ready for the fusions: opset
bumps in place and through the version converter (weights re-attached, never copied; metadata kept; If bodies;
never a downgrade; clear errors), and Transpose(weight) folded into readable ``<weight>.T`` initializers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, apply_passes, check_golden, ops, seeded_feeds
from onnx import TensorProto

from llmc.errors import PassError
from llmc.ir import from_onnx, to_onnx
from llmc.pass_manager import PassOptionsError, get_pass_class, make_pass, run_pipeline

FLOAT, BOOL = TensorProto.FLOAT, TensorProto.BOOL
RNG = np.random.default_rng(2)
BIG = RNG.standard_normal((32, 64)).astype(np.float32)  # 8 KiB: elided from the converter's skeleton


@pytest.mark.parametrize("name", ["upgrade-opset", "fold-weight-transposes"])
def test_passes_have_the_one_shape(name: str) -> None:
    cls = get_pass_class(name)
    assert cls.name == name and cls.summary().startswith("Rewrites ")
    assert cls().options.model_dump() == cls.Options().model_dump()


# -- upgrade-opset ------------------------------------------------------------------------------------------
def plain_model(opset: int = 21) -> onnx.ModelProto:
    b = GraphBuilder(opset=opset)
    b.input("x", FLOAT, [2, 32])
    b.initializer("w", BIG)
    b.node("Relu", [b.node("MatMul", ["x", "w"], name="proj")], ["y"], name="act")
    b.output("y", FLOAT, [2, 64])
    return b.model()


def test_upgrade_without_node_changes_only_bumps_the_opset() -> None:
    graph = from_onnx(plain_model(21))
    weight = graph.initializers["w"]
    nodes = graph.nodes()
    result = make_pass("upgrade-opset").run(graph, None)
    assert result.changed and result.stats == {"from": 21, "to": 23, "nodes_rebuilt": 0}
    assert graph.opset_imports == {"": 23}
    assert graph.nodes() == nodes  # the very node objects
    assert graph.initializers["w"] is weight
    assert graph.ir_version >= 11  # the IR version opset 23 came with


def test_upgrade_rebuilds_converted_nodes_in_place(request: pytest.FixtureRequest) -> None:
    """Opset 16 -> 23: ReduceMean's axes attribute becomes an input; the weights stay the same arrays and the
    nodes keep their metadata, which the converter drops."""
    b = GraphBuilder(opset=16)
    b.input("x", FLOAT, [2, 32])
    b.initializer("w", BIG)
    b.initializer("bias", np.ones(64, np.float32))  # small: travels inside the skeleton
    h = b.node("Add", [b.node("MatMul", ["x", "w"], name="proj"), "bias"], name="bias_add")
    mean = b.node("ReduceMean", [h], name="mean", axes=[-1], keepdims=1)
    b.node("Sub", [h, mean], ["y"], name="center")
    b.output("y", FLOAT, [2, 64])
    model = b.model()
    onnx.helper.set_metadata_props(model.graph.node[0], {"namespace": "layers.0.proj"})
    graph = from_onnx(model)
    weight = graph.initializers["w"]
    feeds = seeded_feeds(model)
    report = run_pipeline(graph, ["upgrade-opset"])
    record = report.records[0]
    assert record.stats["from"] == 16 and record.stats["to"] == 23 and record.stats["nodes_rebuilt"] >= 1
    assert graph.initializers["w"] is weight  # re-attached by name, not copied
    (reduce,) = graph.find("ReduceMean")
    assert reduce.name == "mean" and reduce.attr("axes") is None and len(reduce.inputs) == 2
    assert graph.find("MatMul")[0].metadata == {"namespace": "layers.0.proj"}
    from graphs import assert_same_outputs

    assert_same_outputs(model, graph, feeds)
    check_golden(request, graph, "fusion/upgrade_opset_16_to_23.onnxtxt")


def test_upgrade_converts_if_bodies_and_gives_their_weights_back() -> None:
    then, other = GraphBuilder("then", opset=16, prefix="a"), GraphBuilder("else", opset=16, prefix="b")
    then.initializer("w_then", BIG)
    then.node("ReduceMean", [then.node("MatMul", ["x", "w_then"])], ["t_out"], axes=[-1], keepdims=1)
    then.output("t_out", FLOAT, [2, 1])
    other.node("ReduceMean", ["x"], ["e_out"], axes=[-1], keepdims=1)
    other.output("e_out", FLOAT, [2, 1])
    b = GraphBuilder(opset=16)
    b.input("x", FLOAT, [2, 32])
    b.input("cond", BOOL, [])
    b.node("If", ["cond"], ["y"], name="branch", then_branch=then.graph(), else_branch=other.graph())
    b.output("y", FLOAT, [2, 1])
    model = b.model()
    feeds = seeded_feeds(model)
    graph, report = apply_passes(
        model, ["upgrade-opset"], feeds=[{**feeds, "cond": np.array(flag)} for flag in (True, False)]
    )
    (branch,) = graph.nodes()
    then_graph = branch.subgraphs["then_branch"]
    assert "w_then" in then_graph.initializers and "w_then" not in graph.initializers
    assert all(len(n.inputs) == 2 for n in then_graph.find("ReduceMean"))


def test_upgrade_keeps_initializers_that_are_also_inputs() -> None:
    b = GraphBuilder(opset=16)
    b.input("x", FLOAT, [2, 32])
    b.input("w", FLOAT, [32, 64])  # an input with a default: the initializer stays overridable
    b.initializer("w", BIG)
    b.node("ReduceMean", [b.node("MatMul", ["x", "w"])], ["y"], axes=[-1], keepdims=1)
    b.output("y", FLOAT, [2, 1])
    graph = from_onnx(b.model())
    weight = graph.initializers["w"]
    run_pipeline(graph, ["upgrade-opset"])
    assert graph.inputs == ["x", "w"] and graph.initializers["w"] is weight


def test_upgrade_never_downgrades() -> None:
    graph = from_onnx(plain_model(24))
    result = make_pass("upgrade-opset", {"version": 23}).run(graph, None)
    assert not result.changed and graph.opset_imports == {"": 24}


def test_upgrade_to_an_unknown_opset_is_a_clear_error() -> None:
    newest = onnx.defs.onnx_opset_version()
    graph = from_onnx(plain_model())
    with pytest.raises(PassError, match=f"cannot upgrade to opset {newest + 1}: the installed onnx"):
        run_pipeline(graph, [{"upgrade-opset": {"version": newest + 1}}])
    with pytest.raises(PassOptionsError, match="version"):
        make_pass("upgrade-opset", {"version": 0})


def test_upgrade_the_converter_cannot_do_is_a_clear_error() -> None:
    b = GraphBuilder(opset=1)  # no adapter takes opset 1 models with these ops everywhere
    b.input("x", FLOAT, [2, 4])
    b.node("Upsample", ["x"], ["y"], scales=[1.0, 2.0], mode="nearest")
    b.output("y", FLOAT, [2, 8])
    graph = from_onnx(b.model())
    with pytest.raises(PassError, match="onnx.version_converter cannot take this model from opset 1 to 23"):
        run_pipeline(graph, ["upgrade-opset"])


def test_other_domains_are_kept() -> None:
    b = GraphBuilder(opset=17)
    b.input("x", FLOAT, [2, 4])
    b.node("ReduceMean", [b.node("FastGelu", ["x"], domain="com.microsoft")], ["y"], axes=[-1], keepdims=1)
    b.output("y", FLOAT, [2, 1])
    graph = from_onnx(b.model(extra_opsets={"com.microsoft": 1}))
    run_pipeline(graph, ["upgrade-opset"])
    assert graph.opset_imports == {"": 23, "com.microsoft": 1}
    assert [(n.domain, n.op_type) for n in graph.nodes()][0] == ("com.microsoft", "FastGelu")


# -- fold-weight-transposes ---------------------------------------------------------------------------------
def linear_model(*, shared: bool = False, twice: bool = False, big: bool = False) -> onnx.ModelProto:
    """``MatMul(x, Transpose(W))`` as dynamo writes nn.Linear, W stored [out, in]."""
    b = GraphBuilder(opset=21)
    rows, cols = (1024, 512) if big else (16, 8)
    b.input("x", FLOAT, [2, cols])
    b.initializer("proj.weight", RNG.standard_normal((rows, cols)).astype(np.float32))
    out = b.node("MatMul", ["x", b.node("Transpose", ["proj.weight"], perm=[1, 0])], name="proj")
    if twice:  # a second, un-CSE'd Transpose of the same weight
        out = b.node("Add", [out, b.node("MatMul", ["x", b.node("Transpose", ["proj.weight"], perm=[1, 0])])])
    if shared:  # tied embeddings: the same matrix gathered as it is
        b.input("ids", TensorProto.INT64, [2])
        gathered = b.node("Gather", ["proj.weight", "ids"])
        out = b.node("Add", [out, b.node("ReduceSum", [gathered], keepdims=0)])
    b.node("Identity", [out], ["y"])
    b.output("y", FLOAT, [2, rows])
    return b.model()


def test_fold_weight_transposes(request: pytest.FixtureRequest) -> None:
    graph, report = apply_passes(linear_model(), ["fold-weight-transposes"])
    assert report.records[0].stats == {"folded": 1, "bytes": 16 * 8 * 4, "removed": 1}
    assert ops(graph) == ["MatMul", "Identity"]
    assert graph.nodes()[0].inputs == ("x", "proj.weight.T")
    assert list(graph.initializers) == ["proj.weight.T"]
    check_golden(request, graph, "fusion/fold_weight_transposes.onnxtxt")


def test_fold_has_no_size_limit_and_shares_one_copy() -> None:
    graph, report = apply_passes(linear_model(big=True, twice=True), ["fold-weight-transposes"], atol=1e-4)
    assert report.records[0].stats["folded"] == 1 and report.records[0].stats["bytes"] == 1024 * 512 * 4
    assert {n.inputs[1] for n in graph.find("MatMul")} == {"proj.weight.T"}


def test_fold_keeps_weights_that_others_read_as_they_are() -> None:
    graph, report = apply_passes(linear_model(shared=True), ["fold-weight-transposes"])
    record = report.records[0]
    assert not record.changed and "Transpose" in ops(graph)
    (kept,) = record.details["kept"]
    assert kept["weight"] == "proj.weight"
    assert kept["reason"].startswith("'proj.weight' is also read by Gather#")
    graph, report = apply_passes(
        linear_model(shared=True), [{"fold-weight-transposes": {"fold_shared": True}}]
    )
    assert "Transpose" not in ops(graph) and {"proj.weight", "proj.weight.T"} <= set(graph.initializers)


def test_fold_general_permutations_and_identity() -> None:
    b = GraphBuilder(opset=21)
    b.input("x", FLOAT, [4, 2, 3])
    b.initializer("k", RNG.standard_normal((4, 2, 3)).astype(np.float32))
    b.initializer("c", RNG.standard_normal((4, 2, 2)).astype(np.float32))
    permuted = b.node("Transpose", ["k"], perm=[0, 2, 1])
    same = b.node("Transpose", ["c"], perm=[0, 1, 2])
    b.node("Add", [b.node("MatMul", ["x", permuted]), same], ["y"])
    b.output("y", FLOAT, [4, 2, 2])
    graph, report = apply_passes(b.model(), ["fold-weight-transposes"])
    assert report.records[0].stats == {"folded": 1, "identity": 1, "bytes": 96, "removed": 1}
    assert ops(graph) == ["MatMul", "Add"]
    assert sorted(graph.initializers) == ["c", "k.transpose_0_2_1"]


def test_transposes_of_activations_stay() -> None:
    b = GraphBuilder(opset=21)
    b.input("x", FLOAT, [2, 3])
    b.node("Transpose", ["x"], ["y"], perm=[1, 0])
    b.output("y", FLOAT, [3, 2])
    graph = from_onnx(b.model())
    result = make_pass("fold-weight-transposes").run(graph, None)
    assert not result.changed and ops(graph) == ["Transpose"]
    assert to_onnx(graph) == to_onnx(from_onnx(b.model()))
