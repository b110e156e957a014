"""``convert-precision``: float32 weights and activations into float16 or bfloat16, with a float32 keep-list.

**What stays float32.** Each node that touches a float32 value is either *converted* (every type variable of
its ONNX schema that binds a float32 value switches to the low-precision type) or *kept* (it runs as it was).
Kept are:

* the ops in ``keep_ops`` (default: Softmax/LogSoftmax, the sum-like reductions, CumSum, and ``Pow``/``Exp``/
  ``Log``, whose float16 results overflow or lose their tail: ``x**2`` overflows past 256, ``exp`` past 11);
  ``ReduceMax``/``ReduceMin`` are exact in any type and are not kept;
* nodes whose name matches a ``keep_nodes`` glob;
* **index math**: values computed from integers (``Cast`` int->float, float ``Range``) and small constants
  (<= 1024 elements) only, e.g. the rotary angles ``position * inv_freq`` and their cos/sin (float16 counts
  integers exactly only up to 2048, so long-context angles would be off by whole radians), or a mask built
  from ``attention_mask``. A large constant is a learned weight and ends index math: a one-hot input times
  an embedding matrix (Magika) is data. Index math meets the converted part through one ``Cast`` per value;
  where it contains a constant beyond float16's range (a ``finfo.min`` mask), a ``Clip`` to +-65504 goes
  before that Cast, so the mask is large and finite rather than ``-inf``;
* ops whose schema does not allow the low-precision type, unknown custom ops, nodes holding subgraphs (and
  the producers of values a subgraph reads), normalizations whose ``stash_type`` is not float32, and, with
  ``keep_residual_adds``, the residual ``Add`` in front of a norm (and the Skip*Normalization ops, whose
  residual sum is inside them).

**Normalizations run in low precision** (decided here, documented for the targets): ``LayerNormalization``
and ``RMSNormalization`` with ``stash_type=1`` compute mean, variance and the reciprocal root in float32 by
definition, and onnxruntime's ``Skip(Simplified)LayerNormalization`` / ``SimplifiedLayerNormalization``
kernels accumulate in float32 on CPU and CUDA; only their inputs and outputs are float16, which is what an
fp16 engine wants (no Casts around every norm). ``fp32_norms: true`` keeps them all in float32 instead.

**The interface.** ``keep_io`` (default) keeps float32 graph inputs and outputs float32 with one Cast at the
boundary; the KV cache (inputs/outputs matching ``kv_cache_names``) takes ``kv_cache_dtype`` (default: the
converted type, so that a decoder's cache is stored and fed in float16 without a Cast per step).

**Casts** go only where a value's type differs from what its consumer needs, one per (value, type) however
many consumers; afterwards ``Cast`` chains that round-trip (``a -> b -> a`` between float types) and Casts
to the type a value already has are removed. A model's own Casts keep their meaning (a float16 -> float32
upcast still yields float32; it reads whatever float type its input now has), except float32 -> float32
identities, which become no-ops and go. A narrowing round trip (float32 -> float16 -> float32) is only
removed when this pass made one of its Casts: a model's own round trip may be deliberate.

**Weights** are converted once, in place in the weight store (the float32 array is dropped as soon as its
replacement is stored: never two full copies), sentinels clipped to +-65504 (see below). A weight
that both converted and float32 consumers read is stored once in low precision and Cast back for the
float32 ones; a small constant (<= 1024 elements) in that situation is duplicated instead. Constants that
feed shape computations, fixed-float inputs (``Resize`` scales) or index math are not touched.

**Out of range.** A node with a float32 constant input holding data beyond float16's range (a finite
|x| > 65504, e.g. a BatchNormalization variance of 1e8 in PP-OCR's detector) stays float32. Sentinels,
+-inf or |x| >= 1e30 (the ``finfo.min`` of a mask), are clipped to +-65504 instead.

**auto** (optional, off by default) additionally keeps in float32 any node whose constant float inputs lose
too much in float16: more than 1% of their nonzero entries below 2**-24 (flushed to zero). It needs no data;
bfloat16 has float32's range, so ``auto`` changes nothing there.

Only the main graph is converted; If/Loop/Scan bodies keep their types. Type information comes from the
graph's value_info, else from the ONNX schemas (``onnx.defs``) and a table of the onnxruntime contrib ops
llmc emits; a contrib op not in the table stays float32.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto
from pydantic import ConfigDict, field_validator

from llmc.ir import Graph, Node, ValueInfo, constant_node_value, np_dtype_to_onnx
from llmc.pass_manager import Pass, PassContext, PassOptions, PassResult, register_pass
from llmc.rewrite import RULE_KEY

RULE = "convert-precision"
FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
BFLOAT16 = TensorProto.BFLOAT16
FLOAT_FAMILY = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
# The float types each float type holds exactly: a round trip a -> b -> a is lossless when b holds a.
_HOLDS = {
    TensorProto.FLOAT: {TensorProto.FLOAT16, TensorProto.BFLOAT16},
    TensorProto.DOUBLE: {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16},
}
FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # the smallest float16 subnormal: smaller magnitudes flush to zero
SENTINEL = 1e30  # magnitudes from here on (and inf) are "minus infinity" in a mask, not data: clipped
SMALL_CONSTANT = 1024  # elements: a constant this small is duplicated rather than Cast back at run time

DEFAULT_KEEP_OPS = [
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
    "CumSum",
    "Pow",
    "Exp",
    "Log",
    "Range",
]
NORM_OPS = {
    "LayerNormalization",
    "RMSNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "GroupNormalization",
}
SKIP_NORMS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}
DEFAULT_KV_NAMES = [
    "past_key_values.*",
    "present.*",
    "past_key*",
    "past_value*",
    "present_key*",
    "present_value*",
]
_SHAPE_ONLY = {"Shape", "Size"}  # read only the shape of their input: any element type will do
_INDEX_SEEDS = {"Range"}  # float outputs computed from scalars, not tensors of data
_DTYPE_ATTR_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike"}
_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16"}
_TYPE_STR = {
    f"tensor({name.lower()})": value
    for name, value in TensorProto.DataType.items()
    if value != TensorProto.UNDEFINED
}

# onnxruntime contrib ops (com.microsoft, and SimplifiedLayerNormalization, which onnxruntime registers in the
# ONNX domain): input and output formals. "T" is the float type variable; other entries are fixed types.
_T_FLOATS = {FLOAT, FLOAT16, BFLOAT16}
_CONTRIB: dict[str, tuple[list[str], list[str]]] = {
    "GroupQueryAttention": (
        ["T", "T", "T", "T", "T", "int32", "int32", "T", "T", "int64", "T", "T"],
        ["T", "T", "T", "T"],
    ),
    "MultiHeadAttention": (
        ["T", "T", "T", "T", "int32", "T", "T", "T", "int32", "int32"],
        ["T", "T", "T", "T"],
    ),
    "SkipLayerNormalization": (["T", "T", "T", "T", "T"], ["T", "float", "float", "T"]),
    "SkipSimplifiedLayerNormalization": (["T", "T", "T", "T"], ["T", "float", "float", "T"]),
    "SimplifiedLayerNormalization": (["T", "T"], ["T", "float"]),
    "RotaryEmbedding": (["T", "int64", "T", "T"], ["T"]),
    "Gelu": (["T"], ["T"]),
    "FastGelu": (["T", "T"], ["T"]),
    "BiasGelu": (["T", "T"], ["T"]),
    "QuickGelu": (["T"], ["T"]),
    "BiasAdd": (["T", "T", "T"], ["T"]),
    "MatMulNBits": (["T", "uint8", "T", "T", "int32", "T"], ["T"]),
    "GatherBlockQuantized": (["*", "*", "T", "*"], ["T"]),
}


class ConvertPrecisionOptions(PassOptions):
    model_config = ConfigDict(use_attribute_docstrings=True)  # the docstrings below describe the options

    dtype: Literal["float16", "bfloat16", "fp16", "bf16"] = "float16"
    """The low-precision type: float16 (fp16) or bfloat16 (bf16)."""
    keep_ops: list[str] = DEFAULT_KEEP_OPS
    """Op types that stay float32 (replaces the default list; see ``extra_keep_ops`` to add to it)."""
    extra_keep_ops: list[str] = []
    """Op types that stay float32 in addition to ``keep_ops``."""
    keep_nodes: list[str] = []
    """Globs on node names (``fnmatch``) of nodes that stay float32, e.g. ``node_linear_14`` (an lm_head)."""
    keep_io: bool = True
    """Keep float32 graph inputs/outputs float32 (Casts at the boundary); false converts them too."""
    kv_cache_dtype: Literal["same", "float32", "float16", "bfloat16"] = "same"
    """Element type of the KV-cache inputs/outputs ("same": the converted type)."""
    kv_cache_names: list[str] = DEFAULT_KV_NAMES
    """Globs naming the KV-cache graph inputs and outputs."""
    fp32_norms: bool = False
    """Keep every normalization in float32 (by default they run in low precision with float32 stash)."""
    keep_residual_adds: bool = False
    """Keep the residual Add in front of each norm (and Skip*Normalization ops) in float32."""
    auto: bool = False
    """Also keep nodes whose constant inputs would have more than 1% of their nonzero values flushed to zero."""

    @field_validator("dtype")
    @classmethod
    def _canonical(cls, value: str) -> str:
        return _ALIASES.get(value, value)


# -- type information --------------------------------------------------------------------------------------
@dataclass
class Formals:
    """Per input/output slot of a node: a type variable name, or a fixed ONNX type (int), or None (any)."""

    inputs: list[str | int | None]
    outputs: list[str | int | None]
    allowed: dict[str, set[int]] = field(default_factory=dict)


def _slot_formals(params, count: int, constraints: dict[str, set[int]]) -> list[str | int | None]:
    out: list[str | int | None] = []
    for slot in range(count):
        if not params:
            out.append(None)
            continue
        param = params[min(slot, len(params) - 1)]
        if slot >= len(params) and param.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
            out.append(None)
            continue
        type_str = param.type_str
        if type_str in constraints:
            out.append(type_str)
        else:
            out.append(_TYPE_STR.get(type_str))
    return out


def formals(node: Node, opset: int) -> Formals | None:
    """The type formals of ``node`` from its ONNX schema or the contrib table; None when unknown."""
    if node.domain in ("", "ai.onnx"):
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            schema = None
        if schema is not None:
            allowed = {
                c.type_param_str: {_TYPE_STR[t] for t in c.allowed_type_strs if t in _TYPE_STR}
                for c in schema.type_constraints
            }
            return Formals(
                _slot_formals(schema.inputs, len(node.inputs), allowed),
                _slot_formals(schema.outputs, len(node.outputs), allowed),
                allowed,
            )
    if node.domain in ("", "ai.onnx", "com.microsoft") and node.op_type in _CONTRIB:
        ins, outs = _CONTRIB[node.op_type]

        def fixed(items: list[str], count: int) -> list[str | int | None]:
            result: list[str | int | None] = []
            for i in range(count):
                item = items[i] if i < len(items) else "*"
                result.append(
                    "T" if item == "T" else None if item == "*" else _TYPE_STR.get(f"tensor({item})")
                )
            return result

        return Formals(fixed(ins, len(node.inputs)), fixed(outs, len(node.outputs)), {"T": set(_T_FLOATS)})
    return None


def infer_dtypes(graph: Graph, opset: int) -> dict[str, int]:
    """Element type of every value of the main graph: value_info first, else derived from the schemas."""
    dtypes: dict[str, int] = {}
    for name in graph.inputs:
        dtypes[name] = graph.dtype(name)
    for name in graph.initializers:
        dtypes[name] = np_dtype_to_onnx(graph.initializers[name].dtype)
    for node in graph.nodes():
        guessed = _node_output_dtypes(node, dtypes, opset)
        for slot, out in enumerate(node.outputs):
            if out:
                dtypes[out] = graph.dtype(out) or guessed[slot]
    return dtypes


def _node_output_dtypes(node: Node, dtypes: dict[str, int], opset: int) -> list[int]:
    n = len(node.outputs)
    op = node.op_type if node.domain in ("", "ai.onnx") else ""
    if op == "Cast":
        return [int(node.attr("to", 0))] * n
    if op == "CastLike":
        return [dtypes.get(node.input(1), 0)] * n
    if op == "Constant":
        value = constant_node_value(node)
        return [np_dtype_to_onnx(value.dtype) if value is not None else 0] * n
    if op == "ConstantOfShape":
        value = node.attr("value")
        return [np_dtype_to_onnx(value.dtype) if value is not None else FLOAT] * n
    if op in _DTYPE_ATTR_OPS and node.attr("dtype") is not None:
        return [int(node.attr("dtype"))] * n
    f = formals(node, opset)
    if f is None:
        return [0] * n
    bound: dict[str, int] = {}
    for slot, formal in enumerate(f.inputs):
        value = node.input(slot)
        if isinstance(formal, str) and value and dtypes.get(value):
            bound.setdefault(formal, dtypes[value])
    result = []
    for formal in f.outputs:
        if isinstance(formal, int):
            result.append(formal)
        elif isinstance(formal, str):
            single = f.allowed.get(formal, set())
            result.append(bound.get(formal) or (next(iter(single)) if len(single) == 1 else 0))
        else:
            result.append(0)
    return result


# -- the pass ----------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What the analysis decided: per node its category, switched type variables and keep reason."""

    category: dict[int, str] = field(default_factory=dict)  # converted | kept | shape | constant | untouched
    switched: dict[int, set[str]] = field(default_factory=dict)
    formals: dict[int, Formals | None] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    index_derived: set[str] = field(default_factory=set)
    large_in_cone: set[str] = field(default_factory=set)  # index values whose cone holds a |constant| > 65504


