"""``quantize-weights``: weight-only int4/int8 quantization of MatMul weights and embeddings, as standard ONNX.

``MatMul(x, W)`` with a constant float W [K, N] becomes ``MatMul(x, DequantizeLinear(Q, scale[, zero_point],
axis=0, block_size=B))``: Q holds int4/int8 (symmetric) or uint4/uint8 (asymmetric) values in blocks of B
rows along K, each block of each column with its own scale. The graph stays standard ONNX (opset 21+
blocked DequantizeLinear) and runs as it is; the CPU target legalizes the pair into onnxruntime's
``MatMulNBits``. Layers are chosen by name globs (``include``/``exclude`` on the weight name), and
``overrides`` give matching weights their own bits / block size / algorithm.

With ``offset: true`` (the Q4_1 / min-max form: ``w = m + d·q``, d = (max − min)/(2^bits − 1), m = the
block's min, q unsigned) the zero point is a float per block, which DequantizeLinear's integer zero point
cannot hold when m is not a multiple of d. It is written as the sum of two MatMuls, both standard ONNX:
``MatMul(x, DequantizeLinear(Q, d, zero_point=0, axis=0)) + MatMul(ReduceSum(Reshape(x, [..., K/B, B]),
axes=[-1]), m [K/B, N])``, since x·W = x·(d⊙q) + Σ_blocks (Σ_{k∈block} x_k)·m_block. The first MatMul keeps
the CPU target's int8-compute MatMulNBits (zero points 0); the second is small (K/B × N). The block sums are
computed once per input (merged q/k/v and gate/up share theirs). Exact for weights that already lie on such
a grid (a Q4_1 GGUF). RTN only; the embedding and a tied shared lm_head keep the integer zero point form.

Two algorithms choose Q and the scales; the IR is the same for both:
- ``rtn``: round to nearest, scale from the block's absmax (symmetric) or min/max (asymmetric);
- ``gptq``: GPTQ (``gptq.py``) on the Hessian XᵀX of each MatMul's input over the spec's calibration set.
  Hessians are read from the float graph before any weight is quantized (one onnxruntime run over the
  calibration windows), one per distinct input value (merged q/k/v and gate/up weights share theirs).

The embedding and the lm_head are left float unless ``embedding`` / ``lm_head`` say otherwise (the lm_head
costs the most token agreement). The lm_head is the MatMul that writes the ``logits`` output or reads the
embedding table transposed. A tied lm_head reads ``Transpose(table)`` (fold-weight-transposes keeps the
table shared by default, so the quantize-weights of the past saw no constant weight there and left it fp32),
or a pre-transposed copy that equals ``table.T``. Forms:
- embedding: ``Gather(DequantizeLinear(Qe [vocab, hidden], scale [vocab, hidden/B][, zp], axis=1), ids)``;
- lm_head alone: the MatMul form above over the transposed table (the Transpose goes);
- both, tied, with one bits / block / symmetric: one DequantizeLinear over Qe feeds the Gather and a
  ``Transpose(perm=[1, 0])`` read by the lm_head, so the table is stored once (blocks along hidden are
  blocks along the lm_head's K, the layout MatMulNBits and GatherBlockQuantized read). The shared table is
  quantized by round-to-nearest along hidden even under ``gptq``: GPTQ would fit it to the lm_head's
  inputs, while the same values are also the embedding lookups, whose error GPTQ does not see.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import ml_dtypes
import numpy as np
from pydantic import Field, field_validator, model_validator

from llmc.errors import PassError
from llmc.ir import Graph, Node, np_dtype_to_onnx
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.rewrite import RULE_KEY

_RANGES = {(4, True): (-8, 7), (4, False): (0, 15), (8, True): (-128, 127), (8, False): (0, 255)}
_DTYPES = {
    (4, True): ml_dtypes.int4,
    (4, False): ml_dtypes.uint4,
    (8, True): np.int8,
    (8, False): np.uint8,
}
Algorithm = Literal["rtn", "gptq"]


def grid_dtype(bits: int, symmetric: bool) -> type:
    """The stored integer type: int4/int8 (symmetric) or uint4/uint8 (asymmetric, with zero point)."""
    return _DTYPES[(bits, symmetric)]


def block_grid(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Grid of blocks [G, B, N] (reduced over B): scale [G, N] float32, zero point [G, N] (integral) or None."""
    low, high = _RANGES[(bits, symmetric)]
    if symmetric:
        # scale = absmax / 2^(b-1): all 2^b levels in use; a positive extreme clips to 2^(b-1)-1 (one step).
        # Measured on SmolLM2 int4: 48+50/128 greedy tokens kept, against 43+48 with absmax / (2^(b-1)-1).
        amax = np.abs(blocks).max(axis=1)
        return np.where(amax > 0, amax / -low, 1.0).astype(np.float32), None
    lo, hi = np.minimum(blocks.min(axis=1), 0.0), np.maximum(blocks.max(axis=1), 0.0)
    scale = np.where(hi > lo, (hi - lo) / (high - low), 1.0).astype(np.float32)
    return scale, np.clip(np.rint(low - lo / scale), low, high)


