"""hessian_spectrum against ground truth: quadratics with a known spectrum, given as pytrees."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
import weakref
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import spectrum
from landscape.spectrum import _HVP, _OPERATORS, DENSE_MAX_DIM, HessianSpectrum, hessian_spectrum

SHAPES_5000 = {"conv": (10, 5, 4, 4), "dense": (4000,), "bias": (200,)}


def _leaves_concat(x, names):
    return jnp.concatenate([x[k].reshape(-1) for k in names])


def householder_quadratic(lam, shapes, *, reflections=6, seed=0):
    """f(x) = ½ xᵀ A x with A = Q diag(λ) Qᵀ, Q a product of Householder reflections, x a dict.

    Applying Qᵀ costs O(reflections · n), so n = 5000 stays cheap, and the spectrum is exactly λ.
    Returns f, a random x0 shaped by `shapes`, and apply_q(c, transpose=False) = Q c (or Qᵀ c), in
    f's coordinate order (the keys of `shapes` in the order given)."""
    lam = np.asarray(lam, np.float64)
    n = lam.size
    assert sum(int(np.prod(s)) for s in shapes.values()) == n
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((reflections, n))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    U_j, lam_j = jnp.asarray(U, jnp.float32), jnp.asarray(lam, jnp.float32)
    names = list(shapes)

    def reflect(y, u):
        return y - 2.0 * u * (u @ y), None

    def f(x):
        y = jax.lax.scan(reflect, _leaves_concat(x, names), U_j)[0]  # Qᵀ x = H_r ⋯ H_1 x
        return 0.5 * jnp.sum(lam_j * y * y)

    def apply_q(c, transpose=False):  # Q c = H_1 ⋯ H_r c, or Qᵀ c = H_r ⋯ H_1 c
        y = np.asarray(c, np.float64)
        for u in U if transpose else U[::-1]:
            y = y - 2.0 * u * (u @ y)
        return y

    x0 = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    return f, x0, apply_q


def flat(tree, names):
    """The dict `tree` as one float64 vector, in the order f uses (not the sorted pytree order)."""
    return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in names])


def spectrum_with_gap(kind, n, seed=0):
    """Top five eigenvalues well separated from a bulk: SPD bulk in [0.1, 10], or indefinite in [-30, 10]."""
    rng = np.random.default_rng(seed)
    bulk = rng.uniform(0.1, 10.0, n - 5) if kind == "spd" else rng.uniform(-30.0, 10.0, n - 5)
    lam = np.concatenate([[100.0, 90.0, 80.0, 70.0, 60.0], bulk])
    return rng.permutation(lam)


@pytest.mark.parametrize("mode", ["linearize", "recompute"])
def test_block_hvps_equal_dense_ground_truth(mode):
    # Trace and density use vmapped HVPs. jaxlib 0.10.2's XLA:CPU miscompiles some batched
    # reduce fusions (jax-ml/jax#39103; workaround XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce,
    # set before jax starts): this catches it, or anything like it, on the path we depend on.
    n = 5000
    lam = spectrum_with_gap("spd", n, seed=20)
    f, x0, apply_q = householder_quadratic(lam, {"a": (n,)}, reflections=2, seed=21)
    V = np.random.default_rng(22).choice([-1.0, 1.0], size=(16, n))
    leaves, treedef = jax.tree_util.tree_flatten(x0)
    flat_x, unravel = jax.flatten_util.ravel_pytree(x0)
    op = _HVP(f, unravel, flat_x, (treedef, tuple((v.shape, v.dtype) for v in leaves)), mode=mode)
    assert op.mode == mode
    got = np.asarray(op.matmat(jnp.asarray(V, jnp.float32), "test"), np.float64)
    exact = np.stack([apply_q(lam * apply_q(v, transpose=True)) for v in V])  # A v = Q Λ Qᵀ v
    assert np.max(np.abs(got - exact)) <= 1e-4 * np.max(np.abs(exact)), (
        "batched HVPs are wrong: on jaxlib 0.10.2 CPU set "
        "XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce before importing jax"
    )


@pytest.fixture(scope="module")
def spd1000():
    """One n = 1000 SPD quadratic shared by several tests (its HVP programs compile once)."""
    lam = spectrum_with_gap("spd", 1000, seed=8)
    f, x0, _ = householder_quadratic(lam, {"a": (20, 30), "b": (400,)}, seed=9)
    return f, x0, lam


# ------------------------------------------------------------------------------------------------ dense


def test_dense_matches_eigh_on_random_indefinite_matrix():
    n = 60
    rng = np.random.default_rng(1)
    M = rng.standard_normal((n, n))
    A = (M + M.T) / 2
    A_j = jnp.asarray(A, jnp.float32)
    f = lambda x: 0.5 * _leaves_concat(x, ["w", "b"]) @ A_j @ _leaves_concat(x, ["w", "b"])
    x0 = {"w": jnp.ones((6, 5)), "b": jnp.zeros(30)}
    evals, evecs = np.linalg.eigh(A)

    res = hessian_spectrum(f, x0, top_k=5, trace=True, density=True, eigenvectors=True)
    assert res.method == "dense" and res.dim == n
    np.testing.assert_allclose(res.eigenvalues, evals[::-1][:5], rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(res.eigenvalues) <= 0)
    assert res.trace == pytest.approx(np.trace(A), abs=1e-4) and res.trace_stderr == 0.0
    assert np.all(res.converged) and np.max(res.residuals) < 1e-4
    for vec, true in zip(res.eigenvectors, evecs[:, ::-1].T, strict=False):
        assert jax.tree_util.tree_structure(vec) == jax.tree_util.tree_structure(x0)
        assert vec["w"].shape == (6, 5) and vec["b"].shape == (30,)
        assert abs(flat(vec, ["w", "b"]) @ true) == pytest.approx(1.0, abs=1e-4)
    grid, values = res.density
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-9)

    low = hessian_spectrum(f, x0, top_k=3, which="smallest", trace=False)
    np.testing.assert_allclose(low.eigenvalues, evals[:3], rtol=1e-5, atol=1e-5)
    mag = hessian_spectrum(f, x0, top_k=4, which="magnitude", trace=False)
    np.testing.assert_allclose(mag.eigenvalues, evals[np.argsort(-np.abs(evals))[:4]], rtol=1e-5, atol=1e-5)


def test_dense_matches_jax_hessian_on_a_nonquadratic_function():
    rng = np.random.default_rng(2)
    W = jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)
    t = jnp.asarray(rng.standard_normal(8), jnp.float32)

    def f(p):
        h = jnp.tanh(W @ p["a"] + p["c"])
        return jnp.sum((h - t) ** 2) + 0.1 * jnp.sum(jnp.cos(p["a"]))

    x0 = {"a": jnp.asarray(rng.standard_normal(12), jnp.float32),
          "c": jnp.asarray(rng.standard_normal(8), jnp.float32)}
    Hj = jax.hessian(lambda v: f({"a": v[:12], "c": v[12:]}))(jnp.concatenate([x0["a"], x0["c"]]))
    evals = np.linalg.eigvalsh(np.asarray(Hj, np.float64))
    res = hessian_spectrum(f, x0, top_k=20, trace=True)
    np.testing.assert_allclose(res.eigenvalues, evals[::-1], rtol=1e-4, atol=1e-4)
    assert res.trace == pytest.approx(float(np.sum(evals)), rel=1e-5, abs=1e-5)
    assert res.n_hvp == 20 and res.info["asymmetry"] < 1e-5


# ------------------------------------------------------------------------------------------------ Lanczos


@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_lanczos_top5_and_trace_n5000(kind):
    lam = spectrum_with_gap(kind, 5000, seed=3)
    f, x0, apply_q = householder_quadratic(lam, SHAPES_5000, seed=4)
    res = hessian_spectrum(f, x0, top_k=5, trace=True, eigenvectors=True, seed=0)
    assert res.method == "lanczos" and res.dim == 5000 > DENSE_MAX_DIM
    top = np.sort(lam)[::-1][:5]
    np.testing.assert_allclose(res.eigenvalues, top, rtol=1e-3)
    assert np.all(res.converged)
    # Eigenvectors: shaped like x0, aligned with the true ones Q e_i.
    order = np.argsort(-lam)[:5]
    for vec, i in zip(res.eigenvectors, order, strict=True):
        assert {k: v.shape for k, v in vec.items()} == {k: v.shape for k, v in x0.items()}
        assert abs(flat(vec, list(SHAPES_5000)) @ apply_q(np.eye(5000)[i])) > 0.999
    # Hutch++: within 3 standard errors of the exact trace, with a useful error bar.
    assert abs(res.trace - lam.sum()) <= 3 * res.trace_stderr
    assert 0 < res.trace_stderr < 0.05 * np.abs(lam).sum()
    assert res.hvp_counts["trace"] == 96
    assert res.n_hvp == res.hvp_counts["lanczos"] + 96
    assert res.hvp_counts["lanczos"] <= 60
    print(f"\n[{kind}] top-5 rel err {np.max(np.abs(res.eigenvalues - top) / top):.2e}, "
          f"lanczos HVPs {res.hvp_counts['lanczos']}, trace {res.trace:.1f} ± {res.trace_stderr:.1f} "
          f"(exact {lam.sum():.1f}), {res.seconds:.2f}s")


