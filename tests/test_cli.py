"""End-to-end CLI behaviour: compile/run/inspect/passes/schema, exit codes, and that bad input loses nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from clitools import run_cli
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]


def tiny_model(path: Path) -> Path:
    """y = Relu(Identity(x) @ W + b), with a dead branch and a duplicate subexpression."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    nodes = [
        helper.make_node("Identity", ["x"], ["xi"]),
        helper.make_node("MatMul", ["xi", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["y"]),
        helper.make_node("Neg", ["x"], ["dead"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def write_spec(tmp_path: Path, pipeline: str = "[]", model: str = "model.onnx", extra: str = "") -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model:\n  path: {model}\npipeline: {pipeline}\ntargets:\n  cpu: {{}}\n"
        f"verify:\n  dims: {{batch: 3}}\noutput:\n  dir: out\n{extra}"
    )
    return spec


@pytest.fixture
def project(tmp_path: Path) -> Path:
    tiny_model(tmp_path / "model.onnx")
    return tmp_path


def test_compile_writes_a_verified_artifact(project: Path, capsys) -> None:
    spec = write_spec(project, "[remove-identity, eliminate-dead-code]")
    result = run_cli(capsys, "compile", spec)
    assert result.code == 0, result.err
    out = project / "out"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "report.md"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "cpu"
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}]
    assert manifest["outputs"][0]["name"] == "y"
    assert manifest["runtime"]["providers"] == ["CPUExecutionProvider"]
    passes = manifest["pipeline"]["passes"]
    assert [p["name"] for p in passes] == [
        "remove-identity",
        "eliminate-dead-code",
        "cpu-fuse-skip-norm",  # the CPU target's legalization follows the spec's pipeline
        "cpu-attention",
        "cpu-matmul-nbits",
        "cpu-dynamic-quantize-matmul",
        "eliminate-dead-code",
    ]
    assert passes[0]["changed"] and passes[1]["changed"] and not passes[2]["changed"]
    assert "onnxruntime" in manifest["versions"] and "cpu_flags" in manifest["platform"]
    ops = [n.op_type for n in onnx.load(out / "model.onnx").graph.node]
    assert ops == ["MatMul", "Add", "Relu"]
    assert "verified cpu" in result.out
    report = (out / "report.md").read_text()
    assert "| remove-identity |" in report and "| y |" in report


def test_artifact_runs_with_plain_onnxruntime(project: Path, capsys) -> None:
    import onnxruntime as ort

    assert run_cli(capsys, "compile", write_spec(project, "[remove-identity]")).code == 0
    session = ort.InferenceSession(str(project / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.ones((2, 8), np.float32)
    reference = ort.InferenceSession(str(project / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], reference.run(None, {"x": x})[0], rtol=1e-6)


def test_compile_is_deterministic(project: Path, capsys) -> None:
    spec = write_spec(project, "[remove-identity, eliminate-dead-code]")
    assert run_cli(capsys, "compile", spec).code == 0
    first = {p.name: p.read_bytes() for p in (project / "out").iterdir() if p.name != "report.md"}
    assert run_cli(capsys, "compile", spec, "--force").code == 0
    second = {p.name: p.read_bytes() for p in (project / "out").iterdir() if p.name != "report.md"}
    assert first == second


def test_existing_output_is_never_overwritten(project: Path, capsys) -> None:
    spec = write_spec(project)
    (project / "out").mkdir()
    (project / "out" / "precious.txt").write_text("keep me")
    result = run_cli(capsys, "compile", spec)
    assert result.code == 2
    assert "already exists" in result.err and "spec.yaml:9" in result.err and "--force" in result.err
    assert (project / "out" / "precious.txt").read_text() == "keep me"
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "model path not found"),
        (b"this is not an onnx model at all", "not a readable ONNX model"),
        ("truncate", "not a readable ONNX model"),
    ],
)
def test_bad_model_files(project: Path, capsys, content, message) -> None:
    model = project / "model.onnx"
    if content is None:
        model.unlink()
    elif content == "truncate":
        model.write_bytes(model.read_bytes()[:100])
    else:
        model.write_bytes(content)
    result = run_cli(capsys, "compile", write_spec(project))
    assert result.code == 2
    assert message in result.err
    assert "Traceback" not in result.err
    assert not (project / "out").exists()
    assert not [p for p in project.iterdir() if "staging" in p.name]


