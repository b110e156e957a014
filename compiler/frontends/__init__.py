"""Frontends: turn what the spec's ``model:`` names into the IR (plus assets and decoder I/O facts).

``onnx`` is read directly; ``torch``, ``hf`` and ``gguf`` export through PyTorch and are imported lazily so
that the ONNX path needs neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from llmc.errors import ModelError, SpecError
from llmc.frontends.base import DecoderSpec, ImportedModel
from llmc.spec import ModelSpec, resolve_path

__all__ = ["DecoderSpec", "ImportedModel", "import_model"]


def _needs(module: str, extra: str = "frontends") -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise ModelError(
            f"this frontend needs the Python package '{module}' ({exc})",
            hint=f"pip install torch==2.13.0 && pip install 'llmc[{extra}]'",
        ) from exc


def _factory_ref(path: str, base_dir: Path) -> str:
    """``pkg.module:fn`` stays as it is; ``some/file.py:fn`` (relative to the spec) is loaded as a module."""
    module_part, sep, fn = path.rpartition(":")
    if not sep or not module_part.endswith(".py"):
        return path
    file = resolve_path(module_part, base_dir).resolve()
    if not file.exists():
        raise SpecError(f"model factory file not found: {file}")
    name = "llmc_user_model_" + hashlib.sha1(str(file).encode()).hexdigest()[:10]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ModelError(
                f"{file}: importing the model factory failed: {type(exc).__name__}: {exc}"
            ) from exc
    return f"{name}:{fn}"


def import_model(model: ModelSpec, base_dir: Path, work_dir: Path) -> ImportedModel:
    """Import the model a spec names. ``work_dir`` receives export byproducts (a scratch folder)."""
    if model.source == "torch":
        _needs("torch")
        from llmc.frontends.torch_module import import_torch

        inputs = [i.model_dump() for i in model.inputs] if model.inputs else None
        return import_torch(
            _factory_ref(model.path, base_dir), input_specs=inputs, work_dir=work_dir, task=model.task
        )
    path = resolve_path(model.path, base_dir)
    if not path.exists():
        raise SpecError(f"model path not found: {path}")
    if model.source == "onnx":
        from llmc.frontends.onnx_file import import_onnx

        return import_onnx(path, task=model.task)
    _needs("torch")
    _needs("transformers")
    if model.source == "hf":
        from llmc.frontends.hf import import_hf

        task = "feature-extraction" if model.task == "generic" else model.task
        return import_hf(path, task=task, work_dir=work_dir, max_length=model.max_length)
    if model.source == "gguf":
        _needs("gguf")
        from llmc.frontends.gguf import import_gguf

        task = "text-generation" if model.task == "generic" else model.task
        return import_gguf(path, task=task, work_dir=work_dir, max_length=model.max_length)
    raise SpecError(f"unknown model source '{model.source}'")
