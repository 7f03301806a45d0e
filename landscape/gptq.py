"""GPTQ: round weights one input row at a time, pushing each row's error onto the rows not yet
rounded (Frantar et al., ICLR 2023; the Optimal Brain Quantization update of Frantar & Alistarh,
2022).

A layer's output error is the quadratic form of :mod:`landscape.rounding`. With the input
statistics G = PᵀP/M, B = PᵀY/M, the damping λ = ``damp`` · mean diag G and H = G + λI, the
damped objective is

    mean over rows of ‖P Ŵ − Y‖² + λ ‖Ŵ − W‖²  =  Σ_c (ŵ_c − w*_c)ᵀ H (ŵ_c − w*_c) + const,
    W* = H⁻¹ (B + λ W)

(λ keeps H invertible and W* near the float kernel W where G is singular). With the float
network's inputs (``inputs="float"``) B = G W, so W* = W: the paper's objective, W's own output
as the target. (The reference code feeds each block the outputs of the blocks quantized before
it and keeps W's output on those inputs as the target, W* = W with G from them: a third variant,
not offered; activations stay float there.) With
inputs from the network rounded so far (the default, as in AdaRound), W* also corrects the
error the earlier layers and the activation quantizers left in the inputs: on the MNIST resnet20
(``bench/rounding.py``) that is 99.18 % against 89.53 % at W2A4, 98.95 % against 85.02 % at W3A3,
and 99.44 % against 98.96 % at W2 with FP32 activations.

The K input rows of the kernel (K = fan-in, W as (K, C)) are rounded in turn. Rounding row k to
the grid (nearest code of the current value, clipped to the code range) changes the error by
the least when the not-yet-rounded rows F move by the least-squares correction

    W_F ← W_F + H_FF⁻¹ H_Fk (w_k − q_k),

the same for every output channel (H does not depend on c). With U the upper Cholesky factor of
H⁻¹ (H⁻¹ = UᵀU) the correction of the remaining rows is −U[k, F]ᵀ (w_k − q_k) / U[k, k]: one
factorisation per layer, no re-solve (the paper's identity; the tests check it against the
explicit re-solve). ``act_order`` rounds the rows in order of decreasing H_kk (the inputs with
the most energy first, "act-order" in the reference code), which usually helps.

Everything is float64 on the host: K ≤ a few thousand for a conv, and the sequential update is
K rank-1 updates of a (K, C) array.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from landscape import checks, runtime
from landscape.rounding import (
    RoundingFit,
    RoundingResult,
    check_number,
    input_statistics,
    keep_better,
    nearest_codes,
    round_network,
    zero_code,
)

__all__ = ["gptq", "gptq_layer", "gptq_rows"]


def gptq_rows(w_star, H, scale, offset, lo: int, hi: int, order=None, block: int = 128,
              pinned=None) -> np.ndarray:
    """Integer codes (K, C) of W* rounded row by row with GPTQ's error feedback.

    Args:
        w_star: (K, C) the unconstrained optimum W* of the quadratic; H: (K, K) its SPD matrix.
        scale, offset: Δ and the grid's offset, scalars or (C,); lo, hi: the code range.
        order: permutation of the K rows (default: 0, 1, …, K − 1).
        block: rows updated one by one inside a block; the rows after it receive the block's
            errors in one (K − end, block) × (block, C) product (the paper's lazy batch update,
            the same codes up to float rounding; 2.5× faster at K = 4608, C = 512 on 2 cores).
        pinned: optional (K, C) bool, entries whose code is the grid's zero level whatever W*
            says (a pruned weight stays 0; needs a grid with a zero level, Δ·z + offset = 0 for
            an integer z in [lo, hi]). Setting one is a rounding like any other: its error is
            fed back to the rows after it, as SparseGPT prunes and compensates.
    """
    block = check_number(block, "block", integer=True)
    w = np.array(w_star, np.float64)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"w_star must be a non-empty (K, C) matrix, got shape {w.shape}")
    k = w.shape[0]
    H = np.asarray(H, np.float64)
    if H.shape != (k, k):
        raise ValueError(f"H has shape {H.shape}; w_star has K = {k} rows, so H must be ({k}, {k})")
    for name, a in (("w_star", w), ("H", H)):
        if not np.all(np.isfinite(a)):  # a NaN spreads through the error feedback to whole channels
            raise ValueError(f"{name} has {int(np.sum(~np.isfinite(a)))} NaN/inf entries; GPTQ needs finite values")
    if not lo <= hi:
        raise ValueError(f"the code range lo={lo}, hi={hi} is empty; need lo <= hi")
    if not np.all(np.asarray(scale, np.float64) > 0):
        raise ValueError(f"scale (Δ) must be positive, got min {np.min(scale)}")
    order = np.arange(k) if order is None else np.asarray(order)
    if not np.issubdtype(order.dtype, np.integer) or sorted(order.tolist()) != list(range(k)):
        raise ValueError(f"order must be a permutation of range({k}) (integers), got {order.dtype} "
                         f"{order.tolist()[:8]}")
    Hp = H[np.ix_(order, order)]
    w = w[order]
    U = np.linalg.cholesky(np.linalg.inv(Hp)).T  # upper triangular, UᵀU = H⁻¹ (numpy gives L = Uᵀ)
    scale = np.broadcast_to(np.asarray(scale, np.float64), (w.shape[1],))
    offset = np.broadcast_to(np.asarray(offset, np.float64), (w.shape[1],))
    zero = None
    if pinned is not None:
        pinned = np.asarray(pinned, bool)
        if pinned.shape != w.shape:
            raise ValueError(f"pinned has shape {pinned.shape}; w_star's is {w.shape}")
        pinned = pinned[order]
        zero = zero_code(scale, offset, lo, hi)
        if zero is None and np.any(pinned):
            raise ValueError("pinned entries need a grid with a zero level (offset/Δ an integer code in "
                             f"[{lo}, {hi}]); this grid has none (the midrise grid): use weight_grid='midtread'")
    codes = np.empty_like(w)
    for start in range(0, k, block):
        end = min(start + block, k)
        errors = np.empty((end - start, w.shape[1]))
        for i in range(start, end):
            q = np.clip(np.round((w[i] - offset) / scale), lo, hi)
            if zero is not None:
                q = np.where(pinned[i], zero, q)
            codes[i] = q
            errors[i - start] = (w[i] - (q * scale + offset)) / U[i, i]
            w[i + 1:end] -= np.outer(U[i, i + 1:end], errors[i - start])
        w[end:] -= U[start:end, end:].T @ errors
    out = np.empty_like(codes)
    out[order] = codes
    return out.astype(np.int32)


def _checked_options(damp, act_order) -> float:
    if not isinstance(act_order, bool):
        raise ValueError(f"act_order={act_order!r} must be True or False")
    return check_number(damp, "damp")


def gptq_layer(x, y, kernel, scale, offset, lo: int, hi: int, gemm, *, damp: float = 0.01,
               act_order: bool = True, precision: str = "highest") -> RoundingFit:
    """Round one layer by GPTQ (see the module docstring).

    Args:
        x: the layer's inputs (N, ...); y: its float outputs ``gemm(x_float, kernel)`` (N, ..., C).
        kernel: the float kernel W (..., C); scale, offset: Δ and the grid's offset, scalars or
            (C,); lo, hi: the code range.
        gemm: the layer's product ``gemm(x, w)``, linear in w.
        damp: λ as a fraction of mean diag G (the reference's 1 %).
        act_order: round rows in order of decreasing H_kk.
        precision: matmul/convolution precision of the layer's products.

    Returns:
        :class:`~landscape.rounding.RoundingFit` (round-to-nearest kept if GPTQ reconstructs worse).
    """
    damp = _checked_options(damp, act_order)
    runtime.check_precision(precision, "gptq_layer")
    w = np.asarray(kernel, np.float64)
    G, B, _ = input_statistics(x, y, w.shape, gemm, precision=precision)
    k, channels = G.shape[0], w.shape[-1]
    wm = w.reshape(k, channels)
    lam = damp * float(np.mean(np.diag(G))) or damp  # an all-zero input still gets an SPD H
    H = G + lam * np.eye(k)
    w_star = np.linalg.solve(H, B + lam * wm)
    order = np.argsort(-np.diag(H), kind="stable") if act_order else None
    # A pruned weight (exactly 0: an N:M network's, or adaprune's) stays 0 where the grid has a
    # zero level: the error feedback would otherwise un-prune it (the midrise grid has no 0).
    has_zero = zero_code(scale, offset, lo, hi) is not None
    pinned = (wm == 0) if has_zero and np.any(wm == 0) else None
    codes = gptq_rows(w_star, H, scale, offset, lo, hi, order, pinned=pinned).reshape(w.shape)
    scale32, offset32 = np.asarray(scale, np.float32), np.asarray(offset, np.float32)
    nearest = nearest_codes(np.asarray(kernel, np.float32), scale32, offset32, np.float32(lo), np.float32(hi))
    with jax.default_matmul_precision(precision):
        return keep_better(x, y, gemm, np.asarray(codes, np.float32), np.asarray(nearest), scale32, offset32)


def gptq(loss, alpha, *, num_images: int | None = None, inputs: str = "quantized", damp: float = 0.01,
         act_order: bool = True) -> RoundingResult:
    """GPTQ every quantized weight site of ``loss`` on the grid that ``alpha`` sets.

    Args:
        loss: a :class:`~landscape.ClipLoss` without bias correction.
        alpha: (n,) clipping vector, e.g. ``loss.init("mse")`` or ``lapq(loss).alpha``.
        num_images: calibration images recorded: ``num_images`` of the loss's set spread over it
            (:func:`landscape.data.spread_rows`; at most its size; default None: 256, or all
            when it has fewer).
        inputs: "quantized" (inputs from the network rounded so far, activations quantized at
            α) or "float" (the float network's, W* = W: the paper's objective).
        damp, act_order: see :func:`gptq_layer`. Every product runs at the loss's precision.

    Returns:
        :class:`~landscape.rounding.RoundingResult` (``method="gptq"``).
    """
    checks.check_clip_loss(loss, "gptq")
    _checked_options(damp, act_order)  # before any recording
    rule = functools.partial(gptq_layer, damp=damp, act_order=act_order, precision=loss.precision)
    return round_network(loss, alpha, rule, method="gptq", num_images=num_images, inputs=inputs)
