"""ONNX -> JAX: one small lowering function per op, and the interpreter that runs a ``Graph`` under a trace.

**The table.** ``LOWERINGS`` maps ``(domain, op_type)`` onto a function ``fn(ctx, *inputs) -> output(s)``
written with ``jax.numpy``/``jax.lax``; absent optional inputs arrive as ``None``, attributes come from
``ctx.attr``. Each function follows the ONNX operator spec (``onnx/docs/Operators.md``) and, where the spec
leaves room, ``onnx.reference`` (Attention, RotaryEmbedding, RMSNormalization, Resize coordinates). An op
without an entry is a ``TargetError`` naming the op and the node: there is no silent fallback.

**Static values.** StableHLO for TPUs has static shapes, so every value that *is* a shape (Reshape targets,
Slice bounds, axes, pads, Resize sizes, Range bounds, TopK's k...) must be known while tracing. The
interpreter keeps two kinds of values: numpy arrays are *static* (small constants, and anything computed
only from static values: ``Shape`` of a traced tensor is static because each bucket has concrete shapes, so
the usual Shape -> Gather -> Concat -> Reshape chains fold), and jax arrays are *traced* (graph inputs, the
weights, and everything that depends on them). A node whose inputs are all static is evaluated at trace time
with ``jax.ensure_compile_time_eval`` (the same lowering function, evaluated eagerly) and its outputs stay
numpy; when such a folded result is large (> ``FOLD_LIMIT`` elements: a causal mask, a big
ConstantOfShape) it is recomputed as traced code instead, so the module builds it with iota/broadcast rather
than carrying a large literal. A lowering asks for a static input with ``ctx.static(i)``; a traced value
there is a ``TargetError`` that names the node and the input.

**Weights** (initializers, and Constant nodes, above ``inline_limit`` elements) are *arguments* of the
traced function, never baked-in literals: the exported modules stay small and all buckets share one weights
file. Their values are still known at trace time, so a lowering that needs one of them as a static value
(rare: a large constant used as shape data) gets it.

**Convolutions** are shaped for XLA:CPU too, since that is where artifacts are verified: 1x1 convolutions
become matmuls, spatial dims a kernel leaves alone fold into the batch, and a depthwise convolution is a
``lax.platform_dependent`` choice (shifted slices on CPU, where XLA's grouped convolution is ~50x slower
than onnxruntime's; the convolution itself on TPU).

**Types.** JAX runs with ``jax_enable_x64`` (see ``jaxenv``): ONNX int64 stays int64. Lowerings never lean
on JAX's default dtypes: reductions and cumulative sums pass ``dtype=x.dtype`` (``jnp.sum`` would widen
int32), constants are created with the dtype of the tensor they meet.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmc.errors import TargetError
from llmc.ir import Graph, Node, constant_node_value, onnx_dtype_to_np
from llmc.targets.tpu.jaxenv import require_jax

jax = require_jax()
import jax.numpy as jnp  # noqa: E402  (after require_jax: x64 must be on before the first array exists)
from jax import lax  # noqa: E402

# A folded (static) result above this many elements is recomputed as traced code instead of becoming a literal.
FOLD_LIMIT = 4096
# Initializers and Constant tensors up to this many elements are static literals; larger ones are arguments.
INLINE_LIMIT = 64

Lowering = Callable[..., Any]
LOWERINGS: dict[tuple[str, str], Lowering] = {}
# Ops never evaluated at trace time even when every input is static (they open scopes of their own).
NO_FOLD = {"If"}


def lowering(*op_types: str, domain: str = "") -> Callable[[Lowering], Lowering]:
    """Register ``fn`` as the lowering of ``op_types`` in ``domain`` ("" is the default ONNX domain)."""

    def register(fn: Lowering) -> Lowering:
        for op in op_types:
            LOWERINGS[(domain, op)] = fn
        return fn

    return register


def supported_ops() -> list[str]:
    return sorted(op if not dom else f"{dom}.{op}" for dom, op in LOWERINGS)


def is_static(value: Any) -> bool:
    return isinstance(value, np.ndarray)


def np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(onnx_dtype_to_np(onnx_type))


# -- the context a lowering sees ---------------------------------------------------------------------
@dataclass
class OpContext:
    """The node being lowered, its opset and access to static values of its inputs."""

    node: Node
    opset: int
    known: Mapping[str, np.ndarray]  # values of weight arguments (known at trace time, traced in the module)
    interpreter: Interpreter

    def attr(self, name: str, default: Any = None) -> Any:
        return self.node.attr(name, default)

    def error(self, message: str) -> TargetError:
        return TargetError(f"node {self.node.label}: {message}")

    def static(self, value: Any, slot: int, what: str = "value") -> np.ndarray:
        """The numpy value of input ``slot`` (which holds ``value``); an error when it is only known at run time."""
        if is_static(value):
            return value
        name = self.node.input(slot)
        if name in self.known:
            return np.asarray(self.known[name])
        if not isinstance(value, jax.core.Tracer):
            return np.asarray(value)
        raise self.error(
            f"input {slot} ('{name}', the {what}) must be known at compile time, but it is computed from the "
            "model's inputs; TPU modules have static shapes (export a graph whose shapes do not depend on data)"
        )

    def ints(self, value: Any, slot: int, what: str = "value") -> list[int]:
        return [int(v) for v in np.asarray(self.static(value, slot, what)).reshape(-1)]

    def wants(self, slot: int) -> bool:
        """Whether output ``slot`` is present (optional outputs may be absent or "")."""
        return slot < len(self.node.outputs) and bool(self.node.outputs[slot])


# -- helpers -----------------------------------------------------------------------------------------
def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes(axes: Iterable[int], rank: int) -> list[int]:
    return [_axis(int(a), rank) for a in axes]


def _is_int(x: Any) -> bool:
    return np.issubdtype(np.dtype(x.dtype), np.integer)


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _const(value: Any, like: Any) -> Any:
    """A scalar in the dtype of ``like`` (numpy, so that static math stays static)."""
    return np.asarray(value, dtype=like.dtype)


def _reduce_axes(ctx: OpContext, x: Any, axes_input: Any, slot: int = 1) -> tuple[int, ...] | None:
    """Axes of a Reduce op (attribute before opset 13/18, input after); None means "no reduction"."""
    if axes_input is not None:
        axes = ctx.ints(axes_input, slot, "axes")
    else:
        axes = ctx.attr("axes")
    if not axes:
        return None if ctx.attr("noop_with_empty_axes", 0) else tuple(range(x.ndim))
    return tuple(sorted(_axes(axes, x.ndim)))


def _pool_geometry(
    ctx: OpContext, spatial: Sequence[int], kernel: Sequence[int]
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """strides, dilations and (begin, end) pads of a Conv/Pool node (auto_pad resolved)."""
    n = len(spatial)
    strides = list(ctx.attr("strides") or [1] * n)
    dilations = list(ctx.attr("dilations") or [1] * n)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    pads = list(ctx.attr("pads") or [0] * (2 * n))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pairs = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pairs.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
        return strides, dilations, pairs
    if auto_pad == "VALID":
        return strides, dilations, [(0, 0)] * n
    return strides, dilations, [(pads[i], pads[i + n]) for i in range(n)]


# -- elementwise ---------------------------------------------------------------------------------------
def _unary(op: str, fn: Callable[[Any], Any]) -> None:
    LOWERINGS[("", op)] = lambda ctx, x: fn(x)


for _op, _fn in {
    "Abs": jnp.abs,
    "Neg": jnp.negative,
    "Exp": jnp.exp,
    "Log": jnp.log,
    "Sqrt": jnp.sqrt,
    "Floor": jnp.floor,
    "Ceil": jnp.ceil,
    "Round": jnp.round,  # half to even, as ONNX says
    "Sign": jnp.sign,
    "Sin": jnp.sin,
    "Cos": jnp.cos,
    "Tan": jnp.tan,
    "Asin": jnp.arcsin,
    "Acos": jnp.arccos,
    "Atan": jnp.arctan,
    "Sinh": jnp.sinh,
    "Cosh": jnp.cosh,
    "Asinh": jnp.arcsinh,
    "Acosh": jnp.arccosh,
    "Atanh": jnp.arctanh,
    "Tanh": jnp.tanh,
    "Erf": lax.erf,
    "Sigmoid": jax.nn.sigmoid,
    "Softplus": jax.nn.softplus,
    "IsNaN": jnp.isnan,
    "Not": jnp.logical_not,
    "BitwiseNot": jnp.bitwise_not,
    "Identity": lambda x: x,
}.items():
    _unary(_op, _fn)


@lowering("Reciprocal")
def _reciprocal(ctx, x):
    return _const(1, x) / x


@lowering("Relu")
def _relu(ctx, x):
    return jnp.maximum(x, _const(0, x))


@lowering("LeakyRelu")
def _leaky_relu(ctx, x):
    return jnp.where(x >= 0, x, x * _const(ctx.attr("alpha", 0.01), x))


@lowering("PRelu")
def _prelu(ctx, x, slope):
    return jnp.where(x >= 0, x, x * slope)


@lowering("Elu")
def _elu(ctx, x):
    alpha = _const(ctx.attr("alpha", 1.0), x)
    return jnp.where(x > 0, x, alpha * jnp.expm1(x))


@lowering("Selu")
def _selu(ctx, x):
    alpha = _const(ctx.attr("alpha", 1.67326319217681884765625), x)
    gamma = _const(ctx.attr("gamma", 1.05070102214813232421875), x)
    return gamma * jnp.where(x > 0, x, alpha * jnp.expm1(x))


@lowering("Celu")
def _celu(ctx, x):
    alpha = _const(ctx.attr("alpha", 1.0), x)
    return jnp.maximum(x, 0) + jnp.minimum(_const(0, x), alpha * jnp.expm1(x / alpha))


@lowering("ThresholdedRelu")
def _thresholded_relu(ctx, x):
    return jnp.where(x > _const(ctx.attr("alpha", 1.0), x), x, _const(0, x))


@lowering("Softsign")
def _softsign(ctx, x):
    return x / (_const(1, x) + jnp.abs(x))


@lowering("Mish")
def _mish(ctx, x):
    return x * jnp.tanh(jax.nn.softplus(x))


@lowering("Swish")
def _swish(ctx, x):
    return x * jax.nn.sigmoid(x * _const(ctx.attr("alpha", 1.0), x))


@lowering("HardSigmoid")
def _hard_sigmoid(ctx, x):
    alpha, beta = _const(ctx.attr("alpha", 0.2), x), _const(ctx.attr("beta", 0.5), x)
    return jnp.clip(alpha * x + beta, _const(0, x), _const(1, x))


@lowering("HardSwish")
def _hard_swish(ctx, x):
    return x * jnp.clip(x * _const(1 / 6, x) + _const(0.5, x), _const(0, x), _const(1, x))


@lowering("Gelu")
def _gelu(ctx, x):
    if ctx.attr("approximate", "none") == "tanh":
        return jax.nn.gelu(x, approximate=True)
    return _const(0.5, x) * x * (_const(1, x) + lax.erf(x * _const(1 / math.sqrt(2), x)))


@lowering("Shrink")
def _shrink(ctx, x):
    bias, lambd = _const(ctx.attr("bias", 0.0), x), _const(ctx.attr("lambd", 0.5), x)
    return jnp.where(x < -lambd, x + bias, jnp.where(x > lambd, x - bias, _const(0, x)))


@lowering("IsInf")
def _is_inf(ctx, x):
    neg, pos = ctx.attr("detect_negative", 1), ctx.attr("detect_positive", 1)
    if neg and pos:
        return jnp.isinf(x)
    if pos:
        return jnp.isposinf(x)
    if neg:
        return jnp.isneginf(x)
    return jnp.zeros(x.shape, bool)


@lowering("Clip")
def _clip(ctx, x, lo=None, hi=None):
    if ctx.opset < 11:
        lo, hi = ctx.attr("min"), ctx.attr("max")
        lo = None if lo is None else _const(lo, x)
        hi = None if hi is None else _const(hi, x)
    if lo is not None:
        x = jnp.maximum(x, lo)
    if hi is not None:
        x = jnp.minimum(x, hi)
    return x


for _op, _fn in {
    "Add": jnp.add,
    "Sub": jnp.subtract,
    "Mul": jnp.multiply,
    "Equal": jnp.equal,
    "Less": jnp.less,
    "LessOrEqual": jnp.less_equal,
    "Greater": jnp.greater,
    "GreaterOrEqual": jnp.greater_equal,
    "And": jnp.logical_and,
    "Or": jnp.logical_or,
    "Xor": jnp.logical_xor,
    "BitwiseAnd": jnp.bitwise_and,
    "BitwiseOr": jnp.bitwise_or,
    "BitwiseXor": jnp.bitwise_xor,
}.items():
    LOWERINGS[("", _op)] = lambda ctx, a, b, _fn=_fn: _fn(a, b)


@lowering("Div")
def _div(ctx, a, b):
    if _is_int(a):  # C semantics: truncate toward zero (jnp's // floors)
        return lax.div(*jnp.broadcast_arrays(a, b))
    return a / b


@lowering("Pow")
def _pow(ctx, a, b):
    if _is_float(a) or not _is_float(b):
        return jnp.power(a, b.astype(a.dtype))
    return jnp.power(a.astype(b.dtype), b).astype(a.dtype)


@lowering("Mod")
def _mod(ctx, a, b):
    if ctx.attr("fmod", 0):
        return jnp.fmod(a, b)
    return jnp.remainder(a, b)  # the sign of the divisor, as ONNX's integer Mod


@lowering("BitShift")
def _bit_shift(ctx, a, b):
    if ctx.attr("direction") == "LEFT":
        return jnp.left_shift(a, b)
    return jnp.right_shift(a, b)


def _variadic(fn: Callable[[Any, Any], Any]) -> Lowering:
    def lower(ctx, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    return lower


LOWERINGS[("", "Max")] = _variadic(jnp.maximum)
LOWERINGS[("", "Min")] = _variadic(jnp.minimum)
LOWERINGS[("", "Sum")] = _variadic(jnp.add)


@lowering("Mean")
def _mean(ctx, *xs):
    return _variadic(jnp.add)(ctx, *xs) / _const(len(xs), xs[0])


@lowering("Where")
def _where(ctx, cond, a, b):
    return jnp.where(cond, a, b)


# -- types and constants -------------------------------------------------------------------------------
@lowering("Cast")
def _cast(ctx, x):
    to = np_dtype(ctx.attr("to"))
    if to.kind == "O" or np.dtype(x.dtype).kind == "O":
        raise ctx.error("string tensors have no TPU lowering")
    return x.astype(to)


@lowering("CastLike")
def _cast_like(ctx, x, like):
    return x.astype(like.dtype)


@lowering("Constant")
def _constant(ctx):
    value = constant_node_value(ctx.node)
    if value is None:
        raise ctx.error("Constant without a supported value attribute (sparse_value has no lowering)")
    if value.dtype == object:
        raise ctx.error("string constants have no TPU lowering")
    return value


@lowering("ConstantOfShape")
def _constant_of_shape(ctx, shape):
    dims = ctx.ints(shape, 0, "shape")
    value = ctx.attr("value")
    value = np.zeros((), np.float32) if value is None else np.asarray(value).reshape(())
    return jnp.full(dims, value, dtype=value.dtype)


@lowering("Shape")
def _shape(ctx, x):
    dims = list(x.shape)
    start, end = ctx.attr("start", 0), ctx.attr("end")
    return np.asarray(dims[start:end] if end is not None else dims[start:], np.int64)


@lowering("Size")
def _size(ctx, x):
    return np.asarray(math.prod(x.shape), np.int64)


@lowering("Range")
def _range(ctx, start, limit, delta):
    s, lim, d = (ctx.static(v, i, "range bound").item() for i, v in enumerate((start, limit, delta)))
    count = max(int(math.ceil((lim - s) / d)), 0)
    steps = jnp.arange(count, dtype=start.dtype)  # an iota in the module when too large to fold
    return (_const(s, start) + steps * _const(d, start)).astype(start.dtype)


@lowering("EyeLike")
def _eye_like(ctx, x):
    dtype = np_dtype(ctx.attr("dtype")) if ctx.attr("dtype") is not None else x.dtype
    return jnp.eye(x.shape[0], x.shape[1], k=ctx.attr("k", 0), dtype=dtype)


@lowering("Dropout")
def _dropout(ctx, x, ratio=None, training=None):
    if training is not None and ctx.static(training, 2, "training_mode").item():
        raise ctx.error("Dropout in training mode has no lowering (compile an inference graph)")
    return x, jnp.ones(x.shape, bool)


# -- shapes and data movement --------------------------------------------------------------------------
@lowering("Reshape")
def _reshape(ctx, x, shape=None):
    dims = ctx.ints(shape, 1, "shape") if shape is not None else list(ctx.attr("shape"))
    if not ctx.attr("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = math.prod(x.shape) // known if known else 0
    return jnp.reshape(x, dims)


@lowering("Flatten")
def _flatten(ctx, x):
    axis = _axis(ctx.attr("axis", 1), x.ndim)
    return jnp.reshape(x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


@lowering("Transpose")
def _transpose(ctx, x):
    perm = ctx.attr("perm")
    return jnp.transpose(x, perm if perm is not None else tuple(reversed(range(x.ndim))))


@lowering("Squeeze")
def _squeeze(ctx, x, axes=None):
    axes = ctx.ints(axes, 1, "axes") if axes is not None else ctx.attr("axes")
    if axes is None:
        return jnp.squeeze(x)
    return jnp.squeeze(x, axis=tuple(_axes(axes, x.ndim)))


@lowering("Unsqueeze")
def _unsqueeze(ctx, x, axes=None):
    axes = ctx.ints(axes, 1, "axes") if axes is not None else list(ctx.attr("axes"))
    rank = x.ndim + len(axes)
    shape = list(x.shape)
    for a in sorted(_axes(axes, rank)):
        shape.insert(a, 1)
    return jnp.reshape(x, shape)


@lowering("Concat")
def _concat(ctx, *xs):
    return jnp.concatenate(xs, axis=_axis(ctx.attr("axis"), xs[0].ndim))


@lowering("Split")
def _split(ctx, x, split=None):
    axis = _axis(ctx.attr("axis", 0), x.ndim)
    n = len(ctx.node.outputs)
    if split is not None:
        sizes = ctx.ints(split, 1, "split")
    elif ctx.attr("split"):
        sizes = list(ctx.attr("split"))
    else:
        n = ctx.attr("num_outputs", n)
        chunk = -(-x.shape[axis] // n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    bounds = np.cumsum(sizes)[:-1].tolist()
    return tuple(jnp.split(x, bounds, axis=axis))


def _slice_axis(x: Any, axis: int, start: int, end: int, step: int) -> Any:
    """x[start:end:step] along ``axis`` with ONNX (= Python) clamping, negative steps included."""
    dim = x.shape[axis]
    start, end, step = slice(start, end, step).indices(dim)
    count = len(range(start, end, step))
    if step > 0:
        return lax.slice_in_dim(x, start, start + (count - 1) * step + 1 if count else start, step, axis)
    if count == 0:
        return lax.slice_in_dim(x, 0, 0, 1, axis)
    flipped = lax.rev(x, (axis,))
    first = dim - 1 - start
    return lax.slice_in_dim(flipped, first, first + (count - 1) * (-step) + 1, -step, axis)


@lowering("Slice")
def _slice(ctx, x, starts=None, ends=None, axes=None, steps=None):
    if ctx.opset < 10:
        starts, ends, axes = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes")
        steps = None
    else:
        starts, ends = ctx.ints(starts, 1, "starts"), ctx.ints(ends, 2, "ends")
        axes = ctx.ints(axes, 3, "axes") if axes is not None else None
        steps = ctx.ints(steps, 4, "steps") if steps is not None else None
    axes = list(range(len(starts))) if axes is None else _axes(axes, x.ndim)
    steps = steps or [1] * len(starts)
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        x = _slice_axis(x, a, s, e, st)
    return x


def _wrap_indices(idx: Any, dim: int) -> Any:
    if is_static(idx):
        return np.where(idx < 0, idx + dim, idx)
    return jnp.where(idx < 0, idx + dim, idx)


@lowering("Gather")
def _gather(ctx, x, idx):
    axis = _axis(ctx.attr("axis", 0), x.ndim)
    return jnp.take(x, _wrap_indices(idx, x.shape[axis]), axis=axis, mode="clip")


@lowering("GatherElements")
def _gather_elements(ctx, x, idx):
    axis = _axis(ctx.attr("axis", 0), x.ndim)
    window = tuple(slice(None) if d == axis else slice(0, idx.shape[d]) for d in range(x.ndim))
    return jnp.take_along_axis(x[window], _wrap_indices(idx, x.shape[axis]), axis=axis, mode="clip")


def _nd_index(x: Any, idx: Any, batch_dims: int) -> tuple[Any, ...]:
    """Index arrays for x[...] from GatherND/ScatterND-style indices (last axis of idx indexes x)."""
    k = idx.shape[-1]
    batch_shape = idx.shape[:batch_dims]
    parts: list[Any] = []
    for b in range(batch_dims):
        shape = [1] * (idx.ndim - 1)
        shape[b] = batch_shape[b]
        parts.append(jnp.arange(batch_shape[b]).reshape(shape))
    for i in range(k):
        parts.append(_wrap_indices(idx[..., i], x.shape[batch_dims + i]))
    return tuple(parts)


@lowering("GatherND")
def _gather_nd(ctx, x, idx):
    return x[_nd_index(x, idx, ctx.attr("batch_dims", 0))]


def _scatter(ref: Any, reduction: str, updates: Any) -> Any:
    if reduction in ("none", None, ""):
        return ref.set(updates)
    return {"add": ref.add, "mul": ref.multiply, "max": ref.max, "min": ref.min}[reduction](updates)


@lowering("ScatterND")
def _scatter_nd(ctx, x, idx, updates):
    return _scatter(x.at[_nd_index(x, idx, 0)], ctx.attr("reduction", "none"), updates)


@lowering("ScatterElements", "Scatter")
def _scatter_elements(ctx, x, idx, updates):
    axis = _axis(ctx.attr("axis", 0), x.ndim)
    grids = list(jnp.meshgrid(*[jnp.arange(d) for d in idx.shape], indexing="ij"))
    grids[axis] = _wrap_indices(idx, x.shape[axis])
    return _scatter(x.at[tuple(grids)], ctx.attr("reduction", "none"), updates)


@lowering("Expand")
def _expand(ctx, x, shape):
    dims = ctx.ints(shape, 1, "shape")
    return jnp.broadcast_to(x, np.broadcast_shapes(tuple(x.shape), tuple(dims)))


@lowering("Tile")
def _tile(ctx, x, repeats):
    return jnp.tile(x, ctx.ints(repeats, 1, "repeats"))


@lowering("Pad")
def _pad(ctx, x, pads=None, value=None, axes=None):
    mode = ctx.attr("mode", "constant")
    if ctx.opset < 11:
        pads, value = list(ctx.attr("pads")), _const(ctx.attr("value", 0.0), x)
    else:
        pads = ctx.ints(pads, 1, "pads")
    rank = x.ndim
    axes = _axes(ctx.ints(axes, 3, "axes"), rank) if axes is not None else list(range(rank))
    n = len(axes)
    widths = [(0, 0)] * rank
    for i, a in enumerate(axes):
        widths[a] = (pads[i], pads[i + n])
    if mode == "constant":
        fill = jnp.zeros((), x.dtype) if value is None or value.size == 0 else jnp.reshape(value, ())
        return lax.pad(x, fill.astype(x.dtype), [(lo, hi, 0) for lo, hi in widths])
    crop = tuple(slice(max(-lo, 0), x.shape[d] - max(-hi, 0)) for d, (lo, hi) in enumerate(widths))
    jmode = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}.get(mode)
    if jmode is None:
        raise ctx.error(f"Pad mode '{mode}' has no lowering")
    return jnp.pad(x[crop], [(max(lo, 0), max(hi, 0)) for lo, hi in widths], mode=jmode)


@lowering("Trilu")
def _trilu(ctx, x, k=None):
    k = int(ctx.static(k, 1, "k").reshape(())) if k is not None else 0
    return jnp.triu(x, k) if ctx.attr("upper", 1) else jnp.tril(x, k)


@lowering("CumSum")
def _cumsum(ctx, x, axis):
    axis = _axis(int(ctx.static(axis, 1, "axis").reshape(())), x.ndim)
    if ctx.attr("reverse", 0):
        x = lax.rev(x, (axis,))
    out = jnp.cumsum(x, axis=axis, dtype=x.dtype)
    if ctx.attr("exclusive", 0):
        out = lax.pad(
            out, jnp.zeros((), x.dtype), [(1, -1, 0) if d == axis else (0, 0, 0) for d in range(x.ndim)]
        )
    return lax.rev(out, (axis,)) if ctx.attr("reverse", 0) else out


@lowering("OneHot")
def _one_hot(ctx, idx, depth, values):
    depth = int(ctx.static(depth, 1, "depth").reshape(()))
    axis = _axis(ctx.attr("axis", -1), idx.ndim + 1)
    idx = jnp.where(idx < 0, idx + depth, idx)
    hot = jnp.expand_dims(idx, axis) == jnp.arange(depth).reshape(
        [depth if d == axis else 1 for d in range(idx.ndim + 1)]
    )
    return jnp.where(hot, values[1], values[0])


@lowering("NonZero")
def _non_zero(ctx, x):
    return np.asarray(
        np.nonzero(ctx.static(x, 0, "input (its number of non-zeros is the output shape)")), np.int64
    )


@lowering("DepthToSpace")
def _depth_to_space(ctx, x):
    b, c, h, w = x.shape
    bs = ctx.attr("blocksize")
    if ctx.attr("mode", "DCR") == "DCR":
        y = jnp.reshape(x, (b, bs, bs, c // bs**2, h, w)).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = jnp.reshape(x, (b, c // bs**2, bs, bs, h, w)).transpose(0, 1, 4, 2, 5, 3)
    return jnp.reshape(y, (b, c // bs**2, h * bs, w * bs))


@lowering("SpaceToDepth")
def _space_to_depth(ctx, x):
    b, c, h, w = x.shape
    bs = ctx.attr("blocksize")
    y = jnp.reshape(x, (b, c, h // bs, bs, w // bs, bs)).transpose(0, 3, 5, 1, 2, 4)
    return jnp.reshape(y, (b, c * bs * bs, h // bs, w // bs))


# -- reductions ----------------------------------------------------------------------------------------
def _reduction(fn: Callable[[Any, tuple[int, ...], bool], Any]) -> Lowering:
    def lower(ctx, x, axes=None):
        reduce = _reduce_axes(ctx, x, axes)
        if reduce is None:
            return x
        return fn(x, reduce, bool(ctx.attr("keepdims", 1)))

    return lower


for _op, _fn in {
    "ReduceSum": lambda x, a, k: jnp.sum(x, axis=a, keepdims=k, dtype=x.dtype),
    "ReduceMean": lambda x, a, k: jnp.mean(x, axis=a, keepdims=k).astype(x.dtype),
    "ReduceMax": lambda x, a, k: jnp.max(x, axis=a, keepdims=k),
    "ReduceMin": lambda x, a, k: jnp.min(x, axis=a, keepdims=k),
    "ReduceProd": lambda x, a, k: jnp.prod(x, axis=a, keepdims=k, dtype=x.dtype),
    "ReduceL1": lambda x, a, k: jnp.sum(jnp.abs(x), axis=a, keepdims=k, dtype=x.dtype),
    "ReduceL2": lambda x, a, k: jnp.sqrt(jnp.sum(x * x, axis=a, keepdims=k, dtype=x.dtype)),
    "ReduceSumSquare": lambda x, a, k: jnp.sum(x * x, axis=a, keepdims=k, dtype=x.dtype),
    "ReduceLogSum": lambda x, a, k: jnp.log(jnp.sum(x, axis=a, keepdims=k, dtype=x.dtype)),
    "ReduceLogSumExp": lambda x, a, k: jax.nn.logsumexp(x, axis=a, keepdims=k).astype(x.dtype),
}.items():
    LOWERINGS[("", _op)] = _reduction(_fn)


def _arg_reduce(fn: Callable[..., Any]) -> Lowering:
    def lower(ctx, x):
        axis = _axis(ctx.attr("axis", 0), x.ndim)
        if ctx.attr("select_last_index", 0):
            idx = x.shape[axis] - 1 - fn(lax.rev(x, (axis,)), axis=axis)
        else:
            idx = fn(x, axis=axis)
        idx = idx.astype(np.int64)
        return jnp.expand_dims(idx, axis) if ctx.attr("keepdims", 1) else idx

    return lower


LOWERINGS[("", "ArgMax")] = _arg_reduce(jnp.argmax)
LOWERINGS[("", "ArgMin")] = _arg_reduce(jnp.argmin)


@lowering("TopK")
def _top_k(ctx, x, k):
    k = int(ctx.static(k, 1, "k").reshape(-1)[0])
    axis = _axis(ctx.attr("axis", -1), x.ndim)
    moved = jnp.moveaxis(x, axis, -1)
    if ctx.attr("largest", 1):
        values, idx = lax.top_k(moved, k)
    else:
        values, idx = lax.top_k(-moved, k)
        values = -values
    return jnp.moveaxis(values, -1, axis), jnp.moveaxis(idx.astype(np.int64), -1, axis)


def _softmax_like(fn: Callable[..., Any]) -> Lowering:
    def lower(ctx, x):
        if ctx.opset >= 13:
            return fn(x, axis=_axis(ctx.attr("axis", -1), x.ndim))
        axis = _axis(ctx.attr("axis", 1), x.ndim)  # before opset 13: over the flattened trailing dims
        flat = jnp.reshape(x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))
        return jnp.reshape(fn(flat, axis=1), x.shape)

    return lower


def _hardmax(x: Any, axis: int) -> Any:
    return jax.nn.one_hot(jnp.argmax(x, axis=axis), x.shape[axis], dtype=x.dtype, axis=axis)


LOWERINGS[("", "Softmax")] = _softmax_like(jax.nn.softmax)
LOWERINGS[("", "LogSoftmax")] = _softmax_like(jax.nn.log_softmax)
LOWERINGS[("", "Hardmax")] = _softmax_like(_hardmax)


# -- linear algebra ------------------------------------------------------------------------------------
@lowering("MatMul")
def _matmul(ctx, a, b):
    return jnp.matmul(a, b)


@lowering("Gemm")
def _gemm(ctx, a, b, c=None):
    a = a.T if ctx.attr("transA", 0) else a
    b = b.T if ctx.attr("transB", 0) else b
    y = jnp.matmul(a, b)
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * _const(alpha, y)
    if c is not None:
        y = y + (c if beta == 1.0 else c * _const(beta, c))
    return y


@lowering("Einsum")
def _einsum(ctx, *xs):
    return jnp.einsum(ctx.attr("equation"), *xs)


@lowering("MatMulInteger")
def _matmul_integer(ctx, a, b, a_zero=None, b_zero=None):
    a32, b32 = a.astype(np.int32), b.astype(np.int32)
    if a_zero is not None:
        a_zero = a_zero.astype(np.int32)
        a32 = a32 - (a_zero.reshape(-1, 1) if a_zero.ndim == 1 and a_zero.size > 1 else a_zero)
    if b_zero is not None:
        b32 = b32 - b_zero.astype(np.int32)
    return jnp.matmul(a32, b32, preferred_element_type=np.int32)


# -- convolution and pooling ---------------------------------------------------------------------------
def _conv_dims(n: int) -> tuple[str, str, str]:
    spatial = "DHW"[-n:] if n <= 3 else None
    if spatial is None:
        raise TargetError(f"convolutions over {n} spatial dims have no lowering (1 to 3 are supported)")
    return f"NC{spatial}", f"OI{spatial}", f"NC{spatial}"


@lowering("Conv")
def _conv(ctx, x, w, bias=None):
    kernel = list(ctx.attr("kernel_shape") or w.shape[2:])
    strides, dilations, pads = _pool_geometry(ctx, x.shape[2:], kernel)
    group = ctx.attr("group", 1)
    n = x.ndim - 2
    # Spatial dims the kernel leaves alone (size 1, stride 1, no padding) move into the batch: XLA:CPU runs
    # Magika's [5, 1] 2-D convolution five times slower than the same 1-D one; TPUs do not mind either way.
    keep = [i for i in range(n) if (kernel[i], strides[i], pads[i]) != (1, 1, (0, 0))]
    if group == 1 and not keep:
        # a 1x1 convolution is a matmul over the channels (what XLA does on TPU too; faster on XLA:CPU)
        y = jnp.einsum("nc...,oc->no...", x, jnp.reshape(w, w.shape[:2]))
    elif len(keep) < n:
        drop = [i for i in range(n) if i not in keep]
        perm = [0, *(2 + i for i in drop), 1, *(2 + i for i in keep)]
        xt = jnp.transpose(x, perm)
        folded = (-1, x.shape[1], *(x.shape[2 + i] for i in keep))
        ws = jnp.reshape(w, w.shape[:2] + tuple(w.shape[2 + i] for i in keep))
        y = _conv_nd(
            jnp.reshape(xt, folded), ws, *(_pick(v, keep) for v in (strides, dilations, pads)), group
        )
        y = jnp.reshape(y, xt.shape[: 1 + len(drop)] + y.shape[1:])
        y = jnp.transpose(y, np.argsort(perm))
    else:
        y = _conv_nd(x, w, strides, dilations, pads, group)
    if bias is not None:
        y = y + jnp.reshape(bias, (1, -1) + (1,) * n)
    return y


def _pick(values: list[Any], keep: list[int]) -> list[Any]:
    return [values[i] for i in keep]


def _conv_nd(
    x: Any, w: Any, strides: list[int], dilations: list[int], pads: list[tuple[int, int]], group: int
) -> Any:
    n = x.ndim - 2
    if n == 0:  # only channels left: a (grouped) matmul
        return _grouped_matmul(x, w, group)
    conv = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x,
        w,
        window_strides=strides,
        padding=pads,
        rhs_dilation=dilations,
        dimension_numbers=_conv_dims(n),
        feature_group_count=group,
    )
    if group > 1 and group == x.shape[1] == w.shape[0] and math.prod(w.shape[2:]) <= 49:
        # Depthwise: XLA:CPU's grouped convolution is ~50x slower than onnxruntime's, so on CPU the module
        # computes it as a sum of shifted, scaled slices; every other platform keeps the convolution.
        shifted = lambda x, w: _depthwise_by_shifts(x, w, strides, dilations, pads)  # noqa: E731
        return lax.platform_dependent(x, w, cpu=shifted, default=conv)
    return conv(x, w)


def _grouped_matmul(x: Any, w: Any, group: int) -> Any:
    b, c = x.shape
    xg = jnp.reshape(x, (b, group, c // group))
    wg = jnp.reshape(w, (group, w.shape[0] // group, c // group))
    return jnp.reshape(jnp.einsum("bgc,goc->bgo", xg, wg), (b, -1))


def _depthwise_by_shifts(
    x: Any, w: Any, strides: list[int], dilations: list[int], pads: list[tuple[int, int]]
) -> Any:
    n = x.ndim - 2
    xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads])
    kernel = w.shape[2:]
    out_size = [(xp.shape[2 + i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(n)]
    out = None
    for taps in itertools.product(*(range(k) for k in kernel)):
        start = [0, 0] + [t * d for t, d in zip(taps, dilations, strict=True)]
        limit = [xp.shape[0], xp.shape[1]] + [
            start[2 + i] + (out_size[i] - 1) * strides[i] + 1 for i in range(n)
        ]
        piece = lax.slice(xp, start, limit, [1, 1, *strides])
        term = piece * jnp.reshape(w[(slice(None), 0, *taps)], (1, -1) + (1,) * n)
        out = term if out is None else out + term
    return out


@lowering("ConvTranspose")
def _conv_transpose(ctx, x, w, bias=None):
    n = x.ndim - 2
    group = ctx.attr("group", 1)
    kernel = list(ctx.attr("kernel_shape") or w.shape[2:])
    strides = list(ctx.attr("strides") or [1] * n)
    dilations = list(ctx.attr("dilations") or [1] * n)
    out_pad = list(ctx.attr("output_padding") or [0] * n)
    pads = list(ctx.attr("pads") or [0] * (2 * n))
    output_shape = ctx.attr("output_shape")
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(n):
            full = strides[i] * (x.shape[2 + i] - 1) + out_pad[i] + (kernel[i] - 1) * dilations[i] + 1
            target = output_shape[-n + i] if output_shape else x.shape[2 + i] * strides[i]
            total = full - target
            if auto_pad == "SAME_UPPER":  # the spec: more padding at the end; otherwise at the start
                pads[i], pads[i + n] = total // 2, total - total // 2
            else:
                pads[i], pads[i + n] = total - total // 2, total // 2
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    # A transposed convolution is a convolution of the stride-dilated input with the flipped kernel whose
    # in/out channels are swapped within each group.
    c_in, c_out_g = w.shape[0], w.shape[1]
    kern = jnp.reshape(w, (group, c_in // group, c_out_g, *w.shape[2:]))
    kern = jnp.swapaxes(kern, 1, 2).reshape(group * c_out_g, c_in // group, *w.shape[2:])
    kern = lax.rev(kern, tuple(range(2, 2 + n)))
    padding = [
        (dilations[i] * (kernel[i] - 1) - pads[i], dilations[i] * (kernel[i] - 1) - pads[i + n] + out_pad[i])
        for i in range(n)
    ]
    y = lax.conv_general_dilated(
        x,
        kern,
        window_strides=[1] * n,
        padding=padding,
        lhs_dilation=strides,
        rhs_dilation=dilations,
        dimension_numbers=_conv_dims(n),
        feature_group_count=group,
    )
    if bias is not None:
        y = y + jnp.reshape(bias, (1, -1) + (1,) * n)
    return y


def _pool_windows(
    ctx: OpContext, x: Any
) -> tuple[list[int], list[int], list[int], list[tuple[int, int]], list[int]]:
    """kernel, strides, dilations, pads and the extra end padding that ceil_mode adds."""
    kernel = list(ctx.attr("kernel_shape"))
    strides, dilations, pads = _pool_geometry(ctx, x.shape[2:], kernel)
    extra = []
    for size, k, s, d, (lo, hi) in zip(x.shape[2:], kernel, strides, dilations, pads, strict=True):
        span = size + lo + hi - ((k - 1) * d + 1)
        out = (-(-span // s) if ctx.attr("ceil_mode", 0) else span // s) + 1
        if ctx.attr("ceil_mode", 0) and (out - 1) * s >= size + lo:
            out -= 1  # the last window may not start in the end padding
        extra.append(max((out - 1) * s + (k - 1) * d + 1 - (size + lo + hi), 0))
    return kernel, strides, dilations, pads, extra


@lowering("MaxPool")
def _max_pool(ctx, x):
    if ctx.wants(1):
        raise ctx.error("MaxPool's Indices output has no lowering")
    kernel, strides, dilations, pads, extra = _pool_windows(ctx, x)
    init = -jnp.inf if _is_float(x) else jnp.iinfo(x.dtype).min
    return lax.reduce_window(
        x,
        jnp.asarray(init, x.dtype),
        lax.max,
        (1, 1, *kernel),
        (1, 1, *strides),
        [(0, 0), (0, 0)] + [(lo, hi + e) for (lo, hi), e in zip(pads, extra, strict=True)],
        window_dilation=(1, 1, *dilations),
    )


@lowering("AveragePool")
def _average_pool(ctx, x):
    kernel, strides, dilations, pads, extra = _pool_windows(ctx, x)
    window = dict(window_dimensions=(1, 1, *kernel), window_strides=(1, 1, *strides))
    dil = (1, 1, *dilations)
    total = [(0, 0), (0, 0)] + [(lo, hi + e) for (lo, hi), e in zip(pads, extra, strict=True)]
    sums = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, padding=total, window_dilation=dil, **window)
    # The divisor: ones over the input, plus over the explicit pads when count_include_pad (never over the
    # extra ceil_mode padding); computed at trace time, shapes being static.
    fill = 1.0 if ctx.attr("count_include_pad", 0) else 0.0
    ones = np.pad(np.ones((1, 1, *x.shape[2:])), [(0, 0), (0, 0), *pads], constant_values=fill)
    ones = np.pad(ones, [(0, 0), (0, 0)] + [(0, e) for e in extra])
    with jax.ensure_compile_time_eval():
        counts = np.asarray(
            lax.reduce_window(ones, 0.0, lax.add, padding=[(0, 0)] * x.ndim, window_dilation=dil, **window)
        )
    return sums / np.maximum(counts, 1).astype(x.dtype)


@lowering("GlobalAveragePool")
def _global_average_pool(ctx, x):
    return jnp.mean(x, axis=tuple(range(2, x.ndim)), keepdims=True).astype(x.dtype)


@lowering("GlobalMaxPool")
def _global_max_pool(ctx, x):
    return jnp.max(x, axis=tuple(range(2, x.ndim)), keepdims=True)


@lowering("LpNormalization")
def _lp_normalization(ctx, x):
    axis, p = ctx.attr("axis", -1), ctx.attr("p", 2)
    norm = (
        jnp.sum(jnp.abs(x), axis, keepdims=True) if p == 1 else jnp.sqrt(jnp.sum(x * x, axis, keepdims=True))
    )
    return x / norm


# -- normalization -------------------------------------------------------------------------------------
@lowering("BatchNormalization")
def _batch_norm(ctx, x, scale, bias, mean, var):
    if ctx.attr("training_mode", 0):
        raise ctx.error("BatchNormalization in training mode has no lowering (compile an inference graph)")
    shape = (1, -1) + (1,) * (x.ndim - 2)
    factor = scale * lax.rsqrt(var + _const(ctx.attr("epsilon", 1e-5), var))
    return x * jnp.reshape(factor, shape) + jnp.reshape(bias - mean * factor, shape)


@lowering("InstanceNormalization")
def _instance_norm(ctx, x, scale, bias):
    axes = tuple(range(2, x.ndim))
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean) * lax.rsqrt(var + _const(ctx.attr("epsilon", 1e-5), x))
    return y * jnp.reshape(scale, shape) + jnp.reshape(bias, shape)


@lowering("GroupNormalization")
def _group_norm(ctx, x, scale, bias):
    groups = ctx.attr("num_groups")
    b, c = x.shape[:2]
    stash = x.astype(np.float32) if ctx.attr("stash_type", 1) == 1 else x
    grouped = jnp.reshape(stash, (b, groups, -1))
    mean = jnp.mean(grouped, -1, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), -1, keepdims=True)
    y = ((grouped - mean) * lax.rsqrt(var + ctx.attr("epsilon", 1e-5))).astype(x.dtype).reshape(x.shape)
    if ctx.opset < 21:  # scale and bias per group before opset 21
        scale, bias = jnp.repeat(scale, c // groups), jnp.repeat(bias, c // groups)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return y * jnp.reshape(scale, shape) + jnp.reshape(bias, shape)


@lowering("LayerNormalization")
def _layer_norm(ctx, x, scale, bias=None):
    axis = _axis(ctx.attr("axis", -1), x.ndim)
    axes = tuple(range(axis, x.ndim))
    stash = x.astype(np.float32) if ctx.attr("stash_type", 1) == 1 and x.dtype != np.float64 else x
    mean = jnp.mean(stash, axes, keepdims=True)
    var = jnp.mean(jnp.square(stash - mean), axes, keepdims=True)
    inv_std = lax.rsqrt(var + np.asarray(ctx.attr("epsilon", 1e-5), stash.dtype))
    y = ((stash - mean) * inv_std).astype(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv_std


@lowering("RMSNormalization")
def _rms_norm(ctx, x, scale):
    axis = _axis(ctx.attr("axis", -1), x.ndim)
    stash = np_dtype(ctx.attr("stash_type", 1))
    xs = x.astype(stash)
    ms = jnp.mean(jnp.square(xs), tuple(range(axis, x.ndim)), keepdims=True)
    y = xs * lax.rsqrt(ms + np.asarray(ctx.attr("epsilon", 1e-5), stash))
    return (y * scale.astype(stash)).astype(x.dtype)


# -- resize --------------------------------------------------------------------------------------------
def _resize_taps(
    mode: str,
    nearest_mode: str,
    cubic_a: float,
    exclude_outside: bool,
    coord_mode: str,
    in_size: int,
    out_size: int,
    scale: float,
    roi: tuple[float, float] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Source indices (out, taps) and weights (out, taps) of a 1-D resize, as ``onnx.reference`` computes
    them (``_interpolate_1d_along_axis``), plus the mask of extrapolated outputs (tf_crop_and_resize)."""
    y = np.arange(out_size, dtype=np.float64)
    out_width = scale * in_size
    extrapolated = None
    if coord_mode == "align_corners":
        x = np.zeros(out_size) if out_width == 1 else y * (in_size - 1) / (out_width - 1)
    elif coord_mode == "asymmetric":
        x = y / scale
    elif coord_mode == "tf_crop_and_resize":
        lo, hi = roi if roi is not None else (0.0, 1.0)
        if out_width == 1:
            x = np.full(out_size, (hi - lo) * (in_size - 1) / 2)
        else:
            x = y * (hi - lo) * (in_size - 1) / (out_width - 1)
        x = x + lo * (in_size - 1)
        extrapolated = (x < 0) | (x > in_size - 1)
    elif coord_mode == "pytorch_half_pixel":
        x = np.full(out_size, -0.5) if out_width == 1 else (y + 0.5) / scale - 0.5
    elif coord_mode == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif coord_mode == "half_pixel_symmetric":
        offset = in_size / 2 * (1 - out_size / out_width)
        x = offset + (y + 0.5) / scale - 0.5
    else:
        raise TargetError(f"Resize coordinate_transformation_mode '{coord_mode}' has no lowering")
    base = np.floor(x)
    ratio = np.where(x == base, 1.0, x - base)
    if mode == "nearest":
        if nearest_mode == "round_prefer_floor":
            right = ratio > 0.5
        elif nearest_mode == "round_prefer_ceil":
            right = ratio >= 0.5
        elif nearest_mode == "floor":
            right = np.zeros_like(ratio, bool)
        elif nearest_mode == "ceil":
            right = np.ones_like(ratio, bool)
        else:
            raise TargetError(f"Resize nearest_mode '{nearest_mode}' has no lowering")
        right = np.where(ratio == 1.0, True, right)  # integer coordinates take the pixel itself
        coeffs = np.stack([~right, right], axis=1).astype(np.float64)
    elif mode == "linear":
        coeffs = np.stack([1 - ratio, ratio], axis=1)
    elif mode == "cubic":
        a, r = cubic_a, ratio
        coeffs = np.stack(
            [
                ((a * (r + 1) - 5 * a) * (r + 1) + 8 * a) * (r + 1) - 4 * a,
                ((a + 2) * r - (a + 3)) * r * r + 1,
                ((a + 2) * (1 - r) - (a + 3)) * (1 - r) * (1 - r) + 1,
                ((a * (2 - r) - 5 * a) * (2 - r) + 8 * a) * (2 - r) - 4 * a,
            ],
            axis=1,
        )
    else:
        raise TargetError(f"Resize mode '{mode}' has no lowering")
    n = coeffs.shape[1]
    pad = int(math.ceil(n / 2))
    xp = x + pad
    p = np.floor(xp).astype(np.int64)
    frac = xp - p
    if n % 2 == 0:
        start = p + np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        start = p + np.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    idx = start[:, None] + np.arange(n)[None, :] - pad
    if exclude_outside:
        coeffs = np.where((idx < 0) | (idx >= in_size), 0.0, coeffs)
        total = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    return np.clip(idx, 0, in_size - 1), coeffs, extrapolated


