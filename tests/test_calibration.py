"""The spec's calibration: section -> feeds, and intermediate activations read through onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_frontends.tiny import tiny_import
from graphs import mlp_model

from llmc.calibration import activations, build_calibration, gram_matrices, require_calibration
from llmc.errors import SpecError
from llmc.frontends.base import ImportedModel
from llmc.ir import from_onnx
from llmc.pass_manager import PassContext
from llmc.spec import parse_spec


def _mlp():
    model = mlp_model()
    graph = from_onnx(model)
    return graph, graph.initializers["w1"], graph.initializers["w2"]


def _imported(graph) -> ImportedModel:
    return ImportedModel(graph=graph, source="onnx", task="generic")


def _spec(tmp_path, calibration: str):
    text = f"model: {{path: m.onnx}}\ncalibration: {calibration}\noutput: {{dir: out}}\n"
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return parse_spec(text, path)


def test_npz_samples_become_feeds(tmp_path):
    graph, _, _ = _mlp()
    x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", **{f"x@{k}": x[k] for k in range(3)})
    cal = build_calibration(_spec(tmp_path, "{inputs: cal.npz, samples: 2}"), _imported(graph))
    assert len(cal) == 2
    np.testing.assert_array_equal(cal.feeds[1]["x"], x[1])


def test_wrong_shape_is_a_located_error(tmp_path):
    graph, _, _ = _mlp()
    np.savez(tmp_path / "cal.npz", x=np.zeros((2, 7), np.float32))
    with pytest.raises(SpecError) as err:
        build_calibration(_spec(tmp_path, "{inputs: cal.npz}"), _imported(graph))
    assert "shape [2, 7]" in err.value.message and err.value.location.line == 2


def test_missing_file_and_text_for_an_encoder_are_errors(tmp_path):
    graph, _, _ = _mlp()
    with pytest.raises(SpecError, match="calibration inputs not found"):
        build_calibration(_spec(tmp_path, "{inputs: nothing.npz}"), _imported(graph))
    with pytest.raises(SpecError, match="calibrate decoders only"):
        build_calibration(_spec(tmp_path, "{prompts: [hello]}"), _imported(graph))


def test_no_section_means_no_set_and_passes_say_how_to_add_one(tmp_path):
    graph, _, _ = _mlp()
    spec = parse_spec("model: {path: m.onnx}\noutput: {dir: out}\n")
    assert build_calibration(spec, _imported(graph)) is None
    with pytest.raises(SpecError, match="needs calibration data") as err:
        require_calibration(PassContext(data={"calibration": None}), "quantize-static")
    assert "calibration:" in err.value.hint


def test_decoder_windows_from_prompts_and_text(tmp_path):
    imported = tiny_import("llama")
    (tmp_path / "cal.txt").write_text(" ".join(f"w{i % 90 + 3}" for i in range(50)))
    spec = _spec(tmp_path, "{prompts: ['w5 w6 w7'], text: cal.txt, max_tokens: 16, samples: 3}")
    cal = build_calibration(spec, imported)
    assert [len(t) for t in cal.tokens] == [3, 16, 16]
    feed = cal.feeds[1]
    assert feed["input_ids"].shape == (1, 16)
    np.testing.assert_array_equal(feed["position_ids"][0], np.arange(16))
    assert feed["past_key_values.0.key"].shape == (1, 2, 0, imported.decoder.head_dim)
    with pytest.raises(SpecError, match="decoders calibrate on text"):
        build_calibration(_spec(tmp_path, "{inputs: cal.npz}"), imported)


def test_activations_match_numpy():
    graph, w1, _ = _mlp()
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    (got,) = list(activations(graph, ["h", "r", "h"], [{"x": x}]))
    h = x @ w1
    np.testing.assert_allclose(got["h"], h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["r"], np.maximum(h, 0), rtol=1e-5, atol=1e-5)


def test_gram_matrices_sum_over_feeds():
    graph, w1, _ = _mlp()
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (3, 5)]
    full = gram_matrices(graph, ["x", "h"], [{"x": x} for x in xs])
    diag = gram_matrices(graph, ["h"], [{"x": x} for x in xs], diagonal=True)
    stacked = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(full["x"], stacked.T @ stacked, rtol=1e-10)
    h = stacked @ w1.astype(np.float64)
    np.testing.assert_allclose(diag["h"], (h * h).sum(axis=0), rtol=1e-4)
    np.testing.assert_allclose(np.diag(full["h"]), diag["h"], rtol=1e-10)
