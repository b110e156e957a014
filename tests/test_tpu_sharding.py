"""Tensor parallelism on the tpu target: the sharding plan of a tiny transformer block (heads, GQA, FFN,
merged projections), the located errors of a mesh that does not divide them, and the sharded modules run on
a 2-device XLA:CPU mesh against the unsharded ones and onnxruntime.

The multi-device runs happen in a subprocess: ``--xla_force_host_platform_device_count`` only takes effect
before JAX starts, and other test modules start JAX with one device in the pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from clitools import run_cli
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from llmc.errors import TargetError
from llmc.ir import from_onnx
from llmc.targets.tpu.options import MeshSpec, TpuTargetSpec
from llmc.targets.tpu.sharding import plan_sharding, unmerge_projections

pytest.importorskip("jax")

HIDDEN, HEAD = 16, 4
SEQ = 5
QBLOCK = 4


def block_model(
    *,
    q_heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 32,
    merged: bool = False,
    quantized: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """One transformer block (no norms) over x [batch, seq, 16]: q/k/v projections (merged into one MatMul +
    Split when ``merged``), causal GQA Attention, o_proj + residual, SiLU-gated FFN + residual (its weights
    int8 with blocked scales behind DequantizeLinear when ``quantized``)."""
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    q_cols, kv_cols = q_heads * HEAD, kv_heads * HEAD
    arrays = {"Wq": weight(HIDDEN, q_cols), "Wk": weight(HIDDEN, kv_cols), "Wv": weight(HIDDEN, kv_cols)}
    arrays.update(
        Wo=weight(q_cols, HIDDEN), Wg=weight(HIDDEN, ffn), Wu=weight(HIDDEN, ffn), Wd=weight(ffn, HIDDEN)
    )
    if merged:  # the same numbers as the unmerged block
        arrays["Wqkv"] = np.concatenate([arrays.pop("Wq"), arrays.pop("Wk"), arrays.pop("Wv")], axis=1)
        arrays["qkv_split"] = np.array([q_cols, kv_cols, kv_cols], np.int64)
        projections = [
            helper.make_node("MatMul", ["x", "Wqkv"], ["qkv"], name="qkv_proj"),
            helper.make_node("Split", ["qkv", "qkv_split"], ["q", "k", "v"], axis=-1, name="qkv_split"),
        ]
    else:
        projections = [helper.make_node("MatMul", ["x", f"W{c}"], [c], name=f"{c}_proj") for c in "qkv"]
    dequantize = []
    if quantized:  # int8, one scale per 4 rows and column: the scales are arguments too (128 values)
        for name in ("Wg", "Wu", "Wd"):
            w = arrays.pop(name)
            scale = np.abs(w).reshape(-1, QBLOCK, w.shape[1]).max(axis=1) / 127
            arrays[f"{name}_q"] = np.round(w / np.repeat(scale, QBLOCK, axis=0)).astype(np.int8)
            arrays[f"{name}_s"] = scale.astype(np.float32)
            dequantize.append(
                helper.make_node(
                    "DequantizeLinear", [f"{name}_q", f"{name}_s"], [name], axis=0, block_size=QBLOCK
                )
            )
    inits = [numpy_helper.from_array(array, name) for name, array in arrays.items()]
    nodes = [
        *projections,
        *dequantize,
        helper.make_node(
            "Attention",
            ["q", "k", "v"],
            ["a"],
            name="attn",
            q_num_heads=q_heads,
            kv_num_heads=kv_heads,
            is_causal=1,
        ),
        helper.make_node("MatMul", ["a", "Wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["x", "o"], ["h"]),
        helper.make_node("MatMul", ["h", "Wg"], ["g"], name="gate_proj"),
        helper.make_node("MatMul", ["h", "Wu"], ["u"], name="up_proj"),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["act"]),
        helper.make_node("Mul", ["act", "u"], ["m"]),
        helper.make_node("MatMul", ["m", "Wd"], ["d"], name="down_proj"),
        helper.make_node("Add", ["h", "d"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def plan_for(model: onnx.ModelProto, mesh: dict) -> tuple:
    graph = from_onnx(model)
    unmerge_projections(graph, 64)
    weights = {
        name: graph.initializers[name] for name in graph.initializers if graph.initializers[name].size > 64
    }
    return graph, plan_sharding(graph, weights, MeshSpec(**mesh))


# -- the plan --------------------------------------------------------------------------------------
def test_plan_splits_heads_and_ffn_channels() -> None:
    _graph, plan = plan_for(block_model(), {"shape": {"model": 2}})
    assert plan.split == {"Wq": 1, "Wk": 1, "Wv": 1, "Wo": 0, "Wg": 1, "Wu": 1, "Wd": 0}
    assert plan.roles["Wk"] == "k_proj" and plan.roles["Wd"] == "ffn_out" and plan.roles["Wg"] == "ffn_in"
    assert plan.spec("Wq", 2) == (None, "model") and plan.spec("Wo", 2) == ("model", None)
    assert plan.to_json()["devices"] == 2 and not plan.notes


def test_gqa_kv_heads_not_divisible_are_replicated() -> None:
    _graph, plan = plan_for(block_model(kv_heads=2), {"shape": {"model": 4}})
    assert "Wk" not in plan.split and "Wv" not in plan.split
    assert plan.split["Wq"] == 1 and plan.split["Wo"] == 0
    assert any("2 kv heads are not divisible by 4" in note for note in plan.notes)


def test_dequantized_weights_are_split_with_their_scales() -> None:
    _graph, plan = plan_for(block_model(quantized=True), {"shape": {"model": 2}, "shard": ["ffn"]})
    assert plan.split == {"Wg_q": 1, "Wg_s": 1, "Wu_q": 1, "Wu_s": 1, "Wd_q": 0, "Wd_s": 0}
    _graph, plan = plan_for(block_model(quantized=True), {"shape": {"model": 8}, "shard": ["ffn"]})
    assert plan.split["Wd_q"] == 0 and plan.split["Wd_s"] == 0  # 32 rows / 4 per block = 8 scale rows
    _graph, plan = plan_for(block_model(quantized=True, ffn=48), {"shape": {"model": 16}, "shard": ["ffn"]})
    assert plan.split["Wd_q"] == 0 and "Wd_s" not in plan.split  # 12 scale rows do not split 16 ways
    assert any("Wd_s (ffn_out): dim 0 of size 12 not divisible" in note for note in plan.notes)


def test_merged_projection_is_split_back_by_piece() -> None:
    graph, plan = plan_for(
        block_model(merged=True), {"shape": {"data": 1, "model": 2}, "shard": ["attention_heads"]}
    )
    assert not graph.find("Split") and "Wqkv" not in graph.initializers
    assert plan.split == {"Wqkv.part0": 1, "Wqkv.part1": 1, "Wqkv.part2": 1, "Wo": 0}  # no ffn: not asked
    assert graph.initializers["Wqkv.part1"].shape == (HIDDEN, 2 * HEAD)


def test_axis_that_does_not_divide_heads_is_a_located_error() -> None:
    with pytest.raises(
        TargetError, match=r"targets.tpu.mesh: axis 'model' has 3 devices.*4 query heads.*attn"
    ):
        plan_for(block_model(), {"shape": {"model": 3}})
    with pytest.raises(TargetError, match=r"axis 'tp' has 3 devices.*32 FFN channels.*down_proj"):
        plan_for(block_model(), {"shape": {"dp": 1, "tp": 3}, "axis": "tp", "shard": ["ffn"]})


def test_cli_reports_a_mesh_that_does_not_divide_the_heads(tmp_path: Path, capsys) -> None:
    result = run_cli(capsys, "compile", write_spec(tmp_path, "block", "{shape: {model: 3}}"))
    text = result.out + result.err
    assert result.code == 2, text
    assert "targets.tpu.mesh: axis 'model' has 3 devices" in text and "4 query heads" in text
    assert "hint:" in text and "Traceback" not in text
    assert not (tmp_path / "block-out").exists()


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        ({"shape": {}}, "names no axis"),
        ({"shape": {"model": 0}}, "at least 1"),
        ({"shape": {"model": 2}, "axis": "tp"}, "axis 'tp' is not a mesh axis"),
        ({"shape": {"a": 2, "b": 2}}, "name the tensor-parallel axis"),
        ({"shape": {"model": 2}, "shard": ["heads"]}, "attention_heads"),
    ],
)
def test_mesh_options_are_validated(mesh: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TpuTargetSpec(mesh=mesh)


# -- compiled and run ------------------------------------------------------------------------------
def write_spec(folder: Path, name: str, mesh: str | None, **model: bool) -> Path:
    onnx.save(block_model(**model), folder / f"{name}.onnx")
    tpu = f"{{buckets: {{batch: [2], seq: [{SEQ}]}}, platforms: [cpu]" + (
        f", mesh: {mesh}}}" if mesh else "}"
    )
    spec = folder / f"{name}.yaml"
    spec.write_text(
        f"model: {{path: {name}.onnx}}\ntargets:\n  tpu: {tpu}\nverify: {{dims: {{batch: 2, seq: {SEQ}}}}}\n"
        f"output: {{dir: {name}-out}}\n"
    )
    return spec


def compile_and_compare(folder: str) -> dict:
    """Run in a subprocess with 2 forced host devices: compile the block unsharded, sharded and merged+sharded
    (each verified against onnxruntime by the driver), then compare the runners' outputs."""
    import jax

    from llmc.driver import compile_spec
    from llmc.runtime.artifact import load_artifact
    from llmc.spec import load_spec

    root = Path(folder)
    results: dict = {"devices": len(jax.devices())}
    specs = {
        "plain": write_spec(root, "plain", None),
        "sharded": write_spec(root, "sharded", "{shape: {model: 2}}"),
        "merged": write_spec(root, "merged", "{shape: {model: 2}}", merged=True),
        "quantized": write_spec(root, "quantized", "{shape: {model: 2}}", quantized=True),
    }
    runners = {}
    for name, spec in specs.items():
        target = compile_spec(load_spec(spec)).targets[0]
        manifest = json.loads((target.artifact / "manifest.json").read_text())
        mlir = (target.artifact / manifest["buckets"][0]["mlir"]).read_text()
        runners[name] = load_artifact(target.artifact)[0]
        compiled = (
            runners[name]
            ._call(0)
            .lower(runners[name]._weights, {"x": np.zeros((2, SEQ, HIDDEN), np.float32)})
        )
        hlo = compiled.compile().as_text()
        results[name] = {
            "verified": bool(target.golden and target.golden.passed),
            "skipped": target.verify_skipped,
            "nr_devices": manifest["buckets"][0]["nr_devices"],
            "sharding": manifest.get("sharding"),
            "sdy_model": mlir.count('{"model"}'),
            "all_reduce": hlo.count("all-reduce("),
            "all_gather": hlo.count("all-gather("),
        }
    x = np.random.default_rng(1).standard_normal((2, SEQ, HIDDEN)).astype(np.float32)
    want = runners["plain"].run({"x": x})["y"]
    results["max_diff"] = {
        name: float(np.abs(runners[name].run({"x": x})["y"] - want).max()) for name in ("sharded", "merged")
    }
    return results


