"""What the fusion rules of this package share: constants compared with a tolerance, reduction axes, opset
requirements, the optional tail of a normalization (Cast back, Mul scale, Add bias) and readable weight names.

Checks return a *reason* (a sentence for the explain report) or None; the helpers here return the same, so a
rule's check reads as a list of ``reason = helper(...); if reason: return reason``.

Normalizations are matched at the normalizing op (``x * rsqrt(...)``, ``(x - mean) / std``) and absorb what
follows (``Cast`` back to the input type, ``Mul`` by a scale, ``Add`` of a bias) by looking downstream
(:func:`norm_tail`): a pattern rooted at the scale's Mul would also need a second, unscaled pattern that
fires first (nodes are visited in topological order) and leaves the scale behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from onnx import TensorProto

from llmc.ir import Dim, Graph, Node, np_dtype_to_onnx, onnx_dtype_to_np
from llmc.pass_manager import PassContext, PassResult
from llmc.rewrite import Op, RewritePass, RewriteRule, Var

try:
    from llmc.rewrite import NotASite
except ImportError:  # an engine without it: AnyOf below gives the same meaning to this one

    class NotASite(str):
        """A check's answer for a node that is no candidate at all (not reported as a near miss)."""


FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
LOW_PRECISION = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
DEFAULT_TOLERANCE = 1e-4  # relative: 1.4142 and 0.7071 pass for sqrt(2) and 1/sqrt(2), 1.41 does not
SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# -- rules -----------------------------------------------------------------------------------------------
@dataclass
class AnyOf(RewriteRule):
    """One rule over several spellings of a pattern: one name, one hit count, and for a node that no
    spelling fits, the failure of the spelling that got deepest (a check's reason beats a structural
    mismatch); separate rules of one name would each overwrite the node's near-miss reason in turn.

    ``min_depths[i]`` is how deep spelling ``i`` must have matched for its failure to be a near miss worth
    reporting (see :func:`any_of`'s ``anchor``); shallower failures are not reported.
    """

    alternatives: list[Op] = field(default_factory=list)
    min_depths: list[int] = field(default_factory=list)

    def try_match(self, graph: Graph, node: Node):
        best = None  # RuleSet only asks about nodes of the union's op types: one spelling at least is tried
        for i, pattern in enumerate(self.alternatives):
            if node.op_type not in pattern.op_types:
                continue
            m, failure = RewriteRule(self.name, pattern, self.rewrite, self.check).try_match(graph, node)
            if m is not None:
                return m, failure
            if isinstance(failure.reason, NotASite) or self.min_depths and failure.depth < self.min_depths[i]:
                failure = replace(failure, depth=-1)
            if best is None or failure.depth > best.depth:
                best = failure
        return None, best


def any_of(
    name: str, patterns: Sequence[Op], rewrite, check=None, *, anchor: str | tuple[str, ...] | None = None
) -> RewriteRule:
    """A rule matching any of ``patterns`` (tried in order; the first that matches and passes ``check`` wins).

    ``anchor`` names the node of each pattern that makes a site a candidate (the ``Erf`` of a GELU, the mean
    of squares of an RMS norm): only failures below it are reported as near misses, so that every ``Mul``
    of a model is not listed as "almost a GELU". Several names: the first one a pattern has."""
    op_types = tuple(dict.fromkeys(t for p in patterns for t in p.op_types))
    depths = [_depth_of(p, anchor) + 1 for p in patterns] if anchor else []
    return AnyOf(name, Op(op_types), rewrite, check, alternatives=list(patterns), min_depths=depths)


def _depth_of(pattern: Op, names: str | tuple[str, ...]) -> int:
    for name in (names,) if isinstance(names, str) else names:
        depth = _find(pattern, name, 0)
        if depth >= 0:
            return depth
    raise ValueError(f"pattern {pattern} has no node named {names!r}")


def _find(pattern: Op | Var | None, name: str, depth: int) -> int:
    if not isinstance(pattern, Op):
        return -1
    if pattern.name == name:
        return depth
    found = [d for d in (_find(p, name, depth + 1) for p in pattern.inputs) if d >= 0]
    return min(found) if found else -1


