"""Small facts about values and nodes that fusion checks ask: constant scalars, axes, slices, dims, opsets."""

from __future__ import annotations

import numpy as np

from llmc.ir import Graph, Node

_INT_MAX = np.iinfo(np.int64).max


def scalar(graph: Graph, value: str) -> float | None:
    """The value of a constant with exactly one element, else None."""
    array = graph.constant(value) if value else None
    if array is None or array.size != 1:
        return None
    return float(np.asarray(array, dtype=np.float64).reshape(()))


def ints(graph: Graph, value: str) -> list[int] | None:
    array = graph.constant(value) if value else None
    return None if array is None else [int(v) for v in np.asarray(array).reshape(-1)]


def single_axis(node: Node, graph: Graph) -> int | None:
    """The one axis of a Concat/Softmax-like attribute ``axis``, or of an ``axes`` input/attribute."""
    axis = node.attr("axis")
    if axis is not None:
        return int(axis)
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1:
        axes = ints(graph, node.inputs[1])
    return int(axes[0]) if axes is not None and len(axes) == 1 else None


def last_dim(graph: Graph, value: str) -> int | None:
    shape = graph.shape(value)
    if not shape or not isinstance(shape[-1], int):
        return None
    return shape[-1]


def dim(graph: Graph, value: str, axis: int) -> int | None:
    shape = graph.shape(value)
    if shape is None or len(shape) <= axis or not isinstance(shape[axis], int):
        return None
    return shape[axis]


def is_half_slice(graph: Graph, node: Node, start: int, end: int | None) -> bool:
    """Whether a Slice takes [start, end) of the last axis with step 1 (end None: to the end)."""
    starts, ends = ints(graph, node.input(1)), ints(graph, node.input(2))
    axes = ints(graph, node.input(3)) if node.input(3) else None
    steps = ints(graph, node.input(4)) if node.input(4) else [1]
    rank = len(graph.shape(node.inputs[0]) or ())
    if starts is None or ends is None or steps != [1] or len(starts) != 1:
        return False
    if axes is not None and axes[0] not in (-1, rank - 1):
        return False
    if axes is None and rank != 1:
        return False
    full = graph.shape(node.inputs[0])[-1] if rank else None
    end_ok = ends[0] >= _INT_MAX // 2 or ends[0] == full if end is None else ends[0] == end
    return starts[0] == start and end_ok


def require_opset(graph: Graph, version: int, op: str) -> str | None:
    have = graph.root().opset_imports.get("", 0)
    if have < version:
        return f"model opset {have} < {version} (needed by {op}): put upgrade-opset before this pass"
    return None
