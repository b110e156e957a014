"""``llmc sensitivity``: how much error quantizing each group of weights adds, ranked.

The pipeline runs up to the quantization pass; that graph is the float reference. The pass then runs once
per group of weights (a decoder layer, a projection kind or a single weight) with ``include`` set to that
group only, on a clone, and the clone is compared with the float graph on calibration data: for decoders
the mean KL divergence of the next-token distribution and the top-1 agreement over every position of a few
token windows (teacher-forced through the KV cache, since the graph may return last-position logits only),
for other models 1 - cosine and the largest absolute difference of the outputs. The ranking says which
layers to keep in float (``exclude:``); ``llmc bisect`` reuses it to find the smallest exclusion that passes.

Every evaluation runs the IR in an onnxruntime session (basic graph optimizations) that reads the IR's
weight arrays in place, so one session per group stays cheap on a 500 MB model. Tools that rank layer
sensitivity (in quantization toolkits) work on PyTorch modules, not on an ONNX IR halfway through an llmc
pipeline, hence this module.
"""

from __future__ import annotations

import fnmatch
import glob
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import SpecError
from llmc.frontends import ImportedModel
from llmc.ir import Graph, clone
from llmc.pass_manager import Pass, PassContext, PassManager, Pipeline
from llmc.runtime.graph_session import graph_runner
from llmc.runtime.runner import Runner

Progress = Callable[[str, dict[str, Any]], None]
GROUPINGS = ("layer", "kind", "weight")
QUANT_PREFIXES = ("quantize", "convert-precision")
_LAYER = re.compile(r"(?:^|[./])(?:layers|layer|h|blocks|block)\.(\d+)\.")
_KIND_NOISE = {"weight", "T", "bias", "kernel"}


def _noop(event: str, data: dict[str, Any]) -> None:
    pass


# -- the pipeline up to the quantization pass --------------------------------------------------------------
def pipeline_context(spec: Any, imported: ImportedModel) -> PassContext:
    """The PassContext ``llmc compile`` gives the pipeline: the task and the spec's calibration set."""
    from llmc.calibration import build_calibration

    return PassContext(
        target=None,
        data={
            "task": imported.task,
            "calibration": build_calibration(spec, imported),
            "decoder": imported.decoder,
        },
    )


def is_selective(step: Any) -> bool:
    """A pass whose weights are chosen by ``include``/``exclude`` globs (what sensitivity can restrict)."""
    fields = getattr(getattr(step, "Options", None), "model_fields", {})
    return isinstance(step, Pass) and "include" in fields and "exclude" in fields


def find_quant_step(spec: Any, steps: Sequence[Any], pass_name: str | None) -> int:
    """Index of the top-level pipeline step to analyse: ``pass_name``, else the first quantization pass."""
    names = [s.name for s in steps]
    if pass_name is not None:
        if pass_name not in names:
            raise SpecError(
                f"the pipeline has no top-level pass '{pass_name}'",
                location=spec.locate(("pipeline",)),
                hint="passes in the pipeline: " + (", ".join(names) or "(none)"),
            )
        index = names.index(pass_name)
    else:
        found = [i for i, s in enumerate(steps) if isinstance(s, Pass) and s.name.startswith(QUANT_PREFIXES)]
        if not found:
            raise SpecError(
                "the pipeline has no quantization pass (a name starting with quantize or convert-precision)",
                location=spec.locate(("pipeline",)),
                hint="name the pass to analyse with --pass",
            )
        index = found[0]
    if not is_selective(steps[index]):
        raise SpecError(
            f"pass '{steps[index].name}' has no include/exclude options: it cannot be restricted to a group",
            location=spec.locate(("pipeline", index)),
            hint="choose a pass such as quantize-weights with --pass",
        )
    return index


def restricted(step: Pass, *, include: list[str] | None = None, exclude: list[str] | None = None) -> Pass:
    """A fresh instance of ``step`` with the same options but other include/exclude globs."""
    options = step.options.model_dump()
    if include is not None:
        options["include"] = include
    if exclude is not None:
        options["exclude"] = exclude
    return type(step)(options)


def exact(names: Sequence[str]) -> list[str]:
    """Globs that match exactly these weight names."""
    return [glob.escape(n) for n in names]


