"""fuse-gelu, fuse-silu-gate and fuse-matmul-bias on tiny hand-built graphs: every association order of the
GELU formulas, SiLU into Swish, the SwiGLU/GeGLU gate/up merge, MatMul+Add into Gemm; IR-text goldens under
tests/expected/fusion/, numerical equivalence in onnxruntime, and the near misses with their reasons.
(The real-model runs of these passes are in test_fusion_norms.py, which exports the models once.)"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import pytest
from graphs import GraphBuilder, check_golden, ops
from onnx import TensorProto
from test_fusion_norms import fuse, reasons, record_of, scalar, unfused

from llmc.pass_manager import get_pass_class, make_pass

FLOAT = TensorProto.FLOAT
SHAPE = [2, 3, 8]
RNG = np.random.default_rng(1)


@pytest.mark.parametrize("name", ["fuse-gelu", "fuse-silu-gate", "fuse-matmul-bias"])
def test_activation_passes_have_the_one_shape(name: str) -> None:
    cls = get_pass_class(name)
    assert cls.name == name and cls.summary().startswith("Rewrites ")
    assert cls().options.model_dump() == cls.Options().model_dump()


# -- fuse-gelu -------------------------------------------------------------------------------------------------
def half_of(b: GraphBuilder, value: str, how: str, half: float = 0.5) -> str:
    """``value * 0.5`` or ``value / 2``."""
    if how == "mul":
        return b.node("Mul", [scalar(b, half), value])
    return b.node("Div", [value, scalar(b, 1 / half)])


def erf_term(b: GraphBuilder, x: str, scale: str, c: float | None = None) -> str:
    """``1 + Erf(x / sqrt(2))`` (``scale`` "div") or ``1 + Erf(x * 0.7071...)`` ("mul")."""
    if scale == "div":
        arg = b.node("Div", [x, scalar(b, c or math.sqrt(2))])
    else:
        arg = b.node("Mul", [x, scalar(b, c or 1 / math.sqrt(2))])
    return b.node("Add", [b.node("Erf", [arg]), scalar(b, 1.0)])


def tanh_term(b: GraphBuilder, x: str, cube: str, k: float = 0.044715) -> str:
    """``1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))``, ``x^3`` as Pow or x*x*x (GPT-2's gelu_new)."""
    x3 = b.node("Pow", [x, scalar(b, 3.0)]) if cube == "pow" else b.node("Mul", [b.node("Mul", [x, x]), x])
    inner = b.node("Add", [x, b.node("Mul", [x3, scalar(b, k)])])
    return b.node(
        "Add", [b.node("Tanh", [b.node("Mul", [inner, scalar(b, math.sqrt(2 / math.pi))])]), scalar(b, 1.0)]
    )


def gelu_model(
    *,
    kind: str = "erf",
    where: str = "x-first",
    how: str = "mul",
    scale: str = "div",
    cube: str = "pow",
    opset: int = 20,
    half: float = 0.5,
    c: float | None = None,
    k: float = 0.044715,
) -> onnx.ModelProto:
    """``0.5 * x * term`` with the half placed ``where``: "x-first" (0.5 x) A, "term-first" x (0.5 A),
    "last" (x A) 0.5."""
    b = GraphBuilder(opset=opset)
    x = b.node("Relu", [b.input("x", FLOAT, SHAPE)])  # a producer, as in a real MLP
    term = erf_term(b, x, scale, c) if kind == "erf" else tanh_term(b, x, cube, k)
    if where == "x-first":
        y = b.node("Mul", [half_of(b, x, how, half), term])
    elif where == "term-first":
        y = b.node("Mul", [x, half_of(b, term, how, half)])
    else:
        y = half_of(b, b.node("Mul", [term, x]), how, half)
    b.node("Identity", [y], ["y"])
    b.output("y", FLOAT, SHAPE)
    return b.model()


def test_gelu_erf_fuses(request: pytest.FixtureRequest) -> None:
    graph, report = fuse(gelu_model(), ["fuse-gelu", "eliminate-dead-code"])
    assert record_of(report, "fuse-gelu").stats == {"fused": 1, "rule:gelu-erf": 1}
    assert ops(graph) == ["Relu", "Gelu", "Identity"]
    assert graph.find("Gelu")[0].attr("approximate") == "none"
    check_golden(request, graph, "fusion/gelu_erf.onnxtxt")


@pytest.mark.parametrize("where", ["x-first", "term-first", "last"])
@pytest.mark.parametrize("how", ["mul", "div"])
@pytest.mark.parametrize("scale", ["div", "mul"])
def test_gelu_erf_association_orders_fuse(where: str, how: str, scale: str) -> None:
    graph, _ = fuse(gelu_model(where=where, how=how, scale=scale), ["fuse-gelu"])
    assert ops(graph) == ["Relu", "Gelu", "Identity"]


def test_gelu_tanh_fuses(request: pytest.FixtureRequest) -> None:
    graph, report = fuse(gelu_model(kind="tanh"), ["fuse-gelu", "eliminate-dead-code"])
    assert record_of(report, "fuse-gelu").stats == {"fused": 1, "rule:gelu-tanh": 1}
    assert graph.find("Gelu")[0].attr("approximate") == "tanh"
    check_golden(request, graph, "fusion/gelu_tanh.onnxtxt")


@pytest.mark.parametrize("where", ["x-first", "term-first", "last"])
@pytest.mark.parametrize("cube", ["pow", "mul"])
def test_gelu_tanh_forms_fuse(where: str, cube: str) -> None:
    graph, _ = fuse(gelu_model(kind="tanh", where=where, cube=cube), ["fuse-gelu"])
    assert ops(graph) == ["Relu", "Gelu", "Identity"]


def test_gelu_constants_are_compared_with_a_tolerance() -> None:
    graph, _ = fuse(gelu_model(c=1.4142), ["fuse-gelu"], atol=1e-4)  # 4 decimals pass for sqrt(2)
    assert "Gelu" in ops(graph)
    _, report = unfused(gelu_model(c=1.41), ["fuse-gelu"])
    assert reasons(report, "fuse-gelu") == ["the divisor of x in erf is 1.41, expected 1.414214"]
    graph, _ = fuse(gelu_model(c=1.41), [{"fuse-gelu": {"tolerance": 0.01}}], atol=5e-3)
    assert "Gelu" in ops(graph)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"opset": 18}, "model opset 18 < 20: put upgrade-opset before this pass"),
        ({"half": 0.6}, "the factor 0.5 is 0.6, expected 0.5"),
        ({"half": 0.6, "how": "div"}, "the divisor 2 is 1.666667, expected 2"),
        ({"kind": "tanh", "k": 0.05}, "the cubic coefficient is 0.05, expected 0.044715"),
        ({"scale": "mul", "c": 0.8}, "the factor of x in erf is 0.8, expected 0.7071068"),
    ],
)
def test_gelu_near_misses_say_why(kwargs: dict[str, Any], reason: str) -> None:
    _, report = unfused(gelu_model(**kwargs), ["fuse-gelu"])
    assert reasons(report, "fuse-gelu") == [reason]


