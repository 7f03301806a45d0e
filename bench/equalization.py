"""Cross-layer equalization on the MNIST resnet20: per-tensor quantization of the BN-folded
network with and without CLE, against per-channel α (what CLE tries to make unnecessary).

Every configuration takes α from the layer-wise MSE rule (first and last layers FP32, 512
calibration images, the 10,000 test images), once without and once with per-channel weight bias
correction (``ClipLoss(bias_correction=True)``: each output channel's quantized weights get the
float weights' mean back, which removes the systematic per-channel shift that clipping and
rounding leave in every output). For the ``--lapq`` configurations the
per-tensor variants are also calibrated jointly with ``lapq`` (our "batched" optimizer, one sweep,
5-point p grid, bias correction off). No claim is tested: the tables report what CLE does here,
including where it hurts.

    python bench/equalization.py [--data-dir PATH] [--configs 4:,3:,2:,4:4,3:4] [--lapq 4:4,3:4]

Writes results/equalization.md and .json (atomically). Each finished row is kept in
results/equalization.progress.json (atomically), keyed by its kind, bit widths, variant and the
fingerprint of the weights it quantizes, so a rerun after an interruption computes only the missing
rows (with other --configs/--lapq too: the rows they share are reused); the file is removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import sys
import time

import mnist_resnet20  # first: puts the repository on sys.path for the imports below
from mnist_resnet20 import Progress

import landscape as ls
from landscape import atomic
from landscape.train import weights_fingerprint

LAPQ_OPTIONS = dict(method="batched", maxiter=1, p_grid=[2.0, 2.5, 3.0, 3.5, 4.0], bias_correction=False)
CALIB_SIZE = 512  # mnist_resnet20.load's calibration sample (seed 0)


def progress_settings(data) -> dict:
    """What every row depends on besides its own key: the data (calibration sample and test
    images), the calibration size and the LAPQ options."""
    return dict(data_fingerprint=data.fingerprint(), calib_size=CALIB_SIZE, calib_seed=0, alpha="mse",
                lapq=LAPQ_OPTIONS)


def row_key(kind: str, w_bits: int, a_bits: int | None, variant: str, network: str) -> str:
    """A finished row's key in the progress store: its kind ("mse" or "lapq"), bit widths,
    variant and the fingerprint of the weights it quantizes (CLE's output for the CLE variant)."""
    return json.dumps(dict(kind=kind, w_bits=w_bits, a_bits=a_bits, variant=variant, network=network),
                      sort_keys=True, ensure_ascii=False)


def mse_row(network, data, w_bits, a_bits, label, options) -> dict:
    """α from the MSE rule, without and with per-channel weight bias correction."""
    row = dict(w_bits=w_bits, a_bits=a_bits, variant=label)
    for corrected in (False, True):
        loss = ls.ClipLoss(network, data.calib, w_bits=w_bits, a_bits=a_bits, bias_correction=corrected, **options)
        alpha = loss.init("mse")
        key = "_bc" if corrected else ""
        row["calib_loss" + key] = float(loss(alpha))
        row["test_acc" + key] = float(loss.accuracy(alpha, data.test))
    return row


def lapq_row(network, data, w_bits, a_bits, label, options) -> dict:
    loss = ls.ClipLoss(network, data.calib, w_bits=w_bits, a_bits=a_bits, **options)
    res = ls.lapq(loss, **LAPQ_OPTIONS, on_interrupt="raise")
    return dict(w_bits=w_bits, a_bits=a_bits, variant=label, calib_loss=float(res.loss),
                test_acc=float(loss.accuracy(res.alpha, data.test)), seconds=float(res.seconds))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mnist_resnet20.add_arguments(p)
    mnist_resnet20.add_config_arguments(p)
    p.add_argument("--out", default=os.path.join(mnist_resnet20.ROOT, "results", "equalization"))
    args = p.parse_args(argv)
    configs = mnist_resnet20.parse_configs(args.configs)
    data, net = mnist_resnet20.load(args, calib_size=CALIB_SIZE)
    t = time.perf_counter()
    eq = ls.equalization.cross_layer_equalization(net.model, net.variables, data.calib.x[:64])
    seconds = time.perf_counter() - t
    print(f"{eq} in {seconds:.1f} s", flush=True)
    equalized = dataclasses.replace(net, variables=eq.variables)
    variants = [("BN folded, per-tensor α", net, dict(fold_bn=True)),
                ("BN folded + CLE, per-tensor α", equalized, {}),
                ("BN folded, per-channel α", net, dict(fold_bn=True, per_channel=True))]
    fingerprints = {label: weights_fingerprint(network.variables) for label, network, _ in variants}
    progress = Progress(args.out + ".progress.json", progress_settings(data))

    def get(kind, w_bits, a_bits, label, network, options, compute):
        key = row_key(kind, w_bits, a_bits, label, fingerprints[label])
        done = key in progress.steps
        row = progress.get(key, functools.partial(compute, network, data, w_bits, a_bits, label, options))
        return row, " (finished by an earlier run)" if done else ""

    rows = []
    for w_bits, a_bits in configs:
        for label, network, options in variants:
            row, note = get("mse", w_bits, a_bits, label, network, options, mse_row)
            rows.append(row)
            print(f"  W{w_bits}A{a_bits or 32} {label:<30} test accuracy {100 * row['test_acc']:.2f} % "
                  f"(bias-corrected {100 * row['test_acc_bc']:.2f} %){note}", flush=True)
    lapq_rows = []
    for w_bits, a_bits in mnist_resnet20.parse_configs(args.lapq):
        for label, network, options in variants[:2]:
            row, note = get("lapq", w_bits, a_bits, label, network, options, lapq_row)
            lapq_rows.append(row)
            print(f"  W{w_bits}A{a_bits or 32} {label:<30} LAPQ test accuracy {100 * row['test_acc']:.2f} %{note}",
                  flush=True)
    fp32 = float(net.accuracy(data.test))
    lines = ["# Cross-layer equalization, MNIST resnet20", "",
             f"Generated by `python bench/equalization.py --configs {args.configs} --lapq {shlex.quote(args.lapq)}` "
             "with the checkpoint "
             f"`{os.path.basename(args.network)}` (FP32 test accuracy {100 * fp32:.2f} %). α from the MSE rule, "
             f"first and last layers FP32, 512 calibration images, 10,000 test images. `{eq!r}` "
             f"({seconds:.1f} s): the pairs are every block's conv1 → conv2; the rejected candidates feed a "
             f"skip connection as well.", "",
             "| config | variant | calibration loss | test accuracy (%) | with bias correction: calibration "
             "loss | test accuracy (%) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| W{r['w_bits']}A{r['a_bits'] or 32} | {r['variant']} | {r['calib_loss']:.4f} | "
                     f"{100 * r['test_acc']:.2f} | {r['calib_loss_bc']:.4f} | {100 * r['test_acc_bc']:.2f} |")
    if lapq_rows:
        lines += ["", "Then LAPQ (`method='batched'`, one sweep, p grid linspace(2, 4, 5), bias correction off):", "",
                  "| config | variant | calibration loss | test accuracy (%) | seconds |", "|---|---|---|---|---|"]
        for r in lapq_rows:
            lines.append(f"| W{r['w_bits']}A{r['a_bits'] or 32} | {r['variant']} + LAPQ | {r['calib_loss']:.4f} | "
                         f"{100 * r['test_acc']:.2f} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    atomic.write_atomic(args.out + ".md", text)
    record = dict(rows=rows, lapq_rows=lapq_rows, pairs=eq.pairs, rejected=eq.rejected, rounds=eq.rounds,
                  fp32_test_acc=fp32)
    atomic.write_atomic(args.out + ".json", json.dumps(record, indent=1) + "\n")
    progress.finish()
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
