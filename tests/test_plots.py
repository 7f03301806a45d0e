"""landscape.plots draws the expected artists on synthetic data, headless, and saves atomically."""

from __future__ import annotations

import dataclasses
import os

import jax.flatten_util
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure

from landscape import plots
from landscape.spectrum import hessian_spectrum
from landscape.surfaces import Surface


def _coupled_hessian(n=5, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    return A @ A.T + n * np.eye(n) - 2.0 * np.diag(rng.uniform(0, 1, n))


def _bowl_surface(num=21):
    x = np.linspace(0.5, 1.5, num)
    y = np.linspace(1.0, 3.0, num + 4)  # deliberately not square: z is (len(y), len(x))
    gx, gy = np.meshgrid(x, y)
    z = 1.0 + (gx - 1.0) ** 2 + 0.5 * (gy - 2.0) ** 2 + 0.3 * (gx - 1.0) * (gy - 2.0)
    return Surface(x=x, y=y, z=z, sites=(3, 7), center=np.array([1.0, 2.0]))


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_backend_is_untouched_and_figures_are_not_global():
    import matplotlib.pyplot as plt

    backend, open_figures = matplotlib.get_backend(), plt.get_fignums()
    ax = plots.hessian_heatmap(np.eye(3))
    fig = plots.bit_curves([2, 4], {"m": [1.0, 2.0]})
    assert isinstance(ax.figure, Figure) and isinstance(fig, Figure)
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == open_figures  # nothing registered with pyplot


def test_hessian_heatmap_annotates_every_cell_with_its_value():
    n = 5
    H = _coupled_hessian(n)
    labels = [f"s{i}" for i in range(n)]
    ax = plots.hessian_heatmap(H, labels=labels, fmt=".3g", title="STE")
    texts = _texts(ax)
    assert len(texts) == n * n
    # Row-major, one text per cell, printing the cell's value.
    assert texts == [format(v, ".3g") for v in H.ravel()]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    (im,) = ax.images
    lo, hi = im.get_clim()
    assert lo == pytest.approx(-hi) and hi == pytest.approx(np.abs(H).max())  # centred at 0
    assert ax.get_title() == "STE"
    assert len(ax.figure.axes) == 2  # the heat map and its colour bar


def test_hessian_heatmap_text_colour_follows_cell_darkness():
    H = np.array([[10.0, 0.0], [0.0, -10.0]])
    ax = plots.hessian_heatmap(H)
    colours = [t.get_color() for t in ax.texts]
    # Saturated ends of RdBu_r are dark (white text); the centre is light (black text).
    assert colours == ["white", "black", "black", "white"]


def test_hessian_heatmap_options_and_errors():
    ax = plots.hessian_heatmap(np.eye(4), annotate=False, colorbar=False, vmax=3.0)
    assert len(ax.texts) == 0 and len(ax.figure.axes) == 1
    assert ax.images[0].get_clim() == (-3.0, 3.0)
    with pytest.raises(ValueError, match="square"):
        plots.hessian_heatmap(np.ones((2, 3)))
    with pytest.raises(ValueError, match="labels"):
        plots.hessian_heatmap(np.eye(3), labels=["a", "b"])
    with pytest.raises(ValueError, match="vmax"):
        plots.hessian_heatmap(np.eye(3), vmax=-1.0)


def test_coupling_heatmap_values_are_normalised():
    H = np.array([[4.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [0.0, 0.5, 9.0]])
    ax = plots.coupling_heatmap(H, fmt=".4f")
    expected = np.abs(H) / np.sqrt(np.outer(np.diag(H), np.diag(H)))
    assert _texts(ax) == [format(v, ".4f") for v in expected.ravel()]
    ax = plots.coupling_heatmap(H, variant="min", fmt=".4f")
    d = np.diag(H)
    expected = np.abs(H) / np.minimum(d[:, None], d[None, :])
    assert _texts(ax) == [format(v, ".4f") for v in expected.ravel()]
    assert ax.images[0].get_clim() == (0.0, 1.0)
    with pytest.raises(ValueError, match="variant"):
        plots.coupling_heatmap(H, variant="max")


def test_coupling_heatmap_zero_diagonal_shows_a_dash():
    H = np.array([[0.0, 1.0], [1.0, 2.0]])
    ax = plots.coupling_heatmap(H)
    assert _texts(ax).count("–") == 3  # the zero diagonal entry and the two pairs that use it


def test_compare_hessians_two_panels():
    n = 4
    H_ste = _coupled_hessian(n, seed=1)
    H_fd = 100.0 * _coupled_hessian(n, seed=2)
    fig = plots.compare_hessians(H_ste, H_fd, labels=list("abcd"))
    heat = [ax for ax in fig.axes if ax.images]
    assert len(heat) == 2
    assert [len(ax.texts) for ax in heat] == [n * n, n * n]
    assert heat[0].images[0].get_clim()[1] == pytest.approx(np.abs(H_ste).max())
    assert heat[1].images[0].get_clim()[1] == pytest.approx(np.abs(H_fd).max())
    fig = plots.compare_hessians(H_ste, H_fd, shared_scale=True)
    heat = [ax for ax in fig.axes if ax.images]
    assert heat[0].images[0].get_clim() == heat[1].images[0].get_clim()
    fig = plots.compare_hessians(H_ste, H_fd, normalized=True)
    heat = [ax for ax in fig.axes if ax.images]
    assert all(ax.texts[0].get_text() == "1.00" for ax in heat)  # the diagonal of a coupling map
    with pytest.raises(ValueError, match="same shape"):
        plots.compare_hessians(np.eye(2), np.eye(3))
    # a shared scale over the finite cells, as each panel's own (an FD Hessian may hold inf)
    H_inf = H_fd.copy()
    H_inf[0, 1] = np.inf
    fig = plots.compare_hessians(H_ste, H_inf, shared_scale=True)
    heat = [ax for ax in fig.axes if ax.images]
    assert heat[0].images[0].get_clim()[1] == pytest.approx(np.abs(H_fd[np.isfinite(H_inf)]).max())


def test_surface_contour_levels_and_marked_points():
    surf = _bowl_surface()
    points = {"L2": (0.8, 1.5), "ACIQ": (1.3, 2.6), "minimum": (1.0, 2.0)}
    ax = plots.surface_contour(surf, points=points, levels=12)
    sets = [c for c in ax.collections if isinstance(c, ContourSet)]
    assert len(sets) == 2  # filled levels and the lines over them
    filled = sets[0]
    assert len(filled.levels) == 12
    assert filled.levels[0] == pytest.approx(surf.z.min())
    assert filled.levels[-1] == pytest.approx(surf.z.max())
    marked = {line.get_label(): line.get_xydata()[0] for line in ax.lines}
    assert set(marked) == set(points)
    for label, xy in points.items():
        np.testing.assert_allclose(marked[label], xy)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(points)
    assert ax.get_xlabel() == "α[3]" and ax.get_ylabel() == "α[7]"


def test_surface_contour_log_levels_and_infinite_cells():
    surf = _bowl_surface()
    z = surf.z.copy()
    z[0, :] = np.inf  # α ≤ 0 rows of a ClipLoss surface
    surf = Surface(surf.x, surf.y, z, surf.sites, surf.center)
    ax = plots.surface_contour(surf, levels=8, log=True, lines=False, labels=("a", "b"))
    (filled,) = [c for c in ax.collections if isinstance(c, ContourSet)]
    ratios = filled.levels[1:] / filled.levels[:-1]
    np.testing.assert_allclose(ratios, ratios[0])  # geometric spacing
    assert ax.get_xlabel() == "a"
    negative = Surface(surf.x, surf.y, surf.z - 10.0, surf.sites, surf.center)
    with pytest.raises(ValueError, match="positive"):
        plots.surface_contour(negative, log=True)
    with pytest.raises(ValueError, match="finite"):
        plots.surface_contour(surf, points={"bad": (np.nan, 1.0)})
    with pytest.raises(ValueError, match="shape"):
        plots.surface_contour(Surface(surf.x, surf.y, surf.z.T, surf.sites, surf.center))


def test_surface_3d_points_sit_on_the_surface():
    surf = _bowl_surface()
    points = {"start": (surf.x[4], surf.y[6]), "minimum": (1.0, 2.0)}
    ax = plots.surface_3d(surf, points=points)
    assert ax.name == "3d"
    assert len(ax.collections) >= 1  # the Poly3DCollection of plot_surface
    marked = {line.get_label(): line for line in ax.lines}
    assert set(marked) == set(points)
    # A grid point is drawn at exactly its grid height.
    xs, ys, zs = marked["start"].get_data_3d()
    assert zs[0] == pytest.approx(surf.z[6, 4])
    assert ax.get_zlabel() == "loss"
    fig = Figure()
    flat = fig.add_subplot()
    with pytest.raises(ValueError, match="3-D"):
        plots.surface_3d(surf, ax=flat)


def _quadratic_spectrum(n, scale, seed):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = scale * np.concatenate([rng.uniform(0.0, 1.0, n - 1), [5.0]])
    A = jnp.asarray((Q * eig) @ Q.T, jnp.float32)
    f = lambda v: 0.5 * v @ (A @ v)
    return hessian_spectrum(f, jnp.zeros(n), top_k=1, density=True, density_grid=300), eig


def test_spectral_density_one_and_several():
    spec, eig = _quadratic_spectrum(24, 1.0, seed=0)
    ax = plots.spectral_density(spec)
    assert ax.get_yscale() == "log"
    (curve,) = [line for line in ax.lines if line.get_linestyle() == "-"]
    np.testing.assert_allclose(curve.get_xdata(), spec.density[0])
    assert np.all(curve.get_ydata() > 0)  # the log floor keeps every point drawable
    (top,) = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert top.get_xdata()[0] == pytest.approx(eig.max(), rel=1e-4)
    other, _ = _quadratic_spectrum(24, 2.0, seed=1)
    ax = plots.spectral_density({"8 bit": spec, "4 bit": other}, log=False, mark_top=False)
    assert ax.get_yscale() == "linear"
    assert [line.get_label() for line in ax.lines] == ["8 bit", "4 bit"]
    no_density = hessian_spectrum(lambda v: jnp.sum(v**2), jnp.ones(3), density=False)
    with pytest.raises(ValueError, match="density=True"):
        plots.spectral_density(no_density)
    grid, values = spec.density
    broken = dataclasses.replace(spec, density=(grid, np.where(np.arange(values.size) == 7, np.nan, values)))
    for log in (True, False):  # one NaN made every log-floored point NaN, then matplotlib failed at savefig
        with pytest.raises(ValueError, match="'broken' has a non-finite density .*: 1 of 300 values"):
            plots.spectral_density({"broken": broken}, log=log)


def test_bit_curves_panels_and_series():
    bits = [8, 2, 4, 3]  # unsorted on purpose: curves are drawn in bit order
    metrics = {
        "accuracy": {"LAPQ": [0.9, 0.3, 0.85, 0.7], "MSE": [0.9, 0.1, 0.8, 0.5]},
        "offdiag ratio": [0.05, 0.6, 0.3, 0.45],
        "condition number": [3.0, 900.0, 40.0, 120.0],
    }
    fig = plots.bit_curves(bits, metrics, logy=["condition number"], ncols=2, title="resnet20")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 3 and len(fig.axes) == 4  # 2 x 2 grid, the spare panel hidden
    assert [ax.get_title() for ax in visible] == list(metrics)
    acc, ratio, cond = visible
    assert [line.get_label() for line in acc.lines] == ["LAPQ", "MSE"]
    assert len(ratio.lines) == 1
    np.testing.assert_array_equal(ratio.lines[0].get_xdata(), [2, 3, 4, 8])
    np.testing.assert_allclose(ratio.lines[0].get_ydata(), [0.6, 0.45, 0.3, 0.05])
    assert cond.get_yscale() == "log" and acc.get_yscale() == "linear"
    assert fig.get_suptitle() == "resnet20"
    with pytest.raises(ValueError, match="shape"):
        plots.bit_curves(bits, {"x": [1.0, 2.0]})
    with pytest.raises(ValueError, match="unknown metrics"):
        plots.bit_curves(bits, {"x": [1, 2, 3, 4]}, logy=["y"])
    with pytest.warns(UserWarning, match=r"metric 'FD trace', series 'A' has values <= 0 on a log axis, which are "
                                         r"not drawn: \[-2.19, 0.0\]"):
        plots.bit_curves(bits, {"FD trace": {"A": [-2.19, 0.0169, 0.0, 1.0]}}, logy=["FD trace"])
    # names are keys, not their strings: 1 and "1" are two panels, and logy finds the int
    fig = plots.bit_curves(bits, {1: [1.0, 2.0, 3.0, 4.0], "1": [5.0, 6.0, 7.0, 8.0]}, logy=[1])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 2 and [ax.get_yscale() for ax in visible] == ["log", "linear"]


def test_functions_draw_on_given_axes():
    fig = Figure()
    a1, a2, a3 = fig.subplots(1, 3)
    assert plots.hessian_heatmap(np.eye(2), ax=a1) is a1
    assert plots.coupling_heatmap(np.eye(2), ax=a2) is a2
    assert plots.surface_contour(_bowl_surface(), ax=a3, colorbar=False) is a3
    fig2 = Figure()
    b = fig2.subplots(1, 2)
    assert plots.compare_hessians(np.eye(2), np.eye(2), axes=b) is fig2
    fig3 = Figure()
    c = fig3.subplots(1, 2)
    assert plots.bit_curves([2, 4], {"m": [1, 2], "k": [3, 4]}, axes=c) is fig3


def test_save_figure_writes_png_and_pdf_atomically(tmp_path):
    ax = plots.hessian_heatmap(_coupled_hessian(3))
    engine = ax.figure.get_layout_engine()
    target = tmp_path / "nested" / "hessian.png"
    written = plots.save_figure(ax.figure, target, dpi=50)
    # the PDF reuses the PNG's layout; the figure keeps its layout engine for later drawing
    assert engine is not None and ax.figure.get_layout_engine() is engine
    assert written == [tmp_path / "nested" / "hessian.png", tmp_path / "nested" / "hessian.pdf"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written[1].read_bytes()[:5] == b"%PDF-"
    assert sorted(os.listdir(tmp_path / "nested")) == ["hessian.pdf", "hessian.png"]  # no temp files
    # Overwriting replaces in place; a failing render leaves the old file and no temp file behind.
    before = written[0].read_bytes()

    class Broken:
        def savefig(self, *args, **kwargs):
            raise RuntimeError("render failed")

    with pytest.raises(RuntimeError, match="render failed"):
        plots.save_figure(Broken(), target)
    assert written[0].read_bytes() == before
    assert sorted(os.listdir(tmp_path / "nested")) == ["hessian.pdf", "hessian.png"]
    with pytest.raises(ValueError, match="unsupported formats"):
        plots.save_figure(ax.figure, tmp_path / "x", formats=("jpg",))


def test_site_labels_from_a_loss_like_object():
    class Site:
        def __init__(self, name, kind):
            self.name, self.kind = name, kind

    class LossLike:
        sites = (Site("layer1_0/conv1", "weight"), Site("layer1_0/relu1", "activation"))

        def site_slices(self):
            return {"layer1_0/conv1": slice(0, 2), "layer1_0/relu1": slice(2, 3)}

    assert plots.site_labels(LossLike()) == ["W layer1_0/conv1[0]", "W layer1_0/conv1[1]",
                                             "A layer1_0/relu1"]


def _block_quadratic(scale):
    """f over {"net": {"a": {"kernel", "bias"}, "b": {"kernel"}}} with a known diagonal-block trace."""
    rng = np.random.default_rng(40)
    M = rng.standard_normal((26, 26))
    A = scale * (M @ M.T) / 26
    A_j = jnp.asarray(A, jnp.float32)
    x0 = {"net": {"a": {"bias": jnp.zeros(2), "kernel": jnp.zeros((3, 4))}, "b": {"kernel": jnp.zeros(12)}}}
    flat = lambda x: jax.flatten_util.ravel_pytree(x)[0]
    f = lambda x: 0.5 * flat(x) @ A_j @ flat(x)
    d = np.diag(A)  # ravel order: a/bias (2), a/kernel (12), b/kernel (12)
    return hessian_spectrum(f, x0, top_k=1, method="dense"), {"a/bias": d[:2].sum(), "a/kernel": d[2:14].sum(),
                                                               "b/kernel": d[14:].sum()}


def test_leaf_traces_bars_are_the_per_entry_block_traces():
    spec, exact = _block_quadratic(1.0)
    other, _ = _block_quadratic(3.0)
    ax = plots.leaf_traces({"fp32": spec, "w4": other})
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a/bias", "a/kernel", "b/kernel"]  # "net" shared
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "tr H_bb / size"
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 2
    fp32, w4 = bars
    heights = [bar.get_height() for bar in fp32.patches]
    per_entry = [exact["a/bias"] / 2, exact["a/kernel"] / 12, exact["b/kernel"] / 12]
    np.testing.assert_allclose(heights, per_entry, rtol=1e-5)
    np.testing.assert_allclose([bar.get_height() for bar in w4.patches], 3 * np.asarray(heights), rtol=1e-5)
    assert [c.get_label() for c in bars] == ["fp32", "w4"]
    ax = plots.leaf_traces(spec, per_entry=False, select="kernel", log=False)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a/kernel", "b/kernel"]
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    np.testing.assert_allclose([bar.get_height() for bar in bars.patches],
                               [exact["a/kernel"], exact["b/kernel"]], rtol=1e-5)


def test_leaf_traces_rejects_what_it_cannot_draw():
    spec, _ = _block_quadratic(1.0)
    with pytest.raises(ValueError, match="no per-leaf traces"):
        plots.leaf_traces(hessian_spectrum(lambda v: jnp.sum(v**2), jnp.ones(3), top_k=1, trace=False))
    with pytest.raises(ValueError, match="different leaves"):
        plots.leaf_traces({"a": spec, "b": hessian_spectrum(lambda v: jnp.sum(v**2), jnp.ones(3), top_k=1)})
    with pytest.raises(ValueError, match="no leaf path contains 'conv'"):
        plots.leaf_traces(spec, select="conv")
    with pytest.raises(ValueError, match="empty"):
        plots.leaf_traces({})
