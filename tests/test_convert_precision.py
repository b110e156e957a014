"""convert-precision: float32 -> float16/bfloat16 with a float32 keep-list.

Hand-built graphs check where Casts go (only at float32/float16 boundaries, never back to back), what stays
float32 (keep_ops, keep_nodes, index math, integer shape math, fixed-float inputs), weights converted once,
the interface (keep_io, the KV cache) and ``auto``; numbers are compared with the float32 graph in
onnxruntime. A tiny exported LLaMA (the brief's config) runs in float16 on onnxruntime's CPU provider within
a stated tolerance; its bfloat16 form is checked structurally (onnx.checker, strict shape inference) and
numerically with ONNX's reference evaluator, since onnxruntime's CPU provider has no bfloat16 kernels for
most ops (Add, MatMul, ...).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphs import DECODER_CLEANUP, DECODER_FUSION
from onnx import TensorProto, helper, numpy_helper

from llmc.ir import Graph, clone, from_onnx, to_onnx, verify
from llmc.pass_manager import run_pipeline

F32, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16

# float16 against float32 on onnxruntime's CPU provider: relative to the largest reference magnitude
FP16_REL_TOL = 5e-3  # measured: ~1e-3 on the tiny LLaMA
# bfloat16 (8 mantissa bits) against float32 in ONNX's reference evaluator
BF16_REL_TOL = 5e-2  # measured: ~1.6e-2 on the tiny LLaMA

FUSION_PIPELINE = [  # smollm2-cpu.yaml's, without logits-last-token
    *DECODER_CLEANUP,
    *DECODER_FUSION,
    {"fixpoint": ["eliminate-common-subexpressions", "eliminate-dead-code"]},
]


# -- helpers ---------------------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, initializers=(), opset: int = 23) -> Graph:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _session(graph: Graph) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        to_onnx(graph).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _run(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = _session(graph)
    types = {i.name: i.type for i in session.get_inputs()}
    cast = {
        k: v.astype(np.float16) if types[k] == "tensor(float16)" else v
        for k, v in feeds.items()
        if k in types
    }
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, cast), strict=True))


def _convert(graph: Graph, **options) -> dict:
    report = run_pipeline(graph, [{"convert-precision": options}, "eliminate-dead-code"])
    verify(graph)  # onnx.checker and strict shape inference (also run by the pass manager)
    return report.records[0]


def _casts(graph: Graph) -> list:
    return graph.find("Cast")


def _no_back_to_back_casts(graph: Graph) -> None:
    for node in _casts(graph):
        producer = graph.producer(node.inputs[0])
        assert producer is None or producer.op_type != "Cast", f"Cast after Cast at {node.label}"


def _init_dtype(graph: Graph, name: str) -> np.dtype:
    return graph.initializers[name].dtype


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def _mlp(rng: np.random.Generator) -> Graph:
    """x[2,8] -> MatMul w1 -> Add b1 -> Relu -> MatMul w2 -> Softmax -> y (float32 output)."""
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["s"], name="mm2"),
        helper.make_node("Softmax", ["s"], ["y"], name="softmax"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["batch", 8])],
        [helper.make_tensor_value_info("y", F32, ["batch", 4])],
        inits,
    )


# -- hand-built graphs -----------------------------------------------------------------------------------
def test_weights_and_activations_convert_with_casts_only_at_boundaries() -> None:
    rng = np.random.default_rng(0)
    graph = _mlp(rng)
    reference = clone(graph)
    record = _convert(graph)
    assert {_init_dtype(graph, n) for n in ("w1", "b1", "w2")} == {np.dtype(np.float16)}
    assert graph.dtype("x") == F32 and graph.dtype("y") == F32  # keep_io
    assert graph.find("Softmax")[0].inputs[0] != "s"  # Softmax (keep_ops) reads a float32 Cast of s
    casts = _casts(graph)
    # two boundaries: x into the float16 MatMul, the float16 logits into the float32 Softmax
    assert sorted(c.attr("to") for c in casts) == [F32, F16], [c.label for c in casts]
    _no_back_to_back_casts(graph)
    assert record.stats["initializers_converted"] == 3
    assert record.stats["weight_bytes_saved"] == (8 * 16 + 16 + 16 * 4) * 2
    assert {k["reason"] for k in record.details["kept"]} == {"Softmax is in keep_ops"}
    x = rng.standard_normal((3, 8)).astype(np.float32)
    got, want = _run(graph, {"x": x})["y"], _run(reference, {"x": x})["y"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_keep_nodes_glob_and_keep_ops_override() -> None:
    graph = _mlp(np.random.default_rng(1))
    _convert(graph, keep_nodes=["mm*"], keep_ops=[])
    # both MatMuls stay float32 (their weights too: no converted user), Softmax converts now
    assert _init_dtype(graph, "w1") == np.float32 and _init_dtype(graph, "w2") == np.float32
    assert _init_dtype(graph, "b1") == np.float16
    [softmax] = graph.find("Softmax")
    assert graph.dtype(softmax.outputs[0]) == F16
    _no_back_to_back_casts(graph)


def test_fp16_aliases_and_bf16_dtype() -> None:
    graph = _mlp(np.random.default_rng(2))
    _convert(graph, dtype="bf16")
    assert _init_dtype(graph, "w1") == np.dtype(ml_dtypes.bfloat16)
    onnx.checker.check_model(to_onnx(graph), full_check=True)


def _rotary_and_mask_graph() -> Graph:
    """Index math (positions -> angles -> cos, a finfo.min mask from attention_mask) beside activations, and
    integer shape math (Shape -> Gather -> Range) that must stay as it is."""
    inv_freq = numpy_helper.from_array((1.0 / 10000 ** (np.arange(4) / 4)).astype(np.float32), "inv_freq")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    big = numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "min")
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 0.5, "w")
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    step = numpy_helper.from_array(np.array(1, np.int64), "step")
    nodes = [
        helper.make_node("Cast", ["positions"], ["pos_f"], to=F32),
        helper.make_node("Unsqueeze", ["pos_f", "axes"], ["pos_u"]),
        helper.make_node("Mul", ["pos_u", "inv_freq"], ["angles"]),
        helper.make_node("Cos", ["angles"], ["cos"]),
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="proj"),
        helper.make_node("Mul", ["xw", "cos"], ["rotated"]),
        helper.make_node("Cast", ["mask"], ["mask_f"], to=F32),
        helper.make_node("Sub", ["one", "mask_f"], ["inverted"]),
        helper.make_node("Mul", ["inverted", "min"], ["bias"]),
        helper.make_node("Unsqueeze", ["bias", "axes0"], ["bias_u"]),
        helper.make_node("Add", ["rotated", "bias_u"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["y"], axis=1),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"]),
        helper.make_node("Range", ["zero", "n", "step"], ["indices"]),
    ]
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    axes0 = numpy_helper.from_array(np.array([0], np.int64), "axes0")
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("x", F32, [3, 4]),
            helper.make_tensor_value_info("positions", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, [4]),
        ],
        [
            helper.make_tensor_value_info("y", F32, [3, 4]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, [3]),
        ],
        [inv_freq, one, big, w, zero, step, axes, axes0],
    )


def test_index_math_stays_fp32_and_the_mask_is_clipped() -> None:
    graph = _rotary_and_mask_graph()
    reference = clone(graph)
    record = _convert(graph)
    kept = {k["node"].split("#")[0]: k["reason"] for k in record.details["kept"]}
    assert kept["Cos"].startswith("index math") and kept["Cast"].startswith("index math")
    assert _init_dtype(graph, "inv_freq") == np.float32  # feeds index math only
    assert _init_dtype(graph, "min") == np.float32
    assert _init_dtype(graph, "w") == np.float16
    [to16] = [c for c in _casts(graph) if c.inputs[0] == "cos"]  # cos computed in float32, then Cast
    assert to16.attr("to") == F16
    assert len(graph.find("Clip")) == 1 and record.stats["clips_inserted"] == 1  # only the mask's cone
    assert graph.find("Range")[0].inputs == ("zero", "n", "step")  # integer shape math untouched
    assert _init_dtype(graph, "zero") == np.int64
    _no_back_to_back_casts(graph)
    feeds = {
        "x": np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32),
        "positions": np.array([0, 1000, 3000], np.int64),
        "mask": np.array([1, 1, 0, 1], np.int64),  # key 2 masked: -65504 in float16, not -inf
    }
    got, want = _run(graph, feeds), _run(reference, feeds)
    assert np.isfinite(got["y"]).all() and (got["y"][:, 2] == 0).all()
    np.testing.assert_allclose(got["y"], want["y"], atol=2e-3)
    np.testing.assert_array_equal(got["indices"], want["indices"])


def test_a_shared_weight_is_converted_once_and_a_small_constant_duplicated() -> None:
    rng = np.random.default_rng(4)
    big = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "big")
    small = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "small")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = [
        helper.make_node("MatMul", ["x", "big"], ["h"]),
        helper.make_node("Add", ["h", "small"], ["y"]),
        helper.make_node("ReduceSum", ["big", "axes"], ["col"], keepdims=0),  # kept float32
        helper.make_node("Mul", ["col", "small"], ["z0"]),  # index-free, converted
        helper.make_node("ReduceSum", ["small", "axes"], ["z"], keepdims=1),  # kept float32
    ]
    graph = _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, [2, 64])],
        [
            helper.make_tensor_value_info("y", F32, [2, 32]),
            helper.make_tensor_value_info("z0", F32, [32]),
            helper.make_tensor_value_info("z", F32, [1]),
        ],
        [big, small, axes],
    )
    reference = clone(graph)
    record = _convert(graph)
    assert _init_dtype(graph, "big") == np.float16  # one copy, in float16
    [back] = [c for c in _casts(graph) if c.inputs[0] == "big"]  # the float32 ReduceSum reads a Cast of it
    assert back.attr("to") == F32
    assert _init_dtype(graph, "small") == np.float32  # small and used both ways: duplicated
    assert record.stats["constants_duplicated"] == 1
    assert sum(1 for n in graph.initializers if n.startswith("small")) == 2
    x = rng.standard_normal((2, 64)).astype(np.float32)
    got, want = _run(graph, {"x": x}), _run(reference, {"x": x})
    for name in want:
        assert _rel_err(got[name], want[name]) < 5e-3, name


def test_cast_pairs_and_identity_casts_are_removed() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=F32),  # identity in the float32 model
        helper.make_node("Relu", ["x32"], ["r"]),
        helper.make_node("Cast", ["r"], ["r16"], to=F16),  # the model's own float16 island
        helper.make_node("Cast", ["r16"], ["r32"], to=F32),
        helper.make_node("Sigmoid", ["r32"], ["y"]),
    ]
    graph = _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, [4])],
        [helper.make_tensor_value_info("y", F32, [4])],
    )
    record = _convert(graph, keep_io=False)
    # everything is float16 now: the identity Cast and the f16 -> f32 -> f16 round trip are gone
    assert _casts(graph) == [], [c.label for c in _casts(graph)]
    assert record.stats["casts_removed"] >= 2
    assert graph.dtype("x") == F16 and graph.dtype("y") == F16


def test_a_models_own_narrowing_round_trip_stays() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=F16),
        helper.make_node("Cast", ["x16"], ["x32"], to=F32),
        helper.make_node("Softmax", ["x32"], ["y"]),
    ]
    graph = _model(
        nodes, [helper.make_tensor_value_info("x", F32, [4])], [helper.make_tensor_value_info("y", F32, [4])]
    )
    _convert(graph)  # Softmax is kept: the model's float32 -> float16 -> float32 rounding is deliberate
    assert [c.attr("to") for c in _casts(graph)] == [F16, F32]


def test_keep_io_false_and_the_kv_cache_dtype() -> None:
    nodes = [
        helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=0),
        helper.make_node("Relu", ["k"], ["out"]),
    ]
    inputs = [
        helper.make_tensor_value_info("past_key_values.0.key", F32, ["p", 4]),
        helper.make_tensor_value_info("k", F32, [1, 4]),
    ]
    outputs = [
        helper.make_tensor_value_info("present.0.key", F32, ["t", 4]),
        helper.make_tensor_value_info("out", F32, [1, 4]),
    ]
    kv16 = _model(nodes, inputs, outputs)
    _convert(kv16)  # keep_io, KV cache "same": the cache is float16, the rest of the interface float32
    assert kv16.dtype("past_key_values.0.key") == F16 and kv16.dtype("present.0.key") == F16
    assert kv16.dtype("k") == F32 and kv16.dtype("out") == F32
    kv32 = _model(nodes, inputs, outputs)
    _convert(kv32, kv_cache_dtype="float32")
    assert kv32.dtype("past_key_values.0.key") == F32 and kv32.dtype("present.0.key") == F32
    all16 = _model(nodes, inputs, outputs)
    _convert(all16, keep_io=False)
    assert {all16.dtype(n) for n in (*all16.inputs, *all16.outputs)} == {F16}
    assert _casts(all16) == []
    feeds = {"past_key_values.0.key": np.ones((2, 4), np.float32), "k": -np.ones((1, 4), np.float32)}
    assert _run(kv32, feeds)["present.0.key"].shape == (3, 4)


def test_weights_beyond_float16_stay_float32_masks_are_clipped_and_auto() -> None:
    rng = np.random.default_rng(5)
    huge = rng.standard_normal((4, 4)).astype(np.float32) * 1e5  # data beyond 65504 (a BN variance...)
    tiny = rng.standard_normal((4, 4)).astype(np.float32) * 1e-9  # flushed to zero in float16
    nodes = [
        helper.make_node("MatMul", ["x", "huge"], ["a"], name="huge_mm"),
        helper.make_node("MatMul", ["a", "tiny"], ["b"], name="tiny_mm"),
        helper.make_node("MatMul", ["b", "fine"], ["c"], name="fine_mm"),
        helper.make_node("Where", ["keep", "zero", "min"], ["bias"], name="mask"),
        helper.make_node("Add", ["c", "bias"], ["y"], name="masked"),
    ]
    inits = [
        numpy_helper.from_array(huge, "huge"),
        numpy_helper.from_array(tiny, "tiny"),
        numpy_helper.from_array(np.eye(4, dtype=np.float32), "fine"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "min"),  # a sentinel
    ]
    io = (
        [
            helper.make_tensor_value_info("x", F32, [1, 4]),
            helper.make_tensor_value_info("keep", TensorProto.BOOL, [4]),
        ],
        [helper.make_tensor_value_info("y", F32, [1, 4])],
    )
    graph = _model(nodes, *io, inits)
    reference = clone(graph)
    record = _convert(graph)
    kept = {k["node"]: k["reason"] for k in record.details["kept"]}
    assert kept == {
        "huge_mm (MatMul)": "constant 'huge' has values beyond float16's range (|x| up to 1.732e+05)"
    }
    assert _init_dtype(graph, "huge") == np.float32 and _init_dtype(graph, "tiny") == np.float16
    assert record.stats["constants_clipped"] == 1  # the mask's finfo.min: -65504, not -inf
    assert graph.initializers["min"] == np.float16(-65504)
    feeds = {"x": rng.standard_normal((1, 4)).astype(np.float32), "keep": np.array([1, 1, 0, 1], bool)}
    got, want = _run(graph, feeds)["y"], _run(reference, feeds)["y"]
    assert np.isfinite(got).all() and got[0, 2] == -65504
    assert (got[:, [0, 1, 3]] == 0).all() and (want[:, [0, 1, 3]] != 0).all()  # 1e-9 weights: flushed
    auto = _model(nodes, *io, inits)
    kept = {k["node"]: k["reason"] for k in _convert(auto, auto=True).details["kept"]}
    assert kept["tiny_mm (MatMul)"] == (
        "auto: constant 'tiny' would flush 100.0% of its nonzero values to zero in float16"
    )
    assert _init_dtype(auto, "fine") == np.float16
    got = _run(auto, feeds)["y"]  # auto keeps the tiny weights' MatMul in float32: the numbers survive
    np.testing.assert_allclose(got[:, [0, 1, 3]], want[:, [0, 1, 3]], rtol=1e-2)


def test_unknown_custom_ops_stay_float32() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mystery", ["r"], ["m"], domain="org.example"),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", F32, [4])],
            [helper.make_tensor_value_info("y", F32, [4])],
            value_info=[
                helper.make_tensor_value_info("m", F32, [4]),
                helper.make_tensor_value_info("r", F32, [4]),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("org.example", 1)],
    )
    graph = from_onnx(model)
    report = run_pipeline(graph, [{"convert-precision": {"keep_io": False}}])
    kept = report.records[0].details["kept"]
    assert kept == [{"node": "Mystery#1 -> m", "reason": "no type information for org.example.Mystery"}]
    [custom] = graph.find("Mystery")
    assert graph.dtype(custom.inputs[0]) == F32 and graph.dtype("m") == F32


# -- a tiny exported LLaMA ---------------------------------------------------------------------------------
@functools.cache
def tiny_hf_folder(kind: str) -> Path:
    """The brief's tiny LLaMA (or a tiny BERT), random weights widened so that float16 rounding shows."""
    transformers = pytest.importorskip("transformers")
    import torch

    root = Path(tempfile.mkdtemp(prefix="llmc-precision-"))
    import atexit

    atexit.register(shutil.rmtree, root, True)
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BertConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
        )
        model = transformers.BertModel(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.1)
            else:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(root / kind)
    return root / kind


