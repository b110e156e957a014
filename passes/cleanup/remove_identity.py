"""``remove-identity``: nodes that pass their input through unchanged are bypassed and removed.

What counts as a no-op, each decided from what the graph states (value_info, initializers, constants):

* ``Identity``;
* ``Dropout`` in inference: ``training_mode`` absent, empty or a constant false (and, before opset 7, no
  ``is_test=0``), with its mask output absent or unused;
* ``Cast`` to the element type its input already has, ``CastLike`` whose two inputs have the same type;
* ``Reshape`` whose constant target shape (0 copies a dim unless ``allowzero``, -1 is inferred) equals the
  input's fully static shape;
* ``Expand`` whose constant shape broadcasts the fully static input shape to itself.

The uses of the output then read the input (``Graph.replace_all_uses``, which keeps graph output names by
renaming the input's value when a node of the same graph produces it). When the output is a graph output
and the input cannot take its name (a graph input, an initializer, another output, a value of an
enclosing scope), the node stays: the IR would put an Identity back in its place.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import ConfigDict

from llmc.ir import Graph, Node
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.passes.cleanup._common import (
    is_onnx_op,
    iter_graphs,
    keeps_output_name,
    scoped_constant,
    scoped_dtype,
    static_shape,
)

NoOpKind = Literal["Identity", "Dropout", "Cast", "CastLike", "Reshape", "Expand"]


class RemoveIdentityOptions(PassOptions):
    model_config = ConfigDict(use_attribute_docstrings=True)  # the docstrings below describe the options

    ops: list[NoOpKind] = ["Identity", "Dropout", "Cast", "CastLike", "Reshape", "Expand"]
    """Which no-op kinds to remove."""


@register_pass("remove-identity")
class RemoveIdentity(Pass):
    """Rewrites Identity, inference Dropout and no-op Cast/Reshape/Expand into direct uses of their input."""

    Options = RemoveIdentityOptions
    options: RemoveIdentityOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        for scope in iter_graphs(graph):
            for node in scope.nodes():
                if node in scope and node.op_type in self.options.ops and _is_noop(scope, node):
                    if _bypass(scope, node):
                        stats[node.op_type] = stats.get(node.op_type, 0) + 1
                    else:
                        stats["kept_for_output"] = stats.get("kept_for_output", 0) + 1
        removed = sum(v for k, v in stats.items() if k != "kept_for_output")
        return PassResult(removed > 0, stats)


def _bypass(graph: Graph, node: Node) -> bool:
    """Point the uses of ``node``'s output at its data input and remove it; False when it must stay."""
    source, result = node.inputs[0], node.outputs[0]
    if result in graph.outputs and not keeps_output_name(graph, source):
        return False
    graph.replace_all_uses(result, source)
    graph.remove_node(node)
    return True


def _is_noop(graph: Graph, node: Node) -> bool:
    if not is_onnx_op(node, node.op_type) or not node.input(0) or not node.outputs or not node.outputs[0]:
        return False
    check = _CHECKS.get(node.op_type)
    return check is not None and check(graph, node)


def _identity(graph: Graph, node: Node) -> bool:
    return True


def _dropout(graph: Graph, node: Node) -> bool:
    if node.attr("is_test", 1) == 0:
        return False
    if len(node.outputs) > 1 and node.outputs[1] and graph.is_used(node.outputs[1]):
        return False
    training = node.input(2)
    if not training:
        return True
    flag = scoped_constant(graph, training)
    return flag is not None and flag.size == 1 and not bool(flag.reshape(()))


def _cast(graph: Graph, node: Node) -> bool:
    dtype = scoped_dtype(graph, node.inputs[0])
    return bool(dtype) and dtype == node.attr("to")


def _cast_like(graph: Graph, node: Node) -> bool:
    dtype = scoped_dtype(graph, node.inputs[0])
    return bool(dtype) and dtype == scoped_dtype(graph, node.input(1))


def _reshape(graph: Graph, node: Node) -> bool:
    shape, target = static_shape(graph, node.inputs[0]), scoped_constant(graph, node.input(1))
    if shape is None or target is None or target.ndim != 1:
        return False
    dims = [int(d) for d in target]
    if not node.attr("allowzero", 0):
        dims = [shape[i] if d == 0 and i < len(shape) else d for i, d in enumerate(dims)]
    if dims.count(-1) == 1:
        known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
        total = int(np.prod(shape, dtype=np.int64))
        if known == 0 or total % known:
            return False
        dims[dims.index(-1)] = total // known
    return tuple(dims) == shape


def _expand(graph: Graph, node: Node) -> bool:
    shape, target = static_shape(graph, node.inputs[0]), scoped_constant(graph, node.input(1))
    if shape is None or target is None or target.ndim != 1:
        return False
    try:
        return np.broadcast_shapes(shape, tuple(int(d) for d in target)) == shape
    except ValueError:
        return False


_CHECKS = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Reshape": _reshape,
    "Expand": _expand,
}