def offset_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min/max grid of W [K, N] with a float offset: (q [K, N] unsigned, d [K/B, N], m [K/B, N]), w ≈ m + d·q."""
    k, n = w.shape
    blocks = w.astype(np.float32).reshape(k // block, block, n)
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    top = (1 << bits) - 1
    d = np.where(hi > lo, (hi - lo) / top, 1.0).astype(np.float32)
    q = np.clip(np.rint((blocks - lo[:, None, :]) / d[:, None, :]), 0, top)
    return q.reshape(k, n).astype(grid_dtype(bits, False)), d, lo.astype(np.float32)


def grid_codes(
    values: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int, symmetric: bool
) -> np.ndarray:
    """Round-to-nearest codes of ``values`` on the grid (as floats, clipped to the type's range)."""
    low, high = _RANGES[(bits, symmetric)]
    codes = np.rint(values / scale)
    return np.clip(codes if zero is None else codes + zero, low, high)


def quantize_blocks(w: np.ndarray, bits: int, block: int, symmetric: bool):
    """Round-to-nearest of W [K, N] in blocks of ``block`` rows: (q [K, N], scale [K/B, N], zero_point or None)."""
    k, n = w.shape
    blocks = w.astype(np.float32).reshape(k // block, block, n)
    scale, zero = block_grid(blocks, bits, symmetric)
    q = grid_codes(blocks, scale[:, None, :], None if zero is None else zero[:, None, :], bits, symmetric)
    dtype = grid_dtype(bits, symmetric)
    return q.reshape(k, n).astype(dtype), scale, None if zero is None else zero.astype(dtype)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, block: int) -> np.ndarray:
    """What DequantizeLinear(q, scale, zero, axis=0, block_size=block) computes, in float64."""
    codes = q.astype(np.float64) - (
        0.0 if zero is None else np.repeat(zero.astype(np.float64), block, axis=0)
    )
    return codes * np.repeat(scale.astype(np.float64), block, axis=0)


def output_error(w: np.ndarray, restored: np.ndarray, hessian: np.ndarray) -> float:
    """‖X(W − Ŵ)‖ / ‖XW‖ over the calibration tokens, from H = XᵀX alone."""
    delta = w.astype(np.float64) - restored
    num = float(np.einsum("kn,kn->", delta, hessian @ delta))
    den = float(np.einsum("kn,kn->", w, hessian @ w.astype(np.float64)))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def _check_bits(value: int | None) -> int | None:
    if value is not None and value not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    return value


def _check_block(value: int | None) -> int | None:
    if value is not None and value & (value - 1):
        raise ValueError("block_size must be a power of two")
    return value


class Override(PassOptions):
    """Bits / block size / signedness / algorithm for the weights whose name (or role) matches ``pattern``."""

    pattern: str = Field(description="weight-name glob; 'lm_head' and 'embedding' also name those roles")
    bits: int | None = None
    block_size: int | None = Field(default=None, ge=16, le=256)
    symmetric: bool | None = None
    offset: bool | None = None
    algorithm: Algorithm | None = None

    _bits = field_validator("bits")(_check_bits)
    _block = field_validator("block_size")(_check_block)


@dataclass(frozen=True)
class Scheme:
    """How one weight is quantized."""

    bits: int
    block: int
    symmetric: bool
    algorithm: str
    offset: bool = False  # min/max grid with a float offset per block (symmetric is then unused)

    def grid(self) -> tuple[int, int, bool]:
        return self.bits, self.block, self.symmetric


@dataclass(eq=False)  # identity: sites are dict keys
class Site:
    """A weight the pass may quantize: a MatMul weight [K, N] or an embedding table [vocab, hidden]."""

    role: str  # "matmul", "lm_head" or "embedding"
    node: Node  # the MatMul or the Gather
    name: str  # for patterns and reports (a Transpose'd table reads as <table>.T)
    source: str  # the initializer that holds the values
    transpose: Node | None = None  # the lm_head reads Transpose(source)
    scheme: Scheme | None = None
    stats: dict[str, object] = field(default_factory=dict)

    def weight(self, graph: Graph) -> np.ndarray:
        array = graph.initializers[self.source]
        return np.ascontiguousarray(array.T) if self.transpose is not None else array

    def reduced(self, graph: Graph) -> int:
        """Length of the axis the blocks run along (K of a MatMul, hidden of an embedding)."""
        shape = graph.initializers[self.source].shape
        return shape[0] if self.role != "embedding" and self.transpose is None else shape[1]

    def matches(self, pattern: str) -> bool:
        return fnmatch.fnmatch(self.name, pattern) or (
            self.role != "matmul" and fnmatch.fnmatch(self.role, pattern)
        )


@register_pass("quantize-weights")
class QuantizeWeights(Pass):
    """Rewrites MatMul(x, W) (and optionally embedding tables) into int4/int8 blocks under DequantizeLinear."""

    class Options(PassOptions):
        bits: int = Field(default=4, description="4 or 8")
        block_size: int = Field(
            default=32, ge=16, le=256, description="rows of K per scale (16..256, power of 2)"
        )
        symmetric: bool = Field(
            default=True, description="signed values without zero point, else unsigned + zero point"
        )
        offset: bool = Field(
            default=False,
            description="min/max grid with a float offset per block (Q4_1 style, rtn; symmetric unused)",
        )
        algorithm: Algorithm = Field(
            default="rtn", description="rtn (round to nearest) or gptq (needs a calibration: section)"
        )
        damp: float = Field(default=0.01, gt=0, le=1, description="gptq: added to diag H, times its mean")
        act_order: bool = Field(
            default=False, description="gptq: rows by decreasing H diagonal (static groups)"
        )
        lm_head: bool = Field(default=False, description="also quantize the output projection (logits)")
        embedding: bool = Field(default=False, description="also quantize embedding tables (Gather)")
        include: list[str] = Field(default_factory=lambda: ["*"], description="weight-name globs to quantize")
        exclude: list[str] = Field(default_factory=list, description="weight-name globs to keep in float")
        overrides: list[Override] = Field(
            default_factory=list, description="[{pattern, bits, block_size, symmetric, algorithm}], last wins"
        )
        min_size: int = Field(default=4096, ge=0, description="smaller weights stay in float")

        _bits = field_validator("bits")(_check_bits)
        _block = field_validator("block_size")(_check_block)

        @model_validator(mode="after")
        def _offset_is_rtn(self) -> QuantizeWeights.Options:
            if self.offset and self.algorithm == "gptq":
                raise ValueError("offset: true is round-to-nearest only: use algorithm: rtn")
            return self

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if graph.root().opset_imports.get("", 0) < 21:
            raise PassError(
                self.name, "blocked DequantizeLinear needs opset 21: put upgrade-opset before this pass"
            )
        sites = find_sites(graph)
        if not sites:
            raise PassError(
                self.name,
                "the model has no MatMul with a constant float weight to quantize (nor an embedding)",
            )
        skipped: list[dict[str, str]] = []
        chosen = [s for s in sites if self._choose(graph, s, skipped, ctx)]
        unused = self._unused_patterns(sites, chosen, ctx)
        shared = tied_pairs(graph, chosen)
        hessians, source = self._hessians(graph, chosen, shared, ctx)
        saved = 0
        block_sums: dict[tuple[str, int], str] = {}
        shapes = InputShapes(graph)
        for site in chosen:
            if site.role == "lm_head" and site in shared:
                continue  # rewritten with its embedding
            if site.scheme.offset and not self._offset_fits(site, shapes, skipped, ctx):
                continue
            saved += self._rewrite(graph, site, hessians, block_sums, shapes)
            head = next((h for h, e in shared.items() if e is site), None)
            if head is not None:
                saved += share_table(graph, head, site)
        details: dict[str, object] = {"skipped": skipped, **unused}
        done = [s for s in chosen if "algorithm" in s.stats]
        details["weights"] = [{"weight": s.name, "role": s.role, **s.stats} for s in done]
        twice = [s.name for s in chosen if s.role == "embedding" and graph.is_initializer(s.source)]
        for name in twice:
            ctx.log.warning(
                "quantize-weights: embedding '%s' is quantized but the float table stays for the lm_head "
                "that reads it (stored twice: quantize the lm_head with the same grid to share it)",
                name,
            )
        if twice:
            details["stored_twice"] = twice
        if source:
            details["calibration"] = source
        stats: dict[str, int | float] = {"quantized": len(done), "bytes_saved": saved}
        stats.update({k: 1 for k in ("lm_head", "embedding") if any(s.role == k for s in done)})
        if block_sums:
            stats["offset"] = sum(1 for s in done if s.stats.get("offset"))
            stats["block_sums"] = len(block_sums)
        if shared:
            stats["tied_shared"] = len(shared)
        return PassResult(changed=bool(done), stats=stats, details=details)

    def _choose(self, graph: Graph, site: Site, skipped: list[dict[str, str]], ctx: PassContext) -> bool:
        """Whether ``site`` is quantized, with its scheme set (from the options and matching overrides)."""
        o = self.options
        if (site.role == "lm_head" and not o.lm_head) or (site.role == "embedding" and not o.embedding):
            return False
        if not any(site.matches(p) for p in o.include) or any(site.matches(p) for p in o.exclude):
            return False
        if graph.initializers[site.source].size < o.min_size:
            return False
        scheme = {
            "bits": o.bits,
            "block": o.block_size,
            "symmetric": o.symmetric,
            "algorithm": o.algorithm,
            "offset": o.offset,
        }
        for override in o.overrides:
            if site.matches(override.pattern):
                given = {
                    "bits": override.bits,
                    "block": override.block_size,
                    "symmetric": override.symmetric,
                    "algorithm": override.algorithm,
                    "offset": override.offset,
                }
                scheme.update({k: v for k, v in given.items() if v is not None})
        if scheme["offset"] and scheme["algorithm"] == "gptq":
            raise PassError(
                self.name,
                f"'{site.name}': offset: true is round-to-nearest only, but its algorithm is gptq",
                hint="set algorithm: rtn (or offset: false) for it, e.g. in an override",
            )
        if site.role == "embedding":
            scheme["offset"] = False  # a Gather has no second MatMul to add the offset: integer zero points
        site.scheme = Scheme(**scheme)
        site.stats = {
            "bits": site.scheme.bits,
            "block_size": site.scheme.block,
            "symmetric": site.scheme.symmetric,
        }
        if site.scheme.offset:
            site.stats = {"bits": site.scheme.bits, "block_size": site.scheme.block, "offset": True}
        k = site.reduced(graph)
        if k % site.scheme.block:
            reason = f"K={k} is not a multiple of block {site.scheme.block}"
            skipped.append({"weight": site.name, "reason": reason})
            ctx.log.warning("quantize-weights: '%s' stays float: %s", site.name, reason)
            return False
        return True

    def _unused_patterns(
        self, sites: list[Site], chosen: list[Site], ctx: PassContext
    ) -> dict[str, list[str]]:
        """Exclude patterns that match no weight and overrides that match no quantized weight, with warnings."""
        o = self.options
        considered = [s for s in sites if s.role == "matmul" or getattr(o, s.role)]
        unused = {
            "unused_exclude": [p for p in o.exclude if not any(s.matches(p) for s in considered)],
            "unused_overrides": [
                v.pattern for v in o.overrides if not any(s.matches(v.pattern) for s in chosen)
            ],
        }
        for pattern in unused["unused_exclude"]:
            ctx.log.warning("quantize-weights: exclude pattern %r matches no weight", pattern)
        for pattern in unused["unused_overrides"]:
            ctx.log.warning("quantize-weights: override pattern %r matches no quantized weight", pattern)
        return unused

    def _hessians(
        self, graph: Graph, chosen: list[Site], shared: dict[Site, Site], ctx: PassContext
    ) -> tuple[dict[str, np.ndarray], str]:
        """XᵀX (float64) per MatMul input that a GPTQ weight reads, over the calibration set."""
        from llmc.calibration import gram_matrices, require_calibration

        wanted = [
            s for s in chosen if s.scheme.algorithm == "gptq" and s.role != "embedding" and s not in shared
        ]
        if not any(s.scheme.algorithm == "gptq" for s in chosen):
            return {}, ""
        cal = require_calibration(ctx, self.name)
        if not wanted:
            return {}, cal.source
        names = [hessian_input(graph, s.node.inputs[0]) for s in wanted]
        return gram_matrices(graph, names, cal.feeds), cal.source

    def _offset_fits(
        self, site: Site, shapes: InputShapes, skipped: list[dict[str, str]], ctx: PassContext
    ) -> bool:
        """Whether the offset form can reshape this MatMul's input (its rank must be known, at least 2)."""
        shape = shapes.get(site.node.inputs[0])
        if shape is not None and len(shape) >= 2:
            return True
        reason = "offset: the rank of its input is unknown (or below 2), so its blocks cannot be summed"
        skipped.append({"weight": site.name, "reason": reason})
        ctx.log.warning("quantize-weights: '%s' stays float: %s", site.name, reason)
        return False

    def _rewrite(
        self,
        graph: Graph,
        site: Site,
        hessians: dict[str, np.ndarray],
        block_sums: dict[tuple[str, int], str],
        shapes: InputShapes,
    ) -> int:
        """Quantize one site in place; returns the bytes saved."""
        scheme = site.scheme
        w = site.weight(graph)
        if scheme.offset:
            return self._rewrite_offset(graph, site, w, block_sums, shapes)
        if site.role == "embedding":  # blocks along hidden: quantize the transpose along its K
            q, scale, zero = (
                None if a is None else np.ascontiguousarray(a.T) for a in quantize_blocks(w.T, *scheme.grid())
            )
            out, added = add_dequantize(
                graph, site.source, scheme, q, scale, zero, axis=1, like=w, order=site.node.order - 0.5
            )
            site.stats["algorithm"] = "rtn"
            graph.set_input(site.node, 0, out)
            return drop_if_unused(graph, site.source) - added
        hessian = hessians.get(hessian_input(graph, site.node.inputs[0]))
        if scheme.algorithm == "gptq" and hessian is not None:
            q, scale, zero = self._gptq(site, w, hessian)
        else:
            q, scale, zero = quantize_blocks(w, *scheme.grid())
            site.stats["algorithm"] = "rtn"
        out, added = add_dequantize(
            graph, site.name, scheme, q, scale, zero, axis=0, like=w, order=site.node.order - 0.5
        )
        graph.set_input(site.node, 1, out)
        return release(graph, site) - added

    def _rewrite_offset(
        self,
        graph: Graph,
        site: Site,
        w: np.ndarray,
        block_sums: dict[tuple[str, int], str],
        shapes: InputShapes,
    ) -> int:
        """MatMul(x, DQ(Q, d, 0)) + MatMul(block sums of x, m): the min/max grid with a float offset."""
        scheme = site.scheme
        q, d, m = offset_blocks(w, scheme.bits, scheme.block)
        zero = np.zeros(d.shape, grid_dtype(scheme.bits, False))
        order = site.node.order
        out, added = add_dequantize(graph, site.name, scheme, q, d, zero, axis=0, like=w, order=order - 0.5)
        graph.set_input(site.node, 1, out)
        x = site.node.inputs[0]
        sums = block_sums.get((x, scheme.block))
        if sums is None:
            sums = add_block_sums(graph, x, shapes.get(x), scheme.block, order - 0.4)
            block_sums[(x, scheme.block)] = sums
        offset = graph.add_initializer(f"{site.name}.offset", m.astype(w.dtype))
        added += int(m.size * w.dtype.itemsize)
        add_offset_term(graph, site.node, sums, offset, f"{site.name}/offset")
        error = np.abs(dequantize_blocks(q, d, None, scheme.block) + np.repeat(m, scheme.block, 0) - w)
        site.stats.update(algorithm="rtn", max_abs_error=float(error.max()))
        return release(graph, site) - added

    def _gptq(self, site: Site, w: np.ndarray, hessian: np.ndarray):
        from .gptq import gptq_quantize

        s, o = site.scheme, self.options
        try:
            q, scale, zero = gptq_quantize(
                w, hessian, s.bits, s.block, s.symmetric, o.damp, act_order=o.act_order
            )
        except np.linalg.LinAlgError:
            raise PassError(
                self.name,
                f"GPTQ of '{site.name}': its Hessian is not positive definite after dampening {o.damp}",
                hint="raise damp (e.g. 0.1) or give more calibration tokens",
            ) from None
        rtn = dequantize_blocks(*quantize_blocks(w, *s.grid()), s.block)
        site.stats.update(
            algorithm="gptq",
            rtn_error=round(output_error(w, rtn, hessian), 6),
            gptq_error=round(output_error(w, dequantize_blocks(q, scale, zero, s.block), hessian), 6),
        )
        return q, scale, zero


def find_sites(graph: Graph) -> list[Site]:
    """MatMuls with a constant 2-D float weight, embedding Gathers, and the lm_head (in either tied form)."""
    tables = {n.inputs[0]: n for n in graph.nodes() if _is_embedding(graph, n)}
    sites: list[Site] = []
    for node in graph.nodes():
        if node.op_type != "MatMul" or node.domain:
            continue
        weight = node.input(1)
        logits = node.outputs[0] == "logits" and "logits" in graph.outputs
        if _float_matrix(graph, weight):
            head = logits or _equals_transposed_table(graph, weight, tables)
            sites.append(Site("lm_head" if head else "matmul", node, weight, weight))
            continue
        producer = graph.producer(weight)
        if producer is None or producer.op_type != "Transpose" or producer.domain:
            continue
        source, perm = producer.inputs[0], producer.attr("perm")
        if (
            _float_matrix(graph, source)
            and (perm is None or list(perm) == [1, 0])
            and (logits or source in tables)
        ):
            sites.append(Site("lm_head", node, f"{source}.T", source, transpose=producer))
    sites += [Site("embedding", gather, table, table) for table, gather in tables.items()]
    return sites


def tied_pairs(graph: Graph, chosen: list[Site]) -> dict[Site, Site]:
    """lm_head site -> embedding site, for tied pairs quantized on one grid (stored once, shared)."""
    tables = {s.source: s for s in chosen if s.role == "embedding"}
    pairs: dict[Site, Site] = {}
    for head in (s for s in chosen if s.role == "lm_head"):
        if head.transpose is not None:
            embedding = tables.get(head.source)
        else:
            embedding = next(
                (e for t, e in tables.items() if _equals_transposed_table(graph, head.source, [t])), None
            )
        if embedding is not None and embedding.scheme.grid() == head.scheme.grid():
            pairs[head] = embedding
    return pairs


def share_table(graph: Graph, head: Site, embedding: Site) -> int:
    """Point the lm_head at Transpose(the embedding's DequantizeLinear); returns the bytes freed."""
    dequantized = embedding.node.inputs[0]
    out = graph.unique_name(f"{embedding.source}.dequantized.T")
    graph.add_node(
        "Transpose",
        [dequantized],
        [out],
        name=graph.unique_node_name(f"{head.node.name or head.name}/tied_transpose"),
        attributes={"perm": [1, 0]},
        order=head.node.order - 0.5,
        metadata={RULE_KEY: "quantize-weights"},
    )
    info = graph.value_info(dequantized)
    graph.set_value_info(out, info.dtype, tuple(reversed(info.shape)))
    graph.set_input(head.node, 1, out)
    head.stats.pop("offset", None)  # the shared table keeps the embedding's integer zero point grid
    head.stats.update(symmetric=head.scheme.symmetric, algorithm="rtn", tied_to=embedding.name)
    return release(graph, head)


def add_dequantize(
    graph: Graph,
    name: str,
    scheme: Scheme,
    q: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray | None,
    *,
    axis: int,
    like: np.ndarray,
    order: float,
) -> tuple[str, int]:
    """Initializers Q / scale [/ zero point] and their blocked DequantizeLinear: (its output, bytes stored)."""
    bits = scheme.bits
    inputs = [
        graph.add_initializer(f"{name}.q{bits}", q),
        graph.add_initializer(f"{name}.scale", scale.astype(like.dtype)),
    ]
    if zero is not None:
        inputs.append(graph.add_initializer(f"{name}.zero_point", zero))
    deq = graph.add_node(
        "DequantizeLinear",
        inputs,
        [graph.unique_name(f"{name}.dequantized")],
        name=graph.unique_node_name(f"{name}/dequantize"),
        attributes={"axis": axis, "block_size": scheme.block},
        order=order,
        metadata={RULE_KEY: "quantize-weights"},
    )
    graph.set_value_info(deq.outputs[0], np_dtype_to_onnx(like.dtype), like.shape)
    stored = (q.size + (0 if zero is None else zero.size)) * bits // 8 + scale.size * like.dtype.itemsize
    return deq.outputs[0], stored


class InputShapes:
    """Shapes of MatMul inputs: the IR's, else ONNX shape inference's (run once, only when needed)."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._inferred: dict[str, tuple] | None = None

    def get(self, value: str) -> tuple | None:
        shape = self.graph.shape(value)
        if shape is not None:
            return shape
        if self._inferred is None:
            self._inferred = _inferred_shapes(self.graph)
        return self._inferred.get(value)


def _inferred_shapes(graph: Graph) -> dict[str, tuple]:
    """ONNX shape inference on a copy whose large weights are references (small shape constants stay)."""
    import onnx

    from llmc.ir import to_onnx

    skeleton = to_onnx(graph, weights="external", elide_above=4096)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception:  # inference only helps: a site with an unknown rank is skipped with its reason
        return {}
    shapes = {}
    for vi in inferred.graph.value_info:
        tensor = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tensor.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value or d.dim_param or None for d in tensor.shape.dim)
    return shapes


def add_block_sums(graph: Graph, x: str, shape: tuple, block: int, order: float) -> str:
    """ReduceSum(Reshape(x [..., K], [..., K/B, B]), axes=[-1]): the sum of x over each block of K."""
    k = shape[-1]
    meta = {RULE_KEY: "quantize-weights"}
    target = np.array([0] * (len(shape) - 1) + [k // block, block], np.int64)
    grouped = graph.add_node(
        "Reshape",
        [x, graph.add_initializer(f"{x}.block_shape", target)],
        [graph.unique_name(f"{x}.blocks")],
        name=graph.unique_node_name(f"{x}/blocks"),
        order=order,
        metadata=meta,
    )
    axes = graph.add_initializer(f"{x}.block_axis", np.array([-1], np.int64))
    sums = graph.add_node(
        "ReduceSum",
        [grouped.outputs[0], axes],
        [graph.unique_name(f"{x}.block_sums")],
        name=graph.unique_node_name(f"{x}/block_sums"),
        attributes={"keepdims": 0},
        order=order,
        metadata=meta,
    )
    dtype = graph.dtype(x)
    graph.set_value_info(grouped.outputs[0], dtype, (*shape[:-1], k // block, block))
    graph.set_value_info(sums.outputs[0], dtype, (*shape[:-1], k // block))
    return sums.outputs[0]


def add_offset_term(graph: Graph, node: Node, sums: str, offset: str, name: str) -> None:
    """Every reader of ``node``'s output y reads y + MatMul(sums, offset) (a graph output keeps its name)."""
    y = node.outputs[0]
    meta = {RULE_KEY: "quantize-weights"}
    total = graph.unique_name(f"{y}.with_offset")
    graph.replace_all_uses(y, total)  # readers (and a graph output) move to the sum, defined below
    y = node.outputs[0]  # renamed when it was a graph output
    term = graph.add_node(
        "MatMul",
        [sums, offset],
        [graph.unique_name(f"{y}.offset")],
        name=graph.unique_node_name(f"{name}_matmul"),
        order=node.order + 0.25,
        metadata=meta,
    )
    graph.add_node(
        "Add",
        [y, term.outputs[0]],
        [total],
        name=graph.unique_node_name(name),
        order=node.order + 0.5,
        metadata=meta,
    )
    info = graph.value_info(y)
    if info is not None:
        graph.set_value_info(term.outputs[0], info.dtype, info.shape)
        graph.set_value_info(total, info.dtype, info.shape)


def release(graph: Graph, site: Site) -> int:
    """Drop what the rewritten MatMul no longer reads (its Transpose, the float weight); the bytes freed."""
    if site.transpose is not None:
        if site.transpose in graph and not graph.is_used(site.transpose.outputs[0]):
            graph.remove_node(site.transpose)
    return drop_if_unused(graph, site.source)


def drop_if_unused(graph: Graph, name: str) -> int:
    """Remove initializer ``name`` when nothing reads it any more; the bytes freed."""
    if not graph.is_initializer(name) or graph.is_used(name) or name in graph.inputs:
        return 0
    freed = int(graph.initializers[name].nbytes)
    graph.remove_initializer(name)
    return freed


def hessian_input(graph: Graph, value: str) -> str:
    """The value whose rows feed a MatMul input: through a Slice of rows (logits-last-token) to all rows."""
    node = graph.producer(value)
    if node is None or node.op_type != "Slice" or node.domain or len(node.inputs) < 4:
        return value
    shape, axes = graph.shape(node.inputs[0]) or graph.shape(value), graph.constant(node.input(3))
    if not shape or axes is None or any(int(a) % len(shape) == len(shape) - 1 for a in np.ravel(axes)):
        return value  # unknown rank, or the Slice cuts features rather than rows
    return hessian_input(graph, node.inputs[0])


def _is_embedding(graph: Graph, node: Node) -> bool:
    return (
        node.op_type == "Gather"
        and not node.domain
        and node.attr("axis", 0) == 0
        and _float_matrix(graph, node.inputs[0])
    )


def _float_matrix(graph: Graph, name: str) -> bool:
    if not name or not graph.is_initializer(name):
        return False
    array = graph.initializers[name]
    return array.ndim == 2 and array.dtype.kind == "f"


def _equals_transposed_table(graph: Graph, weight: str, tables: Iterable[str]) -> bool:
    """Whether constant ``weight`` [K, N] holds exactly one of the tables [N, K] transposed."""
    w = graph.initializers[weight]
    for table in tables:
        e = graph.initializers[table]
        if e.shape == w.shape[::-1] and e.dtype == w.dtype and np.array_equal(w, e.T):
            return True
    return False
