"""LAPQ: loss-aware joint choice of all clipping values (Nahshan et al., 2019/2021).

At aggressive bit widths the calibration loss L(α) over the clipping vector α (n,) is
steep and non-separable, so α is chosen jointly, in two steps:

1. **Lp sweep → p*.** For every p of a grid, the layer-wise Lp-optimal clipping
   α_p = argmin_α E|Q_α(x) − x|^p (per site, ``loss.init("lp", p=p)``) and its loss
   L(α_p) (all grid points in one ``loss.batch`` call). A quadratic a·p² + b·p + c is
   fitted to (p, L(α_p)); p* = −b / 2a when the fit is convex (a > 0) and −b / 2a lies
   inside the grid, otherwise the best grid point (:func:`select_p`; the choice is
   logged and recorded in the result). The start is α_{p*}.
2. **Joint optimisation** of all α from α_{p*}, by one of

   * ``"powell"`` — :func:`scipy.optimize.minimize` with ``method="Powell"`` and the
     reference's options (xtol = ftol = 1e-4, ``maxiter`` sweeps), on α itself (float64
     from SciPy, cast to float32 for the compiled loss). Each line search is Brent from
     the bracket t ∈ {0, 1} along a direction in absolute α units. Recent SciPy (1.17 here)
     ends a line search whose bracket search finds no interior minimum (a flat stretch of
     the piecewise-constant loss) at the best of its bracket points without running Brent,
     where the reference's SciPy ran Brent on that bracket: trajectories can differ from the
     reference's (8 of 29 line searches at resnet8 W4A4 on 128 digits images).
   * ``"cd"`` — the paper's coordinate-descent baseline: per sweep and per coordinate,
     ``minimize_scalar(method="brent")`` with SciPy's default tolerance and default
     bracket (0, 1) in absolute α; the coordinate is set to Brent's minimiser even when
     that is worse than its old value (so CD can collapse, as in the reference).
   * ``"batched"`` — our own optimizer built on ``loss.batch`` (see :func:`_batched`):
     up to three straight-through gradient steps first, while they improve (the STE
     gradient gives a direction for all coordinates at once; a ladder of step lengths
     along it is one batched call of the true loss), then Gauss–Seidel coordinate ladders in log α (a 6-point ladder per
     coordinate in the first sweep, a ±w_i compass with adaptive widths after it), each
     coordinate's candidates in one batched call, with bracket expansion and Hooke–Jeeves
     pattern moves. Every accepted point is chosen on the true loss, which never
     increases. It spends 2–6 evaluations per coordinate where a Brent line search
     spends 20–30.

**Positivity.** ``"powell"`` and ``"cd"`` work on α directly, like the reference; the loss
is +inf for any α ≤ 0, which SciPy sees as the finite penalty 1e6 of the reference CD
(so bracket arithmetic stays finite), and an iterate with that value is never accepted.
The reference penalises α < 0 only and evaluates α = 0, CD's first bracket point, with
its step floored at 1e-8 (a finite loss of 2–6); an objective emulating that gave the same
CD and Powell histories and α at W3A3, A3 and A2 on a small CNN.
``"batched"`` works in u = log α, so every candidate is positive by construction.
The returned α is always positive.

**Interruption.** Ctrl-C (KeyboardInterrupt) returns the best α evaluated so far with
``interrupted=True``: during step 2 the best of the joint step, which starts from α_{p*} (a
grid point of the sweep can be better still: its losses are in ``p_losses``), or during the
Lp sweep once it has evaluated an α, the sweep's best (the joint step is then skipped). That
is for a person at a prompt. Code that stores or aggregates results passes
``on_interrupt="raise"`` so that a cut-short optimisation is never kept as a finished one:
:func:`compare_methods`, the command line, ``paper_repro.py``
and the ``bench/`` scripts all do, and then resume from their own stores.

Evaluations are counted one per α: a ``loss.batch`` call of K rows counts K. Gradient
evaluations (``"batched"`` only) are counted apart, in ``n_grads``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.optimize

from landscape import checks, runtime, train
from landscape.data import Dataset, Split

logger = logging.getLogger(__name__)

METHODS = ("powell", "cd", "batched")
DEFAULT_P_GRID = np.linspace(2.0, 4.0, 10)
P_RANGE = (1.0, 8.0)  # open interval allowed for p
PENALTY = 1e6  # what SciPy sees for α ≤ 0 (the reference CD's penalty)
POWELL_TOL = 1e-4  # xtol = ftol, the reference's (SciPy's default) options
FLAT_CURVATURE = 1e-9  # select_p: a fit whose |a|·(p range)² is at most this × max|L| is flat


# --------------------------------------------------------------------------- p* selection


@dataclasses.dataclass(frozen=True)
class PSelection:
    """The choice of p from a sweep.

    Attributes:
      p_star: the chosen p.
      rule: ``"vertex"`` (the convex fit's minimiser, inside the grid), ``"concave"`` (fit
        not convex: best grid point), ``"outside"`` (vertex outside the grid: best grid
        point), ``"flat"`` (the fitted curvature is rounding noise, |a|·(p range)² ≤ 1e-9·max|L|:
        best grid point) or ``"degenerate"`` (fewer than 3 finite losses: best grid point).
        :func:`lapq` interrupted after the sweep records ``"interrupted"``: the best grid
        point, which is what it returned.
      coeffs: (a, b, c) of the fit L(p) ≈ a·p² + b·p + c (NaN when not fitted).
      best_grid_p: the grid p with the lowest loss.
    """

    p_star: float
    rule: str
    coeffs: tuple[float, float, float]
    best_grid_p: float

    @property
    def used_fit(self) -> bool:
        return self.rule == "vertex"


def select_p(ps, losses) -> PSelection:
    """p* from a sweep of losses L(α_p): the vertex of a least-squares quadratic fit when
    the fit is convex and the vertex lies inside [min p, max p] of the points fitted, else the
    best grid p.

    Args:
      ps: (P,) grid of p values.
      losses: (P,) calibration losses at α_p (non-finite entries are left out of the fit).
    Returns:
      a :class:`PSelection`.

    The fit is L(p) ≈ a·p² + b·p + c, vertex p* = −b / (2a).
    """
    ps = np.asarray(ps, np.float64)
    losses = np.asarray(losses, np.float64)
    if ps.ndim != 1 or ps.shape != losses.shape or len(ps) == 0:
        raise ValueError(f"ps and losses must be 1-D of the same non-zero length; got {ps.shape}, "
                         f"{losses.shape}")
    if not np.all(np.isfinite(ps)) or len(np.unique(ps)) != len(ps):
        raise ValueError(f"ps must be distinct finite p values; got {ps.tolist()}")
    finite = np.isfinite(losses)
    if not finite.any():
        raise ValueError(f"every loss of the p sweep is non-finite: {losses.tolist()}")
    best = float(ps[finite][np.argmin(losses[finite])])
    if finite.sum() < 3:
        return PSelection(best, "degenerate", (math.nan,) * 3, best)
    a, b, c = (float(v) for v in np.polyfit(ps[finite], losses[finite], 2))
    span = float(np.ptp(ps[finite]))
    # A constant sweep fits a ≈ ±1e-17 of rounding noise, whose "vertex" is arbitrary; its sign
    # depends on the LAPACK build (an H200 machine's numpy fitted −1e-17: "concave").
    if abs(a) * span**2 <= FLAT_CURVATURE * float(np.max(np.abs(losses[finite]))):
        return PSelection(best, "flat", (a, b, c), best)
    if not a > 0:
        return PSelection(best, "concave", (a, b, c), best)
    vertex = -b / (2.0 * a)
    if not ps[finite].min() <= vertex <= ps[finite].max():  # inside the points fitted
        return PSelection(best, "outside", (a, b, c), best)
    return PSelection(float(vertex), "vertex", (a, b, c), best)


def check_p_grid(p_grid) -> np.ndarray:
    """Validate a p grid: 1-D, at least 3 distinct finite values inside (1, 8). Sorted copy."""
    grid = np.asarray(p_grid, np.float64)
    lo, hi = P_RANGE
    if grid.ndim != 1 or len(grid) < 3:
        raise ValueError(f"p_grid must be a 1-D sequence of at least 3 values; got shape {grid.shape}")
    if not np.all(np.isfinite(grid)) or grid.min() <= lo or grid.max() >= hi:
        raise ValueError(f"p_grid values must lie in the open interval ({lo:g}, {hi:g}); "
                         f"got {grid.tolist()}")
    grid = np.sort(grid)
    if np.any(np.diff(grid) <= 0):
        raise ValueError(f"p_grid values must be distinct; got {grid.tolist()}")
    return grid


# --------------------------------------------------------------------------- result


@dataclasses.dataclass
class LAPQResult:
    """What :func:`lapq` found.

    Attributes:
      alpha: (n,) float32, the final clipping vector (positive).
      loss: L(alpha).
      method: "powell" | "cd" | "batched".
      p_star: the p of the start α_{p*} (None when ``init`` was given).
      init_alpha: (n,) float32, the start of the joint step.
      init_loss: L(init_alpha).
      n_evals: loss evaluations in total (the p sweep included; a batch of K counts K).
      n_grads: STE-gradient evaluations (``"batched"``'s first step; 0 for the others).
      seconds: wall time of the whole call.
      history: per iteration of the joint step (0 = the start): dicts with ``iteration``,
        ``loss``, ``n_evals`` and ``n_grads`` (so far) and ``seconds`` (since the call began).
      interrupted: True when Ctrl-C stopped the sweep or the joint step (alpha = the best so
        far of the step it stopped: see the module docstring).
      message: why the joint step stopped.
      p_selection: the :class:`PSelection` of the sweep (None when ``init`` was given).
      p_grid, p_losses: the sweep (empty when ``init`` was given).
      bias_correction: whether the loss applied per-channel bias correction.
      improvements: every fall of the best loss evaluated so far, in the sweep and then in the
        joint step, whose record starts again at α_{p*} (so its first entries can lie above the
        sweep's best): dicts with ``loss``, ``n_evals`` and ``seconds`` at that evaluation — the
        time to a given loss to the evaluation, where ``history`` has it to the end of an
        iteration.
    """

    alpha: np.ndarray
    loss: float
    method: str
    p_star: float | None
    init_alpha: np.ndarray
    init_loss: float
    n_evals: int
    seconds: float
    history: list[dict]
    interrupted: bool
    message: str
    p_selection: PSelection | None = None
    p_grid: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    p_losses: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    bias_correction: bool = True
    n_grads: int = 0
    improvements: list = dataclasses.field(default_factory=list)

    def __repr__(self) -> str:
        if self.p_selection is None:
            start = "given init" if len(self.p_grid) == 0 else "the Lp sweep's best α (interrupted)"
        else:
            start = f"Lp(p*={self.p_star:.3f}, {self.p_selection.rule})"
        lines = [
            f"LAPQResult(method={self.method!r}, n={len(self.alpha)})",
            f"         loss: {self.loss:.6g}  (start {self.init_loss:.6g} at {start})",
            f"      n_evals: {self.n_evals}" + (f"  (+ {self.n_grads} gradients)" if self.n_grads else ""),
            f"      seconds: {self.seconds:.2f}",
            f"   iterations: {len(self.history) - 1}",
            f"  interrupted: {self.interrupted}",
            f"      message: {self.message}",
            f"        alpha: {_short(self.alpha)}",
        ]
        return "\n".join(lines)


def _short(a, k: int = 6) -> str:
    a = np.asarray(a)
    body = ", ".join(f"{v:.4g}" for v in a[:k])
    return f"[{body}{', …' if len(a) > k else ''}] (n={len(a)})"


# --------------------------------------------------------------------------- bookkeeping


class _Stop(Exception):
    """The callback asked to stop."""


class _Tracker:
    """Counts evaluations, remembers the best α evaluated and records the history."""

    def __init__(self, loss, t0: float, callback: Callable | None):
        self.loss = loss
        self.t0 = t0
        self.callback = callback
        self.n_evals = 0
        self.n_grads = 0
        self.best_alpha: np.ndarray | None = None
        self.best_loss = math.inf
        self.history: list[dict] = []
        self.improvements: list[dict] = []

    def _offer(self, alpha: np.ndarray, value: float):
        if math.isfinite(value) and value < self.best_loss:
            self.best_loss, self.best_alpha = value, np.array(alpha, np.float32)
            self.improvements.append(dict(loss=value, n_evals=self.n_evals,
                                          seconds=time.perf_counter() - self.t0))

    def value(self, alpha) -> float:
        """L(α) for one (n,) α (float32 on the way in, float on the way out; NaN reads as +inf)."""
        alpha = np.asarray(alpha, np.float32)
        v = float(self.loss(alpha))
        v = math.inf if math.isnan(v) else v
        self.n_evals += 1
        self._offer(alpha, v)
        return v

    def values(self, alphas) -> np.ndarray:
        """L for each row of a (K, n) stack, in one ``loss.batch`` call; (K,) float64.

        A NaN (a loss object that failed on a row; a ClipLoss overflows to +inf instead) reads
        as +inf, the worst value: the optimizers' ``argmin`` over a batch would otherwise take
        the first NaN row and miss the batch's best.
        """
        alphas = np.asarray(alphas, np.float32)
        v = np.asarray(self.loss.batch(alphas), np.float64)
        v = np.where(np.isnan(v), np.inf, v)
        self.n_evals += len(alphas)
        if len(v):
            i = int(np.argmin(v))
            self._offer(alphas[i], float(v[i]))
        return v

    def grad_log(self, u) -> np.ndarray:
        """∂L/∂u at u = log α: the STE gradient times α; (n,) float64."""
        alpha = np.exp(np.asarray(u, np.float64))
        g = np.asarray(self.loss.grad(alpha.astype(np.float32)), np.float64) * alpha
        self.n_grads += 1
        return g

    def record(self, iteration: int, alpha, value: float):
        """Log one iteration; run the callback (True from it stops the joint step)."""
        entry = dict(iteration=iteration, loss=float(value), n_evals=self.n_evals,
                     n_grads=self.n_grads, seconds=time.perf_counter() - self.t0)
        self.history.append(entry)
        if self.callback is not None and iteration > 0:
            if self.callback(dict(entry, alpha=np.array(alpha, np.float32))):
                raise _Stop


def _scipy_objective(tracker: _Tracker) -> Callable[[np.ndarray], float]:
    """f(α float64) for SciPy: L(α cast to float32), the penalty 1e6 where L is +inf."""

    def f(x):
        v = tracker.value(x)
        return v if math.isfinite(v) else PENALTY

    return f


# --------------------------------------------------------------------------- step 2: optimizers


def _powell(tracker: _Tracker, alpha0: np.ndarray, f0: float, maxiter: int):
    """SciPy's Powell on α (float64 → float32), the reference's options. Returns (α, L, message)."""
    objective = _scipy_objective(tracker)
    sweeps = [0]

    def callback(intermediate_result):
        sweeps[0] += 1
        tracker.record(sweeps[0], intermediate_result.x, intermediate_result.fun)

    res = scipy.optimize.minimize(objective, np.asarray(alpha0, np.float64), method="Powell",
                                  callback=callback,
                                  options=dict(xtol=POWELL_TOL, ftol=POWELL_TOL, maxiter=maxiter))
    return np.asarray(res.x, np.float32), float(res.fun), str(res.message)


def _coordinate_descent(tracker: _Tracker, alpha0: np.ndarray, f0: float, maxiter: int):
    """The reference's CD: per sweep, per coordinate i, Brent (SciPy defaults: bracket (0, 1)
    in absolute α, xtol 1.48e-8) on α_i ↦ L(α); α_i is set to Brent's minimiser, which may
    be worse than the old α_i. Returns (α, L, message)."""
    objective = _scipy_objective(tracker)
    alpha = np.asarray(alpha0, np.float64).copy()
    value = f0
    for sweep in range(1, maxiter + 1):
        for i in range(len(alpha)):
            def along(a_i, i=i):
                x = alpha.copy()
                x[i] = a_i
                return objective(x)

            res = scipy.optimize.minimize_scalar(along, method="brent")
            # A minimiser at the penalty (every probe had α_i ≤ 0) is no α at all: keep α_i.
            if np.isfinite(res.x) and res.x > 0 and res.fun < PENALTY:
                alpha[i], value = float(res.x), float(res.fun)
        tracker.record(sweep, alpha, value)
    return alpha.astype(np.float32), value, f"{maxiter} coordinate sweep(s) done"


def _batched(tracker: _Tracker, alpha0: np.ndarray, f0: float, maxiter: int, *,
             ladder=(-1.0, -0.5, -0.25, 0.25, 0.5, 1.0), narrow_ladder=(-1.0, 1.0), width: float = 1.6,
             min_width: float = 0.01, max_width: float = 3.0, gradient_steps: int = 3,
             gradient_ladder=(0.0625, 0.125, 0.25, 0.5, 1.0)):
    """Our joint optimizer: an STE-gradient step, then batched coordinate ladders, all in
    u = log α (so every candidate α is positive). Returns (α, L, message); L never increases.

    1. **Gradient steps** (up to ``gradient_steps``, while they improve): the direction
       d = −g / max|g| with g = ∂L_STE/∂u, the straight-through surrogate's gradient
       (one reverse pass); the true loss at u + t·d for t ∈ ``gradient_ladder`` (log units
       of the largest coordinate move) in one ``loss.batch`` call; the best t is accepted
       when it lowers L. On a piecewise-constant loss the surrogate's direction is only
       good for a first coarse move (measured on resnet20 W3A3: it halves L from the Lp(p*)
       start, then stops improving), so the method switches to coordinates after the
       first step that fails.
    2. ``maxiter`` Gauss–Seidel sweeps over the coordinates in network order (one sweep is
       one iteration, as one Powell iteration is one sweep over its directions).
       Coordinate i carries a step width w_i (log units, start ``width``):

       * the first sweep evaluates the ladder u_i + w_i·s, s ∈ ``ladder`` (6 points, up to
         a factor e^1.6 ≈ 5 either way), later sweeps the compass u_i ± w_i — each in one
         ``loss.batch`` call;
       * when the best point is an end of the ladder and improves, the ladder continues
         outward (2 and 4 times that step) in one more call, as a bracket expands;
       * the best candidate is accepted when it lowers L; then w_i = 2·|accepted step|,
         otherwise w_i /= 4 (w_i kept in [``min_width``, ``max_width``]).

       After each sweep a pattern move (Hooke–Jeeves): the sweep's displacement d is tried
       at ½, 1, 2 and 4 times in one call. The sweeps end early on the Powell stop test
       2(f_old − f) ≤ 1e-4 (|f_old| + |f|) once every width is down to 4·``min_width``.

    Why it is cheaper than Powell: a coordinate costs 6 (first sweep) or 2 evaluations,
    against ~20–30 for a Brent line search (SciPy's Powell runs it to tol = 100·xtol = 1e-2)
    on a piecewise-constant loss,
    the gradient step moves every coordinate for the price of ~6 evaluations, and the
    candidates of one coordinate form one batched call (one vmapped program on an
    accelerator, one compiled sequential loop on CPU).
    """
    ladder = np.asarray(ladder, np.float64)
    narrow = np.asarray(narrow_ladder, np.float64)
    u = np.log(np.asarray(alpha0, np.float64))
    f = f0
    steps = np.asarray(gradient_ladder, np.float64)
    for _ in range(gradient_steps):
        u, f, improved = _gradient_step(tracker, u, f, steps)
        if not improved:
            break
    w = np.full(len(u), float(width))
    for it in range(1, maxiter + 1):
        f_old = f
        u_start = u.copy()
        for i in range(len(u)):
            u, f, w[i] = _ladder_step(tracker, u, f, i, w[i] * (ladder if it == 1 else narrow),
                                      min_width, max_width)
        u, f = _pattern_move(tracker, u, f, u - u_start)
        tracker.record(it, np.exp(u), f)
        stalled = 2.0 * (f_old - f) <= POWELL_TOL * (abs(f_old) + abs(f)) + 1e-20
        if stalled and np.max(w) <= 4.0 * min_width:  # a failed sweep with wide steps only narrows them
            return np.exp(u).astype(np.float32), f, f"converged after {it} iteration(s)"
    return np.exp(u).astype(np.float32), f, f"{maxiter} iteration(s) done"


def _gradient_step(tracker, u, f, steps):
    """u + t·d for t in ``steps`` (one batch), d = −g/max|g| from the STE gradient g at u;
    returns (u, f, improved)."""
    g = tracker.grad_log(u)
    top = float(np.max(np.abs(g))) if g.size else 0.0
    if not (math.isfinite(top) and top > 0):
        return u, f, False
    cand = u[None] - steps[:, None] * (g / top)[None]
    fs = tracker.values(np.exp(cand))
    j = int(np.argmin(fs))
    if fs[j] < f:
        return cand[j], float(fs[j]), True
    return u, f, False


def _ladder_step(tracker, u, f, i, steps, min_width, max_width):
    """One coordinate of :func:`_batched`: candidates u_i + steps (one batch), bracket
    expansion past an improving end, acceptance. Returns (u, f, new width of i)."""
    cand = np.repeat(u[None], len(steps), 0)
    cand[:, i] += steps
    fs = tracker.values(np.exp(cand))
    j = int(np.argmin(fs))
    if fs[j] < f and j in (0, len(steps) - 1):
        far = np.repeat(u[None], 2, 0)
        far[:, i] += steps[j] * np.array([2.0, 4.0])
        steps = np.concatenate([steps, far[:, i] - u[i]])
        cand = np.concatenate([cand, far])
        fs = np.concatenate([fs, tracker.values(np.exp(far))])
        j = int(np.argmin(fs))
    if fs[j] < f:
        return cand[j], float(fs[j]), float(np.clip(2.0 * abs(steps[j]), min_width, max_width))
    return u, f, max(float(np.max(np.abs(steps))) / 4.0, min_width)


def _pattern_move(tracker, u, f, d):
    """Hooke–Jeeves pattern move: u + t·d for t ∈ {½, 1, 2, 4} in one batch; accept the
    best if it lowers f."""
    if not np.any(d):
        return u, f
    cand = u[None] + np.array([0.5, 1.0, 2.0, 4.0])[:, None] * d[None]
    fs = tracker.values(np.exp(cand))
    j = int(np.argmin(fs))
    return (cand[j], float(fs[j])) if fs[j] < f else (u, f)


# --------------------------------------------------------------------------- step 1: Lp sweep


def lp_sweep(loss, p_grid=DEFAULT_P_GRID, tracker: _Tracker | None = None):
    """Layer-wise Lp-optimal α for every p of the grid and their losses.

    Returns (alphas (P, n) float32, losses (P,) float64), row i for ``p_grid[i]`` in the order
    given; the losses come from one ``loss.batch`` call.
    """
    check_p_grid(p_grid)
    grid = np.asarray(p_grid, np.float64)
    alphas = np.stack([np.asarray(loss.init("lp", p=float(p)), np.float32) for p in grid])
    losses = tracker.values(alphas) if tracker is not None else np.asarray(loss.batch(alphas), np.float64)
    return alphas, losses


def lp_start(loss, p_grid=DEFAULT_P_GRID, tracker: _Tracker | None = None):
    """LAPQ's step 1: the sweep, p* (:func:`select_p`, logged) and the start α_{p*}.

    Returns (alpha (n,) float32, selection, losses (P,)). α_{p*} is a fresh Lp
    calibration at p* when the fit is used, else the sweep's α at the best grid p.
    """
    grid = check_p_grid(p_grid)
    alphas, losses = lp_sweep(loss, grid, tracker)
    selection = select_p(grid, losses)
    return _alpha_at(loss, grid, alphas, selection), selection, losses


def _alpha_at(loss, grid, alphas, selection) -> np.ndarray:
    """α_{p*}: a fresh Lp calibration at p* when the fit is used, else the sweep's α at the best grid p."""
    if selection.used_fit:
        logger.info("LAPQ: p* = %.3f from the convex quadratic fit of loss vs p", selection.p_star)
        return np.asarray(loss.init("lp", p=selection.p_star), np.float32)
    logger.warning("LAPQ: the quadratic fit of loss vs p is not usable (%s); p* = best grid point %.3f",
                   selection.rule, selection.p_star)
    return alphas[int(np.argmin(np.abs(grid - selection.p_star)))]


def _check_loss(loss, what: str = "lapq"):
    checks.check_clip_loss(loss, what)
    if loss.n == 0:
        raise ValueError(f"{loss!r} has no quantized sites (every site is FP32); give w_bits and/or "
                         "a_bits so that there are clipping values to optimise")


def _check_maxiter(maxiter):
    if isinstance(maxiter, bool) or not isinstance(maxiter, int | np.integer) or maxiter < 1:
        raise ValueError(f"maxiter={maxiter!r} must be an integer >= 1")
    return int(maxiter)


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not allowed; use one of {METHODS}")
    return method


def _start_from(loss, init) -> np.ndarray:
    """α from ``init``: a calibration rule name or an (n,) positive finite vector."""
    if isinstance(init, str):
        return np.asarray(loss.init(init), np.float32)
    # The loss's own check: shape, and the first entry that is not in (0, ALPHA_MAX] (NaN
    # included) by index, value and site.
    return np.asarray(loss._check_alpha(init, positive=True, name="init"), np.float32)


def with_bias_correction(loss, bias_correction: bool | None):
    """``loss`` itself (``bias_correction`` None, or the loss's own setting), or a copy with the
    bias-correction option switched (only when it has weight sites, where the option changes
    anything)."""
    if bias_correction is None:
        return loss
    checks.check_flag(bias_correction, "bias_correction")
    has_weights = any(s.kind == "weight" for s in loss.sites)
    if not has_weights or bool(loss.options.get("bias_correction")) == bool(bias_correction):
        return loss
    return loss.with_options(bias_correction=bool(bias_correction))


ON_INTERRUPT = ("return", "raise")


def lapq(loss, *, p_grid=DEFAULT_P_GRID, method: str = "powell", maxiter: int = 2,
         bias_correction: bool | None = None, init=None, callback: Callable | None = None,
         on_interrupt: str = "return") -> LAPQResult:
    """Loss-aware post-training quantization: Lp sweep → p*, then joint optimisation of α.

    Args:
      loss: a :class:`landscape.ClipLoss` with at least one quantized site.
      p_grid: the p values of the sweep (≥ 3 distinct values in (1, 8)); default
        linspace(2, 4, 10) as in the reference.
      method: "powell" (the paper's LAPQ), "cd" (the paper's coordinate-descent baseline)
        or "batched" (ours; see the module docstring).
      maxiter: iterations of the joint step (Powell: SciPy iterations, one line search along
        each direction of its set, the coordinates in the first, updated directions after; CD:
        coordinate sweeps; batched: coordinate sweeps after its gradient step, see :func:`_batched`).
      bias_correction: None (default) optimises ``loss`` as built — build it with
        ``bias_correction=True`` for the reference's per-channel weight bias correction
        (``-bcw``). True/False optimise a copy with that setting, ``loss.with_options(
        bias_correction=...)``: the α returned fits the copy, so evaluate, export and round
        with the copy, not ``loss`` (``res.bias_correction`` says which setting was used).
      init: None (the Lp sweep picks the start), a calibration rule name ("mse", …) or an
        (n,) start vector; the sweep is skipped when given.
      callback: called after every iteration of the joint step with a dict (iteration,
        loss, n_evals, seconds, alpha); returning True stops the joint step.
      on_interrupt: what Ctrl-C does: "return" (default) the best α so far, with
        ``interrupted=True``; "raise" re-raise the KeyboardInterrupt, for callers that store
        or aggregate the result (a partial optimisation must not pass for a finished one).
    Returns:
      a :class:`LAPQResult`.
    """
    t0 = time.perf_counter()
    _check_loss(loss)
    method = _check_method(method)
    maxiter = _check_maxiter(maxiter)
    grid = check_p_grid(p_grid)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback={callback!r} must be a callable (called with a dict per iteration) or None")
    if on_interrupt not in ON_INTERRUPT:
        raise ValueError(f"on_interrupt={on_interrupt!r} is not allowed; use one of {ON_INTERRUPT}")
    loss = with_bias_correction(loss, bias_correction)
    tracker = _Tracker(loss, t0, callback)

    selection, p_losses = None, np.zeros(0)
    interrupted = False
    try:
        if init is None:
            alphas, p_losses = lp_sweep(loss, grid, tracker)
            selection = select_p(grid, p_losses)
            alpha0 = _alpha_at(loss, grid, alphas, selection)
        else:
            alpha0 = _start_from(loss, init)
            grid = np.zeros(0)
        f0 = tracker.value(alpha0)
    except KeyboardInterrupt:
        # Step 1 interrupted: the best α the sweep evaluated is the result (none yet: re-raise)
        if tracker.best_alpha is None or on_interrupt == "raise":
            raise
        interrupted = True
        alpha0, f0 = tracker.best_alpha, tracker.best_loss
        if selection is not None:  # α_{p*} was not evaluated: the result is the sweep's best grid point
            selection = dataclasses.replace(selection, p_star=selection.best_grid_p, rule="interrupted")
    if not math.isfinite(f0):
        raise ValueError(f"the start α gives a non-finite loss ({f0}); check init")
    tracker.best_alpha, tracker.best_loss = alpha0.copy(), f0
    tracker.record(0, alpha0, f0)

    optimizer = {"powell": _powell, "cd": _coordinate_descent, "batched": _batched}[method]
    if interrupted:
        alpha, value, message = alpha0, f0, "interrupted (KeyboardInterrupt) in the Lp sweep"
    else:
        try:
            alpha, value, message = optimizer(tracker, alpha0, f0, maxiter)
        except KeyboardInterrupt:
            if on_interrupt == "raise":
                raise
            interrupted = True
            alpha, value, message = tracker.best_alpha, tracker.best_loss, "interrupted (KeyboardInterrupt)"
        except _Stop:
            alpha, value, message = tracker.best_alpha, tracker.best_loss, "stopped by the callback"

    return LAPQResult(
        alpha=np.asarray(alpha, np.float32), loss=float(value), method=method,
        p_star=None if selection is None else float(selection.p_star), init_alpha=alpha0,
        init_loss=float(f0), n_evals=tracker.n_evals,
        seconds=time.perf_counter() - t0, history=tracker.history, interrupted=interrupted,
        message=message, p_selection=selection, p_grid=grid, p_losses=np.asarray(p_losses),
        bias_correction=bool(loss.options.get("bias_correction")), n_grads=tracker.n_grads,
        improvements=tracker.improvements,
    )


# --------------------------------------------------------------------------- method table

RULE_ROWS = (("max", "max"), ("percentile", "percentile"), ("MSE", "mse"), ("ACIQ", "aciq"), ("KL", "kl"))
OPTIMIZER_ROWS = (("CD", "cd"), ("LAPQ (Powell)", "powell"), ("batched", "batched"))
ALL_ROWS = ("FP32",) + tuple(r for r, _ in RULE_ROWS) + ("Lp(p*)",) + tuple(r for r, _ in OPTIMIZER_ROWS)


def _width(bits) -> str:
    """A bit-width option as printed in "W4A4": the int, None, or "(mixed)" for a per-site dict."""
    return "(mixed)" if isinstance(bits, Mapping) else str(bits)


@dataclasses.dataclass
class MethodComparison:
    """Calibration loss and test accuracy of every method over calibration-sampling seeds.

    Attributes:
      rows: the method names, in table order (see ``ALL_ROWS``).
      seeds: the calibration-sampling seeds (one calibration set each).
      calib_loss, test_acc, n_evals, seconds: row → (S,) arrays (n_evals / seconds are
        those of the joint step for CD / Powell / batched, NaN for the other rows; seconds
        with the loss's programs compiled beforehand).
      p_star: (S,) the p* of each seed; p_rule: how each p* was chosen. NaN and "not computed"
        when no row starts from α_{p*} (Lp(p*), CD, LAPQ, batched): the Lp sweep is skipped.
      setting: what was compared (network, bit widths, calibration size, options).
    """

    rows: tuple[str, ...]
    seeds: tuple[int, ...]
    calib_loss: dict
    test_acc: dict
    n_evals: dict
    seconds: dict
    p_star: np.ndarray
    p_rule: list
    setting: dict

    def mean(self, field: str, row: str) -> float:
        return float(np.mean(getattr(self, field)[row]))

    def best_layerwise(self, field: str = "test_acc") -> tuple[str, float]:
        """The layer-wise rule (max … KL, Lp(p*)) with the best mean ``field``."""
        layerwise = [r for r in self.rows if r not in ("FP32",) + tuple(n for n, _ in OPTIMIZER_ROWS)]
        sign = -1.0 if field == "test_acc" else 1.0
        best = min(layerwise, key=lambda r: sign * self.mean(field, r))
        return best, self.mean(field, best)

    def to_markdown(self) -> str:
        s = self.setting
        head = (f"{s.get('network', '')} W{_width(s.get('w_bits'))}A{_width(s.get('a_bits'))}, calibration "
                f"{s.get('calib_size')} images × {len(self.seeds)} seed{'' if len(self.seeds) == 1 else 's'} "
                f"{list(self.seeds)}, "
                f"bias correction {'on' if s.get('bias_correction') else 'off'}, maxiter {s.get('maxiter')}; "
                + (f"p* = {', '.join(f'{p:.2f} ({r})' for p, r in zip(self.p_star, self.p_rule, strict=True))}"
                   if np.all(np.isfinite(self.p_star)) else "p* not computed (no row starts from α_{p*})"))
        lines = [head, "", "| method | calibration loss | test accuracy (%) | evaluations | seconds |",
                 "|---|---|---|---|---|"]
        for row in self.rows:
            loss, acc = self.calib_loss[row], 100.0 * np.asarray(self.test_acc[row])
            ev, sec = self.n_evals[row], self.seconds[row]
            ev_s = "–" if np.all(np.isnan(ev)) else f"{np.mean(ev):.0f}"
            sec_s = "–" if np.all(np.isnan(sec)) else f"{np.mean(sec):.1f}"
            loss_s = loss_text(float(np.mean(loss)), float(seed_std(loss)))
            lines.append(f"| {row} | {loss_s} | {_pm(acc, 2)} | {ev_s} | {sec_s} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def finite(a):  # NaN → None: strict JSON
            return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, np.float64)]

        def clean(d):
            return {k: finite(a) for k, a in d.items()}

        return dict(rows=list(self.rows), seeds=list(self.seeds), calib_loss=clean(self.calib_loss),
                    test_acc=clean(self.test_acc), n_evals=clean(self.n_evals),
                    seconds=clean(self.seconds), p_star=finite(self.p_star),
                    p_rule=list(self.p_rule), setting=dict(self.setting))

    @classmethod
    def from_dict(cls, d: dict) -> MethodComparison:
        """The inverse of :meth:`to_dict` (None → NaN): a stored table read back, e.g. to resume."""
        def array(values):
            return np.asarray([np.nan if v is None else v for v in values], np.float64)

        def arrays(part):
            return {k: array(a) for k, a in part.items()}

        return cls(tuple(d["rows"]), tuple(d["seeds"]), arrays(d["calib_loss"]), arrays(d["test_acc"]),
                   arrays(d["n_evals"]), arrays(d["seconds"]), array(d["p_star"]),
                   list(d["p_rule"]), dict(d["setting"]))

    def __str__(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        return f"MethodComparison({len(self.rows)} methods × {len(self.seeds)} seeds)\n{self.to_markdown()}"


def seed_std(values, axis=-1) -> np.ndarray:
    """The sample standard deviation over calibration seeds along ``axis`` (ddof = 1; 0 for a
    single seed): the ± of the method tables here and in paper_repro."""
    values = np.asarray(values, np.float64)
    if values.ndim == 0 or values.size == 0:
        raise ValueError(f"seed_std needs an array with one value per seed along axis {axis}; got "
                         f"shape {values.shape}")
    return values.std(axis=axis, ddof=1) if values.shape[axis] > 1 else np.zeros_like(values.mean(axis=axis))


def loss_text(value: float, spread: float | None = None) -> str:
    """A calibration loss for a table, with its spread over seeds when given: four decimals, or
    three significant digits below 0.001, where four decimals printed a saturated cross-entropy
    of 3e-5 and one of exactly 0 alike as 0.0000 (``loss_text(3.2e-5, 1e-5)`` → ``3.20e-05 ±
    1.0e-05``)."""
    small = abs(value) < 1e-3
    text = (f"{value:.2e}" if value else "0") if small else f"{value:.4f}"
    if spread is None:
        return text
    return f"{text} ± " + ((f"{spread:.1e}" if spread else "0") if small else f"{spread:.4f}")


def _pm(values, digits: int) -> str:
    values = np.asarray(values, np.float64)
    return f"{np.mean(values):.{digits}f} ± {float(seed_std(values)):.{digits}f}"


# The rows that start from α_{p*}: only these need the Lp sweep.
STARTS_FROM_P_STAR = ("Lp(p*)",) + tuple(r for r, _ in OPTIMIZER_ROWS)


def compare_methods(loss, data, *, seeds: Sequence[int] = (0, 1, 2), rows: Sequence[str] = ALL_ROWS,
                    p_grid=DEFAULT_P_GRID, maxiter: int = 2, bias_correction: bool = True,
                    progress: Callable[[str], None] | None = None,
                    store: str | os.PathLike | None = None) -> MethodComparison:
    """Every method of the LAPQ comparison on fresh calibration samples.

    For each seed, the calibration set is ``data.with_calib(loss.n_calib, seed).calib``
    (a sample of the training split) and the loss is rebuilt on it (with
    ``bias_correction``); the layer-wise rules, the Lp sweep → p*, and CD / Powell /
    batched from the same α_{p*} are evaluated on it; accuracy is on ``data.test``.

    Args:
      loss: a :class:`landscape.ClipLoss` giving the network, bit widths and options.
      data: the :class:`landscape.data.Dataset` the network was trained on.
      seeds: calibration-sampling seeds.
      rows: which rows of ``ALL_ROWS`` to compute (default all). The Lp sweep runs only when one
        of them starts from α_{p*} (``STARTS_FROM_P_STAR``); otherwise p* is not computed.
      p_grid, maxiter: as in :func:`lapq`.
      progress: optional ``print``-like function for one line per finished row.
      store: optional JSON file of finished rows, rewritten atomically after each one. A
        rerun under the same configuration (``setting``, every option of the loss and its
        sites, network weights, data) takes the rows it holds instead of recomputing them, so
        an interrupted comparison (hours at W4A4 on MNIST) resumes at the row it was in; a
        store of another configuration (network weights, data, jax build and XLA flags
        included) is started afresh. The caller removes it once the table is kept elsewhere.
    Returns:
      a :class:`MethodComparison` (``str()`` is a markdown table of mean ± std).
    """
    _check_loss(loss, "compare_methods")
    if not isinstance(data, Dataset):  # it needs the training split to draw calibration samples from
        raise ValueError(f"compare_methods needs data, the landscape.data.Dataset the network was trained on "
                         f"(from ls.data.load), got a {type(data).__name__}"
                         + (" (one split of it)" if isinstance(data, Split) else ""))
    rows = (rows,) if isinstance(rows, str) else tuple(rows)
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; allowed: {ALL_ROWS}")
    if len(rows) == 0:
        raise ValueError(f"rows={rows!r} names no method; give at least one of {ALL_ROWS}")
    if isinstance(seeds, int | np.integer) or not hasattr(seeds, "__iter__"):
        raise ValueError(f"seeds={seeds!r} must be a sequence of calibration-sampling seeds, e.g. range(3)")
    seeds = tuple(seeds)
    if len(seeds) < 1:
        raise ValueError("seeds must name at least one calibration-sampling seed")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0]
    if bad:
        raise ValueError(f"seeds must be integers >= 0, got {bad[0]!r}")
    repeated = sorted({int(s) for s in seeds if seeds.count(s) > 1})
    if repeated:  # one calibration sample twice: a spread over "seeds" of 0
        raise ValueError(f"seeds {list(seeds)} repeat {repeated}; give distinct calibration-sampling seeds")
    grid = check_p_grid(p_grid)
    maxiter = _check_maxiter(maxiter)
    rows = tuple(r for r in ALL_ROWS if r in rows)
    say = progress or (lambda _: None)
    setting = dict(network=repr(loss), w_bits=loss.options.get("w_bits"), a_bits=loss.options.get("a_bits"),
                   calib_size=int(loss.n_calib), bias_correction=bool(bias_correction), maxiter=maxiter,
                   p_grid=[float(p) for p in grid])
    # Keyed so that one table never mixes two configurations or builds: every option of the loss
    # (grid, per-channel, folding, precision, … which repr(loss) does not show) and its sites.
    options = json.loads(json.dumps({**loss.options, "bias_correction": bool(bias_correction)}, default=str))
    done = runtime.ResultStore(store, None if store is None else dict(
        setting, loss_options=options, sites=[[name, int(b)] for name, b in loss.bits.items()],
        network_sha256=train.weights_fingerprint(loss.net.variables), data_fingerprint=data.fingerprint(),
        # SciPy's Brent and Powell drive CD and Powell (1.17 changed Powell's trajectories), numpy's
        # LAPACK the p* fit
        numerics=train.numerics(), scipy=scipy.__version__, numpy=np.__version__), say)
    out = {k: {r: [] for r in rows} for k in ("calib_loss", "test_acc", "n_evals", "seconds")}
    p_star, p_rule = [], []

    def stored(key, compute):
        """(the record under ``key``, whether an earlier run stored it); NaN kept as null."""
        resumed = key in done.steps
        return done.get(key, lambda: [None if isinstance(v, float) and not math.isfinite(v) else v
                                      for v in compute()]), resumed

    def put(seed, row, compute):
        record, resumed = stored(f"{seed}/{row}", compute)
        for key, v in zip(out, record, strict=True):
            out[key][row].append(math.nan if v is None else float(v))
        calib, acc = out["calib_loss"][row][-1], out["test_acc"][row][-1]
        say(f"  {row}: loss {loss_text(calib)}, test accuracy {100 * acc:.2f}%"
            + (" (stored by an earlier run)" if resumed else ""))

    def evaluate(seed_loss, alpha, evals=math.nan, seconds=math.nan):
        return [float(seed_loss(alpha)), seed_loss.accuracy(alpha, data.test), evals, seconds]

    def run_seed(seed):
        say(f"seed {seed}")
        calib = data.with_calib(loss.n_calib, int(seed)).calib
        seed_loss = loss.with_options(calib=calib, bias_correction=bias_correction)
        if "FP32" in rows:
            fp32 = seed_loss.with_options(w_bits=None, a_bits=None)
            put(seed, "FP32", lambda: evaluate(fp32, np.zeros(0, np.float32)))
        for row, rule in RULE_ROWS:
            if row in rows:
                put(seed, row, lambda rule=rule: evaluate(seed_loss, seed_loss.init(rule)))
        start = []  # α_{p*}, computed at most once per seed and only when a row still needs it

        def start_alpha(selection_only=False):
            if not start:
                alpha, selection, _ = lp_start(seed_loss, grid)
                start.append((alpha, [float(selection.p_star), selection.rule]))
            return start[0][1] if selection_only else start[0][0]

        if any(row in rows for row in STARTS_FROM_P_STAR):
            p, rule = done.get(f"{seed}/p*", lambda: start_alpha(selection_only=True))
        else:  # the Lp sweep (a calibration per grid point) would serve no row
            p, rule = math.nan, "not computed"
        p_star.append(p)
        p_rule.append(rule)
        if "Lp(p*)" in rows:
            put(seed, "Lp(p*)", lambda: evaluate(seed_loss, start_alpha()))
        for row, method in OPTIMIZER_ROWS:
            if row in rows:
                def optimise(method=method):
                    alpha = start_alpha()
                    # Compiled before the clock starts: the loss at one α and batched's STE gradient
                    # (the first seed's batched row had counted 3.7 s of compilation in 3.9 s).
                    seed_loss(alpha)
                    if method == "batched":
                        seed_loss.grad(alpha)
                    res = lapq(seed_loss, method=method, maxiter=maxiter, bias_correction=bias_correction,
                               init=alpha, on_interrupt="raise")
                    return [res.loss, seed_loss.accuracy(res.alpha, data.test), res.n_evals, res.seconds]

                put(seed, row, optimise)

    for seed in seeds:
        run_seed(seed)

    arrays = {k: {r: np.asarray(v, np.float64) for r, v in d.items()} for k, d in out.items()}
    return MethodComparison(rows, tuple(int(s) for s in seeds), arrays["calib_loss"], arrays["test_acc"],
                            arrays["n_evals"], arrays["seconds"], np.asarray(p_star), p_rule, setting)


# --------------------------------------------------------------------------- CLI


def _bits(text: str) -> int | None:
    """A --w-bits / --a-bits value: 2..16, or 0 / 32 for FP32."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value not in (0, 32) and not 2 <= value <= 16:
        raise argparse.ArgumentTypeError(f"{text!r} is not a bit width: use an integer in [2, 16], or 0 or 32 "
                                         "for FP32")
    return None if value in (0, 32) else value


def _positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value

    return parse


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m landscape.lapq") -> MethodComparison:
    """``python -m landscape lapq --model resnet8 --data digits --w-bits 3 --a-bits 3``:
    train (or load the cached) network, print the method table."""
    import landscape
    import models

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet8", choices=models.NAMES, help="default resnet8")
    parser.add_argument("--data", default="digits", choices=landscape.data.NAMES, help="default digits")
    parser.add_argument("--data-dir", default=None, help="local parquet copy (mnist, cifar, imagenet)")
    parser.add_argument("--w-bits", type=_bits, default=4, help="weight bits (32 or 0: FP32; default 4)")
    parser.add_argument("--a-bits", type=_bits, default=4, help="activation bits (32 or 0: FP32; default 4)")
    parser.add_argument("--calib-size", type=_count(1), default=512, help="calibration images per seed (default 512)")
    parser.add_argument("--epochs", type=_count(1), default=None, help="training epochs (default: the dataset's)")
    parser.add_argument("--lr", type=_positive, default=None,
                        help="peak learning rate (default: the dataset's; 0.1 for the ViT)")
    parser.add_argument("--train-seed", type=_count(0), default=0, help="fit's seed: another trained network")
    parser.add_argument("--seeds", type=_count(1), default=3, help="number of calibration seeds (0, 1, …; default 3)")
    parser.add_argument("--maxiter", type=_count(1), default=2, help="iterations of the joint step (default 2)")
    parser.add_argument("--p-points", type=_count(3), default=10, help="points of the p grid on [2, 4] (default 10)")
    parser.add_argument("--no-bias-correction", action="store_true")
    parser.add_argument("--rows", nargs="+", default=list(ALL_ROWS), choices=ALL_ROWS, metavar="ROW",
                        help=f"subset of {ALL_ROWS}")
    parser.add_argument("--json", default=None,
                        help="also write the table as JSON here; finished rows are kept in <stem>.progress.json "
                             "beside it as they finish, so a rerun with the same options resumes there")
    args = parser.parse_args(argv)
    if args.w_bits is None and args.a_bits is None:  # before training: nothing would be quantized
        parser.error("--w-bits and --a-bits are both FP32 (0 or 32): nothing to quantize; give at least one width")
    landscape.enable_compilation_cache()

    try:
        data = landscape.data.load(args.data, data_dir=args.data_dir, calib_size=args.calib_size, seed=0)
    except (ValueError, OSError) as err:  # a missing local copy, an unreachable hub, a too-large calib set
        parser.error(str(err))
    net = landscape.train.fit(models.create(args.model, num_classes=data.num_classes), data, epochs=args.epochs,
                              lr=args.lr, seed=args.train_seed)
    c = net.config
    print(f"{args.model} trained {c['epochs']} epochs at lr {c['lr']:g}, seed {c['seed']}: FP32 test accuracy "
          f"{100 * net.accuracy(data.test):.2f} %", flush=True)
    bias_correction = not args.no_bias_correction
    loss = landscape.ClipLoss(net, data.calib, w_bits=args.w_bits, a_bits=args.a_bits,
                              bias_correction=bias_correction)
    print(loss, flush=True)
    store = None if args.json is None else progress_path(args.json)
    table = compare_methods(loss, data, seeds=range(args.seeds), rows=args.rows,
                            p_grid=np.linspace(2.0, 4.0, args.p_points), maxiter=args.maxiter,
                            bias_correction=bias_correction, progress=lambda s: print(s, flush=True), store=store)
    print()
    print(table)
    if args.json:
        payload = dict(table.to_dict(), software=landscape.runtime.software())
        landscape.atomic.write_atomic(args.json, json.dumps(payload, indent=1))
        if os.path.exists(store):
            os.remove(store)  # the table is kept; its rows are in the JSON now
    return table


def progress_path(json_path: str) -> str:
    """Where the command line keeps the finished rows of a ``--json`` run until it ends:
    ``out.json`` → ``out.progress.json``."""
    stem = json_path[:-5] if json_path.endswith(".json") else json_path
    return f"{stem}.progress.json"


if __name__ == "__main__":
    main()