def _resize(
    ctx: OpContext,
    x: Any,
    scales: list[float] | None,
    sizes: list[int] | None,
    roi: list[float] | None,
    coord_mode: str,
    nearest_mode: str,
) -> Any:
    rank = x.ndim
    axes = _axes(ctx.attr("axes") or range(rank), rank)
    mode = ctx.attr("mode", "nearest")
    if ctx.attr("antialias", 0) and mode != "nearest":
        raise ctx.error("Resize with antialias has no lowering")
    full_scales = [1.0] * rank
    out_shape = list(x.shape)
    if sizes:
        for a, s in zip(axes, sizes, strict=True):
            out_shape[a] = s
            full_scales[a] = s / x.shape[a]
        policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            pick = min if policy == "not_larger" else max
            scale = pick(full_scales[a] for a in axes)
            for a in axes:
                full_scales[a] = scale
                out_shape[a] = int(scale * x.shape[a] + 0.5)
    else:
        for a, s in zip(axes, scales, strict=True):
            full_scales[a] = float(s)
            out_shape[a] = int(math.floor(x.shape[a] * float(s)))
    full_roi = None
    if roi:
        full_roi = [0.0] * rank + [1.0] * rank
        for i, a in enumerate(axes):
            full_roi[a], full_roi[rank + a] = roi[i], roi[len(axes) + i]
    y = x
    for a in axes:
        axis_roi = None if full_roi is None else (full_roi[a], full_roi[rank + a])
        if (
            out_shape[a] == x.shape[a]
            and math.isclose(full_scales[a], 1.0)
            and coord_mode != "tf_crop_and_resize"
        ):
            continue
        idx, coeffs, extrapolated = _resize_taps(
            mode,
            nearest_mode,
            ctx.attr("cubic_coeff_a", -0.75),
            bool(ctx.attr("exclude_outside", 0)),
            coord_mode,
            x.shape[a],
            out_shape[a],
            full_scales[a],
            axis_roi,
        )
        one_hot = np.all(np.isclose(coeffs, 0) | np.isclose(coeffs, 1)) and np.all(
            np.isclose(coeffs.sum(1), 1)
        )
        if one_hot:
            y = jnp.take(y, idx[np.arange(len(idx)), coeffs.argmax(1)], axis=a)
        else:
            taps = jnp.take(y, idx.reshape(-1), axis=a)
            taps = jnp.reshape(taps, y.shape[:a] + idx.shape + y.shape[a + 1 :])
            weights = coeffs.reshape((1,) * a + coeffs.shape + (1,) * (y.ndim - a - 1)).astype(
                y.dtype if _is_float(y) else np.float32
            )
            y = jnp.sum(taps.astype(weights.dtype) * weights, axis=a + 1).astype(y.dtype)
        if extrapolated is not None and extrapolated.any():
            mask = extrapolated.reshape((1,) * a + (-1,) + (1,) * (y.ndim - a - 1))
            y = jnp.where(mask, _const(ctx.attr("extrapolation_value", 0.0), y), y)
    return y


