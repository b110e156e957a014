"""Helpers shared by the cleanup passes: scope walking, static facts about values, and node evaluation.

onnxscript's optimizer and onnxruntime's graph transformers do these cleanups on their own IRs; ours run on
the llmc ``Graph`` so that every pipeline sees one IR, with its use index, implicit inputs and stable names,
and so that the pass manager can hash, verify and dump what they did.

Every cleanup pass works graph by graph over the main graph and its If/Loop/Scan bodies, and asks the same
questions of a value from inside a subgraph ("is it a constant in some enclosing scope?", "what is its
static shape?"): those answers live here once.

``evaluate_node`` runs one node through onnxruntime on a one-node model (falling back to
``onnx.reference`` for ops or dtypes onnxruntime lacks, e.g. int4 or bfloat16 results) instead of a
hand-written numpy table of ops, so that folded results are bit-for-bit what a runtime would compute.
It is the one place in a pass that builds ONNX protos; the design keeps passes on the ``Graph`` otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import onnx
import onnxruntime as ort

from llmc.ir import Graph, Node, ValueInfo, np_dtype_to_onnx, onnx_dtype_to_np, value_info_to_proto
from llmc.ir.weights import array_to_tensor

log = logging.getLogger("llmc.passes.cleanup")

# Ops whose result differs from run to run: never folded, never merged.
NON_DETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def is_onnx_op(node: Node, *op_types: str) -> bool:
    """Whether ``node`` is one of ``op_types`` in the standard ONNX domain."""
    return node.domain in ("", "ai.onnx") and node.op_type in op_types


def is_non_deterministic(node: Node) -> bool:
    return is_onnx_op(node, *NON_DETERMINISTIC_OPS)


def iter_graphs(graph: Graph) -> Iterator[Graph]:
    """``graph`` and every subgraph nested in it, each enclosing graph before the graphs it holds.

    A graph's node list is read only after the caller has processed that graph, so the caller may rewrite
    it in between: subgraphs of nodes it removed are not visited.
    """
    yield graph
    for node in graph.nodes():
        for sub in node.all_subgraphs():
            yield from iter_graphs(sub)


def scoped_constant(graph: Graph, value: str) -> np.ndarray | None:
    """The array behind ``value`` when it is a constant in the scope that defines it (initializer or
    Constant node; an initializer overridable as a graph input is not a constant)."""
    scope = graph.defining_scope(value)
    return scope.constant(value) if scope is not None else None


def scoped_value_info(graph: Graph, value: str) -> ValueInfo | None:
    """What is known of ``value``, looked up in the scope that defines it (value_info or initializer)."""
    scope: Graph | None = graph
    while scope is not None:
        info = scope.value_info(value)
        if info is not None and (info.dtype or info.shape is not None or info.type_proto is not None):
            return info
        if scope.defines(value):
            return info
        scope = scope.parent
    return None


def scoped_dtype(graph: Graph, value: str) -> int:
    """The ONNX element type of ``value`` (0 when unknown)."""
    array = scoped_constant(graph, value)
    if array is not None:
        return np_dtype_to_onnx(array.dtype)
    info = scoped_value_info(graph, value)
    return info.dtype if info is not None and info.is_tensor else 0


def static_shape(graph: Graph, value: str) -> tuple[int, ...] | None:
    """The shape of ``value`` when every dim is a known integer, else None."""
    array = scoped_constant(graph, value)
    if array is not None:
        return tuple(int(d) for d in array.shape)
    info = scoped_value_info(graph, value)
    if info is None or not info.is_tensor or info.shape is None:
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info.shape):
        return None
    return tuple(int(d) for d in info.shape)


def keeps_output_name(graph: Graph, value: str) -> bool:
    """Whether ``graph.replace_all_uses(output, value)`` can hand a graph output's name to ``value``.

    That is so when a node of ``graph`` produces ``value`` and ``value`` is not itself part of the
    interface; otherwise the IR inserts an Identity to keep the output name, so removing an Identity
    that sits there would only put another one back.
    """
    return graph.producer(value) is not None and value not in graph.outputs and value not in graph.inputs


def replace_with_constants(graph: Graph, node: Node, arrays: dict[str, np.ndarray]) -> None:
    """Replace ``node`` by initializers that keep its output names (graph outputs and subgraph reads too).

    Outputs not in ``arrays`` must be unused. The initializers are stored before the node goes, so the
    names stay defined at every moment and subgraph implicit inputs never see them disappear.
    """
    for value in node.outputs:
        if value and value not in arrays and graph.is_used(value):
            raise ValueError(f"output '{value}' of {node.label} is used but has no constant")
    for value, array in arrays.items():
        graph.initializers[value] = array
    graph.remove_node(node, force=True)


# -- evaluation ------------------------------------------------------------------------------------------
def _session_options() -> ort.SessionOptions:
    """One thread, no graph optimizations (the model has one node), no log noise for ops it lacks."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    return options


