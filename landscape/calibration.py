"""Layer-wise calibration rules: a clipping value α from one tensor's statistics.

Every rule is a pure JAX function ``rule(x, spec, kind) -> α`` (a float32 scalar) used
inside :func:`landscape.sites.calibrating`; :func:`make_rule` builds one by name:

=============  ==========================================================================
``max``        α = max|x| (max x on the unsigned grid)
``percentile`` α = the q-th percentile of |x| (default q = 99.99): q is a percentage in
               (0, 100], so q = 0.9999 means the 0.9999th percentile (α ≈ 0), not 99.99 %;
               q < 1 is allowed but warns (UserWarning)
``mse``        α = argmin E[(clip(x, ±α) − x)²] + Δ²/12 with Δ = α/L, L = 2^(M−1) (midrise: the
               reference's Δ = 2α/2^M), 2^M (unsigned; the clip error's sum divided by the
               count of positive entries, as the reference does) or 2^(M−1) − 1 (midtread, its
               exact step; divided by the count of non-zero entries): the reference's "MSE with
               a uniform-noise prior"
``lp``         α = argmin E|Q_α(x) − x|^p with the site's own quantizer (LAPQ's init)
``aciq``       α = c_M·b (Laplace, b = E|x|) or c_M·σ (Gaussian, σ = √E[x²], the RMS about
               the grid's centre 0, where the reference's signed Gaussian rule takes the
               centred std (ddof 1): equal for zero-mean tensors, 0.9 % apart on a Laplace
               kernel of mean 0.2·b at 2 bits); unsigned
               tensors use the non-zero entries and c_{M+1}, midtread ones the non-zero
               entries (their zeros sit on the zero level); c_M minimises the clip + noise
               MSE of the unit distribution with the ``mse`` rule's Δ = α/L: Laplace
               t·eᵗ = 12·L² exactly (Lambert W; 3·4^M on the midrise grid). Not capped at
               max|x|, as in the reference: at 8 bits and above α can exceed it (levels that
               no value reaches)
``kl``         entropy calibration as MXNet's calibrator (the algorithm of NVIDIA's
               8-bit inference slides): 2048-bin histogram of the non-zero |x|, the
               threshold bin i ∈ [n_q, 2048] minimising KL(P_i ‖ Q_i), among those whose
               first i bins hold values in at least n_q bins (else the max); n_q = 2^M − 1
               quantization bins (unsigned) or 2^(M−1) (signed). NVIDIA's
               ``pytorch_quantization`` differs: its search starts at bin 128 at every bit
               width, an unsigned tensor has 2^M bins, its chunks are split by ``linspace``,
               and it sets bin 0 to bin 1's count rather than dropping the zeros. The results
               differ most at low bit widths (ReLU of N(0, 1): α 3.066 against 2.931 with 2^M
               bins at 2 bits, 3.695 against 3.547 at 4, equal at 8; at 2 bits the start at
               bin 128 moved a heavy-tailed tensor's α, ReLU of a Student-t with 2 degrees of
               freedom, from 4.48 to 11.46)
=============  ==========================================================================

**The 1-D search** (``mse``, ``lp``): the error is evaluated on a grid of 128 points
α_k = k/128 · max|x| (k = 1..128), then golden-section search on [α_{k*−1}, α_{k*+1}]
for 40 steps (the bracket shrinks by 0.618^40 ≈ 4·10⁻⁹). The grid guards against the
multimodality of the Lp error at 2 bits (a pure Brent search from (0, 1), as in the
reference, can land in a poor local minimum or outside [0, max|x|]). The search keeps to
[0, max|x|], the range where α clips: beyond it a coarser grid can fit a few values better
on small contrived tensors (x = ±{0.4, 1}, 2-bit midrise, p = 2: error 0.00200 at α = 1.02
against 0.00222 at the best α ≤ 1), but no longer clips anything. Tensors larger than
2^18 elements are searched on a fixed-seed sample of 2^18 elements (with replacement).
Both errors are evaluated in units of the tensor's scale (``mse``: x/max|x|; ``lp``: |e| over
the step at α = max|x|), so α(s·x) = s·α(x): in plain float32, |e|^8 overflowed for |x| ≳ 6·10⁴
and (clip(x) − x)² for |x| ≳ 2·10¹⁹, and the search returned an α tens of times too small.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from landscape import checks, quantizers, runtime

RULES = ("max", "percentile", "mse", "lp", "aciq", "kl")
SEARCH_GRID = 128
GOLDEN_STEPS = 40
SAMPLE_LIMIT = 2**18
KL_BINS = 2048
# The most KL histogram bins: the threshold search is O(bins²) per tensor (one KL per candidate
# bin, each over all bins). Measured on XLA:CPU (2 cores), one 4096-value tensor: 0.05 s at 2048
# bins, 0.2 s at 4096, 0.8 s at 8192, 3.6 s at 16384, and a loss.init("kl") runs it for every site.
KL_MAX_BINS = 8192
_TINY = 1e-12


# --------------------------------------------------------------------------- helpers


def _signed(spec) -> bool:
    return spec.grid != "unsigned"


def _magnitude(x, spec):
    """|x| for signed grids; x clipped at 0 for the unsigned (post-ReLU) grid."""
    x = jnp.ravel(x).astype(jnp.float32)
    return jnp.abs(x) if _signed(spec) else jnp.maximum(x, 0.0)


def _sample(x, limit: int = SAMPLE_LIMIT):
    """x flattened, or ``limit`` of its entries drawn uniformly (with replacement) when it has more.

    The key is fixed on purpose: a rule is a function of the tensor alone, so the same tensor
    gets the same α in every run, whatever the calibration seed that produced it.
    """
    x = jnp.ravel(x)
    if x.size <= limit:
        return x
    with runtime.classic_threefry():
        idx = jax.random.randint(jax.random.key(0), (limit,), 0, x.size)
    return x[idx]


def _safe_alpha(alpha, x):
    """Never return 0 (an all-zero tensor): α ≥ 1e-8, as float32."""
    return jnp.maximum(alpha, 1e-8).astype(jnp.float32)


def search_1d(objective, hi, *, grid: int = SEARCH_GRID, steps: int = GOLDEN_STEPS):
    """argmin of a scalar ``objective(α)`` over (0, hi]: grid, then golden section.

    ``objective`` maps a scalar to a scalar and is evaluated with ``lax.map`` so memory
    stays at one evaluation. Returns α (scalar).
    """
    hi = jnp.maximum(hi, _TINY)
    ks = jnp.arange(1, grid + 1, dtype=jnp.float32)
    values = jax.lax.map(objective, ks * hi / grid)
    k = jnp.argmin(values)
    a = jnp.maximum(k.astype(jnp.float32), 0.0) * hi / grid  # α_{k*−1} (0 for k* = 1)
    b = jnp.minimum(k.astype(jnp.float32) + 2.0, grid) * hi / grid
    g = (math.sqrt(5.0) - 1.0) / 2.0

    def body(_, carry):
        a, b, c, d, fc, fd = carry
        left = fc < fd
        a2 = jnp.where(left, a, c)
        b2 = jnp.where(left, d, b)
        c2 = jnp.where(left, b2 - g * (b2 - a2), d)
        d2 = jnp.where(left, c, a2 + g * (b2 - a2))
        f_new = objective(jnp.where(left, c2, d2))
        fc2 = jnp.where(left, f_new, fd)
        fd2 = jnp.where(left, fc, f_new)
        return a2, b2, c2, d2, fc2, fd2

    c = b - g * (b - a)
    d = a + g * (b - a)
    a, b, c, d, fc, fd = jax.lax.fori_loop(0, steps, body, (a, b, c, d, objective(c), objective(d)))
    best_grid = ks[k] * hi / grid
    mid = jnp.where(fc < fd, c, d)
    # Keep the grid point if the refinement did not improve on it (flat or kinked error).
    return jnp.where(jnp.minimum(fc, fd) <= values[k], mid, best_grid)


# --------------------------------------------------------------------------- errors


def lp_error(x, alpha, bits: int, grid: str, p: float):
    """E|Q_α(x) − x|^p over all elements (zeros included): the LAPQ init objective."""
    err = jnp.abs(quantizers.quantize(x, alpha, bits, grid) - x)
    return jnp.mean(err**p)


#: Above this p the Lp rule's search compares log E|e|^p: float32 |e|^p under- or overflows
#: (at p = 16, 8-bit weights of σ = 0.01 have |e| ≈ 2e-4 and |e|^16 = 0, and the search took an
#: α whose error was 3.7e22× the minimum). At or below it the plain mean, as the reference.
LP_LOG_ABOVE = 8.0


def _lp_search_objective(x, alpha, bits: int, grid: str, p, unit=1.0):
    """What the Lp rule minimises over α: E|e/u|^p for p ≤ LP_LOG_ABOVE, else log E|e/u|^p (the
    same minimiser) as a log-sum-exp of p·log|e/u|, which neither under- nor overflows. ``u``
    (``unit``) is a fixed scale, the step at α = max|x| in the rule: |e/u| is then about 1/2 at
    the minimiser whatever the tensor's magnitude (plain |e|^8 overflowed float32 for |e| > 6·10⁴)."""
    err = jnp.abs(quantizers.quantize(x, alpha, bits, grid) - x) / unit
    log_terms = jnp.where(err > 0, p * jnp.log(jnp.where(err > 0, err, 1.0)), -jnp.inf)
    log_mean = jax.nn.logsumexp(log_terms) - jnp.log(err.size)
    return jnp.where(p > LP_LOG_ABOVE, log_mean, jnp.mean(err**p))


