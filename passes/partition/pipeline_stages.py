"""``partition-pipeline``: give every node a pipeline stage (``llmc.stage`` metadata), cutting between layers.

The IR stays one graph, so every other pass and the verifier keep working; the CPU target splits it into one
ONNX model per stage at emit (``llmc.targets.cpu.stages``).

How the cut is found, on the networkx graph:

1. *Units* (the blocks a cut may not split). When weight or node names carry a layer number
   (``model.layers.7.``, ``layer.3.``, ``h.5.``, ``blocks.2.``), a node takes the highest layer among its
   own weights' number and its producers' units (so no value flows back to an earlier unit); then, consumers
   first, a node that reads no numbered weight sinks to the unit of its first consumer when that does not
   make more values cross. A layer's input norm joins its layer and a mask or rotary table joins the first
   layer that reads it, so what crosses a cut is the residual stream and the values all layers share.
   Without layer names the topological order is cut where the fewest values cross, and a unit is the run
   of nodes between two such narrow points.
2. *Cost* of a unit: the bytes of the initializers it reads (a weight read by two units counts in both:
   the stages holding them each hold a copy) and a FLOP estimate per token (MatMul/Gemm ``2·M·K·N`` from
   shapes, symbolic dims taken as 1, from the IR or ONNX shape inference; else ``2·weight elements``;
   other ops one FLOP per output element). ``balance`` picks bytes, FLOPs or both (each normalised to its
   total, then averaged).
3. The units, in order, are split into K contiguous groups minimising the largest group cost (the linear
   partition problem, solved exactly by dynamic programming: a few dozen units).

Hand-written because the cut rules are llmc's (layer names, sinking shared values to their first reader);
networkx supplies the graph and its topological order.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
import onnx
from pydantic import ConfigDict, Field

from llmc.errors import PassError
from llmc.ir import Graph, Node, ValueInfo, to_onnx
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass

STAGE_KEY = "llmc.stage"
_LAYER = re.compile(r"(?:^|[./_])(?:layers?|h|blocks?)[./_](\d+)(?=[./_]|$)")
_MATMULS = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "FusedMatMul"}


class PartitionOptions(PassOptions):
    model_config = ConfigDict(use_attribute_docstrings=True)

    stages: int = Field(2, ge=1)
    """Number of pipeline stages K."""
    balance: Literal["params", "flops", "both"] = "both"
    """What the stages balance: parameter bytes, FLOPs per token, or both (averaged shares)."""


def node_reads(node: Node) -> list[str]:
    """The values a node reads, its subgraphs' reads of this scope included."""
    return [v for v in (*node.inputs, *node.implicit_inputs) if v]


# -- cost model ---------------------------------------------------------------------------------------
def inferred_value_infos(graph: Graph) -> dict[str, ValueInfo]:
    """Dtype and shape of every value ONNX shape inference can type, run on a weight-less copy of the model."""
    skeleton = to_onnx(graph, weights="external", elide_above=0)  # initializer dims and types, no bytes
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception:  # inference only helps: unknown shapes fall back to weight sizes
        return {}
    infos = {}
    for vi in inferred.graph.value_info:
        tensor = vi.type.tensor_type
        if vi.type.HasField("tensor_type"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
            )
            infos[vi.name] = ValueInfo(vi.name, tensor.elem_type, dims if tensor.HasField("shape") else None)
    return infos


