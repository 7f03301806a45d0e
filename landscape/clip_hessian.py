"""The Hessian of the calibration loss with respect to the clipping values.

Two curvatures exist and both matter:

* ``method="ste"`` — the Hessian of the straight-through surrogate, by forward-over-reverse
  autodiff (n HVPs with the basis vectors, ``ClipLoss.hessian``), compiled once per network and
  site layout. This is what the LAPQ authors computed. Rounding is the identity in its
  derivative, so the surrogate is smooth in α except where an element meets the clip
  boundary: there ∂x̂/∂α jumps between the inside value (round(z) − z)·∂Δ/∂α and the clipped
  one (±1 on the signed grids). At α = max|x| (``init("max")``) the largest element sits on
  the boundary, one ulp of x/Δ decides its side, and two compilations that round differently
  (data passed as arguments, as ClipLoss's programs take them, or folded in as constants by a
  closure under ``jax.jit``) return different one-sided gradients and Hessians. Take the STE
  curvature at an interior α, such as the Lp init.
* ``method="fd"`` — the curvature of the true, piecewise-constant loss by central second
  differences at a relative step h_i = step·α_i (default ``step=0.02``, i.e. 2% of each α;
  the loss is flat between rounding events, so much smaller steps measure noise)::

      H_ii = [L(α + h_i e_i) − 2L(α) + L(α − h_i e_i)] / h_i²
      H_ij = [L(α+h_i e_i+h_j e_j) − L(α+h_i e_i) − L(α+h_j e_j) + 2L(α)
              − L(α−h_i e_i) − L(α−h_j e_j) + L(α−h_i e_i−h_j e_j)] / (2 h_i h_j)

  (second-order accurate; n² + n + 1 evaluations, all through ``loss.batch``). For a
  piecewise-constant loss this is the curvature at the scale of the step, not a limit: with
  few calibration images few elements cross a rounding boundary within a step, single jumps
  dominate, and entries can change sign and magnitude from one step to the next. Compare two
  steps (e.g. 2 % and 5 %) before reading an FD Hessian as curvature; more images smooth it.
"""

from __future__ import annotations

import warnings

import numpy as np

from landscape import checks, quantizers

METHODS = ("ste", "fd")
DEFAULT_STEP = 0.02


def clip_hessian(loss, alpha, *, method: str = "ste", step: float | None = None) -> np.ndarray:
    """Symmetric (n, n) Hessian of ``loss`` at ``alpha`` (see module docstring).

    Args:
      loss: a :class:`landscape.ClipLoss` (``fd`` needs only ``.batch`` and ``.n``).
      alpha: (n,) clipping values, all > 0.
      method: "ste" (autodiff of the surrogate) or "fd" (true loss, finite differences).
      step: relative step for "fd" in (0, 1), a Python or numpy number (default 0.02); not used
        by "ste".
    Returns:
      (n, n) float64 numpy array, exactly symmetric.

    The losses are float32: an "fd" second difference (or mixed difference, for an off-diagonal
    entry) that is non-zero but within a few roundings of L is noise, and a RuntimeWarning names
    its sites (pairs). One that is exactly 0 is
    kept as 0: the true loss is piecewise constant and often flat at the step (it is also what a
    smooth loss gives when h_i²·H_ii is below L's rounding, e.g. for α near 1e-3 at step 0.02).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed; use one of {METHODS}")
    alpha = np.asarray(alpha, np.float64)
    if alpha.shape != (loss.n,):
        raise ValueError(f"alpha has shape {alpha.shape}; expected ({loss.n},)")
    if not np.all(quantizers.valid_alpha(alpha)):
        raise ValueError(f"alpha must be in (0, {quantizers.ALPHA_MAX:g}] everywhere to take a Hessian")
    if method == "ste":
        if step is not None:
            raise ValueError("step applies to method='fd' only")
        h = np.asarray(loss.hessian(alpha.astype(np.float32)), np.float64)
        return 0.5 * (h + h.T)
    step = DEFAULT_STEP if step is None else step
    if not checks.is_real(step) or not 0 < step < 1:  # numpy scalars too (np.float32(0.02))
        raise ValueError(f"step={step!r} must be a relative step in (0, 1)")
    return _finite_difference_hessian(loss, alpha, float(step))


def fd_points(alpha: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation points of the FD Hessian: (n² + n + 1, n) and the steps h (n,).

    Rows: α; α ± h_i e_i (2n); α + h_i e_i + h_j e_j and α − h_i e_i − h_j e_j (i < j).
    """
    n = alpha.shape[0]
    h = step * alpha
    eye = np.diag(h)
    iu, ju = np.triu_indices(n, k=1)
    pairs = eye[iu] + eye[ju]
    points = np.concatenate([alpha[None], alpha + eye, alpha - eye, alpha + pairs, alpha - pairs])
    return points, h


def _finite_difference_hessian(loss, alpha, step):
    n = alpha.shape[0]
    points, h = fd_points(alpha, step)
    values = np.asarray(loss.batch(points.astype(np.float32)), np.float64)
    if not np.all(np.isfinite(values)):
        raise FloatingPointError("non-finite loss at a finite-difference point; use a smaller step")
    f0 = values[0]
    fp, fm = values[1:n + 1], values[n + 1:2 * n + 1]
    m = n * (n - 1) // 2
    fpp, fmm = values[2 * n + 1:2 * n + 1 + m], values[2 * n + 1 + m:]
    # float32 losses: a second difference within a few roundings of L is noise, not curvature
    # (α spanning 1e-3 … 10 on a smooth quadratic gave 1848× relative errors at step 0.05)
    second = fp - 2 * f0 + fm
    noise = 8 * np.finfo(np.float32).eps * max(abs(f0), np.max(np.abs(values)))
    unresolved = np.flatnonzero((second != 0) & (np.abs(second) <= noise))
    if unresolved.size:
        warnings.warn(f"clip_hessian(method='fd'): the second differences of sites {unresolved.tolist()[:8]} are "
                      f"within float32 rounding of the loss ({noise:.2g}), so their curvature is noise at "
                      f"step={step:g}; a larger step, or method='ste', resolves it", RuntimeWarning, stacklevel=3)
    hess = np.empty((n, n))
    hess[np.diag_indices(n)] = second / h**2
    iu, ju = np.triu_indices(n, k=1)
    mixed = fpp - fp[iu] - fp[ju] + 2 * f0 - fm[iu] - fm[ju] + fmm
    # the same test for the coupling terms, which the separability measures read: 7 values, twice
    # the rounding of the diagonal's 3 (a constant offset of 20 on a smooth quadratic made
    # H_01 = 0.01 read 0.0119, silently)
    unresolved = np.flatnonzero((mixed != 0) & (np.abs(mixed) <= 2 * noise))
    if unresolved.size:
        pairs = [(int(iu[k]), int(ju[k])) for k in unresolved[:8]]
        warnings.warn(f"clip_hessian(method='fd'): the mixed differences of site pairs {pairs} are within float32 "
                      f"rounding of the loss ({2 * noise:.2g}), so their coupling is noise at step={step:g}; a "
                      "larger step, or method='ste', resolves it", RuntimeWarning, stacklevel=3)
    off = mixed / (2 * h[iu] * h[ju])
    hess[iu, ju] = off
    hess[ju, iu] = off
    return hess
