"""``eliminate-common-subexpressions``: nodes that compute the same thing from the same inputs become one.

Two nodes are the same when op, domain, overload, attributes (compared as deterministically serialized
protos, in name order), inputs (by producing node and slot, so that renames during the pass do not hide a
match; empty optional inputs keep their slots) and the shape of their output list (which slots are
present) are. The first in topological order is kept and every use of the other's outputs, subgraph reads
and graph outputs included, reads the kept node's outputs (``Graph.replace_all_uses`` keeps graph output
names). Never merged: non-deterministic ops (two RandomNormal draws are two different tensors) and nodes
with subgraphs (comparing bodies structurally is not worth it for a cleanup).

Optionally, small initializers with the same dtype, shape and bytes are merged too (within one graph;
initializers that are graph inputs or outputs keep their identity).
"""

from __future__ import annotations

from collections.abc import Hashable

from pydantic import ConfigDict

from llmc.ir import Graph, Node
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.passes.cleanup._common import is_non_deterministic, iter_graphs


class CSEOptions(PassOptions):
    model_config = ConfigDict(use_attribute_docstrings=True)  # the docstrings below describe the options

    merge_initializers: bool = True
    """Merge initializers with equal dtype, shape and bytes."""
    max_initializer_bytes: int = 1 << 16
    """Only initializers up to this size are compared (hashing big weights costs time, and two equal
    big weights are rare)."""


@register_pass("eliminate-common-subexpressions")
class EliminateCommonSubexpressions(Pass):
    """Rewrites nodes (and small initializers) that compute the same value into one shared node."""

    Options = CSEOptions
    options: CSEOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = {"initializers": 0, "nodes": 0}
        for scope in iter_graphs(graph):
            if self.options.merge_initializers:
                stats["initializers"] += self._merge_initializers(scope)
            stats["nodes"] += _merge_nodes(scope)
        return PassResult(any(stats.values()), {k: v for k, v in stats.items() if v})

    def _merge_initializers(self, graph: Graph) -> int:
        interface = set(graph.inputs) | set(graph.outputs)
        first: dict[tuple, str] = {}
        merged = 0
        for name in list(graph.initializers):
            array = graph.initializers[name]
            if (
                name in interface
                or array.dtype == object
                or array.nbytes > self.options.max_initializer_bytes
            ):
                continue
            key = (str(array.dtype), array.shape, array.tobytes())
            kept = first.setdefault(key, name)
            if kept != name:
                graph.replace_all_uses(name, kept)
                graph.remove_initializer(name)
                merged += 1
        return merged


def _merge_nodes(graph: Graph) -> int:
    seen: dict[Hashable, Node] = {}
    merged = 0
    for node in graph.nodes():
        if node.subgraphs or is_non_deterministic(node) or not any(node.outputs):
            continue
        key = _key(graph, node)
        kept = seen.setdefault(key, node)
        if kept is node:
            continue
        for mine, theirs in zip(node.outputs, kept.outputs, strict=True):
            if mine:
                graph.replace_all_uses(mine, theirs)
        graph.remove_node(node)
        merged += 1
    return merged


def _key(graph: Graph, node: Node) -> Hashable:
    inputs = []
    for value in node.inputs:
        entry = graph.producer_slot(value) if value else None
        inputs.append(("node", entry[0].id, entry[1]) if entry else ("value", value))
    attributes = tuple(
        (name, node.attributes[name].SerializeToString(deterministic=True))
        for name in sorted(node.attributes)
    )
    present = tuple(bool(v) for v in node.outputs)
    return (node.domain, node.op_type, node.overload, tuple(inputs), attributes, present)
