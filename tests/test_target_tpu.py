"""The tpu target's lowerings, op by op: each tiny graph runs in onnxruntime and through the JAX lowering
(jit on XLA:CPU) on seeded inputs, and the outputs must agree in dtype, shape and value.

Inputs named in ``consts`` become initializers: small ones are static values at trace time (shapes, axes,
pads), larger ones weight arguments (traced), so both paths of the interpreter are exercised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx.reference
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llmc.errors import TargetError
from llmc.ir import from_onnx

pytest.importorskip("jax")

from llmc.targets.tpu import lowering  # noqa: E402  (needs jax)

RNG = np.random.default_rng(0)


def f32(*shape: int, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    if lo is not None:
        return RNG.uniform(lo, hi, size=shape).astype(np.float32)
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*shape: int, lo: int = 0, hi: int = 8) -> np.ndarray:
    return RNG.integers(lo, hi, size=shape).astype(np.int64)


def arr(values: Any, dtype: Any = np.int64) -> np.ndarray:
    return np.asarray(values, dtype=dtype)


@dataclass
class Case:
    """One node: ``args`` name its inputs in order ("" for an absent optional input); each name is a feed
    (``feeds``) or an initializer (``consts``)."""

    id: str
    op: str
    args: list[str]
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    outputs: int = 1
    opset: int = 21
    atol: float = 1e-5
    rtol: float = 1e-4


def node_model(case: Case) -> onnx.ModelProto:
    outs = [f"y{i}" for i in range(case.outputs)]
    node = helper.make_node(case.op, case.args, outs, name=f"the_{case.op.lower()}", **case.attrs)
    inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for n, v in case.feeds.items()
    ]
    inits = [numpy_helper.from_array(v, n) for n, v in case.consts.items()]
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_empty_tensor_value_info(o) for o in outs], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)], ir_version=10)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def run_jax(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import jax

    graph = from_onnx(model)
    weights = lowering.weight_arguments(graph)
    fn = jax.jit(lowering.lower_graph(graph, weights))
    with jax.default_matmul_precision("highest"):
        out = fn(weights, feeds)
    return {k: np.asarray(v) for k, v in out.items()}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float, rtol: float) -> None:
    for name, ref in want.items():
        out = got[name]
        assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
        assert out.shape == ref.shape, f"{name}: shape {out.shape} != {ref.shape}"
        if ref.dtype.kind in "iub":
            np.testing.assert_array_equal(out, ref, err_msg=name)
        else:
            np.testing.assert_allclose(
                out.astype(np.float64), ref.astype(np.float64), atol=atol, rtol=rtol, err_msg=name
            )


def _unary_cases() -> list[Case]:
    plain = [
        "Abs", "Neg", "Exp", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Atan", "Sinh", "Cosh",
        "Asinh", "Tanh", "Erf", "Sigmoid", "Softplus", "Softsign", "Relu", "IsNaN", "Identity", "Reciprocal",
        "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Mish", "LeakyRelu", "ThresholdedRelu", "Shrink",
    ]  # fmt: skip
    cases = [Case(op, op, ["x"], {"x": f32(3, 5) * 3}) for op in plain]
    cases += [
        Case("Log", "Log", ["x"], {"x": f32(4, 5, lo=0.1, hi=5)}),
        Case("Sqrt", "Sqrt", ["x"], {"x": f32(4, 5, lo=0.0, hi=5)}),
        Case("Asin", "Asin", ["x"], {"x": f32(4, 5, lo=-0.9, hi=0.9)}),
        Case("Acos", "Acos", ["x"], {"x": f32(4, 5, lo=-0.9, hi=0.9)}),
        Case("Atanh", "Atanh", ["x"], {"x": f32(4, 5, lo=-0.9, hi=0.9)}),
        Case("Acosh", "Acosh", ["x"], {"x": f32(4, 5, lo=1.1, hi=5)}),
        Case("Abs-int", "Abs", ["x"], {"x": i64(6, lo=-5, hi=5).astype(np.int32)}),
        Case("Relu-int", "Relu", ["x"], {"x": i64(6, lo=-5, hi=5).astype(np.int32)}),
        Case("IsInf", "IsInf", ["x"], {"x": arr([1.0, np.inf, -np.inf, np.nan], np.float32)}),
        Case("IsInf-pos", "IsInf", ["x"], {"x": arr([1.0, np.inf, -np.inf], np.float32)}, attrs={"detect_negative": 0}),
        Case("LeakyRelu-alpha", "LeakyRelu", ["x"], {"x": f32(8)}, attrs={"alpha": 0.2}),
        Case("HardSigmoid-ppocr", "HardSigmoid", ["x"], {"x": f32(8) * 4}, attrs={"alpha": 1 / 6, "beta": 0.5}),
        Case("Swish", "Swish", ["x"], {"x": f32(3, 7) * 2}, attrs={"alpha": 1.5}, opset=24),
        Case("Gelu", "Gelu", ["x"], {"x": f32(3, 7) * 2}, opset=20),
        Case("Gelu-tanh", "Gelu", ["x"], {"x": f32(3, 7) * 2}, attrs={"approximate": "tanh"}, opset=20),
        Case("PRelu", "PRelu", ["x", "s"], {"x": f32(2, 3, 4)}, {"s": f32(3, 1)}),
        Case("Not", "Not", ["x"], {"x": RNG.random(6) < 0.5}),
        Case("BitwiseNot", "BitwiseNot", ["x"], {"x": i64(6, lo=-9, hi=9).astype(np.int32)}),
        Case("Clip", "Clip", ["x", "lo", "hi"], {"x": f32(10)}, {"lo": arr(-0.5, np.float32), "hi": arr(0.7, np.float32)}),
        Case("Clip-min-only", "Clip", ["x", "lo"], {"x": f32(10)}, {"lo": arr(0.0, np.float32)}),
        Case("Clip-6", "Clip", ["x"], {"x": f32(10)}, attrs={"min": -0.2, "max": 0.3}, opset=6),
        Case("Clip-int", "Clip", ["x", "lo", "hi"], {"x": i64(10, lo=-9, hi=9)}, {"lo": arr(-3), "hi": arr(4)}),
    ]  # fmt: skip
    return cases


def _binary_cases() -> list[Case]:
    cases = [
        Case(op, op, ["a", "b"], {"a": f32(2, 3, 4), "b": f32(3, 1)})
        for op in ["Add", "Sub", "Mul", "Div", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"]
    ]
    cases += [
        Case(f"{op}-n", op, ["a", "b", "c"], {"a": f32(2, 3), "b": f32(3), "c": f32(1, 1)})
        for op in ["Max", "Min", "Sum", "Mean"]
    ]
    cases += [
        Case(op, op, ["a", "b"], {"a": RNG.random((2, 5)) < 0.5, "b": RNG.random(5) < 0.5})
        for op in ["And", "Or", "Xor"]
    ]
    ints = {"a": i64(3, 4, lo=-20, hi=20), "b": i64(4, lo=1, hi=7) * np.array([1, -1, 1, -1])}
    cases += [
        Case("Add-int", "Add", ["a", "b"], dict(ints)),
        Case("Div-int", "Div", ["a", "b"], dict(ints)),
        Case("Mod-int", "Mod", ["a", "b"], dict(ints)),
        Case("Mod-fmod", "Mod", ["a", "b"], {"a": f32(3, 4) * 5, "b": f32(4, lo=0.5, hi=2)}, attrs={"fmod": 1}),
        Case("Pow", "Pow", ["a", "b"], {"a": f32(3, 4, lo=0.1, hi=3), "b": f32(4)}),
        Case("Pow-int-exp", "Pow", ["a", "b"], {"a": f32(3, 4)}, {"b": arr(2, np.int64)}),
        Case("BitShift", "BitShift", ["a", "b"], {"a": i64(5, hi=100).astype(np.uint32), "b": i64(5, hi=4).astype(np.uint32)}, attrs={"direction": "LEFT"}),
        *[
            Case(op, op, ["a", "b"], {"a": i64(5, hi=100).astype(np.int32), "b": i64(5, hi=100).astype(np.int32)})
            for op in ["BitwiseAnd", "BitwiseOr", "BitwiseXor"]
        ],
        Case("Where", "Where", ["c", "a", "b"], {"c": RNG.random((3, 1)) < 0.5, "a": f32(3, 4), "b": f32(4)}),
    ]  # fmt: skip
    return cases


def _cast_cases() -> list[Case]:
    x = f32(12) * 10
    return [
        Case("Cast-f-i32", "Cast", ["x"], {"x": x}, attrs={"to": TensorProto.INT32}),
        Case("Cast-i64-f", "Cast", ["x"], {"x": i64(5, lo=-99, hi=99)}, attrs={"to": TensorProto.FLOAT}),
        Case("Cast-f-bool", "Cast", ["x"], {"x": np.round(x / 10)}, attrs={"to": TensorProto.BOOL}),
        Case("Cast-f-f16", "Cast", ["x"], {"x": x}, attrs={"to": TensorProto.FLOAT16}),
        Case("Cast-f-f64", "Cast", ["x"], {"x": x}, attrs={"to": TensorProto.DOUBLE}),
        Case("CastLike", "CastLike", ["x", "t"], {"x": i64(4)}, {"t": arr([1.0], np.float16)}),
    ]


def _linalg_cases() -> list[Case]:
    return [
        Case("MatMul", "MatMul", ["a", "b"], {"a": f32(3, 8)}, {"b": f32(8, 16)}),
        Case("MatMul-batched", "MatMul", ["a", "b"], {"a": f32(2, 3, 5, 8), "b": f32(3, 8, 4)}),
        Case("MatMul-vec", "MatMul", ["a", "b"], {"a": f32(8), "b": f32(2, 8, 4)}),
        Case("Gemm", "Gemm", ["a", "b", "c"], {"a": f32(3, 8)}, {"b": f32(16, 8), "c": f32(16)}, attrs={"transB": 1, "alpha": 0.5, "beta": 2.0}),
        Case("Gemm-transA", "Gemm", ["a", "b"], {"a": f32(8, 3), "b": f32(8, 5)}, attrs={"transA": 1}),
        Case("Einsum", "Einsum", ["a", "b"], {"a": f32(2, 3, 4), "b": f32(2, 4, 5)}, attrs={"equation": "bij,bjk->bik"}),
        Case("MatMulInteger", "MatMulInteger", ["a", "b", "az", "bz"], {"a": i64(3, 8, hi=255).astype(np.uint8)}, {"b": i64(8, 4, lo=-128, hi=127).astype(np.int8), "az": arr(12, np.uint8), "bz": arr([1, -2, 0, 3], np.int8)}),
    ]  # fmt: skip


def _conv_cases() -> list[Case]:
    x = f32(1, 4, 9, 11)
    return [
        Case("Conv", "Conv", ["x", "w", "b"], {"x": x}, {"w": f32(6, 4, 3, 3), "b": f32(6)}, attrs={"pads": [1, 1, 1, 1]}),
        Case("Conv-stride-dil", "Conv", ["x", "w"], {"x": x}, {"w": f32(5, 4, 3, 2)}, attrs={"strides": [2, 1], "dilations": [1, 2], "pads": [0, 1, 2, 0]}),
        Case("Conv-depthwise", "Conv", ["x", "w", "b"], {"x": x}, {"w": f32(4, 1, 5, 5), "b": f32(4)}, attrs={"group": 4, "pads": [2, 2, 2, 2], "strides": [2, 2]}),
        Case("Conv-groups", "Conv", ["x", "w"], {"x": x}, {"w": f32(6, 2, 3, 3)}, attrs={"group": 2}),
        Case("Conv-same-upper", "Conv", ["x", "w"], {"x": x}, {"w": f32(3, 4, 4, 4)}, attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        Case("Conv-1d", "Conv", ["x", "w"], {"x": f32(2, 3, 20)}, {"w": f32(4, 3, 5)}, attrs={"pads": [2, 2]}),
        Case("Conv-1x1", "Conv", ["x", "w", "b"], {"x": x}, {"w": f32(6, 4, 1, 1), "b": f32(6)}),
        Case("Conv-1x1-groups", "Conv", ["x", "w"], {"x": f32(2, 4, 1, 1)}, {"w": f32(6, 2, 1, 1)}, attrs={"group": 2}),
        Case("Conv-kx1-magika", "Conv", ["x", "w"], {"x": f32(2, 6, 12, 1)}, {"w": f32(5, 6, 5, 1)}),
        Case("Conv-depthwise-dilated", "Conv", ["x", "w"], {"x": x}, {"w": f32(4, 1, 3, 3)}, attrs={"group": 4, "dilations": [2, 1], "pads": [2, 0, 1, 1], "strides": [1, 2]}),
        Case("Conv-depthwise-multiplier", "Conv", ["x", "w"], {"x": x}, {"w": f32(8, 1, 3, 3)}, attrs={"group": 4}),
        Case("Conv-3d", "Conv", ["x", "w"], {"x": f32(1, 2, 4, 5, 6)}, {"w": f32(3, 2, 2, 3, 2)}, attrs={"pads": [1, 0, 1, 0, 1, 1]}),
        Case("ConvTranspose-ppocr", "ConvTranspose", ["x", "w"], {"x": x}, {"w": f32(4, 3, 2, 2)}, attrs={"strides": [2, 2], "kernel_shape": [2, 2]}),
        Case("ConvTranspose-pads", "ConvTranspose", ["x", "w", "b"], {"x": x}, {"w": f32(4, 2, 3, 3), "b": f32(2)}, attrs={"strides": [2, 3], "pads": [1, 0, 1, 1], "output_padding": [1, 0]}),
        Case("ConvTranspose-groups-dil", "ConvTranspose", ["x", "w"], {"x": x}, {"w": f32(4, 3, 3, 3)}, attrs={"group": 2, "dilations": [2, 1]}),
        Case("ConvTranspose-output-shape", "ConvTranspose", ["x", "w"], {"x": x}, {"w": f32(4, 2, 3, 3)}, attrs={"strides": [2, 2], "output_shape": [18, 22]}),
        Case("ConvTranspose-same-lower", "ConvTranspose", ["x", "w"], {"x": x}, {"w": f32(4, 2, 3, 3)}, attrs={"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ]  # fmt: skip


def _norm_cases() -> list[Case]:
    x = f32(2, 4, 5, 6)
    c4 = {"s": f32(4), "b": f32(4)}
    return [
        Case("BatchNormalization", "BatchNormalization", ["x", "s", "b", "m", "v"], {"x": x}, {**c4, "m": f32(4), "v": f32(4, lo=0.5, hi=2)}, attrs={"epsilon": 1e-3}),
        Case("InstanceNormalization", "InstanceNormalization", ["x", "s", "b"], {"x": x}, c4),
        Case("GroupNormalization", "GroupNormalization", ["x", "s", "b"], {"x": x}, c4, attrs={"num_groups": 2}),
        Case("LayerNormalization", "LayerNormalization", ["x", "s", "b"], {"x": f32(2, 3, 8)}, {"s": f32(8), "b": f32(8)}, outputs=3, atol=1e-4),
        Case("LayerNormalization-axis", "LayerNormalization", ["x", "s"], {"x": f32(2, 3, 8)}, {"s": f32(3, 8)}, attrs={"axis": 1}),
        Case("RMSNormalization", "RMSNormalization", ["x", "s"], {"x": f32(2, 3, 8)}, {"s": f32(8)}, attrs={"epsilon": 1e-6}, opset=23),
        Case("RMSNormalization-axis", "RMSNormalization", ["x", "s"], {"x": f32(2, 3, 8)}, {"s": f32(3, 8)}, attrs={"axis": -2}, opset=23),
        Case("LpNormalization", "LpNormalization", ["x"], {"x": f32(3, 6)}, attrs={"axis": 1, "p": 2}),
        Case("Softmax", "Softmax", ["x"], {"x": f32(2, 3, 5)}, attrs={"axis": 1}),
        Case("Softmax-11", "Softmax", ["x"], {"x": f32(2, 3, 5)}, attrs={"axis": 1}, opset=11),
        Case("LogSoftmax", "LogSoftmax", ["x"], {"x": f32(2, 3, 5)}),
        Case("Hardmax", "Hardmax", ["x"], {"x": f32(2, 3, 5)}),
    ]  # fmt: skip


def _shape_cases() -> list[Case]:
    x = f32(2, 3, 4)
    return [
        Case("Reshape", "Reshape", ["x", "s"], {"x": x}, {"s": arr([0, -1, 2])}),
        Case("Transpose", "Transpose", ["x"], {"x": x}, attrs={"perm": [2, 0, 1]}),
        Case("Squeeze", "Squeeze", ["x", "a"], {"x": f32(1, 3, 1, 2)}, {"a": arr([0, -2])}),
        Case("Squeeze-all", "Squeeze", ["x"], {"x": f32(1, 3, 1, 2)}),
        Case("Squeeze-11", "Squeeze", ["x"], {"x": f32(1, 3, 1, 2)}, attrs={"axes": [2]}, opset=11),
        Case("Unsqueeze", "Unsqueeze", ["x", "a"], {"x": x}, {"a": arr([0, -1])}),
        Case("Unsqueeze-11", "Unsqueeze", ["x"], {"x": x}, attrs={"axes": [1, 4]}, opset=11),
        Case("Flatten", "Flatten", ["x"], {"x": x}, attrs={"axis": 2}),
        Case("Concat", "Concat", ["a", "b", "c"], {"a": x, "b": f32(2, 1, 4), "c": f32(2, 0, 4)}, attrs={"axis": -2}),
        Case("Split", "Split", ["x", "s"], {"x": f32(7, 3)}, {"s": arr([2, 5])}, outputs=2),
        Case("Split-equal", "Split", ["x"], {"x": f32(6, 3)}, outputs=3, opset=13),
        Case("Split-num-outputs", "Split", ["x"], {"x": f32(2, 7)}, attrs={"axis": 1, "num_outputs": 3}, outputs=3, opset=18),
        Case("Slice", "Slice", ["x", "s", "e", "a", "st"], {"x": f32(6, 7, 5)}, {"s": arr([1, -1]), "e": arr([100, -8]), "a": arr([0, 1]), "st": arr([2, -2])}),
        Case("Slice-neg-step-all", "Slice", ["x", "s", "e", "a", "st"], {"x": f32(5, 4)}, {"s": arr([-1]), "e": arr([-(2**63)]), "a": arr([0]), "st": arr([-1])}),
        Case("Slice-empty", "Slice", ["x", "s", "e"], {"x": f32(5, 4)}, {"s": arr([3]), "e": arr([1])}),
        Case("Slice-9", "Slice", ["x"], {"x": f32(5, 4)}, attrs={"starts": [1, 0], "ends": [4, 3], "axes": [0, 1]}, opset=9),
        Case("Gather", "Gather", ["x", "i"], {"x": f32(5, 6)}, {"i": arr([[0, -1], [3, 2]])}, attrs={"axis": 1}),
        Case("Gather-scalar", "Gather", ["x", "i"], {"x": f32(5, 6)}, {"i": arr(-2)}),
        Case("Gather-runtime-idx", "Gather", ["x", "i"], {"x": f32(50, 8), "i": i64(2, 3, lo=-50, hi=50)}),
        Case("GatherElements", "GatherElements", ["x", "i"], {"x": f32(4, 5), "i": i64(2, 5, lo=-4, hi=4)}, attrs={"axis": 0}),
        Case("GatherND", "GatherND", ["x", "i"], {"x": f32(2, 3, 4), "i": i64(2, 2, 1, hi=3)}, attrs={"batch_dims": 1}),
        Case("ScatterND", "ScatterND", ["x", "i", "u"], {"x": f32(5, 3), "i": arr([[1], [3]]), "u": f32(2, 3)}),
        Case("ScatterElements-add", "ScatterElements", ["x", "i", "u"], {"x": f32(4, 3), "i": arr([[1, 0, 3], [1, 2, 0]]), "u": f32(2, 3)}, attrs={"axis": 0, "reduction": "add"}),
        Case("Expand", "Expand", ["x", "s"], {"x": f32(3, 1)}, {"s": arr([2, 1, 4])}),
        Case("Tile", "Tile", ["x", "r"], {"x": f32(2, 3)}, {"r": arr([2, 3])}),
        Case("Pad", "Pad", ["x", "p", "v"], {"x": f32(3, 4)}, {"p": arr([1, 0, 2, -1]), "v": arr(1.5, np.float32)}),
        Case("Pad-reflect", "Pad", ["x", "p"], {"x": f32(1, 2, 5, 6)}, {"p": arr([0, 0, 2, 1, 0, 0, 1, 2])}, attrs={"mode": "reflect"}),
        Case("Pad-edge", "Pad", ["x", "p"], {"x": f32(4, 5)}, {"p": arr([2, 1, 1, 3])}, attrs={"mode": "edge"}),
        Case("Pad-axes", "Pad", ["x", "p", "", "a"], {"x": f32(3, 4, 5)}, {"p": arr([1, 2]), "a": arr([-1])}),
        Case("Shape", "Shape", ["x"], {"x": x}),
        Case("Shape-slice", "Shape", ["x"], {"x": x}, attrs={"start": 1, "end": -1}),
        Case("Size", "Size", ["x"], {"x": x}),
        Case("ConstantOfShape", "ConstantOfShape", ["s"], {}, {"s": arr([2, 3])}, attrs={"value": numpy_helper.from_array(arr([7], np.int32))}),
        Case("ConstantOfShape-large", "ConstantOfShape", ["s"], {}, {"s": arr([128, 64])}),
        Case("Range", "Range", ["a", "b", "c"], {}, {"a": arr(2), "b": arr(17), "c": arr(3)}),
        Case("Range-float", "Range", ["a", "b", "c"], {}, {"a": arr(1.0, np.float32), "b": arr(-2.0, np.float32), "c": arr(-0.5, np.float32)}),
        Case("Trilu", "Trilu", ["x"], {"x": f32(2, 4, 5)}),
        Case("Trilu-lower-k", "Trilu", ["x", "k"], {"x": f32(4, 5)}, {"k": arr(-1)}, attrs={"upper": 0}),
        Case("CumSum", "CumSum", ["x", "a"], {"x": f32(3, 5)}, {"a": arr(1)}),
        Case("CumSum-excl-rev", "CumSum", ["x", "a"], {"x": i64(3, 5)}, {"a": arr(1)}, attrs={"exclusive": 1, "reverse": 1}),
        Case("OneHot", "OneHot", ["i", "d", "v"], {"i": i64(2, 3, lo=-4, hi=4)}, {"d": arr(4), "v": arr([0.0, 2.5], np.float32)}, attrs={"axis": 1}),
        Case("DepthToSpace", "DepthToSpace", ["x"], {"x": f32(1, 8, 2, 3)}, attrs={"blocksize": 2}),
        Case("DepthToSpace-CRD", "DepthToSpace", ["x"], {"x": f32(1, 8, 2, 3)}, attrs={"blocksize": 2, "mode": "CRD"}),
        Case("SpaceToDepth", "SpaceToDepth", ["x"], {"x": f32(1, 2, 4, 6)}, attrs={"blocksize": 2}),
        Case("TopK", "TopK", ["x", "k"], {"x": f32(3, 7)}, {"k": arr([3])}, outputs=2),
        Case("TopK-smallest", "TopK", ["x", "k"], {"x": f32(4, 3)}, {"k": arr([2])}, attrs={"axis": 0, "largest": 0}, outputs=2),
        Case("ArgMax", "ArgMax", ["x"], {"x": f32(3, 7)}, attrs={"axis": 1, "keepdims": 0}),
        Case("ArgMax-last", "ArgMax", ["x"], {"x": np.round(f32(3, 7))}, attrs={"axis": 1, "select_last_index": 1}),
        Case("ArgMin", "ArgMin", ["x"], {"x": f32(3, 7)}),
        Case("Dropout", "Dropout", ["x"], {"x": f32(3, 4)}),
        Case("EyeLike", "EyeLike", ["x"], {"x": f32(3, 4)}, attrs={"k": 1}),
        Case("NonZero-static", "NonZero", ["x"], {}, {"x": arr([[1, 0, 2], [0, 3, 0]])}),
    ]  # fmt: skip


def _reduce_cases() -> list[Case]:
    x = f32(2, 3, 4, lo=0.1, hi=2)
    cases = []
    for op in ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"]:  # fmt: skip
        cases.append(
            Case(
                f"{op}-attr",
                op,
                ["x"],
                {"x": x},
                attrs={"axes": [0, -1]},
                opset=13 if op != "ReduceSum" else 11,
            )
        )
        cases.append(
            Case(f"{op}-input", op, ["x", "a"], {"x": x}, {"a": arr([1])}, attrs={"keepdims": 0}, opset=18)
        )
    cases += [
        Case("ReduceSum-all", "ReduceSum", ["x"], {"x": x}, opset=13),
        Case("ReduceSum-noop", "ReduceSum", ["x", "a"], {"x": x}, {"a": arr([], np.int64)}, attrs={"noop_with_empty_axes": 1}, opset=13),
        Case("ReduceSum-int32", "ReduceSum", ["x", "a"], {"x": i64(3, 4).astype(np.int32)}, {"a": arr([1])}, opset=13),
        Case("ReduceMax-int", "ReduceMax", ["x"], {"x": i64(3, 4, lo=-9)}, attrs={"axes": [1]}, opset=13),
    ]  # fmt: skip
    return cases


def _pool_cases() -> list[Case]:
    x = f32(1, 3, 9, 10)
    return [
        Case("MaxPool", "MaxPool", ["x"], {"x": x}, attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        Case("MaxPool-ceil", "MaxPool", ["x"], {"x": x}, attrs={"kernel_shape": [3, 2], "strides": [2, 3], "ceil_mode": 1}),
        Case("MaxPool-dilated", "MaxPool", ["x"], {"x": x}, attrs={"kernel_shape": [2, 2], "dilations": [2, 2]}),
        Case("MaxPool-same", "MaxPool", ["x"], {"x": x}, attrs={"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
        Case("AveragePool", "AveragePool", ["x"], {"x": x}, attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        Case("AveragePool-include-pad", "AveragePool", ["x"], {"x": x}, attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
        Case("AveragePool-ceil", "AveragePool", ["x"], {"x": x}, attrs={"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1, "pads": [0, 1, 0, 1], "count_include_pad": 1}),
        Case("GlobalAveragePool", "GlobalAveragePool", ["x"], {"x": x}),
        Case("GlobalMaxPool", "GlobalMaxPool", ["x"], {"x": x}),
    ]  # fmt: skip


def _resize_cases() -> list[Case]:
    x = f32(1, 2, 5, 6)
    none = arr([], np.float32)
    up2 = arr([1, 1, 2, 2], np.float32)
    sizes = arr([1, 2, 8, 4])
    return [
        Case("Resize-nearest-ppocr", "Resize", ["x", "r", "s"], {"x": x}, {"r": none, "s": up2}, attrs={"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, opset=12),
        Case("Resize-nearest-sizes", "Resize", ["x", "", "", "z"], {"x": x}, {"z": sizes}, attrs={"mode": "nearest"}),
        Case("Resize-nearest-ceil", "Resize", ["x", "", "s"], {"x": x}, {"s": arr([1, 1, 1.7, 0.6], np.float32)}, attrs={"mode": "nearest", "nearest_mode": "ceil", "coordinate_transformation_mode": "half_pixel"}),
        Case("Resize-linear-up", "Resize", ["x", "", "s"], {"x": x}, {"s": up2}, attrs={"mode": "linear"}),
        Case("Resize-linear-sizes", "Resize", ["x", "", "", "z"], {"x": x}, {"z": sizes}, attrs={"mode": "linear"}),
        Case("Resize-linear-align", "Resize", ["x", "", "", "z"], {"x": x}, {"z": sizes}, attrs={"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
        Case("Resize-linear-pytorch", "Resize", ["x", "", "s"], {"x": x}, {"s": arr([1, 1, 0.5, 1.5], np.float32)}, attrs={"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}),
        Case("Resize-linear-asym", "Resize", ["x", "", "s"], {"x": x}, {"s": up2}, attrs={"mode": "linear", "coordinate_transformation_mode": "asymmetric"}),
        Case("Resize-cubic", "Resize", ["x", "", "s"], {"x": x}, {"s": up2}, attrs={"mode": "cubic"}),
        Case("Resize-cubic-exclude", "Resize", ["x", "", "", "z"], {"x": x}, {"z": sizes}, attrs={"mode": "cubic", "exclude_outside": 1, "cubic_coeff_a": -0.5}),
        Case("Resize-axes", "Resize", ["x", "", "s"], {"x": x}, {"s": arr([2.0, 3.0], np.float32)}, attrs={"mode": "linear", "axes": [2, 3]}, opset=19),
        Case("Resize-10", "Resize", ["x", "s"], {"x": x}, {"s": up2}, attrs={"mode": "nearest"}, opset=10),
        Case("Upsample", "Upsample", ["x", "s"], {"x": x}, {"s": up2}, attrs={"mode": "nearest"}, opset=9),
    ]  # fmt: skip


def _quant_cases() -> list[Case]:
    w8 = i64(4, 6, lo=-128, hi=127).astype(np.int8)
    return [
        Case("DequantizeLinear-tensor", "DequantizeLinear", ["x", "s", "z"], {"x": w8}, {"s": arr(0.05, np.float32), "z": arr(3, np.int8)}),
        Case("DequantizeLinear-axis", "DequantizeLinear", ["x", "s", "z"], {"x": w8}, {"s": f32(6, lo=0.01, hi=0.1), "z": i64(6, lo=0, hi=255).astype(np.uint8).astype(np.int8)}, attrs={"axis": 1}),
        Case("DequantizeLinear-uint8", "DequantizeLinear", ["x", "s", "z"], {"x": i64(4, 6, hi=255).astype(np.uint8)}, {"s": f32(4, lo=0.01, hi=0.1), "z": i64(4, hi=255).astype(np.uint8)}, attrs={"axis": 0}),
        Case("QuantizeLinear", "QuantizeLinear", ["x", "s", "z"], {"x": f32(4, 6) * 3}, {"s": arr(0.02, np.float32), "z": arr(128, np.uint8)}),
        Case("QuantizeLinear-int8-axis", "QuantizeLinear", ["x", "s", "z"], {"x": f32(4, 6) * 3}, {"s": f32(4, lo=0.01, hi=0.1), "z": arr([0, 1, -2, 3], np.int8)}, attrs={"axis": 0}),
        Case("DynamicQuantizeLinear", "DynamicQuantizeLinear", ["x"], {"x": f32(5, 7) * 2}, outputs=3),
    ]  # fmt: skip


CASES = (
    _unary_cases()
    + _binary_cases()
    + _cast_cases()
    + _linalg_cases()
    + _conv_cases()
    + _norm_cases()
    + _shape_cases()
    + _reduce_cases()
    + _pool_cases()
    + _resize_cases()
    + _quant_cases()
)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_onnxruntime(case: Case) -> None:
    model = node_model(case)
    want = run_ort(model, case.feeds)
    got = run_jax(model, case.feeds)
    assert_close(got, want, case.atol, case.rtol)


def test_case_table_covers_the_lowerings() -> None:
    covered = {c.op for c in CASES}
    tested_elsewhere = {"Constant", "If", "Attention", "RotaryEmbedding", "Scatter"}
    missing = {op for _d, op in lowering.LOWERINGS} - covered - tested_elsewhere
    assert not missing, f"lowerings without a numeric test: {sorted(missing)}"


# -- blocked and 4-bit DequantizeLinear -------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "onnx_type", "lo", "hi"),
    [
        (np.int8, TensorProto.INT8, -128, 128),
        (np.uint8, TensorProto.UINT8, 0, 256),
        (ml_dtypes.int4, TensorProto.INT4, -8, 8),
        (ml_dtypes.uint4, TensorProto.UINT4, 0, 16),
    ],
)
@pytest.mark.parametrize("zero_point", [False, True])
def test_blocked_dequantize_linear(dtype, onnx_type, lo, hi, zero_point) -> None:
    """A MatMulNBits-style weight: [K=10, N=6] quantized in blocks of 4 along K (the last block short)."""
    k, n, block = 10, 6, 4
    q = RNG.integers(lo, hi, size=(k, n)).astype(dtype)
    scale = RNG.uniform(0.01, 0.1, size=(-(-k // block), n)).astype(np.float32)
    zp = RNG.integers(lo, hi, size=scale.shape).astype(dtype)
    inits = [
        helper.make_tensor("q", onnx_type, q.shape, q.astype(np.int64).reshape(-1).tolist()),
        numpy_helper.from_array(scale, "s"),
    ]
    args = ["q", "s"]
    if zero_point:
        inits.append(helper.make_tensor("z", onnx_type, zp.shape, zp.astype(np.int64).reshape(-1).tolist()))
        args.append("z")
    nodes = [
        helper.make_node("DequantizeLinear", args, ["w"], axis=0, block_size=block),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = f32(3, k)
    want = onnx.reference.ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = run_jax(model, {"x": x})["y"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if dtype in (np.int8, np.uint8):  # onnxruntime runs blocked int8 as well
        np.testing.assert_allclose(got, run_ort(model, {"x": x})["y"], atol=1e-5, rtol=1e-5)


# -- attention and rotary embeddings (opset 23) -----------------------------------------------------
def attention_model(
    q_shape, kv_shape, *, past=None, mask=None, outputs=3, **attrs
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    feeds = {"q": f32(*q_shape), "k": f32(*kv_shape), "v": f32(*kv_shape)}
    args = ["q", "k", "v", "", "", ""]
    if mask is not None:
        feeds["m"] = mask
        args[3] = "m"
    if past is not None:
        feeds["pk"], feeds["pv"] = f32(*past), f32(*past)
        args[4], args[5] = "pk", "pv"
    while args and not args[-1]:
        args.pop()
    outs = ["y", "present_k", "present_v", "qk"][:outputs]
    node = helper.make_node("Attention", args, outs, name="attn", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for n, v in feeds.items()
        ],
        [helper.make_empty_tensor_value_info(o) for o in outs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), feeds


ATTENTION = {
    "causal-4d": dict(q_shape=(2, 4, 5, 8), kv_shape=(2, 4, 5, 8), is_causal=1),
    "gqa-3d": dict(q_shape=(2, 5, 32), kv_shape=(2, 5, 16), q_num_heads=4, kv_num_heads=2),
    "gqa-causal-past": dict(
        q_shape=(1, 3, 32), kv_shape=(1, 3, 16), past=(1, 2, 6, 8), q_num_heads=4, kv_num_heads=2, is_causal=1
    ),
    "decode-step": dict(q_shape=(2, 1, 24), kv_shape=(2, 1, 8), past=(2, 1, 9, 8), q_num_heads=3, kv_num_heads=1, is_causal=1),
    "bool-mask-short": dict(q_shape=(1, 2, 4, 8), kv_shape=(1, 2, 6, 8), mask=RNG.random((4, 5)) < 0.7),
    "float-mask-scale": dict(q_shape=(1, 2, 4, 8), kv_shape=(1, 2, 6, 8), mask=f32(1, 2, 4, 6), scale=0.3),
    "causal-with-mask": dict(q_shape=(1, 2, 4, 8), kv_shape=(1, 2, 4, 8), past=(1, 2, 2, 8), mask=RNG.random((1, 1, 4, 6)) < 0.8, is_causal=1),
    "softcap": dict(q_shape=(1, 2, 3, 8), kv_shape=(1, 2, 3, 8), softcap=2.0),
    "qk-output": dict(q_shape=(1, 4, 3, 8), kv_shape=(1, 2, 3, 8), outputs=4, qk_matmul_output_mode=2, is_causal=1),
    "fully-masked-row": dict(q_shape=(1, 1, 3, 4), kv_shape=(1, 1, 3, 4), mask=np.array([[True, True, True], [False, False, False], [True, False, True]])),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention(name: str) -> None:
    model, feeds = attention_model(**ATTENTION[name])
    want = dict(
        zip(
            ["y", "present_k", "present_v", "qk"],
            onnx.reference.ReferenceEvaluator(model).run(None, feeds),
            strict=False,
        )
    )
    got = run_jax(model, feeds)
    assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "name", ["causal-4d", "gqa-3d", "gqa-causal-past", "decode-step", "float-mask-scale"]
)
def test_attention_matches_onnxruntime(name: str) -> None:
    model, feeds = attention_model(**ATTENTION[name])
    assert_close(run_jax(model, feeds), run_ort(model, feeds), atol=1e-5, rtol=1e-4)


ROTARY = {
    "3d-position-ids": dict(x=(2, 5, 32), cache=(16, 4), pos=True, num_heads=4),
    "4d-no-ids": dict(x=(2, 4, 5, 8), cache=(2, 5, 4), pos=False),
    "interleaved": dict(x=(1, 3, 16), cache=(8, 4), pos=True, num_heads=2, interleaved=1),
    "partial": dict(x=(1, 2, 3, 16), cache=(10, 4), pos=True, rotary_embedding_dim=8),
}


@pytest.mark.parametrize("name", list(ROTARY))
@pytest.mark.parametrize("reference", ["onnx", "onnxruntime"])
def test_rotary_embedding(name: str, reference: str) -> None:
    spec = dict(ROTARY[name])
    x_shape, cache, pos = spec.pop("x"), spec.pop("cache"), spec.pop("pos")
    feeds = {"x": f32(*x_shape), "c": f32(*cache), "s": f32(*cache)}
    args = ["x", "c", "s"]
    if pos:
        b, s = x_shape[0], x_shape[2] if len(x_shape) == 4 else x_shape[1]
        feeds["p"] = RNG.integers(0, cache[0], size=(b, s)).astype(np.int64)
        args.append("p")
    node = helper.make_node("RotaryEmbedding", args, ["y"], **spec)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for n, v in feeds.items()
        ],
        [helper.make_empty_tensor_value_info("y")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    if reference == "onnx":
        want = {"y": onnx.reference.ReferenceEvaluator(model).run(None, feeds)[0]}
    else:
        want = run_ort(model, feeds)
    assert_close(run_jax(model, feeds), want, atol=1e-5, rtol=1e-4)


# -- graphs rather than single nodes ----------------------------------------------------------------
def test_shape_subgraph_folds_under_jit() -> None:
    """Shape -> Gather -> Concat -> Reshape, and a Range/Less causal mask built from the sequence length."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Gather", ["shape", "one"], ["seq"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "ax0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Range", ["zero", "seq", "one"], ["pos"]),
        helper.make_node("Unsqueeze", ["pos", "ax1"], ["col"]),
        helper.make_node("LessOrEqual", ["pos", "col"], ["mask"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["maskf", "x2d"], ["mixed"]),
    ]
    consts = {"zero": arr(0), "one": arr(1), "ax0": arr([0]), "ax1": arr([1]), "minus1": arr([-1])}
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4]),
            helper.make_tensor_value_info("x2d", TensorProto.FLOAT, ["s", 3]),
        ],
        [helper.make_empty_tensor_value_info("flat"), helper.make_empty_tensor_value_info("mixed")],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    feeds = {"x": f32(2, 5, 4), "x2d": f32(5, 3)}
    assert_close(run_jax(model, feeds), run_ort(model, feeds), atol=1e-5, rtol=1e-5)


