"""The cuda target: legalization (contrib ops + float16), the artifact, the runner's refusal without a GPU, the
device KV cache (IOBinding) and a multi-target compile whose cuda check is recorded as skipped.

This machine has no GPU: the float16-legalized graphs run on onnxruntime's CPU provider instead (it has
float16 GroupQueryAttention, SkipSimplifiedLayerNormalization, SkipLayerNormalization and RotaryEmbedding
kernels, and runs MatMul/Add/MultiHeadAttention through float32 Casts it inserts itself), which checks the
graph and its numbers, not the CUDA kernels. On a machine with onnxruntime-gpu and a device, the tests that
expect the refusal check that the artifact runs instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_convert_precision import FP16_REL_TOL, _rel_err, _run, decoder_feeds, tiny_fused, tiny_import

from llmc.errors import TargetError
from llmc.ir import Graph, clone, onnx_dtype_to_np, verify
from llmc.pass_manager import PassContext, PassManager
from llmc.runtime.generator import Generator
from llmc.runtime.runner import OrtRunner
from llmc.spec import load_spec
from llmc.targets import get_target
from llmc.targets.base import EmitContext
from llmc.targets.cuda.iobinding import DeviceGenerator, IOBindingRunner
from llmc.targets.cuda.options import CudaTargetSpec
from llmc.targets.cuda.target import CANNOT_RUN, CudaTarget, cuda_unavailable, load_runner

REPO = Path(__file__).resolve().parents[1]
MS = "com.microsoft"
NO_GPU = cuda_unavailable() is not None


def _legalize(graph: Graph, **options):
    target = CudaTarget(CudaTargetSpec(**options))
    return PassManager(target.legalize_pipeline(), ctx=PassContext(target="cuda")).run(graph)


def _ops(graph: Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes():
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def _weight_dtypes(graph: Graph, op: str, slot: int) -> set[np.dtype]:
    return {
        graph.initializers[n.inputs[slot]].dtype
        for n in graph.find(op)
        if n.inputs[slot] in graph.initializers
    }


# -- legalization ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_fp16() -> Graph:
    graph = tiny_fused("llama")
    _legalize(graph)
    return graph


def test_llama_legalizes_into_float16_contrib_ops(llama_fp16: Graph) -> None:
    graph = llama_fp16
    verify(graph)  # onnx.checker and strict shape inference
    ops = _ops(graph)
    assert ops[f"{MS}.GroupQueryAttention"] == 2
    assert ops[f"{MS}.SkipSimplifiedLayerNormalization"] == 4
    assert "Attention" not in ops and "RMSNormalization" in ops  # the first norm has no residual Add
    assert "RotaryEmbedding" not in ops  # packed_rotary: inside GroupQueryAttention, from cos/sin caches
    assert _weight_dtypes(graph, "MatMul", 1) == {np.dtype(np.float16)}
    assert _weight_dtypes(graph, "Gather", 0) == {np.dtype(np.float16)}  # the embedding
    for gqa in graph.find("GroupQueryAttention", MS):
        assert gqa.attr("do_rotary") == 1 and gqa.input(1) == ""  # packed QKV
        packed, past_k, past_v, cos, sin = (gqa.input(i) for i in (0, 3, 4, 7, 8))
        assert {graph.dtype(v) for v in (packed, past_k, past_v)} == {10}  # float16
        assert graph.initializers[cos].dtype == graph.initializers[sin].dtype == np.float16
    assert graph.dtype("logits") == 1 and graph.dtype("present.0.key") == 10
    assert graph.dtype("past_key_values.0.key") == 10
    # the one Cast convert-precision added: the float16 logits back to the float32 interface
    inserted = [n for n in graph.find("Cast") if n.metadata.get("llmc.rule") == "convert-precision"]
    assert [onnx_dtype_to_np(n.attr("to")).name for n in inserted] == ["float32"]


def test_llama_float16_runs_on_the_cpu_provider_within_tolerance(llama_fp16: Graph) -> None:
    reference = tiny_fused("llama")
    # prefill of a batch, decode of a batch, a chunk after a cache (GroupQueryAttention: batch 1 only)
    for batch, seq, past in ((2, 5, 0), (2, 1, 6), (1, 4, 3)):
        feeds = decoder_feeds(batch, seq, past)
        got, want = _run(llama_fp16, feeds), _run(reference, feeds)
        assert got["logits"].dtype == np.float32 and got["present.1.value"].dtype == np.float16
        for name, value in want.items():
            assert _rel_err(got[name], value) < FP16_REL_TOL, (name, batch, seq, past)


def test_precision_fp32_legalizes_without_converting() -> None:
    reference = tiny_fused("llama")
    graph = clone(reference)
    report = _legalize(graph, precision="fp32", packed_rotary=False)
    assert "convert-precision" not in [r.name for r in report.records]
    assert len(graph.find("GroupQueryAttention", MS)) == 2 and len(graph.find("RotaryEmbedding")) == 4
    assert {a.dtype for a in graph.initializers.values() if a.dtype.kind == "f"} == {np.dtype(np.float32)}
    for batch, seq, past in ((2, 5, 0), (1, 4, 3)):
        feeds = decoder_feeds(batch, seq, past)
        got, want = _run(graph, feeds), _run(reference, feeds)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=2e-5, rtol=1e-4, err_msg=name)


def test_bert_legalizes_into_float16_multi_head_attention() -> None:
    reference = tiny_fused("bert")
    graph = clone(reference)
    _legalize(graph)
    verify(graph)
    ops = _ops(graph)
    assert ops[f"{MS}.MultiHeadAttention"] == 2 and ops[f"{MS}.SkipLayerNormalization"] == 4
    assert _weight_dtypes(graph, "MatMul", 1) == {np.dtype(np.float16)}
    [mha] = graph.find("MultiHeadAttention", MS)[:1]
    assert graph.dtype(mha.outputs[0]) == 10
    assert graph.dtype("last_hidden_state") == 1
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 128, (2, 6)).astype(np.int64),
        "attention_mask": np.array([[1] * 6, [1] * 4 + [0] * 2], np.int64),  # padding: -65504, not -inf
        "token_type_ids": np.zeros((2, 6), np.int64),
    }
    got, want = _run(graph, feeds), _run(reference, feeds)
    assert np.isfinite(got["last_hidden_state"]).all()
    assert _rel_err(got["last_hidden_state"], want["last_hidden_state"]) < FP16_REL_TOL


def test_the_spec_section_maps_onto_convert_precision_options() -> None:
    spec = CudaTargetSpec(precision="bf16", kv_cache_dtype="float32", extra_keep_ops=["Gelu"], auto=True)
    pipeline = CudaTarget(spec).legalize_pipeline()
    names = [step.name for step in pipeline.steps]
    assert names[:2] == ["cpu-fuse-skip-norm", "cpu-attention"] and names[-2:] == [
        "convert-precision",
        "eliminate-dead-code",
    ]
    assert pipeline.steps[1].options.packed_rotary is True
    options = spec.precision_options()
    assert options["dtype"] == "bfloat16" and options["kv_cache_dtype"] == "float32"
    assert options["extra_keep_ops"] == ["Gelu"] and options["auto"] is True
    assert CudaTargetSpec(precision="fp32").precision_options() == {}
    no_contrib = CudaTarget(CudaTargetSpec(contrib_ops=False)).legalize_pipeline()
    assert [step.name for step in no_contrib.steps] == ["convert-precision", "eliminate-dead-code"]
    assert isinstance(get_target("cuda"), CudaTarget)


# -- the artifact -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_artifact(llama_fp16: Graph, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cuda") / "artifact"
    imported = tiny_import("llama")
    ctx = EmitContext(task="text-generation", decoder=imported.decoder.to_json(), spec_name="tiny")
    CudaTarget().emit(clone(llama_fp16), out, ctx)
    return out


def test_manifest_records_providers_options_and_precision(llama_artifact: Path, tmp_path: Path) -> None:
    manifest = json.loads((llama_artifact / "manifest.json").read_text())
    assert manifest["target"] == "cuda" and manifest["precision"] == "fp16"
    runtime = manifest["runtime"]
    assert runtime["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime["provider_options"][0] == {"device_id": "0", "enable_cuda_graph": "0"}
    assert manifest["ops"]["GroupQueryAttention"] == 2
    assert {row["name"]: row["dtype"] for row in manifest["inputs"]}["past_key_values.0.key"] == "float16"
    assert {row["name"]: row["dtype"] for row in manifest["outputs"]}["logits"] == "float32"
    assert (llama_artifact / "model.onnx").exists()
    trt = CudaTarget(CudaTargetSpec(tensorrt=True, device_id=1)).session_options()
    assert trt["providers"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert trt["provider_options"][0]["trt_fp16_enable"] == "1"
    assert trt["provider_options"][1]["device_id"] == "1"
    fp32 = CudaTarget(CudaTargetSpec(precision="fp32"))
    graph = tiny_fused("llama")
    _legalize(graph, precision="fp32")
    notes = fp32.emit(graph, tmp_path / "fp32", EmitContext())["notes"]
    assert "float16/bfloat16 only" in notes[0]


@pytest.mark.skipif(not NO_GPU, reason="this machine can run the cuda artifact")
def test_without_a_gpu_the_runner_refuses_with_the_reason(llama_artifact: Path) -> None:
    from llmc.runtime.artifact import load_artifact

    reason = CudaTarget().can_run()
    assert reason is not None and reason.endswith(CANNOT_RUN)
    assert "onnxruntime-gpu is not installed" in reason or "CUDA device" in reason
    with pytest.raises(TargetError, match="cannot run here"):
        load_runner(llama_artifact)
    with pytest.raises(TargetError, match="cannot run here"):
        load_artifact(llama_artifact)


@pytest.mark.skipif(NO_GPU, reason="needs onnxruntime-gpu and a CUDA device")
def test_with_a_gpu_the_artifact_runs_on_cuda(llama_artifact: Path) -> None:
    runner = load_runner(llama_artifact)
    assert runner.session.get_providers()[0] == "CUDAExecutionProvider"
    feeds = decoder_feeds(1, 4, 3, kv_dtype=np.float16)
    assert np.isfinite(runner.run(feeds)["logits"]).all()


# -- the KV cache on the device -----------------------------------------------------------------------------
@pytest.mark.parametrize("share_buffer", [False, True])
def test_device_generator_equals_the_numpy_generator(llama_artifact: Path, share_buffer: bool) -> None:
    """IOBinding on the CPU provider (the CUDA path binds the same way, on 'cuda' OrtValues)."""
    decoder = tiny_import("llama").decoder
    runner = OrtRunner(llama_artifact / "model.onnx")
    plain = Generator(runner, decoder)
    device = DeviceGenerator(runner, decoder, share_buffer=share_buffer)
    assert device.share_buffer is share_buffer and device.device == "cpu"
    prompt = [5, 17, 99, 3, 42]
    np.testing.assert_array_equal(device.logits_sequence(prompt), plain.logits_sequence(prompt))
    assert (
        device.generate(prompt, 8, stop_at_eos=False).tokens
        == plain.generate(prompt, 8, stop_at_eos=False).tokens
    )
    batch = np.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(device.prefill(batch), plain.prefill(batch))
    np.testing.assert_array_equal(device.step([7, 8]), plain.step([7, 8]))
    assert DeviceGenerator(runner, decoder).share_buffer  # every present comes from GroupQueryAttention
    feeds = decoder_feeds(1, 4, 3, kv_dtype=np.float16)
    bound, direct = IOBindingRunner(runner).run(feeds), runner.run(feeds)
    for name, value in direct.items():
        np.testing.assert_array_equal(bound[name], value)


# -- specs and a compile ----------------------------------------------------------------------------------
def test_cuda_specs_load() -> None:
    for name, kind in (("smollm2-cuda-fp16", "gguf"), ("minilm-cuda-fp16", "hf")):
        spec = load_spec(REPO / "specs" / f"{name}.yaml")
        assert spec.model.source == kind and spec.targets.cuda.precision == "fp16"
        assert spec.target_names() == ["cuda"]
    smollm2_cpu = load_spec(REPO / "specs" / "smollm2-cpu.yaml")
    assert load_spec(REPO / "specs" / "smollm2-cuda-fp16.yaml").pipeline == smollm2_cpu.pipeline


def test_magika_for_three_targets_records_the_skipped_cuda_check(tmp_path: Path) -> None:
    from llmc.driver import compile_spec

    spec = load_spec(REPO / "specs" / "magika-all-targets.yaml")
    result = compile_spec(spec, out=tmp_path / "magika")
    assert [t.name for t in result.targets] == ["cpu", "tpu", "cuda"]
    for target in result.targets[:2]:
        assert target.golden is not None and target.golden.passed, target.golden.markdown()
    cuda = result.targets[2]
    assert (cuda.artifact / "model.onnx").exists() and cuda.artifact.name == "cuda"
    manifest = json.loads((cuda.artifact / "manifest.json").read_text())
    report = (cuda.artifact / "report.md").read_text()
    if NO_GPU:
        assert cuda.golden is None and cuda.verify_skipped.endswith(CANNOT_RUN)
        assert manifest["verification"] == {"status": "skipped", "reason": cuda.verify_skipped}
        assert f"**skipped**: {cuda.verify_skipped}" in report
    else:
        assert cuda.golden is not None and cuda.golden.passed
    stats = next(p for p in manifest["pipeline"]["passes"] if p["name"] == "convert-precision")["stats"]
    assert stats["converted_nodes"] > 50 and stats["initializers_converted"] > 10
    assert manifest["inputs"][0]["dtype"] == "int32" and manifest["outputs"][0]["dtype"] == "float32"
    # the float16 graph, run here on the CPU provider, classifies like the float32 one
    cpu = OrtRunner(result.targets[0].artifact / "model.onnx")
    fp16 = OrtRunner(cuda.artifact / "model.onnx")
    feeds = {"bytes": np.random.default_rng(0).integers(0, 257, (4, 2048)).astype(np.int32)}
    want, got = cpu.run(feeds)["target_label"], fp16.run(feeds)["target_label"]
    assert np.abs(got - want).max() < 5e-3 and (got.argmax(1) == want.argmax(1)).all()
