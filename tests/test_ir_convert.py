"""ONNX <-> IR conversion: byte-identical round trips of messy hand-built graphs and of the real models that
ship in installed packages; model files with external data (memory-mapped on load, streamed on save)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from graphs import (
    GraphBuilder,
    assert_round_trip,
    assert_same_outputs,
    real_models,
    run_model,
    seeded_feeds,
    serialized,
)
from onnx import TensorProto, helper, numpy_helper

from llmc.errors import ModelError
from llmc.ir import convert, from_onnx, load_model, save_model, to_onnx

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def if_with_outer_reads() -> onnx.ModelProto:
    b = GraphBuilder()
    b.input("x", FLOAT, ["batch", 4])
    b.input("cond", BOOL, [])
    scale = b.constant(np.float32(2.0), name="same")
    outer = b.node("Mul", ["x", scale], name="same")  # repeated node name
    then = b.sub("then")
    then.node("Add", [outer, "x"], ["then_y"])  # reads two outer values; the node has no name
    then.output("then_y", FLOAT, ["batch", 4])
    other = b.sub("else")
    inner = other.sub("inner")  # a nested If reading a value two scopes up
    inner.node("Neg", [scale], ["inner_y"])
    inner.output("inner_y", FLOAT, [])
    other.node("If", ["cond"], ["nested"], then_branch=inner.graph(), else_branch=inner.graph())
    other.node("Sub", ["x", "nested"], ["else_y"], name="")
    other.output("else_y", FLOAT, ["batch", 4])
    b.node("If", ["cond"], ["y"], then_branch=then.graph(), else_branch=other.graph())
    b.output("y", FLOAT, ["batch", 4])
    return b.model()


def loop_with_optional_slots() -> onnx.ModelProto:
    b = GraphBuilder()
    b.input("x", FLOAT, [3])
    b.initializer("trips", np.array(4, np.int64))
    body = b.sub("body")
    body.input("i", INT64, [])
    body.input("c_in", BOOL, [])
    body.input("acc_in", FLOAT, [3])
    body.node("Identity", ["c_in"], ["c_out"])
    body.node("Add", ["acc_in", "x"], ["acc_out"])
    body.node("Cast", ["i"], ["scan_out"], to=FLOAT)
    body.output("c_out", BOOL, [])
    body.output("acc_out", FLOAT, [3])
    body.output("scan_out", FLOAT, [])
    b.node("Loop", ["trips", "", "x"], ["y", "steps"], body=body.graph())  # empty optional condition
    b.node("Clip", ["y", "", b.constant(np.float32(5.0))], ["clipped"])  # empty optional min
    b.node("Dropout", ["clipped"], ["z", ""])  # unused optional output
    b.node("TopK", ["z", b.constant(np.array([2], np.int64))], ["top", "unused_indices"])
    b.output("top", FLOAT, [2])
    b.output("steps", FLOAT, [4])
    return b.model()


def quantized_and_low_precision() -> onnx.ModelProto:
    b = GraphBuilder()
    b.input("x", FLOAT, [2, 8])
    b.initializer("w_int8", np.arange(-32, 32, dtype=np.int8).reshape(8, 8))
    b.initializer("w_scale", np.float32(0.05))
    b.initializer("bf16", np.linspace(-1, 1, 8).astype(ml_dtypes.bfloat16))
    b.initializer("f16", np.linspace(-1, 1, 8).astype(np.float16))
    b.initializer("i4", np.array([-8, -1, 0, 7, 3], dtype=ml_dtypes.int4))  # odd count: packed with padding
    b.initializer("u4", np.array([0, 15, 9], dtype=ml_dtypes.uint4))
    b.initializer("f8", np.array([0.5, -2.0], dtype=ml_dtypes.float8_e4m3fn))
    w = b.node("Mul", [b.node("Cast", ["w_int8"], to=FLOAT), "w_scale"])
    h = b.node("MatMul", ["x", w])
    h = b.node("Add", [h, b.node("Cast", ["bf16"], to=FLOAT)])
    h = b.node("Add", [h, b.node("Cast", ["f16"], to=FLOAT)])
    b.node("Add", [h, b.node("ReduceSum", [b.node("Cast", ["i4"], to=FLOAT)], keepdims=0)], ["y"])
    b.node("Cast", ["u4"], ["u4f"], to=FLOAT)
    b.node("Cast", ["f8"], ["f8f"], to=FLOAT)
    b.output("y", FLOAT, [2, 8])
    b.output("u4f", FLOAT, [3])
    b.output("f8f", FLOAT, [2])
    return b.model()


def with_metadata() -> onnx.ModelProto:
    """Doc strings, metadata props, a model-local function, node metadata, explicitly empty fields."""
    b = GraphBuilder()
    b.input("x", FLOAT, [2])
    b.node("Twice", ["x"], ["y"], domain="local")
    b.output("y", FLOAT, [2])
    model = b.model(extra_opsets={"local": 1})
    fn = helper.make_function(
        "local",
        "Twice",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 21)],
    )
    model.functions.append(fn)
    model.doc_string = "a model"
    model.graph.doc_string = "its graph"
    model.graph.node[0].doc_string = "a node"
    model.graph.node[0].metadata_props.add(key="origin", value="test")
    model.graph.node[0].name = ""  # set, yet empty
    model.graph.input[0].doc_string = "the input"
    model.metadata_props.add(key="author", value="llmc")
    model.model_version = 3
    return model


MESSY = {
    "if_with_outer_reads": if_with_outer_reads,
    "loop_with_optional_slots": loop_with_optional_slots,
    "quantized_and_low_precision": quantized_and_low_precision,
    "with_metadata": with_metadata,
}


@pytest.mark.parametrize("name", sorted(MESSY))
def test_messy_graphs_round_trip_byte_identical(name):
    model = MESSY[name]()
    onnx.checker.check_model(model, full_check=True)
    assert_round_trip(model)


@pytest.mark.parametrize(
    "name", ["if_with_outer_reads", "loop_with_optional_slots", "quantized_and_low_precision"]
)
def test_messy_graphs_still_run_the_same(name):
    model = MESSY[name]()
    feeds = seeded_feeds(model)
    assert_same_outputs(model, to_onnx(from_onnx(model)), feeds, rtol=0, atol=0)


def test_low_precision_initializers_keep_their_dtypes():
    graph = from_onnx(quantized_and_low_precision())
    dtypes = {name: graph.initializers[name].dtype for name in ("bf16", "f16", "i4", "u4", "f8", "w_int8")}
    assert dtypes == {
        "bf16": ml_dtypes.bfloat16,
        "f16": np.float16,
        "i4": ml_dtypes.int4,
        "u4": ml_dtypes.uint4,
        "f8": ml_dtypes.float8_e4m3fn,
        "w_int8": np.int8,
    }
    assert graph.initializers["i4"].astype(np.int8).tolist() == [-8, -1, 0, 7, 3]


def test_subgraph_reads_are_implicit_inputs():
    graph = from_onnx(if_with_outer_reads())
    outer_if = graph.find("If")[0]
    # t0 (the Constant) is read two scopes down, by the nested If's branches: recorded at every level
    assert outer_if.implicit_inputs == ("cond", "t0", "t1", "x")
    nested = outer_if.subgraphs["else_branch"].find("If")[0]
    assert nested.implicit_inputs == ("t0",)
    assert graph.producer("t0").op_type == "Constant"
    assert (outer_if, -2) in graph.uses("t0")


def test_attribute_order_of_nodes_with_subgraphs_round_trips():
    b = GraphBuilder()
    b.input("xs", FLOAT, [4, 2])
    b.input("s0", FLOAT, [2])
    body = b.sub("body")
    body.input("s_in", FLOAT, [2])
    body.input("x_t", FLOAT, [2])
    body.node("Add", ["s_in", "x_t"], ["s_out"])
    body.node("Identity", ["s_out"], ["y_t"])
    body.output("s_out", FLOAT, [2])
    body.output("y_t", FLOAT, [2])
    b.node("Scan", ["s0", "xs"], ["s_final", "ys"], body=body.graph(), num_scan_inputs=1)
    b.output("s_final", FLOAT, [2])
    b.output("ys", FLOAT, [4, 2])
    model = b.model()
    assert_round_trip(model)


def _small() -> onnx.ModelProto:
    b = GraphBuilder()
    b.input("x", FLOAT, [2])
    b.initializer("w", np.ones(2, np.float32))
    b.node("Add", ["x", "w"], ["t"])
    b.node("Neg", ["t"], ["y"])
    b.output("y", FLOAT, [2])
    return b.model()


def _value_info(name: str, dtype: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, [2])


# Variations of a small model that must survive the round trip byte for byte.
KEPT = {
    "ml opset": lambda m: m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3)),
    "initializer that is also an input": lambda m: m.graph.input.append(_value_info("w")),
    "sparse initializer": lambda m: m.graph.sparse_initializer.append(
        helper.make_sparse_tensor(
            numpy_helper.from_array(np.array([1.0], np.float32), "s"),
            numpy_helper.from_array(np.array([0], np.int64)),
            [3],
        )
    ),
    "tensor doc_string": lambda m: setattr(m.graph.initializer[0], "doc_string", "doc"),
    "attribute doc_string": lambda m: m.graph.node[0].attribute.append(helper.make_attribute("k", 1, "doc")),
    "string initializer": lambda m: m.graph.initializer.append(
        helper.make_tensor("s", TensorProto.STRING, [1], [b"a"])
    ),
    "old ir_version": lambda m: setattr(m, "ir_version", 7),
    "unknown dim": lambda m: m.graph.output[0].type.tensor_type.shape.dim.add(),
    "value_info order": lambda m: m.graph.value_info.extend([_value_info("y_"), _value_info("t")]),
    "value_info of a graph output": lambda m: m.graph.value_info.append(_value_info("y")),
    "value_info of an initializer": lambda m: m.graph.value_info.append(_value_info("w")),
    "value_info with a shape only": lambda m: m.graph.value_info.append(_value_info("t", 0)),
    "value_info without a type": lambda m: m.graph.value_info.append(onnx.ValueInfoProto(name="t")),
    "input without a type": lambda m: m.graph.input.append(onnx.ValueInfoProto(name="extra")),
    "typed tensor field": lambda m: m.graph.initializer.append(helper.make_tensor("k", INT64, [2], [1, 2])),
    "float16 in int32_data": lambda m: m.graph.initializer.append(
        helper.make_tensor("h", TensorProto.FLOAT16, [2], np.array([1, 2], np.float16))
    ),
    "node domain 'ai.onnx'": lambda m: setattr(m.graph.node[0], "domain", "ai.onnx"),
    "dim denotation": lambda m: setattr(
        m.graph.input[0].type.tensor_type.shape.dim[0], "denotation", "BATCH"
    ),
    "graph metadata_props": lambda m: m.graph.metadata_props.add(key="k", value="v"),
    "training_info": lambda m: m.training_info.add(),
}


@pytest.mark.parametrize("case", sorted(KEPT))
def test_variations_round_trip(case):
    model = _small()
    if case == "value_info order":
        model.graph.node[0].output[0] = "y_"
        model.graph.node[1].input[0] = "y_"
    KEPT[case](model)
    assert_round_trip(model)


REAL = real_models()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_models_round_trip_byte_identical(name):
    model = onnx.load(str(REAL[name]))
    assert_round_trip(model)


# -- files -----------------------------------------------------------------------------------------------
def _weighty() -> onnx.ModelProto:
    """Weights above the 1 KiB externalization floor in the main graph and in a Loop body, small ones too."""
    b = GraphBuilder()
    b.input("x", FLOAT, [16, 32])
    b.initializer("big", np.arange(32 * 32, dtype=np.float32).reshape(32, 32) / 1000)
    b.initializer("small", np.ones(32, np.float32))
    b.initializer("big_f16", np.linspace(0, 1, 1024).astype(np.float16).reshape(32, 32))
    b.initializer("trips", np.array(2, np.int64))
    body = b.sub("body")
    body.input("i", INT64, [])
    body.input("c_in", BOOL, [])
    body.input("acc_in", FLOAT, [16, 32])
    body.initializer("body_w", np.full((32, 32), 0.01, np.float32))
    body.node("Identity", ["c_in"], ["c_out"])
    body.node("MatMul", ["acc_in", "body_w"], ["acc_out"])
    body.output("c_out", BOOL, [])
    body.output("acc_out", FLOAT, [16, 32])
    h = b.node("MatMul", ["x", "big"])
    h = b.node("Add", [h, b.node("MatMul", ["x", b.node("Cast", ["big_f16"], to=FLOAT)])])
    h = b.node("Add", [h, "small"])
    b.node("Loop", ["trips", "", h], ["y"], body=body.graph())
    b.output("y", FLOAT, [16, 32])
    return b.model()


def _assert_same_weights(a, b):
    for left, right in ((a, b), *zip(_subgraphs(a), _subgraphs(b), strict=True)):
        assert list(left.initializers) == list(right.initializers)
        for name in left.initializers:
            np.testing.assert_array_equal(left.initializers[name], right.initializers[name])
            assert left.initializers[name].dtype == right.initializers[name].dtype


def _subgraphs(graph):
    return [sub for _g, node in graph.walk() for sub in node.all_subgraphs()]


def _is_mapped(array: np.ndarray) -> bool:
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base if isinstance(array.base, np.ndarray) else None
    return False


def test_external_data_reloads_memory_mapped_and_equal(tmp_path):
    model = _weighty()
    graph = from_onnx(model)
    written = save_model(graph, tmp_path / "m.onnx", external_data=True)
    assert [p.name for p in written] == ["m.onnx", "m.onnx.data"]
    reloaded = load_model(tmp_path / "m.onnx")
    _assert_same_weights(graph, reloaded)
    assert _is_mapped(reloaded.initializers["big"]) and _is_mapped(reloaded.initializers["big_f16"])
    assert _is_mapped(_subgraphs(reloaded)[0].initializers["body_w"])
    assert not _is_mapped(reloaded.initializers["small"])  # under 1 KiB: embedded
    assert serialized(to_onnx(reloaded)) == serialized(model)
    # onnxruntime reads the same files
    import onnxruntime as ort

    feeds = seeded_feeds(model)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["y"], feeds)[0], run_model(model, feeds)["y"], rtol=1e-6)


def test_large_models_stream_weights_to_external_data(tmp_path, monkeypatch):
    """The >2 GB path with a small model: lower the threshold instead of writing gigabytes."""
    model = _weighty()
    graph = from_onnx(model)
    monkeypatch.setattr(convert, "EXTERNAL_DATA_THRESHOLD", 4096)
    written = save_model(graph, tmp_path / "big.onnx")
    assert [p.name for p in written] == ["big.onnx", "big.onnx.data"]
    proto = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    external = {
        t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer if t.external_data
    }
    assert sorted(external) == ["big", "big_f16"]
    assert all(int(info["offset"]) % 64 == 0 for info in external.values())
    assert (tmp_path / "big.onnx").stat().st_size < 4096  # the weights are not in the proto
    _assert_same_weights(graph, load_model(tmp_path / "big.onnx"))
    monkeypatch.setattr(convert, "EXTERNAL_DATA_THRESHOLD", 1 << 30)
    assert save_model(graph, tmp_path / "small.onnx") == [tmp_path / "small.onnx"]


def test_load_model_errors_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match="folder"):
        load_model(tmp_path)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(serialized(_weighty())[:200])
    with pytest.raises(ModelError, match="truncated|not a readable|holds no"):
        load_model(truncated)
    save_model(from_onnx(_weighty()), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelError, match="external data file 'm.onnx.data'"):
        load_model(tmp_path / "m.onnx")


def test_non_ssa_models_are_refused_naming_the_node():
    b = GraphBuilder()
    b.input("x", FLOAT, [2])
    b.node("Neg", ["x"], ["y"], name="first")
    b.node("Abs", ["x"], ["y"], name="second")
    b.output("y", FLOAT, [2])
    with pytest.raises(ModelError, match=r"defined twice.*first \(Neg\).*second \(Abs\)"):
        from_onnx(b.model())


def test_elided_text_weights_carry_a_digest():
    graph = from_onnx(_weighty())
    elided = to_onnx(graph, weights="elide", elide_above=256)
    info = {t.name: {e.key: e.value for e in t.external_data} for t in elided.graph.initializer}
    assert info["big"]["location"] == "<elided>" and len(info["big"]["digest"]) == 12
    assert not info["small"]
    tensor = numpy_helper.to_array(next(t for t in elided.graph.initializer if t.name == "small"))
    assert tensor.tolist() == [1.0] * 32