class FusionPass(RewritePass):
    """A RewritePass whose report drops near misses at nodes that a later rewrite removed (a SiLU rejected
    below opset 24, then absorbed by the gate/up merge, is no site any more)."""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        result = super().run(graph, ctx)
        rejected = result.details.get("rejected")
        if rejected:
            labels = {n.label for _g, n in graph.walk()}
            live = [miss for miss in rejected if miss["site"] in labels]
            result.details["rejected"] = live
            if live:
                result.stats["rejected"] = len(live)
            else:
                result.stats.pop("rejected", None)
        return result


# -- constants ---------------------------------------------------------------------------------------------
def scalar(graph: Graph, value: str) -> float | None:
    """The value of a constant holding exactly one element (any rank), else None."""
    array = graph.constant(value) if value else None
    if array is None or array.size != 1 or array.dtype.kind not in "fiub":
        return None
    return float(np.asarray(array, dtype=np.float64).reshape(()))


def close(have: float, want: float, rel: float = DEFAULT_TOLERANCE) -> bool:
    return abs(have - want) <= rel * max(abs(want), 1e-12)


def expect_scalar(
    graph: Graph,
    value: str,
    want: float,
    what: str,
    rel: float = DEFAULT_TOLERANCE,
    *,
    rank: int | None = None,
) -> str | None:
    """None when ``value`` is a constant scalar close to ``want`` that broadcasting cannot widen (its rank
    is at most ``rank``, the rank of the tensor it meets); else the reason."""
    have = scalar(graph, value)
    if have is None:
        return f"{what} '{value}' is not a constant scalar"
    if not close(have, want, rel):
        return f"{what} is {have:.7g}, expected {want:.7g}"
    ndim = graph.constant(value).ndim
    if ndim > (rank if rank is not None else 1):
        return f"{what} '{value}' has rank {ndim}: broadcasting it would change the result's shape"
    return None


def fmt(x: float) -> str:
    return f"{x:.7g}"


# -- shapes, types, opsets ---------------------------------------------------------------------------------
def rank(graph: Graph, value: str) -> int | None:
    shape = graph.shape(value)
    return None if shape is None else len(shape)


# Ops whose output has the element type of their first input (for values without value_info).
_SAME_TYPE = frozenset(
    "Abs Add Div Erf Gelu Identity LayerNormalization MatMul Max Min Mul Neg Pow RMSNormalization Reciprocal "
    "ReduceMean ReduceSum Relu Reshape Sigmoid Slice Softmax Sqrt Squeeze Sub Swish Tanh Transpose Unsqueeze Gemm "
    "Gather Concat Expand Split".split()
)


def dtype(graph: Graph, value: str, _depth: int = 0) -> int:
    """The element type of ``value``: from the constant, value_info, or (when neither tells) the producer:
    a Cast's ``to``, or the first input's type through type-preserving ops."""
    array = graph.constant(value)
    if array is not None:
        return np_dtype_to_onnx(array.dtype)
    known = graph.dtype(value)
    node = graph.producer(value)
    if known or node is None or node.domain or _depth > 16:
        return known
    if node.op_type == "Cast":
        return int(node.attr("to", 0))
    if node.op_type in _SAME_TYPE and node.inputs and node.inputs[0]:
        return dtype(graph, node.inputs[0], _depth + 1)
    return 0


def require_float(graph: Graph, value: str) -> str | None:
    kind = dtype(graph, value)
    if kind == 0:
        return f"element type of '{value}' is unknown"
    if kind not in FLOAT_TYPES:
        return f"'{value}' is {TensorProto.DataType.Name(kind).lower()}, not a floating-point tensor"
    return None


def model_opset(graph: Graph) -> int:
    root = graph.root()
    return int(root.opset_imports.get("", root.opset_imports.get("ai.onnx", 0)))


