"""``llmc run-batch``: run many samples through an artifact on N Ray actors, resumably, in input order.

The inputs are split into contiguous shards; a small scheduler keeps one shard in flight per actor and
writes each shard's results as soon as it returns (``_shards.ShardStore``), so that an interrupted run
resumes where it stopped. An actor that dies (``RayActorError``: a crash, an OOM kill, a lost node) is
replaced and its shard retried, at most ``retries`` times; a sample that fails inside a live actor fails
alone. Ray does the process management, placement and transport; nothing here is a home-made cluster.

Threads: every actor's onnxruntime session gets ``cores // workers`` intra-op threads (or
``threads_per_worker``) and asks Ray for that many CPUs, so that actors never oversubscribe a machine.
Without an address a local Ray runtime starts (and stops at the end); with one, the driver joins that
cluster, whose nodes must have llmc installed and see the artifact at the same path.

Test hook: ``CrashInjection`` (keyword ``inject_crash`` of ``run_batch``, not reachable from the CLI) makes
the actor that runs the given shard end its process mid-shard, on the first attempt only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.distributed._inputs import PROMPT, BatchInputs, read_inputs
from llmc.distributed._shards import Shard, ShardStore, plan_shards
from llmc.distributed._worker import BatchWorker, Outcome
from llmc.errors import LlmcError, ModelError
from llmc.targets.base import read_manifest

Progress = Callable[[str, dict[str, Any]], None]
READY_TIMEOUT_S = 300.0


def _noop(event: str, data: dict[str, Any]) -> None:
    pass


class RayUnavailable(LlmcError):
    """No Ray cluster could be reached or started: nothing can run."""


class SamplesFailed(LlmcError):
    """Some samples failed or were left unfinished; the others are in the results (exit code 1)."""

    exit_code = 1


@dataclass(frozen=True)
class CrashInjection:
    """Test-only: the actor running shard ``shard`` ends its process after ``after`` samples, once."""

    shard: int
    after: int = 0


@dataclass
class BatchReport:
    """What a batch did: counts, failed samples (index, where, error), shards run / resumed, timing."""

    out: Path
    total: int
    succeeded: int
    failed: list[dict[str, Any]]
    shards: int
    shards_run: int
    shards_resumed: int
    samples_run: int
    actor_restarts: int
    workers: int
    threads_per_worker: int
    seconds: float
    results: Path | None
    unfinished_shards: list[int] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.unfinished_shards else 0

    def to_json(self) -> dict[str, Any]:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        data["samples_per_s"] = self.samples_per_s
        return data

    @property
    def samples_per_s(self) -> float:
        """Samples run by this call (resumed ones excluded) per second of its wall time."""
        return self.samples_run / self.seconds if self.seconds > 0 else 0.0


def run_batch(
    artifact: str | Path,
    inputs: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    address: str | None = None,
    threads_per_worker: int | None = None,
    retries: int = 2,
    shard_size: int | None = None,
    max_new_tokens: int = 64,
    stop_after: int | None = None,
    progress: Progress = _noop,
    inject_crash: CrashInjection | None = None,
) -> BatchReport:
    """Run every sample of ``inputs`` through ``artifact`` on ``workers`` Ray actors; results go to ``out``.

    ``stop_after`` ends the run after that many shards were written (an interruption, for tests and for
    running a batch in parts); a later call with the same inputs and ``out`` finishes it.
    """
    start = time.perf_counter()
    if workers < 1 or retries < 0 or (threads_per_worker is not None and threads_per_worker < 1):
        raise ModelError("--workers and --threads-per-worker must be >= 1, --retries >= 0")
    if address is not None:
        _check_reachable(address)
    artifact = Path(artifact).resolve()
    batch = read_inputs(inputs)
    identity = _identity(artifact, batch, max_new_tokens)
    size = shard_size or max(1, min(64, -(-len(batch.samples) // (4 * workers))))
    store = ShardStore.open(out, identity, size)
    shards = plan_shards(batch.samples, store.shard_size)
    todo = [s for s in shards if not store.is_done(s)]
    todo_samples = sum(len(s.samples) for s in todo)
    progress("start", {"samples": len(batch.samples), "todo": todo_samples, "shards": len(shards)})
    lost: dict[int, str] = {}
    run = _Scheduler(store, progress, retries, inject_crash)
    actors, threads = min(workers, len(todo)), threads_per_worker or 1  # no idle actors for a short rest
    if todo:
        with _ray_session(address) as cores:
            threads = threads_per_worker or max(1, cores // actors)
            cpus = threads if threads * actors <= cores else _fractional(cores / actors)
            run.start(artifact, actors, threads, cpus, batch.kind, max_new_tokens)
            progress("ready", {"workers": actors, "threads": threads})
            lost = run.drain(todo, stop_after)
    results, failed, unfinished = _finish(batch, shards, store, lost)
    pending = sum(len(s.samples) for s in shards if s.id in unfinished)
    return BatchReport(
        out=Path(out),
        total=batch.total,
        succeeded=batch.total - len(failed) - pending,
        failed=failed,
        shards=len(shards),
        shards_run=run.shards_run,
        shards_resumed=len(shards) - len(todo),
        samples_run=run.samples_run,
        actor_restarts=run.restarts,
        workers=actors,
        threads_per_worker=threads,
        seconds=time.perf_counter() - start,
        results=results,
        unfinished_shards=unfinished,
    )


def _finish(
    batch: BatchInputs, shards: list[Shard], store: ShardStore, lost: dict[int, str]
) -> tuple[Path | None, list[dict[str, Any]], list[int]]:
    """(merged results, failed samples in index order, unfinished shards): the results are merged once
    every shard has ended, finished or out of retries."""
    done = [s for s in shards if store.is_done(s)]
    finished = {s.id for s in done} | {s.id for s in shards if set(s.indices) & set(lost)}
    unfinished = [s.id for s in shards if s.id not in finished]
    results = store.merge(done) if not unfinished else None
    failed = {r.index: {"index": r.index, "where": r.where, "error": r.error} for r in batch.bad}
    where = {s.index: s.where for s in batch.samples}
    for index, error in [*store.failed().items(), *lost.items()]:
        failed[index] = {"index": index, "where": where[index], "error": error}
    return results, [failed[i] for i in sorted(failed)], unfinished


def _identity(artifact: Path, batch: BatchInputs, max_new_tokens: int) -> dict[str, Any]:
    """What a resumed run must share with the first: the inputs' bytes, the artifact's manifest, and for
    prompts the default token budget."""
    manifest = read_manifest(artifact)  # a ModelError when it is not an artifact
    if batch.kind == PROMPT and manifest.get("task") != "text-generation":
        raise ModelError(
            f"the inputs are prompts but {artifact} is a '{manifest.get('task')}' artifact",
            hint='give {"inputs": {...}} records, or a text-generation artifact',
        )
    artifact_digest = hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()
    identity = {"inputs": batch.fingerprint, "artifact": artifact_digest, "kind": batch.kind}
    return identity | ({"max_new_tokens": max_new_tokens} if batch.kind == PROMPT else {})


def _fractional(cpus: float) -> float | int:
    """A CPU request Ray accepts: whole numbers above 1, any fraction below."""
    return int(cpus) if cpus >= 1 else max(0.0001, round(cpus - 0.00005, 4))


# -- Ray -------------------------------------------------------------------------------------------------
@contextmanager
def _ray_session(address: str | None) -> Iterator[int]:
    """Ray for this run: the runtime already up in this process, a local one, or the cluster at ``address``.

    Yields the cluster's CPU count. A runtime started here is shut down at the end.
    """
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable("run-batch needs Ray", hint="pip install 'llmc[distributed]'") from exc

    started = False
    if not ray.is_initialized():
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        if address is None:
            options |= {"address": "local", "num_cpus": os.cpu_count() or 1, "include_dashboard": False}
        else:
            options["address"] = address
        what = "start a local Ray runtime" if address is None else f"join the Ray cluster at {address}"
        try:
            ray.init(**options)
        except Exception as exc:  # ray raises ConnectionError, RuntimeError, ValueError... for one cause
            raise RayUnavailable(f"cannot {what}: {exc}") from exc
        started = True
    elif address is not None:
        raise RayUnavailable(f"Ray is already running in this process; cannot also join {address}")
    try:
        yield max(1, int(ray.cluster_resources().get("CPU", 1)))
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds, with a clear message, where ``ray.init`` would wait a minute on a dead address."""
    if address in ("auto", "local"):
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"--ray {address}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as exc:
        raise RayUnavailable(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}",
            hint="check the address (`ray status` on the head node), or leave --ray out to run on a local Ray",
        ) from exc


