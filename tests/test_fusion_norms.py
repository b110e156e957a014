"""fuse-rms-norm and fuse-layer-norm: every spelling of the decomposed norms on tiny hand-built graphs
(IR-text goldens under tests/expected/fusion/, numerical equivalence in onnxruntime), the near misses that
must stay as they are with the reason the pass gives, and the fusion pipeline on real transformers exports
(tiny random LLaMA with GQA, GPT-2, BERT; dynamo, and TorchScript at opset 16 for decomposed norms)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, apply_passes, assert_same_outputs, check_golden, ops, seeded_feeds
from onnx import TensorProto

from llmc.ir import Graph, from_onnx, load_model, to_onnx
from llmc.pass_manager import get_pass_class, make_pass, run_pipeline

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
SHAPE = [2, 3, 8]
TOL = {"atol": 1e-5, "rtol": 1e-4}


# -- helpers (shared with the other fusion test modules) -----------------------------------------------------
def record_of(report: Any, name: str) -> Any:
    records = [r for r in report.records if r.name == name]
    assert records, f"{name} did not run"
    return records[-1]


def reasons(report: Any, name: str) -> list[str]:
    return [m["reason"] for m in record_of(report, name).details.get("rejected", [])]


def fuse(model: onnx.ModelProto, passes: list[Any], **tolerances: float) -> tuple[Graph, Any]:
    """Run ``passes`` on the model and check the numbers are unchanged (on seeded inputs)."""
    return apply_passes(model, passes, **{**TOL, **tolerances})


def unfused(model: onnx.ModelProto, passes: list[Any]) -> tuple[Graph, Any]:
    """Run ``passes`` and check the graph kept every node it had."""
    graph, report = fuse(model, passes)
    assert Counter(ops(graph)) == Counter(ops(from_onnx(model))), ops(graph)
    return graph, report


def reduce_mean(b: GraphBuilder, x: str, axes: list[int] | None = None, *, keepdims: int = 1) -> str:
    """ReduceMean in the form of the builder's opset (axes as an input from 18, an attribute before)."""
    axes = [-1] if axes is None else axes
    if b.opset >= 18:
        return b.node(
            "ReduceMean", [x, b.initializer(b.fresh(), np.array(axes, np.int64))], keepdims=keepdims
        )
    return b.node("ReduceMean", [x], axes=axes, keepdims=keepdims)


def scalar(b: GraphBuilder, value: float, dtype: Any = np.float32) -> str:
    return b.initializer(b.fresh(), np.array(value, dtype))


def inverse_root(b: GraphBuilder, x: str, var_eps: str, form: str) -> str:
    """``x / sqrt(var_eps)`` in one of the four spellings exporters use."""
    if form == "reciprocal":
        return b.node("Mul", [x, b.node("Reciprocal", [b.node("Sqrt", [var_eps])])])
    if form == "div":
        return b.node("Div", [x, b.node("Sqrt", [var_eps])])
    if form == "div-one":
        return b.node("Mul", [b.node("Div", [scalar(b, 1.0), b.node("Sqrt", [var_eps])]), x])
    assert form == "pow"
    return b.node("Mul", [x, b.node("Pow", [var_eps, scalar(b, -0.5)])])


def square(b: GraphBuilder, x: str, form: str) -> str:
    return b.node("Pow", [x, scalar(b, 2.0)]) if form == "pow" else b.node("Mul", [x, x])


RNG = np.random.default_rng(0)
WEIGHT = (1 + 0.1 * RNG.standard_normal(8)).astype(np.float32)
BIAS = (0.1 * RNG.standard_normal(8)).astype(np.float32)


# -- fuse-rms-norm ---------------------------------------------------------------------------------------------
def rms_model(
    *,
    opset: int = 23,
    form: str = "reciprocal",
    sq: str = "pow",
    weight: bool = True,
    eps: float | None = 1e-6,
    axes: list[int] | None = None,
    keepdims: int = 1,
    half: bool = False,
    extra_use: bool = False,
    shape: list[int] = SHAPE,
) -> onnx.ModelProto:
    """LlamaRMSNorm as dynamo exports it: ``Mul(w, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))))``;
    ``half``: float16 input with the upcast and the cast back around it."""
    b = GraphBuilder(opset=opset)
    elem = FLOAT16 if half else FLOAT
    x = b.input("x", elem, shape)
    h = b.node("Cast", [x], to=FLOAT) if half else x
    mean = reduce_mean(b, square(b, h, sq), axes, keepdims=keepdims)
    eps_value = scalar(b, eps) if eps is not None else b.input("eps", FLOAT, [])
    normed = inverse_root(b, h, b.node("Add", [mean, eps_value]), form)
    if half:
        normed = b.node("Cast", [normed], to=FLOAT16)
    if weight:
        w = WEIGHT.astype(np.float16) if half else WEIGHT
        normed = b.node("Mul", [b.initializer("norm.weight", w), normed], name="scale")
    b.node("Identity", [normed], ["y"])
    b.output("y", elem, shape)
    if extra_use:
        b.node("Identity", [mean], ["mean_out"])
        b.output("mean_out", FLOAT, [2, 3, 1])
    return b.model()