def test_a_tanh_gelu_is_no_near_miss_of_the_erf_rule() -> None:
    graph, report = fuse(gelu_model(kind="tanh"), ["fuse-gelu"])
    assert reasons(report, "fuse-gelu") == []


# -- fuse-silu-gate: SiLU --------------------------------------------------------------------------------------
def silu_model(*, opset: int = 24, alpha: float | None = None, other: bool = False) -> onnx.ModelProto:
    b = GraphBuilder(opset=opset)
    x = b.node("Relu", [b.input("x", FLOAT, SHAPE)])
    z = b.input("z", FLOAT, SHAPE) if other else x
    arg = z if alpha is None else b.node("Mul", [z, scalar(b, alpha)])
    b.node("Mul", [b.node("Sigmoid", [arg]), x], ["y"])
    b.output("y", FLOAT, SHAPE)
    return b.model()


def test_silu_becomes_swish(request: pytest.FixtureRequest) -> None:
    graph, report = fuse(silu_model(), ["fuse-silu-gate"])
    assert record_of(report, "fuse-silu-gate").stats == {"fused": 1, "rule:silu": 1}
    assert ops(graph) == ["Relu", "Swish"]
    assert graph.outputs == ["y"]
    check_golden(request, graph, "fusion/silu.onnxtxt")


