"""Hessian spectra of any scalar function of a pytree: top eigenpairs, trace and spectral density.

``hessian_spectrum(f, x0)`` studies H = ∇²f(x0) for f: pytree → scalar, where x0 is a clip vector
(n ≈ 10–100) or a network's weights (n ≈ 10⁵–10⁷). Everything is computed from Hessian-vector
products

    H v = d/dε ∇f(x0 + ε v) |_{ε=0}          (forward-over-reverse: ``jax.jvp`` of ``jax.grad``)

on the flattened vector (``jax.flatten_util.ravel_pytree``); only ``method="dense"`` forms H, and only
for small n. The HVP programs are compiled per (f, structure of x0, precision) and cached weakly on f,
so calling again compiles nothing: a Lanczos step (one HVP fused with its reorthogonalisation) and a
block of ``probe_batch`` HVPs (``vmap``: trace probes, density runs, dense columns). The algorithms
around them are small jitted kernels shared between calls.

**Linearize once.** An HVP recomputes f's forward and backward pass at x0 before it propagates the
tangent. With ``hvp="linearize"`` (chosen by ``"auto"`` when the stored values take at most
``LINEARIZE_MAX_BYTES``) the call runs ``jax.linearize`` of the compiled gradient once at x0 and then
applies only the tangent part — what PyHessian gains by keeping its autograd graph. On resnet20 with
128 images (272k weights, 0.63 GB stored) this takes 25–27% off 7 or 30 HVPs on 2 CPU cores.

Known issue: jaxlib 0.10.2's XLA:CPU miscompiles some batched reductions (jax-ml/jax#39103), which
silently corrupts vmapped HVPs on CPU; ``import landscape`` sets
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce`` before JAX starts its CPU backend
(landscape/_xla_flags.py), so import landscape before running any JAX computation.

Algorithms
----------
* top-k eigenpairs: Lanczos with full reorthogonalisation and thick restart (Wu & Simon, 2000).
  After j steps, A Q_j = Q_j T_j + β_j q_{j+1} e_jᵀ, so a Ritz pair (θ, y = Q_j s) has residual
  ‖H y − θ y‖ = |β_j s_j|; iteration stops once the top-k residuals are ≤ ``tol`` · max|θ|
  (``tol_on="residual"``: every θ is then within the residual of an eigenvalue of H, a guarantee)
  or once the eigenvalue error estimates min(r, r²/δ) are (``tol_on="eigenvalue"``), δ the distance
  from θ to the nearest other Ritz value. The r²/δ estimate (Kato–Temple) follows the eigenvalue's
  quadratic convergence, so it stops 1–2 steps earlier for the same eigenvalue accuracy; it is an
  estimate, not a bound, because δ comes from Ritz values rather than from H's spectrum.
* trace: Hutch++ (Meyer, Musco, Musco & Woodruff, 2021) with Rademacher probes,
  tr H = tr(QᵀHQ) + E[gᵀ(I−QQᵀ)H(I−QQᵀ)g], Q an orthonormal basis of H S for a sketch S; the
  standard error is that of the Monte-Carlo term. ``trace_method="hutchinson"`` gives tr H = E[gᵀHg].
* spectral density: stochastic Lanczos quadrature (Golub & Meurant; Ghorbani et al., 2019). Each
  run's tridiagonal T = S Θ Sᵀ gives nodes θ_i with weights S_{0i}²; the density
  φ(t) = (1/R) Σ_r Σ_i w_ri N(t; θ_ri, σ²) is evaluated on a grid and normalised to integrate to 1
  on it (trapezoid rule).

Design note (matfree)
---------------------
matfree 0.6.3 was evaluated: its ``decomp.tridiag_sym`` and ``stochtrace`` cover plain Lanczos with
full reorthogonalisation and Hutchinson-type estimators, but it has no restarted Lanczos, no Ritz
residual or convergence check, no Hutch++ with an adaptive stopping rule and no spectral-density
function, and its API is explicitly unstable (0.y.z). What we would reuse is about eighty lines
of Lanczos; the rest (convergence, restarts, block-batched probes, density, pytree results) we need
anyway. We therefore write the algorithms ourselves, test them against dense ``eigh``, and keep the
dependency list short.
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from landscape import runtime

__all__ = ["DENSE_MAX_DIM", "LINEARIZE_MAX_BYTES", "HessianSpectrum", "hessian_spectrum"]

#: ``method="auto"`` forms the full Hessian (n HVPs, O(n²) memory, exact ``eigh``) up to this
#: dimension and uses Lanczos / Hutch++ / SLQ above it. At n = 512 the dense Hessian costs 512 HVPs
#: and 2 MiB, still cheap next to the exactness it buys (and next to the ~100–1000 HVPs of a Lanczos
#: + Hutch++ + SLQ run); clip vectors (n ≤ ~100) are always dense, network weights always iterative.
DENSE_MAX_DIM = 512

#: ``hvp="auto"`` linearizes when the residuals of the linearization (the forward and backward values
#: the tangent pass reads) take at most this many bytes, the same budget as ClipLoss's vmapped chunks.
LINEARIZE_MAX_BYTES = 2 * 1024**3
_HVP_MODES = ("auto", "linearize", "recompute")

_METHODS = ("auto", "dense", "lanczos")
_WHICH = ("largest", "smallest", "magnitude")
_TOL_ON = ("residual", "eigenvalue")
_TRACE_METHODS = ("hutch++", "hutchinson")


@dataclass(frozen=True, repr=False)
class HessianSpectrum:
    """Result of :func:`hessian_spectrum`.

    Attributes:
        eigenvalues: (top_k,) selected eigenvalues, in the order of ``which`` (descending for
            "largest").
        eigenvectors: list of top_k pytrees shaped like x0 (unit norm), or None if not asked for.
        residuals: (top_k,) ‖H v − λ v‖ of each pair (Ritz estimate for Lanczos).
        errors: (top_k,) estimated |λ − λ_true| of each eigenvalue, min(r, r²/δ) with δ the gap to
            the nearest other Ritz value (the residual itself for "dense", where λ is exact).
        converged: (top_k,) bool, residual (``tol_on="residual"``) or error estimate
            (``tol_on="eigenvalue"``) ≤ tol · max|λ| (always True for "dense").
        trace: tr H (exact for "dense", estimated otherwise), or None.
        trace_stderr: standard error of ``trace`` (0.0 for "dense"), or None.
        density: (grid, values) of the smoothed spectral density, integrating to 1, or None.
        density_nodes: (nodes, weights), each (runs, steps), the quadrature behind ``density``.
        method: "dense" or "lanczos".
        which: "largest", "smallest" or "magnitude".
        dim: n, the number of scalars in x0.
        n_hvp: Hessian-vector products evaluated in total.
        hvp_counts: the same, split by task ("dense", "lanczos", "trace", "density").
        seconds: wall-clock seconds of the call, compilation included.
        info: further details (Lanczos basis size and restarts, trace method and HVPs, density runs,
            steps and σ, the dense Hessian's relative asymmetry).
    """

    eigenvalues: np.ndarray
    eigenvectors: list | None
    residuals: np.ndarray
    errors: np.ndarray
    converged: np.ndarray
    trace: float | None
    trace_stderr: float | None
    density: tuple[np.ndarray, np.ndarray] | None
    density_nodes: tuple[np.ndarray, np.ndarray] | None
    method: str
    which: str
    dim: int
    n_hvp: int
    hvp_counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        fmt = lambda a: np.array2string(np.asarray(a), precision=6, separator=", ", max_line_width=100)
        lines = [f"HessianSpectrum(method={self.method!r}, dim={self.dim}, which={self.which!r})"]
        lines.append(f"  eigenvalues: {fmt(self.eigenvalues)}")
        lines.append(
            f"    residuals: {np.array2string(self.residuals, precision=2, separator=', ')}"
            f"  errors: {np.array2string(self.errors, precision=2, separator=', ')}"
            f"  (converged {int(np.sum(self.converged))}/{self.converged.size})"
        )
        if self.trace is not None:
            how = "exact" if self.method == "dense" else (
                f"{self.info.get('trace_method')}, {self.info.get('trace_hvp')} HVPs")
            lines.append(f"        trace: {self.trace:.6g} ± {self.trace_stderr:.3g} ({how})")
        if self.density is not None:
            grid = self.density[0]
            lines.append(
                f"      density: {grid.size}-point grid on [{grid[0]:.4g}, {grid[-1]:.4g}],"
                f" sigma {self.info.get('density_sigma'):.3g}, {self.density_nodes[0].shape[0]} runs"
                f" x {self.density_nodes[0].shape[1]} nodes"
            )
        parts = ", ".join(f"{k} {v}" for k, v in self.hvp_counts.items())
        lines.append(f"        n_hvp: {self.n_hvp} ({parts})")
        lines.append(f"      seconds: {self.seconds:.3f}")
        return "\n".join(lines)

    def plot(self, ax=None, *, log: bool = True):
        """Plot the spectral density (log-scaled y by default) with the top eigenvalues marked, or
        the eigenvalues alone when no density was computed. Returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        if self.density is not None:
            grid, values = self.density
            shown = np.maximum(values, values.max() * 1e-12) if log else values
            ax.plot(grid, shown, color="C0", lw=1.2, label="spectral density (SLQ)"
                    if self.method == "lanczos" else "spectral density (exact, smoothed)")
            if log:
                ax.set_yscale("log")
            for i, lam in enumerate(self.eigenvalues):
                ax.axvline(lam, color="C3", lw=0.8, ls="--", label="top eigenvalues" if i == 0 else None)
            ax.set_xlabel("eigenvalue")
            ax.set_ylabel("density")
            ax.legend(frameon=False, fontsize=8)
        else:
            idx = np.arange(1, self.eigenvalues.size + 1)
            ax.plot(idx, self.eigenvalues, "o", color="C0")
            ax.set_xlabel(f"index ({self.which})")
            ax.set_ylabel("eigenvalue")
        title = f"Hessian spectrum, n = {self.dim}"
        if self.trace is not None:
            title += f", trace {self.trace:.4g}"
        ax.set_title(title, fontsize=9)
        return ax


# --------------------------------------------------------------------------------------------------
# The HVP operator


class _HVP:
    """The Hessian of the flattened problem as an operator, counting the products it evaluates.

    ``mode="recompute"``: two programs are compiled, lazily and once each: a Lanczos step (one HVP
    fused with its reorthogonalisation, see :func:`_extend_core`) and a block HVP over
    ``probe_batch`` vectors; each HVP reruns f's forward and backward pass at x.
    ``mode="linearize"``: ``jax.linearize`` of the compiled gradient at x, once; every product then
    runs only the tangent part (the linearized program is compiled once per (f, structure)).
    Like ``jax.jit`` the programs are cached per (f, structure of x0, precision), so calling again
    with the same f — at any point — compiles nothing; as with ``jax.jit``, f is assumed pure.
    """

    def __init__(self, f, unravel, x, structure, precision="highest", mode="auto"):
        self._x = x
        self.counts: dict[str, int] = {}
        programs = _compiled_operator(f, unravel, structure, precision)
        self._step, self._matmat, self._single = programs["step"], programs["matmat"], programs["single"]
        if mode == "auto":
            mode = "linearize" if _residual_bytes(programs, x) <= LINEARIZE_MAX_BYTES else "recompute"
        self.mode = mode
        # bytes held by the linearization (None when every HVP recomputes)
        self.stored_bytes = _residual_bytes(programs, x) if mode == "linearize" else None
        self._lin = jax.linearize(programs["grad"], x)[1] if mode == "linearize" else None

    def lanczos_step(self, Q, j, spare, counter):
        """(Q, h, β) after one step from basis row j; see :func:`_extend_core`."""
        self.counts["lanczos"] = self.counts.get("lanczos", 0) + 1
        if self._lin is not None:
            return _extend(Q, self._lin(_row(Q, j)), j, spare, counter)
        return self._step(self._x, Q, j, spare, counter)

    def matmat(self, V, task):
        """H applied to each row of V (b, n). A single row takes the un-vmapped HVP: a vmapped
        one, even over one vector, turns the convolutions into grouped ones (slower on CPU)."""
        self.counts[task] = self.counts.get(task, 0) + V.shape[0]
        if self._lin is not None:
            if V.shape[0] == 1:
                return _as_row(self._lin(V[0]))
            return jax.vmap(self._lin)(V)
        if V.shape[0] == 1:
            return self._single(self._x, V)
        return self._matmat(self._x, V)


_row = jax.jit(lambda Q, j: jax.lax.dynamic_index_in_dim(Q, j, axis=0, keepdims=False))
_as_row = jax.jit(lambda v: v[None])


def _residual_bytes(programs, x):
    """Bytes ``jax.linearize`` would store at x (abstract evaluation, cached per operator)."""
    if "residual_bytes" not in programs:
        shapes = jax.eval_shape(lambda u: jax.linearize(programs["grad"], u)[1], x)
        programs["residual_bytes"] = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                                         for a in jax.tree.leaves(shapes))
    return programs["residual_bytes"]


_OPERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_operator(f, unravel, structure, precision):
    """The jitted programs for f at points of the given pytree structure, f traced under
    ``jax.default_matmul_precision(precision)``: a dict with the gradient ("grad"), the fused
    Lanczos step ("step"), the block HVP ("matmat") and the single HVP ("single")."""
    try:
        per_f, f_ref = _OPERATORS.setdefault(f, {}), weakref.ref(f)
    except TypeError:  # f not weak-referenceable or not hashable: compile for this call only
        per_f, f_ref = {}, (lambda: f)
    key = (structure, precision)
    if key not in per_f:
        # The programs hold f only weakly: a strong reference from the cached value would keep its
        # key (and the data f closes over) alive forever. Tracing happens inside a call, f alive.

        def grad_flat(u):
            with jax.default_matmul_precision(precision):  # read when the programs are traced
                return jax.grad(lambda v: f_ref()(unravel(v)))(u)

        def hvp(point, v):
            return jax.jvp(grad_flat, (point,), (v,))[1]

        def lanczos_step(point, Q, j, spare, counter):
            w = hvp(point, jax.lax.dynamic_index_in_dim(Q, j, axis=0, keepdims=False))
            return _extend_core(Q, w, j, spare, counter)

        per_f[key] = {
            "grad": jax.jit(grad_flat),
            "step": jax.jit(lanczos_step, donate_argnums=1),
            "matmat": jax.jit(jax.vmap(hvp, in_axes=(None, 0))),
            "single": jax.jit(lambda point, V: hvp(point, V[0])[None]),
        }
    return per_f[key]


