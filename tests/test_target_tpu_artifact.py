"""The tpu target end to end: buckets, the artifact folder, the runner, user errors, and the real models
(Magika, PP-OCR det) compiled through ``compile_spec`` and verified against onnxruntime by the driver."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from clitools import run_cli
from onnx import TensorProto, helper, numpy_helper

from llmc.driver import compile_spec
from llmc.errors import TargetError
from llmc.ir import from_onnx
from llmc.runtime.artifact import load_artifact
from llmc.spec import load_spec, parse_spec
from llmc.targets.base import EmitContext
from llmc.targets.tpu.options import TpuTargetSpec
from llmc.targets.tpu.target import LIBTPU_MISSING, TpuTarget, plan_buckets

pytest.importorskip("jax")

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def mlp_model(path: Path | None = None) -> onnx.ModelProto:
    """y = Softmax(Relu(x @ W1 + b1) @ W2) over x [batch, 8], with a Shape-driven Reshape on the way."""
    w1 = numpy_helper.from_array(RNG.standard_normal((8, 16)).astype(np.float32), "W1")
    b1 = numpy_helper.from_array(RNG.standard_normal(16).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(RNG.standard_normal((16, 6)).astype(np.float32), "W2")
    minus1 = numpy_helper.from_array(np.array([-1], np.int64), "minus1")
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("Shape", ["x"], ["shape"], end=1),
        helper.make_node("Concat", ["shape", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["r", "target"], ["rr"]),
        helper.make_node("MatMul", ["rr", "W2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["y"], name="probs"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
        [w1, b1, w2, minus1],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    if path is not None:
        onnx.save(model, path)
    return model


def write_spec(folder: Path, tpu: str, *, dims: str = "{batch: 3}") -> Path:
    mlp_model(folder / "model.onnx")
    spec = folder / "spec.yaml"
    spec.write_text(
        f"model: {{path: model.onnx}}\ntargets:\n  tpu: {tpu}\nverify: {{dims: {dims}}}\noutput: {{dir: out}}\n"
    )
    return spec


def test_artifact_layout_and_runner(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, "{buckets: {batch: [1, 3]}}"))
    result = compile_spec(spec)
    target = result.targets[0]
    assert target.golden is not None and target.golden.passed
    out = target.artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "tpu" and manifest["platforms"] == ["tpu", "cpu"]
    assert [b["dims"] for b in manifest["buckets"]] == [{"batch": 1}, {"batch": 3}]
    assert manifest["tpu_compile"] == {"checked": False, "reason": LIBTPU_MISSING}
    assert {"jax", "jaxlib"} <= set(manifest["versions"])
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}]
    assert manifest["outputs"][0]["dtype"] == "float32"
    assert manifest["weights"]["names"] == ["W1", "W2"]  # b1 (16 values) is small enough to be a constant
    for bucket in manifest["buckets"]:
        assert (out / bucket["module"]).stat().st_size == bucket["module_bytes"]
        mlir = (out / bucket["mlir"]).read_text()
        assert "stablehlo.dot_general" in mlir and "weight_args['W1']" in mlir  # weights are arguments
    assert manifest["files"]["weights.safetensors"] == (out / "weights.safetensors").stat().st_size

    runner, _ = load_artifact(out)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = RNG.standard_normal((batch, 8)).astype(np.float32)
        got = runner.run({"x": x})["y"]
        np.testing.assert_allclose(got, session.run(None, {"x": x})[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(TargetError, match=r"no compiled bucket matches the input shapes x\[2, 8\]"):
        runner.run({"x": np.zeros((2, 8), np.float32)})


def test_compiling_twice_gives_identical_files(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, "{buckets: {batch: [2]}}", dims="{batch: 2}"))
    a = compile_spec(spec, out=tmp_path / "a").targets[0].artifact
    b = compile_spec(spec, out=tmp_path / "b").targets[0].artifact
    for path in sorted(a.rglob("*")):
        if path.is_file() and path.name != "report.md":  # the report holds timings
            assert path.read_bytes() == (b / path.relative_to(a)).read_bytes(), path.name


def test_missing_bucket_is_a_clear_error_and_leaves_nothing(tmp_path: Path, capsys) -> None:
    spec = write_spec(tmp_path, "{}")
    result = run_cli(capsys, "compile", spec)
    assert result.code == 2
    text = result.out + result.err
    assert "input 'x' dim 0" in text and "'batch'" in text and "buckets" in text
    assert "Traceback" not in text
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_bucket_names_and_combinations_are_checked() -> None:
    graph = from_onnx(mlp_model())
    with pytest.raises(TargetError, match="did you mean 'batch'"):
        plan_buckets(graph, TpuTargetSpec(buckets={"batch": [1], "bacth": [2]}))
    with pytest.raises(TargetError, match=r"combinations\[0\] gives no size for 'batch'"):
        plan_buckets(graph, TpuTargetSpec(combinations=[{}]))
    buckets = plan_buckets(graph, TpuTargetSpec(combinations=[{"batch": 4}, {"batch": 1}]))
    assert [b.shapes["x"] for b in buckets] == [(4, 8), (1, 8)]


def test_unsupported_op_fails_the_compile_with_the_node(tmp_path: Path) -> None:
    model = mlp_model()
    model.graph.node.append(helper.make_node("Det", ["x"], ["d"], name="determinant"))
    model.graph.output.append(helper.make_empty_tensor_value_info("d"))
    with pytest.raises(TargetError, match=r"no lowering for Det \(node determinant \(Det\)\)"):
        TpuTarget(TpuTargetSpec(buckets={"batch": [1]})).emit(from_onnx(model), tmp_path / "a", EmitContext())
    assert not (tmp_path / "a").exists()


def test_missing_jax_says_which_extra_to_install(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "jax", None)
    with pytest.raises(TargetError, match=r"install llmc\[stablehlo\]"):
        TpuTarget(TpuTargetSpec(buckets={"batch": [1]})).emit(
            from_onnx(mlp_model()), tmp_path / "a", EmitContext()
        )
    result = run_cli(capsys, "compile", write_spec(tmp_path, "{buckets: {batch: [3]}}"))
    # (the CLI prints through rich, which takes "[stablehlo]" for markup until it escapes messages)
    assert result.code == 2 and "'stablehlo' extra" in result.out + result.err


def test_target_module_imports_without_jax() -> None:
    code = (
        "import sys; sys.modules['jax'] = None\n"
        "from llmc.targets import get_target\n"
        "import llmc.targets.tpu.target, llmc.spec\n"
        "print(get_target('tpu').name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "tpu", done.stderr


def test_platforms_without_this_backend_cannot_be_verified(tmp_path: Path) -> None:
    target = TpuTarget(TpuTargetSpec(buckets={"batch": [1]}, platforms=["tpu"]))
    target.emit(from_onnx(mlp_model()), tmp_path / "a", EmitContext())
    with pytest.raises(TargetError, match="exported for \\['tpu'\\]"):
        target.load(tmp_path / "a")


# -- a decoder step with a KV cache: a prefill and a decode bucket ----------------------------------
def decoder_model() -> onnx.ModelProto:
    """One attention layer with a KV cache: ids [batch, seq] -> logits, present_key/value [b, 2, past+seq, 4]."""
    d, heads, kv_heads, vocab = 8, 2, 1, 11
    inits = {
        "emb": RNG.standard_normal((vocab, d)),
        "wq": RNG.standard_normal((d, heads * 4)),
        "wk": RNG.standard_normal((d, kv_heads * 4)),
        "wv": RNG.standard_normal((d, kv_heads * 4)),
        "norm": RNG.standard_normal(heads * 4),
        "head": RNG.standard_normal((heads * 4, vocab)),
    }
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "wq"], ["q"]),
        helper.make_node("MatMul", ["h", "wk"], ["k"]),
        helper.make_node("MatMul", ["h", "wv"], ["v"]),
        helper.make_node(
            "Attention",
            ["q", "k", "v", "", "past_key", "past_value"],
            ["attn", "present_key", "present_value"],
            is_causal=1,
            q_num_heads=heads,
            kv_num_heads=kv_heads,
        ),
        helper.make_node("RMSNormalization", ["attn", "norm"], ["normed"]),
        helper.make_node("MatMul", ["normed", "head"], ["logits"]),
    ]
    cache = ["batch", kv_heads, "past", 4]
    graph = helper.make_graph(
        nodes,
        "decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
            helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab]),
            helper.make_tensor_value_info("present_key", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("present_value", TensorProto.FLOAT, None),
        ],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def test_decoder_prefill_and_decode_buckets(tmp_path: Path) -> None:
    model = decoder_model()
    options = TpuTargetSpec(
        combinations=[{"batch": 1, "seq": 5, "past": 0}, {"batch": 1, "seq": 1, "past": 5}]
    )
    target = TpuTarget(options)
    target.emit(from_onnx(model), tmp_path / "a", EmitContext())
    runner = target.load(tmp_path / "a")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    empty = np.zeros((1, 1, 0, 4), np.float32)
    prefill = {"input_ids": np.array([[1, 4, 2, 9, 3]]), "past_key": empty, "past_value": empty}
    got = runner.run(prefill)
    want = dict(zip(["logits", "present_key", "present_value"], session.run(None, prefill), strict=True))
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=1e-4)
    step = {"input_ids": np.array([[7]]), "past_key": got["present_key"], "past_value": got["present_value"]}
    logits = runner.run(step, ["logits"])["logits"]
    np.testing.assert_allclose(logits, session.run(["logits"], step)[0], atol=1e-4, rtol=1e-4)
    # the step equals the last position of a prefill over all six tokens (the cache is used correctly)
    full = {"input_ids": np.array([[1, 4, 2, 9, 3, 7]]), "past_key": empty, "past_value": empty}
    np.testing.assert_allclose(logits[0, -1], session.run(["logits"], full)[0][0, -1], atol=1e-4, rtol=1e-4)


# -- the real models ---------------------------------------------------------------------------------
def test_magika_on_both_targets(tmp_path: Path) -> None:
    spec = load_spec(REPO / "specs" / "magika-all.yaml")
    result = compile_spec(spec, out=tmp_path / "magika")
    assert [t.name for t in result.targets] == ["cpu", "tpu"]
    for target in result.targets:
        assert target.golden is not None and target.golden.passed, target.golden.markdown()
    tpu = result.targets[1]
    assert tpu.golden.rows[0].max_abs < 1e-5
    assert [b["dims"] for b in tpu.manifest["buckets"]] == [{"unk__214": 1}, {"unk__214": 4}]
    assert tpu.manifest["sizes"]["modules_bytes"] < 100_000  # weights are not baked into the modules


def test_ppocr_detector(tmp_path: Path) -> None:
    text = (REPO / "specs" / "ppocr-det-tpu.yaml").read_text()
    spec = parse_spec(text, REPO / "specs" / "ppocr-det-tpu.yaml")
    result = compile_spec(spec, out=tmp_path / "ppocr")
    target = result.targets[0]
    assert target.golden is not None and target.golden.passed, target.golden.markdown()
    assert target.manifest["tpu_compile"]["reason"] == LIBTPU_MISSING


# -- a real exported decoder: tiny random LLaMA (GQA) from the Hugging Face frontend ------------------
@pytest.mark.parametrize(
    "pipeline",
    [
        pytest.param([], id="as-exported"),
        pytest.param(
            [
                "upgrade-opset",
                "fold-constants",
                "fuse-rms-norm",
                "fuse-rotary",
                "fuse-attention",
                "eliminate-dead-code",
            ],
            id="fused-opset23",
        ),
    ],
)
def test_hf_llama_prefill_and_decode(tmp_path: Path, pipeline: list[str]) -> None:
    tiny = pytest.importorskip("fixtures_frontends.tiny")
    pytest.importorskip("transformers")
    from test_frontends_hf import decoder_feeds

    from llmc.ir import load_model
    from llmc.pass_manager import PassContext, PassManager, Pipeline, UnknownPassError

    path = tiny.tiny_import("llama").info["onnx_path"]
    graph = load_model(path)
    try:
        PassManager(Pipeline.parse(pipeline), ctx=PassContext(target=None)).run(graph)
    except UnknownPassError as exc:
        pytest.skip(f"pass not available: {exc}")
    if pipeline:
        assert {"Attention", "RotaryEmbedding", "RMSNormalization"} <= {n.op_type for n in graph.nodes()}
    buckets = [{"batch": 2, "seq": 5, "past": 0, "total": 5}, {"batch": 2, "seq": 1, "past": 5, "total": 6}]
    target = TpuTarget(TpuTargetSpec(combinations=buckets))
    target.emit(graph, tmp_path / "a", EmitContext())
    runner = target.load(tmp_path / "a")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for bucket in buckets:
        feeds = decoder_feeds("llama", bucket["batch"], bucket["seq"], bucket["past"])
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        got = runner.run(feeds)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=1e-4, err_msg=name)
