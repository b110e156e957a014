"""``fuse-attention``: scaled dot-product attention into ONNX ``Attention`` (opset 23), KV cache and GQA included.

What exporters write for ``scaled_dot_product_attention`` (the math form)::

    S = Softmax(MatMul(Q * a, K^T * b) + M)          # or MatMul(Q, K^T) / c, mask optional
    P = Where(IsNaN(S), 0, S)                         # optional guard for fully masked rows
    Y = MatMul(P, V)

where K^T is ``Transpose(K, [0,1,3,2])`` or the exporter's ``Reshape(Transpose(Reshape(K, [-1,T,D]), [0,2,1]))``,
K and V may be repeated for grouped-query attention (``Reshape(Expand(Unsqueeze(kv, 2)))``), and with a KV
cache ``K = Concat(past_key, k_new, axis=-2)``. The rewrite is one ``Attention`` node fed with the new keys
and values, the past cache and the mask, which also produces the present cache (replacing the Concats, whose
graph-output names are kept). The pattern is anchored on ``MatMul(P, V)`` and the rest is traced in the check,
which says at which step a site stopped looking like attention.

The NaN guard only differs from ``Attention`` on rows where every key is masked (padding queries), whose
outputs are not used by a decoder; the golden checks compare the outputs that are.
"""

from __future__ import annotations

from llmc.ir import Graph, Node
from llmc.pass_manager import register_pass
from llmc.rewrite import Match, NotASite, Op, RewritePass, RewriteRule, RuleSet, Var

from ._values import dim, ints, require_opset, scalar, single_axis


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


def _untranspose_key(graph: Graph, kt: str) -> str | None:
    """K from K^T: Transpose(K, [0,1,3,2]) or Reshape(Transpose(Reshape(K, [-1,T,D]), [0,2,1]), [B,H,D,T])."""
    node = _producer(graph, kt, "Transpose")
    if node is not None and list(node.attr("perm") or []) == [0, 1, 3, 2]:
        return node.inputs[0]
    outer = _producer(graph, kt, "Reshape")
    mid = _producer(graph, outer.inputs[0], "Transpose") if outer else None
    inner = _producer(graph, mid.inputs[0], "Reshape") if mid else None
    if inner is None or list(mid.attr("perm") or []) != [0, 2, 1]:
        return None
    key = inner.inputs[0]
    shape = graph.shape(key)
    return key if shape is not None and len(shape) == 4 else None


def _unrepeat(graph: Graph, value: str) -> tuple[str, bool]:
    """Grouped-query ``repeat_kv``: Reshape(Expand(Unsqueeze(kv, axes=[2]), ...), [B,H,T,D]) -> (kv, True)."""
    value = _skip_full_slices(graph, value)
    reshape = _producer(graph, value, "Reshape")
    expand = _producer(graph, reshape.inputs[0], "Expand") if reshape else None
    # x[:, :, None, :, :] exports as Unsqueeze + a full Slice
    unsq = _producer(graph, _skip_full_slices(graph, expand.inputs[0]), "Unsqueeze") if expand else None
    if unsq is None:
        return value, False
    axes = ints(graph, unsq.input(1)) if unsq.input(1) else unsq.attr("axes")
    if axes is None or list(axes) != [2]:
        return value, False
    return _skip_full_slices(graph, unsq.inputs[0]), True


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


def _check(graph: Graph, m: Match) -> str | None:
    reason = require_opset(graph, 23, "Attention")
    if reason:
        return reason
    probs = m["p"]
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
    key = _untranspose_key(graph, key_t)
    if key is None:
        return "cannot see K through the K^T of the score MatMul (unknown transpose form)"
    key, key_repeated = _unrepeat(graph, key)
    value, value_repeated = _unrepeat(graph, m["v"])
    if key_repeated != value_repeated:
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
    if kv_heads != q_heads and not key_repeated:
        return "fewer key/value heads than query heads, but no repeat_kv found"
    m.values.update(q=query, k=k_new, v=v_new, mask=mask, past_k=past_k, past_v=past_v)
    m.values.update(scale=repr(q_scale * k_scale * post_scale), q_heads=str(q_heads), kv_heads=str(kv_heads))
    m.values.update(present_k=cat_k.outputs[0] if cat_k else "", present_v=cat_v.outputs[0] if cat_v else "")
    return None


def _rewrite(b, m: Match) -> dict[str, str]:
    cached = bool(m["present_k"])
    inputs = [m["q"], m["k"], m["v"], m["mask"]] + ([m["past_k"], m["past_v"]] if cached else [])
    outputs = b.op(
        "Attention",
        inputs,
        outputs=3 if cached else 1,
        q_num_heads=int(m["q_heads"]),
        kv_num_heads=int(m["kv_heads"]),
        scale=float(m["scale"]),
    )
    replaced = {m.root.outputs[0]: outputs[0]}
    if cached:
        replaced[m["present_k"]] = outputs[1]
        replaced[m["present_v"]] = outputs[2]
    return replaced


RULES = RuleSet(
    "attention",
    [RewriteRule("sdpa", Op("MatMul", Var("p"), Var("v")), _rewrite, check=_check)],
    min_miss_depth=100,
)


@register_pass("fuse-attention")
class FuseAttention(RewritePass):
    """Rewrites softmax(Q·Kᵀ·scale + mask)·V, with KV-cache concats and GQA repeats, into Attention (opset 23)."""

    rules = RULES
