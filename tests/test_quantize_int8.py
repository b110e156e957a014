"""quantize-dynamic / quantize-static (int8 activations) and the CPU legalization into DynamicQuantizeMatMul.

Tiny graphs built by hand: the rewritten IR forms, numerical closeness to the float graph in onnxruntime
(int8 error bounds), standard vs contrib equivalence, calibration methods, and the user errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import relu_graph
from onnx import TensorProto, helper, numpy_helper

from llmc.calibration import CalibrationSet
from llmc.errors import LlmcError, PassError
from llmc.ir import Graph, clone, from_onnx, to_onnx
from llmc.pass_manager import PassContext, PassOptionsError, make_pass, run_pipeline
from llmc.passes.quantize._int8 import quantize_weight, resolve_reduce_range

K, N, M = 64, 96, 64  # every weight >= min_size (4096)
BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def _graph(*, gelu: bool = False, gemm: bool = False, outlier: float = 0.0) -> Graph:
    """x [b, 5, K] -> MatMul W1 [K, N] -> Add b1 -> (Gelu | Relu) -> MatMul W2 [N, M]; x also feeds W3 [K, M]
    (two MatMuls read one activation). ``gemm``: x is [10, K] and the first layer a Gemm with transB, alpha
    and C; ``outlier`` scales input channel 3 of x (an outlier channel, as LayerNorm outputs have)."""
    rng = np.random.default_rng(0)
    inits = {
        "l1.weight": rng.standard_normal((K, N)) / 8,
        "l1.bias": rng.standard_normal(N) / 4,
        "l2.weight": rng.standard_normal((N, M)) / 8,
        "side.weight": rng.standard_normal((K, M)) / 8,
    }
    x, nodes = "x", []
    if outlier:
        inits["gain"] = np.where(np.arange(K) == 3, outlier, 1.0)
        nodes.append(helper.make_node("Mul", ["x", "gain"], ["xs"]))
        x = "xs"
    if gemm:  # the weight stored [N, K], doubled, and alpha 0.5
        inits["l1.weight"] = inits["l1.weight"].T * 2.0
        nodes.append(helper.make_node("Gemm", [x, "l1.weight", "l1.bias"], ["h"], transB=1, alpha=0.5))
    else:
        nodes.append(helper.make_node("MatMul", [x, "l1.weight"], ["m1"], name="l1"))
        nodes.append(helper.make_node("Add", ["m1", "l1.bias"], ["h"]))
    nodes += [
        helper.make_node("Gelu" if gelu else "Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "l2.weight"], ["m2"], name="l2"),
        helper.make_node("MatMul", [x, "side.weight"], ["m3"], name="side"),
        helper.make_node("Add", ["m2", "m3"], ["y"]),
    ]
    shape = [10, K] if gemm else ["batch", 5, K]
    graph = helper.make_graph(
        nodes,
        "int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], M])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _x(seed: int, shape: tuple[int, ...] = (2, 5, K)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _session(graph: Graph, level=BASIC, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = level  # basic: the standard form runs as written, unfused
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(
        to_onnx(graph).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _run(graph: Graph, x: np.ndarray, level=BASIC) -> np.ndarray:
    return _session(graph, level).run(None, {"x": x})[0]


def _error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _calibration(samples: int = 4, shape: tuple[int, ...] = (2, 5, K), tail: bool = False) -> PassContext:
    rng = np.random.default_rng(7)
    draw = (lambda s: rng.standard_t(2, s)) if tail else rng.standard_normal
    feeds = [{"x": draw(shape).astype(np.float32)} for _ in range(samples)]
    return PassContext(data={"calibration": CalibrationSet(feeds, "test")})


# -- quantize-dynamic ------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_standard_form_is_close_to_float(per_channel: bool) -> None:
    graph = _graph()
    x = _x(1)
    reference = _run(graph, x)
    # reduce_range auto: full-range weights would saturate u8s8 products on AVX2 hosts without VNNI
    report = run_pipeline(graph, [{"quantize-dynamic": {"per_channel": per_channel}}, "eliminate-dead-code"])
    qmax = 64 if resolve_reduce_range("auto") else 127
    assert report.records[0].stats["quantized"] == 3
    assert len(graph.find("DynamicQuantizeLinear")) == 2  # x is quantized once for its two MatMuls
    assert len(graph.find("MatMulInteger")) == 3 and not graph.find("MatMul")
    for node in graph.find("MatMulInteger"):
        weight = graph.constant(node.inputs[1])
        assert weight.dtype == np.int8 and np.abs(weight).max() == qmax
        assert graph.producer(node.inputs[0]).op_type == "DynamicQuantizeLinear"
    scales = [
        graph.constant(n.inputs[1]) for n in graph.find("Mul") if graph.constant(n.inputs[1]) is not None
    ]
    assert sorted(s.shape for s in scales) == ([(M,), (M,), (N,)] if per_channel else [(), (), ()])
    # u8 activations per tensor, s8 weights: ~1% of the output range on Gaussian data
    assert _error(_run(graph, x), reference) < 0.03


def test_dynamic_legalizes_into_dynamic_quantize_matmul() -> None:
    graph = _graph()
    x = _x(2)
    run_pipeline(graph, ["quantize-dynamic"])
    standard = _run(graph, x)
    legal = clone(graph)
    report = run_pipeline(legal, ["cpu-dynamic-quantize-matmul", "eliminate-dead-code"])
    stats = report.records[0].stats
    assert stats["fused"] == 3 and stats["rule:dynamic-quantize-matmul-bias"] == 1
    ops = {n.op_type for n in legal.nodes()}
    assert not ops & {"DynamicQuantizeLinear", "MatMulInteger", "Cast"}
    with_bias = [n for n in legal.find("DynamicQuantizeMatMul", domain="com.microsoft") if len(n.inputs) == 5]
    assert len(with_bias) == 1 and with_bias[0].inputs[4] == "l1.bias"
    assert len(legal.find("Add")) == 1  # only the residual sum is left
    np.testing.assert_allclose(_run(legal, x), standard, rtol=1e-5, atol=1e-5)
    # onnxruntime's own fusions at ORT_ENABLE_ALL compute the same
    all_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    np.testing.assert_allclose(_run(graph, x, all_level), standard, rtol=1e-5, atol=1e-5)


def test_legalization_takes_what_onnxruntimes_quantizer_writes(tmp_path: Path) -> None:
    """quantize-dynamic writes onnxruntime's own form: the legalization also fuses a model it quantized."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(to_onnx(_graph()), tmp_path / "float.onnx")
    quantize_dynamic(
        tmp_path / "float.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QInt8, per_channel=True
    )
    graph = from_onnx(onnx.load(str(tmp_path / "int8.onnx")))
    x = _x(8)
    standard = _run(graph, x)
    report = run_pipeline(graph, ["cpu-dynamic-quantize-matmul", "eliminate-dead-code"])
    assert report.records[0].stats["fused"] == 3 and not report.records[0].details["rejected"]
    assert not graph.find("MatMulInteger") and not graph.find("DynamicQuantizeLinear")
    np.testing.assert_allclose(_run(graph, x), standard, rtol=1e-5, atol=1e-5)


