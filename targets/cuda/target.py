"""The CUDA target: onnxruntime's CUDA execution provider (TensorRT first when ``tensorrt: true``).

**Legalization** is the CPU target's contrib legalization, which the CUDA provider runs too:
``cpu-fuse-skip-norm`` (residual Add + norm -> ``Skip(Simplified)LayerNormalization``), ``cpu-attention``
(``Attention`` -> ``GroupQueryAttention`` for decoders with a KV cache, ``MultiHeadAttention`` for encoders)
and, where it is registered, ``cpu-matmul-nbits`` (block-quantized weights -> ``MatMulNBits``), reused by name,
with ``packed_rotary`` on by default (GroupQueryAttention reads the packed QKV projection and
rotates q and k itself from cos/sin caches, the layout onnxruntime-genai emits for CUDA); then
``convert-precision`` (float16 by default, ``precision: bf16`` or ``fp32``) and dead-code cleanup. CUDA's GroupQueryAttention kernel exists in float16/bfloat16 only, so ``precision: fp32`` leaves
those nodes to the CPU provider (the manifest says so); MultiHeadAttention and the norms run in all three.

**The artifact** is the CPU target's (``model.onnx``, ``manifest.json``, assets): emit is shared with
:class:`~llmc.targets.cpu.target.CpuTarget`, and the manifest additionally records the providers in order, the
provider options (``device_id``; ``trt_fp16_enable`` for TensorRT; ``enable_cuda_graph``, off by default), the
precision, the op counts and notes (e.g. kernels that fall back to the CPU provider).

**Running it** needs onnxruntime-gpu and a CUDA device. ``can_run()`` says why not (None when it can);
``load_runner`` raises a :class:`~llmc.errors.TargetError` with that reason instead of quietly running on the
CPU provider, and the driver records the compile's golden check as skipped with the same reason.
``llmc.targets.cuda.iobinding`` keeps a decoder's KV cache on the device between steps.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from llmc.errors import TargetError
from llmc.ir import Graph
from llmc.pass_manager import Pipeline, registered_passes
from llmc.runtime.runner import OrtRunner
from llmc.targets.base import EmitContext, read_manifest, write_manifest
from llmc.targets.cpu.target import CpuTarget
from llmc.targets.cuda.options import CudaTargetSpec

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CPU = "CPUExecutionProvider"
CANNOT_RUN = "the cuda artifact was written but cannot run here"
HOW_TO_RUN = (
    "import onnxruntime as ort  # onnxruntime-gpu; "
    "s = ort.InferenceSession('model.onnx', providers=list(zip(manifest['runtime']['providers'], "
    "manifest['runtime']['provider_options']))); outputs = s.run(None, feeds)"
)


def provider_plan(options: CudaTargetSpec) -> tuple[list[str], list[dict[str, str]]]:
    """The providers in priority order and their options (onnxruntime takes option values as strings)."""
    cuda = {
        "device_id": str(options.device_id),
        "enable_cuda_graph": "1" if options.enable_cuda_graph else "0",
    }
    providers, provider_options = [CUDA, CPU], [cuda, {}]
    if options.tensorrt:
        trt = {
            "device_id": str(options.device_id),
            "trt_fp16_enable": "1" if options.precision == "fp16" else "0",
        }
        if options.precision == "bf16":  # only then: older onnxruntime versions reject the option
            trt["trt_bf16_enable"] = "1"
        providers.insert(0, TENSORRT)
        provider_options.insert(0, trt)
    return providers, provider_options


def cuda_unavailable(device_id: int = 0) -> str | None:
    """Why this machine cannot run a cuda artifact (None when it can): no onnxruntime-gpu, or no device."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA not in available:
        return (
            f"onnxruntime-gpu is not installed (onnxruntime {ort.__version__} offers {', '.join(available)})"
        )
    try:
        from onnx import TensorProto, helper

        probe = helper.make_model(
            helper.make_graph(
                [helper.make_node("Identity", ["x"], ["y"])],
                "probe",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
            ),
            opset_imports=[helper.make_opsetid("", 13)],
            ir_version=8,
        )
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(
            probe.SerializeToString(), options, providers=[(CUDA, {"device_id": str(device_id)}), CPU]
        )
        if CUDA not in session.get_providers():
            return f"no CUDA device {device_id} (onnxruntime fell back to {session.get_providers()})"
    except Exception as exc:  # a broken driver or library: a reason to report, not a crash
        return f"no usable CUDA device {device_id} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return None


