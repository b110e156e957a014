"""``llmc bisect``: find the first pass that makes the spec's golden check fail, and what to exclude.

The model is imported once and the pipeline runs step by step (a ``fixpoint:`` group is one step); after each
step that changed the graph a clone is kept (clones share the weight arrays). The golden check is the one
``llmc compile`` runs (``verify_decoder`` / ``verify_artifact`` against the saved import), on the graph
written to a temporary folder and opened in onnxruntime. A binary search over those prefixes finds the
first failing one in about log2(n) checks, assuming that a prefix that fails stays failing. When every IR
prefix passes, the CPU target's legalization (which ``llmc compile`` runs last) is bisected the same way.

When the first failing pass selects weights with ``include``/``exclude`` (quantization), the groups of
weights are ranked by sensitivity (``llmc.sensitivity``) and a second binary search finds the smallest
number k such that excluding the k most sensitive groups makes the whole compile (pipeline and legalization)
pass; that exclusion is the ``exclude:`` line to add. Like ``git bisect``, this is a search over a monotone
predicate; no library bisects an llmc pipeline, hence this module.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.errors import LlmcError, SpecError
from llmc.frontends import ImportedModel
from llmc.golden import GoldenReport
from llmc.ir import Graph, clone, save_model
from llmc.pass_manager import PassContext, PassManager, Pipeline
from llmc.runtime.graph_session import graph_runner
from llmc.sensitivity import (
    GROUPINGS,
    Progress,
    SensitivityReport,
    is_selective,
    make_evaluator,
    measure,
    pipeline_context,
    restricted,
)


class NoCulprit(LlmcError):
    """Bisect found no failing pass: the whole pipeline passes, or the check fails from the import on."""

    exit_code = 1


def _noop(event: str, data: dict[str, Any]) -> None:
    pass


@dataclass
class Check:
    """One golden check bisect made: which graph, whether it passed, and the numbers that decide."""

    label: str
    stage: str
    passed: bool
    metric: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BisectReport:
    checks: list[Check] = field(default_factory=list)
    conclusion: str = ""
    culprit: str | None = None  # the first failing step, as the pipeline text writes it
    culprit_stage: str | None = None  # "pipeline" or "legalize"
    culprit_number: int | None = None  # 1-based position in its pipeline
    exclude: list[str] | None = None  # exclude globs that make the check pass
    excluded_groups: list[str] = field(default_factory=list)
    sensitivity: SensitivityReport | None = None
    seconds: float = 0.0

    @property
    def found(self) -> bool:
        return self.culprit is not None

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k not in ("checks", "sensitivity")}
        data["checks"] = [c.to_json() for c in self.checks]
        data["sensitivity"] = self.sensitivity.to_json() if self.sensitivity else None
        return data


def key_metric(report: GoldenReport) -> str:
    """The numbers that decide a golden check, in one short line."""
    parts = []
    if report.tokens:
        matched = sum(t.matched for t in report.tokens)
        total = sum(t.total for t in report.tokens)
        parts.append(f"tokens {matched}/{total}")
    if report.rows:
        parts.append(f"min cos {min(r.cosine for r in report.rows):.5f}")
        parts.append(f"max abs {max(r.max_abs for r in report.rows):.3g}")
    return ", ".join(parts) or "no outputs compared"


def _step_text(step: Any) -> str:
    return Pipeline([step]).text()


class _Session:
    """What every check needs: the spec, the import, the saved reference, the pass context, a scratch folder."""

    def __init__(self, spec: Any, work: Path, progress: Progress) -> None:
        from llmc.driver import import_for_spec
        from llmc.targets import get_target

        self.spec = spec
        self.work = work
        self.progress = progress
        progress("import", {"source": spec.model.source, "path": spec.model.path})
        self.imported: ImportedModel = import_for_spec(spec, work / "import")
        self.reference_path = work / "reference" / "model.onnx"
        self.reference_path.parent.mkdir()
        save_model(self.imported.graph, self.reference_path)
        self.ctx = pipeline_context(spec, self.imported)
        self.cpu = get_target("cpu", spec.targets.cpu) if spec.targets.cpu is not None else None
        decoder = self.imported.decoder
        self.legalize_ctx = PassContext(
            target="cpu", data={"max_length": decoder.max_length if decoder else None}
        )
        self.report = BisectReport()

    def run_steps(self, graph: Graph, steps: list[Any], ctx: PassContext, first: int = 1) -> list[bool]:
        """Run ``steps`` on ``graph`` in place, one by one; whether each changed the graph."""
        changed = []
        for k, step in enumerate(steps):
            self.progress("pass", {"name": step.name, "index": first + k})
            records = (
                PassManager(
                    Pipeline([step]), ctx=ctx, verify_each=self.spec.debug.verify_each, first_index=first + k
                )
                .run(graph)
                .records
            )
            changed.append(any(r.changed for r in records))
        return changed

    def snapshots(
        self, graph: Graph, steps: list[Any], ctx: PassContext, first: int = 1
    ) -> list[tuple[int, Graph]]:
        """Run ``steps`` on ``graph``; (step index, clone after it) for each step that changed the graph.
        Clones are cheap: they share the weight arrays, which passes replace rather than mutate."""
        points = []
        for k, step in enumerate(steps):
            if self.run_steps(graph, [step], ctx, first=first + k)[0]:
                points.append((k, clone(graph)))
        return points

    def legalize(self, graph: Graph) -> None:
        if self.cpu is not None:
            self.run_steps(graph, self.cpu.legalize_pipeline().steps, self.legalize_ctx)

    def check(self, graph: Graph, label: str, stage: str, *, legalized: bool) -> bool:
        """The spec's golden check on ``graph`` (left untouched); recorded in the report."""
        from llmc.driver import verify_artifact, verify_decoder

        self.progress("check", {"label": label})
        t0 = time.perf_counter()
        level = self.cpu.options.graph_optimization_level if legalized and self.cpu is not None else "basic"
        try:
            with graph_runner(graph, level) as runner:
                if self.imported.task == "text-generation" and self.imported.decoder is not None:
                    golden = verify_decoder(
                        self.spec,
                        self.imported,
                        self.reference_path,
                        runner,
                        candidate_decoder=self.imported.decoder.matching(graph),
                    )
                else:
                    golden = verify_artifact(self.spec, self.reference_path, runner)
            passed, metric = golden.passed, key_metric(golden)
        except SpecError:
            raise
        except Exception as exc:  # a graph onnxruntime refuses, or outputs that went missing: a failure
            passed, metric = False, f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        self.report.checks.append(Check(label, stage, passed, metric, time.perf_counter() - t0))
        return passed