@pytest.mark.parametrize("name", ["fuse-rms-norm", "fuse-layer-norm"])
def test_norm_passes_have_the_one_shape(name: str) -> None:
    cls = get_pass_class(name)
    assert cls.name == name and cls.summary().startswith("Rewrites ")
    assert make_pass(name).options.model_dump() == {}


def test_rms_norm_llama_form_fuses(request: pytest.FixtureRequest) -> None:
    graph, report = fuse(rms_model(), ["fuse-rms-norm", "eliminate-dead-code"])
    assert record_of(report, "fuse-rms-norm").stats == {"fused": 1, "rule:rms-norm": 1}
    assert ops(graph) == ["RMSNormalization", "Identity"]
    node = graph.nodes()[0]
    assert node.inputs == ("x", "norm.weight")
    assert (node.attr("axis"), node.attr("stash_type")) == (-1, 1)
    assert node.attr("epsilon") == pytest.approx(1e-6)
    check_golden(request, graph, "fusion/rms_norm.onnxtxt")


@pytest.mark.parametrize("form", ["reciprocal", "div", "div-one", "pow"])
@pytest.mark.parametrize("sq", ["pow", "mul"])
def test_rms_norm_spellings_fuse(form: str, sq: str) -> None:
    graph, _ = fuse(rms_model(form=form, sq=sq), ["fuse-rms-norm"])
    assert ops(graph) == ["RMSNormalization", "Identity"]


def test_rms_norm_without_weight_gets_a_shared_unit_scale(request: pytest.FixtureRequest) -> None:
    b = GraphBuilder(opset=23)
    b.input("x", FLOAT, SHAPE)
    outs = []
    for _ in range(2):  # two weightless norms share one all-ones scale
        mean = reduce_mean(b, square(b, "x", "pow"))
        outs.append(inverse_root(b, "x", b.node("Add", [mean, scalar(b, 1e-5)]), "div"))
    b.node("Add", outs, ["y"])
    b.output("y", FLOAT, SHAPE)
    graph, _ = fuse(b.model(), ["fuse-rms-norm", "eliminate-dead-code"])
    assert ops(graph) == ["RMSNormalization", "RMSNormalization", "Add"]
    scales = {n.inputs[1] for n in graph.nodes()[:2]}
    assert scales == {"llmc.ones.float32.8"}
    check_golden(request, graph, "fusion/rms_norm_unit_scale.onnxtxt")


def test_rms_norm_absorbs_the_float32_upcast_of_half_inputs(request: pytest.FixtureRequest) -> None:
    """LlamaRMSNorm on float16: x.to(float32) ... weight * x.to(float16) is RMSNormalization(x16, w16) with
    stash_type float32, casts included."""
    graph, _ = fuse(rms_model(half=True), ["fuse-rms-norm", "eliminate-dead-code"], atol=2e-3, rtol=2e-3)
    assert ops(graph) == ["RMSNormalization", "Identity"]
    assert graph.nodes()[0].inputs == ("x", "norm.weight")
    check_golden(request, graph, "fusion/rms_norm_fp16.onnxtxt")


def test_rms_norm_over_two_trailing_axes() -> None:
    graph, _ = fuse(rms_model(axes=[1, 2], weight=False), ["fuse-rms-norm"])
    (norm,) = graph.find("RMSNormalization")
    assert norm.attr("axis") == -2
    assert graph.constant(norm.inputs[1]).shape == (3, 8)


