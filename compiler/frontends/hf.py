"""The Hugging Face frontend: a local transformers folder (config.json + safetensors) exported to ONNX.

``text-generation`` gives one decoder graph with a KV cache (the ``DecoderSpec`` naming: ``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` -> ``logits``, ``present.{i}.key/value``)
with dynamic batch, sequence and past axes, so the same graph serves prefill (past length 0) and decode.
``feature-extraction`` gives an encoder (``input_ids``, ``attention_mask``, ``token_type_ids`` when the model has
them -> ``last_hidden_state``). Nothing is downloaded: models load with ``local_files_only=True``.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from llmc.errors import ModelError  # noqa: E402
from llmc.frontends.base import DecoderSpec, ImportedModel  # noqa: E402
from llmc.frontends.export import EXPORTERS, ExportFailed, ExportResult, export_onnx, first_line, quiet  # noqa: E402
from llmc.ir import load_model, verify_structure  # noqa: E402

HF_TASKS = ("text-generation", "feature-extraction")
EXPORT_HINT = "export it to ONNX yourself and use `source: onnx`"
# Files copied into artifacts when the folder has them: what a tokenizer and a generation loop need.
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
# Attention implementation tried with each exporter: sdpa traces to plain MatMul/Softmax under dynamo; the
# TorchScript tracer is happiest with the eager one.
_ATTENTION = {"dynamo": "sdpa", "torchscript": "eager"}
# Trace-time sizes; all distinct and >= 2 so no exporter specialises a dynamic axis (past 0 still works).
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 4


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"Hugging Face model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path} has no config.json: not a Hugging Face model folder",
            hint="point `source.path` at the folder that holds config.json and the *.safetensors weights",
        )


def _model_class(task: str):
    import transformers

    return transformers.AutoModelForCausalLM if task == "text-generation" else transformers.AutoModel


def load_hf_model(path: Path, *, task: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The float32 PyTorch model of a local folder, in eval mode (also the eager reference of golden checks)."""
    path = Path(path)
    _check_folder(path)
    if task not in HF_TASKS:
        raise ModelError(
            f"task '{task}' is not supported for Hugging Face models (use one of: {', '.join(HF_TASKS)})"
        )
    try:
        with quiet():
            model = _model_class(task).from_pretrained(
                path, local_files_only=True, dtype=torch.float32, attn_implementation=attn_implementation
            )
    except Exception as exc:
        raise ModelError(f"cannot load the Hugging Face model in {path}: {first_line(exc)}") from None
    return model.eval()


def architecture(model: torch.nn.Module) -> str:
    config = model.config
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else type(model).__name__


# -- decoder ------------------------------------------------------------------------------------------
def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def cache_geometry(config) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder config."""
    c = _text_config(config)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return int(c.num_hidden_layers), int(kv_heads), int(head_dim)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; use whichever ``forward`` takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def build_cache(config, flat: tuple[torch.Tensor, ...]):
    """A ``DynamicCache`` holding flat ``(k0, v0, k1, v1, ...)`` tensors ([batch, kv_heads, past, head_dim])."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i in range(len(flat) // 2):
        cache.update(flat[2 * i], flat[2 * i + 1], i)
    return cache


def flatten_cache(cache) -> list[torch.Tensor]:
    """``(k0, v0, k1, v1, ...)`` of a transformers cache."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for pair in cache for t in pair[:2]]  # legacy tuple-of-tuples


def decoder_forward(model: torch.nn.Module, input_ids, attention_mask, position_ids, cache):
    """One forward of a causal LM with a cache: ``(logits, new cache)``."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **{_cache_kwarg(model): cache},
    )
    new_cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    return out.logits, new_cache