def require_opset(graph: Graph, need: int) -> str | None:
    """The reason when the model's default-domain opset is below ``need``."""
    have = model_opset(graph)
    if have >= need:
        return None
    how = "upgrade-opset" if need <= 23 else f"upgrade-opset {{version: {need}}}"
    return f"model opset {have} < {need}: put {how} before this pass"


def reduce_axes(graph: Graph, node: Node) -> list[int] | None | str:
    """The axes a Reduce* node reduces: a list, None for "every axis", or a reason string."""
    axes = node.attr("axes")
    if axes is None and node.input(1):
        array = graph.constant(node.input(1))
        if array is None:
            return f"the axes of {node.label} are not constant"
        axes = [int(a) for a in np.asarray(array).reshape(-1)]
    if axes is None or len(axes) == 0:
        if node.attr("noop_with_empty_axes", 0):
            return f"{node.label} reduces nothing (noop_with_empty_axes)"
        return None
    return [int(a) for a in axes]


def trailing_axis(axes: list[int] | None, rank_: int | None) -> int | None:
    """The first axis when ``axes`` are the last k axes of a tensor of rank ``rank_`` (unknown rank: only
    negative axes ending at -1 can be proven trailing); returns it negative, as normalizations take it."""
    if axes is None:
        return -rank_ if rank_ else None
    if rank_ is not None:
        if any(not -rank_ <= a < rank_ for a in axes):
            return None
        norm = sorted(a % rank_ for a in axes)
        if norm != list(range(rank_ - len(norm), rank_)) or len(set(norm)) != len(norm):
            return None
        return norm[0] - rank_
    if any(a >= 0 for a in axes):
        return None
    norm = sorted(axes)
    return norm[0] if norm == list(range(-len(norm), 0)) else None


def axis_reason(axes: list[int], rank_: int | None) -> str:
    where = (
        f" (axes {axes} of a rank-{rank_} tensor)" if rank_ is not None else f" (axes {axes}, rank unknown)"
    )
    if len(axes) == 1:
        return "normalized axis is not the last one" + where
    return "normalized axes are not the last ones" + where


def normalized_shape(graph: Graph, value: str, axis: int) -> tuple[Dim, ...] | None:
    """``shape(value)[axis:]`` (``axis`` negative), or None when the rank is unknown."""
    shape = graph.shape(value)
    if shape is None or -axis > len(shape):
        return None
    return tuple(shape[axis:])


def fits(array_shape: Sequence[int], want: Sequence[Dim]) -> bool:
    """Whether a constant of ``array_shape`` is exactly the normalized shape ``want`` (symbolic dims match
    any size: the original Mul would fail at run time otherwise)."""
    if len(array_shape) != len(want):
        return False
    return all(not isinstance(w, int) or int(a) == w for a, w in zip(array_shape, want, strict=True))


# -- uses --------------------------------------------------------------------------------------------------
def sole_user(graph: Graph, value: str) -> tuple[Node, int] | None:
    """The one node reading ``value`` (through exactly one input slot) and its slot, when nothing else reads
    it and it is not a graph output."""
    if value in graph.outputs:
        return None
    uses = graph.uses(value)
    if len(uses) != 1 or uses[0][1] < 0:
        return None
    return uses[0]


def other_input(node: Node, slot: int) -> str:
    return node.inputs[1 - slot] if len(node.inputs) == 2 else ""


def used_only_by(graph: Graph, value: str, nodes: Sequence[Node]) -> bool:
    ids = {n.id for n in nodes}
    return value not in graph.outputs and all(n.id in ids for n in graph.consumers(value))


# -- normalization tails -----------------------------------------------------------------------------------
@dataclass
class NormPlan:
    """How a matched normalization becomes one op: its input, axis, epsilon, scale and bias, the value it
    replaces and the nodes it absorbs besides the pattern's."""

    x: str
    axis: int
    epsilon: float
    out: str
    scale: str | None = None
    bias: str | None = None
    absorbed: list[Node] = field(default_factory=list)
    shape: tuple[Dim, ...] | None = None  # the normalized shape
    dtype: int = 0  # element type of x


