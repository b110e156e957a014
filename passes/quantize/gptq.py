"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): weight-only quantization that minimises the layer's output error ‖XW − XŴ‖ instead of the
weight error, using the Hessian H = XᵀX of the layer's inputs over calibration tokens.

Rows of W [K, N] (one per input feature) are quantized one at a time; the rounding error of a row is spread
over the rows not yet quantized through the upper Cholesky factor of H⁻¹ (the optimal brain surgeon
update), in lazy batches of 128 rows whose updates reach the rest of W at once (and, inside a batch,
sub-batches of 32 rows: the same sums in another grouping, with less memory traffic per row). Scales are blocked like
round-to-nearest (``block`` rows of K per scale, one per column): a block's scale and zero point come from
the current, error-updated weights when quantization reaches its first row (the reference's "groupsize";
the reference reads the block from W, which misses the updates of earlier rows of the same lazy batch; here
the block is read with them). With ``act_order`` rows go by decreasing H diagonal and the block grids are
fixed beforehand from the original weights (the reference's "static groups"), so that each block keeps one
scale whatever the order and the result is still the plain blocked DequantizeLinear form. Input features
that never fire (diag H = 0) get weight 0 and unit curvature, as in the reference.

Hand-written in numpy: the reference (``gptq.py`` of IST-DASLab/gptq, AutoGPTQ) is PyTorch code bound to
``nn.Linear`` modules, and the algorithm is forty lines over a [K, N] array.
"""

from __future__ import annotations

import numpy as np

from .quantize_weights import block_grid, grid_codes, grid_dtype

# Rows whose error updates go row by row inside a lazy batch; the rest of the batch gets them as one product
# at the end of each sub-batch (the same arithmetic as the reference's row-by-row updates, regrouped).
_SUB_BATCH = 32


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block: int,
    symmetric: bool,
    damp: float = 0.01,
    *,
    act_order: bool = False,
    lazy_batch: int = 128,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GPTQ of W [K, N] given H = XᵀX [K, K]: (q [K, N], scale [K/B, N], zero_point [K/B, N] or None).

    Same return convention as ``quantize_blocks``; ``damp`` adds ``damp·mean(diag H)`` to the diagonal.
    Raises ``np.linalg.LinAlgError`` when H is not positive definite even after dampening.
    """
    k, n = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"the Hessian is {list(hessian.shape)}, the weight has K={k}")
    if k % block:
        raise ValueError(f"K={k} is not a multiple of block {block}")
    weight = w.astype(np.float64)  # copies: both are updated in place
    h = hessian.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    weight[dead, :] = 0.0
    static = block_grid(weight.reshape(k // block, block, n), bits, symmetric) if act_order else None
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    weight, h = weight[order], h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    codes, scale, zero = _sweep(
        weight, upper_cholesky_of_inverse(h), order, bits, block, symmetric, static, max(lazy_batch, block)
    )
    q = np.empty_like(codes)
    q[order] = codes
    dtype = grid_dtype(bits, symmetric)
    return q.astype(dtype), scale.astype(np.float32), None if zero is None else zero.astype(dtype)


def upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U upper triangular with UᵀU = H⁻¹ (the reference's cholesky → cholesky_inverse → cholesky(upper))."""
    lower_inv = np.linalg.inv(np.linalg.cholesky(h))  # L⁻¹: H⁻¹ = L⁻ᵀ L⁻¹
    return np.linalg.cholesky(lower_inv.T @ lower_inv).T


def _sweep(
    weight: np.ndarray,
    hinv: np.ndarray,
    order: np.ndarray,
    bits: int,
    block: int,
    symmetric: bool,
    static: tuple[np.ndarray, np.ndarray | None] | None,
    lazy: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize the rows of ``weight`` (already in quantization order) with error feedback."""
    k, n = weight.shape
    if static is not None:
        scale, zero = static
    else:
        scale = np.empty((k // block, n), np.float32)
        zero = None if symmetric else np.empty((k // block, n))
    codes = np.empty((k, n))
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        rows = weight[i1:i2]  # a view: the batch's own updates land here
        errors = np.empty_like(rows)
        h1 = hinv[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, _SUB_BATCH):
            j2 = min(j1 + _SUB_BATCH, i2 - i1)
            for i in range(j1, j2):
                row = i1 + i
                g = order[row] // block
                if static is None and row % block == 0:  # rows[i:] hold every update of the rows before
                    s, z = block_grid(rows[i : i + block][None], bits, symmetric)
                    scale[g] = s[0]
                    if zero is not None:
                        zero[g] = z[0]
                zg = None if zero is None else zero[g]
                codes[row] = grid_codes(rows[i], scale[g], zg, bits, symmetric)
                restored = (codes[row] - (0.0 if zg is None else zg)) * scale[g]
                errors[i] = (rows[i] - restored) / h1[i, i]
                rows[i + 1 : j2] -= np.outer(h1[i, i + 1 : j2], errors[i])
            rows[j2:] -= h1[j1:j2, j2:].T @ errors[j1:j2]
        weight[i2:] -= hinv[i1:i2, i2:].T @ errors
    return codes, scale, zero
