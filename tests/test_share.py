"""share-parameters: identical initializers of any size become one, a transposed copy of a tied embedding
becomes Transpose(embedding), near-equal weights are clustered only when asked; outputs checked in
onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder, run_model
from onnx import TensorProto

from llmc.ir import Graph, clone, to_onnx
from llmc.pass_manager import PassOptionsError, make_pass, run_pipeline

H, V = 32, 100


def _share(graph: Graph, options: dict | None = None):
    return run_pipeline(graph, [{"share-parameters": {"min_size": 0, **(options or {})}}]).records[0]


def _layers(*weights: np.ndarray) -> Graph:
    """x -> MatMul(w0) -> MatMul(w1) -> ... with weights named layer.{i}.weight."""
    b = GraphBuilder("layers")
    out = b.input("x", TensorProto.FLOAT, ["batch", H])
    for i, w in enumerate(weights):
        name = b.initializer(f"layer.{i}.weight", w.astype(np.float32))
        out = b.node("MatMul", [out, name], name=f"layer{i}")
    b.output(out, TensorProto.FLOAT, ["batch", H])
    return b.ir()


def _x(seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((4, H)).astype(np.float32)}


def test_identical_weights_of_any_size_are_stored_once() -> None:
    rng = np.random.default_rng(0)
    big = rng.standard_normal((H, H)) / np.sqrt(H)
    graph = _layers(big, rng.standard_normal((H, H)) / np.sqrt(H), big.copy(), big.copy())
    before = clone(graph)
    record = _share(graph)
    assert len(graph.initializers) == 2
    assert record.stats == {"identical": 2, "bytes_saved": 2 * H * H * 4}
    assert {row["shared_with"] for row in record.details["identical"]} == {"layer.0.weight"}
    np.testing.assert_array_equal(run_model(graph, _x())["t3"], run_model(before, _x())["t3"])


def test_equal_bytes_in_another_dtype_or_shape_are_not_merged() -> None:
    b = GraphBuilder("dtypes")
    x = b.input("x", TensorProto.FLOAT, [4, 8])
    b.initializer("a", np.ones((4, 8), np.float32))
    b.initializer("b", np.ones((8, 4), np.float32))
    b.initializer("c", np.ones((4, 8), np.float32).view(np.int32))  # the bytes of "a" as int32
    c = b.node("Cast", ["c"], to=TensorProto.FLOAT)
    b.output(b.node("Add", [b.node("Add", [x, "a"]), c]), TensorProto.FLOAT, [4, 8])
    b.output(b.node("MatMul", [x, "b"]), TensorProto.FLOAT, [4, 4])
    graph = b.ir()
    record = _share(graph, {"tie_transposed": False})
    assert not record.changed and len(graph.initializers) == 3


def _tied(copy: bool) -> Graph:
    """Gather(embedding, ids) -> ... -> MatMul(h, embedding.T) with the transpose stored as its own copy."""
    emb = np.random.default_rng(2).standard_normal((V, H)).astype(np.float32)
    b = GraphBuilder("tied")
    ids = b.input("ids", TensorProto.INT64, ["batch"])
    b.initializer("embed.weight", emb)
    h = b.node("Gather", ["embed.weight", ids], name="embed")
    if copy:
        head = b.initializer("embed.weight.T", np.ascontiguousarray(emb.T))
    else:
        head = b.node("Transpose", ["embed.weight"], perm=[1, 0])
    b.output(b.node("MatMul", [h, head], ["logits"], name="lm_head"), TensorProto.FLOAT, ["batch", V])
    return b.ir()


def test_a_transposed_copy_of_the_embedding_becomes_a_transpose() -> None:
    graph = _tied(copy=True)
    before = clone(graph)
    record = _share(graph)
    assert set(graph.initializers) == {"embed.weight"}
    assert record.details["transposed"] == [
        {"weight": "embed.weight.T", "shared_with": "embed.weight", "bytes": V * H * 4}
    ]
    (transpose,) = graph.find("Transpose")
    assert transpose.inputs == ("embed.weight",) and transpose.attr("perm") == [1, 0]
    feeds = {"ids": np.array([0, 5, 99], np.int64)}
    np.testing.assert_array_equal(run_model(graph, feeds)["logits"], run_model(before, feeds)["logits"])
    assert len(to_onnx(graph).SerializeToString()) < 0.6 * len(to_onnx(before).SerializeToString())


def test_the_copy_is_kept_when_asked() -> None:
    graph = _tied(copy=True)
    record = _share(graph, {"tie_transposed": False})
    assert not record.changed and len(graph.initializers) == 2


def test_an_existing_tie_is_left_alone() -> None:
    graph = _tied(copy=False)
    record = _share(graph)
    assert not record.changed


def test_near_equal_weights_cluster_only_when_asked() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((H, H)) / np.sqrt(H)
    close = base + 1e-3 * rng.standard_normal((H, H)) / np.sqrt(H)  # relative distance ~1e-3
    far = rng.standard_normal((H, H)) / np.sqrt(H)
    graph = _layers(base, close, far)
    assert not _share(graph).changed  # exact sharing only by default
    before = clone(graph)
    record = _share(graph, {"cluster_tolerance": 0.01})
    assert set(graph.initializers) == {"layer.0.weight", "layer.2.weight"}
    (row,) = record.details["clustered"]
    assert row["weight"] == "layer.1.weight" and row["shared_with"] == "layer.0.weight"
    assert row["distance"] == pytest.approx(1e-3, rel=0.3)
    y, y0 = run_model(graph, _x())["t2"], run_model(before, _x())["t2"]
    assert np.linalg.norm(y - y0) / np.linalg.norm(y0) < 5e-3


def test_clustering_respects_globs(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(4)
    base = rng.standard_normal((H, H))
    graph = _layers(base, base + 1e-4, base - 1e-4)
    record = _share(graph, {"cluster_tolerance": 0.01, "exclude": ["layer.2.*", "nope*"]})
    assert [row["weight"] for row in record.details["clustered"]] == ["layer.1.weight"]
    assert record.details["unmatched_patterns"] == {"exclude": ["nope*"]}
    assert "exclude pattern 'nope*' matches no weight" in caplog.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cluster_tolerance": 0}, "cluster_tolerance: Input should be greater than 0"),
        ({"cluster_tolerance": 1.5}, "cluster_tolerance: Input should be less than 1"),
        ({"min_size": -1}, "min_size: Input should be greater than or equal to 0"),
        ({"tolerance": 0.1}, "tolerance: Extra inputs are not permitted"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(PassOptionsError, match=message):
        make_pass("share-parameters", options)
