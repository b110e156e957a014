"""CPU legalization of dynamic int8 MatMuls: the standard form ``quantize-dynamic`` writes (onnxruntime's own
quantizer writes the same)::

    Mul(Cast(MatMulInteger(DynamicQuantizeLinear(x)[0], Wq, x_zp, w_zp), to=float), Mul(x_scale, w_scale))

with a constant int8/uint8 ``Wq`` becomes ``com.microsoft.DynamicQuantizeMatMul(x, Wq, w_scale, w_zp)``: one
kernel quantizes x, multiplies on prepacked weights and scales the result. A following ``Add`` of a
constant bias [N] becomes the op's bias input, unless a Gelu reads the sum: onnxruntime then fuses Add + Gelu
into BiasGelu instead.

onnxruntime reaches the same op by itself at ORT_ENABLE_ALL (MatMulIntegerToFloat, then DynamicQuantizeMatMul
fusions), and even unfused its MatMulInteger kernel is int8: on all-MiniLM-L6-v2 (batch 8 x 128, 2 threads)
the legalized and the standard artifact ran equally fast at ORT_ENABLE_ALL and at ORT_ENABLE_BASIC. The
legalization makes the fused sites explicit in the artifact and the report, at no cost.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from llmc.ir import Graph
from llmc.pass_manager import register_pass
from llmc.rewrite import Match, NotASite, Op, RewritePass, RewriteRule, RuleSet, Var

MS = "com.microsoft"
_GELUS = ("Gelu", "FastGelu")

_DQL = Op("DynamicQuantizeLinear", Var("x"), name="dql", shared=True)  # one x may feed several MatMuls
_MMI = Op("MatMulInteger", _DQL, Var("wq", constant=True), Var("xzp"), name="mmi", allow_extra_inputs=True)
_DEQ = Op(
    "Mul",
    Op("Cast", _MMI, attrs={"to": TensorProto.FLOAT}),
    Op("Mul", Var("xs"), Var("ws", constant=True), name="scales"),
    name="deq",
)


def _n_columns(graph: Graph, m: Match) -> int:
    return int(graph.constant(m["wq"]).shape[-1])


def _check_matmul(graph: Graph, m: Match) -> str | None:
    dql = m.node("dql")
    if m["xs"] != dql.outputs[1] or m["xzp"] != dql.outputs[2]:
        return "the scale and zero point of x are not those of its DynamicQuantizeLinear"
    wq, ws = graph.constant(m["wq"]), graph.constant(m["ws"])
    if wq.ndim != 2 or wq.dtype not in (np.int8, np.uint8):
        return f"the weight is not a 2-D int8/uint8 matrix ({wq.dtype}, {wq.ndim}-D)"
    n = wq.shape[1]
    if ws.dtype != np.float32 or ws.size not in (1, n) or ws.ndim > 1:
        return f"the weight scale is not a float32 scalar or [{n}] vector"
    wzp_name = m.node("mmi").input(3)
    if wzp_name:
        wzp = graph.constant(wzp_name)
        if wzp is None or wzp.dtype != wq.dtype or wzp.size not in (1, n) or wzp.ndim > 1:
            return "the weight zero point is not a constant scalar or vector of the weight's type"
        m.values["wzp"] = wzp_name
    return None


def _bias_follows(graph: Graph, m: Match) -> bool:
    out = m.root.outputs[0]
    users = graph.consumers(out)
    if len(users) != 1 or out in graph.outputs or users[0].op_type != "Add" or users[0].domain:
        return False
    add = users[0]
    other = add.inputs[1] if add.inputs[0] == out else add.inputs[0]
    bias = graph.constant(other)
    if bias is None or bias.dtype != np.float32 or bias.shape != (_n_columns(graph, m),):
        return False
    # Add -> Gelu stays for onnxruntime's BiasGelu fusion, whose kernel is faster than a plain Gelu
    return not _feeds_gelu(graph, add.outputs[0])


def _feeds_gelu(graph: Graph, value: str) -> bool:
    users = graph.consumers(value)
    return len(users) == 1 and users[0].op_type in _GELUS and value not in graph.outputs


def _check_plain(graph: Graph, m: Match) -> str | None:
    reason = _check_matmul(graph, m)
    if reason is None and _bias_follows(graph, m):
        return NotASite("a bias Add follows: the bias rule fuses both")
    return reason


def _check_bias(graph: Graph, m: Match) -> str | None:
    reason = _check_matmul(graph, m)
    if reason is not None:
        return reason
    if _feeds_gelu(graph, m.root.outputs[0]):
        return NotASite("the bias Add feeds a Gelu: left for onnxruntime's BiasGelu")
    bias = graph.constant(m["bias"])
    if bias.dtype != np.float32 or bias.shape != (_n_columns(graph, m),):
        return f"the added constant is not a float32 bias of shape [{_n_columns(graph, m)}]"
    return None


def _rewrite(b, m: Match) -> str:
    inputs = [m["x"], m["wq"], m["ws"], m.values.get("wzp", "")]
    if "bias" in m.values:
        inputs.append(m["bias"])
    while inputs and not inputs[-1]:
        inputs.pop()
    return b.op1("DynamicQuantizeMatMul", inputs, domain=MS)


RULES = RuleSet(
    "cpu-dynamic-quantize-matmul",
    [
        RewriteRule(
            "dynamic-quantize-matmul-bias", Op("Add", _DEQ, Var("bias", constant=True)), _rewrite, _check_bias
        ),
        RewriteRule("dynamic-quantize-matmul", _DEQ, _rewrite, check=_check_plain),
    ],
)


@register_pass("cpu-dynamic-quantize-matmul")
class CpuDynamicQuantizeMatMul(RewritePass):
    """Rewrites DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul [+ bias] into DynamicQuantizeMatMul."""

    rules = RULES