@lowering("Resize")
def _resize_op(ctx, x, roi=None, scales=None, sizes=None):
    if ctx.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates
        scale_list = [float(v) for v in ctx.static(roi, 1, "scales").reshape(-1)]
        return _resize(ctx, x, scale_list, None, None, "asymmetric", "round_prefer_floor")
    sizes_list = ctx.ints(sizes, 3, "sizes") if sizes is not None and sizes.size else None
    scale_list = None
    if not sizes_list:
        scale_list = [float(v) for v in ctx.static(scales, 2, "scales").reshape(-1)]
    roi_list = (
        [float(v) for v in ctx.static(roi, 1, "roi").reshape(-1)] if roi is not None and roi.size else None
    )
    return _resize(
        ctx,
        x,
        scale_list,
        sizes_list,
        roi_list,
        ctx.attr("coordinate_transformation_mode", "half_pixel"),
        ctx.attr("nearest_mode", "round_prefer_floor"),
    )


@lowering("Upsample")
def _upsample(ctx, x, scales=None):
    values = (
        ctx.attr("scales")
        if scales is None
        else [float(v) for v in ctx.static(scales, 1, "scales").reshape(-1)]
    )
    return _resize(ctx, x, list(values), None, None, "asymmetric", "floor")


# -- transformer ops (opset 23) ------------------------------------------------------------------------
@lowering("RotaryEmbedding")
def _rotary_embedding(ctx, x, cos, sin, position_ids=None):
    rank4 = x.ndim == 4
    xs = jnp.transpose(x, (0, 2, 1, 3)) if rank4 else x  # -> [batch, seq, heads, head] (after reshape)
    b, s = xs.shape[:2]
    if not rank4:
        heads = ctx.attr("num_heads", 0)
        if not heads:
            raise ctx.error("RotaryEmbedding on a 3-D input needs the num_heads attribute")
        xs = jnp.reshape(xs, (b, s, heads, -1))
    head = xs.shape[-1]
    dim = ctx.attr("rotary_embedding_dim", 0) or head
    if position_ids is not None:
        cos, sin = jnp.take(cos, position_ids, axis=0), jnp.take(sin, position_ids, axis=0)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot, rest = xs[..., :dim], xs[..., dim:]
    if ctx.attr("interleaved", 0):
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., : dim // 2], rot[..., dim // 2 :]
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if ctx.attr("interleaved", 0):
        rot = jnp.reshape(jnp.stack([real, imag], axis=-1), rot.shape)
    else:
        rot = jnp.concatenate([real, imag], axis=-1)
    out = jnp.concatenate([rot, rest], axis=-1).astype(x.dtype)
    return jnp.transpose(out, (0, 2, 1, 3)) if rank4 else jnp.reshape(out, x.shape)


