"""Post-training quantization of the zoo's small MobileNetV2 on digits: depthwise layers per
tensor, with and without cross-layer equalization, against per-channel α, then LAPQ.

DFQ (Nagel et al., 2019) and LAPQ both start from MobileNet's depthwise convolutions: after BN
folding their output channels span very different ranges, so one α per tensor rounds the small
channels away. This script measures what that does here, on the small network ``fit`` trains on
scikit-learn's digits (``models.create("mobilenet", num_classes=10)``, the digits defaults; cached
under $LANDSCAPE_CACHE), for each "W:A" configuration:

* BN folded, per-tensor α (the layer-wise MSE rule);
* BN folded + CLE (:func:`landscape.equalization.cross_layer_equalization`), per-tensor α;
* BN folded, per-channel α;

and for the --lapq configurations, LAPQ (``method="batched"``) from each per-tensor variant.
The per-layer channel-range spread (max / min of the per-output-channel max |w|, folded) of each
depthwise kernel is printed before and after CLE. No claim is tested: the table reports what
happens, including where CLE does not help.

    python bench/mobilenet_digits.py [--configs 8:8,6:6,4:8,4:4,3:8,3:3] [--lapq 4:4,3:3]

Writes results/mobilenet_digits.md and .json atomically. It runs in minutes on 2 cores, so a
rerun computes everything again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from mnist_resnet20 import parse_configs  # noqa: E402

import landscape as ls  # noqa: E402
import models  # noqa: E402
from landscape import atomic, folding  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def spread(variables, names) -> dict[str, float]:
    """max / min over output channels of max |w| for each named kernel (inf where a channel is 0)."""
    out = {}
    for name in names:
        node = variables["params"]
        for part in name.split("/"):
            node = node[part]
        r = np.max(np.abs(np.asarray(node["kernel"])), axis=(0, 1, 2))
        out[name] = float(np.max(r) / np.min(r)) if np.min(r) > 0 else float("inf")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default="8:8,6:6,4:8,4:4,3:8,3:3", help="W:A bit widths (A empty: FP32 activations)")
    p.add_argument("--lapq", default="4:4,3:3", help="configs also calibrated with LAPQ ('' for none)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "mobilenet_digits"))
    args = p.parse_args(argv)
    configs, lapq_configs = parse_configs(args.configs), parse_configs(args.lapq)

    data = ls.data.load("digits", calib_size=256, seed=0)
    t = time.perf_counter()
    net = ls.train.fit(models.create("mobilenet", num_classes=10), data, seed=args.seed)
    fp32 = float(net.accuracy(data.test))
    print(f"mobilenet on digits: FP32 test accuracy {100 * fp32:.2f} % ({time.perf_counter() - t:.1f} s, "
          "training or loading the cached network)", flush=True)

    x = data.calib.x[:64]
    t = time.perf_counter()
    eq = ls.equalization.cross_layer_equalization(net.model, net.variables, x)
    eq_seconds = time.perf_counter() - t
    print(f"{eq} in {eq_seconds:.1f} s; pairs {eq.pairs}; rejected {eq.rejected}", flush=True)
    folded = folding.fold_batchnorm(net.model, net.variables, x[:1])
    depthwise = [s.name for s in ls.ClipLoss(net, data.calib, w_bits=8, a_bits=None, quantize_first_last=True).sites
                 if s.name.endswith("/dw")]
    before, after = spread(folded, depthwise), spread(eq.variables, depthwise)
    for name in depthwise:
        print(f"  {name}: channel-range spread {before[name]:.1f} folded, {after[name]:.1f} after CLE")

    equalized = dataclasses.replace(net, variables=eq.variables)
    variants = [("BN folded, per-tensor α", net, dict(fold_bn=True)),
                ("BN folded + CLE, per-tensor α", equalized, {}),
                ("BN folded, per-channel α", net, dict(fold_bn=True, per_channel=True))]
    rows = []
    for w_bits, a_bits in configs:
        for label, network, options in variants:
            loss = ls.ClipLoss(network, data.calib, w_bits=w_bits, a_bits=a_bits, **options)
            alpha = loss.init("mse")
            row = dict(w_bits=w_bits, a_bits=a_bits, variant=label, calib_loss=float(loss(alpha)),
                       test_acc=float(loss.accuracy(alpha, data.test)))
            rows.append(row)
            print(f"  W{w_bits}A{a_bits or 32} {label:<30} MSE: loss {row['calib_loss']:.4f}, "
                  f"test accuracy {100 * row['test_acc']:.2f} %", flush=True)
    lapq_rows = []
    for w_bits, a_bits in lapq_configs:
        for label, network, options in variants[:2]:
            loss = ls.ClipLoss(network, data.calib, w_bits=w_bits, a_bits=a_bits, **options)
            res = ls.lapq(loss, method="batched", on_interrupt="raise")  # an interrupted row is not a result
            row = dict(w_bits=w_bits, a_bits=a_bits, variant=label, calib_loss=float(res.loss),
                       test_acc=float(loss.accuracy(res.alpha, data.test)), seconds=float(res.seconds))
            lapq_rows.append(row)
            print(f"  W{w_bits}A{a_bits or 32} {label:<30} LAPQ: loss {row['calib_loss']:.4f}, "
                  f"test accuracy {100 * row['test_acc']:.2f} % ({row['seconds']:.0f} s)", flush=True)

    lines = ["# Small MobileNetV2 on digits: per-tensor, CLE, per-channel", "",
             f"Generated by `python bench/mobilenet_digits.py --configs {args.configs} "
             f"--lapq {shlex.quote(args.lapq)}` "
             f"(training seed {args.seed}; `models.create('mobilenet', num_classes=10)`, `fit`'s digits defaults; "
             f"FP32 test accuracy {100 * fp32:.2f} %). α from the layer-wise MSE rule, first and last layers FP32, "
             f"256 calibration images, the {len(data.test)} test images. `{eq!r}` ({eq_seconds:.1f} s); rejected: "
             f"{', '.join(f'{a} → {b}' for a, b in eq.rejected) or 'none'}.", "",
             "Channel-range spread of the BN-folded depthwise kernels (max / min over output channels of "
             "max |w|):", "",
             "| layer | folded | after CLE |", "|---|---|---|"]
    lines += [f"| {n} | {before[n]:.1f} | {after[n]:.1f} |" for n in depthwise]
    lines += ["", "| config | variant | calibration loss | test accuracy (%) |", "|---|---|---|---|"]
    lines += [f"| W{r['w_bits']}A{r['a_bits'] or 32} | {r['variant']} | {r['calib_loss']:.4f} | "
              f"{100 * r['test_acc']:.2f} |" for r in rows]
    if lapq_rows:
        lines += ["", "LAPQ (`method='batched'`, defaults) from each per-tensor variant:", "",
                  "| config | variant | calibration loss | test accuracy (%) | seconds |", "|---|---|---|---|---|"]
        lines += [f"| W{r['w_bits']}A{r['a_bits'] or 32} | {r['variant']} + LAPQ | {r['calib_loss']:.4f} | "
                  f"{100 * r['test_acc']:.2f} | {r['seconds']:.0f} |" for r in lapq_rows]
    text = "\n".join(lines) + "\n"
    atomic.write_atomic(args.out + ".md", text)
    record = dict(fp32_test_acc=fp32, pairs=eq.pairs, rejected=eq.rejected, rounds=eq.rounds,
                  spread_folded=before, spread_cle=after, rows=rows, lapq_rows=lapq_rows)
    atomic.write_atomic(args.out + ".json", json.dumps(record, indent=1) + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
