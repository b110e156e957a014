"""What all targets share: the emit context, the manifest, and writing an artifact folder."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.ir import Graph
from llmc.pass_manager import Pipeline


@dataclass
class EmitContext:
    """What a target's emit needs besides the graph: where the plan came from and what it did."""

    spec_digest: str = ""
    spec_name: str = ""
    task: str = "generic"
    source: dict[str, Any] = field(default_factory=dict)
    decoder: dict[str, Any] | None = None
    assets: dict[str, Path] = field(default_factory=dict)
    pipeline_text: str = ""
    pipeline_report: list[dict[str, Any]] = field(default_factory=list)


class Target:
    """Base class: ``name``, ``legalize_pipeline``, ``emit``, ``load``."""

    name = ""

    def __init__(self, options=None) -> None:
        self.options = options

    def legalize_pipeline(self) -> Pipeline:
        return Pipeline([])

    def emit(self, graph: Graph, out_dir: Path, ctx: EmitContext) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def load(self, artifact_dir: Path):  # pragma: no cover
        raise NotImplementedError


def versions() -> dict[str, str]:
    import numpy
    import onnx

    import llmc

    found = {"llmc": llmc.__version__, "onnx": onnx.__version__, "numpy": numpy.__version__}
    try:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    found["python"] = platform.python_version()
    return found


def cpu_flags() -> list[str]:
    """The instruction-set extensions that matter for int8/bf16 kernel choice (from /proc/cpuinfo)."""
    interesting = (
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "avx_vnni",
        "amx",
    )
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return [platform.machine()]
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return sorted(f for f in flags if f.startswith(interesting))


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_manifest(artifact_dir: Path) -> dict[str, Any]:
    from llmc.errors import ModelError

    path = Path(artifact_dir) / "manifest.json"
    if not path.exists():
        raise ModelError(f"{artifact_dir} is not an llmc artifact (no manifest.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: manifest is not valid JSON ({exc})") from exc


def platform_info() -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_flags": cpu_flags(),
        "python": sys.version.split()[0],
    }
