"""Shared PyTorch -> ONNX export helpers for the torch, Hugging Face and GGUF frontends.

``export_onnx`` runs ``torch.onnx.export`` with the dynamo exporter first and falls back to the TorchScript
exporter, then tidies the result so that later passes see a readable graph: parameters keep their PyTorch
names (``model.layers.3.self_attn.q_proj.weight``; weights are not constant-folded into anonymous transposed
copies), the wrapper's attribute prefix is stripped, output dims get the names the caller asks for, and the
bulky per-node debug metadata is dropped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir
import onnx_ir.passes.common
import onnxscript.optimizer
import torch

from llmc.errors import ModelError

# Dims as the callers describe them: input/output name -> {axis: symbolic name}.
AxisNames = dict[str, dict[int, str]]

EXPORTERS = ("dynamo", "torchscript")
# Node metadata kept from the dynamo exporter (the module path of each node); the rest is debug bulk.
_KEPT_NODE_METADATA = ("namespace",)
# Beyond this many bytes of weights the exported file keeps them in an external-data file.
_EXTERNAL_DATA_BYTES = 1 << 30
_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "float64": "float64",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int32",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
}


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and how."""

    path: Path
    exporter: str
    seconds: float
    opset: int
    notes: list[str] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        return {
            "exporter": self.exporter,
            "export_seconds": round(self.seconds, 2),
            "opset": self.opset,
            "onnx_bytes": onnx_size(self.path),
            "export_notes": list(self.notes),
        }


class ExportFailed(Exception):
    """Every exporter tried failed; ``reasons`` maps exporter name to the first line of its error."""

    def __init__(self, reasons: dict[str, str]):
        self.reasons = reasons
        super().__init__("; ".join(f"{k}: {v}" for k, v in reasons.items()))


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal colour codes."""
    text = str(exc).replace("\x1b[96m", "").replace("\x1b[0m", "")
    for line in text.splitlines():
        if line.strip():
            return f"{type(exc).__name__}: {line.strip()}"
    return type(exc).__name__


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Swallow the exporters' progress prints, warnings and log records (library code stays silent)."""
    buffer = io.StringIO()
    loggers = [
        logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "onnxscript", "transformers")
    ]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield buffer
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a spec's dtype string (``float32``, ``int64``...)."""
    key = _DTYPES.get(str(name).lower())
    if key is None:
        raise ModelError(f"unknown dtype '{name}' (use one of: {', '.join(sorted(set(_DTYPES.values())))})")
    return getattr(torch, key)


