"""What ``llmc inspect`` shows: a JSON-able description of a model and a Graphviz rendering of its graph.

The dot text is written by hand (a few lines) rather than through pydot/graphviz, which would be extra
dependencies for a debugging view.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from llmc.ir import Graph, onnx_dtype_to_np


def _sig(graph: Graph, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        info = graph.value_info(name)
        dtype = str(onnx_dtype_to_np(info.dtype)) if info and info.dtype else "?"
        rows.append(
            {
                "name": name,
                "dtype": dtype,
                "shape": None if not info or info.shape is None else list(info.shape),
            }
        )
    return rows


def describe(graph: Graph, path: Path | None = None) -> dict[str, Any]:
    ops: Counter = Counter()
    for _g, node in graph.walk():
        ops[f"{node.domain}.{node.op_type}" if node.domain else node.op_type] += 1
    file_bytes = 0
    if path is not None:
        file_bytes = os.path.getsize(path)
        data = Path(str(path) + ".data")
        if data.exists():
            file_bytes += os.path.getsize(data)
    largest = sorted(graph.initializers, key=lambda n: -graph.initializers.nbytes(n))[:10]
    return {
        "path": str(path) if path else None,
        "nodes": sum(ops.values()),
        "params": int(sum(graph.initializers[n].size for n in graph.initializers)),
        "weight_bytes": graph.initializers.nbytes(),
        "file_bytes": file_bytes,
        "opsets": dict(sorted(graph.opset_imports.items())),
        "inputs": _sig(graph, graph.inputs),
        "outputs": _sig(graph, graph.outputs),
        "ops": dict(ops.most_common()),
        "largest_weights": [
            {
                "name": n,
                "dtype": str(graph.initializers[n].dtype),
                "shape": list(graph.initializers[n].shape),
                "bytes": graph.initializers.nbytes(n),
            }
            for n in largest
        ],
    }


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: Graph) -> str:
    """Graphviz text: ops as boxes, graph inputs/outputs as ellipses, edges labelled with value names."""
    lines = ["digraph llmc {", "  rankdir=TB;", "  node [fontsize=10];"]
    for name in graph.inputs:
        lines.append(f"  {_quote('in:' + name)} [shape=ellipse, label={_quote(name)}];")
    for name in graph.outputs:
        lines.append(f"  {_quote('out:' + name)} [shape=ellipse, label={_quote(name)}];")
    for node in graph.nodes():
        label = node.op_type + (f"\\n{node.name}" if node.name else "")
        lines.append(f"  n{node.id} [shape=box, label={_quote(label)}];")
        for value in node.inputs:
            if value in graph.inputs:
                lines.append(f"  {_quote('in:' + value)} -> n{node.id};")
    for u, v, key in graph.nx.edges(keys=True):
        lines.append(f"  n{u} -> n{v} [label={_quote(key[0])}, fontsize=8];")
    for name in graph.outputs:
        producer = graph.producer(name)
        if producer is not None:
            lines.append(f"  n{producer.id} -> {_quote('out:' + name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
