"""Read the inputs of ``llmc run-batch``: a folder of ``.npz`` files or a JSONL file, one sample per record.

A record that cannot be read becomes a ``BadRecord`` that names its line (JSONL) or file (npz) instead of
stopping the run: the other records still run, and the report lists the bad ones. Samples keep their
position in the input (``index``) so that results come back in input order whatever order shards finish in.

Two kinds of samples exist: ``tensors`` (model inputs by name, for any artifact) and ``prompt`` (text
generation with a decoder artifact). One input holds one kind: the first readable record decides it, and a
record of the other kind is reported as bad.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import ModelError

TENSORS = "tensors"
PROMPT = "prompt"


@dataclass
class Sample:
    """One runnable record: model inputs (``tensors``) or a prompt with its token budget (``prompt``)."""

    index: int
    kind: str
    where: str  # "line 7" or the npz file name, for error messages
    inputs: dict[str, Any] = field(default_factory=dict)
    prompt: str | list[int] | None = None
    max_new_tokens: int | None = None


@dataclass
class BadRecord:
    """A record that could not be read; it takes an index like any sample so that indices stay stable."""

    index: int
    where: str
    error: str


@dataclass
class BatchInputs:
    """Every record of an input, its kind, and a fingerprint of its bytes (resume checks it)."""

    path: Path
    kind: str
    samples: list[Sample]
    bad: list[BadRecord]
    fingerprint: str

    @property
    def total(self) -> int:
        return len(self.samples) + len(self.bad)


def read_inputs(path: str | Path) -> BatchInputs:
    """Records of a JSONL file or of a folder of .npz files; a ModelError when there is nothing to read."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise ModelError(f"{path}: no .npz files in this folder")
        records = [_npz_record(i, f) for i, f in enumerate(files)]
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
    elif path.is_file():
        data = path.read_bytes()
        lines = [(n, line) for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1)]
        records = [
            _jsonl_record(i, n, line) for i, (n, line) in enumerate((n, t) for n, t in lines if t.strip())
        ]
        if not records:
            raise ModelError(f"{path}: no records (one JSON object per line was expected)")
        digest = hashlib.sha256(data)
    else:
        raise ModelError(f"inputs not found: {path}", hint="give a .jsonl file or a folder of .npz files")
    return _split(path, records, digest.hexdigest())


def _split(path: Path, records: list[Sample | BadRecord], fingerprint: str) -> BatchInputs:
    samples = [r for r in records if isinstance(r, Sample)]
    kind = samples[0].kind if samples else TENSORS
    bad = [r for r in records if isinstance(r, BadRecord)]
    for sample in [s for s in samples if s.kind != kind]:
        bad.append(
            BadRecord(
                sample.index, sample.where, f"a {sample.kind} record among {kind} records: one kind per input"
            )
        )
    samples = [s for s in samples if s.kind == kind]
    bad.sort(key=lambda r: r.index)
    return BatchInputs(path, kind, samples, bad, fingerprint)


def _npz_record(index: int, file: Path) -> Sample | BadRecord:
    try:
        with np.load(file, allow_pickle=False) as archive:
            inputs = {name: archive[name] for name in archive.files}
    except Exception as exc:  # any unreadable file is one bad record, never the end of the run
        return BadRecord(index, file.name, f"cannot read npz: {exc}")
    if not inputs:
        return BadRecord(index, file.name, "the npz file holds no arrays")
    return Sample(index, TENSORS, file.name, inputs=inputs)


def _jsonl_record(index: int, line_no: int, text: str) -> Sample | BadRecord:
    where = f"line {line_no}"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadRecord(index, where, f"not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(record, dict):
        return BadRecord(index, where, "a record must be a JSON object")
    if "inputs" in record:
        inputs = record["inputs"]
        if not isinstance(inputs, dict) or not inputs:
            return BadRecord(index, where, '"inputs" must be an object {name: nested list}')
        return Sample(index, TENSORS, where, inputs=inputs)
    if "prompt" in record:
        prompt = record["prompt"]
        tokens_ok = isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
        if not (isinstance(prompt, str) and prompt) and not tokens_ok:
            return BadRecord(index, where, '"prompt" must be a non-empty string or a list of token ids')
        budget = record.get("max_new_tokens")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
            return BadRecord(index, where, '"max_new_tokens" must be an integer >= 1')
        return Sample(index, PROMPT, where, prompt=prompt, max_new_tokens=budget)
    return BadRecord(index, where, 'a record needs "inputs" (model inputs) or "prompt" (text generation)')