@functools.cache
def tiny_import(kind: str):
    """The import_hf result (graph, decoder spec) of the tiny model, once per test process."""
    from llmc.frontends.hf import import_hf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = tiny_hf_folder(kind)
    task = "text-generation" if kind == "llama" else "feature-extraction"
    return import_hf(folder, task=task, work_dir=folder.parent / f"{kind}-work")


def tiny_fused(kind: str) -> Graph:
    """A fresh copy of the tiny model after the fusion pipeline (standard ops, opset 23+)."""
    graph = clone(tiny_import(kind).graph)
    run_pipeline(graph, FUSION_PIPELINE)
    return graph


def decoder_feeds(batch: int = 2, seq: int = 5, past: int = 3, kv_dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 128, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": np.tile(np.arange(past, past + seq), (batch, 1)).astype(np.int64),
    }
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((batch, 2, past, 16)).astype(kv_dtype)
    return feeds


def test_tiny_llama_float16_matches_float32_on_onnxruntime_cpu() -> None:
    reference = tiny_fused("llama")
    graph = clone(reference)
    record = _convert(graph)
    kept = {k["reason"] for k in record.details["kept"]}
    assert kept == {"index math (computed from integers and constants)"}  # rotary angles, cos and sin
    weights = {n: a.dtype for n, a in graph.initializers.items() if a.dtype.kind == "f"}
    assert {n for n, d in weights.items() if d == np.float32} == {"model.rotary_emb.inv_freq"}
    for node in graph.find("MatMul"):
        assert graph.dtype(node.outputs[0]) == F16 or node.outputs[0] == "logits"
    assert graph.dtype("logits") == F32 and graph.dtype("present.0.key") == F16
    assert graph.dtype("past_key_values.1.value") == F16
    _no_back_to_back_casts(graph)
    for batch, seq, past in ((2, 5, 3), (2, 1, 6), (1, 6, 0)):
        feeds = decoder_feeds(batch, seq, past)
        got, want = _run(graph, feeds), _run(reference, feeds)
        for name, value in want.items():
            assert got[name].shape == value.shape
            assert _rel_err(got[name], value) < FP16_REL_TOL, name