def test_rms_norm_opset_20_after_upgrade_opset() -> None:
    model = rms_model(opset=20)
    graph, report = unfused(model, ["fuse-rms-norm"])
    assert reasons(report, "fuse-rms-norm") == ["model opset 20 < 23: put upgrade-opset before this pass"]
    graph, report = fuse(model, ["upgrade-opset", "fuse-rms-norm"])
    assert "RMSNormalization" in ops(graph) and graph.opset_imports[""] == 23


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"eps": None}, "epsilon is not a constant scalar"),
        ({"axes": [1]}, "normalized axis is not the last one (axes [1] of a rank-3 tensor)"),
        ({"axes": [0, 2]}, "normalized axes are not the last ones (axes [0, 2] of a rank-3 tensor)"),
        ({"keepdims": 0, "shape": [8, 8]}, "ReduceMean drops the reduced axes (keepdims=0)"),
        ({"extra_use": True}, "is also used by"),
    ],
)
def test_rms_norm_near_misses_say_why(kwargs: dict[str, Any], reason: str) -> None:
    _, report = unfused(rms_model(**kwargs), ["fuse-rms-norm"])
    (got,) = reasons(report, "fuse-rms-norm")
    assert reason in got


def test_rms_norm_wrong_exponent_is_rejected() -> None:
    b = GraphBuilder(opset=23)
    b.input("x", FLOAT, SHAPE)
    mean = reduce_mean(b, b.node("Pow", ["x", scalar(b, 3.0)]))
    b.node("Div", ["x", b.node("Sqrt", [b.node("Add", [mean, scalar(b, 1e-6)])])], ["y"])
    b.output("y", FLOAT, SHAPE)
    _, report = unfused(b.model(), ["fuse-rms-norm"])
    assert reasons(report, "fuse-rms-norm") == ["the exponent of the square is 3, expected 2"]


def test_unrelated_muls_are_not_reported() -> None:
    b = GraphBuilder(opset=23)
    b.input("x", FLOAT, SHAPE)
    b.node("Mul", ["x", b.node("Reciprocal", [b.node("Sqrt", [b.node("Abs", ["x"])])])], ["y"])
    b.output("y", FLOAT, SHAPE)
    _, report = unfused(b.model(), ["fuse-rms-norm"])
    assert reasons(report, "fuse-rms-norm") == []


# -- fuse-layer-norm -------------------------------------------------------------------------------------------
def ln_model(
    *,
    opset: int = 17,
    form: str = "div",
    sq: str = "pow",
    gamma: bool = True,
    beta: bool = True,
    eps: float | None = 1e-5,
    var_axes: list[int] | None = None,
    half: bool = False,
) -> onnx.ModelProto:
    b = GraphBuilder(opset=opset)
    elem = FLOAT16 if half else FLOAT
    x = b.input("x", elem, SHAPE)
    h = b.node("Cast", [x], to=FLOAT) if half else x
    d = b.node("Sub", [h, reduce_mean(b, h)], name="center")
    var = reduce_mean(b, square(b, d, sq), var_axes)
    eps_value = scalar(b, eps) if eps is not None else b.input("eps", FLOAT, [])
    y = inverse_root(b, d, b.node("Add", [var, eps_value]), form)
    if half:
        y = b.node("Cast", [y], to=FLOAT16)
    cast = (lambda a: a.astype(np.float16)) if half else (lambda a: a)
    if gamma:
        y = b.node("Mul", [y, b.initializer("ln.weight", cast(WEIGHT))])
    if beta:
        y = b.node("Add", [b.initializer("ln.bias", cast(BIAS)), y])
    b.node("Identity", [y], ["y"])
    b.output("y", elem, SHAPE)
    return b.model()


def test_layer_norm_fuses(request: pytest.FixtureRequest) -> None:
    graph, report = fuse(ln_model(), ["fuse-layer-norm", "eliminate-dead-code"])
    assert record_of(report, "fuse-layer-norm").stats == {"fused": 1, "rule:layer-norm": 1}
    assert ops(graph) == ["LayerNormalization", "Identity"]
    node = graph.nodes()[0]
    assert node.inputs == ("x", "ln.weight", "ln.bias")
    assert node.attr("axis") == -1 and node.attr("epsilon") == pytest.approx(1e-5)
    check_golden(request, graph, "fusion/layer_norm.onnxtxt")


@pytest.mark.parametrize("form", ["reciprocal", "div", "div-one", "pow"])
@pytest.mark.parametrize("sq", ["pow", "mul"])
def test_layer_norm_spellings_fuse(form: str, sq: str) -> None:
    graph, _ = fuse(ln_model(form=form, sq=sq), ["fuse-layer-norm"])
    assert ops(graph) == ["LayerNormalization", "Identity"]