class DecoderWrapper(torch.nn.Module):
    """``forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` over flat tensors."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.hf = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = build_cache(self.hf.config, past)
        logits, cache = decoder_forward(self.hf, input_ids, attention_mask, position_ids, cache)
        return (logits, *flatten_cache(cache))


def decoder_io(num_layers: int, spec: DecoderSpec | None = None) -> tuple[list[str], list[str]]:
    """Input and output names of a decoder graph, in the order the wrapper takes and returns them."""
    spec = spec or DecoderSpec(num_layers, 1, 1, 1, 1)
    past = [n for i in range(num_layers) for n in (spec.past_key.format(i=i), spec.past_value.format(i=i))]
    present = [
        n for i in range(num_layers) for n in (spec.present_key.format(i=i), spec.present_value.format(i=i))
    ]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_decoder(model: torch.nn.Module, path: Path, *, exporters=EXPORTERS) -> ExportResult:
    """Export a causal LM with its KV cache as flat inputs/outputs (see ``DecoderSpec``)."""
    layers, kv_heads, head_dim = cache_geometry(model.config)
    vocab = _text_config(model.config).vocab_size
    b, s, p = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
    gen = torch.Generator().manual_seed(0)
    args = (
        torch.randint(0, vocab, (b, s), generator=gen),
        torch.ones(b, p + s, dtype=torch.int64),
        torch.arange(p, p + s).expand(b, s).contiguous(),
        *(torch.randn(b, kv_heads, p, head_dim, generator=gen) for _ in range(2 * layers)),
    )
    inputs, outputs = decoder_io(layers)
    batch_seq = {0: "batch", 1: "seq"}
    input_axes = {
        "input_ids": batch_seq,
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": batch_seq,
    }
    input_axes |= {name: {0: "batch", 2: "past"} for name in inputs[3:]}
    output_axes = {"logits": batch_seq} | {name: {0: "batch", 2: "total"} for name in outputs[1:]}
    with torch.no_grad():
        return export_onnx(
            DecoderWrapper(model),
            args,
            path,
            input_names=inputs,
            output_names=outputs,
            input_axes=input_axes,
            output_axes=output_axes,
            strip_prefix="hf.",
            exporters=exporters,
            prepare=lambda exporter: _set_attention(model, _ATTENTION[exporter]),
        )


def _set_attention(model: torch.nn.Module, implementation: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:
        model.config._attn_implementation = implementation


def decoder_spec(folder: Path, config, *, max_length: int | None = None) -> DecoderSpec:
    """The DecoderSpec of a causal LM: cache geometry from the config, eos/bos from generation_config.json."""
    layers, kv_heads, head_dim = cache_geometry(config)
    text = _text_config(config)
    generation = _read_json(folder / "generation_config.json")
    eos = generation.get("eos_token_id", getattr(text, "eos_token_id", None))
    bos = generation.get("bos_token_id", getattr(text, "bos_token_id", None))
    limit = getattr(text, "max_position_embeddings", None) or 2048
    if max_length is not None:
        if max_length < 1:
            raise ModelError(f"max_length must be positive, got {max_length}")
        limit = min(int(max_length), int(limit))
    return DecoderSpec(
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(text.vocab_size),
        max_length=int(limit),
        eos_token_ids=[int(e) for e in ([] if eos is None else eos if isinstance(eos, list) else [eos])],
        bos_token_id=None if bos is None else int(bos),
    )


# -- encoder ------------------------------------------------------------------------------------------
def encoder_inputs(model: torch.nn.Module) -> list[str]:
    """``input_ids``, ``attention_mask`` and, when the model takes them, ``token_type_ids``."""
    names = ["input_ids", "attention_mask"]
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    if takes_types and (getattr(model.config, "type_vocab_size", 0) or 0) > 0:
        names.append("token_type_ids")
    return names


class EncoderWrapper(torch.nn.Module):
    """``forward(input_ids, attention_mask[, token_type_ids]) -> last_hidden_state``."""

    def __init__(self, model: torch.nn.Module, input_names: list[str]):
        super().__init__()
        self.hf = model
        self.input_names = input_names

    def forward(self, *flat):
        return self.hf(**dict(zip(self.input_names, flat, strict=True))).last_hidden_state


def export_encoder(model: torch.nn.Module, path: Path, *, exporters=EXPORTERS) -> ExportResult:
    names = encoder_inputs(model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    b, s = _TRACE_BATCH, _TRACE_SEQ + _TRACE_PAST
    values = {
        "input_ids": torch.randint(0, vocab, (b, s), generator=gen),
        "attention_mask": torch.ones(b, s, dtype=torch.int64),
        "token_type_ids": torch.zeros(b, s, dtype=torch.int64),
    }
    with torch.no_grad():
        return export_onnx(
            EncoderWrapper(model, names),
            tuple(values[n] for n in names),
            path,
            input_names=names,
            output_names=["last_hidden_state"],
            input_axes={n: {0: "batch", 1: "seq"} for n in names},
            output_axes={"last_hidden_state": {0: "batch", 1: "seq"}},
            strip_prefix="hf.",
            exporters=exporters,
            prepare=lambda exporter: _set_attention(model, _ATTENTION[exporter]),
        )


# -- the frontend ---------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {first_line(exc)}") from None


def hf_assets(folder: Path) -> dict[str, Path]:
    """The tokenizer and config files of a folder that artifacts should carry."""
    return {name: folder / name for name in ASSET_FILES if (folder / name).is_file()}


def import_hf(
    path: Path,
    *,
    task: str,
    work_dir: Path,
    max_length: int | None = None,
    exporters: tuple[str, ...] = EXPORTERS,
    source: str = "hf",
    info: dict[str, Any] | None = None,
) -> ImportedModel:
    """Export a local Hugging Face folder to ``work_dir/model.onnx`` and load it into the IR.

    ``source`` and ``info`` let the GGUF frontend import its dequantized cache under its own name.
    """
    path, work_dir = Path(path), Path(work_dir)
    model = load_hf_model(path, task=task)
    arch = architecture(model)
    export = export_decoder if task == "text-generation" else export_encoder
    try:
        result = export(model, work_dir / "model.onnx", exporters=exporters)
    except ExportFailed as exc:
        reason = next(iter(exc.reasons.values()), "unknown error")
        raise ModelError(
            f"cannot export {arch} ({path}) to ONNX for {task}: {reason}"
            + (f" (also tried: {', '.join(list(exc.reasons)[1:])})" if len(exc.reasons) > 1 else ""),
            hint=EXPORT_HINT,
        ) from None
    graph = load_model(result.path)
    verify_structure(graph)
    decoder = decoder_spec(path, model.config, max_length=max_length) if task == "text-generation" else None
    details = {
        "hf_folder": str(Path(path).resolve()),
        "onnx_path": str(result.path),
        "architecture": arch,
        "model_type": getattr(model.config, "model_type", None),
        "attn_implementation": _ATTENTION[result.exporter],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **result.info(),
        **(info or {}),
    }
    return ImportedModel(
        graph=graph, task=task, source=source, assets=hf_assets(path), decoder=decoder, info=details
    )
