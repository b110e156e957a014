"""The PyTorch frontend: an ``nn.Module`` made by a ``pkg.module:function`` factory, exported to ONNX.

The factory returns the module, or ``(module, example_inputs)``. ``input_specs`` name the inputs and give their
shapes; a string dim (``"batch"``) becomes a dynamic axis of that name. Without example inputs, inputs are made
from the specs (float inputs random, integer inputs zeros and ones).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmc.errors import ModelError
from llmc.frontends.base import TASKS, ImportedModel
from llmc.frontends.export import ExportFailed, example_size, export_onnx, first_line, torch_dtype
from llmc.ir import load_model, verify_structure

EXPORT_HINT = "export it to ONNX yourself and use `source: onnx`"


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, shape (ints are fixed, strings are dynamic axes) and dtype string."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


def parse_input_specs(specs: list[dict[str, Any]]) -> list[InputSpec]:
    """Validate ``[{"name": "x", "shape": ["batch", 16], "dtype": "float32"}, ...]``."""
    parsed: list[InputSpec] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "name" not in spec or "shape" not in spec:
            raise ModelError(f"input_specs[{i}] needs 'name' and 'shape' (got {spec!r})")
        shape = spec["shape"]
        if not isinstance(shape, list | tuple) or not all(
            isinstance(d, str) or (isinstance(d, int) and d >= 0) for d in shape
        ):
            raise ModelError(
                f"input_specs[{i}] ('{spec['name']}'): shape must list ints and dim names, got {shape!r}"
            )
        dtype = str(spec.get("dtype", "float32"))
        torch_dtype(dtype)  # raises ModelError for an unknown dtype
        parsed.append(InputSpec(str(spec["name"]), tuple(shape), dtype))
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        raise ModelError(f"input_specs name an input twice: {names}")
    return parsed


def example_inputs(specs: list[InputSpec], *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Trace-time inputs for specs: a distinct size >= 2 per dynamic dim, so no exporter specialises it."""
    gen = torch.Generator().manual_seed(seed)
    sizes: dict[str, int] = {}
    tensors = []
    for spec in specs:
        shape = [example_size(d, sizes) if isinstance(d, str) else d for d in spec.shape]
        dtype = torch_dtype(spec.dtype)
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            tensors.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            tensors.append(torch.randint(0, 2, shape, generator=gen).to(dtype))
    return tuple(tensors)


def load_factory(factory: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...] | None]:
    """Call ``pkg.module:function`` (or ``path/to/file.py:function``) and check what it returns."""
    if ":" not in factory:
        raise ModelError(f"torch factory '{factory}' must look like 'pkg.module:function'")
    module_name, _, attr = factory.rpartition(":")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise ModelError(f"torch factory file not found: {file}")
            spec = importlib.util.spec_from_file_location(f"llmc_factory_{file.stem}", file)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module_name)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"cannot import '{module_name}' for torch factory '{factory}': {first_line(exc)}"
        ) from None
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise ModelError(f"'{module_name}' has no callable '{attr}' (torch factory '{factory}')")
    try:
        made = fn()
    except Exception as exc:
        raise ModelError(f"torch factory '{factory}' raised {first_line(exc)}") from None
    examples = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, examples = made
        if isinstance(examples, torch.Tensor):
            examples = (examples,)
        if not isinstance(examples, list | tuple) or not all(isinstance(t, torch.Tensor) for t in examples):
            raise ModelError(
                f"torch factory '{factory}': example inputs must be a tensor or a tuple of tensors"
            )
        examples = tuple(examples)
    if not isinstance(made, torch.nn.Module):
        raise ModelError(
            f"torch factory '{factory}' returned {type(made).__name__}, not an nn.Module or (module, example_inputs)"
        )
    return made, examples


def _forward_arg_names(module: torch.nn.Module, count: int) -> list[str]:
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


def output_names(outputs: Any) -> list[str]:
    """``output`` for one tensor, the keys of a dict, else ``output_{i}`` per flattened tensor."""
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if isinstance(outputs, dict) and all(isinstance(v, torch.Tensor) for v in outputs.values()):
        return [str(k) for k in outputs]
    leaves = torch.utils._pytree.tree_leaves(outputs)
    return [f"output_{i}" for i in range(len(leaves))]


def import_torch(
    factory: str,
    *,
    input_specs: list[dict[str, Any]] | None,
    work_dir: Path,
    task: str = "generic",
    exporters: tuple[str, ...] = ("dynamo", "torchscript"),
) -> ImportedModel:
    """Export the factory's module to ``work_dir/model.onnx`` and load it into the IR."""
    if task not in TASKS:
        raise ModelError(f"unknown task '{task}' (one of: {', '.join(TASKS)})")
    module, examples = load_factory(factory)
    module.eval()
    specs = parse_input_specs(input_specs) if input_specs else None
    if specs is None and examples is None:
        raise ModelError(
            f"torch factory '{factory}' returned no example inputs: give `input_specs` "
            '(e.g. [{"name": "x", "shape": ["batch", 16], "dtype": "float32"}])'
        )
    if specs is not None and examples is not None and len(specs) != len(examples):
        raise ModelError(
            f"input_specs name {len(specs)} inputs but the factory gave {len(examples)} example inputs"
        )
    args = examples if examples is not None else example_inputs(specs or [])
    names = [s.name for s in specs] if specs else _forward_arg_names(module, len(args))
    axes = {s.name: s.dynamic_axes for s in specs} if specs else {}
    try:
        with torch.no_grad():
            outputs = module(*args)
    except Exception as exc:
        raise ModelError(
            f"torch factory '{factory}': the module fails on its example inputs: {first_line(exc)}"
        ) from None
    work_dir = Path(work_dir)
    try:
        with torch.no_grad():
            result = export_onnx(
                module,
                args,
                work_dir / "model.onnx",
                input_names=names,
                output_names=output_names(outputs),
                input_axes=axes,
                exporters=exporters,
            )
    except ExportFailed as exc:
        raise ModelError(
            f"cannot export {type(module).__name__} from '{factory}' to ONNX: {exc}", hint=EXPORT_HINT
        ) from None
    graph = load_model(result.path)
    verify_structure(graph)
    info = {
        "factory": factory,
        "module": type(module).__name__,
        "onnx_path": str(result.path),
        **result.info(),
    }
    return ImportedModel(graph=graph, task=task, source="torch", info=info)
