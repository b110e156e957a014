"""MiniLM (all-MiniLM-L6-v2): what low-rank factorization of the linear layers costs in accuracy and buys in
size and speed, side by side in one process.

Imports the model as specs/minilm-cpu.yaml does, runs its fusion pipeline once, then for each candidate
(energy or rank ratio; plain SVD or data-aware SVD on calibration sentences; for contrast, prune-unstructured
2:4 or 30 % with dense or compact storage) runs the pass on a clone, the CPU target's legalize pipeline and
writes ``model.onnx``. Every candidate is loaded at once and
timed at batch 8 × 128 tokens, runs interleaved, medians. Accuracy is the cosine of the sentence embedding
(attention-masked mean, L2-normalised) to the unfactorized fp32 build, on held-out sentences (llmc's
calibration text calibrates, its perplexity text ``eval.txt`` evaluates), and the cosine of the flattened last
hidden state on random token ids (what a spec's ``verify:`` measures).

Writes a markdown table and JSON, and a PNG when matplotlib is installed (1 intra-op thread by default:
the numbers are for comparing candidates, not absolute speeds).

    .venv/bin/python benchmarks/lowrank_tradeoff.py --out build/lowrank-tradeoff
"""

from __future__ import annotations

import os

# One BLAS thread: on a busy 2-core machine OpenBLAS's spinning threads made each SVD ~20x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from llmc.bench import encoder_feeds, machine_info, mean_pool
from llmc.calibration import DEFAULT_TEXT, CalibrationSet
from llmc.frontends import import_model
from llmc.ir import Graph, clone, save_model
from llmc.pass_manager import PassContext, PassManager, Pipeline
from llmc.runtime.tokenizer import Tokenizer
from llmc.spec import load_spec
from llmc.targets.cpu.target import CpuTarget

SPEC = Path(__file__).resolve().parents[1] / "specs" / "minilm-cpu.yaml"
EVAL_TEXT = DEFAULT_TEXT.with_name("eval.txt")  # held out: llmc's perplexity text, not used to calibrate

# (label, pipeline steps run on the fused IR); the first row, the unfactorized fp32 build, is the reference.
# The prune-unstructured rows show the other way to shrink the same layers: zeros kept dense or stored as
# bitmask + values (no sparse kernel on the CPU: same speed, smaller file), magnitude or Wanda scores.
CANDIDATES: list[tuple[str, list[Any]]] = [
    ("fp32", []),
    ("energy 0.95", [{"factorize-low-rank": {"energy": 0.95}}]),
    ("energy 0.90", [{"factorize-low-rank": {"energy": 0.90}}]),
    ("energy 0.90 cost 0.9", [{"factorize-low-rank": {"energy": 0.90, "max_cost": 0.9}}]),
    ("rank 0.50", [{"factorize-low-rank": {"rank_ratio": 0.5}}]),
    ("rank 0.35", [{"factorize-low-rank": {"rank_ratio": 0.35}}]),
    ("rank 0.25", [{"factorize-low-rank": {"rank_ratio": 0.25}}]),
    ("aware energy 0.995", [{"factorize-low-rank": {"energy": 0.995, "data_aware": True}}]),
    ("aware rank 0.50", [{"factorize-low-rank": {"rank_ratio": 0.5, "data_aware": True}}]),
    ("aware rank 0.35", [{"factorize-low-rank": {"rank_ratio": 0.35, "data_aware": True}}]),
    ("aware rank 0.25", [{"factorize-low-rank": {"rank_ratio": 0.25, "data_aware": True}}]),
    ("prune 2:4 dense", [{"prune-unstructured": {"pattern": "2:4", "storage": "dense"}}]),
    ("prune 2:4 compact", [{"prune-unstructured": {"pattern": "2:4"}}]),
    ("prune 2:4 wanda compact", [{"prune-unstructured": {"pattern": "2:4", "method": "wanda"}}]),
    ("prune 30% wanda compact", [{"prune-unstructured": {"sparsity": 0.3, "method": "wanda"}}]),
]


def fused_minilm(work: Path) -> tuple[Graph, Tokenizer]:
    """The MiniLM IR after the fusion pipeline of specs/minilm-cpu.yaml, and its tokenizer."""
    spec = load_spec(SPEC)
    imported = import_model(spec.model, spec.base_dir, work)
    PassManager(Pipeline.parse(spec.pipeline), verify_each=False).run(imported.graph)
    return imported.graph, Tokenizer.from_files(imported.assets)


def sentence_feeds(tokenizer: Tokenizer, texts: list[str], batch: int = 8) -> list[dict[str, np.ndarray]]:
    """Padded batches of sentences (input_ids, attention_mask, token_type_ids)."""
    feeds = []
    for i in range(0, len(texts), batch):
        ids = tokenizer.encode_batch(texts[i : i + batch])
        width = max(len(x) for x in ids)
        padded = np.zeros((len(ids), width), np.int64)
        mask = np.zeros_like(padded)
        for row, x in enumerate(ids):
            padded[row, : len(x)], mask[row, : len(x)] = x, 1
        feeds.append({"input_ids": padded, "attention_mask": mask, "token_type_ids": np.zeros_like(padded)})
    return feeds


def sentences(path: Path) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", path.read_text()) if len(s.strip()) > 20]


