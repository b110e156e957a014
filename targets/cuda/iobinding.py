"""Decoding with the KV cache kept on the device: onnxruntime IOBinding over OrtValues.

``Generator`` (llmc.runtime.generator) feeds the cache as numpy arrays, so on a GPU every step copies every
layer's past keys and values to the device and the presents back. :class:`DeviceGenerator` is the same
``DecoderLoop`` (``prefill``/``step``/``generate``/``logits_sequence``) over an :class:`~llmc.runtime.runner.
OrtRunner`, but binds each step's ``present.*`` outputs (OrtValues on the device) as the next step's
``past_key_values.*`` inputs: only the token ids, the mask and the positions go host -> device, and only the
logits come back.

**Shared buffers.** When every ``present`` output is produced by a ``com.microsoft.GroupQueryAttention`` (what
the cpu/cuda legalization emits for decoders), the cache can instead be one buffer per layer of
``max_length`` positions, bound as both the past input and the present output: the kernel sees the same
pointer and appends the new tokens in place (``past_present_share_buffer``), so no step allocates or copies
the cache at all. ``share_buffer=None`` (default) picks it when the graph allows; the valid length travels in
``attention_mask`` (GroupQueryAttention reads ``seqlens_k``/``total_sequence_length`` from it).

On a CPU session the "device" is host memory and the same code runs (onnxruntime's CPU provider supports
IOBinding too), which is how the tests check it here against the numpy ``Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from llmc.errors import ModelError
from llmc.frontends.base import DecoderSpec
from llmc.runtime.generator import DecoderLoop, artifact_decoder, artifact_tokenizer
from llmc.runtime.runner import OrtRunner, TensorSig
from llmc.runtime.tokenizer import Tokenizer

_NP = {"float32": np.float32, "float16": np.float16}


def session_device(session: ort.InferenceSession) -> str:
    """Where a session's outputs live by default: "cuda" when it runs on the CUDA provider, else "cpu"."""
    return "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_NP.get(name, name))


class IOBindingRunner:
    """Runner-compatible: binds host feeds, runs on the session's device, returns host arrays."""

    def __init__(self, runner: OrtRunner, *, device: str | None = None, device_id: int = 0) -> None:
        self.runner = runner
        self.session = runner.session
        self.inputs: list[TensorSig] = runner.inputs
        self.outputs: list[TensorSig] = runner.outputs
        self.last_token_outputs = getattr(runner, "last_token_outputs", [])
        self.device = device or session_device(self.session)
        self.device_id = device_id

    def run(
        self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else [o.name for o in self.outputs]
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))


class DeviceGenerator(DecoderLoop):
    """A ``Generator`` whose KV cache stays on the session's device between steps (IOBinding, OrtValues)."""

    def __init__(
        self,
        runner: OrtRunner,
        decoder: DecoderSpec,
        tokenizer: Tokenizer | None = None,
        *,
        device: str | None = None,
        device_id: int = 0,
        share_buffer: bool | None = None,
    ) -> None:
        self.runner = runner
        self.session: ort.InferenceSession = runner.session
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.device = device or session_device(self.session)
        self.device_id = device_id
        inputs = {sig.name: sig for sig in runner.inputs}
        outputs = {sig.name for sig in runner.outputs}
        n = decoder.num_layers
        self._past = [fmt.format(i=i) for i in range(n) for fmt in (decoder.past_key, decoder.past_value)]
        self._present = [
            fmt.format(i=i) for i in range(n) for fmt in (decoder.present_key, decoder.present_value)
        ]
        missing = [name for name in ("input_ids", *self._past) if name not in inputs]
        missing += [name for name in ("logits", *self._present) if name not in outputs]
        if missing:
            raise ModelError(f"the model is not a decoder with a KV cache: missing {', '.join(missing[:4])}")
        self._feeds_mask = "attention_mask" in inputs
        self._feeds_positions = "position_ids" in inputs
        self._kv_dtype = _np_dtype(inputs[self._past[0]].dtype or decoder.kv_dtype)
        can_share = self._feeds_mask and _presents_from_gqa(runner, self._present)
        if share_buffer and not can_share:
            raise ModelError(
                "share_buffer needs every present output to come from GroupQueryAttention and an "
                "attention_mask input (compile with the cuda or cpu target's contrib ops)"
            )
        self.share_buffer = can_share if share_buffer is None else share_buffer
        self._cache: list[ort.OrtValue] = []
        self.length = 0

    def reset(self) -> None:
        self._cache = []
        self.length = 0

    def _empty_cache(self, batch: int) -> list[ort.OrtValue]:
        positions = self.decoder.max_length if self.share_buffer else 0
        shape = (batch, self.decoder.num_kv_heads, positions, self.decoder.head_dim)
        # one zeroed array each: on the CPU device an OrtValue wraps its numpy array without a copy
        return [
            ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self._kv_dtype), self.device, self.device_id)
            for _ in self._past
        ]

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        batch, seq = ids.shape
        total = self._total_after(seq)
        if not self._cache:
            self._cache = self._empty_cache(batch)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        if self._feeds_mask:
            binding.bind_cpu_input("attention_mask", np.ones((batch, total), np.int64))
        if self._feeds_positions:
            positions = np.broadcast_to(np.arange(self.length, total, dtype=np.int64), (batch, seq))
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        for name, value in zip(self._past, self._cache, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # the only tensor that comes back to the host
        for name, value in zip(self._present, self._cache, strict=True):
            if self.share_buffer:
                binding.bind_ortvalue_output(name, value)  # same buffer: appended in place
            else:
                binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        if not self.share_buffer:
            self._cache = list(values[1:])
        self.length = total
        logits = values[0].numpy()
        return logits[:, -1, :]


def _presents_from_gqa(runner: OrtRunner, presents: list[str]) -> bool:
    """Whether every present output of the runner's model is an output of GroupQueryAttention."""
    try:
        model = onnx.load(str(runner.model_path), load_external_data=False)
    except Exception:
        return False
    producers: dict[str, onnx.NodeProto] = {o: node for node in model.graph.node for o in node.output}
    return all(
        (node := producers.get(name)) is not None
        and node.op_type == "GroupQueryAttention"
        and node.domain == "com.microsoft"
        for name in presents
    )


def load_generator(artifact_dir: Any, **kwargs: Any) -> DeviceGenerator:
    """A DeviceGenerator over a compiled text-generation artifact (any onnxruntime target: cuda, cpu)."""
    from pathlib import Path

    from llmc.runtime.artifact import load_artifact

    runner, manifest = load_artifact(Path(artifact_dir))
    if not isinstance(runner, OrtRunner):
        raise ModelError(
            f"{artifact_dir}: IOBinding needs an onnxruntime artifact, not '{manifest.get('target')}'"
        )
    device_id = 0
    for options in manifest.get("runtime", {}).get("provider_options", []) or []:
        if options.get("device_id") is not None:
            device_id = int(options["device_id"])
            break
    kwargs.setdefault("device_id", device_id)
    return DeviceGenerator(
        runner, artifact_decoder(manifest), artifact_tokenizer(Path(artifact_dir), manifest), **kwargs
    )
