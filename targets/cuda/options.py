"""The spec's ``targets.cuda`` section (importable without a GPU or onnxruntime-gpu: the spec module loads it
for every spec)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CudaTolerances(BaseModel):
    """Golden-check tolerances for this target alone (same meaning as ``verify.tolerances``)."""

    model_config = ConfigDict(extra="forbid")

    max_abs: float = Field(default=1e-4, ge=0)
    max_rel: float = Field(default=1e-3, ge=0)
    cosine: float = Field(default=0.9999, ge=-1, le=1)


class CudaTargetSpec(BaseModel):
    """onnxruntime on NVIDIA GPUs: fp16 by default with an fp32 keep-list, contrib kernels, optional TensorRT."""

    model_config = ConfigDict(extra="forbid")

    precision: Literal["fp16", "bf16", "fp32"] = Field(
        default="fp16",
        description="fp16 | bf16 (convert-precision after legalization) | fp32 (no conversion)",
    )
    tensorrt: bool = Field(
        default=False,
        description="prefer the TensorRT provider (CUDA as fallback); TensorRT takes the standard ops, the "
        "com.microsoft contrib ops stay on the CUDA provider",
    )
    contrib_ops: bool = Field(
        default=True,
        description="legalize into onnxruntime com.microsoft contrib ops (GroupQueryAttention, "
        "MultiHeadAttention, Skip*LayerNormalization); GroupQueryAttention runs on CUDA in fp16/bf16 only",
    )
    packed_rotary: bool = Field(
        default=True,
        description="GroupQueryAttention takes the packed QKV projection and applies the rotary embedding "
        "itself from cos/sin caches (onnxruntime-genai's CUDA layout: no Split, no RotaryEmbedding nodes); "
        "assumes position_ids = arange (no left padding), as llmc's Generator feeds them",
    )
    device_id: int = Field(default=0, ge=0, description="CUDA device ordinal")
    enable_cuda_graph: bool = Field(
        default=False,
        description="capture the model as a CUDA graph (needs static shapes and IOBinding; off by default)",
    )
    keep_io: bool = Field(
        default=True, description="keep float32 graph inputs/outputs (logits) float32, Casts at the boundary"
    )
    kv_cache_dtype: Literal["same", "float32", "float16", "bfloat16"] = Field(
        default="same", description="element type of the KV-cache inputs/outputs ('same': the precision's)"
    )
    keep_ops: list[str] | None = Field(
        default=None, description="op types kept in float32 (default: convert-precision's list)"
    )
    extra_keep_ops: list[str] = Field(default_factory=list, description="op types kept in float32 besides")
    keep_nodes: list[str] = Field(default_factory=list, description="globs on node names kept in float32")
    fp32_norms: bool = Field(default=False, description="keep normalizations in float32")
    auto: bool = Field(
        default=False, description="also keep nodes whose weights do not fit float16 (range / underflow)"
    )
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    external_data: bool | None = Field(
        default=None, description="weights in model.onnx.data (default: when > 1 GB)"
    )
    tolerances: CudaTolerances | None = Field(
        default=None,
        description="golden-check tolerances for this target (fp16 needs looser ones than the spec's "
        "float32 verify.tolerances); default: the spec's",
    )

    def precision_options(self) -> dict:
        """The options of the ``convert-precision`` pass this section implies (empty for fp32)."""
        if self.precision == "fp32":
            return {}
        options: dict = {
            "dtype": "float16" if self.precision == "fp16" else "bfloat16",
            "keep_io": self.keep_io,
            "kv_cache_dtype": self.kv_cache_dtype,
            "fp32_norms": self.fp32_norms,
            "auto": self.auto,
        }
        if self.keep_ops is not None:
            options["keep_ops"] = list(self.keep_ops)
        if self.extra_keep_ops:
            options["extra_keep_ops"] = list(self.extra_keep_ops)
        if self.keep_nodes:
            options["keep_nodes"] = list(self.keep_nodes)
        return options
