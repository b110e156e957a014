"""Tensor parallelism for the tpu target: which weight arguments are split over the spec's device mesh.

``targets.tpu.mesh`` names a device mesh (``{shape: {model: 2}}``) and what to split over its tensor axis.
The split is Megatron's: the q/k/v projections by columns (whole heads per device), o_proj by rows; the FFN's
gate/up projections by columns and its down projection by rows. Each device then computes its own heads and
channels, and the partial o_proj/down products are summed by one all-reduce per block. llmc only states the
shardings of the weight *arguments* (``jax.jit(in_shardings=NamedSharding(...))`` over an ``AbstractMesh``, so
exporting needs no devices); the partitioner (Shardy/GSPMD in XLA) propagates them and inserts the
collectives, and the exported StableHLO carries them as ``sdy.sharding`` attributes with ``nr_devices`` equal
to the mesh size. Shardings are placement, not semantics: any choice gives the unsharded module's results.

**Finding the projections** is done on the ONNX graph, by hand (no library reads transformer structure off an
ONNX graph): from each standard ``Attention`` node back through Reshape/Transpose/RotaryEmbedding/bias Add to
the MatMul whose weight feeds q, k and v, and forward through Transpose/Reshape to the MatMul that reads its
output (o_proj); an FFN is a MatMul (down) whose left operand is computed element-wise (activation, gate
product, bias) from the outputs of MatMuls with weights (gate, up). Weights may be plain arguments or the
arguments of a DequantizeLinear (its scales and zero points are split along with them where their shape
allows, else replicated).

**Merged projections** (``merge-qkv``, ``fuse-silu-gate``: one MatMul over concatenated weights, then a Split)
are split back into one MatMul per piece, on a copy of the graph, before planning: a contiguous column block
of ``[q | k | v]`` does not hold whole heads, so the merged weight could not be split by head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmc.errors import TargetError
from llmc.ir import Graph, Node
from llmc.targets.tpu.options import MeshSpec

# Ops between a projection MatMul and Attention that keep the head layout of the last dim.
_LAYOUT_OPS = {"Reshape", "Transpose", "RotaryEmbedding", "Cast", "Identity"}
# Element-wise ops an FFN computes between its input projections (gate/up) and its down projection.
_ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sigmoid", "Relu", "Gelu", "Tanh", "Erf", "Swish", "HardSwish",
    "HardSigmoid", "Softplus", "Mish", "Elu", "Selu", "LeakyRelu", "Sqrt", "Exp", "Neg", "Abs", "Clip", "Cast",
    "Identity",
}  # fmt: skip


@dataclass
class ShardingPlan:
    """Mesh axes, the tensor axis, and for each weight argument the dim split over it (others replicated)."""

    axes: dict[str, int]
    axis: str
    split: dict[str, int] = field(default_factory=dict)  # weight name -> dim split over ``axis``
    roles: dict[str, str] = field(default_factory=dict)  # weight name -> q_proj, o_proj, ffn_in, ...
    notes: list[str] = field(default_factory=list)  # what was left replicated, and why

    @property
    def size(self) -> int:
        return int(np.prod(list(self.axes.values())))

    def spec(self, name: str, rank: int) -> tuple[str | None, ...]:
        """The PartitionSpec entries of weight ``name`` (all None: replicated)."""
        return partition_entries(self.split, self.axis, name, rank)

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for role in self.roles.values():
            counts[role] = counts.get(role, 0) + 1
        return {
            "mesh": dict(self.axes),
            "axis": self.axis,
            "devices": self.size,
            "split": dict(sorted(self.split.items())),
            "roles": dict(sorted(counts.items())),
            "notes": list(self.notes),
        }


def partition_entries(split: dict[str, int], axis: str, name: str, rank: int) -> tuple[str | None, ...]:
    """PartitionSpec entries: ``axis`` at the split dim of ``name``, None elsewhere."""
    return tuple(axis if name in split and dim == split[name] else None for dim in range(rank))


# -- merged projections ------------------------------------------------------------------------------
def unmerge_projections(graph: Graph, min_size: int) -> int:
    """Rewrites MatMul(x, W) -> Split(last axis) with a constant float W of more than ``min_size`` elements into
    one MatMul per piece (columns of W); returns how many were split."""
    count = 0
    for split in graph.find("Split"):
        matmul = graph.producer(split.inputs[0])
        if (
            matmul is None
            or matmul.op_type != "MatMul"
            or matmul.domain
            or len(graph.consumers(matmul.outputs[0])) != 1
        ):
            continue
        weight = graph.constant(matmul.inputs[1])
        if weight is None or weight.ndim != 2 or weight.dtype.kind != "f" or weight.size <= min_size:
            continue
        if split.domain or not _is_last_axis(graph, split.inputs[0], split.attr("axis", 0)):
            continue
        widths = _split_widths(graph, split, weight.shape[1])
        if widths is None:
            continue
        starts = np.cumsum([0, *widths])
        for i, out in enumerate(split.outputs):
            if not out:
                continue
            piece = graph.add_initializer(
                f"{matmul.inputs[1]}.part{i}", np.ascontiguousarray(weight[:, starts[i] : starts[i + 1]])
            )
            node = graph.add_node(
                "MatMul",
                [matmul.inputs[0], piece],
                [graph.unique_name(f"{out}/unmerged")],
                name=graph.unique_node_name(f"{matmul.name or 'matmul'}/part{i}"),
                order=split.order,
            )
            info = graph.values.get(out)
            if info is not None:
                graph.set_value_info(node.outputs[0], info.dtype, info.shape)
            graph.replace_all_uses(out, node.outputs[0])
        graph.remove_node(split)
        graph.remove_node(matmul)
        if not graph.is_used(matmul.inputs[1]) and matmul.inputs[1] in graph.initializers:
            graph.remove_initializer(matmul.inputs[1])
        count += 1
    return count


def _is_last_axis(graph: Graph, value: str, axis: int) -> bool:
    shape = graph.shape(value)
    return axis == -1 or (shape is not None and axis == len(shape) - 1)


def _split_widths(graph: Graph, split: Node, total: int) -> list[int] | None:
    sizes = graph.constant(split.input(1)) if split.input(1) else None
    if sizes is not None:
        widths = [int(v) for v in np.asarray(sizes).reshape(-1)]
    elif split.attr("split") is not None:
        widths = [int(v) for v in split.attr("split")]
    else:
        parts = split.attr("num_outputs", len(split.outputs))
        step = -(-total // parts)
        widths = [min(step, total - i * step) for i in range(parts)]
    return widths if sum(widths) == total and len(widths) == len(split.outputs) else None


# -- the plan ----------------------------------------------------------------------------------------
def plan_sharding(graph: Graph, weights: dict[str, np.ndarray], mesh: MeshSpec) -> ShardingPlan:
    """Which weight argument is split along which dim; a TargetError when the axis size does not divide the
    heads or channels it must split."""
    plan = ShardingPlan(dict(mesh.shape), mesh.tensor_axis)
    n = mesh.shape[mesh.tensor_axis]
    claimed: set[int] = set()  # MatMul node ids already assigned to attention
    attention = [node for node in graph.nodes() if node.op_type == "Attention" and not node.domain]
    for node in attention:
        _plan_attention(graph, node, weights, plan, n, claimed, "attention_heads" in mesh.shard)
    if "ffn" in mesh.shard:
        for node in graph.nodes():
            if node.op_type == "MatMul" and not node.domain and node.id not in claimed:
                _plan_ffn(graph, node, weights, plan, n, claimed)
    if not plan.split:
        plan.notes.append(f"nothing to shard found for {list(mesh.shard)}: every weight is replicated")
    return plan


def _where(mesh_axis: str, n: int) -> str:
    return f"targets.tpu.mesh: axis '{mesh_axis}' has {n} devices"


def _plan_attention(
    graph: Graph,
    node: Node,
    weights: dict[str, np.ndarray],
    plan: ShardingPlan,
    n: int,
    claimed: set[int],
    shard: bool,
) -> None:
    projections = [_projection(graph, node.input(i), weights) for i in range(3)]
    out_proj = _output_projection(graph, node.outputs[0], weights)
    claimed.update(p.id for p in (*projections, out_proj) if p is not None)
    if not shard:
        return
    q_heads, kv_heads = _heads(graph, node, 0, "q_num_heads"), _heads(graph, node, 1, "kv_num_heads")
    if q_heads is None or kv_heads is None:
        plan.notes.append(f"Attention {node.label}: head counts unknown, its projections are replicated")
        return
    if q_heads % n:
        raise TargetError(
            f"{_where(plan.axis, n)}, which does not divide the {q_heads} query heads of Attention node "
            f"{node.label}",
            hint=f"use an axis size that divides {q_heads}, or drop attention_heads from targets.tpu.mesh.shard",
        )
    q_proj, k_proj, v_proj = projections
    if q_proj is None or out_proj is None:
        plan.notes.append(
            f"Attention {node.label}: no q projection or o_proj MatMul with a weight found, heads replicated"
        )
        return
    _split_matmul(graph, q_proj, weights, plan, n, "q_proj", column=True)
    _split_matmul(graph, out_proj, weights, plan, n, "o_proj", column=False)
    if kv_heads % n:
        plan.notes.append(
            f"Attention {node.label}: {kv_heads} kv heads are not divisible by {n}, k/v projections replicated"
        )
        return
    for proj, role in ((k_proj, "k_proj"), (v_proj, "v_proj")):
        if proj is None:
            plan.notes.append(f"Attention {node.label}: no {role} MatMul with a weight found, replicated")
        else:
            _split_matmul(graph, proj, weights, plan, n, role, column=True)


def _heads(graph: Graph, node: Node, slot: int, attr: str) -> int | None:
    shape = graph.shape(node.input(slot))
    if shape is not None and len(shape) == 4:
        return shape[1] if isinstance(shape[1], int) else None
    value = node.attr(attr)
    return int(value) if value else None


def _weight_of(graph: Graph, node: Node, weights: dict[str, np.ndarray]) -> list[str]:
    """The weight arguments behind a MatMul's right operand: the weight itself, or a DequantizeLinear's
    quantized tensor, scale and zero point (those that are arguments)."""
    value = node.input(1)
    if value in weights:
        return [value]
    source = graph.producer(value)
    if source is not None and source.op_type == "DequantizeLinear" and source.input(0) in weights:
        return [v for v in source.inputs if v in weights]
    return []


def _projection(graph: Graph, value: str, weights: dict[str, np.ndarray]) -> Node | None:
    """The MatMul with a weight that computes ``value`` through layout ops and a bias Add, if any."""
    while value:
        node = graph.producer(value)
        if node is None or node.domain:
            return None
        if node.op_type == "MatMul":
            return node if _weight_of(graph, node, weights) else None
        if node.op_type == "Add":
            traced = [v for v in node.inputs if graph.constant(v) is None and v not in weights]
            if len(traced) != 1:
                return None
            value = traced[0]
        elif node.op_type in _LAYOUT_OPS:
            value = node.input(0)
        else:
            return None
    return None


def _output_projection(graph: Graph, value: str, weights: dict[str, np.ndarray]) -> Node | None:
    """The MatMul with a weight that reads ``value`` (through layout ops), if that is its only use."""
    while value:
        users = graph.consumers(value)
        if len(users) != 1 or users[0].domain:
            return None
        node = users[0]
        if node.op_type == "MatMul":
            return node if node.input(0) == value and _weight_of(graph, node, weights) else None
        if node.op_type not in _LAYOUT_OPS - {"RotaryEmbedding"}:
            return None
        value = node.outputs[0]
    return None


def _plan_ffn(
    graph: Graph, down: Node, weights: dict[str, np.ndarray], plan: ShardingPlan, n: int, claimed: set[int]
) -> None:
    if not _weight_of(graph, down, weights):
        return
    region, leaves, biases = _elementwise_region(graph, down.input(0), weights, claimed)
    if not region or not leaves:
        return
    widths = {_width(graph, leaf, weights) for leaf in leaves}
    if len(widths) != 1 or None in widths:
        return
    channels = widths.pop()
    if channels % n:
        raise TargetError(
            f"{_where(plan.axis, n)}, which does not divide the {channels} FFN channels of MatMul "
            f"{down.label}",
            hint=f"use an axis size that divides {channels}, or drop ffn from targets.tpu.mesh.shard",
        )
    for leaf in leaves:
        _split_matmul(graph, leaf, weights, plan, n, "ffn_in", column=True)
        claimed.add(leaf.id)
    for bias in biases:
        if weights[bias].shape[-1] == channels:
            plan.split[bias], plan.roles[bias] = weights[bias].ndim - 1, "ffn_bias"
    _split_matmul(graph, down, weights, plan, n, "ffn_out", column=False)
    claimed.add(down.id)


def _elementwise_region(
    graph: Graph, value: str, weights: dict[str, np.ndarray], claimed: set[int]
) -> tuple[list[Node], list[Node], list[str]]:
    """(element-wise nodes, input MatMuls, bias weights) that compute ``value`` from MatMuls with weights and
    constants only; empty lists when anything else feeds it."""
    region: dict[int, Node] = {}
    leaves: dict[int, Node] = {}
    biases: list[str] = []
    stack = [value]
    while stack:
        current = stack.pop()
        node = graph.producer(current)
        if node is None or node.domain:
            return [], [], []
        if node.id in region or node.id in leaves:
            continue
        if node.op_type == "MatMul":
            if node.id in claimed or not _weight_of(graph, node, weights):
                return [], [], []
            leaves[node.id] = node
            continue
        if node.op_type not in _ELEMENTWISE:
            return [], [], []
        region[node.id] = node
        for v in node.inputs:
            if not v:
                continue
            if v in weights:
                biases.append(v)
            elif graph.constant(v) is None:
                stack.append(v)
    return list(region.values()), list(leaves.values()), biases


def _width(graph: Graph, matmul: Node, weights: dict[str, np.ndarray]) -> int | None:
    """The number of output columns of a MatMul with a weight (its weight's last dim)."""
    names = _weight_of(graph, matmul, weights)
    shape = graph.shape(matmul.input(1))
    if shape and isinstance(shape[-1], int):
        return shape[-1]
    return int(weights[names[0]].shape[-1]) if names else None


def _split_matmul(
    graph: Graph,
    matmul: Node,
    weights: dict[str, np.ndarray],
    plan: ShardingPlan,
    n: int,
    role: str,
    *,
    column: bool,
) -> None:
    """Split the weight arguments of ``matmul``: columns (the last dim) or rows (the one before); a scale or
    zero point whose dim does not divide by ``n`` stays replicated."""
    width = _width(graph, matmul, weights)
    for name in _weight_of(graph, matmul, weights):
        array = weights[name]
        if array.ndim == 0:
            continue
        if column:
            dim = array.ndim - 1
            if array.shape[dim] != width:
                continue
        else:
            if array.ndim < 2:
                continue
            dim = array.ndim - 2
        if array.shape[dim] % n == 0:
            plan.split[name], plan.roles[name] = dim, role
        else:
            plan.notes.append(
                f"{name} ({role}): dim {dim} of size {array.shape[dim]} not divisible, replicated"
            )


# -- JAX side ----------------------------------------------------------------------------------------
def jit_shardings(jax: Any, plan: ShardingPlan, weights: dict[str, np.ndarray], inputs: list[str]) -> Any:
    """``in_shardings`` for ``jax.jit(fn)(weights, inputs)``: the plan's splits over an abstract mesh (no
    devices needed to export), runtime inputs replicated."""
    from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

    mesh = AbstractMesh(tuple(plan.axes.values()), tuple(plan.axes))
    weight_shardings = {
        name: NamedSharding(mesh, PartitionSpec(*plan.spec(name, array.ndim)))
        for name, array in weights.items()
    }
    replicated = NamedSharding(mesh, PartitionSpec())
    return (weight_shardings, dict.fromkeys(inputs, replicated))


def devices_missing(jax: Any, size: int) -> str | None:
    """Why this machine cannot run a module for ``size`` devices, or None when it can."""
    have = len(jax.devices())
    if have >= size:
        return None
    return (
        f"the modules are sharded over {size} devices and this machine's JAX has {have} "
        f"({jax.default_backend()}); on XLA:CPU set XLA_FLAGS=--xla_force_host_platform_device_count={size} "
        "before JAX starts"
    )


def place_weights(jax: Any, sharding: dict[str, Any], weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """The weights on the first ``devices`` devices, split as the manifest's ``sharding`` says."""
    from jax.sharding import NamedSharding, PartitionSpec

    axes: dict[str, int] = sharding["mesh"]
    size = int(np.prod(list(axes.values())))
    missing = devices_missing(jax, size)
    if missing:
        raise TargetError(missing)
    mesh = jax.make_mesh(tuple(axes.values()), tuple(axes), devices=jax.devices()[:size])
    return {
        name: jax.device_put(
            array,
            NamedSharding(
                mesh, PartitionSpec(*partition_entries(sharding["split"], sharding["axis"], name, array.ndim))
            ),
        )
        for name, array in weights.items()
    }
