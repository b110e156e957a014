"""The IR verifier: structural checks first (they name the node), then onnx.checker and strict shape inference.

Structural checks: no cycle; every node input, implicit input and graph output is defined exactly once in
its scope or an enclosing one; the use index and the networkx edges agree with the node lists; graph outputs
are reachable. onnx.checker then validates op schemas and attributes, and strict shape inference catches
type and rank errors (both skipped for weights so that large models are never serialized twice).
"""

from __future__ import annotations

import onnx

from llmc.errors import IRError
from llmc.ir.convert import to_onnx
from llmc.ir.graph import Graph

# Shape inference needs the weights only for the values they feed (Reshape shapes, Gather indices...):
# tensors above this size are elided for the check, which keeps verification cheap on large models.
_CHECK_ELIDE_ABOVE = 1 << 16


def verify_structure(graph: Graph) -> None:
    """Raise IRError naming the first structural problem found."""
    graph.nodes()  # raises on a cycle, naming it
    _verify_scope(graph)


def _verify_scope(graph: Graph) -> None:
    for node in graph.nodes():
        for slot, value in enumerate(node.inputs):
            if value and not graph.visible(value):
                raise IRError(
                    f"input {slot} '{value}' is not defined by any node, input or initializer",
                    node=node.label,
                )
            if value and graph.defines(value) and (node, slot) not in graph.uses(value):
                raise IRError(
                    f"internal: use of '{value}' at slot {slot} is missing from the use index",
                    node=node.label,
                )
        for value in node.implicit_inputs:
            if not graph.visible(value):
                raise IRError(
                    f"a subgraph reads '{value}', which no enclosing scope defines", node=node.label
                )
        for slot, value in enumerate(node.outputs):
            if value:
                entry = graph.producer_slot(value)
                if entry is None or entry[0] is not node or entry[1] != slot:
                    raise IRError(f"internal: producer index of '{value}' is stale", node=node.label)
                if value in graph.inputs or value in graph.initializers:
                    raise IRError(f"output '{value}' redefines a graph input or initializer", node=node.label)
                if graph.parent is not None and graph.parent.visible(value):
                    raise IRError(
                        f"output '{value}' redefines a value of an enclosing graph", node=node.label
                    )
        for sub in node.all_subgraphs():
            _verify_scope(sub)
    edges = sum(1 for _ in graph.nx.edges(keys=True))
    expected = sum(
        1
        for node in graph.nodes()
        for value in (*node.inputs, *node.implicit_inputs)
        if value and graph.producer(value) is not None
    )
    if edges != expected:
        raise IRError(
            f"internal: graph '{graph.name}' has {edges} edges but its nodes read {expected} produced values"
        )
    for value in graph.outputs:
        if not graph.visible(value):
            raise IRError(f"graph output '{value}' is not produced by any node, input or initializer")


def verify(graph: Graph, *, check_schemas: bool = True, infer_shapes: bool = True) -> None:
    """Full verification: structure, then onnx.checker and strict shape inference."""
    verify_structure(graph)
    if not (check_schemas or infer_shapes):
        return
    model = to_onnx(graph, weights="elide", elide_above=_CHECK_ELIDE_ABOVE)
    _strip_elided(model.graph)
    if check_schemas:
        try:
            onnx.checker.check_model(model, full_check=False)
        except onnx.checker.ValidationError as exc:
            raise IRError(f"onnx.checker: {_first_line(exc)}") from exc
    if infer_shapes:
        try:
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
            raise IRError(f"shape inference: {_first_line(exc)}") from exc


def _strip_elided(gp: onnx.GraphProto, root: onnx.GraphProto | None = None) -> None:
    """Elided tensors become inputs of the main graph (names are model-unique, so subgraphs still see
    them): an If branch or a Loop body must not gain inputs."""
    root = gp if root is None else root
    declared = {vi.name for vi in root.input}
    keep = []
    for tensor in gp.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if tensor.name not in declared:
                root.input.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                )
                declared.add(tensor.name)
        else:
            keep.append(tensor)
    del gp.initializer[:]
    gp.initializer.extend(keep)
    for node in gp.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_elided(attr.g, root)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _strip_elided(g, root)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return " ".join(lines[:3])[:600] if lines else type(exc).__name__
