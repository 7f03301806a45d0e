"""Benchmark: seconds per training step of LUQ 4-bit training against FP32 training, resnet20.

One SGD step (Nesterov momentum, weight decay on kernels, batch statistics updated) of the zoo
``resnet20`` on a batch of 128 random 32x32x3 images, the same step as ``landscape.train.fit``,
under the GEMM hook of each configuration:

* ``FP32`` — no hook (the competitor);
* ``INT4 forward`` — ``luq.Recipe(mode="none")``: SAWB INT4 weights and activations, FP32 backward;
* ``FP4 RDN`` — ``luq.Recipe(mode="rdn")``: round-to-nearest FP4 backward;
* ``LUQ`` — ``luq.Recipe(samples=1)`` (hashed random bits, the recipe's default source);
* ``LUQ+SMP(2)`` — ``luq.Recipe(samples=2)`` (the recipe's default);
* ``LUQ threefry`` / ``LUQ+SMP(2) threefry`` — the same with ``prng="jax"``: one threefry word per
  element and sample from ``jax.random.bits``.

Every LUQ configuration keeps the first and last layer FP32 (the recipe's default), so 20 of the
22 products are 4-bit. Timings are wall-clock seconds of one jitted step after compilation: the
configurations are interleaved over ``--rounds`` rounds of ``--steps`` steps and the median per
configuration is reported, because the reference machine's 2 cores are shared with other work.
The ratio to FP32 is printed with the target (LUQ ≤ 1.5x FP32 on CPU).

    python bench/luq_overhead.py [--rounds 5] [--steps 2] [--batch 128] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when the package is not installed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import landscape  # noqa: E402,F401  (sets the XLA:CPU guard before any JAX computation)
import models  # noqa: E402
from landscape import luq, train  # noqa: E402

TARGET = 1.5  # LUQ step / FP32 step on CPU (issue 6, item 7)

CONFIGS = [
    ("FP32", None),
    ("INT4 forward", dict(mode="none")),
    ("FP4 RDN", dict(mode="rdn")),
    ("LUQ", dict(samples=1)),
    ("LUQ+SMP(2)", dict(samples=2)),
    ("LUQ threefry", dict(samples=1, prng="jax")),
    ("LUQ+SMP(2) threefry", dict(samples=2, prng="jax")),
]


def make_step(model, recipe):
    """fit's training step (``train.train_step``) and optimizer at a constant learning rate."""
    hook = recipe.gemm_hook("train") if recipe is not None else None
    streams = recipe.rng_streams if recipe is not None else ()
    tx = train.sgd(0.1, train.DEFAULTS["cifar10"]["weight_decay"])  # fit's 32×32×3 recipe, constant lr
    return train.train_step(model, tx, hook, streams), tx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per configuration and round")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--only", nargs="*", help="configuration labels to run (FP32 is always run)")
    ap.add_argument("--quick", action="store_true", help="batch 16, 2 rounds of 1 step (smoke test)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.only or ()) - {label for label, _ in CONFIGS})
    if unknown:
        ap.error(f"--only {unknown}: unknown labels; known: {', '.join(label for label, _ in CONFIGS)}")
    if args.quick:
        args.batch, args.rounds, args.steps = 16, 2, 1

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
    model = models.create("resnet20", num_classes=10)
    variables = model.init(jax.random.key(0), x[:1], train=False)

    configs = [(label, kw) for label, kw in CONFIGS
               if label == "FP32" or not args.only or label in args.only]
    print(f"resnet20, batch {args.batch} of 32x32x3, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, jax {jax.__version__} on {jax.devices()[0].platform}")
    steps, states = {}, {}
    for label, kw in configs:
        recipe = None if kw is None else luq.Recipe(finetune_epochs=0, **kw)
        v = variables if recipe is None else recipe.init_variables(model, dict(variables), x[:1])
        step, tx = make_step(model, recipe)
        params = v["params"]
        state = {k: val for k, val in v.items() if k != "params"}
        t0 = time.perf_counter()
        out = step(params, state, tx.init(params), x, y, jax.random.key(1))
        jax.block_until_ready(out)
        print(f"  compiled {label:<20} in {time.perf_counter() - t0:6.1f} s", flush=True)
        steps[label], states[label] = step, out[:3]

    times = {label: [] for label, _ in configs}
    for r in range(args.rounds):
        for label, _ in configs:
            params, state, opt_state = states[label]
            t0 = time.perf_counter()
            for i in range(args.steps):
                params, state, opt_state, loss, _ = steps[label](
                    params, state, opt_state, x, y, jax.random.key(r * args.steps + i))
            jax.block_until_ready(loss)
            times[label].append((time.perf_counter() - t0) / args.steps)
            states[label] = (params, state, opt_state)

    base = float(np.median(times["FP32"]))
    print(f"\nseconds per training step (median of {args.rounds} rounds of {args.steps} steps)")
    print("| configuration | s/step | min | max | ratio to FP32 |\n|---|---|---|---|---|")
    for label, _ in configs:
        t = np.asarray(times[label])
        print(f"| {label} | {np.median(t):.3f} | {t.min():.3f} | {t.max():.3f} | "
              f"{np.median(t) / base:.2f}x |")
    for label in ("LUQ", "LUQ+SMP(2)"):
        if label in times:
            ratio = float(np.median(times[label])) / base
            verdict = "meets" if ratio <= TARGET else "MISSES"
            print(f"{label}: {ratio:.2f}x FP32 — {verdict} the target <= {TARGET}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