def noise_levels(bits, grid: str):
    """L of the uniform-noise prior Δ = α/L: 2^(M−1) on the midrise grid (the reference's
    Δ = 2α/2^M), 2^M unsigned (the reference's α/2^M) and 2^(M−1) − 1 on the midtread grid, its
    exact step (at 2 bits its levels are {−α, 0, α}: Δ = α, where 2α/2^M would be α/2).
    ``bits`` may be traced."""
    if grid == "unsigned":
        return 2.0**bits
    if grid == "midtread":
        return 2.0 ** (bits - 1) - 1.0
    return 2.0 ** (bits - 1)


def mse_prior_error(x, alpha, bits: int, grid: str):
    """E[(clip(x) − x)²] + Δ²/12 with Δ = α/L (:func:`noise_levels`): 2α/2^M (midrise), α/2^M
    (unsigned), α/(2^(M−1) − 1) (midtread).

    On the unsigned grid the clip error is summed over every entry but divided by the number of
    positive ones, as the reference does (its post-ReLU zeros sit on the level 0 and carry no
    noise; dividing by all N weighted the noise term by N/N₊, 2× on a half-zero tensor, and gave
    an α ~7 % smaller than the reference's at 4 bits). The midtread grid has a zero level too, so
    its exact zeros (a pruned or N:M-sparse kernel's) are left out the same way: zeros added to a
    tensor leave its α unchanged. The midrise grid has no zero level; there every entry counts.
    """
    noise = alpha**2 / (12.0 * noise_levels(bits, grid) ** 2)
    clip_err = (jnp.clip(x, 0.0 if grid == "unsigned" else -alpha, alpha) - x) ** 2
    counted = _counted(x, grid)
    if counted is None:
        return jnp.mean(clip_err) + noise
    return jnp.sum(clip_err) / jnp.maximum(jnp.sum(counted), 1) + noise


