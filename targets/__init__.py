"""Targets: each lowers the target-independent IR into an artifact folder its runtime runs.

A target has a legalization pipeline (more passes), ``emit(graph, out, ctx) -> manifest`` and
``load(artifact_dir) -> Runner``. ``get_target(name)`` finds one by the key the spec uses under ``targets:``.
"""

from __future__ import annotations

import importlib

from llmc.errors import TargetError

_TARGETS = {
    "cpu": "llmc.targets.cpu.target:CpuTarget",
    "tpu": "llmc.targets.tpu.target:TpuTarget",
    "cuda": "llmc.targets.cuda.target:CudaTarget",
}


def get_target(name: str, options=None):
    if name not in _TARGETS:
        raise TargetError(f"unknown target '{name}' (known: {', '.join(_TARGETS)})")
    module_name, _, cls_name = _TARGETS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(options)


def target_names() -> list[str]:
    return list(_TARGETS)
