"""Deterministic, diffable text of the IR, its structural hash, a one-line summary and dump diffs.

The text is ONNX's own syntax (``onnx.printer``) with tensors over a size elided to a digest reference, in
the IR's stable topological order, so that ``diff`` between two dumps shows exactly what a pass did.
The structural hash covers nodes, attributes, subgraphs, interface and value types, and each weight's
name, dtype, shape and version token (not its bytes), so it is cheap even on large models.
"""

from __future__ import annotations

import difflib
import hashlib
from collections import Counter
from dataclasses import dataclass

import onnx
import onnx.printer

from llmc.ir.convert import to_onnx
from llmc.ir.graph import Graph

ELIDE_ABOVE = 256  # bytes: larger tensors print as a digest reference


def to_text(graph: Graph, *, elide_above: int = ELIDE_ABOVE) -> str:
    """The model in ONNX text syntax, large tensors elided."""
    return onnx.printer.to_text(to_onnx(graph, weights="elide", elide_above=elide_above))


def structural_hash(graph: Graph) -> str:
    """A digest that changes whenever the graph, its interface or any weight entry changes."""
    h = hashlib.sha256()
    _hash_graph(graph, h)
    for domain, version in sorted(graph.opset_imports.items()):
        h.update(f"opset {domain}:{version};".encode())
    for key, value in sorted(graph.metadata_props.items()):
        h.update(f"meta {key}={value};".encode())
    return h.hexdigest()[:16]


def _hash_graph(graph: Graph, h: hashlib._Hash) -> None:
    h.update(f"graph {graph.name} in={graph.inputs} out={graph.outputs};".encode())
    for name in sorted(graph.values):
        info = graph.values[name]
        h.update(f"vi {name} {info.dtype} {info.shape};".encode())
    for name in sorted(graph.initializers):
        arr = graph.initializers[name]
        h.update(f"w {name} {arr.dtype} {arr.shape} {graph.initializers.token(name)};".encode())
    for node in graph.nodes():
        h.update(f"n {node.domain}:{node.op_type} {node.name} {node.inputs} {node.outputs};".encode())
        h.update(f"d {node.doc_string!r} {sorted(node.metadata.items())};".encode())
        for key in sorted(node.attributes):
            h.update(key.encode())
            h.update(node.attributes[key].SerializeToString(deterministic=True))
        for sub in node.all_subgraphs():
            _hash_graph(sub, h)


@dataclass
class Summary:
    """Counts that the pass table and dump headers show."""

    nodes: int
    ops: Counter
    params: int
    weight_bytes: int

    def line(self) -> str:
        top = ", ".join(f"{op}×{n}" for op, n in self.ops.most_common(6))
        return f"{self.nodes} nodes, {self.params:,} params, {self.weight_bytes / 1e6:.2f} MB weights [{top}]"


def summarize(graph: Graph) -> Summary:
    ops: Counter = Counter()
    nodes = 0
    for _g, node in graph.walk():
        nodes += 1
        ops[node.op_type if not node.domain else f"{node.domain}.{node.op_type}"] += 1
    params = sum(int(graph.initializers[n].size) for n in graph.initializers)
    return Summary(nodes, ops, params, graph.initializers.nbytes())


def summary_delta(before: Summary, after: Summary) -> str:
    """ "+2 Gelu, -10 Mul, -8 Erf; params 1,234 -> 1,234; bytes 4.9 MB -> 2.4 MB"."""
    changes = []
    for op in sorted(set(before.ops) | set(after.ops)):
        d = after.ops[op] - before.ops[op]
        if d:
            changes.append(f"{d:+d} {op}")
    text = ", ".join(changes) if changes else "no op change"
    return (
        f"{text}; nodes {before.nodes} -> {after.nodes}; params {before.params:,} -> {after.params:,}; "
        f"weights {before.weight_bytes / 1e6:.2f} MB -> {after.weight_bytes / 1e6:.2f} MB"
    )


def text_diff(before: str, after: str, before_name: str = "before", after_name: str = "after") -> str:
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True), after.splitlines(keepends=True), before_name, after_name, n=2
        )
    )
