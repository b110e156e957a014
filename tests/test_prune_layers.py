"""Dropping whole decoder layers (``prune-structured: layer_ratio / drop_layers``, ``passes/prune/_layers``).

Hand-built residual stacks check how layers are found and which forms are refused; the tiny LLaMA export
(unfused, as ``llmc compile`` imports it, and after the fusion prefix of the SmolLM2 spec) checks in
onnxruntime that dropping a layer that is an identity on the residual stream leaves the logits equal, that
the KV cache is renumbered after the DecoderSpec, and that generation runs with one layer fewer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from graphs import check_golden, run_model
from onnx import TensorProto, helper, numpy_helper, shape_inference

from llmc.calibration import CalibrationSet, decoder_feeds
from llmc.errors import PassError
from llmc.ir import Graph, clone, from_onnx, save_model
from llmc.pass_manager import PassContext, PassManager, Pipeline
from llmc.passes.prune._layers import drop_layers, find_layers, layer_importance
from llmc.passes.prune._sites import SiteError

H, W, S = 8, 12, 5  # hidden, MLP width, tokens


# -- hand-built residual stacks ------------------------------------------------------------------------
def _stack(
    ws: list[dict[str, np.ndarray]], *, escape: bool = False, post_norm: bool = False, dead: bool = False
) -> Graph:
    """x -> per layer ``x + fc2(relu(fc1(x) + b1)) + b2`` (GPT-2's bias Adds) -> head; ``escape``: layer 1
    also reads layer 0's hidden activation; ``post_norm``: layer 0 normalizes its sum before the next Add;
    ``dead``: a dead MatMul of layer 0's activation, added to layer 1's output, with its own weight."""
    nodes, inits = [], {"head": np.eye(H, dtype=np.float32)}
    x = "x"
    for i, w in enumerate(ws):
        pre = f"model.layers.{i}"
        inits |= {f"{pre}.fc1.weight": w["fc1"], f"{pre}.fc1.bias": w["b1"]}
        inits |= {f"{pre}.fc2.weight": w["fc2"], f"{pre}.fc2.bias": w["b2"]}
        source = x
        if escape and i == 1:
            nodes.append(helper.make_node("Add", [x, "act0_narrow"], ["mixed1"]))
            source = "mixed1"
        nodes += [
            helper.make_node("MatMul", [source, f"{pre}.fc1.weight"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"{pre}.fc1.bias"], [f"pre{i}"]),
            helper.make_node("Relu", [f"pre{i}"], [f"act{i}"]),
            helper.make_node("MatMul", [f"act{i}", f"{pre}.fc2.weight"], [f"out{i}"]),
            helper.make_node("Add", [f"out{i}", f"{pre}.fc2.bias"], [f"branch{i}"]),
            helper.make_node("Add", [x, f"branch{i}"], [f"hidden{i}"]),
        ]
        if escape and i == 0:
            nodes.append(helper.make_node("Slice", ["act0", "zero", "eight", "minus1"], ["act0_narrow"]))
            inits |= {n: np.array([v], np.int64) for n, v in (("zero", 0), ("eight", H), ("minus1", -1))}
        x = f"hidden{i}"
        if dead and i == 1:
            inits["dead.weight"] = np.ones((W, H), np.float32)
            nodes += [
                helper.make_node("MatMul", ["act0", "dead.weight"], ["dead_mm"]),
                helper.make_node("Add", ["hidden1", "dead_mm"], ["dead_sum"]),
            ]
        if post_norm and i == 0:
            inits |= {"ln_scale": np.ones(H, np.float32), f"{pre}.fc3.weight": w["fc2"].T.copy()}
            nodes += [
                helper.make_node("LayerNormalization", [x, "ln_scale"], ["normed0"], axis=-1),
                helper.make_node("MatMul", ["normed0", f"{pre}.fc3.weight"], ["mm3"]),
                helper.make_node("Relu", ["mm3"], ["act3"]),
                helper.make_node("MatMul", ["act3", f"{pre}.fc2.weight"], ["out3"]),
                helper.make_node("Add", ["normed0", "out3"], ["post0"]),
            ]
            x = "post0"
    nodes.append(helper.make_node("MatMul", [x, "head"], ["y"]))
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", f, [1, S, H])],
        [helper.make_tensor_value_info("y", f, [1, S, H])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    return from_onnx(shape_inference.infer_shapes(model))


def _stack_weights(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc1": rng.standard_normal((H, W)).astype(np.float32),
        "b1": rng.standard_normal(W).astype(np.float32),
        "fc2": (rng.standard_normal((W, H)) * scale).astype(np.float32),
        "b2": (rng.standard_normal(H) * scale).astype(np.float32),
    }


def _outputs(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(run_model(graph, feeds).values())


def test_bias_residual_layers_are_found_and_an_identity_layer_drops_exactly(request):
    ws = [_stack_weights(0), _stack_weights(1, scale=0.0), _stack_weights(2)]  # layer 1 adds zero
    graph = _stack(ws)
    feeds = {"x": np.random.default_rng(3).standard_normal((1, S, H)).astype(np.float32)}
    expected = _outputs(graph, feeds)[0]
    sites = find_layers(graph)
    assert [(s.layer, s.name, s.residual_in, s.residual_out) for s in sites] == [
        (0, "model.layers.0", "x", "hidden0"),
        (1, "model.layers.1", "hidden0", "hidden1"),
        (2, "model.layers.2", "hidden1", "hidden2"),
    ]
    assert all(not s.cache_inputs and not s.cache_outputs for s in sites)
    influence = layer_importance(graph, sites, [feeds])
    assert influence[1] == pytest.approx(0.0, abs=1e-7) and min(influence[0], influence[2]) > 1e-3
    saved = drop_layers(graph, sites, [1], None)
    assert saved == sum(a.nbytes for a in ws[1].values())
    assert not any(name.startswith("model.layers.1.") for name in graph.initializers)
    np.testing.assert_allclose(_outputs(graph, feeds)[0], expected, rtol=1e-6, atol=1e-6)
    check_golden(request, graph, "prune/drop_layer.onnxtxt")


def test_dead_nodes_neither_stop_the_search_nor_count_as_saved():
    ws = [_stack_weights(0), _stack_weights(1, scale=0.0), _stack_weights(2)]
    graph = _stack(ws, dead=True)  # the dead node reads layer 0's activation after layer 1
    sites = find_layers(graph)
    assert [s.residual_out for s in sites] == ["hidden0", "hidden1", "hidden2"]
    assert drop_layers(graph, sites, [1], None) == sum(a.nbytes for a in ws[1].values())
    assert "dead.weight" not in graph.initializers


def test_two_adjacent_layers_drop_together():
    ws = [_stack_weights(0), _stack_weights(1, scale=0.0), _stack_weights(2, scale=0.0), _stack_weights(3)]
    graph = _stack(ws)
    feeds = {"x": np.random.default_rng(4).standard_normal((1, S, H)).astype(np.float32)}
    expected = _outputs(graph, feeds)[0]
    drop_layers(graph, find_layers(graph), [2, 1], None)
    assert [s.layer for s in find_layers(graph)] == [0, 3]
    np.testing.assert_allclose(_outputs(graph, feeds)[0], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"escape": True},
            r"layer 0 \(model.layers.0\): Add#\d+ -> mixed1 lies after the layer's residual output",
        ),
        ({"post_norm": True}, r"layer 0 .*adds a projection to 'normed0', not to the previous residual sum"),
    ],
)
def test_layers_that_are_not_a_residual_chain_are_refused(kwargs, message):
    with pytest.raises(SiteError, match=message):
        find_layers(_stack([_stack_weights(0), _stack_weights(1)], **kwargs))


def test_a_graph_without_layer_weights_is_refused():
    graph = _stack([_stack_weights(0)])
    for name in [n for n in graph.initializers if n.startswith("model.")]:
        graph.rename_value(name, name.replace("model.layers.0.", "block_"))
    with pytest.raises(SiteError, match="found no decoder layer"):
        find_layers(graph)


# -- the tiny LLaMA export ------------------------------------------------------------------------------
pytest.importorskip("transformers")
from fixtures_frontends.tiny import VOCAB, tiny_import  # noqa: E402
from graphs import DECODER_CLEANUP, DECODER_FUSION  # noqa: E402

from llmc.runtime.generator import Generator  # noqa: E402
from llmc.runtime.runner import OrtRunner  # noqa: E402

FUSION = [*DECODER_CLEANUP, *DECODER_FUSION, "eliminate-dead-code"]
QUANTIZE = {
    "quantize-weights": {"bits": 4, "block_size": 32, "offset": True}
}  # DequantizeLinear + offset term


def _llama(form: str, scaled: dict[int, float]) -> Graph:
    """The tiny LLaMA (2 layers) with layer k's o_proj and down_proj scaled by ``scaled[k]``, in ``form``:
    the export, after the fusion prefix, or after it and int4 weight quantization."""
    graph = clone(tiny_import("llama").graph)
    for layer, factor in scaled.items():
        for part in ("self_attn.o_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{part}.weight"
            graph.set_initializer(name, graph.initializers[name] * np.float32(factor))
    if form != "unfused":
        pipeline = FUSION + ([QUANTIZE, "eliminate-dead-code"] if form == "int4" else [])
        PassManager(Pipeline.parse(pipeline), ctx=PassContext(data={"task": "text-generation"})).run(graph)
    return graph


def _cache_feeds(layers: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """A chunk of 4 tokens after 3 cached ones, batch 2; the cache of layer ``layers[j]`` named ``j``."""
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(0, VOCAB, (2, 4)).astype(np.int64),
        "attention_mask": np.ones((2, 7), np.int64),
        "position_ids": np.tile(np.arange(3, 7), (2, 1)).astype(np.int64),
    }
    caches = {i: rng.standard_normal((2, 2, 2, 3, 16)).astype(np.float32) for i in range(2)}
    for j, layer in enumerate(layers):
        feeds[f"past_key_values.{j}.key"], feeds[f"past_key_values.{j}.value"] = caches[layer]
    return feeds


def _generated_logits(path, decoder) -> np.ndarray:
    """Prefill of 4 tokens, then 2 decode steps of the greedy tokens: logits [3, vocab]."""
    loop = Generator(OrtRunner(path), decoder)
    rows = [loop.prefill([5, 6, 7, 8])[0]]
    for _ in range(2):
        rows.append(loop.step(int(np.argmax(rows[-1])))[0])
    return np.stack(rows)


@pytest.mark.parametrize("form", ["unfused", "fused", "int4"])
@pytest.mark.parametrize("layer", [0, 1])
def test_dropping_an_identity_layer_keeps_the_logits_and_renumbers_the_cache(tmp_path, form, layer):
    graph = _llama(form, {layer: 0.0})  # o_proj and down_proj zero: the layer adds nothing to the residual
    decoder = tiny_import("llama").decoder
    save_model(graph, tmp_path / "full.onnx")
    outputs = _outputs(graph, _cache_feeds([0, 1]))
    expected = dict(zip(["logits", "k0", "v0", "k1", "v1"], outputs, strict=True))
    sizes = {n: graph.initializers.nbytes(n) for n in graph.initializers}

    saved = drop_layers(graph, find_layers(graph), [layer], decoder)
    assert saved == sum(size for n, size in sizes.items() if n not in graph.initializers)
    assert saved >= sum(size for n, size in sizes.items() if f"layers.{layer}." in n) > 0
    assert not any(f"layers.{layer}." in n for n in graph.initializers)
    assert graph.inputs == ["input_ids", "attention_mask", "position_ids", *_names("past_key_values", 0)]
    assert graph.outputs == ["logits", *_names("present", 0)]
    assert graph.shape("past_key_values.0.key") == ("batch", 2, "past", 16)
    kept = 1 - layer
    got = _outputs(graph, _cache_feeds([kept]))
    np.testing.assert_allclose(got[0], expected["logits"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[1], expected[f"k{kept}"])
    np.testing.assert_array_equal(got[2], expected[f"v{kept}"])

    save_model(graph, tmp_path / "dropped.onnx")
    fewer = dataclasses.replace(decoder, num_layers=1)
    np.testing.assert_allclose(
        _generated_logits(tmp_path / "dropped.onnx", fewer),
        _generated_logits(tmp_path / "full.onnx", decoder),
        atol=1e-5,
        rtol=0,
    )


def _names(kind: str, i: int) -> list[str]:
    return [f"{kind}.{i}.key", f"{kind}.{i}.value"]


def _prune(graph: Graph, options: dict, *, calibrate: bool = False):
    """prune-structured through the PassManager (the IR verifier checks the result); returns its record."""
    decoder = tiny_import("llama").decoder
    data: dict = {"decoder": decoder}
    if calibrate:
        rng = np.random.default_rng(7)
        windows = [rng.integers(3, VOCAB, 12).tolist() for _ in range(3)]
        data["calibration"] = CalibrationSet([decoder_feeds(graph, decoder, w) for w in windows], "test")
    manager = PassManager(Pipeline.parse([{"prune-structured": options}]), ctx=PassContext(data=data))
    return manager.run(graph).records[-1]


@pytest.mark.parametrize("layer", [0, 1])
def test_layer_ratio_drops_the_layer_with_the_least_influence(layer):
    graph = _llama("fused", {layer: 1e-3})  # this layer turns the hidden state very little
    record = _prune(graph, {"layer_ratio": 0.5}, calibrate=True)
    assert record.details["dropped_layers"] == [layer]
    influence = record.details["layer_influence"]
    assert influence[str(layer)] < 1e-3 < influence[str(1 - layer)]
    assert record.details["decoder"] == {"num_layers": 1}
    assert record.stats["layers_dropped"] == 1 and record.stats["bytes_saved"] > 0
    assert [s.layer for s in find_layers(graph)] == [1 - layer]


def test_excluded_layers_are_not_dropped_by_layer_ratio():
    graph = _llama("fused", {0: 1e-3})  # layer 0 has the least influence, but it is excluded
    record = _prune(graph, {"layer_ratio": 0.5, "exclude": ["0"]}, calibrate=True)
    assert record.details["dropped_layers"] == [1]
    assert list(record.details["layer_influence"]) == ["1"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer_ratio": 0.5, "exclude": ["*"]}, r"include/exclude leave 0 to choose from"),
        ({"drop_layers": [5]}, r"drop_layers: no decoder layer 5 \(layers are 0..1\)"),
        ({"drop_layers": [0, 1]}, r"dropping every decoder layer \(layers are 0..1\)"),
        ({"layer_ratio": 0.2}, r"layer_ratio 0.2 drops none of the 2 layers"),
    ],
)
def test_bad_layer_choices_are_pass_errors(options, message):
    with pytest.raises(PassError, match=message):
        _prune(_llama("unfused", {}), options, calibrate=True)
