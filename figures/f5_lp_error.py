"""F5 — Lp quantization error against the clipping value, and the optimal clip against p.

The paper (jupyter/lp_norm_vs_clipping.ipynb) plots E|Q_α(x) − x|^p for several p on
N(0, 1) at 2 bits and shows that a larger p puts the optimum at a larger clipping value.
Here the tensor is real: the first quantized activation site of the trained network on
the calibration set (on its site's grid: unsigned after a ReLU, mid-tread for a signed site)
and the first quantized weight site (mid-rise grid), both at 2 bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NAME = "F5"
SLUG = "f5_lp_error"
TITLE = "Lp quantization error vs clipping value; optimal clip vs p (2 bits)"
EST_SECONDS = 7

P_CURVES = (0.5, 1.0, 2.0, 3.0, 4.0)
BITS = 2


@jax.jit(static_argnames="grid")
def _error_curve(x, clips, p, grid):
    from landscape import calibration

    return jax.lax.map(lambda a: calibration.lp_error(x, a, BITS, grid, p), clips)


def _tensors(ctx):
    """The first quantized activation and weight tensors (FP32 upstream)."""
    import landscape as ls

    loss = ctx.loss(BITS, BITS)
    act = next(s for s in loss.sites if s.kind == "activation")
    wgt = next(s for s in loss.sites if s.kind == "weight")
    model, variables = ctx.net.model, ctx.net.variables
    x = ctx.data().calib.x
    values = ls.sites.capture(lambda v, x: model.apply(v, x, train=False), [act.name, wgt.name],
                              variables, x)
    return {"activation": (act.name, np.asarray(values[act.name]).ravel(), loss.specs[act.name].grid),
            "weight": (wgt.name, np.asarray(values[wgt.name]).ravel(), loss.specs[wgt.name].grid)}


def compute(ctx) -> dict:
    from landscape import calibration
    from landscape.sites import SiteSpec

    def run():
        out = {}
        p_opt = np.linspace(2.0, 4.5, 26)
        for kind, (site, x, grid) in _tensors(ctx).items():
            top = float(np.max(np.abs(x)))
            clips = np.linspace(top / 200, top, 200)
            xs = jnp.asarray(x)
            errors = {str(p): np.asarray(_error_curve(xs, jnp.asarray(clips), jnp.float32(p), grid))
                      for p in P_CURVES}
            spec = SiteSpec(BITS, grid)
            rule = jax.jit(lambda x, p, spec=spec, kind=kind: calibration.bind_rule("lp", p=p)(x, spec, kind))
            optimal = [float(rule(xs, jnp.float32(p))) for p in p_opt]
            out[kind] = {"site": site, "grid": grid, "max_abs": top, "clips": clips, "errors": errors,
                         "p": p_opt, "optimal_clip": optimal}
        return out

    return ctx.cached(SLUG, {"bits": BITS, "p": P_CURVES}, run)


def render(data, ctx):
    from matplotlib.figure import Figure


    fig = Figure(figsize=(11, 7.5), constrained_layout=True)
    axes = fig.subplots(2, 2)
    for row, kind in enumerate(("activation", "weight")):
        d = data[kind]
        clips = np.asarray(d["clips"]) / d["max_abs"]
        ax = axes[row, 0]
        for p, err in d["errors"].items():
            err = np.asarray(err, float)
            ax.plot(clips, err / err.min(), label=f"p = {p}")
            ax.plot(clips[np.argmin(err)], 1.0, "o", color=ax.lines[-1].get_color())
        ax.set_yscale("log")
        ax.set_xlabel("clipping value α / max|x|")
        ax.set_ylabel("E|Q_α(x) − x|^p  (÷ its minimum)")
        ax.set_title(f"{kind} '{d['site']}' ({d['grid']} grid, {BITS} bits)")
        ax.legend(fontsize=8)
        ax = axes[row, 1]
        ax.plot(d["p"], np.asarray(d["optimal_clip"]) / d["max_abs"], "o-")
        ax.set_xlabel("p")
        ax.set_ylabel("optimal α / max|x|")
        ax.set_title(f"optimal clipping value vs p ({kind})")
    return ctx.save_figure(fig, SLUG)


def claims(data, ctx):
    return []


PAPER = "On N(0, 1) at 2 bits, a larger p moves the Lp-optimal clipping value up (by ~10% of max|x| over p ∈ [2, 4.5])."


def summary(data, ctx) -> str:
    parts = []
    for kind in ("activation", "weight"):
        opt = np.asarray(data[kind]["optimal_clip"], float) / data[kind]["max_abs"]
        parts.append(f"{kind} '{data[kind]['site']}': α*/max {opt[0]:.3f} at p = 2 → {opt[-1]:.3f} at p = 4.5")
    return "Ours (a real layer): " + "; ".join(parts) + "."