def test_bias_before_gelu_is_left_for_bias_gelu() -> None:
    graph = _graph(gelu=True)
    x = _x(3)
    reference = _run(graph, x)
    run_pipeline(graph, ["quantize-dynamic", "cpu-dynamic-quantize-matmul", "eliminate-dead-code"])
    assert all(len(n.inputs) <= 4 for n in graph.find("DynamicQuantizeMatMul", domain="com.microsoft"))
    [add] = [n for n in graph.find("Add") if "l1.bias" in n.inputs]
    assert graph.consumers(add.outputs[0])[0].op_type == "Gelu"
    assert _error(_run(graph, x), reference) < 0.03


def test_gemm_sites_fold_trans_b_alpha_and_bias() -> None:
    graph = _graph(gemm=True)
    x = _x(4, (10, K))
    reference = _run(graph, x)
    report = run_pipeline(graph, ["quantize-dynamic", "eliminate-dead-code"])
    assert report.records[0].stats["quantized"] == 3 and not graph.find("Gemm")
    assert _error(_run(graph, x), reference) < 0.03


def test_reduce_range_follows_the_cpu_flags() -> None:
    assert resolve_reduce_range("auto", ["avx2", "fma"]) is True  # u8s8 pairs saturate without VNNI
    assert resolve_reduce_range("auto", ["avx2", "avx512f", "avx512_vnni"]) is False
    assert resolve_reduce_range("auto", ["avx2", "avx_vnni"]) is False
    assert resolve_reduce_range("auto", []) is False  # not x86 (ARM dot products accumulate in 32 bits)
    assert resolve_reduce_range("true", ["avx512_vnni"]) is True
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    q, scale = quantize_weight(w, per_channel=True, reduce_range=True)
    assert np.abs(q).max() == 64 and scale.shape == (N,)
    assert np.abs(q * scale - w).max() <= scale.max() / 2 + 1e-6
    graph = _graph()
    report = run_pipeline(graph, [{"quantize-dynamic": {"reduce_range": "true"}}])
    assert report.records[0].stats["reduce_range"] == 1
    assert all(np.abs(graph.constant(n.inputs[1])).max() <= 64 for n in graph.find("MatMulInteger"))


