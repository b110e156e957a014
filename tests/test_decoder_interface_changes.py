"""A pass that changes a decoder's interface (structured pruning of whole kv groups or layers) reaches the artifact:
the manifest's DecoderSpec and the generator that verifies the candidate use the pruned cache shape."""

from __future__ import annotations

import json

import pytest
from fixtures_frontends.tiny import tiny_folder
from graphs import DECODER_CLEANUP, DECODER_FUSION, pipeline_yaml

from llmc.driver import compile_spec
from llmc.runtime.generator import load_artifact_generator
from llmc.spec import load_spec

SPEC = """
model: {{source: hf, path: {folder}, task: text-generation}}
pipeline:
{fusion}
  - prune-structured: {prune}
  - eliminate-dead-code
calibration: {{prompts: ["w5 w6 w7 w8 w9 w10", "w11 w12 w13 w14"]}}
verify:
  prompts: ["w5 w6 w7"]
  new_tokens: 4
  min_token_agreement: 0.0
  perplexity_tokens: 0
  tolerances: {{max_abs: 1.0e+6, max_rel: 1.0e+6, cosine: -1.0}}
output: {{dir: out}}
"""


@pytest.mark.parametrize(
    ("prune", "field", "value"),
    [
        ("{{head_ratio: 0.5, head_mode: group, multiple_of: 1}}", "num_kv_heads", 1),  # 2 kv groups, half go
        ("{{drop_layers: [1]}}", "num_layers", 1),  # 2 layers, one goes
    ],
)
def test_pruning_changes_the_artifacts_decoder_spec(tmp_path, prune, field, value):
    path = tmp_path / "spec.yaml"
    fusion = pipeline_yaml([*DECODER_CLEANUP, *DECODER_FUSION])
    path.write_text(SPEC.format(folder=tiny_folder("llama"), fusion=fusion, prune=prune.format()))
    result = compile_spec(load_spec(path), force=True)
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["decoder"][field] == value
    generator = load_artifact_generator(result.out_dir)
    tokens = generator.generate("w5 w6 w7", max_new_tokens=4, stop_at_eos=False).tokens
    assert len(tokens) == 4


def test_decoder_spec_matching_reads_layers_and_kv_heads_off_a_pruned_graph():
    import copy

    from fixtures_frontends.tiny import tiny_import

    from llmc.pass_manager import PassContext, PassManager, Pipeline

    imported = tiny_import("llama")
    graph = copy.deepcopy(imported.graph)
    steps = [
        {"upgrade-opset": {"version": 24}},
        "fold-weight-transposes",
        "fold-constants",
        {"prune-structured": {"drop_layers": [0]}},
        {"prune-structured": {"heads": {1: [0]}, "head_mode": "group"}},
    ]
    ctx = PassContext(data={"decoder": imported.decoder})
    PassManager(Pipeline.parse(steps), ctx=ctx).run(graph)
    matched = imported.decoder.matching(graph)
    assert (matched.num_layers, matched.num_kv_heads) == (1, 1)
    assert ctx.data["decoder"] == matched  # what the pass manager followed from the passes' details
    assert imported.decoder.matching(imported.graph) == imported.decoder
