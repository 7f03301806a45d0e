import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
from landscape.clip_hessian import clip_hessian, fd_points
from landscape.surfaces import loss_line, loss_surface, random_direction, weight_surface


class Quadratic:
    """A smooth stand-in with the ClipLoss interface: L(α) = ½(α−c)ᵀA(α−c) + 1."""

    def __init__(self, A, c):
        self.A, self.c, self.n = np.asarray(A), np.asarray(c), len(c)
        self.sites = [ls.sites.Site(f"s{i}", "activation", (1,), i) for i in range(self.n)]

    def _f(self, a):
        d = a - self.c
        return 0.5 * jnp.einsum("...i,ij,...j->...", d, self.A, d) + 1.0

    def __call__(self, a):
        return self._f(jnp.asarray(a, jnp.float32))

    def batch(self, alphas):
        return self._f(jnp.asarray(alphas, jnp.float32))

    def hessian(self, a):
        return jnp.asarray(self.A, jnp.float32)

    def site_slices(self):
        return {s.name: slice(i, i + 1) for i, s in enumerate(self.sites)}


def _spd(n, seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, n))
    return m @ m.T / n + np.eye(n)


def test_fd_equals_ste_on_a_smooth_quadratic():
    A = _spd(5, 0)
    q = Quadratic(A, c=np.full(5, 2.0))
    alpha = np.linspace(1.0, 3.0, 5)
    fd = clip_hessian(q, alpha, method="fd", step=0.01)
    ste = clip_hessian(q, alpha, method="ste")
    np.testing.assert_allclose(fd, A, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(ste, A, rtol=1e-6)
    np.testing.assert_array_equal(fd, fd.T)


def test_fd_names_sites_whose_second_differences_are_rounding_noise():
    """α spanning 1e-3 … 10: at step 0.05 the small sites' second differences are a few float32
    roundings of L, and their FD curvature came out 1848× off, silently; now a warning names them.
    At well-scaled α nothing is said."""
    A = _spd(4, 1)
    q = Quadratic(A, c=np.full(4, 2.0))
    # Site 1's second difference (true value ~1e-6 of L ~ 60) is non-zero noise on CPU; an H200 left
    # it unnamed, presumably rounded to exactly 0, which a quantized loss's plateau also gives.
    named = r"\[0, 1\]" if jax.default_backend() == "cpu" else r"\[0(, 1)?\]"
    with pytest.warns(RuntimeWarning, match=rf"second differences of sites {named} are within float32 rounding"):
        clip_hessian(q, np.array([1e-3, 1e-2, 1.0, 10.0]), method="fd", step=0.05)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        clip_hessian(q, np.linspace(1.0, 3.0, 4), method="fd", step=0.05)


def test_fd_names_site_pairs_whose_mixed_differences_are_rounding_noise():
    """The off-diagonal entries, which the separability measures read, were never checked: with a
    constant offset of 20 on a smooth quadratic, H_01 = 0.01 came out 0.0119, silently. Now the
    pair is named; with an offset of 1 the coupling is resolved and nothing is said."""
    import warnings

    A = np.array([[2.0, 0.01], [0.01, 2.0]])
    with pytest.warns(RuntimeWarning, match=r"mixed differences of site pairs \[\(0, 1\)\] are within float32"):
        clip_hessian(_Offset(A, 20.0), np.array([1.0, 1.0]), method="fd")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        h = clip_hessian(_Offset(A, 1.0), np.array([1.0, 1.0]), method="fd")
    assert h[0, 1] == pytest.approx(0.01, rel=0.1)


class _Offset:
    """½ (α − 1)ᵀ A (α − 1) + offset: only the float32 rounding of the losses grows with the offset."""

    def __init__(self, A, offset):
        self.A, self.offset, self.n = jnp.asarray(A, jnp.float32), offset, A.shape[0]

    def batch(self, alphas):
        d = jnp.asarray(alphas, jnp.float32) - 1.0
        return 0.5 * jnp.einsum("...i,ij,...j->...", d, self.A, d) + self.offset


def test_fd_point_layout():
    pts, h = fd_points(np.array([1.0, 2.0, 4.0]), 0.1)
    assert pts.shape == (3 * 3 + 3 + 1, 3)
    np.testing.assert_allclose(h, [0.1, 0.2, 0.4])
    np.testing.assert_allclose(pts[0], [1, 2, 4])
    # the last row is α − h_1 e_1 − h_2 e_2 (pairs in triu order: (0,1), (0,2), (1,2))
    np.testing.assert_allclose(pts[-1], [1.0, 1.8, 3.6])


def test_clip_hessians_of_a_network_are_symmetric(tiny_net, digits):
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=3)
    alpha = np.asarray(loss.init("mse"))
    ste = clip_hessian(loss, alpha, method="ste")
    fd = clip_hessian(loss, alpha, method="fd")
    for h in (ste, fd):
        assert h.shape == (loss.n, loss.n) and np.all(np.isfinite(h))
        np.testing.assert_array_equal(h, h.T)
    assert np.trace(ste) != 0
    # Symmetric by construction whatever the scale: the STE values are the HVP columns (a
    # symmetrisation h + hᵀ without the ½ doubled them).
    eye = np.eye(loss.n, dtype=np.float32)
    columns = np.stack([np.asarray(loss.hvp(alpha, eye[i]), np.float64) for i in range(loss.n)], axis=1)
    np.testing.assert_allclose(ste, columns, rtol=1e-3, atol=1e-4 * np.abs(ste).max())


