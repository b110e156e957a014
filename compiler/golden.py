"""Golden-output verification: run the reference and the compiled model on the same inputs and compare.

Inputs come from an ``.npz`` file or are drawn from a seeded generator fitted to the input signature
(symbolic dims from ``dims``, whole shapes from ``shapes``, value ranges from ``ranges``; integer inputs
default to [0, 2) so that index-like inputs stay in range, floats to a standard normal).
An output passes when every element has ``|out - ref| <= max_abs + max_rel * |ref|`` and the cosine of the
flattened tensors reaches ``cosine`` (unless the reference's RMS is below ``max_abs``: then the cosine
measures rounding noise and only the elementwise bound applies); integer and boolean outputs must be equal.
Beside the outputs, the report carries accuracy metrics (``llmc.metrics``) with the spec's thresholds:
per-sample cosine for encoders, top-1 agreement for classifiers, and for decoders teacher-forced and
free-running greedy token agreement and the perplexity ratio on a text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import Mismatch, SpecError, VerificationError
from llmc.metrics import MetricCheck, metrics_markdown
from llmc.runtime.runner import Runner, TensorSig
from llmc.spec import Tolerances

DEFAULT_DIM = 2


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_inputs(
    signature: Sequence[TensorSig],
    *,
    samples: int = 1,
    seed: int = 0,
    dims: dict[str, int] | None = None,
    shapes: dict[str, list[int]] | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Seeded random feeds for every input of ``signature``."""
    dims, shapes, ranges = dims or {}, shapes or {}, ranges or {}
    unknown = set(shapes) | set(ranges)
    unknown -= {s.name for s in signature}
    if unknown:
        names = ", ".join(s.name for s in signature)
        raise SpecError(f"verify names inputs the model does not have: {sorted(unknown)} (inputs: {names})")
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(samples):
        feed: dict[str, np.ndarray] = {}
        for sig in signature:
            shape = shapes.get(sig.name) or [_dim(d, dims) for d in (sig.shape or ())]
            dtype = _np_dtype(sig.dtype)
            low, high = ranges.get(sig.name, (0, 2) if dtype.kind in "iub" else (None, None))
            if dtype.kind == "b":
                value = rng.integers(0, 2, size=shape).astype(bool)
            elif dtype.kind in "iu":
                value = rng.integers(int(low), int(high), size=shape).astype(dtype)
            elif dtype.kind == "f" or dtype.name == "bfloat16":
                value = rng.standard_normal(size=shape) if low is None else rng.uniform(low, high, size=shape)
                value = value.astype(dtype)
            else:
                raise SpecError(f"cannot make random values for input '{sig.name}' of type {sig.dtype}")
            feed[sig.name] = value
        feeds.append(feed)
    return feeds


def _dim(d: Any, dims: dict[str, int]) -> int:
    if isinstance(d, int) and d >= 0:
        return d
    if isinstance(d, str) and d in dims:
        return dims[d]
    return dims.get("*", DEFAULT_DIM)


def load_inputs(path: Path, signature: Sequence[TensorSig]) -> list[dict[str, np.ndarray]]:
    """Feeds from an .npz: keys ``name`` (one sample) or ``name@k`` (sample k)."""
    if not path.exists():
        raise SpecError(f"verification inputs not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path} is not a readable .npz file: {exc}") from exc
    names = {s.name for s in signature}
    samples: dict[int, dict[str, np.ndarray]] = {}
    for key in data.files:
        name, _, index = key.partition("@")
        if name not in names:
            raise SpecError(f"{path}: '{name}' is not an input of the model (inputs: {sorted(names)})")
        samples.setdefault(int(index or 0), {})[name] = data[key]
    for k, feed in samples.items():
        missing = names - set(feed)
        if missing:
            raise SpecError(f"{path}: sample {k} lacks inputs {sorted(missing)}")
    return [samples[k] for k in sorted(samples)]


