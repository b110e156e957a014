"""Decode speed and size of SmolLM2 with weight-only RTN int4/int8, legalized by the CPU target, against the
plain fp32 import.

Builds, from the fused IR (the fusion prefix of specs/smollm2-int4-cpu.yaml), the standard quantized forms
(``MatMul(x, DequantizeLinear(Q, axis=0))`` for the body, ``Gather``/``Transpose`` over one
``DequantizeLinear(Qe, axis=1)`` for the tied embedding/lm_head) with ``quantize_blocks``, runs the CPU
target's legalize pipeline (once per MatMulNBits accuracy level), emits each artifact and times decode
(batch 1, a fixed prompt, greedy, every candidate loaded at once, runs interleaved, medians). Also reports
the artifact size, greedy-token agreement with the plain import (teacher-forced) and, with ``--profile``,
onnxruntime's per-op time for one decode step.

    .venv/bin/python benchmarks/quant_decode.py --fused /tmp/llmc-shared/smollm2-fused.onnx \\
        --plain /tmp/llmc-shared/smollm2-plain.onnx --decoder-json /tmp/llmc-shared/smollm2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from llmc.bench import bench_prompt, machine_info
from llmc.frontends.base import DecoderSpec
from llmc.ir import Graph, clone, load_model
from llmc.pass_manager import PassContext, PassManager, Pipeline, make_pass
from llmc.passes.quantize.quantize_weights import quantize_blocks
from llmc.rewrite import RULE_KEY
from llmc.runtime.generator import Generator, teacher_forced_agreement
from llmc.runtime.runner import OrtRunner, TensorSig
from llmc.runtime.tokenizer import Tokenizer
from llmc.targets.base import EmitContext
from llmc.targets.cpu.target import CpuTarget, load_runner


@dataclass(frozen=True)
class Scheme:
    """Bits of the body's projections and of the tied embedding/lm_head table (None: kept in fp32)."""

    name: str
    body: int
    table: int | None


SCHEMES = [
    Scheme("int4 body, fp32 lm_head", 4, None),
    Scheme("int4 body, int4 tied lm_head", 4, 4),
    Scheme("int4 body, int8 tied lm_head", 4, 8),
    Scheme("int8 body, int8 tied lm_head", 8, 8),
]


# -- building the standard quantized forms ---------------------------------------------------------------
def _dequantize(
    graph: Graph, name: str, w: np.ndarray, bits: int, block: int, axis: int, order: float
) -> str:
    """A DequantizeLinear of RTN-symmetric blocks of W along ``axis`` (0: W [K, N]; 1: a table [V, H])."""
    q, scale, zero = quantize_blocks(w if axis == 0 else w.T, bits, block, True)
    if axis == 1:
        q, scale = q.T, scale.T
    inputs = [graph.add_initializer(f"{name}.q{bits}", q), graph.add_initializer(f"{name}.scale", scale)]
    if zero is not None:
        inputs.append(graph.add_initializer(f"{name}.zero_point", zero if axis == 0 else zero.T))
    node = graph.add_node(
        "DequantizeLinear",
        inputs,
        [graph.unique_name(f"{name}.dequantized")],
        name=graph.unique_node_name(f"{name}/dequantize"),
        attributes={"axis": axis, "block_size": block},
        order=order,
        metadata={RULE_KEY: "benchmark"},
    )
    graph.set_value_info(node.outputs[0], 1, w.shape)
    return node.outputs[0]


def quantize(graph: Graph, scheme: Scheme, block: int) -> dict[str, int]:
    """Rewrites the graph into the standard quantized forms of ``scheme``; returns what it quantized."""
    counts = {"matmuls": 0, "tables": 0}
    for node in graph.find("MatMul"):
        name = node.input(1)
        w = graph.constant(name) if graph.is_initializer(name) else None
        if w is None or w.ndim != 2 or w.dtype != np.float32 or w.size < 4096 or w.shape[0] % block:
            continue
        graph.set_input(node, 1, _dequantize(graph, name, w, scheme.body, block, 0, node.order - 0.5))
        counts["matmuls"] += 1
        if not graph.is_used(name):
            graph.remove_initializer(name)
    if scheme.table is not None:
        for gather in graph.find("Gather"):
            name = gather.input(0)
            if not graph.is_initializer(name):
                continue
            first = min(user.order for user in graph.consumers(name))
            table = _dequantize(graph, name, graph.initializers[name], scheme.table, block, 1, first - 0.5)
            graph.replace_all_uses(name, table)  # the Gather and the lm_head's Transpose read one table
            graph.remove_initializer(name)
            counts["tables"] += 1
    return counts


