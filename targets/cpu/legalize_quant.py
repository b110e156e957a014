"""CPU legalization of weight-only quantization: the standard blocked ``DequantizeLinear`` forms that
``quantize-weights`` emits, rewritten into onnxruntime's ``com.microsoft`` kernels that read the packed
4/8-bit weight directly (decode is bandwidth-bound: 4-bit weights move a quarter of the fp32 bytes).

Three forms, one rule each:

* ``MatMul(x, DequantizeLinear(Q[K, N], axis=0))`` -> ``MatMulNBits`` (a projection);
* ``MatMul(x, Transpose(DequantizeLinear(Qe[V, H], axis=1)))`` -> ``MatMulNBits`` (a tied lm_head: Qe blocked
  along H is already MatMulNBits' row-major B layout, no transpose of the data);
* ``Gather(DequantizeLinear(Qe[V, H], axis=1), ids)`` -> ``GatherBlockQuantized`` (the embedding).

Both kernels read the same table: uint8 [rows, K/B, B·bits/8] (unsigned values, two 4-bit values per byte,
lower index in the low nibble), float scales, zero points packed along the blocks of a row, and the default
zero point 2^(bits-1) when none is given; signed values are shifted by 2^(bits-1), so symmetric weights need
no zero point. A tied embedding/lm_head therefore keeps ONE packed table and ONE set of scales: the table is
built once per DequantizeLinear (a cache per pass run) and both nodes read it. The shapes differ: MatMulNBits
checks that B is 3-D and scales 1-D/2-D, GatherBlockQuantized wants scales of the data's rank, so the gather
reads the 3-D table with scales reshaped to [rows, K/B, 1] (a Reshape node, nothing stored twice) and its
output [..., K/B, B] is reshaped to [..., K]. Only 4-bit asymmetric zero points differ in bytes (one block
per byte for the gather, two for MatMulNBits): that small table ([rows, K/B] bytes) is stored twice.

``accuracy_level`` 4 (int8 activations, the default) is the fast path: on onnxruntime 1.32 (AVX-512 VNNI,
one thread, SmolLM2 shapes) an int4 lm_head [576 -> 49152] takes 3.9 ms at level 4 against 6.4 ms at 0, and
8-bit weights at level 0 fall back to an unoptimized kernel (417 ms against 4.7 ms), hence the warning.

A DequantizeLinear is rewritten only when every reader of its output has a packed form, so a weight never
ends up stored both packed and as the standard form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from llmc.ir import Graph, Node
from llmc.pass_manager import PassContext, PassResult, register_pass
from llmc.rewrite import Builder, Match, Op, RewritePass, RewriteRule, RuleSet, Var

MS = "com.microsoft"
# element type of Q -> (bits, signed)
_QTYPES = {"int4": (4, True), "uint4": (4, False), "int8": (8, True), "uint8": (8, False)}


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values [..., L] -> bytes [..., ceil(L*bits/8)], lower index in the low nibble for 4 bits."""
    u = values.astype(np.uint8)
    if bits == 8:
        return u
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], 1), np.uint8)], axis=-1)
    return (u[..., 0::2] & 0x0F) | ((u[..., 1::2] & 0x0F) << 4)


@dataclass
class PackedTable:
    """One blocked weight as the kernels read it: rows of K values in blocks of ``block`` along K."""

    data: str  # uint8 [rows, K/B, B*bits/8]
    scales: str  # float [rows, K/B]
    zero_points: str | None  # uint8 [rows, ceil(K/B*bits/8)]; None: the kernels' default 2^(bits-1)
    zero_values: np.ndarray | None  # the unpacked unsigned zero points [rows, K/B]
    rows: int
    k: int
    bits: int
    block: int

    @property
    def blocks(self) -> int:
        return self.k // self.block


def _deq_axis(deq: Node) -> int:
    axis = deq.attr("axis", 1)
    return axis + 2 if axis < 0 else axis


