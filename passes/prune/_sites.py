"""Where a decoder's attention heads and MLP channels live in the IR, as sites that structured pruning edits.

Removing a head or a channel must shrink every tensor that carries that axis, consistently: the projection
weights' columns (and a Split's sizes when projections were merged), the value shapes along the way, the
head counts of ``Attention``/``RotaryEmbedding``, the consuming weight's rows, and the KV cache when kv heads
go. This module traces those chains and says, for a site it cannot handle, which node stops the trace.

Supported forms (what the fusion passes produce; the exporter's unfused attention is in ``_unfused``):

* attention: opset-23 ``Attention`` with 4-D heads-first q/k/v, each ``[RotaryEmbedding](Transpose[0,2,1,3](
  Reshape(lin)))`` where ``lin`` is a ``MatMul`` with a constant weight or one output of a ``Split`` of such a
  MatMul (merge-qkv); its output goes ``Transpose[0,2,1,3] -> Reshape -> MatMul(o_proj)``.
* MLP: ``MatMul(h, W_down)`` where ``h`` is built by element-wise ops (at least one non-linear: Swish, Sigmoid,
  Gelu, Relu, ...) from MatMuls with constant weights or Split outputs of one (fuse-silu-gate's merged
  gate_up), with optional constant per-channel bias/scale vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from llmc.ir import Graph, Node

_ACTIVATIONS = {
    "Swish", "Sigmoid", "Gelu", "Relu", "Tanh", "Erf", "Softplus", "HardSwish", "HardSigmoid",
    "LeakyRelu", "Elu", "Selu", "Celu", "Mish", "Exp",
}  # fmt: skip
_PASS_THROUGH = {"Identity", "Neg", "Abs", "Cast"}
_BINARY = {"Mul", "Add", "Sub", "Div"}
_LAYER_NUMBER = re.compile(r"(.*layers?\.(\d+))\.")


class SiteError(Exception):
    """A site has a form this pass does not handle; the message names the node."""


@dataclass
class Source:
    """The column segment ``[offset, offset + width)`` of a constant MatMul weight that feeds a pruned axis."""

    matmul: Node
    offset: int
    width: int
    split: Node | None = None  # the Split of the MatMul's output that hands the segment on
    split_index: int = 0


@dataclass
class HeadPath:
    """q, k or v of one Attention: its projection segment and the 4-D values that carry the heads on axis 1/2."""

    source: Source
    reshape: Node
    heads_values: list[tuple[str, int]]  # (value, axis of the heads)
    rotary: Node | None


@dataclass
class AttentionSite:
    layer: int
    name: str
    node: Node
    q: HeadPath
    k: HeadPath
    v: HeadPath
    q_heads: int
    kv_heads: int
    head_dim: int
    out_values: list[tuple[str, int]]  # Attention output and its Transpose: (value, heads axis)
    out_reshape: Node
    o_proj: Node
    cache: list[str] = field(default_factory=list)  # past key/value inputs and present outputs ([B, H, T, D])
    # the unfused form only (see ``_unfused``): repeat_kv nodes and the values between q/k/v and P·V
    # (value, {axis: q | kv | group | unknown}) between q/k/v and P·V; (node, axis, count) of target shapes
    region: list[tuple[str, dict[int, str]]] = field(default_factory=list)
    shape_edits: list[tuple[Node, int, str]] = field(default_factory=list)

    @property
    def fused(self) -> bool:
        return self.node.op_type == "Attention"

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


@dataclass
class FfnSite:
    layer: int
    name: str
    down: Node
    width: int
    sources: list[Source]
    values: list[str]  # values whose last axis is the channel axis
    vectors: list[tuple[Node, int]]  # (node, input slot) of constant per-channel vectors (bias, scale)


def live_nodes(graph: Graph) -> set[int]:
    """Ids of the nodes some graph output depends on."""
    live_values = set(graph.outputs)
    live: set[int] = set()
    for node in reversed(graph.nodes()):
        if any(v in live_values for v in node.outputs if v):
            live.add(node.id)
            live_values.update(v for v in (*node.inputs, *node.implicit_inputs) if v)
    return live


def layer_name(weight: str, fallback: int) -> tuple[int, str]:
    """(index, name) of the decoder layer a weight belongs to: ``model.layers.3.mlp...`` -> (3, model.layers.3)."""
    m = _LAYER_NUMBER.match(weight)
    return (int(m.group(2)), m.group(1)) if m else (fallback, f"layer{fallback}")


def const_weight(graph: Graph, node: Node | None) -> np.ndarray | None:
    if node is None or node.op_type != "MatMul" or node.domain or not graph.is_constant(node.input(1)):
        return None
    w = graph.initializers[node.inputs[1]]
    return w if w.ndim == 2 and w.dtype.kind == "f" else None


def split_sizes(graph: Graph, split: Node, total: int) -> list[int]:
    """The sizes of a last-axis Split's outputs (sizes input, ``split`` attribute or equal parts)."""
    if split.input(1):
        sizes = graph.constant(split.inputs[1])
        if sizes is None:
            raise SiteError(f"{split.label}: split sizes are not constant")
        return [int(s) for s in np.asarray(sizes).reshape(-1)]
    if split.attr("split") is not None:
        return [int(s) for s in split.attr("split")]
    parts = len(split.outputs)
    if total % parts:
        raise SiteError(f"{split.label}: {total} does not split into {parts} equal parts")
    return [total // parts] * parts


def trace_source(graph: Graph, value: str) -> Source:
    """The weight segment behind ``value``: a constant-weight MatMul output or one output of its last-axis Split."""
    node = graph.producer(value)
    w = const_weight(graph, node)
    if w is not None:
        return Source(node, 0, w.shape[1])
    if node is None or node.op_type != "Split" or node.domain:
        raise SiteError(
            f"'{value}' does not come from a MatMul with a constant weight (or a Split of one); an exporter's "
            "Transpose(weight) becomes one after fold-weight-transposes and fold-constants"
        )
    rank = len(graph.shape(node.inputs[0]) or ())
    if node.attr("axis", 0) not in (-1, rank - 1):
        raise SiteError(f"{node.label}: splits axis {node.attr('axis', 0)}, not the last one")
    matmul = graph.producer(node.inputs[0])
    w = const_weight(graph, matmul)
    if w is None:
        raise SiteError(f"{node.label}: its input is not a MatMul with a constant weight")
    sizes = split_sizes(graph, node, w.shape[1])
    index = list(node.outputs).index(value)
    return Source(matmul, sum(sizes[:index]), sizes[index], node, index)


def _require_only(graph: Graph, value: str, allowed: set[int], live: set[int]) -> None:
    for consumer in graph.consumers(value):
        if consumer.id in live and consumer.id not in allowed:
            raise SiteError(f"'{value}' is also read by {consumer.label}, which pruning would not update")


def sole_consumer(graph: Graph, value: str, op: str, live: set[int]) -> Node:
    users = [n for n in graph.consumers(value) if n.id in live]
    if len(users) != 1 or users[0].op_type != op or users[0].domain or value in graph.outputs:
        raise SiteError(f"'{value}' is not read by exactly one {op}")
    return users[0]


def _head_path(graph: Graph, node: Node, slot: int, live: set[int]) -> HeadPath:
    value = node.input(slot)
    chain: list[Node] = [node]
    rotary = graph.producer(value)
    if rotary is not None and rotary.op_type == "RotaryEmbedding" and not rotary.domain:
        chain.append(rotary)
        value = rotary.inputs[0]
    else:
        rotary = None
    transpose = graph.producer(value)
    if (
        transpose is None
        or transpose.op_type != "Transpose"
        or list(transpose.attr("perm") or []) != [0, 2, 1, 3]
    ):
        raise SiteError(
            f"{node.label}: input {slot} is not [RotaryEmbedding](Transpose[0,2,1,3](Reshape(...)))"
        )
    reshape = graph.producer(transpose.inputs[0])
    if reshape is None or reshape.op_type != "Reshape":
        raise SiteError(f"{transpose.label}: its input is not a Reshape into heads")
    source = trace_source(graph, reshape.inputs[0])
    heads_values = [(reshape.outputs[0], 2), (transpose.outputs[0], 1)]
    if rotary is not None:
        heads_values.append((rotary.outputs[0], 1))
    _require_only(graph, reshape.inputs[0], {reshape.id}, live)
    _require_only(graph, reshape.outputs[0], {transpose.id}, live)
    _require_only(graph, transpose.outputs[0], {chain[-1].id}, live)
    if rotary is not None:
        _require_only(graph, rotary.outputs[0], {node.id}, live)
    return HeadPath(source, reshape, heads_values, rotary)


def output_projection(graph: Graph, out: str, live: set[int]) -> tuple[Node, Node, Node]:
    """``MatMul(Reshape(Transpose[0,2,1,3](out)), W_o)``: the Transpose, Reshape and o_proj after attention."""
    transpose = sole_consumer(graph, out, "Transpose", live)
    if list(transpose.attr("perm") or []) != [0, 2, 1, 3]:
        raise SiteError(f"{transpose.label}: the attention output is not transposed back with [0,2,1,3]")
    reshape = sole_consumer(graph, transpose.outputs[0], "Reshape", live)
    o_proj = sole_consumer(graph, reshape.outputs[0], "MatMul", live)
    if const_weight(graph, o_proj) is None or o_proj.input(0) != reshape.outputs[0]:
        raise SiteError(f"{o_proj.label}: the output projection has no constant weight")
    return transpose, reshape, o_proj


def attention_site(graph: Graph, node: Node, fallback: int, live: set[int]) -> AttentionSite:
    shape = graph.shape(node.input(0))
    if shape is None or len(shape) != 4:
        raise SiteError(f"{node.label}: q is not a 4-D heads-first tensor (3-D Attention is not supported)")
    q, k, v = (_head_path(graph, node, i, live) for i in range(3))
    q_heads = node.attr("q_num_heads") or shape[1]
    kv_heads = node.attr("kv_num_heads") or (graph.shape(node.input(1)) or (None, None))[1]
    if not isinstance(q_heads, int) or not isinstance(kv_heads, int):
        raise SiteError(f"{node.label}: head counts are neither attributes nor static shapes")
    head_dim = q.source.width // q_heads
    if q.source.width != q_heads * head_dim or k.source.width != kv_heads * head_dim:
        raise SiteError(f"{node.label}: projection widths do not match {q_heads}/{kv_heads} heads")
    out = node.outputs[0]
    transpose, reshape, o_proj = output_projection(graph, out, live)
    cache = [v for v in (node.input(4), node.input(5), *node.outputs[1:3]) if v]
    index, name = layer_name(o_proj.inputs[1], fallback)
    return AttentionSite(
        index, name, node, q, k, v, q_heads, kv_heads, head_dim,
        [(out, 1), (transpose.outputs[0], 2)], reshape, o_proj, cache,
    )  # fmt: skip


def ffn_site(graph: Graph, down: Node, fallback: int, live: set[int]) -> FfnSite | None:
    """The gated (or plain) MLP that ends in ``down``, or None when its input is not built that way."""
    w = const_weight(graph, down)
    if w is None:
        return None
    root = graph.producer(down.inputs[0])
    if root is None or root.op_type not in _ACTIVATIONS | _BINARY | _PASS_THROUGH or root.domain:
        return None
    width = w.shape[0]
    values: list[str] = []
    sources: list[Source] = []
    vectors: list[tuple[Node, int]] = []
    nodes: set[int] = {down.id}
    stack, nonlinear = [down.inputs[0]], False
    while stack:
        value = stack.pop()
        if value in values:
            continue
        node = graph.producer(value)
        if node is None or node.domain:
            return None
        if node.op_type in ("MatMul", "Split"):
            try:
                source = trace_source(graph, value)
            except SiteError:
                return None
            sources.append(source)
            values.append(value)
            continue
        if node.op_type in _ACTIVATIONS or node.op_type in _PASS_THROUGH:
            nonlinear |= node.op_type in _ACTIVATIONS
            stack.append(node.inputs[0])
        elif node.op_type in _BINARY:
            for slot, operand in enumerate(node.inputs[:2]):
                const = graph.constant(operand)
                if const is None:
                    stack.append(operand)
                elif const.size != 1:
                    if const.shape[-1:] != (width,) or int(np.prod(const.shape)) != width:
                        return None
                    vectors.append((node, slot))
            nonlinear |= node.op_type == "Mul" and all(graph.constant(x) is None for x in node.inputs[:2])
        else:
            return None
        values.append(value)
        nodes.add(node.id)
    if not nonlinear or not sources or any(s.width != width for s in sources):
        return None
    for source in sources:
        nodes.add(source.matmul.id)
        if source.split is not None:
            nodes.add(source.split.id)
    for value in values:
        try:
            _require_only(graph, value, nodes, live)
        except SiteError:
            return None
    index, name = layer_name(down.inputs[1], fallback)
    return FfnSite(index, name, down, width, sources, values, vectors)


def find_sites(graph: Graph) -> tuple[list[AttentionSite], list[FfnSite]]:
    """Every attention and MLP site of the graph, in topological order; SiteError for an unsupported Attention."""
    live = live_nodes(graph)
    attention: list[AttentionSite] = []
    ffn: list[FfnSite] = []
    for node in graph.nodes():
        if node.id not in live or node.domain:
            continue
        if node.op_type == "Attention":
            attention.append(attention_site(graph, node, len(attention), live))
        elif node.op_type == "MatMul":
            site = ffn_site(graph, node, len(ffn), live)
            if site is not None:
                ffn.append(site)
    if not attention:
        from ._unfused import unfused_attention_sites  # the exporter's form, before fuse-attention

        attention = unfused_attention_sites(graph, live)
    return attention, ffn
