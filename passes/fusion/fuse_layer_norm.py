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
from llmc.rewrite import Match, Op, RuleSet, Var

from ._patterns import (
    FusionPass,
    NormPlan,
    check_denominator,
    norm_axis,
    norm_plan,
    norm_rule,
    rank,
    require_float,
    require_opset,
)

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
    reason = check_denominator(graph, m, centred, r)
    if reason:
        return reason
    axis = norm_axis(graph, x, r, [m.node("mean"), m.node("var")])
    if isinstance(axis, str):
        return axis
    return norm_plan(graph, m, x, axis, r, bias=True)


RULES = RuleSet("layer-norm", [norm_rule(RULE, _patterns(), plan, "LayerNormalization", anchor="var")])


@register_pass("fuse-layer-norm")
class FuseLayerNorm(FusionPass):
    """Rewrites decomposed layer norms ((x - mean) / sqrt(var + eps) * gamma + beta) into LayerNormalization."""

    rules = RULES
