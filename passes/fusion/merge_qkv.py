"""``merge-qkv``: sibling projections of one input into one MatMul and a Split.

Attention's q, k and v projections (and an MLP's gate and up projections) read the same activation with
three (two) constant weights. One MatMul over the concatenated weight reads the activation once and gives
the kernels one larger matrix, which is what decode, a matrix-vector product per token, wants; the Split
hands each consumer its slice. The merged weight is named after the common prefix of the originals
(``model.layers.0.self_attn.q_proj.weight`` + ``...k_proj...`` -> ``model.layers.0.self_attn.qkv_proj.weight``).
"""

from __future__ import annotations

import os

import numpy as np
from pydantic import Field

from llmc.ir import Graph, Node
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.rewrite import RULE_KEY


def merged_name(names: list[str]) -> str:
    """``a.q_proj.weight`` + ``a.k_proj.weight`` + ``a.v_proj.weight`` -> ``a.qkv_proj.weight``."""
    parts = [n.split(".") for n in names]
    if len({len(p) for p in parts}) == 1:
        differing = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
        if len(differing) == 1:
            i = differing[0]
            pieces = [p[i] for p in parts]
            suffix = os.path.commonprefix([s[::-1] for s in pieces])[::-1]
            heads = "".join(s[: len(s) - len(suffix)] for s in pieces)
            return ".".join([*parts[0][:i], heads + suffix, *parts[0][i + 1 :]])
    return os.path.commonprefix(names).rstrip("._/") + ".merged"


@register_pass("merge-qkv")
class MergeQKV(Pass):
    """Rewrites sibling MatMuls of one input with constant weights (q/k/v, gate/up) into one MatMul and a Split."""

    class Options(PassOptions):
        min_siblings: int = Field(
            default=2, ge=2, description="merge when at least this many MatMuls share an input"
        )
        max_siblings: int = Field(default=3, ge=2, description="merge at most this many (q, k, v)")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        merged = 0
        for value in list(_values_with_matmul_users(graph)):
            groups = _sibling_groups(graph, value)
            for group in groups:
                if self.options.min_siblings <= len(group) <= self.options.max_siblings:
                    _merge(graph, value, group)
                    merged += 1
        for node in graph.nodes():
            for sub in node.all_subgraphs():
                merged += self.run(sub, ctx).stats.get("merged", 0)
        return PassResult(changed=merged > 0, stats={"merged": merged})


def _values_with_matmul_users(graph: Graph) -> list[str]:
    seen: dict[str, None] = {}
    for node in graph.nodes():
        if node.op_type == "MatMul" and not node.domain:
            seen.setdefault(node.inputs[0], None)
    return list(seen)


def _sibling_groups(graph: Graph, value: str) -> list[list[Node]]:
    """MatMuls reading ``value`` as their left operand with a 2-D constant float weight, grouped by rows."""
    by_rows: dict[tuple[int, str], list[Node]] = {}
    for node, slot in graph.uses(value):
        if node.op_type != "MatMul" or node.domain or slot != 0:
            continue
        weight = graph.constant(node.inputs[1])
        if (
            weight is None
            or weight.ndim != 2
            or weight.dtype.kind != "f"
            or not graph.is_initializer(node.inputs[1])
        ):
            continue
        by_rows.setdefault((weight.shape[0], str(weight.dtype)), []).append(node)
    return [sorted(g, key=lambda n: n.order) for g in by_rows.values() if len(g) > 1]


def _merge(graph: Graph, value: str, group: list[Node]) -> None:
    weights = [graph.initializers[n.inputs[1]] for n in group]
    name = graph.add_initializer(merged_name([n.inputs[1] for n in group]), np.concatenate(weights, axis=1))
    widths = np.array([w.shape[1] for w in weights], dtype=np.int64)
    first = group[0]
    stem = first.name or "matmul"
    meta = {RULE_KEY: "merge-qkv"}
    out = graph.add_node(
        "MatMul",
        [value, name],
        [graph.unique_name(f"{name}/out")],
        name=graph.unique_node_name(f"{stem}/merged"),
        order=first.order,
        metadata=meta,
    ).outputs[0]
    split_sizes = graph.add_initializer(f"{name}/split", widths)
    pieces = graph.add_node(
        "Split",
        [out, split_sizes],
        [graph.unique_name(f"{n.outputs[0]}/split") for n in group],
        attributes={"axis": -1},
        name=graph.unique_node_name(f"{stem}/split"),
        order=first.order,
        metadata=meta,
    ).outputs
    for node, piece in zip(group, pieces, strict=True):
        info = graph.values.get(node.outputs[0])
        if info is not None:
            graph.set_value_info(piece, info.dtype, info.shape)
        graph.replace_all_uses(node.outputs[0], piece)
        if not any(graph.is_used(o) for o in node.outputs if o):
            graph.remove_node(node)