def _to_heads(t: Any, heads: int) -> Any:
    b, s, _ = t.shape
    return jnp.transpose(jnp.reshape(t, (b, s, heads, -1)), (0, 2, 1, 3))


@lowering("Attention")
def _attention(ctx, q, k, v, mask=None, past_k=None, past_v=None, nonpad=None):
    rank3 = q.ndim == 3
    if rank3:
        q = _to_heads(q, ctx.attr("q_num_heads"))
        k = _to_heads(k, ctx.attr("kv_num_heads"))
        v = _to_heads(v, ctx.attr("kv_num_heads"))
    if past_k is not None:
        k = jnp.concatenate([past_k.astype(k.dtype), k], axis=2)
        v = jnp.concatenate([past_v.astype(v.dtype), v], axis=2)
    present_k, present_v = k, v
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ctx.error(f"q_num_heads {hq} is not a multiple of kv_num_heads {hkv}")
    rep = hq // hkv
    scale = ctx.attr("scale")
    scale = 1 / math.sqrt(d) if scale is None else scale
    dtype = q.dtype

    # Additive bias [.., sq, skv]: the mask (bool: True attends; float: added), padded with "masked" up to
    # the total length, plus the causal frontier aligned bottom-right (query i sees keys j <= i + past).
    bias = None
    if mask is not None:
        if mask.shape[-1] < skv:
            fill = False if mask.dtype == np.bool_ else -np.inf
            mask = jnp.pad(
                mask, [(0, 0)] * (mask.ndim - 1) + [(0, skv - mask.shape[-1])], constant_values=fill
            )
        bias = jnp.where(mask, 0.0, -jnp.inf).astype(dtype) if mask.dtype == np.bool_ else mask.astype(dtype)
    offset: Any = 0 if past_k is None else past_k.shape[2]
    if nonpad is not None:
        offset = (nonpad.astype(np.int64) - sq).reshape(-1, 1, 1, 1)
        pad_bias = jnp.where(jnp.arange(skv) < nonpad.reshape(-1, 1, 1, 1), 0.0, -jnp.inf).astype(dtype)
        bias = pad_bias if bias is None else bias + pad_bias
    if ctx.attr("is_causal", 0):
        allowed = jnp.arange(skv)[None, :] <= jnp.arange(sq)[:, None] + offset
        causal = jnp.where(allowed, 0.0, -jnp.inf).astype(dtype)
        bias = causal if bias is None else bias + causal
    # Grouped-query attention without repeating K/V: query head h reads kv head h // rep.
    qg = jnp.reshape(q * _const(scale, q), (b, hkv, rep, sq, d))
    scores = jnp.einsum("bgrsd,bgtd->bgrst", qg, k.astype(dtype))
    softcap = ctx.attr("softcap", 0.0)
    if softcap and softcap > 0:
        scores = _const(softcap, scores) * jnp.tanh(scores / _const(softcap, scores))
    raw = scores
    if bias is not None:
        bias4 = jnp.reshape(bias, (1,) * (4 - bias.ndim) + bias.shape)
        if bias4.shape[1] == hq and rep > 1:
            bias5 = jnp.reshape(bias4, (bias4.shape[0], hkv, rep, *bias4.shape[2:]))
        else:
            bias5 = jnp.reshape(bias4, (bias4.shape[0], bias4.shape[1], 1, *bias4.shape[2:]))
        scores = scores + bias5
    precision = ctx.attr("softmax_precision")
    logits = scores.astype(np_dtype(precision)) if precision else scores
    top = jnp.max(logits, axis=-1, keepdims=True)
    top = jnp.where(jnp.isneginf(top), jnp.zeros((), logits.dtype), top)
    e = jnp.exp(logits - lax.stop_gradient(top))
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = (e / jnp.where(total == 0, jnp.ones((), total.dtype), total)).astype(dtype)
    out = jnp.einsum("bgrst,bgtd->bgrsd", probs, v.astype(dtype))
    out = jnp.reshape(out, (b, hq, sq, v.shape[-1]))
    if rank3:
        out = jnp.reshape(jnp.transpose(out, (0, 2, 1, 3)), (b, sq, -1))
    qk = None
    if ctx.wants(3):
        mode = ctx.attr("qk_matmul_output_mode", 0)
        qk = {0: raw, 1: raw, 2: scores, 3: probs}.get(mode)
        if qk is None:
            raise ctx.error(f"qk_matmul_output_mode {mode} has no lowering")
        qk = jnp.reshape(jnp.broadcast_to(qk, (b, hkv, rep, sq, skv)), (b, hq, sq, skv)).astype(dtype)
    return out, present_k, present_v, qk


