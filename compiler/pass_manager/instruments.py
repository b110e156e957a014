"""Instruments: the one way to observe passes (TVM's PassInstrument, MLIR's IR printing).

Each hook gets the pass, the graph and the pass's position. The pass manager itself uses them for timing and
statistics; ``DumpIR`` writes numbered text dumps with a one-line summary and a diff against the previous
dump (XLA/MLIR style file names: ``003-fuse-gelu.after.onnxtxt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llmc.ir import Graph, summarize, summary_delta, text_diff, to_text

if TYPE_CHECKING:
    from llmc.pass_manager.base import Pass, PassResult
    from llmc.pass_manager.pipeline import PassRecord


class Instrument:
    """Override the hooks you need; every hook is optional."""

    def before_pipeline(self, graph: Graph) -> None: ...

    def after_pipeline(self, graph: Graph) -> None: ...

    def before_pass(self, p: Pass, graph: Graph, index: int) -> None: ...

    def after_pass(self, p: Pass, graph: Graph, result: PassResult, record: PassRecord) -> None: ...

    def on_failure(self, p: Pass, graph: Graph, error: BaseException, index: int) -> list[Path]:
        """Return files written for the failure (they are named in the error)."""
        return []


DUMP_MODES = ("none", "after-each", "after-change")


class DumpIR(Instrument):
    """Writes ``NNN-<pass>.after.onnxtxt``, ``.summary.txt`` and ``.diff`` (against the previous dump)."""

    def __init__(self, directory: Path, mode: str = "after-change") -> None:
        if mode not in DUMP_MODES:
            raise ValueError(f"dump mode must be one of {DUMP_MODES}")
        self.directory = Path(directory)
        self.mode = mode
        self._previous_text = ""
        self._previous_summary = None
        self._previous_name = ""
        self._written: list[Path] = []

    @property
    def written(self) -> list[Path]:
        return list(self._written)

    def _write(self, stem: str, graph: Graph) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        text = to_text(graph)
        summary = summarize(graph)
        path = self.directory / f"{stem}.onnxtxt"
        path.write_text(text)
        line = summary.line()
        if self._previous_summary is not None:
            line += "\n" + summary_delta(self._previous_summary, summary)
        (self.directory / f"{stem}.summary.txt").write_text(line + "\n")
        if self._previous_name:
            diff = text_diff(self._previous_text, text, self._previous_name, path.name)
            (self.directory / f"{stem}.diff").write_text(diff)
        self._previous_text, self._previous_summary, self._previous_name = text, summary, path.name
        self._written.append(path)

    def before_pipeline(self, graph: Graph) -> None:
        if self.mode != "none":
            self._write("000-input", graph)

    def after_pass(self, p: Pass, graph: Graph, result: PassResult, record: PassRecord) -> None:
        if self.mode == "after-each" or (self.mode == "after-change" and record.changed):
            self._write(f"{record.index:03d}-{p.name}.after", graph)

    def on_failure(self, p: Pass, graph: Graph, error: BaseException, index: int) -> list[Path]:
        written = []
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._previous_name:
            written.append(self.directory / self._previous_name)
        try:
            path = self.directory / f"{index:03d}-{p.name}.failed.onnxtxt"
            path.write_text(to_text(graph))
            written.append(path)
        except Exception:  # the broken graph may not even print; the before dump is what matters
            pass
        return written
