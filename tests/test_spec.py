"""Spec loading: every bad input is a SpecError with file, line and column, and a hint where one helps."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmc.errors import SpecError
from llmc.spec import json_schema, load_spec, parse_spec

GOOD = """\
model:
  source: onnx
  path: model.onnx
pipeline:
  - eliminate-dead-code
targets:
  cpu: {threads: 2}
output:
  dir: out
"""


def _error(text: str, tmp_path: Path) -> SpecError:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value


def test_good_spec_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "spec.yaml"
    path.parent.mkdir()
    path.write_text(GOOD)
    spec = load_spec(path)
    assert spec.resolve(spec.model.path) == path.parent.resolve() / "model.onnx"
    assert spec.target_names() == ["cpu"]
    assert spec.targets.cpu.threads == 2
    assert len(spec.digest()) == 16


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    err = _error("model:\n  source: onnx\n  path: [unclosed\noutput: {dir: x}\n", tmp_path)
    assert "malformed YAML" in err.message
    assert err.location.line is not None and err.location.line >= 3


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    err = _error(GOOD.replace("  dir: out", "  dir: out\n  kep_reference: true"), tmp_path)
    assert "unknown key 'output.kep_reference'" in err.message
    assert (err.location.line, err.location.column) == (10, 3)
    assert err.hint == "did you mean 'keep_reference'?"


def test_wrong_option_type_is_located(tmp_path: Path) -> None:
    err = _error(GOOD.replace("threads: 2", "threads: two"), tmp_path)
    assert "targets.cpu.threads" in err.message
    assert err.location.line == 7


def test_invalid_literal_lists_choices(tmp_path: Path) -> None:
    err = _error(GOOD.replace("source: onnx", "source: tflite"), tmp_path)
    assert "model.source" in err.message and err.location.line == 2
    assert "onnx" in (err.hint or "")


def test_unknown_pass_did_you_mean(tmp_path: Path) -> None:
    err = _error(GOOD.replace("eliminate-dead-code", "eliminate-dead-cod"), tmp_path)
    assert "unknown pass 'eliminate-dead-cod'" in err.message
    assert err.location.line == 5
    assert err.hint == "did you mean 'eliminate-dead-code'?"


def test_bad_pass_option_is_located(tmp_path: Path) -> None:
    from llmc.pass_manager import registered_passes

    registered = registered_passes()
    name = next(n for n, c in registered.items() if c.Options.model_fields)
    text = GOOD.replace("  - eliminate-dead-code", f"  - {name}:\n      no_such_option: 1")
    err = _error(text, tmp_path)
    assert f"invalid options for pass '{name}'" in err.message
    assert err.location.line in (6, 7)


def test_pipeline_entry_shape(tmp_path: Path) -> None:
    err = _error(GOOD.replace("  - eliminate-dead-code", "  - [1, 2]"), tmp_path)
    assert "pipeline entry" in err.message and err.location.line == 5


def test_duplicate_key(tmp_path: Path) -> None:
    err = _error(GOOD + "output:\n  dir: other\n", tmp_path)
    assert "duplicate key 'output'" in err.message and err.location.line == 10


def test_missing_required_section(tmp_path: Path) -> None:
    err = _error("model: {path: m.onnx}\n", tmp_path)
    assert "'output' is required" in err.message


def test_empty_and_non_mapping_specs(tmp_path: Path) -> None:
    assert "empty" in _error("", tmp_path).message
    assert "must be a mapping" in _error("- a\n- b\n", tmp_path).message


def test_no_target(tmp_path: Path) -> None:
    err = _error(GOOD.replace("  cpu: {threads: 2}", "  cpu: null"), tmp_path)
    assert "at least one target" in err.message


def test_unknown_package_path(tmp_path: Path) -> None:
    spec = parse_spec(GOOD.replace("model.onnx", "package://no_such_pkg_xyz/m.onnx"), tmp_path / "s.yaml")
    with pytest.raises(SpecError, match="not installed"):
        spec.resolve(spec.model.path)


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    err = _error("!!python/object/apply:os.system ['true']\n", tmp_path)
    assert "malformed YAML" in err.message or "mapping" in err.message


def test_json_schema_describes_the_spec() -> None:
    schema = json_schema()
    assert schema["title"] == "llmc spec"
    assert {"model", "pipeline", "targets", "verify", "output", "debug"} <= set(schema["properties"])