# -- quantization --------------------------------------------------------------------------------------
def _per_axis(param: Any, x: Any, axis: int, block: int) -> Any:
    """Scale/zero point broadcastable to x: scalar, per-axis (1-D) or blocked (same rank, blocks on axis)."""
    if param.ndim == 0 or param.size == 1:
        return jnp.reshape(param, ())
    if not block:
        return jnp.reshape(param, [param.size if d == axis else 1 for d in range(x.ndim)])
    return lax.slice_in_dim(jnp.repeat(param, block, axis=axis), 0, x.shape[axis], axis=axis)


@lowering("DequantizeLinear")
def _dequantize_linear(ctx, x, scale, zero=None):
    axis = _axis(ctx.attr("axis", 1), max(x.ndim, 1))
    block = ctx.attr("block_size", 0)
    out = np_dtype(ctx.attr("output_dtype")) if ctx.attr("output_dtype") else scale.dtype
    dx = x.astype(np.float32)
    if zero is not None:
        dx = dx - _per_axis(zero, x, axis, block).astype(np.float32)
    return (dx * _per_axis(scale, x, axis, block).astype(np.float32)).astype(out)


_QRANGE = {
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint16): (0, 65535),
    np.dtype(np.int16): (-32768, 32767),
}


def _qrange(dtype: np.dtype) -> tuple[int, int]:
    if dtype in _QRANGE:
        return _QRANGE[dtype]
    name = np.dtype(dtype).name
    if name == "int4":
        return (-8, 7)
    if name == "uint4":
        return (0, 15)
    raise TargetError(f"quantization to {name} has no lowering")


