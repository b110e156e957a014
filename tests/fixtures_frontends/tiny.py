"""Tiny random-weight transformers models (no download), saved once per test process and exported once.

``tiny_folder(kind)`` saves a model with save_pretrained; ``tiny_import(kind)`` runs ``import_hf`` on it;
``tiny_artifact(kind)`` lays out an artifact folder (manifest.json, model, assets) like the CPU target does.
All are cached for the whole pytest process, so test modules share the exports.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

KINDS = ("llama", "gpt2", "bert")
VOCAB = 96
EOS = 2
_ROOT = Path(tempfile.mkdtemp(prefix="llmc-tiny-"))
atexit.register(shutil.rmtree, _ROOT, True)


def make_model(kind: str) -> torch.nn.Module:
    """A 2-layer random model: LLaMA with GQA (4 q-heads, 2 kv-heads, tied embeddings), GPT-2 or BERT."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=EOS,
            rope_theta=10000.0,
        )
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=48,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=EOS,
        )
        model = GPT2LMHeadModel(config)
    elif kind == "bert":
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=128,
        )
        model = BertModel(config)
    else:
        raise ValueError(kind)
    # Wider weights than the default init, so greedy decoding does not repeat one token; norms and biases
    # (1 and 0 at init) perturbed so that every weight is distinct.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.25)
            else:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over ``w0 .. w{VOCAB-1}`` (``w2`` is eos), enough to test text in and out."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["w2"])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "w2",
                "chat_template": "{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}",
            }
        )
    )


@functools.cache
def tiny_folder(kind: str) -> Path:
    folder = _ROOT / kind
    make_model(kind).save_pretrained(folder)
    if kind != "bert":
        write_tokenizer(folder)
    return folder


@functools.cache
def tiny_import(kind: str):
    from llmc.frontends.hf import import_hf

    task = "feature-extraction" if kind == "bert" else "text-generation"
    return import_hf(tiny_folder(kind), task=task, work_dir=_ROOT / f"{kind}-export")


def load_torch(kind: str) -> torch.nn.Module:
    from llmc.frontends.hf import load_hf_model

    return load_hf_model(
        tiny_folder(kind), task="feature-extraction" if kind == "bert" else "text-generation"
    )


@functools.cache
def tiny_artifact(kind: str) -> Path:
    """An artifact folder as the CPU target writes it, with the plain export as its reference too."""
    imported = tiny_import(kind)
    folder = _ROOT / f"{kind}-artifact"
    (folder / "assets").mkdir(parents=True)
    (folder / "reference").mkdir()
    shutil.copy(imported.info["onnx_path"], folder / "model.onnx")
    shutil.copy(imported.info["onnx_path"], folder / "reference" / "model.onnx")
    for name, path in imported.assets.items():
        shutil.copy(path, folder / "assets" / name)
    manifest = {
        "format": 1,
        "target": "cpu",
        "model": "model.onnx",
        "task": imported.task,
        "decoder": imported.decoder.to_json() if imported.decoder else None,
        "assets": {name: f"assets/{name}" for name in imported.assets},
        "source": {"kind": "hf", "path": str(tiny_folder(kind)), "reference_onnx": "reference/model.onnx"},
        "runtime": {"name": "onnxruntime", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder
