"""``fuse-matmul-bias``: a 2-D MatMul by a constant weight plus a constant bias into ``Gemm``.

``Add(MatMul(x, W), b)`` with ``W`` a constant 2-D matrix, ``b`` a constant that broadcasts to ``[M, N]`` and ``x``
of rank 2 -> ``Gemm(x, W, b)``; ``Add(Gemm(A, B), b)`` without ``C`` -> ``Gemm(A, B, b)`` (alpha and the transposes
kept). The bias must be a constant (a residual Add is no candidate and is not reported). Gemm is 2-D only: transformers' ``[batch, seq, hidden]`` activations are rejected with the reason
(targets legalize those MatMul + Add pairs their own way, e.g. onnxruntime's MatMul+Add fusion).
"""

from __future__ import annotations

from llmc.ir import Graph
from llmc.pass_manager import register_pass
from llmc.rewrite import Builder, Match, Op, RuleSet, Var

from ._patterns import FusionPass, any_of, rank, require_float

_GEMM_TYPES = "fd"  # float16/bfloat16/float/double: the float types Gemm and MatMul share


def _bias_reason(graph: Graph, b: str, rows: object, cols: int | None) -> str | None:
    """None when constant ``b`` broadcasts to ``[rows, cols]`` without widening it (Gemm's C contract)."""
    bias = graph.constant(b)
    if bias is None:
        return f"bias '{b}' is not a constant"
    if bias.ndim > 2:
        return f"bias '{b}' is {bias.ndim}-D: Gemm's C is at most 2-D"
    shape = (1,) * (2 - bias.ndim) + tuple(bias.shape)
    if shape[1] != 1 and cols is not None and shape[1] != cols:
        return f"bias '{b}' has {shape[1]} columns, the product {cols}"
    if shape[0] != 1 and shape[0] != rows:
        return f"bias '{b}' has {shape[0]} rows, the product {rows if isinstance(rows, int) else 'a dynamic number'}"
    return None


def _check_matmul(graph: Graph, m: Match) -> str | None:
    x = m["x"]
    r = rank(graph, x)
    if r is None:
        return f"rank of input '{x}' is unknown"
    if r != 2:
        return f"input is rank {r}: Gemm is 2-D only"
    w = graph.constant(m["w"])
    if w is None:
        producer = graph.producer(m["w"])
        hint = (
            ": put fold-weight-transposes before this pass"
            if producer is not None and producer.op_type == "Transpose"
            else ""
        )
        return f"weight '{m['w']}' is not a constant{hint}"
    if w.ndim != 2:
        return f"weight '{m['w']}' is {w.ndim}-D, Gemm takes a 2-D matrix"
    reason = require_float(graph, x)
    if reason:
        return reason
    return _bias_reason(graph, m["b"], graph.shape(x)[0], int(w.shape[1]))


def _rewrite_matmul(b: Builder, m: Match) -> str:
    return b.op1("Gemm", [m["x"], m["w"], m["b"]])


def _check_gemm(graph: Graph, m: Match) -> str | None:
    gemm = m.node("gemm")
    reason = require_float(graph, m["a"])
    if reason:
        return reason
    a_shape, b_shape = graph.shape(m["a"]), graph.shape(m["bmat"])
    rows = None if a_shape is None or len(a_shape) != 2 else a_shape[1 if gemm.attr("transA", 0) else 0]
    cols = None if b_shape is None or len(b_shape) != 2 else b_shape[0 if gemm.attr("transB", 0) else 1]
    return _bias_reason(graph, m["bias"], rows, cols if isinstance(cols, int) else None)


def _rewrite_gemm(b: Builder, m: Match) -> str:
    gemm = m.node("gemm")
    attrs = {k: gemm.attr(k) for k in ("alpha", "transA", "transB") if k in gemm.attributes}
    return b.op1("Gemm", [m["a"], m["bmat"], m["bias"]], beta=1.0, **attrs)


RULES = RuleSet(
    "matmul-bias",
    [
        any_of(
            "matmul-add",
            [Op("Add", Op("MatMul", Var("x"), Var("w")), Var("b", constant=True))],
            _rewrite_matmul,
            _check_matmul,
        ),
        any_of(
            "gemm-add",
            [Op("Add", Op("Gemm", Var("a"), Var("bmat"), name="gemm"), Var("bias", constant=True))],
            _rewrite_gemm,
            _check_gemm,
        ),
    ],
)


@register_pass("fuse-matmul-bias")
class FuseMatMulBias(FusionPass):
    """Rewrites Add(MatMul(x, W), b) on 2-D x, and Add(Gemm(A, B), b), into Gemm with the bias as C."""

    rules = RULES