@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_eigenvalue_tolerance_needs_fewer_hvps_for_the_same_eigenvalue_accuracy(kind):
    # tol_on="eigenvalue" stops on min(r, r²/δ): the eigenvalues converge quadratically, the
    # residuals linearly, so it stops earlier; its estimates must still bound the true errors here.
    # Top five close to a bulk reaching 60, so that convergence takes a while (like resnet20's).
    rng = np.random.default_rng(11)
    bulk = rng.uniform(0.1, 60.0, 4995) if kind == "spd" else rng.uniform(-180.0, 60.0, 4995)
    lam = rng.permutation(np.concatenate([[100.0, 95.0, 90.0, 85.0, 80.0], bulk]))
    f, x0, _ = householder_quadratic(lam, SHAPES_5000, seed=12)
    top = np.sort(lam)[::-1][:5]
    kw = dict(top_k=5, trace=False, tol=1e-3, seed=1)
    by_residual = hessian_spectrum(f, x0, tol_on="residual", **kw)
    by_value = hessian_spectrum(f, x0, tol_on="eigenvalue", **kw)
    assert by_value.info["tol_on"] == "eigenvalue" and np.all(by_value.converged)
    assert by_value.n_hvp < by_residual.n_hvp
    true_errors = np.abs(by_value.eigenvalues - top)
    assert np.all(true_errors <= 1e-3 * top[0])
    assert np.all(true_errors <= by_value.errors * (1 + 1e-3) + 1e-4)  # the estimate is not optimistic
    assert np.all(by_value.errors <= by_value.residuals)
    assert np.all(by_residual.errors <= by_residual.residuals)
    assert np.max(by_value.residuals) > 1e-3 * top[0]  # stopped before the residuals got there


def test_eigenvalue_error_estimate_is_the_smaller_of_residual_and_kato_temple():
    theta = np.array([5.0, 5.0, 3.0, 1.0])
    res = np.array([1e-3, 2e-3, 1e-1, 4.0])
    err = spectrum._eigenvalue_errors(theta, res)
    # equal Ritz values (gap 0): only the residual bound; gap 2: r²/2; a huge residual: r itself
    np.testing.assert_allclose(err, [1e-3, 2e-3, 1e-2 / 2, 4.0])
    np.testing.assert_allclose(spectrum._eigenvalue_errors(np.array([2.0]), np.array([0.5])), [0.5])


def test_thick_restart_converges_with_a_small_basis():
    # Clustered top eigenvalues next to a bulk: needs more than a 12-vector Krylov basis.
    rng = np.random.default_rng(5)
    lam = np.concatenate([[10.0, 9.8, 9.6, 9.4, 9.2], rng.uniform(-9.5, 9.0, 995)])
    f, x0, _ = householder_quadratic(lam, {"a": (1000,)}, seed=6)
    res = hessian_spectrum(f, x0, top_k=3, trace=False, lanczos_steps=12, max_restarts=60)
    assert res.info["lanczos_restarts"] > 0
    assert np.all(res.converged)
    np.testing.assert_allclose(res.eigenvalues, [10.0, 9.8, 9.6], rtol=1e-4)


def test_each_eigenvalue_converges_relative_to_its_own_size():
    # λ = 1e5, 50, 40 over a unit bulk: with one threshold tol · max|θ| = 10 for every pair, a
    # Ritz value of the bulk (1.79) passed as the third eigenvalue and 48.2 as the second.
    rng = np.random.default_rng(0)
    lam = np.concatenate([[1e5, 50.0, 40.0], rng.standard_normal(997)])
    f, x0, _ = householder_quadratic(lam, {"a": (1000,)}, seed=3)
    res = hessian_spectrum(f, x0, top_k=3, trace=False, method="lanczos")
    assert np.all(res.converged)
    np.testing.assert_allclose(res.eigenvalues, [1e5, 50.0, 40.0], rtol=1e-3)
    floor = 100 * np.finfo(np.float32).eps * 1e5  # the residual floor: HVP rounding of the 1e5 direction
    assert np.all(res.residuals <= np.maximum(1e-4 * np.abs(res.eigenvalues), floor))


def test_a_repeated_eigenvalue_found_twice_warns_that_copies_may_be_missing():
    rng = np.random.default_rng(0)
    d = jnp.asarray(np.concatenate([[5.0, 5.0, 5.0], rng.standard_normal(597)]), jnp.float32)
    with pytest.warns(RuntimeWarning, match="found the eigenvalue 5 2 times"):
        res = hessian_spectrum(lambda x: 0.5 * jnp.sum(d * x * x), jnp.zeros(600), top_k=3, trace=False)
    assert res.method == "lanczos" and res.eigenvalues[1] == pytest.approx(5.0, rel=1e-5)
    with warnings.catch_warnings():  # distinct eigenvalues: no warning
        warnings.simplefilter("error")
        hessian_spectrum(lambda x: 0.5 * jnp.sum(d * x * x), jnp.zeros(600), top_k=1, trace=False)


def test_unconverged_lanczos_warns_and_flags():
    # No gap at the bottom of a uniform bulk: two restarts of 10 vectors cannot resolve it.
    lam = np.linspace(-1.0, 1.0, 1000)
    f, x0, _ = householder_quadratic(lam, {"a": (1000,)}, seed=7)
    with pytest.warns(RuntimeWarning, match="not converged"):
        res = hessian_spectrum(f, x0, top_k=3, which="smallest", trace=False, lanczos_steps=10,
                               max_restarts=2, tol=1e-8)
    assert not np.all(res.converged) and res.info["lanczos_restarts"] == 2


def test_hutchinson_with_relative_tolerance(spd1000):
    f, x0, lam = spd1000
    res = hessian_spectrum(f, x0, top_k=1, trace=True, trace_method="hutchinson", num_probes=32,
                           trace_rtol=0.02, max_probes=2000, probe_batch=32)
    assert res.trace_stderr <= 0.02 * abs(res.trace)
    assert abs(res.trace - lam.sum()) <= 3 * res.trace_stderr
    assert res.info["trace_hvp"] % 32 == 0


def test_the_adaptive_trace_stops_on_no_fewer_than_thirty_samples(spd1000):
    """An n-sample standard error is itself uncertain by about 1/√(2n), and the adaptive trace stops at
    the first estimate below its target, which favours a lucky low one: a resnet20 benchmark stopped
    on Hutch++'s 8 Monte-Carlo samples reporting 1.59 %, where the spread of 8 was about 4 %. A loose
    trace_rtol that the first 4 samples already meet now waits for ADAPTIVE_MIN_SAMPLES of them."""
    from landscape.spectrum import ADAPTIVE_MIN_SAMPLES

    f, x0, lam = spd1000
    res = hessian_spectrum(f, x0, top_k=1, trace=True, trace_method="hutch++", num_probes=12,
                           trace_rtol=0.5, probe_batch=4, seed=0)
    assert ADAPTIVE_MIN_SAMPLES == 30
    assert res.info["trace_hvp"] == 4 + 4 + 32  # sketch, its image, then Monte-Carlo blocks of 4 up to ≥ 30
    assert res.trace_stderr <= 0.5 * abs(res.trace)
    fixed = hessian_spectrum(f, x0, top_k=1, trace=True, trace_method="hutch++", num_probes=12,
                             probe_batch=4, seed=0)
    assert fixed.info["trace_hvp"] == 12  # without trace_rtol the probe count is as given


def test_trace_stderr_is_the_sample_standard_error_of_the_probe_estimates(monkeypatch):
    """Hutchinson's standard error is std(ddof=1)/√m of the m probe estimates gᵀHg (at m = 6 the
    population std, ddof=0, is 9 % smaller). The probes and their HVPs are read from the trace's
    calls to ``_apply_blocks`` (so the check does not depend on how the probes are drawn); an
    off-diagonal H makes the estimates differ from probe to probe."""
    rng = np.random.default_rng(40)
    n = 50
    M = rng.standard_normal((n, n))
    A = (M + M.T) / 2
    A_j = jnp.asarray(A, jnp.float32)
    f = lambda x: 0.5 * x @ (A_j @ x)
    calls = []
    original = spectrum._apply_blocks

    def recording(op, V, block, task, **kw):
        out = original(op, V, block, task, **kw)
        if task == "trace":
            calls.append((np.asarray(V, np.float64), np.asarray(out, np.float64)))
        return out

    monkeypatch.setattr(spectrum, "_apply_blocks", recording)
    res = hessian_spectrum(f, jnp.zeros(n), top_k=1, method="lanczos", tol=1e-2, trace=True,
                           trace_method="hutchinson", num_probes=6, probe_batch=2, seed=3)
    G = np.concatenate([v for v, _ in calls])
    HG = np.concatenate([out for _, out in calls])
    assert G.shape == (6, n) and np.all(np.abs(G) == 1)  # Rademacher probes, one call of 6
    np.testing.assert_allclose(HG, G @ A, rtol=1e-4, atol=1e-4)  # they are HVPs of this H
    estimates = np.sum(G * HG, axis=1)
    assert estimates.std() > 0.1 * abs(estimates.mean())
    assert res.trace == pytest.approx(estimates.mean(), rel=1e-12)
    assert res.trace_stderr == pytest.approx(estimates.std(ddof=1) / np.sqrt(6), rel=1e-12)
    # one leaf: its block's standard error is the global one
    assert res.trace_per_leaf_stderr == pytest.approx(res.trace_stderr, rel=1e-12)