# -- which weights, in which groups -----------------------------------------------------------------------
def _uses(graph: Graph, name: str) -> list[tuple[str, str, int]]:
    return sorted((n.op_type, n.name, slot) for n, slot in graph.uses(name))


def touched_weights(before: Graph, after: Graph) -> list[str]:
    """Float initializers of ``before`` that ``after`` dropped or reads through other nodes."""
    names = []
    for name in before.initializers:
        array = before.initializers[name]
        if array.dtype.kind != "f" or array.ndim < 2 or not before.is_used(name):
            continue
        if name not in after.initializers or _uses(before, name) != _uses(after, name):
            names.append(name)
    return names


def layer_prefix(name: str) -> str | None:
    """``model.layers.12`` for ``model.layers.12.mlp.down_proj.weight``; None outside numbered layers."""
    match = _LAYER.search(name)
    return name[: match.end() - 1] if match else None


def weight_kind(name: str) -> str:
    """The projection a weight belongs to: ``qkv_proj`` for ``model.layers.0.self_attn.qkv_proj.weight.T``."""
    parts = name.split(".")
    while len(parts) > 1 and (parts[-1] in _KIND_NOISE or parts[-1].isdigit()):
        parts.pop()
    return parts[-1]


def group_weights(names: Sequence[str], by: str) -> dict[str, list[str]]:
    """Groups of weight names: per layer (weights outside layers grouped by kind), per kind, or per weight."""
    if by not in GROUPINGS:
        raise SpecError(f"--by must be one of {', '.join(GROUPINGS)}, not '{by}'")
    groups: dict[str, list[str]] = {}
    for name in names:
        if by == "weight":
            key = name
        elif by == "kind":
            key = weight_kind(name)
        else:
            key = layer_prefix(name) or weight_kind(name)
        groups.setdefault(key, []).append(name)
    return dict(sorted(groups.items(), key=lambda kv: _natural(kv[0])))


def _natural(text: str) -> list[Any]:
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", text)]


def group_globs(key: str, members: Sequence[str], universe: Sequence[str], by: str) -> list[str]:
    """Short globs that match exactly ``members`` among ``universe`` (for a readable ``exclude:``)."""
    candidates: list[list[str]] = []
    if by == "layer" and layer_prefix(members[0]) == key:
        candidates.append([f"{glob.escape(key)}.*"])
    if len(members) == 1:
        candidates.append(exact(members))
    if by in ("layer", "kind"):
        kind = glob.escape(weight_kind(members[0]))
        candidates += [[f"*.{kind}.*"], [f"{kind}.*"], [f"*.{kind}"], [f"*{kind}*"]]
    wanted = set(members)
    for patterns in candidates:
        matched = {u for u in universe if any(fnmatch.fnmatchcase(u, p) for p in patterns)}
        if matched == wanted:
            return patterns
    return exact(members)


