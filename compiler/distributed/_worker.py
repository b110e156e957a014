"""The Ray actor of ``llmc run-batch``: one artifact session, run over one shard of samples at a time.

Each actor opens the artifact once, with the intra-op thread count the driver chose, so that N actors on one
machine share its cores instead of each starting a thread per core. A sample that fails (wrong input name,
bad shape, prompt too long) fails alone: its error goes back with the shard and the other samples run.

``crash_after`` exists for the fault tests only: the driver passes it just for the first attempt of the shard
named by ``CrashInjection`` (a keyword of the Python API, never a CLI option), and the actor then ends its own
process with ``os._exit`` as a real crash would, leaving the driver a ``RayActorError``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmc.distributed._inputs import PROMPT, Sample


@dataclass
class Outcome:
    """What one sample gave: outputs by name (tensors), a generation record (prompt), or an error."""

    index: int
    result: dict[str, Any] | None
    error: str | None = None


class BatchWorker:
    """Runs shards of one kind (tensors or prompts) on one artifact session; ``ray.remote`` wraps it."""

    def __init__(self, artifact_dir: str, intra_op_threads: int, kind: str, max_new_tokens: int) -> None:
        from llmc.runtime.artifact import load_artifact

        self.runner, manifest = load_artifact(artifact_dir, intra_op_threads=intra_op_threads)
        self.kind = kind
        self.max_new_tokens = max_new_tokens
        self.generator = None
        if kind == PROMPT:
            from llmc.runtime.generator import Generator, artifact_decoder, artifact_tokenizer

            tokenizer = artifact_tokenizer(Path(artifact_dir), manifest)
            self.generator = Generator(self.runner, artifact_decoder(manifest), tokenizer)

    def ready(self) -> int:
        """The actor's process id, once its session is open."""
        return os.getpid()

    def run_shard(self, samples: list[Sample], crash_after: int | None = None) -> list[Outcome]:
        outcomes = []
        for done, sample in enumerate(samples):
            if crash_after is not None and done == crash_after:
                os._exit(1)  # test-only fault injection (see the module docstring)
            try:
                result = self._generate(sample) if sample.kind == PROMPT else self._run(sample)
                outcomes.append(Outcome(sample.index, result))
            except Exception as exc:  # one bad sample fails alone; its message goes into the report
                outcomes.append(Outcome(sample.index, None, f"{type(exc).__name__}: {exc}"))
        return outcomes

    def _run(self, sample: Sample) -> dict[str, np.ndarray]:
        expected = {sig.name: sig for sig in self.runner.inputs}
        missing = sorted(set(expected) - set(sample.inputs))
        unknown = sorted(set(sample.inputs) - set(expected))
        if missing or unknown:
            raise ValueError(
                f"{sample.where}: inputs do not match the model (missing {missing}, unknown {unknown}; "
                f"the model takes {sorted(expected)})"
            )
        feeds = {}
        for name, value in sample.inputs.items():
            array = np.asarray(value)
            dtype = np.dtype(expected[name].dtype)
            if not np.can_cast(array.dtype, dtype, "same_kind"):
                raise ValueError(f"{sample.where}: input '{name}' is {array.dtype}, the model wants {dtype}")
            feeds[name] = array.astype(dtype, copy=False)
        return self.runner.run(feeds)

    def _generate(self, sample: Sample) -> dict[str, Any]:
        from llmc.runtime.generator import SamplingConfig

        budget = sample.max_new_tokens or self.max_new_tokens
        result = self.generator.generate(sample.prompt, budget, sampling=SamplingConfig(greedy=True))
        return {"index": sample.index, "prompt": sample.prompt, "text": result.text, "tokens": result.tokens}
