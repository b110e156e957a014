"""ONNX <-> IR conversion, and reading/writing model files.

``from_onnx``/``to_onnx`` round-trip everything a ModelProto holds: nodes (empty optional inputs and unused
outputs keep their slots), attributes, subgraphs, value_info, opset imports, model metadata, functions and
initializers (dtypes such as bfloat16, float8 and int4 included). ``load_model`` memory-maps external data
and ``save_model`` streams weights into an external-data file when the model is large, so that neither holds
the weights twice. Sparse initializers are kept as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from llmc.errors import IRError, ModelError
from llmc.ir.graph import Dim, Graph, ValueInfo
from llmc.ir.weights import array_to_tensor, tensor_to_array

# Beyond this many bytes of weights, save_model writes them to an external-data file (protobuf's limit is 2 GB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


# -- types -------------------------------------------------------------------------------------------
def _value_info_from_proto(vi: onnx.ValueInfoProto) -> ValueInfo:
    t = vi.type
    if t.HasField("tensor_type"):
        tt = t.tensor_type
        shape: tuple[Dim, ...] | None = None
        if tt.HasField("shape"):
            dims: list[Dim] = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            shape = tuple(dims)
        return ValueInfo(
            vi.name, int(tt.elem_type), shape, None, vi.doc_string, _copy(vi, onnx.ValueInfoProto)
        )
    raw = onnx.TypeProto()
    raw.CopyFrom(t)
    return ValueInfo(vi.name, 0, None, raw, vi.doc_string, _copy(vi, onnx.ValueInfoProto))


def value_info_to_proto(info: ValueInfo) -> onnx.ValueInfoProto:
    if info.proto is not None and info.proto.name == info.name:
        parsed = _value_info_from_proto(info.proto)
        if (parsed.dtype, parsed.shape, parsed.doc_string) == (info.dtype, info.shape, info.doc_string):
            return _copy(info.proto, onnx.ValueInfoProto)
    if info.type_proto is not None:
        vi = onnx.ValueInfoProto(name=info.name)
        vi.type.CopyFrom(info.type_proto)
    else:
        shape = None if info.shape is None else list(info.shape)
        vi = onnx.helper.make_tensor_value_info(info.name, info.dtype, shape)
        vi.ClearField("doc_string")
    if info.doc_string:
        vi.doc_string = info.doc_string
    return vi


def _set_present(proto, **fields) -> None:
    """Set only the non-empty fields, so that a round trip reproduces the original bytes."""
    for key, value in fields.items():
        if value:
            setattr(proto, key, value)


# -- ONNX -> IR --------------------------------------------------------------------------------------
def from_onnx(model: onnx.ModelProto, base_dir: str | Path | None = None) -> Graph:
    """Build the IR of a model. ``base_dir`` is where its external-data files live."""
    base = Path(base_dir) if base_dir is not None else None
    graph = _graph_from_proto(model.graph, None, base)
    graph.opset_imports = {
        op.domain if op.domain != "ai.onnx" else "": int(op.version) for op in model.opset_import
    }
    graph.ir_version = int(model.ir_version)
    graph.producer_name = model.producer_name
    graph.producer_version = model.producer_version
    graph.model_domain = model.domain
    graph.model_version = int(model.model_version)
    graph.model_doc_string = model.doc_string
    graph.metadata_props = {p.key: p.value for p in model.metadata_props}
    graph.training_info = [_copy(t, onnx.TrainingInfoProto) for t in model.training_info]
    graph.functions = [_copy(f, onnx.FunctionProto) for f in model.functions]
    return graph


def _copy(proto, cls):
    out = cls()
    out.CopyFrom(proto)
    return out


def _graph_from_proto(gp: onnx.GraphProto, parent: Graph | None, base: Path | None) -> Graph:
    graph = Graph(gp.name, parent=parent)
    graph.doc_string = gp.doc_string
    for tensor in gp.initializer:
        graph.initializers[tensor.name] = tensor_to_array(tensor, base)
        graph.initializers.keep_encoding(tensor.name, tensor)
        if tensor.doc_string:
            graph.initializers.set_doc(tensor.name, tensor.doc_string)
    graph.sparse_initializers = [_copy(s, onnx.SparseTensorProto) for s in gp.sparse_initializer]
    for vi in gp.input:
        graph.inputs.append(vi.name)
        graph.values[vi.name] = _value_info_from_proto(vi)
    graph.graph_metadata_props = {p.key: p.value for p in gp.metadata_props}
    interface = (
        {vi.name for vi in gp.input} | {vi.name for vi in gp.output} | {t.name for t in gp.initializer}
    )
    for vi in gp.value_info:
        graph.value_info_order.append(vi.name)
        if vi.name in interface:
            graph.value_info_extra[vi.name] = _value_info_from_proto(vi)
        else:
            graph.values.setdefault(vi.name, _value_info_from_proto(vi))
    output_infos = [_value_info_from_proto(vi) for vi in gp.output]
    for position, np_ in enumerate(gp.node):
        attributes: dict[str, onnx.AttributeProto] = {}
        subgraphs: dict[str, Graph | list[Graph]] = {}
        for attr in np_.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                subgraphs[attr.name] = _graph_from_proto(attr.g, graph, base)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                subgraphs[attr.name] = [_graph_from_proto(g, graph, base) for g in attr.graphs]
            else:
                attributes[attr.name] = _copy(attr, onnx.AttributeProto)
        try:
            node = graph.add_node(
                np_.op_type,
                list(np_.input),
                list(np_.output),
                domain=np_.domain,
                name=np_.name,
                attributes=attributes,
                subgraphs=subgraphs,
                order=float(position),
                doc_string=np_.doc_string,
                metadata={p.key: p.value for p in np_.metadata_props},
            )
        except IRError as exc:
            raise ModelError(f"graph '{gp.name}' is not in SSA form: {exc.message}") from exc
        node.overload = np_.overload
        node.attribute_order = tuple(a.name for a in np_.attribute)
        node.domain_spelling = np_.domain if np_.domain == "ai.onnx" else ""
        node.explicit_empty = tuple(
            f for f in ("domain", "name", "doc_string") if np_.HasField(f) and not getattr(np_, f)
        )
    for info in output_infos:
        graph.outputs.append(info.name)
        if info.dtype or info.type_proto is not None or info.name not in graph.values:
            graph.values[info.name] = info
    return graph


# -- IR -> ONNX --------------------------------------------------------------------------------------
def to_onnx(graph: Graph, *, weights: str = "embed", elide_above: int = 0) -> onnx.ModelProto:
    """Build a ModelProto. ``weights``: "embed" (data inside); "none" (no initializers at all); "elide" (tensors over ``elide_above`` bytes
    become references to ``<elided>`` carrying a content digest: for text dumps); "external" (the same
    without data or digest: a skeleton that ``save_model`` points at its data file)."""
    model = onnx.ModelProto()
    model.ir_version = graph.ir_version
    _set_present(
        model,
        producer_name=graph.producer_name,
        producer_version=graph.producer_version,
        domain=graph.model_domain,
        model_version=graph.model_version,
        doc_string=graph.model_doc_string,
    )
    for domain, version in sorted(graph.opset_imports.items()):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    for key, value in graph.metadata_props.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.functions.extend(graph.functions)
    model.training_info.extend(graph.training_info)
    model.graph.CopyFrom(_graph_to_proto(graph, weights, elide_above))
    return model


def _tensor(graph: Graph, name: str, weights: str, elide_above: int) -> onnx.TensorProto:
    array = graph.initializers[name]
    elide = weights == "elide" and array.dtype != object and array.nbytes > elide_above
    if elide or (weights == "external" and _externalizable(array, elide_above + 1)):
        tensor = onnx.TensorProto(name=name, data_type=_onnx_dtype(array), dims=list(array.shape))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="<elided>")
        if weights == "elide":
            tensor.external_data.add(key="digest", value=graph.initializers.digest(name))
    elif graph.initializers.encoded(name) is not None:
        tensor = _copy(graph.initializers.encoded(name), onnx.TensorProto)
    else:
        tensor = array_to_tensor(name, array)
    doc = graph.initializers.doc(name)
    if doc:
        tensor.doc_string = doc
    return tensor


_PACKED = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


def _externalizable(array: np.ndarray, min_bytes: int) -> bool:
    """Plain arrays whose bytes are their ONNX raw_data (not strings, not packed 4-bit types)."""
    return array.dtype != object and array.nbytes >= min_bytes and _onnx_dtype(array) not in _PACKED


def _onnx_dtype(array: np.ndarray) -> int:
    return int(onnx.helper.np_dtype_to_tensor_dtype(array.dtype))


def _graph_to_proto(graph: Graph, weights: str, elide_above: int) -> onnx.GraphProto:
    gp = onnx.GraphProto()
    _set_present(gp, name=graph.name, doc_string=graph.doc_string)
    for name in graph.inputs:
        gp.input.append(value_info_to_proto(graph.values.get(name) or ValueInfo(name)))
    for name in graph.outputs:
        info = graph.values.get(name) or ValueInfo(name)
        gp.output.append(value_info_to_proto(info))
    if weights != "none":
        for name in graph.initializers:
            gp.initializer.append(_tensor(graph, name, weights, elide_above))
    gp.sparse_initializer.extend(graph.sparse_initializers)
    interface = set(graph.inputs) | set(graph.outputs)
    internal = [n for n in graph.values if n not in interface and n not in graph.initializers]
    known = set(internal)
    order = [n for n in graph.value_info_order if n in known or n in graph.value_info_extra]
    for name in dict.fromkeys([*order, *internal]):  # the imported order first, new entries after
        if name in known:
            info = graph.values[name]
            if info.type_proto is None and not info.dtype and info.proto is None:
                continue
        elif name in interface or name in graph.initializers:
            info = graph.value_info_extra[name]
        else:
            continue
        gp.value_info.append(value_info_to_proto(info))
    for key, value in graph.graph_metadata_props.items():
        gp.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    for node in graph.nodes():
        np_ = onnx.NodeProto()
        domain = node.domain_spelling if node.domain_spelling and not node.domain else node.domain
        _set_present(np_, op_type=node.op_type, domain=domain, name=node.name, doc_string=node.doc_string)
        for fld in node.explicit_empty:
            setattr(np_, fld, "")
        np_.input.extend(node.inputs)
        np_.output.extend(node.outputs)
        if node.overload:
            np_.overload = node.overload
        present = [k for k in node.attribute_order if k in node.attributes or k in node.subgraphs]
        rest = [k for k in (*node.attributes, *node.subgraphs) if k not in present]
        for key in dict.fromkeys([*present, *rest]):
            if key in node.subgraphs:
                sub = node.subgraphs[key]
                if isinstance(sub, list):
                    np_.attribute.append(
                        onnx.helper.make_attribute(
                            key, [_graph_to_proto(s, weights, elide_above) for s in sub]
                        )
                    )
                else:
                    np_.attribute.append(
                        onnx.helper.make_attribute(key, _graph_to_proto(sub, weights, elide_above))
                    )
            else:
                np_.attribute.append(node.attributes[key])
        for key, value in node.metadata.items():
            np_.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
        gp.node.append(np_)
    return gp


# -- files -------------------------------------------------------------------------------------------
def load_model(path: str | Path) -> Graph:
    """Read an ONNX file into the IR, memory-mapping external data. Raises ModelError with the reason."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"model path is a folder, not an ONNX file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]})",
            hint="check that the file is complete (not truncated) and really an ONNX model",
        ) from exc
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path} holds no ONNX graph (is it really an .onnx file?)")
    _check_external_files(model.graph, path.parent, path)
    return from_onnx(model, base_dir=path.parent)


