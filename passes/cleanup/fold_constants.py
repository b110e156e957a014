"""``fold-constants``: nodes computed from constants become initializers.

Three rewrites, in every graph and subgraph, in topological order so that chains fold in one run:

* a ``Constant`` node becomes an initializer of the same name;
* ``Shape`` (and ``Size``) of a value whose shape is fully static in value_info becomes an int64 initializer;
* a node whose inputs are all constants (initializers that no graph input overrides, or Constant nodes, in
  its own scope or an enclosing one) is evaluated by onnxruntime on a one-node model (``onnx.reference``
  for what onnxruntime lacks; see ``_common.evaluate_node``) and its used outputs become initializers.
  A result whose element type differs from what ONNX declares is not folded: int64 shapes stay int64.

Never folded: non-deterministic ops (RandomNormal...), ops with subgraphs, results that are not tensors
(sequences, optionals), and whatever ``skip_ops`` names. Size limits keep the model from growing:

* ``max_output_bytes`` (1 MiB, the 512x512 float32 elements onnxscript's optimizer also stops at): folding
  is for shape arithmetic and small constants; a bigger result is a weight transform (Transpose, Cast of a
  weight) that target legalization should decide on, not a cleanup.
* ``max_growth`` (2x): a result above 4 KiB may be at most this many times the bytes of the constants it is
  computed from, so that Cast/Mul of int8 or int4 weights into float32, or Expand/Tile/ConstantOfShape of a
  small constant, does not turn a compact model into a large one.

By default quantization boundaries (QuantizeLinear/DequantizeLinear) stay as they are, so that quantized
weights keep their dtype and the quantize passes and targets still see them.
"""

from __future__ import annotations

import numpy as np
from pydantic import ConfigDict

from llmc.ir import Graph, Node, constant_node_value, np_dtype_to_onnx
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.passes.cleanup._common import (
    ResultTooLarge,
    evaluate_node,
    is_non_deterministic,
    is_onnx_op,
    iter_graphs,
    replace_with_constants,
    scoped_constant,
    static_shape,
)

# Results up to this size always fold, whatever ``max_growth`` says.
SMALL_RESULT_BYTES = 4096


class FoldConstantsOptions(PassOptions):
    model_config = ConfigDict(use_attribute_docstrings=True)  # the docstrings below describe the options

    max_output_bytes: int = 1 << 20
    """Largest result (bytes, all outputs of a node together) that is turned into an initializer."""
    max_growth: float = 2.0
    """A result over 4 KiB may be at most this many times the bytes of its constant inputs (0: no limit)."""
    skip_ops: list[str] = ["QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"]
    """Op types (standard domain, or ``domain.Op``) never evaluated, besides non-deterministic ops."""
    constant_nodes: bool = True
    """Turn Constant nodes into initializers."""
    static_shapes: bool = True
    """Fold Shape/Size of values whose shape is fully static in value_info."""


@register_pass("fold-constants")
class FoldConstants(Pass):
    """Rewrites Constant nodes, Shape of static shapes and nodes computed from constants into initializers."""

    Options = FoldConstantsOptions
    options: FoldConstantsOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = dict.fromkeys(("constant_nodes", "shapes", "folded", "skipped_too_large", "not_evaluated"), 0)
        for scope in iter_graphs(graph):
            for node in scope.nodes():
                if node in scope:
                    outcome = self._fold(scope, node)
                    if outcome:
                        stats[outcome] += 1
        changed = any(stats[k] for k in ("constant_nodes", "shapes", "folded"))
        return PassResult(changed, {k: v for k, v in stats.items() if v})

    def _skipped(self, node: Node) -> bool:
        qualified = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        return bool(node.subgraphs) or is_non_deterministic(node) or qualified in self.options.skip_ops

    def _fold(self, graph: Graph, node: Node) -> str | None:
        """Fold ``node`` if it can be; returns the stats key of what happened."""
        if is_onnx_op(node, "Constant"):
            if not self.options.constant_nodes:
                return None
            array = constant_node_value(node)
            if array is None or not any(node.outputs):  # sparse_value: left for a pass that knows them
                return None
            replace_with_constants(graph, node, {node.outputs[0]: array})
            return "constant_nodes"
        if self._skipped(node) or not any(graph.is_used(v) for v in node.outputs if v):
            return None  # a node whose results nobody reads is dead code, not worth evaluating
        inputs: dict[str, np.ndarray] = {}
        for value in node.inputs:
            if value:
                array = scoped_constant(graph, value)
                if array is None:
                    return self._fold_shape(graph, node) if self.options.static_shapes else None
                inputs[value] = array
        try:
            results = evaluate_node(graph, node, inputs, max_bytes=self._limit(inputs))
        except ResultTooLarge:
            return "skipped_too_large"
        if results is None:
            return "not_evaluated"
        used = {name: array for name, array in results.items() if graph.is_used(name)}
        for name, array in used.items():
            known = graph.dtype(name)
            if known and known != np_dtype_to_onnx(array.dtype):
                return "not_evaluated"  # value_info disagrees with the evaluator: leave the node alone
        replace_with_constants(graph, node, used)
        return "folded"

    def _limit(self, inputs: dict[str, np.ndarray]) -> int:
        """The most bytes a folded result may take, given the constants it is computed from."""
        limit = self.options.max_output_bytes
        if self.options.max_growth:
            input_bytes = sum(a.nbytes for a in inputs.values())
            limit = min(limit, max(SMALL_RESULT_BYTES, int(self.options.max_growth * input_bytes)))
        return limit

    def _fold_shape(self, graph: Graph, node: Node) -> str | None:
        if not is_onnx_op(node, "Shape", "Size") or not node.outputs[0]:
            return None
        shape = static_shape(graph, node.inputs[0])
        if shape is None:
            return None
        if node.op_type == "Size":
            array = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        else:
            rank = len(shape)
            start, end = node.attr("start", 0), node.attr("end", rank)
            array = np.array(shape[slice(start, end)], dtype=np.int64)
        replace_with_constants(graph, node, {node.outputs[0]: array})
        return "shapes"
