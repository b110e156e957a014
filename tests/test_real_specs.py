"""Golden tests of the real-model specs (slow): specs/smollm2-cpu.yaml and specs/minilm-cpu.yaml compile with
their fusion pipelines, and the artifacts reproduce the stored goldens and the PyTorch reference:

- SmolLM2: greedy continuations of fixed prompts (token ids in tests/golden/smollm2-cpu.tokens.json) equal
  PyTorch eager's for 64 steps, teacher-forced;
- MiniLM: sentence embeddings (mean-pooled, L2-normalised) of fixed sentences have cosine >= 0.9999 with
  PyTorch's and with tests/golden/minilm-cpu.embeddings.npz.

``pytest --update-golden`` rewrites the goldens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmc.driver import compile_spec
from llmc.spec import load_spec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
SENTENCES = [
    "The cat sits on the mat.",
    "A compiler lowers a program through a sequence of intermediate representations.",
    "Paris is the capital of France.",
]
STEPS = 64


def _compile(name: str, tmp_path_factory: pytest.TempPathFactory):
    spec = load_spec(REPO / "specs" / f"{name}.yaml")  # model packages come with scripts/bootstrap.sh
    return compile_spec(spec, out=tmp_path_factory.mktemp(name) / "artifact")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return _compile("smollm2-cpu", tmp_path_factory)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return _compile("minilm-cpu", tmp_path_factory)


def test_smollm2_compiles_with_the_fused_ops(smollm2) -> None:
    target = smollm2.targets[0]
    assert target.golden.passed and target.golden.tokens
    assert all(t.matched == t.total for t in target.golden.tokens)
    ops = {}
    for record in smollm2.pipeline.records + target.legalize.records:
        ops[record.name] = record.stats
    assert ops["fuse-attention"]["fused"] == 30
    assert ops["fuse-rotary"]["fused"] == 60
    assert ops["fuse-rms-norm"]["fused"] == 61
    assert ops["cpu-attention"]["GroupQueryAttention"] == 30
    assert ops["cpu-fuse-skip-norm"]["fused"] == 60
    assert smollm2.timings["total"] < 300


def test_smollm2_greedy_tokens_match_golden_and_pytorch(smollm2, update_golden: bool) -> None:
    from llmc.bench import reference_model
    from llmc.runtime.generator import TorchGenerator, load_artifact_generator, teacher_forced_agreement
    from llmc.targets.base import read_manifest

    artifact = smollm2.targets[0].artifact
    generator = load_artifact_generator(artifact)
    tokens = {p: generator.generate(p, STEPS, stop_at_eos=False).tokens for p in PROMPTS}
    golden = GOLDEN / "smollm2-cpu.tokens.json"
    if update_golden or not golden.exists():
        golden.write_text(json.dumps(tokens, indent=1) + "\n")
    assert tokens == json.loads(golden.read_text())

    manifest = read_manifest(artifact)
    torch_loop = TorchGenerator(reference_model(artifact, manifest), generator.decoder, generator.tokenizer)
    for prompt in PROMPTS:
        reference = torch_loop.generate(prompt, STEPS, stop_at_eos=False).tokens
        agreement = teacher_forced_agreement(generator, prompt, reference)
        assert agreement.matches == STEPS, f"{prompt!r}: first mismatch at {agreement.first_mismatch}"


def _embeddings(artifact: Path) -> np.ndarray:
    from llmc.bench import mean_pool
    from llmc.runtime.artifact import load_artifact
    from llmc.runtime.tokenizer import Tokenizer

    runner, manifest = load_artifact(artifact)
    tokenizer = Tokenizer.from_files({k: artifact / v for k, v in manifest["assets"].items()})
    rows = [tokenizer.encode(s) for s in SENTENCES]
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    if any(s.name == "token_type_ids" for s in runner.inputs):
        feeds["token_type_ids"] = np.zeros_like(ids)
    hidden = runner.run(feeds)["last_hidden_state"]
    return mean_pool(hidden, mask), feeds


def test_minilm_embeddings_match_golden_and_pytorch(minilm, update_golden: bool) -> None:
    import torch

    from llmc.bench import mean_pool, reference_model
    from llmc.targets.base import read_manifest

    artifact = minilm.targets[0].artifact
    ops = {r.name: r.stats for r in minilm.pipeline.records + minilm.targets[0].legalize.records}
    assert ops["cpu-attention"]["MultiHeadAttention"] == 6
    embeddings, feeds = _embeddings(artifact)
    golden = GOLDEN / "minilm-cpu.embeddings.npz"
    if update_golden or not golden.exists():
        np.savez(golden, embeddings=embeddings)
    stored = np.load(golden)["embeddings"]
    assert np.min(np.sum(embeddings * stored, axis=-1)) >= 0.9999

    model = reference_model(artifact, read_manifest(artifact))
    with torch.inference_mode():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    reference = mean_pool(hidden, feeds["attention_mask"])
    assert np.min(np.sum(embeddings * reference, axis=-1)) >= 0.9999


def test_smollm2_int4_compiles_into_matmul_nbits(tmp_path_factory) -> None:
    result = _compile("smollm2-int4-cpu", tmp_path_factory)
    target = result.targets[0]
    stats = {r.name: r.stats for r in result.pipeline.records + target.legalize.records}
    # 30 layers × (qkv, o, gate/up, down) with a float offset per block, and the tied table once (int8)
    assert stats["quantize-weights"]["quantized"] == 122 and stats["quantize-weights"]["offset"] == 120
    assert stats["quantize-weights"]["tied_shared"] == 1
    assert stats["cpu-matmul-nbits"]["rule:gather-block-quantized"] == 1
    assert stats["cpu-matmul-nbits"]["rule:matmul-nbits"] == 120
    assert target.golden.passed and _token_share(target) >= 0.9
    size = sum(target.manifest["files"].values())
    assert size < 0.25 * 538e6  # int4 projections + one int8 copy of the embedding/lm_head


@pytest.mark.parametrize(
    ("name", "ops"),
    [("minilm-cuda-fp16", {"MultiHeadAttention": 6}), ("smollm2-cuda-fp16", {"GroupQueryAttention": 30})],
)
def test_cuda_specs_compile_to_fp16_contrib_graphs(name: str, ops: dict, tmp_path_factory) -> None:
    import onnx

    result = _compile(name, tmp_path_factory)
    target = result.targets[0]
    manifest = target.manifest
    assert manifest["target"] == "cuda" and "CUDAExecutionProvider" in manifest["runtime"]["providers"]
    if target.golden is None:  # no GPU here: the check is recorded as skipped, with the reason
        assert manifest["verification"]["status"] == "skipped" and target.verify_skipped
    else:
        assert target.golden.passed
    model = onnx.load(target.artifact / "model.onnx", load_external_data=False)
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    for op, count in ops.items():
        assert counts.get(op) == count, op
    fp16 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(fp16) > 10


def _token_share(target) -> float:
    return sum(t.matched for t in target.golden.tokens) / sum(t.total for t in target.golden.tokens)


def test_smollm2_int8_stores_the_tied_table_once(tmp_path_factory) -> None:
    import onnx

    result = _compile("smollm2-int8-cpu", tmp_path_factory)
    target = result.targets[0]
    assert target.golden.passed and _token_share(target) >= 0.9
    model = onnx.load(target.artifact / "model.onnx", load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 121 and ops.count("GatherBlockQuantized") == 1  # 120 + the lm_head
    assert not any(n.op_type == "MatMul" and "lm_head" in "".join(n.input) for n in model.graph.node)
    assert sum(target.manifest["files"].values()) < 0.3 * 538e6  # one int8 copy of every weight


def test_smollm2_pruned_int4_really_shrinks_the_matrices(tmp_path_factory) -> None:
    result = _compile("smollm2-pruned-int4-cpu", tmp_path_factory)
    target = result.targets[0]
    assert target.golden.passed
    stats = {r.name: r.stats for r in result.pipeline.records}
    assert stats["prune-structured"]["layers_dropped"] == 3  # 10 % of 30 layers
    assert stats["prune-structured"]["channels_removed"] == 27 * 384  # 25 % of 1536 per remaining layer
    assert stats["prune-structured"]["heads_removed"] == 24  # 10 % of the remaining 243 query heads
    assert stats["prune-structured"]["bytes_saved"] > 100e6
    names = [r.name for r in result.pipeline.records]
    assert names.index("prune-structured") < names.index("fuse-attention")  # prune -> fuse -> quantize
    assert stats["fuse-attention"]["fused"] == 27  # fusion still sees every pruned attention
    assert target.manifest["decoder"]["num_layers"] == 27
    assert sum(target.manifest["files"].values()) < 100e6  # the unpruned int4 build: 114 MB
