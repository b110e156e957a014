"""``upgrade-opset``: raise the model's default-domain opset so that fusions may emit newer standard ops
(``RMSNormalization``, ``RotaryEmbedding``, ``Attention`` at 23; ``Swish`` at 24).

The conversion itself is ``onnx.version_converter``'s (its adapters know every op's history; re-deriving
them here would be a second, worse table). It runs on a weightless skeleton: tensors over 4 KiB are
elided and turned into graph inputs (``llmc.ir.verify._strip_elided``), so a 1 GB model is converted in
milliseconds and never serialized with its weights. When the converter changed no node (the usual case from
opset 17+: most ops just gain types), only the opset import is bumped. Otherwise the nodes are rebuilt from
the converted proto inside the same ``Graph`` object (the pass manager holds it): weights stay the arrays
they were (re-attached by name, never copied), interface and value types stay, and each rebuilt node keeps
the name, doc string and metadata of the node it came from (the converter drops metadata).

Never downgrades: a model already at or above ``version`` is left as it is.
"""

from __future__ import annotations

import logging

import onnx
import onnx.version_converter
from pydantic import ConfigDict, Field

from llmc.errors import ModelError
from llmc.ir import Graph, from_onnx, to_onnx
from llmc.ir.verify import _strip_elided
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass

log = logging.getLogger("llmc.passes.cleanup")

_ELIDE_ABOVE = 4096  # bytes: larger initializers are left out of the skeleton the converter sees


class UpgradeOpsetOptions(PassOptions):
    model_config = ConfigDict(use_attribute_docstrings=True)

    version: int = Field(default=23, ge=1)
    """Target default-domain opset (23: RMSNormalization, RotaryEmbedding, Attention; 24: Swish)."""


@register_pass("upgrade-opset")
class UpgradeOpset(Pass):
    """Rewrites a model at an older default-domain opset into the same model at opset ``version``."""

    Options = UpgradeOpsetOptions
    options: UpgradeOpsetOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        want = self.options.version
        have = _default_opset(graph)
        if have >= want:
            return PassResult(False, {"from": have, "to": have})
        newest = onnx.defs.onnx_opset_version()
        if want > newest:
            raise ModelError(
                f"cannot upgrade to opset {want}: the installed onnx {onnx.__version__} knows opsets up to {newest}",
                hint=f"use upgrade-opset {{version: {newest}}} or lower, or install a newer onnx",
            )
        skeleton = to_onnx(graph, weights="elide", elide_above=_ELIDE_ABOVE)
        _strip_elided(skeleton.graph)
        lifted = {vi.name for vi in skeleton.graph.input} - set(graph.inputs)  # elided, now inputs
        try:
            converted = onnx.version_converter.convert_version(skeleton, want)
        except Exception as exc:  # the converter asserts in C++ (RuntimeError) when an adapter is missing
            raise ModelError(
                f"onnx.version_converter cannot take this model from opset {have} to {want}: {_first_line(exc)}",
                hint="export the model at a newer opset instead, or drop upgrade-opset and the fusions that need it",
            ) from exc
        if _same_nodes(skeleton.graph, converted.graph):
            rebuilt = 0
        else:
            rebuilt = _rebuild(graph, skeleton, converted, lifted)
        graph.opset_imports[""] = want
        graph.opset_imports.pop("ai.onnx", None)
        min_ir = onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid("", want)], ignore_unknown=True
        )
        graph.ir_version = max(graph.ir_version, int(min_ir))
        stats = {"from": have, "to": want, "nodes_rebuilt": rebuilt}
        return PassResult(True, stats)


def _default_opset(graph: Graph) -> int:
    return int(graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 1)))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:400] if lines else type(exc).__name__


# -- comparing and rebuilding ------------------------------------------------------------------------------
def _node_key(node: onnx.NodeProto) -> tuple:
    """What the converter may change in a node (it drops metadata_props, which is not a change)."""
    attrs = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            attrs.append((a.name, _graph_key(a.g)))
        elif a.type == onnx.AttributeProto.GRAPHS:
            attrs.append((a.name, tuple(_graph_key(g) for g in a.graphs)))
        else:
            attrs.append((a.name, a.SerializeToString(deterministic=True)))
    domain = "" if node.domain == "ai.onnx" else node.domain
    return (node.op_type, domain, tuple(node.input), tuple(node.output), tuple(sorted(attrs)))


