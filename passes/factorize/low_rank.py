"""``factorize-low-rank``: a linear layer's weight W [K, N] as a product of thin matrices U [K, r]·V [r, N].

``MatMul(x, W)`` becomes ``MatMul(MatMul(x, U), V)``: r·(K+N) weights instead of K·N, and as many fewer
multiply-adds, so the rewrite saves bytes and time exactly when r·(K+N) < K·N. A layer is factorized only
when r·(K+N) < ``max_cost``·K·N (default 0.8: at least 20 % saved, since two small MatMuls run a little less
efficiently than one big one); every other layer is listed in the details with the reason.

U and V come from the truncated SVD W = P·S·Qᵀ (numpy, float64): U = P_r·√S_r, V = √S_r·Q_rᵀ, the best rank-r
approximation in the Frobenius norm. The rank per layer is chosen by ``energy`` (the smallest r keeping that
share of Σ s²), ``rank_ratio`` (r = ⌈ratio·min(K, N)⌉) or a fixed ``rank``.

``data_aware: true`` minimises the error of the layer's *output* on calibration data, ‖X·W − X·U·V‖, rather
than the error of W (activation-weighted SVD, as in SVD-LLM): with XᵀX + λI = L·Lᵀ (Cholesky), the SVD of
Lᵀ·W truncated to rank r gives Lᵀ·W ≈ P_r·S_r·Q_rᵀ, so U = L⁻ᵀ·P_r·√S_r and V = √S_r·Q_rᵀ. The energy is
then the share of output energy kept. λ = ``damping``·mean(diag XᵀX) keeps L well-conditioned.

Hand-written: numpy's SVD does the work; no library rewrites an ONNX graph into factorized layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import Field, model_validator

from llmc.calibration import require_calibration
from llmc.errors import PassError
from llmc.ir import Graph, Node
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.passes._select import WeightSelection, choose_sites, input_statistics, other_readers
from llmc.rewrite import RULE_KEY


class LowRankOptions(PassOptions):
    energy: float | None = Field(
        default=None, gt=0, le=1, description="share of squared singular values kept (default 0.9)"
    )
    rank: int | None = Field(default=None, ge=1, description="one rank for every selected layer")
    rank_ratio: float | None = Field(default=None, gt=0, le=1, description="rank = ratio · min(K, N)")
    max_cost: float = Field(
        default=0.8, gt=0, description="factorize only where r·(K+N) < max_cost·K·N (above 1: always)"
    )
    data_aware: bool = Field(
        default=False, description="minimise the output error on calibration data (needs calibration:)"
    )
    damping: float = Field(default=0.01, ge=0, description="data_aware: λ = damping · mean(diag XᵀX)")
    include: list[str] = Field(default_factory=lambda: ["*"], description="weight-name globs to factorize")
    exclude: list[str] = Field(default_factory=list, description="weight-name globs to keep whole")
    min_size: int = Field(default=4096, ge=0, description="smaller weights stay whole")

    @model_validator(mode="after")
    def _one_rule(self) -> LowRankOptions:
        given = [k for k in ("energy", "rank", "rank_ratio") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of energy, rank, rank_ratio (got {', '.join(given)})")
        if not given:
            self.energy = 0.9
        return self


@dataclass
class Factors:
    """W ≈ u @ v, with the rank and the share of Σ s² it keeps (of W, or of X·W when data-aware)."""

    u: np.ndarray
    v: np.ndarray
    rank: int
    energy: float


def truncated_svd(
    w: np.ndarray,
    *,
    rank: int | None = None,
    energy: float | None = None,
    gram: np.ndarray | None = None,
    damping: float = 0.01,
) -> Factors:
    """U [K, r], V [r, N] with W ≈ U·V: the best rank-r approximation of W, or of X·W when ``gram`` (XᵀX) is
    given. The rank is ``rank`` or the smallest that keeps ``energy`` of Σ s²."""
    w64 = np.asarray(w, np.float64)
    if gram is None:
        p, s, qt = np.linalg.svd(w64, full_matrices=False)
        lower = None
    else:
        k = w64.shape[0]
        diag = float(np.mean(np.diag(gram)))
        lam = damping * diag if diag > 0 else 1e-6
        lower = np.linalg.cholesky(gram + lam * np.eye(k))
        p, s, qt = np.linalg.svd(lower.T @ w64, full_matrices=False)
    power = s**2
    total = float(power.sum())
    if rank is None:
        if total == 0:
            rank = 1
        else:
            kept = np.cumsum(power) / total
            rank = int(min(np.searchsorted(kept, (energy or 1.0) - 1e-12) + 1, len(s)))
    root = np.sqrt(s[:rank])
    u = p[:, :rank] * root
    if lower is not None:
        u = np.linalg.solve(lower.T, u)  # L⁻ᵀ·P_r·√S_r
    v = root[:, None] * qt[:rank]
    kept_share = float(power[:rank].sum() / total) if total else 1.0
    return Factors(u.astype(w.dtype), v.astype(w.dtype), rank, kept_share)


@register_pass("factorize-low-rank")
class FactorizeLowRank(Pass):
    """Rewrites MatMul(x, W) into MatMul(MatMul(x, U), V), W ≈ U·V by truncated SVD, where that is smaller."""

    Options = LowRankOptions
    options: LowRankOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        select = WeightSelection(o.include, o.exclude)
        chosen, skipped = choose_sites(graph, select, self._reason, self.name, "factorize")
        grams: dict[str, np.ndarray] = {}
        if o.data_aware and chosen:
            grams = input_statistics(graph, chosen, require_calibration(ctx, self.name).feeds)
        layers: list[dict[str, object]] = []
        saved = 0
        for weight, nodes in chosen.items():
            w = graph.initializers[weight]
            k, n = w.shape
            factors = truncated_svd(
                w,
                rank=self._fixed_rank(weight, k, n),
                energy=o.energy,
                gram=grams.get(weight),
                damping=o.damping,
            )
            r = factors.rank
            if r * (k + n) >= o.max_cost * k * n:
                skipped.append(
                    {"weight": weight, "reason": _cost_reason(r, k, n, o.max_cost, factors.energy)}
                )
                continue
            self._rewrite(graph, weight, nodes, factors)
            bytes_saved = int(w.nbytes - factors.u.nbytes - factors.v.nbytes)
            saved += bytes_saved
            layers.append(
                {
                    "weight": weight,
                    "shape": [k, n],
                    "rank": r,
                    "energy": round(factors.energy, 6),
                    "bytes_saved": bytes_saved,
                }
            )
        details: dict[str, object] = {"factorized": layers, "skipped": skipped}
        unmatched = select.warn_unmatched(ctx.log, self.name)
        if unmatched:
            details["unmatched_patterns"] = unmatched
        stats = {"factorized": len(layers), "skipped": len(skipped), "bytes_saved": saved}
        return PassResult(changed=bool(layers), stats=stats, details=details)

    def _reason(self, graph: Graph, weight: str, nodes: list[Node]) -> str | None:
        o = self.options
        w = graph.initializers[weight]
        if w.size < o.min_size:
            return f"{w.size} weights < min_size {o.min_size}"
        k, n = w.shape
        rank = self._fixed_rank(weight, k, n)
        if rank is not None and rank * (k + n) >= o.max_cost * k * n:  # known before any SVD
            return _cost_reason(rank, k, n, o.max_cost, None)
        return other_readers(graph, weight, nodes)

    def _fixed_rank(self, weight: str, k: int, n: int) -> int | None:
        o = self.options
        if o.rank is not None:
            if o.rank > min(k, n):
                raise PassError(
                    self.name,
                    f"rank {o.rank} is larger than the matrix '{weight}' [{k}×{n}] allows "
                    f"(min(K, N) = {min(k, n)})",
                    hint="lower rank, use rank_ratio or energy, or exclude that weight",
                )
            return o.rank
        if o.rank_ratio is not None:
            return max(1, math.ceil(o.rank_ratio * min(k, n)))
        return None

    @staticmethod
    def _rewrite(graph: Graph, weight: str, nodes: list[Node], factors: Factors) -> None:
        u = graph.add_initializer(f"{weight}.lowrank_u", factors.u)
        v = graph.add_initializer(f"{weight}.lowrank_v", factors.v)
        dtype = graph.dtype(weight)
        for node in nodes:  # the MatMul stays as the second factor: its name and outputs are kept
            x = node.inputs[0]
            first = graph.add_node(
                "MatMul",
                [x, u],
                [graph.unique_name(f"{node.outputs[0]}.lowrank")],
                name=graph.unique_node_name(f"{node.name or weight}/lowrank_u"),
                order=node.order - 0.5,
                metadata={RULE_KEY: "factorize-low-rank"},
            )
            shape = graph.shape(x)
            graph.set_value_info(
                first.outputs[0], dtype, None if shape is None else (*shape[:-1], factors.rank)
            )
            graph.set_inputs(node, [first.outputs[0], v])
        graph.remove_initializer(weight)


def _cost_reason(r: int, k: int, n: int, max_cost: float, energy: float | None) -> str:
    cost = r * (k + n) / (k * n)
    kept = f" (energy {energy:.3f})" if energy is not None else ""
    return (
        f"rank {r}{kept} of {k}×{n} keeps {cost:.2f} of the weights and work, not below max_cost {max_cost}"
    )