def _check_external_files(gp: onnx.GraphProto, base: Path, path: Path) -> None:
    for tensor in gp.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if not (base / location).exists():
                raise ModelError(
                    f"{path}: external data file '{location}' of tensor '{tensor.name}' is missing"
                )


def save_model(graph: Graph, path: str | Path, *, external_data: bool | None = None) -> list[Path]:
    """Write the model; returns the files written. Large models stream weights to ``<name>.data``."""
    path = Path(path)
    if external_data is None:
        external_data = graph.initializers.nbytes() > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        model = to_onnx(graph)
        path.write_bytes(model.SerializeToString())
        return [path]
    data_path = path.with_name(path.name + ".data")
    locations: dict[str, tuple[int, int]] = {}
    with open(data_path, "wb") as fh:
        for g in _all_graphs(graph):
            for name in g.initializers:
                array = np.ascontiguousarray(g.initializers[name])
                if not _externalizable(array, 1024):
                    continue
                pad = (-fh.tell()) % 64
                fh.write(b"\0" * pad)
                offset = fh.tell()
                fh.write(array.view(np.uint8).data if array.ndim else array.tobytes())
                locations[f"{id(g)}:{name}"] = (offset, array.nbytes)
    model = to_onnx(graph, weights="external", elide_above=1023)
    for g, gp in zip(_all_graphs(graph), _all_graph_protos(model.graph), strict=True):
        for tensor in gp.initializer:
            key = f"{id(g)}:{tensor.name}"
            if key in locations:
                offset, length = locations[key]
                del tensor.external_data[:]
                tensor.external_data.add(key="location", value=data_path.name)
                tensor.external_data.add(key="offset", value=str(offset))
                tensor.external_data.add(key="length", value=str(length))
    path.write_bytes(model.SerializeToString())
    return [path, data_path]


def _all_graphs(graph: Graph):
    yield graph
    for node in graph.nodes():
        for sub in node.all_subgraphs():
            yield from _all_graphs(sub)


def _all_graph_protos(gp: onnx.GraphProto):
    yield gp
    for node in gp.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graph_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graph_protos(g)


def clone(graph: Graph) -> Graph:
    """A structurally independent copy that shares the (read-only) weight arrays: no weight is copied."""
    copy = from_onnx(to_onnx(graph, weights="none"))
    for src, dst in zip(_all_graphs(graph), _all_graphs(copy), strict=True):
        for name in src.initializers:
            dst.initializers[name] = src.initializers[name]
            if src.initializers.doc(name):
                dst.initializers.set_doc(name, src.initializers.doc(name))
    return copy


def file_size(paths: list[Path]) -> int:
    return sum(os.path.getsize(p) for p in paths)