def _check_deq(graph: Graph, deq: Node, axis: int) -> str | None:
    """Why this DequantizeLinear has no packed form blocked along ``axis`` (None when it has one)."""
    q, scale = graph.constant(deq.inputs[0]), graph.constant(deq.inputs[1])
    zero = graph.constant(deq.input(2)) if deq.input(2) else None
    if q is None or scale is None or (deq.input(2) and zero is None):
        return "the quantized weight, its scale or its zero point is not a constant"
    if q.dtype.name not in _QTYPES:
        return f"weight type {q.dtype} has no packed form (int4/uint4/int8/uint8)"
    block = deq.attr("block_size", 0)
    if q.ndim != 2 or _deq_axis(deq) != axis or not block:
        return f"not a 2-D weight quantized in blocks along axis {axis}"
    if scale.dtype != np.float32 or deq.attr("output_dtype", 0) not in (0, 1):
        return "scales are not float32"
    if q.shape[axis] % block:
        return f"the blocked dimension {q.shape[axis]} is not a multiple of the block size {block}"
    if block < 16 or block & (block - 1):
        return f"block size {block} is not a power of two >= 16 (the kernels' constraint)"
    return None


def _packed_reader(graph: Graph, node: Node, slot: int, axis: int, gather: bool) -> bool:
    """Whether ``node`` reading the dequantized weight at ``slot`` is one of the forms rewritten here."""
    if node.domain:
        return False
    if axis == 0:
        return node.op_type == "MatMul" and slot == 1
    if node.op_type == "Gather":
        return gather and slot == 0 and (node.attr("axis", 0) or 0) == 0
    if node.op_type == "Transpose" and _is_swap(node.attr("perm")):
        return all(u.op_type == "MatMul" and not u.domain and s == 1 for u, s in graph.uses(node.outputs[0]))
    return False


def _is_swap(perm: Any) -> bool:
    return perm is None or list(perm) == [1, 0]


def _check_readers(graph: Graph, deq: Node, axis: int, gather: bool) -> str | None:
    out = deq.outputs[0]
    if out in graph.outputs:
        return f"'{out}' is a graph output"
    for user, slot in graph.uses(out):
        if not _packed_reader(graph, user, slot, axis, gather):
            return (
                f"'{out}' is also read by {user.label}, which has no packed form (it would be stored twice)"
            )
    return None


class _Tables:
    """Packed tables of one pass run, by DequantizeLinear inputs: readers of one weight share its table."""

    def __init__(self) -> None:
        self._tables: dict[tuple[Any, ...], PackedTable] = {}

    def get(self, b: Builder, deq: Node) -> PackedTable:
        key = (id(b.graph), tuple(deq.inputs), _deq_axis(deq), deq.attr("block_size"))
        if key not in self._tables:
            self._tables[key] = _build_table(b, deq)
        return self._tables[key]