@register_pass("convert-precision")
class ConvertPrecision(Pass):
    """Rewrites float32 weights and activations into float16/bfloat16, keeping a float32 list and the interface."""

    Options = ConvertPrecisionOptions
    options: ConvertPrecisionOptions

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        return _Converter(graph, self.options).run()


class _Converter:
    def __init__(self, graph: Graph, options: ConvertPrecisionOptions) -> None:
        self.graph = graph
        self.options = options
        self.lp = FLOAT16 if options.dtype == "float16" else BFLOAT16
        self.np_lp = np.dtype(np.float16) if self.lp == FLOAT16 else np.dtype(ml_dtypes.bfloat16)
        self.opset = graph.opset_imports.get("", 1)
        self.keep_ops = set(options.keep_ops) | set(options.extra_keep_ops)
        self.stats: Counter = Counter()
        self.casts: dict[tuple[str, int], str] = {}
        self.kv_dtype = {
            "same": self.lp,
            "float32": FLOAT,
            "float16": FLOAT16,
            "bfloat16": BFLOAT16,
        }[options.kv_cache_dtype]

    # -- analysis ----------------------------------------------------------------------------------------
    def run(self) -> PassResult:
        graph = self.graph
        self.nodes = graph.nodes()
        self.dtypes = infer_dtypes(graph, self.opset)
        if not any(d == FLOAT for d in self.dtypes.values()):
            return PassResult(False, {"converted_nodes": 0})
        plan = self._plan()
        self.plan = plan
        new = self._new_dtypes(plan)
        self._rewrite(plan, new)
        changed = self._clean_casts()
        changed |= any(
            self.stats[k]
            for k in (
                "converted_nodes",
                "initializers_converted",
                "constant_nodes_converted",
                "constants_duplicated",
                "casts_inserted",
                "interface_converted",
            )
        )
        alive = {n.id for n in self.graph.nodes()}
        kept = [
            {"node": self.graph.node(nid).label, "reason": reason}
            for nid, reason in plan.reasons.items()
            if nid in alive
        ]
        stats = {k: v for k, v in sorted(self.stats.items()) if v}
        details = {"dtype": self.options.dtype, "kept": kept[:200], "kept_total": len(kept)}
        return PassResult(changed, stats, details)

    def _is_float32(self, value: str) -> bool:
        return bool(value) and self.dtypes.get(value) == FLOAT

    def _plan(self) -> _Plan:
        plan = _Plan()
        pinned = self.pinned = {v for n in self.nodes for v in n.implicit_inputs}  # subgraphs read float32
        for node in self.nodes:
            touches = any(self._is_float32(v) for v in (*node.inputs, *node.outputs))
            f = formals(node, self.opset)
            plan.formals[node.id] = f
            if not touches:
                plan.category[node.id] = "untouched"
                continue
            if node.domain in ("", "ai.onnx") and node.op_type in _SHAPE_ONLY:
                plan.category[node.id] = "shape"
                continue
            if node.domain in ("", "ai.onnx") and node.op_type in ("Constant", "ConstantOfShape"):
                plan.category[node.id] = "constant"  # typed by what their users need, like initializers
                continue
            self._mark_index(node, plan)
            if self._explicit_cast(node, plan):
                plan.category[node.id] = "shape"  # reads any float type, keeps its declared result type
                continue
            reason = self._keep_reason(node, f, plan, pinned)
            if reason:
                plan.category[node.id] = "kept"
                plan.reasons[node.id] = reason
                continue
            plan.category[node.id] = "converted"
            plan.switched[node.id] = self._switched(node, f)
        return plan

    def _explicit_cast(self, node: Node, plan: _Plan) -> bool:
        """A Cast that changes the type on purpose (float16 -> float32, float32 -> int64...): it keeps its
        meaning and reads whatever float type its input has. Only identities (float32 -> float32) convert."""
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            return False
        if any(o in plan.index_derived for o in node.outputs):
            return False  # int -> float32: index math, kept
        return not (self._is_float32(node.input(0)) and self._is_float32(node.outputs[0]))

    def _mark_index(self, node: Node, plan: _Plan) -> None:
        """Index math: float values computed only from integers and constants (see the module docstring)."""
        graph = self.graph
        floats_in = [v for v in node.inputs if self._is_float32(v)]
        ints_in = [v for v in node.inputs if v and self.dtypes.get(v) not in FLOAT_FAMILY | {0}]
        is_onnx = node.domain in ("", "ai.onnx")
        seed = is_onnx and (
            (node.op_type == "Cast" and bool(ints_in) and not floats_in) or node.op_type in _INDEX_SEEDS
        )
        constants = [graph.constant(v) for v in floats_in if v not in plan.index_derived]
        derived = (
            any(v in plan.index_derived for v in floats_in)
            and all(c is not None for c in constants)
            # a learned weight (a large constant: a one-hot input times an embedding matrix) makes data
            and all(c.size <= SMALL_CONSTANT for c in constants)
        )
        if not (seed or derived):
            return
        large = any(v in plan.large_in_cone for v in floats_in) or any(_beyond_fp16(c) for c in constants)
        for out in node.outputs:
            if self._is_float32(out):
                plan.index_derived.add(out)
                if large:
                    plan.large_in_cone.add(out)

    def _keep_reason(self, node: Node, f: Formals | None, plan: _Plan, pinned: set[str]) -> str | None:
        opts, op = self.options, node.op_type
        if op in self.keep_ops:
            return f"{op} is in keep_ops"
        if node.name and any(fnmatch.fnmatchcase(node.name, g) for g in opts.keep_nodes):
            return "the node name matches keep_nodes"
        if any(o in plan.index_derived for o in node.outputs):
            return "index math (computed from integers and constants)"
        if node.subgraphs:
            return "holds a subgraph (subgraphs are not converted)"
        if any(o in pinned for o in node.outputs):
            return "a subgraph reads its output"
        if f is None:
            return f"no type information for {node.domain + '.' if node.domain else ''}{op}"
        if op in NORM_OPS:
            if opts.fp32_norms:
                return "fp32_norms"
            if node.attr("stash_type", 1) != 1:
                return "normalization without a float32 stash_type"
            if opts.keep_residual_adds and op in SKIP_NORMS:
                return "keep_residual_adds (the residual sum is inside the norm)"
        if opts.keep_residual_adds and op == "Add" and node.domain in ("", "ai.onnx"):
            for user, slot in self.graph.uses(node.outputs[0]):
                if user.op_type in NORM_OPS and slot == 0:
                    return "keep_residual_adds (a residual Add feeding a norm)"
        for var in self._float_vars(node, f):
            if self.lp not in f.allowed.get(var, set()):
                return f"the schema of {op} does not allow {self.options.dtype} for {var}"
        if self.lp == FLOAT16:
            for v in node.inputs:
                array = self.graph.constant(v) if self._is_float32(v) else None
                if array is None:
                    continue
                problem = _out_of_range(array)
                if problem:
                    return f"constant '{v}' {problem}"
                problem = _underflow(array) if opts.auto and array.size > 1 else None
                if problem:
                    return f"auto: constant '{v}' {problem}"
        return None

    def _float_vars(self, node: Node, f: Formals) -> set[str]:
        found = set()
        pairs = (*zip(f.inputs, node.inputs, strict=True), *zip(f.outputs, node.outputs, strict=True))
        for formal, value in pairs:
            if isinstance(formal, str) and self._is_float32(value):
                found.add(formal)
        return found

    def _switched(self, node: Node, f: Formals) -> set[str]:
        return {v for v in self._float_vars(node, f) if self.lp in f.allowed.get(v, set())}

    # -- target types --------------------------------------------------------------------------------------
    def _kv(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.options.kv_cache_names)

    def _interface_dtype(self, name: str) -> int:
        if self._kv(name):
            return self.kv_dtype
        return FLOAT if self.options.keep_io else self.lp

    def required(self, node: Node, slot: int) -> int:
        """The element type ``node`` needs at input ``slot`` after conversion (0: whatever it gets)."""
        value = node.inputs[slot]
        category = self.plan.category.get(node.id, "untouched")
        if category in ("untouched", "shape", "constant") or not value:
            return 0
        original = self.dtypes.get(value, 0)
        if category == "kept" or original != FLOAT:
            return original
        f = self.plan.formals[node.id]
        formal = f.inputs[slot] if f is not None and slot < len(f.inputs) else None
        return self.lp if isinstance(formal, str) and formal in self.plan.switched[node.id] else original

    def _new_dtypes(self, plan: _Plan) -> dict[str, int]:
        """The element type each value will have: produced values by their node, constants by their users."""
        graph, new = self.graph, dict(self.dtypes)
        for name in graph.inputs:
            if name not in graph.initializers and name not in self.pinned and self.dtypes.get(name) == FLOAT:
                new[name] = self._interface_dtype(name)
        for node in self.nodes:
            if plan.category[node.id] != "converted":
                continue
            f = plan.formals[node.id]
            for formal, out in zip(f.outputs, node.outputs, strict=False):
                if out and self._is_float32(out) and formal in plan.switched[node.id]:
                    new[out] = self.lp
        return new

    # -- rewriting -----------------------------------------------------------------------------------------
    def _rewrite(self, plan: _Plan, new: dict[str, int]) -> None:
        graph = self.graph
        self.new = new
        before = graph.initializers.nbytes()
        # 1. constants (initializers, Constant and ConstantOfShape nodes): by what their users need
        users_need = self._constant_needs()
        for value, needs in users_need.items():
            self._convert_constant(value, needs)
        # 2. graph inputs and converted nodes' outputs change type
        for name in graph.inputs:
            if new.get(name) != self.dtypes.get(name):
                self._set_dtype(name, new[name])
                self.stats["interface_converted"] += 1
        for node in self.nodes:
            if plan.category[node.id] != "converted":
                continue
            self.stats["converted_nodes"] += 1
            for out in node.outputs:
                if out and new.get(out) != self.dtypes.get(out):
                    self._set_dtype(out, new[out])
            if (
                node.op_type == "Cast"
                and node.domain in ("", "ai.onnx")
                and new.get(node.outputs[0]) == self.lp
            ):
                node.set_attr("to", self.lp)
        self.stats["kept_nodes"] = sum(1 for c in plan.category.values() if c == "kept")
        # 3. graph outputs whose produced type differs from the interface type
        for name in list(graph.outputs):
            produced = new.get(name, 0)
            if produced not in (FLOAT, self.lp, FLOAT16, BFLOAT16) or name in graph.inputs:
                continue
            if self.dtypes.get(name) != FLOAT or graph.producer(name) is None:
                continue
            wanted = self._interface_dtype(name)
            if wanted != produced:
                self._cast_output(name, produced, wanted)
        # 4. every input slot gets the type its node needs
        for node in self.nodes:
            for slot, value in enumerate(node.inputs):
                need = self.required(node, slot)
                have = self.new.get(value, 0)
                if need and have and need != have and need in FLOAT_FAMILY and have in FLOAT_FAMILY:
                    self.graph.set_input(node, slot, self._cast(value, need, node.order))
        self.stats["weight_bytes_saved"] = before - graph.initializers.nbytes()

    def _constant_needs(self) -> dict[str, set[int]]:
        """Float32 constants (and fill ops) -> the element types their consumers need."""
        graph, needs = self.graph, {}
        producers = {
            n.outputs[0]: n for n in self.nodes if self.plan.category.get(n.id) == "constant" and n.outputs
        }
        for node in self.nodes:
            for slot, value in enumerate(node.inputs):
                if not value or self.dtypes.get(value) != FLOAT:
                    continue
                if not (graph.is_constant(value) or value in producers):
                    continue
                need = self.required(node, slot) or FLOAT
                needs.setdefault(value, set()).add(need)
        for value in graph.outputs:
            if value in needs:
                needs[value].add(self._interface_dtype(value))
        return needs

    def _convert_constant(self, value: str, needs: set[int]) -> None:
        if self.lp not in needs:
            return
        graph = self.graph
        node = graph.producer(value)
        if node is None and value in graph.outputs:
            return  # an initializer that is itself a graph output keeps the interface type
        array = graph.constant(value) if node is None or node.op_type == "Constant" else node.attr("value")
        if array is None:
            array = np.zeros((1,), np.float32)  # ConstantOfShape without a value: float32 zero
        others = needs - {self.lp}
        # a small constant used both ways gets one copy of each; so does one a subgraph reads (its implicit
        # read cannot be pointed at a Cast)
        if (others and array.size <= SMALL_CONSTANT) or value in self.pinned:
            name = graph.add_initializer(f"{value}/{_suffix(self.lp)}", self._to_lp(array, value))
            graph.set_value_info(name, self.lp, tuple(array.shape))
            self.new[name] = self.lp
            self.casts[(value, self.lp)] = name
            self.stats["constants_duplicated"] += 1
            return
        converted = self._to_lp(array, value)
        if node is None:
            graph.set_initializer(value, converted)
            extra = graph.value_info_extra.get(value)
            if extra is not None and extra.is_tensor:
                extra.dtype = self.lp  # an imported value_info entry describing the initializer
            self.stats["initializers_converted"] += 1
        else:
            for key in [k for k in node.attributes if k.startswith("value")]:
                del node.attributes[key]  # value_float(s) of a Constant: one typed tensor replaces them
            node.set_attr("value", converted)
            self._set_dtype(value, self.lp)
            self.stats["constant_nodes_converted"] += 1
        self.new[value] = self.lp

    def _to_lp(self, array: np.ndarray, name: str) -> np.ndarray:
        if self.lp == FLOAT16 and array.size and _beyond_fp16(array):
            array = np.clip(array, -FP16_MAX, FP16_MAX)
            self.stats["constants_clipped"] += 1
        return np.asarray(array).astype(self.np_lp)

    def _set_dtype(self, name: str, dtype: int) -> None:
        info = self.graph.values.get(name)
        if info is not None and info.is_tensor:
            info.dtype = dtype
        else:
            self.graph.values[name] = ValueInfo(name, dtype, None)
        extra = self.graph.value_info_extra.get(name)
        if extra is not None and extra.is_tensor:
            extra.dtype = dtype

    def _cast(self, value: str, dtype: int, order: float) -> str:
        """The value converted to ``dtype``: one Cast per (value, type), shared by every consumer."""
        key = (value, dtype)
        if key in self.casts:
            return self.casts[key]
        graph = self.graph
        producer = graph.producer(value)
        order = producer.order if producer is not None else order
        source = value
        if dtype == FLOAT16 and value in self.plan.large_in_cone:
            lo = graph.add_initializer(f"{value}/fp16_min", np.array(-FP16_MAX, np.float32))
            hi = graph.add_initializer(f"{value}/fp16_max", np.array(FP16_MAX, np.float32))
            clip = graph.add_node(
                "Clip",
                [value, lo, hi],
                [graph.unique_name(f"{value}/clipped")],
                name=graph.unique_node_name(f"{value}/clip_fp16"),
                order=order,
                metadata={RULE_KEY: RULE},
            )
            self._copy_info(value, clip.outputs[0], FLOAT)
            source = clip.outputs[0]
            self.stats["clips_inserted"] += 1
        node = graph.add_node(
            "Cast",
            [source],
            [graph.unique_name(f"{value}/{_suffix(dtype)}")],
            name=graph.unique_node_name(f"{value}/to_{_suffix(dtype)}"),
            attributes={"to": dtype},
            order=order,
            metadata={RULE_KEY: RULE},
        )
        out = node.outputs[0]
        self._copy_info(value, out, dtype)
        self.new[out] = dtype
        self.casts[key] = out
        self.stats["casts_inserted"] += 1
        return out

    def _copy_info(self, source: str, target: str, dtype: int) -> None:
        self.graph.set_value_info(target, dtype, self.graph.shape(source))

    def _cast_output(self, name: str, produced: int, wanted: int) -> None:
        """A graph output keeps its name and interface type: its producer's value is renamed, a Cast added."""
        graph = self.graph
        shape = graph.shape(name)
        inner = graph.unique_name(f"{name}/{_suffix(produced)}")
        graph.rename_value(name, inner, rename_outputs=False)
        self.dtypes[inner] = self.dtypes[name]
        self._set_dtype(inner, produced)
        self.new[inner] = produced
        producer = graph.producer(inner)
        graph.add_node(
            "Cast",
            [inner],
            [name],
            name=graph.unique_node_name(f"{name}/to_{_suffix(wanted)}"),
            attributes={"to": wanted},
            order=producer.order if producer is not None else None,
            metadata={RULE_KEY: RULE},
        )
        graph.values[name] = ValueInfo(name, wanted, shape)
        self.new[name] = wanted
        self.stats["casts_inserted"] += 1

    # -- Cast cleanup --------------------------------------------------------------------------------------
    def _clean_casts(self) -> bool:
        """Remove Casts to the type a value has and float round trips ``a -> b -> a`` (see the docstring)."""
        graph, removed = self.graph, 0
        progress = True
        while progress:
            progress = False
            for node in graph.nodes():
                if node not in graph or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
                    continue
                source, out = node.input(0), node.outputs[0]
                to = int(node.attr("to", 0))
                have = self._dtype_now(source)
                target = None
                if have == to:
                    target = source
                else:
                    inner = graph.producer(source)
                    if (
                        inner is not None
                        and inner.op_type == "Cast"
                        and inner.domain in ("", "ai.onnx")
                        and self._dtype_now(inner.input(0)) == to
                        and to in FLOAT_FAMILY
                        and have in FLOAT_FAMILY
                    ):
                        lossless = to in _HOLDS.get(have, set())
                        ours = RULE in (node.metadata.get(RULE_KEY), inner.metadata.get(RULE_KEY))
                        if lossless or ours:
                            target = inner.input(0)
                if target is None:
                    continue
                if out in graph.outputs and not _can_take_name(graph, target):
                    continue
                graph.replace_all_uses(out, target)
                if node in graph and not any(graph.is_used(o) for o in node.outputs if o):
                    graph.remove_node(node)
                removed += 1
                progress = True
        for node in graph.nodes():  # Casts left without users by the bypasses above
            if (
                node.op_type == "Cast"
                and RULE in node.metadata.get(RULE_KEY, "")
                and not any(graph.is_used(o) for o in node.outputs if o)
            ):
                graph.remove_node(node)
        self.stats["casts_removed"] += removed
        return removed > 0

    def _dtype_now(self, value: str) -> int:
        graph = self.graph
        if value in self.new:
            return self.new[value]
        if graph.is_initializer(value):
            return np_dtype_to_onnx(graph.initializers[value].dtype)
        return graph.dtype(value)


