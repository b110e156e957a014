"""``share-parameters``: store a weight once where the model holds it several times; report the bytes saved.

Three kinds of sharing, each reported apart:

* **identical** initializers (same dtype, shape and bytes) become one. ``eliminate-common-subexpressions``
  merges identical *small* initializers (≤ 64 KiB by default, keyed by their full bytes, which would copy
  every large weight); this pass merges them whatever their size, keyed by the weight store's cached content
  digest and confirmed with ``np.array_equal``. ``merge_identical_initializers`` is the shared helper.
* **transposed copies** (``tie_transposed``): an initializer B that equals Aᵀ for another initializer A — a
  tied lm_head written out as its own pre-transposed copy of the embedding (``fold-weight-transposes`` with
  ``fold_shared``) — becomes ``Transpose(A)``, so that one copy is stored. onnxruntime folds the Transpose
  once when the session starts: the file is smaller, inference is as fast. The copy is worth keeping before
  ``quantize-weights`` (which quantizes only MatMuls with their own constant weight): run this pass after
  quantization, or set ``tie_transposed: false``.
* **nearly equal** weights (``cluster_tolerance``, off by default; it changes the numbers): weights of one
  shape and dtype whose relative Frobenius distance ‖W − R‖/‖R‖ to an earlier weight R is below the tolerance
  read R instead (greedy clustering in graph order; the first weight of a cluster represents it).

Hand-written: no ONNX tool deduplicates initializers across transposes or clusters them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field

from llmc.ir import Graph
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.passes._select import WeightSelection
from llmc.passes.cleanup._common import iter_graphs
from llmc.rewrite import RULE_KEY


class ShareOptions(PassOptions):
    identical: bool = Field(default=True, description="merge initializers with equal dtype, shape and bytes")
    tie_transposed: bool = Field(
        default=True, description="store a transposed copy of another weight as Transpose(weight)"
    )
    cluster_tolerance: float | None = Field(
        default=None, gt=0, lt=1, description="share weights closer than this relative distance (lossy)"
    )
    include: list[str] = Field(default_factory=lambda: ["*"], description="clustering: weight-name globs")
    exclude: list[str] = Field(default_factory=list, description="clustering: weight-name globs to keep")
    min_size: int = Field(
        default=4096, ge=0, description="clustering and ties: smaller weights are left alone"
    )


@dataclass
class Shared:
    """One initializer that now reads another: what was dropped, what it reads, and the bytes saved."""

    dropped: str
    kept: str
    nbytes: int
    distance: float = 0.0

    def row(self) -> dict[str, object]:
        row: dict[str, object] = {"weight": self.dropped, "shared_with": self.kept, "bytes": self.nbytes}
        if self.distance:
            row["distance"] = round(self.distance, 6)
        return row


def _candidates(graph: Graph, min_size: int = 0) -> list[str]:
    """Initializers that may be replaced: not part of the graph's interface, plain numeric arrays."""
    interface = set(graph.inputs) | set(graph.outputs)
    return [
        name
        for name, array in graph.initializers.items()
        if name not in interface and array.dtype != object and array.size >= min_size
    ]


def merge_identical_initializers(graph: Graph, *, min_size: int = 0) -> list[Shared]:
    """Make every use of an initializer read the first with the same dtype, shape and bytes (one graph)."""
    first: dict[tuple, list[str]] = {}
    merged: list[Shared] = []
    for name in _candidates(graph, min_size):
        array = graph.initializers[name]
        key = (str(array.dtype), array.shape, graph.initializers.digest(name))
        group = first.setdefault(key, [])
        kept = next((k for k in group if np.array_equal(graph.initializers[k], array)), None)
        if kept is None:
            group.append(name)
            continue
        graph.replace_all_uses(name, kept)
        graph.remove_initializer(name)
        merged.append(Shared(name, kept, int(array.nbytes)))
    return merged


def _read_as_is(graph: Graph, name: str) -> bool:
    """Whether a node other than a MatMul's right operand reads the weight (an embedding Gather...)."""
    return any(not (node.op_type == "MatMul" and slot == 1) for node, slot in graph.uses(name))


