"""Benchmark: N:M and transposable N:M sparse training from scratch and AdaPrune, against dense training.

For each dataset (digits; MNIST when its parquet files are present) and seed, with the zoo ``cnn``:

* **from scratch**: ``landscape.train.fit(..., recipe=landscape.sparsity.Recipe(keep, block,
  transposable, update_every=40))`` for dense, 2:4, 4:8, T-4:8, T-2:4 (50%) and 1:4, T-1:4 (75%);
  test accuracy mean ± std over the seeds, the difference and ratio to dense (the competitor,
  trained in the same run), the kept fraction of the sparse layers, and the share of the training
  wall time spent in the host-side mask solver;
* **AdaPrune** from the seed's dense network (``landscape.adaprune.adaprune``, 512 calibration images
  from the training split, Adam lr 1e-3, batch 50, 1000 iterations per layer on digits as in the
  reference, 300 on MNIST to fit the 2-core budget): accuracy with the
  magnitude mask only, + BN re-estimation, AdaPrune, AdaPrune + BN re-estimation;
* **mask diversity** of each structure for one 8x8 tile beside the fraction of |W| its optimal mask
  keeps, on Gaussian weights and on the trained dense networks' sparse layers (greedy too for the
  transposable ones).

Claims are checked against thresholds fixed below, before the run. Results go to a JSON file (one
record per run; the script resumes from it, so an interrupted run continues where it stopped) and a
Markdown report, both written atomically after every run. Trained networks are also cached by
``fit`` (``$LANDSCAPE_CACHE``).

    python bench/nm_training.py [--quick] [--seeds 0 1 2] [--datasets digits mnist]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when the package is not installed

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import landscape as ls  # noqa: E402
import models  # noqa: E402
from landscape import adaprune as ap  # noqa: E402
from landscape import sparsity as sp  # noqa: E402

# (label, keep, block, transposable); keep=None is dense.
STRUCTURES = [
    ("dense", None, None, False),
    ("2:4", 2, 4, False),
    ("4:8", 4, 8, False),
    ("T-4:8", 4, 8, True),
    ("T-2:4", 2, 4, True),
    ("1:4", 1, 4, False),
    ("T-1:4", 1, 4, True),
]
# Mask-diversity table: (label, kind, keep, block) at 50% and 75% sparsity, one 8x8 tile (T = 64).
MD_STRUCTURES = [
    ("unstructured 50%", "unstructured", 1, 2),
    ("4:8", "nm", 4, 8),
    ("2:4", "nm", 2, 4),
    ("T-4:8", "transposable", 4, 8),
    ("1:2", "nm", 1, 2),
    ("T-2:4", "transposable", 2, 4),
    ("T-1:2", "transposable", 1, 2),
    ("unstructured 75%", "unstructured", 1, 4),
    ("2:8", "nm", 2, 8),
    ("1:4", "nm", 1, 4),
    ("T-2:8", "transposable", 2, 8),
    ("T-1:4", "transposable", 1, 4),
]

# What a --quick report says above its claims: they keep the full run's thresholds.
QUICK_NOTE = ("**A `--quick` smoke run** (digits only, one seed, 3 epochs, 50 AdaPrune iterations): the "
              "thresholds are the full run's, so a FAIL here says the run was short, not that the claim "
              "fails; `results/nm_training.md` holds the full run.")

# Thresholds of the claims, fixed before the run.
MIN_SPEARMAN_MD = 0.9  # rank correlation of log10 MD and retained |W| (Gaussian tiles, 50%)
MIN_GREEDY_RETAINED = 0.97  # greedy / exact retained |W| for T-4:8 on trained weights
MAX_T48_GAP = 1.0  # points of accuracy: T-4:8 from scratch >= 2:4 from scratch - this
MIN_ADAPRUNE_GAIN = 0.0  # points: AdaPrune + BN >= magnitude only + this, every structure
MAX_SPARSE_50_GAP = 1.0  # points: 50% structures from scratch >= dense - this (N:M paper: ~no loss)

WIDTHS = (16, 32)  # cnn stage widths: small enough for 2 shared CPU cores, narrow enough to bind
UPDATE_EVERY = 40
DECAY = 2e-4
CALIB = 512


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="digits only, one seed, few epochs (a minute)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    p.add_argument("--datasets", nargs="+", default=None, choices=["digits", "mnist"])
    p.add_argument("--mnist-dir", default=str(HERE.parent.parent / "shared" / "data" / "mnist"),
                   help="MNIST in the hub's parquet layout (default: ../shared/data/mnist beside the checkout)")
    p.add_argument("--digits-epochs", type=int, default=None, help="default 30 (quick: 3)")
    p.add_argument("--mnist-epochs", type=int, default=3, help="default 3 (fit's MNIST default)")
    p.add_argument("--iterations", type=int, default=None,
                   help="AdaPrune Adam steps on digits (1000; quick: 50)")
    p.add_argument("--mnist-iterations", type=int, default=300, help="AdaPrune Adam steps on MNIST")
    p.add_argument("--out", default=None, help="Markdown report (default results/nm_training.md; "
                                                "quick: a temporary file); the JSON sits beside it")
    args = p.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.datasets = args.datasets or (["digits"] if args.quick else ["digits", "mnist"])
    args.digits_epochs = args.digits_epochs or (3 if args.quick else 30)
    args.iterations = args.iterations or (50 if args.quick else 1000)
    if args.out is None:
        args.out = (os.path.join(os.environ.get("TMPDIR", "/tmp"), "nm_training_quick.md") if args.quick
                    else str(HERE.parent / "results" / "nm_training.md"))
    for name in ("digits_epochs", "mnist_epochs", "iterations", "mnist_iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


class TimedRecipe(sp.Recipe):
    """The recipe, timing the host-side mask updates (same repr, hence the same training cache key)."""

    def after_step(self, step, variables):
        t0 = time.perf_counter()
        out = super().after_step(step, variables)
        self.clock[0] += time.perf_counter() - t0
        return out


def make_recipe(keep, block, transposable):
    if keep is None:
        return None
    recipe = TimedRecipe(keep=keep, block=block, transposable=transposable, update_every=UPDATE_EVERY,
                         decay=DECAY)
    object.__setattr__(recipe, "clock", [0.0])
    return recipe


def sparse_density(net) -> float | None:
    masks = net.variables.get("masks")
    if not masks:
        return None
    leaves = [np.asarray(m) for m in jax.tree.leaves(masks)]
    return float(sum(m.sum() for m in leaves) / sum(m.size for m in leaves))


# --------------------------------------------------------------------------------------------------
# runs


def train_runs(name, data, epochs, seeds, store, save):
    """From-scratch training of every structure; returns the dense networks by seed."""
    dense = {}
    model = models.create("cnn", num_classes=data.num_classes, widths=WIDTHS)
    for seed in seeds:
        for label, keep, block, transposable in STRUCTURES:
            run_id = f"{name}/scratch/{label}/seed{seed}"
            if run_id in store["runs"] and not (label == "dense"):
                continue
            recipe = make_recipe(keep, block, transposable)
            net = ls.train.fit(model, data, epochs=epochs, seed=seed, recipe=recipe)
            if label == "dense":
                dense[seed] = net
                if run_id in store["runs"]:
                    continue
            store["runs"][run_id] = {
                "dataset": name, "method": "scratch", "structure": label, "seed": seed,
                "test_acc": net.accuracy(data.test), "density": sparse_density(net),
                "train_seconds": net.config["seconds"],
                # a network loaded from the training cache ran no step here: no solver time measured
                "mask_seconds": recipe.clock[0] if (recipe is not None and recipe.clock[0] > 0) else None,
                "epochs": epochs, "steps": epochs * (len(data.train) // net.config["batch_size"]),
            }
            print(f"  {run_id:32s} acc {store['runs'][run_id]['test_acc']:.4f}  "
                  f"{net.config['seconds']:.0f} s", flush=True)
            save()
    return dense


def drop_stale(store, name, epochs, iterations):
    """Drop the records of ``name`` that another configuration produced: a seed whose scratch runs
    trained for other epochs loses all its records (its AdaPrune runs started from that dense
    network), and an AdaPrune record of another iteration count is rerun."""
    runs = store["runs"]
    stale_seeds = {r["seed"] for r in runs.values()
                   if r["dataset"] == name and r["method"] == "scratch" and r["epochs"] != epochs}
    for run_id, r in list(runs.items()):
        if r["dataset"] == name and (r["seed"] in stale_seeds
                                     or (r["method"] == "adaprune" and r.get("iterations") != iterations)):
            del runs[run_id]


def adaprune_runs(name, data, dense, iterations, store, save):
    for seed, net in dense.items():
        for label, keep, block, transposable in STRUCTURES[1:]:
            run_id = f"{name}/adaprune/{label}/seed{seed}"
            if run_id in store["runs"]:
                continue
            res = ap.adaprune(net, data.calib, keep=keep, block=block, transposable=transposable,
                              iterations=iterations, test=data.test, seed=seed)
            a = res.accuracy
            store["runs"][run_id] = {
                "dataset": name, "method": "adaprune", "structure": label, "seed": seed,
                "test_acc": a.final, "dense_acc": a.dense, "magnitude_acc": a.magnitude,
                "magnitude_bn_acc": a.magnitude_bn, "adaprune_acc": a.adaprune,
                "adaprune_bn_acc": a.adaprune_bn, "seconds": res.seconds, "iterations": iterations,
                "mse_ratio": float(np.mean([r.mse_after / r.mse_before for r in res.layers])),
                "density": float(np.mean([r.density for r in res.layers])),
            }
            print(f"  {run_id:32s} magnitude {a.magnitude:.4f} -> adaprune+BN {a.final:.4f}  "
                  f"{res.seconds:.0f} s", flush=True)
            save()


def unstructured_mask(w: np.ndarray, fraction: float) -> np.ndarray:
    """Keep the ``fraction`` largest |w| of the whole matrix (ties to the lower index)."""
    k = int(round(fraction * w.size))
    order = np.argsort(-np.abs(w), axis=None, kind="stable")
    mask = np.zeros(w.size, bool)
    mask[order[:k]] = True
    return mask.reshape(w.shape)


def retained(ws, kind, keep, block, method="exact") -> float:
    """Fraction of sum |W| over the matrices ``ws`` that the structure's optimal masks keep."""
    kept = total = 0.0
    for w in ws:
        if kind == "unstructured":
            m = unstructured_mask(w, keep / block)
        elif kind == "nm":
            m = sp.nm_mask(w, keep=keep, block=block, axis=0)
        else:
            m = sp.transposable_mask(w, keep=keep, block=block, method=method)
        kept += float(np.abs(w)[m].sum(dtype=np.float64))
        total += float(np.abs(w).sum(dtype=np.float64))
    return kept / total