def upcast_input(graph: Graph, x: str, inside: Sequence[Node]) -> tuple[str, Node] | None:
    """``x = Cast(x16, to=float)`` read only by the matched nodes: (x16, the Cast)."""
    cast = graph.producer(x)
    if cast is None or cast.op_type != "Cast" or cast.domain:
        return None
    source = cast.inputs[0]
    if cast.attr("to") != TensorProto.FLOAT or dtype(graph, source) not in LOW_PRECISION:
        return None
    return (source, cast) if used_only_by(graph, x, inside) else None


def norm_tail(graph: Graph, plan: NormPlan, *, cast_back: Node | None, bias: bool) -> None:
    """Absorb what follows ``plan.out``: the Cast back to the input type when the input was upcast (given as
    ``cast_back`` once found), then ``Mul`` by a constant of the normalized shape, then (``bias``) ``Add`` of
    one. Each step is taken only when the value has no other user."""
    if cast_back is not None:
        plan.absorbed.append(cast_back)
        plan.out = cast_back.outputs[0]
    want = plan.shape
    for op, attr in (("Mul", "scale"), ("Add", "bias")):
        if op == "Add" and not bias:
            break
        use = sole_user(graph, plan.out)
        if use is None or want is None:
            return
        node, slot = use
        if node.op_type != op or node.domain or len(node.inputs) != 2:
            if op == "Mul":
                continue  # a bias without a scale
            return
        other = other_input(node, slot)
        array = graph.constant(other)
        if array is None or not fits(array.shape, want) or np_dtype_to_onnx(array.dtype) != plan.dtype:
            if op == "Mul":
                continue
            return
        setattr(plan, attr, other)
        plan.absorbed.append(node)
        plan.out = node.outputs[0]


def find_cast_back(graph: Graph, value: str, to: int) -> Node | None:
    use = sole_user(graph, value)
    if use is None:
        return None
    node, _slot = use
    return node if node.op_type == "Cast" and not node.domain and node.attr("to") == to else None


def unit_scale(graph: Graph, shape: tuple[Dim, ...], elem_type: int) -> str | None:
    """A shared all-ones initializer of ``shape`` (None when a dim is not a known integer)."""
    if not all(isinstance(d, int) for d in shape):
        return None
    np_type = np.dtype(onnx_dtype_to_np(elem_type))
    name = f"llmc.ones.{np_type.name}.{'x'.join(str(d) for d in shape)}"
    existing = graph.constant(name)
    if (
        existing is not None
        and existing.shape == shape
        and existing.dtype == np_type
        and np.all(existing == 1)
    ):
        return name
    return graph.add_initializer(name, np.ones(shape, dtype=np_type))


# -- names -------------------------------------------------------------------------------------------------
_SEPARATORS = "._/"


def check_denominator(graph: Graph, m, base: str, r: int | None) -> str | None:
    """The square (``Pow(base, 2)`` or ``Mul(base, base)``) and the constants of the division by the root."""
    if m.node("square").op_type == "Pow":
        reason = expect_scalar(graph, m["p"], 2.0, "the exponent of the square", rank=r)
    else:
        reason = None if m["p"] == base else f"the square multiplies '{base}' by another value ('{m['p']}')"
    for key, want, what in (
        ("one", 1.0, "the numerator of 1/sqrt"),
        ("neg_half", -0.5, "the exponent of rsqrt"),
    ):
        if not reason and key in m.values:
            reason = expect_scalar(graph, m[key], want, what, rank=r)
    return reason


def norm_axis(graph: Graph, x: str, r: int | None, means: Sequence[Node]) -> int | str:
    """The first normalized axis (negative) that every ReduceMean of a norm reduces, or why there is none."""
    if any(mean.attr("keepdims", 1) != 1 for mean in means):
        return f"{'a ' if len(means) > 1 else ''}ReduceMean drops the reduced axes (keepdims=0)"
    all_axes = [reduce_axes(graph, mean) for mean in means]
    for a in all_axes:
        if isinstance(a, str):
            return a
    axes = all_axes[0]
    if any(a != axes for a in all_axes[1:]):
        return f"the mean and the variance reduce different axes ({axes} vs {all_axes[1]})"
    axis = trailing_axis(axes, r)
    if axis is None:
        if axes is None:
            return f"ReduceMean reduces every axis of '{x}', whose rank is unknown"
        return axis_reason(axes, r)
    return axis


