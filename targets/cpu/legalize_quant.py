"""CPU legalization of weight-only quantization: ``MatMul(x, DequantizeLinear(Q, scale[, zp], axis=0,
block_size=B))`` with constant Q -> ``com.microsoft.MatMulNBits``, onnxruntime's kernel that reads the packed
4/8-bit weight directly (decode is bandwidth-bound: 4-bit weights move a quarter of the fp32 bytes).

MatMulNBits wants the weight transposed ([N, K/B, B·bits/8] bytes, values unsigned, two 4-bit values per byte
with the lower index in the low nibble), scales [N·K/B], and zero points packed the same way; signed values
are shifted by 2^(bits-1), which is the kernel's default zero point, so symmetric weights need none.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from llmc.ir import Graph
from llmc.pass_manager import register_pass
from llmc.rewrite import Match, Op, RewritePass, RewriteRule, RuleSet, Var

MS = "com.microsoft"


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values [..., L] -> bytes [..., L*bits/8], lower index in the low nibble for 4 bits."""
    u = values.astype(np.uint8)
    if bits == 8:
        return u
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], 1), np.uint8)], axis=-1)
    return (u[..., 0::2] & 0x0F) | ((u[..., 1::2] & 0x0F) << 4)


def _check(graph: Graph, m: Match) -> str | None:
    deq = m.node("deq")
    q, scale = graph.constant(deq.inputs[0]), graph.constant(deq.inputs[1])
    if q is None or scale is None:
        return "the quantized weight or its scale is not a constant"
    if q.ndim != 2 or deq.attr("axis", 1) != 0 or not deq.attr("block_size", 0):
        return "not a 2-D weight quantized in blocks along K (axis 0)"
    bits = 4 if q.dtype.itemsize == 1 and q.dtype.name in ("int4", "uint4") else 8
    if q.dtype.name not in ("int4", "uint4", "int8", "uint8"):
        return f"weight type {q.dtype} has no MatMulNBits form"
    if scale.dtype != np.float32:
        return "scales are not float32"
    if q.shape[0] % deq.attr("block_size"):
        return "K is not a multiple of the block size"
    m.values["bits"] = str(bits)
    return None


def _rewrite(b, m: Match) -> str:
    graph = b.graph
    deq = m.node("deq")
    q = graph.constant(deq.inputs[0])
    scale = graph.constant(deq.inputs[1])
    zero = graph.constant(deq.input(2)) if deq.input(2) else None
    bits, block = int(m["bits"]), int(deq.attr("block_size"))
    k, n = q.shape
    signed = q.dtype.name in ("int4", "int8")
    offset = 1 << (bits - 1) if signed else 0
    unsigned = (q.astype(np.int16) + offset).T.reshape(n, k // block, block)
    packed = _pack(unsigned, bits)
    inputs = [
        m["x"],
        b.constant(f"{deq.inputs[0]}.nbits", packed),
        b.constant(f"{deq.inputs[1]}.nbits", scale.T.reshape(-1)),
    ]
    if zero is not None:
        zp = (zero.astype(np.int16) + offset).T  # [N, K/B]
        inputs.append(b.constant(f"{deq.input(2)}.nbits", _pack(zp, bits).reshape(-1)))
    elif not signed:
        raise ValueError("unsigned weights without zero point")
    out = b.op1(
        "MatMulNBits",
        inputs,
        domain=MS,
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=int(m["accuracy_level"]),
    )
    return out


def _make_rules(accuracy_level: int) -> RuleSet:
    def check(graph: Graph, m: Match) -> str | None:
        m.values["accuracy_level"] = str(accuracy_level)
        return _check(graph, m)

    pattern = Op("MatMul", Var("x"), Op("DequantizeLinear", None, None, name="deq", allow_extra_inputs=True))
    return RuleSet("cpu-matmul-nbits", [RewriteRule("matmul-nbits", pattern, _rewrite, check=check)])


@register_pass("cpu-matmul-nbits")
class CpuMatMulNBits(RewritePass):
    """Rewrites MatMul(x, DequantizeLinear(blocked int4/int8 weight)) into com.microsoft MatMulNBits."""

    class Options(RewritePass.Options):
        accuracy_level: int = Field(
            default=4,
            ge=0,
            le=4,
            description="MatMulNBits compute type: 0 default (fp32), 4 = int8 (fastest)",
        )

    def rule_set(self) -> RuleSet:
        return _make_rules(self.options.accuracy_level)
