"""The llmc IR: ONNX held as a networkx graph, with conversion, verification and printing."""

from __future__ import annotations

from llmc.ir.convert import clone, from_onnx, load_model, save_model, to_onnx, value_info_to_proto
from llmc.ir.graph import Dim, Graph, Node, ValueInfo, constant_node_value, np_dtype_to_onnx, onnx_dtype_to_np
from llmc.ir.printer import Summary, structural_hash, summarize, summary_delta, text_diff, to_text
from llmc.ir.verify import verify, verify_structure
from llmc.ir.weights import WeightStore

__all__ = [
    "Dim",
    "clone",
    "Graph",
    "Node",
    "Summary",
    "ValueInfo",
    "WeightStore",
    "constant_node_value",
    "from_onnx",
    "load_model",
    "np_dtype_to_onnx",
    "onnx_dtype_to_np",
    "save_model",
    "structural_hash",
    "summarize",
    "summary_delta",
    "text_diff",
    "to_onnx",
    "to_text",
    "value_info_to_proto",
    "verify",
    "verify_structure",
]