@pytest.mark.parametrize("kw,match", [({"method": "x"}, "method='x'"),
                                      ({"method": "fd", "step": 2.0}, "step=2.0"),
                                      ({"method": "ste", "step": 0.1}, "method='fd' only")])
def test_clip_hessian_bad_input(kw, match):
    q = Quadratic(np.eye(2), np.zeros(2))
    with pytest.raises(ValueError, match=match):
        clip_hessian(q, np.ones(2), **kw)
    for bad in ([1.0, -1.0], [1.0, 2e38]):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1e\+38\] everywhere"):
            clip_hessian(q, np.array(bad))


def test_loss_surface_and_line_on_quadratic():
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    q = Quadratic(A, c=np.array([1.0, 1.0]))
    surf = loss_surface(q, np.array([1.0, 1.0]), sites=(0, "s1"), span=(0.5, 1.5), num=11)
    assert surf.z.shape == (11, 11) and surf.sites == (0, 1)
    gx, gy = np.meshgrid(surf.x, surf.y)
    dx, dy = gx - 1, gy - 1
    expected = 0.5 * (A[0, 0] * dx**2 + 2 * A[0, 1] * dx * dy + A[1, 1] * dy**2) + 1
    np.testing.assert_allclose(surf.z, expected, rtol=1e-5)
    line = loss_line(q, np.array([1.0, 1.0]), np.array([1.0, 1.0]), t=np.linspace(-0.2, 0.5, 8))
    np.testing.assert_allclose(line.values, 0.5 * A.sum() * line.t**2 + 1, rtol=1e-5)
    default = loss_line(q, np.array([1.0, 1.0]), np.array([1.0, 1.0]))
    assert default.t.size == 71 and 0.0 in default.t  # the start itself is on the default line
    assert default.values[np.flatnonzero(default.t == 0.0)[0]] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exactly two"):
        loss_surface(q, np.ones(2), sites=(0,))
    with pytest.raises(ValueError, match=r"sites=\(1, 1\) name site 1 twice"):
        loss_surface(q, np.ones(2), sites=(1, 1))
    with pytest.raises(ValueError, match="unknown site"):
        loss_surface(q, np.ones(2), sites=(0, "zz"))
    for bad in (np.array([1.0, -1.0]), np.array([np.nan, 1.0]), np.ones(3)):
        with pytest.raises(ValueError, match=r"alpha must be a \(2,\) vector of finite α > 0"):
            loss_surface(q, bad, sites=(0, 1), num=3)
    with pytest.raises(ValueError, match=r"x must be a non-empty 1-D array of finite α values, got shape \(0,\)"):
        loss_surface(q, np.ones(2), sites=(0, 1), x=[])
    with pytest.raises(ValueError, match="num=1 must be an integer >= 2"):
        loss_line(q, np.ones(2), np.ones(2), num=1)
    for t in ([], [[0.0, 1.0]], [0.0, np.nan]):
        with pytest.raises(ValueError, match="t must be a non-empty 1-D array of finite steps"):
            loss_line(q, np.ones(2), np.ones(2), t=np.asarray(t))


