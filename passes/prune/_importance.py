"""Importance of MLP channels and attention heads, from calibration activations (Wanda-style).

A channel ``c`` of an MLP contributes ``h[:, c] ⊗ W_down[c, :]`` to the layer's output, so its importance is
``‖h[:, c]‖₂ · ‖W_down[c, :]‖₂`` over every calibration token (the activation-weighted magnitude of Wanda,
summed over a whole row because the whole row goes). A head contributes its slice of the ``o_proj`` input
times its rows of ``W_o``: ``‖attn_out[:, head]‖_F · ‖W_o[head rows, :]‖_F``. Activations come from running
the IR as it is in onnxruntime (``llmc.calibration.gram_matrices``), sums of squares accumulated feed by feed
(the whole XᵀX when the pass also refits the consuming weight, see ``_slicing.refit_rows``).
"""

from __future__ import annotations

import numpy as np

from llmc.calibration import CalibrationSet, gram_matrices
from llmc.ir import Graph

from ._sites import AttentionSite, FfnSite


def activation_names(ffn: list[FfnSite], attention: list[AttentionSite]) -> list[str]:
    """The activations the scores (and the least-squares refit) read: MLP down and attention o_proj inputs."""
    return [s.down.inputs[0] for s in ffn] + [s.o_proj.inputs[0] for s in attention]


def statistics(
    graph: Graph, names: list[str], calibration: CalibrationSet, *, full: bool
) -> dict[str, np.ndarray]:
    """Per activation, Σ x² over the calibration tokens, or the whole XᵀX with ``full`` (for the refit)."""
    return gram_matrices(graph, names, calibration.feeds, diagonal=not full) if names else {}


def importance(
    graph: Graph, ffn: list[FfnSite], attention: list[AttentionSite], sums: dict[str, np.ndarray]
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """(channel scores per MLP layer, query-head scores per attention layer) from ``statistics``."""

    def squares(name: str) -> np.ndarray:
        stat = sums[name]
        return np.diag(stat) if stat.ndim == 2 else stat

    channels = {}
    for s in ffn:
        w = graph.initializers[s.down.inputs[1]].astype(np.float64)
        channels[s.layer] = np.sqrt(squares(s.down.inputs[0])) * np.linalg.norm(w, axis=1)
    heads = {}
    for s in attention:
        w = graph.initializers[s.o_proj.inputs[1]].astype(np.float64).reshape(s.q_heads, s.head_dim, -1)
        act = squares(s.o_proj.inputs[0]).reshape(s.q_heads, s.head_dim).sum(axis=1)
        heads[s.layer] = np.sqrt(act) * np.sqrt((w * w).sum(axis=(1, 2)))
    return channels, heads
