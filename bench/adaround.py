"""AdaRound on the MNIST resnet20: round-to-nearest against learnt rounding, on the grids that
the MSE rule and LAPQ choose.

Every configuration folds BN, quantizes per tensor (first and last layers FP32), takes α from
the layer-wise MSE rule and, for the ``--lapq`` configurations, also from ``lapq`` (our "batched"
optimizer, one sweep, 5-point p grid, bias correction off), and then runs
``ls.adaround(loss, α)`` on 256 of the 512 calibration images (1000 Adam steps per layer, lr
1e-2, λ = 0.01, full batch). "Nearest" is the exported network with the loss's own
round-to-nearest codes at α (``result.nearest``); its accuracy can differ from ``loss.accuracy``
by a few test images whose activations sit on a rounding boundary, since the two programs
accumulate in different orders. Test accuracy on the 10,000 test images. Each finished step is kept in
``results/adaround.progress.json`` (atomically), so a killed run resumes; the file is removed at
the end. No claim is tested: the table reports what AdaRound does here.

    python bench/adaround.py [--data-dir PATH] [--configs 4:,3:,2:,4:4,3:4] [--lapq 4:4,3:4]
                             [--iterations 1000]

Writes results/adaround.md and .json (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import landscape as ls  # noqa: E402
import models  # noqa: E402
from landscape import runtime  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MNIST_DIR = os.path.join(ROOT, "..", "shared", "data", "mnist")
NETWORK = os.path.join(ROOT, "results", "networks", "cifarresnet-8888f8fd66902a057f7b")


def parse_config(text: str) -> tuple[int, int | None]:
    """"W:A" → (w_bits, a_bits), an empty A meaning FP32 activations."""
    try:
        w, a = text.split(":")
        return int(w), (int(a) if a else None)
    except ValueError:
        raise SystemExit(f"config {text!r}: use W:A such as 4:4, or 4: for FP32 activations") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=MNIST_DIR)
    p.add_argument("--network", default=NETWORK)
    p.add_argument("--configs", default="4:,3:,2:,4:4,3:4")
    p.add_argument("--lapq", default="4:4,3:4", help="configs also calibrated with LAPQ ('' for none)")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "adaround"))
    args = p.parse_args(argv)
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"--data-dir {args.data_dir!r} does not exist: pass a local parquet copy of MNIST")
    configs = [parse_config(c) for c in args.configs.split(",")]
    lapq_configs = {parse_config(c) for c in args.lapq.split(",") if c}
    data = ls.data.load("mnist", data_dir=args.data_dir, calib_size=512, seed=0)
    net = ls.train.load_network(models.create("resnet20", num_classes=10), args.network)
    round_kw = dict(num_images=256, iterations=args.iterations, lr=1e-2, reg=0.01)
    settings = dict(configs=args.configs, lapq=args.lapq, network=os.path.basename(args.network), **round_kw)
    progress_path = args.out + ".progress.json"
    saved = runtime.read_json(progress_path, {})
    done = saved.get("rows", {}) if saved.get("settings") == settings else {}
    rows = []
    for w_bits, a_bits in configs:
        loss = ls.ClipLoss(net, data.calib, w_bits=w_bits, a_bits=a_bits, fold_bn=True)
        starts = [("MSE", None)] + ([("LAPQ", None)] if (w_bits, a_bits) in lapq_configs else [])
        for rule, _ in starts:
            key = f"W{w_bits}A{a_bits or 32} {rule}"
            if key not in done:
                t = time.perf_counter()
                if rule == "MSE":
                    alpha = loss.init("mse")
                else:
                    alpha = ls.lapq(loss, method="batched", maxiter=1, p_grid=np.linspace(2.0, 4.0, 5),
                                    bias_correction=False).alpha
                alpha_seconds = time.perf_counter() - t
                res = ls.adaround(loss, alpha, **round_kw)
                layers = res.layers.values()
                done[key] = dict(
                    w_bits=w_bits, a_bits=a_bits, rule=rule, alpha_seconds=alpha_seconds,
                    nearest_acc=res.nearest.accuracy(data.test), adaround_acc=res.network.accuracy(data.test),
                    mse_nearest=sum(f.mse_nearest for f in layers), mse=sum(f.mse for f in layers),
                    flipped=float(np.mean([f.flipped for f in layers])),
                    kept_nearest=sum(not f.adaround_kept for f in layers), seconds=res.seconds)
                runtime.write_atomic(progress_path, json.dumps(dict(settings=settings, rows=done)) + "\n")
            r = done[key]
            rows.append(r)
            print(f"  {key:<12} nearest {100 * r['nearest_acc']:.2f} %  AdaRound {100 * r['adaround_acc']:.2f} %  "
                  f"({r['seconds']:.0f} s)", flush=True)
    fp32 = float(net.accuracy(data.test))
    lines = ["# AdaRound, MNIST resnet20", "",
             f"Generated by `python bench/adaround.py --configs {args.configs} --lapq {args.lapq} --iterations "
             f"{args.iterations}` with the checkpoint `{os.path.basename(args.network)}` (FP32 test accuracy "
             f"{100 * fp32:.2f} %). BN folded, per-tensor α, first and last layers FP32, 512 calibration "
             f"images for α, 256 of them for AdaRound ({args.iterations} Adam steps per layer, lr 1e-2, "
             "λ = 0.01, inputs from the network quantized so far), 10,000 test images. Output MSE: the "
             "per-layer reconstruction error summed over the layers; flipped: mean fraction of codes that "
             "differ from rounding to nearest.", "",
             "| config | α from | nearest (%) | AdaRound (%) | output MSE nearest → AdaRound | flipped | "
             "layers kept at nearest | AdaRound seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| W{r['w_bits']}A{r['a_bits'] or 32} | {r['rule']} | {100 * r['nearest_acc']:.2f} | "
                     f"{100 * r['adaround_acc']:.2f} | {r['mse_nearest']:.3g} → {r['mse']:.3g} | {r['flipped']:.3f} | "
                     f"{r['kept_nearest']} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    runtime.write_atomic(args.out + ".md", text)
    runtime.write_atomic(args.out + ".json", json.dumps(dict(rows=rows, fp32_test_acc=fp32, settings=settings),
                                                        indent=1) + "\n")
    if os.path.exists(progress_path):
        os.remove(progress_path)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