def position_logits(runner: Runner, decoder: Any, ids: np.ndarray) -> np.ndarray:
    """Next-token logits at every position of ``ids`` [batch, seq] -> [batch, seq, vocab].

    A graph with logits for every position answers in one prefill; one with last-position logits only is
    fed teacher-forced, a token per step through the KV cache.
    """
    from llmc.calibration import prefill_feeds
    from llmc.runtime.generator import Generator

    seq = ids.shape[1]
    if "logits" not in runner.last_token_outputs:
        feeds = prefill_feeds(decoder, ids, {sig.name: sig.dtype for sig in runner.inputs})
        logits = runner.run(feeds, ["logits"])["logits"]
        if logits.shape[1] == seq:
            return logits.astype(np.float32)
    loop = Generator(runner, decoder)
    rows = [loop.prefill(ids[:, :1])]
    rows += [loop.step(ids[:, t]) for t in range(1, seq)]
    return np.stack(rows, axis=1).astype(np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log(softmax(x)) over the last axis, in float64."""
    x = x.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# -- evaluators: error of a candidate graph against the float graph ---------------------------------------
class DecoderEvaluator:
    """Mean KL(float || candidate) of the next-token distribution and top-1 agreement, every position."""

    metric = "kl"
    columns = ("kl", "top1")

    def __init__(self, decoder: Any, windows: np.ndarray, reference: Runner, source: str) -> None:
        self.decoder = decoder
        self.windows = windows
        self.source = source
        self.reference = log_softmax(position_logits(reference, decoder, windows))
        self.reference_top1 = self.reference.argmax(-1)

    def evaluate(self, runner: Runner) -> dict[str, float]:
        candidate = log_softmax(position_logits(runner, self.decoder, self.windows))
        kl = (np.exp(self.reference) * (self.reference - candidate)).sum(-1)
        top1 = (candidate.argmax(-1) == self.reference_top1).mean()
        return {"kl": float(max(kl.mean(), 0.0)), "top1": float(top1)}


class OutputsEvaluator:
    """1 - cosine of all outputs (flattened, every sample together) and the largest absolute difference."""

    metric = "1-cos"
    columns = ("1-cos", "max_abs")

    def __init__(self, feeds: list[dict[str, np.ndarray]], reference: Runner, source: str) -> None:
        wanted = {s.name for s in reference.inputs}
        self.feeds = [{k: v for k, v in f.items() if k in wanted} for f in feeds]
        self.names = [o.name for o in reference.outputs if o.dtype.startswith("float")]
        if not self.names:
            raise SpecError("the model has no floating-point output to measure the error on")
        self.source = source
        self.reference = self._outputs(reference)

    def _outputs(self, runner: Runner) -> list[np.ndarray]:
        return [
            np.asarray(runner.run(f, self.names)[n], np.float64).ravel()
            for f in self.feeds
            for n in self.names
        ]

    def evaluate(self, runner: Runner) -> dict[str, float]:
        candidate = self._outputs(runner)
        a, b = np.nan_to_num(np.concatenate(candidate)), np.nan_to_num(np.concatenate(self.reference))
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        cosine = float(a @ b / norm) if norm else float(np.array_equal(a, b))
        max_abs = max(
            (float(np.abs(x - y).max()) for x, y in zip(candidate, self.reference, strict=True) if x.size),
            default=0.0,
        )
        return {"1-cos": max(1.0 - cosine, 0.0), "max_abs": max_abs}


Evaluator = DecoderEvaluator | OutputsEvaluator


def make_evaluator(
    spec: Any, imported: ImportedModel, graph: Graph, *, samples: int = 4, tokens: int = 32
) -> Evaluator:
    """The evaluator for ``graph`` as float reference: calibration windows (decoders; the spec's
    calibration: text, else the shipped default) or the spec's calibration/verify inputs (other models)."""
    from llmc.calibration import build_calibration
    from llmc.golden import load_inputs, make_inputs
    from llmc.spec import CalibrationSpec

    with graph_runner(graph) as reference:
        if imported.decoder is not None:
            cal = (spec.calibration or CalibrationSpec()).model_copy(
                update={"max_tokens": tokens, "samples": samples}
            )
            calibration = build_calibration(spec.model_copy(update={"calibration": cal}), imported)
            longest = max(len(w) for w in calibration.tokens)
            kept = [w for w in calibration.tokens if 2 * len(w) >= longest]  # batched: one length for all
            length = min(len(w) for w in kept)
            windows = np.asarray([w[:length] for w in kept], np.int64)
            source = f"{len(windows)} token windows of {length} tokens"
            return DecoderEvaluator(imported.decoder, windows, reference, source)
        if spec.calibration is not None:
            calibration = build_calibration(spec, imported)
            feeds, source = calibration.feeds[:samples], f"calibration: {calibration.source}"
        elif spec.verify.inputs:
            feeds = load_inputs(spec.resolve(spec.verify.inputs), reference.inputs)[:samples]
            source = f"{len(feeds)} samples of {spec.verify.inputs}"
        else:
            v = spec.verify
            feeds = make_inputs(
                reference.inputs, samples=samples, seed=v.seed, dims=v.dims, shapes=v.shapes, ranges=v.ranges
            )
            source = f"{len(feeds)} seeded random samples (verify: seed {v.seed})"
        return OutputsEvaluator(feeds, reference, source)


# -- the measurement --------------------------------------------------------------------------------------
@dataclass
class GroupResult:
    """The error quantizing one group adds (alone), and the globs that select it."""

    name: str
    weights: list[str]
    globs: list[str]
    metrics: dict[str, float]
    value: float
    share: float = 0.0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SensitivityReport:
    pass_name: str
    pass_index: int
    by: str
    metric: str
    columns: tuple[str, ...]
    data: str
    exclude: list[str]  # the pass's own exclude globs
    groups: list[GroupResult] = field(default_factory=list)  # ranked, most sensitive first
    total: dict[str, float] = field(default_factory=dict)  # every group quantized together
    seconds: float = 0.0

    def suggested_exclude(self, top: int) -> list[str]:
        """The pass's exclude globs plus those of the ``top`` most sensitive groups."""
        extra = [g for group in self.groups[:top] if group.value > 0 for g in group.globs]
        return list(dict.fromkeys([*self.exclude, *extra]))

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "groups"}
        return {**data, "columns": list(self.columns), "groups": [g.to_json() for g in self.groups]}


