"""The math form of scaled dot-product attention as exporters write it, traced from its output MatMul.

One tracer serves ``fuse-attention`` (which rewrites the site into ``Attention``) and ``prune-structured``
(which removes heads from the unfused site and must edit every node that carries the head count: the
``repeat_kv`` Expand/Reshape of grouped-query attention, the KV-cache concatenations). See
``fuse_attention`` for the forms recognized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmc.ir import Graph, Node
from llmc.rewrite import NotASite

from ._values import dim, ints, scalar, single_axis


@dataclass
class Repeat:
    """Grouped-query ``repeat_kv``: ``Reshape(Expand(Unsqueeze(kv, [2]), [B,kv,g,T,D]), [B,kv*g,T,D])``."""

    unsqueeze: Node
    expand: Node
    reshape: Node


@dataclass
class SdpaSite:
    """What ``trace_sdpa`` found: the new q/k/v (before cache and repeat), the cache and the head counts."""

    root: Node  # MatMul(P, V)
    scores: Node  # MatMul(Q, K^T)
    query: str
    key: str  # the new keys (before the cache concat and the GQA repeat)
    value: str
    mask: str
    scale: float
    q_heads: int
    kv_heads: int
    past_key: str = ""
    past_value: str = ""
    cache_key: Node | None = None  # Concat(past, new, axis=-2)
    cache_value: Node | None = None
    repeat_key: Repeat | None = None
    repeat_value: Repeat | None = None
    key_transpose: list[Node] = field(default_factory=list)  # the nodes that make K^T from K


def _producer(graph: Graph, value: str, *ops: str) -> Node | None:
    node = graph.producer(value) if value else None
    return node if node is not None and node.op_type in ops and not node.domain else None


def _strip_scale(graph: Graph, value: str) -> tuple[str, float]:
    """``Mul(x, c)`` / ``Div(x, c)`` with a constant scalar c -> (x, factor); otherwise (value, 1)."""
    node = _producer(graph, value, "Mul", "Div")
    if node is None:
        return value, 1.0
    for k in (0, 1) if node.op_type == "Mul" else (1,):
        c = scalar(graph, node.inputs[k])
        if c is not None:
            other = node.inputs[1 - k]
            return other, (c if node.op_type == "Mul" else 1.0 / c)
    return value, 1.0


def _untranspose_key(graph: Graph, kt: str) -> tuple[str, list[Node]] | None:
    """(K, the nodes from K to K^T): Transpose(K, [0,1,3,2]) or Reshape(Transpose(Reshape(K, [-1,T,D]),
    [0,2,1]), [B,H,D,T])."""
    node = _producer(graph, kt, "Transpose")
    if node is not None and list(node.attr("perm") or []) == [0, 1, 3, 2]:
        return node.inputs[0], [node]
    outer = _producer(graph, kt, "Reshape")
    mid = _producer(graph, outer.inputs[0], "Transpose") if outer else None
    inner = _producer(graph, mid.inputs[0], "Reshape") if mid else None
    if inner is None or list(mid.attr("perm") or []) != [0, 2, 1]:
        return None
    key = inner.inputs[0]
    shape = graph.shape(key)
    return (key, [outer, mid, inner]) if shape is not None and len(shape) == 4 else None


def _unrepeat(graph: Graph, value: str) -> tuple[str, Repeat | None]:
    """Grouped-query ``repeat_kv``: Reshape(Expand(Unsqueeze(kv, axes=[2]), ...), [B,H,T,D]) -> (kv, Repeat)."""
    value = _skip_full_slices(graph, value)
    reshape = _producer(graph, value, "Reshape")
    expand = _producer(graph, reshape.inputs[0], "Expand") if reshape else None
    # x[:, :, None, :, :] exports as Unsqueeze + a full Slice
    unsq = _producer(graph, _skip_full_slices(graph, expand.inputs[0]), "Unsqueeze") if expand else None
    if unsq is None:
        return value, None
    axes = ints(graph, unsq.input(1)) if unsq.input(1) else unsq.attr("axes")
    if axes is None or list(axes) != [2]:
        return value, None
    return _skip_full_slices(graph, unsq.inputs[0]), Repeat(unsq, expand, reshape)


def _is_full_slice(graph: Graph, node: Node) -> bool:
    starts, ends = ints(graph, node.input(1)), ints(graph, node.input(2))
    steps = ints(graph, node.input(4)) if node.input(4) else [1] * len(starts or [])
    return (
        starts is not None
        and ends is not None
        and all(s == 0 for s in starts)
        and all(e >= 2**62 for e in ends)
        and all(s == 1 for s in steps or [])
    )


def _skip_full_slices(graph: Graph, value: str) -> str:
    """Look through ``x[:, :, :]``-style Slices that copy their input whole."""
    node = _producer(graph, value, "Slice")
    while node is not None and _is_full_slice(graph, node):
        value = node.inputs[0]
        node = _producer(graph, value, "Slice")
    return value


def _split_cache(graph: Graph, value: str) -> tuple[str, str, Node | None]:
    """``Concat(past, new, axis=-2)`` -> (new, past, concat); no cache -> (value, "", None)."""
    value = _skip_full_slices(graph, value)
    cat = _producer(graph, value, "Concat")
    if cat is None or len(cat.inputs) != 2 or single_axis(cat, graph) not in (-2, 2):
        return value, "", None
    return cat.inputs[1], cat.inputs[0], cat


def trace_sdpa(graph: Graph, root: Node) -> SdpaSite | str:
    """The attention that ends in ``root`` = MatMul(P, V), or why it is not one (a ``NotASite`` when the
    site does not even start like attention)."""
    probs = root.inputs[0]
    guard = _producer(graph, probs, "Where")
    if guard is not None:
        isnan = _producer(graph, guard.inputs[0], "IsNaN")
        if isnan is None or scalar(graph, guard.inputs[1]) != 0.0 or guard.inputs[2] != isnan.inputs[0]:
            return NotASite("the left operand of the output MatMul is a Where, not a guarded softmax")
        probs = guard.inputs[2]
    softmax = _producer(graph, probs, "Softmax")
    if softmax is None:
        return NotASite("the left operand of the output MatMul is not a softmax")
    if single_axis(softmax, graph) not in (-1, 3):
        return "softmax is not over the last (key) axis"
    logits, mask = softmax.inputs[0], ""
    add = _producer(graph, logits, "Add")
    if add is not None:
        for k in (0, 1):
            if _producer(graph, add.inputs[k], "MatMul", "Mul", "Div"):
                logits, mask = add.inputs[k], add.inputs[1 - k]
                break
    logits, post_scale = _strip_scale(graph, logits)
    qk = _producer(graph, logits, "MatMul")
    if qk is None:
        return "softmax input is not MatMul(Q, K^T) (+ mask)"
    query, q_scale = _strip_scale(graph, qk.inputs[0])
    key_t, k_scale = _strip_scale(graph, qk.inputs[1])
    untransposed = _untranspose_key(graph, key_t)
    if untransposed is None:
        return "cannot see K through the K^T of the score MatMul (unknown transpose form)"
    key, key_transpose = untransposed
    key, repeat_key = _unrepeat(graph, key)
    value, repeat_value = _unrepeat(graph, root.inputs[1])
    if (repeat_key is None) != (repeat_value is None):
        return "keys and values are not repeated alike (GQA)"
    k_new, past_k, cat_k = _split_cache(graph, key)
    v_new, past_v, cat_v = _split_cache(graph, value)
    if (cat_k is None) != (cat_v is None):
        return "only one of keys/values is concatenated with a cache"
    q_shape, k_shape = graph.shape(query), graph.shape(k_new)
    if q_shape is None or len(q_shape) != 4 or k_shape is None or len(k_shape) != 4:
        return "Q or K is not 4-D [batch, heads, seq, head_dim]"
    q_heads, kv_heads = dim(graph, query, 1), dim(graph, k_new, 1)
    if q_heads is None or kv_heads is None:
        return "the number of query or key/value heads is not static"
    if q_heads % kv_heads:
        return f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads"
    if kv_heads != q_heads and repeat_key is None:
        return "fewer key/value heads than query heads, but no repeat_kv found"
    return SdpaSite(
        root, qk, query, k_new, v_new, mask, q_scale * k_scale * post_scale, q_heads, kv_heads,
        past_k, past_v, cat_k, cat_v, repeat_key, repeat_value, key_transpose,
    )  # fmt: skip
