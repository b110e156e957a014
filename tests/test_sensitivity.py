"""``llmc sensitivity``: grouping and globs, the measurement against a direct one, the ranking of a fragile
weight (ONNX MLP) and layer (tiny llama), and the CLI's output and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from bisect_passes import fragile_decoder, mlp_model
from clitools import run_cli
from graphs import DECODER_CLEANUP, DECODER_FUSION, pipeline_yaml

from llmc.golden import make_inputs
from llmc.ir import load_model, to_onnx
from llmc.pass_manager import run_pipeline
from llmc.runtime.graph_session import graph_runner
from llmc.runtime.runner import OrtRunner
from llmc.sensitivity import (
    analyze,
    group_globs,
    group_weights,
    layer_prefix,
    position_logits,
    weight_kind,
)
from llmc.spec import load_spec

SMOL = [
    f"model.layers.{i}.{part}.weight.T"
    for i in (1, 2, 12)
    for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
] + ["lm_head.weight"]
MLP_VERIFY = (
    "verify:\n  dims: {batch: 4}\n  samples: 2\n  tolerances: {max_abs: 0.5, max_rel: 1.0, cosine: 0.999}\n"
)


def mlp_spec(tmp_path: Path, pipeline: str, fragile: str | None = "W2", extra: str = "") -> Path:
    mlp_model(tmp_path / "model.onnx", fragile)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model: {{path: model.onnx}}\npipeline: {pipeline}\ntargets:\n  cpu: {{}}\n{MLP_VERIFY}"
        f"output:\n  dir: out\n{extra}"
    )
    return spec


# -- grouping -----------------------------------------------------------------------------------------
def test_weight_names_give_layers_and_kinds() -> None:
    assert layer_prefix("model.layers.12.mlp.down_proj.weight.T") == "model.layers.12"
    assert layer_prefix("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert layer_prefix("lm_head.weight") is None
    assert weight_kind("model.layers.0.self_attn.qkv_proj.weight.T") == "qkv_proj"
    assert weight_kind("lm_head.weight") == "lm_head"
    assert weight_kind("W2") == "W2"


def test_groups_by_layer_kind_and_weight_in_natural_order() -> None:
    by_layer = group_weights(SMOL, "layer")
    assert list(by_layer) == ["lm_head", "model.layers.1", "model.layers.2", "model.layers.12"]
    assert len(by_layer["model.layers.12"]) == 4
    by_kind = group_weights(SMOL, "kind")
    assert sorted(by_kind) == ["down_proj", "gate_up_proj", "lm_head", "o_proj", "qkv_proj"]
    assert len(by_kind["qkv_proj"]) == 3
    assert len(group_weights(SMOL, "weight")) == len(SMOL)


def test_group_globs_match_exactly_their_group() -> None:
    import fnmatch

    for by in ("layer", "kind", "weight"):
        for key, members in group_weights(SMOL, by).items():
            globs = group_globs(key, members, SMOL, by)
            matched = [n for n in SMOL if any(fnmatch.fnmatchcase(n, g) for g in globs)]
            assert sorted(matched) == sorted(members), (by, key, globs)
    # layer 1 must not take layer 12 with it
    assert group_globs("model.layers.1", group_weights(SMOL, "layer")["model.layers.1"], SMOL, "layer") == [
        "model.layers.1.*"
    ]
    assert group_globs("qkv_proj", group_weights(SMOL, "kind")["qkv_proj"], SMOL, "kind") == ["*.qkv_proj.*"]


# -- the measurement on an MLP ---------------------------------------------------------------------------
def test_the_fragile_weight_ranks_first(tmp_path: Path) -> None:
    spec = load_spec(mlp_spec(tmp_path, "[{quantize-weights: {bits: 8}}]"))
    report = analyze(spec, by="weight")
    assert [g.name for g in report.groups][0] == "W2"
    first, second = report.groups[0], report.groups[1]
    assert first.value > 100 * second.value > 0  # the others are quantized too, with a small real error
    assert first.share > 0.9
    assert report.metric == "1-cos" and set(first.metrics) == {"1-cos", "max_abs"}
    assert report.total["1-cos"] >= first.value * 0.5
    assert report.suggested_exclude(1) == ["W2"]


def test_a_group_error_equals_a_direct_measurement(tmp_path: Path) -> None:
    spec = load_spec(mlp_spec(tmp_path, "[{quantize-weights: {bits: 4}}]", fragile=None))
    report = analyze(spec, by="weight", samples=2)
    row = next(g for g in report.groups if g.name == "W3")
    graph = load_model(tmp_path / "model.onnx")
    reference = OrtRunner(tmp_path / "model.onnx", graph_optimization_level="basic")
    run_pipeline(graph, [{"quantize-weights": {"bits": 4, "include": ["W3"]}}])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # as sensitivity runs it
    candidate = ort.InferenceSession(
        to_onnx(graph).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feeds = make_inputs(reference.inputs, samples=2, seed=spec.verify.seed, dims={"batch": 4})
    ref = np.concatenate([reference.run(f)["y"].ravel() for f in feeds]).astype(np.float64)
    out = np.concatenate([candidate.run(["y"], f)[0].ravel() for f in feeds]).astype(np.float64)
    cosine = out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref))
    assert row.metrics["1-cos"] == pytest.approx(1 - cosine, rel=1e-4, abs=1e-9)
    assert row.metrics["max_abs"] == pytest.approx(np.abs(out - ref).max(), rel=1e-5)
    assert row.metrics["1-cos"] > 0


def test_graph_runner_reads_weights_in_place_and_skips_dead_ones(tmp_path: Path) -> None:
    graph = load_model(mlp_model(tmp_path / "model.onnx"))
    graph.add_initializer("dead", np.ones((64, 512), np.float32))  # large, unused: onnxruntime drops it
    graph.add_initializer("small_dead", np.ones(3, np.float32))
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)}
    expected = OrtRunner(tmp_path / "model.onnx").run(feeds)["y"]
    with graph_runner(graph) as runner:
        assert [s.name for s in runner.inputs] == ["x"] and runner.outputs[0].dtype == "float32"
        np.testing.assert_allclose(runner.run(feeds)["y"], expected, rtol=1e-5, atol=1e-5)


# -- decoders ---------------------------------------------------------------------------------------------
DECODER_PIPELINE = "\n" + pipeline_yaml(
    [
        *DECODER_CLEANUP,
        *DECODER_FUSION,
        "logits-last-token",
        {"quantize-weights": {"bits": 8}},
        {"fixpoint": ["eliminate-common-subexpressions", "eliminate-dead-code"]},
    ]
)
CALIBRATION = (
    'calibration: {prompts: ["'
    + " ".join(f"w{(7 * i) % 90 + 3}" for i in range(24))
    + '", "'
    + " ".join(f"w{(11 * i) % 90 + 3}" for i in range(24))
    + '"]}\n'
)


def decoder_spec(tmp_path: Path, verify: str = "") -> Path:
    from fixtures_frontends.tiny import tiny_folder

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model: {{source: hf, path: {tiny_folder('llama')}, task: text-generation}}\n"
        f"pipeline:{DECODER_PIPELINE}\n{CALIBRATION}{verify}output:\n  dir: out\n"
    )
    return spec


@pytest.fixture
def fragile_llama(monkeypatch: pytest.MonkeyPatch):
    """``import_for_spec`` answers with the tiny llama (exported once per test process) whose layer 1 is fragile."""
    from fixtures_frontends.tiny import tiny_import

    import llmc.driver

    base = tiny_import("llama")
    monkeypatch.setattr(llmc.driver, "import_for_spec", lambda spec, work_dir: fragile_decoder(base))
    return base


def test_teacher_forced_steps_give_the_logits_of_a_full_prefill(tmp_path: Path) -> None:
    from fixtures_frontends.tiny import tiny_import

    imported = tiny_import("llama")
    ids = np.array([[5, 17, 33, 8, 9, 44], [7, 8, 9, 10, 11, 12]], np.int64)
    runner = OrtRunner(imported.info["onnx_path"], graph_optimization_level="basic")
    full = position_logits(runner, imported.decoder, ids)  # every position in one prefill
    assert full.shape == (2, 6, imported.decoder.vocab_size)
    runner.last_token_outputs = ["logits"]  # as if logits-last-token had run: one step per token
    stepped = position_logits(runner, imported.decoder, ids)
    np.testing.assert_allclose(stepped, full, atol=1e-4, rtol=1e-4)


def test_the_fragile_layer_and_kind_rank_first(tmp_path: Path, fragile_llama) -> None:
    spec = load_spec(decoder_spec(tmp_path))
    by_layer = analyze(spec, by="layer")
    assert by_layer.metric == "kl" and by_layer.data.startswith("2 token windows of ")
    assert by_layer.groups[0].name == "model.layers.1"
    assert by_layer.groups[0].value > 10 * by_layer.groups[1].value
    assert by_layer.groups[0].metrics["top1"] < by_layer.groups[1].metrics["top1"] <= 1.0
    assert all(g.value >= 0 for g in by_layer.groups)
    by_kind = analyze(spec, by="kind")
    assert by_kind.groups[0].name == "down_proj"
    assert by_kind.suggested_exclude(1) == ["*.down_proj.*"]


# -- CLI --------------------------------------------------------------------------------------------------
def test_cli_prints_the_ranking_and_the_exclude_line(tmp_path: Path, capsys) -> None:
    spec = mlp_spec(tmp_path, "[{quantize-weights: {bits: 8, exclude: [W9]}}]")
    result = run_cli(
        capsys, "sensitivity", spec, "--by", "weight", "--top", "1", "--json", tmp_path / "s.json"
    )
    assert result.code == 0, result.err
    assert "sensitivity of quantize-weights by weight" in result.out
    assert 'exclude: ["W9", "W2"]' in result.out  # the pass's own exclude globs are kept
    data = json.loads((tmp_path / "s.json").read_text())
    assert [g["name"] for g in data["groups"]] == ["W2", "W1", "W3"] or data["groups"][0]["name"] == "W2"
    assert data["by"] == "weight" and data["groups"][0]["globs"] == ["W2"]


@pytest.mark.parametrize(
    ("pipeline", "args", "message"),
    [
        ("[eliminate-dead-code]", [], "no quantization pass"),
        (
            "[{quantize-weights: {bits: 8}}]",
            ["--pass", "quantize-nothing"],
            "no top-level pass 'quantize-nothing'",
        ),
        (
            "[eliminate-dead-code, {quantize-weights: {bits: 8}}]",
            ["--pass", "eliminate-dead-code"],
            "no include",
        ),
        ("[{quantize-weights: {bits: 8}}]", ["--by", "row"], "--by must be one of"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path: Path, capsys, pipeline: str, args: list[str], message: str) -> None:
    spec = mlp_spec(tmp_path, pipeline)
    result = run_cli(capsys, "sensitivity", spec, *args)
    assert result.code == 2
    assert message in result.err + result.out


def test_sensitivity_after_a_pass_that_dropped_a_layer(tmp_path: Path, fragile_llama) -> None:
    """prune-structured drops layer 0 before the quantization pass: the evaluator feeds the one layer's cache
    (the DecoderSpec read off the pruned graph) and the ranking has that layer only."""
    spec_path = decoder_spec(tmp_path)
    text = spec_path.read_text().replace(
        '  - "fold-constants"\n', '  - "fold-constants"\n  - prune-structured: {drop_layers: [0]}\n'
    )
    spec_path.write_text(text)
    report = analyze(load_spec(spec_path), by="layer")
    assert [g.name for g in report.groups] == ["model.layers.1"]
    assert report.groups[0].value > 0
