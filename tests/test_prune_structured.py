"""prune-structured on a hand-built decoder layer in the fused form (merged qkv + Split, RotaryEmbedding,
opset-23 Attention with GQA and a KV cache, o_proj, merged gate_up + Split + Swish gate, down_proj):
pruning channels/heads whose contribution is zero leaves the outputs equal in onnxruntime, explicit lists
give the hand-built smaller layer, and bad options are clear, located errors."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import check_golden, run_model
from onnx import TensorProto, helper, numpy_helper, shape_inference

from llmc.calibration import CalibrationSet
from llmc.errors import PassError
from llmc.ir import Graph, clone, from_onnx
from llmc.pass_manager import PassContext, PassManager, Pipeline, make_pass
from llmc.pass_manager.base import PassOptionsError

H, D, S, P = 8, 4, 3, 2  # hidden, head dim, new tokens, past tokens
PREFIX = "model.layers.0"


def _weights(q_heads: int = 4, kv_heads: int = 2, width: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "q": rng.standard_normal((H, q_heads * D)).astype(np.float32) * 0.5,
        "k": rng.standard_normal((H, kv_heads * D)).astype(np.float32) * 0.5,
        "v": rng.standard_normal((H, kv_heads * D)).astype(np.float32) * 0.5,
        "o": rng.standard_normal((q_heads * D, H)).astype(np.float32) * 0.5,
        "gate": rng.standard_normal((H, width)).astype(np.float32) * 0.5,
        "up": rng.standard_normal((H, width)).astype(np.float32) * 0.5,
        "down": rng.standard_normal((width, H)).astype(np.float32) * 0.5,
    }


def _layer_nodes(w: dict[str, np.ndarray], i: int, x: str, y: str):
    """Layer ``i`` as the fusion passes leave it (q reshape with a constant head count, k/v with -1)."""
    q_heads, kv_heads = w["q"].shape[1] // D, w["k"].shape[1] // D
    pre = f"model.layers.{i}"
    inits = {
        f"{pre}.self_attn.qkv_proj.weight.T": np.concatenate([w["q"], w["k"], w["v"]], axis=1),
        f"qkv_sizes{i}": np.array([w["q"].shape[1], w["k"].shape[1], w["v"].shape[1]], np.int64),
        f"q_shape{i}": np.array([0, 0, q_heads, D], np.int64),
        f"kv_shape{i}": np.array([0, 0, -1, D], np.int64),
        f"out_shape{i}": np.array([0, 0, q_heads * D], np.int64),
        f"{pre}.self_attn.o_proj.weight.T": w["o"],
        f"{pre}.mlp.gate_up_proj.weight.T": np.concatenate([w["gate"], w["up"]], axis=1),
        f"{pre}.mlp.down_proj.weight.T": w["down"],
    }

    def mk(op: str, inputs: list[str], outputs: list[str], **attrs):
        local = {"x": x, "y": y, "cos": "cos", "sin": "sin", "": ""}  # the rest get the layer's suffix
        name = lambda v: local[v] if v in local else (v if "." in v else f"{v}{i}")  # noqa: E731
        return helper.make_node(op, [name(v) for v in inputs], [name(v) for v in outputs], **attrs)

    nodes = [
        mk("MatMul", ["x", f"{pre}.self_attn.qkv_proj.weight.T"], ["qkv"]),
        mk("Split", ["qkv", "qkv_sizes"], ["q2", "k2", "v2"], axis=-1),
        mk("Reshape", ["q2", "q_shape"], ["q3"]),
        mk("Transpose", ["q3"], ["q4"], perm=[0, 2, 1, 3]),
        mk("RotaryEmbedding", ["q4", "cos", "sin"], ["q5"]),
        mk("Reshape", ["k2", "kv_shape"], ["k3"]),
        mk("Transpose", ["k3"], ["k4"], perm=[0, 2, 1, 3]),
        mk("RotaryEmbedding", ["k4", "cos", "sin"], ["k5"]),
        mk("Reshape", ["v2", "kv_shape"], ["v3"]),
        mk("Transpose", ["v3"], ["v4"], perm=[0, 2, 1, 3]),
        mk(
            "Attention",
            ["q5", "k5", "v4", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value"],
            ["attn", f"present.{i}.key", f"present.{i}.value"],
            q_num_heads=q_heads,
            kv_num_heads=kv_heads,
        ),
        mk("Transpose", ["attn"], ["attn_t"], perm=[0, 2, 1, 3]),
        mk("Reshape", ["attn_t", "out_shape"], ["attn_flat"]),
        mk("MatMul", ["attn_flat", f"{pre}.self_attn.o_proj.weight.T"], ["o"]),
        mk("Add", ["x", "o"], ["h"]),
        mk("MatMul", ["h", f"{pre}.mlp.gate_up_proj.weight.T"], ["gu"]),
        mk("Split", ["gu"], ["g", "u"], axis=-1, num_outputs=2),
        mk("Swish", ["g"], ["gs"]),
        mk("Mul", ["gs", "u"], ["gated"]),
        mk("MatMul", ["gated", f"{pre}.mlp.down_proj.weight.T"], ["down"]),
        mk("Add", ["h", "down"], ["y"]),
    ]
    f = TensorProto.FLOAT
    cache = [f"{kind}.{i}.{kv}" for kind in ("past_key_values", "present") for kv in ("key", "value")]
    inputs = [helper.make_tensor_value_info(n, f, [1, kv_heads, "past", D]) for n in cache[:2]]
    outputs = [helper.make_tensor_value_info(n, f, [1, kv_heads, "total", D]) for n in cache[2:]]
    return nodes, inits, inputs, outputs


def _layer(*ws: dict[str, np.ndarray]) -> Graph:
    """A decoder of ``len(ws)`` layers (one by default): x -> layers -> y, each with its KV cache."""
    f = TensorProto.FLOAT
    nodes, inits = [], {}
    inputs = [
        helper.make_tensor_value_info("x", f, [1, S, H]),
        helper.make_tensor_value_info("cos", f, [1, S, D // 2]),
        helper.make_tensor_value_info("sin", f, [1, S, D // 2]),
    ]
    outputs = [helper.make_tensor_value_info("y", f, [1, S, H])]
    for i, w in enumerate(ws):
        x, y = ("x" if i == 0 else f"hidden{i}"), ("y" if i == len(ws) - 1 else f"hidden{i + 1}")
        more = _layer_nodes(w, i, x, y)
        nodes += more[0]
        inits.update(more[1])
        inputs += more[2]
        outputs += more[3]
    graph = helper.make_graph(
        nodes, "layers", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    return from_onnx(shape_inference.infer_shapes(model))


def _feeds(kv_heads: int = 2, seed: int = 1, layers: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, 3, (1, S, D // 2)).astype(np.float32)
    feeds = {
        "x": rng.standard_normal((1, S, H)).astype(np.float32),
        "cos": np.cos(angles),
        "sin": np.sin(angles),
    }
    for i in range(layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = rng.standard_normal((1, kv_heads, P, D)).astype(np.float32)
    return feeds


def _run(graph: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs: y, then the present key/value of each layer."""
    return list(run_model(graph, feeds).values())