def _counted(x, grid: str):
    """The entries that carry quantization noise on ``grid``, or None for all of them: on a grid
    with a zero level the exact zeros sit on it (unsigned: the positive entries, as the reference
    counts post-ReLU tensors; midtread: the non-zero ones); midrise has no zero level."""
    if grid == "midrise":
        return None
    return x > 0 if grid == "unsigned" else x != 0


# --------------------------------------------------------------------------- rules


def max_rule(x, spec, kind):
    return _safe_alpha(jnp.max(_magnitude(x, spec)), x)


def percentile_rule(x, spec, kind, *, q: float = 99.99):
    mag = _magnitude(x, spec)
    n = mag.size
    # The q-th percentile with numpy's linear interpolation at rank q/100·(n − 1), from the top k
    # values. The rank is computed here in float64: jnp.percentile's float32 rank is off by up to
    # one place for n ≳ 10⁴ (q = 99.99, n = 20000 lands between the wrong pair of values).
    k = min(n, int(math.ceil((1.0 - q / 100.0) * n)) + 1)
    if k <= 4096 and n > 4 * k and jax.default_backend() == "cpu":
        # A full sort is slow on XLA:CPU. Elsewhere sort, which is fast there, and XLA:GPU's top-k
        # splitter fails on this shape (jax 0.11.2: "hlo verifier ... Failed after topk-splitter").
        top = jax.lax.top_k(mag, k)[0][::-1]  # ascending: ranks n − k … n − 1
    else:
        top = jnp.sort(mag)[n - k:]
    pos = q / 100.0 * (n - 1) - (n - k)
    lo = int(math.floor(pos))
    value = top[lo] + (pos - lo) * (top[min(lo + 1, k - 1)] - top[lo])
    return _safe_alpha(value, x)


