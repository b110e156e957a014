"""The PyTorch frontend: factories, input specs with dynamic axes, both exporters, and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fixtures_frontends import modules

from llmc.errors import ModelError
from llmc.frontends import export
from llmc.frontends.torch_module import import_torch, parse_input_specs

FACTORIES = Path(modules.__file__)
X_SPEC = [{"name": "x", "shape": ["batch", 16], "dtype": "float32"}]


def factory(name: str) -> str:
    return f"{FACTORIES}:{name}"


def run_onnx(path: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("exporters", [("dynamo",), ("torchscript",)])
def test_mlp_exports_with_a_dynamic_batch(tmp_path, exporters):
    imported = import_torch(factory("mlp"), input_specs=X_SPEC, work_dir=tmp_path, exporters=exporters)
    assert imported.source == "torch" and imported.task == "generic"
    assert imported.info["exporter"] == exporters[0] and imported.info["opset"] >= 18
    assert imported.graph.inputs == ["x"] and imported.graph.outputs == ["output"]
    assert {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"} <= set(imported.graph.initializers)
    sess = ort.InferenceSession(imported.info["onnx_path"], providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == ["batch", 16]
    model = modules.mlp()
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 16)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, atol=1e-5)


def test_dynamo_failure_falls_back_to_torchscript(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo cannot trace this\nmore detail")

    monkeypatch.setattr(export, "_export_dynamo", broken)
    imported = import_torch(factory("mlp"), input_specs=X_SPEC, work_dir=tmp_path)
    assert imported.info["exporter"] == "torchscript"
    assert imported.info["export_notes"] == ["dynamo exporter failed: RuntimeError: dynamo cannot trace this"]


def test_example_inputs_from_the_factory(tmp_path):
    imported = import_torch(factory("mlp_with_inputs"), input_specs=None, work_dir=tmp_path)
    assert imported.graph.inputs == ["x"]  # named after forward's argument
    sess = ort.InferenceSession(imported.info["onnx_path"], providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [3, 16]  # no specs: static shapes


def test_two_inputs_and_dict_outputs(tmp_path):
    specs = [{"name": "x", "shape": ["batch", 8]}, {"name": "scale", "shape": [1]}]
    imported = import_torch(factory("two_heads"), input_specs=specs, work_dir=tmp_path)
    assert imported.graph.inputs == ["x", "scale"] and imported.graph.outputs == ["y", "norm"]
    x = np.ones((4, 8), np.float32)
    scale = np.array([2.0], np.float32)
    y, norm = run_onnx(imported.info["onnx_path"], {"x": x, "scale": scale})
    with torch.no_grad():
        want = modules.two_heads()(torch.from_numpy(x), torch.from_numpy(scale))
    np.testing.assert_allclose(y, want["y"].numpy(), atol=1e-5)
    np.testing.assert_allclose(norm, want["norm"].numpy(), atol=1e-5)


def test_module_path_factories_work_too(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(FACTORIES.parent.parent))
    imported = import_torch("fixtures_frontends.modules:mlp", input_specs=X_SPEC, work_dir=tmp_path)
    assert imported.info["module"] == "MLP"


@pytest.mark.parametrize(
    ("fac", "specs", "message"),
    [
        ("no_colon_here", X_SPEC, "must look like"),
        ("no.such.module:make", X_SPEC, "cannot import"),
        (factory("missing"), X_SPEC, "no callable 'missing'"),
        (factory("not_a_module"), X_SPEC, "returned int"),
        (factory("broken"), X_SPEC, "factory exploded"),
        (factory("mlp"), None, "no example inputs"),
        (factory("mlp"), [{"name": "x", "shape": ["batch", 16], "dtype": "complex1"}], "unknown dtype"),
        (factory("mlp"), [{"shape": [1]}], "needs 'name' and 'shape'"),
        (factory("mlp"), [{"name": "x", "shape": ["batch", 7]}], "fails on its example inputs"),
        ("/nowhere/file.py:make", X_SPEC, "not found"),
    ],
)
def test_bad_factories_are_model_errors(tmp_path, fac, specs, message):
    with pytest.raises(ModelError, match=message):
        import_torch(fac, input_specs=specs, work_dir=tmp_path)


def test_export_failure_is_a_model_error_with_the_workaround(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(export, "_export_dynamo", broken)
    monkeypatch.setattr(export, "_export_torchscript", broken)
    with pytest.raises(ModelError, match="unsupported op") as info:
        import_torch(factory("mlp"), input_specs=X_SPEC, work_dir=tmp_path)
    assert "source: onnx" in str(info.value)


def test_parse_input_specs_defaults_and_duplicates():
    (spec,) = parse_input_specs([{"name": "x", "shape": ["b", 3]}])
    assert spec.dtype == "float32" and spec.dynamic_axes == {0: "b"}
    with pytest.raises(ModelError, match="twice"):
        parse_input_specs([{"name": "x", "shape": [1]}, {"name": "x", "shape": [2]}])
