"""Hessian spectra of any scalar function of a pytree: top eigenpairs, trace and spectral density.

``hessian_spectrum(f, x0)`` studies H = ∇²f(x0) for f: pytree → scalar, where x0 is a clip vector
(n ≈ 10–100) or a network's weights (n ≈ 10⁵–10⁷). Everything is computed from Hessian-vector
products

    H v = d/dε ∇f(x0 + ε v) |_{ε=0}          (forward-over-reverse: ``jax.jvp`` of ``jax.grad``)

on the flattened vector (as ``jax.flatten_util.ravel_pytree`` orders it); only ``method="dense"``
forms H, and only for small n. The HVP programs are compiled per (f, structure of x0, precision) and
cached weakly on f, so calling again compiles nothing (for a ``jax.tree_util.Partial``, on its
function, the bound arrays passed as data: ``ClipLoss.weight_loss`` of every α shares them): a
Lanczos step (one HVP fused with its reorthogonalisation) and a block of ``probe_batch`` HVPs
(``vmap``: trace probes, density runs, dense columns). Around them, one jitted kernel per basis
shape (a Lanczos step's reorthogonalisation, shared between calls); flattening, input checks,
random draws and the small dense algebra run on the host with numpy, so a first call compiles
little beyond f's own programs (eager jnp operations would each compile a small XLA program per
new shape: once most of a first call's time on a small problem).

**Linearize once.** An HVP recomputes f's forward and backward pass at x0 before it propagates the
tangent. With ``hvp="linearize"`` (chosen by ``"auto"`` when the stored values fit
:func:`linearize_budget`) the call runs ``jax.linearize`` of the compiled gradient once at x0 and then
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
  ‖H y − θ y‖ = |β_j s_j|. Iteration stops once each wanted pair's residual (``tol_on="residual"``:
  every θ is then within it of an eigenvalue of H, a guarantee) or eigenvalue error estimate
  min(r, r²/δ) (``tol_on="eigenvalue"``) is ≤ ``tol`` · |θ_i|, floored at 100 ε · max|θ| with ε
  of the dtype (1.2e-5 · max|θ| in float32: a margin over the HVPs' rounding, which a network's
  many reductions raise above the ~1 ε · max|θ| a dense float32 quadratic reaches, so that
  eigenvalues near zero still converge). An eigenvalue below tol⁻¹ · 100 ε · max|θ| is resolved
  only to that floor, not to tol · |θ_i|: ``which="smallest"`` on an ill-conditioned H mixes up
  the members of a cluster at the bottom (spectrum {100, 50, 20, 10, 5, U(0.1, 1)}, n = 600,
  smallest 4 at tol 1e-4: [0.10000, 0.10089, 0.10124, 0.10244] against 0.1000012, 0.1008278,
  0.1010595, 0.1010797, residuals 1.1e-3, marked converged). Float64 leaves in x0 (with
  ``jax_enable_x64``) lower the floor by ε's ratio, 5e8 (the example: all four right to 1e-8,
  268 HVPs); "dense" needs none. δ is the distance
  from θ to the nearest other Ritz value. The r²/δ estimate (Kato–Temple) follows the eigenvalue's
  quadratic convergence, so it stops 1–2 steps earlier for the same eigenvalue accuracy; it is an
  estimate, not a bound, because δ comes from Ritz values rather than from H's spectrum.
* trace: Hutch++ (Meyer, Musco, Musco & Woodruff, 2021) with Rademacher probes,
  tr H = tr(QᵀHQ) + E[gᵀ(I−QQᵀ)H(I−QQᵀ)g], Q an orthonormal basis of H S for a sketch S; the
  standard error is that of the Monte-Carlo term, given the sketch: with few Monte-Carlo probes and
  a skewed deflated spectrum it runs a little small (a user audit measured z-scores with a standard
  deviation of 1.10 over 150 seeds on the exact Hessian of a small CNN, n = 830; Hutchinson's 0.98).
  ``trace_method="hutchinson"`` gives tr H = E[gᵀHg].
* spectral density: stochastic Lanczos quadrature (Golub & Meurant; Ghorbani et al., 2019). Each
  run's tridiagonal T = S Θ Sᵀ gives nodes θ_i with weights S_{0i}²; the density
  φ(t) = (1/R) Σ_r Σ_i w_ri N(t; θ_ri, σ²) is averaged over each grid point's cell (Gaussian CDF
  differences) and normalised to integrate to 1 on the grid (trapezoid rule).

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
from jax.sharding import NamedSharding, PartitionSpec

from landscape import checks, runtime
from landscape.clip_loss import ClipLoss

__all__ = ["DENSE_MAX_DIM", "LINEARIZE_MAX_BYTES", "PROBE_BATCH", "HessianSpectrum", "default_probe_batch",
           "hessian_spectrum", "linearize_budget"]

#: ``method="auto"`` forms the full Hessian (n HVPs, O(n²) memory, exact ``eigh``) up to this
#: dimension and uses Lanczos / Hutch++ / SLQ above it. At n = 512 the dense Hessian costs 512 HVPs
#: and 2 MiB, still cheap next to the exactness it buys (and next to the ~100–1000 HVPs of a Lanczos
#: + Hutch++ + SLQ run); clip vectors (n ≤ ~100) are always dense, network weights always iterative.
DENSE_MAX_DIM = 512

#: ``hvp="auto"`` linearizes when the residuals of the linearization (the forward and backward values
#: the tangent pass reads) take at most this many bytes, the same budget as ClipLoss's vmapped chunks.
LINEARIZE_MAX_BYTES = 2 * 1024**3
#: On an accelerator, ``hvp="auto"`` may use this fraction of the device memory not in use when that
#: exceeds ``LINEARIZE_MAX_BYTES`` (a quarter: the HVPs, Lanczos basis and f's own passes need the rest).
LINEARIZE_FREE_FRACTION = 0.25
_HVP_MODES = ("auto", "linearize", "recompute")

#: ``probe_batch=None`` on an accelerator: vectors per vmapped HVP call. On CPU it is 1: vmapping a
#: conv net's HVP over vectors turns its convolutions into grouped ones, which XLA:CPU compiles for
#: minutes and runs slower per vector (resnet20, 128 images: compile 43 s / 120 s and 1.6× / 1.9×
#: the CPU seconds per vector for blocks of 4 / 16; resnet8's T2 spectrum in paper_repro: 15.0 s
#: against 32.9 s), and a block would round the density runs up to its size.
PROBE_BATCH = 16

#: ``start="gradient"``: the Lanczos start vector is ∇f/‖∇f‖ plus a random unit vector times this.
START_NOISE = 0.1
# The adaptive trace (trace_rtol) stops on its standard error only once it has this many Monte-Carlo
# samples: an n-sample standard error is itself uncertain by about 1/√(2n) (±25 % at 8), and
# stopping at the first estimate below the target favours a lucky low one. In a resnet20 benchmark
# Hutch++ stopped on 8 samples reporting 1.59 %, where 27 samples of another seed put the spread
# of 8 at about 4 %.
ADAPTIVE_MIN_SAMPLES = 30
_STARTS = ("auto", "random", "gradient")

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
            (``tol_on="eigenvalue"``) ≤ tol · |λ_i|, floored at 100 ε · max|λ| (always True for
            "dense").
        trace: tr H (exact for "dense", estimated otherwise), or None.
        trace_stderr: standard error of ``trace`` (0.0 for "dense"), or None.
        trace_per_leaf: a pytree shaped like x0 holding, for each leaf b, tr H_bb — the trace of
            the Hessian block of that leaf's entries, from the same HVPs as ``trace`` (exact for
            "dense"); the leaves sum to ``trace``. Divided by the leaf's size it is the average
            curvature HAWQ-V2 ranks layers by for mixed-precision bit allocation. None without trace.
        trace_per_leaf_stderr: the same pytree of standard errors, or None.
        density: (grid, values) of the smoothed spectral density, integrating to 1, or None.
        density_nodes: (nodes, weights), each (runs, steps), the quadrature behind ``density``.
        method: "dense" or "lanczos".
        which: "largest", "smallest" or "magnitude".
        dim: n, the number of scalars in x0.
        n_hvp: Hessian-vector products evaluated in total.
        hvp_counts: the same, split by task ("dense", "lanczos", "trace", "density").
        seconds: wall-clock seconds of the call, compilation included.
        info: further details (Lanczos basis size and restarts, trace method and HVPs, density runs,
            steps and σ, the dense Hessian's relative asymmetry, the leaf sizes of x0, and
            ``"value"``: f(x0) whenever the gradient was evaluated, see ``x0``).
    """

    eigenvalues: np.ndarray
    eigenvectors: list | None
    residuals: np.ndarray
    errors: np.ndarray
    converged: np.ndarray
    trace: float | None
    trace_stderr: float | None
    trace_per_leaf: Any
    trace_per_leaf_stderr: Any
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
        # scientific notation always: a fixed-point precision printed a 1.7e-4 residual as "0."
        sci = lambda a: np.array2string(np.asarray(a, np.float64), separator=", ", max_line_width=100,
                                        formatter={"float_kind": lambda v: f"{v:.2e}"})
        lines.append(
            f"    residuals: {sci(self.residuals)}  errors: {sci(self.errors)}"
            f"  (converged {int(np.sum(self.converged))}/{self.converged.size})"
        )
        if self.trace is not None:
            how = "exact" if self.method == "dense" else (
                f"{self.info.get('trace_method')}, {self.info.get('trace_hvp')} HVPs")
            lines.append(f"        trace: {self.trace:.6g} ± {self.trace_stderr:.3g} ({how})")
            lines += self._leaf_trace_lines()
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

    def leaf_traces(self) -> list[tuple[str, int, float, float]]:
        """(path, size, trace, stderr) of each leaf of x0, in pytree order: the rows of
        ``trace_per_leaf`` with readable paths (``jax.tree_util.keystr``). Empty without trace."""
        if self.trace_per_leaf is None:
            return []
        paths = jax.tree_util.tree_flatten_with_path(self.trace_per_leaf)[0]
        errs = jax.tree_util.tree_leaves(self.trace_per_leaf_stderr)
        sizes = self.info["leaf_sizes"]
        return [(jax.tree_util.keystr(path) or "x0", size, value, err)
                for (path, value), err, size in zip(paths, errs, sizes, strict=True)]

    def _leaf_trace_lines(self, most: int = 5) -> list[str]:
        rows = self.leaf_traces()
        if len(rows) < 2:
            return []
        order = sorted((r for r in rows if r[1] > 0), key=lambda r: -abs(r[2]))[:most]
        width = max(len(r[0]) for r in order)
        head = f"     per leaf: {len(rows)} leaves; largest |tr H_bb|"
        return [head] + [f"       {p:<{width}}  {v:.6g} ± {e:.3g}  ({v / s:.4g} per entry, size {s})"
                         for p, s, v, e in order]

    def plot(self, ax=None, *, log: bool = True):
        """Plot the spectral density (log-scaled y by default) with the computed eigenvalues
        (``which``: top, smallest or largest-magnitude) marked, or the eigenvalues alone when no
        density was computed. Returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5, 3.5))
        marked = {"largest": "top eigenvalues", "smallest": "smallest eigenvalues",
                  "magnitude": "largest-magnitude eigenvalues"}.get(self.which, "eigenvalues")
        if self.density is not None:
            grid, values = self.density
            shown = np.maximum(values, values.max() * 1e-12) if log else values
            ax.plot(grid, shown, color="C0", lw=1.2, label="spectral density (SLQ)"
                    if self.method == "lanczos" else "spectral density (exact, smoothed)")
            if log:
                ax.set_yscale("log")
            for i, lam in enumerate(self.eigenvalues):
                ax.axvline(lam, color="C3", lw=0.8, ls="--", label=marked if i == 0 else None)
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
        if fig is not None:  # a figure of its own: keep the axis labels inside it
            fig.tight_layout()
        return ax


# --------------------------------------------------------------------------------------------------
# The HVP operator


def default_probe_batch(device=None) -> int:
    """``probe_batch=None``'s block size on ``device`` (default: JAX's first): 1 on CPU, where
    vmapped HVPs of conv nets compile and run slower than one at a time, :data:`PROBE_BATCH`
    elsewhere."""
    device = jax.devices()[0] if device is None else device
    return 1 if device.platform == "cpu" else PROBE_BATCH


def linearize_budget(device=None) -> int:
    """Bytes that ``hvp="auto"`` lets a linearization store, on ``device`` (default: JAX's first).

    CPU: ``LINEARIZE_MAX_BYTES`` (host memory is shared with everything else on the machine).
    Accelerators: max(``LINEARIZE_MAX_BYTES``, ``LINEARIZE_FREE_FRACTION`` × (bytes_limit −
    bytes_in_use)) from ``device.memory_stats()``, so a large GPU keeps what fits it (resnet20's
    4 × 128-image linearizations, 2.5 GB, on an H200 instead of recomputing every HVP); the fixed
    budget when the backend reports no statistics.
    """
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return LINEARIZE_MAX_BYTES
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001  backends without statistics raise (or return None)
        stats = {}
    limit = stats.get("bytes_limit")
    if not limit:
        return LINEARIZE_MAX_BYTES
    free = max(int(limit) - int(stats.get("bytes_in_use", 0)), 0)
    return max(LINEARIZE_MAX_BYTES, int(LINEARIZE_FREE_FRACTION * free))


class _HVP:
    """The Hessian of the flattened problem as an operator, counting the products it evaluates.

    Without batches, H = ∇²f(x). With ``batches`` [(w_b, batch_b), ...], H = Σ_b w_b ∇²f(x, batch_b),
    one HVP per batch summed on the device (memory of one batch's passes at a time).

    ``mode="recompute"``: the programs are compiled lazily and once each: a Lanczos step (one HVP
    fused with its reorthogonalisation, see :func:`_extend_core`; with batches, the batch HVPs and
    then the reorthogonalisation) and a block HVP over ``probe_batch`` vectors; each HVP reruns f's
    forward and backward pass at x.
    ``mode="linearize"``: ``jax.linearize`` of the compiled gradient at x, once (per batch); every
    product then runs only the tangent part (the linearized program is compiled once per (f,
    structure)). Like ``jax.jit`` the programs are cached per (f, structure of x0, precision), so
    calling again with the same f — at any point — compiles nothing; as with ``jax.jit``, f is
    assumed pure.
    """

    def __init__(self, f, unravel, x, structure, precision="highest", mode="auto", batches=None,
                 closed_over=()):
        fn, bound = runtime.split_partial(f)
        self.home = _home_sharding((bound, batches, closed_over))
        self._x = x = jax.device_put(x, self.home)
        self.counts: dict[str, int] = {}
        programs = _compiled_operator(fn, unravel, structure, precision, batched=batches is not None,
                                      bound=bound is not None)
        self._programs = programs
        # The terms of H = Σ_b w_b H_b: (w_b, the programs' arguments after x: f's bound data if
        # any, then the batch); one term without batches.
        pre = () if bound is None else (bound,)
        self._terms = [(None, pre)] if batches is None else [(w, pre + (b,)) for w, b in batches]
        self._batched = batches is not None
        stored = sum(_residual_bytes(programs, x, args) for _, args in self._terms) if mode != "recompute" else None
        self.device = next(iter(x.devices())) if hasattr(x, "devices") else None  # where x lives
        if mode == "auto":
            mode = "linearize" if stored <= linearize_budget(self.device) else "recompute"
        self.mode = mode
        self.stored_bytes = stored if mode == "linearize" else None  # None when every HVP recomputes
        self._grad, self._value, self._lins = None, None, None
        if mode == "linearize":
            triples = [jax.linearize(_bound(programs["grad"], args), x, has_aux=True) for _, args in self._terms]
            self._grad = self._combine([g for g, _, _ in triples])
            self._value = self._combine([value for _, _, value in triples])
            self._lins = [lin for _, lin, _ in triples]

    def _combine(self, parts):
        """Σ_b w_b parts[b] (parts[0] itself without batches), on the device."""
        if not self._batched:
            return parts[0]
        total = _scale(self._terms[0][0], parts[0])
        for (w, _), part in zip(self._terms[1:], parts[1:], strict=True):
            total = _axpy(total, w, part)
        return total

    def _hvp(self, v):
        """H v for one vector v (n,) on the device."""
        if self._lins is not None:
            return self._combine([lin(v) for lin in self._lins])
        return self._combine([self._programs["hvp"](self._x, v, *args) for _, args in self._terms])

    def _hvp_block(self, V):
        """H applied to each row of V (b, n), on the device: one vmapped program, or row by row
        through the single HVP where JAX cannot batch f's second derivative."""
        if self._programs["vmappable"]:
            try:
                if self._lins is not None:
                    return self._combine([jax.vmap(lin)(V) for lin in self._lins])
                return self._combine([self._programs["matmat"](self._x, V, *args) for _, args in self._terms])
            except NotImplementedError:
                # JAX has no batching rule for a grouped convolution's kernel gradient whose output
                # sits on a mesh (a ClipLoss's calibration set; jax 0.10-0.11), so a depthwise
                # network failed with probe_batch > 1, the default on accelerators. Same numbers.
                self._programs["vmappable"] = False
        return jnp.stack([self._hvp(v) for v in V])

    def gradient(self) -> np.ndarray:
        """∇f(x) (with batches Σ_b w_b ∇f(x, batch_b)) as a host array: the linearization's
        primal output when there is one (free), else compiled gradient evaluations."""
        if self._grad is None:
            pairs = [self._programs["grad"](self._x, *args) for _, args in self._terms]
            self._grad = self._combine([g for g, _ in pairs])
            self._value = self._combine([value for _, value in pairs])
        return np.asarray(self._grad)

    def value(self) -> float | None:
        """f(x) (with batches Σ_b w_b f(x, batch_b)) when the gradient has been evaluated (always
        with ``mode="linearize"``), else None: it comes with the gradient, never on its own."""
        return None if self._value is None else float(self._value)

    def lanczos_step(self, Q, q, j, task="lanczos"):
        """(Q, h, β, q_{j+1}) after one step from q = row j of Q; see :func:`_extend_core`."""
        self.counts[task] = self.counts.get(task, 0) + 1
        if self._lins is None and not self._batched:
            # the HVP and its reorthogonalisation fused
            return self._programs["step"](self._x, Q, q, j, *self._terms[0][1])
        return _extend(Q, self._hvp(q), j)

    def lanczos_block(self, Q, q, j, task):
        """:meth:`lanczos_step` for a block of independent bases Q (b, m+1, n), rows q (b, n)."""
        self.counts[task] = self.counts.get(task, 0) + q.shape[0]
        return _extend_batch(Q, self._hvp_block(q), j)

    def matmat(self, V, task):
        """H applied to each row of V (b, n), as a host (numpy) array. A single row takes the
        un-vmapped HVP: a vmapped one, even over one vector, turns the convolutions into grouped
        ones (slower on CPU)."""
        self.counts[task] = self.counts.get(task, 0) + V.shape[0]
        # Host probes go where the Lanczos vectors live, with their type (see _home_sharding).
        if V.shape[0] == 1:
            return np.asarray(self._hvp(jax.device_put(V[0], self.home)))[None]
        return np.asarray(self._hvp_block(jax.device_put(V, self.home)))


def _home_sharding(data):
    """Where the point and the Lanczos bases live: replicated over the mesh of the first array in
    ``data`` (f's bound data, the batches, the arrays f closes over) placed on one, e.g. a
    ClipLoss's calibration set; else None (the default device). A program's outputs carry the
    mesh of such inputs in their type, so a basis made on the host elsewhere would make the first
    Lanczos step's inputs differ in type from the later steps' and every program compile twice."""
    for leaf in jax.tree.leaves(data):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def _bound(program, args):
    """u ↦ program(u, *args) (the program itself without extra arguments)."""
    return program if not args else (lambda u: program(u, *args))


@jax.jit
def _scale(w, y):
    """w·y (one small program per shape, shared by all calls, as :func:`_axpy`)."""
    return w * y


@jax.jit
def _axpy(acc, w, y):
    """acc + w·y."""
    return acc + w * y


def _residual_bytes(programs, x, args=()):
    """Bytes ``jax.linearize`` would store at x (abstract evaluation, cached per operator and
    batch shape)."""
    key = tuple((tuple(np.shape(a)), str(jnp.result_type(a))) for a in jax.tree.leaves(args))
    cache = programs.setdefault("residual_bytes", {})
    if key not in cache:
        shapes = jax.eval_shape(lambda u, *a: jax.linearize(_bound(programs["grad"], a), u, has_aux=True)[1],
                                x, *args)
        cache[key] = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(shapes))
    return cache[key]


_OPERATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_operator(f, unravel, structure, precision, batched=False, bound=False):
    """The jitted programs for f at points of the given pytree structure, f traced under
    ``jax.default_matmul_precision(precision)``: a dict with the gradient ("grad"), the fused
    Lanczos step ("step"), the block HVP ("matmat") and the single HVP ("hvp"), and whether JAX can
    vmap the HVP ("vmappable", until a call finds otherwise); "grad" returns
    (∇f, f), the value as an aux output that ``jax.linearize`` does not differentiate. Every program
    takes the point first (after it, the step its basis, row and index, the HVPs the vector),
    then with ``bound`` the data ``(args, keywords)`` bound to f, called as
    f(*args, x, **keywords), then with ``batched`` the batch, called as f(x, batch)."""
    per_f, f_ref = runtime.weak_entry(_OPERATORS, f)
    key = (structure, precision, batched, bound)
    if key not in per_f:
        # The programs hold f only weakly (f_ref); tracing happens inside a call, f alive.

        def value(u, extra):
            data, batch = (extra[0], extra[1:]) if bound else (None, extra)
            return runtime.call_split(f_ref(), data, unravel(u), *batch)

        def grad_flat(u, *extra):
            """(∇f(u), f(u)): the value rides along at no cost, as the linearization's aux output."""
            with jax.default_matmul_precision(precision):  # read when the programs are traced
                f_u, g = jax.value_and_grad(value)(u, extra)
            return g, f_u

        def hvp(point, v, *extra):
            return jax.jvp(lambda u: grad_flat(u, *extra)[0], (point,), (v,))[1]

        def lanczos_step(point, Q, q, j, *extra):
            return _extend_core(Q, hvp(point, q, *extra), j)

        per_f[key] = {
            "grad": jax.jit(grad_flat),
            "step": jax.jit(lanczos_step, donate_argnums=1),
            "matmat": jax.jit(jax.vmap(hvp, in_axes=(None, 0) + (None,) * (bound + batched))),
            "hvp": jax.jit(hvp),
            "vmappable": True,  # False once JAX fails to vmap the HVP (see _HVP._hvp_block)
        }
    return per_f[key]


# --------------------------------------------------------------------------------------------------
# Lanczos kernels (pure, jitted once per shape and shared by all calls)


def _extend_core(Q, w, j):
    """One Lanczos step with full reorthogonalisation.

    Q: (m+1, n) basis rows, rows 0..j filled; w = H q_j (n,). Returns (Q with row j+1 set, h, β,
    q_{j+1}): h = Q w (rows > j zeroed) is column j of T, and q_{j+1} = w'/β with w' = w − Qᵀh and
    β = ‖w'‖. When β ≤ 100·eps·‖w‖ the basis spans an invariant subspace (a breakdown): β is
    returned as exactly 0 and row j+1 as zeros, and the caller continues from a fresh direction
    (:func:`_fresh_direction`). Handling that rare case outside keeps this kernel branch-free and
    cheap to compile (a ``lax.cond`` here became a select under vmap, paying for both branches).
    """
    rows = Q.shape[0]
    mask = (jnp.arange(rows) <= j).astype(Q.dtype)
    w_norm = jnp.linalg.norm(w)
    # Classical Gram–Schmidt twice ("twice is enough", Giraud et al. 2005) keeps the basis
    # orthogonal to working precision, which single-vector Lanczos loses after a few Ritz pairs converge.
    h = (Q @ w) * mask
    w = w - h @ Q
    h2 = (Q @ w) * mask
    w = w - h2 @ Q
    beta = jnp.linalg.norm(w)
    broke = beta <= 100.0 * jnp.finfo(Q.dtype).eps * w_norm
    beta = jnp.where(broke, 0.0, beta)
    q_next = jnp.where(broke, 0.0, w / jnp.where(broke, 1.0, beta))
    Q = jax.lax.dynamic_update_index_in_dim(Q, q_next, j + 1, axis=0)
    return Q, h + h2, beta, q_next


def _fresh_direction_core(Q, r, j, replace):
    """Row j+1 of Q ← r orthogonalised (twice) against rows 0..j and normalised, where `replace`;
    returns (Q, that row). r (n,) comes from the caller's seeded generator."""
    mask = (jnp.arange(Q.shape[0]) <= j).astype(Q.dtype)
    r = r - ((Q @ r) * mask) @ Q
    r = r - ((Q @ r) * mask) @ Q
    r = r / jnp.maximum(jnp.linalg.norm(r), jnp.finfo(Q.dtype).tiny)
    row = jnp.where(replace, r, Q[j + 1])
    return jax.lax.dynamic_update_index_in_dim(Q, row, j + 1, axis=0), row


_extend = jax.jit(_extend_core, donate_argnums=0)
_extend_batch = jax.jit(jax.vmap(_extend_core, in_axes=(0, 0, None)), donate_argnums=0)
_fresh_direction = jax.jit(_fresh_direction_core, donate_argnums=0)
_fresh_direction_batch = jax.jit(jax.vmap(_fresh_direction_core, in_axes=(0, 0, None, 0)), donate_argnums=0)


@partial(jax.jit, static_argnums=(2,))
def _restart_basis(Q, S_keep, m):
    """Thick restart: rows 0..p-1 ← Ritz vectors S_keepᵀ Q[:m], row p ← q_m, the rest zero.
    Returns (the new basis, its row p)."""
    p = S_keep.shape[1]
    Y = S_keep.T.astype(Q.dtype) @ Q[:m]
    Q_new = jnp.zeros_like(Q)
    Q_new = Q_new.at[:p].set(Y)
    return Q_new.at[p].set(Q[m]), Q[m]


def _order(theta, which):
    if which == "largest":
        return np.argsort(-theta, kind="stable")
    if which == "smallest":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _start_basis(rows, first, where=None):
    """first (..., n) → (a basis (..., rows, n) with row 0 = first/‖first‖ and zeros elsewhere, that
    row), on the device (``where``: the operator's :attr:`_HVP.home`). Built on the host and moved
    with device_put: eager jnp.zeros, .at[].set and even jnp.asarray compile a small XLA program
    for every new shape."""
    first = first / np.linalg.norm(first, axis=-1, keepdims=True)
    Q = np.zeros(first.shape[:-1] + (rows, first.shape[-1]), first.dtype)
    Q[..., 0, :] = first
    return jax.device_put(Q, where), jax.device_put(first, where)


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


def _thresholds(wanted, theta, tol, eps):
    """Each wanted Ritz value's stopping threshold: tol · |θ_i|, its own size, not the largest
    |θ|'s, which can exceed the gap between a smaller wanted eigenvalue and the next one and so
    accept a neighbour in its place (λ = 1e5, 50, 40 over a unit bulk: θ₃ = 1.79 passed at
    tol · 1e5). Floored at 100 ε · max|θ| (``eps``: of the least precise leaf of x0, see
    :func:`_rounding_eps`), which the Lanczos residual estimate reaches, so eigenvalues near
    zero still converge."""
    floor = 100 * eps * np.max(np.abs(theta))
    return np.maximum(tol * np.abs(wanted), floor)


def _rounding_eps(x0) -> float:
    """ε of the HVPs' rounding: that of x0's least precise leaf, each leaf counted as at least
    float32 (the Lanczos basis is float32 or wider). With float32 and float64 leaves (x64 on) the
    products carry float32 rounding, which float64's ε would ask Lanczos to beat: it spent every
    restart and reported failure on answers as accurate as an all-float32 run's."""
    f32 = float(np.finfo(np.float32).eps)
    return max(min(float(jnp.finfo(jnp.result_type(leaf)).eps), f32) for leaf in jax.tree_util.tree_leaves(x0))


def _repeated(values, thresholds):
    """(value, count) of the first Ritz value that agrees with others within their thresholds
    (|θ_i − θ_j| ≤ t_i + t_j), or None."""
    close = np.abs(values[:, None] - values[None, :]) <= thresholds[:, None] + thresholds[None, :]
    counts = close.sum(axis=1)
    if counts.size and counts.max() > 1:
        i = int(np.argmax(counts))
        return float(values[i]), int(counts[i])
    return None


def _gradient_start(op, rng):
    """∇f/‖∇f‖ plus a random unit vector times START_NOISE (so Lanczos still sees eigenvectors
    orthogonal to the gradient), or None when the gradient is zero or not finite."""
    g = op.gradient().astype(np.float64)
    norm = float(np.linalg.norm(g))
    if not (np.isfinite(norm) and norm > 0):
        return None
    r = rng.standard_normal(g.size)
    return g / norm + START_NOISE * r / np.linalg.norm(r)


def _lanczos_top_k(op, n, dtype, k, m, which, tol, tol_on, max_restarts, rng, v0=None, eps=None):
    """Thick-restart Lanczos from ``v0`` (default: a Gaussian vector drawn from `rng`, a numpy
    Generator). Returns eigenvalues, Ritz coefficient matrix S (j, k), basis Q, active size j,
    residuals, eigenvalue error estimates, converged flags and the number of restarts.

    After a breakdown (β = 0, or β ≤ √ε · max|θ|: the Krylov subspace is invariant to rounding,
    so every Ritz residual is 0 there) the wanted set is accepted
    only once it is the same at two consecutive steps: the
    fresh direction taken at the breakdown gets a step to show an eigenvalue outside the
    subspace (a further copy of a repeated one). Without this, the smallest 3 eigenvalues of a
    rank-3 Hessian came out as [0, 187, 207] against [0, 0, 0], marked converged."""
    dtype = np.dtype(dtype)
    eps = float(np.finfo(dtype).eps) if eps is None else eps
    # From a random start no acceptance before min(m, max(2k + 1, 20)) steps, ARPACK's default
    # basis: a k-th Ritz value converged to a real but lower eigenvalue before a member of a tight
    # cluster had entered the Krylov space (spectrum {5, 4.999, 4.998, 4.5, 3, …}, top 4: a member
    # missed in 19 of 40 seeds). The gradient start (v0) needs the same basis for k > 1 (from
    # random x0 it missed a member in 8 of 20 seeds): aligned with the top eigenvectors, it still
    # need not hold every member of a cluster. Only a single eigenvalue (k = 1) is accepted from
    # the first steps on (0 of 20 missed there), which is what makes a top eigenvalue cost 3 HVPs.
    min_basis = 1 if (v0 is not None and k == 1) else min(m, n, max(2 * k + 1, 20))
    Q, q = _start_basis(m + 1, (rng.standard_normal(n) if v0 is None else v0).astype(dtype), op.home)
    T = np.zeros((m + 1, m + 1))
    keep = min(k + max((m - k) // 2, 1), m - 1) if m < n else k
    j = 0  # number of basis vectors whose H q has been taken
    restarts = 0
    broke, previous = False, None  # a breakdown seen; the wanted Ritz values of the last check
    while True:
        while j < m:
            Q, h, beta, q = op.lanczos_step(Q, q, j)
            h = np.asarray(h, dtype=np.float64)
            beta = float(beta)
            if not (np.all(np.isfinite(h)) and np.isfinite(beta)):
                raise _not_finite(f"the Hessian-vector product of Lanczos step {j + 1}")
            if beta == 0.0:
                # An invariant subspace was found: go on from a random direction orthogonal to the
                # basis, decoupled from T (β = 0), so Lanczos can find eigenvalues outside it.
                Q, q = _fresh_direction(Q, rng.standard_normal(n).astype(dtype), j, True)
            T[: j + 1, j] = h[: j + 1]
            T[j, : j + 1] = h[: j + 1]
            T[j + 1, j] = T[j, j + 1] = beta
            j += 1
            if j < min_basis:
                continue
            theta, S = np.linalg.eigh(T[:j, :j])
            idx = _order(theta, which)
            res = np.abs(T[j, j - 1] * S[j - 1, :])
            err = _eigenvalue_errors(theta, res)
            limits = _thresholds(theta[idx[:k]], theta, tol, eps)
            done = (res if tol_on == "residual" else err)[idx[:k]] <= limits
            # a breakdown to rounding counts: β ≤ √ε · max|θ| (float32 HVPs of a rank-3 Hessian
            # left β = 3e-5 · max|θ| where the subspace was invariant)
            broke = broke or (j < n and beta <= np.sqrt(eps) * np.max(np.abs(theta)))
            wanted, stable = theta[idx[:k]], True
            if broke and j < n:  # see the docstring: the wanted set must survive a fresh direction
                stable = previous is not None and bool(np.all(np.abs(previous - wanted) <= limits))
            previous = wanted
            if np.all(done) and stable:
                break
            done = done & stable
        if np.all(done) or restarts >= max_restarts or m >= n:
            break
        # Keep the `keep` wanted Ritz pairs and the residual direction; T becomes an arrowhead whose
        # coupling column is recomputed by the next step's reorthogonalisation.
        sel = idx[:keep]
        Q, q = _restart_basis(Q, S[:, sel], m)
        T = np.zeros_like(T)
        T[np.arange(keep), np.arange(keep)] = theta[sel]
        j = keep
        restarts += 1
    sel = idx[:k]
    return theta[sel], S[:, sel], Q, j, res[sel], err[sel], done, restarts


def _slq_nodes(op, n, dtype, runs, steps, block, rng):
    """Stochastic Lanczos quadrature: nodes and weights (runs, steps), runs processed in vmapped
    blocks of `block` (the run count is rounded up to a multiple of it; every run is used).
    Rademacher start vectors and breakdown directions are drawn from `rng` (a numpy Generator)."""
    dtype = np.dtype(dtype)
    n_blocks = -(-runs // block)
    nodes, weights = [], []
    single = block == 1  # un-vmapped HVPs and kernels (see _HVP.matmat)
    for _ in range(n_blocks):
        signs = (2.0 * rng.integers(0, 2, (block, n)) - 1.0).astype(dtype)
        Q, q = _start_basis(steps + 1, signs[0] if single else signs, op.home)
        columns = []
        for j in range(steps):
            if single:
                Q, h, beta, q = op.lanczos_step(Q, q, j, task="density")
            else:
                Q, h, beta, q = op.lanczos_block(Q, q, j, "density")
            broke = np.atleast_1d(np.asarray(beta) == 0.0)
            if broke.any() and j + 1 < steps:  # breakdown: see _lanczos_top_k
                fresh = rng.standard_normal((block, n)).astype(dtype)
                if single:
                    Q, q = _fresh_direction(Q, fresh[0], j, True)
                else:
                    Q, q = _fresh_direction_batch(Q, fresh, j, broke)
            columns.append(np.asarray(h, np.float64).reshape(block, -1)[:, :steps])
        # (block, steps, steps) with [r, i, j] = q_iᵀ H q_j for i ≤ j; the off-diagonal β_j appears
        # as the next column's reorthogonalisation coefficient, so T is its symmetrised upper part.
        h = np.stack(columns, axis=-1)
        for r in range(block):
            T = np.triu(h[r])
            theta, S = np.linalg.eigh(T + np.triu(T, 1).T)
            nodes.append(theta)
            weights.append(S[0, :] ** 2)
    return np.stack(nodes), np.stack(weights)


def _smooth_density(nodes, weights, num_grid, sigma):
    """Gaussian-smoothed density of the quadrature (nodes, weights) on a grid, normalised to 1.

    Each grid value is the mixture's mean over the point's cell (between the midpoints to its
    neighbours; the end cells reach only the grid's ends), from differences of the Gaussian CDF:
    the point value when σ is many cells wide, and never a lost eigenvalue when σ is narrower
    than a cell (sampled at the points, a node between two of them vanished while the
    normalisation inflated the others). The trapezoid rule on the grid then sums exactly the
    cells' masses."""
    from scipy import special

    nodes = np.asarray(nodes, np.float64).ravel()
    weights = np.asarray(weights, np.float64).ravel()
    weights = weights / weights.sum()
    lo, hi = float(nodes.min()), float(nodes.max())
    span = hi - lo
    if sigma is None:
        sigma = 0.01 * span if span > 0 else 0.01 * max(abs(hi), 1.0)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_grid)
    edges = np.concatenate([grid[:1], (grid[1:] + grid[:-1]) / 2, grid[-1:]])
    mass = np.zeros(num_grid)
    # Chunk over nodes so that (edges × nodes) stays small for dense spectra with many eigenvalues.
    for s in range(0, nodes.size, 4096):
        cdf = special.ndtr((edges[:, None] - nodes[None, s : s + 4096]) / sigma)
        mass += np.diff(cdf, axis=0) @ weights[s : s + 4096]
    values = mass / np.diff(edges)
    values /= np.trapezoid(values, grid)  # the 5σ tails beyond the grid: a 6e-7 correction
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


def _leaf_sums(values, sizes):
    """values (rows, n) → (rows, leaves): the sum over each leaf's slice of the columns, leaves of
    the given sizes in order (a zero-size leaf sums to 0, which np.add.reduceat would not give)."""
    out = np.zeros((values.shape[0], len(sizes)))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    filled = np.asarray(sizes) > 0
    if filled.any():
        out[:, filled] = np.add.reduceat(values, starts[filled], axis=1)
    return out


def _trace(op, n, dtype, method, num_probes, block, rtol, max_probes, rng, sizes):
    """Hutch++ or Hutchinson trace with its standard error; extends the Monte-Carlo part in blocks
    until stderr ≤ rtol·|trace| when rtol is given. Probes come from `rng` (a numpy Generator).

    Also returns the trace of each diagonal block H_bb, b a leaf of x0 with ``sizes[b]`` entries,
    from the same HVPs, and its standard error. With D_b the 0/1 diagonal selecting block b and
    P = QQᵀ the Hutch++ sketch projector, tr(D_b H) = tr(D_b HP) + tr(D_b H(I−P)): the first
    term is exact, Σ_{i∈b} Σ_k Q_ik (HQ)_ik, and the second is the expectation of the Monte-Carlo
    sample gᵀ(I−P) D_b H(I−P)g restricted to the block, since tr((I−P) D_b H (I−P)) =
    tr(D_b H (I−P)) by cyclicity. (tr(D_b PHP), the block's share of tr(QᵀHQ), would be biased:
    the cross terms tr(D_b PH(I−P)) vanish only summed over all blocks.) The block estimates sum
    exactly to the global one.

    Returns (trace, stderr, HVPs used, block traces (leaves,), their standard errors (leaves,))."""
    # The probes and the sketch algebra live on the host: only the HVP program is compiled,
    # whatever the probe counts.
    dtype = np.dtype(dtype)

    def rademacher(rows):
        return (2.0 * rng.integers(0, 2, (rows, n)) - 1.0).astype(dtype)

    low_rank = 0.0
    low_rank_leaf = np.zeros(len(sizes))
    Qt = None
    if method == "hutch++":
        sketch = _round_up(min(num_probes // 3, n), block)
        mc = _round_up(max(num_probes - 2 * (num_probes // 3), 2), block)
        Y = _apply_blocks(op, rademacher(sketch), block, "trace")
        Qt = np.linalg.qr(Y.T.astype(np.float64))[0].T  # (min(sketch, n), n) orthonormal rows
        HQ = _apply_blocks(op, Qt.astype(dtype), block, "trace").astype(np.float64)
        diag = np.sum(Qt * HQ, axis=0)  # diag(HP); sums to tr(QᵀHQ)
        low_rank = float(diag.sum())
        low_rank_leaf = _leaf_sums(diag[None], sizes)[0]
        if Qt.shape[0] >= n:  # the sketch spans everything: tr(QᵀHQ) is the exact trace
            return low_rank, 0.0, op.counts["trace"], low_rank_leaf, np.zeros(len(sizes))
    else:
        mc = _round_up(max(num_probes, 2), block)
    samples, leaf_samples = [], []
    drawn = 0
    while True:
        G = rademacher(mc if drawn == 0 else block).astype(np.float64)
        if Qt is not None:
            G = G - (G @ Qt.T) @ Qt
        HG = _apply_blocks(op, G.astype(dtype), block, "trace")
        products = G * HG.astype(np.float64)
        samples.append(np.sum(products, axis=1))
        leaf_samples.append(_leaf_sums(products, sizes))
        drawn += G.shape[0]
        values = np.concatenate(samples)
        estimate = low_rank + values.mean()
        stderr = values.std(ddof=1) / np.sqrt(values.size)
        settled = values.size >= ADAPTIVE_MIN_SAMPLES  # a standard error of fewer samples is too noisy to stop on
        if rtol is None or (settled and stderr <= rtol * abs(estimate)) or op.counts["trace"] + block > max_probes:
            break
    per_leaf = np.concatenate(leaf_samples)
    leaf_estimate = low_rank_leaf + per_leaf.mean(axis=0)
    leaf_stderr = per_leaf.std(axis=0, ddof=1) / np.sqrt(per_leaf.shape[0])
    return float(estimate), float(stderr), op.counts["trace"], leaf_estimate, leaf_stderr


# --------------------------------------------------------------------------------------------------
# Validation


def _not_finite(what: str) -> ValueError:
    return ValueError(f"{what} are not finite (NaN or inf): f or its derivatives are not finite at x0; check "
                      "that f(x0) is finite and x0 lies inside f's domain (e.g. no log or sqrt of a value <= 0)")


def _check_value(op, batched):
    """Refuse a non-finite f(x0) once it is known (see :meth:`_HVP.value`): its HVPs can be finite
    (f = Σx² + NaN has H = 2I), but they are then not the curvature of anything."""
    value = op.value()
    if value is not None and not np.isfinite(value):
        call = "f(x0, batch) (the batches' weighted mean)" if batched else "f(x0)"
        raise ValueError(f"{call} = {value} is not finite (NaN or inf); check that x0 lies inside f's domain "
                         "(e.g. no log or sqrt of a value <= 0) and that f's data are finite")


def _leaf_name(path) -> str:
    """A leaf of x0 named by its pytree path, e.g. ``x0['params']['dense']['kernel']`` (``x0`` itself
    when x0 is one array)."""
    return "x0" + jax.tree_util.keystr(path)


def _first_few(items, limit=5) -> str:
    """The first ``limit`` items, "; "-joined, and how many more there are."""
    more = f"; and {len(items) - limit} more leaves" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _flatten_and_check(f, x0, args=()):
    """(x0 as one host vector, the traceable inverse, the host inverse, x0's structure, the arrays
    f closes over) after checking x0 and f(x0, *args); see :func:`_ravel_on_host`."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(x0)
    if not with_paths:
        raise ValueError("x0 has no array leaves; pass a pytree of floating-point arrays")
    names = [_leaf_name(path) for path, _ in with_paths]
    leaves = [leaf for _, leaf in with_paths]
    dtypes = [jnp.result_type(leaf) for leaf in leaves]
    wrong = [f"{name} has dtype {dt}" for name, dt in zip(names, dtypes, strict=True)
             if not jnp.issubdtype(dt, jnp.floating)]
    if wrong:
        raise ValueError(f"every leaf of x0 must be a floating-point array (a float dtype such as float32 or "
                         f"bfloat16): {_first_few(wrong)}")
    flat, unravel, unravel_host, structure = _ravel_on_host(leaves, treedef)
    if flat.size == 0:
        raise ValueError("x0 has zero elements; the Hessian of an empty problem is undefined")
    finite = np.isfinite(flat)
    if not finite.all():
        cuts = np.cumsum([int(np.prod(np.shape(leaf))) for leaf in leaves])[:-1]
        counts = [int(part.size - np.count_nonzero(part)) for part in np.split(finite, cuts)]
        bad = [f"{name} contains {count} NaN/inf value(s)"
               for name, count in zip(names, counts, strict=True) if count]
        raise ValueError(f"x0 is not finite: {_first_few(bad)}; the Hessian needs a finite point")
    try:
        traced, out = jax.make_jaxpr(f, return_shape=True)(x0, *args)
    except Exception as err:  # surface tracing failures with the offending call named
        call = "f(x0, batches[0])" if args else "f(x0)"
        raise ValueError(f"{call} could not be traced by JAX: {err}") from err
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():  # a tuple or dict of one scalar too
        got = f"shape {out.shape}" if isinstance(out, jax.ShapeDtypeStruct) else f"a {type(out).__name__}"
        raise ValueError(f"f must return a scalar array, got output of {got}; reduce it (e.g. mean) or "
                         "take the element")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"f must return a real floating-point scalar, got dtype {out.dtype}")
    return flat, unravel, unravel_host, structure, traced.consts


def _check_batches(batches):
    """[(n_b / N, batch_b), ...] from a sequence of batches, checking each has leaves with one
    common, non-zero leading size."""
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise ValueError("batches must be a sequence of data batches (pytrees of arrays), got "
                         f"{type(batches).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; pass at least one batch, or batches=None for f(x)")
    sizes = []
    for i, batch in enumerate(batches):
        leaves = jax.tree.leaves(batch)
        leading = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
        if not leaves or None in leading or len(leading) != 1 or 0 in leading:
            shapes = [np.shape(leaf) for leaf in leaves]
            raise ValueError(f"batches[{i}] must be a pytree of arrays sharing one non-zero leading (example) "
                             f"axis, got leaf shapes {shapes}")
        sizes.append(leading.pop())
    total = float(sum(sizes))
    return [(n / total, batch) for n, batch in zip(sizes, batches, strict=True)]


def _ravel_on_host(leaves, treedef):
    """The leaves as one host vector of their common dtype, as ``ravel_pytree`` would give, but
    at least float32, with its inverse for traced vectors (used inside the compiled programs) and
    for host vectors, and the structure (treedef, ((shape, dtype), ...)) that keys the compiled
    programs. The inverse casts each part back to its leaf's dtype, so f still runs in float16
    or bfloat16, while the Lanczos basis, its reorthogonalisation and its stopping floor
    (100 ε · max|θ|, 10 % of λ_max in float16) work in float32.
    Done with numpy: eager jnp concatenation and slicing compile small XLA programs per structure,
    most of a first call's time on a small problem."""
    dtype = np.dtype(jnp.promote_types(jnp.result_type(*leaves), jnp.float32))
    shapes = [np.shape(leaf) for leaf in leaves]
    dtypes = [jnp.result_type(leaf) for leaf in leaves]
    cuts = np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1]
    flat = np.concatenate([np.asarray(leaf).astype(dtype).ravel() for leaf in leaves])

    def unravel(v):
        parts = jnp.split(v, cuts)
        return treedef.unflatten([p.reshape(s).astype(d) for p, s, d in zip(parts, shapes, dtypes, strict=True)])

    def unravel_host(v):
        parts = np.split(np.asarray(v), cuts)
        arrays = [jax.device_put(p.reshape(s).astype(d)) for p, s, d in zip(parts, shapes, dtypes, strict=True)]
        return treedef.unflatten(arrays)

    return flat, unravel, unravel_host, (treedef, tuple(zip(shapes, dtypes, strict=True)))


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
    probe_batch: int | None = None,
    precision: str = "highest",
    hvp: str = "auto",
    start: str = "auto",
    batches=None,
    seed: int = 0,
) -> HessianSpectrum:
    """Top eigenpairs, trace and spectral density of H = ∇²f(x0), from Hessian-vector products.

    Args:
        f: pytree → scalar, traceable by JAX (a ``ClipLoss``, taken as its ``alpha_loss()``;
            ``ClipLoss.weight_loss(α)``; a
            weight-space loss closing over its data — which may be sharded over several devices —,
            any function; a ``jax.tree_util.Partial`` has its bound arrays passed as data, see
            the note below).
        x0: the point, any pytree of floating-point arrays; n = total number of elements. f runs
            on leaves of their own dtype; the vectors of the algorithms are at least float32
            (a float16 Lanczos basis stops at 10 % of λ_max). f(x0) comes with the gradient, so
            it is checked (a non-finite value is an error) and kept in ``info["value"]`` whenever
            the gradient is evaluated: always with ``hvp="linearize"`` (free, its primal output),
            and otherwise when Lanczos starts from the gradient (``start="gradient"``); a
            "recompute" call that never takes the gradient (dense, or a random start) does not
            evaluate f(x0), and catches only non-finite HVPs.
        top_k: number of eigenpairs, 1 ≤ top_k ≤ n.
        trace: estimate tr H (Hutch++/Hutchinson for "lanczos", exact for "dense"), and the trace
            of each leaf's diagonal block from the same HVPs (``trace_per_leaf``).
        density: compute the spectral density (SLQ for "lanczos", exact eigenvalues for "dense").
        method: "auto" (dense if n ≤ ``DENSE_MAX_DIM`` = 512, else "lanczos"), "dense" or "lanczos".
        which: "largest" (algebraic, returned descending), "smallest" (ascending) or "magnitude"
            (by |λ|, descending), as PyHessian reports.
        eigenvectors: also return eigenvectors, as a list of top_k pytrees shaped like x0.
        tol: Lanczos stops when every wanted Ritz residual ‖Hy − θy‖ (or error estimate, see
            ``tol_on``) is ≤ tol · |θ_i|, relative to that eigenvalue (floored at 100 ε · max|θ|,
            1.2e-5 · max|θ| in float32, for eigenvalues near zero).
        tol_on: "residual" (default: each eigenvalue is then within tol · |θ_i| of one of H's,
            guaranteed, and the eigenvectors are accurate to about tol · |θ_i| / gap) or
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
            trace_stderr ≤ trace_rtol · |trace| with at least ``ADAPTIVE_MIN_SAMPLES`` = 30
            Monte-Carlo samples (a standard error of fewer is too noisy to stop on), or
            ``max_probes`` (≥ num_probes; default 10·num_probes) HVPs.
        density_runs, density_steps: SLQ runs (rounded up to a multiple of the probe block) and
            Lanczos steps per run (at most n). They cost runs · steps HVPs (800 by default, the
            most of any task: PyHessian's default density is one run of 100); fewer runs give a
            noisier density with the same isolated eigenvalues. Memory is block · (steps + 1) · n
            numbers.
        density_grid, density_sigma: grid size and Gaussian width; σ defaults to 1% of the
            spectral range. Each grid value is φ's mean over the point's cell, so a σ narrower
            than the grid spacing blurs the density into a histogram but loses no eigenvalue.
            With a few outliers far from a narrow bulk (a trained network's spectrum) the default
            σ is wider than the bulk and spreads it out: PyHessian's variance is 1e-5 · range
            (σ = 0.021 for a range of 43, where ours is 0.43); pass a smaller σ, or read
            ``density_nodes``, the unsmoothed quadrature.
        probe_batch: vectors per vmapped HVP call (trace probes, SLQ runs, dense columns); None:
            1 on CPU, :data:`PROBE_BATCH` (16) on an accelerator (see :func:`default_probe_batch`).
        precision: matmul/convolution precision of the HVPs (``jax.default_matmul_precision``):
            "highest" (default, true float32) or a faster level such as "default" (TF32 on recent
            NVIDIA GPUs, whose ~1e-3 relative rounding would blur a tol=1e-3 eigenvalue). No
            effect on CPU.
        hvp: "linearize" (``jax.linearize`` the gradient at x0 once and apply only its tangent
            part: each HVP skips f's forward and backward pass, ~25% faster on a conv net, at the
            cost of storing their values), "recompute" (every HVP reruns them: memory of one
            gradient) or "auto" (linearize when the stored values fit :func:`linearize_budget`:
            2 GiB on CPU, on an accelerator up to a quarter of its free memory). ``info["hvp"]``
            says which ran and
            ``info["hvp_stored_bytes"]`` what it stored.
        start: the Lanczos start vector: "gradient" (∇f(x0)/‖∇f‖ plus a random unit vector
            times ``START_NOISE`` = 0.1, so that directions orthogonal to the gradient are still
            found; a zero gradient falls back to random), "random" (Gaussian) or "auto"
            ("gradient" for ``which`` "largest" or "magnitude", else "random"). Near a minimum
            of a trained network the gradient lies mostly in the top eigenspace (on the
            benchmark's resnet20, cos(∇f, v₁) = 0.79), so the top eigenvalue to 1e-3 takes 3
            HVPs instead of 4–6. Free with ``hvp="linearize"`` (the linearization's primal
            output); one gradient evaluation otherwise. ``info["start"]`` says which was used.
        batches: a sequence of data batches (pytrees whose leaves share a leading example axis)
            for a Hessian over more data than one forward and backward pass can hold. f is then
            called as f(x, batch), and H = Σ_b (n_b / N) ∇²f(x0, batch_b), n_b the examples of batch b
            and N = Σ n_b: the Hessian of the mean loss over all examples when f(x, batch) is the
            mean over its batch (PyHessian's ``dataloader`` mode). Each HVP runs one product per
            batch; memory is that of one batch, plus with ``hvp="linearize"`` the stored values
            of every batch (``"auto"`` sums them against the same budget). f's programs compile
            once per batch shape (equal batches, or a smaller last one: two compiles).
        seed: non-negative integer seeding every random draw (start vectors, probes); the
            same seed gives the same result.

    Returns:
        :class:`HessianSpectrum`.

    Raises:
        ValueError: non-scalar or non-float f(x0), a non-finite f(x0) (when evaluated, see x0),
            non-finite or empty x0, top_k outside [1, n],
            unknown method / which / trace_method, or non-positive counts.

    Note:
        Single-vector Lanczos finds one copy of an exactly repeated eigenvalue per invariant
        subspace (in floating point, sometimes a second). At a breakdown it goes on from a fresh
        direction and accepts only a wanted set that the next step leaves unchanged, so the
        copies of a null space's 0 (a rank-deficient Hessian) are found one per breakdown when
        ``lanczos_steps`` exceeds the rank + 1 (the default, max(40, 4·top_k), for a rank-3
        Hessian); a smaller basis restarts before the fresh directions are taken and can still
        stop at one copy (40×40, rank 5: [0, 2.15, 3.49] at lanczos_steps = 5, marked converged).
        Copies missed otherwise are replaced by the next eigenvalues, converged pairs of H but
        not its top k. When two of the returned eigenvalues agree within the tolerance, a
        RuntimeWarning says so; for exactly degenerate spectra, "dense" (small n) is the
        reliable choice. The residual test guarantees each returned pair, not that no eigenvalue
        of the top k is missing: a tight cluster (relative gaps below ``tol``) can converge
        before all its members have entered the Krylov space. From a random start Lanczos
        therefore takes at least min(lanczos_steps, max(2·top_k + 1, 20)) steps, ARPACK's default
        basis, before it accepts: over 40 seeds of a spectrum {5, 4.999, 4.998, 4.5, 3, …} at
        top_k = 4 it then missed none (mean 22 HVPs; accepting from step k on, it had missed one
        in 19, at a mean of 19.6 HVPs). So does the gradient start for top_k > 1 (accepting from
        step k on, it missed one in 8 of 20 seeds of random x0; 0 of 20 with the basis, 21 HVPs
        against 19); for top_k = 1 it accepts from the first steps (0 of 20 missed), which is
        what lets a top eigenvalue cost 3 HVPs.
        ``residuals`` are those of the float32 (or wider) Ritz vectors; eigenvectors returned
        in a float16/bfloat16 leaf are rounded to it, which alone can raise ‖Hv − λv‖ to the
        order of that dtype's ε · |λ|.
        The compiled HVP programs are cached per (f, structure of x0), like ``jax.jit``: f is
        assumed pure, and data it closes over are captured when it is first traced. A
        ``jax.tree_util.Partial`` whose bound arguments are arrays is cached per function instead,
        those arrays passed as data, so partials of one function with other data of the same
        shapes (``ClipLoss.weight_loss`` at another α or bit width) compile nothing.
    """
    t0 = time.perf_counter()
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
    if start not in _STARTS:
        raise ValueError(f"unknown start {start!r}; allowed: {', '.join(_STARTS)}")
    if not checks.is_positive_finite(tol):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if trace_rtol is not None and not checks.is_positive_finite(trace_rtol):
        raise ValueError(f"trace_rtol must be None or a positive number, got {trace_rtol!r}")
    if density_sigma is not None and not checks.is_positive_finite(density_sigma):
        raise ValueError(f"density_sigma must be None or a positive number, got {density_sigma!r}")
    trace = checks.check_flag(trace, "trace")
    density = checks.check_flag(density, "density")
    eigenvectors = checks.check_flag(eigenvectors, "eigenvectors")
    if probe_batch is not None:
        probe_batch = checks.check_int(probe_batch, "probe_batch")
    max_restarts = checks.check_int(max_restarts, "max_restarts", minimum=0)
    density_runs = checks.check_int(density_runs, "density_runs")
    density_steps = checks.check_int(density_steps, "density_steps")
    density_grid = checks.check_int(density_grid, "density_grid", minimum=2)
    num_probes = checks.check_int(num_probes, "num_probes", minimum=4 if trace_method == "hutch++" else 2)
    seed = checks.check_int(seed, "seed", minimum=0)
    if max_probes is not None:  # below num_probes it would end the adaptive trace before it starts
        max_probes = checks.check_int(max_probes, "max_probes", minimum=num_probes)
    if lanczos_steps is not None:
        lanczos_steps = checks.check_int(lanczos_steps, "lanczos_steps")

    if isinstance(f, ClipLoss):
        # Its shared program, the data as arguments (see split_partial): compiled once per
        # network and site layout, not once per ClipLoss object.
        f = f.alpha_loss()
    terms = None if batches is None else _check_batches(batches)
    flat, unravel, unravel_host, structure, consts = _flatten_and_check(
        f, x0, () if terms is None else (terms[0][1],))
    n = int(flat.size)
    dtype = flat.dtype
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= n:
        raise ValueError(f"top_k must be an integer in [1, n] with n = {n} (the size of x0), got {top_k!r}")
    top_k = int(top_k)
    if method == "auto":
        method = "dense" if n <= DENSE_MAX_DIM else "lanczos"

    op = _HVP(f, unravel, flat, structure, precision, hvp, terms, closed_over=consts)
    _check_value(op, terms is not None)
    if probe_batch is None:
        probe_batch = default_probe_batch(op.device)
    # Host generators, one stream per task: jax.random would compile a sampler per vector length.
    rng_lanczos, rng_trace, rng_density = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    info: dict[str, Any] = {"hvp": op.mode, "hvp_stored_bytes": op.stored_bytes}
    if terms is not None:
        info["batches"] = len(terms)
    trace_value = trace_stderr = leaf_trace = leaf_stderr = None
    density_out = nodes_out = None
    sizes = [int(np.prod(shape)) for shape, _ in structure[1]]
    info["leaf_sizes"] = sizes

    if method == "dense":
        # Blocks of near-equal size, so that zero padding wastes fewer than one HVP per block.
        n_blocks = -(-n // probe_batch)
        block = -(-n // n_blocks)
        H = _apply_blocks(op, None, block, "dense", n_rows=n, n=n, dtype=dtype)
        H = np.asarray(H, np.float64)
        if not np.all(np.isfinite(H)):
            raise _not_finite(f"{int(np.sum(~np.isfinite(H)))} of the {n}x{n} Hessian entries")
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
            leaf_trace, leaf_stderr = _leaf_sums(np.diag(H)[None], sizes)[0], np.zeros(len(sizes))
        if density:
            nodes_out = (evals[None, :], np.full((1, n), 1.0 / n))
    else:
        m = min(n, lanczos_steps if lanczos_steps is not None else max(40, 4 * top_k))
        if m < n and m < top_k + 2:
            raise ValueError(f"lanczos_steps must be at least top_k + 2 = {top_k + 2} (or >= n), got {m}")
        if start == "auto":
            start = "gradient" if which in ("largest", "magnitude") else "random"
        v0 = _gradient_start(op, rng_lanczos) if start == "gradient" else None
        _check_value(op, terms is not None)
        info["start"] = "random (zero or non-finite gradient)" if start == "gradient" and v0 is None else start
        eps = _rounding_eps(x0)
        values, S, Q, j, residuals, errors, converged, restarts = _lanczos_top_k(
            op, n, dtype, top_k, m, which, tol, tol_on, max_restarts, rng_lanczos, v0, eps
        )
        info.update(lanczos_steps=m, lanczos_restarts=restarts, tol=tol, tol_on=tol_on)
        if not np.all(converged):
            warnings.warn(
                f"Lanczos: {int(np.sum(~converged))} of {top_k} eigenpairs not converged to tol={tol} ({tol_on}) "
                f"after {restarts} restarts; raise lanczos_steps or max_restarts",
                RuntimeWarning,
                stacklevel=2,
            )
        repeated = _repeated(values, _thresholds(values, values, tol, eps))
        if repeated:
            warnings.warn(
                f"Lanczos found the eigenvalue {repeated[0]:.6g} {repeated[1]} times: it may be repeated, and "
                "single-vector Lanczos can miss further copies of a repeated eigenvalue (returning a smaller "
                "one in their place); use method='dense' where n allows",
                RuntimeWarning,
                stacklevel=2,
            )
        vec_rows = None
        if eigenvectors:
            vec_rows = S.T.astype(dtype) @ np.asarray(Q)[:j]  # in the basis' precision, as it was built
        groups = []
        if trace:
            groups += [num_probes // 3, num_probes - 2 * (num_probes // 3)] if trace_method == "hutch++" \
                else [num_probes]
        if density:
            groups.append(density_runs)
        block = min(probe_batch, max(groups)) if groups else probe_batch
        if trace:
            limit = max_probes if max_probes is not None else 10 * num_probes
            trace_value, trace_stderr, used, leaf_trace, leaf_stderr = _trace(
                op, n, dtype, trace_method, num_probes, block, trace_rtol, limit, rng_trace, sizes
            )
            info.update(trace_method=trace_method, trace_hvp=used)
        if density:
            steps = min(density_steps, n)
            nodes_out = _slq_nodes(op, n, dtype, density_runs, steps, block, rng_density)
            info.update(density_runs=nodes_out[0].shape[0], density_steps=steps)
    if nodes_out is not None:
        grid, dens, sigma = _smooth_density(*nodes_out, density_grid, density_sigma)
        density_out = (grid, dens)
        info["density_sigma"] = sigma

    vecs = None
    if eigenvectors:
        vecs = [unravel_host(row) for row in vec_rows]
    per_leaf = per_leaf_err = None
    if leaf_trace is not None:
        treedef = structure[0]
        per_leaf = treedef.unflatten([float(v) for v in leaf_trace])
        per_leaf_err = treedef.unflatten([float(v) for v in leaf_stderr])
    if np.size(values) and not np.any(np.asarray(values)) and not trace_value:
        # what a loss through an argmax or a rounding without straight-through gives: no curvature
        # to find, and the repeated-eigenvalue warning above would point at the wrong cause
        warnings.warn("every eigenvalue found is exactly 0" + (" and so is the trace" if trace_value is not None
                                                               else "") +
                      ": f may not depend differentiably on x0 (an argmax, a rounding or a stop_gradient has "
                      "zero derivatives); check jax.grad(f)(x0)", RuntimeWarning, stacklevel=2)
    counts = dict(op.counts)
    if op.value() is not None:
        info["value"] = op.value()
    return HessianSpectrum(
        eigenvalues=np.asarray(values, np.float64),
        eigenvectors=vecs,
        residuals=np.asarray(residuals, np.float64),
        errors=np.asarray(errors, np.float64),
        converged=np.asarray(converged, bool),
        trace=trace_value,
        trace_stderr=trace_stderr,
        trace_per_leaf=per_leaf,
        trace_per_leaf_stderr=per_leaf_err,
        density=density_out,
        density_nodes=nodes_out,
        method=method,
        which=which,
        dim=n,
        n_hvp=int(sum(counts.values())),
        hvp_counts=counts,
        seconds=time.perf_counter() - t0,
        info=info,
    )
