"""quantize-weights (standard blocked DequantizeLinear) and its CPU legalization into MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmc.errors import PassError
from llmc.ir import Graph, clone, from_onnx, to_onnx
from llmc.pass_manager import PassOptionsError, make_pass, run_pipeline
from llmc.passes.quantize.quantize_weights import quantize_blocks


def _graph(k: int = 64, n: int = 96, opset: int = 21) -> Graph:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "layer.weight")
    nodes = [helper.make_node("MatMul", ["x", "layer.weight"], ["y"], name="proj")]
    graph = helper.make_graph(
        nodes,
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, n])],
        [w],
    )
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _run(graph: Graph, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # basic only: at "all", onnxruntime fuses DequantizeLinear+MatMul into its own int8-compute MatMulNBits,
    # which would hide what the standard form computes
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(
        to_onnx(graph).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_round_to_nearest_blocks(bits: int, symmetric: bool) -> None:
    w = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    q, scale, zero = quantize_blocks(w, bits, 32, symmetric)
    zp = 0 if zero is None else np.repeat(zero.astype(np.float32), 32, axis=0)
    restored = (q.astype(np.float32) - zp) * np.repeat(scale, 32, axis=0)
    step = np.repeat(scale, 32, axis=0)
    error = np.abs(restored - w)
    assert np.all(error <= step + 1e-6)  # within a step (a positive symmetric extreme clips by one)
    assert np.mean(error <= 0.5 * step + 1e-6) > 0.95  # round to nearest for all the rest


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_standard_form_then_matmul_nbits(bits: int, symmetric: bool) -> None:
    graph = _graph()
    x = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(np.float32)
    reference = _run(graph, x)
    report = run_pipeline(
        graph, [{"quantize-weights": {"bits": bits, "symmetric": symmetric}}, "eliminate-dead-code"]
    )
    assert report.records[0].stats["quantized"] == 1
    [deq] = graph.find("DequantizeLinear")
    assert deq.attr("block_size") == 32 and deq.attr("axis") == 0
    standard = _run(graph, x)
    error = np.abs(standard - reference).max() / np.abs(reference).max()
    assert error < (0.15 if bits == 4 else 0.015)  # RTN on Gaussian weights: ~10% (int4), ~0.8% (int8)
    legal = clone(graph)
    run_pipeline(legal, [{"cpu-matmul-nbits": {"accuracy_level": 0}}, "eliminate-dead-code"])
    [node] = legal.find("MatMulNBits", domain="com.microsoft")
    assert (node.attr("K"), node.attr("N"), node.attr("bits"), node.attr("block_size")) == (64, 96, bits, 32)
    assert not legal.find("DequantizeLinear")
    np.testing.assert_allclose(_run(legal, x), standard, atol=1e-4, rtol=1e-4)


def test_exclude_and_skip_reasons(caplog: pytest.LogCaptureFixture) -> None:
    graph = _graph(k=48)  # 48 rows: not a multiple of 32
    report = run_pipeline(graph, [{"quantize-weights": {"exclude": ["lm_head*"]}}])
    record = report.records[0]
    assert record.stats["quantized"] == 0
    assert record.details["skipped"][0]["reason"] == "K=48 is not a multiple of block 32"
    assert record.details["unused_exclude"] == ["lm_head*"]
    assert "matches no weight" in caplog.text
    graph = _graph()
    report = run_pipeline(graph, [{"quantize-weights": {"exclude": ["layer.*"]}}])
    assert report.records[0].stats["quantized"] == 0 and not graph.find("DequantizeLinear")


def test_bad_options_and_inputs() -> None:
    with pytest.raises(PassOptionsError, match="power of two"):
        make_pass("quantize-weights", {"block_size": 48})
    with pytest.raises(PassOptionsError, match="bits must be 4 or 8"):
        make_pass("quantize-weights", {"bits": 3})
    with pytest.raises(PassError, match="opset 21"):
        run_pipeline(_graph(opset=17), ["quantize-weights"])
    relu = from_onnx(
        helper.make_model(
            helper.make_graph(
                [helper.make_node("Relu", ["x"], ["y"])],
                "r",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
            ),
            opset_imports=[helper.make_opsetid("", 21)],
        )
    )
    with pytest.raises(PassError, match="no MatMul with a constant float weight"):
        run_pipeline(relu, ["quantize-weights"])
