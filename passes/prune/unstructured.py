"""``prune-unstructured``: zero the least important weights of linear layers and store what is left compactly.

Scores: ``magnitude`` (|W|) or ``wanda`` (|W[k, n]|·‖x_k‖, the weight times the norm of the input feature it
multiplies over the calibration tokens; Wanda, Sun et al. 2023). Selection: a ``sparsity`` per layer
(``scope: layer``; Wanda compares the weights of one output column, as in the paper, magnitude the whole
matrix) or one threshold over all selected layers (``scope: global``), or an ``N:M`` pattern (``pattern:
"2:4"``: in every group of M consecutive weights along K, the N with the highest scores stay).

What it saves, honestly: onnxruntime's CPU provider (and every llmc target) has no sparse MatMul kernel,
so zeros in a dense matrix make nothing faster. The saving is size: with ``storage: compact`` (default) a
pruned weight W [K, N] is stored as a bitmask of the kept positions (1 bit per weight, uint8) and the kept
values (in order), and standard ONNX ops rebuild the dense matrix::

    flat  = Cast(Cast(BitwiseAnd(Unsqueeze(bits, 1), [1, 2, ..., 128]), bool), int32)   # 0/1 per weight
    dense = Reshape(Gather(values ‖ 0, CumSum(flat)·flat − 1), [K, N])             # −1 reads the 0

onnxruntime constant-folds that subgraph once when the session is created (measured on a 1536×1536 2:4
weight: the same MatMul latency as the dense matrix; 5.0 MB instead of 9.4 MB; session creation 85 ms
instead of 17 ms; on MiniLM's 24 linear layers at 2:4, benchmarks/lowrank_tradeoff.py: 70.5 MB instead of
90.3 MB, the same latency, session creation 1.6 s instead of 0.3 s). Bytes per weight: 1/8 + itemsize·(1 −
sparsity), so 2.1 instead of 4 at 50 % (fp32).
An ONNX ``sparse_initializer`` (COO, which onnxruntime densifies at load too) costs 8 bytes per kept weight
even with int32 linear indices: no saving until 50 %, and it is worse than the bitmask below 97 %.
``storage: dense`` keeps the zeros in the dense matrix (for passes that follow, such as quantize-weights,
or a target with a sparse kernel); the details always say "no sparse kernel on this target: size only".

Put the pass after the fusions: the rebuilt weight is no longer an initializer, so rules that need a
constant weight do not see it (and ``fold-constants`` would fold small ones back into dense matrices).
Hand-written: no library prunes ONNX initializers or stores them in a form onnxruntime rebuilds.
"""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
from onnx import TensorProto
from pydantic import Field, field_validator, model_validator

from llmc.calibration import require_calibration
from llmc.ir import Graph, Node, np_dtype_to_onnx
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.passes._select import WeightSelection, choose_sites, input_statistics, other_readers
from llmc.rewrite import RULE_KEY

NO_SPARSE_KERNEL = "no sparse kernel on this target: size only"
_PATTERN = re.compile(r"^(\d+):(\d+)$")


class UnstructuredOptions(PassOptions):
    sparsity: float = Field(default=0.5, ge=0, lt=1, description="share of weights set to zero, in [0, 1)")
    pattern: str | None = Field(default=None, description='"N:M": keep N of every M weights along K ("2:4")')
    method: Literal["magnitude", "wanda"] = Field(
        default="magnitude", description="scores: |W|, or |W|·‖x_k‖ on calibration data (wanda)"
    )
    scope: Literal["layer", "global"] = Field(
        default="layer", description="one sparsity per layer, or one threshold over all selected layers"
    )
    storage: Literal["compact", "dense"] = Field(
        default="compact", description="bitmask + kept values rebuilt at load, or zeros in the dense matrix"
    )
    include: list[str] = Field(default_factory=lambda: ["*"], description="weight-name globs to prune")
    exclude: list[str] = Field(default_factory=list, description="weight-name globs to keep dense")
    min_size: int = Field(default=4096, ge=0, description="smaller weights are not pruned")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is None:
            return value
        m = _PATTERN.match(value.strip())
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ValueError(f"pattern must be 'N:M' with 0 < N < M (like '2:4'), got {value!r}")
        return f"{int(m.group(1))}:{int(m.group(2))}"

    @model_validator(mode="after")
    def _consistent(self) -> UnstructuredOptions:
        if self.pattern is not None:
            if "sparsity" in self.model_fields_set and abs(self.sparsity - self.target_sparsity) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern} prunes {self.target_sparsity:g} of the weights; "
                    f"sparsity {self.sparsity:g} contradicts it (give one of them)"
                )
            if self.scope == "global":
                raise ValueError("an N:M pattern is chosen group by group: it has no global scope")
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def target_sparsity(self) -> float:
        n, m = self.n_m or (0, 1)
        return 1 - n / m if self.pattern else self.sparsity