@lowering("QuantizeLinear")
def _quantize_linear(ctx, x, scale, zero=None):
    axis = _axis(ctx.attr("axis", 1), max(x.ndim, 1))
    block = ctx.attr("block_size", 0)
    if ctx.attr("output_dtype"):
        out = np_dtype(ctx.attr("output_dtype"))
    else:
        out = np.dtype(zero.dtype) if zero is not None else np.dtype(np.uint8)
    lo, hi = _qrange(out)
    y = jnp.round(x.astype(np.float32) / _per_axis(scale, x, axis, block).astype(np.float32))
    if zero is not None:
        y = y + _per_axis(zero, x, axis, block).astype(np.float32)
    return jnp.clip(y, lo, hi).astype(out)


@lowering("DynamicQuantizeLinear")
def _dynamic_quantize_linear(ctx, x):
    lo = jnp.minimum(jnp.min(x), 0.0).astype(np.float32)
    hi = jnp.maximum(jnp.max(x), 0.0).astype(np.float32)
    scale = (hi - lo) / np.float32(255)
    zero = jnp.clip(jnp.round(-lo / scale), 0, 255)
    y = jnp.clip(jnp.round(x / scale) + zero, 0, 255).astype(np.uint8)
    return y, scale, zero.astype(np.uint8)


