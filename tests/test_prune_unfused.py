"""prune-structured on the exporter's unfused attention (before fuse-attention), on the tiny LLaMA import.

Pruning first and fusing after must give the model that fusing first and pruning after gives; heads whose
output rows are zero must go without changing the logits; fusion must still find every attention.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from fixtures_frontends.tiny import tiny_import
from graphs import DECODER_CLEANUP, DECODER_FUSION, run_model

from llmc.errors import PassError
from llmc.ir import Graph
from llmc.pass_manager import PassContext, PassManager, Pipeline

CLEAN, FUSE = DECODER_CLEANUP, DECODER_FUSION


@pytest.fixture(scope="module")
def imported():
    model = copy.copy(tiny_import("llama"))  # 2 layers, 4 query heads, 2 kv heads, head_dim 16, MLP 96
    model.graph = copy.deepcopy(model.graph)  # the import is shared by the whole test process
    _run_passes(model.graph, model, CLEAN)
    return model


def _run_passes(graph: Graph, model, steps: list) -> None:
    ctx = PassContext(data={"task": model.task, "decoder": model.decoder})
    PassManager(Pipeline.parse(steps), ctx=ctx).run(graph)


def _logits(graph: Graph, model, kv_heads: int) -> np.ndarray:
    decoder = model.decoder
    n = 6
    feeds = {
        "input_ids": np.arange(3, 3 + n, dtype=np.int64)[None],
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    for i in range(decoder.num_layers):
        for pattern in (decoder.past_key, decoder.past_value):
            feeds[pattern.format(i=i)] = np.zeros((1, kv_heads, 0, decoder.head_dim), np.float32)
    return run_model(graph, feeds)["logits"]


@pytest.mark.parametrize(
    ("options", "kv_heads"),
    [
        ({"heads": {0: [1, 2], 1: [0, 3]}}, 2),  # one query head of each kv group
        ({"heads": {0: [0], 1: [1]}, "head_mode": "group"}, 1),  # a kv head with its query heads
        ({"channels": {0: list(range(0, 96, 3)), 1: list(range(40))}}, 2),
    ],
)
def test_pruning_before_fusion_equals_pruning_after(imported, options, kv_heads):
    options = {**options, "multiple_of": 1}
    before = copy.deepcopy(imported.graph)
    _run_passes(before, imported, [{"prune-structured": options}, *FUSE])
    after = copy.deepcopy(imported.graph)
    _run_passes(after, imported, [*FUSE, {"prune-structured": options}])
    assert len(before.find("Attention")) == 2  # fusion still recognizes the pruned attention
    np.testing.assert_allclose(
        _logits(before, imported, kv_heads), _logits(after, imported, kv_heads), atol=5e-5
    )


def test_heads_with_zero_output_rows_go_without_changing_the_logits(imported):
    graph = copy.deepcopy(imported.graph)
    silenced = {0: [1, 3], 1: [0, 2]}  # one query head per kv group in each layer
    for layer, heads in silenced.items():
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        weight = next(v for k, v in graph.initializers.items() if k.startswith(name)).copy()
        for h in heads:
            weight[h * 16 : (h + 1) * 16] = 0.0  # o_proj is stored [in, out] after fold-weight-transposes
        graph.set_initializer(next(k for k in graph.initializers if k.startswith(name)), weight)
    reference = _logits(graph, imported, 2)
    _run_passes(graph, imported, [{"prune-structured": {"heads": silenced}}])
    q_proj = next(v for k, v in graph.initializers.items() if "layers.0.self_attn.q_proj" in k)
    assert q_proj.shape[1] == 2 * 16
    np.testing.assert_allclose(_logits(graph, imported, 2), reference, atol=1e-5)


def test_weights_behind_a_transpose_ask_for_the_folding_passes():
    model = tiny_import("llama")
    graph = copy.deepcopy(model.graph)
    with pytest.raises(PassError, match="fold-weight-transposes and fold-constants"):
        _run_passes(graph, model, [{"prune-structured": {"heads": {0: [1, 2]}}}])


def test_a_data_aware_pass_after_kv_group_pruning_calibrates_on_the_new_cache(imported):
    """Group mode leaves 1 kv head: the calibration feeds, built for 2, still run (their empty caches take
    the graph's new shape) and the pipeline's DecoderSpec follows the pass's reported interface."""
    from llmc.calibration import CalibrationSet, decoder_feeds

    graph = copy.deepcopy(imported.graph)
    feeds = [decoder_feeds(graph, imported.decoder, list(range(3, 11)))]
    ctx = PassContext(data={"decoder": imported.decoder, "calibration": CalibrationSet(feeds, "test")})
    steps = [
        {"prune-structured": {"heads": {0: [0], 1: [1]}, "head_mode": "group"}},
        {"prune-structured": {"ffn_ratio": 0.25, "multiple_of": 8}},
    ]
    report = PassManager(Pipeline.parse(steps), ctx=ctx).run(graph)
    assert report.records[0].details["decoder"] == {"num_kv_heads": 1}
    assert ctx.data["decoder"].num_kv_heads == 1
    assert report.records[1].stats["channels_removed"] == 2 * 24
    assert _logits(graph, imported, 1).shape[-1] == imported.decoder.vocab_size
