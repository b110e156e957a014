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
from llmc.rewrite import Match, Op, RuleSet, Var

from ._patterns import (
    FusionPass,
    NormPlan,
    NotASite,
    check_denominator,
    norm_axis,
    norm_plan,
    norm_rule,
    rank,
    require_float,
    require_opset,
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
    reason = check_denominator(graph, m, x, r)
    if reason:
        return reason
    axis = norm_axis(graph, x, r, [m.node("mean")])
    if isinstance(axis, str):
        return axis
    return norm_plan(graph, m, x, axis, r, bias=False)


RULES = RuleSet("rms-norm", [norm_rule(RULE, _patterns(), plan, "RMSNormalization", anchor="mean")])


@register_pass("fuse-rms-norm")
class FuseRmsNorm(FusionPass):
    """Rewrites decomposed RMS norms (x * rsqrt(mean(x^2) + eps) * w, casts included) into RMSNormalization (opset 23)."""

    rules = RULES