def test_lanczos_path_on_a_small_problem_is_exact():
    # method="lanczos" with n below the basis size spans the whole space: exact to rounding.
    rng = np.random.default_rng(10)
    lam = rng.uniform(-2, 5, 30)
    f, x0, _ = householder_quadratic(lam, {"a": (5, 6)}, seed=11)
    res = hessian_spectrum(f, x0, top_k=4, method="lanczos", trace=True)
    np.testing.assert_allclose(res.eigenvalues, np.sort(lam)[::-1][:4], rtol=1e-4)
    # The Hutch++ sketch (32 ≥ n) captures all of H: the trace is exact, no Monte-Carlo part runs.
    assert res.trace == pytest.approx(lam.sum(), rel=1e-4) and res.trace_stderr == 0.0
    # sketch and image: min(32, n) = 30 columns each, in blocks of default_probe_batch() (1 on CPU)
    block = spectrum.default_probe_batch()
    assert res.hvp_counts["trace"] == 2 * (-(-30 // block) * block)


# ------------------------------------------------------------------------------------------------ per-leaf trace


def exact_diagonal(lam, apply_q):
    """diag(Q Λ Qᵀ)_i = Σ_k λ_k (Qᵀ e_i)_k², column by column."""
    n = lam.size
    return np.array([lam @ apply_q(e, transpose=True) ** 2 for e in np.eye(n)])


@pytest.fixture(scope="module")
def spd1000_leaf_traces(spd1000):
    """{leaf: tr H_bb} for spd1000 (the same construction; its keys are in pytree order)."""
    _, x0, lam = spd1000
    _, _, apply_q = householder_quadratic(lam, {"a": (20, 30), "b": (400,)}, seed=9)
    d = exact_diagonal(lam, apply_q)
    return {"a": d[:600].sum(), "b": d[600:].sum()}


@pytest.mark.parametrize("trace_method", ["hutch++", "hutchinson"])
def test_per_leaf_traces_match_the_exact_block_traces(spd1000, spd1000_leaf_traces, trace_method):
    f, x0, lam = spd1000
    res = hessian_spectrum(f, x0, top_k=1, trace=True, trace_method=trace_method, num_probes=96, seed=4)
    assert jax.tree_util.tree_structure(res.trace_per_leaf) == jax.tree_util.tree_structure(x0)
    for name, true in spd1000_leaf_traces.items():
        est, err = res.trace_per_leaf[name], res.trace_per_leaf_stderr[name]
        assert 0 < err < 0.02 * abs(true)
        assert abs(est - true) <= 4 * err, (name, est, true, err)
    # The blocks partition the diagonal: their estimates add up to the global one, probe for probe.
    assert sum(res.trace_per_leaf.values()) == pytest.approx(res.trace, rel=1e-9)
    rows = res.leaf_traces()
    assert [(r[0], r[1]) for r in rows] == [("['a']", 600), ("['b']", 400)]
    assert "per leaf: 2 leaves" in repr(res)


def test_per_leaf_hutchpp_is_unbiased_when_the_curvature_is_concentrated_in_one_leaf():
    """A strongly curved leaf coupled to a flat one. The sketch then captures mostly leaf a, and
    attributing tr(QᵀHQ) to the blocks by diag(PHP), or by diag(PHP + 2PH(I−P)), is biased by
    9.6 or 8.2 standard errors of the 100-seed mean on leaf b (measured when this test was written);
    diag(HP) with the projected Monte-Carlo term is unbiased for each block."""
    rng = np.random.default_rng(31)
    A = rng.standard_normal((100, 100))
    B = rng.standard_normal((300, 300))
    H = np.block([[A @ A.T / 10, 0.3 * rng.standard_normal((100, 300))],
                  [np.zeros((300, 100)), B @ B.T / 300]])
    H = np.triu(H) + np.triu(H, 1).T
    H_j = jnp.asarray(H, jnp.float32)
    f = lambda x: 0.5 * _leaves_concat(x, ["a", "b"]) @ H_j @ _leaves_concat(x, ["a", "b"])
    x0 = {"a": jnp.zeros(100), "b": jnp.zeros(300)}
    true = np.array([np.trace(H[:100, :100]), np.trace(H[100:, 100:])])
    runs = np.array([
        [(r := hessian_spectrum(f, x0, top_k=1, method="lanczos", tol=1e-2, num_probes=30, seed=s))
         .trace_per_leaf["a"], r.trace_per_leaf["b"]]
        for s in range(100)
    ])
    z = (runs.mean(axis=0) - true) / (runs.std(axis=0, ddof=1) / np.sqrt(len(runs)))
    assert np.all(np.abs(z) < 4), z


def test_per_leaf_traces_are_exact_for_dense_and_a_spanning_sketch():
    rng = np.random.default_rng(30)
    n = 48
    M = rng.standard_normal((n, n))
    A = (M + M.T) / 2
    A_j = jnp.asarray(A, jnp.float32)
    names = ["b", "w"]  # pytree (sorted-key) order, so f's coordinates follow the leaves
    f = lambda x: 0.5 * _leaves_concat(x, names) @ A_j @ _leaves_concat(x, names)
    x0 = {"w": jnp.ones((4, 10)), "b": jnp.zeros(8), "empty": jnp.zeros((0, 3))}
    exact = {"b": np.trace(A[:8, :8]), "w": np.trace(A[8:, 8:]), "empty": 0.0}
    dense = hessian_spectrum(f, x0, top_k=2, method="dense")
    # A Hutch++ sketch of 150 // 3 ≥ n = 48 probes spans everything: P = I, every block is exact.
    sketch = hessian_spectrum(f, x0, top_k=2, method="lanczos", num_probes=150)
    assert sketch.trace_stderr == 0.0
    for res in (dense, sketch):
        for name, true in exact.items():
            assert res.trace_per_leaf[name] == pytest.approx(true, abs=1e-4)
            assert res.trace_per_leaf_stderr[name] == 0.0
    assert hessian_spectrum(f, x0, top_k=1, trace=False).trace_per_leaf is None


def test_leaf_sums_of_empty_and_filled_leaves():
    values = np.arange(12.0).reshape(2, 6)
    got = spectrum._leaf_sums(values, [2, 0, 3, 0, 1])
    np.testing.assert_array_equal(got, [[1, 0, 9, 0, 5], [13, 0, 27, 0, 11]])
    np.testing.assert_array_equal(spectrum._leaf_sums(values, [0, 6, 0]), [[0, 15, 0], [0, 51, 0]])


# ------------------------------------------------------------------------------------------------ density


def _bulk_and_clusters(n):
    rng = np.random.default_rng(12)
    lam = np.concatenate([rng.uniform(0.0, 1.0, n - 40), np.full(20, 4.0), np.full(20, 8.0)])
    return rng.permutation(lam)


@pytest.mark.parametrize("method,n", [("lanczos", 1000), ("dense", 200)])
def test_density_integrates_to_one_and_peaks_at_isolated_eigenvalues(method, n):
    lam = _bulk_and_clusters(n)
    f, x0, _ = householder_quadratic(lam, {"a": (n,)}, seed=13)
    res = hessian_spectrum(f, x0, top_k=1, trace=False, density=True, method=method, density_runs=10,
                           density_steps=60, probe_batch=10)
    grid, values = res.density
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-9)
    assert np.all(values >= 0)
    sigma = res.info["density_sigma"]
    at = lambda t: values[np.argmin(np.abs(grid - t))]
    for peak in (4.0, 8.0):
        window = np.abs(grid - peak) <= 3 * sigma
        assert abs(grid[window][np.argmax(values[window])] - peak) <= sigma  # a local maximum there
        assert values[window].max() > 100 * max(at(2.5), at(6.0))  # far above the empty gaps
        mass = np.trapezoid(values[window], grid[window])
        assert mass == pytest.approx(20 / n, rel=0.6)  # SLQ weights are unbiased, 10 runs are noisy
    # The smoothed density's mean is the (unbiased) estimate of tr H / n.
    assert np.trapezoid(grid * values, grid) == pytest.approx(lam.mean(), rel=0.05)
    assert res.eigenvalues[0] == pytest.approx(8.0, rel=1e-4)


def test_default_density_sigma_is_one_percent_of_the_spectral_range():
    """density_sigma=None: σ = 1 % of the spectral range (as documented), recorded in
    info["density_sigma"]; the grid reaches 5σ beyond the extreme eigenvalues and the density is
    the one computed with that σ given explicitly."""
    d = np.arange(1.0, 9.0)  # eigenvalues 1 … 8: range 7
    d_j = jnp.asarray(d, jnp.float32)
    f = lambda x: 0.5 * jnp.sum(d_j * x * x)
    kw = dict(top_k=1, trace=False, density=True, method="dense", density_grid=400)
    res = hessian_spectrum(f, jnp.ones(8), **kw)
    sigma = res.info["density_sigma"]
    assert sigma == pytest.approx(0.07, rel=1e-6)
    grid, values = res.density
    assert grid[0] == pytest.approx(1.0 - 5 * sigma, rel=1e-6) and grid[-1] == pytest.approx(8.0 + 5 * sigma, rel=1e-6)
    given = hessian_spectrum(f, jnp.ones(8), density_sigma=0.07, **kw)
    np.testing.assert_allclose(values, given.density[1], rtol=1e-5, atol=1e-8)
    # σ narrow enough to resolve unit-spaced eigenvalues: the density nearly vanishes between them
    at = lambda t: values[np.argmin(np.abs(grid - t))]
    assert at(4.5) < 1e-6 * at(4.0)


def test_a_density_narrower_than_the_grid_loses_no_eigenvalue():
    # σ = 10^-2.5 (PyHessian's σ² = 1e-5) on a 2000-point grid over [0, 1000]: cells 0.5 wide.
    # Sampled at the grid points, the node at 0.3 fell between two and vanished while the
    # normalisation gave the other two half the mass each.
    nodes, weights = np.array([[0.0, 0.3, 1000.0]]), np.full((1, 3), 1 / 3)
    grid, values, _ = spectrum._smooth_density(nodes, weights, 2000, 10**-2.5)
    mass = lambda lo, hi: np.trapezoid(np.where((grid >= lo) & (grid <= hi), values, 0.0), grid)
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-12)
    assert mass(-1.0, 0.1) == pytest.approx(1 / 3, rel=1e-6)  # the first cell: the node at 0
    assert mass(0.2, 1.0) == pytest.approx(1 / 3, rel=1e-6)  # the next cell holds the node at 0.3
    assert mass(999.0, 1001.0) == pytest.approx(1 / 3, rel=1e-6)
    # With σ many cells wide, the cell means are the point values of the mixture.
    grid, values, sigma = spectrum._smooth_density(nodes, weights, 20001, 20.0)
    point = sum(np.exp(-0.5 * ((grid - t) / sigma) ** 2) for t in nodes[0]) / (3 * sigma * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(values, point / np.trapezoid(point, grid), rtol=1e-4, atol=1e-9)


def _four_eigenvalues(n=600):
    """f = ½ Σ d_i x_i² with d ∈ {10 (once), 5, 3, 1 (the rest in thirds)}: every Krylov space has
    dimension ≤ 4, so Lanczos breaks down (β = 0) after four steps from any start vector."""
    d = np.concatenate([[10.0], np.repeat([5.0, 3.0, 1.0], [200, 200, n - 401])])
    d_j = jnp.asarray(d, jnp.float32)
    return (lambda x: 0.5 * jnp.sum(d_j * x["a"] ** 2)), {"a": jnp.zeros(n, jnp.float32)}, d


def test_lanczos_continues_after_breakdowns_to_repeated_eigenvalues():
    """After an invariant subspace Lanczos goes on from a fresh random direction orthogonal to the
    basis. Top-5 of a spectrum with four distinct values (10 once, 5 two hundred times, ...) from a
    random start (x0 = 0, no gradient): every Krylov block has dimension ≤ 4 and gives one more
    copy of 5; with the random start's minimum basis of 20 steps (five blocks) the top 5 are
    10, 5, 5, 5, 5, as they are. (The early test had stopped after two blocks at 10, 5, 5, 3, 3.)"""
    f, x0, _ = _four_eigenvalues()
    with pytest.warns(RuntimeWarning, match="found the eigenvalue 5 4 times"):  # it is 200 times
        res = hessian_spectrum(f, x0, top_k=5, trace=False, eigenvectors=True, seed=2)
    assert np.all(res.converged) and res.n_hvp == 20  # the minimum basis: max(2·5 + 1, 20)
    np.testing.assert_allclose(res.eigenvalues, [10.0, 5.0, 5.0, 5.0, 5.0], rtol=1e-5)
    assert np.all(res.residuals <= 1e-5)
    V = np.stack([np.asarray(v["a"], np.float64) for v in res.eigenvectors])
    np.testing.assert_allclose(V @ V.T, np.eye(5), atol=1e-5)  # four independent copies of 5
    assert np.abs(V[1:5, 1:201]).sum(axis=1).min() > 0.99 * np.abs(V[1:5]).sum(axis=1).min()


def test_lanczos_does_not_stop_before_a_tight_cluster_is_in():
    """From a random start, a k-th Ritz value converged to a lower eigenvalue before a member of a
    tight cluster (relative gaps 2e-4 < tol) had entered the Krylov space: top-4 of {5, 4.999,
    4.998, 4.5, 3, …} came out [5, 4.998, 4.5, 3], marked converged, in 19 of 40 seeds. The minimum
    basis, min(m, max(2k + 1, 20)) steps as ARPACK's, finds all four in every seed here."""
    rng = np.random.default_rng(0)
    n = 700
    values = np.concatenate([[5.0, 4.999, 4.998, 4.5, 3.0, -4.5, -4.9995, -5.0005], rng.uniform(-1, 1, n - 8)])
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    A = jnp.asarray((Q * values) @ Q.T, jnp.float32)
    shapes = [(10, 20), (100,), (5, 5, 4), (200,), (100,)]

    def f(x):
        v = jnp.concatenate([x[i].ravel() for i in range(len(shapes))])
        return 0.5 * v @ (A @ v)

    x0 = [jnp.zeros(s, jnp.float32) for s in shapes]
    for seed in range(10):
        with warnings.catch_warnings():  # 5 and 4.999 agree within tol: "repeated eigenvalue" may be said
            warnings.simplefilter("ignore", RuntimeWarning)
            res = hessian_spectrum(f, x0, top_k=4, trace=False, start="random", seed=seed)
        np.testing.assert_allclose(res.eigenvalues, [5.0, 4.999, 4.998, 4.5], rtol=2e-4, err_msg=f"seed {seed}")
    # The gradient start (the default for "largest", x0 ≠ 0) needs that basis too for top_k > 1:
    # accepting from step k on, it returned [4.9992, 4.9980, 4.5, 3.0] (seed 3), marked converged,
    # in 8 of 20 seeds.
    for seed in range(3, 8):
        r = np.random.default_rng(1000 + seed)
        x0 = [jnp.asarray(r.standard_normal(s), jnp.float32) for s in shapes]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = hessian_spectrum(f, x0, top_k=4, trace=False, seed=seed)
        assert res.info["start"] == "gradient"
        np.testing.assert_allclose(res.eigenvalues, [5.0, 4.999, 4.998, 4.5], rtol=2e-4, err_msg=f"seed {seed}")


def test_lanczos_finds_the_null_space_of_a_rank_deficient_hessian():
    """The smallest eigenvalues of a rank-3 Hessian (least squares on 3 examples, n = 630 in two
    leaves) are 0, 0, 0. float32 HVPs leave β at 3e-5·max|θ| where the Krylov space is invariant,
    every residual ~0: the first check took [0, 187, 207] as converged. Accepting only a wanted
    set that survives a step from there finds one more 0 per breakdown."""
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(3, 630)), jnp.float32)
    x0 = {"w": jnp.asarray(rng.normal(size=(20, 30)), jnp.float32), "b": jnp.zeros(30, jnp.float32)}

    def f(p):
        return 0.5 * jnp.mean((X @ jnp.concatenate([p["b"], p["w"].ravel()])) ** 2)

    res = hessian_spectrum(f, x0, top_k=3, which="smallest", trace=False)
    top = np.sort(np.linalg.eigvalsh(np.asarray(X, np.float64).T @ np.asarray(X, np.float64) / 3))[-1]
    assert np.all(res.converged) and np.all(np.abs(res.eigenvalues) < 1e-5 * top), res.eigenvalues


