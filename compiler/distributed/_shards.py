"""Shards of a batch on disk: one result file per finished shard, a manifest of them, and the merged output.

The output folder is what makes a batch resumable. ``manifest.json`` names the inputs and the artifact (by
fingerprint), the shard size, and every finished shard with its sample indices, its file's sha256 and the
samples that failed in it. A rerun with the same inputs reads the manifest, keeps the shard size it recorded
(so that shards line up even if ``--workers`` changed) and redoes only the shards without a valid file. Files
are written to a temporary name and renamed, shard file first and manifest second, so that an interrupted
run leaves either a finished shard or none; a finished shard is never written again, and an output folder
that belongs to other inputs or another artifact is refused rather than overwritten.

Tensor results are npz files whose keys are ``"<index>/<output name>"``; generations are JSONL records.
The merged file (``results.npz`` / ``results.jsonl``) is streamed shard by shard in input order.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmc.distributed._inputs import PROMPT, Sample
from llmc.distributed._worker import Outcome
from llmc.errors import ModelError

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class Shard:
    """A contiguous run of samples (in input order); ``id`` fixes its file name."""

    id: int
    samples: list[Sample]

    @property
    def indices(self) -> list[int]:
        return [s.index for s in self.samples]


def plan_shards(samples: list[Sample], shard_size: int) -> list[Shard]:
    return [
        Shard(i, samples[start : start + shard_size])
        for i, start in enumerate(range(0, len(samples), shard_size))
    ]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_atomically(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_npz_entries(file: Any, entries: Iterator[tuple[str, np.ndarray]]) -> None:
    """An npz archive written entry by entry (``np.savez`` would hold every array at once)."""
    with zipfile.ZipFile(file, "w", allowZip64=True) as archive:
        for key, array in entries:
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


class ShardStore:
    """The output folder of one batch: finished shards, their manifest, the merged result and the report."""

    def __init__(self, out: Path, identity: dict[str, Any], shard_size: int) -> None:
        self.out = out
        self.identity = identity
        self.shard_size = shard_size
        self.shards: dict[str, dict[str, Any]] = {}

    @classmethod
    def open(cls, out: str | Path, identity: dict[str, Any], shard_size: int) -> ShardStore:
        """The store in ``out``; an existing manifest must name the same ``identity`` and sets the shard size."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / MANIFEST
        if not path.exists():
            store = cls(out, identity, shard_size)
            store._save()
            return store
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(
                f"{path}: not valid JSON ({exc}); delete the output folder to start over"
            ) from exc
        if recorded.get("format") != FORMAT or recorded.get("identity") != identity:
            raise ModelError(
                f"{out} holds results of other inputs or another artifact: they would be overwritten",
                hint="choose another --out folder, or delete this one to start over",
            )
        store = cls(out, identity, int(recorded["shard_size"]))
        store.shards = recorded.get("shards", {})
        return store

    @property
    def suffix(self) -> str:
        return ".jsonl" if self.identity.get("kind") == PROMPT else ".npz"

    def is_done(self, shard: Shard) -> bool:
        entry = self.shards.get(str(shard.id))
        if entry is None or entry.get("indices") != shard.indices:
            return False
        file = self.out / entry["file"]
        return file.is_file() and _sha256(file) == entry["sha256"]

    def failed(self) -> dict[int, str]:
        """Sample index -> error, over every finished shard."""
        return {int(i): e for entry in self.shards.values() for i, e in entry.get("failed", {}).items()}

    def write(self, shard: Shard, outcomes: list[Outcome]) -> None:
        """Record a finished shard: its result file, then its manifest entry."""
        if self.is_done(shard):
            return  # finished files are never rewritten
        name = f"shard-{shard.id:05d}{self.suffix}"
        ok = sorted((o for o in outcomes if o.error is None), key=lambda o: o.index)
        if self.suffix == ".jsonl":
            text = "".join(json.dumps(o.result) + "\n" for o in ok).encode()
            _replace_atomically(self.out / name, lambda f: f.write(text))
        else:
            entries = ((f"{o.index}/{k}", v) for o in ok for k, v in o.result.items())
            _replace_atomically(self.out / name, lambda f: _write_npz_entries(f, entries))
        self.shards[str(shard.id)] = {
            "file": name,
            "indices": shard.indices,
            "sha256": _sha256(self.out / name),
            "failed": {str(o.index): o.error for o in outcomes if o.error is not None},
        }
        self._save()

    def merge(self, shards: list[Shard]) -> Path:
        """Write ``results.npz`` / ``results.jsonl`` from every shard in order; all must be finished."""
        files = [self.out / self.shards[str(s.id)]["file"] for s in shards]
        target = self.out / f"results{self.suffix}"
        if self.suffix == ".jsonl":

            def write(f: Any) -> None:
                for file in files:
                    f.write(file.read_bytes())

            _replace_atomically(target, write)
        else:
            _replace_atomically(target, lambda f: _write_npz_entries(f, _npz_entries(files)))
        return target

    def _save(self) -> None:
        record = {"format": FORMAT, "identity": self.identity, "shard_size": self.shard_size}
        record["shards"] = dict(sorted(self.shards.items(), key=lambda item: int(item[0])))
        text = (json.dumps(record, indent=1) + "\n").encode()
        _replace_atomically(self.out / MANIFEST, lambda f: f.write(text))


def _npz_entries(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        with np.load(file, allow_pickle=False) as archive:
            for key in archive.files:
                yield key, archive[key]


def read_results(path: str | Path) -> dict[int, Any]:
    """Sample index -> outputs by name (npz) or generation record (jsonl), from a shard or merged file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {r["index"]: r for r in records}
    results: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            index, _, name = key.partition("/")
            results.setdefault(int(index), {})[name] = archive[key]
    return results