def test_exclude_min_size_and_unused_globs(caplog: pytest.LogCaptureFixture) -> None:
    graph = _graph()
    report = run_pipeline(graph, [{"quantize-dynamic": {"exclude": ["l2.*", "lm_head*"]}}])
    record = report.records[0]
    assert record.stats["quantized"] == 2 and record.details["unmatched"] == {"exclude": ["lm_head*"]}
    assert "matches no weight" in caplog.text
    assert [n.inputs[1] for n in graph.find("MatMul")] == ["l2.weight"]
    graph = _graph()
    report = run_pipeline(graph, [{"quantize-dynamic": {"min_size": K * N + 1}}])
    assert report.records[0].stats["quantized"] == 0 and not report.records[0].changed


def test_smoothing_moves_an_outlier_channel_into_the_weights() -> None:
    x = _x(5)
    errors = {}
    for alpha in (None, 0.8):
        graph = _graph(outlier=40.0)
        reference = _run(graph, x)
        options = {"quantize-dynamic": {"smooth": alpha}} if alpha is not None else "quantize-dynamic"
        report = run_pipeline(graph, [options], ctx=_calibration())
        assert report.records[0].stats["smoothed"] == (0 if alpha is None else 2)
        errors[alpha] = _error(_run(graph, x), reference)
    assert errors[0.8] < 0.5 * errors[None]
    with pytest.raises(LlmcError, match="quantize-dynamic.*calibration"):
        run_pipeline(_graph(), [{"quantize-dynamic": {"smooth": 0.5}}])


# -- quantize-static -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_static_qdq_form_is_close_to_float(method: str, symmetric: bool) -> None:
    graph = _graph()
    x = _x(6)
    reference = _run(graph, x)
    step = {"quantize-static": {"method": method, "symmetric_activations": symmetric}}
    report = run_pipeline(graph, [step, "eliminate-dead-code"], ctx=_calibration())
    assert report.records[0].stats["quantized"] == 3 and report.records[0].stats["activations"] == 2
    quantize = graph.find("QuantizeLinear")
    assert len(quantize) == 2
    zero_type = np.int8 if symmetric else np.uint8
    assert all(graph.constant(q.inputs[2]).dtype == zero_type for q in quantize)
    for node in graph.find("MatMul"):
        x_dq, w_dq = (graph.producer(v) for v in node.inputs)
        assert x_dq.op_type == w_dq.op_type == "DequantizeLinear"
        assert graph.producer(x_dq.inputs[0]).op_type == "QuantizeLinear"
        assert graph.constant(w_dq.inputs[0]).dtype == np.int8 and w_dq.attr("axis") == 1
    # the calibration data looks like x: ranges clip little (percentile/entropy trade tails for steps)
    assert _error(_run(graph, x), reference) < (0.03 if method == "minmax" else 0.08)