# -- control flow --------------------------------------------------------------------------------------
@lowering("If")
def _if(ctx, cond):
    then_g, else_g = ctx.node.subgraphs["then_branch"], ctx.node.subgraphs["else_branch"]
    interp = ctx.interpreter
    if is_static(cond) or not isinstance(cond, jax.core.Tracer):
        branch = then_g if bool(np.asarray(cond).reshape(())) else else_g
        return tuple(interp.run_subgraph(branch))

    def run(graph: Graph) -> Callable[[], tuple[Any, ...]]:
        return lambda: tuple(jnp.asarray(v) for v in interp.run_subgraph(graph))

    return lax.cond(jnp.reshape(cond, ()), run(then_g), run(else_g))


# -- the interpreter -----------------------------------------------------------------------------------
def _values_of_constant_nodes(graph: Graph) -> Iterable[tuple[str, np.ndarray]]:
    for _scope, node in graph.walk():
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.outputs and node.outputs[0]:
            value = constant_node_value(node)
            if value is not None and value.dtype.kind != "O":
                yield node.outputs[0], value


def weight_arguments(graph: Graph, inline_limit: int = INLINE_LIMIT) -> dict[str, np.ndarray]:
    """The tensors passed as module arguments (name -> array), in a stable order: initializers (of every
    scope) and Constant-node tensors with more than ``inline_limit`` elements that some node uses."""
    used: set[str] = set()
    scopes = [graph]
    for _g, node in graph.walk():
        used.update(v for v in node.inputs if v)
        used.update(node.implicit_inputs)
        scopes.extend(node.all_subgraphs())
    used.update(graph.outputs)
    weights: dict[str, np.ndarray] = {}
    for scope in scopes:
        for name in scope.initializers:
            array = scope.initializers[name]
            if name in used and array.size > inline_limit and array.dtype != object:
                weights[name] = array
    for name, value in _values_of_constant_nodes(graph):
        if name in used and value.size > inline_limit:
            weights[name] = value
    return dict(sorted(weights.items()))


