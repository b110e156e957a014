"""``fuse-rms-norm``: the decomposed root-mean-square norm of LLaMA-family models into ``RMSNormalization``.

transformers' ``LlamaRMSNorm`` exports as ``Mul(w, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))))``
(dynamo writes ``rsqrt`` as ``Reciprocal(Sqrt)``); other exporters write ``Div(x, Sqrt(...))``,
``Mul(x, Div(1, Sqrt(...)))``, ``Mul(x, Pow(..., -0.5))`` or ``Mul(x, x)`` for the square. All become
``RMSNormalization(x, w, axis, epsilon, stash_type=1)`` (opset 23).

Semantics, from the ONNX function body: the mean of squares, epsilon, square root and division run in
``stash_type`` (float32), ``Normalized`` is cast back to the type of ``X``, then multiplied by ``scale``. That is
exactly LlamaRMSNorm on half-precision inputs (``x.to(float32)`` ... ``weight * x.to(input_dtype)``), so
the upcast ``Cast`` before and the ``Cast`` back after are absorbed when both are there. A float16 norm
computed without those casts is fused too and then runs its reduction in float32 (more accurate, not bit-equal).
Without a weight, the scale is a shared all-ones initializer (RMSNormalization's scale is required).
"""

from __future__ import annotations

from llmc.ir import Graph
from llmc.pass_manager import register_pass
from llmc.rewrite import Builder, Match, Op, RuleSet, Var

from ._patterns import (
    FusionPass,
    NormPlan,
    NotASite,
    any_of,
    axis_reason,
    expect_scalar,
    norm_plan,
    rank,
    reduce_axes,
    require_float,
    require_opset,
    trailing_axis,
    unit_scale,
)

RULE = "rms-norm"
_X = Var("x")


def _patterns() -> list[Op]:
    """The four ways of dividing by the root; the square (``Pow(x, 2)`` or ``Mul(x, x)``) is told apart by the
    check, so that at most one pattern gets deep into any node (the deepest failure is the reason shown)."""
    square = Op(("Pow", "Mul"), _X, Var("p"), name="square")
    mean = Op("ReduceMean", square, name="mean", allow_extra_inputs=True)
    var_eps = Op("Add", mean, Var("eps"), name="add_eps")
    root = Op("Sqrt", var_eps)
    return [
        Op("Mul", _X, Op("Reciprocal", root)),
        Op("Div", _X, root),
        Op("Mul", _X, Op("Div", Var("one", constant=True), root)),
        Op("Mul", _X, Op("Pow", var_eps, Var("neg_half"))),
    ]


def check_square(graph: Graph, m: Match, base: str, r: int | None) -> str | None:
    """``Pow(base, 2)`` or ``Mul(base, base)``."""
    if m.node("square").op_type == "Pow":
        return expect_scalar(graph, m["p"], 2.0, "the exponent of the square", rank=r)
    return None if m["p"] == base else f"the square multiplies '{base}' by another value ('{m['p']}')"


def plan(graph: Graph, m: Match) -> NormPlan | str:
    """What the fused node will read and replace, or the reason it cannot be fused."""
    centred = graph.producer(m["x"])
    if centred is not None and centred.op_type == "Sub" and not centred.domain:
        mean_of = graph.producer(centred.inputs[1])
        if mean_of is not None and mean_of.op_type == "ReduceMean" and mean_of.inputs[0] == centred.inputs[0]:
            return NotASite(f"'{m['x']}' is centred (x - mean(x)): a layer norm, for fuse-layer-norm")
    reason = require_opset(graph, 23) or require_float(graph, m["x"])
    if reason:
        return reason
    x, r = m["x"], rank(graph, m["x"])
    reason = check_square(graph, m, x, r)
    for key, want, what in (
        ("one", 1.0, "the numerator of 1/sqrt"),
        ("neg_half", -0.5, "the exponent of rsqrt"),
    ):
        if not reason and key in m.values:
            reason = expect_scalar(graph, m[key], want, what, rank=r)
    if reason:
        return reason
    mean = m.node("mean")
    if mean.attr("keepdims", 1) != 1:
        return "ReduceMean drops the reduced axes (keepdims=0)"
    axes = reduce_axes(graph, mean)
    if isinstance(axes, str):
        return axes
    axis = trailing_axis(axes, r)
    if axis is None:
        if axes is None:
            return f"ReduceMean reduces every axis of '{x}', whose rank is unknown"
        return axis_reason(axes, r)
    return norm_plan(graph, m, x, axis, r, bias=False)


def _check(graph: Graph, m: Match) -> str | None:
    p = plan(graph, m)
    return p if isinstance(p, str) else None


def _rewrite(b: Builder, m: Match) -> dict[str, str]:
    p = plan(b.graph, m)
    assert not isinstance(p, str), p
    scale = p.scale or unit_scale(b.graph, p.shape, p.dtype)
    m.matched.extend(p.absorbed)  # removed with the pattern's nodes once unused
    y = b.op1("RMSNormalization", [p.x, scale], axis=p.axis, epsilon=p.epsilon, stash_type=1)
    return {p.out: y}


RULES = RuleSet("rms-norm", [any_of(RULE, _patterns(), _rewrite, _check, anchor="mean")])


@register_pass("fuse-rms-norm")
class FuseRmsNorm(FusionPass):
    """Rewrites decomposed RMS norms (x * rsqrt(mean(x^2) + eps) * w, casts included) into RMSNormalization (opset 23)."""

    rules = RULES
