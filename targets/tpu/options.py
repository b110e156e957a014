"""The spec's ``targets.tpu`` section (importable without JAX: the spec module loads it for every spec)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Platform = Literal["tpu", "cpu", "cuda", "rocm"]


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
