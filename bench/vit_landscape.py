"""The LAPQ paper's clip landscape on a Vision Transformer, next to a CNN (digits or MNIST).

Trains (or loads, cached by ``fit``) the networks of ``--networks`` with training seed 0: the
default resnet8 (``fit``'s settings) and a ViT (``models.create("vit")``: 16 tokens of 2×2
patches on digits, 7×7 on MNIST, width 64, 4 blocks of 4 heads, MLP 128; lr 0.1, where ``fit``'s
digits default of 0.05 leaves it at 93 %), on the bundled digits by default or, with ``--data
mnist``, on a local parquet copy of MNIST (``--data-dir``, default the shared copy the resnet20
benches read; ``fit``'s 3 epochs; results in ``results/vit_landscape_mnist``). The ViT's
activation sites are signed (``QuantIdentity``, the symmetric grid with a zero level): each
LayerNorm output, attention output and GELU output, the inputs of its dense layers.
``vit_attention`` is the same trained ViT analysed with ``quantize_attention=True``: the
operands of the two attention products are sites too (q, k, v signed; the softmax probabilities
on the unsigned grid), so every product is low-precision.
Then, for each network:

1. **The activation clip landscape** (weights FP32, α = the layer-wise Lp(p = 3) init, as
   ``paper_repro``'s F2/F3 and claims C1, C2, C6): at each activation width of ``--bits``, the
   STE and the true-loss (FD, 2 % step) clip Hessians over the activation α: their trace, the
   off-diagonal ratio ‖H − diag H‖_F / ‖H‖_F, the mean coupling |H_ij|/√|H_ii H_jj| of
   adjacent sites (|i − j| = 1) against distant ones (|i − j| ≥ n/2), and each site role's share
   of the STE trace (a role is the last part of a site name: ``q``, ``gelu_out``, ``relu1``).
2. **LAPQ** (:func:`landscape.lapq.compare_methods`, bias correction on, ``maxiter`` 2) at each
   W:A of ``--configs`` over ``--seeds`` calibration samples of 512 training images: FP32, max,
   MSE, Lp(p*), the paper's Powell, and our batched optimizer; test accuracy on the test split
   (359 digits, 10,000 MNIST images).

No claim is tested here (the thresholds of ``figures/claims.py`` are for paper_repro's resnet8):
the tables report what the landscape does. Each finished step is kept in
``<out>.progress.json`` (atomically), so a killed run resumes; the file is removed at the end.

    python bench/vit_landscape.py [--bits 8,4,3,2] [--configs 4:4,3:3,4:2] [--seeds 2]
                                  [--networks resnet8,vit,vit_attention] [--data digits|mnist] [--data-dir PATH]
                                  [--out results/vit_landscape]

Writes ``<out>.md`` and ``<out>.json`` (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import time

import mnist_resnet20  # first: puts the repository on sys.path for the imports below
import numpy as np
from mnist_resnet20 import Progress, parse_configs

import landscape as ls
import models
from figures.f2_hessians import coupling_by_distance
from landscape import atomic, runtime

lapq_module = importlib.import_module("landscape.lapq")  # ls.lapq is the function

OUT = os.path.join(mnist_resnet20.ROOT, "results", "vit_landscape")
NETWORKS = {  # name → (zoo name, fit's keyword arguments, the analysed model's extra arguments)
    "resnet8": ("resnet8", {}, {}),
    "vit": ("vit", {"lr": 0.1}, {}),
    # The same trained ViT (same parameters), with the operands of QKᵀ and of the attention-weighted
    # sum of V as sites too: q, k, v (signed) and the softmax probabilities (unsigned).
    "vit_attention": ("vit", {"lr": 0.1}, {"quantize_attention": True}),
}
P_EVAL = 3.0  # the α of the Hessians: Lp(p = 3), where the paper's p* lands
FD_STEP = 0.02


def landscape_step(net, calib, a_bits: int) -> dict:
    """STE and FD activation clip Hessians (weights FP32) at Lp(p = 3), summarised."""
    loss = ls.ClipLoss(net, calib, w_bits=None, a_bits=a_bits)
    alpha = loss.init("lp", p=P_EVAL)
    out = {"sites": len(loss.sites), "loss": float(loss(alpha))}
    for method in ("ste", "fd"):
        t0 = time.perf_counter()
        H = np.asarray(ls.clip_hessian(loss, alpha, method=method, step=FD_STEP if method == "fd" else None))
        rep = ls.separability(H)
        adjacent, distant = coupling_by_distance(H)
        out[method] = {"trace": float(rep.trace), "offdiag_ratio": float(rep.offdiag_ratio),
                       "adjacent": adjacent, "distant": distant, "seconds": time.perf_counter() - t0,
                       "diagonal_by_role": diagonal_by_role(loss.sites, np.diag(H))}
    return out


def role(site_name: str) -> str:
    """A site's role in its block: the last part of its name ("block2/q" → "q", "layer1_0/relu1" → "relu1")."""
    return site_name.rsplit("/", 1)[-1]


