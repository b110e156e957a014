"""Run a TPU-target artifact (StableHLO modules + weights.safetensors) on whatever XLA backend JAX has, with
only jax, numpy and safetensors installed (no llmc, no onnxruntime), and compare with expected outputs.

The artifacts are exported by ``jax.export`` for the platforms the spec lists (``targets.tpu.platforms``, e.g.
``[tpu, cpu, cuda]``); this script is how a machine with a GPU or a TPU checks them: per bucket it
deserializes the module, calls it on the inputs of ``--inputs`` (an .npz with one array per input and bucket,
``<bucket index>/<input name>``, written with ``--write-inputs`` by the same script on the machine that
has onnxruntime and the original model) and reports the largest difference to ``<bucket>/<output>`` in the
same file, and the median time per call.

    python benchmarks/stablehlo_portable_run.py build/magika-tpu --inputs magika.npz           # check
    python benchmarks/stablehlo_portable_run.py build/magika-tpu --write-inputs magika.npz \\
        --reference specs/magika-tpu.yaml                                                       # prepare
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def run(artifact: Path, data: dict[str, np.ndarray], repeats: int) -> list[dict]:
    import jax
    from jax import export
    from safetensors.numpy import load_file

    jax.config.update("jax_enable_x64", True)
    manifest = json.loads((artifact / "manifest.json").read_text())
    weights = {k: jax.device_put(v) for k, v in load_file(artifact / "weights.safetensors").items()}
    rows = []
    for index, bucket in enumerate(manifest["buckets"]):
        module = export.deserialize(bytearray((artifact / bucket["module"]).read_bytes()))
        call = jax.jit(module.call)
        feeds = {name: data[f"{index}/{name}"] for name in bucket["inputs"]}
        outputs = jax.block_until_ready(call(weights, feeds))  # compiles
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(call(weights, feeds))
            times.append((time.perf_counter() - t0) * 1e3)
        diffs = {
            name: float(np.max(np.abs(np.asarray(outputs[name], np.float64) - data[f"{index}/{name}"])))
            for name in bucket["outputs"]
            if f"{index}/{name}" in data
        }
        rows.append({"bucket": bucket["dims"], "max_abs": diffs, "ms": float(np.median(times))})
    return rows


def write_inputs(artifact: Path, spec_path: Path, out: Path) -> None:
    """Inputs per bucket from the spec's verify settings, and the expected outputs: onnxruntime on the
    original model for an ONNX source, else the artifact itself on XLA:CPU (a device check then compares
    the same StableHLO on two backends)."""
    from llmc.golden import make_inputs
    from llmc.runtime.runner import OrtRunner
    from llmc.spec import load_spec
    from llmc.targets.tpu.target import load_runner

    spec = load_spec(spec_path)
    manifest = json.loads((artifact / "manifest.json").read_text())
    onnx_source = spec.model.source == "onnx"
    reference = OrtRunner(spec.resolve(spec.model.path)) if onnx_source else load_runner(artifact)
    v = spec.verify
    arrays: dict[str, np.ndarray] = {}
    for index, bucket in enumerate(manifest["buckets"]):
        shapes = {name: list(shape) for name, shape in bucket["inputs"].items()}
        feeds = make_inputs(reference.inputs, samples=1, seed=v.seed, shapes=shapes, ranges=v.ranges)[0]
        arrays |= {f"{index}/{k}": value for k, value in feeds.items()}
        arrays |= {f"{index}/{k}": value for k, value in reference.run(feeds).items()}
    np.savez(out, **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--inputs", type=Path, help="npz of inputs and expected outputs per bucket")
    parser.add_argument("--write-inputs", type=Path, help="write that npz (needs llmc and onnxruntime)")
    parser.add_argument("--reference", type=Path, help="with --write-inputs: the spec the artifact came from")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.write_inputs:
        write_inputs(args.artifact, args.reference, args.write_inputs)
        return
    import jax

    data = dict(np.load(args.inputs))
    rows = run(args.artifact, data, args.repeats)
    print(
        json.dumps({"artifact": args.artifact.name, "devices": [str(d) for d in jax.devices()], "rows": rows})
    )


if __name__ == "__main__":
    main()
