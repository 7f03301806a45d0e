"""Mixed-precision weights from per-layer curvature (HAWQ-V2) against uniform and control
allocations, on the MNIST resnet20.

The network is the committed checkpoint behind the MNIST LAPQ tables; its weights are quantized
(activations FP32, first and last layers FP32 as everywhere in this project) with every site's
α from the layer-wise MSE rule at its width, and evaluated on the 10,000 test images. At each
average budget the script compares:

* uniform widths (2, 3 and 4 bits): the budgets' neighbours;
* ``hawq``: ``allocate_bits`` on Ω_i(b) = tr H_ii / n_i · ‖Q_b(W_i) − W_i‖², the per-layer traces
  from one ``hessian_spectrum`` call on the calibration set;
* ``perturbation only``: the same allocation with the curvature dropped, Ω_i(b) = ‖Q_b(W_i) − W_i‖²,
  which isolates what the Hessian adds;
* ``shuffled curvature``: tr H_ii / n_i permuted across layers (three seeds), a control with the
  same numbers in the wrong places.

Claim checked, threshold fixed before the run: at each budget, ``hawq``'s test accuracy is at
least that of ``perturbation only`` and of the mean shuffled control.

Then the allocation meets LAPQ (``--a-bits``, default 4; ``--a-bits 0`` skips this part): the
``hawq`` widths and the uniform ⌊budget⌋ widths, now with quantized activations and per-channel
weight bias correction, calibrated layer-wise (MSE α) and jointly (``lapq``, ``--lapq-method``,
default our "batched", one sweep, a 5-point p grid). Claims, thresholds fixed before the run: at
each budget, LAPQ on the ``hawq`` widths beats MSE α on them, and beats LAPQ on uniform ⌊budget⌋.

    python bench/bit_allocation.py                 # budgets 2.5 and 3.0 bits
    python bench/bit_allocation.py --budgets 2.25,2.5,2.75 --data-dir PATH
    python bench/bit_allocation.py --a-bits 3 --lapq-method powell

Writes results/bit_allocation.md and .json (atomically). Every finished step (the sensitivities,
each evaluation, each LAPQ run) is kept in results/bit_allocation.progress.json as it completes, so
an interrupted run resumes where it stopped when rerun with the same settings; the file is removed
once the results are written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mnist_resnet20  # noqa: E402
from mnist_resnet20 import Progress  # noqa: E402

import landscape as ls  # noqa: E402
from landscape import atomic  # noqa: E402
from landscape.bit_allocation import Sensitivity  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BITS = (2, 3, 4, 8)
SHUFFLES = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mnist_resnet20.add_arguments(p)
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--budgets", default="2.5,3.0", help="average bits per quantized weight")
    p.add_argument("--num-probes", type=int, default=48, help="Hutch++ probes for the per-layer traces")
    p.add_argument("--a-bits", type=int, default=4, help="activation width of the LAPQ part (0: skip it)")
    p.add_argument("--lapq-method", default="batched", help="batched (ours), powell or cd")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "bit_allocation"))
    return p.parse_args(argv)


def omega_of(sens, widths) -> float:
    """Σ_i Ω_i(b_i) of ``widths`` under the HAWQ sensitivities ``sens``."""
    return float(sum(sens.omega[i, BITS.index(widths[n])] for i, n in enumerate(sens.sites)))


def sensitivities(loss, args) -> dict:
    """HAWQ-V2 sensitivities of ``loss``'s weight sites, as JSON-able arrays and the figures of
    the Hutch++ run behind them."""
    t = time.perf_counter()
    sens = ls.weight_sensitivity(loss, bits=BITS, num_probes=args.num_probes, seed=0)
    spec = sens.spectrum
    return dict(sites=list(sens.sites), sizes=sens.sizes.tolist(), trace=sens.trace.tolist(),
                trace_stderr=sens.trace_stderr.tolist(), error=sens.error.tolist(), macs=sens.macs.tolist(),
                n_hvp=int(spec.n_hvp), total_trace=float(spec.trace), total_stderr=float(spec.trace_stderr),
                lambda_max=float(spec.eigenvalues[0]), seconds=time.perf_counter() - t)


def evaluate(net, data, widths, progress, label):
    """(calibration loss, test accuracy) of weights at ``widths`` with MSE α."""

    def run():
        loss = ls.ClipLoss(net, data.calib, w_bits=dict(widths), a_bits=None)
        alpha = loss.init("mse")
        found = [float(loss(alpha)), float(loss.accuracy(alpha, data.test))]
        print(f"  {label:<28} {loss!r}: test accuracy {100 * found[1]:.2f} %", flush=True)
        return found

    return tuple(progress.get("mse " + repr(sorted(widths.items())), run))


def calibrate(net, data, widths, a_bits, method, label, progress):
    """Weights at ``widths`` and activations at ``a_bits`` (bias correction on): test accuracy of
    MSE α and of ``lapq``'s joint α, with LAPQ's calibration loss, evaluations and seconds."""
    key = f"lapq a{a_bits} {method} " + repr(sorted(widths.items()))
    return dict(progress.get(key, lambda: _calibrate(net, data, widths, a_bits, method)), method=label)


def _calibrate(net, data, widths, a_bits, method):
    loss = ls.ClipLoss(net, data.calib, w_bits=dict(widths), a_bits=a_bits, bias_correction=True)
    mse = loss.init("mse")
    res = ls.lapq(loss, method=method, maxiter=1, p_grid=np.linspace(2.0, 4.0, 5), on_interrupt="raise")
    row = dict(mse_loss=float(loss(mse)), mse_acc=float(loss.accuracy(mse, data.test)),
               p_star=res.p_star, lapq_loss=float(res.loss), lapq_acc=float(loss.accuracy(res.alpha, data.test)),
               n_evals=int(res.n_evals), seconds=float(res.seconds), widths=dict(widths))
    print(f"  {loss!r}: MSE α {100 * row['mse_acc']:.2f} %, LAPQ ({method}) "
          f"{100 * row['lapq_acc']:.2f} % in {res.seconds:.0f} s", flush=True)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.a_bits != 0:
        ls.quantizers.check_bits(args.a_bits, "--a-bits")
    budgets = [float(b) for b in args.budgets.split(",")]
    data, net = mnist_resnet20.load(args, args.calib_size)
    loss = ls.ClipLoss(net, data.calib, w_bits=4, a_bits=None)
    fp32 = float(net.accuracy(data.test))
    print(f"{loss!r} on MNIST; FP32 test accuracy {100 * fp32:.2f} %", flush=True)

    config = dict(network=os.path.abspath(args.network), data_dir=os.path.abspath(args.data_dir),
                  calib_size=args.calib_size, num_probes=args.num_probes, bits=list(BITS),
                  numerics=ls.train.numerics())
    progress = Progress(args.out + ".progress.json", config)
    spec = progress.get("sensitivity", lambda: sensitivities(loss, args))
    trace, error = np.array(spec["trace"]), np.array(spec["error"])
    sens = Sensitivity(tuple(spec["sites"]), np.array(spec["sizes"]), BITS, trace, np.array(spec["trace_stderr"]),
                       error, (trace / np.array(spec["sizes"]))[:, None] * error, "mse", None, np.array(spec["macs"]))
    print(f"sensitivities in {spec['seconds']:.1f} s ({spec['n_hvp']} HVPs; trace {spec['total_trace']:.4g} ± "
          f"{spec['total_stderr']:.2g}; λ_max {spec['lambda_max']:.4g})\n{sens}\n", flush=True)

    sizes = sens.sizes
    controls = {"perturbation only": dataclasses.replace(sens, omega=sens.error)}
    for seed in range(SHUFFLES):
        perm = np.random.default_rng(seed).permutation(len(sens.sites))
        curvature = (sens.trace / sizes)[perm]
        controls[f"shuffled curvature {seed}"] = dataclasses.replace(sens, omega=curvature[:, None] * sens.error)

    rows = []
    for b in (2, 3, 4):
        calib_loss, acc = evaluate(net, data, dict.fromkeys(sens.sites, b), progress, f"uniform {b}")
        rows.append(dict(budget=None, method=f"uniform {b}", average_bits=float(b), calib_loss=calib_loss,
                         test_acc=acc, widths=dict.fromkeys(sens.sites, b)))
    verdicts = []
    for budget in budgets:
        found = {}
        for method, s in [("hawq", sens)] + list(controls.items()):
            alloc = ls.allocate_bits(s, average_bits=budget)
            calib_loss, acc = evaluate(net, data, alloc.bits, progress, f"{method} @ {budget}")
            hawq_omega = omega_of(sens, alloc.bits)
            found[method] = acc
            rows.append(dict(budget=budget, method=method, average_bits=alloc.average_bits, calib_loss=calib_loss,
                             test_acc=acc, hawq_omega=hawq_omega, widths=alloc.bits))
        # The same curvature under a compute budget instead: the BOPs of uniform `budget`-bit
        # weights (HAWQ-V3's constraint; activations one width, so their width cancels out).
        a_for_bops = args.a_bits or 32
        alloc = ls.allocate_bits(sens, budget_bops=int(budget * sens.bops(dict.fromkeys(sens.sites, 1), a_for_bops)),
                                 a_bits=a_for_bops)
        calib_loss, acc = evaluate(net, data, alloc.bits, progress, f"hawq (BOPs) @ {budget}")
        hawq_omega = omega_of(sens, alloc.bits)
        rows.append(dict(budget=budget, method="hawq (BOPs)", average_bits=alloc.average_bits, calib_loss=calib_loss,
                         test_acc=acc, hawq_omega=hawq_omega, widths=alloc.bits))
        shuffled = float(np.mean([v for k, v in found.items() if k.startswith("shuffled")]))
        holds = found["hawq"] >= found["perturbation only"] and found["hawq"] >= shuffled
        verdicts.append(dict(budget=budget, hawq=found["hawq"], perturbation_only=found["perturbation only"],
                             shuffled_mean=shuffled, holds=holds))

    total = float(np.sum(sens.sizes))

    def mac_bits(widths):
        return sens.bops(widths, 1) / float(np.sum(sens.macs))

    lapq_rows, lapq_verdicts = [], []
    if args.a_bits:
        print(f"\nwith {args.a_bits}-bit activations, MSE α against LAPQ ({args.lapq_method}):", flush=True)
        uniform = {}
        for budget in budgets:
            floor = int(np.floor(budget))
            if floor not in uniform:
                uniform[floor] = calibrate(net, data, dict.fromkeys(sens.sites, max(floor, min(BITS))),
                                           args.a_bits, args.lapq_method, f"uniform {floor}", progress)
                lapq_rows.append(dict(budget=None, **uniform[floor]))
            hawq = next(r for r in rows if r["budget"] == budget and r["method"] == "hawq")
            row = calibrate(net, data, hawq["widths"], args.a_bits, args.lapq_method, f"hawq @ {budget}", progress)
            lapq_rows.append(dict(budget=budget, **row))
            by_bops = next(r for r in rows if r["budget"] == budget and r["method"] == "hawq (BOPs)")
            lapq_rows.append(dict(budget=budget, **calibrate(net, data, by_bops["widths"], args.a_bits,
                                                             args.lapq_method, f"hawq (BOPs) @ {budget}", progress)))
            lapq_verdicts.append(dict(budget=budget, hawq_lapq=row["lapq_acc"], hawq_mse=row["mse_acc"],
                                      uniform_lapq=uniform[floor]["lapq_acc"], uniform_bits=floor,
                                      holds=row["lapq_acc"] > row["mse_acc"]
                                      and row["lapq_acc"] > uniform[floor]["lapq_acc"]))

    lines = ["# Mixed-precision weights by per-layer curvature (HAWQ-V2), MNIST resnet20", "",
             f"Generated by `python bench/bit_allocation.py --budgets {args.budgets} --a-bits {args.a_bits} "
             f"--lapq-method {args.lapq_method}` with the checkpoint "
             f"`{os.path.basename(args.network)}` (FP32 test accuracy {100 * fp32:.2f} %). "
             f"Weights only (activations FP32), first and last layers FP32, per-tensor α from the MSE rule at "
             f"each site's width, {args.calib_size} calibration images, 10,000 test images. Per-layer traces: "
             f"{spec['n_hvp']} HVPs, trace {spec['total_trace']:.4g} ± {spec['total_stderr']:.2g}.", "",
             "`hawq (BOPs)` allocates under the bit operations of uniform widths at the budget (Σ MACs_i·b_i "
             "≤ budget·Σ MACs_i, activations one width) instead of their size; MAC-weighted bits = "
             "Σ MACs_i·b_i / Σ MACs_i, the compute analogue of the average.", "",
             "| budget (avg bits) | allocation | avg bits | MAC-weighted bits | Σ Ω (HAWQ) | calibration loss | "
             "test accuracy (%) | widths, network order |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        widths = " ".join(str(v) for v in r["widths"].values())
        omega = f"{r['hawq_omega']:.4g}" if "hawq_omega" in r else "–"
        lines.append(f"| {r['budget'] if r['budget'] is not None else '–'} | {r['method']} | "
                     f"{r['average_bits']:.3f} | {mac_bits(r['widths']):.3f} | {omega} | {r['calib_loss']:.4f} | "
                     f"{100 * r['test_acc']:.2f} | {widths} |")
    lines += ["", "Claim (threshold fixed before the run): at each budget, hawq's test accuracy ≥ that of "
              "'perturbation only' and ≥ the mean of the shuffled controls.", ""]
    for v in verdicts:
        lines.append(f"- [{'x' if v['holds'] else ' '}] {v['budget']} bits: hawq {100 * v['hawq']:.2f} %, "
                     f"perturbation only {100 * v['perturbation_only']:.2f} %, shuffled mean "
                     f"{100 * v['shuffled_mean']:.2f} %")
    if lapq_rows:
        lines += ["", f"## The allocation, then LAPQ: weights as allocated, activations at {args.a_bits} bits", "",
                  f"Per-channel weight bias correction on; α layer-wise (MSE) or joint (`lapq`, method "
                  f"{args.lapq_method!r}, one sweep, p grid linspace(2, 4, 5)); same calibration and test sets.", "",
                  "| budget (avg bits) | weights | avg bits | MAC-weighted bits | calibration loss, MSE α | "
                  "test accuracy, MSE α (%) | p* | calibration loss, LAPQ | test accuracy, LAPQ (%) | evaluations | "
                  "seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in lapq_rows:
            avg = sum(n * r["widths"][name] for n, name in zip(sens.sizes, sens.sites, strict=True)) / total
            lines.append(f"| {r['budget'] if r['budget'] is not None else '–'} | {r['method']} | "
                         f"{avg:.3f} | {mac_bits(r['widths']):.3f} | {r['mse_loss']:.4f} | "
                         f"{100 * r['mse_acc']:.2f} | {r['p_star']:.2f} | {r['lapq_loss']:.4f} | "
                         f"{100 * r['lapq_acc']:.2f} | {r['n_evals']} | {r['seconds']:.0f} |")
        lines += ["", "Claims (thresholds fixed before the run): at each budget, LAPQ on the hawq widths beats "
                  "MSE α on them and beats LAPQ on uniform ⌊budget⌋ bits.", ""]
        for v in lapq_verdicts:
            mark = "x" if v["holds"] else " "
            lines.append(f"- [{mark}] {v['budget']} bits: hawq + LAPQ {100 * v['hawq_lapq']:.2f} %, "
                         f"hawq + MSE {100 * v['hawq_mse']:.2f} %, uniform {v['uniform_bits']} + LAPQ "
                         f"{100 * v['uniform_lapq']:.2f} %")
    lines += ["", "Per-layer sensitivities:", "", "```", repr(sens), "```"]
    text = "\n".join(lines) + "\n"
    atomic.write_atomic(args.out + ".md", text)
    record = dict(rows=rows, verdicts=verdicts, sites=list(sens.sites), sizes=sizes.tolist(), bits=list(BITS),
                  trace=sens.trace.tolist(), trace_stderr=sens.trace_stderr.tolist(), error=sens.error.tolist(),
                  fp32_test_acc=fp32, a_bits=args.a_bits, lapq_method=args.lapq_method, lapq_rows=lapq_rows,
                  lapq_verdicts=lapq_verdicts)
    atomic.write_atomic(args.out + ".json", json.dumps(record, indent=1) + "\n")
    progress.finish()
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