def tie_transposed_copies(graph: Graph, *, min_size: int = 0) -> list[Shared]:
    """Replace an initializer equal to the transpose of another 2-D one by a Transpose of that one.

    Of the pair, the weight read as it is (an embedding's Gather) is kept; otherwise the first one."""
    matrices = [n for n in _candidates(graph, min_size) if graph.initializers[n].ndim == 2]
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in matrices:
        by_shape.setdefault(graph.initializers[name].shape, []).append(name)
    tied: list[Shared] = []
    gone: set[str] = set()
    for a in sorted(matrices, key=lambda n: not _read_as_is(graph, n)):
        if a in gone:
            continue
        wa = graph.initializers[a]
        for b in by_shape.get(wa.shape[::-1], []):
            if b == a or b in gone:
                continue
            wb = graph.initializers[b]
            if wb.dtype != wa.dtype or not np.array_equal(wb[0], wa[:, 0]) or not np.array_equal(wb, wa.T):
                continue
            _transpose_in_place_of(graph, a, b)
            gone.update((a, b))
            tied.append(Shared(b, a, int(wb.nbytes)))
            break
    return tied


def _transpose_in_place_of(graph: Graph, kept: str, copy: str) -> None:
    users = graph.consumers(copy)
    order = min((n.order for n in users), default=None)
    node = graph.add_node(
        "Transpose",
        [kept],
        [graph.unique_name(f"{kept}.T")],
        name=graph.unique_node_name(f"{kept}/transpose"),
        attributes={"perm": [1, 0]},
        order=None if order is None else order - 0.5,
        metadata={RULE_KEY: "share-parameters"},
    )
    graph.set_value_info(node.outputs[0], graph.dtype(copy), graph.initializers[copy].shape)
    graph.replace_all_uses(copy, node.outputs[0])
    graph.remove_initializer(copy)


def cluster_near_equal(
    graph: Graph, tolerance: float, select: WeightSelection, *, min_size: int = 0
) -> list[Shared]:
    """Make weights within ``tolerance`` (relative Frobenius distance) of an earlier weight read that one."""
    representatives: dict[tuple, list[tuple[str, float]]] = {}
    shared: list[Shared] = []
    for name in _candidates(graph, min_size):
        array = graph.initializers[name]
        if array.dtype.kind != "f" or not select(name):
            continue
        group = representatives.setdefault((str(array.dtype), array.shape), [])
        w = np.asarray(array, np.float32)
        best, distance = None, tolerance
        for rep, norm in group:
            d = float(np.linalg.norm(w - np.asarray(graph.initializers[rep], np.float32))) / norm
            if d < distance:
                best, distance = rep, d
        if best is None:
            norm = float(np.linalg.norm(w))
            if norm > 0:
                group.append((name, norm))
            continue
        graph.replace_all_uses(name, best)
        graph.remove_initializer(name)
        shared.append(Shared(name, best, int(array.nbytes), distance))
    return shared


@register_pass("share-parameters")
class ShareParameters(Pass):
    """Rewrites duplicated weights (identical, transposed copies, optionally near-equal) into one copy."""

    Options = ShareOptions
    options: ShareOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        kinds: dict[str, list[Shared]] = {"identical": [], "transposed": [], "clustered": []}
        for scope in list(iter_graphs(graph)):
            if o.identical:
                kinds["identical"] += merge_identical_initializers(scope)
            if o.tie_transposed:
                kinds["transposed"] += tie_transposed_copies(scope, min_size=o.min_size)
        details: dict[str, object] = {}
        if o.cluster_tolerance is not None:
            select = WeightSelection(o.include, o.exclude)
            kinds["clustered"] = cluster_near_equal(graph, o.cluster_tolerance, select, min_size=o.min_size)
            unmatched = select.warn_unmatched(ctx.log, self.name)
            if unmatched:
                details["unmatched_patterns"] = unmatched
        stats: dict[str, int | float] = {k: len(v) for k, v in kinds.items() if v}
        stats["bytes_saved"] = sum(s.nbytes for v in kinds.values() for s in v)
        details.update({k: [s.row() for s in v] for k, v in kinds.items() if v})
        return PassResult(changed=any(kinds.values()), stats=stats, details=details)
