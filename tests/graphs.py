"""Test helpers: a small builder of ONNX graphs on top of ``onnx.helper``, onnxruntime runs on seeded inputs,
IR-text golden files and the real models that ship inside installed packages.

The builder exists so that a test states a graph in a few lines, messy parts included (nodes without names or
with repeated names, empty optional inputs, unused outputs, subgraphs reading outer values), and gets back
the exact ``ModelProto`` it described: nothing is sorted, renamed or completed behind its back.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from llmc.ir import Graph, from_onnx, to_onnx, to_text

EXPECTED_DIR = Path(__file__).parent / "expected"
# an exported decoder's cleanup and fusion prefix (specs/smollm2-int4-cpu.yaml's, without logits-last-token)
DECODER_CLEANUP = [{"upgrade-opset": {"version": 24}}, "fold-weight-transposes", "fold-constants"]
DECODER_FUSION = ["fuse-rms-norm", "fuse-silu-gate", "fuse-rotary", "fuse-attention", "merge-qkv"]


def pipeline_yaml(steps: list) -> str:
    """Pipeline steps as the lines of a spec's ``pipeline:`` list (JSON is YAML)."""
    return "\n".join(f"  - {json.dumps(step)}" for step in steps)


DEFAULT_OPSET = 21
# Sizes chosen for symbolic dims when a test does not say (small: every run stays in milliseconds).
DEFAULT_DIM = 3