def mse_rule(x, spec, kind):
    # Searched on x / max|x| over (0, 1] (the error is scale-equivariant), so squares neither
    # over- nor underflow float32.
    # On the unsigned grid the search sees x clipped at 0 (_magnitude): a negative entry's clip
    # error (0 − x)² does not depend on α and is not counted, and as a constant it only cost float32
    # resolution (α 0.3 % off at 8 bits on a pre-ReLU N(0, 1) tensor).
    values = _magnitude(x, spec) if not _signed(spec) else jnp.ravel(x).astype(jnp.float32)
    hi = jnp.maximum(jnp.max(jnp.abs(values)), _TINY)
    xs = _sample(values) / hi
    return _safe_alpha(hi * search_1d(lambda a: mse_prior_error(xs, a, spec.bits, spec.grid), 1.0), x)


def lp_rule(x, spec, kind, *, p: float = 2.0):
    xs = _sample(jnp.ravel(x).astype(jnp.float32))
    hi = jnp.max(_magnitude(x, spec))
    unit = quantizers.step_size(jnp.maximum(hi, _TINY), spec.bits, spec.grid)
    return _safe_alpha(search_1d(lambda a: _lp_search_objective(xs, a, spec.bits, spec.grid, p, unit), hi), x)


@functools.cache
def aciq_constant(bits: int, distribution: str, grid: str = "midrise") -> float:
    """c_M minimising the clip + uniform-noise MSE of a unit Laplace(b=1) / N(0, 1), with the
    noise Δ²/12 = t²/(12·L²) of :func:`noise_levels` (12·L² = 3·4^M on the midrise grid).

    Laplace: 2e^{−t} + t²/(12·L²) is minimal at t·eᵗ = 12·L², so t = W₀(12·L²).
    Gaussian: 2[(1 + t²)Q(t) − tφ(t)] + t²/(12·L²), minimised numerically.
    The unsigned grid's constant is the midrise one at M + 1 (the reference's c_{M+1}).
    """
    from scipy import optimize, special, stats

    quantizers.check_grid(grid, "aciq_constant")
    levels = noise_levels(bits, grid)
    if levels <= 0:
        raise ValueError(f"aciq_constant: the {grid} grid has no step at bits={bits!r}; use bits ≥ 2")
    k = 12.0 * levels**2
    if distribution == "laplace":
        return float(np.real(special.lambertw(k)))
    if distribution == "gauss":
        def mse(t):
            return 2 * ((1 + t * t) * stats.norm.sf(t) - t * stats.norm.pdf(t)) + t * t / k

        return float(optimize.minimize_scalar(mse, bounds=(1e-3, 40.0), method="bounded",
                                              options={"xatol": 1e-10}).x)
    raise ValueError(f"aciq distribution={distribution!r} is not allowed; use 'laplace' or 'gauss'")


