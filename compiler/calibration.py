"""Calibration data for data-aware passes, and a way to read intermediate activations of the IR.

``build_calibration`` turns the spec's ``calibration:`` section into feeds for the imported graph: token
windows (prefill with an empty KV cache) for decoders, the samples of an ``.npz`` (or a folder of them)
for other models. The driver puts the result into ``PassContext.data["calibration"]``; passes read it with
``require_calibration`` so that a missing section is one clear, located message.

``activations`` runs the graph *as it is at that point of the pipeline* in onnxruntime, with the values
a pass asks for added as graph outputs, and yields them feed by feed (a pass accumulates statistics such as
XᵀX without holding every activation). onnxruntime does the running, on the in-memory session of
``llmc.runtime.graph_session`` (weights read in place, not serialized).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import SpecError

DEFAULT_TEXT = Path(__file__).with_name("data") / "calibration.txt"


@dataclass
class CalibrationSet:
    """Feeds for the imported graph's inputs, and where they came from (for reports)."""

    feeds: list[dict[str, np.ndarray]]
    source: str
    tokens: list[list[int]] = field(default_factory=list)  # decoders: the token windows

    def __len__(self) -> int:
        return len(self.feeds)


def require_calibration(ctx: Any, pass_name: str) -> CalibrationSet:
    """The calibration set from a PassContext, or a SpecError that says how to give one."""
    data = ctx.data.get("calibration")
    if data is None:
        raise SpecError(
            f"pass '{pass_name}' needs calibration data, and the spec has no calibration: section",
            hint="add  calibration: {prompts: [...]}  (decoders) or  calibration: {inputs: data.npz}",
        )
    return data


def build_calibration(spec: Any, imported: Any) -> CalibrationSet | None:
    """Feeds from ``spec.calibration`` for ``imported`` (an ImportedModel), or None without the section."""
    cal = spec.calibration
    if cal is None:
        return None
    where = spec.locate(("calibration",))
    if imported.decoder is not None:
        if cal.inputs:
            raise SpecError("decoders calibrate on text: use prompts: or text:, not inputs:", location=where)
        return _decoder_set(spec, imported, where)
    if cal.prompts or cal.text:
        raise SpecError(
            "prompts: and text: calibrate decoders only; give this model inputs: (an .npz or a folder)",
            location=where,
        )
    if not cal.inputs:
        raise SpecError("calibration: needs inputs: (an .npz file or a folder of them)", location=where)
    return _array_set(spec.resolve(cal.inputs), imported.graph, cal.samples, where)


