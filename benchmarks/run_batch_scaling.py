"""Throughput of ``llmc run-batch`` on MiniLM with 1 and 2 Ray workers, and a scale-out table on paper.

Inputs: ``--samples`` npz files of token ids, batch 1..8 (cycling) x 128 tokens. One local Ray runtime
serves every run. Configurations, interleaved over ``--rounds`` rounds (medians reported): 1 worker x 1
thread, 1 worker x all cores, N workers x 1 thread; beside them, in the driver process, the same samples
straight through one onnxruntime session at 1 thread (the per-sample cost without Ray).

Measured per run: wall time of ``run_batch`` (Ray already up: actor start and session load included), the
start-up until the actors are ready, and the steady throughput from ready to the last shard. The per-shard
overhead is measured directly, without the model (on a loaded machine the difference of two multi-second
runs drowns it): the Ray round trip of one shard's inputs to an actor and of its MiniLM-sized outputs back,
plus the driver writing the shard file and the manifest. The table on paper extends that to N workers,
each with its own core: throughput(N) = min(N * S / (S * c + o), S / o) for S samples per shard, c the
1-thread cost per sample and o the per-shard overhead (the second term: the driver handles shards one at a
time). A shared 2-core machine says little about real scaling: every figure comes with the load average.

    .venv/bin/python benchmarks/run_batch_scaling.py --out build/run-batch-scaling
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmc.bench import encoder_feeds, machine_info
from llmc.distributed._shards import Shard, ShardStore
from llmc.distributed._worker import Outcome
from llmc.distributed.run_batch import run_batch
from llmc.runtime.runner import OrtRunner

REPO = Path(__file__).resolve().parents[1]
ARTIFACT = REPO / "build" / "minilm-cpu"
PAPER_WORKERS = (1, 2, 4, 8, 16)


def ensure_artifact(artifact: Path) -> None:
    if not (artifact / "manifest.json").exists():
        llmc = REPO / ".venv" / "bin" / "llmc"
        subprocess.run([str(llmc), "compile", str(REPO / "specs" / "minilm-cpu.yaml"), "--force"], check=True)


def write_inputs(folder: Path, samples: int, seq_len: int) -> list[dict[str, np.ndarray]]:
    folder.mkdir(parents=True)
    feeds = []
    for i in range(samples):
        feed = encoder_feeds(1 + i % 8, seq_len, 30522)
        feed["input_ids"] = np.roll(feed["input_ids"], i, axis=1)  # distinct samples, same cost
        np.savez(folder / f"sample-{i:04d}.npz", **feed)
        feeds.append(feed)
    return feeds


def timed_batch(artifact: Path, inputs: Path, work: Path, workers: int, threads: int, shard: int) -> dict:
    out = work / f"out-{workers}x{threads}"
    shutil.rmtree(out, ignore_errors=True)
    marks: dict[str, float] = {}

    def progress(event: str, data: dict[str, Any]) -> None:
        marks[event] = time.perf_counter()

    t0 = time.perf_counter()
    report = run_batch(
        artifact,
        inputs,
        out,
        workers=workers,
        threads_per_worker=threads,
        shard_size=shard,
        progress=progress,
    )
    wall = time.perf_counter() - t0
    assert report.exit_code == 0, report.failed[:3]
    steady = marks["shard"] - marks["ready"]
    shutil.rmtree(out)
    return {
        "wall_s": wall,
        "startup_s": marks["ready"] - t0,
        "steady_s": steady,
        "samples_per_s": report.samples_run / wall,
        "steady_samples_per_s": report.samples_run / steady,
        "shards": report.shards,
    }


def in_process(artifact: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    """Seconds for every sample through one 1-thread session in this process (after one warm-up)."""
    runner = OrtRunner(artifact / "model.onnx", intra_op_threads=1)
    runner.run(feeds[0])
    t0 = time.perf_counter()
    for feed in feeds:
        runner.run(feed)
    return time.perf_counter() - t0


class _Echo:
    """Answers a shard's samples with zero outputs of the given shapes: the transport without the model."""

    def back(self, samples: list[Any], shapes: list[tuple[int, ...]]) -> list[Outcome]:
        return [
            Outcome(s.index, {"last_hidden_state": np.zeros(shape, np.float32)})
            for s, shape in zip(samples, shapes, strict=True)
        ]