def legalize(graph: Graph, accuracy_level: int, packed_rotary: bool, max_length: int) -> dict[str, Any]:
    """The CPU target's legalize pipeline, with MatMulNBits at ``accuracy_level`` (and, when asked,
    GroupQueryAttention applying the rotary embedding to the packed QKV itself)."""
    options = {
        "cpu-matmul-nbits": {"accuracy_level": accuracy_level},
        "cpu-attention": {"packed_rotary": packed_rotary},
    }
    steps = [
        make_pass(s.name, options[s.name]) if s.name in options else s
        for s in CpuTarget().legalize_pipeline().steps
    ]
    ctx = PassContext(target="cpu", data={"max_length": max_length})
    report = PassManager(Pipeline(steps), ctx=ctx).run(graph)
    return {r.name: r.stats for r in report.records}


def ops_of(graph: Graph) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for node in graph.nodes():
        counts[node.op_type] += 1
    return dict(counts)


def _wanted(args: argparse.Namespace, label: str) -> bool:
    return not args.only or any(word in label for word in args.only)


def build(args: argparse.Namespace, decoder: DecoderSpec, out: Path) -> list[dict[str, Any]]:
    """Quantize, legalize and emit every scheme × accuracy level × attention variant (and the legalized fp32)."""
    base = load_model(args.fused)
    PassManager(Pipeline.parse(["eliminate-dead-code"])).run(base)  # the fused file keeps dead weights
    built = []
    plans: list[tuple[str, Scheme | None, int, bool]] = []
    for rotary in args.packed_rotary:
        suffix = ", packed rotary" if rotary else ""
        plans.append((f"llmc fp32{suffix}", None, 4, rotary))
        plans += [
            (f"{s.name}, acc {lv}{suffix}", s, lv, rotary) for s in SCHEMES for lv in args.accuracy_levels
        ]
    plans = [plan for plan in plans if _wanted(args, plan[0])]
    plans.sort(key=lambda plan: SCHEMES.index(plan[1]) if plan[1] else -1)  # one quantized graph at a time
    quantized: dict[str, Graph] = {}
    for label, scheme, level, rotary in plans:
        t0 = time.perf_counter()
        if scheme is not None and scheme.name not in quantized:
            quantized.clear()
            gc.collect()
            quantized[scheme.name] = clone(base)
            counts = quantize(quantized[scheme.name], scheme, args.block)
            print(f"quantized {scheme.name}: {counts}", flush=True)
        graph = clone(base if scheme is None else quantized[scheme.name])
        stats = legalize(graph, level, rotary, decoder.max_length)
        directory = out / label.replace(" ", "_").replace(",", "")
        ctx = EmitContext(task="text-generation", decoder=decoder.to_json(), spec_name=label)
        manifest = CpuTarget().emit(graph, directory, ctx)
        size = sum(manifest["files"].values())
        built.append(
            {
                "label": label,
                "dir": directory,
                "mb": size / 1e6,
                "ops": {
                    k: v for k, v in ops_of(graph).items() if k in ("MatMulNBits", "GatherBlockQuantized")
                },
                "nbits_stats": stats.get("cpu-matmul-nbits", {}),
            }
        )
        print(f"built {label}: {size / 1e6:.1f} MB in {time.perf_counter() - t0:.0f} s", flush=True)
        del graph
        gc.collect()
    return built


# -- timing ------------------------------------------------------------------------------------------------
def time_all(candidates: dict[str, Generator], prompt: list[int], new: int, runs: int) -> dict[str, dict]:
    """Decode tokens/s and prefill ms per candidate: interleaved runs, medians."""
    for gen in candidates.values():  # warm-up (first-run allocations, prepacking)
        gen.generate(prompt[:16], 4, stop_at_eos=False)
    samples: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for _ in range(runs):
        for label, gen in candidates.items():
            result = gen.generate(prompt, new, stop_at_eos=False)
            samples[label].append((result.decode_tokens_per_s, result.prefill_ms))
    return {
        label: {
            "decode_tok_s": statistics.median(s[0] for s in values),
            "prefill_ms": statistics.median(s[1] for s in values),
            "decode_runs": [round(s[0], 1) for s in values],
        }
        for label, values in samples.items()
    }