@functools.cache
def aciq_table(distribution: str, grid: str = "midrise") -> np.ndarray:
    """c_M of ``grid`` for M = 0 … 16 (index M), so a traced bit width can look its constant up;
    NaN where the grid has no step (midtread below 2 bits)."""
    return np.array([aciq_constant(m, distribution, grid) if noise_levels(m, grid) > 0 else np.nan
                     for m in range(quantizers.MAX_BITS + 1)], np.float32)


def aciq_rule(x, spec, kind, *, distribution: str = "laplace"):
    x = jnp.ravel(x).astype(jnp.float32)
    # The unsigned grid uses c_{M+1} (its own table) and the statistics of the non-zero entries (the
    # reference); the midtread grid its own constants (its step is α/(2^(M−1) − 1)) and, having a
    # zero level too, the non-zero entries' statistics (a sparse kernel's zeros had halved b).
    c = jnp.asarray(aciq_table(distribution, spec.grid))[jnp.asarray(spec.bits, jnp.int32)]
    counted = _counted(x, spec.grid)
    weights = jnp.ones_like(x) if counted is None else counted.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    if distribution == "laplace":
        scale = jnp.sum(jnp.abs(x) * weights) / count
    else:
        # σ in units of max|x|: x² overflows float32 for |x| > 1.8·10¹⁹ (α was inf)
        top = jnp.maximum(jnp.max(jnp.abs(x) * weights), _TINY)
        scale = top * jnp.sqrt(jnp.sum((x / top) ** 2 * weights) / count)
    return _safe_alpha(c * scale, x)


def kl_levels(spec) -> int:
    """Quantization bins of the magnitude axis: 2^M − 1 (unsigned), 2^(M−1) (signed)."""
    return 2**spec.bits - 1 if spec.grid == "unsigned" else 2 ** (spec.bits - 1)