@pytest.mark.parametrize(("gamma", "beta"), [(False, False), (True, False), (False, True)])
def test_layer_norm_affine_parts_are_optional(gamma: bool, beta: bool) -> None:
    graph, _ = fuse(ln_model(gamma=gamma, beta=beta), ["fuse-layer-norm"])
    assert ops(graph) == ["LayerNormalization", "Identity"]
    (node,) = graph.find("LayerNormalization")
    assert node.inputs[1] == ("ln.weight" if gamma else "llmc.ones.float32.8")
    assert node.input(2) == ("ln.bias" if beta else "")


def test_layer_norm_absorbs_the_float32_upcast_of_half_inputs() -> None:
    graph, _ = fuse(ln_model(half=True), ["fuse-layer-norm"], atol=2e-3, rtol=2e-3)
    assert ops(graph) == ["LayerNormalization", "Identity"]
    assert graph.nodes()[0].inputs == ("x", "ln.weight", "ln.bias")


def test_layer_norm_is_not_taken_for_an_rms_norm_of_the_centred_input() -> None:
    """RMS(x - mean(x)) is a layer norm: fuse-rms-norm leaves it (silently) to fuse-layer-norm."""
    model = ln_model()
    graph, report = unfused(model, ["fuse-rms-norm"])
    assert reasons(report, "fuse-rms-norm") == []
    graph, _ = fuse(model, ["fuse-rms-norm", "fuse-layer-norm"])
    assert ops(graph) == ["LayerNormalization", "Identity"]


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"opset": 16}, "model opset 16 < 17: put upgrade-opset before this pass"),
        ({"eps": None}, "epsilon is not a constant scalar"),
        ({"var_axes": [-2, -1]}, "the mean and the variance reduce different axes ([-1] vs [-2, -1])"),
    ],
)
def test_layer_norm_near_misses_say_why(kwargs: dict[str, Any], reason: str) -> None:
    _, report = unfused(ln_model(**kwargs), ["fuse-layer-norm"])
    assert reasons(report, "fuse-layer-norm") == [reason]


def test_layer_norm_of_another_value_is_rejected() -> None:
    b = GraphBuilder(opset=17)
    b.input("x", FLOAT, SHAPE)
    b.input("z", FLOAT, SHAPE)
    d = b.node("Sub", ["x", reduce_mean(b, "x")])
    var = reduce_mean(b, b.node("Pow", ["z", scalar(b, 2.0)]))  # the variance of another tensor
    b.node("Div", [d, b.node("Sqrt", [b.node("Add", [var, scalar(b, 1e-5)])])], ["y"])
    b.output("y", FLOAT, SHAPE)
    _, report = unfused(b.model(), ["fuse-layer-norm"])
    (reason,) = reasons(report, "fuse-layer-norm")
    assert reason.startswith("the variance is not taken of x - mean")


# -- the fusion pipeline on real exports -------------------------------------------------------------------------
PIPELINE = [
    "upgrade-opset",
    "fold-weight-transposes",
    "fuse-rms-norm",
    "fuse-layer-norm",
    "fuse-gelu",
    "fuse-silu-gate",
    "fuse-matmul-bias",
    "eliminate-dead-code",
]
DIMS = {"batch": 2, "seq": 3, "past": 4, "total": 7}