def test_surface_and_line_arguments_are_checked_by_value():
    q = Quadratic(np.eye(2), c=np.ones(2))
    surf = loss_surface(q, np.ones(2), sites=(0, 1), num=np.int64(3), span=np.array([0.5, 1.5]))
    assert surf.z.shape == (3, 3)  # numpy integers and array spans are fine
    assert loss_line(q, np.ones(2), np.ones(2), num=np.int64(3)).values.shape == (3,)
    for sites in (0, "s0", (False, True)):
        with pytest.raises(ValueError, match="two sites|site index"):
            loss_surface(q, np.ones(2), sites=sites, num=3)
    for span in (1.0, (0.5, 1.0, 1.5), (0.5, "1.5"), (1.5, 0.5), (0.5, np.inf)):
        with pytest.raises(ValueError, match=r"must be \(lo, hi\) with 0 < lo < hi"):
            loss_surface(q, np.ones(2), sites=(0, 1), span=span, num=3)
    for start, direction, name in ((np.array([np.nan, 1.0]), np.ones(2), "start"),
                                   (np.ones(2), np.array([1.0, np.inf]), "direction")):
        with pytest.raises(ValueError, match=f"{name} has 1 NaN/inf entries"):
            loss_line(q, start, direction, num=3)


def test_half_precision_directions_keep_their_norm():
    """float16's sum of squares overflows past ~65k entries: the scale was 0, a flat surface."""
    w = (0.02 * jax.random.normal(jax.random.key(0), (512, 256))).astype(jnp.float16)
    big = (0.02 * jax.random.normal(jax.random.key(1), (3, 3, 8192, 4))).astype(jnp.float16)
    layer = random_direction({"k": w}, 0, norm="layer")["k"]
    assert layer.dtype == jnp.float16
    np.testing.assert_allclose(float(jnp.linalg.norm(layer.astype(jnp.float32))),
                               float(jnp.linalg.norm(w.astype(jnp.float32))), rtol=1e-2)
    filt = random_direction({"k": big}, 0)["k"].astype(jnp.float32)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(filt).reshape(-1, 4), axis=0),
                               np.linalg.norm(np.asarray(big, np.float32).reshape(-1, 4), axis=0), rtol=1e-2)
    with pytest.raises(ValueError, match=r"params\['i'\] has dtype int32; a direction needs floating-point"):
        random_direction({"i": jnp.ones((2, 2), jnp.int32), "k": w})


def test_filter_normalised_direction_and_weight_surface(tiny_net, digits):
    params = tiny_net.variables["params"]
    d = random_direction(params, seed=0)
    k, dk = np.asarray(params["conv0_1"]["kernel"]), np.asarray(d["conv0_1"]["kernel"])
    np.testing.assert_allclose(np.linalg.norm(dk.reshape(-1, dk.shape[-1]), axis=0),
                               np.linalg.norm(k.reshape(-1, k.shape[-1]), axis=0), rtol=1e-4)
    assert not np.any(np.asarray(d["bn0_0"]["scale"])) and not np.any(np.asarray(d["fc"]["bias"]))
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    f = loss.weight_loss()  # FP32 weight-space loss
    line = weight_surface(f, params, [d], span=(-0.5, 0.5), num=5)
    mid = float(f(params))
    assert line.values[2] == pytest.approx(mid, rel=1e-5)
    assert line.values.min() >= mid - 1e-3  # a trained minimum along a random line
    fq = loss.weight_loss(loss.init("max"))
    assert float(fq(params)) == pytest.approx(float(loss(loss.init("max"))), rel=1e-5)
    for kw, match in (({"num": 0}, "num=0 must be an integer >= 2"),
                      ({"chunk": 0}, "chunk=0 must be a positive integer"),
                      ({"span": (1.0, -1.0)}, r"span=\(1.0, -1.0\) must be \(lo, hi\)"),
                      ({"span": 5}, r"span=5 must be \(lo, hi\)"), ({"span": ("a", 1)}, r"span=\('a', 1\)")):
        with pytest.raises(ValueError, match=match):
            weight_surface(f, params, [d], **kw)
    with pytest.raises(ValueError, match="seed='a' must be an integer >= 0"):
        random_direction(params, seed="a")
    # a direction not wrapped in a list (its top-level keys were taken as directions)
    with pytest.raises(ValueError, match=r"directions must be a list of one \(line\) or two"):
        weight_surface(f, params, d, num=3)
    with pytest.raises(ValueError, match=r"directions\[0\] is not shaped like params"):
        weight_surface(f, params, [d["conv0_1"]], num=3)
    with pytest.raises(ValueError, match=r"f must return a scalar, got output of shape \(2,\)"):
        weight_surface(lambda p: jnp.stack([f(p), f(p)]), params, [d], num=3)
    # Any pytree: its matrices get directions (were zero unless named "kernel"), vectors do not.
    other = random_direction({"dense": {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}, "list": [jnp.ones((2, 2))]})
    assert np.all(np.asarray(other["dense"]["w"]) != 0) and np.all(np.asarray(other["list"][0]) != 0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(other["dense"]["w"]), axis=0), np.sqrt(3), rtol=1e-5)
    assert not np.any(np.asarray(other["dense"]["b"]))
    with pytest.raises(ValueError, match="no leaf of two or more dimensions"):
        random_direction({"b": jnp.ones(4)})
    # the same seed, the same direction, whatever the global threefry layout
    for layout in (True, False):
        with jax.threefry_partitionable(layout):
            again = random_direction(params, seed=0)
        np.testing.assert_array_equal(again["conv0_1"]["kernel"], d["conv0_1"]["kernel"])