def kl_divergences(hist, n_q):
    """KL(P_i ‖ Q_i) for every threshold bin i = 1 … len(hist) (MXNet's calibrator);
    +inf for i < n_q. ``n_q`` may be traced (one program for every bit width).

    P_i: the first i bins, with the outliers beyond i added to bin i−1. Q_i: the first i
    bins (without the outliers) merged into n_q chunks of i // n_q bins (the last chunk takes
    the remainder), each chunk's mass spread evenly over the bins where P_i is non-zero. As in
    MXNet's calibrator, both are smoothed in counts (ε = 1e-4 on each empty bin, taken evenly
    from the others) and then normalised; KL is +inf where Q_i has no mass at all, and where
    fewer than n_q of the first i bins hold values: on a sparse histogram (a small weight
    tensor over 2048 bins) P_i and Q_i are then both nearly the point mass of bin i − 1, KL ≈ 0,
    and TensorRT's algorithm picked α ≈ n_q/2048 of the max (0.004·max on 144 kernel entries).
    Returns (len(hist),).
    """
    hist = jnp.asarray(hist, jnp.float32)
    bins = hist.shape[0]
    j = jnp.arange(bins)
    csum = jnp.cumsum(hist)
    n_q = jnp.asarray(n_q, jnp.int32)

    def kl_at(i):
        inside = j < i
        p = jnp.where(inside, hist, 0.0)
        p = p + jnp.where(j == i - 1, csum[-1] - csum[i - 1], 0.0)
        width = jnp.maximum(i // n_q, 1)
        chunk = jnp.minimum(j // width, n_q - 1)
        nonzero = (inside & (p > 0)).astype(jnp.float32)
        # At most `bins` chunks exist (n_q < bins); unused segments stay empty.
        mass = jax.ops.segment_sum(jnp.where(inside, hist, 0.0), chunk, num_segments=bins)
        count = jax.ops.segment_sum(nonzero, chunk, num_segments=bins)
        q = nonzero * mass[chunk] / jnp.maximum(count[chunk], 1.0)
        has_q = jnp.sum(q) > 0
        p, q = _normalise(_smooth(p, inside)), _normalise(_smooth(q, inside))
        terms = jnp.where(inside & (p > 0), p * (jnp.log(p) - jnp.log(jnp.maximum(q, _TINY))), 0.0)
        filled = jnp.sum(inside & (hist > 0)) >= n_q
        return jnp.where((i >= n_q) & has_q & filled, jnp.sum(terms), jnp.inf)

    return jax.lax.map(kl_at, jnp.arange(1, bins + 1))


def _smooth(counts, inside, eps: float = 1e-4):
    """Put ε counts on each empty bin inside the support, taken evenly from the others (MXNet's
    ``_smooth_distribution``: ε is in counts, so it barely moves bins that hold whole values)."""
    dist = jnp.where(inside, counts, 0.0)
    empty = inside & (dist == 0)
    n_empty = jnp.sum(empty)
    n_full = jnp.maximum(jnp.sum(inside) - n_empty, 1)
    take = eps * n_empty / n_full
    return jnp.where(empty, eps, jnp.where(inside, dist - take, 0.0))


def _normalise(dist):
    return dist / jnp.maximum(jnp.sum(dist), _TINY)


def kl_rule(x, spec, kind, *, bins: int = KL_BINS):
    mag = _magnitude(x, spec)
    top = jnp.maximum(jnp.max(mag), _TINY)
    bits = jnp.asarray(spec.bits, jnp.int32)
    n_q = jnp.where(spec.grid == "unsigned", 2**bits - 1, 2 ** (bits - 1))
    hist = jnp.histogram(mag, bins=bins, range=(0.0, top))[0].astype(jnp.float32)
    # Exact zeros leave the histogram on every grid: post-ReLU zeros (pytorch_quantization levels bin 0 to bin 1) and a
    # pruned or N:M-sparse kernel's zeros, whose bin-0 spike decided the threshold (α = 0.7 % of
    # max|x| on a 50 %-zero Laplace kernel at 4 bits, with 13× the MSE rule's error).
    hist = hist.at[0].add(-jnp.sum(mag == 0))
    kl = kl_divergences(hist, jnp.minimum(n_q, bins))
    i = jnp.argmin(kl) + 1
    # At ≥ 12 bits the threshold search is empty (n_q ≥ bins), and a tensor with values in fewer
    # than n_q bins has no threshold to test: the max is optimal for both.
    empty = (n_q >= bins) | ~jnp.any(jnp.isfinite(kl))
    return _safe_alpha(jnp.where(empty, top, i * top / bins), x)


_RULE_FNS = {
    "max": (max_rule, {}),
    "percentile": (percentile_rule, {"q": 99.99}),
    "mse": (mse_rule, {}),
    "lp": (lp_rule, {"p": 2.0}),
    "aciq": (aciq_rule, {"distribution": "laplace"}),
    "kl": (kl_rule, {"bins": KL_BINS}),
}


# Options that may be traced arrays (one compiled program serves every value, e.g. the
# LAPQ sweep over p); the others shape the program and are static.
TRACED_OPTIONS = {"lp": ("p",)}
# Rules whose program depends on the bit width itself; every built-in rule accepts it as a
# traced value (ACIQ looks its constant up in a table, KL masks thresholds below n_q).
STATIC_BITS_RULES: tuple[str, ...] = ()


def bind_rule(name: str, **opts):
    """The rule function with its options bound, unvalidated (options may be tracers)."""
    fn, defaults = _RULE_FNS[name]
    return functools.partial(fn, **{**defaults, **opts})


def make_rule(name: str, **kw):
    """A calibration rule ``(x, spec, kind) -> α`` by name, with validated options.

    Options: percentile ``q`` ∈ (0, 100], a percentage (q < 1, e.g. 0.9999 meant as a fraction,
    warns: it sets α near 0); lp ``p`` ∈ (0, 16]; aciq ``distribution`` ∈ {"laplace", "gauss"};
    kl ``bins`` an integer in [16, ``KL_MAX_BINS``] (8192; the search is O(bins²)).
    Numbers may be numpy scalars.
    """
    if not isinstance(name, str) or name not in _RULE_FNS:
        raise ValueError(f"unknown calibration rule {name!r}; known rules: {', '.join(RULES)}")
    fn, defaults = _RULE_FNS[name]
    # 0-d arrays (jnp.float32(3), a grid's element) are numbers too
    kw = {k: (v.item() if isinstance(v, np.ndarray | jax.Array) and np.ndim(v) == 0
              and not isinstance(v, jax.core.Tracer) else v) for k, v in kw.items()}
    unknown = set(kw) - set(defaults)
    if unknown:
        allowed = ", ".join(defaults) or "none"
        raise ValueError(f"rule {name!r} got unknown options {sorted(unknown)}; allowed: {allowed}")
    opts = {**defaults, **kw}
    if name == "percentile" and not (checks.is_real(opts["q"]) and 0 < opts["q"] <= 100):
        raise ValueError(f"percentile q={opts['q']!r} must be a number in (0, 100]")
    if name == "percentile" and opts["q"] < 1:
        warnings.warn(f"percentile q={opts['q']!r} is a percentage in (0, 100]: it sets α at the "
                      f"{opts['q']!r}th percentile of |x|, near 0; for {100 * opts['q']:g} % pass "
                      f"q={100 * opts['q']:g}", UserWarning, stacklevel=3)
    if name == "lp" and not (checks.is_real(opts["p"]) and 0 < opts["p"] <= 16):
        raise ValueError(f"lp p={opts['p']!r} must be a number in (0, 16]")
    if name == "aciq" and opts["distribution"] not in ("laplace", "gauss"):
        raise ValueError(f"aciq distribution={opts['distribution']!r}; use 'laplace' or 'gauss'")
    if name == "kl":
        bins = opts["bins"]
        if isinstance(bins, bool | np.bool_) or not isinstance(bins, numbers.Integral) or not (
                16 <= bins <= KL_MAX_BINS):
            raise ValueError(f"kl bins={bins!r} must be an integer in [16, {KL_MAX_BINS}] (the threshold "
                             f"search costs O(bins²) per tensor: 0.8 s at {KL_MAX_BINS} bins on a CPU)")
        opts["bins"] = int(bins)
    return bind_rule(name, **opts)


def clip_value(x, rule: str, *, bits: int, grid: str = "midrise", **kw) -> float:
    """α for a standalone tensor (tests, figures): ``make_rule(rule, **kw)`` on x (float32).

    Raises ValueError for an empty x or one holding NaN or ±inf (its α would be NaN or inf).
    """
    from landscape.sites import SiteSpec

    if quantizers.check_bits(bits, "clip_value") is None:
        raise ValueError(f"clip_value: bits=None (FP32) has no grid and no α; use an integer in "
                         f"[{quantizers.MIN_BITS}, {quantizers.MAX_BITS}]")
    quantizers.check_grid(grid, "clip_value")
    spec = SiteSpec(bits=bits, grid=grid)
    kind = "activation" if grid == "unsigned" else "weight"
    if np.size(x) == 0:
        raise ValueError(f"clip_value needs a non-empty tensor x, got shape {np.shape(x)}")
    x = jnp.asarray(x, jnp.float32)
    bad = int(jnp.sum(~jnp.isfinite(x)))
    if bad:
        raise ValueError(f"clip_value: x holds {bad} NaN or ±inf value(s) of {x.size} (in float32, where |x| > 3.4e38 "
                         f"is inf); every rule would return α = NaN or inf. Drop or replace them first")
    return float(make_rule(rule, **kw)(x, spec, kind))