def _first_true(lo: int, hi: int, holds: Callable[[int], bool]) -> int:
    """The smallest x in (lo, hi] for which ``holds`` (monotone, known true at hi, taken false at lo)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid
    return hi


def first_failure(count: int, passes: Callable[[int], bool]) -> int | None:
    """The first of ``count`` prefixes for which ``passes`` is False, by binary search (the last prefix is
    checked first; the state before the first one is taken to pass). None when the last one passes."""
    if count == 0 or passes(count - 1):
        return None
    return _first_true(-1, count - 1, lambda k: not passes(k))


def smallest_passing(count: int, passes: Callable[[int], bool]) -> int | None:
    """The smallest k in 1..count for which ``passes(k)``, by binary search (``count`` checked first)."""
    if count == 0 or not passes(count):
        return None
    return _first_true(0, count, passes)


def run_bisect(
    spec: Any, *, by: str = "layer", samples: int = 4, tokens: int = 32, progress: Progress = _noop
) -> BisectReport:
    """``llmc bisect``: the first pass that breaks the golden check, and an exclusion that repairs it."""
    if by not in GROUPINGS:
        raise SpecError(f"--by must be one of {', '.join(GROUPINGS)}, not '{by}'")
    start = time.perf_counter()
    steps = Pipeline.parse(spec.pipeline).steps
    with tempfile.TemporaryDirectory(prefix="llmc-bisect-") as tmp:
        session = _Session(spec, Path(tmp), progress)
        report = session.report
        _bisect_pipeline(session, steps, by=by, samples=samples, tokens=tokens)
    report.seconds = time.perf_counter() - start
    return report


def _bisect_pipeline(session: _Session, steps: list[Any], *, by: str, samples: int, tokens: int) -> None:
    report = session.report
    graph = session.imported.graph
    start_graph = clone(graph)
    points = session.snapshots(graph, steps, session.ctx)

    def ir_passes(i: int) -> bool:
        k, g = points[i]
        return session.check(g, f"after #{k + 1} {steps[k].name}", "pipeline", legalized=False)

    failing = first_failure(len(points), ir_passes)
    if failing is not None:
        k = points[failing][0]
        before = points[failing - 1][1] if failing > 0 else start_graph
        if failing == 0 and not session.check(start_graph, "the import itself", "pipeline", legalized=False):
            report.conclusion = (
                "the imported model itself fails the check against its own reference: the verify: settings "
                "cannot pass (nondeterministic outputs or tolerances too tight)"
            )
            return
        report.culprit, report.culprit_stage, report.culprit_number = _step_text(steps[k]), "pipeline", k + 1
        report.conclusion = f"the golden check first fails after pass #{k + 1} {steps[k].name}"
        if is_selective(steps[k]):
            _find_exclusion(session, steps, k, before, by=by, samples=samples, tokens=tokens)
        return
    if session.cpu is None:
        report.conclusion = (
            "the whole pipeline passes the golden check (this spec has no cpu target to legalize)"
        )
        return
    legal_steps = session.cpu.legalize_pipeline().steps
    legal_points = session.snapshots(clone(graph), legal_steps, session.legalize_ctx, first=len(steps) + 1)

    def legal_passes(i: int) -> bool:
        k, g = legal_points[i]
        return session.check(g, f"legalized: after {legal_steps[k].name}", "legalize", legalized=True)

    failing = first_failure(len(legal_points), legal_passes)
    if failing is None:
        report.conclusion = "the whole pipeline passes the golden check, legalized for the cpu target too"
        return
    k = legal_points[failing][0]
    report.culprit, report.culprit_stage, report.culprit_number = (
        _step_text(legal_steps[k]),
        "legalize",
        k + 1,
    )
    report.conclusion = f"the IR passes, and the check first fails after the cpu target's legalization pass {legal_steps[k].name}"


def _find_exclusion(
    session: _Session, steps: list[Any], index: int, before: Graph, *, by: str, samples: int, tokens: int
) -> None:
    """Rank the groups the failing pass quantizes, then find the fewest top groups whose exclusion passes."""
    report = session.report
    spec, step = session.spec, steps[index]
    session.progress("reference", {})
    evaluator = make_evaluator(spec, session.imported, before, samples=samples, tokens=tokens)
    ranking = measure(
        before,
        step,
        session.ctx,
        evaluator,
        by=by,
        pass_index=index,
        progress=session.progress,
    )
    report.sensitivity = ranking
    ranked = [g for g in ranking.groups if g.value > 0] or ranking.groups

    def passes(k: int) -> bool:
        graph = clone(before)
        fresh = Pipeline.parse(spec.pipeline).steps  # new pass instances for the rerun
        restricted(fresh[index], exclude=ranking.suggested_exclude(k)).run(graph, session.ctx)
        session.run_steps(graph, fresh[index + 1 :], session.ctx, first=index + 2)
        session.legalize(graph)
        names = ", ".join(g.name for g in ranked[:k])
        label = f"exclude top {k}: {names if len(names) < 60 else names[:57] + '...'}"
        return session.check(graph, label, "exclude", legalized=session.cpu is not None)

    k = smallest_passing(len(ranked), passes)
    if k is None:
        report.conclusion += (
            f"; excluding all {len(ranked)} groups of weights it changes still fails: the cause is not which "
            "weights it quantizes (check its other options)"
        )
        return
    report.exclude = ranking.suggested_exclude(k)
    report.excluded_groups = [g.name for g in ranked[:k]]
    report.conclusion += f"; keeping the {k} most sensitive group(s) in float makes the whole compile pass"
