"""Reproduce the LAPQ paper's analysis in one command (offline by default).

    python paper_repro.py            # bundled digits, the default resnet8

This first version trains (or loads from cache) the default model and prints the test
accuracy per bit width under layer-wise max and MSE clipping.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--bits", default="2,3,4,8", help="comma-separated bit widths (W = A)")
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import landscape as ls
    import models

    bits = [int(b) for b in args.bits.split(",")]
    t0 = time.time()
    data = ls.data.load(args.data, data_dir=args.data_dir, calib_size=args.calib_size, seed=args.seed)
    net = ls.train.fit(models.create(args.model, num_classes=data.num_classes), data, seed=args.seed)
    print(f"{args.model} on {args.data}: FP32 test accuracy {net.accuracy(data.test):.4f}")
    print("\n| W/A bits | max clipping | MSE clipping |\n|---|---|---|")
    for b in bits:
        loss = ls.ClipLoss(net, data.calib, w_bits=b, a_bits=b)
        row = [f"{loss.accuracy(loss.init(rule), data.test):.4f}" for rule in ("max", "mse")]
        print(f"| W{b}A{b} | " + " | ".join(row) + " |")
    print(f"\n({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
