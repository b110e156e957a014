"""cpu-matmul-nbits: the standard blocked DequantizeLinear forms -> MatMulNBits / GatherBlockQuantized.

Each test builds the standard form by hand (random codes, scales and zero points; no quantizer involved), runs
it in onnxruntime at ORT_ENABLE_BASIC (at "all" onnxruntime fuses DequantizeLinear+MatMul itself, which would
hide what the standard form computes), legalizes it and checks the legalized graph computes the same.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from graphs import GraphBuilder
from onnx import TensorProto

from llmc.ir import Graph, clone, to_onnx
from llmc.pass_manager import run_pipeline

V, H, B = 64, 96, 32  # vocab, hidden, block: 3 blocks per row (odd: 4-bit zero points need padding)
SCHEMES = [(4, True), (4, False), (8, True), (8, False)]  # (bits, symmetric)
_TYPES = {
    (4, True): (ml_dtypes.int4, -8, 7),
    (4, False): (ml_dtypes.uint4, 0, 15),
    (8, True): (np.int8, -128, 127),
    (8, False): (np.uint8, 0, 255),
}


def _blocked(shape: tuple[int, int], axis: int, bits: int, symmetric: bool, seed: int = 0):
    """Random codes of ``shape`` with scales (and zero points when asymmetric) for blocks of B along ``axis``."""
    rng = np.random.default_rng(seed)
    dtype, low, high = _TYPES[(bits, symmetric)]
    q = rng.integers(low, high + 1, shape).astype(dtype)
    grid = list(shape)
    grid[axis] //= B
    scale = rng.uniform(0.5, 1.5, grid).astype(np.float32) / (1 << (bits - 1))
    zero = None if symmetric else rng.integers(low, high + 1, grid).astype(dtype)
    return q, scale, zero


def _dequantize(gb: GraphBuilder, name: str, q, scale, zero, axis: int) -> str:
    inputs = [gb.initializer(f"{name}.q", q), gb.initializer(f"{name}.scale", scale)]
    if zero is not None:
        inputs.append(gb.initializer(f"{name}.zero_point", zero))
    return gb.node("DequantizeLinear", inputs, [f"{name}.dequantized"], axis=axis, block_size=B)


def _tied_graph(bits: int, symmetric: bool, *, gather: bool = True, lm_head: bool = True) -> Graph:
    """(a) Gather(D, ids) and (b) MatMul(x, Transpose(D)) over one D = DequantizeLinear(Qe[V, H], axis=1)."""
    gb = GraphBuilder("tied")
    ids, x = gb.input("ids", TensorProto.INT64, ["batch", "seq"]), gb.input("x", shape=["batch", H])
    table = _dequantize(gb, "embed", *_blocked((V, H), 1, bits, symmetric), axis=1)
    if gather:
        gb.node("Gather", [table, ids], [gb.output("hidden", shape=["batch", "seq", H])], axis=0)
    if lm_head:
        transposed = gb.node("Transpose", [table], perm=[1, 0])
        gb.node("MatMul", [x, transposed], [gb.output("logits", shape=["batch", V])])
    return gb.ir()


def _matmul_graph(bits: int, symmetric: bool) -> Graph:
    """(c) MatMul(x, DequantizeLinear(Q[K, N], axis=0))."""
    gb = GraphBuilder("proj")
    x = gb.input("x", shape=["batch", 3, H])
    weight = _dequantize(gb, "proj", *_blocked((H, V), 0, bits, symmetric), axis=0)
    gb.node("MatMul", [x, weight], [gb.output("y", shape=["batch", 3, V])])
    return gb.ir()


def _feeds(graph: Graph) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 3, H) if "y" in graph.outputs else (2, H)).astype(np.float32)}
    if "ids" in graph.inputs:
        feeds["ids"] = np.array([[0, 5, V - 1, 5], [17, 2, 0, 40]], np.int64)
    return feeds


def _run(
    graph: Graph, feeds: dict[str, np.ndarray], level: ort.GraphOptimizationLevel
) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level
    session = ort.InferenceSession(
        to_onnx(graph).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return dict(zip(graph.outputs, session.run(graph.outputs, feeds), strict=True))


def _legalize(graph: Graph, **options) -> tuple[Graph, dict]:
    legal = clone(graph)
    report = run_pipeline(legal, [{"cpu-matmul-nbits": options}, "eliminate-dead-code"])
    return legal, report.records[0]


def _assert_same(graph: Graph, legal: Graph, rtol: float = 1e-5) -> None:
    """The legalized graph (onnxruntime's full optimizations) computes what the standard form computes."""
    feeds = _feeds(graph)
    want = _run(graph, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    got = _run(legal, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=rtol, atol=rtol * np.abs(value).max(), err_msg=name)


@pytest.mark.parametrize(("bits", "symmetric"), SCHEMES)
def test_matmul(bits: int, symmetric: bool) -> None:
    graph = _matmul_graph(bits, symmetric)
    legal, record = _legalize(graph, accuracy_level=0)
    assert record.stats["rule:matmul-nbits"] == 1
    [node] = legal.find("MatMulNBits", domain="com.microsoft")
    assert (node.attr("K"), node.attr("N"), node.attr("bits"), node.attr("block_size")) == (H, V, bits, B)
    assert len(node.inputs) == (3 if symmetric else 4)
    assert legal.initializers[node.inputs[1]].shape == (V, H // B, B * bits // 8)
    assert not legal.find("DequantizeLinear") and not {"proj.q", "proj.scale"} & set(legal.initializers)
    _assert_same(graph, legal)


@pytest.mark.parametrize(("bits", "symmetric"), SCHEMES)
def test_tied_embedding_and_lm_head_share_one_table(bits: int, symmetric: bool) -> None:
    graph = _tied_graph(bits, symmetric)
    legal, record = _legalize(graph, accuracy_level=0)
    assert record.stats["rule:gather-block-quantized"] == 1
    assert record.stats["rule:matmul-nbits-transposed"] == 1
    [gather] = legal.find("GatherBlockQuantized", domain="com.microsoft")
    [matmul] = legal.find("MatMulNBits", domain="com.microsoft")
    assert (gather.attr("gather_axis"), gather.attr("quantize_axis"), gather.attr("bits")) == (0, 2, bits)
    assert (matmul.attr("K"), matmul.attr("N"), matmul.attr("bits")) == (H, V, bits)
    assert gather.inputs[0] == matmul.inputs[1]  # one packed table
    assert legal.producer(gather.inputs[2]).inputs[0] == matmul.inputs[2]  # scales: a Reshape of the same
    packed = [a for a in legal.initializers.values() if a.size >= V * H * bits // 8]
    assert len(packed) == 1 and packed[0].dtype == np.uint8
    assert not legal.find("DequantizeLinear") and not legal.find("Transpose")
    _assert_same(graph, legal)


@pytest.mark.parametrize(("bits", "symmetric"), SCHEMES)
def test_embedding_alone(bits: int, symmetric: bool) -> None:
    graph = _tied_graph(bits, symmetric, lm_head=False)
    legal, _ = _legalize(graph)
    [gather] = legal.find("GatherBlockQuantized", domain="com.microsoft")
    assert legal.shape(gather.inputs[1]) == ("batch", "seq")
    assert not legal.find("DequantizeLinear") and not legal.find("MatMulNBits", domain="com.microsoft")
    _assert_same(graph, legal)


@pytest.mark.parametrize("bits", [4, 8])
def test_accuracy_level_4(bits: int) -> None:
    """int8 compute quantizes the activations per block: close to the standard form, not equal."""
    for graph in (_matmul_graph(bits, False), _tied_graph(bits, True)):
        legal, _ = _legalize(graph, accuracy_level=4)
        assert {n.attr("accuracy_level") for n in legal.find("MatMulNBits", domain="com.microsoft")} == {4}
        _assert_same(graph, legal, rtol=3e-2)


def test_unsigned_without_zero_point_means_zero() -> None:
    """DequantizeLinear's default zero point is 0, the kernels' is 2^(bits-1): an explicit one is written."""
    gb = GraphBuilder("u4")
    x = gb.input("x", shape=["batch", 3, H])
    q, scale, _ = _blocked((H, V), 0, 4, False)
    weight = _dequantize(gb, "proj", q, scale, None, axis=0)
    gb.node("MatMul", [x, weight], [gb.output("y", shape=["batch", 3, V])])
    graph = gb.ir()
    legal, _ = _legalize(graph, accuracy_level=0)
    [node] = legal.find("MatMulNBits", domain="com.microsoft")
    assert len(node.inputs) == 4 and not legal.initializers[node.inputs[3]].any()
    _assert_same(graph, legal)


def test_weight_with_an_unpackable_reader_stays() -> None:
    """A table also read by an op without a packed form is left alone (else it would be stored twice)."""
    graph = _tied_graph(4, True)
    gb_relu = graph.add_node("Relu", ["embed.dequantized"], ["relu_out"], name="other_reader")
    graph.outputs.append(gb_relu.outputs[0])
    legal, record = _legalize(graph)
    assert record.stats["fused"] == 0
    assert not legal.find("MatMulNBits", domain="com.microsoft")
    assert any("no packed form" in miss["reason"] for miss in record.details["rejected"])


def test_embedding_option_off_keeps_the_tied_pair() -> None:
    """embedding: false leaves the Gather, so its tied lm_head stays standard too (one table, not two)."""
    legal, record = _legalize(_tied_graph(4, True), embedding=False)
    assert record.stats["fused"] == 0 and len(legal.find("DequantizeLinear")) == 1
    legal, record = _legalize(_matmul_graph(4, True), embedding=False)
    assert record.stats["rule:matmul-nbits"] == 1


def test_not_blocked_along_the_rows_is_rejected() -> None:
    """A projection blocked along N (axis 1) has no MatMulNBits form: the reason is reported."""
    gb = GraphBuilder("n")
    x = gb.input("x", shape=["batch", H])
    weight = _dequantize(gb, "proj", *_blocked((H, V), 1, 4, True), axis=1)
    gb.node("MatMul", [x, weight], [gb.output("y", shape=["batch", V])])
    legal, record = _legalize(gb.ir())
    assert record.stats["fused"] == 0 and legal.find("DequantizeLinear")
    assert any("blocks along axis 0" in miss["reason"] for miss in record.details["rejected"])


def test_8_bit_below_level_4_warns(caplog: pytest.LogCaptureFixture) -> None:
    """onnxruntime 1.32 runs 8-bit MatMulNBits below accuracy level 4 on an unoptimized path: say so."""
    _legalize(_matmul_graph(8, True), accuracy_level=0)
    assert "unoptimized" in caplog.text
    caplog.clear()
    _legalize(_matmul_graph(4, True), accuracy_level=0)
    _legalize(_matmul_graph(8, True), accuracy_level=4)
    assert "unoptimized" not in caplog.text
