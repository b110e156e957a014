"""What every frontend returns: the IR of the imported model and what a target needs beside it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmc.ir import Graph

TASKS = ("generic", "text-generation", "feature-extraction", "classification")


@dataclass
class DecoderSpec:
    """How a decoder graph with a KV cache is fed (one graph serves prefill and decode).

    Inputs: ``input_ids``, ``attention_mask``, ``position_ids`` (int64 [batch, seq] / [batch, past+seq]) and
    ``past_key_values.{i}.key`` / ``.value`` ([batch, num_kv_heads, past, head_dim]); outputs: ``logits``
    and ``present.{i}.key`` / ``.value``.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_length: int
    kv_dtype: str = "float32"
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecoderSpec:
        return cls(**data)

    def matching(self, graph: Graph) -> DecoderSpec:
        """This spec with ``num_layers`` and ``num_kv_heads`` read off ``graph``'s past-key inputs, for a graph
        that a pass made smaller (dropped layers, removed kv heads); unchanged where the graph does not say."""
        layers = 0
        while self.past_key.format(i=layers) in graph.inputs:
            layers += 1
        if layers == 0:
            return self
        info = graph.value_info(self.past_key.format(i=0))
        shape = info.shape if info is not None else None
        heads = shape[1] if shape is not None and len(shape) == 4 and isinstance(shape[1], int) else None
        return replace(self, num_layers=layers, num_kv_heads=heads or self.num_kv_heads)


@dataclass
class ImportedModel:
    """A frontend's result. ``assets`` are files copied into every artifact (tokenizer, config...)."""

    graph: Graph
    task: str = "generic"
    source: str = "onnx"
    assets: dict[str, Path] = field(default_factory=dict)
    decoder: DecoderSpec | None = None
    info: dict[str, Any] = field(default_factory=dict)
