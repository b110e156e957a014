"""Passes written outside the package, loaded from specs as ``custom_passes:Name`` (tests dir is on sys.path)."""

from __future__ import annotations

import numpy as np

from llmc.ir import Graph
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult


class TagNodes(Pass):
    """Rewrites nothing numerically: stamps every node's doc_string with a tag (proves custom passes run)."""

    name = "tag-nodes"

    class Options(PassOptions):
        tag: str = "custom"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        for node in graph.nodes():
            node.doc_string = self.options.tag
        return PassResult(changed=bool(len(graph)), stats={"tagged": len(graph)})


class Explode(Pass):
    """Raises, as a buggy user pass would."""

    name = "explode"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise RuntimeError("boom")


class BreakGraph(Pass):
    """Points the first node at a value nobody defines: the verifier must name this pass."""

    name = "break-graph"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        node = graph.nodes()[0]
        graph.set_input(node, 0, "no_such_value")
        return PassResult(changed=True)


class PerturbWeights(Pass):
    """Scales the largest float weight by 1.5 (a valid graph with wrong numbers: verification must fail)."""

    name = "perturb-weights"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        floats = [n for n in graph.initializers if graph.initializers[n].dtype == np.float32]
        name = max(floats, key=lambda n: graph.initializers[n].size)
        graph.set_initializer(name, graph.initializers[name] * 1.5)
        return PassResult(changed=True)


class Liar(Pass):
    """Changes the graph but reports 'unchanged'."""

    name = "liar"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph.nodes()[0].name = "renamed-by-liar"
        return PassResult(changed=False)
