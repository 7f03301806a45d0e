"""Every calibration rule against a brute-force reference on random tensors."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import calibration as cal
from landscape import quantizers
from landscape.sites import SiteSpec


def _tensor(kind, n=20000, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "weight":
        return rng.laplace(size=n).astype(np.float32) * 0.05
    return np.maximum(rng.normal(size=n), 0).astype(np.float32) * 2.0  # post-ReLU


def _brute(objective, hi, num=20000):
    grid = np.linspace(hi / num, hi, num)
    values = np.array([objective(a) for a in grid])
    return grid[np.argmin(values)], values.min()


def _np_quantize(x, alpha, bits, grid):
    return np.asarray(quantizers.quantize(jnp.asarray(x), alpha, bits, grid))


@pytest.mark.parametrize("grid,bits,p", [("midrise", 2, 2.0), ("midrise", 4, 3.0), ("unsigned", 2, 2.5),
                                         ("unsigned", 4, 4.0), ("unsigned", 3, 2.0)])
def test_lp_matches_brute_force(grid, bits, p):
    kind = "activation" if grid == "unsigned" else "weight"
    x = _tensor(kind)
    ours = cal.clip_value(x, "lp", bits=bits, grid=grid, p=p)
    xq = jnp.asarray(x)
    err = lambda a: float(cal.lp_error(xq, a, bits, grid, p))  # noqa: E731
    best, best_err = _brute(err, float(np.abs(x).max()), num=4000)
    # The argmin within 1e-3 relative, or (on a flat bottom) an error as low as brute force's.
    assert abs(ours - best) / best < 1e-3 or err(ours) <= best_err * (1 + 1e-6)
    # And the error itself is at the brute-force minimum.
    assert err(ours) <= best_err * (1 + 1e-4)


@pytest.mark.parametrize("grid,bits", [("midrise", 2), ("midrise", 4), ("unsigned", 3), ("unsigned", 8)])
def test_mse_matches_brute_force(grid, bits):
    kind = "activation" if grid == "unsigned" else "weight"
    x = _tensor(kind, seed=1)
    ours = cal.clip_value(x, "mse", bits=bits, grid=grid)

    def objective(a):
        # The reference's MseUniformPriorQuantization: the clip error summed and divided by the
        # non-zero count on the unsigned (post-ReLU) grid, by every entry on the signed one.
        lo = 0.0 if grid == "unsigned" else -a
        noise = a * a / (12 * 4.0**bits) if grid == "unsigned" else a * a / (3 * 4.0**bits)
        count = np.count_nonzero(x) if grid == "unsigned" else x.size
        return np.sum((np.clip(x, lo, a) - x) ** 2) / count + noise

    best, best_err = _brute(objective, float(np.abs(x).max()))
    assert abs(ours - best) / best < 2e-3
    assert objective(ours) <= best_err * (1 + 1e-5)


def test_max_and_percentile_match_numpy():
    x = _tensor("weight", seed=2)
    assert cal.clip_value(x, "max", bits=4) == pytest.approx(float(np.abs(x).max()), rel=1e-6)
    for q in (99.99, 99.9, 90.0):
        got = cal.clip_value(x, "percentile", bits=4, q=q)
        assert got == pytest.approx(float(np.percentile(np.abs(x), q)), rel=1e-6)
    a = _tensor("activation", seed=3)
    assert cal.clip_value(a, "max", bits=4, grid="unsigned") == pytest.approx(float(a.max()), rel=1e-6)


def test_percentile_takes_the_same_value_by_sort_off_cpu(monkeypatch):
    # On CPU the percentile comes from lax.top_k; on accelerators from a full sort (XLA:GPU's
    # top-k splitter fails on these shapes). Both paths must give numpy's value.
    x = _tensor("weight", seed=4)
    on_cpu = cal.clip_value(x, "percentile", bits=4, q=99.99)
    monkeypatch.setattr(cal.jax, "default_backend", lambda: "gpu")
    by_sort = cal.clip_value(x, "percentile", bits=4, q=99.99)
    assert by_sort == pytest.approx(on_cpu, rel=1e-6)
    assert by_sort == pytest.approx(float(np.percentile(np.abs(x), 99.99)), rel=1e-6)


@pytest.mark.parametrize("bits", [0, 1, 2, 3, 4, 8])
def test_aciq_laplace_constant_solves_lambert_equation(bits):
    t = cal.aciq_constant(bits, "laplace")
    assert t * math.exp(t) == pytest.approx(3 * 4**bits, rel=1e-9)


def test_aciq_constants_match_reference_tables():
    laplace = {0: 1.05, 1: 1.86, 2: 2.83, 3: 3.89, 4: 5.03, 5: 6.2, 6: 7.41, 7: 8.64, 8: 9.89}
    gauss = {1: 1.24, 2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92}
    for m, c in laplace.items():
        assert cal.aciq_constant(m, "laplace") == pytest.approx(c, abs=0.011)
    for m, c in gauss.items():
        assert cal.aciq_constant(m, "gauss") == pytest.approx(c, abs=0.011)


def test_aciq_gauss_constant_is_a_brute_force_minimum():
    from scipy import stats

    for bits in (2, 4):
        t = np.linspace(0.5, 6, 200001)
        mse = 2 * ((1 + t * t) * stats.norm.sf(t) - t * stats.norm.pdf(t)) + t * t / (3 * 4.0**bits)
        assert cal.aciq_constant(bits, "gauss") == pytest.approx(t[np.argmin(mse)], abs=1e-4)


def test_aciq_rule_uses_mean_abs_and_nonzero_stats():
    w = _tensor("weight", seed=4)
    assert cal.clip_value(w, "aciq", bits=4) == pytest.approx(
        cal.aciq_constant(4, "laplace") * float(np.mean(np.abs(w))), rel=1e-5)
    a = _tensor("activation", seed=5)
    nz = a[a > 0]
    assert cal.clip_value(a, "aciq", bits=4, grid="unsigned") == pytest.approx(
        cal.aciq_constant(5, "laplace") * float(nz.mean()), rel=1e-5)
    assert cal.clip_value(a, "aciq", bits=3, grid="unsigned", distribution="gauss") == pytest.approx(
        cal.aciq_constant(4, "gauss") * float(np.sqrt(np.mean(nz**2))), rel=1e-5)


def _kl_reference(mag, n_q, bins=2048, drop_zeros=False, guard=False, divergences=False):
    """MXNet's ``_get_optimal_threshold`` on the magnitude histogram (TensorRT's entropy
    calibration), step by step as MXNet writes it: P with the outliers in its last bin, Q from
    the sliced histogram spread over P's non-zero bins, both smoothed in counts
    (``_smooth_distribution``), KL by ``scipy.stats.entropy``, the first minimum. ``guard``: ours,
    which skips thresholds whose first i bins hold values in fewer than n_q bins."""
    from scipy import stats

    hist, edges = np.histogram(mag, bins=bins, range=(0, mag.max()))
    hist = hist.astype(np.float64)
    if drop_zeros:
        hist[0] -= np.sum(mag == 0)

    def smooth(d, eps=1e-4):
        is_zeros, is_nonzeros = d == 0, d != 0
        n_zeros, n_nonzeros = is_zeros.sum(), is_nonzeros.sum()
        if not n_nonzeros:
            raise ValueError("all zeros")
        return d + eps * is_zeros - eps * n_zeros / n_nonzeros * is_nonzeros

    divergence = []
    for i in range(n_q, bins + 1):
        sliced = hist[:i]
        if guard and np.count_nonzero(sliced) < n_q:  # ours: too sparse a threshold to judge
            divergence.append(np.inf)
            continue
        p = sliced.copy()
        p[i - 1] += hist[i:].sum()
        is_nonzeros = (p != 0).astype(np.float64)
        merged = i // n_q
        quantized = np.array([sliced[j * merged:(j + 1) * merged].sum() for j in range(n_q)])
        quantized[-1] += sliced[n_q * merged:].sum()
        q = np.zeros(i)
        for j in range(n_q):
            start, stop = j * merged, (i if j == n_q - 1 else (j + 1) * merged)
            norm = is_nonzeros[start:stop].sum()
            if norm:
                q[start:stop] = quantized[j] / norm
        q[p == 0] = 0
        p = smooth(p)
        try:
            divergence.append(stats.entropy(p, smooth(q)))
        except ValueError:
            divergence.append(np.inf)
    if divergences:  # KL(P_i ‖ Q_i) for i = n_q … bins
        return np.asarray(divergence)
    if not np.isfinite(divergence).any():
        return float(mag.max())
    return (n_q + int(np.argmin(divergence))) * mag.max() / bins


@pytest.mark.parametrize("grid,bits", [("midrise", 4), ("unsigned", 3)])
def test_kl_matches_loop_reference(grid, bits):
    kind = "activation" if grid == "unsigned" else "weight"
    x = _tensor(kind, n=50000, seed=6)
    mag = np.abs(x) if grid != "unsigned" else np.maximum(x, 0)
    n_q = cal.kl_levels(SiteSpec(bits, grid))
    # 2048 bins (the default), where many bins are sparse and the smoothing decides: smoothing
    # normalised distributions instead of counts chose 0.311 instead of 0.325 for the weights
    # here, and 6.38 instead of 6.67 for the activations.
    ours = cal.clip_value(x, "kl", bits=bits, grid=grid, bins=2048)
    ref = _kl_reference(mag, n_q, bins=2048, drop_zeros=grid == "unsigned")
    # Near its minimum KL is flat to float32's resolution (at 3 bits here, thresholds 1834-1840 of
    # 2048 bins lie within 1e-7 of each other): on every backend ours is a minimiser of the float64
    # reference's KL up to that; the CPU picks the reference's own bin, while an H200's float32 sums
    # picked bin 1840 (α 6.693 against 6.671).
    kl64 = _kl_reference(mag, n_q, bins=2048, drop_zeros=grid == "unsigned", divergences=True)
    chosen = round(ours / float(mag.max()) * 2048)
    assert kl64[chosen - n_q] <= kl64.min() * (1 + 1e-5)
    if jax.default_backend() == "cpu":
        assert ours == pytest.approx(ref, rel=1e-5)
    # Dense histograms: the sparsity guard changes nothing.
    assert _kl_reference(mag, n_q, bins=2048, drop_zeros=grid == "unsigned", guard=True) == ref


def test_kl_on_a_small_tensor_does_not_collapse_to_the_first_bins():
    """144 kernel entries over 2048 bins: MXNet's search picks the first threshold with values
    (KL ≈ 0 when P_i and Q_i are both a point mass at bin i − 1), α ≈ 8/2048 of the max.
    Ours tests only thresholds with values in at least n_q bins."""
    x = np.random.default_rng(2).normal(0.0, 0.2, 144).astype(np.float32)
    mag, n_q = np.abs(x), cal.kl_levels(SiteSpec(4, "midrise"))
    mxnet = _kl_reference(mag, n_q, bins=2048, drop_zeros=False)
    ours = cal.clip_value(x, "kl", bits=4, grid="midrise")
    assert mxnet < 0.05 * mag.max()
    assert ours == pytest.approx(_kl_reference(mag, n_q, bins=2048, drop_zeros=False, guard=True), rel=1e-5)
    assert ours > 0.3 * mag.max()
    # Values in fewer bins than n_q: no threshold to test, the max.
    few = np.array([0.1, -0.5, 1.0, 0.25], np.float32)
    assert cal.clip_value(few, "kl", bits=4, grid="midrise") == pytest.approx(1.0)


def test_large_tensors_are_sampled_and_still_accurate():
    rng = np.random.default_rng(7)
    x = rng.laplace(size=2**19 + 123).astype(np.float32)
    full = cal.clip_value(x, "lp", bits=3, p=2.0)
    err = lambda a: float(cal.lp_error(jnp.asarray(x), a, 3, "midrise", 2.0))  # noqa: E731
    best, best_err = _brute(err, float(np.abs(x).max()), num=400)
    assert err(full) <= best_err * 1.01


@pytest.mark.parametrize("name,kw,match", [("nope", {}, "unknown calibration rule"),
                                           ("lp", {"p": -1}, "p=-1"),
                                           ("percentile", {"q": 150}, "q=150"),
                                           ("percentile", {"q": 0}, r"q=0 must be a number in \(0, 100\]"),
                                           ("lp", {"p": 0}, r"p=0 must be a number in \(0, 16\]"),
                                           ("aciq", {"distribution": "cauchy"}, "cauchy"),
                                           ("lp", {"p": "3"}, "p='3' must be a number"),
                                           ("lp", {"p": float("nan")}, "p=nan must be a number"),
                                           ("max", {"p": 2}, "unknown options"),
                                           (["max"], {}, r"unknown calibration rule \['max'\]; known rules")])
def test_bad_rules(name, kw, match):
    with pytest.raises(ValueError, match=match):
        cal.make_rule(name, **kw)


def test_empty_tensor_is_named():
    with pytest.raises(ValueError, match=r"clip_value needs a non-empty tensor x, got shape \(0,\)"):
        cal.clip_value(np.zeros(0), "max", bits=4)


def test_lp_rule_at_large_p_finds_the_minimiser():
    """float32 |e|^16 underflows for 8-bit weights of σ = 0.01 (|e| ≈ 2e-4): the search took an α
    whose error was 3.7e22× the minimum. Above p = 8 it compares log E|e|^p; the rule is then
    equivariant under scaling x (it was off by 44× at p = 16, 2 bits) and agrees with a float64
    brute force."""
    x = np.random.default_rng(0).normal(scale=0.01, size=20000).astype(np.float32)
    for bits, p in ((8, 16.0), (8, 12.0), (4, 16.0)):
        alpha = cal.clip_value(x, "lp", bits=bits, p=p)
        err = lambda a, bits=bits, p=p: float(np.mean(  # noqa: E731
            np.abs(np.asarray(quantizers.quantize(jnp.asarray(x), a, bits, "midrise"), np.float64) - x) ** p
            / 0.01**p))
        best, best_err = _brute(err, float(np.abs(x).max()), num=2000)
        assert err(alpha) <= best_err * 1.02, (bits, p, alpha, best)
    for scale in (1e-4, 1e3):
        assert cal.clip_value(x * scale, "lp", bits=2, p=16.0) == pytest.approx(
            scale * cal.clip_value(x, "lp", bits=2, p=16.0), rel=1e-3)


def test_numpy_scalars_are_numbers_for_rule_options():
    """p and q from a numpy array (a sweep's grid) are accepted, as Python numbers are."""
    x = np.random.default_rng(0).laplace(size=4096).astype(np.float32)
    for kw in ({"p": np.float32(3.0)}, {"p": np.int64(2)}, {"p": jnp.float32(3.0)}, {"p": np.array(3.0)}):
        assert cal.clip_value(x, "lp", bits=4, **kw) == pytest.approx(cal.clip_value(x, "lp", bits=4, p=float(kw["p"])))
    assert cal.clip_value(x, "percentile", bits=4, q=np.float64(99.0)) > 0


def test_kl_bins_as_a_numpy_integer_and_its_upper_bound():
    """bins=np.int64(64) is the integer it is; beyond KL_MAX_BINS the O(bins²) search is refused by name."""
    x = np.random.default_rng(0).laplace(size=2048).astype(np.float32)
    assert cal.clip_value(x, "kl", bits=4, bins=np.int64(64)) == cal.clip_value(x, "kl", bits=4, bins=64)
    for bad in (20000, cal.KL_MAX_BINS + 1, 8, True, 64.0):
        with pytest.raises(ValueError, match=rf"kl bins={bad!r} must be an integer in \[16, {cal.KL_MAX_BINS}\]"):
            cal.make_rule("kl", bins=bad)


def test_percentile_below_one_warns_that_q_is_a_percentage():
    """q=0.9999 (a fraction mistaken for a percent) is in (0, 100] but sets α near 0: it warns."""
    with pytest.warns(UserWarning, match=r"q=0.9999 is a percentage in \(0, 100\].*pass q=99.99"):
        cal.make_rule("percentile", q=0.9999)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal.make_rule("percentile", q=99.99)
        cal.make_rule("percentile", q=1)


def test_mse_on_the_unsigned_grid_divides_the_clip_error_by_the_non_zero_count():
    """The reference (MseUniformPriorQuantization, HEAD 12cd3bf) divides the summed clip error by
    the non-zero count on a post-ReLU tensor; the mean over all entries weighted the noise prior by
    N/N₊ (2× here) and gave an α 7-10 % smaller. Zeros and negatives change nothing but the count."""
    a = np.maximum(np.random.default_rng(0).normal(size=20000), 0).astype(np.float32)
    bits = 4

    def ref(al):
        return np.sum((np.clip(a, 0, al) - a) ** 2) / np.count_nonzero(a) + al**2 / (12 * 4.0**bits)

    best, _ = _brute(ref, float(a.max()))
    ours = cal.clip_value(a, "mse", bits=bits, grid="unsigned")
    assert ours == pytest.approx(best, rel=2e-3)
    # Extra zeros leave the non-zero statistics, and so α, unchanged.
    padded = np.concatenate([a, np.zeros(20000, np.float32)])
    assert cal.clip_value(padded, "mse", bits=bits, grid="unsigned") == pytest.approx(ours, rel=2e-3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_and_aciq_use_the_midtread_step(bits):
    """The midtread grid's step is α/(2^(M−1) − 1) (levels {−α, 0, α} at 2 bits), not the midrise
    2α/2^M the noise prior assumed: α was 42 % too large at 2 bits. Now the MSE rule minimises
    clip + Δ²/12 with that step and ACIQ's Laplace constant solves t·eᵗ = 12·(2^(M−1) − 1)²."""
    x = _tensor("weight", seed=8) / 0.05  # unit Laplace
    steps = 2 ** (bits - 1) - 1

    def objective(a):
        return np.mean((np.clip(x, -a, a) - x) ** 2) + (a / steps) ** 2 / 12

    best, _ = _brute(objective, float(np.abs(x).max()))
    assert cal.clip_value(x, "mse", bits=bits, grid="midtread") == pytest.approx(best, rel=2e-3)
    t = cal.aciq_constant(bits, "laplace", "midtread")
    assert t * math.exp(t) == pytest.approx(12 * steps**2, rel=1e-9)
    assert cal.clip_value(x, "aciq", bits=bits, grid="midtread") == pytest.approx(
        t * float(np.mean(np.abs(x))), rel=1e-5)
    # The midrise and unsigned constants are the reference's (unsigned: c_{M+1}).
    assert cal.aciq_constant(bits, "gauss", "unsigned") == pytest.approx(cal.aciq_constant(bits + 1, "gauss"))
    if bits == 2:  # 3 levels: ACIQ's 1-bit-midrise constant (1.86), not 2.83
        assert t == pytest.approx(1.86, abs=0.011)


@pytest.mark.parametrize("rule,kw,bits", [("lp", {"p": 8.0}, 2), ("lp", {"p": 4.0}, 3), ("lp", {"p": 2.0}, 4),
                                          ("mse", {}, 4), ("aciq", {"distribution": "gauss"}, 4)])
def test_rules_are_scale_equivariant_on_large_tensors(rule, kw, bits):
    """α(s·x) = s·α(x): |e|^8 overflowed float32 at |x| ~ 1e5 (lp p=8 gave α 38× too small), |e|^4
    at 1e10, squares at 1e20 (mse and lp p=2 ~40× too small, ACIQ-Gauss α = inf)."""
    x = np.random.default_rng(0).normal(size=20000).astype(np.float32)
    base = cal.clip_value(x, rule, bits=bits, **kw)
    for s in (1e5, 1e10, 1e20, 1e-3):
        assert cal.clip_value(x * np.float32(s), rule, bits=bits, **kw) == pytest.approx(s * base, rel=1e-3), s


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_clip_value_names_non_finite_values(bad):
    """A NaN or ±inf (or a float64 value beyond float32's range) made every rule return a NaN or inf α."""
    x = np.array([0.1, bad, -0.3, 0.2])
    for rule in ("max", "mse", "kl"):
        with pytest.raises(ValueError, match=r"clip_value: x holds 1 NaN or ±inf value\(s\) of 4"):
            cal.clip_value(x, rule, bits=4)


def test_clip_value_refuses_fp32_bits_by_name():
    """bits=None (FP32) passed check_bits: max returned an α, mse a TypeError (None ** …)."""
    for rule in ("max", "mse", "aciq"):
        with pytest.raises(ValueError, match=r"clip_value: bits=None \(FP32\) has no grid"):
            cal.clip_value(np.ones(5, np.float32), rule, bits=None)


@pytest.mark.parametrize("rule,kw", [("mse", {}), ("aciq", {}), ("aciq", {"distribution": "gauss"})])
def test_a_sparse_kernels_zeros_leave_its_midtread_alpha_unchanged(rule, kw):
    """On the midtread grid (the one for sparse networks) an exact zero sits on the zero level and
    carries no error, so a 2:4 kernel's zeros must not move α: MSE's mean over all entries had
    weighted the noise prior 2× and ACIQ's b and σ had been taken over the zeros too (α 0.5× and
    0.71×). On the midrise grid, with no zero level, zeros do cost noise and still count."""
    w = np.random.default_rng(1).laplace(size=20000).astype(np.float32)
    sparse = w.copy()
    sparse[::2] = 0.0
    ours = cal.clip_value(sparse, rule, bits=4, grid="midtread", **kw)
    assert ours == pytest.approx(cal.clip_value(sparse[1::2], rule, bits=4, grid="midtread", **kw), rel=1e-4)
    dense = cal.clip_value(sparse, rule, bits=4, grid="midrise", **kw)
    assert dense < 0.9 * cal.clip_value(sparse[1::2], rule, bits=4, grid="midrise", **kw)


@pytest.mark.parametrize("bits", [4, 8])
def test_kl_ignores_the_exact_zeros_of_a_sparse_kernel(bits):
    """A 50 %-zero kernel (a 2:4 mask) kept its zeros in bin 0 on the signed grid, and their spike
    chose α ≈ 0.062 (4 bits) / 1.05 (8 bits) of max|x| = 8.4: MSE 13× / 550× the MSE rule's. Exact
    zeros now leave the histogram as on the unsigned grid: α is the non-zero entries' α."""
    w = np.random.default_rng(0).laplace(size=20000).astype(np.float32)
    sparse = w.copy()
    sparse[::2] = 0.0
    ours = cal.clip_value(sparse, "kl", bits=bits)
    assert ours == pytest.approx(cal.clip_value(sparse[1::2], "kl", bits=bits), rel=1e-5)
    assert ours > 0.4 * np.abs(sparse).max()


@pytest.mark.parametrize("grid,x,bits,want,rel", [
    # midrise, x = ±1: (1 − α)² + α²/(3·4^M) is minimal at α = 3·4^M / (3·4^M + 1)
    ("midrise", [-1.0, 1.0], 2, 48 / 49, 2e-4),
    ("midrise", [-1.0, 1.0], 3, 192 / 193, 2e-4),
    # unsigned, one positive entry among zeros (which are not counted): (1 − α)² + α²/(12·4^M)
    ("unsigned", [1.0, 0.0, 0.0], 2, 192 / 193, 2e-4),
    # ... and negatives change nothing: their clip error (0 − x)² does not depend on α, nor do they count
    # (the constant 2.25 costs float32 resolution, hence 1e-3: clipping them at −α gave 1, counting them 96/97)
    ("unsigned", [1.0, 0.0, -1.5], 2, 192 / 193, 1e-3),
    # midtread, the mean over the 2 non-zero entries: (1 − α)² + α²/(12·(2^(M−1) − 1)²)
    ("midtread", [1.0, -1.0, 0.0, 0.0], 2, 12 / 13, 2e-4),
    ("midtread", [1.0, -1.0, 0.0, 0.0], 3, 108 / 109, 2e-4),
])
def test_mse_rule_hits_the_closed_form_minimiser(grid, x, bits, want, rel):
    """Two-valued tensors where the MSE-with-uniform-prior minimiser is a fraction worked by hand."""
    assert cal.clip_value(np.array(x, np.float32), "mse", bits=bits, grid=grid) == pytest.approx(want, rel=rel)


def test_search_1d_refines_to_the_minimiser_and_keeps_to_the_range():
    """Golden section after the grid: a quadratic's minimiser to 1e-6 (the 128-point grid alone is
    within 1/256), also in the first grid cell, and never past ``hi``."""
    for m in (0.3217, 0.0031, 0.9973):
        assert float(cal.search_1d(lambda a, m=m: (a - m) ** 2, 1.0)) == pytest.approx(m, abs=1e-6)
    assert float(cal.search_1d(lambda a: (a - 2.0) ** 2, 1.0)) == pytest.approx(1.0, abs=1e-6)
    assert float(cal.search_1d(lambda a: (a - 1.5) ** 2, 4.0)) == pytest.approx(1.5, abs=1e-5)


def test_lp_error_and_the_lp_search_range_by_hand():
    """x = ±{0.4, 1}, 2-bit midrise: at α = 1 the levels are ±1/3, ±1, so |e| = 1/15 on ±0.4 and 0 on
    ±1: E|e|² = 1/450, E|e|³ = 1/6750 (the mean of four entries, not the sum). A coarser grid at α ≈ 1.02
    fits better (error 0.0020), but the rule searches only α ≤ max|x| (the module docstring's example)."""
    x = jnp.asarray([-1.0, -0.4, 0.4, 1.0])
    assert float(cal.lp_error(x, 1.0, 2, "midrise", 2.0)) == pytest.approx(1 / 450, rel=1e-5)
    assert float(cal.lp_error(x, 1.0, 2, "midrise", 3.0)) == pytest.approx(1 / 6750, rel=1e-4)
    assert float(cal.lp_error(x, 1.02, 2, "midrise", 2.0)) < 1 / 450
    alpha = cal.clip_value(np.asarray(x), "lp", bits=2, p=2.0)
    assert alpha <= 1.0
    assert float(cal.lp_error(x, alpha, 2, "midrise", 2.0)) == pytest.approx(1 / 450, rel=1e-4)


@pytest.mark.parametrize("grid", ["midrise", "unsigned", "midtread"])
def test_an_all_zero_tensor_gets_the_smallest_alpha(grid):
    """Every rule returns α = 1e-8 (never 0, nor NaN from a zero count) for an all-zero tensor."""
    z = np.zeros(64, np.float32)
    for rule, kw in (("max", {}), ("percentile", {}), ("mse", {}), ("lp", {}), ("aciq", {}),
                     ("aciq", {"distribution": "gauss"}), ("kl", {})):
        assert cal.clip_value(z, rule, bits=4, grid=grid, **kw) == pytest.approx(1e-8, rel=1e-6), (rule, kw)


def test_the_unsigned_grid_calibrates_on_the_positive_part():
    """On the unsigned grid negative values are clipped to 0 before max, percentile and KL: a pre-ReLU
    tensor whose most negative value (−5) is larger in magnitude than its max (2)."""
    x = np.random.default_rng(3).normal(size=4000).astype(np.float32)
    x[:2] = [-5.0, 2.0]
    x = np.minimum(x, 2.0)
    pos = np.maximum(x, 0)
    assert cal.clip_value(x, "max", bits=4, grid="unsigned") == pytest.approx(2.0)
    assert cal.clip_value(x, "percentile", bits=4, grid="unsigned", q=99.0) == pytest.approx(
        float(np.percentile(pos, 99.0)), rel=1e-6)
    n_q = cal.kl_levels(SiteSpec(4, "unsigned"))
    assert cal.clip_value(x, "kl", bits=4, grid="unsigned") == pytest.approx(
        _kl_reference(pos, n_q, bins=2048, drop_zeros=True, guard=True), rel=1e-5)


def test_kl_divergences_on_a_hand_made_histogram():
    """TensorRT's KL(P_i ‖ Q_i) on hist = [3, 1, 2, 2] with n_q = 2, worked by hand (no empty bin, so no
    smoothing): i = 1 < n_q is +inf; i = 2 (exactly n_q filled bins, allowed) P = [3, 1 + 4]/8 with the
    outliers in its last bin, Q = [3, 1]/4; i = 3 Q merges bins 1-2 (the remainder joins the last
    chunk): [3, 1.5, 1.5]/6; i = 4 two chunks of two bins: Q uniform."""
    kl = np.asarray(cal.kl_divergences(np.array([3.0, 1.0, 2.0, 2.0]), 2))

    def entropy(p, q):
        p, q = np.asarray(p, float) / np.sum(p), np.asarray(q, float) / np.sum(q)
        return float(np.sum(p * np.log(p / q)))

    assert kl[0] == np.inf
    want = [entropy([3, 5], [3, 1]), entropy([3, 1, 4], [3, 1.5, 1.5]), entropy([3, 1, 2, 2], [1, 1, 1, 1])]
    np.testing.assert_allclose(kl[1:], want, rtol=1e-5)
    # An empty bin inside the support is smoothed in counts (MXNet): ε = 1e-4 on it, ε/2 taken from each of
    # the two full bins. hist = [2, 0, 1, 1], i = 3: P = [2, 0, 2], Q = [2, 0, 1] (bin 1's chunk mass
    # spread over the non-zero bin 2 only).
    eps = 1e-4
    kl = np.asarray(cal.kl_divergences(np.array([2.0, 0.0, 1.0, 1.0]), 2))
    assert kl[2] == pytest.approx(entropy([2 - eps / 2, eps, 2 - eps / 2], [2 - eps / 2, eps, 1 - eps / 2]), rel=1e-5)


def test_the_closed_ends_of_the_option_ranges_are_allowed():
    """q = 100 (the max), p = 16 and bins = 16 or KL_MAX_BINS are inside the documented ranges."""
    x = np.array([0.5, -2.0, 1.0, 0.25], np.float32)
    assert cal.clip_value(x, "percentile", bits=4, q=100) == pytest.approx(2.0)
    cal.make_rule("lp", p=16)
    cal.make_rule("kl", bins=16)
    cal.make_rule("kl", bins=cal.KL_MAX_BINS)


@pytest.mark.parametrize("call,match", [
    (lambda: cal.aciq_constant(1, "laplace", "midtread"), r"aciq_constant: the midtread grid has no step at bits=1"),
    (lambda: cal.aciq_constant(4, "cauchy"), "aciq distribution='cauchy' is not allowed"),
    (lambda: cal.aciq_constant(4, "laplace", "midtred"), "aciq_constant: grid='midtred' is not allowed"),
    (lambda: cal.clip_value(np.ones(4, np.float32), "max", bits=4, grid="midtred"), "clip_value: grid='midtred'"),
])
def test_aciq_constant_and_clip_value_check_their_arguments(call, match):
    """A 2-level midtread grid has no step (its constant would be W₀(0) = 0); unknown names are refused."""
    with pytest.raises(ValueError, match=match):
        call()


def test_aciq_gauss_on_a_large_all_negative_tensor():
    """σ is computed in units of max|x| (not max x, which is negative here): α = c_M·σ with σ in float64."""
    x = -np.abs(np.random.default_rng(4).normal(size=1000)).astype(np.float32) * np.float32(1e20)
    sigma = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    assert cal.clip_value(x, "aciq", bits=4, distribution="gauss") == pytest.approx(
        cal.aciq_constant(4, "gauss") * sigma, rel=1e-5)


@pytest.mark.parametrize("bits", [2, 8])
def test_mse_on_the_unsigned_grid_is_unmoved_by_negative_entries(bits):
    """A negative entry's clip error (0 − x)² is a constant in α and is not counted, so α(x) = α(max(x, 0)):
    as a constant in the float32 objective it cost resolution, α 0.3 % off at 8 bits (pre-ReLU N(0, 1))."""
    x = np.random.default_rng(0).normal(size=20000).astype(np.float32)
    assert cal.clip_value(x, "mse", bits=bits, grid="unsigned") == pytest.approx(
        cal.clip_value(np.maximum(x, 0), "mse", bits=bits, grid="unsigned"), rel=1e-5)
