"""``fuse-rotary``: the rotate-half rotary position embedding into ONNX ``RotaryEmbedding`` (opset 23).

Exported LLaMA-family models compute ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = concat(-x[..., d/2:], x[..., :d/2])`` and ``cos = Unsqueeze(Cos(concat(f, f)), 1)``.
``RotaryEmbedding`` without ``position_ids`` takes per-token caches of shape [batch, seq, d/2], so the
rewrite feeds it ``Cos(f)``/``Sin(f)`` (the half that the duplicated table repeats): the cos/sin math stays
dynamic and exact, and CSE shares it between q, k and all layers.
"""

from __future__ import annotations

import numpy as np

from llmc.ir import Graph
from llmc.pass_manager import register_pass
from llmc.rewrite import Match, Op, RewritePass, RewriteRule, RuleSet, Var

from ._values import is_half_slice, last_dim, require_opset, scalar, single_axis

_X = Var("x")
_PATTERN = Op(
    "Add",
    Op("Mul", _X, Var("cos4")),
    Op(
        "Mul",
        Op(
            "Concat",
            Op("Neg", Op("Slice", _X, Var("s2"), Var("e2"), allow_extra_inputs=True, name="upper")),
            Op("Slice", _X, Var("s1"), Var("e1"), allow_extra_inputs=True, name="lower"),
            name="concat",
            commutative=False,
        ),
        Var("sin4"),
    ),
)


def _table(graph: Graph, value: str, op: str) -> tuple[str | None, float, str]:
    """``Unsqueeze(op(Concat(f, f)) [* c], axes=[1])`` -> (f, c, reason); c is the rope attention scaling."""
    unsq = graph.producer(value)
    if unsq is None or unsq.op_type != "Unsqueeze":
        return (
            None,
            1.0,
            f"{op.lower()} table '{value}' is not Unsqueeze(..., axis 1) of a [batch, seq, dim] table",
        )
    axes = graph.constant(unsq.input(1)) if len(unsq.inputs) > 1 else unsq.attr("axes")
    if axes is None or [int(a) for a in list(axes)] != [1]:
        return None, 1.0, f"{op.lower()} table is unsqueezed on axes {axes}, expected [1]"
    trig, factor = graph.producer(unsq.inputs[0]), 1.0
    if trig is not None and trig.op_type == "Mul":
        for k in (0, 1):
            c = scalar(graph, trig.inputs[k])
            if c is not None:
                trig, factor = graph.producer(trig.inputs[1 - k]), c
                break
    if trig is None or trig.op_type != op:
        return (
            None,
            1.0,
            f"{op.lower()} table is not computed by {op} in the graph (cannot prove its halves are equal)",
        )
    cat = graph.producer(trig.inputs[0])
    if cat is None or cat.op_type != "Concat" or len(cat.inputs) != 2 or cat.inputs[0] != cat.inputs[1]:
        return None, 1.0, f"{op} input is not concat(freqs, freqs): the table halves may differ"
    if (
        single_axis(cat, graph) != -1
        and single_axis(cat, graph) != len(graph.shape(cat.outputs[0]) or ()) - 1
    ):
        return None, 1.0, "the frequency table is not concatenated on its last axis"
    return cat.inputs[0], factor, ""


def _check(graph: Graph, m: Match) -> str | None:
    reason = require_opset(graph, 23, "RotaryEmbedding")
    if reason:
        return reason
    shape = graph.shape(m["x"])
    if shape is None or len(shape) != 4:
        return f"input '{m['x']}' is not 4-D [batch, heads, seq, head_dim]"
    dim = last_dim(graph, m["x"])
    if dim is None or dim % 2:
        return f"head dim of '{m['x']}' is unknown or odd"
    if single_axis(m.node("concat"), graph) not in (-1, 3):
        return "rotate_half is not concatenated on the last axis"
    if not is_half_slice(graph, m.node("lower"), 0, dim // 2) or not is_half_slice(
        graph, m.node("upper"), dim // 2, None
    ):
        return "the slices are not the lower and upper halves of the head dim (interleaved or partial rotary)"
    freqs_cos, cos_factor, reason = _table(graph, m["cos4"], "Cos")
    if freqs_cos is None:
        return reason
    freqs_sin, sin_factor, reason = _table(graph, m["sin4"], "Sin")
    if freqs_sin is None:
        return reason
    if freqs_cos != freqs_sin or cos_factor != sin_factor:
        return "cos and sin are computed from different frequency tables or scalings"
    m.values.update(freqs=freqs_cos, factor=repr(cos_factor))
    return None


def _rewrite(b, m: Match) -> str:
    cos = b.op1("Cos", [m["freqs"]], name="rotary/cos_half")
    sin = b.op1("Sin", [m["freqs"]], name="rotary/sin_half")
    factor = float(m["factor"])
    if factor != 1.0:  # rope attention scaling (YaRN, LongRoPE) multiplies both tables
        c = b.constant("rotary/attention_scaling", np.array(factor, dtype=np.float32))
        cos, sin = b.op1("Mul", [cos, c]), b.op1("Mul", [sin, c])
    return b.op1("RotaryEmbedding", [m["x"], cos, sin], interleaved=0)


RULES = RuleSet("rotary", [RewriteRule("rotate-half-rope", _PATTERN, _rewrite, check=_check)])


@register_pass("fuse-rotary")
class FuseRotary(RewritePass):
    """Rewrites rotate-half rotary embeddings (x*cos + rotate_half(x)*sin) into RotaryEmbedding (opset 23)."""

    rules = RULES
