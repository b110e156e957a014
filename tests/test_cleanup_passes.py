"""The cleanup passes: rewrites on tiny hand-built graphs (IR-text goldens under tests/expected/cleanup/),
numerical equivalence in onnxruntime on seeded inputs, near-misses that must stay as they are, and the
cleanup pipeline on the real models that ship in installed packages."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import (
    REAL_MODEL_INPUTS,
    GraphBuilder,
    apply_passes,
    assert_same_outputs,
    check_golden,
    ops,
    real_models,
    seeded_feeds,
    stats_of,
)
from onnx import TensorProto

from llmc.ir import from_onnx, to_onnx, to_text
from llmc.pass_manager import PassOptionsError, get_pass_class, make_pass, run_pipeline
from llmc.passes.cleanup import _common

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
CLEANUP = ["fold-constants", "eliminate-common-subexpressions", "remove-identity", "eliminate-dead-code"]


def if_model(then: GraphBuilder, other: GraphBuilder, b: GraphBuilder, out: str = "y") -> onnx.ModelProto:
    """``b`` plus ``out = If(cond, then, other)`` (float [3]) with a bool input ``cond``."""
    b.input("cond", BOOL, [])
    b.node("If", ["cond"], [out], name="branch", then_branch=then.graph(), else_branch=other.graph())
    b.output(out, FLOAT, [3])
    return b.model()


def both_branches(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    feeds = seeded_feeds(model)
    return [{**feeds, "cond": np.array(flag)} for flag in (True, False)]


@pytest.mark.parametrize(
    "name", ["fold-constants", "eliminate-dead-code", "eliminate-common-subexpressions", "remove-identity"]
)
def test_passes_have_the_one_shape(name):
    cls = get_pass_class(name)
    assert cls.name == name
    assert cls.summary().startswith("Rewrites ")
    assert cls().options.model_dump() == cls.Options().model_dump()
    with pytest.raises(PassOptionsError, match="not_an_option"):
        make_pass(name, {"not_an_option": 1})


# -- fold-constants ----------------------------------------------------------------------------------------
def messy_constants() -> onnx.ModelProto:
    b = GraphBuilder()
    b.input("x", FLOAT, [2, 3])
    b.initializer("a", np.arange(3, dtype=np.float32))
    b.initializer("b", np.full(3, 0.5, np.float32))
    c = b.constant(np.float32(2.0))  # unnamed Constant node
    s = b.node("Add", ["a", "b"], name="dup")
    s = b.node("Mul", [s, c], name="dup")  # same name again
    y = b.node("Add", ["x", s])
    shape = b.node("Shape", ["x"])  # x's shape is static: folds to int64 [2, 3]
    cols = b.node("Slice", [shape, b.constant(np.array([1])), b.constant(np.array([2]))])  # [3]
    b.node("Reshape", [y, b.node("Concat", [cols, b.constant(np.array([2]))], axis=0)], ["y"])  # to [3, 2]
    b.node("Clip", ["a", "", b.constant(np.float32(1.0))], ["z"])  # empty optional min keeps its slot
    b.output("y", FLOAT, [3, 2])
    b.output("z", FLOAT, [3])
    return b.model()


def test_fold_constants_folds_chains_and_keeps_output_names(request):
    graph, report = apply_passes(messy_constants(), ["fold-constants", "eliminate-dead-code"])
    assert ops(graph) == ["Add", "Reshape"]
    assert graph.outputs == ["y", "z"]
    assert graph.initializers["z"].tolist() == [0.0, 1.0, 1.0]  # Clip(a, "", 1): only max applied
    reshape = graph.find("Reshape")[0]
    target = graph.initializers[reshape.inputs[1]]
    assert target.dtype == np.int64 and target.tolist() == [3, 2]
    assert stats_of(report, "fold-constants") == {"constant_nodes": 5, "shapes": 1, "folded": 5}
    check_golden(request, graph, "cleanup/fold_constants.onnxtxt")


def test_fold_constants_keeps_dtypes_exact():
    b = GraphBuilder()
    b.initializer("shape_i64", np.array([4, 2], np.int64))
    b.node("Mul", ["shape_i64", b.constant(np.array(3, np.int64))], ["i64"])
    b.node("Cast", ["shape_i64"], ["i32"], to=TensorProto.INT32)
    b.node("Cast", [b.constant(np.array([1.5, -2.0], np.float32))], ["f16"], to=TensorProto.FLOAT16)
    b.node("Div", [b.constant(np.array([7], np.int64)), b.constant(np.array([2], np.int64))], ["idiv"])
    b.node("Add", [b.constant(np.int64(2)), b.constant(np.int64(3))], ["scalar"])  # rank 0 stays rank 0
    b.output("scalar", INT64, [])
    for name, dtype in [
        ("i64", INT64),
        ("i32", TensorProto.INT32),
        ("f16", TensorProto.FLOAT16),
        ("idiv", INT64),
    ]:
        b.output(name, dtype, [1 if name == "idiv" else 2])
    graph, _ = apply_passes(b.model(), ["fold-constants"])
    got = {name: graph.initializers[name] for name in graph.outputs}
    assert got.pop("scalar").shape == ()
    assert {k: v.dtype for k, v in got.items()} == {
        "i64": np.int64,
        "i32": np.int32,
        "f16": np.float16,
        "idiv": np.int64,
    }
    assert got["idiv"].tolist() == [3] and got["i64"].tolist() == [12, 6]


def test_fold_constants_falls_back_to_onnx_reference(monkeypatch):
    """bfloat16 and float8 results: onnxruntime cannot hand them to numpy, onnx.reference can."""
    import ml_dtypes

    b = GraphBuilder()
    src = b.initializer("src", np.array([1.0, 2.5, -3.0], np.float32))
    b.node("Cast", [src], ["bf16"], to=TensorProto.BFLOAT16)
    b.node("Cast", [src], ["f8"], to=TensorProto.FLOAT8E4M3FN)
    b.output("bf16", TensorProto.BFLOAT16, [3])
    b.output("f8", TensorProto.FLOAT8E4M3FN, [3])
    graph = from_onnx(b.model())
    run_pipeline(graph, ["fold-constants"])
    assert graph.initializers["bf16"].dtype == ml_dtypes.bfloat16
    assert graph.initializers["f8"].dtype == ml_dtypes.float8_e4m3fn
    assert graph.initializers["bf16"].astype(np.float32).tolist() == [1.0, 2.5, -3.0]

    def no_ort(model):
        raise RuntimeError("pretend onnxruntime lacks this op")

    monkeypatch.setattr(_common, "_run_ort", no_ort)
    b = GraphBuilder()
    b.node("Add", [b.constant(np.array([1, 2], np.int64)), b.constant(np.array([3, 4], np.int64))], ["s"])
    b.output("s", INT64, [2])
    graph = from_onnx(b.model())
    run_pipeline(graph, ["fold-constants"])
    assert graph.initializers["s"].tolist() == [4, 6]


def test_fold_constants_inside_subgraphs_reads_outer_constants():
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    b.initializer("outer", np.array([1.0, 2.0, 3.0], np.float32))
    only_read_inside = b.constant(np.float32(0.5))  # a Constant node that only the branch reads
    then = b.sub("then")
    k = then.node("Mul", ["outer", then.constant(np.float32(10.0))])  # folds inside the branch
    then.node("Add", ["x", then.node("Add", [k, only_read_inside])], ["then_y"])
    then.output("then_y", FLOAT, [3])
    other = b.sub("else")
    other.node("Sub", ["outer", other.constant(np.float32(1.0))], ["else_y"])  # the branch output itself
    other.output("else_y", FLOAT, [3])
    model = if_model(then, other, b)
    graph, report = apply_passes(model, CLEANUP, feeds=both_branches(model))
    node = graph.find("If")[0]
    then_g, else_g = node.subgraphs["then_branch"], node.subgraphs["else_branch"]
    assert ops(then_g) == ["Add"] and ops(else_g) == []
    assert then_g.initializers[then_g.find("Add")[0].inputs[1]].tolist() == [10.5, 20.5, 30.5]
    assert else_g.initializers["else_y"].tolist() == [0.0, 1.0, 2.0]
    assert node.implicit_inputs == ("x",)  # "outer" is no longer read: DCE dropped it
    assert "outer" not in graph.initializers


def test_fold_constants_near_misses():
    b = GraphBuilder()
    b.input("x", FLOAT, ["n", 3])  # dynamic: Shape(x) is not static
    b.input("w", FLOAT, [3])
    b.initializer("w", np.ones(3, np.float32))  # a graph input's default: not a constant
    b.node("Add", ["w", b.constant(np.float32(1.0))], ["from_input"])
    b.node("Shape", ["x"], ["dyn_shape"])
    b.node("RandomNormal", [], ["noise"], shape=[3], seed=1.0)
    b.node("RandomUniformLike", [b.constant(np.zeros(3, np.float32))], ["noise2"], seed=2.0)
    b.node(
        "DequantizeLinear", [b.constant(np.array([1, 2, 3], np.int8)), b.constant(np.float32(0.5))], ["dq"]
    )
    for name, dtype in [
        ("from_input", FLOAT),
        ("dyn_shape", INT64),
        ("noise", FLOAT),
        ("noise2", FLOAT),
        ("dq", FLOAT),
    ]:
        b.output(name, dtype, [2 if name == "dyn_shape" else 3])
    graph = from_onnx(b.model())
    report = run_pipeline(graph, ["fold-constants"])
    assert ops(graph) == ["Add", "Shape", "RandomNormal", "RandomUniformLike", "DequantizeLinear"]
    assert stats_of(report, "fold-constants") == {"constant_nodes": 4}
    run_pipeline(graph, [{"fold-constants": {"skip_ops": []}}])
    assert "DequantizeLinear" not in ops(graph)


def test_fold_constants_size_limits():
    b = GraphBuilder()
    weight = b.initializer("w_int8", np.arange(64 * 64, dtype=np.int8).reshape(64, 64))
    b.node("Cast", [weight], ["w_f32"], to=TensorProto.FLOAT)  # 4 KiB -> 16 KiB: over max_growth
    # 8 GB if it were materialized: shape inference tells before anything is computed
    b.node("ConstantOfShape", [b.constant(np.array([1 << 16, 1 << 15], np.int64))], ["huge"])
    b.output("w_f32", FLOAT, [64, 64])
    b.output("huge", FLOAT, [1 << 16, 1 << 15])
    graph = from_onnx(b.model())
    report = run_pipeline(graph, ["fold-constants"])
    assert ops(graph) == ["Cast", "ConstantOfShape"]
    assert stats_of(report, "fold-constants")["skipped_too_large"] == 2
    run_pipeline(graph, [{"fold-constants": {"max_growth": 0}}])
    assert ops(graph) == ["ConstantOfShape"] and graph.initializers["w_f32"].dtype == np.float32
    run_pipeline(graph, [{"fold-constants": {"max_output_bytes": 1024, "max_growth": 0}}])
    assert ops(graph) == ["ConstantOfShape"]


def test_fold_constants_drops_unused_outputs_and_leaves_dead_nodes():
    b = GraphBuilder()
    values, _indices = b.node(
        "TopK",
        [b.constant(np.array([3.0, 1.0, 2.0], np.float32)), b.constant(np.array([2], np.int64))],
        ["top", "top_idx"],
    )
    b.node("Abs", [b.constant(np.array([-1.0], np.float32))], ["nobody_reads_this"])
    b.output(values, FLOAT, [2])
    graph, _ = apply_passes(b.model(), ["fold-constants"])
    assert graph.initializers["top"].tolist() == [3.0, 2.0]
    assert "top_idx" not in graph.initializers
    assert ops(graph) == ["Abs"]  # dead code is eliminate-dead-code's job, not worth evaluating here


def test_fold_constants_shape_attributes_and_size():
    b = GraphBuilder()
    b.input("x", FLOAT, [2, 3, 4])
    b.node("Shape", ["x"], ["tail"], start=-2)
    b.node("Size", ["x"], ["count"])
    b.output("tail", INT64, [2])
    b.output("count", INT64, [])
    graph, _ = apply_passes(b.model(), ["fold-constants"])
    assert graph.initializers["tail"].tolist() == [3, 4]
    assert graph.initializers["count"].dtype == np.int64 and int(graph.initializers["count"]) == 24


# -- eliminate-dead-code -----------------------------------------------------------------------------------
def test_dead_code_removes_nodes_initializers_and_value_info(request):
    b = GraphBuilder()
    b.input("x", FLOAT, [2])
    b.input("unused_input", FLOAT, [2])
    b.input("w", FLOAT, [2])
    b.initializer("w", np.ones(2, np.float32))  # default of an input: stays
    b.initializer("dead_weight", np.ones(2, np.float32))
    b.initializer("live_weight", np.full(2, 3.0, np.float32))
    t = b.node("Mul", ["x", "live_weight"])
    b.node("Add", [t, "dead_weight"], ["dead1"])
    b.node("Neg", ["dead1"], ["dead2"], name="dup")
    b.node("Dropout", [t], ["y", "mask"], name="dup")  # unused mask output: the node is live
    b.value_info("dead1", FLOAT, [2])
    b.value_info("ghost", FLOAT, [2])  # no value of that name exists
    b.value_info(t, FLOAT, [2])
    b.output("y", FLOAT, [2])
    graph, report = apply_passes(b.model(), ["eliminate-dead-code"])
    assert ops(graph) == ["Mul", "Dropout"]
    assert graph.inputs == ["x", "unused_input", "w"]
    assert sorted(graph.initializers) == ["live_weight", "w"]
    assert sorted(graph.values) == ["t0", "unused_input", "w", "x", "y"]
    assert stats_of(report, "eliminate-dead-code") == {"nodes": 2, "initializers": 1, "value_info": 2}
    check_golden(request, graph, "cleanup/dead_code.onnxtxt")


def test_dead_code_keeps_values_read_only_inside_subgraphs():
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    only_in_branch = b.node("Exp", ["x"], ["only_in_branch"])
    freed = b.node("Neg", ["x"], ["freed"])  # read by a dead node of the branch only
    then = b.sub("then")
    then.node("Add", [only_in_branch, "x"], ["then_y"])
    then.node("Sin", [freed], ["then_dead"])
    then.output("then_y", FLOAT, [3])
    other = b.sub("else")
    other.node("Identity", ["x"], ["else_y"])
    other.output("else_y", FLOAT, [3])
    model = if_model(then, other, b)
    graph, report = apply_passes(model, ["eliminate-dead-code"], feeds=both_branches(model))
    assert ops(graph) == ["Exp", "If"]
    node = graph.find("If")[0]
    assert ops(node.subgraphs["then_branch"]) == ["Add"]
    assert node.implicit_inputs == ("only_in_branch", "x")
    assert stats_of(report, "eliminate-dead-code")["nodes"] == 2


def test_dead_code_inside_loop_body_keeps_body_outputs():
    b = GraphBuilder()
    b.input("x", FLOAT, [2])
    body = b.sub("body")
    body.input("i", INT64, [])
    body.input("cond_in", BOOL, [])
    body.input("acc_in", FLOAT, [2])
    body.node("Identity", ["cond_in"], ["cond_out"])
    body.node("Add", ["acc_in", "x"], ["acc_out"])
    body.node("Mul", ["acc_in", "x"], ["body_dead"])
    body.output("cond_out", BOOL, [])
    body.output("acc_out", FLOAT, [2])
    b.initializer("trips", np.array(3, np.int64))
    b.node("Loop", ["trips", "", "x"], ["y"], body=body.graph())  # empty optional condition
    b.output("y", FLOAT, [2])
    graph, _ = apply_passes(b.model(), ["eliminate-dead-code"])
    loop = graph.find("Loop")[0]
    assert loop.inputs == ("trips", "", "x")
    assert ops(loop.subgraphs["body"]) == ["Identity", "Add"]
    assert loop.subgraphs["body"].inputs == ["i", "cond_in", "acc_in"]


# -- eliminate-common-subexpressions ----------------------------------------------------------------------
def test_cse_merges_duplicates(request):
    b = GraphBuilder()
    b.input("x", FLOAT, [2, 3])
    b.input("y", FLOAT, [2, 3])
    b.initializer("one_a", np.array([1.0], np.float32))
    b.initializer("one_b", np.array([1.0], np.float32))  # same dtype, shape and bytes: merged with one_a
    b.initializer("one_i", np.array([1065353216], np.int32))  # the bytes of 1.0f, another dtype: kept
    s1 = b.node("Add", ["x", "y"], name="same")
    s2 = b.node("Add", ["x", "y"], name="same")
    s3 = b.node("Add", ["y", "x"])  # no commutativity: a different expression
    m1 = b.node("Mul", [s1, "one_a"])
    m2 = b.node("Mul", [s2, "one_b"])  # equal once the initializers are merged
    r1 = b.node("ReduceSum", [m1], keepdims=0)
    r2 = b.node("ReduceSum", [m2], keepdims=1)  # another attribute value
    c1 = b.node("Clip", [s3, "", "one_a"])
    c2 = b.node("Clip", [s3, "one_a", ""])  # same inputs in other slots
    b.node(
        "Concat",
        [
            b.node("Reshape", [r1, b.constant(np.array([1], np.int64))]),
            b.node("Reshape", [r2, b.constant(np.array([1], np.int64))]),
            b.node("Reshape", [c1, b.constant(np.array([-1], np.int64))]),
            b.node("Reshape", [c2, b.constant(np.array([-1], np.int64))]),
            b.node("Cast", ["one_i"], to=FLOAT),
        ],
        ["out"],
        axis=0,
    )
    b.output("out", FLOAT, [15])
    graph, report = apply_passes(b.model(), ["eliminate-common-subexpressions"])
    assert stats_of(report, "eliminate-common-subexpressions") == {"initializers": 1, "nodes": 4}
    assert ops(graph).count("Add") == 2 and ops(graph).count("Mul") == 1 and ops(graph).count("Clip") == 2
    assert ops(graph).count("ReduceSum") == 2 and ops(graph).count("Constant") == 2
    assert sorted(graph.initializers) == ["one_a", "one_i"]
    check_golden(request, graph, "cleanup/cse.onnxtxt")


def test_cse_keeps_graph_output_names():
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    b.node("Exp", ["x"], ["inner"])
    b.node("Exp", ["x"], ["out_a"])  # duplicate of inner, and a graph output
    b.node("Neg", ["x"], ["out_b"])
    b.node("Neg", ["x"], ["out_c"])  # two graph outputs computing the same thing
    b.node("Add", ["inner", "out_a"], ["out_d"])
    for name in ("out_a", "out_b", "out_c", "out_d"):
        b.output(name, FLOAT, [3])
    graph, _ = apply_passes(b.model(), ["eliminate-common-subexpressions"])
    assert graph.outputs == ["out_a", "out_b", "out_c", "out_d"]
    assert ops(graph) == ["Exp", "Neg", "Add", "Identity"]
    assert graph.find("Add")[0].inputs == ("out_a", "out_a")
    assert graph.find("Identity")[0].inputs == ("out_b",)


def test_cse_never_merges_random_ops_or_subgraph_nodes():
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    b.input("cond", BOOL, [])
    for out in ("r1", "r2"):
        b.node("RandomNormal", [], [out], shape=[3], seed=5.0)
    for out in ("u1", "u2"):
        b.node("RandomUniformLike", ["x"], [out], seed=5.0)
    for out in ("i1", "i2"):
        then, other = b.sub("then", prefix=f"{out}_t"), b.sub("else", prefix=f"{out}_e")
        then.node("Neg", ["x"], [f"{out}_t"])
        then.output(f"{out}_t", FLOAT, [3])
        other.node("Abs", ["x"], [f"{out}_e"])
        other.output(f"{out}_e", FLOAT, [3])
        b.node("If", ["cond"], [out], then_branch=then.graph(), else_branch=other.graph())
    for out in ("r1", "r2", "u1", "u2", "i1", "i2"):
        b.output(out, FLOAT, [3])
    graph = from_onnx(b.model())
    report = run_pipeline(graph, ["eliminate-common-subexpressions"])
    assert len(graph) == 6 and not report.records[0].changed


def test_cse_rewrites_subgraph_reads_of_merged_values():
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    first = b.node("Sigmoid", ["x"], ["first"])
    second = b.node("Sigmoid", ["x"], ["second"])
    then = b.sub("then")
    then.node("Add", [second, "x"], ["then_y"])
    then.output("then_y", FLOAT, [3])
    other = b.sub("else")
    other.node("Mul", [first, second], ["else_y"])
    other.output("else_y", FLOAT, [3])
    model = if_model(then, other, b)
    graph, _ = apply_passes(model, ["eliminate-common-subexpressions"], feeds=both_branches(model))
    node = graph.find("If")[0]
    assert ops(graph) == ["Sigmoid", "If"]
    assert node.implicit_inputs == ("first", "x")
    assert node.subgraphs["else_branch"].find("Mul")[0].inputs == ("first", "first")


def test_cse_inside_subgraph_and_initializer_options():
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    b.input("w", FLOAT, [3])
    b.initializer("w", np.ones(3, np.float32))  # overridable: never merged
    b.initializer("w2", np.ones(3, np.float32))
    then = b.sub("then")
    then.node("Add", [then.node("Cos", ["x"]), then.node("Cos", ["x"])], ["then_y"])
    then.output("then_y", FLOAT, [3])
    other = b.sub("else")
    other.node("Add", ["w", "w2"], ["else_y"])
    other.output("else_y", FLOAT, [3])
    model = if_model(then, other, b)
    graph, report = apply_passes(
        model,
        [{"eliminate-common-subexpressions": {"merge_initializers": False}}],
        feeds=both_branches(model),
    )
    assert ops(graph.find("If")[0].subgraphs["then_branch"]) == ["Cos", "Add"]
    assert sorted(graph.initializers) == ["w", "w2"]
    run_pipeline(graph, ["eliminate-common-subexpressions"])
    assert sorted(graph.initializers) == ["w", "w2"]


# -- remove-identity --------------------------------------------------------------------------------------
def test_remove_identity_removes_noops(request):
    b = GraphBuilder()
    b.input("x", FLOAT, [2, 3])
    b.initializer("ratio", np.float32(0.5))
    b.initializer("off", np.array(False))
    b.initializer("same_shape", np.array([0, -1], np.int64))
    b.initializer("bcast", np.array([1, 3], np.int64))
    t = b.node("Identity", ["x"])
    t = b.node("Dropout", [t], name="drop")  # no training_mode: inference
    # training_mode a constant false, the optional mask output absent
    t, _ = b.node("Dropout", [t, "ratio", "off"], [b.fresh(), ""], name="drop")
    t = b.node("Cast", [t], to=FLOAT)  # float -> float, known from value_info
    b.value_info(t, FLOAT, [2, 3])
    t = b.node("Reshape", [t, "same_shape"])  # [0, -1] of a [2, 3] value is [2, 3]
    b.value_info(t, FLOAT, [2, 3])
    t = b.node("Expand", [t, "bcast"])
    b.value_info(t, FLOAT, [2, 3])
    t = b.node("CastLike", [t, "x"])
    b.node("Identity", [b.node("Relu", [t])], ["y"])  # the graph output keeps its name
    b.output("y", FLOAT, [2, 3])
    graph, report = apply_passes(b.model(), ["remove-identity", "eliminate-dead-code"])
    assert ops(graph) == ["Relu"]
    assert graph.find("Relu")[0].inputs == ("x",) and graph.find("Relu")[0].outputs == ("y",)
    assert stats_of(report, "remove-identity") == {
        "Identity": 2,
        "Dropout": 2,
        "Cast": 1,
        "Reshape": 1,
        "Expand": 1,
        "CastLike": 1,
    }
    check_golden(request, graph, "cleanup/remove_identity.onnxtxt")


def test_remove_identity_near_misses():
    b = GraphBuilder()
    b.input("x", FLOAT, [2, 3])
    b.input("train", BOOL, [])
    b.initializer("on", np.array(True))
    b.initializer("ratio", np.float32(0.0))  # ratio 0 keeps training-mode numerics deterministic
    b.initializer("flip", np.array([3, 2], np.int64))
    b.initializer("grow", np.array([2, 2, 3], np.int64))
    outs = [
        (b.node("Dropout", ["x", "ratio", "on"]), FLOAT, [2, 3]),  # training mode
        (b.node("Dropout", ["x", "ratio", "train"]), FLOAT, [2, 3]),  # training mode decided at run time
        (b.node("Cast", ["x"], to=TensorProto.DOUBLE), TensorProto.DOUBLE, [2, 3]),  # changes the dtype
        (b.node("Cast", [b.node("Relu", ["x"])], to=FLOAT), FLOAT, [2, 3]),  # input dtype unknown
        (b.node("Reshape", ["x", "flip"]), FLOAT, [3, 2]),  # changes the shape
        (b.node("Expand", ["x", "grow"]), FLOAT, [2, 2, 3]),  # broadcasts to a bigger shape
    ]
    masked, mask = b.node("Dropout", ["x"], 2)  # the mask is read
    outs += [(masked, FLOAT, [2, 3]), (mask, BOOL, [2, 3])]
    for out, dtype, shape in outs:
        b.output(out, dtype, shape)
    graph, report = apply_passes(b.model(), ["remove-identity"])
    assert ops(graph) == ["Dropout", "Dropout", "Cast", "Relu", "Cast", "Reshape", "Expand", "Dropout"]
    assert not report.records[0].changed


def test_remove_identity_keeps_identities_that_hold_output_names():
    """input -> output and output -> output need their Identity; a fixpoint must still converge."""
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    b.initializer("w", np.ones(3, np.float32))
    b.node("Identity", ["x"], ["y_from_input"])
    b.node("Identity", ["w"], ["y_from_weight"])
    b.node("Neg", ["x"], ["y_neg"])
    b.node("Identity", ["y_neg"], ["y_copy"])
    for name in ("y_from_input", "y_from_weight", "y_neg", "y_copy"):
        b.output(name, FLOAT, [3])
    graph, report = apply_passes(b.model(), [{"fixpoint": ["remove-identity", "eliminate-dead-code"]}])
    assert ops(graph) == ["Identity", "Identity", "Neg", "Identity"]
    assert stats_of(report, "remove-identity") == {"kept_for_output": 3}
    assert len(report.records) == 2


def test_remove_identity_in_subgraphs():
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    then = b.sub("then")
    then.node("Identity", ["x"], ["then_y"])  # reads the outer x: must stay (a branch output)
    then.output("then_y", FLOAT, [3])
    outer_copy = b.node("Identity", ["x"], ["outer_copy"])  # read only by the else branch
    other = b.sub("else")
    inner = other.node("Identity", [outer_copy])  # removed: Neg reads x directly
    other.node("Neg", [inner], ["else_y"])
    other.output("else_y", FLOAT, [3])
    model = if_model(then, other, b)
    graph, _ = apply_passes(model, ["remove-identity"], feeds=both_branches(model))
    node = graph.find("If")[0]
    assert ops(graph) == ["If"] and node.implicit_inputs == ("x",)
    assert ops(node.subgraphs["then_branch"]) == ["Identity"]
    assert ops(node.subgraphs["else_branch"]) == ["Neg"]
    assert node.subgraphs["else_branch"].find("Neg")[0].inputs == ("x",)


# -- the cleanup pipeline ---------------------------------------------------------------------------------
def test_cleanup_pipeline_reaches_a_fixpoint_on_a_messy_graph(request):
    b = GraphBuilder()
    b.input("x", FLOAT, [2, 4])
    b.initializer("w_q", np.arange(8, dtype=np.int8).reshape(4, 2))  # int8 weight behind Cast/Mul
    b.initializer("scale", np.float32(0.1))
    w = b.node("Mul", [b.node("Cast", ["w_q"], to=FLOAT), "scale"])
    h1 = b.node("MatMul", ["x", w], name="mm")
    h2 = b.node("MatMul", ["x", b.node("Identity", [w])], name="mm")  # the same after remove-identity
    shape = b.node("Shape", [h1])
    b.value_info(h1, FLOAT, [2, 2])
    b.node("Add", [b.node("Reshape", [h1, shape]), h2], ["y"])
    b.node("Dropout", ["x"], ["unused_dropout", ""])
    b.output("y", FLOAT, [2, 2])
    graph, report = apply_passes(b.model(), [{"fixpoint": CLEANUP}])
    assert ops(graph) == ["MatMul", "Add"]
    assert graph.initializers[graph.find("MatMul")[0].inputs[1]].dtype == np.float32
    check_golden(request, graph, "cleanup/pipeline.onnxtxt")
    assert report.records[-1].iteration is not None


def test_cleanup_pipeline_inside_a_loop_body():
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    b.initializer("trips", np.array(3, np.int64))
    step = b.constant(np.float32(0.5))  # outer Constant read by the body only
    body = b.sub("body")
    body.input("i", INT64, [])
    body.input("c_in", BOOL, [])
    body.input("acc_in", FLOAT, [3])
    body.node("Identity", ["c_in"], ["c_out"])  # body input -> body output: must stay
    two = body.node("Add", [body.constant(np.float32(1.0)), body.constant(np.float32(1.0))])  # folds to 2
    scaled = body.node("Mul", ["acc_in", two])
    again = body.node("Mul", ["acc_in", two])  # CSE
    body.node("Sub", [body.node("Add", [scaled, again]), step], ["acc_out"])
    body.node("Neg", [body.node("Identity", [scaled])], ["body_dead"])
    body.output("c_out", BOOL, [])
    body.output("acc_out", FLOAT, [3])
    b.node("Loop", ["trips", "", "x"], ["y"], body=body.graph())
    b.output("y", FLOAT, [3])
    graph, _ = apply_passes(b.model(), [{"fixpoint": CLEANUP}])
    loop = graph.find("Loop")[0]
    body_graph = loop.subgraphs["body"]
    assert ops(graph) == ["Loop"] and loop.inputs == ("trips", "", "x")
    assert ops(body_graph) == ["Identity", "Mul", "Add", "Sub"]
    assert body_graph.initializers[body_graph.find("Mul")[0].inputs[1]].tolist() == 2.0
    assert loop.implicit_inputs == (step,)


REAL = real_models()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_cleanup_pipeline_on_real_models(name, record_property):
    model = onnx.load(str(REAL[name]))
    graph = from_onnx(model)
    before = sum(1 for _ in graph.walk())
    run_pipeline(graph, CLEANUP)
    after = sum(1 for _ in graph.walk())
    record_property("nodes", f"{before} -> {after}")
    feeds = seeded_feeds(model, **REAL_MODEL_INPUTS[name])
    assert_same_outputs(model, graph, feeds, rtol=1e-5, atol=1e-9)
    assert after <= before
    assert not [n for _g, n in graph.walk() if n.op_type == "Constant"]
    onnx.checker.check_model(to_onnx(graph))
    text = to_text(graph)
    again = run_pipeline(graph, CLEANUP)  # a second run finds nothing left to do
    assert not any(r.changed for r in again.records), [r.name for r in again.records if r.changed]
    fresh = from_onnx(model)
    run_pipeline(fresh, CLEANUP)
    assert to_text(fresh) == text  # deterministic: same model in, same IR out
