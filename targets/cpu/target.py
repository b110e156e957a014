"""The CPU target: onnxruntime's CPU execution provider.

The artifact is ``model.onnx`` (+ ``model.onnx.data`` when large), ``manifest.json`` and the assets a runner
needs (tokenizer files); it runs with plain onnxruntime. The manifest records the host's CPU flags, since
the best int8/int4 kernels depend on them (VNNI, AVX-512). Legalization rewrites the standard fused ops (Attention, RMSNormalization/LayerNormalization after a residual Add) into
onnxruntime's ``com.microsoft`` contrib kernels (``contrib_ops: false`` keeps standard ONNX).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from llmc.ir import Graph, onnx_dtype_to_np, save_model
from llmc.pass_manager import Pipeline
from llmc.runtime.runner import OrtRunner
from llmc.spec import CpuTargetSpec
from llmc.targets.base import EmitContext, Target, platform_info, read_manifest, versions, write_manifest
from llmc.targets.cpu.stages import emit_stages, is_partitioned

HOW_TO_RUN = (
    "import onnxruntime as ort; s = ort.InferenceSession('model.onnx', providers=['CPUExecutionProvider']); "
    "outputs = s.run(None, feeds)"
)


def signature(graph: Graph, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        info = graph.value_info(name)
        dtype = str(onnx_dtype_to_np(info.dtype)) if info and info.dtype else "unknown"
        shape = None if info is None or info.shape is None else list(info.shape)
        rows.append({"name": name, "dtype": dtype, "shape": shape})
    return rows


class CpuTarget(Target):
    name = "cpu"

    def __init__(self, options: CpuTargetSpec | None = None) -> None:
        super().__init__(options or CpuTargetSpec())

    def session_options(self) -> dict[str, Any]:
        return {
            "providers": ["CPUExecutionProvider"],
            "intra_op_threads": self.options.threads,
            "graph_optimization_level": self.options.graph_optimization_level,
        }

    def legalize_pipeline(self) -> Pipeline:
        """Standard ops into the contrib kernels onnxruntime's CPU provider runs fastest (when enabled)."""
        if not self.options.contrib_ops:
            return Pipeline([])
        return Pipeline.parse(
            [
                "cpu-fuse-skip-norm",
                "cpu-attention",
                "cpu-matmul-nbits",
                "cpu-dynamic-quantize-matmul",
                "eliminate-dead-code",
            ]
        )

    def emit(self, graph: Graph, out_dir: Path, ctx: EmitContext) -> dict[str, Any]:
        out_dir.mkdir(parents=True, exist_ok=True)
        _unique_node_names(graph)
        files = save_model(graph, out_dir / "model.onnx", external_data=self.options.external_data)
        stages = (  # partition-pipeline ran: one model per stage beside the whole one
            emit_stages(graph, out_dir, external_data=self.options.external_data)
            if is_partitioned(graph)
            else None
        )
        assets = {}
        if ctx.assets:
            (out_dir / "assets").mkdir(exist_ok=True)
            for name, src in sorted(ctx.assets.items()):
                shutil.copy2(src, out_dir / "assets" / name)
                assets[name] = f"assets/{name}"
        manifest: dict[str, Any] = {
            "format": 1,
            "target": self.name,
            "model": "model.onnx",
            "files": {p.name: p.stat().st_size for p in files},
            "inputs": signature(graph, graph.inputs),
            "outputs": signature(graph, graph.outputs),
            "runtime": {"name": "onnxruntime", **self.session_options()},
            "how_to_run": HOW_TO_RUN,
            "task": ctx.task,
            "decoder": ctx.decoder,
            "assets": assets,
            "source": ctx.source,
            "spec": {"name": ctx.spec_name, "digest": ctx.spec_digest},
            "pipeline": {"text": ctx.pipeline_text, "passes": ctx.pipeline_report},
            "versions": versions(),
            "platform": platform_info(),
            "opsets": dict(sorted(graph.opset_imports.items())),
        }
        if stages is not None:
            manifest["pipeline_stages"] = stages
            manifest["files"].update(
                {n: size for row in stages["stages"] for n, size in row["files"].items()}
            )
        write_manifest(out_dir, manifest)
        return manifest

    def load(self, artifact_dir: Path) -> OrtRunner:
        return load_runner(artifact_dir)


def _unique_node_names(graph: Graph) -> None:
    """onnxruntime refuses repeated node names, which ONNX allows: number the repeats."""
    seen: set[str] = set()
    for _g, node in graph.walk():
        if node.name and node.name in seen:
            k = 1
            while f"{node.name}_{k}" in seen:
                k += 1
            node.name = f"{node.name}_{k}"
        if node.name:
            seen.add(node.name)


def load_runner(
    artifact_dir: Path, manifest: dict[str, Any] | None = None, *, ray_address: str | None = None
):
    """The artifact's runner: one onnxruntime session, or its pipeline stages (in process, or on Ray actors
    when ``ray_address`` is given: "local" starts a local Ray runtime)."""
    manifest = manifest or read_manifest(artifact_dir)
    if manifest.get("pipeline_stages"):
        from llmc.distributed.pipeline import load_pipeline_runner

        if ray_address is None:
            return load_pipeline_runner(artifact_dir, manifest, use_ray=False)
        address = None if ray_address == "local" else ray_address
        return load_pipeline_runner(artifact_dir, manifest, ray_address=address, use_ray=True)
    runtime = manifest.get("runtime", {})
    return OrtRunner(
        Path(artifact_dir) / manifest.get("model", "model.onnx"),
        providers=runtime.get("providers", ["CPUExecutionProvider"]),
        intra_op_threads=runtime.get("intra_op_threads"),
        graph_optimization_level=runtime.get("graph_optimization_level", "all"),
    )
