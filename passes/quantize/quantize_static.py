"""``quantize-static``: int8 QDQ MatMuls with activation ranges calibrated on the spec's calibration data.

``MatMul(x, W)`` with a constant float32 W [K, N] becomes::

    MatMul(DequantizeLinear(QuantizeLinear(x, s, zp), s, zp), DequantizeLinear(Wq, w_scale, w_zp, axis=1))

x's scale and zero point are fixed at compile time from the activations of the calibration samples (uint8
asymmetric, or int8 symmetric with ``symmetric_activations``); W is int8 symmetric per output column (or
per tensor). One Q/DQ pair serves every quantized MatMul that reads the same x. The graph stays standard
ONNX in the QDQ form that onnxruntime's own static quantizer writes, which its graph optimizer turns into
int8 kernels (MatMulIntegerToFloat / QLinearMatMul) at ORT_ENABLE_EXTENDED and above. ``Gemm`` sites become
MatMul (+ Add of C).

Range methods: ``minmax`` (running min/max), ``percentile`` and ``entropy`` (KL divergence, TensorRT's
method). The two histogram methods are onnxruntime's, not re-implemented: its
``onnxruntime.quantization.calibrate.HistogramCollector`` builds and merges the histograms feed by feed
and computes the thresholds; only the feeding (activations read from llmc's IR with
``llmc.calibration.activations``) is llmc's. Scale and zero point come from onnxruntime's
``quant_utils.compute_scale_zp`` (see ``_int8``). ``smooth: alpha`` applies SmoothQuant before the ranges
are measured (on the smoothed activations).

On all-MiniLM-L6-v2 the clipping methods lose: its activations carry real outlier channels, which
percentile (cosine 0.77) and entropy (0.85) cut off, against 0.98 for minmax; quantize-dynamic with
smoothing (0.995) is the better scheme there.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from typing import Literal

import numpy as np
from onnx import TensorProto
from pydantic import Field, field_validator

from llmc.calibration import activations, require_calibration
from llmc.errors import PassError
from llmc.ir import Graph
from llmc.pass_manager import Pass, PassContext, PassResult, register_pass
from llmc.passes.quantize._int8 import (
    Int8Options,
    Site,
    activation_qparams,
    checked_activations,
    quantize_weight,
    replace_site,
    resolve_reduce_range,
    select_sites,
    site_stats,
    smooth_sites,
)
from llmc.rewrite import Builder

Method = Literal["minmax", "percentile", "entropy"]
_DEFAULT_BINS = {"percentile": 2048, "entropy": 512}  # entropy's KL search is quadratic in the bins


def minmax_ranges(stream: Iterable[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """Running (min, max) of every value over the calibration feeds."""
    ranges: dict[str, tuple[float, float]] = {}
    for values in stream:
        for name, arr in values.items():
            lo, hi = float(np.min(arr)), float(np.max(arr))
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))
    return ranges


def histogram_ranges(
    stream: Iterable[dict[str, np.ndarray]],
    method: Literal["percentile", "entropy"],
    *,
    symmetric: bool,
    num_bins: int,
    num_quantized_bins: int = 128,
    percentile: float = 99.99,
) -> dict[str, tuple[float, float]]:
    """(low, high) per value from onnxruntime's HistogramCollector (percentile or entropy thresholds)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector(method, symmetric, num_bins, num_quantized_bins, percentile, "same")
    quiet = io.StringIO()  # the collector prints its progress
    with contextlib.redirect_stdout(quiet):
        for values in stream:
            collector.collect({name: [arr.astype(np.float32, copy=False)] for name, arr in values.items()})
        result = collector.compute_collection_result()
    return {name: (float(r[0]), float(r[1])) for name, r in result.items()}


