"""T1 — the accuracy table: every clipping method at W8A8 … W2A4, over calibration seeds.

Rows as in the paper's comparison: FP32; the layer-wise rules max, percentile (99.99),
MSE (clip + uniform-noise prior), ACIQ (Laplace), KL (TensorRT entropy); L2 (Lp with
p = 2, the paper's "MMSE") and Lp(p*) (LAPQ's start); then the joint optimizers from the
same Lp(p*) start: coordinate descent (CD), LAPQ-Powell, and our batched optimizer. Every
row uses the same calibration sample per seed (a sample of the training split, bias
correction on as in LAPQ); accuracy is on the test split; mean ± std over seeds.
"""

from __future__ import annotations

import numpy as np

from landscape.lapq import loss_text, seed_std

NAME = "T1"
SLUG = "t1_accuracy"
TITLE = "Accuracy table: FP32, layer-wise rules, Lp(p*), CD, LAPQ, batched × bit widths"
EST_SECONDS = 349

RULES = (("max", "max"), ("percentile", "percentile"), ("MSE", "mse"), ("ACIQ", "aciq"), ("KL", "kl"))
OPTIMIZERS = (("CD", "cd"), ("LAPQ", "powell"), ("batched", "batched"))
ROWS = ("FP32",) + tuple(r for r, _ in RULES) + ("L2", "Lp(p*)") + tuple(r for r, _ in OPTIMIZERS)


def cell(ctx, w, a, seed) -> dict:
    """Every row of the table for one configuration and calibration seed."""
    from landscape.lapq import DEFAULT_P_GRID, lapq, lp_sweep, select_p

    loss = ctx.loss(w, a, seed=seed, bias_correction=True)
    test = ctx.test
    out = {}
    fp32 = ctx.loss(None, None, seed=seed)
    none = np.zeros(0, np.float32)
    out["FP32"] = {"loss": float(fp32(none)), "acc": fp32.accuracy(none, test)}
    for row, rule in RULES:
        alpha = loss.init(rule)
        out[row] = {"loss": float(loss(alpha)), "acc": loss.accuracy(alpha, test)}
    grid = np.asarray(DEFAULT_P_GRID)
    alphas, losses = lp_sweep(loss, grid)
    out["L2"] = {"loss": float(losses[0]), "acc": loss.accuracy(alphas[0], test)}
    sel = select_p(grid, losses)
    start = (np.asarray(loss.init("lp", p=sel.p_star), np.float32) if sel.used_fit
             else alphas[int(np.argmin(np.abs(grid - sel.p_star)))])
    out["Lp(p*)"] = {"loss": float(loss(start)), "acc": loss.accuracy(start, test), "p_star": sel.p_star,
                     "rule": sel.rule}
    for row, method in OPTIMIZERS:
        res = lapq(loss, method=method, maxiter=ctx.preset.lapq_maxiter, init=start, on_interrupt="raise")
        out[row] = {"loss": res.loss, "acc": loss.accuracy(res.alpha, test), "n_evals": res.n_evals,
                    "seconds": res.seconds}
    return out


def compute(ctx) -> dict:
    configs = [list(c) for c in ctx.preset.table_configs]
    seeds = list(range(ctx.preset.seeds))
    cells = {}
    for name, w, a in configs:
        for seed in seeds:
            cells[f"{name}/{seed}"] = ctx.cached(f"{SLUG}-cell", {"w": w, "a": a, "seed": seed,
                                                                  "maxiter": ctx.preset.lapq_maxiter},
                                                 lambda w=w, a=a, seed=seed: cell(ctx, w, a, seed))
    return {"configs": configs, "seeds": seeds, "cells": cells}


def stat(data, config: str, row: str, key: str = "acc") -> np.ndarray:
    return np.asarray([float(data["cells"][f"{config}/{s}"][row][key]) for s in data["seeds"]])


