"""fuse-rotary, fuse-attention, merge-qkv, logits-last-token and the CPU attention/skip-norm legalization:
hand-built graphs (rewrite + near misses with reasons) and tiny random-config transformers exported for real
(fused counts asserted, outputs equal in onnxruntime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmc.ir import Graph, clone, from_onnx, to_onnx, to_text
from llmc.pass_manager import run_pipeline

EXPECTED = Path(__file__).parent / "expected" / "fusion"


def _session(graph: Graph) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        to_onnx(graph).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _sdpa_graph(softmax_axis: int = -1, heads: int = 2) -> Graph:
    """softmax(Q*s @ (K^T*s) + mask) @ V over [1, heads, 3, 4] inputs, as exporters write it."""
    shape = [1, heads, 3, 4]
    s = numpy_helper.from_array(np.array(0.5**0.5, np.float32), "s")
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("Mul", ["q", "s"], ["qs"]),
        helper.make_node("Mul", ["kt", "s"], ["ks"]),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=softmax_axis),
        helper.make_node("MatMul", ["probs", "v"], ["y"], name="attn_out"),
    ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("q", "k", "v")]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 3, 3]))
    graph = helper.make_graph(
        nodes, "sdpa", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [s]
    )
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def _feeds(session: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
        for i in session.get_inputs()
    }


def _golden_text(name: str, text: str, update: bool) -> None:
    path = EXPECTED / f"{name}.onnxtxt"
    if update or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"IR text differs from {path} (rerun with --update-golden if intended)"


def test_sdpa_fuses_into_attention(update_golden: bool) -> None:
    graph = _sdpa_graph()
    before = _session(graph)
    feeds = _feeds(before)
    report = run_pipeline(graph, ["fuse-attention", "eliminate-dead-code"])
    assert report.records[0].stats["fused"] == 1
    [attention] = graph.find("Attention")
    assert attention.attr("q_num_heads") == 2 and attention.attr("kv_num_heads") == 2
    assert attention.attr("scale") == pytest.approx(0.5)
    assert graph.outputs == ["y"]
    np.testing.assert_allclose(_session(graph).run(None, feeds)[0], before.run(None, feeds)[0], atol=1e-6)
    _golden_text("sdpa_attention", to_text(graph), update_golden)


def test_sdpa_near_miss_reports_why() -> None:
    graph = _sdpa_graph(softmax_axis=2)
    report = run_pipeline(graph, ["fuse-attention"])
    rejected = report.records[0].details["rejected"]
    assert [r["reason"] for r in rejected] == ["softmax is not over the last (key) axis"]
    assert rejected[0]["site"] == "attn_out (MatMul)"


def test_attention_needs_opset_23() -> None:
    graph = _sdpa_graph()
    graph.opset_imports[""] = 20
    report = run_pipeline(graph, ["fuse-attention"])
    assert "put upgrade-opset before this pass" in report.records[0].details["rejected"][0]["reason"]


def test_plain_matmuls_are_not_reported_as_near_misses() -> None:
    graph = _sdpa_graph()
    report = run_pipeline(graph, ["fuse-attention"])
    assert report.records[0].details.get("rejected", []) == []  # MatMul(Q, K^T) is not a candidate site


# -- real exports (the tiny models every test module shares: tests/fixtures_frontends/tiny.py) -----------
pytest.importorskip("transformers")
from fixtures_frontends.tiny import VOCAB, tiny_import  # noqa: E402

HEAD_DIM = {"llama": 16, "gpt2": 12}


@pytest.fixture(scope="module")
def tiny_exports() -> dict[str, Graph]:
    return {kind: tiny_import(kind).graph for kind in ("llama", "gpt2", "bert")}


def _decoder_feeds(
    graph: Graph, kv_heads: int, past: int = 3, seq: int = 4, batch: int = 2, head_dim: int = 16
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)).astype(np.int64),
    }
    for name in graph.inputs:
        if name.startswith("past_key_values"):
            feeds[name] = rng.standard_normal((batch, kv_heads, past, head_dim)).astype(np.float32)
    return {k: v for k, v in feeds.items() if k in graph.inputs}


def _compare(
    reference: Graph, candidate: Graph, feeds: dict[str, np.ndarray], last_token: bool = False
) -> None:
    ref_sess, cand_sess = _session(reference), _session(candidate)
    names = [o.name for o in ref_sess.get_outputs()]
    ref = dict(zip(names, ref_sess.run(names, feeds), strict=True))
    out = dict(zip(names, cand_sess.run(names, feeds), strict=True))
    for name in names:
        want = ref[name][:, -1:] if (last_token and name == "logits") else ref[name]
        np.testing.assert_allclose(out[name], want, atol=2e-5, rtol=1e-4, err_msg=name)


FUSION = ["fold-constants", "fuse-rotary", "fuse-attention", "merge-qkv", "eliminate-dead-code"]
LEGALIZE = ["cpu-fuse-skip-norm", "cpu-attention", "eliminate-dead-code"]


@pytest.mark.parametrize(
    ("kind", "kv_heads", "fused", "legal"),
    [
        ("llama", 2, {"RotaryEmbedding": 4, "Attention": 2}, {"GroupQueryAttention": 2}),
        ("gpt2", 4, {"Attention": 2}, {}),  # head size 12: GroupQueryAttention needs a multiple of 8
        ("bert", 4, {"Attention": 2}, {"MultiHeadAttention": 2}),
    ],
)
def test_real_exports_fuse_and_legalize(
    tiny_exports, kind: str, kv_heads: int, fused: dict, legal: dict
) -> None:
    reference = tiny_exports[kind]
    graph = clone(reference)
    graph.opset_imports[""] = 23  # dynamo exports at opset 20; none of their ops changed meaning up to 23
    run_pipeline(graph, FUSION)
    for op, count in fused.items():
        assert len(graph.find(op)) == count, op
    if kind == "bert":
        rng = np.random.default_rng(0)
        feeds = {
            "input_ids": rng.integers(0, VOCAB, (2, 5)).astype(np.int64),
            "attention_mask": np.ones((2, 5), np.int64),
        }
        if "token_type_ids" in graph.inputs:
            feeds["token_type_ids"] = np.zeros((2, 5), np.int64)
        feeds["attention_mask"][1, 3:] = 0  # padding in the second sequence
        cases = [feeds]
    else:
        # prefill of a batch, decode of a batch, and a chunk continuing a cache (onnxruntime's
        # GroupQueryAttention takes several new tokens after a cache only for batch 1)
        cases = [
            _decoder_feeds(graph, kv_heads, *shape, HEAD_DIM[kind])
            for shape in ((0, 4, 2), (5, 1, 2), (3, 4, 1))
        ]
    for feeds in cases:
        _compare(reference, graph, feeds)
    graph.opset_imports.setdefault("com.microsoft", 1)
    report = run_pipeline(graph, LEGALIZE)
    for op, count in legal.items():
        assert len(graph.find(op, domain="com.microsoft")) == count, op
    if legal:
        assert not graph.find("Attention", domain="")
    else:  # stays standard, and says why
        reasons = {r["reason"] for r in report.records[1].details["rejected"]}
        assert reasons == {
            "head size 12 is not a known multiple of 8 (GroupQueryAttention's kernel needs it)"
        }
    for feeds in cases:
        _compare(reference, graph, feeds)


def test_packed_qkv_with_rotary_inside_group_query_attention(tiny_exports) -> None:
    reference = tiny_exports["llama"]
    graph = clone(reference)
    graph.opset_imports[""] = 23
    run_pipeline(
        graph,
        [*FUSION, "cpu-fuse-skip-norm", {"cpu-attention": {"packed_rotary": True}}, "eliminate-dead-code"],
    )
    gqa = graph.find("GroupQueryAttention", domain="com.microsoft")
    assert len(gqa) == 2 and all(n.attr("do_rotary") == 1 and not n.input(1) for n in gqa)
    assert not graph.find("RotaryEmbedding")
    for shape in ((0, 4, 1), (4, 1, 1), (0, 3, 2)):  # positions = past length + offset: no left padding
        _compare(reference, graph, _decoder_feeds(graph, 2, *shape))


def test_merge_qkv_names_the_merged_weight(tiny_exports) -> None:
    graph = clone(tiny_exports["llama"])
    run_pipeline(graph, ["fold-constants", "merge-qkv"])
    assert len(graph.find("Split")) == 4  # q/k/v and gate/up in both layers


def test_logits_last_token_is_compared_on_the_last_position(tiny_exports) -> None:
    reference = tiny_exports["llama"]
    graph = clone(reference)
    run_pipeline(graph, ["logits-last-token"])
    assert graph.metadata_props["llmc.last_token_outputs"] == "logits"
    _compare(reference, graph, _decoder_feeds(graph, 2), last_token=True)