def test_mixed_float32_float64_leaves_stop_at_float32_rounding():
    """With x64 on, a float32 leaf next to float64 ones makes the products float32-accurate: the
    stopping floor takes float32's ε (float64's had Lanczos spend every restart and report the
    answers, as accurate as an all-float32 run's, as not converged)."""
    from landscape.spectrum import _rounding_eps

    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        Q, _ = np.linalg.qr(rng.normal(size=(600, 600)))
        A = jnp.asarray((Q * np.concatenate([np.zeros(300), rng.uniform(1, 5, 300)])) @ Q.T)

        def f(x):
            v = jnp.concatenate([x["a"].ravel().astype(jnp.float64), x["b"]])
            return 0.5 * v @ (A @ v)

        x = {"a": jnp.asarray(rng.normal(size=(10, 10)), jnp.float32), "b": jnp.asarray(rng.normal(size=500))}
        assert _rounding_eps(x) == np.finfo(np.float32).eps
        assert _rounding_eps({"b": x["b"]}) == np.finfo(np.float64).eps
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # "not converged" failed this before
            res = hessian_spectrum(f, x, top_k=3, which="smallest", trace=False)
    assert np.all(res.converged) and np.all(np.abs(res.eigenvalues) < 1e-6), res.eigenvalues


@pytest.mark.parametrize("probe_batch", [1, 3])
def test_slq_weights_are_exact_through_breakdowns(probe_batch):
    """With a diagonal H and Rademacher start vectors each run's quadrature is exact: weight
    multiplicity/n at each distinct eigenvalue. Its 20 steps break down after four and go on in
    blocks from fresh directions, which must leave the weights exact (the last, unfinished block's
    Ritz values are not eigenvalues, and carry no weight)."""
    f, x0, d = _four_eigenvalues()
    res = hessian_spectrum(f, x0, top_k=1, trace=False, density=True, density_runs=3, density_steps=20,
                           probe_batch=probe_batch, seed=4)
    nodes, weights = res.density_nodes
    assert nodes.shape == (3, 20)
    for value, count in ((10.0, 1), (5.0, 200), (3.0, 200), (1.0, 199)):
        mass = np.where(np.abs(nodes - value) < 1e-4, weights, 0.0).sum(axis=1)
        np.testing.assert_allclose(mass, count / d.size, atol=1e-6)
    off = np.min(np.abs(nodes[..., None] - np.array([10.0, 5.0, 3.0, 1.0])), axis=-1) > 1e-4
    assert off.any() and weights[off].sum() < 1e-5


