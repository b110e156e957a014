"""``fuse-layer-norm``: decomposed layer norms into ``LayerNormalization`` (opset 17).

Exporters without a LayerNormalization op (TorchScript below opset 17, hand-written modules) leave
``d = Sub(x, ReduceMean(x)); Div(d, Sqrt(Add(ReduceMean(Pow(d, 2)), eps)))`` (or ``Mul(d, d)`` for the square,
``Mul(d, Reciprocal(...))``, ``Mul(d, Div(1, ...))``, ``Mul(d, Pow(..., -0.5))`` for the division), then an
optional ``Mul`` by gamma and ``Add`` of beta. Both means must reduce the same trailing axes; epsilon comes from
the constant. The result is ``LayerNormalization(x, gamma or ones, beta?, axis, epsilon, stash_type=1)``; like
RMSNormalization, its function body normalizes in float32 and casts back before scaling, so an upcast
``Cast`` before and the ``Cast`` back after are absorbed when both are there.
"""

from __future__ import annotations

from llmc.ir import Graph
from llmc.pass_manager import register_pass
from llmc.rewrite import Builder, Match, Op, RuleSet, Var

from ._patterns import (
    FusionPass,
    NormPlan,
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
from .fuse_rms_norm import check_square

RULE = "layer-norm"
_X, _D = Var("x"), Var("d")


def _patterns() -> list[Op]:
    """The four ways of dividing the centred input by the standard deviation. The centred value is matched
    as a node once (``center``) and as a variable under the variance (``d``); the check ties the two."""
    center = Op("Sub", _X, Op("ReduceMean", _X, name="mean", allow_extra_inputs=True), name="center")
    square = Op(("Pow", "Mul"), _D, Var("p"), name="square")
    var_eps = Op("Add", Op("ReduceMean", square, name="var", allow_extra_inputs=True), Var("eps"))
    std = Op("Sqrt", var_eps)
    return [
        Op("Div", center, std),
        Op("Mul", center, Op("Reciprocal", std)),
        Op("Mul", center, Op("Div", Var("one", constant=True), std)),
        Op("Mul", center, Op("Pow", var_eps, Var("neg_half"))),
    ]


def plan(graph: Graph, m: Match) -> NormPlan | str:
    reason = require_opset(graph, 17) or require_float(graph, m["x"])
    if reason:
        return reason
    x, r = m["x"], rank(graph, m["x"])
    centred = m.node("center").outputs[0]
    if m["d"] != centred:
        return f"the variance is not taken of x - mean ('{m['d']}' instead of '{centred}')"
    reason = check_square(graph, m, centred, r)
    for key, want, what in (
        ("one", 1.0, "the numerator of 1/sqrt"),
        ("neg_half", -0.5, "the exponent of rsqrt"),
    ):
        if not reason and key in m.values:
            reason = expect_scalar(graph, m[key], want, what, rank=r)
    if reason:
        return reason
    mean, var = m.node("mean"), m.node("var")
    if mean.attr("keepdims", 1) != 1 or var.attr("keepdims", 1) != 1:
        return "a ReduceMean drops the reduced axes (keepdims=0)"
    axes, var_axes = reduce_axes(graph, mean), reduce_axes(graph, var)
    for a in (axes, var_axes):
        if isinstance(a, str):
            return a
    if axes != var_axes:
        return f"the mean and the variance reduce different axes ({axes} vs {var_axes})"
    axis = trailing_axis(axes, r)
    if axis is None:
        return (
            f"ReduceMean reduces every axis of '{x}', whose rank is unknown"
            if axes is None
            else axis_reason(axes, r)
        )
    return norm_plan(graph, m, x, axis, r, bias=True)


def _check(graph: Graph, m: Match) -> str | None:
    p = plan(graph, m)
    return p if isinstance(p, str) else None


def _rewrite(b: Builder, m: Match) -> dict[str, str]:
    p = plan(b.graph, m)
    assert not isinstance(p, str), p
    scale = p.scale or unit_scale(b.graph, p.shape, p.dtype)
    m.matched.extend(p.absorbed)
    inputs = [p.x, scale] + ([p.bias] if p.bias else [])
    y = b.op1("LayerNormalization", inputs, axis=p.axis, epsilon=p.epsilon, stash_type=1)
    return {p.out: y}


RULES = RuleSet("layer-norm", [any_of(RULE, _patterns(), _rewrite, _check, anchor="var")])


@register_pass("fuse-layer-norm")
class FuseLayerNorm(FusionPass):
    """Rewrites decomposed layer norms ((x - mean) / sqrt(var + eps) * gamma + beta) into LayerNormalization."""

    rules = RULES
