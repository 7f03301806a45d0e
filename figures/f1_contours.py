"""F1 — loss contours over two adjacent activation sites, at 2 and 4 bits.

As in the reference repository's 2-D surface scripts: only two tensors are quantized — the two ReLU outputs
of the first residual block (``layer1_0/relu1``, ``layer1_0/relu2``; for other models the
second and third activation sites) — the rest of the network is FP32. The grid spans
[max|x_i|/100, max|x_i|] per axis; the L2, L3 and ACIQ starting points and the grid
minimum are marked. The paper shows a narrow, tilted, steep basin at 2 bits and a wide,
flat plateau at 4 bits.
"""

from __future__ import annotations

import numpy as np

from figures.common import widths_of

NAME = "F1"
SLUG = "f1_contours"
TITLE = "Loss contours over two adjacent activation sites (others FP32), 2 and 4 bits"
EST_SECONDS = 17

BITS = (2, 4)
STARTS = {"L2": ("lp", {"p": 2.0}), "L3": ("lp", {"p": 3.0}), "ACIQ": ("aciq", {})}


def adjacent_activation_sites(ctx) -> list[str]:
    """The two activation sites of the first residual block (or the 2nd and 3rd activations)."""
    loss = ctx.loss(None, 4)
    acts = [s.name for s in loss.sites if s.kind == "activation"]
    for a, b in zip(acts, acts[1:], strict=False):
        if a.split("/")[0] == b.split("/")[0] and "/" in a:
            return [a, b]
    return acts[1:3] if len(acts) >= 3 else acts[:2]


def two_site_surface(ctx, bits: int, num: int, sites: list[str]) -> dict:
    """The loss over the two sites' α grid, with the marked starting points."""
    from landscape import loss_surface

    loss = ctx.loss(None, bits, sites=tuple(sites))
    top = np.asarray(loss.init("max"), np.float64)
    xs, ys = (np.linspace(t / 100, t, num) for t in top)
    surf = loss_surface(loss, top, sites=(0, 1), x=xs, y=ys)
    points = {}
    for label, (rule, kw) in STARTS.items():
        a = np.asarray(loss.init(rule, **kw), np.float64)
        points[label] = {"alpha": a, "loss": float(loss(a))}
    k = int(np.argmin(surf.z))
    points["grid min"] = {"alpha": [float(surf.x[k % num]), float(surf.y[k // num])],
                          "loss": float(surf.z.flat[k])}
    return {"x": surf.x, "y": surf.y, "z": surf.z, "points": points, "max": top}


def compute(ctx) -> dict:
    sites = adjacent_activation_sites(ctx)
    num = ctx.preset.grid
    out = {"sites": sites}
    for b in ctx.preset.widths(BITS):
        out[str(b)] = ctx.cached(f"{SLUG}-{b}", {"bits": b, "num": num, "sites": sites},
                                 lambda b=b: two_site_surface(ctx, b, num, sites))
    return out


def render(data, ctx):
    from matplotlib.figure import Figure

    from landscape import plots
    from landscape.surfaces import Surface

    bits = widths_of(data)
    fig = Figure(figsize=(12, 5 * len(bits)), constrained_layout=True)
    files = []
    for row, b in enumerate(bits):
        d = data[str(b)]
        surf = Surface(np.asarray(d["x"]), np.asarray(d["y"]), np.asarray(d["z"], float), (0, 1),
                       np.asarray(d["max"]))
        points = {k: tuple(v["alpha"]) for k, v in d["points"].items()}
        ax = fig.add_subplot(len(bits), 2, 2 * row + 1)
        plots.surface_contour(surf, points=points, ax=ax, log=True,
                              labels=(f"α {data['sites'][0]}", f"α {data['sites'][1]}"))
        ax.set_title(f"A{b} (only these two sites quantized): calibration loss")
        ax3 = fig.add_subplot(len(bits), 2, 2 * row + 2, projection="3d")
        plots.surface_3d(surf, points=points, ax=ax3, log=True)
        ax3.set_title(f"A{b}: 3-D view (log loss)")
    files += ctx.save_figure(fig, SLUG)
    return files


def claims(data, ctx):
    return []


PAPER = ("At 2 bits the loss over two adjacent activation clipping values is a narrow, tilted, steep "
         "basin; at 4 bits it is a wide, flat plateau, walled only at very small α.")


def summary(data, ctx) -> str:
    parts = []
    for b in widths_of(data):
        z = np.asarray(data[str(b)]["z"], float)
        pts = data[str(b)]["points"]
        parts.append(f"at {b} bits the grid spans loss {z.min():.3g}–{z.max():.3g} "
                     f"(L2 {pts['L2']['loss']:.3g}, L3 {pts['L3']['loss']:.3g}, ACIQ {pts['ACIQ']['loss']:.3g})")
    return "Ours: " + "; ".join(parts) + "."
