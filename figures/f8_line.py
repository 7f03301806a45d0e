"""F8 — the loss along a line through the LAPQ optimum α*: quadratic near the optimum.

The reference (``lapq_linear_parametrization.py``) evaluated the calibration loss on the
line 0.8·α* → 1.5·α* and fitted a quadratic, supporting the local model
L(α* + δ) ≈ L* + ½ δᵀHδ behind the joint optimisation. Here α* is LAPQ-Powell's result at
the most aggressive table configuration (calibration seed 0).
"""

from __future__ import annotations

import numpy as np

NAME = "F8"
SLUG = "f8_line"
TITLE = "Loss along the line 0.8·α* → 1.5·α* through the LAPQ optimum, quadratic fit"
EST_SECONDS = 1

NUM = 36  # t = −0.2, −0.18, …, 0.5: steps of 0.02, so t = 0 (α* itself) is on the line


def compute(ctx) -> dict:
    from landscape import loss_line

    name, w, a = ctx.aggressive_config()
    res = ctx.lapq_run(w, a, seed=0)

    def run():
        loss = ctx.loss(w, a, seed=0, bias_correction=True)
        alpha = np.asarray(res["alpha"], np.float64)
        line = loss_line(loss, alpha, alpha, t=np.linspace(-0.2, 0.5, NUM))
        scale = 1.0 + line.t
        coeffs = np.polyfit(scale, line.values, 2)
        fit = np.polyval(coeffs, scale)
        ss_res = float(np.sum((line.values - fit) ** 2))
        ss_tot = float(np.sum((line.values - line.values.mean()) ** 2))
        return {"config": name, "scale": scale, "loss": line.values, "fit": fit, "coeffs": coeffs,
                "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"), "alpha_star_loss": res["loss"]}

    return ctx.cached(SLUG, {"config": name, "num": NUM}, run)


def render(data, ctx):
    from matplotlib.figure import Figure


    fig = Figure(figsize=(6, 4.2), constrained_layout=True)
    ax = fig.subplots()
    s = np.asarray(data["scale"], float)
    ax.plot(s, np.asarray(data["loss"], float), "o", ms=3, label="calibration loss")
    ax.plot(s, np.asarray(data["fit"], float), "-", label=f"quadratic fit (R² {float(data['r2']):.3f})")
    ax.axvline(1.0, color="C3", ls="--", label="α*")
    ax.set_xlabel("α / α*  (along the line through the LAPQ optimum)")
    ax.set_ylabel("calibration loss")
    ax.set_title(f"{data['config']}: loss along 0.8·α* → 1.5·α*")
    ax.legend(fontsize=8)
    return ctx.save_figure(fig, SLUG)


def claims(data, ctx):
    from figures import claims as C

    r2 = float(data["r2"])
    return [C.make("C12", f"R² {r2:.3f} ({data['config']})", r2 >= C.spec("C12")["min_r2"], NAME)]


PAPER = "Along the line 0.8·α* → 1.5·α* the loss is well fitted by a quadratic: a local quadratic model holds."


def summary(data, ctx) -> str:
    return f"Ours ({data['config']}): quadratic fit R² = {float(data['r2']):.3f} over {len(data['scale'])} points."