def node_model(graph: Graph, node: Node, inputs: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A model holding ``node`` alone, its inputs as initializers, with the root model's opsets and
    functions, and output types from shape inference where it can tell them."""
    root = graph.root()
    proto = onnx.NodeProto(op_type=node.op_type, domain=node.domain, name=node.name)
    proto.input.extend(node.inputs)
    proto.output.extend(node.outputs)
    proto.attribute.extend(node.attributes.values())
    outputs = []
    for value in node.outputs:
        if value:
            info = scoped_value_info(graph, value)
            known = info is not None and (info.dtype or info.type_proto is not None)
            outputs.append(value_info_to_proto(info) if known else onnx.ValueInfoProto(name=value))
    gp = onnx.helper.make_graph(
        [proto], "fold", [], outputs, [array_to_tensor(name, array) for name, array in inputs.items()]
    )
    model = onnx.helper.make_model(
        gp,
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in sorted(root.opset_imports.items())],
        ir_version=root.ir_version,
        functions=root.functions,
    )
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is only a help for typing the outputs
        return model


def _declared_dtypes(model: onnx.ModelProto) -> list[int]:
    return [o.type.tensor_type.elem_type if o.type.HasField("tensor_type") else 0 for o in model.graph.output]


def _exact(results: list, dtypes: list[int]) -> list[np.ndarray] | None:
    """Results as arrays of exactly the declared element types (views of raw bytes where onnxruntime
    hands back float8 as uint8), or None when a result is not a tensor or has another type."""
    out = []
    for result, dtype in zip(results, dtypes, strict=True):
        if not isinstance(result, np.ndarray) or result.dtype == object and dtype != onnx.TensorProto.STRING:
            return None
        if dtype and np_dtype_to_onnx(result.dtype) != dtype:
            want = onnx_dtype_to_np(dtype)
            if want.itemsize != result.dtype.itemsize or result.dtype.kind not in "iub":
                return None
            result = result.view(want)
        out.append(result)
    return out


def _run_ort(model: onnx.ModelProto) -> list:
    session = ort.InferenceSession(
        model.SerializeToString(), _session_options(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {})


def _run_reference(model: onnx.ModelProto) -> list:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, {})


class ResultTooLarge(Exception):
    """The outputs of a node would exceed the byte limit given to ``evaluate_node``."""


def _predicted_bytes(model: onnx.ModelProto) -> int | None:
    """Bytes of all outputs when shape inference knows every dim and dtype, else None."""
    total = 0
    for output in model.graph.output:
        tt = output.type.tensor_type
        if not output.type.HasField("tensor_type") or not tt.elem_type or not tt.HasField("shape"):
            return None
        if not all(d.HasField("dim_value") for d in tt.shape.dim):
            return None
        count = int(np.prod([d.dim_value for d in tt.shape.dim], dtype=np.int64))
        total += count * onnx_dtype_to_np(tt.elem_type).itemsize
    return total


def evaluate_node(
    graph: Graph, node: Node, inputs: dict[str, np.ndarray], *, max_bytes: int | None = None
) -> dict[str, np.ndarray] | None:
    """The outputs of ``node`` computed from constant ``inputs`` (name -> array), by onnxruntime, else
    onnx.reference; None when neither evaluates it to tensors of the types the model declares.

    With ``max_bytes``, raises ResultTooLarge instead of computing outputs that shape inference already
    shows to be larger (ConstantOfShape of a huge shape is never materialized), or that turn out larger.
    """
    model = node_model(graph, node, inputs)
    predicted = _predicted_bytes(model)
    if max_bytes is not None and predicted is not None and predicted > max_bytes:
        raise ResultTooLarge(f"{node.label}: {predicted} bytes")
    names = [o.name for o in model.graph.output]
    dtypes = _declared_dtypes(model)
    for runner in (_run_ort, _run_reference):
        try:
            results = _exact(list(runner(model)), dtypes)
        except Exception as exc:  # an op or dtype the evaluator lacks, or invalid inputs
            log.debug("%s could not evaluate %s: %s", runner.__name__, node.label, exc)
            continue
        if results is not None:
            if max_bytes is not None and sum(r.nbytes for r in results) > max_bytes:
                raise ResultTooLarge(f"{node.label}: {sum(r.nbytes for r in results)} bytes")
            return dict(zip(names, (np.asarray(r, order="C") for r in results), strict=True))  # keeps 0-d
    return None
