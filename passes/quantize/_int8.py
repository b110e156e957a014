"""Shared pieces of the int8 activation quantization passes (``quantize-dynamic``, ``quantize-static``).

* which MatMul/Gemm nodes are sites (a constant 2-D float32 weight, chosen by name globs with
  ``llmc.passes._select.WeightSelection`` like the other weight passes, and by size),
* int8 weights per output channel (symmetric, optionally in the reduced 7-bit range),
* the ``reduce_range: auto`` choice from the host's CPU flags,
* SmoothQuant (Xiao et al., 2023): ``smooth`` moves activation outliers into the weights, per input
  channel, from per-channel maxima measured on the calibration data,
* scale/zero point of an activation range, through onnxruntime's own ``quant_utils`` so that llmc's
  numbers are the ones onnxruntime's quantizer would write.

The weight quantizer is a few vectorized numpy lines: onnxruntime's ``quantize_data`` is per tensor and
its per-channel path loops over channels in Python. Reduced range (weights in [-64, 64]) exists because
x86 CPUs with AVX2 and without VNNI multiply u8·s8 pairs with ``vpmaddubsw``, whose int16 pair sums
saturate for full-range weights (/work/shared/MODELS.md: garbage from per-channel int8 on AVX2).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from onnx import TensorProto
from pydantic import Field

from llmc.errors import PassError
from llmc.ir import Graph, Node
from llmc.pass_manager import PassContext, PassOptions
from llmc.passes._select import WeightSelection
from llmc.rewrite import Builder

ReduceRange = Literal["auto", "true", "false"]
# CPU flags whose int8 dot products accumulate in 32 bits (no int16 pair saturation)
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "amx")


class Int8Options(PassOptions):
    """The options both int8 passes share: weights, layer choice, smoothing."""

    per_channel: bool = Field(default=True, description="one weight scale per output column, else one")
    reduce_range: ReduceRange = Field(
        default="auto", description="7-bit weights: auto (AVX2 without VNNI), true, false"
    )
    include: list[str] = Field(default_factory=lambda: ["*"], description="weight-name globs to quantize")
    exclude: list[str] = Field(default_factory=list, description="weight-name globs to keep in float")
    min_size: int = Field(default=4096, ge=0, description="smaller weights stay in float")
    smooth: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="SmoothQuant migration strength alpha (e.g. 0.8; needs calibration), off if unset",
    )


@dataclass
class Site:
    """A MatMul (or Gemm) to quantize: ``y = x @ w (* alpha) (+ bias)`` with w [K, N] float32."""

    node: Node
    weight: str  # the initializer's name (for globs and for naming the quantized copies)
    w: np.ndarray  # [K, N], Gemm's transB and alpha already applied
    bias: str | None = None  # Gemm's C (beta applied when it is a constant)

    @property
    def x(self) -> str:
        return self.node.inputs[0]


@dataclass
class Selection:
    sites: list[Site] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # globs that matched no weight


def _float32_weight(graph: Graph, name: str) -> np.ndarray | None:
    if not name or not graph.is_initializer(name):
        return None
    w = graph.initializers[name]
    return w if w.ndim == 2 and w.dtype == np.float32 else None


def _site(graph: Graph, node: Node) -> tuple[Site | None, str | None]:
    """The site a node is, or None with the reason it is not one (None, None: no candidate at all)."""
    if node.domain or node.op_type not in ("MatMul", "Gemm"):
        return None, None
    w = _float32_weight(graph, node.input(1))
    if w is None:
        return None, None
    if graph.dtype(node.inputs[0]) not in (0, TensorProto.FLOAT):
        return None, "the activation is not float32"
    if node.op_type == "MatMul":
        return Site(node, node.inputs[1], w), None
    if node.attr("transA", 0):
        return None, "Gemm with transA"
    w = w.T if node.attr("transB", 0) else w
    w = w * np.float32(node.attr("alpha", 1.0))
    bias, beta = node.input(2) or None, float(node.attr("beta", 1.0))
    if bias and beta != 1.0:
        c = graph.constant(bias)
        if c is None:
            return None, "Gemm with beta != 1 and a C that is not constant"
        bias = graph.add_initializer(f"{bias}.beta", (c * np.float32(beta)).astype(c.dtype))
    return Site(node, node.inputs[1], np.ascontiguousarray(w, dtype=np.float32), bias), None


def select_sites(
    graph: Graph, pass_name: str, include: list[str], exclude: list[str], min_size: int, ctx: PassContext
) -> Selection:
    """The MatMul/Gemm sites of the graph that the options choose; a PassError when the model has none."""
    found: list[Site] = []
    selection = Selection()
    candidates = 0
    choose = WeightSelection(include, exclude)
    for node in graph.nodes():
        if (
            node.domain
            or node.op_type not in ("MatMul", "Gemm")
            or _float32_weight(graph, node.input(1)) is None
        ):
            continue
        candidates += 1
        if not choose(node.inputs[1]):
            continue
        if graph.initializers[node.inputs[1]].size < min_size:
            continue
        site, reason = _site(graph, node)
        if site is None:
            selection.skipped.append({"weight": node.inputs[1], "reason": reason or "not a site"})
            continue
        found.append(site)
    if not candidates:
        raise PassError(
            pass_name, "the model has no MatMul or Gemm with a constant float32 weight to quantize"
        )
    selection.sites = found
    selection.unmatched = choose.warn_unmatched(ctx.log, pass_name)
    return selection


def host_has_vnni(flags: list[str] | None = None) -> bool:
    if flags is None:
        from llmc.targets.base import cpu_flags

        flags = cpu_flags()
    return any(f in flags for f in _VNNI_FLAGS)


def resolve_reduce_range(option: ReduceRange, flags: list[str] | None = None) -> bool:
    """``auto``: reduced range on x86 with AVX2 and without VNNI (u8·s8 int16 saturation), else full range."""
    if option != "auto":
        return option == "true"
    if flags is None:
        from llmc.targets.base import cpu_flags

        flags = cpu_flags()
    return "avx2" in flags and not host_has_vnni(flags)


def weight_qmax(reduce_range: bool) -> int:
    """The largest int8 magnitude of a symmetric weight (onnxruntime's ranges: 127, or 64 reduced)."""
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(TensorProto.INT8, reduce_range=reduce_range, symmetric=True)
    return int(min(-int(qmin), int(qmax)))


def quantize_weight(w: np.ndarray, per_channel: bool, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of w [K, N]: (q int8 [K, N], scale float32 [N] per channel or [] per tensor)."""
    qmax = weight_qmax(reduce_range)
    amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max()
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return q, np.asarray(scale, np.float32)


def activation_qparams(rmin: float, rmax: float, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32 [], zero point int8/uint8 []) of a calibrated range, as onnxruntime computes them:
    symmetric int8 (zero point 0) or asymmetric uint8."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qtype = TensorProto.INT8 if symmetric else TensorProto.UINT8
    qmin, qmax = get_qmin_qmax_for_qType(qtype, symmetric=symmetric)
    zero, scale = compute_scale_zp(np.float32(rmin), np.float32(rmax), qmin, qmax, symmetric=symmetric)
    return np.asarray(scale, np.float32), np.asarray(zero, np.int8 if symmetric else np.uint8)


def replace_site(graph: Graph, site: Site, new: str) -> None:
    """Make the readers of the site's output read ``new`` (typed like it), drop the site's node, and its
    float weight once nothing else reads it."""
    node, weight = site.node, site.node.inputs[1]
    old = node.outputs[0]
    info = graph.values.get(old)
    if info is not None and new not in graph.values:
        graph.set_value_info(new, info.dtype, info.shape)
    graph.replace_all_uses(old, new)
    if node in graph and not any(graph.is_used(o) for o in node.outputs if o):
        graph.remove_node(node)
    if not graph.is_used(weight):
        graph.remove_initializer(weight)


def site_stats(selection: Selection, count: int, saved: int) -> tuple[dict[str, int | float], dict[str, Any]]:
    stats: dict[str, int | float] = {"quantized": count, "bytes_saved": saved}
    details = {"skipped": selection.skipped, "unmatched": selection.unmatched}
    return stats, details


def channel_absmax(
    graph: Graph, names: list[str], feeds: list[dict[str, np.ndarray]], pass_name: str
) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of every value in ``names`` over the calibration feeds."""
    from llmc.calibration import activations

    out: dict[str, np.ndarray] = {}
    for values in checked_activations(activations(graph, names, feeds), pass_name):
        for name, arr in values.items():
            amax = np.abs(arr.reshape(-1, arr.shape[-1])).max(axis=0)
            out[name] = amax if name not in out else np.maximum(out[name], amax)
    if len(out) < len(names):
        raise PassError(pass_name, "the calibration set is empty: no sample ran through the model")
    return out


def checked_activations(
    stream: Iterable[dict[str, np.ndarray]], pass_name: str
) -> Iterator[dict[str, np.ndarray]]:
    """The activations, with onnxruntime's refusal of a sample turned into a message naming the pass."""
    iterator = iter(stream)
    k = 0
    while True:
        try:
            values = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # onnxruntime's errors share no public base class
            text = str(exc).strip()
            first = text.splitlines()[0] if text else repr(exc)
            raise PassError(
                pass_name,
                f"calibration sample {k} does not run through the model: {first}",
                hint="check the shapes and dtypes of the calibration inputs against the model's inputs",
            ) from None
        k += 1
        yield values


def smooth_sites(
    graph: Graph, sites: list[Site], alpha: float | None, ctx: PassContext, pass_name: str
) -> int:
    """SmoothQuant on the sites when ``alpha`` is set (it needs the calibration set): the number of
    activations smoothed."""
    if alpha is None or not sites:
        return 0
    from llmc.calibration import require_calibration

    calibration = require_calibration(ctx, pass_name)
    names = list(dict.fromkeys(site.x for site in sites))
    return smooth(graph, sites, channel_absmax(graph, names, calibration.feeds, pass_name), alpha, pass_name)


def smooth(
    graph: Graph, sites: list[Site], absmax: dict[str, np.ndarray], alpha: float, pass_name: str
) -> int:
    """SmoothQuant: per input channel j of x, s_j = max|x_j|^alpha / max|W_j,:|^(1-alpha) over every
    site reading x; x becomes Mul(x, 1/s) (one node per x) and each W becomes diag(s)·W, so that the
    product is unchanged and the per-tensor activation range no longer follows a few outlier channels.
    Returns how many activations were smoothed."""
    by_x: dict[str, list[Site]] = {}
    for site in sites:
        by_x.setdefault(site.x, []).append(site)
    for x, group in by_x.items():
        amax = absmax[x].astype(np.float64)
        wmax = np.max([np.abs(site.w).max(axis=1) for site in group], axis=0).astype(np.float64)
        s = np.where((amax > 0) & (wmax > 0), amax**alpha / np.maximum(wmax, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, 1e-5, 1e5)
        b = Builder(graph, pass_name, group[0].node)
        inv = b.constant(f"{x}.smooth_inverse", (1.0 / s).astype(np.float32))
        smoothed = b.op1("Mul", [x, inv], name=f"{x}/smooth")
        graph.set_value_info(smoothed, TensorProto.FLOAT, graph.shape(x))
        for site in group:
            graph.set_input(site.node, 0, smoothed)
            site.w = (site.w * s[:, None]).astype(np.float32)
    return len(by_x)