def measure(
    graph: Graph,
    step: Pass,
    ctx: PassContext,
    evaluator: Evaluator,
    *,
    by: str,
    pass_index: int = 0,
    progress: Progress = _noop,
) -> SensitivityReport:
    """Rank the groups of weights ``step`` quantizes in ``graph`` (left unchanged) by the error each adds."""
    start = time.perf_counter()
    whole = clone(graph)
    step.run(whole, ctx)
    touched = touched_weights(graph, whole)
    if not touched:
        raise SpecError(f"pass '{step.name}' changes no weight of this graph: nothing to rank")
    report = SensitivityReport(
        step.name,
        pass_index,
        by,
        evaluator.metric,
        evaluator.columns,
        evaluator.source,
        list(step.options.exclude),
    )
    progress("evaluate", {"group": "all groups", "index": 0, "total": 0})
    with graph_runner(whole) as runner:
        report.total = evaluator.evaluate(runner)
    del whole
    groups = group_weights(touched, by)
    for i, (key, members) in enumerate(groups.items(), 1):
        progress("evaluate", {"group": key, "index": i, "total": len(groups)})
        t0 = time.perf_counter()
        candidate = clone(graph)
        restricted(step, include=exact(members), exclude=[]).run(candidate, ctx)
        with graph_runner(candidate) as runner:
            metrics = evaluator.evaluate(runner)
        del candidate
        report.groups.append(
            GroupResult(
                key,
                members,
                group_globs(key, members, touched, by),
                metrics,
                metrics[evaluator.metric],
                seconds=time.perf_counter() - t0,
            )
        )
    total = sum(g.value for g in report.groups)
    for g in report.groups:
        g.share = g.value / total if total > 0 else 0.0
    report.groups.sort(key=lambda g: -g.value)
    report.seconds = time.perf_counter() - start
    return report


def analyze(
    spec: Any,
    *,
    pass_name: str | None = None,
    by: str = "layer",
    samples: int = 4,
    tokens: int = 32,
    progress: Progress = _noop,
) -> SensitivityReport:
    """``llmc sensitivity``: import, run the pipeline up to the pass, rank the groups."""
    from llmc.driver import import_for_spec

    if by not in GROUPINGS:
        raise SpecError(f"--by must be one of {', '.join(GROUPINGS)}, not '{by}'")
    start = time.perf_counter()
    steps = Pipeline.parse(spec.pipeline).steps
    index = find_quant_step(spec, steps, pass_name)
    with tempfile.TemporaryDirectory(prefix="llmc-sensitivity-") as tmp:
        work = Path(tmp)
        progress("import", {"source": spec.model.source, "path": spec.model.path})
        imported = import_for_spec(spec, work / "import")
        ctx = pipeline_context(spec, imported)
        PassManager(
            Pipeline(steps[:index]),
            ctx=ctx,
            verify_each=spec.debug.verify_each,
            on_pass_start=lambda p, i: progress("pass", {"name": p.name, "index": i}),
        ).run(imported.graph)
        progress("reference", {})
        imported.decoder = ctx.data["decoder"]  # as the prefix left it (dropped layers, fewer kv heads)
        evaluator = make_evaluator(spec, imported, imported.graph, samples=samples, tokens=tokens)
        report = measure(
            imported.graph,
            steps[index],
            ctx,
            evaluator,
            by=by,
            pass_index=index,
            progress=progress,
        )
    report.seconds = time.perf_counter() - start
    return report
