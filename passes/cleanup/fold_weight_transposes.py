"""``fold-weight-transposes``: ``Transpose`` of a constant weight into a pre-transposed initializer.

Dynamo exports write every ``nn.Linear`` as ``MatMul(x, Transpose(W, perm=[1, 0]))``, which hides the constant
weight from fusion rules (Gemm, gate/up merging, quantization). fold-constants leaves these alone above its
1 MiB limit; this pass folds them whatever their size, into initializers named ``<weight>.T`` (numpy's ``.T``:
every axis reversed, so a 2-D ``[1, 0]``) or ``<weight>.transpose_<perm>`` for other permutations, so that
per-layer options in a spec can name them (``model.layers.0.mlp.down_proj.weight.T``).

A weight read by anything besides Transposes (tied embeddings: ``Gather`` for the input, ``Transpose`` +
``MatMul`` for the logits) is kept as it is unless ``fold_shared`` says otherwise: folding would hold it twice.
Weights left unused by the folding are dropped at once (their memory goes with them); two Transposes of one
weight with one permutation share one folded initializer.
"""

from __future__ import annotations

import numpy as np
from pydantic import ConfigDict

from llmc.ir import Graph, Node
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass

from ._common import is_onnx_op, iter_graphs


class FoldWeightTransposesOptions(PassOptions):
    model_config = ConfigDict(use_attribute_docstrings=True)

    fold_shared: bool = False
    """Also fold weights that other nodes read as they are (both copies are then kept: more memory)."""


@register_pass("fold-weight-transposes")
class FoldWeightTransposes(Pass):
    """Rewrites Transpose(constant weight) into a pre-transposed initializer named <weight>.T."""

    Options = FoldWeightTransposesOptions
    options: FoldWeightTransposesOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stats = {"folded": 0, "identity": 0, "bytes": 0, "removed": 0}
        kept: list[dict[str, str]] = []
        for scope in list(iter_graphs(graph)):
            self._fold(scope, stats, kept)
        if kept:
            stats["kept"] = len(kept)
        details = {"kept": kept} if kept else {}
        return PassResult(
            stats["folded"] + stats["identity"] > 0, {k: v for k, v in stats.items() if v}, details
        )

    def _fold(self, graph: Graph, stats: dict[str, int], kept: list[dict[str, str]]) -> None:
        done: dict[tuple[str, tuple[int, ...]], str] = {}
        sources: set[str] = set()
        for node in graph.nodes():
            if not is_onnx_op(node, "Transpose") or node not in graph:
                continue
            weight = node.inputs[0]
            array = graph.constant(weight)
            if array is None:
                continue
            perm = _perm(node, array.ndim)
            if perm == tuple(range(len(perm))) and node.outputs[0] not in graph.outputs:
                graph.replace_all_uses(node.outputs[0], weight)  # a no-op Transpose: read the weight itself
                graph.remove_node(node)
                stats["identity"] += 1
                continue
            reason = self._reason(graph, node, weight, perm)
            if reason:
                kept.append({"site": node.label, "weight": weight, "reason": reason})
                continue
            key = (weight, perm)
            if key not in done:
                folded = np.ascontiguousarray(np.transpose(array, perm))
                done[key] = graph.add_initializer(_folded_name(weight, perm), folded)
                stats["folded"] += 1
                stats["bytes"] += int(folded.nbytes)
            graph.replace_all_uses(node.outputs[0], done[key])
            graph.remove_node(node)
            sources.add(weight)
        for weight in sorted(sources):
            if not graph.is_used(weight) and graph.is_initializer(weight) and weight not in graph.inputs:
                graph.remove_initializer(weight)
                stats["removed"] += 1

    def _reason(self, graph: Graph, node: Node, weight: str, perm: tuple[int, ...]) -> str | None:
        if node.outputs[0] in graph.outputs:
            return "the transposed value is a graph output"
        others = [n for n in graph.consumers(weight) if not is_onnx_op(n, "Transpose")]
        if others and not self.options.fold_shared:
            return f"'{weight}' is also read by {others[0].label}: folding would hold it twice (option fold_shared)"
        return None


def _perm(node: Node, ndim: int) -> tuple[int, ...]:
    perm = node.attr("perm")
    return tuple(range(ndim - 1, -1, -1)) if perm is None else tuple(int(p) % max(ndim, 1) for p in perm)


def _folded_name(weight: str, perm: tuple[int, ...]) -> str:
    if perm == tuple(range(len(perm) - 1, -1, -1)):
        return f"{weight}.T"
    return f"{weight}.transpose_{'_'.join(str(p) for p in perm)}"