def _randomize(model: Any) -> Any:
    """Norm weights and biases start as ones and zeros: jitter them so the numbers test something."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _make_model(name: str, folder: Path) -> str:
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "llama":
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        )
        model = LlamaForCausalLM(config)
    elif name == "gpt2":
        config = GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=2
        )
        model = GPT2LMHeadModel(config)
    else:
        config = BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=128,
            max_position_embeddings=64,
        )
        model = BertModel(config)
    _randomize(model.eval()).save_pretrained(folder)
    return "feature-extraction" if name == "bert" else "text-generation"


def _export_torchscript_16(folder: Path, path: Path) -> None:
    """BERT through the TorchScript exporter at opset 16: decomposed LayerNorm and erf GELU, ReduceMean with
    an axes attribute (upgrade-opset must rebuild those nodes)."""
    import torch
    from transformers import BertModel

    class Encoder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    model = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    ids, mask = torch.zeros(2, 5, dtype=torch.int64), torch.ones(2, 5, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder(model),
            (ids, mask),
            str(path),
            dynamo=False,
            opset_version=16,
            input_names=list(axes),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
        )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """name -> path of its ONNX export, each made once per module on first use."""
    pytest.importorskip("transformers")
    paths: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in paths:
            root = tmp_path_factory.mktemp(name)
            base = "bert" if name == "bert-ts16" else name
            folder = root / "hf"
            task = _make_model(base, folder)
            if name == "bert-ts16":
                paths[name] = root / "model.onnx"
                _export_torchscript_16(folder, paths[name])
            else:
                from llmc.frontends.hf import import_hf

                imported = import_hf(folder, task=task, work_dir=root / "export")
                paths[name] = Path(imported.info["onnx_path"])
        return paths[name]

    return get


def run_real(path: Path, pipeline: list[Any]) -> tuple[Graph, Any, Counter]:
    """The pipeline on the model at ``path``; outputs must stay equal (atol 1e-5) on seeded inputs."""
    graph = load_model(path)
    before = to_onnx(graph)
    report = run_pipeline(graph, pipeline)
    feeds = seeded_feeds(before, dims=DIMS, int_range=(0, 64))
    for name in ("attention_mask",):
        if name in feeds:
            feeds[name] = np.ones_like(feeds[name])
    if "token_type_ids" in feeds:
        feeds["token_type_ids"] = np.zeros_like(feeds["token_type_ids"])
    assert_same_outputs(before, graph, feeds, **TOL)
    return graph, report, Counter(ops(graph))


@pytest.mark.slow
def test_pipeline_on_llama_with_gqa(exported) -> None:
    pipeline = [{"upgrade-opset": {"version": 24}}, *PIPELINE[1:]]
    graph, report, counts = run_real(exported("llama"), pipeline)
    assert counts["RMSNormalization"] == 5  # 2 per layer + the final norm
    assert counts["Swish"] == 2 and counts["Split"] == 2 and counts["Sigmoid"] == 0
    assert record_of(report, "fuse-silu-gate").stats == {"fused": 4, "rule:gate-up-merge": 2, "rule:silu": 2}
    assert not [
        n for n in graph.find("Transpose") if graph.is_initializer(n.inputs[0])
    ]  # every Linear folded
    names = set(graph.initializers)
    assert "model.layers.0.mlp.gate_up_proj.weight.T" in names
    assert "model.layers.1.self_attn.q_proj.weight.T" in names
    assert "model.layers.0.mlp.gate_proj.weight" not in names  # folded, merged, then dead
    for name in PIPELINE[2:-1]:
        assert reasons(report, name) == [], name


@pytest.mark.slow
def test_pipeline_on_llama_at_opset_23_keeps_sigmoid_but_merges_the_gate(exported) -> None:
    graph, report, counts = run_real(exported("llama"), PIPELINE)
    assert counts["RMSNormalization"] == 5 and counts["Split"] == 2 and counts["Swish"] == 0
    assert record_of(report, "fuse-silu-gate").stats["rule:gate-up-merge"] == 2
    assert (
        reasons(report, "fuse-silu-gate")
        == ["model opset 23 < 24: put upgrade-opset {version: 24} before this pass"] * 2
    )


@pytest.mark.slow
def test_pipeline_on_gpt2(exported) -> None:
    graph, report, counts = run_real(exported("gpt2"), PIPELINE)
    assert record_of(report, "fuse-gelu").stats == {"fused": 2, "rule:gelu-tanh": 2}
    assert [n.attr("approximate") for n in graph.find("Gelu")] == ["tanh", "tanh"]
    assert (
        counts["Tanh"] == 0 and counts["LayerNormalization"] == 5
    )  # dynamo writes LayerNormalization itself


@pytest.mark.slow
def test_pipeline_on_bert(exported) -> None:
    graph, report, counts = run_real(exported("bert"), PIPELINE)
    assert counts["Gelu"] == 2 and counts["LayerNormalization"] == 5  # already standard ops
    assert record_of(report, "fold-weight-transposes").stats["folded"] == 12
    assert sum(record_of(report, p).stats["fused"] for p in PIPELINE[2:-1]) == 0
    rejected = reasons(report, "fuse-matmul-bias")
    assert len(rejected) == 12 and set(rejected) == {"input is rank 3: Gemm is 2-D only"}


@pytest.mark.slow
def test_pipeline_on_bert_torchscript_opset_16(exported) -> None:
    graph, report, counts = run_real(exported("bert-ts16"), PIPELINE)
    upgrade = record_of(report, "upgrade-opset").stats
    assert upgrade["from"] == 16 and upgrade["to"] == 23 and upgrade["nodes_rebuilt"] > 0
    assert record_of(report, "fuse-layer-norm").stats == {"fused": 5, "rule:layer-norm": 5}
    assert record_of(report, "fuse-gelu").stats == {"fused": 2, "rule:gelu-erf": 2}
    assert counts["LayerNormalization"] == 5 and counts["Erf"] == 0 and counts["Sqrt"] == 0
    assert reasons(report, "fuse-rms-norm") == []  # the centred norms are layer norms, not near misses