def prefill_feeds(decoder: Any, ids: np.ndarray, input_dtypes: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Prefill feeds for token windows ``ids`` [batch, seq]: the ids, a full mask and positions 0..seq-1
    (where the model has such inputs, the keys of ``input_dtypes``) and an empty KV cache whose dtype is the
    model's (``input_dtypes``; the DecoderSpec's kv_dtype where it gives none)."""
    batch, seq = ids.shape
    feeds: dict[str, np.ndarray] = {"input_ids": ids}
    if "attention_mask" in input_dtypes:
        feeds["attention_mask"] = np.ones((batch, seq), np.int64)
    if "position_ids" in input_dtypes:
        feeds["position_ids"] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    for i in range(decoder.num_layers):
        for pattern in (decoder.past_key, decoder.past_value):
            name = pattern.format(i=i)
            dtype = input_dtypes.get(name) or decoder.kv_dtype
            feeds[name] = np.zeros((batch, decoder.num_kv_heads, 0, decoder.head_dim), dtype)
    return feeds


def decoder_feeds(graph: Any, decoder: Any, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """``prefill_feeds`` of one token window for the IR ``graph``."""
    from llmc.ir import onnx_dtype_to_np

    dtypes = {}
    for name in graph.inputs:
        info = graph.value_info(name)
        dtypes[name] = onnx_dtype_to_np(info.dtype) if info and info.dtype else None
    return prefill_feeds(decoder, np.asarray(ids, np.int64)[None, :], dtypes)


def _decoder_set(spec: Any, imported: Any, where: Any) -> CalibrationSet:
    from llmc.runtime.tokenizer import Tokenizer

    cal = spec.calibration
    if "tokenizer.json" not in imported.assets:
        raise SpecError(
            "calibration text needs the model's tokenizer.json, and this model has none", location=where
        )
    tokenizer = Tokenizer.from_files(imported.assets)
    windows = [tokenizer.encode(p)[: cal.max_tokens] for p in cal.prompts]
    if cal.text or not cal.prompts:
        path = spec.resolve(cal.text) if cal.text else DEFAULT_TEXT
        if not path.is_file():
            raise SpecError(
                f"calibration text file not found: {path}", location=spec.locate(("calibration", "text"))
            )
        ids = tokenizer.encode(path.read_text(), add_special_tokens=False)
        windows += [ids[i : i + cal.max_tokens] for i in range(0, len(ids) - 1, cal.max_tokens)]
    windows = [w for w in windows if len(w) >= 2][: cal.samples]
    if not windows:
        raise SpecError("calibration text gives no window of 2 tokens or more", location=where)
    feeds = [decoder_feeds(imported.graph, imported.decoder, w) for w in windows]
    source = f"{len(windows)} token windows of <= {cal.max_tokens} tokens"
    return CalibrationSet(feeds, source, tokens=windows)


def _array_set(path: Path, graph: Any, samples: int, where: Any) -> CalibrationSet:
    from llmc.golden import load_inputs
    from llmc.ir import onnx_dtype_to_np
    from llmc.runtime.runner import TensorSig

    signature = []
    for name in graph.inputs:
        info = graph.value_info(name)
        dtype = str(onnx_dtype_to_np(info.dtype)) if info and info.dtype else "float32"
        signature.append(TensorSig(name, dtype, None if info is None else info.shape))
    if not path.exists():
        raise SpecError(f"calibration inputs not found: {path}", location=where)
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not files:
        raise SpecError(f"calibration folder {path} holds no .npz file", location=where)
    feeds: list[dict[str, np.ndarray]] = []
    for file in files:
        try:
            feeds += load_inputs(file, signature)
        except SpecError as exc:
            raise SpecError(exc.detail, location=where) from None
    for k, feed in enumerate(feeds):
        for sig in signature:
            _check_shape(sig, feed[sig.name], f"{path.name} sample {k}", where)
    return CalibrationSet(feeds[:samples], f"{min(len(feeds), samples)} samples from {path.name}")


def _check_shape(sig: Any, value: np.ndarray, label: str, where: Any) -> None:
    shape = sig.shape
    if shape is None:
        return
    wrong = len(shape) != value.ndim or any(
        isinstance(d, int) and d >= 0 and d != v for d, v in zip(shape, value.shape, strict=False)
    )
    if wrong:
        raise SpecError(
            f"{label}: input '{sig.name}' has shape {list(value.shape)}, the model takes {list(shape)}",
            location=where,
        )


def activations(
    graph: Any, names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]]
) -> Iterator[dict[str, np.ndarray]]:
    """Per feed, the values ``names`` of ``graph`` computed by onnxruntime (fp32 kernels, basic fusions only),
    on a session that reads the graph's weights in place (``llmc.runtime.graph_session``)."""
    from llmc.runtime.graph_session import graph_runner

    names = list(dict.fromkeys(names))
    with graph_runner(graph, "basic", extra_outputs=names) as runner:
        declared = {sig.name: sig.shape or () for sig in runner.inputs}
        for feed in feeds:
            fitted = {k: _fit_empty(v, list(declared[k])) for k, v in feed.items() if k in declared}
            yield runner.run(fitted, names)


def _fit_empty(value: np.ndarray, shape: list) -> np.ndarray:
    """An empty feed (a decoder's past KV cache at prefill) in the graph's current static dims: a pass that
    removed kv heads changed them after the calibration set was built."""
    if value.size or len(shape) != value.ndim:
        return value
    dims = [d if isinstance(d, int) and v != 0 else v for d, v in zip(shape, value.shape, strict=True)]
    return np.zeros(dims, value.dtype)


def gram_matrices(
    graph: Any, names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]], *, diagonal: bool = False
) -> dict[str, np.ndarray]:
    """Per activation name, XᵀX [K, K] (float64) summed over the feeds, X being the activation's rows
    [tokens, K]; with ``diagonal`` only Σ x_k² [K] (the full matrices of a whole LLM need not fit)."""
    sums: dict[str, np.ndarray] = {}
    for values in activations(graph, sorted(set(names)), feeds):
        for name, value in values.items():
            flat = np.asarray(value, np.float64).reshape(-1, value.shape[-1])
            stat = np.einsum("ij,ij->j", flat, flat) if diagonal else flat.T @ flat
            sums[name] = sums[name] + stat if name in sums else stat
    return sums