def _graph_key(gp: onnx.GraphProto) -> tuple:
    inits = tuple(sorted((t.name, t.SerializeToString(deterministic=True)) for t in gp.initializer))
    return (tuple(_node_key(n) for n in gp.node), inits)


def _same_nodes(before: onnx.GraphProto, after: onnx.GraphProto) -> bool:
    return _graph_key(before) == _graph_key(after)


def _rebuild(graph: Graph, skeleton: onnx.ModelProto, converted: onnx.ModelProto, lifted: set[str]) -> int:
    """Replace ``graph``'s nodes by the converted ones, in place; returns how many nodes the converter changed.

    ``lifted``: the elided initializers that ``_strip_elided`` turned into inputs of the skeleton."""
    # The skeleton lists the nodes in graph.nodes() order: pair each proto with the node it came from.
    old = list(zip(skeleton.graph.node, graph.nodes(), strict=True))
    old_by_key = {_node_key(p): n for p, n in old}
    old_by_output = {n.outputs[0]: n for _p, n in old if n.outputs and n.outputs[0]}
    sub_weights = {
        name: sub.initializers[name]
        for _g, n in graph.walk()
        for sub in n.all_subgraphs()
        for name in sub.initializers
        if name in lifted
    }
    known = graph.all_value_names()
    elided = set(graph.initializers) - {t.name for t in skeleton.graph.initializer}  # main-graph weights
    # Elided weights came back as graph inputs: take them out before reading the converted graph, so that
    # the new Graph refers to them by name and holds no copy of anything.
    gp = converted.graph
    kept_inputs = [vi for vi in gp.input if vi.name not in lifted]
    del gp.input[:]
    gp.input.extend(kept_inputs)
    fresh = from_onnx(converted)
    fresh_nodes = sorted(fresh.nodes(), key=lambda n: n.order)  # from_onnx orders nodes by proto position
    for node in reversed(graph.nodes()):
        graph.remove_node(node, force=True)
    small = {t.name for t in gp.initializer}  # travelled inside the skeleton; adapters may add some
    for name in [n for n in graph.initializers if n not in elided and n not in small]:
        graph.remove_initializer(name)
    for name in small:
        if name not in graph.initializers or not _equal(graph.initializers[name], fresh.initializers[name]):
            graph.initializers[name] = fresh.initializers[name]
    changed = 0
    for proto, node in zip(gp.node, fresh_nodes, strict=True):
        same = old_by_key.get(_node_key(proto))
        origin = same or old_by_output.get(node.outputs[0] if node.outputs else "")
        if origin is not None and origin.op_type != node.op_type:
            origin = None
        changed += same is None
        subgraphs = dict(node.subgraphs)
        node.subgraphs = {}
        new = graph.add_node(
            node.op_type,
            node.inputs,
            node.outputs,
            domain=node.domain,
            name=origin.name if origin is not None else node.name,
            attributes=dict(node.attributes),
            subgraphs=subgraphs,
            order=node.order,
            doc_string=origin.doc_string if origin is not None else node.doc_string,
            metadata=dict(origin.metadata) if origin is not None else dict(node.metadata),
        )
        new.overload = node.overload
        new.attribute_order = node.attribute_order
    # Weights of If/Loop bodies were lifted to the skeleton's inputs: give them back to the bodies reading them.
    for _g, node in graph.walk():
        for sub in node.all_subgraphs():
            for reader in sub.nodes():
                for name in reader.inputs:
                    if name in sub_weights and not sub.visible(name):
                        sub.initializers[name] = sub_weights[name]
                        sub.set_initializer(
                            name, sub_weights[name]
                        )  # tells the owner: implicit inputs change
    # value_info: keep what was known, learn the types of the values the converter introduced.
    live = graph.all_value_names()
    for name in [n for n in graph.values if n not in live]:
        del graph.values[name]
    for name, info in fresh.values.items():
        if name not in known and name in live:
            graph.values[name] = info
    return changed


def _equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
