"""Whole decoder layers as sites: where each one reads and writes the residual stream, its KV-cache inputs
and outputs, how much it changes the hidden state, and how to drop it.

A pre-norm decoder layer is ``h = x + attn(norm(x)); y = h + mlp(norm(h))``: the layer is the set of nodes
between its residual input ``x`` and its residual output ``y``. The layer is found from its weights, not from
op patterns, so that the exporter's unfused form (hand-written attention, RMSNorm as Pow/ReduceMean/...) and
the fused form (RMSNormalization, Attention, merged q/k/v and gate/up) are read alike:

1. MatMuls (``MatMul``, ``Gemm``, ``MatMulNBits``) whose weight is a constant (an initializer, possibly behind
   constant-only nodes such as the exporter's Transpose or a DequantizeLinear) are grouped by the layer index
   in the weight's name (``model.layers.<i>.…``);
2. the layer's residual Adds are the ``Add`` nodes ``x + f(x)``: one operand is the output of one of its
   MatMuls (directly, or through an Add of a bias, of the offset term of quantized weights, or of another
   projection), the other a value that MatMul is computed from; they must form a chain, each adding to the
   previous one's sum, and the first one's other operand (the residual input) must not depend on the layer;
3. the layer's body is every node that depends on the residual input (through data, not only through its
   shape) without going through the residual output; nothing outside the body but the residual output may
   read a body value, except graph outputs, which are the layer's present key/value; the graph inputs the
   body alone reads are its past key/value.

Dropping a layer makes the readers of its residual output read its residual input; its cache inputs and
outputs leave the graph interface, and the later layers' caches are renamed after the DecoderSpec patterns
(the runtime feeds ``past_key_values.{i}.key`` for i = 0..num_layers-1). Importance is ShortGPT's block
influence, ``1 - mean cos(x, y)`` over calibration tokens: a layer that hardly turns the hidden state matters
least. No library finds layers in an ONNX graph or renames its KV cache, hence this hand-written module.

On SmolLM2-135M (fused IR, calibration.txt: 7 windows of 128 tokens and one of 34) the first and last layers stand out (0.997 and
0.273, then 1: 0.176 and 24: 0.161, the rest 0.026-0.058). Dropping the 1/2/3/4 least influential layers
(17, 14, 3, 13) raises the perplexity on eval.txt from 29.0 to 32.4/37.3/40.6/48.0 and keeps 57/55/48/46 of
64 teacher-forced tokens; over single-layer drops the influence ranks like the perplexity (Spearman 0.74), but
misses layers that look quiet and matter (11: influence 0.045, perplexity x7.6 when dropped).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from llmc.calibration import activations
from llmc.frontends.base import DecoderSpec
from llmc.ir import Graph, Node
from llmc.pass_manager import PassContext
from llmc.passes.cleanup.dead_code import EliminateDeadCode

from ._sites import SiteError, layer_name, live_nodes

_WEIGHT_OPS = {"MatMul", "Gemm", "MatMulNBits"}  # input 1 is the weight
_SHAPE_ONLY = {"Shape", "Size"}  # read a value's shape, not its data


@dataclass
class LayerSite:
    layer: int  # index from the weight names (model.layers.<i>.…)
    name: str  # e.g. "model.layers.3"
    residual_in: str  # hidden state [B, S, hidden] entering the layer (the residual stream)
    residual_out: str  # hidden state leaving the layer
    cache_inputs: list[str] = field(default_factory=list)  # past key/value graph inputs, in reading order
    cache_outputs: list[str] = field(default_factory=list)  # present key/value graph outputs


# -- finding layers ----------------------------------------------------------------------------------
def _layer_matmuls(graph: Graph, nodes: list[Node]) -> dict[int, tuple[str, list[Node]]]:
    """layer index -> (layer name, its constant-weight MatMuls in topological order).

    A weight is an initializer, or a value computed from initializers only (the exporter's Transpose, a
    DequantizeLinear); the initializer whose name carries a layer index names the layer."""
    layered = {n: n for n in graph.initializers if graph.is_constant(n) and layer_name(n, -1)[0] >= 0}
    constant = {n for n in graph.initializers if graph.is_constant(n)}
    layers: dict[int, tuple[str, list[Node]]] = {}
    for node in nodes:  # topological order: a value's inputs are classified before it
        if node.op_type in _WEIGHT_OPS and len(node.inputs) > 1 and node.inputs[1] in layered:
            index, name = layer_name(layered[node.inputs[1]], -1)
            layers.setdefault(index, (name, []))[1].append(node)
        inputs = [v for v in node.inputs if v]
        if inputs and not node.subgraphs and all(v in constant for v in inputs):
            constant.update(v for v in node.outputs if v)
            origin = next((layered[v] for v in inputs if v in layered), None)
            if origin is not None:
                layered.update((v, origin) for v in node.outputs if v)
    return layers


def _branch_matmul(graph: Graph, value: str, matmuls: dict[int, int], depth: int = 2) -> Node | None:
    """The layer MatMul behind ``value``: its output, or an Add of such outputs and constants (a bias, the
    offset term of quantized weights, parallel attention and MLP branches), at most ``depth`` Adds deep."""
    node = graph.producer(value)
    if node is None or node.id in matmuls:
        return node
    if node.op_type != "Add" or node.domain or depth == 0:
        return None
    found = None
    for operand in node.inputs:
        if graph.constant(operand) is None:
            matmul = _branch_matmul(graph, operand, matmuls, depth - 1)
            if matmul is None:
                return None
            found = found or matmul
    return found


def _feeds_into(graph: Graph, value: str, node: Node, skip: Node) -> bool:
    """Whether ``node`` depends on ``value`` through another reader than ``skip``."""
    source = graph.producer(value)
    if source is not None:
        return nx.has_path(graph.nx, source.id, node.id)
    return any(
        r is node or nx.has_path(graph.nx, r.id, node.id) for r in graph.consumers(value) if r is not skip
    )


def _residual_adds(
    graph: Graph, nodes: list[Node], matmuls: dict[int, int]
) -> dict[int, list[tuple[Node, str]]]:
    """layer -> [(Add, its residual operand)] in topological order: Adds of a branch (a layer MatMul's
    output, see ``_branch_matmul``) to a value the branch is computed from, ``x + f(x)``."""
    found: dict[int, list[tuple[Node, str]]] = {}
    for node in nodes:
        if node.op_type != "Add" or node.domain or len(node.inputs) != 2:
            continue
        for slot in (0, 1):
            matmul = _branch_matmul(graph, node.inputs[slot], matmuls)
            other = node.inputs[1 - slot]
            if (
                matmul is not None
                and graph.constant(other) is None
                and _feeds_into(graph, other, matmul, node)
            ):
                found.setdefault(matmuls[matmul.id], []).append((node, other))
                break
    return found


def _body(graph: Graph, residual_in: str, last: Node, live: set[int], where: str) -> list[Node]:
    """The nodes that depend on ``residual_in`` through data without going through ``last`` (the last
    residual Add), ``last`` included; SiteError when a value of them is read after the layer."""
    after = nx.descendants(graph.nx, last.id)
    body: dict[int, Node] = {}
    stack = [n for n in graph.consumers(residual_in) if n.op_type not in _SHAPE_ONLY and n.id in live]
    while stack:
        node = stack.pop()
        if node.id in body:
            continue
        if node.id in after:
            raise SiteError(
                f"{where}: {node.label} lies after the layer's residual output but reads a value computed "
                "inside the layer; only the residual stream may leave a layer"
            )
        body[node.id] = node
        if node is not last:
            stack += [c for v in node.outputs if v for c in graph.consumers(v) if c.id in live]
    return list(body.values())


def find_layers(graph: Graph) -> list[LayerSite]:
    """The decoder layers of ``graph`` in layer order; SiteError naming the node where the form is not understood."""
    live = live_nodes(graph)  # dead nodes may read anything; they go with the next dead-code sweep
    nodes = [n for n in graph.nodes() if n.id in live]
    position = {node.id: k for k, node in enumerate(nodes)}
    grouped = _layer_matmuls(graph, nodes)
    if not grouped:
        raise SiteError(
            "found no decoder layer: no MatMul has a constant weight whose name carries a layer index "
            "(such as model.layers.3.mlp.down_proj.weight)"
        )
    matmuls = {m.id: index for index, (_name, ms) in grouped.items() for m in ms}
    adds = _residual_adds(graph, nodes, matmuls)
    sites: list[LayerSite] = []
    bodies: dict[int, list[Node]] = {}
    for index in sorted(grouped):
        name, layer_mms = grouped[index]
        where = f"layer {index} ({name})"
        chain = sorted(adds.get(index, []), key=lambda pair: position[pair[0].id])
        if not chain:
            raise SiteError(
                f"{where}: no residual Add found (an Add of {layer_mms[-1].label}'s output, or another "
                "projection's, to the hidden state); post-norm or fused skip-norm layers are not supported"
            )
        for (prev, _), (add, other) in zip(chain, chain[1:], strict=False):
            if other != prev.outputs[0]:
                raise SiteError(
                    f"{where}: {add.label} adds a projection to '{other}', not to the previous residual sum "
                    f"'{prev.outputs[0]}' of {prev.label}; only pre-norm residual chains are supported"
                )
        residual_in, last = chain[0][1], chain[-1][0]
        source = graph.producer(residual_in)
        ancestors = nx.ancestors(graph.nx, source.id) | {source.id} if source is not None else set()
        inside = [m for m in layer_mms if m.id in ancestors]
        if inside:
            raise SiteError(
                f"{where}: its residual input '{residual_in}' depends on the layer's own {inside[0].label}"
            )
        body = _body(graph, residual_in, last, live, where)
        ids = {n.id for n in body}
        outside = [m for m in layer_mms if m.id not in ids]
        if outside:
            raise SiteError(
                f"{where}: {outside[0].label} does not lie between the layer's residual input '{residual_in}' "
                f"and its residual output '{last.outputs[0]}'"
            )
        other_layers = [n for n in body if matmuls.get(n.id, index) != index]
        if other_layers:
            stray = other_layers[0]
            raise SiteError(f"{where}: {stray.label} of layer {matmuls[stray.id]} lies inside this layer")
        body.sort(key=lambda n: position[n.id])
        bodies[index] = body
        outputs = [v for n in body for v in n.outputs if v in graph.outputs and v != last.outputs[0]]
        sites.append(LayerSite(index, name, residual_in, last.outputs[0], cache_outputs=outputs))
    _assign_cache_inputs(graph, sites, bodies)
    _check_sequence(graph, sites)
    return sites


def _assign_cache_inputs(graph: Graph, sites: list[LayerSite], bodies: dict[int, list[Node]]) -> None:
    """Each layer's cache inputs: the graph inputs its body reads and no other layer's body does."""
    readers: dict[str, set[int]] = {}
    stream = {s.residual_in for s in sites}
    for index, body in bodies.items():
        for node in body:
            for value in node.inputs:
                if value in graph.inputs and value not in graph.initializers and value not in stream:
                    readers.setdefault(value, set()).add(index)
    for site in sites:
        seen = dict.fromkeys(
            v for n in bodies[site.layer] for v in n.inputs if readers.get(v) == {site.layer}
        )
        site.cache_inputs = list(seen)
    shapes = {(len(s.cache_inputs), len(s.cache_outputs)) for s in sites}
    if len(shapes) > 1:
        counts = ", ".join(f"{s.layer}: {len(s.cache_inputs)}/{len(s.cache_outputs)}" for s in sites)
        raise SiteError(f"the layers read and write different numbers of cache inputs/outputs ({counts})")


def _check_sequence(graph: Graph, sites: list[LayerSite]) -> None:
    """Layer i+1 starts at or after layer i's residual output (nothing of layer i reads layer i+1)."""
    for prev, site in zip(sites, sites[1:], strict=False):
        if site.residual_in == prev.residual_out:
            continue
        start, end = graph.producer(prev.residual_out), graph.producer(site.residual_in)
        if start is None or end is None or not nx.has_path(graph.nx, start.id, end.id):
            raise SiteError(
                f"layer {site.layer} ({site.name}) does not follow layer {prev.layer}: its residual input "
                f"'{site.residual_in}' is not computed from '{prev.residual_out}'"
            )