def check_supported(graph: Graph) -> None:
    """A TargetError listing every op without a lowering, each with the first node that uses it."""
    missing: dict[tuple[str, str], list[str]] = {}
    for _g, node in graph.walk():
        key = (node.domain or "", node.op_type)
        if key not in LOWERINGS:
            missing.setdefault(key, []).append(node.label)
    if missing:
        parts = []
        for (domain, op), labels in sorted(missing.items()):
            where = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
            parts.append(f"{domain + '.' if domain else ''}{op} (node {where})")
        raise TargetError(
            "the tpu target has no lowering for " + "; ".join(parts),
            hint="add a lowering to llmc/targets/tpu/lowering.py, or a pass that rewrites these ops into supported ones",
        )


class Interpreter:
    """Runs a Graph on static (numpy) and traced (jax) values; ``run`` is what jax traces."""

    def __init__(self, graph: Graph, weights: Mapping[str, np.ndarray]) -> None:
        self.graph = graph
        self.weights = weights
        self.opsets = graph.root().opset_imports
        self._env: MutableMapping[str, Any] = {}

    def run(self, weight_args: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
        env: dict[str, Any] = {}
        self._env = ChainMap(env)
        env.update(weight_args)
        for name in self.graph.initializers:
            if name not in env and name not in inputs:
                env[name] = np.asarray(self.graph.initializers[name])
        env.update(inputs)
        self._run_graph(self.graph)
        return {name: jnp.asarray(self._env[name]) for name in self.graph.outputs}

    def run_subgraph(self, graph: Graph) -> list[Any]:
        outer = self._env
        scope: dict[str, Any] = {}
        self._env = outer.new_child(scope) if isinstance(outer, ChainMap) else ChainMap(scope, outer)
        try:
            for name in graph.initializers:
                if name not in self.weights:
                    scope[name] = np.asarray(graph.initializers[name])
            self._run_graph(graph)
            return [self._env[name] for name in graph.outputs]
        finally:
            self._env = outer

    def _run_graph(self, graph: Graph) -> None:
        for node in graph.nodes():
            if node.op_type == "Constant" and node.outputs and node.outputs[0] in self._env:
                continue  # a large constant, passed as a weight argument
            self._run_node(node)

    def _run_node(self, node: Node) -> None:
        fn = LOWERINGS.get((node.domain or "", node.op_type))
        if fn is None:
            domain = f"{node.domain}." if node.domain else ""
            raise TargetError(
                f"the tpu target has no lowering for {domain}{node.op_type} (node {node.label})"
            )
        inputs = []
        for name in node.inputs:
            if not name:
                inputs.append(None)
            elif name in self._env:
                inputs.append(self._env[name])
            else:
                raise TargetError(f"node {node.label}: input '{name}' is not defined")
        domain = node.domain or ""
        opset = self.opsets.get(domain, self.opsets.get("ai.onnx", 1) if not domain else 1)
        ctx = OpContext(node, opset, self.weights, self)
        foldable = node.op_type not in NO_FOLD and all(v is None or is_static(v) for v in inputs)
        try:
            if foldable:
                with jax.ensure_compile_time_eval():
                    outs = self._outputs(node, fn(ctx, *inputs))
                if any(is_static(o) and o.size > FOLD_LIMIT for o in outs):
                    foldable = False  # large: build it in the module instead of carrying a literal
            if not foldable:
                with jax.named_scope(_scope_name(node)):  # ONNX node names in the StableHLO locations
                    outs = self._outputs(node, fn(ctx, *inputs))
        except TargetError:
            raise
        except Exception as exc:  # a lowering that rejects its inputs: name the node, keep the cause
            raise TargetError(
                f"node {node.label}: lowering {node.op_type} failed ({type(exc).__name__}: {str(exc)[:300]})"
            ) from exc
        for name, value in zip(node.outputs, outs, strict=False):
            if name:
                self._env[name] = value

    @staticmethod
    def _outputs(node: Node, result: Any) -> list[Any]:
        values = list(result) if isinstance(result, tuple | list) else [result]
        wanted = [i for i, o in enumerate(node.outputs) if o and (i >= len(values) or values[i] is None)]
        if wanted:
            raise TargetError(f"node {node.label}: output {wanted[0]} of {node.op_type} has no lowering")
        out = []
        for v in values[: len(node.outputs)]:
            if v is not None and not isinstance(v, np.ndarray) and not isinstance(v, jax.core.Tracer):
                v = np.asarray(v)  # concrete: computed at trace time, stays static
            out.append(v)
        return out


def _scope_name(node: Node) -> str:
    return re.sub(r"[^A-Za-z0-9_.:/-]+", "_", node.name or f"{node.op_type}_{node.id}")


def lower_graph(graph: Graph, weights: Mapping[str, np.ndarray]) -> Callable[..., dict[str, Any]]:
    """``fn(weights: dict, inputs: dict) -> outputs: dict``, ready for ``jax.jit``/``jax.export``."""
    check_supported(graph)
    interpreter = Interpreter(graph, weights)

    def fn(weight_args: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
        return interpreter.run(weight_args, inputs)

    return fn


__all__ = [
    "FOLD_LIMIT",
    "INLINE_LIMIT",
    "LOWERINGS",
    "Interpreter",
    "OpContext",
    "check_supported",
    "lower_graph",
    "lowering",
    "supported_ops",
    "weight_arguments",
]