def test_scaled_silu_becomes_swish_with_alpha() -> None:
    graph, _ = fuse(silu_model(alpha=1.702), ["fuse-silu-gate", "eliminate-dead-code"])
    assert ops(graph) == ["Relu", "Swish"]
    assert graph.find("Swish")[0].attr("alpha") == pytest.approx(1.702)


def test_silu_below_opset_24_says_so() -> None:
    _, report = unfused(silu_model(opset=23), ["fuse-silu-gate"])
    assert reasons(report, "fuse-silu-gate") == [
        "model opset 23 < 24: put upgrade-opset {version: 24} before this pass"
    ]
    graph, _ = fuse(silu_model(opset=21), [{"upgrade-opset": {"version": 24}}, "fuse-silu-gate"])
    assert ops(graph) == ["Relu", "Swish"]


def test_sigmoid_of_another_value_is_not_silu() -> None:
    _, report = unfused(silu_model(other=True), ["fuse-silu-gate"])
    (reason,) = reasons(report, "fuse-silu-gate")
    assert "must be the same value in both places" in reason


# -- fuse-silu-gate: gated MLPs ---------------------------------------------------------------------------------
K, N = 8, 16


def gated_model(
    *,
    opset: int = 24,
    act: str = "silu",
    up_shape: tuple[int, int] = (K, N),
    transposed: bool = False,
    shared_gate: bool = False,
    other_up_input: bool = False,
) -> onnx.ModelProto:
    """LLaMA's MLP: down(act(x @ gate) * (x @ up)) with weights named as transformers names them."""
    b = GraphBuilder(opset=opset)
    x = b.input("x", FLOAT, [2, 3, K])
    b.output("y", FLOAT, [2, 3, K])
    weights = {"gate": (K, N), "up": up_shape, "down": (N, K)}
    w = {}
    for name, shape in weights.items():
        if (
            transposed
        ):  # dynamo's MatMul(x, Transpose(W)), W as torch stores it, before fold-weight-transposes
            stored = b.initializer(
                f"mlp.{name}_proj.weight", RNG.standard_normal(shape[::-1]).astype(np.float32)
            )
            w[name] = b.node("Transpose", [stored], perm=[1, 0])
        else:
            w[name] = b.initializer(f"mlp.{name}_proj.weight", RNG.standard_normal(shape).astype(np.float32))
    wg, wu, wd = w["gate"], w["up"], w["down"]
    gate = b.node("MatMul", [x, wg], name="gate_proj")
    up_in = b.node("Relu", [x]) if other_up_input else x
    up = b.node("MatMul", [up_in, wu], name="up_proj")
    if act == "silu":
        activated = b.node("Mul", [gate, b.node("Sigmoid", [gate])], name="act")
    elif act == "swish":
        activated = b.node("Swish", [gate], name="act")
    else:
        activated = b.node("Gelu", [gate], name="act", approximate="tanh")
    hidden = b.node("Mul", [activated, up], name="gate_mul")
    out = b.node("MatMul", [hidden, wd], name="down_proj")
    if shared_gate:  # another projection reads the gate weight too
        out = b.node("Add", [out, b.node("MatMul", [b.node("MatMul", [x, wg]), wd])])
    b.node("Identity", [out], ["y"])
    return b.model()


