"""Shrinking one axis of a pruning site everywhere it appears: weight columns and rows, Split sizes, Reshape
shape constants and the shapes recorded for values.

Constants that other nodes may share (a Reshape's shape, a Split's sizes) are never edited in place: the
edited copy is a new initializer. A weight read by one node only is replaced in place.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from llmc.ir import Graph, Node

from ._sites import SiteError, Source, split_sizes


def set_weight(graph: Graph, node: Node, slot: int, array: np.ndarray) -> int:
    """Give ``node`` the constant ``array`` at ``slot``; returns the bytes this saves."""
    name = node.inputs[slot]
    saved = graph.initializers[name].nbytes - array.nbytes
    if len(graph.uses(name)) == 1 and name not in graph.inputs:
        graph.set_initializer(name, np.ascontiguousarray(array))
    else:
        graph.set_input(node, slot, graph.add_initializer(f"{name}.pruned", np.ascontiguousarray(array)))
    return int(saved)


def resize(graph: Graph, value: str, axis: int, size: int) -> None:
    """Record ``size`` as the static dim ``axis`` of ``value`` (symbolic dims stay as they are)."""
    info = graph.values.get(value)
    if info is None or info.shape is None or not info.shape:
        return
    shape = list(info.shape)
    axis %= len(shape)
    if isinstance(shape[axis], int):
        shape[axis] = size
        graph.set_value_info(value, info.dtype, shape)


def keep_columns(graph: Graph, sources: list[Source], keeps: list[np.ndarray]) -> int:
    """Keep the columns ``keeps[i]`` (local to the segment) of each source; Splits get their new sizes."""
    by_matmul: dict[int, list[tuple[Source, np.ndarray]]] = defaultdict(list)
    for source, keep in zip(sources, keeps, strict=True):
        by_matmul[source.matmul.id].append((source, np.asarray(keep, np.int64)))
    saved = 0
    for pairs in by_matmul.values():
        matmul, split = pairs[0][0].matmul, pairs[0][0].split
        w = graph.initializers[matmul.inputs[1]]
        if split is None:
            cols, sizes = pairs[0][1], None
        else:
            sizes = split_sizes(graph, split, w.shape[1])
            wanted = {s.split_index: keep for s, keep in pairs}
            offsets = np.cumsum([0, *sizes])
            pieces = [
                offsets[j] + wanted[j] if j in wanted else np.arange(offsets[j], offsets[j + 1])
                for j in range(len(sizes))
            ]
            sizes = [len(p) for p in pieces]
            cols = np.concatenate(pieces)
        saved += set_weight(graph, matmul, 1, w[:, cols])
        resize(graph, matmul.outputs[0], -1, len(cols))
        if split is not None:
            _set_split_sizes(graph, split, sizes)
    return saved


def _set_split_sizes(graph: Graph, split: Node, sizes: list[int]) -> None:
    if split.attr("split") is not None:  # opset < 13
        split.set_attr("split", sizes)
    else:
        name = graph.add_initializer(f"{split.name or split.outputs[0]}/sizes", np.asarray(sizes, np.int64))
        split.attributes.pop("num_outputs", None)
        if split.input(1):
            graph.set_input(split, 1, name)
        else:
            graph.set_inputs(split, [split.inputs[0], name])
    for value, size in zip(split.outputs, sizes, strict=True):
        resize(graph, value, -1, size)


def keep_rows(graph: Graph, matmul: Node, keep: np.ndarray) -> int:
    w = graph.initializers[matmul.inputs[1]]
    return set_weight(graph, matmul, 1, w[np.asarray(keep, np.int64)])


def refit_rows(graph: Graph, matmul: Node, keep: np.ndarray, gram: np.ndarray, damp: float = 0.1) -> int:
    """Keep the rows ``keep`` of ``matmul``'s weight W, re-fitted so that the kept inputs reproduce the old
    output on the calibration activations X (``gram`` = XᵀX): W' = argmin ‖X_k W' − X W‖² + λ‖W' − W_k‖²,
    i.e. (G_kk + λI) W' = G_k: W + λ W_k, with λ a ``damp`` share of G_kk's mean diagonal. Pulling W' towards
    the rows it replaces (not towards 0) keeps the refit sane where the calibration tokens do not span the
    inputs (a few thousand tokens against an MLP width of thousands)."""
    keep = np.asarray(keep, np.int64)
    w = graph.initializers[matmul.inputs[1]]
    w64 = w.astype(np.float64)
    g_kk = gram[np.ix_(keep, keep)]
    lam = damp * float(np.mean(np.diag(g_kk))) or damp
    refit = np.linalg.solve(g_kk + lam * np.eye(len(keep)), gram[keep] @ w64 + lam * w64[keep])
    return set_weight(graph, matmul, 1, refit.astype(w.dtype))


def keep_vector(graph: Graph, node: Node, slot: int, keep: np.ndarray) -> int:
    """A constant per-channel vector (bias, scale) of shape [..., width] keeps the entries ``keep``."""
    v = graph.constant(node.inputs[slot])
    return set_weight(graph, node, slot, v[..., np.asarray(keep, np.int64)])


def fix_reshape(graph: Graph, reshape: Node, axis: int, old: int, new: int) -> None:
    """Make the Reshape's target shape give ``new`` at ``axis`` where it said ``old`` (``-1`` stays)."""
    shape_value = reshape.inputs[1]
    const = graph.constant(shape_value)
    if const is not None:
        entry = int(const.reshape(-1)[axis])
        if entry != -1:
            _check_entry(reshape, axis, entry, old)
            edited = np.array(const, copy=True).reshape(-1)
            edited[axis] = new
            graph.set_input(reshape, 1, graph.add_initializer(f"{shape_value}.pruned", edited))
        return
    concat = graph.producer(shape_value)
    rank = len(graph.shape(reshape.outputs[0]) or ())
    if concat is None or concat.op_type != "Concat" or concat.attr("axis", 0) != 0 or not rank:
        raise SiteError(f"{reshape.label}: its target shape is computed at run time; cannot set heads")
    remaining = rank - 1 - axis  # entries after ``axis``
    for slot in range(len(concat.inputs) - 1, -1, -1):
        piece = concat.inputs[slot]
        length = _piece_length(graph, piece, one_each=len(concat.inputs) == rank)
        if length is None:
            raise SiteError(f"{concat.label}: cannot tell which entry of the shape holds the heads")
        if remaining >= length:
            remaining -= length
            continue
        index = length - 1 - remaining
        value = graph.constant(piece)
        if value is None:
            raise SiteError(f"{concat.label}: the heads entry of the target shape is computed at run time")
        entry = int(value.reshape(-1)[index])
        if entry != -1:
            _check_entry(reshape, axis, entry, old)
            edited = np.array(value, copy=True).reshape(-1)
            edited[index] = new
            if len(graph.consumers(shape_value)) > 1:  # shared by other Reshapes: edit a copy
                concat = graph.add_node(
                    "Concat",
                    concat.inputs,
                    [graph.unique_name(f"{shape_value}.pruned")],
                    attributes={"axis": 0},
                    order=reshape.order - 0.5,
                )
                info = graph.value_info(shape_value)
                graph.set_value_info(concat.outputs[0], info.dtype if info else 7, (rank,))
                graph.set_input(reshape, 1, concat.outputs[0])
            graph.set_input(concat, slot, graph.add_initializer(f"{piece}.pruned", edited))
        return
    raise SiteError(f"{reshape.label}: its target shape has fewer than {axis + 1} entries")


def _piece_length(graph: Graph, piece: str, *, one_each: bool) -> int | None:
    """Entries a 1-D piece of a Concat'ed shape holds: from the constant, the recorded shape, or 1 when the
    Concat has as many pieces as the shape has entries (every piece holds at least one)."""
    const = graph.constant(piece)
    if const is not None:
        return int(const.size)
    shape = graph.shape(piece)
    if shape is not None and len(shape) == 1 and isinstance(shape[0], int):
        return shape[0]
    return 1 if one_each else None


def _check_entry(reshape: Node, axis: int, entry: int, old: int) -> None:
    if entry != old:
        raise SiteError(f"{reshape.label}: target shape entry {axis} is {entry}, expected {old} or -1")
