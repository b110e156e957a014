"""Pipelines and the pass manager.

A pipeline is what the spec's ``pipeline:`` says, in order: pass names, ``{name: {options}}`` and
``fixpoint:`` groups repeated until nothing changes (XLA's HloPassFix). Around every pass the manager takes a
structural hash (a pass that says "unchanged" while the hash moved is reported as a bug), times it, counts
nodes, verifies the graph when it changed (on by default, like MLIR), and calls the instruments. A pass that
raises or leaves a broken graph becomes a PassError naming the pass and the dumps kept on disk.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmc.errors import IRError, LlmcError, PassError
from llmc.ir import Graph, structural_hash, to_onnx, verify
from llmc.pass_manager.base import Pass, PassContext, PassResult, make_pass
from llmc.pass_manager.instruments import Instrument


@dataclass
class FixedPoint:
    """A group of passes run again and again until none of them changes the graph."""

    steps: list[Pass | FixedPoint]
    max_iterations: int = 8

    @property
    def name(self) -> str:
        return "fixpoint(" + ",".join(s.name for s in self.steps) + ")"


Step = Pass | FixedPoint


@dataclass
class Pipeline:
    steps: list[Step] = field(default_factory=list)

    def text(self) -> str:
        """MLIR-like one-line form: ``fold-constants,fixpoint(cse,eliminate-dead-code)``."""
        return ",".join(_step_text(s) for s in self.steps)

    @classmethod
    def parse(cls, items: list[Any]) -> Pipeline:
        """Build from the spec form: ``["name", {"name": {opts}}, {"fixpoint": [...], "max_iterations": 4}]``."""
        return cls([_parse_step(item, (i,)) for i, item in enumerate(items)])


def _step_text(step: Step) -> str:
    if isinstance(step, FixedPoint):
        return "fixpoint(" + ",".join(_step_text(s) for s in step.steps) + ")"
    return step.describe()


class PipelineSyntaxError(LlmcError):
    """A pipeline entry has the wrong shape; ``path`` locates it inside the pipeline list."""

    def __init__(self, message: str, path: tuple[Any, ...], hint: str | None = None):
        self.path = path
        super().__init__(message, hint=hint)


def _parse_step(item: Any, path: tuple[Any, ...]) -> Step:
    from llmc.pass_manager.base import PassOptionsError, UnknownPassError

    try:
        if isinstance(item, str):
            return make_pass(item)
        if isinstance(item, dict) and "fixpoint" in item:
            extra = set(item) - {"fixpoint", "max_iterations"}
            if extra:
                raise PipelineSyntaxError(f"unknown key(s) in fixpoint group: {sorted(extra)}", path)
            body = item["fixpoint"]
            if not isinstance(body, list) or not body:
                raise PipelineSyntaxError("'fixpoint' takes a non-empty list of passes", (*path, "fixpoint"))
            max_it = item.get("max_iterations", 8)
            if not isinstance(max_it, int) or max_it < 1:
                raise PipelineSyntaxError(
                    "max_iterations must be a positive integer", (*path, "max_iterations")
                )
            return FixedPoint([_parse_step(s, (*path, "fixpoint", i)) for i, s in enumerate(body)], max_it)
        if isinstance(item, dict) and len(item) == 1:
            ((name, options),) = item.items()
            if options is None:
                options = {}
            if not isinstance(options, dict):
                raise PipelineSyntaxError(f"options of pass '{name}' must be a mapping", (*path, name))
            try:
                return make_pass(str(name), options)
            except PassOptionsError as exc:
                first = exc.errors[0]["loc"] if exc.errors else ()
                raise PipelineSyntaxError(exc.message, (*path, name, *first)) from exc
    except UnknownPassError as exc:
        raise PipelineSyntaxError(exc.message, path, hint=exc.hint) from exc
    raise PipelineSyntaxError(
        "a pipeline entry is a pass name, {pass-name: {options}} or {fixpoint: [...]}", path
    )


@dataclass
class PassRecord:
    """One pass run, as the report and the manifest show it."""

    index: int
    name: str
    options: dict[str, Any]
    seconds: float
    changed: bool
    nodes_before: int
    nodes_after: int
    stats: dict[str, int | float]
    iteration: int | None = None
    verified: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PipelineReport:
    records: list[PassRecord] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.records]


class PassManager:
    """Runs a pipeline over a graph in place, with hash checks, verification and instruments."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        ctx: PassContext | None = None,
        instruments: list[Instrument] | None = None,
        verify_each: bool = True,
        failure_dir: Path | None = None,
        on_pass_start: Any = None,
        first_index: int = 1,
    ) -> None:
        self.pipeline = pipeline
        self.ctx = ctx or PassContext()
        self.instruments = list(instruments or [])
        self.verify_each = verify_each
        self.failure_dir = failure_dir
        self.on_pass_start = on_pass_start
        self._index = first_index - 1

    def run(self, graph: Graph) -> PipelineReport:
        self._last_hash: str | None = None
        report = PipelineReport()
        start = time.perf_counter()
        for inst in self.instruments:
            inst.before_pipeline(graph)
        for step in self.pipeline.steps:
            self._run_step(step, graph, report, None)
        for inst in self.instruments:
            inst.after_pipeline(graph)
        report.seconds = time.perf_counter() - start
        return report

    def _run_step(self, step: Step, graph: Graph, report: PipelineReport, iteration: int | None) -> bool:
        if isinstance(step, FixedPoint):
            for it in range(step.max_iterations):
                changed = False
                for sub in step.steps:
                    changed |= self._run_step(sub, graph, report, it)
                if not changed:
                    return it > 0
            self.ctx.log.warning("%s did not converge in %d iterations", step.name, step.max_iterations)
            return True
        return self._run_pass(step, graph, report, iteration)

    def _run_pass(self, p: Pass, graph: Graph, report: PipelineReport, iteration: int | None) -> bool:
        self._index += 1
        index = self._index
        if self.on_pass_start is not None:
            self.on_pass_start(p, index)
        for inst in self.instruments:
            inst.before_pass(p, graph, index)
        # the hash after the previous pass is this pass's "before" (instruments only read the graph)
        hash_before = self._last_hash or structural_hash(graph)
        nodes_before = len(graph)
        before_snapshot = to_onnx(graph, weights="elide", elide_above=256) if self.failure_dir else None
        t0 = time.perf_counter()
        try:
            result = p.run(graph, self.ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"run() returned {type(result).__name__}, expected PassResult")
        except PassError as exc:  # already names a pass: keep its own words, not "pass 'x': pass 'x': ..."
            raise self._fail(p, graph, exc, index, before_snapshot, exc.detail) from exc
        except LlmcError as exc:
            raise self._fail(p, graph, exc, index, before_snapshot, exc.message) from exc
        except Exception as exc:
            detail = f"raised {type(exc).__name__}: {exc}"
            raise self._fail(p, graph, exc, index, before_snapshot, detail) from exc
        seconds = time.perf_counter() - t0
        try:
            hash_after = structural_hash(graph)  # walks the graph: raises on a cycle the pass made
        except IRError as exc:
            raise self._fail(p, graph, exc, index, before_snapshot, f"left an invalid graph: {exc}") from exc
        self._last_hash = hash_after
        moved = hash_after != hash_before
        if moved and not result.changed:
            err = IRError("reported 'unchanged' but the graph's structural hash moved (a bug in the pass)")
            raise self._fail(p, graph, err, index, before_snapshot, err.message)
        record = PassRecord(
            index=index,
            name=p.name,
            options=p.options.model_dump(exclude_defaults=True),
            seconds=seconds,
            changed=moved,
            nodes_before=nodes_before,
            nodes_after=len(graph),
            stats=dict(result.stats),
            iteration=iteration,
            details=dict(result.details),
        )
        if moved and self.verify_each:
            try:
                verify(graph)
            except IRError as exc:
                raise self._fail(
                    p, graph, exc, index, before_snapshot, f"left an invalid graph: {exc}"
                ) from exc
            record.verified = True
        report.records.append(record)
        self._follow_interface(result.details.get("decoder"))
        for inst in self.instruments:
            inst.after_pass(p, graph, result, record)
        return moved

    def _follow_interface(self, changes: dict | None) -> None:
        """A pass that changes a decoder's interface (dropped layers, fewer kv heads) reports it in
        ``details["decoder"]``; later passes read the current one from ``ctx.data["decoder"]``."""
        decoder = self.ctx.data.get("decoder")
        if changes and decoder is not None:
            self.ctx.data["decoder"] = replace(decoder, **changes)

    def _fail(self, p: Pass, graph: Graph, exc: BaseException, index: int, before, detail: str) -> PassError:
        dumps: list[Path] = []
        for inst in self.instruments:
            try:
                dumps.extend(inst.on_failure(p, graph, exc, index))
            except Exception:
                pass
        if self.failure_dir is not None:
            dumps.extend(_write_reproducer(self.failure_dir, p, graph, exc, index, before))
        return PassError(p.name, detail, dumps=dumps, hint=getattr(exc, "hint", None))


def _write_reproducer(
    directory: Path, p: Pass, graph: Graph, exc: BaseException, index: int, before
) -> list[Path]:
    import onnx.printer

    from llmc.ir import to_text

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    stem = f"{index:03d}-{p.name}"
    if before is not None:
        path = directory / f"{stem}.before.onnxtxt"
        path.write_text(onnx.printer.to_text(before))
        written.append(path)
    try:
        path = directory / f"{stem}.after.onnxtxt"
        path.write_text(to_text(graph))
        written.append(path)
    except Exception:
        pass
    path = directory / f"{stem}.error.txt"
    path.write_text("".join(traceback.format_exception(exc)))
    written.append(path)
    return written


def run_pipeline(graph: Graph, items: list[Any], **kwargs: Any) -> PipelineReport:
    """Convenience for tests and notebooks: parse the spec form and run it."""
    return PassManager(Pipeline.parse(items), **kwargs).run(graph)


def default_failure_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="llmc-failure-"))