def test_tiny_llama_bfloat16_is_valid_and_close_in_the_reference_evaluator() -> None:
    from onnx.reference import ReferenceEvaluator

    reference = tiny_fused("llama")
    graph = clone(reference)
    _convert(graph, dtype="bfloat16")
    model = to_onnx(graph)
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    assert graph.dtype("present.0.key") == BF16 and graph.dtype("logits") == F32
    feeds = decoder_feeds(1, 4, 3)
    bf16 = {k: v.astype(ml_dtypes.bfloat16) if k.startswith("past") else v for k, v in feeds.items()}
    got = dict(zip(graph.outputs, ReferenceEvaluator(model).run(None, bf16), strict=True))
    want = _run(reference, feeds)
    for name, value in want.items():
        assert _rel_err(got[name], value) < BF16_REL_TOL, name


def test_subgraphs_and_what_they_read_stay_float32() -> None:
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["r", "w"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", F32, [4])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["r", "w"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", F32, [4])],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Sub", ["x", "w"], ["z"], name="sub"),
    ]
    graph = _model(
        nodes,
        [
            helper.make_tensor_value_info("x", F32, [4]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", F32, [4]), helper.make_tensor_value_info("z", F32, [4])],
        [w],
    )
    reference = clone(graph)
    record = _convert(graph, keep_io=False)
    kept = {k["node"]: k["reason"] for k in record.details["kept"]}
    assert kept["relu (Relu)"] == "a subgraph reads its output"
    # the If stays float32; its output, a float16 graph output (keep_io false), is Cast from y/fp32
    assert kept["If#1 -> y/fp32"] == "holds a subgraph (subgraphs are not converted)"
    assert graph.dtype("y") == F16
    assert _init_dtype(graph, "w") == np.float32  # read inside the branches: a float16 copy for Sub
    [relu] = graph.find("Relu")  # float32: reads a Cast of the (now float16) input x
    assert graph.producer(relu.inputs[0]).attr("to") == F32
    [sub] = graph.find("Sub")
    assert _init_dtype(graph, sub.inputs[1]) == np.float16
    x = np.array([-1.0, 0.5, 2.0, 3.0], np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        got, want = _run(graph, feeds), _run(reference, feeds)
        for name, value in want.items():
            np.testing.assert_allclose(got[name].astype(np.float32), value, atol=1e-2, err_msg=name)