class ProfilingRunner:
    """A Runner over an onnxruntime session with its profiler on (the target's runner has no such switch)."""

    def __init__(self, model: Path, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.log_severity_level = 3
        options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="quant-decode-"), "profile")
        self.session = ort.InferenceSession(os.fspath(model), options, providers=["CPUExecutionProvider"])
        self.inputs = [
            TensorSig(a.name, "float32" if "float" in a.type else "int64", None)
            for a in self.session.get_inputs()
        ]
        self.outputs = [TensorSig(a.name, "float32", None) for a in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or [o.name for o in self.outputs]
        return dict(zip(names, self.session.run(names, feeds), strict=True))


def profile_decode(
    model: Path, decoder: DecoderSpec, prompt: list[int], steps: int = 8, threads: int | None = None
) -> list[tuple]:
    """onnxruntime's kernel time per op type for one decode step (mean over ``steps`` steps after a prefill)."""
    runner = ProfilingRunner(model, threads)
    gen = Generator(runner, decoder)
    token = int(np.argmax(gen.prefill(prompt)[0]))
    for _ in range(steps):
        token = int(np.argmax(gen.step(token)[0]))
    events = json.loads(Path(runner.session.end_profiling()).read_text())
    decode_windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[
        -steps:
    ]
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if any(lo <= e["ts"] <= hi for lo, hi in decode_windows):
            per_op[e["args"]["op_name"]] += e["dur"] / steps
    step_us = statistics.mean(hi - lo for lo, hi in decode_windows)
    rows = sorted(per_op.items(), key=lambda kv: -kv[1])
    return [("(whole step)", step_us), ("(sum of kernels)", sum(per_op.values())), *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fused", type=Path, default=Path("/tmp/llmc-shared/smollm2-fused.onnx"))
    parser.add_argument("--plain", type=Path, default=Path("/tmp/llmc-shared/smollm2-plain.onnx"))
    parser.add_argument("--decoder-json", type=Path, default=Path("/tmp/llmc-shared/smollm2.json"))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "quant-decode")
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--accuracy-levels", type=int, nargs="+", default=[4, 0])
    parser.add_argument(
        "--packed-rotary",
        type=lambda v: v in ("1", "yes", "true"),
        nargs="+",
        default=[False],
        help="cpu-attention packed_rotary variants to build: no, yes or both",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        help="build (or with --reuse, time) only candidates whose label contains one of these",
    )
    parser.add_argument("--threads", type=int, help="intra-op threads for every candidate (default: ORT's)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="time the artifacts already in --out")
    parser.add_argument("--profile", nargs="*", default=None, help="labels to profile (none given: all)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    info = json.loads(args.decoder_json.read_text())
    decoder = DecoderSpec.from_json(info["decoder"])
    tokenizer = Tokenizer.from_files({k: Path(v) for k, v in info["assets"].items()})
    prompt = bench_prompt(tokenizer, decoder.vocab_size, args.prompt_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    index = args.out / "built.json"
    if args.reuse and index.exists():
        built = [row for row in json.loads(index.read_text()) if _wanted(args, row["label"])]
    else:
        built = build(args, decoder, args.out)
        index.write_text(json.dumps(built, default=str, indent=1))
    gc.collect()

    def runner(model: Path) -> OrtRunner:  # the artifact's own settings, or a fixed thread count for all
        return OrtRunner(model, intra_op_threads=args.threads)

    candidates = {"onnx plain fp32": Generator(runner(args.plain), decoder)}
    sizes = {"onnx plain fp32": args.plain.stat().st_size / 1e6}
    for row in built:
        artifact = Path(row["dir"])
        loaded = load_runner(artifact) if args.threads is None else runner(artifact / "model.onnx")
        candidates[row["label"]] = Generator(loaded, decoder)
        sizes[row["label"]] = row["mb"]
    timings = time_all(candidates, prompt, args.new_tokens, args.runs)
    reference = candidates["onnx plain fp32"].generate(prompt, args.new_tokens, stop_at_eos=False).tokens
    base = timings["onnx plain fp32"]["decode_tok_s"]
    rows = []
    for label, gen in candidates.items():
        agreement = teacher_forced_agreement(gen, prompt, reference)
        t = timings[label]
        rows.append(
            {
                "candidate": label,
                **t,
                "ratio": t["decode_tok_s"] / base,
                "mb": sizes[label],
                "tokens": f"{agreement.matches}/{agreement.total}",
            }
        )
    cpu = machine_info()
    print(
        f"\nCPU: {cpu.get('cpu_model')}  flags: {' '.join(cpu.get('cpu_flags', []))}  onnxruntime {ort.__version__}"
    )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())  # other processes skew absolute figures
    print(f"load average {load}; threads {args.threads or 'default'}")
    print(f"batch 1, {len(prompt)}-token prompt, {args.new_tokens} new tokens, median of {args.runs}\n")
    print(f"| {'candidate':<40} | prefill ms | decode tok/s | × plain | MB | tokens |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['candidate']:<40} | {r['prefill_ms']:.0f} | {r['decode_tok_s']:.1f} | {r['ratio']:.2f} "
            f"| {r['mb']:.1f} | {r['tokens']} |"
        )
    profiles = {}
    if args.profile is not None:
        del candidates
        gc.collect()
        wanted = [r for r in built if not args.profile or r["label"] in args.profile]
        for row in wanted:
            table = profile_decode(Path(row["dir"]) / "model.onnx", decoder, prompt, threads=args.threads)
            profiles[row["label"]] = table
            print(f"\nprofile of one decode step, {row['label']} (µs):")
            for op, us in table[:10]:
                print(f"  {op:<28} {us:9.0f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": cpu, "load": os.getloadavg(), "rows": rows, "profiles": profiles}, indent=1
            )
        )


if __name__ == "__main__":
    main()