def keep_mask(
    scores: np.ndarray, *, sparsity: float, n_m: tuple[int, int] | None, per_column: bool
) -> np.ndarray:
    """Which weights of one layer stay (True): the highest scores, by pattern, per column or per matrix."""
    k, n = scores.shape
    if n_m is not None:
        keep, group = n_m
        grouped = scores.reshape(k // group, group, n)
        order = np.argsort(grouped, axis=1, kind="stable")  # the lowest group - keep are pruned
        mask = np.ones_like(grouped, dtype=bool)
        np.put_along_axis(mask, order[:, : group - keep], False, axis=1)
        return mask.reshape(k, n)
    if per_column:
        pruned = int(round(sparsity * k))
        mask = np.ones((k, n), dtype=bool)
        if pruned:
            lowest = np.argpartition(scores, pruned - 1, axis=0)[:pruned]
            np.put_along_axis(mask, lowest, False, axis=0)
        return mask
    pruned = int(round(sparsity * scores.size))
    mask = np.ones(scores.size, dtype=bool)
    if pruned:
        mask[np.argpartition(scores.ravel(), pruned - 1)[:pruned]] = False
    return mask.reshape(k, n)


def pack(w: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The compact form of ``where(mask, w, 0)``: bits uint8 [⌈K·N/8⌉] (little bit order), kept values ‖ 0."""
    bits = np.packbits(mask.ravel(), bitorder="little")
    values = np.concatenate([w[mask], np.zeros(1, w.dtype)])
    return bits, values


def unpack(bits: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """numpy's reading of the compact form (what the ONNX subgraph computes)."""
    count = shape[0] * shape[1]
    flat = np.unpackbits(bits, bitorder="little")[:count].astype(np.int64)
    return values[np.cumsum(flat) * flat - 1].reshape(shape)


@register_pass("prune-unstructured")
class PruneUnstructured(Pass):
    """Rewrites MatMul weights into sparse ones (magnitude/Wanda, N:M), stored as bitmask + values."""

    Options = UnstructuredOptions
    options: UnstructuredOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        select = WeightSelection(o.include, o.exclude)
        chosen, skipped = choose_sites(graph, select, self._reason, self.name, "prune")
        masks = self._masks(graph, chosen, ctx)
        layers: list[dict[str, object]] = []
        zeros = total = saved = 0
        helpers = _Constants(graph)
        for weight, mask in masks.items():
            w = graph.initializers[weight]
            zeros += int(mask.size - mask.sum())
            total += int(mask.size)
            row: dict[str, object] = {
                "weight": weight,
                "shape": list(w.shape),
                "sparsity": round(1 - float(mask.mean()), 6),
            }
            if o.storage == "compact":
                stored = self._compact(graph, weight, chosen[weight], mask, helpers)
                row["bytes"], row["bytes_saved"] = stored, int(w.nbytes) - stored
                saved += int(w.nbytes) - stored
            else:
                graph.set_initializer(weight, np.where(mask, w, np.zeros((), w.dtype)))
            layers.append(row)
        details: dict[str, object] = {
            "speed": NO_SPARSE_KERNEL,
            "storage": o.storage,
            "pruned": layers,
            "skipped": skipped,
        }
        unmatched = select.warn_unmatched(ctx.log, self.name)
        if unmatched:
            details["unmatched_patterns"] = unmatched
        stats: dict[str, int | float] = {
            "pruned": len(layers),
            "skipped": len(skipped),
            "sparsity": round(zeros / total, 6) if total else 0.0,
            "bytes_saved": saved,
        }
        return PassResult(changed=bool(layers), stats=stats, details=details)

    def _reason(self, graph: Graph, weight: str, nodes: list[Node]) -> str | None:
        w = graph.initializers[weight]
        if w.size < self.options.min_size:
            return f"{w.size} weights < min_size {self.options.min_size}"
        n_m = self.options.n_m
        if n_m is not None and w.shape[0] % n_m[1]:
            return f"K={w.shape[0]} is not a multiple of M={n_m[1]} (pattern {self.options.pattern})"
        return other_readers(graph, weight, nodes)

    def _masks(self, graph: Graph, chosen: dict[str, list[Node]], ctx: PassContext) -> dict[str, np.ndarray]:
        o = self.options
        norms: dict[str, np.ndarray] = {}
        if o.method == "wanda" and chosen:
            feeds = require_calibration(ctx, self.name).feeds
            norms = {w: np.sqrt(s) for w, s in input_statistics(graph, chosen, feeds, diagonal=True).items()}
        scores = {}
        for weight in chosen:
            w = np.abs(np.asarray(graph.initializers[weight], np.float32))
            scores[weight] = w * norms[weight][:, None].astype(np.float32) if weight in norms else w
        if o.scope == "global" and scores:
            flat = np.concatenate([s.ravel() for s in scores.values()])
            pruned = int(round(o.sparsity * flat.size))
            if not pruned:
                return {w: np.ones(s.shape, bool) for w, s in scores.items()}
            threshold = np.partition(flat, pruned - 1)[pruned - 1]
            del flat
            return {w: s > threshold for w, s in scores.items()}
        per_column = o.method == "wanda"
        return {
            w: keep_mask(s, sparsity=o.sparsity, n_m=o.n_m, per_column=per_column) for w, s in scores.items()
        }

    @staticmethod
    def _compact(graph: Graph, weight: str, nodes: list[Node], mask: np.ndarray, c: _Constants) -> int:
        w = graph.initializers[weight]
        bits, values = pack(w, mask)
        bits_name = graph.add_initializer(f"{weight}.sparse_bits", bits)
        values_name = graph.add_initializer(f"{weight}.sparse_values", values)
        order = min(n.order for n in nodes) - 0.5
        stem = f"{weight}/densify"

        def op(op_type: str, inputs: list[str], **attrs: object) -> str:
            node = graph.add_node(
                op_type,
                inputs,
                [graph.unique_name(f"{weight}.{op_type.lower()}")],
                name=graph.unique_node_name(f"{stem}/{op_type}"),
                attributes=attrs,
                order=order,
                metadata={RULE_KEY: "prune-unstructured"},
            )
            return node.outputs[0]

        anded = op("BitwiseAnd", [op("Unsqueeze", [bits_name, c.axis1]), c.powers])
        as_int = op("Cast", [op("Cast", [anded], to=TensorProto.BOOL)], to=TensorProto.INT32)
        flat = op("Reshape", [as_int, c.minus_one])
        if bits.size * 8 != mask.size:  # the last byte's unused bits
            flat = op("Slice", [flat, c.zero_1d, c.array(f"{weight}.sparse_count", [mask.size])])
        index = op("Sub", [op("Mul", [op("CumSum", [flat, c.zero]), flat]), c.one])
        dense = op("Reshape", [op("Gather", [values_name, index]), c.array(f"{weight}.shape", list(w.shape))])
        graph.set_value_info(dense, np_dtype_to_onnx(w.dtype), tuple(w.shape))
        for node in nodes:
            graph.set_input(node, 1, dense)
        graph.remove_initializer(weight)
        return int(bits.nbytes + values.nbytes)


class _Constants:
    """The small constants every rebuilt weight uses, created once per run."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._made: dict[str, str] = {}

    def _get(self, name: str, array: np.ndarray) -> str:
        if name not in self._made:
            self._made[name] = self.graph.add_initializer(name, array)
        return self._made[name]

    def array(self, name: str, values: list[int]) -> str:
        return self.graph.add_initializer(name, np.asarray(values, np.int64))

    @property
    def axis1(self) -> str:
        return self._get("sparse.axis1", np.array([1], np.int64))

    @property
    def powers(self) -> str:
        return self._get("sparse.bit_values", (1 << np.arange(8)).astype(np.uint8))

    @property
    def minus_one(self) -> str:
        return self._get("sparse.flat_shape", np.array([-1], np.int64))

    @property
    def zero_1d(self) -> str:
        return self._get("sparse.start", np.array([0], np.int64))

    @property
    def zero(self) -> str:
        return self._get("sparse.axis0", np.array(0, np.int32))

    @property
    def one(self) -> str:
        return self._get("sparse.one", np.array(1, np.int32))
