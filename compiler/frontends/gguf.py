"""The GGUF frontend: a llama.cpp GGUF file dequantized to float32 by transformers, then exported like ``hf``.

Dequantizing takes about a minute on a small machine, so the float32 model is cached as a Hugging Face folder
(safetensors, config, generation config, tokenizer) under ``$LLMC_CACHE`` (default ``~/.cache/llmc``), keyed
by the file's size, mtime and a hash of its first MiB. That folder is also the PyTorch reference of the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from llmc.errors import ModelError
from llmc.frontends.base import ImportedModel
from llmc.frontends.export import EXPORTERS, first_line, quiet
from llmc.frontends.hf import import_hf

GGUF_MAGIC = b"GGUF"
_HEADER_BYTES = 1 << 20
_PROVENANCE = "llmc_gguf.json"


def cache_root() -> Path:
    """Where llmc caches derived models: ``$LLMC_CACHE`` or ``~/.cache/llmc``."""
    return Path(os.environ.get("LLMC_CACHE") or Path.home() / ".cache" / "llmc")


def gguf_key(path: Path) -> str:
    """A cache key for a GGUF file: its size, mtime and the sha256 of its first MiB."""
    stat = path.stat()
    with path.open("rb") as f:
        header = hashlib.sha256(f.read(_HEADER_BYTES)).hexdigest()
    return hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{header}".encode()).hexdigest()[:16]


def check_magic(path: Path) -> None:
    """Raise ModelError unless ``path`` is a file that starts like a GGUF file."""
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")


def check_gguf(path: Path) -> dict[str, Any]:
    """Raise ModelError unless ``path`` is a GGUF file whose tensor types the gguf package can dequantize."""
    check_magic(path)
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ModelError(f"cannot read GGUF file {path}: {first_line(exc)}") from None
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    unsupported = []
    for name in types:
        qtype = gguf.GGMLQuantizationType[name]
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros(type_size, np.uint8), qtype)
        except NotImplementedError:
            unsupported.append(name)
    if unsupported:
        raise ModelError(
            f"{path} holds tensor types the gguf package cannot dequantize: {', '.join(sorted(unsupported))}",
            hint="convert the model to a supported type (Q4_0, Q4_1, Q8_0, K-quants, F16...) or import it another way",
        )
    field = reader.get_field("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    return {"architecture": arch, "tensor_types": types, "tensors": len(reader.tensors)}


def dequantized_folder(path: Path) -> tuple[Path, dict[str, Any]]:
    """The cached float32 Hugging Face folder of a GGUF file, made on first use; ``(folder, info)``."""
    path = Path(path).resolve()
    check_magic(path)
    folder = cache_root() / "gguf" / f"{path.stem}-{gguf_key(path)}"
    info: dict[str, Any] = {"gguf": str(path), "gguf_cache": str(folder)}
    if (folder / _PROVENANCE).is_file():
        header = json.loads((folder / _PROVENANCE).read_text())
        return folder, info | {f"gguf_{k}": v for k, v in header.items() if k != "source"} | {
            "gguf_cache_hit": True
        }
    header = check_gguf(path)
    info |= {f"gguf_{k}": v for k, v in header.items()}
    start = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _dequantize_into(path, tmp)
        (tmp / _PROVENANCE).write_text(json.dumps({"source": str(path), **header}, indent=2))
        try:
            tmp.rename(folder)
        except OSError:  # another process made it meanwhile
            if not (folder / _PROVENANCE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, info | {
        "gguf_cache_hit": False,
        "dequantize_seconds": round(time.perf_counter() - start, 1),
    }


def _dequantize_into(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, local_files_only=True, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"transformers cannot load GGUF file {path}: {first_line(exc)}") from None
    # The weights are plain float32 now, but transformers still marks the model as gguf-quantized and refuses
    # to save it: detach the quantizer first.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with quiet():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    _fix_config(out / "config.json")


def _fix_config(config_path: Path) -> None:
    """transformers 5 writes ``rope_theta`` only inside ``rope_parameters``; older readers then fall back to
    10000. Write it at the top level too, and drop any leftover quantization entry."""
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def import_gguf(
    path: Path,
    *,
    task: str = "text-generation",
    work_dir: Path,
    max_length: int | None = None,
    exporters: tuple[str, ...] = EXPORTERS,
) -> ImportedModel:
    """Dequantize (cached), export the decoder to ``work_dir/model.onnx`` and load it into the IR."""
    if task != "text-generation":
        raise ModelError(f"GGUF models are imported as text-generation decoders, not '{task}'")
    folder, info = dequantized_folder(Path(path))
    return import_hf(
        folder,
        task=task,
        work_dir=Path(work_dir),
        max_length=max_length,
        exporters=exporters,
        source="gguf",
        info=info,
    )