def test_default_probe_batch_is_one_on_cpu_and_runs_are_not_rounded_up(monkeypatch):
    """probe_batch=None: single HVPs on CPU (vmapped conv HVPs compile to grouped convolutions
    there), PROBE_BATCH on an accelerator; a block rounds the density runs up to its size."""
    f, x0, _ = _four_eigenvalues()
    platform = jax.devices()[0].platform
    assert spectrum.default_probe_batch() == (1 if platform == "cpu" else spectrum.PROBE_BATCH)

    class Device:
        platform = "gpu"

    assert spectrum.default_probe_batch(Device()) == spectrum.PROBE_BATCH == 16
    for probe_batch, runs in ((1, 3), (2, 4)):
        monkeypatch.setattr(spectrum, "default_probe_batch", lambda device=None, b=probe_batch: b)
        res = hessian_spectrum(f, x0, top_k=1, trace=False, density=True, density_runs=3,
                               density_steps=5, seed=4)
        assert res.info["density_runs"] == runs and res.hvp_counts["density"] == 5 * runs


def test_fresh_direction_kernel_replaces_only_the_runs_that_broke_down():
    rng = np.random.default_rng(0)
    Q = np.zeros((2, 4, 50), np.float32)
    Q[:, :2] = np.linalg.qr(rng.standard_normal((50, 2)))[0].T  # rows 0, 1 orthonormal in both runs
    Q[1, 2] = 7.0  # run 1's row 2, which must survive
    r = rng.standard_normal((2, 50)).astype(np.float32)
    out, rows = spectrum._fresh_direction_batch(jnp.asarray(Q), r, 1, np.array([True, False]))
    out, rows = np.asarray(out), np.asarray(rows)
    np.testing.assert_allclose(out[0, :2] @ out[0, 2], 0.0, atol=1e-6)
    assert np.linalg.norm(out[0, 2]) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(out[1, 2], Q[1, 2])
    np.testing.assert_array_equal(rows, out[:, 2])
    np.testing.assert_array_equal(out[:, :2], Q[:, :2])


# ------------------------------------------------------------------------------------------------ API


def test_result_repr_plot_and_determinism(spd1000):
    f, x0, _ = spd1000
    kw = dict(top_k=2, trace=True, density=True, density_runs=4, density_steps=20, num_probes=12,
              probe_batch=4, seed=3)
    a = hessian_spectrum(f, x0, **kw)
    b = hessian_spectrum(f, x0, **kw)
    assert isinstance(a, HessianSpectrum)
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    assert a.trace == b.trace
    np.testing.assert_array_equal(a.density[1], b.density[1])
    text = repr(a)
    for word in ("lanczos", "eigenvalues", "trace", "density", "n_hvp", "seconds"):
        assert word in text
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = a.plot()
    assert ax.get_xlabel() == "eigenvalue"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["spectral density (SLQ)", "top eigenvalues"]
    plt.close("all")
    low = hessian_spectrum(f, x0, **dict(kw, which="smallest", trace=False)).plot()
    assert "smallest eigenvalues" in [t.get_text() for t in low.get_legend().get_texts()]
    plt.close("all")
    ax = hessian_spectrum(lambda x: jnp.sum(jnp.cos(x)), jnp.ones(5), top_k=2, trace=False).plot()
    assert ax.get_ylabel() == "eigenvalue"
    plt.close("all")