def _build_table(b: Builder, deq: Node) -> PackedTable:
    graph = b.graph
    q, scale = graph.constant(deq.inputs[0]), graph.constant(deq.inputs[1])
    zero = graph.constant(deq.input(2)) if deq.input(2) else None
    bits, signed = _QTYPES[q.dtype.name]
    block = int(deq.attr("block_size"))
    if _deq_axis(deq) == 0:  # W [K, N] blocked along K: rows are its columns
        q, scale = q.T, scale.T
        zero = None if zero is None else zero.T
    rows, k = q.shape
    offset = 1 << (bits - 1) if signed else 0  # signed -> unsigned, the kernels' default zero point
    values = (q.astype(np.int16) + offset).reshape(rows, k // block, block)
    stem = deq.inputs[0]
    zero_values = None
    if zero is not None or not signed:  # unsigned without zero point means 0, not the kernels' default
        base = np.zeros(scale.shape, np.int16) if zero is None else zero.astype(np.int16)
        zero_values = (base + offset).astype(np.uint8)
    return PackedTable(
        data=b.constant(f"{stem}.packed", _pack(values, bits)),
        scales=b.constant(f"{stem}.packed_scales", np.ascontiguousarray(scale)),
        zero_points=None
        if zero_values is None
        else b.constant(f"{stem}.packed_zp", _pack(zero_values, bits)),
        zero_values=zero_values,
        rows=rows,
        k=k,
        bits=bits,
        block=block,
    )


def _matmul_nbits(b: Builder, x: str, table: PackedTable, accuracy_level: int) -> str:
    inputs = [x, table.data, table.scales] + ([table.zero_points] if table.zero_points else [])
    return b.op1(
        "MatMulNBits",
        inputs,
        domain=MS,
        K=table.k,
        N=table.rows,
        bits=table.bits,
        block_size=table.block,
        accuracy_level=accuracy_level,
    )


def _gather_inputs(b: Builder, table: PackedTable) -> list[str]:
    """GatherBlockQuantized's data, scales[, zero points] over the shared table."""
    shape = b.constant(f"{table.scales}.shape3", np.array([table.rows, table.blocks, 1], np.int64))
    inputs = [table.data, b.op1("Reshape", [table.scales, shape], name=f"{table.scales}/as_blocks")]
    if table.zero_values is not None and table.bits == 8:  # one zero point per byte: the same bytes
        inputs.append(b.op1("Reshape", [table.zero_points, shape], name=f"{table.zero_points}/as_blocks"))
    elif table.zero_values is not None:  # 4 bits: one block per row of the 3-D view, in the low nibble
        inputs.append(b.constant(f"{table.data}.gather_zp", _pack(table.zero_values[..., None], 4)))
    return inputs


def _make_rules(accuracy_level: int, embedding: bool) -> RuleSet:
    tables = _Tables()

    def check_for(axis: int):
        def check(graph: Graph, m: Match) -> str | None:
            deq = m.node("deq")
            return _check_deq(graph, deq, axis) or _check_readers(graph, deq, axis, embedding)

        return check

    def matmul(b: Builder, m: Match) -> str:
        return _matmul_nbits(b, m["x"], tables.get(b, m.node("deq")), accuracy_level)

    def gather(b: Builder, m: Match) -> str:
        table = tables.get(b, m.node("deq"))
        ids = m["ids"]
        data, *params = _gather_inputs(b, table)
        out = b.op1(
            "GatherBlockQuantized",
            [data, ids, *params],
            domain=MS,
            gather_axis=0,
            quantize_axis=2,
            block_size=table.block,
            bits=table.bits,
        )
        rank = len(b.graph.shape(ids))
        shape = b.constant(f"{table.data}.gather_shape{rank}", np.array([0] * rank + [table.k], np.int64))
        return b.op1("Reshape", [out, shape])

    def gather_check(graph: Graph, m: Match) -> str | None:
        if graph.shape(m["ids"]) is None:
            return "the rank of the gather indices is unknown"
        return check_for(1)(graph, m)

    def deq() -> Op:
        return Op("DequantizeLinear", None, None, name="deq", allow_extra_inputs=True, shared=True)

    rules = [
        RewriteRule("matmul-nbits", Op("MatMul", Var("x"), deq()), matmul, check=check_for(0)),
        RewriteRule(
            "matmul-nbits-transposed",
            Op("MatMul", Var("x"), Op("Transpose", deq(), attrs={"perm": _is_swap})),
            matmul,
            check=check_for(1),
        ),
    ]
    if embedding:
        pattern = Op("Gather", deq(), Var("ids"), attrs={"axis": lambda a: (a or 0) == 0})
        rules.append(RewriteRule("gather-block-quantized", pattern, gather, check=gather_check))
    return RuleSet("cpu-matmul-nbits", rules)


@register_pass("cpu-matmul-nbits")
class CpuMatMulNBits(RewritePass):
    """Rewrites MatMul/Gather over blocked int4/int8 DequantizeLinear into MatMulNBits/GatherBlockQuantized."""

    class Options(RewritePass.Options):
        accuracy_level: int = Field(
            default=4,
            ge=0,
            le=4,
            description="MatMulNBits compute type: 0 default (fp32), 4 = int8 activations (fastest; below 4, "
            "8-bit weights take onnxruntime's unoptimized path, ~100x slower)",
        )
        embedding: bool = Field(
            default=True,
            description="also rewrite Gather(DequantizeLinear) (a quantized embedding) into GatherBlockQuantized",
        )

    def rule_set(self) -> RuleSet:
        return _make_rules(self.options.accuracy_level, self.options.embedding)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = super().run(graph, ctx)
        if self.options.accuracy_level < 4:
            slow = [n for _g, n in graph.walk() if n.op_type == "MatMulNBits" and n.attr("bits") == 8]
            if slow:
                ctx.log.warning(
                    "cpu-matmul-nbits: %d 8-bit MatMulNBits at accuracy_level %d run onnxruntime's unoptimized "
                    "path (about 100x slower than level 4)",
                    len(slow),
                    self.options.accuracy_level,
                )
        return result
