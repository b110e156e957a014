"""Autoregressive generation over a decoder graph with a KV cache: prefill once, then one token per step.

``Generator`` drives any ``Runner`` whose model follows the ``DecoderSpec`` naming; ``TorchGenerator`` runs the
same loop on a PyTorch transformers model (the eager reference of golden checks and bench baselines). Both
share ``generate`` (greedy or temperature / top-p / top-k sampling, streaming, timing) and
``teacher_forced_agreement`` (greedy next tokens compared with a reference sequence while the reference is fed).
``load_artifact_generator`` opens a compiled text-generation artifact (a folder with ``manifest.json``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import ModelError
from llmc.frontends.base import DecoderSpec
from llmc.runtime.runner import Runner
from llmc.runtime.tokenizer import StreamDecoder, Tokenizer

StreamCallback = Callable[[int, str], None]


@dataclass
class GenerationResult:
    """New tokens, their text, and timings: ``prefill_ms`` covers the prompt and the first new token;
    ``decode_tokens_per_s`` counts the tokens of the decode steps that followed it."""

    tokens: list[int]
    prompt_tokens: list[int]
    text: str | None
    prefill_ms: float
    decode_ms: float
    decode_tokens_per_s: float
    stop_reason: str
    step_ms: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "step_ms"}


@dataclass
class Agreement:
    """Teacher-forced token agreement of a candidate with a reference continuation."""

    matches: int
    total: int
    first_mismatch: int | None
    predicted: list[int]

    @property
    def ratio(self) -> float:
        return self.matches / self.total if self.total else 1.0


@dataclass
class SamplingConfig:
    """Greedy when ``greedy`` (or temperature 0); otherwise temperature, then top-k and top-p filtering."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ModelError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ModelError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ModelError(f"top_k must be >= 0, got {self.top_k}")


def pick_token(logits: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> int:
    """The next token from one row of logits."""
    if sampling.greedy or sampling.temperature == 0:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        kth = np.partition(scores, -sampling.top_k)[-sampling.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if sampling.top_p < 1:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))