def test_swiglu_gate_and_up_merge(request: pytest.FixtureRequest) -> None:
    graph, report = fuse(gated_model(), ["fuse-silu-gate", "eliminate-dead-code"])
    assert record_of(report, "fuse-silu-gate").stats == {"fused": 2, "rule:gate-up-merge": 1, "rule:silu": 1}
    assert ops(graph) == ["MatMul", "Split", "Swish", "Mul", "MatMul", "Identity"]
    merged = graph.nodes()[0].inputs[1]
    assert merged == "mlp.gate_up_proj.weight"
    assert graph.initializers[merged].shape == (K, 2 * N)
    assert set(graph.initializers) == {merged, "mlp.down_proj.weight"}  # the originals are dead and gone
    assert graph.shape(graph.nodes()[0].outputs[0]) == (2, 3, 2 * N)
    check_golden(request, graph, "fusion/swiglu.onnxtxt")


def test_swiglu_below_opset_24_merges_and_keeps_the_sigmoid(request: pytest.FixtureRequest) -> None:
    graph, report = fuse(gated_model(opset=23), ["fuse-silu-gate", "eliminate-dead-code"])
    assert record_of(report, "fuse-silu-gate").stats["rule:gate-up-merge"] == 1
    assert ops(graph) == ["MatMul", "Split", "Sigmoid", "Mul", "Mul", "MatMul", "Identity"]
    # only the SiLU the merge rebuilt is left to report, not the one it replaced
    assert reasons(report, "fuse-silu-gate") == [
        "model opset 23 < 24: put upgrade-opset {version: 24} before this pass"
    ]
    check_golden(request, graph, "fusion/swiglu_opset23.onnxtxt")


@pytest.mark.parametrize("opset", [13, 17])
def test_gate_merge_writes_split_for_older_opsets(opset: int) -> None:
    graph, _ = fuse(gated_model(opset=opset), ["fuse-silu-gate"])
    (split,) = graph.find("Split")
    assert split.input(1) and graph.constant(split.input(1)).tolist() == [N, N]


def test_geglu_merges_and_keeps_the_gelu_kind() -> None:
    graph, report = fuse(gated_model(opset=20, act="gelu"), ["fuse-silu-gate"])
    assert record_of(report, "fuse-silu-gate").stats == {"fused": 1, "rule:gate-up-merge": 1}
    assert graph.find("Gelu")[0].attr("approximate") == "tanh"


def test_gate_merge_can_be_switched_off() -> None:
    graph, report = fuse(gated_model(), [{"fuse-silu-gate": {"merge_gate_up": False}}])
    assert record_of(report, "fuse-silu-gate").stats == {"fused": 1, "rule:silu": 1}
    assert ops(graph).count("MatMul") == 3 and "Split" not in ops(graph)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"up_shape": (K, 1)}, "gate and up weights differ: float32[8, 16] vs float32[8, 1]"),
        (
            {"transposed": True},
            "the gate weight 't0' is not a constant: put fold-weight-transposes before this pass",
        ),
        ({"shared_gate": True}, "the gate weight 'mlp.gate_proj.weight' is also used by MatMul#"),
    ],
)
def test_gate_merge_near_misses_say_why(kwargs: dict[str, Any], reason: str) -> None:
    _, report = unfused(gated_model(act="swish", **kwargs), ["fuse-silu-gate"])
    (got,) = reasons(report, "fuse-silu-gate")
    assert got.startswith(reason), got


def test_projections_of_different_inputs_are_no_gate() -> None:
    _, report = unfused(gated_model(act="swish", other_up_input=True), ["fuse-silu-gate"])
    assert reasons(report, "fuse-silu-gate") == []


def test_gate_merge_after_fold_weight_transposes() -> None:
    passes = ["fold-weight-transposes", "fuse-silu-gate", "eliminate-dead-code"]
    graph, _ = fuse(gated_model(act="swish", transposed=True), passes)
    assert ops(graph) == ["MatMul", "Split", "Swish", "Mul", "MatMul", "Identity"]
    assert sorted(graph.initializers) == ["mlp.down_proj.weight.T", "mlp.gate_up_proj.weight.T"]


