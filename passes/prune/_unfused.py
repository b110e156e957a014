"""Attention heads in the exporter's unfused form (before ``fuse-attention``), as sites ``prune-structured`` edits.

The math form (``softmax(Q·Kᵀ·s + M)·V`` with the KV-cache concatenations and the grouped-query ``repeat_kv``)
is recognized by the same tracer as ``fuse-attention`` (``llmc.passes.fusion._sdpa``). From its q, k and v this
module walks back to the projections, ``Transpose[0,2,1,3](Reshape(MatMul(x, W)))`` through the hand-written
rotary embedding (element-wise ops and last-axis Slices/Concats, which keep the head axis), and forward to the
output projection, ``MatMul(Reshape(Transpose[0,2,1,3](P·V)), W_o)``.

Removing heads then edits: the projection columns and ``W_o`` rows (as in the fused form), the head entry of
the q/k/v Reshapes and of the output Reshape (an exporter writes ``-1`` there, which needs nothing), the
``[B, kv, group, T, D]`` shape of ``repeat_kv``'s Expand and the ``[B, heads, T, D]`` of its Reshape, and the
recorded shapes of every value in between, each by the head count it carries (query heads, kv heads, or
both on a rank-5 repeat value). A value whose head axis the walk cannot tell stops the site with its name.
"""

from __future__ import annotations

from llmc.ir import Graph, Node
from llmc.passes.fusion._sdpa import Repeat, SdpaSite, trace_sdpa

from ._sites import AttentionSite, HeadPath, SiteError, layer_name, output_projection, trace_source

# ops that keep a [B, H, S, D] value's head axis where it is: those of rotate-half rotary and scaling, and
# beyond q/k/v those of the scores (MatMul, softmax, the NaN guard)
_ROTARY = {"Add", "Sub", "Mul", "Div", "Neg", "Cast", "Identity", "Slice", "Concat"}
_HEAD_PRESERVING = _ROTARY | {"Softmax", "IsNaN", "Where", "MatMul"}


def unfused_attention_sites(graph: Graph, live: set[int]) -> list[AttentionSite]:
    """Every math-form attention whose q/k/v come from constant-weight projections, in topological order."""
    sites: list[AttentionSite] = []
    for node in graph.nodes():
        if node.id not in live or node.op_type != "MatMul" or node.domain:
            continue
        sdpa = trace_sdpa(graph, node)
        if isinstance(sdpa, str):
            continue
        sites.append(_site(graph, sdpa, len(sites), live))
    return sites


def _projection(graph: Graph, value: str, what: str, label: str) -> tuple[HeadPath, list[str]]:
    """The projection behind the heads-first ``value`` and the values on the way (the rotary chain).

    The walk follows the operands that come from a ``Transpose[0,2,1,3]`` through head-preserving ops; the
    other operands (cos/sin tables) must broadcast over the head axis."""
    transposes: dict[int, Node] = {}
    reaches: dict[str, bool] = {}

    def walk(v: str) -> bool:
        if v in reaches:
            return reaches[v]
        reaches[v] = False
        node = graph.producer(v)
        if node is None or node.domain or graph.constant(v) is not None:
            return False
        if node.op_type == "Transpose" and list(node.attr("perm") or []) == [0, 2, 1, 3]:
            transposes[node.id] = node
            reaches[v] = True
        elif node.op_type in _ROTARY:
            reaches[v] = any([walk(x) for x in node.inputs if x])
        return reaches[v]

    if not walk(value):
        raise SiteError(f"{label}: the {what} does not come from a Transpose[0,2,1,3] of a projection")
    chain = [v for v, hit in reaches.items() if hit and graph.producer(v).op_type != "Transpose"]
    for v in chain:
        for x in graph.producer(v).inputs:
            shape = graph.shape(x) if x and not reaches.get(x) else None
            if x and not reaches.get(x) and (shape is None or (len(shape) == 4 and shape[1] != 1)):
                raise SiteError(f"{label}: '{x}' meets the {what} heads without broadcasting over them")
    if len(transposes) != 1:
        raise SiteError(f"{label}: the {what} does not come from one Transpose[0,2,1,3] of a projection")
    transpose = next(iter(transposes.values()))
    reshape = graph.producer(transpose.inputs[0])
    if reshape is None or reshape.op_type != "Reshape":
        raise SiteError(f"{transpose.label}: its input is not a Reshape into heads")
    source = trace_source(graph, reshape.inputs[0])
    path = HeadPath(source, reshape, [(reshape.outputs[0], 2), (transpose.outputs[0], 1)], None)
    return path, chain