@dataclass
class OutputComparison:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    mismatched: int
    total: int
    passed: bool
    tolerance: Tolerances

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tolerance"] = self.tolerance.model_dump()
        return d


@dataclass
class TokenAgreement:
    """Teacher-forced greedy agreement of the candidate with a reference's greedy continuation."""

    reference: str
    prompt: str
    matched: int
    total: int
    first_mismatch: int | None
    required: float

    @property
    def passed(self) -> bool:
        return self.total == 0 or self.matched / self.total >= self.required - 1e-12

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "passed": self.passed}


@dataclass
class GoldenReport:
    rows: list[OutputComparison] = field(default_factory=list)
    samples: int = 0
    tokens: list[TokenAgreement] = field(default_factory=list)
    metrics: list[MetricCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            all(r.passed for r in self.rows)
            and all(t.passed for t in self.tokens)
            and all(m.passed for m in self.metrics)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "outputs": [r.to_json() for r in self.rows],
            "tokens": [t.to_json() for t in self.tokens],
            "metrics": [m.to_json() for m in self.metrics],
        }

    def markdown(self) -> str:
        lines = [metrics_markdown(self.metrics), ""] if self.metrics else []
        lines += [
            "| output | max abs | max rel | cosine | mismatched | result |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.max_abs:.3g} | {r.max_rel:.3g} | {r.cosine:.6f} | {r.mismatched}/{r.total} | "
                f"{'pass' if r.passed else 'FAIL'} |"
            )
        if self.tokens:
            lines += [
                "",
                "| reference | prompt | greedy tokens equal | first mismatch | result |",
                "|---|---|---|---|---|",
            ]
            for t in self.tokens:
                lines.append(
                    f"| {t.reference} | {t.prompt!r} | {t.matched}/{t.total} | {t.first_mismatch} | "
                    f"{'pass' if t.passed else 'FAIL'} |"
                )
        return "\n".join(lines)


def compare_arrays(name: str, out: np.ndarray, ref: np.ndarray, tol: Tolerances) -> OutputComparison:
    if out.shape != ref.shape:
        return OutputComparison(name, float("inf"), float("inf"), 0.0, ref.size, ref.size, False, tol)
    if ref.dtype.kind in "iub" or ref.dtype == object:
        bad = int(np.count_nonzero(out != ref))
        return OutputComparison(
            name, float(bad > 0), float(bad > 0), 1.0 if bad == 0 else 0.0, bad, ref.size, bad == 0, tol
        )
    a = out.astype(np.float64).ravel()
    b = ref.astype(np.float64).ravel()
    diff = np.abs(a - b)
    finite = np.isfinite(a) == np.isfinite(b)
    same_nonfinite = ~np.isfinite(b) & (a == b)
    diff = np.where(same_nonfinite, 0.0, diff)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(b), 1e-6)).max()) if diff.size else 0.0
    bad_mask = (diff > tol.max_abs + tol.max_rel * np.abs(b)) | ~finite
    mismatched = int(np.count_nonzero(bad_mask))
    na, nb = np.linalg.norm(np.nan_to_num(a)), np.linalg.norm(np.nan_to_num(b))
    if na == 0 and nb == 0:
        cosine = 1.0
    elif na == 0 or nb == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(np.nan_to_num(a), np.nan_to_num(b)) / (na * nb))
    # A cosine is only meaningful when the reference carries signal above the absolute tolerance: for an
    # output that is all but zero (RMS below max_abs), rounding noise decides it, and the elementwise bound
    # already says everything.
    rms = float(np.sqrt(np.mean(np.nan_to_num(b) ** 2))) if b.size else 0.0
    cosine_ok = cosine >= tol.cosine or rms <= tol.max_abs
    passed = mismatched == 0 and cosine_ok
    return OutputComparison(name, max_abs, max_rel, cosine, mismatched, ref.size, passed, tol)


