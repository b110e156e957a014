"""The spec's ``targets.cuda`` section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CudaTargetSpec(BaseModel):
    """onnxruntime on NVIDIA GPUs: fp16 by default with an fp32 keep-list, contrib kernels, optional TensorRT."""

    model_config = ConfigDict(extra="forbid")

    precision: str = Field(default="fp16", description="fp16 | fp32")
    tensorrt: bool = Field(default=False, description="prefer the TensorRT provider (CUDA as fallback)")
