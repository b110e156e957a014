"""partition-pipeline through a whole compile: the CPU artifact holds one model per stage, its manifest the
wiring, and the artifact (run stage by stage) generates the same greedy tokens as the unpartitioned import."""

from __future__ import annotations

import json

from fixtures_frontends.tiny import tiny_folder

from llmc.driver import compile_spec
from llmc.runtime.generator import Generator, artifact_decoder, load_artifact_generator
from llmc.runtime.runner import OrtRunner
from llmc.spec import load_spec

SPEC = """
model: {{source: hf, path: {folder}, task: text-generation}}
pipeline:
  - fold-constants
  - partition-pipeline: {{stages: 2}}
verify: {{prompts: ["w5 w6 w7"], new_tokens: 6, perplexity_tokens: 0}}
output: {{dir: out, keep_reference: true}}
"""


def test_partitioned_artifact_runs_stage_by_stage(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(folder=tiny_folder("llama")))
    result = compile_spec(load_spec(path), force=True)
    assert result.targets[0].golden.passed  # verified through the stages
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    stages = manifest["pipeline_stages"]["stages"]
    assert len(stages) == 2
    assert all((result.out_dir / name).is_file() for row in stages for name in row["files"])
    staged = load_artifact_generator(result.out_dir)
    assert type(staged.runner).__name__ == "PipelineRunner"
    whole = Generator(
        OrtRunner(result.out_dir / "reference" / "model.onnx", graph_optimization_level="basic"),
        artifact_decoder(manifest),
        staged.tokenizer,
    )
    expected = whole.generate("w5 w6 w7", max_new_tokens=8, stop_at_eos=False).tokens
    assert staged.generate("w5 w6 w7", max_new_tokens=8, stop_at_eos=False).tokens == expected