def test_onnxruntime_runs_int8_kernels_on_the_qdq_form(tmp_path: Path) -> None:
    graph = _graph()
    run_pipeline(graph, ["quantize-static", "eliminate-dead-code"], ctx=_calibration())
    optimized = tmp_path / "optimized.onnx"
    _session(graph, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized)
    ops = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert ops & {"MatMulIntegerToFloat", "QLinearMatMul"}
    assert "MatMul" not in ops and "DequantizeLinear" not in ops


def test_calibration_methods_give_different_ranges() -> None:
    ranges = {}
    for method in ("minmax", "percentile", "entropy"):
        graph = _graph()
        step = {"quantize-static": {"method": method, "percentile": 99.0}}
        report = run_pipeline(graph, [step], ctx=_calibration(tail=True))
        assert report.records[0].details["method"] == method
        ranges[method] = report.records[0].details["ranges"]["x"]
    width = {k: hi - lo for k, (lo, hi) in ranges.items()}
    # heavy-tailed calibration data (Student t, 2 dof): the histogram methods cut the tails that minmax keeps
    assert width["percentile"] < 0.8 * width["minmax"] and width["entropy"] < 0.8 * width["minmax"]
    assert ranges["percentile"] != ranges["entropy"]


def test_static_without_calibration_names_the_pass() -> None:
    with pytest.raises(LlmcError, match="quantize-static.*calibration"):
        run_pipeline(_graph(), ["quantize-static"])


def test_calibration_arrays_of_the_wrong_shape() -> None:
    ctx = _calibration(shape=(2, 5, K + 3))
    with pytest.raises(PassError, match="quantize-static.*calibration sample 0 does not run"):
        run_pipeline(_graph(), ["quantize-static"], ctx=ctx)


@pytest.mark.parametrize("name", ["quantize-dynamic", "quantize-static"])
def test_model_without_matmul(name: str) -> None:
    relu = relu_graph()
    with pytest.raises(PassError, match=f"{name}.*no MatMul or Gemm with a constant float32 weight"):
        run_pipeline(relu, [name], ctx=_calibration())


def test_bad_options() -> None:
    with pytest.raises(PassOptionsError, match="reduce_range"):
        make_pass("quantize-dynamic", {"reduce_range": "maybe"})
    with pytest.raises(PassOptionsError, match="method"):
        make_pass("quantize-static", {"method": "mse"})
    with pytest.raises(PassOptionsError, match="smooth"):
        make_pass("quantize-static", {"smooth": 1.5})


# -- the real model ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_int8_spec(tmp_path: Path) -> None:
    """specs/minilm-int8-cpu.yaml: every MatMul int8, legalized, cosine >= 0.99 to fp32 on batch 8 x 128."""
    from llmc.driver import compile_spec
    from llmc.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "specs" / "minilm-int8-cpu.yaml")
    result = compile_spec(spec, out=tmp_path / "artifact")
    target = result.targets[0]
    stats = {r.name: r.stats for r in result.pipeline.records + target.legalize.records}
    assert stats["quantize-dynamic"]["quantized"] == 24 and stats["quantize-dynamic"]["smoothed"] == 24
    assert target.golden.passed, target.golden.markdown()
    model = onnx.load(str(target.artifact / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" not in ops
    assert ops.count("DynamicQuantizeMatMul") + ops.count("MatMulInteger") == 24