class _Scheduler:
    """One shard in flight per actor; finished shards are written at once; dead actors are replaced."""

    def __init__(
        self, store: ShardStore, progress: Progress, retries: int, inject_crash: CrashInjection | None
    ) -> None:
        self.store = store
        self.progress = progress
        self.retries = retries
        self.inject_crash = inject_crash
        self.shards_run = 0
        self.samples_run = 0
        self.restarts = 0
        self.actors: list[Any] = []

    def start(self, artifact: Path, workers: int, threads: int, cpus: float, kind: str, max_new: int) -> None:
        import ray

        remote = ray.remote(BatchWorker).options(num_cpus=cpus, max_restarts=0, max_task_retries=0)
        self._new_actor = lambda: remote.remote(str(artifact), threads, kind, max_new)
        self.actors = [self._new_actor() for _ in range(workers)]
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as exc:
            self.stop()
            raise RayUnavailable(
                f"no worker started within {READY_TIMEOUT_S:.0f} s: too few CPUs free?"
            ) from exc
        except ray.exceptions.RayError as exc:
            self.stop()
            raise ModelError(f"the workers could not open {artifact}: {_cause(exc)}") from exc

    def stop(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def drain(self, todo: list[Shard], stop_after: int | None) -> dict[int, str]:
        """Run ``todo``; returns sample index -> error for the shards that ran out of retries."""
        import ray

        queue = deque((shard, 0) for shard in todo)
        idle = list(self.actors)
        pending: dict[Any, tuple[Any, Shard, int]] = {}
        lost: dict[int, str] = {}
        try:
            while queue or pending:
                if stop_after is not None and self.shards_run >= stop_after:
                    break
                while queue and idle:
                    shard, attempt = queue.popleft()
                    actor = idle.pop()
                    crash = self.inject_crash
                    crash_after = crash.after if crash and crash.shard == shard.id and attempt == 0 else None
                    pending[actor.run_shard.remote(shard.samples, crash_after)] = (actor, shard, attempt)
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                actor, shard, attempt = pending.pop(ref)
                try:
                    outcomes: list[Outcome] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    idle.append(self._replace(actor))
                    self.progress("retry", {"shard": shard.id, "attempt": attempt + 1, "error": _cause(exc)})
                    if attempt < self.retries:
                        queue.appendleft((shard, attempt + 1))
                    else:
                        lost |= {i: f"worker died {attempt + 1} times: {_cause(exc)}" for i in shard.indices}
                    continue
                except ray.exceptions.RayTaskError as exc:  # a bug in the worker, not a sample: no retry
                    idle.append(actor)
                    lost |= {i: _cause(exc) for i in shard.indices}
                    continue
                idle.append(actor)
                self.store.write(shard, outcomes)
                self.shards_run += 1
                self.samples_run += len(shard.samples)
                self.progress("shard", {"shard": shard.id, "samples": len(shard.samples)})
        finally:
            self.stop()
        return lost

    def _replace(self, actor: Any) -> Any:
        import ray

        ray.kill(actor, no_restart=True)
        fresh = self._new_actor()
        self.actors = [fresh if a is actor else a for a in self.actors]
        self.restarts += 1
        return fresh


def _cause(exc: BaseException) -> str:
    """The first line of a Ray error: its type and message, without the remote traceback."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