class GraphBuilder:
    """Collects inputs, outputs, initializers, value_info and nodes, then makes a GraphProto or a model.

    ``node`` returns the output name (or the tuple of names for several outputs); outputs default to fresh
    names ``t0, t1, ...``. A subgraph is another builder (``sub``) turned into a GraphProto with ``graph``.
    """

    def __init__(self, name: str = "g", *, opset: int = DEFAULT_OPSET, prefix: str = "t") -> None:
        self.name = name
        self.opset = opset
        self.prefix = prefix
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.value_infos: list[onnx.ValueInfoProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def fresh(self) -> str:
        self._count += 1
        return f"{self.prefix}{self._count - 1}"

    def input(self, name: str, dtype: int = TensorProto.FLOAT, shape: Sequence[Any] | None = None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, dtype: int = TensorProto.FLOAT, shape: Sequence[Any] | None = None) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def value_info(
        self, name: str, dtype: int = TensorProto.FLOAT, shape: Sequence[Any] | None = None
    ) -> str:
        self.value_infos.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def initializer(self, name: str, array: Any) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: Sequence[str] | int | None = None,
        *,
        name: str = "",
        domain: str = "",
        **attributes: Any,
    ) -> Any:
        if outputs is None:
            outputs = 1
        if isinstance(outputs, int):
            outputs = [self.fresh() for _ in range(outputs)]
        proto = helper.make_node(
            op_type, list(inputs), list(outputs), name=name or None, domain=domain or None
        )
        for key, value in attributes.items():  # insertion order, unlike make_node's sorted kwargs
            proto.attribute.append(helper.make_attribute(key, value))
        self.nodes.append(proto)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def constant(self, array: Any, output: str | None = None, *, name: str = "") -> str:
        value = numpy_helper.from_array(np.asarray(array))
        return self.node("Constant", [], [output or self.fresh()], name=name, value=value)

    def sub(self, name: str, *, prefix: str | None = None) -> GraphBuilder:
        return GraphBuilder(name, opset=self.opset, prefix=prefix or f"{name}_")

    def graph(self) -> onnx.GraphProto:
        gp = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        gp.value_info.extend(self.value_infos)
        return gp

    def model(self, *, ir_version: int = 10, extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", self.opset)]
        opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
        return helper.make_model(
            self.graph(), opset_imports=opsets, ir_version=ir_version, producer_name="tests"
        )

    def ir(self) -> Graph:
        return from_onnx(self.model())


# -- running -------------------------------------------------------------------------------------------
def _numpy_dtype(elem_type: int) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(elem_type)


def seeded_feeds(
    model: onnx.ModelProto,
    *,
    seed: int = 0,
    dims: dict[str, int] | None = None,
    shapes: dict[str, Sequence[int]] | None = None,
    int_range: tuple[int, int] = (0, 8),
) -> dict[str, np.ndarray]:
    """Random inputs fitted to the model's input signature (symbolic dims from ``dims`` or DEFAULT_DIM).

    Floats are standard normal, integers uniform in ``int_range``, booleans fair coins. Initializers that
    are also inputs keep their stored value.
    """
    rng = np.random.default_rng(seed)
    initialized = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in initialized:
            continue
        tt = vi.type.tensor_type
        if shapes and vi.name in shapes:
            shape = tuple(shapes[vi.name])
        else:
            shape = tuple(
                d.dim_value
                if d.HasField("dim_value") and d.dim_value > 0
                else (dims or {}).get(d.dim_param, DEFAULT_DIM)
                for d in tt.shape.dim
            )
        dtype = _numpy_dtype(tt.elem_type)
        if dtype == np.bool_:
            value = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            value = rng.integers(int_range[0], int_range[1], size=shape)
        else:
            value = rng.standard_normal(shape)
        feeds[vi.name] = np.asarray(value).astype(dtype)
    return feeds


def _unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose repeated node names get suffixes: onnxruntime refuses repeated names, ONNX allows them."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    seen: set[str] = set()

    def visit(gp: onnx.GraphProto) -> None:
        for node in gp.node:
            if node.name:
                name, k = node.name, 0
                while name in seen:
                    k += 1
                    name = f"{node.name}__{k}"
                seen.add(name)
                node.name = name
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    visit(sub)

    visit(copy.graph)
    return copy


def run_model(model: onnx.ModelProto | Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name, from onnxruntime on CPU with its own graph optimizations off (we test ours)."""
    model = _unique_node_names(to_onnx(model) if isinstance(model, Graph) else model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def assert_same_outputs(
    before: onnx.ModelProto | Graph,
    after: onnx.ModelProto | Graph,
    feeds: dict[str, np.ndarray],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> dict[str, np.ndarray]:
    """Both models give the same outputs (same names, dtypes, shapes; values within rtol/atol)."""
    expected, actual = run_model(before, feeds), run_model(after, feeds)
    assert list(actual) == list(expected), f"output names changed: {list(expected)} -> {list(actual)}"
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, f"{name}: dtype {want.dtype} -> {got.dtype}"
        assert got.shape == want.shape, f"{name}: shape {want.shape} -> {got.shape}"
        if want.dtype.kind in "fc":
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)
        else:  # integers, booleans, strings: exactly
            np.testing.assert_array_equal(got, want, err_msg=name)
    return actual


def serialized(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def assert_round_trip(model: onnx.ModelProto) -> None:
    """``to_onnx(from_onnx(model))`` serializes to the very bytes of ``model``; on failure the message is
    the diff of the two protos in text format (weights elided), so that it says what changed."""
    back = to_onnx(from_onnx(model))
    if serialized(back) == serialized(model):
        return
    import difflib

    def text(m: onnx.ModelProto) -> list[str]:
        copy = onnx.ModelProto()
        copy.CopyFrom(m)
        for tensor in copy.graph.initializer:
            if len(tensor.raw_data) > 64:
                tensor.raw_data = b"<%d bytes>" % len(tensor.raw_data)
        return str(copy).splitlines(keepends=True)

    diff = "".join(list(difflib.unified_diff(text(model), text(back), "original", "round trip", n=2))[:80])
    raise AssertionError(f"round trip is not byte-identical:\n{diff or '(same text, different bytes)'}")


# -- golden IR text ------------------------------------------------------------------------------------
def check_golden(request: Any, graph: Graph, relative: str) -> None:
    """Compare ``to_text(graph)`` with ``tests/expected/<relative>``; write the file when it is missing or
    when pytest runs with ``--update-golden``."""
    path = EXPECTED_DIR / relative
    text = to_text(graph)
    update = request.config.getoption("--update-golden", default=False)
    if update or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    expected = path.read_text()
    assert text == expected, f"IR text differs from {path} (rerun with --update-golden if intended):\n{text}"


# -- real models ---------------------------------------------------------------------------------------
def package_dir(package: str) -> Path | None:
    """Where an installed package lies, found without importing it (their __init__ may need extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def real_models() -> dict[str, Path]:
    """name -> path of the ONNX models shipped by installed packages (Magika, PP-OCR)."""
    found: dict[str, Path] = {}
    magika = package_dir("magika")
    if magika is not None and (magika / "models/standard_v3_3/model.onnx").exists():
        found["magika"] = magika / "models/standard_v3_3/model.onnx"
    ocr = package_dir("rapidocr_onnxruntime")
    if ocr is not None:
        for path in sorted((ocr / "models").glob("*.onnx")):
            found[path.stem] = path
    return found


# Concrete sizes for the real models' symbolic dims (image models want multiples of 32; rec wants H=48).
REAL_MODEL_INPUTS: dict[str, dict[str, Any]] = {
    "magika": {"shapes": {"bytes": (2, 2048)}, "int_range": (0, 257)},
    "ch_PP-OCRv4_det_infer": {"shapes": {"x": (1, 3, 64, 64)}},
    "ch_PP-OCRv4_rec_infer": {"shapes": {"x": (1, 3, 48, 96)}},
    "ch_ppocr_mobile_v2.0_cls_infer": {"shapes": {"x": (1, 3, 48, 192)}},
}


# -- passes --------------------------------------------------------------------------------------------
def apply_passes(
    model: onnx.ModelProto,
    pipeline: list[Any],
    *,
    feeds: Sequence[dict[str, np.ndarray]] | None = None,
    seed: int = 0,
    **tolerances: float,
) -> tuple[Graph, Any]:
    """Run ``pipeline`` on the IR of ``model`` (verifying after every pass that changed something) and check
    that the rewritten model computes what the original does, on ``feeds`` or on seeded inputs.

    Returns the rewritten graph and the pipeline report."""
    from llmc.pass_manager import run_pipeline

    graph = from_onnx(model)
    report = run_pipeline(graph, pipeline)
    for feed in feeds if feeds is not None else [seeded_feeds(model, seed=seed)]:
        assert_same_outputs(model, graph, feed, **tolerances)
    return graph, report


def stats_of(report: Any, pass_name: str) -> dict[str, int | float]:
    """The stats of the (last) run of ``pass_name`` in a pipeline report."""
    records = [r for r in report.records if r.name == pass_name]
    assert records, f"{pass_name} did not run"
    return records[-1].stats


def ops(graph: Graph) -> list[str]:
    """Op types of the graph's own nodes, in order."""
    return [n.op_type for n in graph.nodes()]


def mlp_model(k: int = 8, hidden: int = 16, n: int = 4, *, seed: int = 0, opset: int = 21) -> onnx.ModelProto:
    """x [batch, k] -> MatMul(w1) -> h -> Relu -> r -> MatMul(w2) -> y [batch, n], seeded normal weights."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w1", (k, hidden)), ("w2", (hidden, n)))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def relu_graph(opset: int = 21) -> Graph:
    """y = Relu(x): a model with nothing for a weight pass to do."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "r",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
