"""Benchmarks of a compiled artifact beside its baselines, timed side by side in one process.

Candidates: ``llmc`` (the artifact as its manifest says to run it), ``onnx-plain`` (the plain export kept in
the artifact as ``source.reference_onnx``, default onnxruntime settings) and ``pytorch`` (the eager float32
transformers model the artifact was built from). Decoders: prefill latency of a fixed prompt and decode
tokens/s over greedy generation (warm-up, then medians over N runs), plus, unless accuracy is turned off,
teacher-forced token agreement with the fp32 reference (pytorch when benchmarked, else the plain export) over
a few prompts and perplexity on llmc's shipped evaluation text (``llmc.metrics``). Encoders: latency per batch
and the cosine (min and mean) of the mean-pooled embedding to the reference. All candidates stay loaded and their runs are interleaved, so noise
from a busy machine falls on all of them. Each also reports its load time, size on disk and how much the
process grew while loading and warming it up; the process's peak RSS, the CPU model and its flags are recorded
with every result, since figures only compare within one run on one machine.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import ModelError
from llmc.metrics import cosine_stats
from llmc.runtime.generator import (
    DecoderLoop,
    GenerationResult,
    Generator,
    SamplingConfig,
    TorchGenerator,
    artifact_decoder,
    artifact_tokenizer,
    load_artifact_runner,
    teacher_forced_agreement,
)
from llmc.runtime.runner import OrtRunner
from llmc.runtime.tokenizer import Tokenizer
from llmc.targets.base import read_manifest

BASELINES = ("pytorch", "onnx-plain")
ARTIFACT = "llmc"
# CPU features that decide which kernels (and which quantization schemes) pay off.
CPU_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
PROMPT_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by rewiring them; then "
    "came stored programs, assemblers, compilers and operating systems, each hiding the layer below. "
)


# -- machine and memory --------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU model, the flags that matter for kernels, core count and library versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "cpu_model" not in info:
            info["cpu_model"] = value.strip()
        if key.strip() == "flags" and "cpu_flags" not in info:
            flags = set(value.split())
            info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples RSS on a thread while active: ``start`` (bytes before) and ``peak`` (bytes, highest seen)."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def file_size(path: Path) -> int:
    """Bytes of an ONNX model on disk, external data included."""
    from llmc.frontends.export import onnx_size

    return onnx_size(path)


# -- candidates ----------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """A thing to benchmark: ``load()`` returns a DecoderLoop (decoders) or a batch -> embeddings function."""

    name: str
    load: Callable[[], Any]
    size_bytes: int


def reference_model(artifact_dir: Path, manifest: dict[str, Any]) -> Any:
    """The eager float32 PyTorch model an artifact was built from (hf and gguf sources only).

    The frontends record the Hugging Face folder they exported (for GGUF, the dequantized cache) as
    ``source.hf_folder``; without it, ``source.path`` is read again (relative paths: to the artifact, then cwd).
    """
    from llmc.frontends.hf import load_hf_model

    source = manifest.get("source") or {}
    kind = source.get("kind")
    if kind not in ("hf", "gguf"):
        raise ModelError(
            f"the pytorch baseline needs an hf or gguf source; this artifact was built from '{kind}'"
        )
    task = manifest.get("task", "text-generation")
    folder = source.get("hf_folder")
    if folder and (Path(folder) / "config.json").is_file():
        return load_hf_model(Path(folder), task=task)
    raw = source.get("path")
    if not raw:
        raise ModelError("the artifact's manifest records no source path: no pytorch baseline")
    path = Path(raw)
    if not path.is_absolute() and (Path(artifact_dir) / path).exists():
        path = Path(artifact_dir) / path
    if kind == "gguf":
        from llmc.frontends.gguf import dequantized_folder

        path, _ = dequantized_folder(path)
    return load_hf_model(path, task=task)


def _threads(manifest: dict[str, Any]) -> int:
    runtime = manifest.get("runtime") or manifest.get("session") or {}
    return int(runtime.get("intra_op_threads") or os.cpu_count() or 1)


def candidates(
    artifact_dir: Path,
    manifest: dict[str, Any],
    baselines: Sequence[str],
    against: Sequence[Path] = (),
    threads: int | None = None,
) -> tuple[list[Candidate], dict[str, str]]:
    """The artifact, the baselines that can be built for it (``skipped`` maps the others to why not) and the
    other artifacts ``against`` (each with its own decoder interface: a pruned model may have fewer layers),
    all with ``threads`` intra-op threads (default: the artifact's)."""
    artifact_dir = Path(artifact_dir)
    task = manifest.get("task")
    threads = threads or _threads(manifest)
    decoder = artifact_decoder(manifest) if task == "text-generation" else None
    tokenizer = artifact_tokenizer(artifact_dir, manifest) if decoder else None
    found: list[Candidate] = []
    skipped: dict[str, str] = {}
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ModelError(f"unknown baseline(s) {', '.join(unknown)} (use: {', '.join(BASELINES)})")

    def wrap_runner(runner: OrtRunner) -> Any:
        return Generator(runner, decoder, tokenizer) if decoder else _ort_encoder(runner)

    if "pytorch" in baselines:
        kind = (manifest.get("source") or {}).get("kind")
        if kind not in ("hf", "gguf"):
            skipped["pytorch"] = (
                f"needs the hf or gguf model the artifact was built from; its source is '{kind}'"
            )
        else:

            def load_pytorch() -> Any:
                import torch

                torch.set_num_threads(threads)
                model = reference_model(artifact_dir, manifest)
                return TorchGenerator(model, decoder, tokenizer) if decoder else _torch_encoder(model)

            found.append(Candidate("pytorch", load_pytorch, 0))
    if "onnx-plain" in baselines:
        ref = (manifest.get("source") or {}).get("reference_onnx")
        if not ref or not (artifact_dir / ref).is_file():
            skipped["onnx-plain"] = "the artifact keeps no reference ONNX (source.reference_onnx)"
        else:
            ref_path = artifact_dir / ref
            found.append(
                Candidate(
                    "onnx-plain",
                    lambda: wrap_runner(OrtRunner(ref_path, intra_op_threads=threads)),
                    file_size(ref_path),
                )
            )
    model_path = artifact_dir / manifest["model"]
    found.append(
        Candidate(
            ARTIFACT,
            lambda: wrap_runner(load_artifact_runner(artifact_dir, threads)[0]),
            file_size(model_path),
        )
    )
    for other in map(Path, against):
        other_manifest = read_manifest(other)
        if other_manifest.get("task") != task:
            raise ModelError(f"{other} is a '{other_manifest.get('task')}' artifact, {artifact_dir} '{task}'")
        size = file_size(other / other_manifest["model"])
        found.append(Candidate(other.name, _artifact_loader(other, other_manifest, threads), size))
    return found, skipped


def _artifact_loader(artifact_dir: Path, manifest: dict[str, Any], threads: int) -> Callable[[], Any]:
    def load() -> Any:
        runner = load_artifact_runner(artifact_dir, threads)[0]
        if manifest.get("task") != "text-generation":
            return _ort_encoder(runner)
        return Generator(runner, artifact_decoder(manifest), artifact_tokenizer(artifact_dir, manifest))

    return load


# -- decoders -------------------------------------------------------------------------------------------
def bench_prompt(tokenizer: Tokenizer | None, vocab_size: int, length: int) -> list[int]:
    """A fixed prompt of ``length`` tokens: English text when there is a tokenizer, else seeded ids."""
    if tokenizer is not None:
        ids: list[int] = []
        while len(ids) < length:
            ids += tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
        return ids[:length]
    rng = np.random.default_rng(0)
    return [int(t) for t in rng.integers(3, vocab_size, length)]


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


@dataclass
class Loaded:
    """A loaded candidate; ``rss_mb`` is how much the process grew while loading and warming it up."""

    candidate: Candidate
    obj: Any
    load_s: float
    rss_mb: float

    @property
    def size_mb(self) -> float:
        size = self.candidate.size_bytes
        model = getattr(self.obj, "model", None)
        if not size and model is not None and hasattr(model, "parameters"):
            size = sum(p.numel() * p.element_size() for p in model.parameters())
        return round(size / 2**20, 1)

    def row(self) -> dict[str, Any]:
        return {
            "name": self.candidate.name,
            "load_s": round(self.load_s, 2),
            "size_mb": self.size_mb,
            "rss_mb": round(self.rss_mb, 1),
        }


def load_all(found: Sequence[Candidate], warm: Callable[[Any], None]) -> list[Loaded]:
    """Load every candidate (one after the other, measuring each one's RSS growth) and warm it up."""
    loaded = []
    for cand in found:
        with PeakRss() as rss:
            t0 = time.perf_counter()
            obj = cand.load()
            load_s = time.perf_counter() - t0
            warm(obj)
        loaded.append(Loaded(cand, obj, load_s, (rss.peak - rss.start) / 2**20))
    return loaded


def _process_peak_mb() -> float:
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
    except (ImportError, OSError):
        return 0.0


def accuracy_prompts(tokenizer: Tokenizer | None, prompt: list[int]) -> list[list[int]]:
    """Prompts for token agreement: the bench prompt, and the default verify prompts when there is text."""
    if tokenizer is None:
        return [prompt]
    from llmc.spec import VerifySpec

    return [prompt] + [tokenizer.encode(p) for p in VerifySpec().prompts]


def reference_loop(
    artifact_dir: Path, manifest: dict[str, Any], loaded: Sequence[Loaded]
) -> tuple[str, DecoderLoop] | None:
    """The fp32 reference for accuracy: pytorch or onnx-plain when benchmarked, else the artifact's
    reference ONNX loaded for this alone; None when there is none."""
    by_name = {item.candidate.name: item.obj for item in loaded}
    for name in BASELINES:
        if name in by_name:
            return name, by_name[name]
    found, _ = candidates(artifact_dir, manifest, ["onnx-plain"])
    plain = [c for c in found if c.name == "onnx-plain"]
    return ("onnx-plain", plain[0].load()) if plain else None


def decoder_accuracy(
    loops: dict[str, DecoderLoop],
    reference: tuple[str, DecoderLoop],
    prompts: Sequence[list[int]],
    new_tokens: int,
    perplexity_ids: Sequence[int] | None,
    perplexity_window: int,
) -> dict[str, dict[str, Any]]:
    """Per candidate: teacher-forced greedy tokens equal to the reference's continuations (summed over
    prompts; the reference itself is not compared with itself) and perplexity on the text, with its ratio
    to the reference's."""
    from llmc.metrics import perplexity

    ref_name, ref_loop = reference
    continuations = [ref_loop.generate(p, new_tokens, stop_at_eos=False).tokens for p in prompts]
    ref_ppl = perplexity(ref_loop, perplexity_ids, perplexity_window) if perplexity_ids else None
    rows: dict[str, dict[str, Any]] = {}
    for name, loop in loops.items():
        row: dict[str, Any] = {}
        if name != ref_name:
            agreements = [
                teacher_forced_agreement(loop, p, c) for p, c in zip(prompts, continuations, strict=True)
            ]
            row |= {
                "tokens_agree": sum(a.matches for a in agreements),
                "tokens_total": sum(a.total for a in agreements),
                "tokens_agree_per_prompt": [a.matches for a in agreements],
                "first_mismatch": [a.first_mismatch for a in agreements],
            }
        if ref_ppl is not None:
            ppl = ref_ppl if name == ref_name else perplexity(loop, perplexity_ids, perplexity_window)
            row |= {
                "perplexity": round(ppl.value, 4),
                "perplexity_ratio": round(ppl.value / ref_ppl.value, 4),
            }
        rows[name] = row
    return rows


def bench_decoder(
    artifact_dir: Path,
    *,
    baselines: Sequence[str] = BASELINES,
    prompt_len: int = 128,
    new_tokens: int = 64,
    runs: int = 5,
    warmup: int = 1,
    accuracy: bool = True,
    perplexity_tokens: int = 128,
    perplexity_window: int = 128,
    against: Sequence[Path] = (),
    threads: int | None = None,
) -> dict[str, Any]:
    """Prefill latency and decode tokens/s of the artifact and its baselines (greedy, batch 1, eos ignored),
    and unless ``accuracy`` is off, teacher-forced token agreement with the fp32 reference and perplexity on
    llmc's shipped evaluation text (the first ``perplexity_tokens`` tokens).

    The candidates' runs are interleaved (run 1 of each, then run 2 of each...), so that a busy machine slows
    them alike rather than whichever happened to run at the wrong moment. ``against`` adds other artifacts
    (a pruned and an unpruned build, say), timed the same way, with a speed ratio to the artifact.
    """
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    decoder = artifact_decoder(manifest)
    if prompt_len < 1 or prompt_len + new_tokens > decoder.max_length:
        raise ModelError(
            f"prompt {prompt_len} + {new_tokens} new tokens do not fit the model's max_length {decoder.max_length}"
        )
    if runs < 1 or new_tokens < 1:
        raise ModelError(f"runs and new tokens must be >= 1, got {runs} and {new_tokens}")
    found, skipped = candidates(artifact_dir, manifest, baselines, against, threads)
    tokenizer = artifact_tokenizer(artifact_dir, manifest)
    prompt = bench_prompt(tokenizer, decoder.vocab_size, prompt_len)
    greedy = SamplingConfig()

    def generate(loop: DecoderLoop) -> GenerationResult:
        return loop.generate(prompt, new_tokens, sampling=greedy, stop_at_eos=False)

    loaded = load_all(found, lambda loop: [generate(loop) for _ in range(warmup)])
    timed: dict[str, list[GenerationResult]] = {item.candidate.name: [] for item in loaded}
    for _ in range(runs):
        for item in loaded:
            timed[item.candidate.name].append(generate(item.obj))
    reference_name = loaded[0].candidate.name
    reference = timed[reference_name][-1].tokens
    scores: dict[str, dict[str, Any]] = {}
    accuracy_settings: dict[str, Any] = {"enabled": accuracy}
    if accuracy:
        ref = reference_loop(artifact_dir, manifest, loaded)
        if ref is None:
            accuracy_settings["skipped"] = "no fp32 reference: no pytorch baseline and no reference ONNX kept"
        else:
            from llmc.metrics import eval_tokens

            prompts = accuracy_prompts(tokenizer, prompt)
            ids = eval_tokens(tokenizer, count=perplexity_tokens) if tokenizer and perplexity_tokens else None
            loops = {item.candidate.name: item.obj for item in loaded}
            t0 = time.perf_counter()
            scores = decoder_accuracy(loops, ref, prompts, new_tokens, ids, perplexity_window)
            accuracy_settings["seconds"] = round(time.perf_counter() - t0, 1)
            accuracy_settings |= {
                "reference": ref[0],
                "prompts": len(prompts),
                "new_tokens": new_tokens,
                "perplexity_tokens": len(ids) if ids else 0,
                "perplexity_window": perplexity_window,
                "perplexity_text": "llmc/data/eval.txt" if ids else None,
            }
    rows = []
    for item in loaded:
        results = timed[item.candidate.name]
        rows.append(
            item.row()
            | {
                "prefill_ms": round(_median([r.prefill_ms for r in results]), 2),
                "decode_tokens_per_s": round(_median([r.decode_tokens_per_s for r in results]), 2),
                # Best of N: interference only ever slows a run down, so these show the uncontended speed.
                "prefill_ms_best": round(min(r.prefill_ms for r in results), 2),
                "decode_tokens_per_s_best": round(max(r.decode_tokens_per_s for r in results), 2),
                "prefill_ms_runs": [round(r.prefill_ms, 2) for r in results],
                "decode_tokens_per_s_runs": [round(r.decode_tokens_per_s, 2) for r in results],
                "tokens": results[-1].tokens,
                "greedy_identical": results[-1].tokens == reference,
            }
            | scores.get(item.candidate.name, {})
        )
    del loaded
    gc.collect()
    _add_ratios(rows, "decode_tokens_per_s", higher_is_better=True)
    settings = {
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "runs": runs,
        "warmup": warmup,
        "batch": 1,
        "accuracy": accuracy_settings,
    }
    return {
        "kind": "decoder",
        "artifact": str(artifact_dir),
        "settings": settings,
        "reference": reference_name,
        "prompt_tokens": prompt,
        "machine": machine_info()
        | {"threads": threads or _threads(manifest), "peak_rss_mb": _process_peak_mb()},
        "results": rows,
        "skipped": skipped,
    }


def _add_ratios(rows: list[dict[str, Any]], metric: str, *, higher_is_better: bool) -> None:
    """``x_<base>`` per row: its speed over a baseline's, and over the artifact's when others are compared."""
    by_name = {row["name"]: row for row in rows}
    bases = (
        [*BASELINES, ARTIFACT] if any(r["name"] not in (*BASELINES, ARTIFACT) for r in rows) else BASELINES
    )
    for base in bases:
        if base not in by_name or not by_name[base].get(metric):
            continue
        for row in rows:
            value, ref = row.get(metric), by_name[base][metric]
            if value:
                row[f"x_{base}"] = round(value / ref if higher_is_better else ref / value, 2)


# -- encoders -------------------------------------------------------------------------------------------
def _ort_encoder(runner: OrtRunner) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    names = {sig.name for sig in runner.inputs}
    output = runner.outputs[0].name

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return runner.run({k: v for k, v in feeds.items() if k in names}, [output])[output]

    return run


def _torch_encoder(model: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import inspect

    import torch

    accepted = set(inspect.signature(model.forward).parameters)

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            kwargs = {k: torch.from_numpy(v) for k, v in feeds.items() if k in accepted}
            return model(**kwargs).last_hidden_state.numpy()

    run.model = model  # type: ignore[attr-defined]
    return run


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attention-masked mean over the sequence, L2-normalised (the sentence-transformers embedding)."""
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def encoder_feeds(batch: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000 if vocab > 2000 else 3, vocab, (batch, seq_len)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def bench_encoder(
    artifact_dir: Path,
    *,
    baselines: Sequence[str] = BASELINES,
    batch_sizes: Sequence[int] = (1, 8),
    seq_len: int = 128,
    runs: int = 5,
    warmup: int = 1,
    against: Sequence[Path] = (),
    threads: int | None = None,
) -> dict[str, Any]:
    """Latency per batch of a feature-extraction artifact and its baselines (runs interleaved), and the
    cosine of each one's mean-pooled embedding to the reference's."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    if runs < 1 or not batch_sizes:
        raise ModelError("runs must be >= 1 and at least one batch size is needed")
    vocab = int(_asset_json(artifact_dir, manifest, "config.json").get("vocab_size", 1000))
    found, skipped = candidates(artifact_dir, manifest, baselines, against, threads)
    feeds = {b: encoder_feeds(b, seq_len, vocab) for b in batch_sizes}
    loaded = load_all(found, lambda run: [run(f) for f in feeds.values() for _ in range(warmup)])
    times: dict[tuple[str, int], list[float]] = {(i.candidate.name, b): [] for i in loaded for b in feeds}
    for _ in range(runs):
        for b, batch in feeds.items():
            for item in loaded:
                t0 = time.perf_counter()
                item.obj(batch)
                times[item.candidate.name, b].append((time.perf_counter() - t0) * 1e3)
    reference_name = loaded[0].candidate.name
    embeddings = {
        (i.candidate.name, b): mean_pool(i.obj(batch), batch["attention_mask"])
        for i in loaded
        for b, batch in feeds.items()
    }
    rows = []
    for item in loaded:
        name = item.candidate.name
        cosine = cosine_stats([(embeddings[reference_name, b], embeddings[name, b]) for b in feeds])
        rows.append(
            item.row()
            | {f"latency_ms_b{b}": round(_median(times[name, b]), 2) for b in feeds}
            | {"min_cosine": round(cosine.min, 6), "mean_cosine": round(cosine.mean, 6)}
        )
    del loaded
    gc.collect()
    _add_ratios(rows, f"latency_ms_b{batch_sizes[-1]}", higher_is_better=False)
    return {
        "kind": "encoder",
        "artifact": str(artifact_dir),
        "settings": {"batch_sizes": list(batch_sizes), "seq_len": seq_len, "runs": runs, "warmup": warmup},
        "reference": reference_name,
        "machine": machine_info()
        | {"threads": threads or _threads(manifest), "peak_rss_mb": _process_peak_mb()},
        "results": rows,
        "skipped": skipped,
    }


def _asset_json(artifact_dir: Path, manifest: dict[str, Any], name: str) -> dict[str, Any]:
    import json

    rel = (manifest.get("assets") or {}).get(name)
    path = artifact_dir / rel if rel else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def bench_artifact(artifact_dir: Path, **options: Any) -> dict[str, Any]:
    """``bench_decoder`` or ``bench_encoder`` by the artifact's task; decoder-only options are dropped for
    encoders and the other way round."""
    manifest = read_manifest(Path(artifact_dir))
    task = manifest.get("task")
    decoder_keys = {
        "baselines",
        "prompt_len",
        "new_tokens",
        "runs",
        "warmup",
        "accuracy",
        "against",
        "threads",
    }
    decoder_keys |= {"perplexity_tokens", "perplexity_window"}
    encoder_keys = {"baselines", "batch_sizes", "seq_len", "runs", "warmup", "against", "threads"}
    if task == "text-generation":
        return bench_decoder(artifact_dir, **{k: v for k, v in options.items() if k in decoder_keys})
    if task == "feature-extraction":
        return bench_encoder(artifact_dir, **{k: v for k, v in options.items() if k in encoder_keys})
    raise ModelError(f"no benchmark for task '{task}' (text-generation and feature-extraction have one)")


# -- report ---------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _tokens_cell(row: dict[str, Any], reference: str) -> str | None:
    if row["name"] == reference:
        return "(reference)"
    return f"{row['tokens_agree']}/{row['tokens_total']}" if "tokens_agree" in row else None


def markdown_table(result: dict[str, Any]) -> str:
    """The result as a markdown table, with the machine and settings underneath."""
    rows = result["results"]
    ratios = [f"x_{b}" for b in (*BASELINES, ARTIFACT) if any(f"x_{b}" in r for r in rows)]
    if result["kind"] == "decoder":
        s = result["settings"]
        acc = s.get("accuracy") or {}
        ref = acc.get("reference", "reference")
        head = [
            "candidate",
            f"prefill ms ({s['prompt_len']} tok)",
            "decode tok/s",
            *[f"decode × {r[2:]}" for r in ratios],
            f"tokens = {ref} (teacher-forced)",
            "perplexity",
            f"perplexity × {ref}",
            "MB on disk",
            "RSS +MB",
        ]
        body = [
            [
                r["name"],
                r["prefill_ms"],
                r["decode_tokens_per_s"],
                *[r.get(k) for k in ratios],
                _tokens_cell(r, ref),
                r.get("perplexity"),
                r.get("perplexity_ratio"),
                r["size_mb"],
                r["rss_mb"],
            ]
            for r in rows
        ]
        settings = (
            f"batch 1, {s['prompt_len']}-token prompt, {s['new_tokens']} greedy tokens, median of {s['runs']}"
        )
        if acc.get("reference"):
            settings += (
                f"; accuracy vs {ref}: {acc['new_tokens']} tokens × {acc['prompts']} prompts, perplexity on "
                f"{acc['perplexity_tokens']} tokens of {acc['perplexity_text']}"
            )
        elif acc.get("skipped") or acc.get("enabled") is False:
            settings += f"; accuracy not measured ({acc.get('skipped', '--no-accuracy')})"
    else:
        s = result["settings"]
        lat = [f"latency_ms_b{b}" for b in s["batch_sizes"]]
        head = [
            "candidate",
            *[f"ms batch {b}" for b in s["batch_sizes"]],
            *[f"× {r[2:]}" for r in ratios],
            f"cosine to {result['reference']}",
            "MB on disk",
            "RSS +MB",
        ]
        body = [
            [
                r["name"],
                *[r[k] for k in lat],
                *[r.get(k) for k in ratios],
                r["min_cosine"],
                r["size_mb"],
                r["rss_mb"],
            ]
            for r in rows
        ]
        settings = f"sequence {s['seq_len']}, median of {s['runs']}"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in body]
    m = result["machine"]
    lines.append("")
    lines.append(
        f"{settings}; peak RSS {m.get('peak_rss_mb')} MB; {m.get('cpu_model', m.get('machine'))}, "
        f"{m.get('threads')} threads, flags: "
        f"{' '.join(m.get('cpu_flags', [])) or 'unknown'}; onnxruntime {m.get('onnxruntime')}, torch {m.get('torch', '-')}"
    )
    for name, why in result.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)
