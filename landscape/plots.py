"""Figures of the landscape analyzers: Hessian heat maps, loss surfaces, spectra, bit-width curves.

Every function draws on an ``ax`` it is given, or on a new figure it creates, and returns the Axes
(single-panel functions) or the Figure (multi-panel ones); ``ax.figure`` reaches the figure. New
figures are plain :class:`matplotlib.figure.Figure` objects, not pyplot figures: nothing is
registered globally, no display is needed (Agg-safe), and a figure is freed when dropped. Save with
:func:`save_figure`, which writes PNG and PDF atomically.

=====================  ==========================================================================
``hessian_heatmap``    H (n, n) with the value printed in every cell, diverging colours centred at
                       0 (the LAPQ paper's clip-Hessian figure)
``coupling_heatmap``   the normalised coupling |H_ij| / √(|H_ii| |H_jj|) (or / min(|H_ii|, |H_jj|))
``compare_hessians``   STE and FD Hessians side by side (raw or normalised)
``surface_contour``    filled contours of a :class:`~landscape.surfaces.Surface`, marked points
``surface_3d``         the same surface as a 3-D view, marked points lifted onto it
``spectral_density``   one or several Hessian spectral densities (log-y by default)
``leaf_traces``        per-layer Hessian traces (``trace_per_leaf``) as bars with error bars, raw
                       or per entry (HAWQ's average trace), one bar per spectrum in each group
``bit_curves``         metrics against the bit width, one panel per metric
``save_figure``        PNG + PDF, each written to a temporary file and renamed into place
``site_labels``        short tick labels for the α entries of a ClipLoss
=====================  ==========================================================================
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from landscape.atomic import open_atomic

__all__ = [
    "bit_curves",
    "compare_hessians",
    "coupling_heatmap",
    "hessian_heatmap",
    "leaf_traces",
    "save_figure",
    "site_labels",
    "spectral_density",
    "surface_3d",
    "surface_contour",
]

_SAVE_FORMATS = ("png", "pdf", "svg")


# --------------------------------------------------------------------------------------------------
# Shared helpers


def _axes(ax, figsize, projection=None):
    """``ax`` itself, or the single Axes of a new constrained-layout Figure."""
    if ax is not None:
        if projection == "3d" and getattr(ax, "name", "") != "3d":
            raise ValueError("ax must be a 3-D Axes (fig.add_subplot(projection='3d')), got a 2-D one")
        return ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig.add_subplot(projection=projection)


def _square(H, name="H"):
    H = np.asarray(H, dtype=np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1] or H.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square (n, n) matrix, got shape {H.shape}")
    return H


def _labels(labels, n):
    if labels is None:
        return [str(i) for i in range(n)]
    labels = [str(s) for s in labels]
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries; the matrix has n = {n} rows")
    return labels


def _text_colour(rgba):
    # Perceived luminance (ITU-R BT.601): dark cells get white text, light cells black.
    r, g, b = rgba[:3]
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def _matrix(ax, M, labels, *, cmap, norm, annotate, fmt, fontsize, colorbar, cbar_label, title):
    """Draw M as an image with per-cell text; shared by the two heat maps."""
    n = M.shape[0]
    shown = np.ma.masked_invalid(M)
    im = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest")
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.tick_params(length=0)
    if annotate:
        cmap_obj = im.get_cmap()
        size = fontsize if fontsize is not None else float(np.clip(90.0 / n, 4.0, 9.0))
        for i in range(n):
            for j in range(n):
                v = M[i, j]
                colour = _text_colour(cmap_obj(norm(v))) if np.isfinite(v) else "black"
                ax.text(j, i, format(v, fmt) if np.isfinite(v) else "–", ha="center", va="center",
                        fontsize=size, color=colour)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, shrink=0.8)
        if cbar_label:
            cb.set_label(cbar_label)
    if title:
        ax.set_title(title)
    return im


def site_labels(loss) -> list[str]:
    """Tick labels for the n entries of α of a ClipLoss: "W conv1", "A layer1_0/relu1", ….

    One label per α entry (a per-channel site gives "name[k]" for each channel). ``loss`` needs
    ``.sites`` (each with ``.name`` and ``.kind``) and ``.site_slices()``.
    """
    slices = loss.site_slices()
    out = []
    for site in loss.sites:
        prefix = "W" if site.kind == "weight" else "A"
        sl = slices[site.name]
        size = sl.stop - sl.start
        if size == 1:
            out.append(f"{prefix} {site.name}")
        else:
            out.extend(f"{prefix} {site.name}[{k}]" for k in range(size))
    return out


# --------------------------------------------------------------------------------------------------
# Hessian heat maps


def hessian_heatmap(H, *, labels: Sequence[str] | None = None, ax=None, annotate: bool = True,
                    fmt: str = ".2g", cmap: str = "RdBu_r", vmax: float | None = None,
                    fontsize: float | None = None, colorbar: bool = True, title: str | None = None):
    """Heat map of a Hessian H (n, n) over quantization sites, values printed in the cells.

    Colours are diverging and centred at 0 on a symmetric scale [−vmax, vmax] (default
    vmax = max |H_ij|), so positive and negative curvature read alike.

    Args:
        H: (n, n) matrix, e.g. ``clip_hessian(loss, alpha)``.
        labels: n tick labels for both axes (default "0" … "n−1"; see :func:`site_labels`).
        ax: Axes to draw on (default: a new figure).
        annotate: print each value (n² texts); turn off for large n.
        fmt: format spec of the printed values.
        cmap: a diverging colormap name.
        vmax: half-width of the colour scale.
        fontsize: tick and cell font size (default shrinks with n).
        colorbar, title: decorations.

    Returns:
        The Axes.
    """
    H = _square(H)
    finite = np.abs(H[np.isfinite(H)])
    if vmax is None:
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    if not (np.isfinite(vmax) and vmax > 0):
        raise ValueError(f"vmax must be a positive number, got {vmax!r}")
    ax = _axes(ax, figsize=(0.45 * H.shape[0] + 2.5, 0.45 * H.shape[0] + 1.5))
    norm = mcolors.Normalize(vmin=-vmax, vmax=vmax)
    _matrix(ax, H, _labels(labels, H.shape[0]), cmap=cmap, norm=norm, annotate=annotate, fmt=fmt,
            fontsize=fontsize, colorbar=colorbar, cbar_label="H_ij", title=title)
    return ax


def coupling_heatmap(H, *, variant: str = "sqrt", labels: Sequence[str] | None = None, ax=None,
                     annotate: bool = True, fmt: str = ".2f", cmap: str = "magma_r",
                     fontsize: float | None = None, colorbar: bool = True, title: str | None = None):
    """Heat map of the normalised coupling of H: scale-free, 1 on the diagonal.

        variant="sqrt":  C_ij = |H_ij| / √(|H_ii| |H_jj|)
        variant="min":   C_ij = |H_ij| / min(|H_ii|, |H_jj|)   (the LAPQ reference's heat maps)

    (:func:`landscape.separability` computes both.) Cells with a zero denominator show "–".
    Colours run over [0, max(1, max C)].

    Args:
        H: (n, n) symmetric matrix.
        variant: "sqrt" or "min".
        labels, ax, annotate, fmt, cmap, fontsize, colorbar, title: as :func:`hessian_heatmap`.

    Returns:
        The Axes.
    """
    from landscape.separability import separability

    if variant not in ("sqrt", "min"):
        raise ValueError(f"variant={variant!r} is not allowed; use 'sqrt' or 'min'")
    H = _square(H)
    rep = separability(H)
    C = rep.coupling if variant == "sqrt" else rep.coupling_min
    finite = C[np.isfinite(C)]
    top = max(1.0, float(finite.max())) if finite.size else 1.0
    ax = _axes(ax, figsize=(0.45 * H.shape[0] + 2.5, 0.45 * H.shape[0] + 1.5))
    norm = mcolors.Normalize(vmin=0.0, vmax=top)
    label = "|H_ij| / sqrt(|H_ii H_jj|)" if variant == "sqrt" else "|H_ij| / min(|H_ii|, |H_jj|)"
    _matrix(ax, C, _labels(labels, H.shape[0]), cmap=cmap, norm=norm, annotate=annotate, fmt=fmt,
            fontsize=fontsize, colorbar=colorbar, cbar_label=label, title=title)
    return ax


def compare_hessians(H_ste, H_fd, *, labels: Sequence[str] | None = None, normalized: bool = False,
                     shared_scale: bool = False, titles=("STE surrogate (autodiff)",
                                                         "true loss (finite differences)"),
                     annotate: bool = True, fmt: str | None = None, axes=None):
    """The STE and the FD Hessian side by side (raw heat maps, or coupling maps if ``normalized``).

    Args:
        H_ste, H_fd: (n, n) Hessians of the same sites, e.g. ``clip_hessian(loss, α, method="ste")``
            and ``method="fd"``.
        labels: n site labels.
        normalized: draw :func:`coupling_heatmap` (|H_ij| / √(|H_ii H_jj|)) instead of the raw values.
        shared_scale: one colour scale for both raw panels (vmax = the larger max |H_ij|); by
            default each panel has its own, since the two curvatures can differ by orders of magnitude.
        titles: the two panel titles.
        annotate, fmt: as :func:`hessian_heatmap` (fmt defaults to ".2g" raw, ".2f" normalised).
        axes: two Axes to draw on (default: a new 1 × 2 figure).

    Returns:
        The Figure.
    """
    H_ste, H_fd = _square(H_ste, "H_ste"), _square(H_fd, "H_fd")
    if H_ste.shape != H_fd.shape:
        raise ValueError(f"H_ste {H_ste.shape} and H_fd {H_fd.shape} must have the same shape")
    if len(titles) != 2:
        raise ValueError(f"titles must hold two strings, got {titles!r}")
    if axes is None:
        n = H_ste.shape[0]
        side = 0.45 * n + 2.5
        fig = Figure(figsize=(2 * side, side - 1.0), layout="constrained")
        axes = fig.subplots(1, 2)
    elif len(axes) != 2:
        raise ValueError(f"axes must hold two Axes, got {len(axes)}")
    if normalized:
        for ax, H, title in zip(axes, (H_ste, H_fd), titles, strict=True):
            coupling_heatmap(H, labels=labels, ax=ax, annotate=annotate, fmt=fmt or ".2f", title=title)
    else:
        vmax = None
        if shared_scale:
            # finite entries only, as hessian_heatmap's own scale (an inf or NaN cell stays blank)
            both = np.abs(np.concatenate([np.ravel(H_ste), np.ravel(H_fd)]).astype(np.float64))
            both = both[np.isfinite(both)]
            vmax = float(both.max()) if both.size and both.max() > 0 else 1.0
        for ax, H, title in zip(axes, (H_ste, H_fd), titles, strict=True):
            hessian_heatmap(H, labels=labels, ax=ax, annotate=annotate, fmt=fmt or ".2g", vmax=vmax,
                            title=title)
    return axes[0].figure


# --------------------------------------------------------------------------------------------------
# Loss surfaces


def _check_surface(surface):
    for attr in ("x", "y", "z"):
        if not hasattr(surface, attr):
            raise ValueError(f"surface must have .x, .y and .z (a landscape.surfaces.Surface); "
                             f"{type(surface).__name__} lacks .{attr}")
    x, y, z = (np.asarray(getattr(surface, a), np.float64) for a in ("x", "y", "z"))
    if x.ndim != 1 or y.ndim != 1 or z.shape != (y.size, x.size):
        raise ValueError(f"surface.z must have shape (len(y), len(x)) = ({y.size}, {x.size}), got {z.shape}")
    if x.size < 2 or y.size < 2:
        raise ValueError(f"a surface needs at least 2 points per axis, got {x.size} x {y.size}")
    return x, y, z


def _check_points(points):
    if points is None:
        return {}
    if not isinstance(points, Mapping):
        raise ValueError(f"points must be a dict label -> (x, y), got {type(points).__name__}")
    out = {}
    for label, xy in points.items():
        xy = np.asarray(xy, np.float64)
        if xy.shape != (2,) or not np.all(np.isfinite(xy)):
            raise ValueError(f"point {label!r} must be a finite (x, y) pair, got {xy.tolist()}")
        out[str(label)] = xy
    return out


def _axis_labels(surface, labels):
    if labels is not None:
        if len(labels) != 2:
            raise ValueError(f"labels must be (x label, y label), got {labels!r}")
        return labels
    sites = getattr(surface, "sites", ("x", "y"))
    fmt = lambda s: f"α[{s}]" if isinstance(s, int | np.integer) else str(s)
    return fmt(sites[0]), fmt(sites[1])


def _levels(z, num, log):
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        raise ValueError("the surface has no finite values to draw")
    lo, hi = float(finite.min()), float(finite.max())
    if hi == lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    if log:
        if lo <= 0:
            raise ValueError(f"log=True needs positive values; the surface's minimum is {lo:.4g}")
        return np.geomspace(lo, hi, num)
    return np.linspace(lo, hi, num)


_MARKERS = ("*", "o", "s", "^", "D", "v", "P", "X")


def surface_contour(surface, *, points: Mapping | None = None, ax=None, levels: int = 20,
                    log: bool = False, lines: bool = True, cmap: str = "viridis",
                    labels: tuple[str, str] | None = None, colorbar: bool = True,
                    title: str | None = None):
    """Filled contour plot of a 2-D loss surface with marked points.

    Args:
        surface: a :class:`landscape.surfaces.Surface` (``z[a, b]`` is the loss at
            (``x[b]``, ``y[a]``)); non-finite values (α ≤ 0 gives +inf) are left blank.
        points: dict label → (x, y) in the surface's coordinates, e.g. ``{"L2": (…), "L3": (…),
            "ACIQ": (…), "minimum": (…)}``; each gets a marker and a legend entry.
        ax: Axes to draw on (default: a new figure).
        levels: number of contour levels, spaced linearly, or geometrically when ``log``.
        log: geometric levels and a log colour scale (positive losses spanning decades).
        lines: also draw thin contour lines over the filled levels.
        cmap, labels (x and y axis labels; default "α[i]", "α[j]" from ``surface.sites``),
        colorbar, title: decorations.

    Returns:
        The Axes (``ax.collections`` holds the contour sets; their ``levels`` are the levels).
    """
    x, y, z = _check_surface(surface)
    pts = _check_points(points)
    if not isinstance(levels, int | np.integer) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
    lev = _levels(z, int(levels), log)
    ax = _axes(ax, figsize=(5.0, 4.0))
    zm = np.ma.masked_invalid(z)
    norm = mcolors.LogNorm(vmin=lev[0], vmax=lev[-1]) if log else None
    filled = ax.contourf(x, y, zm, levels=lev, cmap=cmap, norm=norm)
    if lines:
        ax.contour(x, y, zm, levels=lev, colors="k", linewidths=0.4, alpha=0.5, norm=norm)
    for k, (label, (px, py)) in enumerate(pts.items()):
        ax.plot([px], [py], linestyle="none", marker=_MARKERS[k % len(_MARKERS)], markersize=9,
                markeredgecolor="white", markeredgewidth=0.8, color=f"C{(k + 1) % 10}", label=label)
    if pts:
        ax.legend(fontsize=8, framealpha=0.8)
    xl, yl = _axis_labels(surface, labels)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    if colorbar:
        ax.figure.colorbar(filled, ax=ax, label="loss", format="%.3g")
    if title:
        ax.set_title(title)
    return ax


def _bilinear(x, y, z, px, py):
    """z interpolated at (px, py) on the rectilinear grid (clamped to its edges)."""
    from scipy.interpolate import RegularGridInterpolator

    interp = RegularGridInterpolator((y, x), z, method="linear", bounds_error=False, fill_value=None)
    return float(interp([[np.clip(py, y.min(), y.max()), np.clip(px, x.min(), x.max())]])[0])


def surface_3d(surface, *, points: Mapping | None = None, ax=None, log: bool = False,
               cmap: str = "viridis", labels: tuple[str, str] | None = None, elev: float = 30.0,
               azim: float = -60.0, title: str | None = None):
    """3-D view of a 2-D loss surface with marked points lifted onto it.

    Args:
        surface: a :class:`landscape.surfaces.Surface`; non-finite values are clipped to the largest
            finite value, so a surface with a +inf border still draws.
        points: dict label → (x, y); each is drawn at the surface height there (bilinear
            interpolation of the grid).
        ax: a 3-D Axes (``fig.add_subplot(projection="3d")``) or None for a new figure.
        log: draw log10 of the loss (positive losses spanning decades).
        cmap, labels, title: decorations; elev, azim: the viewing angles in degrees.

    Returns:
        The 3-D Axes.
    """
    x, y, z = _check_surface(surface)
    pts = _check_points(points)
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        raise ValueError("the surface has no finite values to draw")
    z = np.where(np.isfinite(z), z, finite.max())
    if log:
        if finite.min() <= 0:
            raise ValueError(f"log=True needs positive values; the surface's minimum is {finite.min():.4g}")
        z = np.log10(z)
    ax = _axes(ax, figsize=(5.5, 4.5), projection="3d")
    gx, gy = np.meshgrid(x, y)
    ax.plot_surface(gx, gy, z, cmap=cmap, linewidth=0, antialiased=True, alpha=0.9)
    for k, (label, (px, py)) in enumerate(pts.items()):
        pz = _bilinear(x, y, z, px, py)
        ax.plot([px], [py], [pz], linestyle="none", marker=_MARKERS[k % len(_MARKERS)], markersize=8,
                color=f"C{(k + 1) % 10}", markeredgecolor="k", markeredgewidth=0.5, label=label,
                zorder=10)
    if pts:
        ax.legend(fontsize=8)
    xl, yl = _axis_labels(surface, labels)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_zlabel("log10 loss" if log else "loss")
    ax.view_init(elev=elev, azim=azim)
    if title:
        ax.set_title(title)
    return ax


# --------------------------------------------------------------------------------------------------
# Spectra and bit-width curves


def spectral_density(spectra, *, ax=None, log: bool = True, mark_top: bool = True, floor: float = 1e-8,
                     title: str | None = None):
    """Hessian spectral density (SLQ or smoothed exact), one curve per spectrum.

    Args:
        spectra: a :class:`landscape.HessianSpectrum` computed with ``density=True``, or a dict
            label → HessianSpectrum (e.g. one per bit width) drawn on the same axes.
        ax: Axes to draw on (default: a new figure).
        log: log-scaled y; values below ``floor`` · max are raised to it, since a Gaussian-smoothed
            density underflows to 0 far from the nodes.
        mark_top: a dashed vertical line at each spectrum's top eigenvalue.
        title: decoration.

    Returns:
        The Axes (one Line2D per spectrum, labelled).
    """
    items = dict(spectra) if isinstance(spectra, Mapping) else {None: spectra}
    if not items:
        raise ValueError("spectra is empty; pass a HessianSpectrum or a dict label -> HessianSpectrum")
    if not (np.isfinite(floor) and 0 < floor < 1):
        raise ValueError(f"floor must be in (0, 1), got {floor!r}")
    for label, spec in items.items():
        if getattr(spec, "density", None) is None:
            raise ValueError(f"spectrum {label!r} has no density; call hessian_spectrum(..., density=True)")
    ax = _axes(ax, figsize=(5.0, 3.5))
    for k, (label, spec) in enumerate(items.items()):
        grid, values = (np.asarray(a, np.float64) for a in spec.density)
        name = label if label is not None else f"{spec.method}, n = {spec.dim}"
        if not (np.all(np.isfinite(values)) and np.all(np.isfinite(grid))):
            raise ValueError(f"spectrum {name!r} has a non-finite density (grid or values): "
                             f"{int(np.sum(~np.isfinite(values)))} of {values.size} values")
        shown = np.maximum(values, floor * values.max()) if log else values
        ax.plot(grid, shown, color=f"C{k % 10}", lw=1.2, label=str(name))
        if mark_top and len(spec.eigenvalues):
            ax.axvline(float(np.max(spec.eigenvalues)), color=f"C{k % 10}", lw=0.8, ls="--")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def _leaf_label(path: str) -> list[str]:
    """"['params']['conv1']['kernel']" → ["params", "conv1", "kernel"] (keystr's keys, unquoted)."""
    parts = [p.strip("'\"") for p in path.replace("]", "").split("[") if p]
    return [p.lstrip(".") for p in parts] or [path]


def leaf_traces(spectra, *, per_entry: bool = True, select: str | None = None, ax=None,
                log: bool | None = None, title: str | None = None):
    """Per-leaf (per-layer) Hessian traces as grouped bars with ±1 standard-error bars.

    Args:
        spectra: a :class:`landscape.HessianSpectrum` computed with ``trace=True``, or a dict
            label → HessianSpectrum over the same pytree structure (e.g. FP32 and W4A4 weights).
            In place of a spectrum, its ``leaf_traces()`` rows (path, size, trace, stderr) also
            work, e.g. as stored in a JSON file.
        per_entry: divide each block trace tr H_bb by the leaf's size (HAWQ-V2's average trace,
            comparable across layers of different sizes); False plots tr H_bb itself.
        select: keep only leaves whose path contains this string (e.g. "kernel").
        ax: Axes to draw on (default: a new figure, wide enough for the leaves).
        log: log-scaled y; default: when every plotted value is positive.
        title: decoration.

    Returns:
        The Axes (one BarContainer per spectrum, labelled; tick labels are the leaf paths without
        the components every leaf shares).
    """
    items = dict(spectra) if isinstance(spectra, Mapping) else {None: spectra}
    if not items:
        raise ValueError("spectra is empty; pass a HessianSpectrum or a dict label -> HessianSpectrum")
    every = {}
    for label, spec in items.items():
        every[label] = spec.leaf_traces() if hasattr(spec, "leaf_traces") else list(spec or [])
        if not every[label]:
            raise ValueError(f"spectrum {label!r} has no per-leaf traces; call hessian_spectrum(..., trace=True)")
    tables = {label: [r for r in rows if r[1] > 0 and (select is None or select in r[0])]
              for label, rows in every.items()}
    paths = [[r[0] for r in rows] for rows in tables.values()]
    if any(p != paths[0] for p in paths):
        raise ValueError("the spectra have different leaves; compare spectra of the same pytree structure")
    if not paths[0]:
        example = next(iter(every.values()))[0][0]
        raise ValueError(f"no leaf path contains {select!r}; leaf paths look like {example}")
    values = np.array([[r[2] / (r[1] if per_entry else 1) for r in rows] for rows in tables.values()])
    errors = np.array([[r[3] / (r[1] if per_entry else 1) for r in rows] for rows in tables.values()])
    if log is None:
        log = bool(np.all(values > 0))
    parts = [_leaf_label(p) for p in paths[0]]
    shared = 0
    while len(parts) > 1 and all(len(q) > shared + 1 for q in parts) and len({q[shared] for q in parts}) == 1:
        shared += 1
    names = ["/".join(q[shared:]) for q in parts]
    k, m = values.shape
    ax = _axes(ax, figsize=(max(5.0, 0.28 * k * m + 1.5), 3.8))
    width = 0.8 / k
    x = np.arange(m)
    for i, (label, spec) in enumerate(items.items()):
        name = label if label is not None else f"{getattr(spec, 'method', 'trace')}, n = {getattr(spec, 'dim', '?')}"
        ax.bar(x + (i - (k - 1) / 2) * width, values[i], width, yerr=errors[i], color=f"C{i % 10}",
               error_kw=dict(lw=0.7, capsize=1.5), label=str(name))
    if log:
        ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.set_ylabel("tr H_bb / size" if per_entry else "tr H_bb")
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def bit_curves(bits: Sequence[int], metrics: Mapping, *, ncols: int | None = None,
               logy: Sequence[str] = (), axes=None, xlabel: str = "bit width",
               title: str | None = None):
    """Metrics against the bit width, one panel per metric.

    Args:
        bits: (b,) bit widths, the shared x axis (e.g. ``[2, 3, 4, 6, 8]``).
        metrics: dict metric name → values, where values are either (b,) numbers (one curve) or a
            dict series label → (b,) numbers (several curves in the panel, e.g. one per method or
            network). NaN entries leave gaps; values <= 0 in a ``logy`` panel are not drawn
            either, with a warning naming them.
        ncols: panels per row (default: all in one row, at most 4).
        logy: names of the metrics whose panel has a log y axis.
        axes: a sequence of at least len(metrics) Axes to draw on (default: a new figure).
        xlabel, title: decorations (title goes on the figure).

    Returns:
        The Figure.
    """
    bits = np.asarray(bits)
    if bits.ndim != 1 or bits.size == 0:
        raise ValueError(f"bits must be a non-empty 1-D sequence, got shape {bits.shape}")
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError("metrics must be a non-empty dict metric name -> values")
    unknown = sorted(set(logy) - set(metrics))
    if unknown:
        raise ValueError(f"logy names unknown metrics {unknown}; metrics are {list(metrics)}")
    panels = {}
    for name, values in metrics.items():
        series = dict(values) if isinstance(values, Mapping) else {None: values}
        if not series:
            raise ValueError(f"metric {name!r} has no series")
        checked = {}
        for label, v in series.items():
            v = np.asarray(v, np.float64)
            if v.shape != bits.shape:
                where = f"metric {name!r}" + (f", series {label!r}" if label is not None else "")
                raise ValueError(f"{where} has shape {v.shape}; bits has shape {bits.shape}")
            if name in logy and np.any(v[np.isfinite(v)] <= 0):
                where = f"metric {name!r}" + (f", series {label!r}" if label is not None else "")
                warnings.warn(f"{where} has values <= 0 on a log axis, which are not drawn: "
                              f"{[float(x) for x in v[np.isfinite(v) & (v <= 0)]]}", stacklevel=2)
            checked[label] = v
        panels[name] = checked  # keyed by the name itself: two names may print alike
    k = len(panels)
    if axes is None:
        ncols = min(k, 4) if ncols is None else ncols
        if not isinstance(ncols, int | np.integer) or ncols < 1:
            raise ValueError(f"ncols must be a positive integer, got {ncols!r}")
        nrows = -(-k // ncols)
        fig = Figure(figsize=(3.2 * ncols, 2.8 * nrows), layout="constrained")
        grid = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
        for extra in grid[k:]:
            extra.set_visible(False)
        axes = grid[:k]
    else:
        axes = list(axes)
        if len(axes) < k:
            raise ValueError(f"axes holds {len(axes)} Axes; {k} metrics need {k}")
        fig = axes[0].figure
    order = np.argsort(bits, kind="stable")
    for ax, (name, series) in zip(axes, panels.items(), strict=False):
        for s, (label, v) in enumerate(series.items()):
            ax.plot(bits[order], v[order], marker="o", ms=4, color=f"C{s % 10}",
                    label=None if label is None else str(label))
        if any(label is not None for label in series):
            ax.legend(fontsize=7, frameon=False)
        if name in logy:
            ax.set_yscale("log")
        ax.set_xticks(np.unique(bits))
        ax.set_xlabel(xlabel)
        ax.set_title(str(name), fontsize=10)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------------
# Saving


def save_figure(fig, path, *, formats: Sequence[str] = ("png", "pdf"), dpi: int = 200) -> list[Path]:
    """Write ``fig`` as ``path.png`` and ``path.pdf`` (or the given formats), atomically.

    Each file is rendered through :func:`landscape.atomic.open_atomic` (a synced temporary file
    moved into place), so a reader never sees a half-written figure and a failed render leaves any
    previous file intact. A suffix on ``path`` that names a format is dropped ("fig.png" →
    "fig.png" and "fig.pdf"). Parent directories are created.

    Args:
        fig: a matplotlib Figure (``ax.figure`` for the Axes-returning functions).
        path: target path without (or with) a format suffix.
        formats: any of "png", "pdf", "svg".
        dpi: resolution of raster formats.

    Returns:
        The written paths, in the order of ``formats``.
    """
    formats = [formats] if isinstance(formats, str) else list(formats)
    if not formats:
        raise ValueError("formats is empty; pass e.g. ('png', 'pdf')")
    bad = [f for f in formats if f not in _SAVE_FORMATS]
    if bad:
        raise ValueError(f"unsupported formats {bad}; allowed: {', '.join(_SAVE_FORMATS)}")
    path = Path(path)
    if path.suffix.lstrip(".").lower() in _SAVE_FORMATS:
        path = path.with_suffix("")
    written = []
    engine = fig.get_layout_engine() if hasattr(fig, "get_layout_engine") else None
    try:
        for fmt in formats:
            target = path.with_name(f"{path.name}.{fmt}")
            with open_atomic(target, "wb") as fh:
                fig.savefig(fh, format=fmt, dpi=dpi)
            written.append(target)
            if engine is not None and fig.get_layout_engine() is engine:
                # The first format placed every axes; the others reuse that layout (constrained
                # layout measures every text again on each draw, about half of a save's time).
                fig.set_layout_engine("none")
    finally:
        if engine is not None and fig.get_layout_engine() is not engine:
            fig.set_layout_engine(engine)
    return written
