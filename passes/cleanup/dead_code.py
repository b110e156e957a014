"""``eliminate-dead-code``: nodes, initializers and value_info that no graph output depends on go away.

Liveness starts from each graph's outputs (a subgraph's outputs are its roots) and flows backwards through
node inputs and implicit inputs, so that a value read only inside an If branch or a Loop body stays alive.
Subgraphs are cleaned after their enclosing graph has dropped its dead nodes (a dead If is not worth
cleaning); when cleaning a subgraph frees an outer value, the enclosing graph is swept again. Graph inputs
are the model's interface and are never removed, nor initializers that are also graph inputs (they are
the inputs' defaults).
"""

from __future__ import annotations

from pydantic import ConfigDict

from llmc.ir import Graph
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass


class DeadCodeOptions(PassOptions):
    model_config = ConfigDict(use_attribute_docstrings=True)  # the docstrings below describe the options

    initializers: bool = True
    """Remove initializers that nothing reads."""
    value_info: bool = True
    """Remove value_info of values that no longer exist."""


@register_pass("eliminate-dead-code")
class EliminateDeadCode(Pass):
    """Rewrites a graph with dead nodes, unused initializers and stale value_info into one without them."""

    Options = DeadCodeOptions
    options: DeadCodeOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = {"nodes": 0, "initializers": 0, "value_info": 0}
        self._clean(graph, stats)
        return PassResult(any(stats.values()), {k: v for k, v in stats.items() if v})

    def _clean(self, graph: Graph, stats: dict[str, int]) -> None:
        self._sweep(graph, stats)
        reads_before = _outer_reads(graph)
        for node in graph.nodes():
            for sub in node.all_subgraphs():
                self._clean(sub, stats)
        if _outer_reads(graph) != reads_before:
            self._sweep(graph, stats)  # a subgraph stopped reading something: it may be dead now
        if self.options.initializers:
            for name in [n for n in graph.initializers if not graph.is_used(n) and n not in graph.inputs]:
                graph.remove_initializer(name)
                stats["initializers"] += 1
        if self.options.value_info:
            interface = set(graph.inputs) | set(graph.outputs)
            for name in [n for n in graph.values if n not in interface and not graph.defines(n)]:
                del graph.values[name]
                stats["value_info"] += 1

    @staticmethod
    def _sweep(graph: Graph, stats: dict[str, int]) -> None:
        """Remove the nodes of ``graph`` whose outputs reach none of its outputs (consumers first)."""
        live = set(graph.outputs)
        dead = []
        for node in reversed(graph.nodes()):
            if any(value in live for value in node.outputs if value):
                live.update(v for v in (*node.inputs, *node.implicit_inputs) if v)
            else:
                dead.append(node)
        for node in dead:
            graph.remove_node(node)
        stats["nodes"] += len(dead)


def _outer_reads(graph: Graph) -> dict[int, tuple[str, ...]]:
    return {node.id: node.implicit_inputs for node in graph.nodes() if node.subgraphs}