# --------------------------------------------------------------------------------------------------
# Lanczos kernels (pure, jitted once per shape and shared by all calls)


def _extend_core(Q, w, j, spare, counter):
    """One Lanczos step with full reorthogonalisation.

    Q: (m+1, n) basis rows, rows 0..j filled; w = H q_j (n,). Returns Q with row j+1 set, the
    coefficients h = Q w (rows > j zeroed) which form column j of T, and β = ‖w − Qᵀh‖.
    spare: (n,) random vector, the source of a fresh direction after a breakdown (rolled by
    `counter`, so the kernel needs no PRNG of its own: threefry would dominate its compile time).
    """
    rows = Q.shape[0]
    mask = (jnp.arange(rows) <= j).astype(Q.dtype)
    eps = jnp.finfo(Q.dtype).eps
    w_norm = jnp.linalg.norm(w)
    # Classical Gram–Schmidt twice ("twice is enough", Giraud et al. 2005) keeps the basis
    # orthogonal to working precision, which single-vector Lanczos loses after a few Ritz pairs converge.
    h = (Q @ w) * mask
    w = w - h @ Q
    h2 = (Q @ w) * mask
    w = w - h2 @ Q
    h = h + h2
    beta = jnp.linalg.norm(w)
    broke = beta <= 100.0 * eps * w_norm

    def fresh_direction(_):
        # An invariant subspace was found: continue with a random vector orthogonal to the basis,
        # decoupled from T (β = 0), so Lanczos can go on finding eigenvalues outside it.
        r = jnp.roll(spare, 7919 * (counter + 1))
        r = r - ((Q @ r) * mask) @ Q
        r = r - ((Q @ r) * mask) @ Q
        return r / jnp.maximum(jnp.linalg.norm(r), jnp.finfo(Q.dtype).tiny)

    q_next = jax.lax.cond(broke, fresh_direction, lambda _: w / jnp.where(broke, 1.0, beta), None)
    beta = jnp.where(broke, 0.0, beta)
    Q = jax.lax.dynamic_update_index_in_dim(Q, q_next, j + 1, axis=0)
    return Q, h, beta


