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

from llmc.pass_manager import register_pass
from llmc.rewrite import Match, Op, RewritePass, RewriteRule, RuleSet, Var

from ._sdpa import trace_sdpa
from ._values import require_opset


def _check(graph, m: Match) -> str | None:
    reason = require_opset(graph, 23, "Attention")
    if reason:
        return reason
    site = trace_sdpa(graph, m.root)
    if isinstance(site, str):
        return site
    m.values.update(q=site.query, k=site.key, v=site.value, mask=site.mask)
    m.values.update(past_k=site.past_key, past_v=site.past_value)
    m.values.update(scale=repr(site.scale), q_heads=str(site.q_heads), kv_heads=str(site.kv_heads))
    m.values.update(
        present_k=site.cache_key.outputs[0] if site.cache_key else "",
        present_v=site.cache_value.outputs[0] if site.cache_value else "",
    )
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
