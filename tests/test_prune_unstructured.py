"""prune-unstructured: the requested share of zeros, 2:4 patterns along K, Wanda scores, compact storage that
onnxruntime rebuilds exactly, and errors for bad options."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from graphs import GraphBuilder, run_model
from onnx import TensorProto

from llmc.calibration import CalibrationSet
from llmc.errors import PassError
from llmc.ir import Graph, clone, to_onnx
from llmc.pass_manager import PassContext, PassOptionsError, make_pass, run_pipeline
from llmc.passes.prune.unstructured import NO_SPARSE_KERNEL, keep_mask, pack, unpack


def _model(k: int = 64, n: int = 48, *, seed: int = 0, second: int | None = None) -> Graph:
    """y = x @ layer.weight [k, n] (then @ out.weight [n, second])."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("prune")
    x = b.input("x", TensorProto.FLOAT, ["batch", k])
    b.initializer("layer.weight", rng.standard_normal((k, n)).astype(np.float32))
    out = b.node("MatMul", [x, "layer.weight"], ["h"], name="proj")
    if second:
        b.initializer("out.weight", (3 * rng.standard_normal((n, second))).astype(np.float32))
        out = b.node("MatMul", [out, "out.weight"], ["y"], name="out")
    b.output(out, TensorProto.FLOAT, ["batch", second or n])
    return b.ir()


def _prune(graph: Graph, options: dict, ctx: PassContext | None = None):
    """Run the pass alone (tiny matrices: min_size 0 unless the test says otherwise)."""
    return run_pipeline(graph, [{"prune-unstructured": {"min_size": 0, **options}}], ctx=ctx).records[0]


def _dense(graph: Graph, weight: str) -> np.ndarray:
    """The weight as onnxruntime sees it: stored as it is, or rebuilt from the compact form."""
    if weight in graph.initializers:
        return np.asarray(graph.initializers[weight])
    bits, values = graph.initializers[f"{weight}.sparse_bits"], graph.initializers[f"{weight}.sparse_values"]
    return unpack(bits, values, tuple(graph.value_info(_matmul_input(graph, weight)).shape))


def _matmul_input(graph: Graph, weight: str) -> str:
    producer = next(
        n for n in graph.nodes() if n.op_type == "Gather" and n.inputs[0] == f"{weight}.sparse_values"
    )
    return graph.consumers(producer.outputs[0])[0].outputs[0]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_layer_sparsity_keeps_the_largest_weights(sparsity: float) -> None:
    graph = _model()
    w = np.asarray(graph.initializers["layer.weight"])
    record = _prune(graph, {"sparsity": sparsity, "storage": "dense"})
    pruned = np.asarray(graph.initializers["layer.weight"])
    assert np.mean(pruned == 0) == pytest.approx(sparsity, abs=1 / w.size)
    assert np.abs(w[pruned == 0]).max() <= np.abs(w[pruned != 0]).min()
    np.testing.assert_array_equal(pruned[pruned != 0], w[pruned != 0])
    assert record.details["speed"] == NO_SPARSE_KERNEL
    assert record.stats["bytes_saved"] == 0


def test_two_of_four_along_k() -> None:
    graph = _model()
    w = np.asarray(graph.initializers["layer.weight"])
    record = _prune(graph, {"pattern": "2:4", "storage": "dense"})
    pruned = np.asarray(graph.initializers["layer.weight"]).reshape(16, 4, 48)
    assert np.all((pruned != 0).sum(axis=1) == 2)  # two of every four consecutive rows, in each column
    kept = np.sort(np.abs(w.reshape(16, 4, 48)), axis=1)[:, 2:, :]
    np.testing.assert_array_equal(np.sort(np.abs(pruned), axis=1)[:, 2:, :], kept)
    assert record.stats["sparsity"] == 0.5