_extend = jax.jit(_extend_core, donate_argnums=0)
_extend_batch = jax.jit(jax.vmap(_extend_core, in_axes=(0, 0, None, 0, None)), donate_argnums=0)


@partial(jax.jit, static_argnums=(2,))
def _restart_basis(Q, S_keep, m):
    """Thick restart: rows 0..p-1 ← Ritz vectors S_keepᵀ Q[:m], row p ← q_{m}, the rest zero."""
    p = S_keep.shape[1]
    Y = S_keep.T.astype(Q.dtype) @ Q[:m]
    Q_new = jnp.zeros_like(Q)
    Q_new = Q_new.at[:p].set(Y)
    return Q_new.at[p].set(Q[m])


def _order(theta, which):
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _unit(key, n, dtype):
    v = jax.random.normal(key, (n,), dtype)
    return v / jnp.linalg.norm(v)


def _eigenvalue_errors(theta, res):
    """min(r, r²/δ) for each Ritz pair, δ the distance to the nearest other Ritz value."""
    if theta.size < 2:
        return res.copy()
    dist = np.abs(theta[:, None] - theta[None, :])
    np.fill_diagonal(dist, np.inf)
    gap = dist.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        quadratic = np.where(gap > 0, res**2 / gap, np.inf)
    return np.minimum(res, quadratic)


