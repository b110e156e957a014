"""Golden-output verification: run the reference and the compiled model on the same inputs and compare.

Inputs come from an ``.npz`` file or are drawn from a seeded generator fitted to the input signature
(symbolic dims from ``dims``, whole shapes from ``shapes``, value ranges from ``ranges``; integer inputs
default to [0, 2) so that index-like inputs stay in range, floats to a standard normal).
An output passes when every element has ``|out - ref| <= max_abs + max_rel * |ref|`` and the cosine of the
flattened tensors reaches ``cosine`` (unless the reference's RMS is below ``max_abs``: then the cosine
measures rounding noise and only the elementwise bound applies); integer and boolean outputs must be equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import Mismatch, SpecError, VerificationError
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

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows) and all(t.passed for t in self.tokens)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "outputs": [r.to_json() for r in self.rows],
            "tokens": [t.to_json() for t in self.tokens],
        }

    def markdown(self) -> str:
        lines = [
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
) -> GoldenReport:
    """Run both on every feed and compare every output the reference has (worst sample kept per output)."""
    per_output = per_output or {}
    names = [o.name for o in reference.outputs]
    missing = set(names) - {o.name for o in candidate.outputs}
    if missing:
        raise VerificationError(f"the compiled model lacks outputs {sorted(missing)}")
    worst: dict[str, OutputComparison] = {}
    last_token = set(getattr(candidate, "last_token_outputs", ()))
    for feed in feeds:
        ref_out = reference.run(feed)
        cand_out = candidate.run(feed, names)
        for name in last_token & set(names):  # compare the position the candidate computes: the last one
            ref_out[name] = np.asarray(ref_out[name])[:, -1:]
        for name in names:
            row = compare_arrays(
                name, np.asarray(cand_out[name]), np.asarray(ref_out[name]), per_output.get(name, tolerances)
            )
            prev = worst.get(name)
            if (
                prev is None
                or (prev.passed and not row.passed)
                or (prev.passed == row.passed and row.max_abs > prev.max_abs)
            ):
                worst[name] = row
    return GoldenReport([worst[n] for n in names], samples=len(feeds))


def compare_decoders(
    references: dict[str, Any],
    candidate: Any,
    prompts: list[str],
    *,
    new_tokens: int,
    tolerances: Tolerances,
    min_agreement: float,
) -> GoldenReport:
    """Decoders (DecoderLoops): prefill logits within tolerance and teacher-forced greedy token agreement
    with each reference's greedy continuation, per prompt."""
    from llmc.runtime.generator import teacher_forced_agreement

    report = GoldenReport(samples=len(prompts))
    for name, reference in references.items():
        worst = None
        for prompt in prompts:
            ids = candidate.encode(prompt)
            row = compare_arrays(
                f"logits[prefill] vs {name}", candidate.prefill(ids)[0], reference.prefill(ids)[0], tolerances
            )
            if worst is None or (worst.passed and not row.passed) or row.max_abs > worst.max_abs:
                worst = row
            continuation = reference.generate(ids, new_tokens, stop_at_eos=False).tokens
            agreement = teacher_forced_agreement(candidate, ids, continuation)
            report.tokens.append(
                TokenAgreement(
                    name,
                    str(prompt),
                    agreement.matches,
                    agreement.total,
                    agreement.first_mismatch,
                    min_agreement,
                )
            )
        if worst is not None:
            report.rows.append(worst)
    return report


def raise_if_failed(report: GoldenReport, label: str) -> None:
    if report.passed:
        return
    table = [
        Mismatch(r.name, r.max_abs, r.max_rel, r.cosine, f"{r.mismatched}/{r.total} outside tolerance")
        for r in report.rows
        if not r.passed
    ]
    raise VerificationError(
        f"{label}: outputs differ from the reference beyond the spec's tolerances\n{report.markdown()}",
        table=table,
        hint="loosen verify.tolerances for these outputs, or find the pass that broke it with --dump-ir",
    )