class CostModel:
    """Parameter bytes and FLOPs per token of nodes; shapes from the IR, else from shape inference."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._inferred: dict[str, ValueInfo] | None = None

    def dims(self, value: str) -> list[int] | None:
        """The shape of ``value`` with symbolic or unknown dims taken as 1 (costs per token)."""
        shape = self.graph.shape(value) if value else None
        if shape is None and value:
            if self._inferred is None:
                self._inferred = inferred_value_infos(self.graph)
            info = self._inferred.get(value)
            shape = info.shape if info else None
        return None if shape is None else [d if isinstance(d, int) and d > 0 else 1 for d in shape]

    def weight_behind(self, value: str, depth: int = 3) -> np.ndarray | None:
        """The initializer a value is (or is a Transpose/Cast/Reshape/DequantizeLinear... of)."""
        for _ in range(depth + 1):
            if self.graph.is_constant(value):
                return self.graph.initializers[value]
            producer = self.graph.producer(value)
            if producer is None or not producer.inputs:
                return None
            value = producer.inputs[0]
        return None

    def flops(self, node: Node) -> float:
        """FLOPs per token of one node (an estimate: matrix products dominate, the rest counts outputs)."""
        if node.op_type in _MATMULS and len(node.inputs) >= 2:
            a, b = self.dims(node.input(0)), self.dims(node.input(1))
            if a and b and len(b) >= 2:
                k = a[-1] if node.op_type != "Gemm" or not node.attr("transA", 0) else a[0]
                n = b[-1] if node.op_type != "Gemm" or not node.attr("transB", 0) else b[0]
                rows = int(np.prod(a[:-1])) if len(a) > 1 else 1
                batch = int(np.prod(b[:-2])) if len(b) > 2 and len(a) <= 2 else 1
                return 2.0 * rows * batch * k * n
            weight = self.weight_behind(node.input(1))
            return 2.0 * weight.size if weight is not None else 0.0
        if node.op_type == "MatMulNBits":
            return 2.0 * int(node.attr("K", 0)) * int(node.attr("N", 0))
        if node.op_type == "Conv" and len(node.inputs) >= 2:
            w, out = self.dims(node.input(1)), self.dims(node.outputs[0])
            if w:
                return 2.0 * float(np.prod(w[1:])) * (float(np.prod(out)) if out else float(w[0]))
        return float(sum(np.prod(d) for d in (self.dims(o) for o in node.outputs if o) if d is not None))


def unit_costs(
    graph: Graph, nodes: list[Node], units: dict[int, int], n_units: int
) -> tuple[np.ndarray, ...]:
    """(parameter bytes, FLOPs per token) of each unit; a weight read by several units counts in each,
    since each stage holding one of them holds a copy (a tied embedding sits in the first and last)."""
    model = CostModel(graph)
    held: list[set[str]] = [set() for _ in range(n_units)]
    flops = np.zeros(n_units)
    for node in nodes:
        held[units[node.id]].update(v for v in node_reads(node) if graph.is_constant(v))
        flops[units[node.id]] += model.flops(node)
    params = np.array([sum(graph.initializers.nbytes(v) for v in names) for names in held], dtype=np.float64)
    return params, flops


# -- units --------------------------------------------------------------------------------------------
def _layer_number(graph: Graph, node: Node) -> int | None:
    numbers = [int(m.group(1)) for v in node_reads(node) if graph.is_constant(v) for m in _LAYER.finditer(v)]
    if not numbers and node.name:
        numbers = [int(m.group(1)) for m in _LAYER.finditer(node.name)]
    return max(numbers) if numbers else None


def layer_units(graph: Graph, nodes: list[Node]) -> dict[int, int] | None:
    """Node id -> unit from layer numbers in names (dense 0..L-1), or None when no name has one.

    First every node takes the highest layer among its own weights' number and its producers' units, so
    that no edge points to an earlier unit. Then, consumers first, a node that reads no numbered weight
    sinks to the unit of its first consumer when that does not make more values cross: a layer's input
    norm joins its layer, a mask joins the first layer that reads it, and the residual stream and the
    values that all layers share are what crosses a cut.
    """
    own = {node.id: _layer_number(graph, node) for node in nodes}
    found = sorted({x for x in own.values() if x is not None})
    if len(found) < 2:
        return None
    dense = {x: i for i, x in enumerate(found)}
    unit: dict[int, int] = {}
    anchored: set[int] = set()  # nodes downstream of a numbered weight
    for node in nodes:
        above = [p for p, _c in graph.nx.in_edges(node.id)]
        mine = [dense[own[node.id]]] if own[node.id] is not None else []
        unit[node.id] = max([*mine, *(unit[p] for p in above)], default=0)
        if mine or any(p in anchored for p in above):
            anchored.add(node.id)
    for node in reversed(nodes):
        if own[node.id] is not None:
            continue
        below = [unit[c] for _p, c in graph.nx.out_edges(node.id)]
        if any(o in graph.outputs for o in node.outputs):
            below.append(len(found) - 1)
        if not below or min(below) <= unit[node.id]:
            continue
        if node.id not in anchored:  # computed from graph inputs and constants only: always follows
            unit[node.id] = min(below)
            continue
        made = {o for o in node.outputs if o and graph.is_used(o)}
        if _newly_crossing(graph, node, min(below), unit, anchored) <= len(made):
            unit[node.id] = min(below)
    return unit


def _newly_crossing(graph: Graph, node: Node, target: int, unit: dict[int, int], anchored: set[int]) -> int:
    """How many values ``node`` reads would start crossing a cut if it moved to unit ``target``."""
    count = 0
    for value in set(node_reads(node)):
        producer = graph.producer(value)
        if producer is None or producer.id not in anchored or unit[producer.id] >= target:
            continue  # graph inputs, constants and unanchored values follow their readers
        readers = [c for c in graph.consumers(value) if c is not node]
        if all(unit[c.id] <= unit[producer.id] for c in readers):
            count += 1
    return count


def narrow_cut_units(graph: Graph, nodes: list[Node]) -> dict[int, int]:
    """Node id -> unit, cutting the topological order wherever the fewest values cross."""
    position = {node.id: i for i, node in enumerate(nodes)}
    last_use: dict[int, int] = {}
    for node in nodes:
        for p, c in graph.nx.out_edges(node.id):
            if p != c:
                last_use[p] = max(last_use.get(p, -1), position[c])
    # width[i]: values made before position i and read at i or later (cut between i-1 and i)
    delta = np.zeros(len(nodes) + 1, dtype=np.int64)
    for nid, end in last_use.items():
        delta[position[nid] + 1] += 1
        delta[end + 1] -= 1
    width = np.cumsum(delta)
    inner = width[1 : len(nodes)]
    narrow = {i + 1 for i in np.flatnonzero(inner == inner.min())} if inner.size else set()
    unit, current = {}, 0
    for i, node in enumerate(nodes):
        if i in narrow:
            current += 1
        unit[node.id] = current
    return unit


# -- balancing ----------------------------------------------------------------------------------------
def linear_partition(costs: list[float], k: int) -> list[int]:
    """Start index of each of ``k`` contiguous groups of ``costs`` minimising the largest group sum."""
    n = len(costs)
    prefix = np.concatenate([[0.0], np.cumsum(costs)])
    inf = float("inf")
    best = np.full((k + 1, n + 1), inf)
    cut = np.zeros((k + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for g in range(1, k + 1):
        for j in range(g, n - (k - g) + 1):
            values = np.maximum(best[g - 1, g - 1 : j], prefix[j] - prefix[g - 1 : j])
            i = int(np.argmin(values))
            best[g, j], cut[g, j] = values[i], g - 1 + i
    starts, j = [], n
    for g in range(k, 0, -1):
        j = int(cut[g, j])
        starts.append(j)
    return starts[::-1]


@register_pass("partition-pipeline")
class PartitionPipeline(Pass):
    """Rewrites a graph into one whose nodes carry a pipeline stage (``llmc.stage``), cut between layers."""

    Options = PartitionOptions
    options: PartitionOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        nodes = graph.nodes()
        k = self.options.stages
        units = layer_units(graph, nodes)
        cut_by = "layer names"
        if units is None:
            units, cut_by = narrow_cut_units(graph, nodes), "narrow cuts of the topological order"
        n_units = max(units.values(), default=-1) + 1
        if k > n_units:
            raise PassError(
                self.name,
                f"cannot cut {n_units} {'layers' if cut_by == 'layer names' else 'blocks'} into {k} stages "
                f"(found by {cut_by})",
                hint=f"ask for at most {n_units} stages",
            )
        params, flops = unit_costs(graph, nodes, units, n_units)
        cost = self._cost(params, flops)
        starts = linear_partition(cost.tolist(), k)
        stage_of_unit = np.searchsorted(np.asarray(starts), np.arange(n_units), side="right") - 1
        changed = False
        for node in nodes:
            stage = str(int(stage_of_unit[units[node.id]]))
            if node.metadata.get(STAGE_KEY) != stage:
                node.metadata[STAGE_KEY] = stage
                changed = True
        details = stage_summary(graph, nodes, k)
        for row, first, end in zip(details["stages"], starts, [*starts[1:], n_units], strict=True):
            row["units"] = [int(first), int(end - 1)]
            row["cost_share"] = round(float(cost[first:end].sum() / max(cost.sum(), 1e-30)), 4)
            row["flops_per_token"] = float(flops[first:end].sum())
        details.update({"cut_by": cut_by, "units": n_units, "balance": self.options.balance})
        shares = [row["cost_share"] for row in details["stages"]]
        stats = {
            "stages": k,
            "max_cost_share": max(shares),
            "crossing_values": sum(c["count"] for c in details["cuts"]),
        }
        return PassResult(changed, stats, details)

    def _cost(self, params: np.ndarray, flops: np.ndarray) -> np.ndarray:
        share_p = params / max(params.sum(), 1e-30)
        share_f = flops / max(flops.sum(), 1e-30)
        return {"params": share_p, "flops": share_f, "both": (share_p + share_f) / 2}[self.options.balance]


def stage_summary(graph: Graph, nodes: list[Node], k: int) -> dict:
    """Per stage: nodes and the bytes of the initializers it holds; per cut: the values that cross it."""
    stage = {node.id: int(node.metadata[STAGE_KEY]) for node in nodes}
    held: list[set[str]] = [set() for _ in range(k)]
    for node in nodes:
        held[stage[node.id]].update(v for v in node_reads(node) if graph.is_constant(v))
    crossing: list[list[str]] = [[] for _ in range(max(k - 1, 0))]
    for node in nodes:
        for value in node.outputs:
            later = [stage[c.id] for c in graph.consumers(value)] if value else []
            for cut in range(stage[node.id], max(later, default=-1)):
                crossing[cut].append(value)
    rows = [
        {
            "stage": s,
            "nodes": sum(1 for node in nodes if stage[node.id] == s),
            "param_bytes": int(sum(graph.initializers.nbytes(v) for v in held[s])),
        }
        for s in range(k)
    ]
    cuts = [{"after_stage": s, "count": len(v), "values": sorted(v)} for s, v in enumerate(crossing)]
    return {"stages": rows, "cuts": cuts}
