"""Loss surfaces and lines (clip space and weight space) against closed-form values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
from landscape.surfaces import loss_line, loss_surface, random_direction, weight_surface


class _Quadratic:
    """The ClipLoss interface on L(α) = ½(α−c)ᵀA(α−c) + 1, with a numpy reference."""

    def __init__(self, A, c):
        self.A, self.c, self.n = np.asarray(A, np.float64), np.asarray(c, np.float64), len(c)
        self.sites = [ls.sites.Site(f"s{i}", "activation", (1,), i) for i in range(self.n)]

    def site_slices(self):
        return {s.name: slice(i, i + 1) for i, s in enumerate(self.sites)}

    def batch(self, alphas):
        d = jnp.asarray(alphas, jnp.float32) - self.c
        return 0.5 * jnp.einsum("ki,ij,kj->k", d, jnp.asarray(self.A, jnp.float32), d) + 1.0

    def reference(self, a):
        d = np.asarray(a, np.float64) - self.c
        return 0.5 * d @ self.A @ d + 1.0


_A = np.array([[2.0, 0.5, 0.1], [0.5, 1.0, -0.3], [0.1, -0.3, 3.0]])


def test_surface_axes_are_relative_to_each_sites_own_alpha():
    q = _Quadratic(_A, c=np.array([1.0, 0.4, 2.0]))
    alpha = np.array([2.0, 0.5, 3.0])
    surf = loss_surface(q, alpha, sites=("s2", 0), span=(0.5, 1.5), num=5)
    np.testing.assert_allclose(surf.x, np.linspace(1.5, 4.5, 5))  # site 2: [0.5, 1.5] · 3
    np.testing.assert_allclose(surf.y, np.linspace(1.0, 3.0, 5))  # site 0: [0.5, 1.5] · 2
    assert surf.sites == (2, 0)
    np.testing.assert_array_equal(surf.center, alpha)
    for a in range(5):
        for b in range(5):
            point = alpha.copy()
            point[2], point[0] = surf.x[b], surf.y[a]  # z[a, b] = L(α_i = x[b], α_j = y[a]), site 1 fixed
            assert surf.z[a, b] == pytest.approx(q.reference(point), rel=1e-5)


def test_surface_on_explicit_axes_of_different_lengths():
    q = _Quadratic(_A, c=np.array([1.0, 0.4, 2.0]))
    alpha = np.array([2.0, 0.5, 3.0])
    x, y = np.array([0.5, 1.0, 4.0]), np.array([0.1, 0.2, 0.3, 0.9])
    surf = loss_surface(q, alpha, sites=(0, 1), x=x, y=y)
    assert surf.z.shape == (4, 3)
    np.testing.assert_array_equal(surf.x, x)
    np.testing.assert_array_equal(surf.y, y)
    want = [[q.reference([xb, ya, 3.0]) for xb in x] for ya in y]
    np.testing.assert_allclose(surf.z, want, rtol=1e-5)


def test_line_steps_along_the_direction_from_the_start():
    q = _Quadratic(_A, c=np.array([1.0, 0.4, 2.0]))
    start, direction = np.array([1.0, 2.0, 0.5]), np.array([0.5, -1.0, 2.0])
    line = loss_line(q, start, direction, t=np.array([-1.0, 0.0, 0.25, 2.0]))
    want_points = start + line.t[:, None] * direction
    np.testing.assert_allclose(line.points, want_points)
    np.testing.assert_allclose(line.values, [q.reference(p) for p in want_points], rtol=1e-5)
    default = loss_line(q, start, direction)
    np.testing.assert_allclose(default.t, np.linspace(-0.2, 0.5, 71))  # increasing, from -0.2 to 0.5
    np.testing.assert_allclose(default.values, [q.reference(start + t * direction) for t in default.t], rtol=1e-5)


def test_direction_norms_none_layer_and_filter_rescale_one_gaussian_draw():
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.ones(4),
              "c": jnp.asarray(5.0 * rng.normal(size=(3, 4)), jnp.float32),  # same shape as "a"
              "big": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)}
    none = {k: np.asarray(v) for k, v in random_direction(params, 3, norm="none").items()}
    scaled = random_direction(jax.tree.map(lambda w: 10.0 * w, params), 3, norm="none")
    for k in params:  # raw: the weights' scale does not enter
        np.testing.assert_array_equal(np.asarray(scaled[k]), none[k])
    assert abs(none["big"].mean()) < 0.05 and none["big"].std() == pytest.approx(1.0, abs=0.05)  # N(0, 1)
    assert not np.allclose(none["a"], none["c"])  # each leaf its own draw
    assert not np.any(none["b"])
    layer = random_direction(params, 3, norm="layer")
    filt = random_direction(params, 3)
    for k in ("a", "c", "big"):
        w = np.asarray(params[k])
        want = none[k] * np.linalg.norm(w) / np.linalg.norm(none[k])  # the same draw, rescaled as a whole
        np.testing.assert_allclose(np.asarray(layer[k]), want, rtol=1e-5)
        want = none[k] * np.linalg.norm(w, axis=0) / np.linalg.norm(none[k], axis=0)  # per output column
        np.testing.assert_allclose(np.asarray(filt[k]), want, rtol=1e-5)
    other = random_direction(params, 4, norm="none")
    assert not np.allclose(np.asarray(other["a"]), none["a"])  # another seed, another direction


def test_weight_line_and_surface_on_a_quadratic_function():
    w = jnp.array([[1.0, -2.0], [0.5, 3.0]])
    d1 = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    d2 = {"w": jnp.array([[0.0, 1.0], [-1.0, 0.0]])}

    def f(p):
        return jnp.sum(p["w"] ** 2) + p["w"][0, 0] * p["w"][1, 1]

    def ref(a, b):
        v = np.asarray(w) + a * np.asarray(d1["w"]) + b * np.asarray(d2["w"])
        return float(np.sum(v**2) + v[0, 0] * v[1, 1])

    line = weight_surface(f, {"w": w}, [d1], chunk=4)  # default span (-1, 1), 21 points
    np.testing.assert_allclose(line.t, np.linspace(-1.0, 1.0, 21))
    np.testing.assert_allclose(line.points, line.t[:, None])
    np.testing.assert_allclose(line.values, [ref(a, 0.0) for a in line.t], rtol=1e-5)
    surf = weight_surface(f, {"w": w}, [d1, d2], span=(-0.5, 1.0), num=4, chunk=3)
    np.testing.assert_allclose(surf.x, np.linspace(-0.5, 1.0, 4))
    want = [[ref(a, b) for a in surf.x] for b in surf.y]  # z[i, j]: x[j] along d1, y[i] along d2
    np.testing.assert_allclose(surf.z, want, rtol=1e-5)


def test_weight_surface_pads_the_grid_to_whole_chunks(count_compilations):
    """Every call gets exactly ``chunk`` grid points (the tail padded): one compiled program per
    surface, whatever the grid size."""
    w = {"w": jnp.arange(6.0).reshape(2, 3)}
    d = {"w": jnp.ones((2, 3))}

    def f(p):  # a function of its own: nothing compiled for it yet
        return jnp.sum(jnp.cos(p["w"]))

    with count_compilations() as compiled:
        surf = weight_surface(f, w, [d, d], span=(-1.0, 1.0), num=5, chunk=4)  # 25 points: 6 chunks + 1
    assert sum(compiled.values()) <= 1, compiled  # 0 when a persistent cache already holds it
    c = np.linspace(-1.0, 1.0, 5)
    want = [[np.sum(np.cos(np.arange(6.0) + a + b)) for a in c] for b in c]
    np.testing.assert_allclose(surf.z, want, rtol=1e-5)