def retained_table(sources: dict[str, list[np.ndarray]]) -> dict:
    table = {}
    for label, kind, keep, block in MD_STRUCTURES:
        md = sp.mask_diversity(kind, keep=keep, block=block, size=64)
        row = {"kind": kind, "keep": keep, "block": block, "sparsity": 1 - keep / block,
               "md": str(md.count), "log10_md": md.log10}
        for src, ws in sources.items():
            row[src] = retained(ws, kind, keep, block)
            if kind == "transposable":
                row[src + " greedy"] = retained(ws, kind, keep, block, method="greedy")
        table[label] = row
    return table


def trained_matrices(net, x) -> list[np.ndarray]:
    """GEMM matrices of the layers the recipe makes sparse (all conv/dense but the first and last)."""
    params = flax.traverse_util.flatten_dict(net.variables["params"])
    chosen = sp.select_layers(sp.gemm_layers(net.model, net.variables, x[:1]))
    return [sp.gemm_matrix(np.asarray(params[layer.path + ("kernel",)], np.float64)) for layer in chosen]


# --------------------------------------------------------------------------------------------------
# report


def stats(values) -> tuple[float, float]:
    v = 100 * np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt_ms(values) -> str:
    m, s = stats(values)
    return f"{m:.2f} ± {s:.2f}"


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def render(store, meta) -> tuple[str, list[tuple[str, bool, str]]]:
    # this run's seeds only: the store may hold other seeds from earlier runs (a store written
    # before meta recorded its seeds holds only its own)
    seeds = meta.get("seeds", sorted({r["seed"] for r in store["runs"].values()}))
    runs = {k: r for k, r in store["runs"].items() if r["seed"] in seeds}
    lines = [
        "# N:M and transposable N:M: sparse training, AdaPrune, mask diversity",
        "",
        f"Generated by `python bench/nm_training.py` ({meta['date']}; python {meta['python']}, "
        f"jax {meta['jax']}, {meta['cores']} CPU core(s) shared with other jobs, so seconds are wall "
        "time under load).",
        "",
        f"Model: zoo `cnn` with widths {WIDTHS} (two 3x3 conv-BN-ReLU per stage, global average pool, "
        "dense). Sparse layers: every conv but the first; the first conv and the classifier stay dense. "
        f"From scratch: `fit` defaults per dataset (SGD + Nesterov 0.9, cosine with warm-up, weight decay "
        f"5e-4 on kernels) with `sparsity.Recipe(update_every={UPDATE_EVERY}, decay={DECAY})`: exact "
        "initial masks, greedy (transposable) or plain N:M updates from |W| every 40 steps, "
        "straight-through gradient, SR-STE decay on pruned weights. AdaPrune: from the same seed's "
        f"dense network, {CALIB} calibration images from the training split, "
        "Adam per layer (lr 1e-3, batch 50; iterations per dataset below), exact masks by "
        "magnitude, BN statistics re-estimated on the calibration images. Accuracy in %, "
        "mean ± sample std over seeds.",
        "",
    ]
    claims = []
    for name in meta["datasets"]:
        rows = [r for r in runs.values() if r["dataset"] == name]
        if not rows:
            continue
        info = meta["data"][name]
        lines += [f"## {name}", "", info, ""]
        scratch = {lab: [r for r in rows if r["method"] == "scratch" and r["structure"] == lab]
                   for lab, *_ in STRUCTURES}
        dense_acc = [r["test_acc"] for r in scratch["dense"]]
        dense_mean = stats(dense_acc)[0] if dense_acc else float("nan")
        dense_secs = np.mean([r["train_seconds"] for r in scratch["dense"]]) if dense_acc else float("nan")
        lines += ["### From scratch", "",
                  "| structure | sparsity | kept (sparse layers) | test acc % | Δ vs dense | "
                  "ratio to dense | train s (dense s) | mask solver share | seeds: acc % |",
                  "|---|---|---|---|---|---|---|---|---|"]
        means = {}
        for label, keep, block, _ in STRUCTURES:
            rs = scratch[label]
            if not rs:
                continue
            acc = [r["test_acc"] for r in rs]
            m, _ = stats(acc)
            means[label] = m
            dens = [r["density"] for r in rs if r["density"] is not None]
            share = [r["mask_seconds"] / r["train_seconds"] for r in rs if r.get("mask_seconds")]
            secs = np.mean([r["train_seconds"] for r in rs])
            lines.append(
                f"| {label} | {0 if keep is None else 1 - keep / block:.0%} | "
                f"{np.mean(dens) if dens else 1.0:.3f} | {fmt_ms(acc)} | "
                f"{m - dense_mean:+.2f} | {m / dense_mean:.4f} | {secs:.0f} ({dense_secs:.0f}) | "
                f"{f'{np.mean(share):.1%}' if share else '-'} | "
                f"{', '.join(f'{100 * a:.2f}' for a in acc)} |")
        lines.append("")
        ada = {lab: [r for r in rows if r["method"] == "adaprune" and r["structure"] == lab]
               for lab, *_ in STRUCTURES[1:]}
        if any(ada.values()):
            lines += ["### AdaPrune from the dense network", "",
                      "| structure | dense | magnitude only | magnitude + BN | AdaPrune | AdaPrune + BN | "
                      "Δ (AdaPrune + BN − magnitude) | from scratch | MSE after/before | s |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for label, *_ in STRUCTURES[1:]:
                rs = ada[label]
                if not rs:
                    continue
                col = lambda key, rs=rs: [r[key] for r in rs]
                gain = stats(col("adaprune_bn_acc"))[0] - stats(col("magnitude_acc"))[0]
                lines.append(
                    f"| {label} | {fmt_ms(col('dense_acc'))} | {fmt_ms(col('magnitude_acc'))} | "
                    f"{fmt_ms(col('magnitude_bn_acc'))} | {fmt_ms(col('adaprune_acc'))} | "
                    f"{fmt_ms(col('adaprune_bn_acc'))} | {gain:+.2f} | "
                    f"{means.get(label, float('nan')):.2f} | {np.mean(col('mse_ratio')):.3f} | "
                    f"{np.mean(col('seconds')):.0f} |")
                claims.append((f"{name}: AdaPrune + BN ≥ magnitude only + {MIN_ADAPRUNE_GAIN} pt ({label})",
                               gain >= MIN_ADAPRUNE_GAIN, f"{gain:+.2f} pt"))
            lines.append("")
        if "T-4:8" in means and "2:4" in means:
            gap = means["T-4:8"] - means["2:4"]
            claims.append((f"{name}: T-4:8 from scratch ≥ 2:4 − {MAX_T48_GAP} pt", gap >= -MAX_T48_GAP,
                           f"{gap:+.2f} pt"))
        for label in ("2:4", "4:8", "T-4:8", "T-2:4"):
            if label in means:
                gap = means[label] - dense_mean
                claims.append((f"{name}: {label} from scratch ≥ dense − {MAX_SPARSE_50_GAP} pt",
                               gap >= -MAX_SPARSE_50_GAP, f"{gap:+.2f} pt"))

    table = store.get("retained") or {}
    if table:
        sources = [k for k in next(iter(table.values())) if k not in
                   ("kind", "keep", "block", "sparsity", "md", "log10_md") and not k.endswith("greedy")]
        lines += ["## Mask diversity and retained magnitude", "",
                  "MD: number of masks of one 8x8 tile (T = 64) with the structure (exact integer, "
                  "`sparsity.mask_diversity`). Retained: fraction of Σ|W| kept by the structure's optimal "
                  "mask (exact solvers; greedy in parentheses for transposable), on "
                  + "; ".join(meta["retained_sources"][s] for s in sources) + ".", "",
                  "| structure | sparsity | MD (8x8 tile) | log10 MD | "
                  + " | ".join(f"retained, {s}" for s in sources) + " |",
                  "|---|---|---|---|" + "---|" * len(sources)]
        # The store is JSON with sorted keys: rows follow MD_STRUCTURES, not the file's order.
        order = {label: i for i, (label, *_) in enumerate(MD_STRUCTURES)}
        for label, row in sorted(table.items(), key=lambda item: order.get(item[0], len(order))):
            cells = []
            for s in sources:
                g = row.get(s + " greedy")
                cells.append(f"{row[s]:.4f}" + (f" ({g:.4f})" if g is not None else ""))
            md = int(row["md"])
            md_s = f"{md:,}" if md < 10**15 else f"{md:.4e}"
            lines.append(f"| {label} | {row['sparsity']:.0%} | {md_s} | {row['log10_md']:.2f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
        fifty = [r for r in table.values() if r["sparsity"] == 0.5]
        for s in sources:
            rho = spearman([r["log10_md"] for r in fifty], [r[s] for r in fifty])
            claims.append((f"Spearman(log10 MD, retained magnitude) at 50% ({s}) ≥ {MIN_SPEARMAN_MD}",
                           rho >= MIN_SPEARMAN_MD, f"ρ = {rho:.3f}"))
            if "T-4:8" in table and s != "Gaussian":
                q = table["T-4:8"][s + " greedy"] / table["T-4:8"][s]
                claims.append((f"greedy T-4:8 retains ≥ {MIN_GREEDY_RETAINED} of exact's magnitude ({s})",
                               q >= MIN_GREEDY_RETAINED, f"{q:.4f}"))

    if claims:
        lines += ["## Claims (thresholds fixed in `bench/nm_training.py` before the run)", ""]
        if meta.get("quick"):
            lines += [QUICK_NOTE, ""]
        lines += ["| claim | measured | result |", "|---|---|---|"]
        lines += [f"| {c} | {v} | {'PASS' if ok else 'FAIL'} |" for c, ok, v in claims]
        lines.append("")
    return "\n".join(lines), claims


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("LANDSCAPE_PROGRESS", "0")
    json_path = os.path.splitext(args.out)[0] + ".json"
    store = ls.runtime.read_json(json_path, {"runs": {}, "retained": {}})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "jax": jax.__version__,
            "seeds": list(args.seeds),
            "cores": cores, "datasets": [], "data": {}, "quick": args.quick,
            "retained_sources": {"Gaussian": "Gaussian weights (a 320 x 400 matrix, 2,000 8x8 tiles)"}}

    def save():
        store["meta"] = meta
        ls.atomic.write_atomic(json_path, json.dumps(store, indent=1, sort_keys=True))
        ls.atomic.write_atomic(args.out, render(store, meta)[0])

    sources = {"Gaussian": [np.random.default_rng(0).standard_normal((320, 400))]}
    for name in args.datasets:
        if name == "mnist":
            if not os.path.isdir(args.mnist_dir):
                print(f"MNIST skipped: {args.mnist_dir} does not exist")
                continue
            data = ls.data.load("mnist", data_dir=args.mnist_dir, calib_size=CALIB)
            epochs, iterations = args.mnist_epochs, args.mnist_iterations
        else:
            data = ls.data.load("digits", calib_size=CALIB)
            epochs, iterations = args.digits_epochs, args.iterations
        bs = ls.train.DEFAULTS[name]["batch_size"]
        meta["datasets"].append(name)
        meta["data"][name] = (f"{len(data.train):,} training / {len(data.test):,} test images "
                              f"{data.input_shape}; {epochs} epoch(s), batch {bs} "
                              f"({epochs * (len(data.train) // bs)} steps), seeds {args.seeds}; "
                              f"AdaPrune {iterations} Adam iterations per layer.")
        print(f"{name}: {data}", flush=True)
        drop_stale(store, name, epochs, iterations)
        dense = train_runs(name, data, epochs, args.seeds, store, save)
        adaprune_runs(name, data, dense, iterations, store, save)
        first = min(dense)
        sources[f"trained {name}"] = trained_matrices(dense[first], data.train.x)
        meta["retained_sources"][f"trained {name}"] = (
            f"the dense {name} cnn (seed {first}), conv0_1, conv1_0, conv1_1 as GEMM matrices")
    store["retained"] = retained_table(sources)
    save()
    text, claims = render(store, meta)
    print()
    print(text)
    print(f"report: {args.out}\nrecords: {json_path}")
    failed = [c for c, ok, _ in claims if not ok]
    print(f"claims: {len(claims) - len(failed)} PASS, {len(failed)} FAIL"
          + (" (a --quick smoke run, with the full run's thresholds)" if args.quick else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
