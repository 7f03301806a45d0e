"""Rounding rules on the MNIST resnet20: round-to-nearest, GPTQ and AdaRound on the grids that
the MSE rule and LAPQ choose.

Every configuration folds BN, quantizes per tensor (``--per-channel``: one α per output channel of
each weight site; first and last layers FP32), takes α from
the layer-wise MSE rule and, for the ``--lapq`` configurations, also from ``lapq`` (our "batched"
optimizer, one sweep, 5-point p grid, bias correction off). On that grid, ``ls.gptq(loss, α)``
(1 % damping, act-order) and ``ls.adaround(loss, α)`` (1000 full-batch Adam steps per layer,
lr 1e-2, λ = 0.01) each round the weights from 256 of the 512 calibration images, with inputs
from the network rounded so far; GPTQ also as published, from the float network's inputs
(``inputs="float"``: centred on the float kernel, blind to the earlier layers' rounding and to
the activation quantizers). "Nearest" is the exported network with the loss's own
round-to-nearest codes at α; its accuracy can differ from ``loss.accuracy`` by a few test
images whose activations sit on a rounding boundary, since the two programs accumulate in
different orders. Test accuracy on the 10,000 test images. Each finished step is kept in
``results/rounding.progress.json`` (atomically), so a killed run resumes; the file is removed
at the end. No claim is tested: the table reports what each rule does here.

    python bench/rounding.py [--data-dir PATH] [--configs 4:,3:,2:,4:4,3:4] [--lapq 4:4,3:4]
                             [--iterations 1000] [--per-channel]

Writes results/rounding.md and .json (atomically); with ``--per-channel`` (one α per output channel
of every weight site) results/rounding_per_channel.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import mnist_resnet20  # first: puts the repository on sys.path for the imports below
import numpy as np
from mnist_resnet20 import Progress

import landscape as ls
from landscape import atomic

NUM_IMAGES = 256


def summary(res, test) -> dict:
    """Accuracy, summed layer MSE (nearest, the rule's), mean flipped fraction, layers kept at
    nearest, seconds."""
    layers = res.layers.values()
    return dict(acc=res.network.accuracy(test), mse_nearest=sum(f.mse_nearest for f in layers),
                mse=sum(f.mse for f in layers),
                flipped=float(np.mean([f.flipped for f in layers])), kept_nearest=sum(not f.kept for f in layers),
                seconds=res.seconds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mnist_resnet20.add_arguments(p)
    mnist_resnet20.add_config_arguments(p)
    p.add_argument("--iterations", type=int, default=1000, help="AdaRound's Adam steps per layer")
    p.add_argument("--per-channel", action="store_true", help="one α per output channel of each weight site")
    p.add_argument("--out", default=None, help="output path without extension (default results/rounding"
                                              "[_per_channel])")
    args = p.parse_args(argv)
    granularity = "per-channel" if args.per_channel else "per-tensor"
    if args.out is None:
        name = "rounding_per_channel" if args.per_channel else "rounding"
        args.out = os.path.join(mnist_resnet20.ROOT, "results", name)
    configs = mnist_resnet20.parse_configs(args.configs)
    lapq_configs = set(mnist_resnet20.parse_configs(args.lapq))
    data, net = mnist_resnet20.load(args)
    settings = dict(configs=args.configs, lapq=args.lapq, network=os.path.basename(args.network),
                    num_images=NUM_IMAGES, iterations=args.iterations, lr=1e-2, reg=0.01, damp=0.01, act_order=True,
                    **({"per_channel": True} if args.per_channel else {}))
    progress = Progress(args.out + ".progress.json", settings)

    def run(loss, rule, w_bits, a_bits):
        t = time.perf_counter()
        if rule == "MSE":
            alpha = loss.init("mse")
        else:
            alpha = ls.lapq(loss, method="batched", maxiter=1, p_grid=np.linspace(2.0, 4.0, 5),
                            bias_correction=False, on_interrupt="raise").alpha
        alpha_seconds = time.perf_counter() - t
        g = ls.gptq(loss, alpha, num_images=NUM_IMAGES, damp=0.01, act_order=True)
        published = ls.gptq(loss, alpha, num_images=NUM_IMAGES, damp=0.01, act_order=True, inputs="float")
        a = ls.adaround(loss, alpha, num_images=NUM_IMAGES, iterations=args.iterations, lr=1e-2, reg=0.01)
        return dict(w_bits=w_bits, a_bits=a_bits, rule=rule, alpha_seconds=alpha_seconds,
                    nearest_acc=a.nearest.accuracy(data.test), gptq=summary(g, data.test),
                    gptq_float_inputs=summary(published, data.test), adaround=summary(a, data.test))

    rows = []
    for w_bits, a_bits in configs:
        loss = ls.ClipLoss(net, data.calib, w_bits=w_bits, a_bits=a_bits, fold_bn=True, per_channel=args.per_channel)
        for rule in ["MSE"] + (["LAPQ"] if (w_bits, a_bits) in lapq_configs else []):
            key = f"W{w_bits}A{a_bits or 32} {rule}"
            r = progress.get(key, lambda loss=loss, rule=rule, w=w_bits, a=a_bits: run(loss, rule, w, a))
            rows.append(r)
            print(f"  {key:<12} nearest {100 * r['nearest_acc']:.2f} %  GPTQ (float inputs) "
                  f"{100 * r['gptq_float_inputs']['acc']:.2f} %  GPTQ {100 * r['gptq']['acc']:.2f} % "
                  f"({r['gptq']['seconds']:.0f} s)  AdaRound {100 * r['adaround']['acc']:.2f} % "
                  f"({r['adaround']['seconds']:.0f} s)", flush=True)
    fp32 = float(net.accuracy(data.test))
    lines = [f"# Rounding rules, MNIST resnet20{', per-channel α' if args.per_channel else ''}", "",
             f"Generated by `python bench/rounding.py --configs {args.configs} --lapq {shlex.quote(args.lapq)} "
             f"--iterations "
             f"{args.iterations}{' --per-channel' if args.per_channel else ''}` with the checkpoint "
             f"`{os.path.basename(args.network)}` (FP32 test accuracy "
             f"{100 * fp32:.2f} %). BN folded, {granularity} α, first and last layers FP32, 512 calibration "
             f"images for α, {NUM_IMAGES} of them for the rounding (inputs from the network rounded so far). "
             f"GPTQ: 1 % damping, act-order; \"GPTQ, float inputs\" is GPTQ as published, from the float "
             f"network's inputs. AdaRound: {args.iterations} full-batch Adam steps per layer, "
             "lr 1e-2, λ = 0.01. 10,000 test images. Output MSE: the per-layer reconstruction error summed "
             "over the layers, of round-to-nearest → the rule's rounding (each layer's inputs come from the "
             "network that rule rounded so far, so the nearest figure differs between the rules); flipped: "
             "mean fraction of codes that differ from rounding to nearest; seconds include compilation.", "",
             "| config | α from | nearest (%) | GPTQ, float inputs (%) | GPTQ (%) | AdaRound (%) | output MSE, GPTQ | "
             "output MSE, AdaRound | flipped GPTQ / AdaRound | layers kept at nearest GPTQ / AdaRound | "
             "seconds GPTQ / AdaRound |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g, a = r["gptq"], r["adaround"]
        lines.append(f"| W{r['w_bits']}A{r['a_bits'] or 32} | {r['rule']} | {100 * r['nearest_acc']:.2f} | "
                     f"{100 * r['gptq_float_inputs']['acc']:.2f} | {100 * g['acc']:.2f} | {100 * a['acc']:.2f} | "
                     f"{g['mse_nearest']:.3g} → {g['mse']:.3g} | {a['mse_nearest']:.3g} → {a['mse']:.3g} | "
                     f"{g['flipped']:.3f} / {a['flipped']:.3f} | {g['kept_nearest']} / {a['kept_nearest']} | "
                     f"{g['seconds']:.0f} / {a['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    atomic.write_atomic(args.out + ".md", text)
    atomic.write_atomic(args.out + ".json", json.dumps(dict(rows=rows, fp32_test_acc=fp32, settings=settings),
                                                        indent=1) + "\n")
    progress.finish()
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
