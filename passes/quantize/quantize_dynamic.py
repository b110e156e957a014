"""``quantize-dynamic``: int8 weights and activations quantized at run time, as standard ONNX.

``MatMul(x, W)`` with a constant float32 W [K, N] becomes the form onnxruntime's own dynamic quantizer
(``quantize_dynamic``, QOperator format) writes::

    xq, x_scale, x_zp = DynamicQuantizeLinear(x)                  # uint8, per tensor, once per x
    y = Cast(MatMulInteger(xq, Wq, x_zp, w_zp), to=float) * (x_scale * w_scale)

with Wq int8 symmetric (w_zp = 0) per output channel (w_scale [N]) or per tensor. ``Gemm(A, B, C)``
(transA = 0) is the same with transB and alpha folded into the weight, and ``+ C`` after. The graph stays
standard ONNX; onnxruntime fuses it at ORT_ENABLE_ALL (MatMulIntegerToFloat, DynamicQuantizeMatMul) and
the CPU target can legalize it into ``com.microsoft.DynamicQuantizeMatMul`` (cpu-dynamic-quantize-matmul).

``smooth: alpha`` applies SmoothQuant first (see ``_int8.smooth``): per-channel activation maxima from the
spec's calibration data move outlier channels into the weights. BERT-like encoders need it: one channel of
LayerNorm/Gelu outputs reaches 20-30 while the rest stay below 4, and the per-tensor uint8 activation step
follows that channel (all-MiniLM-L6-v2: cosine to fp32 0.984 without, 0.995 with alpha 0.8).

``reduce_range: auto`` keeps weights in [-64, 64] on x86 CPUs with AVX2 and without VNNI, where full-range
u8·s8 products saturate (see ``_int8``); the choice is made on the compiling host and reported in the stats.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from llmc.ir import Graph
from llmc.pass_manager import Pass, PassContext, PassResult, register_pass
from llmc.passes.quantize._int8 import (
    Int8Options,
    Site,
    quantize_weight,
    replace_site,
    resolve_reduce_range,
    select_sites,
    site_stats,
    smooth_sites,
)
from llmc.rewrite import Builder


@register_pass("quantize-dynamic")
class QuantizeDynamic(Pass):
    """Rewrites MatMul(x, W const) into DynamicQuantizeLinear(x) -> MatMulInteger(int8 W) -> Cast -> Mul."""

    Options = Int8Options

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        selection = select_sites(graph, self.name, o.include, o.exclude, o.min_size, ctx)
        reduce = resolve_reduce_range(o.reduce_range)
        smoothed = smooth_sites(graph, selection.sites, o.smooth, ctx, self.name)
        quantized_x: dict[str, tuple[str, str, str]] = {}  # x -> DynamicQuantizeLinear outputs
        saved = 0
        for site in selection.sites:
            saved += self._rewrite(graph, site, quantized_x, reduce)
        stats, details = site_stats(selection, len(selection.sites), saved)
        stats.update({"reduce_range": int(reduce), "smoothed": smoothed})
        return PassResult(changed=bool(selection.sites), stats=stats, details=details)

    def _rewrite(
        self, graph: Graph, site: Site, quantized_x: dict[str, tuple[str, str, str]], reduce: bool
    ) -> int:
        q, scale = quantize_weight(site.w, self.options.per_channel, reduce)
        b = Builder(graph, self.name, site.node)
        if site.x not in quantized_x:
            xq, xs, xzp = b.op(
                "DynamicQuantizeLinear", [site.x], outputs=3, name=f"{site.x}/dynamic_quantize"
            )
            graph.set_value_info(xq, TensorProto.UINT8, graph.shape(site.x))
            graph.set_value_info(xs, TensorProto.FLOAT, ())
            graph.set_value_info(xzp, TensorProto.UINT8, ())
            quantized_x[site.x] = (xq, xs, xzp)
        xq, xs, xzp = quantized_x[site.x]
        qname = b.constant(f"{site.weight}.int8", q)
        wzp = b.constant(f"{site.weight}.zero_point", np.zeros(scale.shape, np.int8))
        wscale = b.constant(f"{site.weight}.scale", scale)
        acc = b.op1("MatMulInteger", [xq, qname, xzp, wzp])
        as_float = b.op1("Cast", [acc], to=TensorProto.FLOAT)
        scales = b.op1("Mul", [xs, wscale])
        y = b.op1("Mul", [as_float, scales])
        if site.bias:
            y = b.op1("Add", [y, site.bias])
        replace_site(graph, site, y)
        return int(site.w.nbytes - q.nbytes - scale.nbytes)