def run_with_devices(tmp_path: Path, count: int, call: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")
    code = (
        f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_tpu_sharding as t; "
        f"print('RESULT', json.dumps({call}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [row for row in proc.stdout.splitlines() if row.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def test_sharded_modules_equal_the_unsharded_on_a_2_device_cpu_mesh(tmp_path: Path) -> None:
    result = run_with_devices(tmp_path, 2, f"t.compile_and_compare({str(tmp_path)!r})")
    assert result["devices"] == 2
    plain, merged, quantized = result["plain"], result["merged"], result["quantized"]
    assert plain["nr_devices"] == 1 and plain["sharding"] is None and plain["sdy_model"] == 0
    for name in ("sharded", "merged", "quantized"):
        row = result[name]
        assert row["verified"] and row["skipped"] is None, name  # the driver ran it against onnxruntime
        assert row["nr_devices"] == 2 and row["sharding"]["devices"] == 2, name
        assert row["sdy_model"] >= 7, name  # the q, k, v, o, gate, up, down weight arguments carry shardings
        # Megatron's pattern: partial sums of o_proj and down_proj reduced, no weight gathered
        assert row["all_reduce"] >= 2 and row["all_gather"] == 0, (name, row)
    for name, diff in result["max_diff"].items():
        assert diff < 1e-5, (name, result["max_diff"])  # the sharded modules equal the unsharded one
    assert set(quantized["sharding"]["split"]) >= {"Wg_q", "Wg_s", "Wd_q", "Wd_s"}
    assert set(merged["sharding"]["split"]) >= {"Wqkv.part0", "Wqkv.part1", "Wqkv.part2", "Wo"}


def test_mesh_larger_than_the_devices_skips_verification(tmp_path: Path) -> None:
    result = run_with_devices(tmp_path, 1, f"t.compile_skipped({str(tmp_path)!r})")
    assert result["nr_devices"] == 2 and result["verification"]["status"] == "skipped"
    assert "xla_force_host_platform_device_count=2" in result["verification"]["reason"]
    assert "has 1" in result["load_error"]


def compile_skipped(folder: str) -> dict:
    """With one device: the sharded artifact is written, its verification says why it was skipped, and
    loading it names the device count it needs."""
    from llmc.driver import compile_spec
    from llmc.runtime.artifact import load_artifact
    from llmc.spec import load_spec

    target = compile_spec(load_spec(write_spec(Path(folder), "sharded", "{shape: {model: 2}}"))).targets[0]
    manifest = json.loads((target.artifact / "manifest.json").read_text())
    try:
        load_artifact(target.artifact)
        error = ""
    except TargetError as exc:
        error = exc.message
    return {
        "nr_devices": manifest["buckets"][0]["nr_devices"],
        "verification": manifest["verification"],
        "load_error": error,
    }


# -- a real exported decoder: tiny random LLaMA (4 q heads, 2 kv heads) through the fusion pipeline ------
LLAMA_PIPELINE = [
    "upgrade-opset",
    "fold-constants",
    "fuse-rms-norm",
    "fuse-silu-gate",
    "fuse-rotary",
    "fuse-attention",
    "merge-qkv",
    "eliminate-dead-code",
]


def llama_sharded_vs_onnxruntime(folder: str) -> dict:
    """Run with 2 devices: the fused tiny LLaMA (merged q/k/v and gate/up) sharded over {model: 2}, prefill and
    decode buckets against onnxruntime on the plain export."""
    import onnxruntime as ort
    from fixtures_frontends import tiny
    from test_frontends_hf import decoder_feeds

    from llmc.ir import load_model
    from llmc.pass_manager import PassContext, PassManager, Pipeline
    from llmc.targets.base import EmitContext
    from llmc.targets.tpu.target import TpuTarget

    path = tiny.tiny_import("llama").info["onnx_path"]
    graph = load_model(path)
    PassManager(Pipeline.parse(LLAMA_PIPELINE), ctx=PassContext(target=None)).run(graph)
    buckets = [{"batch": 2, "seq": 5, "past": 0, "total": 5}, {"batch": 2, "seq": 1, "past": 5, "total": 6}]
    target = TpuTarget(TpuTargetSpec(combinations=buckets, platforms=["cpu"], mesh={"shape": {"model": 2}}))
    manifest = target.emit(graph, Path(folder) / "llama", EmitContext())
    runner = target.load(Path(folder) / "llama")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    diffs = {}
    for bucket in buckets:
        feeds = decoder_feeds("llama", bucket["batch"], bucket["seq"], bucket["past"])
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        got = runner.run(feeds)
        diffs[f"seq{bucket['seq']}"] = max(float(np.abs(got[n] - v).max()) for n, v in want.items())
    args = {sig.name: feeds[sig.name] for sig in runner.inputs}
    hlo = runner._call(len(buckets) - 1).lower(runner._weights, args).compile().as_text()
    return {
        "diffs": diffs,
        "collectives": {op: hlo.count(f"{op}(") for op in ("all-reduce", "all-gather", "all-to-all")},
        "merged_ops": sum(1 for n in graph.nodes() if n.op_type == "Split"),
        "nr_devices": [b["nr_devices"] for b in manifest["buckets"]],
        "roles": manifest["sharding"]["roles"],
        "notes": manifest["sharding"]["notes"],
    }


@pytest.mark.slow
def test_tiny_llama_sharded_matches_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("fixtures_frontends.tiny")
    result = run_with_devices(tmp_path, 2, f"t.llama_sharded_vs_onnxruntime({str(tmp_path)!r})")
    assert result["merged_ops"] >= 4, result  # merge-qkv and fuse-silu-gate merged the projections
    assert result["nr_devices"] == [2, 2]
    layers = result["roles"]["o_proj"]
    assert result["roles"] == {
        "q_proj": layers, "k_proj": layers, "v_proj": layers, "o_proj": layers, "ffn_in": 2 * layers,
        "ffn_out": layers,
    }, result  # fmt: skip
    assert not result["notes"]
    # one all-reduce per attention block and per FFN (the decode module), nothing gathered or exchanged
    assert result["collectives"] == {"all-reduce": 2 * layers, "all-gather": 0, "all-to-all": 0}, result
    for bucket, diff in result["diffs"].items():
        assert diff < 1e-4, (bucket, result["diffs"])