def _site(graph: Graph, sdpa: SdpaSite, fallback: int, live: set[int]) -> AttentionSite:
    label = sdpa.root.label
    q, q_chain = _projection(graph, sdpa.query, "query", label)
    k, k_chain = _projection(graph, sdpa.key, "key", label)
    v, v_chain = _projection(graph, sdpa.value, "value", label)
    out = sdpa.root.outputs[0]
    transpose, reshape, o_proj = output_projection(graph, out, live)
    head_dim = q.source.width // sdpa.q_heads
    if q.source.width != sdpa.q_heads * head_dim or k.source.width != sdpa.kv_heads * head_dim:
        raise SiteError(f"{label}: projection widths do not match {sdpa.q_heads}/{sdpa.kv_heads} heads")
    index, name = layer_name(o_proj.inputs[1], fallback)
    cache = [x for x in (sdpa.past_key, sdpa.past_value) if x]
    cache += [c.outputs[0] for c in (sdpa.cache_key, sdpa.cache_value) if c is not None]
    q.heads_values += [(x, 1) for x in q_chain]
    k.heads_values += [(x, 1) for x in k_chain]
    v.heads_values += [(x, 1) for x in v_chain]
    site = AttentionSite(
        index, name, sdpa.root, q, k, v, sdpa.q_heads, sdpa.kv_heads, head_dim,
        [(out, 1), (transpose.outputs[0], 2)], reshape, o_proj, cache,
    )  # fmt: skip
    repeats = [r for r in (sdpa.repeat_key, sdpa.repeat_value) if r is not None]
    site.region = _region(graph, sdpa, site, repeats)
    for r in repeats:
        site.shape_edits += [(r.expand, 1, "kv"), (r.expand, 2, "group"), (r.reshape, 1, "q")]
    site.shape_edits += [
        (n, 1, "q")
        for n in sdpa.key_transpose
        if n.op_type == "Reshape" and graph.constant(n.inputs[1]) is not None
    ]
    return site


def _region(
    graph: Graph, sdpa: SdpaSite, site: AttentionSite, repeats: list[Repeat]
) -> list[tuple[str, dict[int, str]]]:
    """The values between the heads-first q/k/v (and the cache) and P·V, each with the head count its axes
    carry: ``q`` (query heads: scores, probabilities, repeated keys/values), ``kv`` (kv heads: the cache
    before the repeat) or ``group`` (query heads per kv head: axis 2 of the repeat's Expand)."""
    known = {x for path in (site.q, site.k, site.v) for x, _ in path.heads_values} | set(site.cache)
    reshapes = {r.reshape.id: r for r in repeats}
    expands = {r.expand.id: r for r in repeats}
    region: list[tuple[str, dict[int, str]]] = []
    stack = [(x, "q") for x in sdpa.root.inputs]
    seen: set[str] = set()
    while stack:
        value, role = stack.pop()
        if value in seen or value in known or value == sdpa.mask or graph.constant(value) is not None:
            continue
        seen.add(value)
        node = graph.producer(value)
        if node is None:
            raise SiteError(f"{sdpa.root.label}: '{value}' reaches the attention from outside it")
        axes = {1: "kv" if role in ("kv", "repeated") else "q"}
        if node.id in reshapes:
            region.append((value, axes))
            stack.append((node.inputs[0], "expanded"))
            continue
        if node.id in expands:
            region.append((value, {1: "kv", 2: "group"}))
            stack.append((node.inputs[0], "repeated"))
            continue
        if role == "repeated" and node.op_type == "Unsqueeze":
            region.append((value, axes))
            stack.append((node.inputs[0], "kv"))
            continue
        if node in sdpa.key_transpose:  # [B, H, D, T], or [B*H, ...] inside the reshaping form
            rank = len(graph.shape(value) or ())
            region.append((value, axes if rank == 4 else {0: "unknown"}))
            stack.append((node.inputs[0], role))
            continue
        if node.op_type not in _HEAD_PRESERVING or role == "expanded":
            raise SiteError(f"{node.label}: pruning cannot tell where '{value}' holds the heads")
        region.append((value, axes))
        stack += [(x, role) for x in node.inputs if x]
    return region
