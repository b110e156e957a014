"""The spec's ``targets.tpu`` section (importable without JAX: the spec module loads it for every spec)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Platform = Literal["tpu", "cpu", "cuda", "rocm"]
ShardKind = Literal["attention_heads", "ffn"]


class MeshSpec(BaseModel):
    """A device mesh for tensor parallelism: named axes with sizes, and what is split over ``axis``."""

    model_config = ConfigDict(extra="forbid")

    shape: dict[str, int] = Field(
        description="mesh axes in order, name -> number of devices, e.g. {model: 2} or {data: 1, model: 4}"
    )
    axis: str | None = Field(
        default=None,
        description="the axis that attention heads and FFN channels are split over (default: 'model' when the "
        "mesh has it, else its only axis)",
    )
    shard: list[ShardKind] = Field(
        default_factory=lambda: ["attention_heads", "ffn"],
        description="what to split: attention_heads (q/k/v projection columns by head, o_proj rows) and ffn "
        "(gate/up columns, down rows)",
    )

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: dict[str, int]) -> dict[str, int]:
        if not value:
            raise ValueError("the mesh names no axis: give at least one, e.g. {model: 2}")
        bad = [f"'{name}': {size}" for name, size in value.items() if size < 1]
        if bad:
            raise ValueError(f"mesh axis sizes must be at least 1 ({', '.join(bad)})")
        return value

    @field_validator("shard")
    @classmethod
    def _shard(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("shard names a kind twice")
        return value

    @model_validator(mode="after")
    def _axis(self) -> MeshSpec:
        if self.axis is not None and self.axis not in self.shape:
            raise ValueError(f"axis '{self.axis}' is not a mesh axis (axes: {list(self.shape)})")
        if self.axis is None and "model" not in self.shape and len(self.shape) > 1:
            raise ValueError(f"name the tensor-parallel axis: axis: one of {list(self.shape)}")
        return self

    @property
    def tensor_axis(self) -> str:
        """The axis heads and channels are split over."""
        return self.axis or ("model" if "model" in self.shape else next(iter(self.shape)))

    @property
    def size(self) -> int:
        """Devices in the mesh (the product of the axis sizes)."""
        return math.prod(self.shape.values())


class TpuTargetSpec(BaseModel):
    """StableHLO for TPUs through jax.export (static shapes: every dynamic dim needs a bucket)."""

    model_config = ConfigDict(extra="forbid")

    platforms: list[Platform] = Field(
        default_factory=lambda: ["tpu", "cpu"],
        description="platforms each module is exported for; the artifact runs (and is verified) on any of them",
    )
    buckets: dict[str, list[int]] = Field(
        default_factory=dict,
        description="sizes for each symbolic dim, e.g. batch: [1, 2], sequence: [16]; every combination "
        "becomes one module",
    )
    combinations: list[dict[str, int]] | None = Field(
        default=None,
        description="explicit bucket combinations instead of the product of `buckets` (e.g. a prefill "
        "bucket {sequence: 16, past_sequence: 0} and a decode bucket {sequence: 1, past_sequence: 16})",
    )
    precision: Literal["default", "high", "highest"] = Field(
        default="highest",
        description="matmul/conv precision baked into the modules: 'highest' keeps float32 accuracy on TPU "
        "(slower); 'default' lets the TPU use bfloat16 passes",
    )
    inline_limit: int = Field(
        default=64,
        ge=0,
        description="initializers with at most this many elements become module constants; larger ones are "
        "module arguments stored in weights.safetensors",
    )
    topology: str | None = Field(
        default=None,
        description="TPU topology for the ahead-of-time compile check where libtpu is installed "
        "(default: the attached TPU)",
    )
    mesh: MeshSpec | None = Field(
        default=None,
        description="tensor parallelism: a device mesh and what to shard over it, e.g. "
        "{shape: {model: 2}, shard: [attention_heads, ffn]}; the modules then carry sharding annotations and "
        "run on that many devices",
    )

    @field_validator("buckets")
    @classmethod
    def _sizes(cls, value: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, sizes in value.items():
            if not sizes:
                raise ValueError(f"bucket '{name}' lists no sizes")
            if any(s < 0 for s in sizes):
                raise ValueError(f"bucket '{name}' has a negative size")
            if len(set(sizes)) != len(sizes):
                raise ValueError(f"bucket '{name}' repeats a size")
        return value

    @field_validator("platforms")
    @classmethod
    def _platforms(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one platform")
        if len(set(value)) != len(value):
            raise ValueError("a platform is named twice")
        return value