def test_weight_surfaces_of_other_directions_and_alphas_compile_nothing(tiny_net, digits, count_compilations):
    """weight_surface's program takes the point, the directions and a Partial's bound data as
    arguments: a second surface (other α, directions, span) reuses it, with the right values."""
    params = tiny_net.variables["params"]
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    alpha = np.asarray(loss.init("max"))
    d1, d2 = random_direction(params, seed=1), random_direction(params, seed=2)
    weight_surface(loss.weight_loss(alpha), params, [d1, d2], span=(-0.2, 0.2), num=3, chunk=4)
    f = loss.weight_loss(1.5 * alpha)
    with count_compilations() as compiled:
        surface = weight_surface(f, params, [d2, d1], span=(-0.1, 0.3), num=3, chunk=4)
    assert not compiled, compiled
    # z[i, j]: coordinate x[j] along the first direction (d2), y[i] along the second (d1)
    c = np.linspace(-0.1, 0.3, 3)
    for i, j in ((0, 2), (2, 1)):
        a, b = c[j], c[i]
        point = jax.tree.map(lambda p, u, v, a=a, b=b: p + a * u + b * v, params, d2, d1)
        assert surface.z[i, j] == pytest.approx(float(f(point)), rel=1e-5)


def test_fd_step_may_be_a_numpy_scalar():
    """step=np.float32(0.02) (from a numpy grid) is a number; a bool is not."""
    q = Quadratic(_spd(3, 0), np.zeros(3))
    alpha = np.array([0.5, 1.0, 2.0])
    h = clip_hessian(q, alpha, method="fd", step=np.float32(0.02))
    np.testing.assert_allclose(h, clip_hessian(q, alpha, method="fd", step=0.02), rtol=1e-6)
    with pytest.raises(ValueError, match=r"step=True must be a relative step in \(0, 1\)"):
        clip_hessian(q, alpha, method="fd", step=True)


class _Staircase:
    """A piecewise-constant loss with the ``.n`` / ``.batch`` interface of the FD method,
    L(α) = Σ_i floor(50 α_i)² / 2500, recording the points it is evaluated at."""

    def __init__(self, n):
        self.n, self.points = n, []

    def batch(self, alphas):
        alphas = np.asarray(alphas)
        self.points.append(alphas.copy())
        return np.sum(np.floor(50 * alphas.astype(np.float64)) ** 2, axis=1) / 2500


