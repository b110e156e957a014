"""Runners: ``run(feeds) -> outputs`` over one compiled model, whatever the target underneath."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from llmc.ir import Dim


@dataclass(frozen=True)
class TensorSig:
    """A model input or output as a runner sees it: name, numpy dtype name, shape with symbolic dims."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None


class Runner(Protocol):
    inputs: list[TensorSig]
    outputs: list[TensorSig]

    def run(
        self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]: ...


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}


def tensor_sig(arg: ort.NodeArg) -> TensorSig:
    """An onnxruntime input/output description as a TensorSig (numpy dtype name, dims)."""
    shape = None if arg.shape is None else tuple(d if isinstance(d, int | str) else None for d in arg.shape)
    return TensorSig(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)


_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    level: str = "all", intra_op_threads: int | None = None, config: dict[str, str] | None = None
) -> ort.SessionOptions:
    """onnxruntime session options: optimization level by name, threads, config entries; warnings muted."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = _LEVELS[level]
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


class SessionRunner:
    """The Runner interface over an onnxruntime session: inputs and outputs as TensorSigs, the outputs
    computed for the last sequence position only (the logits-last-token pass), ``run``."""

    def __init__(self, session: ort.InferenceSession, last_token_outputs: Sequence[str]) -> None:
        self.session = session
        self.inputs = [tensor_sig(a) for a in session.get_inputs()]
        self.outputs = [tensor_sig(a) for a in session.get_outputs()]
        self.last_token_outputs = [n for n in last_token_outputs if n]

    def run(
        self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else [o.name for o in self.outputs]
        values = self.session.run(names, feeds)
        return dict(zip(names, values, strict=True))


class OrtRunner(SessionRunner):
    """onnxruntime InferenceSession over a model file."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int | None = None,
        graph_optimization_level: str = "all",
        extra_session_config: dict[str, str] | None = None,
    ) -> None:
        options = session_options(graph_optimization_level, intra_op_threads, extra_session_config)
        self.model_path = Path(model_path)
        session = ort.InferenceSession(os.fspath(model_path), options, providers=list(providers))
        meta = session.get_modelmeta().custom_metadata_map
        super().__init__(session, meta.get("llmc.last_token_outputs", "").split(","))
