"""Separability measures against cases with a known answer (additive vs coupled losses)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape.separability import (
    SeparabilityIndex,
    SeparabilityReport,
    anova_interaction,
    flat_fraction,
    gaussian_curvature,
    separability,
    separability_index,
)

# ------------------------------------------------------------------------------------------------ Hessian


def test_diagonal_hessian_is_separable():
    H = np.diag([4.0, 1.0, 0.25, 9.0])
    rep = separability(H)
    assert isinstance(rep, SeparabilityReport)
    assert rep.offdiag_ratio == 0.0 and rep.offdiag_l1_ratio == 0.0
    assert rep.mean_coupling == 0.0 and rep.mean_coupling_min == 0.0
    np.testing.assert_array_equal(rep.coupling, np.eye(4))
    np.testing.assert_allclose(rep.eigenvalues, [9.0, 4.0, 1.0, 0.25])
    assert rep.condition_number == pytest.approx(36.0)
    assert rep.trace == pytest.approx(14.25)


def test_coupled_hessian_values_by_hand():
    H = np.array([[4.0, 1.0, 0.0], [1.0, 1.0, 0.5], [0.0, 0.5, 9.0]])
    rep = separability(H)
    off = np.sqrt(2 * 1.0 + 2 * 0.25)
    assert rep.offdiag_ratio == pytest.approx(off / np.linalg.norm(H))
    assert rep.offdiag_l1_ratio == pytest.approx(3.0 / 14.0)
    assert rep.coupling[0, 1] == pytest.approx(1.0 / np.sqrt(4.0)) == rep.coupling[1, 0]
    assert rep.coupling[1, 2] == pytest.approx(0.5 / 3.0)
    assert rep.coupling_min[0, 1] == pytest.approx(1.0)  # |H_01| / min(4, 1): the reference's heat map
    assert rep.coupling_min[1, 2] == pytest.approx(0.5)
    assert rep.mean_coupling == pytest.approx((0.5 + 0.5 / 3.0 + 0.0) / 3.0)
    assert rep.mean_coupling_min == pytest.approx((1.0 + 0.5 + 0.0) / 3.0)
    ev = np.linalg.eigvalsh(H)
    assert rep.condition_number == pytest.approx(ev[-1] / ev[0])
    assert rep.offdiag_ratio > 0
    text = repr(rep)
    assert "offdiag_ratio" in text and "condition_number" in text


def test_condition_number_of_indefinite_and_zero_diagonal():
    rep = separability(np.array([[1.0, 0.0], [0.0, -2.0]]))
    assert rep.condition_number == np.inf and rep.abs_condition_number == pytest.approx(2.0)
    rep = separability(np.array([[0.0, 1.0], [1.0, 2.0]]))  # H_00 = 0: coupling undefined there
    assert np.isnan(rep.coupling[0, 1]) and np.isnan(rep.mean_coupling)
    assert separability(np.zeros((3, 3))).offdiag_ratio == 0.0


def test_separability_of_jax_hessians_tracks_the_coupling_strength():
    # L(a) = Σ a_i² + c · a_0 a_1: the coupling ratio grows with c.
    def loss(c):
        return lambda a: jnp.sum(a**2) + c * a[0] * a[1]

    ratios = [separability(jax.hessian(loss(c))(jnp.ones(3))).offdiag_ratio for c in (0.0, 0.5, 2.0)]
    assert ratios[0] == 0.0 and 0 < ratios[1] < ratios[2]


def test_bad_hessians():
    with pytest.raises(ValueError, match="square"):
        separability(np.ones((2, 3)))
    with pytest.raises(ValueError, match="square"):
        separability(np.ones(3))
    with pytest.raises(ValueError, match="NaN or inf"):
        separability(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="not symmetric"):
        separability(np.array([[1.0, 0.5], [0.0, 1.0]]))
    rep = separability(np.array([[1.0, 0.5], [0.5 + 1e-4, 1.0]]))  # float32-autodiff-level asymmetry is fine
    assert rep.asymmetry == pytest.approx(1e-4) and rep.coupling[0, 1] == pytest.approx(0.50005)
    with pytest.raises(ValueError, match="not symmetric"):
        separability(np.array([[1.0, 0.5], [0.5 + 1e-4, 1.0]]), sym_tol=1e-5)
    for tol in (np.nan, -1.0, "x"):  # NaN accepted any asymmetric H; -1 refused a symmetric one
        with pytest.raises(ValueError, match="sym_tol=.* must be a finite number >= 0"):
            separability(np.array([[1.0, 0.5], [0.0, 1.0]]), sym_tol=tol)


# ------------------------------------------------------------------------------------------------ sampling


class _BatchLoss:
    """A minimal stand-in for ClipLoss: .n and a vmapped, jitted .batch; records the calls."""

    def __init__(self, fn, n):
        self.n = n
        self._batch = jax.jit(jax.vmap(fn))
        self.calls = []

    def batch(self, alphas):
        self.calls.append(alphas.shape)
        return self._batch(jnp.asarray(alphas))


def test_additive_loss_has_gamma_zero():
    n = 6
    loss = _BatchLoss(lambda a: jnp.sum(jnp.log(a) ** 2 + 0.3 * a), n)
    res = separability_index(loss, np.full(n, 0.5), np.full(n, 2.0), n_samples=100, seed=0, batch=200)
    assert isinstance(res, SeparabilityIndex)
    assert abs(res.gamma_normalized) < 1e-5
    assert abs(res.T) < 4.0
    assert res.n_evals == 100 * (n + 2)
    # Every call has the same shape (the tail is padded), and there are only a few of them.
    assert set(loss.calls) == {(200, n)} and len(loss.calls) == 4
    assert "gamma" in repr(res)


def test_multiplicative_loss_has_large_gamma_and_T():
    n = 6
    loss = _BatchLoss(lambda a: jnp.prod(a), n)
    res = separability_index(loss, np.full(n, 0.5), np.full(n, 2.0), n_samples=100, seed=0,
                             n_repeats=2)
    assert res.gamma > 0 and res.gamma_normalized > 1e-3
    assert res.T > 0.5  # g is heavy-tailed for a product, so T ~ 1 at N = 100 (the reference saw 1.02)
    assert res.gammas.shape == (2,) and res.g.shape == (2, 100)
    # Repeats combine as z-scores (Stouffer, the reference's T/√k), not as a mean.
    assert res.T == pytest.approx(res.Ts.sum() / np.sqrt(2), rel=1e-12)
    assert res.Ts.shape == (2,) and np.all(res.Ts > 0)
    # T is a t-statistic: it grows like √N when γ ≠ 0.
    many = separability_index(loss, np.full(n, 0.5), np.full(n, 2.0), n_samples=3000, seed=0, batch=4096)
    assert many.T > 4.0
    # Same seed, same answer; the answer depends on the seed.
    again = separability_index(loss, np.full(n, 0.5), np.full(n, 2.0), n_samples=100, seed=0, n_repeats=2)
    assert again.gamma == res.gamma
    other = separability_index(loss, np.full(n, 0.5), np.full(n, 2.0), n_samples=100, seed=1, n_repeats=2)
    assert other.gamma != res.gamma


def test_plain_batch_callable_is_accepted():
    fn = lambda A: np.sum(np.asarray(A) ** 2, axis=1)  # additive
    res = separability_index(fn, np.zeros(3), np.ones(3), n_samples=20)
    assert abs(res.gamma_normalized) < 1e-6


def test_additive_loss_with_site_dependent_terms_has_gamma_zero():
    """Each site its own 1-D loss and box: the bracket L(x) + (n − 1) L(z) − Σ_i L(z^(i)) vanishes
    only if z^(i) takes x's i-th coordinate into place i (a site-symmetric loss, as in the tests
    above, cannot tell which coordinate went where; mixing them reversed gave γ/L² = −0.022 and
    T = −5.6 here)."""
    w = np.array([1.0, 5.0, 0.2, 3.0])
    lo, hi = np.array([0.5, 1.0, 0.1, 2.0]), np.array([2.0, 4.0, 0.3, 9.0])
    fn = lambda A: (w * np.log(np.asarray(A, np.float64)) ** 2).sum(axis=1)  # float64: exact to rounding
    res = separability_index(fn, lo, hi, n_samples=200, seed=0)
    assert abs(res.gamma_normalized) < 1e-6
    assert res.T == 0.0 and np.all(res.Ts == 0.0)  # g vanishes to rounding: below the floor


class _Recording:
    """A plain batch callable that keeps every value it returns."""

    def __init__(self, fn):
        self.fn, self.values = fn, []

    def __call__(self, A):
        out = self.fn(np.asarray(A, np.float64))
        self.values.append(out)
        return out


def test_gamma_normalized_is_gamma_over_the_squared_max_loss():
    """gamma_normalized = γ / L_max², L_max = max |L| over the evaluated points (documented as
    scale-free): L → 10 L multiplies γ by 100 and leaves gamma_normalized as it was."""
    lo, hi = np.full(3, 0.5), np.full(3, 2.0)
    prod = _Recording(lambda A: np.prod(A, axis=1))
    res = separability_index(prod, lo, hi, n_samples=50, seed=0)
    fmax = max(np.max(np.abs(v)) for v in prod.values)
    assert res.gamma != 0
    assert res.gamma_normalized == pytest.approx(res.gamma / fmax**2, rel=1e-12)
    scaled = separability_index(lambda A: 10 * np.prod(np.asarray(A, np.float64), axis=1), lo, hi,
                                n_samples=50, seed=0)
    assert scaled.gamma == pytest.approx(100 * res.gamma, rel=1e-9)
    assert scaled.gamma_normalized == pytest.approx(res.gamma_normalized, rel=1e-9)


def test_T_is_the_t_statistic_of_the_returned_samples():
    """T_r = √N γ_r / s_r with s_r the sample standard deviation (ddof=1) of the returned g; at
    N = 10 the population one (ddof=0) is 5 % larger."""
    prod = lambda A: np.prod(np.asarray(A, np.float64), axis=1)
    res = separability_index(prod, np.full(3, 0.5), np.full(3, 2.0), n_samples=10, seed=0)
    g = res.g[0]
    assert res.g.shape == (1, 10) and g.std(ddof=1) > 0
    expected = np.sqrt(10) * g.mean() / g.std(ddof=1)
    assert res.Ts[0] == pytest.approx(expected, rel=1e-12)
    assert res.T == pytest.approx(expected, rel=1e-12)  # one repeat: Σ T_r / √1
    assert res.gamma == pytest.approx(g.mean(), rel=1e-12)


def test_bad_sampling_inputs():
    loss = _BatchLoss(lambda a: jnp.sum(a), 3)
    with pytest.raises(ValueError, match="same shape"):
        separability_index(loss, np.zeros(3), np.ones(4))
    with pytest.raises(ValueError, match="lo <= hi"):
        separability_index(loss, np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="n = 3 sites"):
        separability_index(loss, np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="finite"):
        separability_index(loss, np.zeros(3), np.array([1.0, np.inf, 1.0]))
    with pytest.raises(ValueError, match="n_samples"):
        separability_index(loss, np.zeros(3), np.ones(3), n_samples=1)
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"seed must be an integer >= 0, got {seed!r}"):
            separability_index(loss, np.zeros(3), np.ones(3), seed=seed)
    with pytest.raises(ValueError, match="batch"):
        separability_index(object(), np.zeros(3), np.ones(3))
    log_loss = _BatchLoss(lambda a: jnp.sum(jnp.log(a)), 3)
    with pytest.raises(ValueError, match="non-finite"):
        separability_index(log_loss, np.full(3, -1.0), np.ones(3))


# ------------------------------------------------------------------------------------------------ grids


def test_anova_interaction_additive_vs_coupled():
    x = np.linspace(0.1, 2.0, 21)
    y = np.linspace(0.1, 3.0, 31)
    X, Y = np.meshgrid(x, y, indexing="ij")
    assert anova_interaction(np.sin(X) + Y**2) == pytest.approx(0.0, abs=1e-12)
    coupled = anova_interaction(X * Y)
    assert 0.05 < coupled <= 1.0
    assert anova_interaction((X - Y) ** 2) > coupled * 0.5
    assert anova_interaction(np.full((4, 5), 3.0)) == 0.0
    # A pure interaction (zero row and column effects) has fraction 1.
    assert anova_interaction(np.outer([1.0, -1.0], [1.0, -1.0])) == pytest.approx(1.0)


def test_flat_fraction():
    z = np.array([[1.0, 1.02, 1.2], [1.04, 2.0, np.inf]])
    assert flat_fraction(z, 0.05) == pytest.approx(3 / 6)
    assert flat_fraction(z, 0.0) == pytest.approx(1 / 6)
    assert flat_fraction(z, 10.0) == pytest.approx(5 / 6)  # +inf is never flat
    for bad in (-0.1, "0.1", None):
        with pytest.raises(ValueError, match=f"tol must be a finite number >= 0, got {bad!r}"):
            flat_fraction(z, bad)
    with pytest.raises(ValueError, match="NaN"):
        flat_fraction(np.array([[1.0, np.nan], [1.0, 1.0]]), 0.1)
    with pytest.raises(ValueError, match="1 -inf entries"):  # it returned 1/4 as the flat fraction
        flat_fraction(np.array([[1.0, -np.inf], [1.0, 1.0]]), 0.1)
    with pytest.raises(ValueError, match="2-D"):
        flat_fraction(np.ones(4), 0.1)
    with pytest.raises(ValueError, match="finite"):
        anova_interaction(z)


def test_gaussian_curvature():
    # Paraboloid z = (x² + y²)/2 at the origin: K = 1; at (1, 0): det H = 1, |∇z|² = 1 → K = 1/4.
    H = np.eye(2)
    assert gaussian_curvature(H, [0.0, 0.0]) == pytest.approx(1.0)
    assert gaussian_curvature(H, [1.0, 0.0]) == pytest.approx(0.25)
    # A saddle has negative curvature; a cylinder zero.
    assert gaussian_curvature(np.diag([1.0, -1.0]), [0.0, 0.0]) == pytest.approx(-1.0)
    assert gaussian_curvature(np.diag([1.0, 0.0]), [0.3, 0.0]) == 0.0
    with pytest.raises(ValueError, match="same n"):
        gaussian_curvature(np.eye(2), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        gaussian_curvature(np.eye(2), [np.nan, 0.0])
    # A non-symmetric H is refused, as by separability(); within sym_tol its symmetric part counts.
    with pytest.raises(ValueError, match="not symmetric"):
        gaussian_curvature([[1.0, 2.0], [0.0, 1.0]], [0.0, 0.0])
    assert gaussian_curvature([[1.0, 1.001], [0.999, 1.0]], [0.0, 0.0]) == pytest.approx(0.0, abs=1e-12)


def test_negative_diagonal_and_off_diagonal_entries_by_hand():
    # An indefinite Hessian (a saddle in α_0): the couplings use |H_ij| and |H_ii|, the trace is signed.
    H = np.array([[-4.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [0.0, 0.5, 9.0]])
    rep = separability(H)
    assert rep.offdiag_ratio == pytest.approx(np.sqrt(2.5 / 100.5))  # ‖off‖² = 1 + 1 + ¼ + ¼, ‖H‖² = 100.5
    assert rep.coupling[0, 1] == pytest.approx(0.5) == rep.coupling[1, 0]  # |−1| / √(|−4| · 1)
    assert rep.coupling[1, 2] == pytest.approx(0.5 / 3.0)
    np.testing.assert_allclose(np.diag(rep.coupling), 1.0)
    assert rep.coupling_min[0, 1] == pytest.approx(1.0)  # |−1| / min(4, 1)
    assert rep.trace == pytest.approx(6.0)
    assert rep.condition_number == np.inf


def test_eigenvalues_and_condition_numbers_in_closed_form():
    rep = separability(np.array([[2.0, 1.0], [1.0, 2.0]]))  # eigenvalues 3 and 1
    np.testing.assert_allclose(rep.eigenvalues, [3.0, 1.0])
    assert rep.condition_number == pytest.approx(3.0) and rep.trace == pytest.approx(4.0)
    rep = separability(np.array([[0.0, 2.0], [2.0, 0.0]]))  # ±2: indefinite, trace 0
    np.testing.assert_allclose(rep.eigenvalues, [2.0, -2.0], atol=1e-12)
    assert rep.condition_number == np.inf and rep.abs_condition_number == pytest.approx(1.0)
    assert rep.trace == pytest.approx(0.0, abs=1e-12)
    rep = separability(np.zeros((2, 2)))  # not positive definite: no finite condition number
    assert rep.condition_number == np.inf and rep.trace == 0.0


def test_anova_interaction_of_a_two_by_two_grid_by_hand():
    # z = [[0, 1], [1, 3]]: grand mean 5/4, residuals ±1/4 (‖R‖ = 1/2), ‖z − m‖² = 19/4.
    assert anova_interaction(np.array([[0.0, 1.0], [1.0, 3.0]])) == pytest.approx(0.5 / np.sqrt(4.75))
    # 3 × 2, z_ij = i · j + 5 = [[5, 5], [5, 6], [5, 7]]: m = 5.5, R = [[½, −½], [0, 0], [−½, ½]] (‖R‖² = 1),
    # ‖z − m‖² = 5 · ¼ + 1.5² = 3.5.
    assert anova_interaction(np.outer([0.0, 1.0, 2.0], [0.0, 1.0]) + 5.0) == pytest.approx(np.sqrt(1 / 3.5))


def test_gaussian_curvature_uses_the_squared_gradient_norm():
    # det [[2, 1], [1, 3]] = 5, ‖g‖² = 0.3² + 0.4² = 0.25: K = 5 / 1.25².
    assert gaussian_curvature(np.array([[2.0, 1.0], [1.0, 3.0]]), [0.3, -0.4]) == pytest.approx(3.2)
