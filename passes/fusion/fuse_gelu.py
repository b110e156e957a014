"""``fuse-gelu``: the erf and tanh formulas of GELU into ``Gelu`` (opset 20).

``0.5 * x * (1 + Erf(x / sqrt(2)))`` -> ``Gelu(x)`` and ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))``
(GPT-2's ``gelu_new``, ``gelu_pytorch_tanh``) -> ``Gelu(x, approximate="tanh")``. Exporters associate the
products differently, so the half is found in three places (``Mul(Mul(x, 0.5), A)``, ``Mul(x, Mul(0.5, A))``,
``Mul(Mul(x, A), 0.5)``, each with ``Div(., 2)`` for ``Mul(., 0.5)``); ``x / sqrt(2)`` may be ``x * 0.7071``
and ``x^3`` may be ``Pow(x, 3)`` or ``x * x * x``. Constants are compared with a relative tolerance
(option ``tolerance``), so ``1.4142`` passes for ``sqrt(2)``.
"""

from __future__ import annotations

from functools import partial

from pydantic import ConfigDict, Field

from llmc.ir import Graph
from llmc.pass_manager import PassOptions, register_pass
from llmc.rewrite import Builder, Match, Op, RuleSet, Var

from ._patterns import (
    DEFAULT_TOLERANCE,
    SQRT2,
    SQRT_2_OVER_PI,
    FusionPass,
    any_of,
    expect_scalar,
    rank,
    require_float,
    require_opset,
)

_X = Var("x")


def _half(inner: Op | Var, name: str) -> Op:
    """``Mul(inner, 0.5)`` or ``Div(inner, 2)`` (the check tells which constant is right)."""
    return Op(("Mul", "Div"), inner, Var("half"), name=name)


def _erf_term() -> Op:
    """``1 + Erf(x / sqrt(2))``, the division possibly a ``Mul`` by 1/sqrt(2)."""
    return Op("Add", Op("Erf", Op(("Div", "Mul"), _X, Var("c"), name="scale"), name="core"), Var("one"))


def _tanh_terms() -> list[Op]:
    """``1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))`` with ``x^3`` as ``Pow(x, 3)`` or ``x * x * x``."""
    cubes = [Op("Pow", _X, Var("three"), name="cube"), Op("Mul", Op("Mul", _X, _X), _X, name="cube")]
    out = []
    for cube in cubes:
        inner = Op("Add", _X, Op("Mul", cube, Var("k")))
        out.append(Op("Add", Op("Tanh", Op("Mul", inner, Var("c"), name="scale"), name="core"), Var("one")))
    return out


def _shapes(term: Op) -> list[Op]:
    """Where the half goes: (0.5 x) A, x (0.5 A), (x A) 0.5."""
    return [
        Op("Mul", _half(_X, "half_op"), term),
        Op("Mul", _X, _half(term, "half_op")),
        _half(Op("Mul", _X, term), "half_op"),
    ]


def _check(graph: Graph, m: Match, *, tanh: bool, tolerance: float) -> str | None:
    reason = require_opset(graph, 20) or require_float(graph, m["x"])
    if reason:
        return reason
    r = rank(graph, m["x"])
    check = partial(expect_scalar, graph, rel=tolerance, rank=r)
    half_op = m.node("half_op")
    if half_op.op_type == "Mul":
        reason = check(m["half"], 0.5, "the factor 0.5")
    else:
        reason = check(m["half"], 2.0, "the divisor 2")
    if reason:
        return reason
    if tanh:
        reason = check(m["c"], SQRT_2_OVER_PI, "the tanh-form factor sqrt(2/pi)")
        reason = reason or check(m["k"], 0.044715, "the cubic coefficient")
        if not reason and m.node("cube").op_type == "Pow":
            reason = check(m["three"], 3.0, "the exponent of the cube")
    elif m.node("scale").op_type == "Div":
        reason = check(m["c"], SQRT2, "the divisor of x in erf")
    else:
        reason = check(m["c"], 1 / SQRT2, "the factor of x in erf")
    return reason or check(m["one"], 1.0, "the constant added to erf/tanh")


def _rewrite(b: Builder, m: Match, *, tanh: bool) -> str:
    return b.op1("Gelu", [m["x"]], approximate="tanh" if tanh else "none")


def rules(tolerance: float = DEFAULT_TOLERANCE) -> RuleSet:
    erf = [shape for shape in _shapes(_erf_term())]
    tanh = [shape for term in _tanh_terms() for shape in _shapes(term)]
    return RuleSet(
        "gelu",
        [
            any_of(
                "gelu-erf",
                erf,
                partial(_rewrite, tanh=False),
                partial(_check, tanh=False, tolerance=tolerance),
                anchor="core",
            ),
            any_of(
                "gelu-tanh",
                tanh,
                partial(_rewrite, tanh=True),
                partial(_check, tanh=True, tolerance=tolerance),
                anchor="core",
            ),
        ],
    )


class FuseGeluOptions(PassOptions):
    model_config = ConfigDict(use_attribute_docstrings=True)

    tolerance: float = Field(default=DEFAULT_TOLERANCE, gt=0, lt=0.1)
    """Relative tolerance when comparing the formula's constants (0.5, sqrt(2), 0.044715, sqrt(2/pi))."""


@register_pass("fuse-gelu")
class FuseGelu(FusionPass):
    """Rewrites the erf and tanh GELU formulas into Gelu (approximate="none" / "tanh", opset 20)."""

    Options = FuseGeluOptions
    options: FuseGeluOptions
    rules = rules()

    def rule_set(self) -> RuleSet:
        return self.rules if self.options.tolerance == DEFAULT_TOLERANCE else rules(self.options.tolerance)
