"""Pipeline partition of SmolLM2 into K = 2, 3, 4 stages: sizes, costs, cuts, exactness, scale-out on paper.

From the fused IR (the fusion prefix of specs/smollm2-int4-cpu.yaml), after ``eliminate-dead-code``, runs
``partition-pipeline`` for each K, emits the stages as the CPU target does, and reports:

- per stage: parameter MB, cost share, layers; per cut: how many values cross and their bytes per token;
- greedy tokens (one prompt, 16 new tokens) through the PipelineRunner, in process and on Ray actors,
  against the whole model (both at onnxruntime's basic level, one thread per session);
- per-stage times measured stage by stage in this process (prefill of a 128-token prompt, and one decode
  step after it; medians of interleaved repetitions, one intra-op thread per session), and from them the
  pipeline on paper: with one stage per machine and micro-batches in flight, throughput is set by the
  slowest stage (1 / max stage time), latency by the sum plus the transfer of the crossing values
  (at a stated bandwidth); per-stage memory is the stage's weights plus the KV cache of its layers.

    .venv/bin/python benchmarks/partition_report.py --fused /tmp/llmc-shared/smollm2-fused.onnx \\
        --decoder-json /tmp/llmc-shared/smollm2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmc.bench import bench_prompt, machine_info
from llmc.distributed.pipeline import PipelineRunner
from llmc.frontends.base import DecoderSpec
from llmc.ir import Graph, clone, load_model, save_model
from llmc.pass_manager import run_pipeline
from llmc.runtime.generator import Generator
from llmc.runtime.runner import OrtRunner
from llmc.runtime.tokenizer import Tokenizer
from llmc.targets.cpu.stages import emit_stages

MB = 1e6
SESSION = {"graph_optimization_level": "basic", "intra_op_threads": 1}


def decoder_feeds(spec: DecoderSpec, ids: list[int], past: list[np.ndarray] | None, length: int) -> dict:
    """Feeds of one forward pass: ``ids`` after ``length`` cached positions (``past``: key, value per layer)."""
    total = length + len(ids)
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([ids], np.int64),
        "attention_mask": np.ones((1, total), np.int64),
        "position_ids": np.arange(length, total, dtype=np.int64)[None, :],
    }
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    for i in range(spec.num_layers):
        feeds[spec.past_key.format(i=i)] = past[2 * i] if past else empty
        feeds[spec.past_value.format(i=i)] = past[2 * i + 1] if past else empty
    return feeds


def time_stages(
    runners: list[OrtRunner], wiring: dict, whole: OrtRunner, feeds: dict, reps: int
) -> tuple[list[float], float, dict]:
    """Median ms of each stage and of the whole model on ``feeds`` (interleaved per repetition), and the
    values that flowed between the stages."""
    samples: list[list[float]] = [[] for _ in runners]
    whole_samples: list[float] = []
    env: dict[str, np.ndarray] = {}
    for _ in range(reps):
        start = time.perf_counter()
        whole.run(feeds)
        whole_samples.append((time.perf_counter() - start) * 1e3)
        env = dict(feeds)
        for s, (runner, row) in enumerate(zip(runners, wiring["stages"], strict=True)):
            stage_feeds = {n: env[n] for n in row["inputs"]}
            start = time.perf_counter()
            env.update(runner.run(stage_feeds, row["outputs"]))
            samples[s].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(x) for x in samples], statistics.median(whole_samples), env


def time_ray_pipeline(
    pipeline: PipelineRunner, whole: OrtRunner, feeds: dict, n: int, reps: int
) -> tuple[float, float]:
    """ms per micro-batch: ``n`` decode steps through the Ray pipeline (in flight) and one by one through
    the whole model, interleaved, medians of ``reps``."""
    ray_ms, whole_ms = [], []
    for _ in range(reps):
        start = time.perf_counter()
        pipeline.run_many([feeds] * n, ["logits"])
        ray_ms.append((time.perf_counter() - start) * 1e3 / n)
        start = time.perf_counter()
        for _ in range(n):
            whole.run(feeds, ["logits"])
        whole_ms.append((time.perf_counter() - start) * 1e3 / n)
    return statistics.median(ray_ms), statistics.median(whole_ms)


def crossing_bytes(wiring: dict, env: dict, model_inputs: set[str]) -> list[int]:
    """Bytes sent over each cut (values made before it and read after it) for the run that filled ``env``."""
    rows = wiring["stages"]
    made = {n: s for s, row in enumerate(rows) for n in row["outputs"]}
    sizes = []
    for cut in range(len(rows) - 1):
        names = {
            n for row in rows[cut + 1 :] for n in row["inputs"] if n not in model_inputs and made[n] <= cut
        }
        sizes.append(int(sum(env[n].nbytes for n in names)))
    return sizes


def greedy(runner: Any, spec: DecoderSpec, prompt: list[int], n: int) -> list[int]:
    return Generator(runner, spec).generate(prompt, n, stop_at_eos=False).tokens


def kv_bytes_per_token(spec: DecoderSpec, layers: int) -> int:
    return 2 * layers * spec.num_kv_heads * spec.head_dim * np.dtype(spec.kv_dtype).itemsize


def report_k(
    graph: Graph, k: int, spec: DecoderSpec, work: Path, ctx: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    part = clone(graph)
    record = run_pipeline(part, [{"partition-pipeline": {"stages": k, "balance": args.balance}}]).records[-1]
    out = work / f"k{k}"
    wiring = emit_stages(part, out)
    del part
    gc.collect()
    runners = [OrtRunner(out / row["file"], **SESSION) for row in wiring["stages"]]
    whole = ctx["whole"]
    prefill_ms, whole_prefill, env = time_stages(runners, wiring, whole, ctx["prefill_feeds"], args.reps)
    decode_ms, whole_decode, env = time_stages(runners, wiring, whole, ctx["decode_feeds"], 3 * args.reps)
    cross = crossing_bytes(wiring, env, set(ctx["prefill_feeds"]))
    del runners
    gc.collect()
    local = PipelineRunner(out, wiring, use_ray=False, **SESSION)
    tokens_local = greedy(local, spec, ctx["prompt"], args.new_tokens)
    del local
    tokens_ray = None
    if not args.no_ray:
        with PipelineRunner(out, wiring, intra_op_threads=1, graph_optimization_level="basic") as ray_runner:
            tokens_ray = greedy(ray_runner, spec, ctx["prompt"], args.new_tokens)
            ray_ms = time_ray_pipeline(ray_runner, whole, ctx["decode_feeds"], args.micro_batches, 3)
    stages = []
    for row, rec, p_ms, d_ms in zip(
        wiring["stages"], record.details["stages"], prefill_ms, decode_ms, strict=True
    ):
        layers = rec["units"][1] - rec["units"][0] + 1  # the units are the decoder layers
        stages.append(
            {
                "stage": row["stage"],
                "units": rec["units"],
                "param_mb": row["param_bytes"] / MB,
                "cost_share": rec["cost_share"],
                "kv_kb_per_token": kv_bytes_per_token(spec, layers) / 1e3,
                "prefill_ms": p_ms,
                "decode_ms": d_ms,
            }
        )
    shutil.rmtree(out)
    return {
        "k": k,
        "stages": stages,
        "cuts": [
            {"count": c["count"], "decode_bytes": b, "values": c["values"][:6]}
            for c, b in zip(record.details["cuts"], cross, strict=True)
        ],
        "whole_prefill_ms": whole_prefill,
        "whole_decode_ms": whole_decode,
        "tokens_equal_local": tokens_local == ctx["tokens"],
        "tokens_equal_ray": None if tokens_ray is None else tokens_ray == ctx["tokens"],
        "ray_vs_whole_decode_ms": None if args.no_ray else ray_ms,
    }


def paper_rows(result: dict[str, Any], bandwidth: float) -> list[dict[str, float]]:
    """Throughput and latency of the pipeline on K machines, from the measured per-stage times."""
    rows = []
    for phase in ("prefill", "decode"):
        times = [s[f"{phase}_ms"] for s in result["stages"]]
        whole = result[f"whole_{phase}_ms"]
        transfer = [b / bandwidth * 1e3 for b in (c["decode_bytes"] for c in result["cuts"])]
        transfer = [t * (1 if phase == "decode" else 128) for t in transfer]  # prefill sends 128 positions
        speedup = whole / max(times)
        rows.append(
            {
                "phase": phase,
                "whole_ms": whole,
                "max_stage_ms": max(times),
                "sum_stage_ms": sum(times),
                "latency_ms": sum(times) + sum(transfer),
                "throughput_per_s": 1e3 / max(times),
                "speedup": speedup,
                "efficiency": speedup / result["k"],
            }
        )
    return rows


def print_report(results: list[dict[str, Any]], bandwidth: float) -> None:
    print("\n## Stages")
    print("| K | stage | layers | params MB | cost share | KV kB/token | prefill ms | decode ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for s in r["stages"]:
            first, last = s["units"]
            print(
                f"| {r['k']} | {s['stage']} | {first}-{last} | {s['param_mb']:.1f} | {s['cost_share']:.3f} | "
                f"{s['kv_kb_per_token']:.1f} | {s['prefill_ms']:.1f} | {s['decode_ms']:.2f} |"
            )
    print("\n## Cuts (values crossing; bytes per decode step)")
    for r in results:
        for i, c in enumerate(r["cuts"]):
            print(
                f"K={r['k']} cut {i}|{i + 1}: {c['count']} values, {c['decode_bytes']} B: {', '.join(c['values'])}"
            )
    print("\n## Greedy tokens equal to the whole model (16 new tokens)")
    for r in results:
        print(f"K={r['k']}: in process {r['tokens_equal_local']}, Ray actors {r['tokens_equal_ray']}")
    print(f"\n## Scale-out on paper (one stage per machine, transfers at {bandwidth / 1e9:.2f} GB/s)")
    print(
        "| K | phase | whole ms | slowest stage ms | latency ms | throughput /s | speedup | efficiency | max stage MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mem = max(s["param_mb"] for s in r["stages"])
        for p in paper_rows(r, bandwidth):
            print(
                f"| {r['k']} | {p['phase']} | {p['whole_ms']:.2f} | {p['max_stage_ms']:.2f} | {p['latency_ms']:.2f} | "
                f"{p['throughput_per_s']:.1f} | {p['speedup']:.2f} | {p['efficiency']:.2f} | {mem:.1f} |"
            )
    print(
        "\n## Measured on this machine: Ray pipeline (decode-step micro-batches in flight) vs the whole model"
    )
    for r in results:
        if r["ray_vs_whole_decode_ms"] is not None:
            ray_ms, whole_ms = r["ray_vs_whole_decode_ms"]
            print(
                f"K={r['k']}: Ray {ray_ms:.2f} ms per micro-batch, whole model one by one {whole_ms:.2f} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fused", default="/tmp/llmc-shared/smollm2-fused.onnx")
    parser.add_argument("--decoder-json", default="/tmp/llmc-shared/smollm2.json")
    parser.add_argument("--stages", default="2,3,4")
    parser.add_argument("--balance", default="both", choices=["params", "flops", "both"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--bandwidth", type=float, default=1.25e9, help="bytes/s between machines (10 GbE)")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    meta = json.loads(Path(args.decoder_json).read_text())
    spec = DecoderSpec.from_json(meta["decoder"])
    tokenizer = Tokenizer.from_files({k: Path(v) for k, v in meta["assets"].items()})
    graph = load_model(args.fused)
    dce = run_pipeline(graph, ["eliminate-dead-code"]).records[-1]
    print(f"eliminate-dead-code: {dce.stats}; weights {graph.initializers.nbytes() / MB:.1f} MB")
    with tempfile.TemporaryDirectory(prefix="llmc-partition-") as tmp:
        work = Path(tmp)
        save_model(graph, work / "whole.onnx")
        whole = OrtRunner(work / "whole.onnx", **SESSION)
        prompt = tokenizer.encode("The three primary colors are", add_special_tokens=False)
        long_prompt = bench_prompt(tokenizer, spec.vocab_size, 128)
        prefill_feeds = decoder_feeds(spec, long_prompt, None, 0)
        names = [o.name for o in whole.outputs]
        out = whole.run(prefill_feeds)
        past = [out[n] for n in names[1:]]
        decode_feeds = decoder_feeds(spec, [int(np.argmax(out["logits"][0, -1]))], past, len(long_prompt))
        ctx = {
            "whole": whole,
            "prompt": prompt,
            "tokens": greedy(whole, spec, prompt, args.new_tokens),
            "prefill_feeds": prefill_feeds,
            "decode_feeds": decode_feeds,
        }
        print("machine:", json.dumps(machine_info()))
        print("prompt tokens:", prompt, "greedy:", ctx["tokens"])
        results = [report_k(graph, int(k), spec, work, ctx, args) for k in args.stages.split(",")]
    print_report(results, args.bandwidth)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
