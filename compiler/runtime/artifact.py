"""Open an artifact folder: read its manifest and build the Runner its target names."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from llmc.errors import ModelError
from llmc.targets.base import read_manifest

_LOADERS = {
    "cpu": "llmc.targets.cpu.target:load_runner",
    "tpu": "llmc.targets.tpu.target:load_runner",
    "cuda": "llmc.targets.cuda.target:load_runner",
}


def load_artifact(
    artifact_dir: str | Path, *, intra_op_threads: int | None = None
) -> tuple[Any, dict[str, Any]]:
    """(runner, manifest) for an artifact folder written by ``llmc compile``; ``intra_op_threads`` overrides
    the manifest's (several sessions sharing a machine, one per Ray actor, must not each take every core)."""
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise ModelError(f"artifact folder not found: {artifact_dir}")
    manifest = read_manifest(artifact_dir)
    if intra_op_threads is not None:
        manifest = dict(
            manifest, runtime=dict(manifest.get("runtime") or {}, intra_op_threads=intra_op_threads)
        )
    target = manifest.get("target")
    if target not in _LOADERS:
        raise ModelError(f"{artifact_dir}: unknown target '{target}' in manifest.json")
    module_name, _, fn = _LOADERS[target].partition(":")
    return getattr(importlib.import_module(module_name), fn)(artifact_dir, manifest), manifest
