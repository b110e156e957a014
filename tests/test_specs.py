"""Golden-output tests: every spec in specs/ compiles, verifies, and its artifact reproduces stored outputs.

The goldens in tests/golden/<spec>.npz hold the inputs (seeded from the spec's verify section) and the
outputs the artifact produced when they were recorded; ``pytest --update-golden`` rewrites them. Specs over
real LLMs (hf/gguf sources) have their own slow tests with token-id and embedding goldens (test_real_specs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmc.driver import compile_spec
from llmc.golden import compare_arrays, make_inputs
from llmc.runtime.artifact import load_artifact
from llmc.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "specs").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden"


def _params():
    for path in SPECS:
        spec = load_spec(path)
        if spec.model.source in ("hf", "gguf"):
            continue  # real LLM specs: compiled once, with token/embedding goldens, in test_real_specs.py
        yield pytest.param(path, id=path.stem)


@pytest.mark.parametrize("spec_path", list(_params()))
def test_spec_compiles_and_matches_golden(spec_path: Path, tmp_path: Path, update_golden: bool) -> None:
    spec = load_spec(spec_path)
    result = compile_spec(spec, out=tmp_path / "artifact")
    for target in result.targets:
        if target.golden is None and getattr(target, "verify_skipped", None):
            continue  # this machine cannot run the target (a cuda artifact without a GPU): recorded why
        assert target.golden is not None and target.golden.passed, target.golden.markdown()
    if spec.model.task == "text-generation":
        return
    runner, _ = load_artifact(result.targets[0].artifact)
    v = spec.verify
    feed = make_inputs(runner.inputs, samples=1, seed=1234, dims=v.dims, shapes=v.shapes, ranges=v.ranges)[0]
    outputs = runner.run(feed)
    golden = GOLDEN / f"{spec_path.stem}.npz"
    if update_golden or not golden.exists():
        np.savez(
            golden, **{f"in.{k}": v for k, v in feed.items()}, **{f"out.{k}": v for k, v in outputs.items()}
        )
        if not update_golden:
            pytest.skip(f"recorded a new golden file {golden.name}; commit it")
    stored = np.load(golden)
    for name, value in feed.items():
        np.testing.assert_array_equal(
            stored[f"in.{name}"], value, err_msg="golden inputs drifted: regenerate"
        )
    for name, value in outputs.items():
        row = compare_arrays(name, value, stored[f"out.{name}"], v.per_output.get(name, v.tolerances))
        assert row.passed, f"{name}: max abs {row.max_abs}, cosine {row.cosine}"
