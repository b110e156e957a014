"""``prune-structured``: remove whole MLP channels and attention heads, so that the matrices really shrink.

Per decoder layer, the MLP keeps its most important ``1 - ffn_ratio`` intermediate channels (gate and up
columns, down rows) and attention keeps its most important query heads (q columns, o_proj rows), with the
importance measured on calibration data (see ``_importance``). Explicit lists (``channels``, ``heads``)
replace the scores for the layers they name. The pruned model is smaller and decode, a chain of
matrix-vector products bound by memory bandwidth, is faster in proportion to the bytes removed.

``*_scope: model`` spends the ratio on the whole model instead: the channels (heads) whose importance,
relative to their layer's total, is lowest go, so some layers lose more than others. On SmolLM2-135M
(perplexity of the fp32 model on the calibration text / held-out eval.txt: 35.2 / 42.3) uniform MLP pruning
was the better one (25 %: 54 / 80 per layer, 61 / 109 model-wide, 143 / 169 model-wide on raw scores), while
heads want the model scope (10 % of query heads model-wide: 35.0 / 45.5; a third of every layer's: 126 / 464).

Grouped-query attention stays uniform, as onnxruntime's ``Attention``/``GroupQueryAttention`` need
``q_num_heads`` to be a multiple of ``kv_num_heads``:

* ``head_mode: query`` (default) removes the same number of query heads from every kv group of a layer; the
  KV cache is unchanged, so the DecoderSpec stays valid.
* ``head_mode: group`` removes whole kv groups (a kv head with its query heads), the same number in every
  layer (the KV cache has one head count); the new count is in ``details["decoder"]["num_kv_heads"]`` and the
  cache inputs/outputs get the new shape. The driver must carry that count into the DecoderSpec (for the
  verifier, later calibration and the manifest).

The pass runs before or after fusion: on ``Attention`` nodes (fuse-attention, optionally merge-qkv and
fuse-silu-gate before it; see ``_sites``) or on the exporter's math-form attention with its hand-written
rotary embedding and ``repeat_kv`` (see ``_unfused``); a form it cannot follow is rejected with the node that
stops the trace. Dead nodes are removed first, since they could read pruned values with their old shapes.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from llmc.calibration import require_calibration
from llmc.errors import PassError
from llmc.ir import Graph, Node
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.passes.cleanup.dead_code import EliminateDeadCode

from ._importance import activation_names, importance, statistics
from ._layers import drop_layers, find_layers, layer_importance
from ._sites import AttentionSite, FfnSite, SiteError, find_sites
from ._slicing import fix_reshape, keep_columns, keep_rows, keep_vector, refit_rows, resize


@register_pass("prune-structured")
class PruneStructured(Pass):
    """Rewrites a decoder's MLPs and attention into smaller ones without their least important channels and heads."""

    class Options(PassOptions):
        ffn_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="share of MLP channels removed")
        head_ratio: float = Field(
            default=0.0, ge=0.0, lt=1.0, description="share of query heads (group mode: kv groups) removed"
        )
        head_mode: Literal["query", "group"] = Field(
            default="query", description="query: heads within each kv group; group: whole kv groups"
        )
        channels: dict[int, list[int]] = Field(
            default_factory=dict, description="layer -> MLP channels to remove (instead of the scores)"
        )
        heads: dict[int, list[int]] = Field(
            default_factory=dict, description="layer -> query heads (query mode) or kv heads (group mode)"
        )
        include: list[str] = Field(
            default_factory=lambda: ["*"], description="globs on the layer index or name (model.layers.3)"
        )
        exclude: list[str] = Field(default_factory=list, description="globs of layers left unpruned")
        ffn_scope: Literal["layer", "model"] = Field(
            default="layer",
            description="layer: every MLP loses ffn_ratio; model: ffn_ratio of all channels, where the "
            "importance relative to its layer is lowest",
        )
        head_scope: Literal["layer", "model"] = Field(
            default="layer",
            description="layer: every attention loses head_ratio; model: head_ratio of all query heads, where "
            "the importance relative to its layer is lowest",
        )
        multiple_of: int = Field(
            default=32, ge=1, description="kept MLP channels are a multiple of this (int4 block size)"
        )
        recover: bool = Field(
            default=False,
            description="refit each pruned MLP's down and attention's o_proj weight by least squares on the "
            "calibration activations, so the kept channels/heads reproduce the layer's old output",
        )
        recover_damp: float = Field(
            default=1.0,
            gt=0.0,
            description="refit ridge towards the original rows, as a share of the mean input energy",
        )
        layer_ratio: float = Field(
            default=0.0, ge=0.0, lt=1.0, description="share of decoder layers dropped (least influence first)"
        )
        drop_layers: list[int] = Field(
            default_factory=list, description="decoder layers to drop (instead of the influence scores)"
        )

        @field_validator("channels", "heads")
        @classmethod
        def _ids(cls, value: dict[int, list[int]]) -> dict[int, list[int]]:
            for layer, ids in value.items():
                if layer < 0 or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
                    raise ValueError(f"layer {layer}: ids must be distinct and >= 0")
            return value

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        wants_ffn = o.ffn_ratio > 0 or bool(o.channels)
        wants_heads = o.head_ratio > 0 or bool(o.heads)
        wants_layers = o.layer_ratio > 0 or bool(o.drop_layers)
        if not (wants_ffn or wants_heads or wants_layers):
            return PassResult(False, {"bytes_saved": 0})
        cleaned = EliminateDeadCode().run(graph, ctx).changed
        dropped: dict = {}
        if wants_layers:
            dropped = self._drop_layers(graph, ctx)
            if not (wants_ffn or wants_heads):
                return PassResult(True, dropped["stats"], dropped["details"])
        try:
            attention, ffn = find_sites(graph)
        except SiteError as exc:
            raise PassError(self.name, str(exc)) from None
        if wants_ffn and not ffn:
            raise PassError(self.name, "found no MLP (activation-gated MatMul into a constant-weight MatMul)")
        if wants_heads and not attention:
            raise PassError(
                self.name,
                "found no attention (an opset-23 Attention node or softmax(Q·Kᵀ)·V with projections)",
            )
        self._check_layers(ffn, attention)
        ffn_scores: dict[int, np.ndarray] = {}
        head_scores: dict[int, np.ndarray] = {}
        scored_ffn = [s for s in ffn if o.ffn_ratio > 0 and s.layer not in o.channels and self._picked(s)]
        scored_heads = [
            s for s in attention if o.head_ratio > 0 and s.layer not in o.heads and self._picked(s)
        ]
        grams: dict[str, np.ndarray] = {}
        if scored_ffn or scored_heads or o.recover:
            calibration = require_calibration(ctx, self.name)
            if o.recover:  # every site that may lose something: its whole XᵀX, for the scores and the refit
                refit_ffn = [s for s in ffn if wants_ffn and (s.layer in o.channels or self._picked(s))]
                refit_heads = [
                    s for s in attention if wants_heads and (s.layer in o.heads or self._picked(s))
                ]
                names = activation_names(refit_ffn, refit_heads)
            else:
                names = activation_names(scored_ffn, scored_heads)
            grams = statistics(graph, names, calibration, full=o.recover)
            ffn_scores, head_scores = importance(graph, scored_ffn, scored_heads, grams)
            if not o.recover:
                grams = {}
        self._ffn_counts: dict[int, int] = {}
        self._head_counts: dict[int, int] = {}
        self._plan_model_scope(
            ffn,
            attention,
            ffn_scores if o.ffn_scope == "model" else {},
            head_scores if o.head_scope == "model" else {},
        )
        layers: dict[str, dict] = {}
        saved = removed_channels = removed_heads = 0
        for site in ffn if wants_ffn else []:
            keep = self._ffn_keep(site, ffn_scores.get(site.layer))
            if keep is None:
                continue
            saved += _prune_ffn(graph, site, keep, grams.get(site.down.inputs[0]), o.recover_damp)
            removed_channels += site.width - len(keep)
            layers.setdefault(str(site.layer), {})["ffn_channels"] = [len(keep), site.width]
        kv_after: set[int] = set()
        for site in attention if wants_heads else []:
            plan = self._head_keep(site, head_scores.get(site.layer))
            if plan is None:
                kv_after.add(site.kv_heads)
                continue
            q_keep, kv_keep = plan
            try:
                gram = grams.get(site.o_proj.inputs[0])
                saved += _prune_heads(graph, site, q_keep, kv_keep, gram, o.recover_damp)
            except SiteError as exc:
                raise PassError(self.name, str(exc)) from None
            removed_heads += site.q_heads - len(q_keep)
            kv_after.add(len(kv_keep))
            entry = layers.setdefault(str(site.layer), {})
            entry["q_heads"] = [int(h) for h in q_keep]
            entry["kv_heads"] = [int(h) for h in kv_keep]
        changed = bool(layers) or cleaned
        if layers:
            EliminateDeadCode().run(graph, ctx)  # the weights and shape constants that were replaced
        details: dict = {"layers": layers}
        if o.head_mode == "group" and kv_after and attention and kv_after != {attention[0].kv_heads}:
            details["decoder"] = {"num_kv_heads": kv_after.pop()}
        stats = {"channels_removed": removed_channels, "heads_removed": removed_heads, "bytes_saved": saved}
        if dropped:
            stats |= {**dropped["stats"], "bytes_saved": saved + dropped["stats"]["bytes_saved"]}
            details["decoder"] = {**dropped["details"].get("decoder", {}), **details.get("decoder", {})}
            details |= {k: v for k, v in dropped["details"].items() if k != "decoder"}
            changed = True
        return PassResult(changed, stats, details)

    # -- whole layers ------------------------------------------------------------------------------
    def _drop_layers(self, graph: Graph, ctx: PassContext) -> dict:
        """Drop whole decoder layers (explicit ``drop_layers`` or the ``layer_ratio`` least influential)."""
        o = self.options
        try:
            sites = find_layers(graph)
        except SiteError as exc:
            raise PassError(self.name, str(exc)) from None
        known = {s.layer for s in sites}
        where = f"layers are {min(known, default=0)}..{max(known, default=-1)}"
        if o.drop_layers:
            unknown = sorted(set(o.drop_layers) - known)
            if unknown:
                raise PassError(self.name, f"drop_layers: no decoder layer {unknown[0]} ({where})")
            drop = sorted(set(o.drop_layers))
            scores = None
        else:
            candidates = [s for s in sites if self._selected(s.layer, s.name)]
            count = math.floor(o.layer_ratio * len(sites) + 0.5)  # half up: 0.15 of 30 layers is 5
            if count == 0:
                raise PassError(
                    self.name,
                    f"layer_ratio {o.layer_ratio} drops none of the {len(sites)} layers",
                    hint=f"use at least {1 / max(len(sites), 1):.3f}, or drop_layers: [...]",
                )
            if count > len(candidates):
                raise PassError(
                    self.name, f"layer_ratio {o.layer_ratio} drops {count} layers; include/exclude leave "
                    f"{len(candidates)} to choose from",
                )  # fmt: skip
            calibration = require_calibration(ctx, self.name)
            scores = layer_importance(graph, candidates, calibration.feeds)
            drop = sorted(candidates[k].layer for k in np.argsort(scores, kind="stable")[:count])
        if len(drop) >= len(sites):
            raise PassError(self.name, f"dropping every decoder layer ({where})")
        decoder = ctx.data.get("decoder")
        if decoder is None and any(s.cache_inputs for s in sites):
            raise PassError(
                self.name,
                "dropping layers of a graph with a KV cache renumbers the cache by the DecoderSpec, and "
                "this pipeline has none (PassContext.data['decoder'])",
            )
        try:
            saved = drop_layers(graph, sites, drop, decoder)
        except SiteError as exc:
            raise PassError(self.name, str(exc)) from None
        details: dict = {"dropped_layers": drop}
        if scores is not None:
            details["layer_influence"] = {
                str(s.layer): round(float(v), 6) for s, v in zip(candidates, scores, strict=True)
            }
        if any(s.cache_inputs for s in sites):
            details["decoder"] = {"num_layers": len(sites) - len(drop)}
        stats = {"layers_dropped": len(drop), "bytes_saved": saved}
        return {"stats": stats, "details": details}

    # -- which layers and what to keep -----------------------------------------------------------
    def _selected(self, index: int, name: str) -> bool:
        keys = (str(index), name)
        o = self.options
        return any(fnmatch.fnmatch(k, p) for k in keys for p in o.include) and not any(
            fnmatch.fnmatch(k, p) for k in keys for p in o.exclude
        )

    def _picked(self, site: FfnSite | AttentionSite) -> bool:
        return self._selected(site.layer, site.name)

    def _check_layers(self, ffn: list[FfnSite], attention: list[AttentionSite]) -> None:
        for option, sites, what in (("channels", ffn, "MLP"), ("heads", attention, "attention")):
            known = {s.layer for s in sites}
            unknown = sorted(set(getattr(self.options, option)) - known)
            if unknown:
                raise PassError(
                    self.name, f"{option}: no {what} layer {unknown[0]} (layers are {min(known, default=0)}.."
                    f"{max(known, default=-1)})",
                )  # fmt: skip
        if self.options.head_mode == "group" and attention:
            counts = {len(self._group_removal(s, None)[1]) for s in attention}
            if len(counts) > 1:
                raise PassError(
                    self.name,
                    "head_mode group must remove the same number of kv heads from every layer (the KV cache "
                    f"has one head count), this removes {sorted(counts)}",
                    hint="list the same number of kv heads for every layer, or use head_mode: query",
                )

    def _ffn_keep(self, site: FfnSite, scores: np.ndarray | None) -> np.ndarray | None:
        o = self.options
        where = f"layer {site.layer} ({site.down.label})"
        if site.layer in o.channels:
            removed = np.asarray(o.channels[site.layer], np.int64)
            if removed.size and removed.max() >= site.width:
                raise PassError(self.name, f"{where}: channel {removed.max()} >= width {site.width}")
            if removed.size >= site.width:
                raise PassError(self.name, f"{where}: removing every MLP channel")
            return np.setdiff1d(np.arange(site.width), removed) if removed.size else None
        if scores is None or not self._selected(site.layer, site.name):
            return None
        keep = self._ffn_counts.get(site.layer, math.ceil((1 - o.ffn_ratio) * site.width))
        keep = min(site.width, max(1, math.ceil(keep / o.multiple_of)) * o.multiple_of)
        if keep == site.width:
            return None
        return np.sort(np.argsort(-scores, kind="stable")[:keep])

    def _head_keep(
        self, site: AttentionSite, scores: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        if self.options.head_mode == "group":
            kept_kv, removed_kv = self._group_removal(site, scores)
            if not removed_kv:
                return None
            q_keep = np.concatenate([np.arange(g * site.group, (g + 1) * site.group) for g in kept_kv])
            return q_keep, np.asarray(kept_kv, np.int64)
        removed = self._query_removal(site, scores)
        if not removed:
            return None
        q_keep = np.setdiff1d(np.arange(site.q_heads), removed)
        return q_keep, np.arange(site.kv_heads)

    def _where(self, site: AttentionSite) -> str:
        return f"layer {site.layer} ({site.node.label}, {site.q_heads} query / {site.kv_heads} kv heads)"

    def _query_removal(self, site: AttentionSite, scores: np.ndarray | None) -> list[int]:
        o, g = self.options, site.group
        if site.layer in o.heads:
            removed = sorted(o.heads[site.layer])
            if removed and removed[-1] >= site.q_heads:
                raise PassError(self.name, f"{self._where(site)}: query head {removed[-1]} does not exist")
            per_group = [sum(1 for h in removed if h // g == j) for j in range(site.kv_heads)]
            if len(set(per_group)) > 1 or (removed and per_group[0] == g):
                raise PassError(
                    self.name,
                    f"{self._where(site)}: removing query heads {removed} leaves "
                    f"{[g - n for n in per_group]} query heads per kv group; GQA needs the same number "
                    "(at least one) in every group",
                    hint=f"query heads {{j*{g} .. j*{g}+{g - 1}}} share kv head j; or use head_mode: group",
                )
            return removed
        if scores is None or not self._selected(site.layer, site.name):
            return []
        if o.head_scope == "model":
            per_group = self._head_counts.get(site.layer, 0)
            if per_group == 0:
                return []
        else:
            per_group = round(o.head_ratio * g)
        if per_group == 0 or per_group >= g:
            raise PassError(
                self.name,
                f"{self._where(site)}: head_ratio {o.head_ratio} removes {per_group} of the {g} query heads "
                "of each kv group; it must remove at least one and keep at least one",
                hint=f"use a multiple of 1/{g} below 1, or head_mode: group",
            )
        removed = []
        for j in range(site.kv_heads):
            group = np.arange(j * g, (j + 1) * g)
            removed += group[np.argsort(scores[group], kind="stable")[:per_group]].tolist()
        return sorted(removed)

    def _plan_model_scope(
        self,
        ffn: list[FfnSite],
        attention: list[AttentionSite],
        ffn_scores: dict[int, np.ndarray],
        head_scores: dict[int, np.ndarray],
    ) -> None:
        """Model scope: how many channels each layer keeps, how many query heads per group it loses.

        Scores are compared relative to their layer's total (the residual stream grows with depth, so raw
        contributions of late layers look larger); the lowest ``ratio`` of all channels (heads) go.
        """
        o = self.options
        if ffn_scores:
            relative = {k: v / max(v.sum(), 1e-30) for k, v in ffn_scores.items()}
            pooled = np.sort(np.concatenate(list(relative.values())))
            removed = round(o.ffn_ratio * pooled.size)
            if removed:
                cut = pooled[removed - 1]
                self._ffn_counts = {k: int((v > cut).sum()) for k, v in relative.items()}
        if head_scores:
            if o.head_mode == "group":
                raise PassError(
                    self.name, "head_scope: model needs head_mode: query (kv heads go alike everywhere)"
                )
            sites = {s.layer: s for s in attention if s.layer in head_scores}
            units = []  # (marginal cost, layer, step): the step-th weakest query head of every kv group goes
            for layer, scores in head_scores.items():
                site = sites[layer]
                ranked = np.sort(scores.reshape(site.kv_heads, site.group), axis=1)
                for step in range(1, site.group):
                    units.append((ranked[:, step - 1].sum() / max(scores.sum(), 1e-30), layer, step))
            total = sum(s.q_heads for s in sites.values())
            wanted = round(o.head_ratio * total)
            removed = 0
            for _cost, layer, step in sorted(units):
                if removed >= wanted:
                    break
                if step == self._head_counts.get(layer, 0) + 1:
                    self._head_counts[layer] = step
                    removed += sites[layer].kv_heads

    def _group_removal(self, site: AttentionSite, scores: np.ndarray | None) -> tuple[list[int], list[int]]:
        """(kept, removed) kv heads of one layer in group mode."""
        o = self.options
        if site.layer in o.heads:
            removed = sorted(o.heads[site.layer])
            if removed and removed[-1] >= site.kv_heads:
                raise PassError(self.name, f"{self._where(site)}: kv head {removed[-1]} does not exist")
        elif o.head_ratio > 0 and self._selected(site.layer, site.name):
            count = round(o.head_ratio * site.kv_heads)
            if count == 0 or count >= site.kv_heads:
                raise PassError(
                    self.name,
                    f"{self._where(site)}: head_ratio {o.head_ratio} removes {count} of {site.kv_heads} kv "
                    "groups; it must remove at least one and keep at least one",
                )
            if scores is None:  # counting only (layer check before the scores exist)
                return list(range(count, site.kv_heads)), list(range(count))
            group_scores = scores.reshape(site.kv_heads, site.group).sum(axis=1)
            removed = sorted(np.argsort(group_scores, kind="stable")[:count].tolist())
        else:
            removed = []
        if len(removed) >= site.kv_heads:
            raise PassError(self.name, f"{self._where(site)}: removing every kv group")
        return [j for j in range(site.kv_heads) if j not in removed], removed


def _rows(graph: Graph, matmul: Node, keep: np.ndarray, gram: np.ndarray | None, damp: float) -> int:
    """The consuming weight keeps the rows ``keep``: as they are, or refitted when XᵀX is given."""
    return keep_rows(graph, matmul, keep) if gram is None else refit_rows(graph, matmul, keep, gram, damp)


def _prune_ffn(
    graph: Graph, site: FfnSite, keep: np.ndarray, gram: np.ndarray | None = None, damp: float = 1.0
) -> int:
    saved = keep_columns(graph, site.sources, [keep] * len(site.sources))
    saved += _rows(graph, site.down, keep, gram, damp)
    for node, slot in site.vectors:
        saved += keep_vector(graph, node, slot, keep)
    for value in site.values:
        resize(graph, value, -1, len(keep))
    return saved


def _columns(heads: np.ndarray, head_dim: int) -> np.ndarray:
    return (np.asarray(heads, np.int64)[:, None] * head_dim + np.arange(head_dim)).reshape(-1)


def _prune_heads(
    graph: Graph,
    site: AttentionSite,
    q_keep: np.ndarray,
    kv_keep: np.ndarray,
    gram: np.ndarray | None = None,
    damp: float = 1.0,
) -> int:
    d = site.head_dim
    q_cols, kv_cols = _columns(q_keep, d), _columns(kv_keep, d)
    paths = [(site.q, q_cols, site.q_heads, len(q_keep))]
    if len(kv_keep) != site.kv_heads:
        paths += [(p, kv_cols, site.kv_heads, len(kv_keep)) for p in (site.k, site.v)]
    for path, _, old, new in paths:
        fix_reshape(graph, path.reshape, 2, old, new)
    saved = keep_columns(graph, [p.source for p, *_ in paths], [cols for _, cols, *_ in paths])
    saved += _rows(graph, site.o_proj, q_cols, gram, damp)
    fix_reshape(graph, site.out_reshape, 2, site.q_heads * d, len(q_keep) * d)
    for path, _, _, new in paths:
        for value, axis in path.heads_values:
            resize(graph, value, axis, new)
        if path.rotary is not None and path.rotary.attr("num_heads") is not None:
            path.rotary.set_attr("num_heads", new)
    for value, axis in site.out_values:
        resize(graph, value, axis, len(q_keep))
    resize(graph, site.out_reshape.outputs[0], -1, len(q_keep) * d)
    if len(kv_keep) != site.kv_heads:
        for value in site.cache:
            resize(graph, value, 1, len(kv_keep))
    if site.fused:
        site.node.set_attr("q_num_heads", len(q_keep))
        site.node.set_attr("kv_num_heads", len(kv_keep))
    else:
        _prune_repeats(graph, site, len(q_keep), len(kv_keep))
    return saved


def _prune_repeats(graph: Graph, site: AttentionSite, q_heads: int, kv_heads: int) -> None:
    """Unfused attention: the targets of repeat_kv's Expand [B, kv, group, T, D] and Reshape [B, heads, T, D]
    (and a constant K^T shape) and the recorded shapes of the values between q/k/v and P·V get the new
    counts; a value whose head axis is merged with the batch loses its recorded shape."""
    old = {"q": site.q_heads, "kv": site.kv_heads, "group": site.group}
    new = {"q": q_heads, "kv": kv_heads, "group": q_heads // kv_heads}
    for node, axis, kind in site.shape_edits:
        fix_reshape(graph, node, axis, old[kind], new[kind])
    for value, axes in site.region:
        info = graph.value_info(value)
        for axis, kind in axes.items():
            if kind == "unknown" and info is not None:
                graph.set_value_info(value, info.dtype, None)
            elif kind != "unknown":
                resize(graph, value, axis, new[kind])
