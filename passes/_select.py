"""Which linear-layer weights a weight pass touches: MatMul sites with a constant 2-D float weight, chosen by
name globs (``include`` / ``exclude``), with a warning for every pattern that matches no weight.

factorize-low-rank, prune-unstructured and share-parameters pick layers this way (quantize-weights has the
same logic inline and could use it), so that ``exclude: ["*lm_head*"]`` means the same thing in each of them
and a misspelt pattern is reported rather than silently ignored. ``fnmatch`` does the matching; only the
bookkeeping is written here.

The data-aware variants (activation-weighted SVD, Wanda) also need statistics of what those layers multiply
their weight with: ``input_statistics`` reads them from the calibration set through ``llmc.calibration``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence

import numpy as np

from llmc.calibration import gram_matrices
from llmc.ir import Graph, Node


class WeightSelection:
    """Name globs: a weight is selected when some ``include`` glob and no ``exclude`` glob matches it.

    Every pattern that matched a name is remembered, so that the patterns that matched nothing can be
    reported at the end (``unmatched``) — usually a typo in a spec.
    """

    def __init__(self, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> None:
        self.include = list(include)
        self.exclude = list(exclude)
        self._hit: set[str] = set()

    def __call__(self, name: str) -> bool:
        included = [p for p in self.include if fnmatch.fnmatch(name, p)]
        excluded = [p for p in self.exclude if fnmatch.fnmatch(name, p)]
        self._hit.update(included, excluded)
        return bool(included) and not excluded

    def unmatched(self) -> dict[str, list[str]]:
        """Patterns that matched no name seen so far (``*`` never counts as a typo)."""
        out = {
            "include": [p for p in self.include if p not in self._hit and p != "*"],
            "exclude": [p for p in self.exclude if p not in self._hit],
        }
        return {k: v for k, v in out.items() if v}

    def warn_unmatched(self, log: logging.Logger, pass_name: str) -> dict[str, list[str]]:
        """Log one warning per pattern that matched nothing; returns them for the pass's details."""
        unmatched = self.unmatched()
        for kind, patterns in unmatched.items():
            for pattern in patterns:
                log.warning("%s: %s pattern %r matches no weight", pass_name, kind, pattern)
        return unmatched


def is_weight_matmul(graph: Graph, node: Node) -> bool:
    """``MatMul(x, W)`` in the standard domain with W a constant 2-D float initializer."""
    if node.op_type != "MatMul" or node.domain or not graph.is_constant(node.input(1)):
        return False
    w = graph.initializers[node.inputs[1]]
    return w.ndim == 2 and w.dtype.kind == "f"


def matmul_weights(graph: Graph) -> dict[str, list[Node]]:
    """Weight name -> the MatMuls that read it as their right operand, in topological order."""
    sites: dict[str, list[Node]] = {}
    for node in graph.nodes():
        if is_weight_matmul(graph, node):
            sites.setdefault(node.inputs[1], []).append(node)
    return sites


def other_readers(graph: Graph, weight: str, matmuls: Sequence[Node]) -> str | None:
    """Why a weight cannot be rewritten for its MatMuls alone: another node or the interface reads it."""
    if weight in graph.outputs or weight in graph.inputs:
        return f"'{weight}' is a graph input or output"
    mine = {id(n) for n in matmuls}
    others = [n for n in graph.consumers(weight) if id(n) not in mine]
    if others:
        return f"'{weight}' is also read by {others[0].label}"
    return None


def input_statistics(
    graph: Graph,
    sites: dict[str, list[Node]],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    diagonal: bool = False,
) -> dict[str, np.ndarray]:
    """Weight name -> XᵀX [K, K] (float64) of the activations X its MatMuls multiply it with, summed over the
    calibration feeds and every MatMul that reads the weight; with ``diagonal`` only Σ x_k² [K] (Wanda needs
    no more, and the full matrices of a whole LLM would not fit in memory).

    The model runs in onnxruntime (``llmc.calibration.activations``); layers that read the same activation
    (q/k/v, gate/up) share one accumulator."""
    inputs = {w: [n.inputs[0] for n in nodes] for w, nodes in sites.items()}
    sums = gram_matrices(graph, [x for xs in inputs.values() for x in xs], feeds, diagonal=diagonal)
    return {w: sum(sums[x] for x in xs) for w, xs in inputs.items()}


def choose_sites(
    graph: Graph,
    select: WeightSelection,
    reason: Callable[[Graph, str, list[Node]], str | None],
    pass_name: str,
    verb: str,
) -> tuple[dict[str, list[Node]], list[dict[str, str]]]:
    """The selected weight MatMuls a pass can rewrite, and the skipped ones with their reason.

    ``reason(graph, weight, nodes)`` says why a selected weight cannot be rewritten (None: it can); a graph
    with no weight MatMul at all is a PassError ("the model has no MatMul ... to <verb>").
    """
    from llmc.errors import PassError

    all_sites = matmul_weights(graph)
    if not all_sites:
        raise PassError(pass_name, f"the model has no MatMul with a constant float weight to {verb}")
    chosen: dict[str, list[Node]] = {}
    skipped: list[dict[str, str]] = []
    for weight, nodes in all_sites.items():
        if not select(weight):
            continue
        why = reason(graph, weight, nodes)
        if why:
            skipped.append({"weight": weight, "reason": why})
        else:
            chosen[weight] = nodes
    return chosen, skipped
