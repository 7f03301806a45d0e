"""What the MNIST resnet20 benchmarks share: the data and checkpoint, their command-line
options, "W:A" configurations, and a resumable record of finished steps."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import landscape as ls  # noqa: E402
import models  # noqa: E402
from landscape import runtime  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MNIST_DIR = os.path.join(ROOT, "..", "shared", "data", "mnist")
NETWORK = os.path.join(ROOT, "results", "networks", "cifarresnet-8888f8fd66902a057f7b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--data-dir and --network, defaulting to the shared MNIST copy and the committed checkpoint."""
    parser.add_argument("--data-dir", default=MNIST_DIR, help="MNIST in the hub's parquet layout")
    parser.add_argument("--network", default=NETWORK, help="resnet20 checkpoint (msgpack + json)")


def load(args, calib_size: int = 512):
    """(data, network) from the parsed --data-dir and --network (calibration seed 0)."""
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"--data-dir {args.data_dir!r} does not exist: pass a local parquet copy of MNIST")
    data = ls.data.load("mnist", data_dir=args.data_dir, calib_size=calib_size, seed=0)
    return data, ls.train.load_network(models.create("resnet20", num_classes=10), args.network)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--configs (W:A list) and --lapq (the configs also calibrated with LAPQ)."""
    parser.add_argument("--configs", default="4:,3:,2:,4:4,3:4")
    parser.add_argument("--lapq", default="4:4,3:4", help="configs also calibrated with LAPQ ('' for none)")


def parse_configs(text: str) -> list[tuple[int, int | None]]:
    """"4:,4:4" → [(4, None), (4, 4)]; an empty string gives none."""
    return [parse_config(c) for c in text.split(",") if c]


def parse_config(text: str) -> tuple[int, int | None]:
    """"W:A" → (w_bits, a_bits), an empty A meaning FP32 activations."""
    try:
        w, a = text.split(":")
        return int(w), (int(a) if a else None)
    except ValueError:
        raise SystemExit(f"config {text!r}: use W:A such as 4:4, or 4: for FP32 activations") from None


def Progress(path, config: dict, say=print) -> runtime.ResultStore:  # noqa: N802 (named as the class it makes)
    """The finished steps of a run, by key, in a JSON file rewritten atomically after each one; a
    rerun with the same configuration and the same code (``runtime.code_version()``) takes them
    from there. Without the code in the key, a rerun after a change had mixed the steps of two
    versions in one table (bench/bit_allocation.py after the MSE rule's fix)."""
    return runtime.ResultStore(path, {**config, "code": runtime.code_version()}, say)
