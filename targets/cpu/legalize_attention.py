"""CPU legalization of ``Attention`` (opset 23) into onnxruntime's contrib attention kernels.

The standard op takes heads-first 4-D tensors, so around it sit the projections' ``Reshape``+``Transpose``
(and ``RotaryEmbedding`` on q and k), and after it a ``Transpose``+``Reshape`` back to [batch, seq, hidden].
onnxruntime's contrib kernels take the projections' 3-D outputs directly:

- a decoder with a KV cache -> ``com.microsoft.GroupQueryAttention`` (grouped heads, the cache concatenated
  inside; causal with per-sequence lengths ``seqlens_k = sum(attention_mask) - 1`` and
  ``total_sequence_length = attention_mask.shape[1]``), RotaryEmbedding moved onto the 3-D q and k;
- an encoder (no cache) -> ``com.microsoft.MultiHeadAttention`` with the mask as ``attention_bias``.

GroupQueryAttention's mask is causal with right padding; it is chosen only when the Attention's mask is
computed from the graph input ``attention_mask`` (how every decoder export builds it), which is the contract
of llmc's Generator (prompts are not left-padded). onnxruntime's kernel also takes several new tokens after
a non-empty cache only for batch 1 (prefill of a batch and one-token decode of a batch are fine). Sites that
do not fit stay standard, with the reason; ``contrib_ops: false`` on the target keeps them all standard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field

from llmc.ir import Graph, Node
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.rewrite import RULE_KEY

MS = "com.microsoft"


@dataclass
class _Heads:
    """A 4-D heads-first operand traced back to its 3-D projection: ``Transpose(Reshape(lin))``."""

    linear: str
    rotary: Node | None


def _only_user(graph: Graph, value: str) -> Node | None:
    users = graph.consumers(value)
    return users[0] if len(users) == 1 and value not in graph.outputs else None


def _trace_heads(graph: Graph, value: str) -> _Heads | None:
    rotary = None
    node = graph.producer(value)
    if node is not None and node.op_type == "RotaryEmbedding" and not node.domain:
        if node.input(3) or node.attr("interleaved", 0):
            return None  # position_ids form or interleaved: not handled here
        rotary, node = node, graph.producer(node.inputs[0])
    if node is None or node.op_type != "Transpose" or list(node.attr("perm") or []) != [0, 2, 1, 3]:
        return None
    reshape = graph.producer(node.inputs[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    shape = graph.shape(reshape.inputs[0])
    if shape is None or len(shape) != 3:
        return None
    return _Heads(reshape.inputs[0], rotary)


def _trace_output(graph: Graph, value: str) -> Node | None:
    """The Reshape that turns Attention's [B,H,S,D] output back into [B,S,H*D], via Transpose [0,2,1,3]."""
    transpose = _only_user(graph, value)
    if (
        transpose is None
        or transpose.op_type != "Transpose"
        or list(transpose.attr("perm") or []) != [0, 2, 1, 3]
    ):
        return None
    reshape = _only_user(graph, transpose.outputs[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    shape = graph.shape(reshape.outputs[0])
    return reshape if shape is not None and len(shape) == 3 else None


def _reads_input(graph: Graph, value: str, input_name: str, limit: int = 64) -> bool:
    """Whether ``value`` is computed from the graph input ``input_name`` (breadth-first, bounded)."""
    frontier, seen = [value], set()
    while frontier and len(seen) < limit:
        v = frontier.pop(0)
        if v == input_name:
            return True
        if v in seen:
            continue
        seen.add(v)
        node = graph.producer(v)
        if node is not None:
            frontier.extend(i for i in node.inputs if i)
    return False


class _Lengths:
    """seqlens_k and total_sequence_length from attention_mask, built once per graph."""

    def __init__(self, graph: Graph, mask_input: str, order: float) -> None:
        self.graph, self.mask, self.order = graph, mask_input, order
        self._values: tuple[str, str] | None = None

    def get(self) -> tuple[str, str]:
        if self._values is None:
            g, meta = self.graph, {RULE_KEY: "cpu-attention"}

            def add(op: str, inputs: list[str], name: str, **attrs) -> str:
                node = g.add_node(
                    op,
                    inputs,
                    [g.unique_name(f"attention/{name}")],
                    name=g.unique_node_name(f"attention/{name}"),
                    attributes=attrs,
                    order=self.order,
                    metadata=meta,
                )
                return node.outputs[0]

            axis = g.add_initializer("attention/axis1", np.array([1], np.int64))
            one = g.add_initializer("attention/one", np.array(1, np.int64))
            total = add("ReduceSum", [self.mask, axis], "valid_tokens", keepdims=0)
            seqlens = add("Cast", [add("Sub", [total, one], "last_index")], "seqlens_k", to=6)
            shape = add("Shape", [self.mask], "mask_shape")
            length = add("Gather", [shape, one], "mask_length", axis=0)
            total_len = add("Cast", [length], "total_sequence_length", to=6)
            g.set_value_info(seqlens, 6, (g.shape(self.mask) or (None,))[:1])
            g.set_value_info(total_len, 6, ())
            self._values = (seqlens, total_len)
        return self._values


@register_pass("cpu-attention")
class CpuAttention(Pass):
    """Rewrites Attention (opset 23) with its head reshapes into com.microsoft GroupQueryAttention / MultiHeadAttention."""

    class Options(PassOptions):
        mask_input: str = Field(
            default="attention_mask", description="graph input the decoder mask is built from"
        )
        group_query: bool = Field(default=True, description="decoders with a KV cache -> GroupQueryAttention")
        packed_rotary: bool = Field(
            default=False,
            description="feed GroupQueryAttention the packed QKV projection and let it apply the rotary embedding "
            "from cos/sin caches (positions = past length + offset, i.e. position_ids = arange: no left padding)",
        )
        rotary_cache_length: int = Field(
            default=8192,
            ge=1,
            description="rows of the cos/sin caches when the decoder's max_length is unknown",
        )
        multi_head: bool = Field(default=True, description="encoders -> MultiHeadAttention")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self._cache_length = int(ctx.data.get("max_length") or self.options.rotary_cache_length)
        self._caches: dict[tuple[str, str], tuple[str, str] | None] = {}
        rejected: list[dict[str, str]] = []
        counts = {"GroupQueryAttention": 0, "MultiHeadAttention": 0}
        lengths = None
        for node in graph.find("Attention", domain=""):
            reason, plan = self._plan(graph, node)
            if reason:
                rejected.append({"rule": "cpu-attention", "site": node.label, "reason": reason})
                continue
            q, k, v, out_reshape = plan
            cached = len(node.outputs) > 1 and bool(node.input(4))
            if cached:
                if lengths is None:
                    lengths = _Lengths(
                        graph, self.options.mask_input, min(n.order for n in graph.nodes()) - 1
                    )
                self._group_query(graph, node, q, k, v, out_reshape, lengths)
                counts["GroupQueryAttention"] += 1
            else:
                self._multi_head(graph, node, q, k, v, out_reshape)
                counts["MultiHeadAttention"] += 1
        stats = {k: v for k, v in counts.items() if v}
        if rejected:
            stats["rejected"] = len(rejected)
        return PassResult(changed=sum(counts.values()) > 0, stats=stats, details={"rejected": rejected})

    def _plan(self, graph: Graph, node: Node):
        if node.attr("is_causal", 0) or node.attr("softcap", 0.0) or node.attr("qk_matmul_output_mode", 0):
            return "causal/softcap/qk-output attributes are not mapped", None
        if any(node.input(i) for i in range(6, len(node.inputs))):
            return "extra Attention inputs (nonpad_kv_seqlen) are not mapped", None
        q, k, v = (_trace_heads(graph, node.input(i)) for i in range(3))
        if q is None or k is None or v is None:
            return "q, k or v is not Transpose(Reshape(projection)) (+ RotaryEmbedding)", None
        if v.rotary is not None or (q.rotary is None) != (k.rotary is None):
            return "rotary embedding is applied to v, or to only one of q and k", None
        out = _trace_output(graph, node.outputs[0])
        if out is None:
            return "the output is not Transpose+Reshape back to [batch, seq, hidden]", None
        cached = len(node.outputs) > 1 and bool(node.input(4))
        if cached:
            if not self.options.group_query:
                return "group_query is off", None
            head = (graph.shape(node.input(0)) or (None,) * 4)[-1]
            if not isinstance(head, int) or head % 8:
                return (
                    f"head size {head} is not a known multiple of 8 (GroupQueryAttention's kernel needs it)",
                    None,
                )
            if node.input(3) and not _reads_input(graph, node.input(3), self.options.mask_input):
                return (
                    f"the mask is not computed from '{self.options.mask_input}' (GroupQueryAttention is causal)",
                    None,
                )
            if self.options.mask_input not in graph.inputs:
                return f"the graph has no '{self.options.mask_input}' input", None
        elif not self.options.multi_head:
            return "multi_head is off", None
        elif node.attr("kv_num_heads") != node.attr("q_num_heads"):
            return "grouped heads without a KV cache: MultiHeadAttention needs equal head counts", None
        return None, (q, k, v, out)

    def _packed(self, graph: Graph, q: _Heads, k: _Heads, v: _Heads):
        """(packed qkv, "", "", cos_cache, sin_cache) when q, k, v are the three outputs of one Split of a
        projection and the rotary tables are cos/sin(position_ids * inv_freq) with a constant inv_freq."""
        if q.rotary is None or k.rotary is None:
            return None
        split = graph.producer(q.linear)
        if (
            split is None
            or split.op_type != "Split"
            or list(split.outputs) != [q.linear, k.linear, v.linear]
            or split.attr("axis", 0) not in (-1, 2)
        ):
            return None
        tables = [
            tuple(_scaled(graph, r.inputs[i], op) for i, op in ((1, "Cos"), (2, "Sin")))
            for r in (q.rotary, k.rotary)
        ]
        if (
            tables[0] != tables[1]
        ):  # q and k must rotate by the same angles (the tables' sources, not their names)
            return None
        key = (q.rotary.inputs[1], q.rotary.inputs[2])
        if key not in self._caches:  # one pair of caches for all layers that share the tables
            self._caches[key] = _rope_caches(graph, *key, self._cache_length)
        caches = self._caches[key]
        if caches is None:
            return None
        return (split.inputs[0], "", "", *caches)

    @staticmethod
    def _rotary_3d(graph: Graph, heads: _Heads, num_heads: int, order: float) -> str:
        if heads.rotary is None:
            return heads.linear
        rot = heads.rotary
        node = graph.add_node(
            "RotaryEmbedding",
            [heads.linear, rot.inputs[1], rot.inputs[2]],
            [graph.unique_name(f"{heads.linear}/rotary")],
            name=graph.unique_node_name(f"{rot.name or 'rotary'}/3d"),
            attributes={"num_heads": num_heads, "interleaved": 0},
            order=order,
            metadata={RULE_KEY: "cpu-attention"},
        )
        info = graph.value_info(heads.linear)
        if info is not None:
            graph.set_value_info(node.outputs[0], info.dtype, info.shape)
        return node.outputs[0]

    def _group_query(
        self, graph: Graph, node: Node, q: _Heads, k: _Heads, v: _Heads, out: Node, lengths: _Lengths
    ):
        heads, kv_heads = node.attr("q_num_heads"), node.attr("kv_num_heads")
        seqlens, total = lengths.get()
        packed = self._packed(graph, q, k, v) if self.options.packed_rotary else None
        rotary = {}
        if packed is not None:
            query, _key, _value, cos, sin = packed
            inputs = [query, "", "", node.input(4), node.input(5), seqlens, total, cos, sin]
            rotary = {"do_rotary": 1, "rotary_interleaved": 0}
        else:
            qr = self._rotary_3d(graph, q, heads, node.order)
            kr = self._rotary_3d(graph, k, kv_heads, node.order)
            inputs = [qr, kr, v.linear, node.input(4), node.input(5), seqlens, total]
        gqa = graph.add_node(
            "GroupQueryAttention",
            inputs,
            [
                graph.unique_name(f"{out.outputs[0]}/gqa"),
                graph.unique_name("present_key"),
                graph.unique_name("present_value"),
            ],
            domain=MS,
            name=graph.unique_node_name(f"{node.name or 'attention'}/gqa"),
            attributes={
                "num_heads": heads,
                "kv_num_heads": kv_heads,
                "scale": float(node.attr("scale", 0.0)),
                **rotary,
            },
            order=node.order,
            metadata={RULE_KEY: "cpu-attention"},
        )
        _replace(graph, out.outputs[0], gqa.outputs[0])
        _replace(graph, node.outputs[1], gqa.outputs[1])
        _replace(graph, node.outputs[2], gqa.outputs[2])

    def _multi_head(self, graph: Graph, node: Node, q: _Heads, k: _Heads, v: _Heads, out: Node):
        heads = node.attr("q_num_heads")
        qr = self._rotary_3d(graph, q, heads, node.order)
        kr = self._rotary_3d(graph, k, heads, node.order)
        mha = graph.add_node(
            "MultiHeadAttention",
            [qr, kr, v.linear, "", "", node.input(3)],
            [graph.unique_name(f"{out.outputs[0]}/mha")],
            domain=MS,
            name=graph.unique_node_name(f"{node.name or 'attention'}/mha"),
            attributes={"num_heads": heads, "scale": float(node.attr("scale", 0.0))},
            order=node.order,
            metadata={RULE_KEY: "cpu-attention"},
        )
        _replace(graph, out.outputs[0], mha.outputs[0])


def _scaled(graph: Graph, value: str, op: str) -> tuple[str | None, float]:
    """``op(f)`` or ``Mul(op(f), c)`` -> (f, c)."""
    node, factor = graph.producer(value), 1.0
    if node is not None and node.op_type == "Mul":
        for i in (0, 1):
            c = graph.constant(node.inputs[i])
            if c is not None and c.size == 1:
                node, factor = graph.producer(node.inputs[1 - i]), float(c.reshape(()))
                break
    if node is None or node.op_type != op:
        return None, 1.0
    return node.inputs[0], factor


def _rope_caches(graph: Graph, cos: str, sin: str, length: int) -> tuple[str, str] | None:
    """cos/sin caches [length, d/2] for tables computed as cos/sin(Cast(Unsqueeze(position_ids)) * inv_freq)."""
    freqs, cos_factor = _scaled(graph, cos, "Cos")
    freqs_sin, sin_factor = _scaled(graph, sin, "Sin")
    if freqs is None or freqs != freqs_sin or cos_factor != sin_factor:
        return None
    mul = graph.producer(freqs)
    if mul is None or mul.op_type != "Mul":
        return None
    for i in (0, 1):
        inv_freq = graph.constant(mul.inputs[i])
        positions = mul.inputs[1 - i]
        if inv_freq is not None and inv_freq.ndim >= 1 and inv_freq.size == inv_freq.shape[-1]:
            break
    else:
        return None
    node = graph.producer(positions)
    while node is not None and node.op_type in ("Cast", "Unsqueeze", "Reshape"):
        positions = node.inputs[0]
        node = graph.producer(positions)
    if positions != "position_ids":
        return None
    angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq.reshape(1, -1).astype(np.float32)
    cos_cache = graph.add_initializer("attention/cos_cache", (np.cos(angles) * cos_factor).astype(np.float32))
    sin_cache = graph.add_initializer("attention/sin_cache", (np.sin(angles) * cos_factor).astype(np.float32))
    return cos_cache, sin_cache


def _replace(graph: Graph, old: str, new: str) -> None:
    info = graph.values.get(old)
    if info is not None and new not in graph.values:
        graph.set_value_info(new, info.dtype, info.shape)
    graph.replace_all_uses(old, new)