def test_default_fd_step_is_two_percent_of_alpha():
    """The default FD step is 2 % of each α (DEFAULT_STEP, as documented): the loss is evaluated at
    α ± 0.02·α_i e_i, the result is that of step=0.02, and on a staircase whose treads are 0.02
    wide it sees the rounding events a step of 0.002 (flat between them) misses."""
    alpha = np.array([1.01, 0.51])
    loss = _Staircase(2)
    default = clip_hessian(loss, alpha, method="fd")
    assert len(loss.points) == 1
    points = loss.points[0].astype(np.float64)
    np.testing.assert_array_equal(loss.points[0], fd_points(alpha, 0.02)[0].astype(np.float32))
    # α ± h_i e_i with h_i = 0.02·α_i (to float32 rounding of the points)
    np.testing.assert_allclose(points[1:3] - alpha, np.diag(0.02 * alpha), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(alpha - points[3:5], np.diag(0.02 * alpha), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(default, clip_hessian(loss, alpha, method="fd", step=0.02))
    # floor(50α) steps 49 → 50 → 51 (and 24 → 25 → 26) across α ± h: 2 / 2500 / h² on the diagonal
    np.testing.assert_allclose(np.diag(default), 2 / 2500 / (0.02 * alpha) ** 2, rtol=1e-9)
    np.testing.assert_array_equal(clip_hessian(loss, alpha, method="fd", step=0.002), np.zeros((2, 2)))


class _Steep:
    """L(α) = 1000 (α_0 − 1) + 0.005 (α_0 − 1)² + ½ (α_1 − 1)², in float32: L(1, 1) = 0 exactly, but
    site 0's losses at α ± h are ±20, whose float32 roundings (~2e-6) swamp its true second
    difference 2 · 0.005 · h² = 4e-6."""

    n = 2

    def batch(self, alphas):
        d = jnp.asarray(alphas, jnp.float32) - 1.0
        return 1000.0 * d[:, 0] + 0.005 * d[:, 0] ** 2 + 0.5 * d[:, 1] ** 2


def test_fd_rounding_noise_is_judged_against_the_losses_at_the_points():
    """The noise floor is a few roundings of the largest loss evaluated, not of L(α) alone: here
    L(α) = 0, and a floor of 8·eps·|L(α)| = 0 let site 0's noise pass as curvature. Site 1 (second
    difference h² = 4e-4, losses ~2e-4) is resolved and not named."""
    import warnings

    with pytest.warns(RuntimeWarning, match=r"second differences of sites \[0\] are within float32 rounding"):
        h = clip_hessian(_Steep(), np.array([1.0, 1.0]), method="fd")
    assert h[1, 1] == pytest.approx(1.0, rel=1e-3)
    # Exactly zero second differences (a flat staircase at a small step) are kept as 0, silently;
    # curvature resolved by many roundings (A_ii h² ~ 1e-4 against losses ~2: ~500 roundings) too.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert not np.any(clip_hessian(_Staircase(2), np.array([1.01, 0.51]), method="fd", step=0.002))
        clip_hessian(Quadratic(_spd(5, 0), c=np.full(5, 2.0)), np.linspace(1.0, 3.0, 5), method="fd", step=0.01)


def test_clip_hessian_refuses_a_wrong_shape_a_whole_step_and_non_finite_losses():
    q = Quadratic(np.eye(2), np.zeros(2))
    with pytest.raises(ValueError, match=r"alpha has shape \(3,\); expected \(2,\)"):
        clip_hessian(q, np.ones(3))
    with pytest.raises(ValueError, match=r"alpha has shape \(1, 2\); expected \(2,\)"):
        clip_hessian(q, np.ones((1, 2)), method="fd")
    with pytest.raises(ValueError, match=r"step=1.0 must be a relative step in \(0, 1\)"):
        clip_hessian(q, np.ones(2), method="fd", step=1.0)  # α − h would be 0

    class Overflow:
        n = 2

        def batch(self, alphas):
            return np.where(np.asarray(alphas)[:, 0] > 1.0, np.inf, 1.0)

    with pytest.raises(FloatingPointError, match="non-finite loss at a finite-difference point"):
        clip_hessian(Overflow(), np.ones(2), method="fd")


def test_ste_hessian_is_symmetrised_whatever_the_loss_returns():
    """clip_hessian returns ½(H + Hᵀ) of ``loss.hessian``, exactly symmetric even for a loss whose
    own Hessian is not (ClipLoss symmetrises its HVP columns; a stand-in need not)."""
    A = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0], [0.5, 0.0, 1.0]])
    q = Quadratic(A, np.zeros(3))
    h = clip_hessian(q, np.ones(3), method="ste")
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(h, 0.5 * (A + A.T), rtol=1e-7)
