"""The llmc IR: an ONNX graph held as a ``networkx.MultiDiGraph``.

One graph node per ONNX node (identified by a stable integer id, never by its ONNX name, which may be empty
or repeated); one edge per tensor use, keyed by ``(value, out_slot, in_slot)`` so that a value used twice by
the same node stays two edges. Values are identified by name (SSA: defined once in the whole model).
Initializers live in a :class:`~llmc.ir.weights.WeightStore` beside the graph.

Subgraphs (If/Loop/Scan bodies) are nested :class:`Graph` objects owned by their node. The values a subgraph
reads from enclosing scopes are recorded as the node's *implicit inputs* and become edges with negative
in-slots (``-1 - k``), so dead-code elimination and CSE see those uses. A subgraph notifies its owner node
whenever it changes, so the implicit inputs are never stale.

Node inputs/outputs are tuples: every mutation goes through the Graph, which keeps the use index and the
networkx edges in sync. This is hand-written rather than onnx_ir because the project's design fixes the
networkx representation (graph algorithms such as partitioning and cost analysis run on it directly).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import onnx
from onnx import helper

from llmc.errors import IRError
from llmc.ir.weights import WeightStore

Dim = int | str | None


@dataclass
class ValueInfo:
    """What is known of a value: element type (``onnx.TensorProto`` enum, 0 = unknown) and shape.

    ``shape`` is ``None`` when the rank is unknown; a dim is an int, a symbolic name, or ``None``.
    Non-tensor types (sequences, optionals, maps) keep their raw ``type_proto``.
    """

    name: str
    dtype: int = 0
    shape: tuple[Dim, ...] | None = None
    type_proto: onnx.TypeProto | None = None
    doc_string: str = ""
    # The imported proto, written back as it was while dtype and shape are unchanged (keeps denotations,
    # untyped entries and element-type-0 shapes byte-exact).
    proto: onnx.ValueInfoProto | None = field(default=None, repr=False, compare=False)

    @property
    def is_tensor(self) -> bool:
        return self.type_proto is None


@dataclass(eq=False)
class Node:
    """One operator application. Mutate inputs/outputs through the owning :class:`Graph` only."""

    id: int
    op_type: str
    domain: str = ""
    name: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    attributes: dict[str, onnx.AttributeProto] = field(default_factory=dict)
    subgraphs: dict[str, Graph | list[Graph]] = field(default_factory=dict)
    implicit_inputs: tuple[str, ...] = ()
    doc_string: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    overload: str = ""
    order: float = 0.0
    graph: Graph | None = field(default=None, repr=False)
    # Proto fields that the imported NodeProto set explicitly to "" (kept so round trips are byte-exact).
    explicit_empty: tuple[str, ...] = field(default=(), repr=False)
    # Attribute names in the imported NodeProto's order (subgraph attributes included).
    attribute_order: tuple[str, ...] = field(default=(), repr=False)
    domain_spelling: str = field(default="", repr=False)  # "ai.onnx" when the import spelled it so

    # -- attributes -------------------------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        """The Python value of an attribute (ints, floats, strings, lists, numpy arrays for tensors)."""
        proto = self.attributes.get(name)
        if proto is None:
            return default
        value = helper.get_attribute_value(proto)
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, onnx.TensorProto):
            return onnx.numpy_helper.to_array(value)
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            return [v.decode("utf-8", errors="replace") for v in value]
        return value

    def set_attr(self, name: str, value: Any) -> None:
        if isinstance(value, np.ndarray):
            value = onnx.numpy_helper.from_array(value)
        self.attributes[name] = helper.make_attribute(name, value)

    def input(self, slot: int) -> str:
        """The input at ``slot``, or "" when the optional input is absent."""
        return self.inputs[slot] if slot < len(self.inputs) else ""

    def all_subgraphs(self) -> Iterator[Graph]:
        for key in sorted(self.subgraphs):
            sub = self.subgraphs[key]
            yield from sub if isinstance(sub, list) else (sub,)

    @property
    def label(self) -> str:
        """How error messages name the node: its ONNX name when it has one, else op and first output."""
        if self.name:
            return f"{self.name} ({self.op_type})"
        first = next((o for o in self.outputs if o), "?")
        return f"{self.op_type}#{self.id} -> {first}"

    def __repr__(self) -> str:
        return f"Node({self.id}, {self.op_type}, in={list(self.inputs)}, out={list(self.outputs)})"


class Graph:
    """An ONNX graph (the main graph or a subgraph) over ``networkx.MultiDiGraph``."""

    def __init__(self, name: str = "main", *, parent: Graph | None = None) -> None:
        self.name = name
        self.parent = parent
        self.owner: Node | None = None  # the node holding this graph as a subgraph attribute
        self.nx = nx.MultiDiGraph()
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.values: dict[str, ValueInfo] = {}
        self.initializers = WeightStore()
        self.doc_string = ""
        # Model-level fields (kept on the main graph only).
        self.opset_imports: dict[str, int] = {}
        self.ir_version: int = onnx.IR_VERSION
        self.producer_name = "llmc"
        self.producer_version = ""
        self.model_domain = ""
        self.model_version = 0
        self.model_doc_string = ""
        self.metadata_props: dict[str, str] = {}
        self.functions: list[onnx.FunctionProto] = []
        self.sparse_initializers: list[onnx.SparseTensorProto] = []
        self.graph_metadata_props: dict[str, str] = {}
        self.training_info: list[onnx.TrainingInfoProto] = []
        # value_info entries that describe interface values or initializers, and the imported value_info
        # order; both only serve byte-exact round trips.
        self.value_info_extra: dict[str, ValueInfo] = {}
        self.value_info_order: list[str] = []
        self._ids = itertools.count()
        self._nodes: dict[int, Node] = {}
        self._producer: dict[str, tuple[int, int]] = {}
        self._uses: dict[str, list[tuple[int, int]]] = {}
        self._next_order = 0.0
        self._name_counter = itertools.count()
        self._taken: set[str] | None = None
        self._node_names: set[str] | None = None

    # -- queries ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: Node) -> bool:
        return self._nodes.get(node.id) is node

    def node(self, node_id: int) -> Node:
        return self._nodes[node_id]

    def nodes(self) -> list[Node]:
        """All nodes in a stable topological order (ties broken by original position, then id)."""
        try:
            order = nx.lexicographical_topological_sort(self.nx, key=lambda i: (self._nodes[i].order, i))
            return [self._nodes[i] for i in order]
        except nx.NetworkXUnfeasible as exc:
            cycle = nx.find_cycle(self.nx)
            names = " -> ".join(self._nodes[u].label for u, _v, _k in cycle)
            raise IRError(f"graph '{self.name}' has a cycle: {names}") from exc

    def find(self, op_type: str, domain: str | None = None) -> list[Node]:
        return [n for n in self.nodes() if n.op_type == op_type and (domain is None or n.domain == domain)]

    def walk(self) -> Iterator[tuple[Graph, Node]]:
        """Every (graph, node) in this graph and, recursively, in its subgraphs."""
        for node in self.nodes():
            yield self, node
            for sub in node.all_subgraphs():
                yield from sub.walk()

    def producer(self, value: str) -> Node | None:
        """The node that defines ``value`` in this graph (None for inputs, initializers, outer values)."""
        entry = self._producer.get(value)
        return self._nodes[entry[0]] if entry else None

    def producer_slot(self, value: str) -> tuple[Node, int] | None:
        entry = self._producer.get(value)
        return (self._nodes[entry[0]], entry[1]) if entry else None

    def uses(self, value: str) -> list[tuple[Node, int]]:
        """(consumer, in_slot) pairs; negative slots are implicit uses by a subgraph of the consumer."""
        return [(self._nodes[nid], slot) for nid, slot in self._uses.get(value, ())]

    def consumers(self, value: str) -> list[Node]:
        seen: dict[int, Node] = {}
        for nid, _slot in self._uses.get(value, ()):
            seen.setdefault(nid, self._nodes[nid])
        return list(seen.values())

    def is_used(self, value: str) -> bool:
        return bool(self._uses.get(value)) or value in self.outputs

    def is_initializer(self, value: str) -> bool:
        return value in self.initializers

    def is_constant(self, value: str) -> bool:
        """An initializer that no graph input overrides."""
        return value in self.initializers and value not in self.inputs

    def constant(self, value: str) -> np.ndarray | None:
        """The array behind a value when it is a constant (initializer or Constant node), else None."""
        if self.is_constant(value):
            return self.initializers[value]
        node = self.producer(value)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return constant_node_value(node)
        return None

    def defines(self, value: str) -> bool:
        """Whether ``value`` is defined in this graph's own scope."""
        return value in self._producer or value in self.inputs or value in self.initializers

    def defining_scope(self, value: str) -> Graph | None:
        """The graph (this one or an enclosing one) that defines ``value``; None when no scope does."""
        graph: Graph | None = self
        while graph is not None:
            if graph.defines(value):
                return graph
            graph = graph.parent
        return None

    def visible(self, value: str) -> bool:
        """Whether ``value`` is defined in this scope or an enclosing one."""
        return self.defining_scope(value) is not None

    def value_info(self, value: str) -> ValueInfo | None:
        info = self.values.get(value)
        if info is None and value in self.initializers:
            arr = self.initializers[value]
            return ValueInfo(value, np_dtype_to_onnx(arr.dtype), tuple(arr.shape))
        return info

    def dtype(self, value: str) -> int:
        info = self.value_info(value)
        return info.dtype if info else 0

    def shape(self, value: str) -> tuple[Dim, ...] | None:
        info = self.value_info(value)
        return info.shape if info else None

    def all_value_names(self) -> set[str]:
        names = set(self.inputs) | set(self.initializers) | set(self._producer) | set(self.values)
        for node in self._nodes.values():
            for sub in node.all_subgraphs():
                names |= sub.all_value_names()
        return names

    def root(self) -> Graph:
        graph = self
        while graph.parent is not None:
            graph = graph.parent
        return graph

    def unique_name(self, base: str) -> str:
        """A value name unused anywhere in the model, derived from ``base`` (deterministic)."""
        root = self.root()
        if root._taken is None:
            root._taken = root.all_value_names()
        if base and base not in root._taken:
            root._taken.add(base)
            return base
        while True:
            candidate = f"{base or 'v'}_{next(root._name_counter)}"
            if candidate not in root._taken:
                root._taken.add(candidate)
                return candidate

    def unique_node_name(self, base: str) -> str:
        """A node name no other node of the model has (onnxruntime refuses repeated names)."""
        root = self.root()
        if root._node_names is None:
            root._node_names = {n.name for _g, n in root.walk() if n.name}
        name, k = base, 0
        while name in root._node_names:
            k += 1
            name = f"{base}_{k}"
        root._node_names.add(name)
        return name

    def _claim(self, *names: str) -> None:
        root = self.root()
        if root._taken is not None:
            root._taken.update(n for n in names if n)

    # -- mutation ---------------------------------------------------------------------------------
    def add_node(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: Sequence[str] | int = 1,
        *,
        domain: str = "",
        name: str = "",
        attributes: dict[str, Any] | None = None,
        subgraphs: dict[str, Graph | list[Graph]] | None = None,
        order: float | None = None,
        doc_string: str = "",
        metadata: dict[str, str] | None = None,
    ) -> Node:
        """Create a node. ``outputs`` may be a count, in which case fresh names are generated.

        ``order`` places the node among its peers in the topological order (defaults to after every
        existing node); fusions pass the order of the node they replace, so dumps stay readable.
        """
        if isinstance(outputs, int):
            stem = name or op_type.lower()
            outputs = [
                self.unique_name(f"{stem}_out{i}" if outputs > 1 else f"{stem}_out") for i in range(outputs)
            ]
        node = Node(
            id=next(self._ids),
            op_type=op_type,
            domain="" if domain == "ai.onnx" else domain,
            name=name,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            doc_string=doc_string,
            metadata=dict(metadata or {}),
        )
        for key, value in (attributes or {}).items():
            if isinstance(value, onnx.AttributeProto):
                node.attributes[key] = value
            else:
                node.set_attr(key, value)
        if order is None:
            order = self._next_order
        node.order = order
        self._next_order = max(self._next_order, order) + 1.0
        for out in node.outputs:
            if out and out in self._producer:
                other = self._nodes[self._producer[out][0]]
                raise IRError(
                    f"value '{out}' would be defined twice (already by {other.label})", node=node.label
                )
        node.graph = self
        root = self.root()
        if node.domain and node.domain not in root.opset_imports:
            root.opset_imports[node.domain] = 1  # custom domains (com.microsoft...) are versioned 1
        self._claim(*node.outputs)
        if name and self.root()._node_names is not None:
            self.root()._node_names.add(name)
        self._nodes[node.id] = node
        self.nx.add_node(node.id)
        for slot, out in enumerate(node.outputs):
            if out:
                self._producer[out] = (node.id, slot)
                for cid, cslot in self._uses.get(out, ()):
                    self._add_edge(node.id, slot, cid, cslot, out)
        for slot, value in enumerate(node.inputs):
            self._add_use(value, node.id, slot)
        for sub_name, sub in (subgraphs or {}).items():
            node.subgraphs[sub_name] = sub
            for graph in sub if isinstance(sub, list) else (sub,):
                graph.parent = self
                graph.owner = node
        self._refresh_implicit(node)
        self._changed()
        return node

    def remove_node(self, node: Node, *, force: bool = False) -> None:
        """Remove ``node``. Its outputs must be unused unless ``force`` (then their uses dangle)."""
        self._check_owned(node)
        if not force:
            for out in node.outputs:
                if out and self.is_used(out):
                    users = ", ".join(n.label for n in self.consumers(out)) or "a graph output"
                    raise IRError(
                        f"cannot remove node: its output '{out}' is still used by {users}", node=node.label
                    )
        for slot, value in enumerate(node.inputs):
            self._drop_use(value, node.id, slot)
        for k, value in enumerate(node.implicit_inputs):
            self._drop_use(value, node.id, -1 - k)
        for out in node.outputs:
            if out and self._producer.get(out, (None,))[0] == node.id:
                del self._producer[out]
        self.nx.remove_node(node.id)
        del self._nodes[node.id]
        node.graph = None
        self._changed()

    def set_input(self, node: Node, slot: int, value: str) -> None:
        """Point input ``slot`` of ``node`` at ``value`` (slots past the end are padded with absent "")."""
        self._check_owned(node)
        inputs = list(node.inputs)
        while len(inputs) <= slot:
            inputs.append("")
        old = inputs[slot]
        if old == value:
            return
        self._drop_use(old, node.id, slot)
        inputs[slot] = value
        node.inputs = tuple(inputs)
        self._add_use(value, node.id, slot)
        self._changed()

    def set_inputs(self, node: Node, values: Sequence[str]) -> None:
        """Replace the whole input list of ``node`` (slots never shift silently: absent inputs are "")."""
        self._check_owned(node)
        for slot, old in enumerate(node.inputs):
            self._drop_use(old, node.id, slot)
        node.inputs = tuple(values)
        for slot, value in enumerate(node.inputs):
            self._add_use(value, node.id, slot)
        self._changed()

    def replace_all_uses(self, old: str, new: str) -> None:
        """Make every use of ``old`` (node inputs, subgraph reads, graph outputs) read ``new`` instead.

        Graph output names are the model's interface and never change: when ``old`` is a graph output,
        ``new`` takes over the name ``old`` (renamed in place when a node of this graph produces it,
        otherwise through an Identity), and ``old``'s own producer gets a fresh name.
        """
        if old == new:
            return
        for nid, slot in list(self._uses.get(old, ())):
            node = self._nodes[nid]
            if slot >= 0:
                self.set_input(node, slot, new)
            else:
                for sub in node.all_subgraphs():
                    sub._rename_free(old, new)
                self._refresh_implicit(node)
        if old in self.outputs:
            self._take_over_output(old, new)
        self._changed()

    def _take_over_output(self, old: str, new: str) -> None:
        if old in self.inputs:
            raise IRError(f"cannot replace '{old}': it is both a graph input and a graph output")
        info = self.values.get(old)
        self.rename_value(old, self.unique_name(f"{old}_replaced"), rename_outputs=False)
        if new in self._producer and new not in self.outputs and new not in self.inputs:
            self.rename_value(new, old, rename_outputs=False)
        else:
            self.add_node("Identity", [new], [old], name=f"{old}_output")
        if info is not None:
            self.values[old] = ValueInfo(old, info.dtype, info.shape, info.type_proto, info.doc_string)

    def rename_value(self, old: str, new: str, *, rename_outputs: bool = True) -> None:
        """Rename a value everywhere in this scope (producer, uses, value_info, initializer, subgraph reads)."""
        if old == new:
            return
        if self.visible(new) or new in self._uses:
            raise IRError(f"cannot rename '{old}' to '{new}': that name is taken")
        uses = list(self._uses.get(old, ()))
        for nid, slot in uses:
            self._drop_use(old, nid, slot)
        entry = self._producer.pop(old, None)
        if entry is not None:
            node = self._nodes[entry[0]]
            outs = list(node.outputs)
            outs[entry[1]] = new
            node.outputs = tuple(outs)
            self._producer[new] = entry
        if old in self.initializers:
            self.initializers[new] = self.initializers[old]
            del self.initializers[old]
        self.inputs = [new if v == old else v for v in self.inputs]
        if rename_outputs:
            self.outputs = [new if v == old else v for v in self.outputs]
        if old in self.values:
            info = self.values.pop(old)
            info.name = new
            self.values[new] = info
        owners: dict[int, Node] = {}
        for nid, slot in uses:
            node = self._nodes[nid]
            if slot >= 0:
                ins = list(node.inputs)
                ins[slot] = new
                node.inputs = tuple(ins)
                self._add_use(new, nid, slot)
            else:
                owners[nid] = node
        for node in owners.values():
            for sub in node.all_subgraphs():
                sub._rename_free(old, new)
            self._refresh_implicit(node)
        self._claim(new)
        self._changed()

    def add_input(self, name: str, dtype: int, shape: Sequence[Dim] | None) -> None:
        self._check_fresh(name)
        self.inputs.append(name)
        self._claim(name)
        self.values[name] = ValueInfo(name, dtype, None if shape is None else tuple(shape))
        self._changed()

    def add_initializer(self, name: str, array: np.ndarray) -> str:
        """Store a new constant; returns its name (made unique from ``name``)."""
        name = self.unique_name(name)
        self.initializers[name] = array
        self._changed()
        return name

    def set_initializer(self, name: str, array: np.ndarray) -> None:
        """Replace the array of an existing initializer."""
        if name not in self.initializers:
            raise IRError(f"'{name}' is not an initializer")
        self.initializers[name] = array
        self._changed()

    def remove_initializer(self, name: str) -> None:
        del self.initializers[name]
        self._changed()

    def set_value_info(self, name: str, dtype: int, shape: Sequence[Dim] | None) -> None:
        self.values[name] = ValueInfo(name, dtype, None if shape is None else tuple(shape))

    # -- internals --------------------------------------------------------------------------------
    def _check_owned(self, node: Node) -> None:
        if self._nodes.get(node.id) is not node:
            raise IRError("node does not belong to this graph", node=node.label)

    def _check_fresh(self, name: str) -> None:
        if self.visible(name):
            raise IRError(f"value name '{name}' is already defined")

    def _add_edge(self, pid: int, pslot: int, cid: int, cslot: int, value: str) -> None:
        self.nx.add_edge(pid, cid, key=(value, pslot, cslot))

    def _add_use(self, value: str, nid: int, slot: int) -> None:
        if not value:
            return
        self._uses.setdefault(value, []).append((nid, slot))
        entry = self._producer.get(value)
        if entry is not None:
            self._add_edge(entry[0], entry[1], nid, slot, value)

    def _drop_use(self, value: str, nid: int, slot: int) -> None:
        if not value:
            return
        uses = self._uses.get(value, [])
        if (nid, slot) in uses:
            uses.remove((nid, slot))
        if not uses:
            self._uses.pop(value, None)
        entry = self._producer.get(value)
        if entry is not None and self.nx.has_edge(entry[0], nid, (value, entry[1], slot)):
            self.nx.remove_edge(entry[0], nid, (value, entry[1], slot))

    def free_values(self) -> list[str]:
        """Values this graph (and its subgraphs) reads but does not define: reads of enclosing scopes."""
        free: list[str] = []
        seen: set[str] = set()
        for node in self._nodes.values():
            for value in (*node.inputs, *node.implicit_inputs):
                if value and value not in seen and not self.defines(value):
                    seen.add(value)
                    free.append(value)
        for value in self.outputs:
            if value not in seen and not self.defines(value):
                seen.add(value)
                free.append(value)
        return sorted(free)

    def _refresh_implicit(self, node: Node) -> None:
        if node.graph is not self:
            return
        wanted: list[str] = []
        for sub in node.all_subgraphs():
            for value in sub.free_values():
                if value not in wanted:
                    wanted.append(value)
        wanted.sort()
        if tuple(wanted) == node.implicit_inputs:
            return
        for k, value in enumerate(node.implicit_inputs):
            self._drop_use(value, node.id, -1 - k)
        node.implicit_inputs = tuple(wanted)
        for k, value in enumerate(wanted):
            self._add_use(value, node.id, -1 - k)
        self._changed()  # what this graph reads from outside changed too: tell its own owner

    def _rename_free(self, old: str, new: str) -> None:
        """Rename reads of an enclosing-scope value inside this subgraph (recursively)."""
        if self.defines(old):
            return
        for nid, slot in list(self._uses.get(old, ())):
            node = self._nodes[nid]
            if slot >= 0:
                ins = list(node.inputs)
                ins[slot] = new
                node.inputs = tuple(ins)
                self._uses[old].remove((nid, slot))
                self._uses.setdefault(new, []).append((nid, slot))
            else:
                for sub in node.all_subgraphs():
                    sub._rename_free(old, new)
                self._refresh_implicit(node)
        if not self._uses.get(old):
            self._uses.pop(old, None)
        self.outputs = [new if v == old else v for v in self.outputs]
        self._changed()

    def _changed(self) -> None:
        """Tell the owning node (if any) that this subgraph changed, so its implicit inputs stay true."""
        owner = self.owner
        if owner is not None and owner.graph is not None:
            owner.graph._refresh_implicit(owner)


def constant_node_value(node: Node) -> np.ndarray | None:
    """The array a ``Constant`` node produces (any of its value_* attributes)."""
    for key, proto in node.attributes.items():
        if key == "value":
            return onnx.numpy_helper.to_array(proto.t)
        if key == "value_float":
            return np.array(proto.f, dtype=np.float32)
        if key == "value_floats":
            return np.array(list(proto.floats), dtype=np.float32)
        if key == "value_int":
            return np.array(proto.i, dtype=np.int64)
        if key == "value_ints":
            return np.array(list(proto.ints), dtype=np.int64)
        if key == "value_string":
            return np.array(proto.s.decode("utf-8"), dtype=object)
        if key == "value_strings":
            return np.array([s.decode("utf-8") for s in proto.strings], dtype=object)
    return None


def np_dtype_to_onnx(dtype: np.dtype) -> int:
    try:
        return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (KeyError, TypeError, ValueError):
        return 0


def onnx_dtype_to_np(dtype: int) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(dtype)


def iter_values(nodes: Iterable[Node]) -> Iterator[str]:
    for node in nodes:
        yield from (v for v in node.inputs if v)
        yield from (v for v in node.outputs if v)