def shard_overhead(feeds: list[dict[str, np.ndarray]], shard: int, work: Path, repeats: int = 15) -> dict:
    """Median seconds of one shard's Ray round trip and of writing its results (file + manifest)."""
    import ray

    from llmc.distributed._inputs import TENSORS, Sample

    samples = [Sample(i, TENSORS, f"sample {i}", inputs=f) for i, f in enumerate(feeds[:shard])]
    shapes = [(*f["input_ids"].shape, 384) for f in feeds[:shard]]
    echo = ray.remote(_Echo).options(num_cpus=0).remote()
    ray.get(echo.back.remote(samples, shapes))
    trips, writes = [], []
    store = ShardStore.open(work / "overhead", {"inputs": "overhead", "kind": TENSORS}, shard)
    for i in range(repeats):
        t0 = time.perf_counter()
        outcomes = ray.get(echo.back.remote(samples, shapes))
        t1 = time.perf_counter()
        store.write(Shard(i, samples), outcomes)
        trips.append(t1 - t0)
        writes.append(time.perf_counter() - t1)
    ray.kill(echo)
    return {"round_trip_s": statistics.median(trips), "write_s": statistics.median(writes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, default=ARTIFACT)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "build" / "run-batch-scaling")
    args = parser.parse_args()

    import ray

    ensure_artifact(args.artifact)
    cores = os.cpu_count() or 1
    configs = [(1, 1), (1, cores), (cores, 1)]  # (workers, threads per worker)
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20)
    runs: dict[str, list[dict]] = {f"{w}x{t}": [] for w, t in configs}
    local: list[float] = []
    loads = []
    with tempfile.TemporaryDirectory(prefix="run-batch-scaling.") as tmp:
        work = Path(tmp)
        feeds = write_inputs(work / "inputs", args.samples, args.seq_len)
        try:
            cost = shard_overhead(feeds, args.shard_size, work)
            for _ in range(args.rounds):
                loads.append(os.getloadavg()[0])
                local.append(in_process(args.artifact, feeds))
                for workers, threads in configs:
                    result = timed_batch(
                        args.artifact, work / "inputs", work, workers, threads, args.shard_size
                    )
                    runs[f"{workers}x{threads}"].append(result)
                    print(f"{workers} workers x {threads} threads: {json.dumps(result)}", flush=True)
        finally:
            ray.shutdown()

    def median(key: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[key])

    n, shard = args.samples, args.shard_size
    shards = runs["1x1"][0]["shards"]
    c = statistics.median(local) / n  # 1-thread seconds per sample, no Ray
    overhead = cost["round_trip_s"] + cost["write_s"]
    observed = (median("1x1", "steady_s") - c * n) / shards  # noisy: the difference of two long runs
    rows = []
    for key in runs:
        rows.append(
            {
                "config": key,
                "wall_s": median(key, "wall_s"),
                "startup_s": median(key, "startup_s"),
                "samples_per_s": median(key, "samples_per_s"),
                "steady_samples_per_s": median(key, "steady_samples_per_s"),
            }
        )
    base = median("1x1", "steady_samples_per_s")
    scaled = median(f"{cores}x1", "steady_samples_per_s")
    efficiency = scaled / (cores * base)
    paper = [
        {
            "workers": w,
            "samples_per_s": min(w * shard / (shard * c + overhead), shard / overhead if overhead else 1e9),
        }
        for w in PAPER_WORKERS
    ]
    result = {
        "machine": machine_info(),
        "load_average_1min": loads,
        "samples": n,
        "shard_size": shard,
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "in_process_1thread_s_per_sample": c,
        "per_shard_overhead_s": overhead,
        "per_shard_overhead_parts_s": cost,
        "per_shard_overhead_observed_1x1_s": observed,
        "runs": rows,
        "scaling_efficiency": efficiency,
        "paper": paper,
        "raw": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "run_batch_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"MiniLM, {n} samples (batch 1..8 x {args.seq_len} tokens), shards of {shard}, medians of {args.rounds} rounds;"
        f" {cores} cores, load average {', '.join(f'{x:.1f}' for x in loads)}",
        "",
        "| workers x threads | wall s | start-up s | samples/s (wall) | samples/s (steady) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['wall_s']:.2f} | {row['startup_s']:.2f} | {row['samples_per_s']:.1f} "
            f"| {row['steady_samples_per_s']:.1f} |"
        )
    lines += [
        "",
        f"in process, 1 thread: {1 / c:.1f} samples/s ({c * 1e3:.1f} ms per sample); "
        f"per-shard overhead {overhead * 1e3:.1f} ms (Ray round trip {cost['round_trip_s'] * 1e3:.1f} ms, "
        f"results written {cost['write_s'] * 1e3:.1f} ms; seen in the 1x1 run: {observed * 1e3:.0f} ms); "
        f"scaling efficiency {cores}x1 vs 1x1: {efficiency:.2f}",
        "",
        f"on paper: N workers x 1 core, {shard} samples per shard; the driver's bound S / o = "
        f"{shard / overhead:.0f} samples/s (reached near N = {shard / overhead * c:.0f})",
        "",
        "| workers (1 core each, on paper) | samples/s | efficiency |",
        "|---|---|---|",
        *[
            f"| {p['workers']} | {p['samples_per_s']:.1f} | {p['samples_per_s'] * c / p['workers']:.2f} |"
            for p in paper
        ],
    ]
    (args.out / "run_batch_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