def norm_rule(name: str, patterns: Sequence[Op], plan, op: str, *, anchor: str) -> RewriteRule:
    """The rule of a norm fusion: ``plan(graph, match)`` gives a NormPlan or the reason; the rewrite is
    ``op(x, scale or ones[, bias], axis, epsilon, stash_type=1)``."""

    def check(graph: Graph, m) -> str | None:
        p = plan(graph, m)
        return p if isinstance(p, str) else None

    def rewrite(b, m) -> dict[str, str]:
        p = plan(b.graph, m)
        assert not isinstance(p, str), p
        scale = p.scale or unit_scale(b.graph, p.shape, p.dtype)
        m.matched.extend(p.absorbed)  # removed with the pattern's nodes once unused
        inputs = [p.x, scale] + ([p.bias] if p.bias else [])
        return {p.out: b.op1(op, inputs, axis=p.axis, epsilon=p.epsilon, stash_type=1)}

    return any_of(name, patterns, rewrite, check, anchor=anchor)


def norm_plan(graph: Graph, m, x: str, axis: int, rank_: int | None, *, bias: bool) -> NormPlan | str:
    """The shared tail of the norm fusions: epsilon, Casts absorbed around the norm, scale (and bias)."""
    eps = scalar(graph, m["eps"])
    if eps is None or graph.constant(m["eps"]).ndim > (rank_ if rank_ is not None else 1):
        return "epsilon is not a constant scalar"
    if eps < 0:
        return f"epsilon is negative ({fmt(eps)})"
    p = NormPlan(x=x, axis=axis, epsilon=eps, out=m.root.outputs[0], dtype=dtype(graph, x))
    back = None
    upcast = upcast_input(graph, x, m.matched)
    if upcast is not None:
        source, cast = upcast
        back = find_cast_back(graph, p.out, dtype(graph, source))
        if back is not None:  # x16 -> float32 -> norm -> x16: the norm on x16 with a float32 stash
            p.x, p.dtype = source, dtype(graph, source)
            p.absorbed.append(cast)
    p.shape = normalized_shape(graph, p.x, axis) or (None,) * -axis
    norm_tail(graph, p, cast_back=back, bias=bias)
    if p.scale is None and not all(isinstance(d, int) for d in p.shape):
        return f"normalized shape {list(p.shape)} of '{p.x}' is not static: cannot build a unit scale"
    return p


def merged_name(a: str, b: str, *, joiner: str = "_") -> str:
    """A readable name for a weight made of ``a`` and ``b``: the differing middle words joined
    (``mlp.gate_proj.weight.T`` + ``mlp.up_proj.weight.T`` -> ``mlp.gate_up_proj.weight.T``; when more than one
    word differs, ``prefix`` + ``rest_a+rest_b``)."""
    prefix = os.path.commonprefix([a, b])
    cut = max(prefix.rfind(c) for c in _SEPARATORS) + 1
    prefix = prefix[:cut]
    ra, rb = a[len(prefix) :], b[len(prefix) :]
    suffix = os.path.commonprefix([ra[::-1], rb[::-1]])[::-1]
    starts = [i for i, c in enumerate(suffix) if c in _SEPARATORS]
    suffix = suffix[starts[0] :] if starts else ""
    mid_a, mid_b = ra[: len(ra) - len(suffix)], rb[: len(rb) - len(suffix)]
    if not mid_a or not mid_b:
        return f"{a}+{b}"
    if any(c in _SEPARATORS for c in mid_a + mid_b):  # not one differing word: say "both" plainly
        joiner = "+"
    return f"{prefix}{mid_a}{joiner}{mid_b}{suffix}"
