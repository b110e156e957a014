"""Run pipeline stages (``stage_<i>.onnx`` + wiring, see ``llmc.targets.cpu.stages``) as one Runner.

``PipelineRunner`` has the Runner interface (``inputs``, ``outputs``, ``run(feeds, outputs)``), so the
generator, golden checks and benchmarks drive a partitioned model like a whole one. With Ray, each stage is
an actor holding one onnxruntime session; a stage returns one object per later stage that reads from it (and
one with the graph outputs it makes), and those ObjectRefs go straight to the next actors, so values move
actor to actor without passing through the driver. ``run_many`` submits micro-batches back to back: Ray
starts stage i on micro-batch j as soon as stage i-1 has finished it, so stage i works on j while stage i+1
works on j-1. Without Ray (``use_ray=False``) the same stages run one after another in this process.

Ray does the distribution (actors, object transfer, scheduling); only the wiring is llmc's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import LlmcError
from llmc.runtime.runner import OrtRunner, TensorSig

FINAL = "outputs"  # the route of a stage's graph outputs


class PipelineError(LlmcError):
    """The pipeline cannot start or run (Ray missing or unreachable, a stage file missing, an actor died)."""


def _signatures(rows: Sequence[dict[str, Any]]) -> list[TensorSig]:
    return [
        TensorSig(r["name"], r.get("dtype", "unknown"), None if r.get("shape") is None else tuple(r["shape"]))
        for r in rows
    ]


class _Stage:
    """One stage: an onnxruntime session, the names it reads, and where each of its results goes.

    ``routes`` maps a later stage index (or ``FINAL``) to the names sent there; ``run`` answers one dict per
    route, in the order of ``routes``. The same class runs in process and as a Ray actor.
    """

    def __init__(
        self, path: str, inputs: list[str], routes: list[tuple[Any, list[str]]], session: dict
    ) -> None:
        self.runner = OrtRunner(path, **session)
        self.inputs = inputs
        self.routes = routes
        self.names = list(dict.fromkeys(n for _dest, names in routes for n in names))

    def run(self, feeds: dict[str, np.ndarray], *upstream: dict[str, np.ndarray]):
        env = dict(feeds)
        for values in upstream:
            env.update(values)
        out = self.runner.run({n: env[n] for n in self.inputs}, self.names)
        parts = tuple({n: out[n] for n in names} for _dest, names in self.routes)
        return parts if len(parts) > 1 else parts[0]


class PipelineRunner:
    """Stages of one model run as a pipeline, on Ray actors or in this process."""

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        wiring: dict[str, Any],
        *,
        ray_address: str | None = None,
        use_ray: bool = True,
        intra_op_threads: int | None = None,
        graph_optimization_level: str = "all",
        actor_options: dict[str, Any] | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        rows = wiring["stages"]
        if isinstance(source, str | Path):
            paths = [Path(source) / row["file"] for row in rows]
        else:
            paths = [Path(p) for p in source]
        if len(paths) != len(rows):
            raise PipelineError(f"{len(paths)} stage files for {len(rows)} stages in the wiring")
        for path in paths:
            if not path.is_file():
                raise PipelineError(f"pipeline stage file not found: {path}")
        self.inputs = _signatures(wiring["inputs"])
        self.outputs = _signatures(wiring["outputs"])
        self.last_token_outputs = list(wiring.get("last_token_outputs", []))
        self.num_stages = len(rows)
        self.max_in_flight = max_in_flight or 2 * self.num_stages
        self._plan(rows)
        self._ray = None
        self._owns_ray = False
        if use_ray:
            self._ray, self._owns_ray = _start_ray(ray_address)
            threads = intra_op_threads or max(1, (os.cpu_count() or 1) // self.num_stages)
        else:
            threads = intra_op_threads
        session = {"intra_op_threads": threads, "graph_optimization_level": graph_optimization_level}
        self._stages: list[Any] = []
        try:
            for s, path in enumerate(paths):
                args = (os.fspath(path), rows[s]["inputs"], self._routes[s], session)
                if self._ray is None:
                    self._stages.append(_Stage(*args))
                else:
                    actor = self._ray.remote(_Stage).options(**(actor_options or {}))
                    self._stages.append(actor.remote(*args))
            if self._ray is not None:  # surface session errors (bad model files) here, not on first run
                self._ray.get([a.__ray_ready__.remote() for a in self._stages])
        except Exception as exc:
            self.close()
            if isinstance(exc, LlmcError):
                raise
            raise PipelineError(f"cannot start the pipeline stages: {exc}") from exc

    def _plan(self, rows: Sequence[dict[str, Any]]) -> None:
        """Which stage makes each value, which earlier stages each stage reads, and each stage's routes."""
        self._maker: dict[str, int] = {}
        for s, row in enumerate(rows):
            for name in row["outputs"]:
                self._maker.setdefault(name, s)
        self._feeds = [[n for n in row["inputs"] if n not in self._maker] for row in rows]
        self._sources: list[list[int]] = []
        routes: list[dict[Any, list[str]]] = [{} for _ in rows]
        for s, row in enumerate(rows):
            sources = []
            for name in row["inputs"]:
                maker = self._maker.get(name)
                if maker is not None:
                    routes[maker].setdefault(s, []).append(name)
                    sources.append(maker)
            self._sources.append(sorted(set(sources)))
        model_outputs = {sig.name for sig in self.outputs}
        for s, row in enumerate(rows):
            routes[s][FINAL] = [n for n in row["outputs"] if n in model_outputs]
        self._routes = [list(r.items()) for r in routes]

    # -- running ------------------------------------------------------------------------------------
    def run(
        self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        return self.run_many([feeds], outputs)[0]

    def run_many(
        self, feeds_list: Sequence[dict[str, np.ndarray]], outputs: Sequence[str] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Outputs for each feed dict (micro-batch), in order; on Ray, up to ``max_in_flight`` in flight."""
        names = list(outputs) if outputs is not None else [sig.name for sig in self.outputs]
        if self._ray is None:
            return [self._pick(self._run_local(feeds), feeds, names) for feeds in feeds_list]
        results: list[dict[str, np.ndarray] | None] = [None] * len(feeds_list)
        pending: list[tuple[int, list[Any]]] = []
        try:
            for j, feeds in enumerate(feeds_list):
                pending.append((j, self._submit(feeds)))
                if len(pending) >= self.max_in_flight:
                    self._collect(pending.pop(0), feeds_list, names, results)
            while pending:
                self._collect(pending.pop(0), feeds_list, names, results)
        except self._ray.exceptions.RayError as exc:
            raise PipelineError(f"a pipeline stage failed: {exc}") from exc
        return results  # type: ignore[return-value]

    def _run_local(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts: list[dict[Any, dict[str, np.ndarray]]] = []
        final: dict[str, np.ndarray] = {}
        for s, stage in enumerate(self._stages):
            upstream = [parts[m][s] for m in self._sources[s]]
            out = stage.run({n: feeds[n] for n in self._feeds[s]}, *upstream)
            out = out if isinstance(out, tuple) else (out,)
            parts.append({dest: values for (dest, _names), values in zip(self._routes[s], out, strict=True)})
            final.update(parts[-1][FINAL])
        return final

    def _submit(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        """Chain one micro-batch through the actors; returns the refs of each stage's graph outputs."""
        refs: list[dict[Any, Any]] = []
        for s, actor in enumerate(self._stages):
            upstream = [refs[m][s] for m in self._sources[s]]
            stage_feeds = {n: feeds[n] for n in self._feeds[s]}
            out = actor.run.options(num_returns=len(self._routes[s])).remote(stage_feeds, *upstream)
            out = out if isinstance(out, list) else [out]
            refs.append({dest: ref for (dest, _names), ref in zip(self._routes[s], out, strict=True)})
        return [r[FINAL] for r in refs]

    def _collect(self, item, feeds_list, names, results) -> None:
        j, final_refs = item
        final: dict[str, np.ndarray] = {}
        for part in self._ray.get(final_refs):
            final.update(part)
        results[j] = self._pick(final, feeds_list[j], names)

    @staticmethod
    def _pick(final: dict[str, np.ndarray], feeds: dict[str, np.ndarray], names: Sequence[str]):
        env = {**feeds, **final}  # a graph output may be a graph input passed through
        missing = [n for n in names if n not in env]
        if missing:
            raise PipelineError(f"the pipeline has no output named {', '.join(missing)}")
        return {n: env[n] for n in names}

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the actors, and the Ray runtime when this runner started it."""
        if self._ray is not None:
            for actor in self._stages:
                self._ray.kill(actor)
            if self._owns_ray:
                self._ray.shutdown()
        self._stages = []

    def __enter__(self) -> PipelineRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_ray(address: str | None):
    """(ray module, whether this call started the runtime); joins ``address`` or starts a local runtime."""
    try:
        import ray
    except ImportError as exc:
        raise PipelineError(
            "running pipeline stages on actors needs Ray", hint="pip install 'llmc[distributed]'"
        ) from exc
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
        raise PipelineError(f"cannot reach {where}: {exc}") from exc
    return ray, True


def load_pipeline_runner(
    artifact_dir: str | Path,
    manifest: dict[str, Any],
    *,
    ray_address: str | None = None,
    use_ray: bool | None = None,
) -> PipelineRunner:
    """The runner of an artifact whose manifest has ``pipeline_stages`` (Ray when installed, unless told)."""
    if use_ray is None:
        try:
            import ray  # noqa: F401

            use_ray = True
        except ImportError:
            use_ray = False
    runtime = manifest.get("runtime", {})
    return PipelineRunner(
        artifact_dir,
        manifest["pipeline_stages"],
        ray_address=ray_address,
        use_ray=use_ray,
        intra_op_threads=runtime.get("intra_op_threads"),
        graph_optimization_level=runtime.get("graph_optimization_level", "all"),
    )
