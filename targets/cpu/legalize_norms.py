"""CPU legalization of normalizations: residual Add + norm into onnxruntime's fused Skip*Normalization ops.

``RMSNormalization(Add(a, b))`` -> ``com.microsoft.SkipSimplifiedLayerNormalization(a, b, gamma)`` and
``LayerNormalization(Add(a, b))`` -> ``com.microsoft.SkipLayerNormalization(a, b, gamma, beta)``: one kernel
reads both residual streams once and also returns their sum (output 3), which replaces the Add's output
for the next residual connection. Only 3-D activations of equal shape qualify (the contrib ops' contract).
"""

from __future__ import annotations

from llmc.ir import Graph
from llmc.pass_manager import register_pass
from llmc.rewrite import Match, Op, RewritePass, RewriteRule, RuleSet, Var

MS = "com.microsoft"


def _check(graph: Graph, m: Match) -> str | None:
    a, b = m["a"], m["b"]
    sa, sb = graph.shape(a), graph.shape(b)
    if sa is None or sb is None or len(sa) != 3 or len(sb) != 3:
        return "the residual operands are not both 3-D [batch, seq, hidden]"
    if sa != sb:
        return f"the residual operands differ in shape ({sa} vs {sb}): the fused kernel does not broadcast"
    if graph.constant(a) is not None or graph.constant(b) is not None:
        return "one residual operand is a constant (a bias): not a skip connection"
    norm = m.root
    axis = norm.attr("axis", -1)
    if axis not in (-1, 2):
        return f"normalized axis {axis} is not the last one"
    if norm.op_type == "RMSNormalization" and norm.attr("stash_type", 1) != 1:
        return "RMSNormalization stash_type is not float32"
    return None


def _rewrite(b, m: Match) -> dict[str, str]:
    norm = m.root
    eps = float(norm.attr("epsilon", 1e-5))
    if norm.op_type == "RMSNormalization":
        out = b.op(
            "SkipSimplifiedLayerNormalization",
            [m["a"], m["b"], m["gamma"]],
            outputs=4,
            domain=MS,
            epsilon=eps,
        )
    else:
        inputs = [m["a"], m["b"], m["gamma"], norm.input(2)]
        out = b.op("SkipLayerNormalization", inputs, outputs=4, domain=MS, epsilon=eps)
    return {norm.outputs[0]: out[0], m.node("add").outputs[0]: out[3]}


_SUM = Op("Add", Var("a"), Var("b"), name="add", shared=True)
RULES = RuleSet(
    "cpu-skip-norm",
    [
        RewriteRule("skip-rms-norm", Op("RMSNormalization", _SUM, Var("gamma")), _rewrite, check=_check),
        RewriteRule(
            "skip-layer-norm",
            Op("LayerNormalization", _SUM, Var("gamma"), allow_extra_inputs=True),
            _rewrite,
            check=_check,
        ),
    ],
)


@register_pass("cpu-fuse-skip-norm")
class CpuFuseSkipNorm(RewritePass):
    """Rewrites norm(Add(a, b)) into com.microsoft Skip(Simplified)LayerNormalization, keeping the residual sum."""

    rules = RULES
