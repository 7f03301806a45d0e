"""F4 — calibration loss against p, with the quadratic fit and p*, and test accuracy against p.

LAPQ's first step (the reference implementation's choice of p): for every p the layer-wise Lp-optimal clipping
α_p = argmin E|Q_α(x) − x|^p, and the calibration loss L(α_p). The paper found the loss
close to quadratic in p on [2, 4.5] with an interior minimum near p* ≈ 3.2 at 2 bits.
W = A = 2, 3, 4 bits, bias correction on (as in LAPQ), p ∈ linspace(2, 4.5, 50).
"""

from __future__ import annotations

import numpy as np

from figures.common import widths_of

NAME = "F4"
SLUG = "f4_p_sweep"
TITLE = "Calibration loss and accuracy vs p, quadratic fit and p* (2, 3, 4 bits)"
EST_SECONDS = 162

BITS = (2, 3, 4)


def sweep(ctx, bits: int) -> dict:
    from landscape.lapq import select_p

    loss = ctx.loss(bits, bits, bias_correction=True)
    ps = np.linspace(2.0, 4.5, ctx.preset.p_points)
    alphas = np.stack([np.asarray(loss.init("lp", p=float(p))) for p in ps])
    losses = np.asarray(loss.batch(alphas), np.float64)
    acc = [loss.accuracy(a, ctx.test) for a in alphas]
    sel = select_p(ps, losses)
    a, b, c = sel.coeffs
    fit = a * ps**2 + b * ps + c if np.isfinite(a) else np.full_like(ps, np.nan)
    ss_res = float(np.sum((losses - fit) ** 2))
    ss_tot = float(np.sum((losses - losses.mean()) ** 2))
    return {"p": ps, "loss": losses, "accuracy": acc, "p_star": sel.p_star, "rule": sel.rule,
            "coeffs": [a, b, c], "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
            "rmse": float(np.sqrt(ss_res / len(ps)))}


def compute(ctx) -> dict:
    return {str(b): ctx.cached(f"{SLUG}-{b}", {"bits": b, "points": ctx.preset.p_points},
                               lambda b=b: sweep(ctx, b)) for b in ctx.preset.widths(BITS)}


def render(data, ctx):
    from matplotlib.figure import Figure


    bits = widths_of(data)
    fig = Figure(figsize=(4.4 * len(bits), 7), constrained_layout=True)
    axes = fig.subplots(2, len(bits), squeeze=False)
    for col, b in enumerate(bits):
        d = data[str(b)]
        ps, losses = np.asarray(d["p"], float), np.asarray(d["loss"], float)
        ax = axes[0, col]
        ax.plot(ps, losses, "o", ms=3, label="L(α_p)")
        a, bb, c = (float(v) for v in d["coeffs"])
        if np.isfinite(a):
            ax.plot(ps, a * ps**2 + bb * ps + c, "-", label=f"quadratic fit (R² {float(d['r2']):.2f})")
        ax.axvline(float(d["p_star"]), color="C3", ls="--", label=f"p* = {float(d['p_star']):.2f} ({d['rule']})")
        ax.set_title(f"W{b}A{b}: calibration loss vs p")
        ax.set_xlabel("p")
        ax.set_ylabel("calibration loss")
        ax.legend(fontsize=8)
        ax = axes[1, col]
        ax.plot(ps, 100 * np.asarray(d["accuracy"], float), "o-", ms=3)
        ax.axvline(float(d["p_star"]), color="C3", ls="--")
        ax.set_xlabel("p")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"W{b}A{b}: accuracy of Lp(p) init")
    return ctx.save_figure(fig, SLUG)


def claims(data, ctx):
    from figures import claims as C

    bits = widths_of(data)
    b = min(bits)
    d = data[str(b)]
    r2, p_star = float(d["r2"]), float(d["p_star"])
    convex = d["rule"] == "vertex"
    passed = r2 >= C.spec("C7")["min_r2"] and convex and 2.0 < p_star < 4.5
    others = ", ".join(f"W{k}A{k}: p* {float(data[str(k)]['p_star']):.2f} ({data[str(k)]['rule']}), "
                       f"R² {float(data[str(k)]['r2']):.2f}" for k in bits if k != b)
    return [C.make("C7", f"W{b}A{b}: R² {r2:.2f}, p* = {p_star:.2f} ({d['rule']})", passed, NAME, note=others)]


PAPER = "Calibration loss is close to quadratic in p on [2, 4.5] with an interior minimum near p* ≈ 3.2 at 2 bits."


def summary(data, ctx) -> str:
    parts = [f"W{b}A{b} p* = {float(data[str(b)]['p_star']):.2f} ({data[str(b)]['rule']}, "
             f"R² {float(data[str(b)]['r2']):.2f})" for b in widths_of(data)]
    return "Ours: " + "; ".join(parts) + "."