# -- fuse-matmul-bias ---------------------------------------------------------------------------------------------
def linear_model(
    *, x_shape: list[int] | None = None, bias_shape: tuple[int, ...] = (N,), gemm: bool = False
) -> onnx.ModelProto:
    b = GraphBuilder(opset=21)
    x_shape = x_shape or [4, K]
    x = b.input("x", FLOAT, x_shape)
    bias = b.initializer("dense.bias", RNG.standard_normal(bias_shape).astype(np.float32))
    if gemm:
        w = b.initializer("dense.weight", RNG.standard_normal((N, K)).astype(np.float32))
        product = b.node("Gemm", [x, w], name="dense", transB=1, alpha=0.5)
    else:
        w = b.initializer("dense.weight", RNG.standard_normal((K, N)).astype(np.float32))
        product = b.node("MatMul", [x, w], name="dense")
    b.node("Add", [bias, product], ["y"], name="bias")
    b.output("y", FLOAT, [*x_shape[:-1], N])
    return b.model()


def test_matmul_add_on_2d_input_becomes_gemm(request: pytest.FixtureRequest) -> None:
    graph, report = fuse(linear_model(), ["fuse-matmul-bias"])
    assert record_of(report, "fuse-matmul-bias").stats == {"fused": 1, "rule:matmul-add": 1}
    (gemm,) = graph.nodes()
    assert gemm.op_type == "Gemm" and gemm.inputs == ("x", "dense.weight", "dense.bias")
    check_golden(request, graph, "fusion/matmul_bias.onnxtxt")


def test_bias_of_one_row_fuses() -> None:
    graph, _ = fuse(linear_model(bias_shape=(1, N)), ["fuse-matmul-bias"])
    assert ops(graph) == ["Gemm"]


def test_gemm_without_c_takes_the_bias() -> None:
    graph, report = fuse(linear_model(gemm=True), ["fuse-matmul-bias"])
    assert record_of(report, "fuse-matmul-bias").stats == {"fused": 1, "rule:gemm-add": 1}
    (gemm,) = graph.nodes()
    assert gemm.inputs == ("x", "dense.weight", "dense.bias")
    assert (gemm.attr("transB"), gemm.attr("alpha"), gemm.attr("beta")) == (1, 0.5, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"x_shape": [2, 3, K]}, "input is rank 3: Gemm is 2-D only"),
        ({"bias_shape": (N + 1,)}, "bias 'dense.bias' has 17 columns, the product 16"),
        ({"bias_shape": (3, N)}, "bias 'dense.bias' has 3 rows, the product 4"),
        (
            {"x_shape": ["batch", K], "bias_shape": (2, N)},
            "bias 'dense.bias' has 2 rows, the product a dynamic number",
        ),
    ],
)
def test_matmul_bias_near_misses_say_why(kwargs: dict[str, Any], reason: str) -> None:
    model = linear_model(**kwargs)
    if kwargs.get("bias_shape") in (
        (N + 1,),
        (3, N),
        (2, N),
    ):  # broadcasting would fail: no run in onnxruntime
        from llmc.ir import from_onnx

        graph = from_onnx(model)
        record = make_pass("fuse-matmul-bias").run(graph, None)
        assert [m["reason"] for m in record.details["rejected"]] == [reason]
        return
    _, report = unfused(model, ["fuse-matmul-bias"])
    assert reasons(report, "fuse-matmul-bias") == [reason]


def test_residual_adds_are_no_near_misses() -> None:
    b = GraphBuilder(opset=21)
    x = b.input("x", FLOAT, [4, K])
    w = b.initializer("w", RNG.standard_normal((K, K)).astype(np.float32))
    b.node("Add", [x, b.node("MatMul", [x, w])], ["y"])
    b.output("y", FLOAT, [4, K])
    _, report = unfused(b.model(), ["fuse-matmul-bias"])
    assert reasons(report, "fuse-matmul-bias") == []