def compare_runners(
    reference: Runner,
    candidate: Runner,
    feeds: list[dict[str, np.ndarray]],
    tolerances: Tolerances,
    per_output: dict[str, Tolerances] | None = None,
    *,
    task: str = "generic",
    min_top1: float | None = None,
) -> GoldenReport:
    """Run both on every feed and compare every output the reference has (worst sample kept per output).

    ``feature-extraction`` adds the per-sample cosine of each float output (threshold: its tolerance's
    cosine); ``classification`` adds the top-1 agreement of each float output with classes on its last axis.
    """
    per_output = per_output or {}
    names = [o.name for o in reference.outputs]
    missing = set(names) - {o.name for o in candidate.outputs}
    if missing:
        raise VerificationError(f"the compiled model lacks outputs {sorted(missing)}")
    worst: dict[str, OutputComparison] = {}
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in names}
    last_token = set(getattr(candidate, "last_token_outputs", ()))
    for feed in feeds:
        ref_out = reference.run(feed)
        cand_out = candidate.run(feed, names)
        for name in last_token & set(names):  # compare the position the candidate computes: the last one
            ref_out[name] = np.asarray(ref_out[name])[:, -1:]
        for name in names:
            ref, out = np.asarray(ref_out[name]), np.asarray(cand_out[name])
            row = compare_arrays(name, out, ref, per_output.get(name, tolerances))
            prev = worst.get(name)
            if (
                prev is None
                or (prev.passed and not row.passed)
                or (prev.passed == row.passed and row.max_abs > prev.max_abs)
            ):
                worst[name] = row
            if ref.dtype.kind == "f" and ref.ndim >= 1 and ref.shape == out.shape:
                pairs[name].append((ref, out))
    report = GoldenReport([worst[n] for n in names], samples=len(feeds))
    report.metrics = task_metrics(task, pairs, tolerances, per_output, min_top1)
    return report


def task_metrics(
    task: str,
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]],
    tolerances: Tolerances,
    per_output: dict[str, Tolerances],
    min_top1: float | None,
) -> list[MetricCheck]:
    """The accuracy metrics of an encoder or classifier from its (reference, candidate) outputs per name."""
    from llmc.metrics import cosine_stats, top1_agreement

    checks = []
    for name, batches in pairs.items():
        if not batches:
            continue
        if task == "feature-extraction":
            stats = cosine_stats(batches)
            checks.append(
                MetricCheck(
                    f"cosine per sample, {name}",
                    stats.min,
                    per_output.get(name, tolerances).cosine,
                    detail=f"min of {stats.samples} samples; mean {stats.mean:.6f}",
                )
            )
        elif task == "classification" and batches[0][0].shape[-1] > 1:
            matches, total = top1_agreement(batches)
            checks.append(
                MetricCheck(
                    f"top-1 agreement, {name}",
                    matches / total if total else 1.0,
                    min_top1,
                    detail=f"{matches}/{total} samples",
                )
            )
    return checks


def decoder_metrics(
    name: str,
    tokens: Sequence[TokenAgreement],
    free: Sequence[Any],
    perplexities: tuple[Any, Any] | None,
    *,
    min_agreement: float,
    min_free_running: float | None,
    max_perplexity_ratio: float | None,
) -> list[MetricCheck]:
    """Token agreement (teacher-forced: worst prompt; free-running: all prompts) and the perplexity ratio
    (candidate / reference) against one reference."""
    checks = []
    if tokens:
        worst = min((t.matched / t.total if t.total else 1.0) for t in tokens)
        matched, total = sum(t.matched for t in tokens), sum(t.total for t in tokens)
        checks.append(
            MetricCheck(
                f"teacher-forced greedy tokens vs {name} (worst prompt)",
                worst,
                min_agreement,
                detail=f"{matched}/{total} over {len(tokens)} prompts",
            )
        )
    if free:
        leading, equal = sum(f.leading for f in free), sum(f.equal for f in free)
        total = sum(f.total for f in free)
        checks.append(
            MetricCheck(
                f"free-running greedy tokens vs {name} (leading, all prompts)",
                leading / total if total else 1.0,
                min_free_running,
                detail=f"leading {leading}/{total}, equal positions {equal}/{total}; "
                f"per prompt {', '.join(str(f.leading) for f in free)}",
            )
        )
    if perplexities is not None:
        ref, cand = perplexities
        checks.append(
            MetricCheck(
                f"perplexity ratio vs {name}",
                cand.value / ref.value,
                max_perplexity_ratio,
                higher_is_better=False,
                detail=f"{cand.value:.4f} vs {ref.value:.4f} on {cand.tokens} tokens ({cand.windows} windows)",
            )
        )
    return checks