def test_global_scope_prunes_the_small_layer_harder() -> None:
    graph = _model(second=32)  # out.weight is three times larger in magnitude
    record = _prune(graph, {"sparsity": 0.5, "scope": "global", "storage": "dense"})
    by_layer = {row["weight"]: row["sparsity"] for row in record.details["pruned"]}
    assert by_layer["layer.weight"] > 0.5 > by_layer["out.weight"]
    assert record.stats["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_wanda_weights_scores_by_input_norms() -> None:
    # the second half of the input features is 100 times louder: Wanda keeps (mostly) their weights
    graph = _model(k=64, n=8)
    w = np.asarray(graph.initializers["layer.weight"])
    scale = np.r_[np.full(32, 0.01), np.full(32, 1.0)].astype(np.float32)
    x = (np.random.default_rng(1).standard_normal((16, 64)) * scale).astype(np.float32)
    ctx = PassContext(data={"calibration": CalibrationSet([{"x": x}], "test")})
    _prune(graph, {"sparsity": 0.5, "method": "wanda", "storage": "dense"}, ctx)
    pruned = np.asarray(graph.initializers["layer.weight"])
    # by hand: per output column, the 32 lowest |W[k, n]|·‖x_k‖ go
    score = np.abs(w) * np.linalg.norm(x.astype(np.float64), axis=0)[:, None]
    expected = np.ones_like(w, dtype=bool)
    np.put_along_axis(expected, np.argsort(score, axis=0)[:32], False, axis=0)
    np.testing.assert_array_equal(pruned, np.where(expected, w, 0))
    assert np.mean(pruned[:32] == 0) > 0.9 and np.mean(pruned[32:] == 0) < 0.1


def test_wanda_needs_calibration() -> None:
    with pytest.raises(PassError, match="needs calibration data"):
        _prune(_model(), {"method": "wanda"})


@pytest.mark.parametrize("options", [{"sparsity": 0.7}, {"pattern": "2:4"}, {"pattern": "1:8"}])
def test_compact_storage_round_trips_exactly(options: dict) -> None:
    graph = _model(k=60 if "pattern" not in options else 64, n=37)  # K·N not a multiple of 8: padded bits
    dense = clone(graph)
    _prune(dense, {**options, "storage": "dense"})
    record = _prune(graph, options)
    assert "layer.weight" not in graph.initializers
    np.testing.assert_array_equal(_dense(graph, "layer.weight"), dense.initializers["layer.weight"])
    x = np.random.default_rng(2).standard_normal((5, graph.value_info("x").shape[1] or 0)).astype(np.float32)
    np.testing.assert_array_equal(run_model(graph, {"x": x})["h"], run_model(dense, {"x": x})["h"])
    # with onnxruntime's own optimizations on, the rebuild is constant-folded at load: same numbers
    folded = ort.SessionOptions()
    folded.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(
        to_onnx(graph).SerializeToString(), folded, providers=["CPUExecutionProvider"]
    )
    np.testing.assert_array_equal(session.run(["h"], {"x": x})[0], run_model(dense, {"x": x})["h"])
    stored = sum(graph.initializers[f"layer.weight.sparse_{p}"].nbytes for p in ("bits", "values"))
    assert record.details["pruned"][0]["bytes"] == stored
    assert stored < dense.initializers["layer.weight"].nbytes
    assert record.stats["bytes_saved"] == dense.initializers["layer.weight"].nbytes - stored


def test_compact_form_is_smaller_on_disk() -> None:
    graph = _model(k=256, n=256)
    before = len(to_onnx(graph).SerializeToString())
    _prune(graph, {"pattern": "2:4"})
    after = len(to_onnx(graph).SerializeToString())
    assert after < 0.6 * before  # 1/8 + 2 bytes per weight instead of 4


def test_pack_unpack() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((7, 5)).astype(np.float16)
    mask = rng.random((7, 5)) < 0.4
    bits, values = pack(w, mask)
    assert bits.dtype == np.uint8 and bits.size == 5 and values.size == mask.sum() + 1
    np.testing.assert_array_equal(unpack(bits, values, (7, 5)), np.where(mask, w, 0))
    assert keep_mask(np.abs(w), sparsity=0.0, n_m=None, per_column=False).all()


def test_skips_are_reported() -> None:
    graph = _model(k=62, n=8)
    record = _prune(graph, {"pattern": "2:4", "exclude": ["nothing*"]})
    assert "K=62 is not a multiple of M=4" in record.details["skipped"][0]["reason"]
    assert record.details["unmatched_patterns"] == {"exclude": ["nothing*"]}
    assert not record.changed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sparsity": 1.0}, "sparsity: Input should be less than 1"),
        ({"sparsity": -0.1}, "sparsity: Input should be greater than or equal to 0"),
        ({"pattern": "4:2"}, "pattern must be 'N:M' with 0 < N < M"),
        ({"pattern": "2-4"}, "pattern must be 'N:M'"),
        (
            {"pattern": "2:4", "sparsity": 0.7},
            "pattern 2:4 prunes 0.5 of the weights; sparsity 0.7 contradicts",
        ),
        ({"pattern": "2:4", "scope": "global"}, "no global scope"),
        ({"method": "random"}, "method: Input should be 'magnitude' or 'wanda'"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(PassOptionsError, match=message):
        make_pass("prune-unstructured", options)
