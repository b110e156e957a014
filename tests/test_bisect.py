"""``llmc bisect``: the binary searches, the breaking pass of an MLP pipeline, a quantization exclusion that
really compiles, a tiny decoder, and the CLI's exit codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from bisect_passes import fragile_decoder, mlp_model
from clitools import run_cli

from llmc.bisect import first_failure, run_bisect, smallest_passing
from llmc.spec import load_spec

VERIFY = (
    "verify:\n  dims: {batch: 4}\n  samples: 2\n  tolerances: {max_abs: 0.5, max_rel: 1.0, cosine: 0.999}\n"
)


def mlp_spec(tmp_path: Path, pipeline: str, fragile: str | None = "W2", name: str = "spec.yaml") -> Path:
    if not (tmp_path / "model.onnx").exists():
        mlp_model(tmp_path / "model.onnx", fragile)
    spec = tmp_path / name
    spec.write_text(
        f"model: {{path: model.onnx}}\npipeline: {pipeline}\ntargets:\n  cpu: {{}}\n{VERIFY}output:\n  dir: out\n"
    )
    return spec


# -- the searches -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 2, 3, 7, 8, 30])
def test_first_failure_finds_the_first_failing_prefix_in_log_checks(count: int) -> None:
    for first in range(count):
        asked: list[int] = []

        def passes(i: int, first: int = first, asked: list[int] = asked) -> bool:
            asked.append(i)
            return i < first

        assert first_failure(count, passes) == first
        assert len(asked) <= 1 + math.ceil(math.log2(count))
    assert first_failure(count, lambda i: True) is None


@pytest.mark.parametrize("count", [1, 2, 5, 37])
def test_smallest_passing_finds_the_smallest_k(count: int) -> None:
    for k in range(1, count + 1):
        asked: list[int] = []

        def passes(i: int, k: int = k, asked: list[int] = asked) -> bool:
            asked.append(i)
            return i >= k

        assert smallest_passing(count, passes) == k
        assert len(asked) <= 1 + math.ceil(math.log2(count))
    assert smallest_passing(count, lambda i: False) is None
    assert first_failure(0, lambda i: True) is None and smallest_passing(0, lambda i: True) is None


# -- MLP pipelines ----------------------------------------------------------------------------------------
def test_bisect_names_the_breaking_pass(tmp_path: Path, capsys) -> None:
    pipeline = (
        "[bisect_passes:RenameNodes, bisect_passes:NegateWeight, {bisect_passes:RenameNodes: {prefix: s/}}, "
        "eliminate-dead-code]"
    )
    result = run_cli(
        capsys, "bisect", mlp_spec(tmp_path, pipeline, fragile=None), "--json", tmp_path / "b.json"
    )
    assert result.code == 0, result.err
    assert "first fails after pass #2 negate-weight" in result.out
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["culprit_number"] == 2 and data["culprit_stage"] == "pipeline" and data["exclude"] is None
    checks = data["checks"]
    # 3 passes changed the graph (eliminate-dead-code did not): the last prefix, then a binary search
    assert [c["passed"] for c in checks] == [False, True, False]
    assert checks[0]["label"] == "after #3 rename-nodes" and checks[1]["label"] == "after #1 rename-nodes"


def test_bisect_finds_the_quantization_exclusion_that_compiles(tmp_path: Path, capsys) -> None:
    pipeline = "[bisect_passes:RenameNodes, {quantize-weights: {bits: 8}}, eliminate-dead-code]"
    spec = mlp_spec(tmp_path, pipeline)
    failing = run_cli(capsys, "compile", spec, "--out", tmp_path / "failing")
    assert failing.code == 1  # the premise: the golden check of this spec fails

    report = run_bisect(load_spec(spec), by="weight")
    assert report.culprit is not None and report.culprit.startswith("quantize-weights")
    assert report.culprit_number == 2
    assert report.sensitivity is not None and report.sensitivity.groups[0].name == "W2"
    assert report.exclude == ["W2"] and report.excluded_groups == ["W2"]
    assert report.checks[-1].stage == "exclude" and report.checks[-1].passed

    fixed = mlp_spec(tmp_path, pipeline.replace("bits: 8", "bits: 8, exclude: [W2]"), name="fixed.yaml")
    result = run_cli(capsys, "compile", fixed, "--out", tmp_path / "fixed")
    assert result.code == 0, result.err


def test_cli_prints_checks_and_the_exclude_line(tmp_path: Path, capsys) -> None:
    spec = mlp_spec(tmp_path, "[{quantize-weights: {bits: 8}}]")
    result = run_cli(capsys, "bisect", spec, "--by", "weight")
    assert result.code == 0, result.err
    assert "golden checks" in result.out and "FAIL" in result.out
    assert "add to quantize-weights (pipeline step 1):" in result.out
    assert 'exclude: ["W2"]' in result.out


def test_a_passing_pipeline_exits_1_after_checking_the_legalized_graph(tmp_path: Path, capsys) -> None:
    spec = mlp_spec(tmp_path, "[bisect_passes:RenameNodes, {quantize-weights: {bits: 4}}]", fragile=None)
    spec.write_text(spec.read_text().replace("cosine: 0.999", "cosine: 0.95"))
    result = run_cli(capsys, "bisect", spec, "--json", tmp_path / "b.json")
    assert result.code == 1, result.out + result.err
    assert (
        "no failing pass found: the whole pipeline passes the golden check, legalized for the cpu"
        in result.err
    )
    labels = [c["label"] for c in json.loads((tmp_path / "b.json").read_text())["checks"]]
    assert labels[0] == "after #2 quantize-weights"
    assert labels[-1].startswith("legalized: after ")  # MatMulNBits and the rest, run in onnxruntime


def test_bad_input_exits_2(tmp_path: Path, capsys) -> None:
    result = run_cli(capsys, "bisect", tmp_path / "missing.yaml")
    assert result.code == 2 and "spec file not found" in result.err
    spec = mlp_spec(tmp_path, "[{quantize-weights: {bits: 8}}]")
    result = run_cli(capsys, "bisect", spec, "--by", "row")
    assert result.code == 2 and "--by must be one of" in result.err


# -- a tiny decoder ---------------------------------------------------------------------------------------
def test_bisect_on_a_decoder_excludes_the_fragile_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fixtures_frontends.tiny import tiny_folder, tiny_import

    import llmc.driver
    from llmc.driver import compile_spec

    base = tiny_import("llama")
    monkeypatch.setattr(llmc.driver, "import_for_spec", lambda spec, work_dir: fragile_decoder(base))
    text = (
        f"model: {{source: hf, path: {tiny_folder('llama')}, task: text-generation}}\n"
        "pipeline:\n  - upgrade-opset: {version: 24}\n  - fold-weight-transposes\n  - fuse-rms-norm\n"
        "  - quantize-weights: {bits: 8}\n  - eliminate-dead-code\n"
        "verify:\n  prompts: [w5 w17 w33 w8, w40 w41 w42]\n  new_tokens: 8\n"
        "  tolerances: {max_abs: 2.0, max_rel: 100, cosine: 0.99}\n  min_token_agreement: 0.85\n"
        "calibration: {prompts: [" + " ".join(f"w{(7 * i) % 90 + 3}" for i in range(20)) + "]}\n"
        "output:\n  dir: out\n"
    )
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(text)
    report = run_bisect(load_spec(spec_path))
    assert report.culprit_number == 4 and report.culprit.startswith("quantize-weights")
    assert report.exclude is not None and report.exclude[0] == "model.layers.1.*"
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(text.replace("{bits: 8}", "{bits: 8, exclude: " + json.dumps(report.exclude) + "}"))
    result = compile_spec(load_spec(fixed), out=tmp_path / "artifact")
    assert result.targets[0].golden is not None and result.targets[0].golden.passed
