"""factorize-low-rank: exact at full rank and on rank-r matrices, energy-chosen ranks, skips with reasons,
the data-aware variant, and errors for bad options."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import GraphBuilder, run_model
from onnx import TensorProto

from llmc.calibration import CalibrationSet
from llmc.errors import PassError
from llmc.ir import Graph, clone
from llmc.pass_manager import PassContext, PassOptionsError, make_pass, run_pipeline
from llmc.passes.factorize.low_rank import truncated_svd


def _linear(w: np.ndarray, *, name: str = "layer.weight", second: np.ndarray | None = None) -> Graph:
    """y = x @ w (then @ second, a second layer 'out.weight', when given)."""
    k = w.shape[0]
    b = GraphBuilder("lr")
    x = b.input("x", TensorProto.FLOAT, ["batch", k])
    b.initializer(name, w.astype(np.float32))
    h = b.node("MatMul", [x, name], ["h"], name="proj")
    out = h
    if second is not None:
        b.initializer("out.weight", second.astype(np.float32))
        out = b.node("MatMul", [h, "out.weight"], ["y"], name="out")
    b.output(out, TensorProto.FLOAT, ["batch", (second if second is not None else w).shape[1]])
    return b.ir()


def _low_rank(k: int, n: int, r: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, r)) @ rng.standard_normal((r, n))


def _x(k: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((5, k)).astype(np.float32)


def _factorize(graph: Graph, options: dict, ctx: PassContext | None = None):
    """Run the pass alone (tiny matrices: min_size 0 unless the test says otherwise)."""
    options = {"min_size": 0, **options}
    return run_pipeline(graph, [{"factorize-low-rank": options}], ctx=ctx).records[0]


def test_full_rank_equals_the_original() -> None:
    w = np.random.default_rng(0).standard_normal((12, 10))
    graph = _linear(w)
    before = clone(graph)
    record = _factorize(graph, {"rank": 10, "max_cost": 10})
    assert record.stats["factorized"] == 1
    assert graph.initializers["layer.weight.lowrank_u"].shape == (12, 10)
    assert graph.initializers["layer.weight.lowrank_v"].shape == (10, 10)
    assert "layer.weight" not in graph.initializers
    assert [n.op_type for n in graph.nodes()] == ["MatMul", "MatMul"]
    x = _x(12)
    np.testing.assert_allclose(run_model(graph, {"x": x})["h"], run_model(before, {"x": x})["h"], atol=1e-4)


def test_rank_r_matrix_at_rank_r_is_exact_and_smaller() -> None:
    w = _low_rank(64, 48, 5)
    graph = _linear(w)
    before = clone(graph)
    record = _factorize(graph, {"rank": 5})
    assert record.stats["bytes_saved"] == (64 * 48 - 5 * (64 + 48)) * 4
    x = _x(64)
    np.testing.assert_allclose(run_model(graph, {"x": x})["h"], run_model(before, {"x": x})["h"], atol=1e-3)
    layer = record.details["factorized"][0]
    assert layer["rank"] == 5 and layer["energy"] == pytest.approx(1.0)


def test_energy_picks_the_smallest_rank_that_keeps_it() -> None:
    # singular values 8, 4, 2, 1, ... : energies 64, 16, 4, 1 of 85 -> 0.9 needs two
    rng = np.random.default_rng(3)
    p, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    s = np.array([8.0, 4.0, 2.0, 1.0] + [0.0] * 36)
    w = (p * s) @ q.T
    assert truncated_svd(w, energy=0.9).rank == 2
    assert truncated_svd(w, energy=0.99).rank == 4
    factors = truncated_svd(w, energy=0.75)
    assert factors.rank == 1 and factors.energy == pytest.approx(64 / 85)
    np.testing.assert_allclose(factors.u @ factors.v, 8.0 * np.outer(p[:, 0], q[:, 0]), atol=1e-9)


def test_layers_that_would_not_shrink_are_skipped_with_a_reason() -> None:
    rng = np.random.default_rng(4)
    graph = _linear(_low_rank(64, 64, 4), second=rng.standard_normal((64, 64)))
    record = _factorize(graph, {"energy": 0.95})
    assert record.stats["factorized"] == 1  # layer.weight has rank 4; out.weight is full rank
    (skip,) = record.details["skipped"]
    assert skip["weight"] == "out.weight" and "not below max_cost 0.8" in skip["reason"]
    assert "out.weight" in graph.initializers


def test_include_exclude_and_unmatched_patterns(caplog: pytest.LogCaptureFixture) -> None:
    graph = _linear(_low_rank(64, 64, 4), second=_low_rank(64, 64, 4, seed=2))
    record = _factorize(graph, {"rank": 4, "exclude": ["out.*", "nothing.*"]})
    assert [layer["weight"] for layer in record.details["factorized"]] == ["layer.weight"]
    assert record.details["unmatched_patterns"] == {"exclude": ["nothing.*"]}
    assert "exclude pattern 'nothing.*' matches no weight" in caplog.text


def test_weight_read_by_another_node_is_kept() -> None:
    b = GraphBuilder("tied")
    x = b.input("x", TensorProto.FLOAT, ["batch", 64])
    b.initializer("w", _low_rank(64, 64, 3).astype(np.float32))
    h = b.node("MatMul", [x, "w"], name="proj")
    b.output(b.node("Add", [h, "w"], ["y"]), TensorProto.FLOAT, ["batch", 64])
    graph = b.ir()
    record = _factorize(graph, {"rank": 3})
    assert record.stats["factorized"] == 0
    assert "also read by" in record.details["skipped"][0]["reason"]


def test_data_aware_beats_plain_svd_on_the_output() -> None:
    # inputs that live mostly in a few directions: the output error is what matters, not W's error
    rng = np.random.default_rng(5)
    k, n = 64, 64
    w = rng.standard_normal((k, n))
    basis = rng.standard_normal((6, k))
    feeds = [
        {"x": (rng.standard_normal((32, 6)) @ basis + 0.01 * rng.standard_normal((32, k))).astype(np.float32)}
    ]
    errors = {}
    for aware in (False, True):
        graph = _linear(w)
        ctx = PassContext(data={"calibration": CalibrationSet(feeds, "test")})
        _factorize(graph, {"rank": 8, "data_aware": aware}, ctx)
        y = run_model(graph, feeds[0])["h"]
        errors[aware] = np.linalg.norm(y - feeds[0]["x"] @ w) / np.linalg.norm(feeds[0]["x"] @ w)
    assert errors[True] < 0.05 < errors[False]


def test_data_aware_needs_calibration() -> None:
    with pytest.raises(PassError, match="needs calibration data"):
        _factorize(_linear(_low_rank(64, 64, 4)), {"rank": 4, "data_aware": True})


def test_rank_larger_than_the_matrix_is_a_clear_error() -> None:
    with pytest.raises(PassError, match=r"rank 65 is larger than the matrix 'layer.weight' \[64×48\]"):
        _factorize(_linear(_low_rank(64, 48, 4)), {"rank": 65})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"energy": 0.0}, "energy: Input should be greater than 0"),
        ({"energy": 1.5}, "energy: Input should be less than or equal to 1"),
        ({"rank_ratio": 0}, "rank_ratio: Input should be greater than 0"),
        ({"rank": 0}, "rank: Input should be greater than or equal to 1"),
        ({"rank": 4, "energy": 0.9}, "give one of energy, rank, rank_ratio"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(PassOptionsError, match=message):
        make_pass("factorize-low-rank", options)


@pytest.mark.slow
def test_minilm_lowrank_spec_compiles_verifies_and_shrinks(tmp_path) -> None:
    """specs/minilm-lowrank-cpu.yaml: the layers that shrink are factorized, the rest skipped with a reason,
    and the build passes its own (honest) cosine threshold."""
    from pathlib import Path

    from llmc.driver import compile_spec
    from llmc.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "specs" / "minilm-lowrank-cpu.yaml")
    result = compile_spec(spec, out=tmp_path / "artifact")
    (record,) = [r for r in result.pipeline.records if r.name == "factorize-low-rank"]
    assert record.stats["factorized"] >= 10 and record.stats["bytes_saved"] > 4_000_000
    assert all("max_cost" in s["reason"] for s in record.details["skipped"])
    target = result.targets[0]
    assert target.golden is not None and target.golden.passed, target.golden.markdown()