def build(
    fused: Graph, steps: list[Any], calibration: CalibrationSet, out: Path
) -> tuple[Path, dict[str, Any]]:
    """``steps`` + the CPU legalization on a clone of ``fused``, saved to ``out``/model.onnx."""
    graph = clone(fused)
    stats: dict[str, Any] = {}
    if steps:
        ctx = PassContext(data={"calibration": calibration})
        record = PassManager(Pipeline.parse(steps), ctx=ctx, verify_each=False).run(graph).records[0]
        layers = record.details.get("factorized", record.details.get("pruned", []))
        stats = {"changed": len(layers), "layers": len(layers) + len(record.details["skipped"])}
        stats["ranks"] = [layer["rank"] for layer in layers if "rank" in layer]
    PassManager(CpuTarget().legalize_pipeline(), verify_each=False).run(graph)
    out.mkdir(parents=True, exist_ok=True)
    save_model(graph, out / "model.onnx")
    return out / "model.onnx", stats


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="lowrank-"))
    fused, tokenizer = fused_minilm(work / "import")
    cal_text, eval_text = sentences(DEFAULT_TEXT), sentences(EVAL_TEXT)
    calibration = CalibrationSet(sentence_feeds(tokenizer, cal_text), f"{len(cal_text)} sentences")
    evaluation = sentence_feeds(tokenizer, eval_text)
    random_ids = encoder_feeds(2, 16, tokenizer.vocab_size)
    timed = encoder_feeds(args.batch, args.seq, tokenizer.vocab_size)

    rows: list[dict[str, Any]] = []
    sessions = []
    for label, steps in CANDIDATES:
        t0 = time.perf_counter()
        path, stats = build(fused, steps, calibration, work / re.sub(r"\W+", "-", label))
        t1 = time.perf_counter()
        sessions.append(session(path, args.threads))
        row = {"candidate": label, "steps": steps, "mb": path.stat().st_size / 1e6, **stats}
        rows.append({**row, "build_s": round(t1 - t0, 1), "load_s": round(time.perf_counter() - t1, 3)})
    del fused

    reference = [sessions[0].run(["last_hidden_state"], f)[0] for f in evaluation]
    ref_embed = np.concatenate(
        [mean_pool(h, f["attention_mask"]) for h, f in zip(reference, evaluation, strict=True)]
    )
    ref_random = sessions[0].run(["last_hidden_state"], random_ids)[0].ravel()
    for row, sess in zip(rows, sessions, strict=True):
        hidden = [sess.run(["last_hidden_state"], f)[0] for f in evaluation]
        embed = np.concatenate(
            [mean_pool(h, f["attention_mask"]) for h, f in zip(hidden, evaluation, strict=True)]
        )
        cos = cosine_rows(embed, ref_embed)
        row["cos_mean"], row["cos_min"] = float(cos.mean()), float(cos.min())
        row["hidden_cos_random"] = float(
            cosine_rows(sess.run(["last_hidden_state"], random_ids)[0].ravel(), ref_random)
        )

    for sess in sessions:  # warm up
        sess.run(["last_hidden_state"], timed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(args.repeats):
        for k, sess in enumerate(sessions):
            t0 = time.perf_counter()
            sess.run(["last_hidden_state"], timed)
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times[0])
    for row, t in zip(rows, times, strict=True):
        row["latency_ms"] = 1000 * statistics.median(t)
        row["speedup"] = base / statistics.median(t)
        row["size_ratio"] = row["mb"] / rows[0]["mb"]
    return {
        "machine": machine_info(),
        "method": (
            f"batch {args.batch} x {args.seq} random token ids, {args.threads} intra-op thread(s), "
            f"{args.repeats} interleaved runs per candidate, median; cosine of the sentence embedding to the "
            f"fp32 build on {len(eval_text)} held-out sentences (calibration: {len(cal_text)} sentences)"
        ),
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| candidate | layers changed | MB | size | session load s | latency ms | speed-up | cos mean "
        "| cos min | hidden cos (random ids) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['candidate']} | {r.get('changed', 0)}/{r.get('layers', 0)} | {r['mb']:.1f} "
            f"| {r['size_ratio']:.2f} | {r['load_s']:.2f} | {r['latency_ms']:.1f} | {r['speedup']:.2f}x "
            f"| {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['hidden_cos_random']:.4f} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "speedup", "speed-up at batch 8 x 128"),
        (axes[1], "size_ratio", "size"),
    ):
        for group, marker in (("energy", "o"), ("rank", "s"), ("aware", "^"), ("prune", "x")):
            pts = [r for r in rows if r["candidate"].startswith(group)]
            ax.plot([r[key] for r in pts], [r["cos_mean"] for r in pts], marker=marker, label=group)
            for r in pts:
                ax.annotate(r["candidate"].split()[-1], (r[key], r["cos_mean"]), fontsize=7)
        ax.plot([rows[0][key]], [1.0], "k*", label="fp32")
        ax.set_xlabel(label)
        ax.set_ylabel("sentence-embedding cosine to fp32")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("MiniLM-L6: low-rank factorization of the linear layers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/lowrank-tradeoff"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowrank_tradeoff.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (args.out / "lowrank_tradeoff.md").write_text(f"{result['method']}\n\n{text}\n")
    print(result["method"])
    print(text)
    if plot(result, args.out / "lowrank_tradeoff.png"):
        print(f"plot: {args.out / 'lowrank_tradeoff.png'}")
    else:
        print("matplotlib is not installed: no plot (the table and JSON are written)")


if __name__ == "__main__":
    main()