def _lanczos_top_k(op, n, dtype, k, m, which, tol, tol_on, max_restarts, key):
    """Thick-restart Lanczos. Returns eigenvalues, Ritz coefficient matrix S (j, k), basis Q,
    active size j, residuals, eigenvalue error estimates, converged flags and the number of
    restarts."""
    k_start, k_spare = jax.random.split(key)
    spare = jax.random.normal(k_spare, (n,), dtype)
    Q = jnp.zeros((m + 1, n), dtype)
    Q = Q.at[0].set(_unit(k_start, n, dtype))
    T = np.zeros((m + 1, m + 1))
    keep = min(k + max((m - k) // 2, 1), m - 1) if m < n else k
    j = 0  # number of basis vectors whose H q has been taken
    step = 0
    restarts = 0
    while True:
        while j < m:
            Q, h, beta = op.lanczos_step(Q, j, spare, step)
            h = np.asarray(h, dtype=np.float64)
            step += 1
            T[: j + 1, j] = h[: j + 1]
            T[j, : j + 1] = h[: j + 1]
            T[j + 1, j] = T[j, j + 1] = float(beta)
            j += 1
            if j < k:
                continue
            theta, S = np.linalg.eigh(T[:j, :j])
            idx = _order(theta, which)
            res = np.abs(T[j, j - 1] * S[j - 1, :])
            err = _eigenvalue_errors(theta, res)
            scale = np.max(np.abs(theta))
            done = (res if tol_on == "residual" else err)[idx[:k]] <= tol * scale
            if np.all(done):
                break
        if np.all(done) or restarts >= max_restarts or m >= n:
            break
        # Keep the `keep` wanted Ritz pairs and the residual direction; T becomes an arrowhead whose
        # coupling column is recomputed by the next step's reorthogonalisation.
        sel = idx[:keep]
        Q = _restart_basis(Q, jnp.asarray(S[:, sel]), m)
        T = np.zeros_like(T)
        T[np.arange(keep), np.arange(keep)] = theta[sel]
        j = keep
        restarts += 1
    sel = idx[:k]
    return theta[sel], S[:, sel], Q, j, res[sel], err[sel], done, restarts


def _slq_nodes(op, n, dtype, runs, steps, block, key):
    """Stochastic Lanczos quadrature: nodes and weights (runs, steps), runs processed in vmapped
    blocks of `block` (the run count is rounded up to a multiple of it; every run is used)."""
    n_blocks = -(-runs // block)
    nodes, weights = [], []
    for b in range(n_blocks):
        kb = jax.random.fold_in(key, b)
        k_start, k_spare = jax.random.split(kb)
        signs = jax.random.rademacher(k_start, (block, n), dtype=dtype)
        spare = jax.random.normal(k_spare, (block, n), dtype)
        Q = jnp.zeros((block, steps + 1, n), dtype)
        Q = Q.at[:, 0].set(signs / np.sqrt(n))
        columns = []
        for j in range(steps):
            W = op.matmat(Q[:, j], "density")
            Q, h, _ = _extend_batch(Q, W, j, spare, j)
            columns.append(h[:, :steps])
        # (block, steps, steps) with [r, i, j] = q_iᵀ H q_j for i ≤ j; the off-diagonal β_j appears
        # as the next column's reorthogonalisation coefficient, so T is its symmetrised upper part.
        h = np.asarray(jnp.stack(columns, axis=-1), dtype=np.float64)
        for r in range(block):
            T = np.triu(h[r])
            theta, S = np.linalg.eigh(T + np.triu(T, 1).T)
            nodes.append(theta)
            weights.append(S[0, :] ** 2)
    return np.stack(nodes), np.stack(weights)


def _smooth_density(nodes, weights, num_grid, sigma):
    """Gaussian-smoothed density of the quadrature (nodes, weights), normalised on its grid."""
    nodes = np.asarray(nodes, np.float64).ravel()
    weights = np.asarray(weights, np.float64).ravel()
    weights = weights / weights.sum()
    lo, hi = float(nodes.min()), float(nodes.max())
    span = hi - lo
    if sigma is None:
        sigma = 0.01 * span if span > 0 else 0.01 * max(abs(hi), 1.0)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_grid)
    values = np.zeros_like(grid)
    # Chunk over nodes so that (grid × nodes) stays small for dense spectra with many eigenvalues.
    for s in range(0, nodes.size, 4096):
        z = (grid[:, None] - nodes[None, s : s + 4096]) / sigma
        values += np.exp(-0.5 * z**2) @ weights[s : s + 4096]
    values /= sigma * np.sqrt(2 * np.pi)
    values /= np.trapezoid(values, grid)
    return grid, values, sigma


def _apply_blocks(op, V, block, task, *, n_rows=None, n=None, dtype=None):
    """H applied to the rows of V (k, n), in vmapped blocks of `block` rows (zero-padded).
    With V None, to the rows of the (n_rows, n) identity, built one block at a time.

    The blocks are cut and padded on the host (numpy) and the result comes back as a numpy
    (k, n) array: eager jnp slicing would compile a small XLA program per offset and shape."""
    k, n, dtype = (V.shape + (V.dtype,)) if V is not None else (n_rows, n, np.dtype(dtype))
    out = np.empty((k, n), dtype)
    for s in range(0, k, block):
        rows = min(block, k - s)
        chunk = np.zeros((block, n), dtype)
        if V is None:
            chunk[np.arange(rows), np.arange(s, s + rows)] = 1
        else:
            chunk[:rows] = V[s : s + rows]
        out[s : s + rows] = np.asarray(op.matmat(chunk, task))[:rows]
    return out


def _round_up(count, block):
    return -(-count // block) * block


def _trace(op, n, dtype, method, num_probes, block, rtol, max_probes, key):
    """Hutch++ or Hutchinson trace with its standard error; extends the Monte-Carlo part in blocks
    until stderr ≤ rtol·|trace| when rtol is given."""
    # The probes and the sketch algebra live on the host (numpy, seeded from the key): only the
    # HVP program is compiled, whatever the probe counts.
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    dtype = np.dtype(dtype)

    def rademacher(rows):
        return (2.0 * rng.integers(0, 2, (rows, n)) - 1.0).astype(dtype)

    low_rank = 0.0
    Qt = None
    if method == "hutch++":
        sketch = _round_up(min(num_probes // 3, n), block)
        mc = _round_up(max(num_probes - 2 * (num_probes // 3), 2), block)
        Y = _apply_blocks(op, rademacher(sketch), block, "trace")
        Qt = np.linalg.qr(Y.T.astype(np.float64))[0].T  # (min(sketch, n), n) orthonormal rows
        HQ = _apply_blocks(op, Qt.astype(dtype), block, "trace")
        low_rank = float(np.sum(Qt * HQ.astype(np.float64)))
        if Qt.shape[0] >= n:  # the sketch spans everything: tr(QᵀHQ) is the exact trace
            return low_rank, 0.0, op.counts["trace"]
    else:
        mc = _round_up(max(num_probes, 2), block)
    samples = []
    drawn = 0
    while True:
        G = rademacher(mc if drawn == 0 else block).astype(np.float64)
        if Qt is not None:
            G = G - (G @ Qt.T) @ Qt
        HG = _apply_blocks(op, G.astype(dtype), block, "trace")
        samples.append(np.sum(G * HG.astype(np.float64), axis=1))
        drawn += G.shape[0]
        values = np.concatenate(samples)
        estimate = low_rank + values.mean()
        stderr = values.std(ddof=1) / np.sqrt(values.size)
        if rtol is None or stderr <= rtol * abs(estimate) or op.counts["trace"] + block > max_probes:
            break
    return float(estimate), float(stderr), op.counts["trace"]


# --------------------------------------------------------------------------------------------------
# Validation


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _flatten_and_check(f, x0):
    leaves = jax.tree_util.tree_leaves(x0)
    if not leaves:
        raise ValueError("x0 has no array leaves; pass a pytree of floating-point arrays")
    for leaf in leaves:
        dt = jnp.result_type(leaf)
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"every leaf of x0 must be a floating-point array, got dtype {dt}")
    flat, unravel = ravel_pytree(x0)
    if flat.size == 0:
        raise ValueError("x0 has zero elements; the Hessian of an empty problem is undefined")
    finite = np.asarray(jnp.isfinite(flat))
    if not finite.all():
        bad = int(np.size(finite) - np.count_nonzero(finite))
        raise ValueError(f"x0 contains {bad} NaN/inf value(s); the Hessian needs a finite point")
    try:
        out = jax.eval_shape(f, x0)
    except Exception as err:  # surface tracing failures with the offending call named
        raise ValueError(f"f(x0) could not be traced by JAX: {err}") from err
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"f must return a scalar, got output of shape {shape}; reduce it (e.g. mean)")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"f must return a real floating-point scalar, got dtype {out.dtype}")
    return flat, unravel


# --------------------------------------------------------------------------------------------------
# Public entry point


def hessian_spectrum(
    f,
    x0: Any,
    *,
    top_k: int = 1,
    trace: bool = True,
    density: bool = False,
    method: str = "auto",
    which: str = "largest",
    eigenvectors: bool = False,
    tol: float = 1e-4,
    tol_on: str = "residual",
    lanczos_steps: int | None = None,
    max_restarts: int = 10,
    num_probes: int = 96,
    trace_method: str = "hutch++",
    trace_rtol: float | None = None,
    max_probes: int | None = None,
    density_runs: int = 10,
    density_steps: int = 80,
    density_grid: int = 2000,
    density_sigma: float | None = None,
    probe_batch: int = 16,
    precision: str = "highest",
    hvp: str = "auto",
    seed: int = 0,
) -> HessianSpectrum:
    """Top eigenpairs, trace and spectral density of H = ∇²f(x0), from Hessian-vector products.

    Args:
        f: pytree → scalar, traceable by JAX (a ``ClipLoss``, a weight-space loss closing over its
            data — which may be sharded over several devices —, any function).
        x0: the point, any pytree of floating-point arrays; n = total number of elements.
        top_k: number of eigenpairs, 1 ≤ top_k ≤ n.
        trace: estimate tr H (Hutch++/Hutchinson for "lanczos", exact for "dense").
        density: compute the spectral density (SLQ for "lanczos", exact eigenvalues for "dense").
        method: "auto" (dense if n ≤ ``DENSE_MAX_DIM`` = 512, else "lanczos"), "dense" or "lanczos".
        which: "largest" (algebraic, returned descending), "smallest" (ascending) or "magnitude"
            (by |λ|, descending), as PyHessian reports.
        eigenvectors: also return eigenvectors, as a list of top_k pytrees shaped like x0.
        tol: Lanczos stops when every wanted Ritz residual ‖Hy − θy‖ (or error estimate, see
            ``tol_on``) is ≤ tol · max|θ|.
        tol_on: "residual" (default: each eigenvalue is then within tol · max|θ| of one of H's,
            guaranteed, and the eigenvectors are accurate to about tol · max|θ| / gap) or
            "eigenvalue" (the estimate min(r, r²/δ) of the eigenvalue error, δ the distance to the
            nearest other Ritz value: the same eigenvalue accuracy in fewer HVPs, as the
            eigenvalues converge quadratically while the residuals converge linearly; use it when
            only the eigenvalues matter).
        lanczos_steps: Krylov basis size before a thick restart; default max(40, 4·top_k), at most n.
            Memory is (lanczos_steps + 1) · n numbers.
        max_restarts: thick restarts allowed before giving up (a RuntimeWarning, ``converged`` False).
        num_probes: HVPs for the trace (Hutch++ splits them into thirds: sketch, its image, and
            Monte-Carlo probes); each part is rounded up to a multiple of ``probe_batch``.
        trace_method: "hutch++" or "hutchinson".
        trace_rtol: if given, keep adding Monte-Carlo probes (one block at a time) until
            trace_stderr ≤ trace_rtol · |trace| or ``max_probes`` (default 10·num_probes) HVPs.
        density_runs, density_steps: SLQ runs (rounded up to a multiple of the probe block) and
            Lanczos steps per run (at most n). Memory is block · (steps + 1) · n numbers.
        density_grid, density_sigma: grid size and Gaussian width; σ defaults to 1% of the
            spectral range.
        probe_batch: vectors per vmapped HVP call (trace probes, SLQ runs, dense columns).
        precision: matmul/convolution precision of the HVPs (``jax.default_matmul_precision``):
            "highest" (default, true float32) or a faster level such as "default" (TF32 on recent
            NVIDIA GPUs, whose ~1e-3 relative rounding would blur a tol=1e-3 eigenvalue). No
            effect on CPU.
        hvp: "linearize" (``jax.linearize`` the gradient at x0 once and apply only its tangent
            part: each HVP skips f's forward and backward pass, ~25% faster on a conv net, at the
            cost of storing their values), "recompute" (every HVP reruns them: memory of one
            gradient) or "auto" (linearize when the stored values take at most
            ``LINEARIZE_MAX_BYTES`` = 2 GiB). ``info["hvp"]`` says which ran and
            ``info["hvp_stored_bytes"]`` what it stored.
        seed: PRNG seed; the same seed gives the same result.

    Returns:
        :class:`HessianSpectrum`.

    Raises:
        ValueError: non-scalar or non-float f(x0), non-finite or empty x0, top_k outside [1, n],
            unknown method / which / trace_method, or non-positive counts.

    Note:
        Single-vector Lanczos finds one copy of an exactly repeated eigenvalue per invariant
        subspace; for exactly degenerate spectra, "dense" (small n) is the reliable choice.
        The compiled HVP programs are cached per (f, structure of x0), like ``jax.jit``: f is
        assumed pure, and data it closes over are captured when it is first traced.
    """
    start = time.perf_counter()
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(_METHODS)}")
    runtime.check_precision(precision, "hessian_spectrum")
    if hvp not in _HVP_MODES:
        raise ValueError(f"unknown hvp {hvp!r}; allowed: {', '.join(_HVP_MODES)}")
    if tol_on not in _TOL_ON:
        raise ValueError(f"unknown tol_on {tol_on!r}; allowed: {', '.join(_TOL_ON)}")
    if which not in _WHICH:
        raise ValueError(f"unknown which {which!r}; allowed: {', '.join(_WHICH)}")
    if trace_method not in _TRACE_METHODS:
        raise ValueError(f"unknown trace_method {trace_method!r}; allowed: {', '.join(_TRACE_METHODS)}")
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if trace_rtol is not None and not (np.isfinite(trace_rtol) and trace_rtol > 0):
        raise ValueError(f"trace_rtol must be None or a positive number, got {trace_rtol!r}")
    if density_sigma is not None and not (np.isfinite(density_sigma) and density_sigma > 0):
        raise ValueError(f"density_sigma must be None or a positive number, got {density_sigma!r}")
    probe_batch = _check_positive_int("probe_batch", probe_batch)
    max_restarts = _check_positive_int("max_restarts", max_restarts, minimum=0)
    density_runs = _check_positive_int("density_runs", density_runs)
    density_steps = _check_positive_int("density_steps", density_steps)
    density_grid = _check_positive_int("density_grid", density_grid, minimum=2)
    num_probes = _check_positive_int("num_probes", num_probes, minimum=4 if trace_method == "hutch++" else 2)

    flat, unravel = _flatten_and_check(f, x0)
    n = int(flat.size)
    dtype = flat.dtype
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= n:
        raise ValueError(f"top_k must be an integer in [1, n] with n = {n} (the size of x0), got {top_k!r}")
    top_k = int(top_k)
    if method == "auto":
        method = "dense" if n <= DENSE_MAX_DIM else "lanczos"

    leaves, treedef = jax.tree_util.tree_flatten(x0)
    structure = (treedef, tuple((jnp.shape(v), jnp.result_type(v)) for v in leaves))
    op = _HVP(f, unravel, flat, structure, precision, hvp)
    key_lanczos, key_trace, key_density = jax.random.split(jax.random.PRNGKey(seed), 3)
    info: dict[str, Any] = {"hvp": op.mode, "hvp_stored_bytes": op.stored_bytes}
    trace_value = trace_stderr = None
    density_out = nodes_out = None

    if method == "dense":
        # Blocks of near-equal size, so that zero padding wastes fewer than one HVP per block.
        n_blocks = -(-n // probe_batch)
        block = -(-n // n_blocks)
        H = _apply_blocks(op, None, block, "dense", n_rows=n, n=n, dtype=dtype)
        H = np.asarray(H, np.float64)
        norm = np.linalg.norm(H)
        info["asymmetry"] = float(np.linalg.norm(H - H.T) / norm) if norm > 0 else 0.0
        H = 0.5 * (H + H.T)  # rows are H e_i; symmetrise away the autodiff rounding
        evals, evecs = np.linalg.eigh(H)
        idx = _order(evals, which)[:top_k]
        values, vectors = evals[idx], evecs[:, idx]
        residuals = np.linalg.norm(H @ vectors - vectors * values, axis=0)
        errors = residuals.copy()
        converged = np.ones(top_k, bool)
        vec_rows = vectors.T
        if trace:
            trace_value, trace_stderr = float(np.trace(H)), 0.0
        if density:
            nodes_out = (evals[None, :], np.full((1, n), 1.0 / n))
    else:
        m = min(n, lanczos_steps if lanczos_steps is not None else max(40, 4 * top_k))
        m = _check_positive_int("lanczos_steps", m)
        if m < n and m < top_k + 2:
            raise ValueError(f"lanczos_steps must be at least top_k + 2 = {top_k + 2} (or >= n), got {m}")
        values, S, Q, j, residuals, errors, converged, restarts = _lanczos_top_k(
            op, n, dtype, top_k, m, which, tol, tol_on, max_restarts, key_lanczos
        )
        info.update(lanczos_steps=m, lanczos_restarts=restarts, tol=tol, tol_on=tol_on)
        if not np.all(converged):
            warnings.warn(
                f"Lanczos: {int(np.sum(~converged))} of {top_k} eigenpairs not converged to tol={tol} ({tol_on}) "
                f"after {restarts} restarts; raise lanczos_steps or max_restarts",
                RuntimeWarning,
                stacklevel=2,
            )
        vec_rows = None
        if eigenvectors:
            vec_rows = np.asarray(jnp.asarray(S.T, dtype) @ Q[:j], np.float64)
        groups = []
        if trace:
            groups += [num_probes // 3, num_probes - 2 * (num_probes // 3)] if trace_method == "hutch++" \
                else [num_probes]
        if density:
            groups.append(density_runs)
        block = min(probe_batch, max(groups)) if groups else probe_batch
        if trace:
            limit = max_probes if max_probes is not None else 10 * num_probes
            trace_value, trace_stderr, used = _trace(
                op, n, dtype, trace_method, num_probes, block, trace_rtol, limit, key_trace
            )
            info.update(trace_method=trace_method, trace_hvp=used)
        if density:
            steps = min(density_steps, n)
            nodes_out = _slq_nodes(op, n, dtype, density_runs, steps, block, key_density)
            info.update(density_runs=nodes_out[0].shape[0], density_steps=steps)
    if nodes_out is not None:
        grid, dens, sigma = _smooth_density(*nodes_out, density_grid, density_sigma)
        density_out = (grid, dens)
        info["density_sigma"] = sigma

    vecs = None
    if eigenvectors:
        vecs = [unravel(jnp.asarray(row, dtype)) for row in vec_rows]
    counts = dict(op.counts)
    return HessianSpectrum(
        eigenvalues=np.asarray(values, np.float64),
        eigenvectors=vecs,
        residuals=np.asarray(residuals, np.float64),
        errors=np.asarray(errors, np.float64),
        converged=np.asarray(converged, bool),
        trace=trace_value,
        trace_stderr=trace_stderr,
        density=density_out,
        density_nodes=nodes_out,
        method=method,
        which=which,
        dim=n,
        n_hvp=int(sum(counts.values())),
        hvp_counts=counts,
        seconds=time.perf_counter() - start,
        info=info,
    )