class DecoderLoop:
    """Prefill/step over a KV cache kept between calls, and the generation loop built on them.

    Subclasses implement ``reset`` and ``_forward(ids [batch, seq]) -> last-position logits [batch, vocab]``,
    which appends ``ids`` to the cache.
    """

    decoder: DecoderSpec
    tokenizer: Tokenizer | None
    length: int = 0

    def reset(self) -> None:
        raise NotImplementedError

    def _total_after(self, seq: int) -> int:
        """Cache length once ``seq`` more tokens are appended; a ModelError past the model's max_length."""
        total = self.length + seq
        if total > self.decoder.max_length:
            raise ModelError(f"{total} tokens exceed the model's max_length {self.decoder.max_length}")
        return total

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _as_batch(ids: Sequence[int] | np.ndarray) -> np.ndarray:
        array = np.asarray(ids, dtype=np.int64)
        return array[None, :] if array.ndim == 1 else array

    def prefill(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Start over with a prompt ([seq] or [batch, seq]); returns the logits of its last position."""
        batch = self._as_batch(ids)
        if batch.shape[1] == 0:
            raise ModelError("empty prompt: give at least one token")
        if batch.shape[1] > self.decoder.max_length:
            raise ModelError(
                f"prompt of {batch.shape[1]} tokens is longer than the model's max_length {self.decoder.max_length}"
            )
        self.reset()
        return self._forward(batch)

    def step(self, tokens: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """Append one token per batch row to the cache; returns the next logits [batch, vocab]."""
        if self.length >= self.decoder.max_length:
            raise ModelError(f"the KV cache is full (max_length {self.decoder.max_length})")
        column = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        return self._forward(column)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ModelError("this model has no tokenizer: give prompt token ids instead of text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        *,
        sampling: SamplingConfig | None = None,
        stream: StreamCallback | None = None,
        stop_at_eos: bool = True,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after the prompt (text or token ids), batch 1."""
        sampling = sampling or SamplingConfig()
        rng = np.random.default_rng(sampling.seed)
        prompt_ids = self.encode(prompt)
        if max_new_tokens < 1:
            raise ModelError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        budget = min(max_new_tokens, self.decoder.max_length - len(prompt_ids) + 1)
        eos = set(self.decoder.eos_token_ids) if stop_at_eos else set()
        streamer = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None

        start = time.perf_counter()
        logits = self.prefill(prompt_ids)
        token = pick_token(logits[0], sampling, rng)
        prefill_ms = (time.perf_counter() - start) * 1e3
        tokens = [token]
        step_ms: list[float] = []
        stop_reason = "max_new_tokens"
        while True:
            if stream is not None:
                stream(token, streamer.push(token) if streamer else "")
            if token in eos:
                stop_reason = "eos"
                break
            if len(tokens) >= budget:
                stop_reason = "max_new_tokens" if budget == max_new_tokens else "max_length"
                break
            t0 = time.perf_counter()
            logits = self.step(token)
            token = pick_token(logits[0], sampling, rng)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            tokens.append(token)
        decode_ms = float(sum(step_ms))
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
        return GenerationResult(
            tokens=tokens,
            prompt_tokens=prompt_ids,
            text=text,
            prefill_ms=prefill_ms,
            decode_ms=decode_ms,
            decode_tokens_per_s=len(step_ms) / (decode_ms / 1e3) if decode_ms > 0 else 0.0,
            stop_reason=stop_reason,
            step_ms=step_ms,
        )

    def logits_sequence(self, ids: Sequence[int]) -> np.ndarray:
        """Last-position logits after each token of ``ids`` fed one by one after the first ([len, vocab])."""
        rows = [self.prefill(ids[:1])[0]]
        rows += [self.step(t)[0] for t in ids[1:]]
        return np.stack(rows)


def teacher_forced_agreement(
    candidate: DecoderLoop, prompt: str | Sequence[int], reference_tokens: Sequence[int]
) -> Agreement:
    """Feed ``prompt`` then the reference tokens; count where the candidate's greedy next token equals them."""
    prompt_ids = candidate.encode(prompt)
    reference = [int(t) for t in reference_tokens]
    if not reference:
        return Agreement(0, 0, None, [])
    predicted = [int(np.argmax(candidate.prefill(prompt_ids)[0]))]
    for token in reference[:-1]:
        predicted.append(int(np.argmax(candidate.step(token)[0])))
    hits = [p == r for p, r in zip(predicted, reference, strict=True)]
    first = next((i for i, ok in enumerate(hits) if not ok), None)
    return Agreement(sum(hits), len(reference), first, predicted)


class Generator(DecoderLoop):
    """Generation over a Runner whose model follows the DecoderSpec naming (inputs it lacks are not fed)."""

    def __init__(self, runner: Runner, decoder: DecoderSpec, tokenizer: Tokenizer | None = None):
        self.runner = runner
        self.decoder = decoder
        self.tokenizer = tokenizer
        inputs = {sig.name: sig for sig in runner.inputs}
        outputs = {sig.name for sig in runner.outputs}
        n = decoder.num_layers
        self._past = (
            [decoder.past_key.format(i=i) for i in range(n)],
            [decoder.past_value.format(i=i) for i in range(n)],
        )
        self._present = (
            [decoder.present_key.format(i=i) for i in range(n)],
            [decoder.present_value.format(i=i) for i in range(n)],
        )
        past_names = [name for pair in zip(*self._past, strict=True) for name in pair]
        present_names = [name for pair in zip(*self._present, strict=True) for name in pair]
        missing = [name for name in ("input_ids", *past_names) if name not in inputs]
        missing += [name for name in ("logits", *present_names) if name not in outputs]
        if missing:
            raise ModelError(
                f"the model is not a decoder with a KV cache as its DecoderSpec says: missing {', '.join(missing[:4])}"
                + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            )
        self._past_names = past_names
        self._output_names = ["logits", *present_names]
        self._feeds_mask = "attention_mask" in inputs
        self._feeds_positions = "position_ids" in inputs
        self._kv_dtype = (
            np.dtype(inputs[past_names[0]].dtype or decoder.kv_dtype) if past_names else np.float32
        )
        self._cache: list[np.ndarray] = []
        self.length = 0

    def reset(self) -> None:
        self._cache = []
        self.length = 0

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        batch, seq = ids.shape
        total = self._total_after(seq)
        if not self._cache:
            shape = (batch, self.decoder.num_kv_heads, 0, self.decoder.head_dim)
            self._cache = [np.zeros(shape, self._kv_dtype) for _ in self._past_names]
        feeds: dict[str, np.ndarray] = {"input_ids": ids}
        if self._feeds_mask:
            feeds["attention_mask"] = np.ones((batch, total), np.int64)
        if self._feeds_positions:
            feeds["position_ids"] = np.broadcast_to(
                np.arange(self.length, total, dtype=np.int64), (batch, seq)
            ).copy()
        feeds.update(zip(self._past_names, self._cache, strict=True))
        out = self.runner.run(feeds, self._output_names)
        self._cache = [out[name] for name in self._output_names[1:]]
        self.length = total
        return out["logits"][:, -1, :]


class TorchGenerator(DecoderLoop):
    """The same loop on a PyTorch transformers causal LM (eager, float32, ``DynamicCache``)."""

    def __init__(self, model: Any, decoder: DecoderSpec | None = None, tokenizer: Tokenizer | None = None):
        import torch

        from llmc.frontends import hf

        self._torch = torch
        self._hf = hf
        self.model = model.eval()
        if decoder is None:
            layers, kv_heads, head_dim = hf.cache_geometry(model.config)
            eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
            decoder = DecoderSpec(
                num_layers=layers,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                vocab_size=int(model.config.get_text_config().vocab_size),
                max_length=int(getattr(model.config.get_text_config(), "max_position_embeddings", 2048)),
                eos_token_ids=[] if eos is None else list(eos) if isinstance(eos, list) else [int(eos)],
            )
        self.decoder = decoder
        self.tokenizer = tokenizer
        self._cache = None
        self.length = 0

    def reset(self) -> None:
        self._cache = None
        self.length = 0

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        torch = self._torch
        batch, seq = ids.shape
        total = self.length + seq
        if self._cache is None:
            from transformers import DynamicCache

            self._cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            logits, self._cache = self._hf.decoder_forward(
                self.model,
                torch.from_numpy(ids),
                torch.ones(batch, total, dtype=torch.int64),
                torch.arange(self.length, total).expand(batch, seq),
                self._cache,
            )
        self.length = total
        return logits[:, -1, :].float().numpy()


# -- artifacts -------------------------------------------------------------------------------------------
def load_artifact_runner(artifact_dir: Path, threads: int | None = None) -> tuple[Runner, dict[str, Any]]:
    """The runner an artifact's target builds (session settings from its manifest, ``threads`` overriding
    its intra-op threads), and the manifest."""
    from llmc.runtime.artifact import load_artifact

    return load_artifact(artifact_dir, intra_op_threads=threads)


def artifact_assets(artifact_dir: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    """Asset name -> path on disk (only those present)."""
    assets = {name: Path(artifact_dir) / rel for name, rel in (manifest.get("assets") or {}).items()}
    return {name: path for name, path in assets.items() if path.is_file()}


def artifact_tokenizer(artifact_dir: Path, manifest: dict[str, Any]) -> Tokenizer | None:
    assets = artifact_assets(artifact_dir, manifest)
    return Tokenizer.from_files(assets) if "tokenizer.json" in assets else None


def artifact_decoder(manifest: dict[str, Any]) -> DecoderSpec:
    if manifest.get("task") != "text-generation" or not manifest.get("decoder"):
        raise ModelError(
            f"the artifact's task is '{manifest.get('task')}', not text-generation with a decoder spec: "
            "it cannot generate text"
        )
    return DecoderSpec.from_json(manifest["decoder"])


def load_artifact_generator(artifact_dir: Path) -> Generator:
    """A Generator over a text-generation artifact, with its tokenizer when it carries one."""
    runner, manifest = load_artifact_runner(artifact_dir)
    return Generator(runner, artifact_decoder(manifest), artifact_tokenizer(artifact_dir, manifest))