def export_onnx(
    module: Any,
    args: Sequence[Any],
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    input_axes: AxisNames,
    output_axes: AxisNames | None = None,
    strip_prefix: str | None = None,
    exporters: Sequence[str] = EXPORTERS,
    opset: int | None = None,
    prepare: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``module(*args)`` (flat tensor arguments) to ``path``; raise ``ExportFailed`` if no exporter works.

    ``input_axes`` names the dynamic axes of each input; ``output_axes`` renames output dims afterwards (the
    dynamo exporter otherwise writes expressions such as ``past + seq``). ``prepare(exporter)`` is called
    before each attempt (to switch attention implementations, for instance).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reasons: dict[str, str] = {}
    notes: list[str] = []
    for exporter in exporters:
        if exporter not in EXPORTERS:
            raise ValueError(f"unknown exporter {exporter!r}")
        if prepare is not None:
            prepare(exporter)
        start = time.perf_counter()
        try:
            with quiet():
                model = (_export_dynamo if exporter == "dynamo" else _export_torchscript)(
                    module, tuple(args), path, list(input_names), list(output_names), input_axes, opset
                )
                _tidy(model, strip_prefix, output_axes or {})
                _save(model, path)
        except Exception as exc:  # any exporter failure is reported, then the next one is tried
            reasons[exporter] = first_line(exc)
            notes.append(f"{exporter} exporter failed: {reasons[exporter]}")
            continue
        opset_version = next((o for d, o in model.opset_imports.items() if d in ("", "ai.onnx")), 0)
        return ExportResult(path, exporter, time.perf_counter() - start, int(opset_version), notes)
    raise ExportFailed(reasons)


def _dynamic_shapes(names: list[str], axes: AxisNames) -> tuple:
    """dynamo's ``dynamic_shapes`` for a ``forward(*flat)`` wrapper: one tuple holding one dict per input."""
    return (tuple(dict(axes.get(name, {})) or None for name in names),)


def _param_names(module: torch.nn.Module) -> set[str]:
    return {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}


def _export_dynamo(module, args, path, input_names, output_names, input_axes, opset):
    param_names = _param_names(module)
    program = torch.onnx.export(
        FlatArgs(module),
        args,
        dynamo=True,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=_dynamic_shapes(input_names, input_axes),
        opset_version=opset,
        optimize=False,
        verbose=False,
    )
    model = program.model
    simplify(model, {f"module.{n}" for n in param_names} | param_names)
    _strip(model, "module.")
    return model


def simplify(model: onnx_ir.Model, params: set[str]) -> None:
    """Fold constants except the parameters, drop dead nodes, lift constants, share duplicates.

    This stands in for the exporter's ``optimize=True``: that folds ``Transpose(weight)`` into anonymous
    transposed copies (losing the parameter names), and its pattern rewriter takes ~25 s on a 30-layer model
    for ~5% fewer nodes (no-op Slices) that llmc's own cleanup passes remove anyway.
    """

    def keep_weights(node: onnx_ir.Node) -> bool | None:
        return False if any(v is not None and v.name in params for v in node.inputs) else None

    onnx_ir.passes.common.InlinePass()(model)
    onnxscript.optimizer.fold_constants(model, should_fold=keep_weights)
    onnx_ir.passes.Sequential(
        onnx_ir.passes.common.RemoveUnusedNodesPass(),
        onnx_ir.passes.common.RemoveUnusedFunctionsPass(),
        onnx_ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        onnx_ir.passes.common.DeduplicateInitializersPass(),
        onnx_ir.passes.common.CommonSubexpressionEliminationPass(),
        onnx_ir.passes.common.RemoveUnusedNodesPass(),
        onnx_ir.passes.common.OutputFixPass(),
        onnx_ir.passes.common.NameFixPass(),
    )(model)


class FlatArgs(torch.nn.Module):
    """Calls the wrapped module with positional arguments: one ``dynamic_shapes`` layout fits every module."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *flat):
        return self.module(*flat)


def _export_torchscript(module, args, path, input_names, output_names, input_axes, opset):
    axes = {name: dict(a) for name, a in input_axes.items() if a}
    tmp = path.with_suffix(".torchscript.onnx")
    try:
        torch.onnx.export(
            module,
            args,
            os.fspath(tmp),
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=opset or 18,
            do_constant_folding=False,  # simplify() folds, keeping the parameters' names
        )
        model = onnx_ir.load(os.fspath(tmp))
        # Weights in an external-data file are read now, before the temporary file goes away.
        for value in model.graph.initializers.values():
            if isinstance(value.const_value, onnx_ir.ExternalTensor):
                value.const_value = onnx_ir.tensor(value.const_value.numpy(), name=value.name)
    finally:
        for p in tmp.parent.glob(tmp.name + "*"):
            p.unlink()
    simplify(model, _param_names(module))
    return model


def _strip(model, prefix: str) -> None:
    """Rename initializers ``prefix.xxx`` -> ``xxx`` (where that name is free)."""
    graph = model.graph
    for name in list(graph.initializers):
        if name.startswith(prefix):
            new = name[len(prefix) :]
            if new not in graph.initializers:
                graph.initializers[name].name = new


def _tidy(model, strip_prefix: str | None, output_axes: AxisNames) -> None:
    if strip_prefix:
        _strip(model, strip_prefix)
    for output in model.graph.outputs:
        wanted = output_axes.get(output.name)
        if wanted and output.shape is not None:
            dims = list(output.shape.dims)
            for axis, name in wanted.items():
                dims[axis] = onnx_ir.SymbolicDim(name)
            output.shape = onnx_ir.Shape(dims)
    for node in model.graph.all_nodes():
        for key in [k for k in node.metadata_props if k not in _KEPT_NODE_METADATA]:
            del node.metadata_props[key]
    model.producer_name = "llmc"


def _save(model, path: Path) -> None:
    nbytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if nbytes > _EXTERNAL_DATA_BYTES:
        onnx_ir.save(model, os.fspath(path), external_data=data.name)
    else:
        onnx_ir.save(model, os.fspath(path))


def onnx_size(path: Path) -> int:
    """Bytes on disk of an ONNX file plus the external-data files next to it that it names."""
    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(os.fspath(path), load_external_data=False)
    seen: set[str] = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                extra = path.parent / entry.value
                if extra.exists():
                    total += extra.stat().st_size
    return total


def example_size(name: str, sizes: dict[str, int]) -> int:
    """A distinct trace-time size per symbolic dim (never 0 or 1, which exporters specialise)."""
    if name not in sizes:
        sizes[name] = 2 + len(sizes)
    return sizes[name]
