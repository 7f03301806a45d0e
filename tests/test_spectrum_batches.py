"""hessian_spectrum over data batches: H = Σ_b (n_b / N) ∇²f(x, batch_b), against the dense Hessian
of the mean loss over all the data."""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from landscape.spectrum import hessian_spectrum

SIZES = (128, 128, 44)  # unequal: the weights are the batch sizes, not 1/3 each


def _problem(seed=0):
    """A small two-layer logistic model f(params, (X, y)) = mean loss over the batch, its data split
    into batches of SIZES, and the dense Hessian and gradient of the mean loss over all the data."""
    rng = np.random.default_rng(seed)
    N = sum(SIZES)
    X = rng.normal(size=(N, 6)).astype(np.float32)
    y = (rng.random(N) > 0.5).astype(np.float32)

    def f(params, batch):
        xb, yb = batch
        z = jnp.tanh(xb @ params["a"]) @ params["b"]
        return jnp.mean(jax.nn.softplus(z) - yb * z)

    params = {"a": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=5), jnp.float32)}
    cuts = np.cumsum(SIZES)[:-1]
    batches = list(zip(np.split(X, cuts), np.split(y, cuts), strict=True))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    with jax.default_matmul_precision("highest"):
        H = np.asarray(jax.hessian(lambda v: f(unravel(v), (X, y)))(flat), np.float64)
    return f, params, batches, H


@pytest.mark.parametrize("hvp", ["linearize", "recompute"])
def test_batched_hessian_equals_the_full_data_hessian(hvp):
    f, params, batches, H = _problem()
    evals = np.linalg.eigvalsh(H)[::-1]
    dense = hessian_spectrum(f, params, batches=batches, method="dense", top_k=3, hvp=hvp)
    np.testing.assert_allclose(dense.eigenvalues, evals[:3], rtol=1e-5, atol=1e-6 * evals[0])
    assert dense.trace == pytest.approx(np.trace(H), rel=1e-5)
    assert dense.info["batches"] == 3
    lanczos = hessian_spectrum(f, params, batches=batches, method="lanczos", top_k=3, trace=False, tol=1e-7,
                               hvp=hvp)
    np.testing.assert_allclose(lanczos.eigenvalues, evals[:3], rtol=1e-4)
    assert lanczos.info["start"] == "gradient"


def test_batch_weights_are_the_examples_per_batch():
    """One big batch and one small one: the result is the Hessian of the mean over all examples,
    not the average of the two batch Hessians."""
    f, params, batches, H = _problem(seed=1)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda v, b: f(unravel(v), b)))
    with jax.default_matmul_precision("highest"):
        per_batch = [np.asarray(hessian(flat, b), np.float64) for b in batches]
    plain_average = sum(per_batch) / len(per_batch)
    assert np.abs(plain_average - H).max() > 1e-3 * np.abs(H).max()  # the two really differ here
    spec = hessian_spectrum(f, params, batches=batches, method="dense", top_k=1)
    assert spec.eigenvalues[0] == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-5)
    assert abs(spec.eigenvalues[0] - np.linalg.eigvalsh(plain_average)[-1]) > 1e-3 * spec.eigenvalues[0]


def test_linearize_stores_every_batch_and_auto_counts_them_all():
    f, params, batches, _ = _problem()
    one = hessian_spectrum(f, params, batches=batches[:1], method="lanczos", trace=False, hvp="linearize")
    three = hessian_spectrum(f, params, batches=batches, method="lanczos", trace=False, hvp="linearize")
    assert three.info["hvp_stored_bytes"] > 2 * one.info["hvp_stored_bytes"]
    assert hessian_spectrum(f, params, batches=batches, method="lanczos", trace=False, hvp="recompute"
                            ).info["hvp_stored_bytes"] is None


@pytest.mark.parametrize("batches, match", [
    ([], "batches is empty"),
    (5, "must be a sequence of data batches"),
    ([(np.zeros((4, 6)), np.zeros(3))], r"leading \(example\) axis, got leaf shapes \[\(4, 6\), \(3,\)\]"),
    ([(np.zeros((0, 6)), np.zeros(0))], "non-zero leading"),
    ([(np.float32(1.0),)], "leading"),
])
def test_bad_batches_are_named(batches, match):
    f, params, _, _ = _problem()
    with pytest.raises(ValueError, match=match):
        hessian_spectrum(f, params, batches=batches)


def test_f_without_a_batch_argument_is_reported():
    _, params, batches, _ = _problem()
    with pytest.raises(ValueError, match=r"f\(x0, batches\[0\]\) could not be traced"):
        hessian_spectrum(lambda p: jnp.sum(p["a"] ** 2), params, batches=batches)


def test_batched_equals_one_batch_of_all_the_data_for_the_same_seed():
    """Same seed, same random draws: trace (Hutch++), per-leaf traces and the SLQ density from the
    batched operator match those of f on all the data at once, up to float rounding."""
    f, params, batches, _ = _problem(seed=2)
    X = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    kw = dict(method="lanczos", top_k=2, trace=True, density=True, num_probes=12, density_runs=4,
              density_steps=10, probe_batch=4, seed=3)
    batched = hessian_spectrum(f, params, batches=batches, **kw)
    whole = hessian_spectrum(lambda p: f(p, (X, y)), params, **kw)
    np.testing.assert_allclose(batched.eigenvalues, whole.eigenvalues, rtol=1e-4)
    assert batched.trace == pytest.approx(whole.trace, rel=1e-4)
    np.testing.assert_allclose(jax.tree.leaves(batched.trace_per_leaf), jax.tree.leaves(whole.trace_per_leaf),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(batched.density_nodes[0], whole.density_nodes[0], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(batched.density[1], whole.density[1], rtol=1e-3, atol=1e-5 * whole.density[1].max())
