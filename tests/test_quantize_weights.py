"""quantize-weights (standard blocked DequantizeLinear; RTN and GPTQ; embedding and tied lm_head) and its CPU
legalization into MatMulNBits."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from clitools import run_cli
from graphs import relu_graph, run_model
from onnx import TensorProto, helper, numpy_helper

from llmc.calibration import CalibrationSet
from llmc.errors import PassError
from llmc.ir import Graph, clone, from_onnx, to_onnx
from llmc.pass_manager import PassContext, PassOptionsError, make_pass, run_pipeline
from llmc.passes.quantize.quantize_weights import hessian_input, quantize_blocks


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


def _run_all(graph: Graph, x: np.ndarray) -> list[np.ndarray]:
    # onnxruntime's own optimizations off: at "all" it fuses DequantizeLinear+MatMul into its int8-compute
    # MatMulNBits, which would hide what the standard form computes
    return list(run_model(graph, {"x": x}).values())


def _run(graph: Graph, x: np.ndarray) -> np.ndarray:
    return _run_all(graph, x)[0]


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
    assert "'layer.weight' stays float: K=48 is not a multiple of block 32" in caplog.text
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
    relu = relu_graph()
    with pytest.raises(PassError, match="no MatMul with a constant float weight"):
        run_pipeline(relu, ["quantize-weights"])


# -- GPTQ through the pass -------------------------------------------------------------------------


def _correlated(rng: np.random.Generator, rows: int, k: int = 64) -> np.ndarray:
    mix = np.eye(k) + 0.4 * np.random.default_rng(7).standard_normal((k, k))  # the same mix every call
    return (rng.standard_normal((rows, 3, k)) @ mix).astype(np.float32)


def _calibration(samples: int = 8) -> PassContext:
    rng = np.random.default_rng(5)
    feeds = [{"x": _correlated(rng, 4)} for _ in range(samples)]
    return PassContext(data={"calibration": CalibrationSet(feeds, f"{samples} samples")})


@pytest.mark.parametrize(("symmetric", "act_order"), [(True, False), (False, False), (True, True)])
def test_gptq_pass_beats_round_to_nearest_in_onnxruntime(symmetric: bool, act_order: bool) -> None:
    x = _correlated(np.random.default_rng(11), 16)  # held-out inputs from the same distribution
    reference = _run(_graph(), x)
    errors = {}
    for algorithm in ("rtn", "gptq"):
        graph = _graph()
        options = {"algorithm": algorithm, "symmetric": symmetric, "act_order": act_order}
        report = run_pipeline(graph, [{"quantize-weights": options}], ctx=_calibration())
        [deq] = graph.find("DequantizeLinear")
        assert (deq.attr("axis"), deq.attr("block_size")) == (0, 32)  # same standard form for both
        errors[algorithm] = np.linalg.norm(_run(graph, x) - reference) / np.linalg.norm(reference)
    [weight] = report.records[0].details["weights"]
    assert weight["algorithm"] == "gptq" and weight["gptq_error"] < 0.85 * weight["rtn_error"]
    assert report.records[0].details["calibration"] == "8 samples"
    assert errors["gptq"] < 0.85 * errors["rtn"]  # measured ≈ 0.7


def test_gptq_needs_calibration_and_a_definite_hessian() -> None:
    with pytest.raises(PassError, match="needs calibration data"):
        run_pipeline(_graph(), [{"quantize-weights": {"algorithm": "gptq"}}])
    with pytest.raises(PassError, match="needs calibration data"):  # an override asking for GPTQ too
        run_pipeline(
            _graph(), [{"quantize-weights": {"overrides": [{"pattern": "layer.*", "algorithm": "gptq"}]}}]
        )
    zero = PassContext(
        data={"calibration": CalibrationSet([{"x": np.zeros((1, 3, 64), np.float32)}], "zeros")}
    )
    graph = _graph()  # all inputs dead: diag H = 0 everywhere, handled (weights to zero), no error
    run_pipeline(graph, [{"quantize-weights": {"algorithm": "gptq"}}], ctx=zero)
    assert graph.find("DequantizeLinear")
    with pytest.raises(PassOptionsError, match="algorithm"):
        make_pass("quantize-weights", {"algorithm": "awq"})
    with pytest.raises(PassOptionsError, match="bits must be 4 or 8"):
        make_pass("quantize-weights", {"overrides": [{"pattern": "*", "bits": 2}]})


def test_overrides_choose_bits_per_weight(caplog: pytest.LogCaptureFixture) -> None:
    graph = _graph()
    overrides = [{"pattern": "layer.*", "bits": 8, "block_size": 16}, {"pattern": "nothing.*", "bits": 8}]
    report = run_pipeline(graph, [{"quantize-weights": {"overrides": overrides}}])
    [deq] = graph.find("DequantizeLinear")
    assert graph.constant(deq.inputs[0]).dtype == np.int8 and deq.attr("block_size") == 16
    assert report.records[0].details["unused_overrides"] == ["nothing.*"]
    assert "override pattern 'nothing.*' matches no quantized weight" in caplog.text


# -- embedding and lm_head -------------------------------------------------------------------------

VOCAB, HIDDEN = 96, 64


def _table() -> np.ndarray:
    return np.random.default_rng(4).standard_normal((VOCAB, HIDDEN)).astype(np.float32)


def _decoder(folded: bool = False) -> Graph:
    """ids -> Gather(table) -> MatMul(body) -> last position -> MatMul(Transpose(table)) -> logits.

    ``folded``: the lm_head reads a pre-transposed copy of the table (fold-weight-transposes fold_shared).
    """
    rng = np.random.default_rng(3)
    table = _table()
    inits = [
        numpy_helper.from_array(table, "embed.weight"),
        numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 8, "body.weight"),
        numpy_helper.from_array(np.array([-1], np.int64), "starts"),
        numpy_helper.from_array(np.array([2**62], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed.weight", "input_ids"], ["h0"]),
        helper.make_node("MatMul", ["h0", "body.weight"], ["h1"]),
        helper.make_node("Slice", ["h1", "starts", "ends", "axes"], ["last"]),
    ]
    if folded:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(table.T), "embed.weight.T"))
        nodes.append(helper.make_node("MatMul", ["last", "embed.weight.T"], ["logits"], name="lm_head"))
    else:
        nodes.append(helper.make_node("Transpose", ["embed.weight"], ["table_t"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["last", "table_t"], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, VOCAB])],
        inits,
        value_info=[helper.make_tensor_value_info("h1", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
    )
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _logits(graph: Graph, ids: np.ndarray) -> np.ndarray:
    return next(iter(run_model(graph, {"input_ids": ids}).values()))


def _restored(graph: Graph, deq) -> np.ndarray:
    """The float values a DequantizeLinear node computes, in numpy."""
    q, scale = graph.constant(deq.inputs[0]).astype(np.float32), graph.constant(deq.inputs[1])
    axis, block = deq.attr("axis"), deq.attr("block_size")
    if deq.input(2):
        q = q - np.repeat(graph.constant(deq.input(2)).astype(np.float32), block, axis=axis)
    return q * np.repeat(scale, block, axis=axis)


IDS = np.array([[5, 17, 60, 2], [95, 0, 33, 33]], np.int64)


def test_lm_head_is_left_float_by_default() -> None:
    graph = _decoder()
    report = run_pipeline(graph, ["quantize-weights"])
    assert report.records[0].stats == {"quantized": 1, "bytes_saved": report.records[0].stats["bytes_saved"]}
    assert graph.find("Transpose") and graph.is_initializer("embed.weight")


@pytest.mark.parametrize("folded", [False, True])
def test_tied_embedding_and_lm_head_share_one_table(folded: bool) -> None:
    graph = _decoder(folded)
    reference = _logits(graph, IDS)
    report = run_pipeline(
        graph,
        [
            {"quantize-weights": {"lm_head": True, "embedding": True, "symmetric": False}},
            "eliminate-dead-code",
        ],
    )
    stats = report.records[0].stats
    assert (
        stats["quantized"] == 3 and stats["tied_shared"] == 1 and stats["lm_head"] == stats["embedding"] == 1
    )
    assert not graph.is_initializer("embed.weight") and not graph.is_initializer("embed.weight.T")
    table_deq = [d for d in graph.find("DequantizeLinear") if d.attr("axis") == 1]
    assert len(table_deq) == 1 and len(graph.find("DequantizeLinear")) == 2  # the table's and the body's
    [deq] = table_deq
    assert graph.constant(deq.inputs[0]).shape == (VOCAB, HIDDEN) and deq.attr("block_size") == 32
    assert graph.constant(deq.inputs[1]).shape == (VOCAB, HIDDEN // 32)
    [gather] = graph.find("Gather")
    [transpose] = graph.find("Transpose")
    assert gather.inputs[0] == deq.outputs[0] and transpose.inputs[0] == deq.outputs[0]
    assert transpose.attr("perm") == [1, 0]
    head = graph.producer("logits")
    assert head.inputs[1] == transpose.outputs[0]
    # the graph runs as it is; its lm_head computes with exactly the table the Gather reads
    table = _restored(graph, deq)
    [body] = [d for d in graph.find("DequantizeLinear") if d.attr("axis") == 0]
    expected = (table[IDS] @ _restored(graph, body))[:, -1:] @ table.T
    logits = _logits(graph, IDS)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(table - _table()).max() <= np.abs(_table()).max() / 15  # within a step of the grid
    assert np.linalg.norm(logits - reference) / np.linalg.norm(reference) < 0.15
    weights = {w["role"]: w for w in report.records[0].details["weights"]}
    assert weights["lm_head"]["tied_to"] == "embed.weight"


def test_lm_head_alone_reads_its_own_transposed_copy() -> None:
    graph = _decoder()
    reference = _logits(graph, IDS)
    report = run_pipeline(graph, [{"quantize-weights": {"lm_head": True, "bits": 8}}, "eliminate-dead-code"])
    assert report.records[0].stats["lm_head"] == 1 and "tied_shared" not in report.records[0].stats
    head = graph.producer("logits")
    deq = graph.producer(head.inputs[1])
    assert deq.op_type == "DequantizeLinear" and deq.attr("axis") == 0
    assert graph.constant(deq.inputs[0]).shape == (HIDDEN, VOCAB)
    assert not graph.find("Transpose")  # the Transpose of the table went with the float lm_head
    assert graph.find("Gather")[0].inputs[0] == "embed.weight"  # the embedding stays exact
    [weight] = [w for w in report.records[0].details["weights"] if w["role"] == "lm_head"]
    assert weight["weight"] == "embed.weight.T"
    logits = _logits(graph, IDS)
    assert np.linalg.norm(logits - reference) / np.linalg.norm(reference) < 0.02


def test_embedding_alone_keeps_the_float_table_for_the_lm_head(caplog: pytest.LogCaptureFixture) -> None:
    graph = _decoder()
    reference = _logits(graph, IDS)
    report = run_pipeline(graph, [{"quantize-weights": {"embedding": True, "exclude": ["body.*"]}}])
    [gather] = graph.find("Gather")
    deq = graph.producer(gather.inputs[0])
    assert deq.op_type == "DequantizeLinear" and (deq.attr("axis"), deq.attr("block_size")) == (1, 32)
    assert graph.find("Transpose")[0].inputs[0] == "embed.weight"  # the float lm_head still reads it
    assert report.records[0].details["stored_twice"] == ["embed.weight"]
    assert "stored twice" in caplog.text
    table = _restored(graph, deq)
    expected = (table[IDS] @ graph.initializers["body.weight"])[:, -1:] @ _table().T
    np.testing.assert_allclose(_logits(graph, IDS), expected, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(expected - reference) / np.linalg.norm(reference) < 0.15


def test_tied_pair_on_two_grids_is_stored_twice_quantized() -> None:
    graph = _decoder()
    overrides = [{"pattern": "lm_head", "bits": 8}]
    options = {"lm_head": True, "embedding": True, "overrides": overrides}
    report = run_pipeline(graph, [{"quantize-weights": options}, "eliminate-dead-code"])
    assert "tied_shared" not in report.records[0].stats
    assert not graph.is_initializer("embed.weight") and not graph.find("Transpose")
    head = graph.producer(graph.producer("logits").inputs[1])
    assert graph.constant(head.inputs[0]).dtype == np.int8 and head.attr("axis") == 0
    gather_deq = graph.producer(graph.find("Gather")[0].inputs[0])
    assert gather_deq.attr("axis") == 1 and graph.constant(gather_deq.inputs[0]).dtype.name == "int4"
    assert _logits(graph, IDS).shape == (2, 1, VOCAB)


def test_gptq_lm_head_reads_every_position() -> None:
    """logits-last-token slices the lm_head input; its Hessian comes from all positions before the Slice."""
    graph = _decoder()
    assert hessian_input(graph, graph.producer("logits").inputs[0]) == "h1"
    rng = np.random.default_rng(9)
    feeds = [{"input_ids": rng.integers(0, VOCAB, (1, 16))} for _ in range(6)]
    ctx = PassContext(data={"calibration": CalibrationSet(feeds, "6 windows")})
    report = run_pipeline(graph, [{"quantize-weights": {"algorithm": "gptq", "lm_head": True}}], ctx=ctx)
    weights = {w["role"]: w for w in report.records[0].details["weights"]}
    assert weights["lm_head"]["algorithm"] == "gptq"
    assert weights["lm_head"]["gptq_error"] < weights["lm_head"]["rtn_error"]


def test_everything_excluded_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    graph = _decoder()
    report = run_pipeline(graph, [{"quantize-weights": {"exclude": ["*"], "lm_head": True}}])
    assert report.records[0].stats["quantized"] == 0 and not graph.find("DequantizeLinear")
    assert "matches no" not in caplog.text


def _project(tmp_path: Path, options: str, extra: str = "") -> Path:
    onnx.save(to_onnx(_graph()), tmp_path / "model.onnx")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model: {{path: model.onnx}}\npipeline: [{{quantize-weights: {options}}}]\n"
        f"targets:\n  cpu: {{}}\n{extra}output:\n  dir: out\n"
    )
    return spec


def test_cli_gptq_needs_a_calibration_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(capsys, "compile", _project(tmp_path, "{algorithm: gptq}"))
    assert result.code == 2 and "Traceback" not in result.err
    assert "needs calibration data" in result.err and "calibration:" in result.err
    x = _correlated(np.random.default_rng(1), 8)
    np.savez(tmp_path / "cal.npz", x=x)
    tolerances = "verify: {tolerances: {max_abs: 20.0, max_rel: 1.0e+4, cosine: 0.95}}\n"  # int4, random x
    spec = _project(tmp_path, "{algorithm: gptq}", f"calibration: {{inputs: cal.npz}}\n{tolerances}")
    result = run_cli(capsys, "compile", spec, "--force")
    assert result.code == 0, result.err


# -- min/max grid with a float offset (Q4_1 style) -------------------------------------------------


def _on_offset_grid(k: int = 64, n: int = 96, bits: int = 4, block: int = 32) -> np.ndarray:
    """A weight that lies exactly on w = m + d·q per block (as a Q4_1 GGUF's), m not a multiple of d."""
    rng = np.random.default_rng(3)
    top = (1 << bits) - 1
    q = rng.integers(0, top + 1, (k // block, block, n))
    q[:, 0, :], q[:, 1, :] = 0, top  # every block spans the whole grid
    d = rng.uniform(0.01, 0.05, (k // block, 1, n)).astype(np.float32)
    m = (-7.3 * d * rng.uniform(0.5, 1.5, d.shape)).astype(np.float32)
    return (m + d * q.astype(np.float32)).reshape(k, n).astype(np.float32)


def _with_weights(weights: dict[str, np.ndarray], k: int = 64, n: int = 96) -> Graph:
    """x [batch, 3, K] read by one MatMul per weight (outputs y0, y1, ...), like merged q/k/v sharing x."""
    nodes = [
        helper.make_node("MatMul", ["x", name], [f"y{i}"], name=f"proj{i}") for i, name in enumerate(weights)
    ]
    graph = helper.make_graph(
        nodes,
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, k])],
        [
            helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["batch", 3, n])
            for i in range(len(weights))
        ],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def test_offset_form_reproduces_a_q4_1_grid_and_legalizes_to_matmul_nbits() -> None:
    w = _on_offset_grid()
    graph = _with_weights({"a.weight": w, "b.weight": w[:, ::-1].copy()})
    x = np.random.default_rng(4).standard_normal((2, 3, 64)).astype(np.float32)
    reference = _run_all(graph, x)
    report = run_pipeline(graph, [{"quantize-weights": {"offset": True}}, "eliminate-dead-code"])
    record = report.records[0]
    assert record.stats["quantized"] == 2 and record.stats["offset"] == 2
    assert record.stats["block_sums"] == 1 and len(graph.find("ReduceSum")) == 1  # one per input x
    assert all(s["offset"] and s["max_abs_error"] < 1e-6 for s in record.details["weights"])
    for deq in graph.find("DequantizeLinear"):
        assert graph.constant(deq.inputs[0]).dtype == ml_dtypes.uint4
        assert not graph.constant(deq.input(2)).astype(np.int8).any()  # explicit zero points 0
    standard = _run_all(graph, x)
    for got, want in zip(standard, reference, strict=True):
        assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()  # exact up to fp32 rounding
        np.testing.assert_allclose(got, want, atol=2e-5)
    integer = _with_weights({"a.weight": w})  # the integer zero point cannot hold m: far off
    run_pipeline(integer, [{"quantize-weights": {"symmetric": False}}])
    assert (
        np.abs(_run_all(integer, x)[0] - reference[0]).max() > 20 * np.abs(standard[0] - reference[0]).max()
    )
    for level, tolerance in ((0, 1e-5), (4, 3e-2)):
        legal = clone(graph)
        run_pipeline(legal, [{"cpu-matmul-nbits": {"accuracy_level": level}}, "eliminate-dead-code"])
        assert len(legal.find("MatMulNBits", domain="com.microsoft")) == 2
        assert not legal.find("DequantizeLinear")
        for got, want in zip(_run_all(legal, x), standard, strict=True):
            assert np.abs(got - want).max() <= tolerance * np.abs(want).max()


def test_offset_on_the_logits_output_and_the_untied_lm_head() -> None:
    graph = _decoder()
    ids = np.array([[3, 17, 42]], np.int64)
    reference = _logits(graph, ids)
    report = run_pipeline(
        graph, [{"quantize-weights": {"offset": True, "lm_head": True, "min_size": 0}}, "eliminate-dead-code"]
    )
    weights = {s["role"]: s for s in report.records[0].details["weights"]}
    assert weights["lm_head"]["offset"] and list(graph.outputs) == ["logits"]
    assert graph.find("ReduceSum")
    error = np.abs(_logits(graph, ids) - reference).max() / np.abs(reference).max()
    assert error < 0.15  # RTN int4 on Gaussian weights, min/max grid


def test_offset_leaves_the_embedding_and_the_tied_table_on_integer_zero_points() -> None:
    graph = _decoder()
    options = {"offset": True, "lm_head": True, "embedding": True, "min_size": 0}
    report = run_pipeline(graph, [{"quantize-weights": options}, "eliminate-dead-code"])
    record = report.records[0]
    roles = {s["role"]: s for s in record.details["weights"]}
    assert "offset" not in roles["embedding"] and "offset" not in roles["lm_head"]
    assert roles["lm_head"]["tied_to"] == roles["embedding"]["weight"] and record.stats["tied_shared"] == 1


def test_offset_options_errors_and_unknown_rank(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(PassOptionsError, match="round-to-nearest only"):
        make_pass("quantize-weights", {"offset": True, "algorithm": "gptq"})
    overrides = [{"pattern": "layer.*", "algorithm": "gptq"}]
    with pytest.raises(PassError, match="offset: true is round-to-nearest only"):
        run_pipeline(_graph(), [{"quantize-weights": {"offset": True, "overrides": overrides}}])
    model = to_onnx(_graph())
    model.graph.input[0].type.tensor_type.ClearField("shape")
    graph = from_onnx(model)
    report = run_pipeline(graph, [{"quantize-weights": {"offset": True}}])
    assert report.records[0].stats["quantized"] == 0 and not graph.find("DequantizeLinear")
    assert "rank of its input is unknown" in report.records[0].details["skipped"][0]["reason"]
    assert "rank of its input is unknown" in caplog.text