def _broken_model(path: Path, kind: str) -> None:
    if kind == "cycle":
        nodes = [
            helper.make_node("Relu", ["b"], ["a"]),
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("Add", ["x", "a"], ["y"]),
        ]
    else:
        nodes = [helper.make_node("Add", ["x", "ghost"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize(
    ("kind", "message"), [("cycle", "has a cycle"), ("undefined", "'ghost' is not defined")]
)
def test_structurally_broken_models(project: Path, capsys, kind: str, message: str) -> None:
    _broken_model(project / "model.onnx", kind)
    result = run_cli(capsys, "compile", write_spec(project))
    assert result.code == 2
    assert message in result.err
    assert not (project / "out").exists()


def test_custom_pass_from_module_runs(project: Path, capsys) -> None:
    spec = write_spec(project, "[{'custom_passes:TagNodes': {tag: hello}}]")
    result = run_cli(capsys, "compile", spec)
    assert result.code == 0, result.err
    docs = {n.doc_string for n in onnx.load(project / "out" / "model.onnx").graph.node}
    assert docs == {"hello"}
    manifest = json.loads((project / "out" / "manifest.json").read_text())
    assert manifest["pipeline"]["passes"][0]["stats"] == {"tagged": 5}


def test_custom_pass_that_raises_is_named_and_dumps_are_kept(project: Path, capsys) -> None:
    dumps = project / "dumps"
    result = run_cli(
        capsys,
        "compile",
        write_spec(project, "[remove-identity, 'custom_passes:Explode']"),
        "--dump-ir",
        dumps,
    )
    assert result.code == 2
    assert "pass 'explode'" in result.err and "RuntimeError: boom" in result.err
    assert (dumps / "000-input.onnxtxt").exists()
    assert (dumps / "001-remove-identity.after.onnxtxt").exists()
    assert (dumps / "002-explode.error.txt").exists()
    assert not (project / "out").exists()


def test_custom_pass_that_breaks_the_graph_is_caught_by_the_verifier(project: Path, capsys) -> None:
    result = run_cli(capsys, "compile", write_spec(project, "['custom_passes:BreakGraph']"))
    assert result.code == 2
    assert "pass 'break-graph'" in result.err and "no_such_value" in result.err
    assert "IR dumps kept" in result.err
    kept = [Path(p.strip()) for p in result.err.split("IR dumps kept:")[1].split("\n")[0].split(",")]
    assert any(p.name.endswith(".before.onnxtxt") and p.exists() for p in kept)


def test_pass_that_lies_about_changes_is_reported(project: Path, capsys) -> None:
    result = run_cli(capsys, "compile", write_spec(project, "['custom_passes:Liar']"))
    assert result.code == 2
    assert "reported 'unchanged'" in result.err


def test_verification_failure_exits_1_with_a_table(project: Path, capsys) -> None:
    result = run_cli(capsys, "compile", write_spec(project, "['custom_passes:PerturbWeights']"))
    assert result.code == 1
    assert "| y |" in result.err and "FAIL" in result.err
    assert not (project / "out").exists()


def test_dump_ir_writes_numbered_files_with_summary_and_diff(project: Path, capsys) -> None:
    dumps = project / "dumps"
    spec = write_spec(project, "[remove-identity, eliminate-dead-code]")
    assert run_cli(capsys, "compile", spec, "--dump-ir", dumps, "--dump-mode", "after-each").code == 0
    names = sorted(p.name for p in dumps.iterdir())
    assert "000-input.onnxtxt" in names
    assert "001-remove-identity.after.onnxtxt" in names and "002-eliminate-dead-code.after.diff" in names
    summary = (dumps / "001-remove-identity.after.summary.txt").read_text()
    assert "-1 Identity" in summary
    diff = (dumps / "002-eliminate-dead-code.after.diff").read_text()
    assert "-   dead = Neg (x)" in diff


def test_run_inspect_passes_schema(project: Path, capsys, tmp_path: Path) -> None:
    assert run_cli(capsys, "compile", write_spec(project, "[remove-identity]")).code == 0
    artifact = project / "out"
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.ones((2, 8), np.float32))
    outputs = tmp_path / "outputs.npz"
    result = run_cli(capsys, "run", artifact, "--inputs", inputs, "--out", outputs)
    assert result.code == 0, result.err
    assert np.load(outputs)["y"].shape == (2, 4)
    assert run_cli(capsys, "run", artifact, "--inputs", inputs, "--out", outputs).code == 2  # never overwrite

    text = run_cli(capsys, "inspect", artifact)
    assert text.code == 0 and "MatMul" in text.out and "y = Relu" in text.out
    info = json.loads(run_cli(capsys, "inspect", artifact / "model.onnx", "--format", "json").out)
    assert info["ops"] == {"MatMul": 1, "Add": 1, "Relu": 1}  # the dead Neg went with legalization's cleanup
    assert info["params"] == 36
    dot = run_cli(capsys, "inspect", artifact, "--format", "dot").out
    assert dot.startswith("digraph llmc {") and "-> " in dot

    listing = run_cli(capsys, "passes").out
    for name in (
        "fold-constants",
        "eliminate-dead-code",
        "eliminate-common-subexpressions",
        "remove-identity",
    ):
        assert name in listing
    schema = json.loads(run_cli(capsys, "schema").out)
    assert "model" in schema["properties"]


def test_cli_user_errors_have_no_traceback(tmp_path: Path, capsys) -> None:
    missing = run_cli(capsys, "compile", tmp_path / "nope.yaml")
    assert missing.code == 2 and "spec file not found" in missing.err
    not_artifact = run_cli(capsys, "run", tmp_path)
    assert not_artifact.code == 2 and "not an llmc artifact" in not_artifact.err
    assert "Traceback" not in missing.err + not_artifact.err
