"""T2 — the weight-space Hessian spectrum of the FP32 network and of the quantized network.

``landscape.hessian_spectrum`` on the calibration cross-entropy as a function of the
weights: FP32, and quantized at W4A4 and W2A2 with α fixed at the layer-wise MSE init
(straight-through in the weights, so these are STE Hessians). Top eigenvalues by Lanczos,
the trace by Hutch++ (± standard error), the spectral density by stochastic Lanczos
quadrature. Quantization sharpens the weight-space landscape: larger top eigenvalues and
trace at fewer bits. The third panel splits the trace by layer (``trace_per_leaf``, from the
same Hutch++ products): the average curvature per weight of each conv/dense kernel, which shows
where the sharpening sits.
"""

from __future__ import annotations

import re

import numpy as np

from landscape.lapq import loss_text

NAME = "T2"
SLUG = "t2_spectrum"
TITLE = "Weight-space Hessian spectrum: FP32 vs W4A4 vs W2A2 (top-k, trace, density, per-layer trace)"
EST_SECONDS = 26

def configs(ctx):
    """FP32 and W = A at every preset bit width up to 4 (small preset: FP32, W4A4, W2A2)."""
    return [("FP32", None)] + [(f"W{b}A{b}", b) for b in sorted(ctx.preset.bits, reverse=True) if b <= 4]


def spectrum(ctx, bits) -> dict:
    from landscape import hessian_spectrum

    opts = dict(ctx.preset.spectrum)
    loss = ctx.loss(4 if bits is None else bits, 4 if bits is None else bits,
                    calib_size=ctx.preset.spectrum_batch)
    f = loss.weight_loss(None if bits is None else loss.init("mse"))
    params = loss.variables["params"]
    spec = hessian_spectrum(f, params, top_k=opts["top_k"], tol=opts["tol"], trace=True, density=True,
                            num_probes=opts["num_probes"], density_runs=opts["density_runs"],
                            density_steps=opts["density_steps"], seed=0)
    grid, values = spec.density
    return {"eigenvalues": spec.eigenvalues, "trace": spec.trace, "trace_stderr": spec.trace_stderr,
            "grid": grid, "density": values, "n_hvp": spec.n_hvp, "hvp_counts": spec.hvp_counts,
            "seconds": spec.seconds, "leaf_traces": spec.leaf_traces(),
            "method": spec.method, "dimension": int(sum(np.size(p) for p in _leaves(params))),
            "loss": float(f(params))}


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def compute(ctx) -> dict:
    return {label: ctx.cached(f"{SLUG}-{label}", {"bits": bits, "spectrum": ctx.preset.spectrum,
                                                  "batch": ctx.preset.spectrum_batch, "per_leaf": True},
                              lambda bits=bits: spectrum(ctx, bits))
            for label, bits in configs(ctx)}


def _in_order(data) -> dict:
    """The networks FP32 first, then by falling weight width (W8A8, W4A4, W2A2): the JSON's
    keys come back sorted as strings, which put W2A2 before W4A4."""
    def width(label):
        m = re.match(r"W(\d+)", label)
        return float("inf") if m is None else int(m.group(1))

    return dict(sorted(data.items(), key=lambda item: -width(item[0])))


def table(data) -> str:
    data = _in_order(data)
    rows = ["Weight-space Hessians of the calibration loss; the quantized networks' are STE Hessians "
            "(straight-through in the weights, α fixed at the MSE init).", "",
            "| network | loss | top eigenvalues | trace ± s.e. | HVPs |", "|---|---|---|---|---|"]
    for label, d in data.items():
        eig = ", ".join(f"{float(e):.4g}" for e in d["eigenvalues"])
        rows.append(f"| {label} | {loss_text(float(d['loss']))} | {eig} | {float(d['trace']):.4g} ± "
                    f"{float(d['trace_stderr']):.2g} | {d['n_hvp']} |")
    labels = list(data)
    kernels = {label: _kernels(d) for label, d in data.items()}
    rows += ["", "Per layer: tr H_bb / size of each kernel block (± standard error), from the same probes.", "",
             "| kernel | size | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for i, (path, size, _, _) in enumerate(kernels[labels[0]]):
        cells = [f"{k[i][2] / size:.3g} ± {k[i][3] / size:.2g}" for k in kernels.values()]
        rows.append(f"| {path} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _kernels(d) -> list:
    """The (path, size, trace, stderr) rows of the conv/dense kernels, in network order."""
    return [tuple(r) for r in d["leaf_traces"] if str(r[0]).endswith("['kernel']")]


def render(data, ctx):
    data = _in_order(data)
    from matplotlib.figure import Figure

    from landscape import plots

    fig = Figure(figsize=(17, 4.8), constrained_layout=True)
    ax, ax2, ax3 = fig.subplots(1, 3, width_ratios=(1, 1, 1.4))
    for k, (label, d) in enumerate(data.items()):
        grid, dens = np.asarray(d["grid"], float), np.asarray(d["density"], float)
        ax.semilogy(grid, np.maximum(dens, 1e-8), color=f"C{k}",
                    label=f"{label} (trace {float(d['trace']):.3g})")
        ax2.plot(range(1, len(d["eigenvalues"]) + 1), np.asarray(d["eigenvalues"], float), "o-",
                 color=f"C{k}", label=label)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("spectral density (SLQ)")
    ax.set_title("weight-space Hessian spectral density (quantized: STE)")
    ax.legend(fontsize=8)
    ax2.set_yscale("symlog")
    ax2.set_xlabel("rank")
    ax2.set_ylabel("eigenvalue")
    ax2.set_title("top eigenvalues (Lanczos; quantized: STE)")
    ax2.legend(fontsize=8)
    plots.leaf_traces({label: _kernels(d) for label, d in data.items()}, ax=ax3,
                      title="per-layer curvature: tr H_bb / size of each kernel (± s.e.)")
    files = ctx.save_figure(fig, SLUG)
    from figures.common import write_text

    return files + [write_text(ctx.out / f"{SLUG}.md", table(data) + "\n")]


def claims(data, ctx):
    return []


PAPER = ("(Not in the LAPQ paper; PyHessian-style analysis.) Quantization sharpens the weight-space "
         "landscape: larger top eigenvalues and trace at fewer bits.")


def summary(data, ctx) -> str:
    data = _in_order(data)
    parts = (f"{k} λ_max {float(v['eigenvalues'][0]):.3g}, trace {float(v['trace']):.3g}" for k, v in data.items())
    text = "Ours (STE Hessians of the quantized networks): " + "; ".join(parts) + "."
    labels = list(data)
    if len(labels) > 1:
        low, base = _kernels(data[labels[-1]]), _kernels(data[labels[0]])
        growth = [(b[0], a[2] / b[2]) for a, b in zip(low, base, strict=True) if b[2] > 0]
        if growth:
            path, most = max(growth, key=lambda g: g[1])
            text += (f" Per layer, {labels[-1]} / {labels[0]} trace ratios range from "
                     f"{min(g[1] for g in growth):.3g} to {most:.3g} (largest: {path}).")
    return text