# -- importance --------------------------------------------------------------------------------------
def layer_importance(graph: Graph, sites: list[LayerSite], feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Block influence per site (ShortGPT): 1 - mean over calibration tokens of cos(residual_in, residual_out)."""
    names = [v for s in sites for v in (s.residual_in, s.residual_out)]
    sums = np.zeros(len(sites), np.float64)
    tokens = 0
    for values in activations(graph, names, feeds):
        for k, site in enumerate(sites):
            x = np.asarray(values[site.residual_in], np.float64)
            y = np.asarray(values[site.residual_out], np.float64)
            x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            norms = np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)
            sums[k] += float((np.einsum("ij,ij->i", x, y) / norms).sum())
        tokens += x.shape[0]
    if tokens == 0:
        raise SiteError("layer importance needs at least one calibration token")
    return 1.0 - sums / tokens


# -- dropping ----------------------------------------------------------------------------------------
def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + r"\Z")


def _cache_renames(kept: list[LayerSite], decoder: DecoderSpec) -> list[tuple[str, str]]:
    """(old, new) names that make the kept layers' caches follow the DecoderSpec patterns with i = 0..n-1."""
    roles = [decoder.past_key, decoder.past_value, decoder.present_key, decoder.present_value]
    patterns = [_pattern(r) for r in roles]
    renames: list[tuple[str, str]] = []
    wanted: set[str] = set()
    for position, site in enumerate(kept):
        for value in (*site.cache_inputs, *site.cache_outputs):
            role = next((r for r, p in zip(roles, patterns, strict=True) if p.match(value)), None)
            if role is None:
                raise SiteError(
                    f"layer {site.layer} ({site.name}): cache '{value}' does not follow the DecoderSpec names "
                    f"({', '.join(roles)})"
                )
            new = role.format(i=position)
            if new in wanted:
                raise SiteError(f"layer {site.layer} ({site.name}): two caches would be named '{new}'")
            wanted.add(new)
            if new != value:
                renames.append((value, new))
    return renames


def _forget(graph: Graph, name: str) -> None:
    graph.values.pop(name, None)
    graph.value_info_extra.pop(name, None)


def _rename(graph: Graph, renames: list[tuple[str, str]]) -> None:
    """Rename through temporary names, so that no new name collides with an old one not yet renamed."""
    temporary = []
    for old, new in renames:
        graph.value_info_extra.pop(old, None)
        temporary.append((graph.unique_name(f"{old}.renumbered"), new))
        graph.rename_value(old, temporary[-1][0])
    for old, new in temporary:
        _forget(graph, new)
        graph.rename_value(old, new)


def drop_layers(
    graph: Graph, sites: list[LayerSite], drop: Sequence[int], decoder: DecoderSpec | None
) -> int:
    """Bypass the layers ``drop`` (layer indices), remove their cache inputs/outputs and dead nodes, rename
    the kept layers' caches after ``decoder``'s patterns; returns the bytes of initializers removed."""
    by_layer = {s.layer: s for s in sites}
    unknown = sorted(set(drop) - set(by_layer))
    if unknown:
        raise SiteError(f"no decoder layer {unknown[0]}")
    dropped = [by_layer[i] for i in sorted(set(drop), reverse=True)]  # last first: chains of dropped layers
    kept = [s for s in sites if s.layer not in set(drop)]
    if not kept:
        raise SiteError("dropping every decoder layer leaves no model")
    renames = _cache_renames(kept, decoder) if decoder is not None and kept[0].cache_inputs else []
    EliminateDeadCode().run(graph, PassContext())  # what was dead already is not counted as saved
    before = {name: graph.initializers.nbytes(name) for name in graph.initializers}
    for site in dropped:
        graph.replace_all_uses(site.residual_out, site.residual_in)
    gone_outputs = {v for s in dropped for v in s.cache_outputs}
    graph.outputs = [v for v in graph.outputs if v not in gone_outputs]
    EliminateDeadCode().run(graph, PassContext())
    for site in dropped:  # a Shape of a dropped cache may still feed the mask: every cache has one length
        for slot, value in enumerate(site.cache_inputs):
            if graph.is_used(value):
                graph.replace_all_uses(value, kept[0].cache_inputs[slot])
    gone_inputs = {v for s in dropped for v in s.cache_inputs}
    graph.inputs = [v for v in graph.inputs if v not in gone_inputs]
    for name in gone_inputs | gone_outputs:
        _forget(graph, name)
    _rename(graph, renames)
    EliminateDeadCode().run(graph, PassContext())
    left = set(_layer_matmuls(graph, graph.nodes())) & set(by_layer) - {s.layer for s in kept}
    if left:
        raise SiteError(
            f"layer {min(left)} is still computed after dropping it (a value of it is still read)"
        )
    return int(sum(size for name, size in before.items() if name not in graph.initializers))
