"""The ONNX frontend: an .onnx file (external data included) read straight into the IR."""

from __future__ import annotations

from pathlib import Path

from llmc.frontends.base import ImportedModel
from llmc.ir import load_model, verify_structure


def import_onnx(path: Path, *, task: str = "generic") -> ImportedModel:
    graph = load_model(path)
    verify_structure(graph)  # a cycle or an undefined input is the model's fault: say so before any pass runs
    return ImportedModel(graph=graph, task=task, source="onnx", info={"path": str(path)})
