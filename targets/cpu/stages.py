"""Split a graph whose nodes carry ``llmc.stage`` (the ``partition-pipeline`` pass) into one ONNX model per stage.

Each stage is a standalone model: its inputs are the graph inputs it reads and the values earlier stages
make for it; its outputs are the graph outputs it makes and the values later stages read; it holds only the
initializers it reads (arrays shared with the whole graph, not copied). Nodes without a stage (created by
passes that ran after the partition, such as the target's legalization) take the stage of their producers,
or of their first consumer when nothing upstream has one. ``emit_stages`` writes ``stage_<i>.onnx`` files and
returns the wiring that the manifest records and ``llmc.distributed.pipeline.PipelineRunner`` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from llmc.errors import TargetError
from llmc.ir import Graph, Node, ValueInfo, from_onnx, save_model, to_onnx, value_info_to_proto
from llmc.passes.partition.pipeline_stages import STAGE_KEY, inferred_value_infos, node_reads


def is_partitioned(graph: Graph) -> bool:
    """Whether any node carries a pipeline stage."""
    return any(STAGE_KEY in node.metadata for node in graph.nodes())


def node_stages(graph: Graph, nodes: list[Node]) -> dict[int, int]:
    """Node id -> stage, filling nodes without metadata; raises when a value would flow to an earlier stage."""
    stage: dict[int, int] = {}
    for node in nodes:
        if STAGE_KEY in node.metadata:
            stage[node.id] = int(node.metadata[STAGE_KEY])
        else:
            above = [stage[p] for p, _c in graph.nx.in_edges(node.id) if p in stage]
            if above:
                stage[node.id] = max(above)
    last = max(stage.values(), default=0)
    for node in reversed(nodes):
        if node.id not in stage:
            below = [stage[c] for _p, c in graph.nx.out_edges(node.id) if c in stage]
            feeds_output = any(o in graph.outputs for o in node.outputs)
            stage[node.id] = min(below) if below else (last if feeds_output else 0)
    for p, c in graph.nx.edges():
        if stage[p] > stage[c]:
            raise TargetError(
                f"pipeline stages out of order: {graph.node(p).label} (stage {stage[p]}) feeds "
                f"{graph.node(c).label} (stage {stage[c]})",
                hint="run partition-pipeline after the passes that move nodes between layers",
            )
    return stage


def _interface_types(graph: Graph, names: set[str]) -> dict[str, ValueInfo]:
    """Types of the values crossing stages: from the IR, else from ONNX shape inference on the whole model."""
    known = {n: graph.value_info(n) for n in names}
    if any(info is None or not (info.dtype or info.type_proto) for info in known.values()):
        inferred = inferred_value_infos(graph)
        known = {
            n: info if info and (info.dtype or info.type_proto) else inferred.get(n)
            for n, info in known.items()
        }
    untyped = sorted(n for n, info in known.items() if info is None or not (info.dtype or info.type_proto))
    if untyped:
        raise TargetError(f"cannot type the values crossing pipeline stages: {', '.join(untyped[:5])}")
    return known  # type: ignore[return-value]


def split_stages(graph: Graph) -> list[Graph]:
    """One standalone Graph per stage (weights shared with ``graph``, not copied)."""
    nodes = graph.nodes()
    stage = node_stages(graph, nodes)
    k = max(stage.values(), default=0) + 1
    made = {o: stage[node.id] for node in nodes for o in node.outputs if o}
    read_by: dict[str, set[int]] = {}
    for node in nodes:
        for value in node_reads(node):
            read_by.setdefault(value, set()).add(stage[node.id])
    plans = []
    for s in range(k):
        mine = [node for node in nodes if stage[node.id] == s]
        reads = list(dict.fromkeys(v for node in mine for v in node_reads(node)))
        inputs = [v for v in graph.inputs if v in reads]
        inputs += [v for v in reads if made.get(v, s) < s]
        outputs = [v for v in graph.outputs if made.get(v) == s]
        outputs += [
            o
            for node in mine
            for o in node.outputs
            if o and o not in outputs and any(r > s for r in read_by.get(o, ()))
        ]
        plans.append((mine, inputs, outputs, [v for v in reads if graph.is_constant(v)]))
    types = _interface_types(graph, {v for _m, ins, outs, _w in plans for v in (*ins, *outs)})
    proto = to_onnx(graph, weights="none")
    node_proto = {node.id: p for node, p in zip(nodes, proto.graph.node, strict=True)}
    value_info = {vi.name: vi for vi in proto.graph.value_info}
    stages = []
    for s, (mine, inputs, outputs, weights) in enumerate(plans):
        inner = {o for node in mine for o in node.outputs} - set(outputs)
        gp = onnx.helper.make_graph(
            [node_proto[node.id] for node in mine],
            f"{graph.name}_stage_{s}",
            [value_info_to_proto(types[v]) for v in inputs],
            [value_info_to_proto(types[v]) for v in outputs],
            value_info=[vi for name, vi in value_info.items() if name in inner],
        )
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        model.graph.CopyFrom(gp)
        part = from_onnx(model)
        for name in weights:
            part.initializers[name] = graph.initializers[name]
        stages.append(part)
    return stages


def emit_stages(graph: Graph, out_dir: Path, *, external_data: bool | None = None) -> dict[str, Any]:
    """Write ``stage_<i>.onnx`` for each stage into ``out_dir``; returns the wiring for the manifest."""
    from llmc.targets.cpu.target import signature  # target.py imports this module

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for s, part in enumerate(split_stages(graph)):
        files = save_model(part, out_dir / f"stage_{s}.onnx", external_data=external_data)
        rows.append(
            {
                "stage": s,
                "file": files[0].name,
                "files": {p.name: p.stat().st_size for p in files},
                "inputs": list(part.inputs),
                "outputs": list(part.outputs),
                "param_bytes": part.initializers.nbytes(),
                "nodes": len(part),
            }
        )
    return {
        "format": 1,
        "stages": rows,
        "inputs": signature(graph, graph.inputs),
        "outputs": signature(graph, graph.outputs),
        "last_token_outputs": [
            n for n in graph.metadata_props.get("llmc.last_token_outputs", "").split(",") if n
        ],
    }
