"""Passes and tiny models for the sensitivity and bisect tests (specs load passes as ``bisect_passes:Name``;
the tests dir is on sys.path).

The fragile models have a *dead unit with huge outgoing weights*: hidden unit j of one layer is always zero
(its incoming column or row is zero), and the next weight's rows for j are outliers. In float they add
nothing; quantized in blocks along K, each outlier sets its block's scale and rounds the other rows of the
block to zero, which wipes that weight out. So quantizing that one weight costs far more than any other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmc.ir import Graph, clone
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult

HIDDEN = 64
DEAD = (0, 32)  # one dead unit per block of 32 rows


class RenameNodes(Pass):
    """Rewrites node names into ``<prefix><name>``: the graph changes, its numbers do not."""

    name = "rename-nodes"

    class Options(PassOptions):
        prefix: str = "r/"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        for node in graph.nodes():
            node.name = self.options.prefix + (node.name or node.op_type)
        return PassResult(changed=bool(len(graph)), stats={"renamed": len(graph)})


class NegateWeight(Pass):
    """Rewrites the first float weight W into -W: a valid graph with wrong numbers (the check must fail)."""

    name = "negate-weight"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        name = next(n for n in graph.initializers if graph.initializers[n].dtype.kind == "f")
        graph.set_initializer(name, -graph.initializers[name])
        return PassResult(changed=True)


def mlp_model(path: Path, fragile: str | None = None) -> Path:
    """y = relu(relu(x @ W1) @ W2) @ W3 (64 wide, opset 21); ``fragile`` (W2 or W3) gets dead-unit outliers."""
    rng = np.random.default_rng(0)
    weights = {n: (rng.standard_normal((HIDDEN, HIDDEN)) / 8).astype(np.float32) for n in ("W1", "W2", "W3")}
    if fragile is not None:
        before = {"W2": "W1", "W3": "W2"}[fragile]
        weights[before][:, list(DEAD)] = 0.0
        weights[fragile][list(DEAD), :] = 1000.0
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu1"),
        helper.make_node("MatMul", ["b", "W2"], ["c"], name="mm2"),
        helper.make_node("Relu", ["c"], ["d"], name="relu2"),
        helper.make_node("MatMul", ["d", "W3"], ["y"], name="mm3"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HIDDEN])],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def fragile_decoder(imported, layer: int = 1):
    """A copy of the tiny llama import (its own graph) whose layer ``layer`` down_proj has dead-unit outliers."""
    graph = clone(imported.graph)
    up = f"model.layers.{layer}.mlp.up_proj.weight"  # [intermediate, hidden]: row j makes unit j
    down = f"model.layers.{layer}.mlp.down_proj.weight"  # [hidden, intermediate]: column j reads unit j
    up_w, down_w = graph.initializers[up].copy(), graph.initializers[down].copy()
    dead = list(range(0, up_w.shape[0], 32))  # one unit per block of the down projection's K
    up_w[dead, :] = 0.0
    down_w[:, dead] = 1000.0
    graph.set_initializer(up, up_w)
    graph.set_initializer(down, down_w)
    return dataclasses.replace(imported, graph=graph)
