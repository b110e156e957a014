"""``fuse-silu-gate``: SiLU into ``Swish`` and the gated MLP's two projections into one.

``Mul(x, Sigmoid(x))`` (and ``Mul(x, Sigmoid(Mul(x, alpha)))``) -> ``Swish(x, alpha)``, a standard op since opset
24; below that the rule keeps the two nodes and says why.

The SwiGLU / GeGLU gate of LLaMA-family MLPs, ``Mul(act(MatMul(x, Wg)), MatMul(x, Wu))`` with constant
``Wg`` and ``Wu`` of one shape ``[K, N]``, becomes ``MatMul(x, concat(Wg, Wu, axis=1))``, a ``Split`` into
halves, ``act`` on the first and the ``Mul``: one ``[K, 2N]`` GEMM instead of two ``[K, N]`` ones, which is what
decode (a matrix-vector product per token) wants. ``act`` is kept as found: ``Swish``, ``Sigmoid``+``Mul``
(opset < 24) or ``Gelu`` (GeGLU; run fuse-gelu first). The merged weight is named from the originals
(``mlp.gate_proj.weight.T`` + ``mlp.up_proj.weight.T`` -> ``mlp.gate_up_proj.weight.T``); the old ones are left
unused for eliminate-dead-code. Option ``merge_gate_up: false`` keeps the two projections.
"""

from __future__ import annotations

import numpy as np
from pydantic import ConfigDict

from llmc.ir import Graph, Node
from llmc.pass_manager import PassOptions, register_pass
from llmc.rewrite import Builder, Match, Op, RuleSet, Var

from ._patterns import (
    FusionPass,
    any_of,
    dtype,
    merged_name,
    model_opset,
    require_float,
    require_opset,
    used_only_by,
)

_X, _G = Var("x"), Var("g")

# -- SiLU --------------------------------------------------------------------------------------------------
_SILU = [
    Op("Mul", _G, Op("Sigmoid", _G, name="sigmoid")),
    Op("Mul", _G, Op("Sigmoid", Op("Mul", _G, Var("alpha"), name="scaled"), name="sigmoid")),
]


def _alpha(graph: Graph, m: Match) -> float | str:
    if "alpha" not in m.values:
        return 1.0
    array = graph.constant(m["alpha"])
    if array is None or array.size != 1:
        return "the factor inside Sigmoid is not a constant scalar"
    if array.ndim > 1:
        return "the factor inside Sigmoid has rank > 1: broadcasting it would change the result's shape"
    return float(np.asarray(array, dtype=np.float64).reshape(()))


def _check_silu(graph: Graph, m: Match) -> str | None:
    reason = require_opset(graph, 24) or require_float(graph, m["g"])
    if reason:
        return reason
    alpha = _alpha(graph, m)
    return alpha if isinstance(alpha, str) else None


def _rewrite_silu(b: Builder, m: Match) -> str:
    alpha = _alpha(b.graph, m)
    return b.op1("Swish", [m["g"]], alpha=None if alpha == 1.0 else alpha)


# -- gated MLP ---------------------------------------------------------------------------------------------
_GATE = Op("MatMul", _X, Var("wg"), name="gate_mm")
_UP = Op("MatMul", _X, Var("wu"), name="up_mm")
_GATED = [
    Op("Mul", Op(("Swish", "Gelu"), _GATE, name="act"), _UP),
    # below opset 24 SiLU stays Mul(g, Sigmoid(g)); g must be MatMul(x, Wg), checked below
    Op("Mul", Op("Mul", _G, Op("Sigmoid", _G, name="sigmoid"), name="act"), _UP),
]


def _gate_matmul(graph: Graph, m: Match) -> Node | str:
    """The gate MatMul: bound by the pattern, or (Sigmoid form) the producer of ``g``."""
    if "gate_mm" in m.nodes:
        return m.node("gate_mm")
    node = graph.producer(m["g"])
    if node is None or node.op_type != "MatMul" or node.domain or node.inputs[0] != m["x"]:
        return f"the SiLU input '{m['g']}' is not a MatMul of the up projection's input '{m['x']}'"
    if not used_only_by(graph, m["g"], [m.node("sigmoid"), m.node("act")]):
        return f"the gate projection '{m['g']}' has other users"
    return node


