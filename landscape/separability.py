"""How far a loss over clipping values is from a sum of one-dimensional losses.

LAPQ's argument (Nahshan et al.) is that at mild quantization L(α) ≈ Σ_i L_i(α_i), so clipping values
can be chosen layer by layer, while at low bit widths the sites couple and must be chosen jointly.
This module measures that coupling four ways, all model-independent:

* from a Hessian H (n, n) — :func:`separability`: the off-diagonal mass ‖H − diag H‖_F / ‖H‖_F and
  the pairwise couplings |H_ij| / √|H_ii H_jj| and |H_ij| / min(|H_ii|, |H_jj|);
* from samples of the loss — :func:`separability_index`: the additive-separability statistic γ and
  its t-statistic T (arXiv:1301.5962, as used by the LAPQ reference code);
* from a 2-D grid of losses over two sites — :func:`anova_interaction` (the two-way ANOVA
  interaction) and :func:`flat_fraction` (how much of the grid is near its minimum);
* from a two-site slice — :func:`gaussian_curvature`, K = det H / (1 + ‖∇L‖²)².
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from landscape import checks

__all__ = [
    "SeparabilityIndex",
    "SeparabilityReport",
    "anova_interaction",
    "flat_fraction",
    "gaussian_curvature",
    "separability",
    "separability_index",
]


def _fmt(x) -> str:
    return f"{x:.4g}" if np.isfinite(x) else str(x)


# --------------------------------------------------------------------------------------------------
# Hessian-based measures


@dataclass(frozen=True, repr=False)
class SeparabilityReport:
    """Coupling statistics of a symmetric matrix H (n, n); see :func:`separability`.

    Attributes:
        offdiag_ratio: ‖H − diag H‖_F / ‖H‖_F ∈ [0, 1]; 0 iff H is diagonal (0 for H = 0).
        offdiag_l1_ratio: Σ_{i≠j} |H_ij| / Σ_i |H_ii| (the reference's second mass measure).
        coupling: (n, n) |H_ij| / √|H_ii H_jj|, 1 on the diagonal; NaN where the denominator is 0.
        coupling_min: (n, n) |H_ij| / min(|H_ii|, |H_jj|), the normalisation of the LAPQ reference's
            heat maps; NaN where the denominator is 0.
        mean_coupling: mean of ``coupling`` over off-diagonal pairs with a non-zero denominator.
        mean_coupling_min: the same for ``coupling_min``.
        eigenvalues: (n,) eigenvalues, descending.
        condition_number: λ_max / λ_min if H is positive definite, else inf (a flat or descending
            direction makes the quadratic basin unbounded, so no finite condition exists).
        abs_condition_number: max|λ| / min|λ| (the 2-norm condition number; inf if H is singular).
        trace: tr H.
        asymmetry: max |H − Hᵀ| / max |H| of the input (H is symmetrised before the analysis).
        n: dimension.
    """

    offdiag_ratio: float
    offdiag_l1_ratio: float
    coupling: np.ndarray
    coupling_min: np.ndarray
    mean_coupling: float
    mean_coupling_min: float
    eigenvalues: np.ndarray
    condition_number: float
    abs_condition_number: float
    trace: float
    asymmetry: float
    n: int

    def __repr__(self) -> str:
        ev = self.eigenvalues
        return "\n".join(
            [
                f"SeparabilityReport(n={self.n})",
                f"       offdiag_ratio: {_fmt(self.offdiag_ratio)}   (|H - diag H|_F / |H|_F)",
                f"    offdiag_l1_ratio: {_fmt(self.offdiag_l1_ratio)}   (sum |offdiag| / sum |diag|)",
                f"       mean_coupling: {_fmt(self.mean_coupling)}   (|H_ij| / sqrt|H_ii H_jj|)",
                f"   mean_coupling_min: {_fmt(self.mean_coupling_min)}   (|H_ij| / min(|H_ii|, |H_jj|))",
                f"         eigenvalues: [{_fmt(ev[-1])}, {_fmt(ev[0])}]",
                f"    condition_number: {_fmt(self.condition_number)}",
                f"               trace: {_fmt(self.trace)}",
            ]
        )


def _as_symmetric(H, sym_tol):
    sym_tol = checks.check_positive(sym_tol, "sym_tol", allow_zero=True)
    H = np.asarray(H, dtype=np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] == 0:
        raise ValueError(f"H must be a non-empty square (n, n) matrix, got shape {H.shape}")
    if not np.all(np.isfinite(H)):
        raise ValueError("H contains NaN or inf; a Hessian must be finite")
    scale = np.max(np.abs(H))
    asym = np.max(np.abs(H - H.T))
    if asym > sym_tol * max(scale, np.finfo(np.float64).tiny):
        raise ValueError(
            f"H is not symmetric: max |H - H^T| = {asym:.3g} exceeds sym_tol * max|H| = {sym_tol * scale:.3g}"
        )
    return 0.5 * (H + H.T), (asym / scale if scale > 0 else 0.0)


def _pair_ratio(numerator, denominator):
    with np.errstate(divide="ignore", invalid="ignore"):
        out = numerator / denominator
    return np.where(denominator > 0, out, np.nan)


def _offdiag_mean(C):
    n = C.shape[0]
    vals = C[~np.eye(n, dtype=bool)]
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else float("nan")


def separability(H, *, sym_tol: float = 1e-2) -> SeparabilityReport:
    """Coupling statistics of a Hessian over clipping values.

    Args:
        H: (n, n) symmetric finite matrix, e.g. ``clip_hessian(loss, alpha)``.
        sym_tol: allowed max |H − Hᵀ| relative to max |H|. float32 autodiff through a quantized
            network leaves ~1e-4 (a ClipLoss STE Hessian), finite differences more; the default
            only rejects matrices that are not Hessians. H is symmetrised before the analysis.

    Returns:
        :class:`SeparabilityReport` with offdiag_ratio = ‖H − diag H‖_F / ‖H‖_F, the coupling
        matrices |H_ij| / √|H_ii H_jj| and |H_ij| / min(|H_ii|, |H_jj|), their off-diagonal means,
        eigenvalues, condition number and trace.

    Raises:
        ValueError: H not square, not finite, or not symmetric within ``sym_tol``.
    """
    H, asymmetry = _as_symmetric(H, sym_tol)
    n = H.shape[0]
    d = np.abs(np.diag(H))
    off = H - np.diag(np.diag(H))
    total = np.linalg.norm(H)
    offdiag_ratio = float(np.linalg.norm(off) / total) if total > 0 else 0.0
    dsum = d.sum()
    offsum = np.abs(off).sum()
    offdiag_l1_ratio = float(offsum / dsum) if dsum > 0 else (0.0 if offsum == 0 else float("inf"))
    A = np.abs(H)
    coupling = _pair_ratio(A, np.sqrt(np.outer(d, d)))
    coupling_min = _pair_ratio(A, np.minimum(d[:, None], d[None, :]))
    eig = np.linalg.eigvalsh(H)[::-1]
    cond = float(eig[0] / eig[-1]) if eig[-1] > 0 else float("inf")
    absev = np.abs(eig)
    abs_cond = float(absev.max() / absev.min()) if absev.min() > 0 else float("inf")
    return SeparabilityReport(
        offdiag_ratio=offdiag_ratio,
        offdiag_l1_ratio=offdiag_l1_ratio,
        coupling=coupling,
        coupling_min=coupling_min,
        mean_coupling=_offdiag_mean(coupling),
        mean_coupling_min=_offdiag_mean(coupling_min),
        eigenvalues=eig,
        condition_number=cond,
        abs_condition_number=abs_cond,
        trace=float(np.trace(H)),
        asymmetry=float(asymmetry),
        n=n,
    )


# --------------------------------------------------------------------------------------------------
# The sampling test


@dataclass(frozen=True, repr=False)
class SeparabilityIndex:
    """Result of :func:`separability_index`.

    Attributes:
        gamma: mean over repeats of γ = mean_s g_s (0 in expectation iff L is additively separable).
        T: the repeats' T_r = √N γ_r / s_r (s_r the sample standard deviation of g, ddof=1)
            combined as Σ_r T_r / √k (Stouffer's method): a z-score whenever E[g] = 0 with g not
            identically 0 (approximately N(0, 1), whatever the number of repeats). It equals the
            reference's T at k = 1 (the default) only: the reference pools the samples of
            repeats 1..j, takes T_j = √(jN) γ / max(s, 1e-2) and reports mean_j T_j / √j, which
            stays on one repeat's scale where Stouffer's grows as √k under a real effect
            (f = α₁α₂ + 0.1 α₂², same samples: ours / the reference's 1.39 at k = 3, 2.32 at
            k = 7). An exactly additive L makes every g_s vanish to rounding, and T is then 0
            (s_r is floored at float32 rounding), not a draw from N(0, 1).
        gamma_normalized: gamma / L_max², L_max = max |L| over all evaluated points (scale-free).
        gammas, Ts: (n_repeats,) per-repeat values.
        g: (n_repeats, n_samples) the samples g_s.
        n_samples, n_repeats, n_evals: sample size, repeats and loss evaluations (n_samples·(n + 2)
            per repeat).
    """

    gamma: float
    T: float
    gamma_normalized: float
    gammas: np.ndarray
    Ts: np.ndarray
    g: np.ndarray = field(repr=False)
    n_samples: int = 0
    n_repeats: int = 0
    n_evals: int = 0

    def __repr__(self) -> str:
        return "\n".join(
            [
                f"SeparabilityIndex(n_samples={self.n_samples}, n_repeats={self.n_repeats}, "
                f"n_evals={self.n_evals})",
                f"             gamma: {_fmt(self.gamma)}",
                f"  gamma_normalized: {_fmt(self.gamma_normalized)}   (gamma / max|L|^2)",
                f"                 T: {_fmt(self.T)}",
            ]
        )


def _batch_fn(loss):
    if hasattr(loss, "batch"):
        return loss.batch
    if callable(loss):
        return loss
    raise ValueError(
        "loss must have a .batch(alphas: (K, n)) -> (K,) method or be such a callable, "
        f"got {type(loss).__name__}"
    )


def _declared_size(loss):
    """The number of sites the loss says it has (``.n``, ``len(loss.sites)`` or ``len(loss)``)."""
    value = getattr(loss, "n", None)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    for obj in (getattr(loss, "sites", None), loss):
        try:
            return len(obj)
        except TypeError:
            continue
    return None


def _evaluate(batch, points, chunk):
    """batch(points) in calls of exactly `chunk` rows (the tail is padded by repeating its last row,
    so a vmapped/jitted loss compiles once)."""
    K = points.shape[0]
    out = np.empty(K, np.float64)
    for s in range(0, K, chunk):
        rows = points[s : s + chunk]
        pad = chunk - rows.shape[0]
        if pad:
            rows = np.concatenate([rows, np.repeat(rows[-1:], pad, axis=0)])
        vals = np.asarray(batch(rows.astype(np.float32)), dtype=np.float64).reshape(-1)
        if vals.shape[0] != chunk:
            raise ValueError(f"loss.batch returned {vals.shape[0]} values for {chunk} points; expected (K,)")
        out[s : s + chunk - pad] = vals[: chunk - pad]
    return out


def separability_index(
    loss, lo, hi, *, n_samples: int = 100, n_repeats: int = 1, seed: int = 0, batch: int = 256
) -> SeparabilityIndex:
    """The additive-separability test of the LAPQ reference (arXiv:1301.5962).

    For x, z ~ U[lo, hi]ⁿ (independent, per coordinate) and z^(i) = z with its i-th coordinate
    replaced by x_i,

        g = L(x) · [L(x) + (n − 1) L(z) − Σ_i L(z^(i))],     γ = mean(g),   T = √N γ / std(g),

    which is identically 0 when L(α) = Σ_i L_i(α_i): additivity makes the bracket vanish. A large
    |γ| / max L² or |T| means the sites interact.

    Args:
        loss: an object with ``.batch(alphas: (K, n)) -> (K,)`` (e.g. ``ClipLoss``), or such a callable.
            Every point goes through it, ``batch`` rows per call.
        lo, hi: (n,) box of clipping values to sample from (lo ≤ hi, finite).
        n_samples: N, samples per repeat (≥ 2). Each costs n + 2 loss evaluations.
        n_repeats: k, independent repeats (the reference script uses 3); γ is averaged, T is
            Σ T_r / √k. The reference divides by max(s, 1e-2), a floor in the loss's units
            squared; ours is float32 rounding's (below it T is reported as 0).
        seed: seed of the sampler.
        batch: rows per ``loss.batch`` call; the last call is padded so every call has this size.

    Returns:
        :class:`SeparabilityIndex`.

    Raises:
        ValueError: bad bounds or counts, a loss without ``.batch``, or non-finite loss values.
    """
    batch_fn = _batch_fn(loss)
    lo = np.asarray(lo, np.float64).reshape(-1)
    hi = np.asarray(hi, np.float64).reshape(-1)
    if lo.shape != hi.shape or lo.size == 0:
        raise ValueError(
            f"lo and hi must be non-empty (n,) arrays of the same shape, got {lo.shape} and {hi.shape}"
        )
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError("lo and hi must be finite")
    if np.any(lo > hi):
        raise ValueError(f"need lo <= hi everywhere; violated at sites {np.flatnonzero(lo > hi).tolist()}")
    n = lo.size
    declared = _declared_size(loss)
    if declared is not None and declared != n:
        raise ValueError(f"lo/hi have {n} entries but the loss has n = {declared} sites")
    counts = (("n_samples", n_samples, 2), ("n_repeats", n_repeats, 1), ("batch", batch, 1), ("seed", seed, 0))
    for name, value, minimum in counts:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

    rng = np.random.default_rng(seed)
    gammas, Ts, gs = [], [], []
    fmax = 0.0
    for _ in range(n_repeats):
        x = lo + rng.uniform(size=(n_samples, n)) * (hi - lo)
        z = lo + rng.uniform(size=(n_samples, n)) * (hi - lo)
        # Per sample: x, z, then z with coordinate i taken from x, for i = 0..n-1.
        mixed = np.repeat(z[:, None, :], n, axis=1)
        idx = np.arange(n)
        mixed[:, idx, idx] = x
        points = np.concatenate([x[:, None], z[:, None], mixed], axis=1).reshape(-1, n)
        vals = _evaluate(batch_fn, points, min(batch, points.shape[0])).reshape(n_samples, n + 2)
        if not np.all(np.isfinite(vals)):
            bad = int(np.size(vals) - np.count_nonzero(np.isfinite(vals)))
            raise ValueError(
                f"loss returned {bad} non-finite value(s) inside [lo, hi]; keep lo > 0 for clipping values"
            )
        fx, fz, fmix = vals[:, 0], vals[:, 1], vals[:, 2:].sum(axis=1)
        g = fx * (fx + (n - 1) * fz - fmix)
        fmax = max(fmax, float(np.max(np.abs(vals))))
        gamma = float(g.mean())
        s = float(g.std(ddof=1))
        # Rounding alone makes g ~ eps·L²; below that floor T is noise, so report it as 0.
        floor = 16 * np.finfo(np.float32).eps * max(float(np.max(np.abs(vals))), 1e-30) ** 2 * n
        gammas.append(gamma)
        Ts.append(float(np.sqrt(n_samples) * gamma / s) if s > floor else 0.0)
        gs.append(g)
    gamma = float(np.mean(gammas))
    return SeparabilityIndex(
        gamma=gamma,
        T=float(np.sum(Ts) / np.sqrt(len(Ts))),
        gamma_normalized=gamma / fmax**2 if fmax > 0 else 0.0,
        gammas=np.asarray(gammas),
        Ts=np.asarray(Ts),
        g=np.stack(gs),
        n_samples=n_samples,
        n_repeats=n_repeats,
        n_evals=n_repeats * n_samples * (n + 2),
    )


# --------------------------------------------------------------------------------------------------
# Grid and slice measures


def _grid(z, name):
    z = np.asarray(z, np.float64)
    if z.ndim != 2 or min(z.shape) < 2:
        raise ValueError(f"{name} must be a 2-D grid with at least 2 points per axis, got shape {z.shape}")
    return z


def anova_interaction(z) -> float:
    """Two-way ANOVA interaction fraction of a 2-D grid of losses.

    With row means r_i, column means c_j and grand mean m, the interaction residual is
    R_ij = z_ij − r_i − c_j + m and the fraction is ‖R‖_F / ‖z − m‖_F ∈ [0, 1]: 0 for an additive
    surface z_ij = a_i + b_j, larger the more the two sites interact (0 for a constant grid).

    Args:
        z: (rows, cols) finite losses, e.g. ``loss_surface(...).z``.

    Raises:
        ValueError: not 2-D, fewer than 2 points on an axis, or non-finite entries.
    """
    z = _grid(z, "z")
    if not np.all(np.isfinite(z)):
        raise ValueError("z contains NaN or inf; restrict the grid to where the loss is finite")
    m = z.mean()
    R = z - z.mean(axis=1, keepdims=True) - z.mean(axis=0, keepdims=True) + m
    total = np.linalg.norm(z - m)
    return float(np.linalg.norm(R) / total) if total > 0 else 0.0


def flat_fraction(z, tol: float) -> float:
    """Fraction of grid points whose loss is within ``tol`` of the grid minimum: mean(z ≤ min z + tol).

    Args:
        z: (rows, cols) losses; +inf entries (e.g. α ≤ 0) count as not flat, NaN and -inf are errors.
        tol: absolute tolerance ≥ 0 (the LAPQ analysis uses 0.05 nats).

    Raises:
        ValueError: bad shape, NaN or -inf entries, no finite entry, or a negative/non-finite tol.
    """
    z = _grid(z, "z")
    if not (checks.is_real(tol) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if np.any(np.isnan(z)):
        raise ValueError("z contains NaN")
    if np.any(z == -np.inf):  # it would be the minimum, and only itself within tol of it
        raise ValueError(f"z contains {int(np.sum(z == -np.inf))} -inf entries; a loss grid must be > -inf")
    if not np.any(np.isfinite(z)):
        raise ValueError("z has no finite entry")
    return float(np.mean(z <= np.min(z) + tol))


def gaussian_curvature(H2, g2, *, sym_tol: float = 1e-2) -> float:
    """Gaussian curvature K = det H / (1 + ‖∇L‖²)² of the loss surface over a two-site slice.

    For the graph of L over two coordinates, this is the classical surface formula. The LAPQ
    reference applied the same expression to all n sites; we accept any (n, n) H with its (n,) g, and
    the value is a true Gaussian curvature only for n = 2.

    Args:
        H2: (n, n) Hessian of L over the slice, g2: (n,) gradient there.
        sym_tol: allowed max |H − Hᵀ| relative to max |H|, as in :func:`separability`; the
            determinant is that of the symmetric part (H + Hᵀ)/2.

    Raises:
        ValueError: shape mismatch, non-finite input, or H not symmetric within ``sym_tol``.
    """
    H = np.asarray(H2, np.float64)
    g = np.asarray(g2, np.float64).reshape(-1)
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] != g.size or g.size == 0:
        raise ValueError(f"need H (n, n) and g (n,) with the same n, got {H.shape} and {np.shape(g2)}")
    if not np.all(np.isfinite(g)):
        raise ValueError("g must be finite")
    H, _ = _as_symmetric(H, sym_tol)
    return float(np.linalg.det(H) / (1.0 + g @ g) ** 2)