@register_pass("quantize-static")
class QuantizeStatic(Pass):
    """Rewrites MatMul(x, W const) into MatMul(DQ(Q(x, calibrated scale)), DQ(int8 W per channel))."""

    class Options(Int8Options):
        method: Method = Field(default="minmax", description="activation ranges: minmax, percentile, entropy")
        percentile: float = Field(default=99.99, gt=0, le=100, description="percentile method: kept share")
        num_bins: int | None = Field(
            default=None, ge=128, description="histogram bins (default 2048 percentile, 512 entropy)"
        )
        num_quantized_bins: int = Field(default=128, ge=16, description="entropy: bins of the quantized grid")
        symmetric_activations: bool = Field(
            default=False, description="int8 activations with zero point 0, else uint8 with a zero point"
        )

        @field_validator("num_quantized_bins")
        @classmethod
        def _even(cls, value: int) -> int:
            if value % 2:
                raise ValueError("num_quantized_bins must be even")
            return value

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        selection = select_sites(graph, self.name, o.include, o.exclude, o.min_size, ctx)
        calibration = require_calibration(ctx, self.name)
        smoothed = smooth_sites(graph, selection.sites, o.smooth, ctx, self.name)
        names = list(dict.fromkeys(site.x for site in selection.sites))
        ranges = self._ranges(graph, names, calibration.feeds) if names else {}
        reduce = resolve_reduce_range(o.reduce_range)
        dequantized: dict[str, str] = {}
        saved = 0
        for site in selection.sites:
            if site.x not in dequantized:
                dequantized[site.x] = self._qdq(graph, site, ranges[site.x])
            saved += self._rewrite(graph, site, dequantized[site.x], reduce)
        stats, details = site_stats(selection, len(selection.sites), saved)
        stats.update({"activations": len(names), "samples": len(calibration), "reduce_range": int(reduce)})
        stats["smoothed"] = smoothed
        details["ranges"] = {name: [round(lo, 6), round(hi, 6)] for name, (lo, hi) in sorted(ranges.items())}
        details["method"] = o.method
        return PassResult(changed=bool(selection.sites), stats=stats, details=details)

    def _ranges(
        self, graph: Graph, names: list[str], feeds: list[dict[str, np.ndarray]]
    ) -> dict[str, tuple[float, float]]:
        o = self.options
        stream = checked_activations(activations(graph, names, feeds), self.name)
        if o.method == "minmax":
            ranges = minmax_ranges(stream)
        else:
            ranges = histogram_ranges(
                stream,
                o.method,
                symmetric=o.symmetric_activations,
                num_bins=o.num_bins or _DEFAULT_BINS[o.method],
                num_quantized_bins=o.num_quantized_bins,
                percentile=o.percentile,
            )
        missing = [n for n in names if n not in ranges]
        if missing:
            raise PassError(self.name, "the calibration set is empty: no sample ran through the model")
        return ranges

    def _qdq(self, graph: Graph, site: Site, rng: tuple[float, float]) -> str:
        scale, zero = activation_qparams(rng[0], rng[1], self.options.symmetric_activations)
        b = Builder(graph, self.name, site.node)
        s = b.constant(f"{site.x}.scale", scale)
        zp = b.constant(f"{site.x}.zero_point", zero)
        q = b.op1("QuantizeLinear", [site.x, s, zp], name=f"{site.x}/quantize")
        graph.set_value_info(
            q, TensorProto.INT8 if zero.dtype == np.int8 else TensorProto.UINT8, graph.shape(site.x)
        )
        x_dq = b.op1("DequantizeLinear", [q, s, zp], name=f"{site.x}/dequantize")
        graph.set_value_info(x_dq, TensorProto.FLOAT, graph.shape(site.x))
        return x_dq

    def _rewrite(self, graph: Graph, site: Site, x_dq: str, reduce: bool) -> int:
        q, scale = quantize_weight(site.w, self.options.per_channel, reduce)
        b = Builder(graph, self.name, site.node)
        inputs = [
            b.constant(f"{site.weight}.int8", q),
            b.constant(f"{site.weight}.scale", scale),
            b.constant(f"{site.weight}.zero_point", np.zeros(scale.shape, np.int8)),
        ]
        w_dq = b.op1(
            "DequantizeLinear", inputs, axis=1 if scale.ndim else None, name=f"{site.weight}/dequantize"
        )
        graph.set_value_info(w_dq, TensorProto.FLOAT, site.w.shape)
        y = b.op1("MatMul", [x_dq, w_dq])
        if site.bias:
            y = b.op1("Add", [y, site.bias])
        replace_site(graph, site, y)
        return int(site.w.nbytes - q.nbytes - scale.nbytes)