def _weight_reason(graph: Graph, value: str, which: str, mm: Node) -> str | None:
    array = graph.constant(value)
    if array is None:
        producer = graph.producer(value)
        hint = (
            ": put fold-weight-transposes before this pass"
            if producer is not None and producer.op_type == "Transpose"
            else ""
        )
        return f"the {which} weight '{value}' is not a constant{hint}"
    if array.ndim != 2:
        return f"the {which} weight '{value}' is {array.ndim}-D, not a 2-D [in, out] matrix"
    others = [n.label for n in graph.consumers(value) if n is not mm]
    if others or not graph.is_initializer(value):
        why = f"also used by {others[0]}" if others else "not an initializer"
        return f"the {which} weight '{value}' is {why}: merging would copy it"
    return None


def _check_gated(graph: Graph, m: Match) -> str | None:
    gate = _gate_matmul(graph, m)
    if isinstance(gate, str):
        return gate
    reason = _weight_reason(graph, gate.inputs[1], "gate", gate) or _weight_reason(
        graph, m["wu"], "up", m.node("up_mm")
    )
    if reason:
        return reason
    wg, wu = graph.constant(gate.inputs[1]), graph.constant(m["wu"])
    if wg.shape != wu.shape or wg.dtype != wu.dtype:
        return f"gate and up weights differ: {wg.dtype}{list(wg.shape)} vs {wu.dtype}{list(wu.shape)}"
    if gate.inputs[1] == m["wu"]:
        return "gate and up projections share one weight"
    return None


def _rewrite_gated(b: Builder, m: Match) -> str:
    graph = b.graph
    gate, up, act = _gate_matmul(graph, m), m.node("up_mm"), m.node("act")
    assert isinstance(gate, Node)
    wg_name, wu_name = gate.inputs[1], m["wu"]
    wg, wu = graph.constant(wg_name), graph.constant(wu_name)
    n = int(wg.shape[1])
    merged = b.constant(merged_name(wg_name, wu_name), np.concatenate([wg, wu], axis=1))
    both = b.op1("MatMul", [m["x"], merged], name=f"{b.stem}/gate_up")
    x_shape = graph.shape(m["x"])
    if x_shape is not None:
        graph.set_value_info(both, dtype(graph, gate.outputs[0]), (*x_shape[:-1], 2 * n))
    opset = model_opset(graph)
    if opset >= 18:
        halves = b.op("Split", [both], outputs=2, axis=-1, num_outputs=2)
    elif opset >= 13:
        halves = b.op(
            "Split", [both, b.constant(f"{merged}.split", np.array([n, n], np.int64))], outputs=2, axis=-1
        )
    else:
        halves = b.op("Split", [both], outputs=2, axis=-1, split=[n, n])
    for half, old in zip(halves, (gate.outputs[0], up.outputs[0]), strict=True):
        info = graph.values.get(old)
        if info is not None:
            graph.set_value_info(half, info.dtype, info.shape)
    if act.op_type == "Mul":  # Sigmoid form
        activated = b.op1("Mul", [halves[0], b.op1("Sigmoid", [halves[0]])])
        m.matched.append(gate)
    else:
        attrs = {k: act.attr(k) for k in act.attributes}
        activated = b.op1(act.op_type, [halves[0]], **attrs)
    info = graph.values.get(act.outputs[0])
    if info is not None:
        graph.set_value_info(activated, info.dtype, info.shape)
    return b.op1("Mul", [activated, halves[1]])


def rules(merge_gate_up: bool = True) -> RuleSet:
    out = [any_of("silu", _SILU, _rewrite_silu, _check_silu, anchor="sigmoid")]
    if merge_gate_up:
        out.append(
            any_of("gate-up-merge", _GATED, _rewrite_gated, _check_gated, anchor=("gate_mm", "sigmoid"))
        )
    return RuleSet("silu-gate", out)


class FuseSiluGateOptions(PassOptions):
    model_config = ConfigDict(use_attribute_docstrings=True)

    merge_gate_up: bool = True
    """Merge the gate and up projections of SwiGLU/GeGLU MLPs into one MatMul and a Split."""


@register_pass("fuse-silu-gate")
class FuseSiluGate(FusionPass):
    """Rewrites Mul(x, Sigmoid(x)) into Swish (opset 24) and gated MLPs' gate/up MatMuls into one MatMul + Split."""

    Options = FuseSiluGateOptions
    options: FuseSiluGateOptions
    rules = rules()

    def rule_set(self) -> RuleSet:
        return self.rules if self.options.merge_gate_up else rules(merge_gate_up=False)