def test_bad_inputs_raise_clear_errors():
    x0 = {"a": jnp.ones(4), "b": jnp.ones((2, 3))}
    f = lambda x: jnp.sum(x["a"] ** 2) + jnp.sum(x["b"] ** 3)
    with pytest.raises(ValueError, match="scalar"):
        hessian_spectrum(lambda x: x["a"] ** 2, x0)
    for wrapped in (lambda x: (f(x),), lambda x: {"loss": f(x)}):  # went on to a TypeError in jax.grad
        with pytest.raises(ValueError, match="f must return a scalar array, got output of a (tuple|dict)"):
            hessian_spectrum(wrapped, x0)
    with pytest.raises(ValueError, match="top_k"):
        hessian_spectrum(f, x0, top_k=11)
    with pytest.raises(ValueError, match="top_k"):
        hessian_spectrum(f, x0, top_k=0)
    with pytest.raises(ValueError, match="NaN"):
        hessian_spectrum(f, {"a": jnp.array([1.0, jnp.nan, 0.0, 0.0]), "b": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match="NaN/inf"):
        hessian_spectrum(f, {"a": jnp.array([1.0, jnp.inf, 0.0, 0.0]), "b": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match="method"):
        hessian_spectrum(f, x0, method="power")
    for flag in ("trace", "density", "eigenvectors"):  # "no" would have counted as on
        with pytest.raises(ValueError, match=f"{flag}='no' must be True or False"):
            hessian_spectrum(f, x0, **{flag: "no"})
    with pytest.raises(ValueError, match="max_probes=-5 must be an integer >= 96"):
        hessian_spectrum(f, x0, max_probes=-5)
    with pytest.raises(ValueError, match="which"):
        hessian_spectrum(f, x0, which="LA")
    with pytest.raises(ValueError, match="precision='tf32'; allowed"):
        hessian_spectrum(f, x0, precision="tf32")
    with pytest.raises(ValueError, match="unknown hvp 'reverse'; allowed: auto, linearize, recompute"):
        hessian_spectrum(f, x0, hvp="reverse")
    with pytest.raises(ValueError, match="unknown tol_on 'value'; allowed: residual, eigenvalue"):
        hessian_spectrum(f, x0, tol_on="value")
    with pytest.raises(ValueError, match="trace_method"):
        hessian_spectrum(f, x0, trace_method="xtrace")
    with pytest.raises(ValueError, match="floating"):
        hessian_spectrum(lambda x: jnp.sum(x["a"]) * 1.0, {"a": jnp.arange(3)})
    with pytest.raises(ValueError, match="no array leaves"):
        hessian_spectrum(f, {})
    with pytest.raises(ValueError, match="lanczos_steps"):
        hessian_spectrum(lambda x: jnp.sum(x**2), jnp.ones(600), top_k=5, lanczos_steps=6)
    with pytest.raises(ValueError, match="num_probes"):
        hessian_spectrum(f, x0, num_probes=3)
    with pytest.raises(ValueError, match="seed=-1 must be an integer >= 0"):
        hessian_spectrum(f, x0, seed=-1)
    # named as a bad argument, not a TypeError from min(n, "8")
    with pytest.raises(ValueError, match="lanczos_steps='8' must be a positive integer"):
        hessian_spectrum(f, x0, lanczos_steps="8")
    for name in ("tol", "trace_rtol", "density_sigma"):
        with pytest.raises(ValueError, match=f"{name} must be .*positive.* number, got '1e-4'"):
            hessian_spectrum(f, x0, **{name: "1e-4"})
    # f not finite at x0 (sqrt of negative values): named, on both paths, not a LinAlgError; the
    # value itself when the gradient is evaluated, else the first non-finite products
    for n in (5, 600):
        with pytest.raises(ValueError, match=r"f\(x0\) = nan is not finite .* inside f's domain"):
            hessian_spectrum(lambda x: jnp.sum(jnp.sqrt(x)), -jnp.ones(n), top_k=2)
    with pytest.raises(ValueError, match=r"of the 5x5 Hessian entries are not finite .* inside f's domain"):
        hessian_spectrum(lambda x: jnp.sum(jnp.sqrt(x)), -jnp.ones(5), top_k=2, hvp="recompute")
    with pytest.raises(ValueError, match="Hessian-vector product of Lanczos step 1 are not finite"):
        hessian_spectrum(lambda x: jnp.sum(jnp.sqrt(x)), -jnp.ones(600), method="lanczos", trace=False,
                         hvp="recompute", start="random")


def test_bad_x0_leaves_are_named_by_their_pytree_path():
    """A nested (Flax-style) x0 with one bad leaf: the message names that leaf by its path, as
    random_direction does, not only the dtype or the count of non-finite values."""
    params = {"block0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
              "block1": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    f = lambda p: sum(jnp.sum(jnp.asarray(leaf, jnp.float32) ** 2) for leaf in jax.tree.leaves(p))
    ints = {**params, "block1": {**params["block1"], "bias": jnp.zeros(2, jnp.int32)}}
    with pytest.raises(ValueError, match=re.escape("x0['block1']['bias'] has dtype int32")) as err:
        hessian_spectrum(f, ints, top_k=1)
    assert "block0" not in str(err.value) and "floating-point" in str(err.value)
    # every wrong leaf is named, in pytree order: a bool mask and a Python int as well
    mixed = {**ints, "mask": jnp.ones(2, bool), "step": 3}
    with pytest.raises(ValueError, match=re.escape("x0['block1']['bias'] has dtype int32; x0['mask'] has dtype "
                                                   "bool; x0['step'] has dtype int32")):
        hessian_spectrum(f, mixed, top_k=1)
    nan = {**params, "block0": {**params["block0"], "kernel": params["block0"]["kernel"].at[1, 0].set(jnp.nan)}}
    nan["block1"] = {**params["block1"], "bias": jnp.array([jnp.inf, -jnp.inf])}
    with pytest.raises(ValueError, match=re.escape("x0['block0']['kernel'] contains 1 NaN/inf value(s); "
                                                   "x0['block1']['bias'] contains 2 NaN/inf value(s)")) as err:
        hessian_spectrum(f, nan, top_k=1)
    assert "block1']['kernel" not in str(err.value) and "block0']['bias" not in str(err.value)
    # a list x0 and a bare array: their paths, and "x0" itself
    with pytest.raises(ValueError, match=re.escape("x0[1] has dtype int32")):
        hessian_spectrum(lambda v: jnp.sum(v[0] ** 2), [jnp.ones(2), jnp.arange(2)], top_k=1)
    with pytest.raises(ValueError, match=re.escape("x0 is not finite: x0 contains 1 NaN/inf value(s)")):
        hessian_spectrum(lambda v: jnp.sum(v ** 2), jnp.array([1.0, jnp.nan]), top_k=1)
    # many bad leaves: the first five, then a count
    many = {f"w{i}": jnp.zeros(1, jnp.int32) for i in range(7)}
    with pytest.raises(ValueError, match=re.escape("x0['w4'] has dtype int32; and 2 more leaves")):
        hessian_spectrum(lambda p: 0.0, many, top_k=1)


# ------------------------------------------------------------------------------------------------ sharding

_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from landscape.spectrum import hessian_spectrum

    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    N, d = 256, 600
    X = rng.standard_normal((N, d)).astype(np.float32)
    X[:, :3] *= np.array([6.0, 4.0, 3.0], np.float32)  # a gap at the top of X^T X / N
    y = rng.standard_normal(N).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    placed = {
        "one": (jax.device_put(X, jax.devices()[0]), jax.device_put(y, jax.devices()[0])),
        "four": (jax.device_put(X, NamedSharding(mesh, P("data", None))),
                 jax.device_put(y, NamedSharding(mesh, P("data")))),
    }
    assert len(placed["four"][0].sharding.device_set) == 4
    x0 = {"w": jnp.zeros(d - 1), "b": jnp.zeros(())}
    out = {}
    for name, (Xd, yd) in placed.items():
        def f(p, Xd=Xd, yd=yd):
            r = Xd[:, :-1] @ p["w"] + Xd[:, -1] * p["b"] - yd
            return 0.5 * jnp.mean(r * r)
        it = hessian_spectrum(f, x0, top_k=3, trace=True, density=True, density_runs=4,
                              density_steps=20, num_probes=24, probe_batch=4)
        out[name] = dict(method=it.method, eig=it.eigenvalues.tolist(), trace=it.trace,
                         stderr=it.trace_stderr, density=it.density[1].tolist())
    print("RESULT" + json.dumps(out))
    """
)


def test_sharded_data_gives_the_single_device_result():
    root = Path(__file__).resolve().parents[1]
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    one, four = out["one"], out["four"]
    assert one["method"] == four["method"] == "lanczos"
    np.testing.assert_allclose(four["eig"], one["eig"], rtol=1e-5)
    assert four["trace"] == pytest.approx(one["trace"], rel=1e-5)
    assert four["stderr"] == pytest.approx(one["stderr"], rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(four["density"], one["density"], rtol=1e-5, atol=1e-5 * max(one["density"]))


def test_programs_are_cached_per_function_and_released_with_it(spd1000):
    f, x0, lam = spd1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the happy path warns about nothing
        res = hessian_spectrum(f, x0, top_k=2, trace=False)
    assert np.all(res.converged)
    np.testing.assert_allclose(res.eigenvalues, np.sort(lam)[::-1][:2], rtol=1e-4)
    assert f in _OPERATORS
    g = lambda x: jnp.sum(x**4)
    hessian_spectrum(g, jnp.ones(3))
    ref = weakref.ref(g)
    del g
    gc.collect()
    assert ref() is None  # the cache holds f weakly: its data can be freed


def test_trace_compiles_nothing_beyond_the_hvp_programs(spd1000, count_compilations):
    """Hutch++'s probes, projections and blocks are host work: after one call, another call with
    other probe counts, seeds and tolerances (same block size) compiles no XLA program at all."""
    f, x0, lam = spd1000
    hessian_spectrum(f, x0, top_k=1, trace=True, trace_method="hutch++", num_probes=12, seed=0,
                     probe_batch=4)
    moved = jax.tree.map(lambda a: a + 0.5, x0)  # a quadratic: the same Hessian everywhere
    with count_compilations() as compiled:
        for probes, seed, rtol, point in ((12, 1, None, x0), (21, 2, 0.05, moved), (30, 3, None, x0)):
            res = hessian_spectrum(f, point, top_k=1, trace=True, trace_method="hutch++", num_probes=probes,
                                   seed=seed, trace_rtol=rtol, probe_batch=4)
            assert res.info["hvp"] == "linearize"  # a new point is linearized by the compiled programs
            assert abs(res.trace - lam.sum()) <= 4 * res.trace_stderr + 1e-6 * abs(lam.sum())
    assert not compiled, compiled


def test_a_first_call_compiles_only_the_hvp_programs_and_the_lanczos_kernels(count_compilations):
    """Flattening, input checks, start vectors, probes and basis set-up are host work: a first call
    on a new problem compiles f's HVP programs and the Lanczos kernels, and none of the small eager
    programs (jnp.asarray, concatenate, PRNG samplers, ...) that once took most of a first call on
    a small problem, again for every new size."""
    n = 1357  # no other test uses this size: every kernel compiles here
    lam = spectrum_with_gap("indefinite", n, seed=30)
    f, x0, apply_q = householder_quadratic(lam, {"a": (1000,), "b": (7, 51)}, seed=31)
    with count_compilations() as names:
        res = hessian_spectrum(f, x0, top_k=3, trace=True, density=True, eigenvectors=True, lanczos_steps=12,
                               max_restarts=60, num_probes=12, density_runs=4, density_steps=20,
                               probe_batch=4, seed=3)
    kernels = {"jit(grad_flat)", "jit(_extend_core)", "jit(_restart_basis)", "jit(_fresh_direction_core)"}
    assert "jit(grad_flat)" in names and "jit(_extend_core)" in names
    assert set(names) <= kernels, sorted(set(names) - kernels)
    np.testing.assert_allclose(res.eigenvalues, [100.0, 90.0, 80.0], rtol=1e-4)
    assert res.info["lanczos_restarts"] > 0  # the restart kernel ran too
    v = flat(res.eigenvectors[0], ["a", "b"])
    exact = apply_q(lam * apply_q(v, transpose=True))
    assert np.linalg.norm(exact - 100.0 * v) <= 1e-3 * 100.0


def test_hvps_are_traced_at_the_requested_precision():
    """The HVP programs trace f under jax.default_matmul_precision(precision): true float32 by
    default (TF32 HVPs on a GPU would blur a 1e-3 eigenvalue), cached per precision."""
    seen = []
    A = jnp.asarray(np.diag(np.arange(1.0, 601.0)), jnp.float32)

    def f(x):
        seen.append(jax.config.jax_default_matmul_precision)
        return 0.5 * x @ (A @ x)

    x0 = jnp.ones(600)
    for precision, traced in (("highest", True), ("default", True), ("highest", False)):
        seen.clear()
        res = hessian_spectrum(f, x0, top_k=1, trace=False, method="lanczos", precision=precision)
        np.testing.assert_allclose(res.eigenvalues[0], 600.0, rtol=1e-4)
        # None: the input check's evaluation of f(x0), outside the HVP programs
        assert set(seen) <= {precision, None} and (precision in seen) == traced, (precision, seen)


def _mlp_loss(seed=0):
    """Cross-entropy of a one-hidden-layer tanh MLP on fixed data: a non-quadratic f of 930 weights."""
    rng = np.random.default_rng(seed)
    X = jnp.asarray(rng.standard_normal((64, 20)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 64))

    def f(p):
        logits = jnp.tanh(X @ p["w1"] + p["b1"]) @ p["w2"]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])

    x0 = {"w1": jnp.asarray(rng.standard_normal((20, 30)) / 4, jnp.float32), "b1": jnp.zeros(30),
          "w2": jnp.asarray(rng.standard_normal((30, 10)) / 5, jnp.float32)}
    return f, x0


def test_linearized_and_recomputed_hvps_give_the_same_spectrum():
    """hvp="linearize" stores f's forward/backward values at x0 and applies only the tangent pass;
    it must be the same operator as recomputing everything (same probes: same numbers), and "auto"
    stores them for a small f."""
    f, x0 = _mlp_loss()
    kw = dict(top_k=3, trace=True, density=True, method="lanczos", num_probes=24, density_runs=4,
              density_steps=30, probe_batch=4, seed=5)
    lin = hessian_spectrum(f, x0, hvp="linearize", **kw)
    rec = hessian_spectrum(f, x0, hvp="recompute", **kw)
    assert (lin.info["hvp"], rec.info["hvp"]) == ("linearize", "recompute")
    # it stores at least the 64×30 hidden activations and the gradient; nothing when recomputing
    assert lin.info["hvp_stored_bytes"] >= 4 * (64 * 30 + 930) and rec.info["hvp_stored_bytes"] is None
    assert lin.hvp_counts == rec.hvp_counts
    np.testing.assert_allclose(lin.eigenvalues, rec.eigenvalues, rtol=1e-4)
    assert lin.trace == pytest.approx(rec.trace, rel=1e-4)
    np.testing.assert_allclose(lin.density[1], rec.density[1], rtol=1e-3, atol=1e-3 * rec.density[1].max())
    # both against the dense Hessian of the same function
    flat_x0, unravel = jax.flatten_util.ravel_pytree(x0)
    H = np.asarray(jax.hessian(lambda u: f(unravel(u)))(flat_x0), np.float64)
    np.testing.assert_allclose(lin.eigenvalues, np.sort(np.linalg.eigvalsh(H))[::-1][:3], rtol=1e-3)
    assert hessian_spectrum(f, x0, top_k=1, trace=False).info["hvp"] == "linearize"  # small: auto stores
    # over the budget "auto" recomputes: test_linearize_budget_grows_with_a_large_accelerator


def test_linearize_budget_grows_with_a_large_accelerator(monkeypatch):
    """CPU: the fixed budget; an accelerator: a quarter of its free memory when that is larger; a
    backend without statistics (None or raising): the fixed budget."""
    cpu = jax.devices("cpu")[0]
    assert spectrum.linearize_budget(cpu) == spectrum.LINEARIZE_MAX_BYTES
    if jax.default_backend() == "cpu":
        assert spectrum.linearize_budget() == spectrum.LINEARIZE_MAX_BYTES

    class Device:
        platform = "gpu"

        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            if isinstance(self.stats, Exception):
                raise self.stats
            return self.stats

    gib = 1024**3
    assert spectrum.linearize_budget(Device({"bytes_limit": 140 * gib, "bytes_in_use": 20 * gib})) == 30 * gib
    assert spectrum.linearize_budget(Device({"bytes_limit": 6 * gib, "bytes_in_use": 2 * gib})) == 2 * gib
    assert spectrum.linearize_budget(Device(None)) == spectrum.LINEARIZE_MAX_BYTES
    assert spectrum.linearize_budget(Device(RuntimeError("no stats"))) == spectrum.LINEARIZE_MAX_BYTES
    # hessian_spectrum's "auto" asks it
    f, x0 = _mlp_loss()
    monkeypatch.setattr(spectrum, "linearize_budget", lambda device=None: 0)
    assert hessian_spectrum(f, x0, top_k=1, trace=False).info["hvp"] == "recompute"


def _point(flat_x, shapes):
    """The dict pytree of `shapes` (in f's key order) holding the flat vector `flat_x`."""
    out, i = {}, 0
    for k, s in shapes.items():
        size = int(np.prod(s))
        out[k] = jnp.asarray(flat_x[i:i + size].reshape(s), jnp.float32)
        i += size
    return out


def test_gradient_start_finds_the_top_eigenvalue_in_fewer_hvps_and_never_misses_it():
    n, shapes = 3000, {"w": (50, 40), "b": (1000,)}
    rng = np.random.default_rng(40)
    lam = np.concatenate([[100.0, 95.0], rng.uniform(0.1, 90.0, n - 2)])  # λ₁ = lam[0], λ₂ = lam[1]
    f, _, apply_q = householder_quadratic(lam, shapes, seed=41)
    kw = dict(top_k=1, trace=False, tol=1e-3, tol_on="eigenvalue", seed=2)

    # ∇f(x0) = A x0 mostly along the top eigenvector (as at a trained network's minimum)
    coords = 0.02 * rng.standard_normal(n)
    coords[0] = 1.0
    x0 = _point(apply_q(coords), shapes)
    random = hessian_spectrum(f, x0, start="random", **kw)
    gradient = hessian_spectrum(f, x0, start="gradient", **kw)
    assert gradient.info["start"] == "gradient" and random.info["start"] == "random"
    print(f"top eigenvalue to 1e-3: {random.n_hvp} HVPs from a random start, {gradient.n_hvp} from the gradient")
    assert gradient.n_hvp < random.n_hvp
    for res in (random, gradient):
        assert abs(res.eigenvalues[0] - 100.0) <= 1e-3 * 100.0

    # ∇f(x0) exactly orthogonal to the top eigenvector: the start's random part still finds it
    coords = np.zeros(n)
    coords[1] = 1.0
    orthogonal = hessian_spectrum(f, _point(apply_q(coords), shapes), start="gradient",
                                  **{**kw, "tol_on": "residual", "tol": 1e-6})
    assert orthogonal.info["start"] == "gradient"
    np.testing.assert_allclose(orthogonal.eigenvalues, [100.0], rtol=1e-5)

    # a zero gradient falls back to a random start; "auto" starts at random for the smallest
    zero = hessian_spectrum(f, _point(np.zeros(n), shapes), start="gradient", **kw)
    assert zero.info["start"].startswith("random") and abs(zero.eigenvalues[0] - 100.0) <= 0.1
    assert hessian_spectrum(f, x0, which="smallest", lanczos_steps=60, max_restarts=0, **{**kw, "tol": 1.0}
                            ).info["start"] == "random"
    assert hessian_spectrum(f, x0, **kw).info["start"] == "gradient"  # "auto" for the largest
    with pytest.raises(ValueError, match="unknown start 'ones'"):
        hessian_spectrum(f, x0, start="ones", **kw)


def test_a_partial_is_compiled_once_for_all_its_data(count_compilations):
    """A jax.tree_util.Partial's bound arrays are data: a second Partial of the same function with
    other data compiles nothing. The data sit on a mesh (as a ClipLoss's calibration set does), whose
    type the programs' outputs carry; the point, the Lanczos bases and the trace probes go there
    too, so the first step's inputs have the later steps' types and no program compiles twice."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    n = 613
    rng = np.random.default_rng(3)
    mesh = Mesh(np.array(jax.devices()), ("data",))

    def matrix(seed):
        a = np.random.default_rng(seed).standard_normal((n, n)) / np.sqrt(n)
        return (a + a.T) / 2

    @jax.jit
    def energy(a, shift, x):  # ½ xᵀAx + Σ cos(x + shift): H = A − diag(cos(x + shift))
        return 0.5 * x @ (a @ x) + jnp.sum(jnp.cos(x + shift))

    x0 = rng.standard_normal(n).astype(np.float32)
    results = []
    with count_compilations() as compiled:
        for seed in (0, 1):
            a, shift = matrix(seed), np.float32(0.1 * seed)
            where = NamedSharding(mesh, PartitionSpec())
            f = jax.tree_util.Partial(energy, jax.device_put(a.astype(np.float32), where), shift)
            res = hessian_spectrum(f, x0, top_k=3, method="lanczos", tol=1e-6, trace=True, num_probes=300,
                                   density=True, density_runs=2, density_steps=40, seed=0,  # Lanczos' basis shape
                                   probe_batch=1)  # in blocks the vmapped tangent program compiles too
            hessian = a - np.diag(np.cos(x0.astype(np.float64) + shift))
            np.testing.assert_allclose(res.eigenvalues, np.linalg.eigvalsh(hessian)[::-1][:3], rtol=1e-4)
            assert abs(res.trace - np.trace(hessian)) <= 4 * res.trace_stderr
            results.append(dict(compiled))
            compiled.clear()
    first, second = results
    # The gradient twice (jax.linearize: the point's forward and backward pass, then the tangent
    # program), every other program once.
    assert first.pop("jit(grad_flat)") == 2 and first and max(first.values()) == 1, first
    assert second == {}, second


def test_clip_loss_spectra_at_other_bit_widths_compile_nothing(tiny_net, digits, count_compilations):
    """hessian_spectrum(loss, α) differentiates loss.alpha_loss(), the program every ClipLoss of
    one network and site layout shares: a second ClipLoss, at other bit widths, compiles
    nothing, and its dense spectrum is that of loss.hessian."""
    import landscape as ls

    loss4 = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    loss2 = ls.ClipLoss(tiny_net, digits.calib, w_bits=2, a_bits=3, bias_correction=True)
    a4, a2 = loss4.init("max"), np.asarray(loss2.init("mse"))
    f = loss2.alpha_loss()
    assert float(f(a2)) == pytest.approx(float(loss2(a2)), rel=1e-6)
    assert float(f(a2)) != pytest.approx(float(loss4.alpha_loss()(a2)), rel=1e-3)  # the widths are bound
    assert np.isinf(float(f(-a2))) and np.isinf(float(f(np.full_like(a2, np.nan))))
    np.testing.assert_allclose(jax.grad(f)(a2), loss2.grad(a2), rtol=1e-5, atol=1e-7)
    hessian_spectrum(loss4, a4, top_k=2)
    H = np.asarray(loss2.hessian(a2), np.float64)
    with count_compilations() as compiled:
        res = hessian_spectrum(loss2, a2, top_k=2)
    assert res.method == "dense" and not compiled, compiled
    top = np.sort(np.linalg.eigvalsh(H))[::-1][:2]
    np.testing.assert_allclose(res.eigenvalues, top, rtol=1e-4, atol=1e-6 * np.abs(top).max())


def test_a_clip_loss_spectrum_compiles_each_program_once(tiny_net, digits, count_compilations):
    """A ClipLoss's calibration set is placed on a mesh: hessian_spectrum finds that placement
    among the data bound to its alpha_loss and builds its vectors there, so Lanczos and the
    trace compile the tangent program once (per-channel α: n > 40, Lanczos with restarts), and
    probes in blocks (the accelerator default) compile only its vmapped form."""
    import landscape as ls

    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, per_channel=True)
    alpha = loss.init("max")
    kw = dict(top_k=2, method="lanczos", trace=True, num_probes=6)
    with count_compilations() as compiled:
        res = hessian_spectrum(loss, alpha, probe_batch=1, **kw)
    assert res.info["hvp"] == "linearize" and res.dim == loss.n > 40
    assert compiled.pop("jit(grad_flat)") == 2 and max(compiled.values(), default=1) == 1, compiled
    with count_compilations() as compiled:
        blocks = hessian_spectrum(loss, alpha, probe_batch=4, **kw)
    assert compiled == {"jit(grad_flat)": 1}, compiled
    np.testing.assert_allclose(blocks.eigenvalues, res.eigenvalues, rtol=1e-6)
    dense = hessian_spectrum(loss, alpha, top_k=2, method="dense", trace=False)
    np.testing.assert_allclose(res.eigenvalues, dense.eigenvalues, rtol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_points_run_lanczos_in_float32(dtype):
    """A float16 basis stopped at its floor, 100 ε · λ_max = 10 % of λ_max, and reported wrong
    eigenvalues as converged; a bfloat16 start vector was upcast and the HVP refused it."""
    rng = np.random.default_rng(0)
    curvature = np.r_[10.0, 9.5, 9.0, 8.5, 8.0, rng.uniform(0, 1, 995)]
    d = jnp.asarray(curvature, dtype)
    x0 = jnp.asarray(rng.uniform(-1, 1, 1000), dtype)
    result = hessian_spectrum(lambda x: 0.5 * jnp.sum(d * x * x), x0, top_k=5, trace=False,
                              eigenvectors=True, method="lanczos")
    exact = np.sort(np.asarray(d, np.float64))[::-1][:5]
    np.testing.assert_allclose(result.eigenvalues, exact, rtol=2 * float(jnp.finfo(dtype).eps))
    assert result.eigenvectors[0].dtype == dtype


@pytest.mark.parametrize("method,hvp,start", [("dense", "linearize", "auto"), ("lanczos", "linearize", "random"),
                                              ("lanczos", "recompute", "gradient")])
def test_a_non_finite_f_at_x0_is_an_error_whenever_it_is_evaluated(method, hvp, start):
    """f = Σx² + NaN has the finite Hessian 2I, and went through as eigenvalue 2 with no complaint:
    only non-finite HVPs were caught. f(x0) now comes with the gradient (the linearization's aux
    output, or the gradient program's second output) and is checked and kept in info["value"]."""
    x0 = {"a": jnp.ones(40), "b": jnp.full((3, 5), 0.5)}
    offset = jnp.zeros(())  # closed over: the same function with a finite and a NaN offset

    def f(x, c):
        return jnp.sum(x["a"] ** 2) + jnp.sum(x["b"] ** 2) + c

    ok = hessian_spectrum(jax.tree_util.Partial(f, c=offset + 3.0), x0, method=method, hvp=hvp, start=start,
                          trace=False)
    assert ok.eigenvalues[0] == pytest.approx(2.0, rel=1e-5)
    assert ok.info["value"] == pytest.approx(40 + 15 * 0.25 + 3.0, rel=1e-6)
    for bad in (jnp.nan, jnp.inf):
        with pytest.raises(ValueError, match=r"f\(x0\) = (nan|inf) is not finite"):
            hessian_spectrum(jax.tree_util.Partial(f, c=offset + bad), x0, method=method, hvp=hvp, start=start,
                             trace=False)


def test_a_non_finite_weighted_mean_over_batches_is_an_error():
    """With batches the checked value is Σ_b w_b f(x0, batch_b): one NaN batch makes it NaN."""
    f = lambda x, batch: jnp.mean((batch @ x) ** 2)
    rows = np.random.default_rng(0).standard_normal((6, 30)).astype(np.float32)
    x0 = jnp.ones(30)
    good = hessian_spectrum(f, x0, batches=[rows[:3], rows[3:]], trace=False, hvp="linearize")
    assert good.info["value"] == pytest.approx(float(np.mean((rows @ np.ones(30)) ** 2)), rel=1e-5)
    bad = rows.copy()
    bad[4, 7] = np.nan
    with pytest.raises(ValueError, match=r"f\(x0, batch\) \(the batches' weighted mean\) = nan is not finite"):
        hessian_spectrum(f, x0, batches=[bad[:3], bad[3:]], trace=False, hvp="linearize")


def test_a_loss_without_curvature_is_warned_about():
    """An argmax-based loss has zero derivatives: the spectrum came back as zeros, and Lanczos'
    only warning was about a repeated eigenvalue."""
    w = jnp.linspace(-1.0, 1.0, 6)

    def accuracy(x):
        return jnp.mean((jnp.argmax(x[:, None] * w[None], axis=0) == 2).astype(jnp.float32))

    for method in ("dense", "lanczos"):
        with warnings.catch_warnings():
            # Lanczos also (rightly) reports 0 found twice; pytest.warns would pass that one on to the log
            warnings.filterwarnings("ignore", r"Lanczos found the eigenvalue 0 2 times", RuntimeWarning)
            with pytest.warns(RuntimeWarning, match=r"every eigenvalue found is exactly 0 and so is the trace: f may "
                                                    r"not depend differentiably on x0"):
                spec = hessian_spectrum(accuracy, jnp.ones(4), top_k=2, method=method, num_probes=6)
        assert not np.any(spec.eigenvalues) and spec.trace == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a loss with curvature: no such warning
        hessian_spectrum(lambda x: jnp.sum(x ** 2), jnp.ones(4), top_k=2, method="dense")


def test_repr_prints_small_residuals_in_scientific_notation():
    """A 1.7e-4 residual beside a 1.7e-8 error estimate (a converged Lanczos pair of a resnet8
    weight Hessian) had read "residuals: [0.]" at a fixed two-decimal precision."""
    res = HessianSpectrum(eigenvalues=np.array([4.169085, 2.5]), eigenvectors=None,
                          residuals=np.array([1.6857e-4, 0.0]), errors=np.array([1.687e-8, 3.1e-2]),
                          converged=np.array([True, False]), trace=None, trace_stderr=None,
                          trace_per_leaf=None, trace_per_leaf_stderr=None, density=None, density_nodes=None,
                          method="lanczos", which="largest", dim=77754, n_hvp=6, hvp_counts={"lanczos": 6})
    text = repr(res)
    assert "residuals: [1.69e-04, 0.00e+00]  errors: [1.69e-08, 3.10e-02]  (converged 1/2)" in text, text