def test_if_with_static_and_traced_conditions() -> None:
    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["x", "x"], [f"{name}_out"])],
            name,
            [],
            [helper.make_empty_tensor_value_info(f"{name}_out")],
        )

    for cond_source in ("static", "traced"):
        nodes = []
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])]
        inits = []
        if cond_source == "static":
            inits.append(numpy_helper.from_array(np.array(False), "c"))
        else:
            inputs.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
        nodes.append(
            helper.make_node(
                "If", ["c"], ["y"], then_branch=branch("then", "Add"), else_branch=branch("else", "Mul")
            )
        )
        graph = helper.make_graph(nodes, "g", inputs, [helper.make_empty_tensor_value_info("y")], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        feeds = {"x": f32(3)}
        if cond_source == "traced":
            for value in (True, False):
                feeds["c"] = np.array(value)
                assert_close(run_jax(model, feeds), run_ort(model, feeds), 1e-6, 1e-6)
        else:
            assert_close(run_jax(model, feeds), run_ort(model, feeds), 1e-6, 1e-6)


def test_unsupported_op_names_op_and_node() -> None:
    case = Case("x", "Det", ["x"], {"x": f32(3, 3)})
    model = node_model(case)
    with pytest.raises(TargetError) as info:
        run_jax(model, case.feeds)
    assert "Det" in str(info.value) and "the_det" in str(info.value)


def test_traced_shape_input_is_a_clear_error() -> None:
    """A Reshape whose target shape comes from the model's input data cannot be static."""
    case = Case("x", "Reshape", ["x", "s"], {"x": f32(2, 3), "s": arr([3, 2])})
    with pytest.raises(TargetError, match=r"the_reshape.*'s'.*known at compile time"):
        run_jax(node_model(case), case.feeds)


def test_weights_are_arguments_not_constants() -> None:
    case = Case("x", "MatMul", ["a", "b"], {"a": f32(3, 8)}, {"b": f32(8, 16)})
    graph = from_onnx(node_model(case))
    assert list(lowering.weight_arguments(graph)) == ["b"]
    assert lowering.weight_arguments(graph, inline_limit=1000) == {}


def test_depthwise_by_shifts_equals_the_convolution() -> None:
    """On CPU a depthwise Conv runs as shifted slices; other platforms keep lax's convolution: same numbers."""
    from jax import lax

    x, w = f32(2, 6, 11, 9), f32(6, 1, 3, 5)
    for strides, dilations, pads in [([1, 1], [1, 1], [(1, 1), (2, 2)]), ([2, 3], [2, 1], [(0, 3), (1, 0)])]:
        conv = lax.conv_general_dilated(
            x,
            w,
            strides,
            pads,
            rhs_dilation=dilations,
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
            feature_group_count=6,
        )
        shifted = lowering._depthwise_by_shifts(x, w, strides, dilations, pads)
        np.testing.assert_allclose(np.asarray(shifted), np.asarray(conv), atol=1e-5, rtol=1e-5)


def test_large_static_values_are_computed_in_the_module() -> None:
    """A Range or ConstantOfShape above FOLD_LIMIT elements becomes iota/broadcast code, not a literal."""
    import jax

    nodes = [
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),
        helper.make_node("ConstantOfShape", ["shape"], ["c"]),
        helper.make_node("Add", ["x", "r"], ["y"]),
    ]
    consts = {"zero": arr(0.0, np.float32), "n": arr(20000.0, np.float32), "one": arr(1.0, np.float32)}
    consts["shape"] = arr([300, 300])
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [20000])],
        [helper.make_empty_tensor_value_info("y"), helper.make_empty_tensor_value_info("c")],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    ir = from_onnx(model)
    fn = lowering.lower_graph(ir, {})
    text = jax.jit(fn).lower({}, {"x": jax.ShapeDtypeStruct((20000,), np.float32)}).as_text()
    assert "iota" in text and len(text) < 20_000
    feeds = {"x": f32(20000)}
    assert_close(run_jax(model, feeds), run_ort(model, feeds), atol=1e-5, rtol=1e-6)