class CudaTarget(CpuTarget):
    """onnxruntime CUDA/TensorRT: the CPU target's contrib legalization, then float16, and the CPU emit."""

    name = "cuda"

    def __init__(self, options: CudaTargetSpec | None = None) -> None:
        super().__init__(options or CudaTargetSpec())

    def session_options(self) -> dict[str, Any]:
        providers, provider_options = provider_plan(self.options)
        return {
            "providers": providers,
            "provider_options": provider_options,
            "graph_optimization_level": self.options.graph_optimization_level,
        }

    def legalize_pipeline(self) -> Pipeline:
        """Contrib ops (the CPU target's passes, which the CUDA provider runs too), then the precision."""
        steps: list[Any] = []
        if self.options.contrib_ops:
            attention = {"packed_rotary": self.options.packed_rotary}
            steps += ["cpu-fuse-skip-norm", {"cpu-attention": attention}]
            if (
                "cpu-matmul-nbits" in registered_passes()
            ):  # int4/int8 weights -> MatMulNBits (CUDA has it too); CUDA's GatherBlockQuantized takes fp16/bf16
                # scales only and was never run here on a GPU, so a quantized embedding stays in standard form
                steps.append({"cpu-matmul-nbits": {"embedding": False}})
            steps.append("eliminate-dead-code")
        if self.options.precision != "fp32":  # after the cleanup: dead mask math is not converted
            steps.append({"convert-precision": self.options.precision_options()})
        steps.append("eliminate-dead-code")
        return Pipeline.parse(steps)

    def can_run(self) -> str | None:
        """Why the golden check cannot run here (``... cannot run here``), or None when it can."""
        reason = cuda_unavailable(self.options.device_id)
        return f"{reason}: {CANNOT_RUN}" if reason else None

    def verify_tolerances(self):
        """This target's golden-check tolerances when the spec sets them (fp16 needs looser ones), else None."""
        return self.options.tolerances

    def emit(self, graph: Graph, out_dir: Path, ctx: EmitContext) -> dict[str, Any]:
        manifest = super().emit(graph, out_dir, ctx)
        ops = Counter(n.op_type for _g, n in graph.walk())
        notes = []
        if self.options.precision == "fp32" and ops.get("GroupQueryAttention"):
            notes.append(
                "precision fp32: onnxruntime's CUDA GroupQueryAttention kernel is float16/bfloat16 only, "
                "so those nodes run on the CPU provider"
            )
        manifest.update(
            {
                "how_to_run": HOW_TO_RUN,
                "precision": self.options.precision,
                "ops": dict(sorted(ops.items())),
                "notes": notes,
            }
        )
        write_manifest(out_dir, manifest)
        return manifest

    def load(self, artifact_dir: Path) -> OrtRunner:
        return load_runner(artifact_dir)


def load_runner(artifact_dir: Path, manifest: dict[str, Any] | None = None) -> OrtRunner:
    """An OrtRunner on the CUDA (TensorRT) provider; a TargetError naming the reason where none is usable."""
    manifest = manifest or read_manifest(artifact_dir)
    runtime = manifest.get("runtime", {})
    providers = list(runtime.get("providers", [CUDA, CPU]))
    options = list(runtime.get("provider_options", [{} for _ in providers]))
    device_id = int(next((o.get("device_id", 0) for o in options if o.get("device_id") is not None), 0))
    reason = cuda_unavailable(device_id)
    if reason:
        raise TargetError(
            f"{artifact_dir}: {reason}: {CANNOT_RUN}",
            hint="run it on a machine with an NVIDIA GPU and `pip install onnxruntime-gpu`, "
            "or compile the spec for the cpu target",
        )
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [(p, o) for p, o in zip(providers, options, strict=False) if p in available]
    return OrtRunner(
        Path(artifact_dir) / manifest.get("model", "model.onnx"),
        providers=chosen,
        graph_optimization_level=runtime.get("graph_optimization_level", "all"),
    )
