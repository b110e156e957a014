"""Accuracy metrics of a compiled model against its reference, shared by compile-time verification and bench.

Decoders: greedy token agreement free-running (both models generate on their own from the prompt; leading
tokens equal and equal positions overall; the teacher-forced variant is ``teacher_forced_agreement`` in
``llmc.runtime.generator``) and perplexity on a text. Perplexity is computed token by token through the KV
cache (``prefill`` of a window's first token, then ``step``), because a compiled graph may return logits for
the last position only (the ``logits-last-token`` pass): this way it works on every artifact. The text is cut
into windows of N tokens; the first token of each window is context only, every later one is scored.
Encoders: cosine to the reference per sample (mean and min). Classifiers: top-1 agreement.

``MetricCheck`` pairs a value with the spec's threshold; ``metrics_markdown`` renders the checks as the table
that compile reports and verification errors show. Evaluation harnesses (lm-eval and the like) compute
perplexity from full-sequence logits of a PyTorch model and cannot drive an ONNX graph through its KV cache,
hence these few hand-written functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import ModelError

DEFAULT_EVAL_TEXT = Path(__file__).with_name("data") / "eval.txt"


# -- checks and their table -------------------------------------------------------------------------------
@dataclass
class MetricCheck:
    """One metric and its threshold (None: reported, not checked); ``higher_is_better`` says which side passes."""

    name: str
    value: float
    threshold: float | None = None
    higher_is_better: bool = True
    detail: str = ""

    @property
    def passed(self) -> bool:
        if self.threshold is None:
            return True
        if not math.isfinite(self.value):
            return False
        if self.higher_is_better:
            return self.value >= self.threshold - 1e-12
        return self.value <= self.threshold + 1e-12

    @property
    def result(self) -> str:
        if self.threshold is None:
            return "reported"
        return "pass" if self.passed else "FAIL"

    def threshold_text(self) -> str:
        if self.threshold is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<='} {self.threshold:.4g}"

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "passed": self.passed}


def metrics_markdown(checks: Sequence[MetricCheck]) -> str:
    """The checks as a markdown table: metric, value, threshold, result, detail."""
    lines = ["| metric | value | threshold | result | detail |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.name} | {c.value:.4f} | {c.threshold_text()} | {c.result} | {c.detail} |")
    return "\n".join(lines)


# -- decoders ------------------------------------------------------------------------------------------
@dataclass
class FreeRunning:
    """Greedy continuations generated independently: ``leading`` tokens equal before the first difference,
    ``equal`` positions equal overall, of ``total``."""

    leading: int
    equal: int
    total: int
    tokens: list[int] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.leading / self.total if self.total else 1.0


def free_running_agreement(
    candidate: Any, prompt: str | Sequence[int], reference_tokens: Sequence[int]
) -> FreeRunning:
    """Let ``candidate`` (a DecoderLoop) continue ``prompt`` greedily for as many tokens as the reference's
    own greedy continuation ``reference_tokens`` (end-of-sequence ignored) and compare position by position."""
    reference = [int(t) for t in reference_tokens]
    if not reference:
        return FreeRunning(0, 0, 0)
    tokens = candidate.generate(prompt, len(reference), stop_at_eos=False).tokens
    hits = [a == b for a, b in zip(tokens, reference, strict=False)]
    leading = next((i for i, ok in enumerate(hits) if not ok), len(hits))
    return FreeRunning(leading, sum(hits), len(reference), tokens)


@dataclass
class Perplexity:
    """Summed negative log-likelihood (nats) of ``tokens`` scored tokens; ``value`` = exp(mean NLL)."""

    nll: float
    tokens: int
    windows: int

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"perplexity": self.value, "nll": self.nll, "tokens": self.tokens, "windows": self.windows}


def token_windows(ids: Sequence[int], window: int) -> list[list[int]]:
    """``ids`` cut into consecutive windows of ``window`` tokens; a last window shorter than 2 is dropped."""
    if window < 2:
        raise ModelError(f"perplexity windows need at least 2 tokens, got {window}")
    chunks = [list(ids[i : i + window]) for i in range(0, len(ids), window)]
    return [c for c in chunks if len(c) >= 2]


def _nll(logits: np.ndarray, target: int) -> float:
    row = np.asarray(logits, dtype=np.float64)
    top = row.max()
    return float(top + np.log(np.exp(row - top).sum()) - row[target])


def perplexity(loop: Any, ids: Sequence[int], window: int = 128) -> Perplexity:
    """Perplexity of ``loop`` (a DecoderLoop) on ``ids``, windows of ``window`` tokens (at most the model's
    max_length), fed one token at a time through the KV cache."""
    window = min(window, loop.decoder.max_length)
    chunks = token_windows(ids, window)
    if not chunks:
        raise ModelError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    nll, scored = 0.0, 0
    for chunk in chunks:
        logits = loop.prefill(chunk[:1])[0]
        for position, target in enumerate(chunk[1:], start=1):
            nll += _nll(logits, target)
            scored += 1
            if position < len(chunk) - 1:
                logits = loop.step(target)[0]
    return Perplexity(nll, scored, len(chunks))


def eval_tokens(tokenizer: Any, path: Path | None = None, count: int = 128) -> list[int]:
    """The first ``count`` token ids of a text file (default: the shipped ``data/eval.txt``)."""
    path = Path(path) if path is not None else DEFAULT_EVAL_TEXT
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read the perplexity text {path}: {exc}") from None
    ids = tokenizer.encode(text, add_special_tokens=False)[:count]
    if len(ids) < 2:
        raise ModelError(f"the perplexity text {path} gives {len(ids)} token(s); at least 2 are needed")
    return ids


# -- encoders and classifiers -----------------------------------------------------------------------------
@dataclass
class CosineStats:
    """Cosine similarity to the reference per sample: mean, min, and how many samples."""

    mean: float
    min: float
    samples: int


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine per sample (row of the first axis, the rest flattened); two all-zero rows count as 1."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    out = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if ref.shape != out.shape:
        raise ModelError(f"cannot compare outputs of shapes {ref.shape} and {out.shape}")
    dot = (ref * out).sum(1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(out, axis=1) == 0)
    cos = np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)
    return np.where(both_zero, 1.0, cos)


def cosine_stats(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> CosineStats:
    """Per-sample cosines over (reference, candidate) batches."""
    cosines = np.concatenate([row_cosines(ref, out) for ref, out in pairs]) if pairs else np.ones(0)
    if not cosines.size:
        return CosineStats(1.0, 1.0, 0)
    return CosineStats(float(cosines.mean()), float(cosines.min()), int(cosines.size))


def top1_agreement(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """(matches, total): rows whose argmax over the last axis is the same in reference and candidate."""
    matches = total = 0
    for ref, out in pairs:
        a = np.asarray(ref).reshape(-1, np.shape(ref)[-1]).argmax(-1)
        b = np.asarray(out).reshape(-1, np.shape(out)[-1]).argmax(-1)
        if a.shape != b.shape:
            raise ModelError(f"cannot compare outputs of shapes {np.shape(ref)} and {np.shape(out)}")
        matches += int((a == b).sum())
        total += int(a.size)
    return matches, total