def diagonal_by_role(sites, diagonal) -> dict[str, float]:
    """Σ H_ii over the sites of each role, in the order roles first appear."""
    out: dict[str, float] = {}
    for site, h in zip(sites, diagonal, strict=True):
        out[role(site.name)] = out.get(role(site.name), 0.0) + float(h)
    return out


def lapq_step(net, data, w_bits, a_bits, seeds: int) -> dict:
    loss = ls.ClipLoss(net, data.calib, w_bits=w_bits, a_bits=a_bits, bias_correction=True)
    table = lapq_module.compare_methods(loss, data, seeds=range(seeds),
                                      rows=("FP32", "max", "MSE", "Lp(p*)", "LAPQ (Powell)", "batched"),
                                      progress=lambda s: print("   ", s, flush=True))
    return {"markdown": table.to_markdown(), "table": table.to_dict()}


def render(results: dict, settings: dict) -> str:
    lines = [f"# The clip landscape of a Vision Transformer and a CNN ({settings.get('data', 'digits')})", "",
             "Made by `python bench/vit_landscape.py` (module docstring: what is measured and how). "
             f"Activation widths {settings['bits']}, LAPQ configurations {settings['configs']}, "
             f"{settings['seeds']} calibration seeds; {settings['seconds']:.0f} s on {settings['machine']}.", "",
             "| network | FP32 test accuracy | weight sites | activation sites (grid) |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {100 * r['fp32_test_acc']:.2f} % | {r['weight_sites']} | "
                     f"{r['activation_sites']} ({r['activation_grid']}) |")
    lines += ["", "## 1. Activation clip Hessians (weights FP32, α = Lp(p = 3))", "",
              "| network | A bits | sites | loss at α | STE trace | STE off-diag ratio "
              "| STE coupling adjacent / distant | FD trace | FD off-diag ratio | FD coupling adjacent / distant |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for b, s in r["landscape"].items():
            cells = [name, b, s["sites"], f"{s['loss']:.4g}"]
            for h in (s["ste"], s["fd"]):
                cells += [f"{h['trace']:.4g}", f"{h['offdiag_ratio']:.3f}", f"{h['adjacent']:.3f} / {h['distant']:.3f}"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "From the highest width to the lowest: " + "; ".join(
        f"{name}: STE trace ×{ratio(r, 'ste')}, FD trace ×{ratio(r, 'fd')}" for name, r in results.items()) + ". "
        "The FD Hessian is the second difference of the piecewise-constant loss at a 2 % step: its trace can be "
        "negative (no ratio then) and its coupling |H_ij|/√|H_ii H_jj| exceed 1.", ""]
    lines += role_shares(results)
    lines += ["", "## 2. LAPQ against the layer-wise rules", ""]
    for name, r in results.items():
        for config, t in r["lapq"].items():
            lines += [f"### {name} {config}", "", t["markdown"], ""]
    return "\n".join(lines) + "\n"


def role_shares(results: dict) -> list[str]:
    """Markdown: each site role's share Σ H_ii / trace of the STE Hessian, per network and width."""
    lines = ["Where the curvature sits: each site role's share of the STE trace (Σ H_ii over the sites of that "
             "role, over the trace; a role is the last part of a site's name, summed over blocks; – where the "
             "trace is not positive).", ""]
    for name, r in results.items():
        steps = [(b, s) for b, s in r["landscape"].items() if "diagonal_by_role" in s["ste"]]
        if not steps:
            continue
        roles = list(steps[0][1]["ste"]["diagonal_by_role"])
        lines += [f"| {name}, A bits | " + " | ".join(roles) + " |", "|---" * (len(roles) + 1) + "|"]
        for b, s in steps:
            diag, trace = s["ste"]["diagonal_by_role"], s["ste"]["trace"]
            # a trace ≤ 0 is float noise around a flat landscape (A8): no shares then
            lines.append(f"| {b} | " + " | ".join(f"{diag[k] / trace:.3f}" if trace > 0 else "–" for k in roles) + " |")
        lines.append("")
    return lines


def ratio(r: dict, method: str) -> str:
    """The trace at the lowest width over the highest, or "–" unless both are positive."""
    widths = sorted(r["landscape"], key=int)
    low, high = (r["landscape"][w][method]["trace"] for w in (widths[0], widths[-1]))
    return f"{low / high:.3g}" if low > 0 and high > 0 else "–"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="8,4,3,2", help="activation widths of the Hessians")
    parser.add_argument("--configs", default="4:4,3:3,4:2", help="W:A configurations of the LAPQ tables")
    parser.add_argument("--seeds", type=int, default=2, help="calibration seeds of the LAPQ tables")
    parser.add_argument("--networks", default="resnet8,vit,vit_attention", help=f"subset of {','.join(NETWORKS)}")
    parser.add_argument("--data", default="digits", choices=("digits", "mnist"))
    parser.add_argument("--data-dir", default=None,
                        help=f"MNIST in the hub's parquet layout (--data mnist; default {mnist_resnet20.MNIST_DIR})")
    parser.add_argument("--out", default=None, help="default results/vit_landscape (digits), …_mnist (MNIST)")
    args = parser.parse_args(argv)
    bits = [int(b) for b in args.bits.split(",") if b]
    configs = parse_configs(args.configs)
    names = [n for n in args.networks.split(",") if n]
    bad = [n for n in names if n not in NETWORKS]
    if bad or not names:
        raise SystemExit(f"--networks {args.networks!r}: choose from {', '.join(NETWORKS)}")
    if args.seeds < 1:
        raise SystemExit(f"--seeds {args.seeds}: need at least 1")
    for b in bits:
        ls.quantizers.check_bits(b, "--bits")
    ls.enable_compilation_cache()
    runtime.code_version()  # the code this run imports, whatever is committed while it runs
    t0 = time.perf_counter()
    settings = {"bits": bits, "configs": args.configs, "seeds": args.seeds, "networks": names,
                "p_eval": P_EVAL, "fd_step": FD_STEP, "data": args.data}
    out = args.out or (OUT if args.data == "digits" else f"{OUT}_{args.data}")
    data_dir = args.data_dir
    if args.data == "mnist" and data_dir is None:  # the shared copy, as the resnet20 benches; never the hub
        data_dir = mnist_resnet20.MNIST_DIR
    try:
        data = ls.data.load(args.data, data_dir=data_dir, calib_size=512, seed=0)
    except (ValueError, OSError) as err:  # no --data-dir for MNIST, or a missing copy
        raise SystemExit(f"--data {args.data}: {err}") from None
    progress = Progress(out + ".progress.json", settings)
    results = {}
    for name in names:
        zoo, fit_kw, model_kw = NETWORKS[name]
        net = ls.train.fit(models.create(zoo, num_classes=10), data, seed=0, **fit_kw)
        if model_kw:  # the trained parameters in the model with more sites
            net = dataclasses.replace(net, model=models.create(zoo, num_classes=10, **model_kw))
        all_sites, _ = ls.sites_of(net.model, net.variables, data.calib.x[:2])
        acts = [s for s in all_sites if s.kind == "activation"]
        r = results[name] = {
            "fp32_test_acc": float(net.accuracy(data.test)),
            "weight_sites": sum(s.kind == "weight" for s in all_sites), "activation_sites": len(acts),
            "activation_grid": "/".join(sorted({s.grid for s in acts})), "landscape": {}, "lapq": {}}
        print(f"{name}: FP32 test accuracy {100 * r['fp32_test_acc']:.2f} %", flush=True)
        for b in bits:
            s = r["landscape"][str(b)] = progress.get(
                f"{name}/A{b}", lambda b=b, net=net: landscape_step(net, data.calib, b))
            print(f"  A{b}: STE trace {s['ste']['trace']:.4g}, off-diag {s['ste']['offdiag_ratio']:.3f}; "
                  f"FD trace {s['fd']['trace']:.4g}, off-diag {s['fd']['offdiag_ratio']:.3f}", flush=True)
        for w_bits, a_bits in configs:
            config = f"W{w_bits}A{a_bits if a_bits else 32}"
            print(f"  LAPQ {config}", flush=True)
            r["lapq"][config] = progress.get(f"{name}/{config}",
                                             lambda w=w_bits, a=a_bits, net=net: lapq_step(net, data, w, a, args.seeds))
    settings.update(seconds=time.perf_counter() - t0, machine=runtime.cpu_model() or "unknown CPU",
                    software=runtime.software())
    atomic.write_atomic(out + ".md", render(results, settings))
    atomic.write_atomic(out + ".json", json.dumps({"settings": settings, "results": results}, indent=1) + "\n")
    progress.finish()
    print(f"wrote {out}.md and .json ({settings['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
