"""The trade-off of structured pruning on SmolLM2: MLP-channel (and head) ratio -> decode speed, size, perplexity.

Builds, from the fused IR (the fusion prefix of specs/smollm2-int4-cpu.yaml), one artifact per candidate:
``prune-structured`` with the candidate's options (importance from the 24 calibration windows of 128 tokens
of the shipped calibration text, as the spec's ``calibration:`` section gives), then the ``quantize-weights``
of specs/smollm2-int4-cpu.yaml (offset int4 body, int8 tied embedding/lm_head; ``--quant`` for another), the
CPU target's legalize pipeline and emit. (Pruning before or after fusion gives the same graph; the fused IR
is the faster start.) A candidate that drops layers gets its DecoderSpec from the pass, as ``llmc compile``
does. Every artifact is loaded at once and timed interleaved (batch 1, a fixed 128-token prompt, 64 greedy
tokens, medians of ``--runs``). Accuracy: teacher-forced greedy-token agreement with the plain fp32 import,
and perplexity (``llmc.metrics``: token by token through the KV cache) on the first 128 tokens of each
``--text`` (calibration.txt is the calibration data itself; eval.txt is held out). Writes a markdown table,
a JSON file and, when matplotlib is installed, a PNG of the curve.

    .venv/bin/python benchmarks/prune_tradeoff.py --out /tmp/prune-tradeoff --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from llmc.bench import bench_prompt, machine_info
from llmc.calibration import DEFAULT_TEXT, CalibrationSet, decoder_feeds
from llmc.frontends.base import DecoderSpec
from llmc.ir import Graph, clone, load_model
from llmc.metrics import eval_tokens, perplexity
from llmc.pass_manager import PassContext, PassManager, Pipeline
from llmc.runtime.generator import Generator, load_artifact_runner, teacher_forced_agreement
from llmc.runtime.runner import OrtRunner
from llmc.runtime.tokenizer import Tokenizer
from llmc.targets.base import EmitContext
from llmc.targets.cpu.target import CpuTarget

CURVE = [{"ffn_ratio": r} for r in (0.0, 0.125, 0.25, 0.375, 0.5)]
CURVE += [{"ffn_ratio": r, "recover": True} for r in (0.125, 0.25, 0.375, 0.5)]
EXTRA = [  # the spec's choice without and with the refit, whole layers, and layers with the rest
    {"ffn_ratio": 0.25, "head_ratio": 0.1, "head_scope": "model"},
    {"ffn_ratio": 0.25, "head_ratio": 0.1, "head_scope": "model", "recover": True},
    {"layer_ratio": 0.1},
    {"ffn_ratio": 0.125, "head_ratio": 0.1, "head_scope": "model", "recover": True, "layer_ratio": 0.1},
    {"ffn_ratio": 0.25, "head_ratio": 0.1, "head_scope": "model", "recover": True, "layer_ratio": 0.1},
]
QUANT = {  # specs/smollm2-int4-cpu.yaml
    "bits": 4,
    "block_size": 32,
    "offset": True,
    "lm_head": True,
    "embedding": True,
    "overrides": [{"pattern": "lm_head", "bits": 8}, {"pattern": "embedding", "bits": 8}],
}


def label(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items() if v) or "unpruned"


def calibration(graph: Graph, decoder: DecoderSpec, tokenizer: Tokenizer, samples: int, tokens: int):
    ids = tokenizer.encode(DEFAULT_TEXT.read_text(), add_special_tokens=False)
    windows = [w for w in (ids[i : i + tokens] for i in range(0, len(ids) - 1, tokens)) if len(w) >= 2]
    windows = windows[:samples]
    return CalibrationSet([decoder_feeds(graph, decoder, w) for w in windows], "calibration.txt", windows)


def build(args: argparse.Namespace, decoder: DecoderSpec, tokenizer: Tokenizer) -> list[dict[str, Any]]:
    """Prune, quantize, legalize and emit each candidate, one graph at a time."""
    base = load_model(args.fused)
    PassManager(Pipeline.parse(["eliminate-dead-code"])).run(base)  # the fused file keeps dead weights
    cal = calibration(base, decoder, tokenizer, args.samples, args.max_tokens)
    built = []
    for options in args.candidates:
        t0 = time.perf_counter()
        graph = clone(base)
        steps: list[Any] = [{"prune-structured": options}] if any(options.values()) else []
        steps += [{"quantize-weights": args.quant}, "eliminate-dead-code"]
        ctx = PassContext(data={"calibration": cal, "decoder": decoder})
        report = PassManager(Pipeline.parse(steps), ctx=ctx).run(graph)
        record = next((r for r in report.records if r.name == "prune-structured"), None)
        pruned = record.stats if record else {}
        interface = record.details.get("decoder", {}) if record else {}
        compiled = dataclasses.replace(decoder, **interface)
        ctx = PassContext(target="cpu", data={"max_length": decoder.max_length})
        PassManager(CpuTarget().legalize_pipeline(), ctx=ctx).run(graph)
        name = label(options)
        directory = args.out / name.replace(" ", "_").replace(",", "")
        manifest = CpuTarget().emit(
            graph, directory, EmitContext(task="text-generation", decoder=compiled.to_json(), spec_name=name)
        )
        size = sum(manifest["files"].values())
        row = {"label": name, "options": options, "dir": str(directory), "mb": size / 1e6, **pruned}
        built.append(row | {"decoder": compiled.to_json()})
        print(f"built {name}: {size / 1e6:.1f} MB in {time.perf_counter() - t0:.0f} s", flush=True)
        del graph
        gc.collect()
    return built


def time_all(gens: dict[str, Generator], prompt: list[int], new: int, runs: int) -> dict[str, float]:
    """Median decode tokens/s per candidate over interleaved runs."""
    for gen in gens.values():
        gen.generate(prompt[:16], 4, stop_at_eos=False)
    samples: dict[str, list[float]] = {k: [] for k in gens}
    for _ in range(runs):
        for key, gen in gens.items():
            samples[key].append(gen.generate(prompt, new, stop_at_eos=False).decode_tokens_per_s)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def plot(rows: list[dict[str, Any]], path: Path, texts: list[str]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG written"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for recover in (False, True):
        curve = [r for r in rows if set(r["options"]) - {"recover"} == {"ffn_ratio"}]
        curve = [
            r for r in curve if bool(r["options"].get("recover")) == recover or not r["options"]["ffn_ratio"]
        ]
        x = [r["options"]["ffn_ratio"] for r in curve]
        tag = " + refit" if recover else ""
        axes[0].plot(x, [r["decode_tok_s"] for r in curve], "o-", label=f"decode{tag}")
        axes[1].plot(x, [r["mb"] for r in curve], "o-", label=f"size{tag}")
        for text in texts:
            axes[2].plot(
                x, [r["perplexity"][text] for r in curve], "o-" if recover else "o--", label=text + tag
            )
    axes[0].set_ylabel("decode tokens/s")
    axes[1].set_ylabel("artifact MB")
    axes[2].set_ylabel("perplexity")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("share of MLP channels removed (then int4)")
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M: prune-structured + int4, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fused", type=Path, default=Path("/tmp/llmc-shared/smollm2-fused.onnx"))
    parser.add_argument("--plain", type=Path, default=Path("/tmp/llmc-shared/smollm2-plain.onnx"))
    parser.add_argument("--decoder-json", type=Path, default=Path("/tmp/llmc-shared/smollm2.json"))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "prune-tradeoff")
    parser.add_argument("--candidates", type=json.loads, default=CURVE + EXTRA, help="JSON list of options")
    parser.add_argument("--quant", type=json.loads, default=QUANT, help="quantize-weights options (JSON)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--text", type=Path, nargs="+", default=[DEFAULT_TEXT, DEFAULT_TEXT.with_name("eval.txt")]
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: the manifest's)"
    )
    parser.add_argument("--reuse", action="store_true", help="time the artifacts already in --out")
    args = parser.parse_args()

    info = json.loads(args.decoder_json.read_text())
    decoder = DecoderSpec.from_json(info["decoder"])
    tokenizer = Tokenizer.from_files({k: Path(v) for k, v in info["assets"].items()})
    args.out.mkdir(parents=True, exist_ok=True)
    index = args.out / "built.json"
    if args.reuse and index.exists():
        built = json.loads(index.read_text())
    else:
        built = build(args, decoder, tokenizer)
        index.write_text(json.dumps(built, indent=1))
    gc.collect()

    prompt = bench_prompt(tokenizer, decoder.vocab_size, args.prompt_tokens)
    plain = Generator(OrtRunner(args.plain, intra_op_threads=args.threads), decoder, tokenizer)
    gens = {
        row["label"]: Generator(
            load_artifact_runner(Path(row["dir"]), args.threads)[0],
            DecoderSpec.from_json(row["decoder"]),
            tokenizer,
        )
        for row in built
    }
    speed = time_all(gens, prompt, args.new_tokens, args.runs)
    reference = plain.generate(prompt, args.new_tokens, stop_at_eos=False).tokens
    texts = {p.name: eval_tokens(tokenizer, p, 128) for p in args.text}
    rows = [
        {
            "label": "plain fp32 (reference)",
            "options": {},
            "decode_tok_s": None,
            "mb": args.plain.stat().st_size / 1e6,
            "tokens": "-",
            "perplexity": {k: perplexity(plain, ids).value for k, ids in texts.items()},
        }
    ]
    base = speed[built[0]["label"]]
    for row in built:
        gen = gens[row["label"]]
        agreement = teacher_forced_agreement(gen, prompt, reference)
        rows.append(
            {
                **row,
                "decode_tok_s": speed[row["label"]],
                "speedup": speed[row["label"]] / base,
                "tokens": f"{agreement.matches}/{agreement.total}",
                "perplexity": {k: perplexity(gen, ids).value for k, ids in texts.items()},
            }
        )
    cpu = machine_info()
    print(f"\nCPU: {cpu.get('cpu_model')}  flags: {' '.join(cpu.get('cpu_flags', []))}")
    print(
        f"batch 1, {len(prompt)}-token prompt, {args.new_tokens} new tokens, median of {args.runs} runs, "
        f"{args.threads or 'default'} threads"
    )
    print(f"speed-up against '{built[0]['label']}' int4; perplexity on the first 128 tokens of each text\n")
    names = list(texts)
    print("| candidate (then int4) | decode tok/s | speed-up | MB | tokens vs fp32 | " + " | ".join(
        f"ppl {n}" for n in names) + " |")  # fmt: skip
    print("|---|---|---|---|---|" + "---|" * len(names))
    for r in rows:
        tok_s = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
        ratio = f"{r['speedup']:.2f}" if "speedup" in r else "-"
        ppl = " | ".join(f"{r['perplexity'][n]:.1f}" for n in names)
        print(f"| {r['label']} | {tok_s} | {ratio} | {r['mb']:.1f} | {r['tokens']} | {ppl} |")
    print("\n" + plot(rows[1:], args.out / "prune_tradeoff.png", names))
    (args.out / "results.json").write_text(json.dumps({"machine": cpu, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
