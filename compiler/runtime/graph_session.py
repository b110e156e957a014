"""An onnxruntime session over an in-memory IR graph, the weights read in place.

Passes that measure the graph as it is at their point of the pipeline (calibration activations, the
sensitivity of quantization groups, bisection's golden checks) need a session over a ``Graph`` that lives in
memory. Serializing it with its weights would copy a 500 MB model per session; here the model bytes carry the
weights as external data and the session reads the IR's numpy arrays through ``add_external_initializers``.
onnxruntime has no API that takes an in-memory graph with shared arrays, so this glue is written here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from llmc.ir import Graph
from llmc.runtime.runner import SessionRunner, session_options


class GraphRunner(SessionRunner):
    """An onnxruntime session over an in-memory IR graph, with OrtRunner's interface (``inputs``,
    ``outputs``, ``last_token_outputs``, ``run``); ``extra_outputs`` makes intermediate values readable.

    The weights are not serialized: the model bytes carry them as external data and the session reads the
    IR's numpy arrays in place (``add_external_initializers``), so that building one session per group of a
    500 MB model costs no copy and no disk. Node names are numbered (onnxruntime wants them unique).
    """

    def __init__(self, graph: Graph, level: str = "basic", extra_outputs: Sequence[str] = ()) -> None:
        import onnx
        import onnxruntime as ort

        from llmc.ir import to_onnx
        from llmc.ir.weights import array_to_tensor

        proto = to_onnx(graph, weights="external", elide_above=_IN_PLACE_BYTES - 1)
        # onnxruntime drops unused initializers before it takes the external ones (dead weights a pipeline
        # leaves for a later cleanup pass): leave them out
        for k in reversed(range(len(proto.graph.initializer))):
            if not graph.is_used(proto.graph.initializer[k].name):
                del proto.graph.initializer[k]
        names, values = [], []
        for k, tensor in enumerate(proto.graph.initializer):
            if tensor.data_location != tensor.EXTERNAL:
                continue
            array = np.ascontiguousarray(graph.initializers[tensor.name])
            if array.dtype.name not in _IN_PLACE_TYPES:  # bfloat16 & co: no OrtValue from numpy, inline them
                proto.graph.initializer[k].CopyFrom(array_to_tensor(tensor.name, array))
                continue
            names.append(tensor.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(array))  # shares the array's memory
        for i, node in enumerate(proto.graph.node):
            node.name = f"n{i}"
        existing = {o.name for o in proto.graph.output}
        for name in dict.fromkeys(extra_outputs):  # intermediate values asked for, as extra graph outputs
            if name not in existing:
                info = graph.value_info(name)
                elem = info.dtype if info and info.dtype else onnx.TensorProto.FLOAT
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        options = session_options(level)
        options.add_external_initializers(names, values)
        self._values = values  # the session reads them: keep them alive as long as it
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        del proto
        super().__init__(session, graph.metadata_props.get("llmc.last_token_outputs", "").split(","))


_IN_PLACE_BYTES = 1 << 16
_IN_PLACE_TYPES = {
    "float32",
    "float16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "int64",
    "bool",
}


@contextmanager
def graph_runner(
    graph: Graph, level: str = "basic", extra_outputs: Sequence[str] = ()
) -> Iterator[GraphRunner]:
    """A GraphRunner over ``graph`` whose session is released when the block ends."""
    runner = GraphRunner(graph, level, extra_outputs)
    try:
        yield runner
    finally:
        del runner.session
