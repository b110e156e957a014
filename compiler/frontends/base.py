"""What every frontend returns: the IR of the imported model and what a target needs beside it."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class ImportedModel:
    """A frontend's result. ``assets`` are files copied into every artifact (tokenizer, config...)."""

    graph: Graph
    task: str = "generic"
    source: str = "onnx"
    assets: dict[str, Path] = field(default_factory=dict)
    decoder: DecoderSpec | None = None
    info: dict[str, Any] = field(default_factory=dict)
