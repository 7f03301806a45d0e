"""F7 — LAPQ test accuracy against the calibration-set size.

The reference repository's calibration-size ablation (ResNet-18 W4A4): 50.4% with 32 images rising to
59.8% with 512 and 59.9% with 1024 — more calibration data helps, then saturates. Here:
LAPQ-Powell at the most aggressive table configuration, calibration sizes 32 … 1024 (as far
as the training split allows), averaged over the calibration seeds.
"""

from __future__ import annotations

import numpy as np

from landscape.lapq import seed_std

NAME = "F7"
SLUG = "f7_calib_size"
TITLE = "LAPQ accuracy vs calibration-set size"
EST_SECONDS = 169


def compute(ctx) -> dict:
    name, w, a = ctx.aggressive_config()
    n_train = len(ctx.data().train)
    sizes = [s for s in ctx.preset.calib_sizes if s <= n_train]
    seeds = list(range(ctx.preset.calib_size_seeds))
    acc = {str(s): [ctx.lapq_run(w, a, seed=k, calib_size=s)["test_acc"] for k in seeds] for s in sizes}
    init = {str(s): [ctx.lapq_run(w, a, seed=k, calib_size=s)["init_acc"] for k in seeds] for s in sizes}
    return {"config": name, "sizes": sizes, "seeds": seeds, "lapq_acc": acc, "init_acc": init}


def render(data, ctx):
    from matplotlib.figure import Figure


    fig = Figure(figsize=(6, 4.2), constrained_layout=True)
    ax = fig.subplots()
    sizes = data["sizes"]
    for key, label in (("lapq_acc", "LAPQ (Powell)"), ("init_acc", "Lp(p*) init")):
        vals = np.asarray([data[key][str(s)] for s in sizes], float) * 100
        ax.errorbar(sizes, vals.mean(1), yerr=seed_std(vals), marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration images")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{data['config']}: accuracy vs calibration size ({len(data['seeds'])} seeds)")
    ax.legend(fontsize=8)
    return ctx.save_figure(fig, SLUG)


def claims(data, ctx):
    from figures import claims as C

    sizes = data["sizes"]
    if len(sizes) < 3:
        return []
    mean = {s: 100 * float(np.mean(data["lapq_acc"][str(s)])) for s in sizes}
    rises = mean[sizes[-1]] >= mean[sizes[0]]
    saturates = abs(mean[sizes[-1]] - mean[sizes[-2]]) <= C.spec("C13")["max_last_gap"]
    ours = ", ".join(f"{s}: {mean[s]:.1f}%" for s in sizes)
    return [C.make("C13", f"{data['config']}: {ours}", rises and saturates, NAME)]


PAPER = "ResNet-18 W4A4 accuracy rises from 50.4% (32 images) to 59.8% (512) and saturates (59.9% at 1024)."


def summary(data, ctx) -> str:
    mean = [100 * float(np.mean(data["lapq_acc"][str(s)])) for s in data["sizes"]]
    pairs = zip(data["sizes"], mean, strict=True)
    return f"Ours ({data['config']}): " + ", ".join(f"{s}: {m:.1f}%" for s, m in pairs) + "."