def _can_take_name(graph: Graph, value: str) -> bool:
    return graph.producer(value) is not None and value not in graph.outputs and value not in graph.inputs


def _suffix(dtype: int) -> str:
    return {FLOAT16: "fp16", BFLOAT16: "bf16", FLOAT: "fp32"}.get(dtype, f"t{dtype}")


def _beyond_fp16(array: np.ndarray | None) -> bool:
    """Whether a float array holds values float16 cannot represent finitely (without copying it)."""
    if array is None or array.dtype != np.float32 or array.size == 0:
        return False
    return bool(np.max(array) > FP16_MAX or np.min(array) < -FP16_MAX)


def _out_of_range(array: np.ndarray) -> str | None:
    """Why a float32 constant cannot be float16: finite values beyond +-65504 that are data, not sentinels.

    Sentinels (+-inf, or magnitudes of 1e30 and more, like the ``finfo.min`` of attention masks) are not data:
    they are clipped to +-65504 instead, which keeps a mask a mask."""
    if not _beyond_fp16(array):
        return None
    flat = array.reshape(-1)
    largest = 0.0
    for start in range(0, flat.size, 1 << 20):  # chunks: never a full-size temporary
        chunk = np.abs(flat[start : start + (1 << 20)])
        data = chunk[(chunk > FP16_MAX) & (chunk < SENTINEL)]
        if data.size:
            largest = max(largest, float(data.max()))
    return f"has values beyond float16's range (|x| up to {largest:.4g})" if largest else None


def _underflow(array: np.ndarray) -> str | None:
    """Why a float32 weight loses too much in float16 (many nonzero entries flushed to zero), or None."""
    if array.dtype != np.float32:
        return None
    flat = array.reshape(-1)
    tiny = nonzero = 0
    for start in range(0, flat.size, 1 << 20):
        chunk = np.abs(flat[start : start + (1 << 20)])
        nonzero += int(np.count_nonzero(chunk))
        tiny += int(np.count_nonzero((chunk > 0) & (chunk < FP16_TINY)))
    if nonzero and tiny / nonzero > 0.01:
        return f"would flush {tiny / nonzero:.1%} of its nonzero values to zero in float16"
    return None