def markdown(data) -> str:
    names = [c[0] for c in data["configs"]]
    lines = ["Test accuracy (%), mean ± sample std over calibration seeds " + str(data["seeds"]) + ".", "",
             "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in ROWS:
        vals = [stat(data, n, row) * 100 for n in names]
        lines.append(f"| {row} | " + " | ".join(f"{v.mean():.2f} ± {seed_std(v):.2f}" for v in vals) + " |")
    lines += ["", "Calibration loss, mean over seeds.", "",
              "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in ROWS:
        lines.append(f"| {row} | " + " | ".join(loss_text(stat(data, n, row, 'loss').mean()) for n in names) + " |")
    return "\n".join(lines) + "\n"


def render(data, ctx):
    from matplotlib.figure import Figure

    from figures.common import write_text

    names = [c[0] for c in data["configs"]]
    fig = Figure(figsize=(13, 5), constrained_layout=True)
    ax = fig.subplots()
    width = 0.8 / len(ROWS)
    for k, row in enumerate(ROWS):
        vals = np.asarray([stat(data, n, row) * 100 for n in names])
        ax.bar(np.arange(len(names)) + (k - len(ROWS) / 2) * width, vals.mean(1), width, yerr=seed_std(vals),
               label=row, color=f"C{k % 10}", hatch="//" if k >= 10 else None)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{ctx.preset.model} on {ctx.preset.data}: clipping methods ({len(data['seeds'])} seeds)")
    ax.legend(fontsize=7, ncol=6)
    return ctx.save_figure(fig, SLUG) + [write_text(ctx.out / f"{SLUG}.md", markdown(data))]


def claims(data, ctx):
    from figures import claims as C

    names = [c[0] for c in data["configs"]]
    low = names[-1]
    out = []
    mean = lambda cfg, row: 100 * float(stat(data, cfg, row).mean())  # noqa: E731
    lp, l2, mx = mean(low, "Lp(p*)"), mean(low, "L2"), mean(low, "max")
    out.append(C.make("C8", f"{low}: Lp(p*) {lp:.1f}%, L2 {l2:.1f}%, max {mx:.1f}%", lp >= l2 and lp >= mx, NAME))
    if "W8A8" in names:
        gain_low = mean(low, "LAPQ") - lp
        gain_8 = mean("W8A8", "LAPQ") - mean("W8A8", "Lp(p*)")
        out.append(C.make("C9", f"{low}: {gain_low:+.2f} points ({lp:.1f} → {mean(low, 'LAPQ'):.1f}); "
                                f"W8A8: {gain_8:+.2f}",
                          gain_low >= C.spec("C9")["min_gain"] and gain_low >= gain_8, NAME))
        # The paper's "mild quantization" is A4 (all methods within ≈1 %): W32A4 where the preset has it
        mild = "W32A4" if "W32A4" in names else "W8A8"
        gain_mild = mean(mild, "LAPQ") - mean(mild, "Lp(p*)")
        out.append(C.make("C11", f"{mild}: |{gain_mild:+.2f}| points", abs(gain_mild) <= C.spec("C11")["max_gap"],
                          NAME))
    return out


PAPER = ("LAPQ (Lp(p*) init + Powell) beats every layer-wise rule at 4 bits and below (ResNet-18 W4A4 ≈ 60%), "
         "while at 8 bits all methods are within noise.")


def summary(data, ctx) -> str:
    names = [c[0] for c in data["configs"]]
    low = names[-1]
    m = lambda row: 100 * float(stat(data, low, row).mean())  # noqa: E731
    return (f"Ours ({low}, {len(data['seeds'])} seeds): max {m('max'):.1f}%, MSE {m('MSE'):.1f}%, "
            f"Lp(p*) {m('Lp(p*)'):.1f}%, CD {m('CD'):.1f}%, LAPQ {m('LAPQ'):.1f}%, batched {m('batched'):.1f}% "
            f"(FP32 {m('FP32'):.1f}%).")