def compare_decoders(
    references: dict[str, Any],
    candidate: Any,
    prompts: list[str],
    *,
    new_tokens: int,
    tolerances: Tolerances,
    min_agreement: float,
    min_free_running: float | None = None,
    perplexity_ids: Sequence[int] | None = None,
    perplexity_window: int = 128,
    max_perplexity_ratio: float | None = None,
) -> GoldenReport:
    """Decoders (DecoderLoops): prefill logits within tolerance, and per reference teacher-forced and
    free-running greedy token agreement with its greedy continuation of each prompt, and the perplexity
    ratio on ``perplexity_ids`` (when given)."""
    from llmc.metrics import free_running_agreement, perplexity
    from llmc.runtime.generator import teacher_forced_agreement

    report = GoldenReport(samples=len(prompts))
    cand_ppl = perplexity(candidate, perplexity_ids, perplexity_window) if perplexity_ids else None
    for name, reference in references.items():
        worst = None
        tokens, free = [], []
        for prompt in prompts:
            ids = candidate.encode(prompt)
            row = compare_arrays(
                f"logits[prefill] vs {name}", candidate.prefill(ids)[0], reference.prefill(ids)[0], tolerances
            )
            if worst is None or (worst.passed and not row.passed) or row.max_abs > worst.max_abs:
                worst = row
            continuation = reference.generate(ids, new_tokens, stop_at_eos=False).tokens
            agreement = teacher_forced_agreement(candidate, ids, continuation)
            tokens.append(
                TokenAgreement(
                    name,
                    str(prompt),
                    agreement.matches,
                    agreement.total,
                    agreement.first_mismatch,
                    min_agreement,
                )
            )
            free.append(free_running_agreement(candidate, ids, continuation))
        if worst is not None:
            report.rows.append(worst)
        report.tokens += tokens
        ppl = (perplexity(reference, perplexity_ids, perplexity_window), cand_ppl) if cand_ppl else None
        report.metrics += decoder_metrics(
            name,
            tokens,
            free,
            ppl,
            min_agreement=min_agreement,
            min_free_running=min_free_running,
            max_perplexity_ratio=max_perplexity_ratio,
        )
    return report


def raise_if_failed(report: GoldenReport, label: str) -> None:
    """A VerificationError whose message holds the report's tables, when an output or a metric failed."""
    if report.passed:
        return
    table = [
        Mismatch(r.name, r.max_abs, r.max_rel, r.cosine, f"{r.mismatched}/{r.total} outside tolerance")
        for r in report.rows
        if not r.passed
    ]
    reasons = []
    if table:
        reasons.append("outputs differ from the reference beyond the spec's tolerances")
    failed = [m.name for m in report.metrics if not m.passed]
    if failed:
        reasons.append("accuracy misses the spec's thresholds: " + "; ".join(failed))
    elif any(not t.passed for t in report.tokens):
        reasons.append("greedy tokens of a prompt miss verify.min_token_agreement")
    raise VerificationError(
        f"{label}: {' and '.join(reasons)}\n{report.markdown()}",
        table=table,
        hint="loosen verify.tolerances or the verify thresholds, or find the pass that broke it with --dump-ir",
    )
