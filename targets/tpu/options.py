"""The spec's ``targets.tpu`` section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TpuTargetSpec(BaseModel):
    """StableHLO for TPUs through jax.export (static shapes: every dynamic dim needs a bucket)."""

    model_config = ConfigDict(extra="forbid")

    platforms: list[str] = Field(default_factory=lambda: ["tpu", "cpu"])
    buckets: dict[str, list[int]] = Field(
        default_factory=dict, description="values for each symbolic dim, e.g. batch: [1], sequence: [128]"
    )