def _prune(graph: Graph, options: dict, feeds: list[dict[str, np.ndarray]] | None = None):
    """Runs the pass through the PassManager (so the IR verifier checks the result); returns its record."""
    data = {"calibration": CalibrationSet(feeds, "test")} if feeds else {}
    report = PassManager(Pipeline.parse([{"prune-structured": options}]), ctx=PassContext(data=data)).run(
        graph
    )
    return report.records[-1]


def _weight(graph: Graph, part: str) -> np.ndarray:
    return graph.initializers[f"{PREFIX}.{part}.weight.T"]


def test_zero_channels_found_by_importance_and_removed_exactly():
    w = _weights()
    w["down"][[1, 5]] = 0.0  # these channels contribute nothing: their importance is zero
    graph, feeds = _layer(w), _feeds()
    expected = _run(graph, feeds)
    record = _prune(graph, {"ffn_ratio": 0.25, "multiple_of": 1}, [feeds])
    assert record.stats["channels_removed"] == 2
    assert _weight(graph, "mlp.gate_up_proj").shape == (H, 12)
    assert _weight(graph, "mlp.down_proj").shape == (6, H)
    assert record.details["layers"]["0"]["ffn_channels"] == [6, 8]
    assert record.stats["bytes_saved"] == 2 * 3 * H * 4  # two gate, up and down rows/columns of fp32
    for got, want in zip(_run(graph, feeds), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_zero_query_heads_removed_within_groups_exactly():
    w = _weights()
    w["o"][1 * D : 2 * D] = 0.0  # head 1 (group 0) and head 2 (group 1) write nothing
    w["o"][2 * D : 3 * D] = 0.0
    graph, feeds = _layer(w), _feeds()
    expected = _run(graph, feeds)
    record = _prune(graph, {"head_ratio": 0.5}, [feeds])
    assert record.details["layers"]["0"]["q_heads"] == [0, 3]
    assert record.details["layers"]["0"]["kv_heads"] == [0, 1]
    assert "decoder" not in record.details  # the KV cache is unchanged
    attention = graph.find("Attention")[0]
    assert (attention.attr("q_num_heads"), attention.attr("kv_num_heads")) == (2, 2)
    assert _weight(graph, "self_attn.qkv_proj").shape == (H, (2 + 2 + 2) * D)
    assert _weight(graph, "self_attn.o_proj").shape == (2 * D, H)
    for got, want in zip(_run(graph, feeds), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_group_mode_removes_a_kv_head_with_its_queries_and_the_cache_shrinks():
    w = _weights()
    w["o"][2 * D :] = 0.0  # kv group 1 (query heads 2, 3) writes nothing
    graph, feeds = _layer(w), _feeds()
    expected = _run(graph, feeds)
    record = _prune(graph, {"head_mode": "group", "head_ratio": 0.5}, [feeds])
    assert record.details["decoder"] == {"num_kv_heads": 1}
    assert graph.shape("past_key_values.0.key")[1] == 1
    small = dict(feeds)
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        small[name] = feeds[name][:, :1]
    y, key, value = _run(graph, small)
    np.testing.assert_allclose(y, expected[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(key, expected[1][:, :1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(value, expected[2][:, :1], rtol=1e-6, atol=1e-6)


def test_explicit_lists_equal_the_hand_built_smaller_layer(request):
    w = _weights(seed=3)
    graph, feeds = _layer(w), _feeds()
    record = _prune(graph, {"channels": {0: [2, 3, 7]}, "heads": {0: [0, 2]}})
    assert record.stats == {
        "channels_removed": 3,
        "heads_removed": 2,
        "bytes_saved": record.stats["bytes_saved"],
    }
    keep_c = [0, 1, 4, 5, 6]
    keep_q = np.concatenate([np.arange(h * D, (h + 1) * D) for h in (1, 3)])
    small = dict(w, q=w["q"][:, keep_q], o=w["o"][keep_q], gate=w["gate"][:, keep_c], up=w["up"][:, keep_c])
    small["down"] = w["down"][keep_c]
    for got, want in zip(_run(graph, feeds), _run(_layer(small), feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # every edited shape is consistent: the verifier ran, and shape inference agrees with the recorded shapes
    assert graph.shape("attn_flat0")[-1] == 2 * D and graph.shape("gated0")[-1] == 5
    check_golden(request, graph, "prune/structured_channels_and_heads.onnxtxt")


def test_no_options_change_nothing():
    graph = _layer(_weights())
    before = clone(graph)
    assert _prune(graph, {}).changed is False
    np.testing.assert_array_equal(
        _weight(graph, "mlp.down_proj"), before.initializers[f"{PREFIX}.mlp.down_proj.weight.T"]
    )


@pytest.mark.parametrize("options", [{"ffn_ratio": 1.0}, {"head_ratio": -0.1}, {"channels": {0: [1, 1]}}])
def test_bad_option_values_are_option_errors(options):
    with pytest.raises(PassOptionsError, match="prune-structured"):
        make_pass("prune-structured", options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"heads": {0: [0]}}, r"layer 0 .*leaves \[1, 2\] query heads per kv group; GQA"),
        ({"heads": {0: [0, 1]}}, r"GQA needs the same number \(at least one\)"),
        ({"heads": {0: [9]}}, "query head 9 does not exist"),
        ({"heads": {3: [0]}}, "heads: no attention layer 3"),
        ({"channels": {0: [8]}}, "channel 8 >= width 8"),
        ({"channels": {0: list(range(8))}}, "removing every MLP channel"),
        ({"head_ratio": 0.2}, r"head_ratio 0.2 removes 0 of the 2 query heads"),
        ({"head_mode": "group", "heads": {0: [0, 1]}}, "removing every kv group"),
    ],
)
def test_bad_head_and_channel_choices_name_the_site(options, message):
    graph = _layer(_weights())
    with pytest.raises(PassError, match=message):
        _prune(graph, options, [_feeds()])


def test_ratios_need_calibration():
    with pytest.raises(PassError, match="needs calibration data"):  # the SpecError, located by the pass
        _prune(_layer(_weights()), {"ffn_ratio": 0.5})


def test_a_graph_without_attention_is_rejected():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, H])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, H])
    w = numpy_helper.from_array(np.eye(H, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"]), helper.make_node("Softmax", ["s"], ["y"])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 24)]
    )
    with pytest.raises(PassError, match="found no attention"):
        _prune(from_onnx(model), {"heads": {0: [0]}})


def test_model_scope_prunes_where_relative_importance_is_lowest():
    """Layer 0 has two silent channels and one silent query head per group, layer 1 none: with scope model,
    the model-wide ratios fall on layer 0 only, and the outputs stay equal."""
    w0, w1 = _weights(seed=4), _weights(seed=5)
    w0["down"][[0, 3]] = 0.0
    w0["o"][0:D] = 0.0  # head 0 (group 0)
    w0["o"][3 * D : 4 * D] = 0.0  # head 3 (group 1)
    graph, feeds = _layer(w0, w1), _feeds(layers=2)
    expected = _run(graph, feeds)
    options = {
        "ffn_ratio": 2 / 16,
        "head_ratio": 2 / 8,
        "ffn_scope": "model",
        "head_scope": "model",
        "multiple_of": 1,
    }
    record = _prune(graph, options, [feeds])
    assert record.details["layers"] == {"0": {"ffn_channels": [6, 8], "q_heads": [1, 2], "kv_heads": [0, 1]}}
    for got, want in zip(_run(graph, feeds), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_ratio_outside_0_1_in_a_spec_is_located(tmp_path):
    from llmc.errors import SpecError
    from llmc.spec import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text(
        "model:\n  source: onnx\n  path: model.onnx\npipeline:\n  - prune-structured: {ffn_ratio: 1.0}\n"
        "targets:\n  cpu: {}\noutput:\n  dir: out\n"
    )
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "ffn_ratio" in info.value.message and info.value.location.line == 5


def test_recover_refits_down_so_a_duplicate_channel_goes_without_loss():
    """Channel 5 is a copy of channel 2 (same gate and up columns): removing it and refitting down by least
    squares gives down row 2 the sum of both rows, the hand-computed exact answer; without the refit the
    output changes."""
    w = _weights()
    w["gate"][:, 5], w["up"][:, 5] = w["gate"][:, 2], w["up"][:, 2]
    feeds = [_feeds(seed=s) for s in range(4)]
    expected = _run(_layer(w), feeds[0])
    plain, refit = _layer(w), _layer(w)
    _prune(plain, {"channels": {0: [5]}, "multiple_of": 1})
    _prune(refit, {"channels": {0: [5]}, "multiple_of": 1, "recover": True, "recover_damp": 1e-9}, feeds)
    want = np.delete(w["down"], 5, axis=0)
    want[2] += w["down"][5]
    np.testing.assert_allclose(_weight(refit, "mlp.down_proj"), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_run(refit, feeds[0])[0], expected[0], rtol=1e-4, atol=1e-4)
    assert np.abs(_run(plain, feeds[0])[0] - expected[0]).max() > 1e-2


def test_recover_refits_o_proj_for_removed_heads():
    """A removed query head whose output equals a kept head's (same q columns, same kv group) is folded into
    the kept head's o_proj rows."""
    w = _weights()
    w["q"][:, 1 * D : 2 * D] = w["q"][:, 0 * D : 1 * D]  # heads 0 and 1 share kv group 0: equal outputs
    w["q"][:, 3 * D : 4 * D] = w["q"][:, 2 * D : 3 * D]  # heads 2 and 3 share kv group 1
    feeds = [_feeds(seed=s) for s in range(4)]
    expected = _run(_layer(w), feeds[0])
    graph = _layer(w)
    _prune(graph, {"heads": {0: [1, 3]}, "recover": True, "recover_damp": 1e-9}, feeds)
    np.testing.assert_allclose(_run(graph, feeds[0])[0], expected[0], rtol=1e-4, atol=1e-4)
