"""LAPQ joint-step benchmark and the MNIST method table.

Benchmark (default): resnet20 on 512 calibration images — MNIST when ../shared/data/mnist
(or --data-dir) exists, otherwise random images of MNIST's shape with random labels — at
one bit width. Powell (the paper's LAPQ, the named competitor), CD and our "batched" start
from the same Lp(p*) α; the script prints each one's final calibration loss, loss
evaluations and wall seconds, and the whole runs' ratio of wall seconds Powell / batched, for
information, twice: batched with the same ``maxiter``, and batched run until its loss is ≤
Powell's (at most ``--to-target-iter`` iterations). The one verdict (target ≥ 3) is the time
to Powell's final loss for both, each to the evaluation that first reached it
(``LAPQResult.improvements``): Powell may reach it long before its run ends. Every program
is compiled before timing.

    python bench/lapq.py                       # W3A3 by default
    python bench/lapq.py --w-bits 4 --a-bits 4 --skip-cd

Table (--table): ``landscape.lapq.compare_methods`` for resnet20 on MNIST at each
--bits setting over --seeds calibration seeds, written atomically to
results/lapq_mnist.md and results/lapq_mnist.json, with the paper's claims checked
against thresholds fixed below. A rerun resumes: a setting already in the JSON under the same
configuration (network weights, data, bit widths, seeds, maxiter, p grid, calibration size, bias
correction, rows) is taken from there, and the finished rows of an unfinished setting from
results/<--out>.W<w>A<a>.progress.json (``compare_methods``' store, written atomically after each
row, removed once the setting is in the JSON).

    python bench/lapq.py --table --bits 3,3 2,4 --seeds 3
    python bench/lapq.py --table --rows FP32 max MSE --out lapq_mnist_mse   # some rows only

With ``--rows`` a claim is checked only when the table has every row it compares; the others are
listed as not checked.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import landscape as ls  # noqa: E402
import models  # noqa: E402
from landscape.train import weights_fingerprint  # noqa: E402

lq = importlib.import_module("landscape.lapq")  # the module: ls.lapq is the function

MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "mnist")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")

# Claims of the table, thresholds fixed before any run.
LAYERWISE_DROP = 0.05  # the setting qualifies when the best layer-wise rule loses ≥ 5 points


def load_data(data_dir: str | None, calib_size: int):
    data_dir = data_dir or MNIST_DIR
    if os.path.isdir(data_dir):
        return ls.data.load("mnist", data_dir=data_dir, calib_size=calib_size, seed=0), "MNIST"
    # No MNIST copy: random images of MNIST's shape with random labels (timing only).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 4096).astype(np.int32)
    train, test = ls.data.Split(x[:3072], y[:3072]), ls.data.Split(x[3072:], y[3072:])
    index = ls.data.calibration_index(len(train), calib_size, 0)
    data = ls.data.Dataset("random", train, train.take(index), test, 10, index)
    return data, "random data of MNIST's shape"


def network(data, path=None):
    """resnet20 trained by ``fit`` (MNIST: its 3-epoch default, ~40 min on 2 cores), or the
    checkpoint at ``path`` (``load_network``: msgpack + json, no pickle)."""
    model = models.create("resnet20", num_classes=10)
    if path is not None:
        net = ls.train.load_network(model, path)
        print(f"network: checkpoint {path} ({net.config.get('data')}, {net.config.get('epochs')} epochs, "
              f"seed {net.config.get('seed')}, trained in {net.config.get('seconds')} s under "
              f"{net.config.get('numerics', 'numerics not recorded')})", flush=True)
        return net
    epochs = None if data.name == "mnist" else 1
    return ls.train.fit(model, data, epochs=epochs)


def benchmark(args):
    data, source = load_data(args.data_dir, args.calib_size)
    net = network(data, args.network)
    loss = ls.ClipLoss(net, data.calib, w_bits=args.w_bits, a_bits=args.a_bits, bias_correction=True)
    print(f"{loss} on {source}; FP32 test accuracy {net.accuracy(data.test):.4f}", flush=True)

    t = time.perf_counter()
    grid = np.linspace(2.0, 4.0, args.p_points)
    start, selection, _ = lq.lp_start(loss, grid)
    print(f"Lp sweep over p = {np.round(grid, 2).tolist()}: p* = {selection.p_star:.3f} "
          f"({selection.rule}), {time.perf_counter() - t:.1f} s", flush=True)

    # Compile every entry point the optimizers use before any clock starts.
    t = time.perf_counter()
    float(loss(start))
    loss.batch(np.stack([start] * loss.chunk)).block_until_ready()
    loss.grad(start).block_until_ready()  # batched's gradient step
    print(f"compiled loss / batch in {time.perf_counter() - t:.1f} s", flush=True)

    methods = [m for m in ("powell", "cd", "batched") if not (m == "cd" and args.skip_cd)]
    results = {}
    for method in methods:
        res = lq.lapq(loss, method=method, maxiter=args.maxiter, init=start, on_interrupt="raise")
        results[method] = res
        grads = f" + {res.n_grads} gradients" if res.n_grads else ""
        print(f"  {method:8s} loss {res.loss:.4g}  evals {res.n_evals:5d}{grads}  {res.seconds:8.1f} s", flush=True)
    # The target is time to Powell's loss: batched iterations are cheaper, so it may take more
    # of them; it stops at the first iteration whose loss is ≤ Powell's (or after --to-target-iter).
    target = results["powell"].loss
    res = lq.lapq(loss, method="batched", maxiter=args.to_target_iter, init=start,
                  callback=lambda entry: entry["loss"] <= target, on_interrupt="raise")
    results["batched → Powell's loss"] = res
    print(f"  batched to Powell's loss: loss {res.loss:.4g}  evals {res.n_evals:5d} + {res.n_grads} gradients  "
          f"{res.seconds:8.1f} s  "
          f"({len(res.history) - 1} iterations; {res.message})", flush=True)

    print()
    print("| method | calibration loss | evaluations | wall seconds | test accuracy |")
    print("|---|---|---|---|---|")
    print(f"| Lp(p*) start | {results['powell'].init_loss:.4g} | – | – | "
          f"{100 * loss.accuracy(start, data.test):.2f} |")
    for method, res in results.items():
        print(f"| {method} | {res.loss:.4g} | {res.n_evals} | {res.seconds:.1f} | "
              f"{100 * loss.accuracy(res.alpha, data.test):.2f} |")
    powell, batched = results["powell"], results["batched"]
    print()
    if target == 0.0:
        print("note: Powell's calibration loss is exactly 0 in float32: every image's cross-entropy is below "
              "float32's resolution at 1 (~6e-8); the target is reaching that.")
    print("Powell, iteration by iteration: " + "; ".join(f"{h['iteration']}: loss {h['loss']:.4g} at "
                                                        f"{h['seconds']:.1f} s ({h['n_evals']} evals)"
                                                        for h in powell.history))
    runs = (("batched (same maxiter)", batched), ("batched → Powell's loss", results["batched → Powell's loss"]))
    for label, run in runs:
        ratio = powell.seconds / run.seconds
        relation = "≤" if run.loss <= powell.loss else ">"
        print(f"{label}, whole runs (no verdict): wall seconds powell / batched = {ratio:.2f}; batched loss "
              f"{relation} powell's ({run.loss:.4g} vs {powell.loss:.4g}); evaluations powell / batched = "
              f"{powell.n_evals / run.n_evals:.2f}")
    # Time to the same loss for both, to the evaluation that first reached it: Powell may get
    # there long before its last iteration ends, and timing its whole run against batched's
    # time to that loss flattered batched (this session's audit).
    fast = results["batched → Powell's loss"]
    p_at, b_at = first_at(powell, target), first_at(fast, target)
    if b_at is None:
        print(f"time to Powell's loss ({target:.4g}): batched did not reach it in {args.to_target_iter} iterations "
              f"(best {fast.loss:.4g}; MISSES the target)")
    else:
        ratio = p_at["seconds"] / b_at["seconds"]
        print(f"time to Powell's loss ({target:.4g}), to the first evaluation at or below it: Powell "
              f"{p_at['seconds']:.1f} s ({p_at['n_evals']} evaluations), batched {b_at['seconds']:.1f} s "
              f"({b_at['n_evals']} evaluations): powell / batched = {ratio:.2f}  "
              f"({'meets' if ratio >= 3 else 'MISSES'} the target ≥ 3)")


def first_at(res, target):
    """The first fall of ``res``'s best loss to ``target`` or below (None if it never got there)."""
    return next((h for h in res.improvements if h["loss"] <= target), None)


LAYERWISE = ("max", "percentile", "MSE", "ACIQ", "KL", "Lp(p*)")


def _best_rule(table):
    rule = max(LAYERWISE, key=lambda r: table.mean("test_acc", r))
    return rule, table.mean("test_acc", rule)


def _rules_lose_vs_fp32(table):
    rule, acc = _best_rule(table)
    fp32 = table.mean("test_acc", "FP32")
    return (f"best layer-wise rule ({rule}, {100 * acc:.2f}%) loses ≥ {100 * LAYERWISE_DROP:.0f} points vs FP32 "
            f"({100 * fp32:.2f}%)", acc <= fp32 - LAYERWISE_DROP)


def _loss_order(table):
    lapq_loss, lp_loss = table.mean("calib_loss", "LAPQ (Powell)"), table.mean("calib_loss", "Lp(p*)")
    floor = min(table.mean("calib_loss", "MSE"), table.mean("calib_loss", "max"))
    text = lq.loss_text
    return (f"calibration loss LAPQ ({text(lapq_loss)}) < Lp(p*) ({text(lp_loss)}) < min(MSE, max) ({text(floor)})",
            lapq_loss < lp_loss < floor)


def _lapq_beats_rules(table):
    rule, acc = _best_rule(table)
    lapq_acc = table.mean("test_acc", "LAPQ (Powell)")
    return f"LAPQ test accuracy ({100 * lapq_acc:.2f}%) ≥ best layer-wise rule's ({100 * acc:.2f}%)", lapq_acc >= acc


# (what it says, the rows it compares, the check): "the best layer-wise rule" needs all six.
CLAIMS = (("best layer-wise rule vs FP32", ("FP32", *LAYERWISE), _rules_lose_vs_fp32),
          ("calibration loss LAPQ < Lp(p*) < min(MSE, max)", ("LAPQ (Powell)", "Lp(p*)", "MSE", "max"), _loss_order),
          ("LAPQ test accuracy vs the best layer-wise rule", ("LAPQ (Powell)", *LAYERWISE), _lapq_beats_rules))


def claims(table: lq.MethodComparison) -> list[tuple[str, bool | None]]:
    """The paper's claims on one setting, as (statement, holds); holds is None for a claim whose
    rows the table does not have (``--rows``), which is not checked (listed after the others)."""
    checked, unchecked = [], []
    for what, rows, check in CLAIMS:
        missing = [r for r in rows if r not in table.rows]
        if missing:
            unchecked.append((f"{what}: not checked (rows not computed: {', '.join(missing)})", None))
        else:
            checked.append(check(table))
    return checked + unchecked


def expected_setting(loss, args) -> dict:
    """The ``setting`` that ``compare_methods`` records for ``loss`` under ``args`` (computed before
    it runs, to recognise a stored setting of the same configuration)."""
    return dict(network=repr(loss), w_bits=loss.options.get("w_bits"), a_bits=loss.options.get("a_bits"),
                calib_size=int(loss.n_calib), bias_correction=True, maxiter=int(args.maxiter),
                p_grid=[float(p) for p in lq.check_p_grid(p_grid(args))])


def p_grid(args) -> np.ndarray:
    return np.linspace(2.0, 4.0, args.p_points)


def identity(net, data) -> dict:
    """What a stored table was computed from besides its settings: the network's weights and the
    data (calibration samples and test images come from it). A file without them (one written
    before they were recorded) matches nothing."""
    return dict(network_sha256=weights_fingerprint(net.variables), data_fingerprint=data.fingerprint())


def reusable(payload: dict, ident: dict, setting: dict, seeds: list[int],
             rows: tuple[str, ...] = lq.ALL_ROWS) -> dict | None:
    """The entry of ``payload["settings"]`` computed under this configuration (same network and
    data, same ``setting`` — network, bit widths, calibration size, bias correction, maxiter, p grid
    —, the same seeds and rows), or None."""
    if any(payload.get(k) != v for k, v in ident.items()):
        return None
    for entry in payload.get("settings", []):
        if (entry.get("setting") == setting and entry.get("seeds") == seeds
                and entry.get("rows") == list(rows)):
            return entry
    return None


def table(args):
    data, source = load_data(args.data_dir, args.calib_size)
    if source != "MNIST":
        raise SystemExit(f"--table needs the MNIST copy (looked in {args.data_dir or MNIST_DIR})")
    net = network(data, args.network)
    json_path = os.path.join(RESULTS, f"{args.out}.json")
    ident = identity(net, data)
    old = ls.runtime.read_json(json_path, {})
    software = ls.runtime.software()
    payload = dict(data="mnist", model="resnet20", fp32_test_acc=net.accuracy(data.test), software=software,
                   settings=[], **ident)
    seeds = list(range(args.seeds))
    rows = tuple(r for r in lq.ALL_ROWS if r in args.rows)  # the table's order, whatever the flag's
    wanted = {tuple(int(b) for b in spec.split(",")) for spec in args.bits}
    dropped = [f"W{e['setting']['w_bits']}A{e['setting']['a_bits']}" for e in old.get("settings", [])
               if (e["setting"]["w_bits"], e["setting"]["a_bits"]) not in wanted]
    if dropped:
        print(f"{json_path}: {', '.join(dropped)} not in --bits; left out of the rewritten file", flush=True)
    for spec in args.bits:
        w_bits, a_bits = (int(b) for b in spec.split(","))
        loss = ls.ClipLoss(net, data.calib, w_bits=w_bits, a_bits=a_bits, bias_correction=True)
        setting = expected_setting(loss, args)
        entry = reusable(old, ident, setting, seeds, rows)
        if entry is not None:
            print(f"== W{w_bits}A{a_bits}: done in {json_path} under the same configuration; not recomputed",
                  flush=True)
            result = lq.MethodComparison.from_dict(entry)
            software_of = entry.get("software", old.get("software"))
        else:
            print(f"== W{w_bits}A{a_bits}: {loss}", flush=True)
            store = os.path.join(RESULTS, f"{args.out}.W{w_bits}A{a_bits}.progress.json")
            result = lq.compare_methods(loss, data, seeds=seeds, rows=rows, maxiter=args.maxiter,
                                        p_grid=p_grid(args), progress=lambda line: print(line, flush=True),
                                        store=store)
            software_of = software
        checks = claims(result)
        print(result, flush=True)
        claimed = [dict(claim=text, holds=None if ok is None else bool(ok)) for text, ok in checks]
        payload["settings"].append(dict(result.to_dict(), claims=claimed, software=software_of))
        write(payload, args)  # after every setting, so a long run leaves a partial file
        if entry is None and os.path.exists(store):
            os.remove(store)  # the setting's rows are in the JSON now


def render(payload: dict, args) -> str:
    """results/<out>.md from its JSON and the command line."""
    sections = []
    for entry in payload["settings"]:
        s = entry["setting"]
        table_md = lq.MethodComparison.from_dict(entry).to_markdown()
        sections.append(f"## W{s['w_bits']}A{s['a_bits']}\n\n{table_md}\n\n" + "\n".join(
            f"- {_box(c['holds'])} {c['claim']}" for c in entry["claims"]))
    earlier = [(f"W{e['setting']['w_bits']}A{e['setting']['a_bits']}", e["software"]) for e in payload["settings"]
               if e.get("software", payload["software"]) != payload["software"]]
    notes = "".join(f" ({name} resumed from an earlier run: "
                    + "; ".join(ls.runtime.describe_software(s) for s in (sw if isinstance(sw, list) else [sw]))
                    + ")" for name, sw in earlier)
    head = ("# LAPQ on MNIST (resnet20)\n\n"
            "Generated by `python bench/lapq.py --table --bits " + " ".join(args.bits)
            + f" --seeds {args.seeds} --maxiter {args.maxiter} --p-points {args.p_points}"
            + f" --calib-size {args.calib_size}"
            + (f" --rows {' '.join(_quoted(r) for r in args.rows)}" if tuple(args.rows) != lq.ALL_ROWS else "")
            + f" --out {args.out}`"
            + (f" with the resnet20 checkpoint `{os.path.basename(args.network)}`" if args.network else "")
            + f"; ran with {ls.runtime.describe_software(payload['software'])}{notes}. "
            f"Calibration: {args.calib_size} training images per seed; accuracy on the 10,000 test images; "
            "first/last layers FP32; per-channel weight bias correction on; evaluations and seconds "
            "are the joint step's (from the shared Lp(p*) start). Claims are checked against thresholds "
            "fixed in bench/lapq.py before the run.\n\n")
    return head + "\n\n".join(sections) + "\n"


def _box(holds: bool | None) -> str:
    """A claim's checkbox: [x] holds, [ ] fails, [–] not checked."""
    return "[–]" if holds is None else "[x]" if holds else "[ ]"


def _quoted(row: str) -> str:
    """A row name as a shell word: "LAPQ (Powell)" and "Lp(p*)" need quotes."""
    return row if row.replace("-", "").isalnum() else f"'{row}'"


def write(payload, args):
    os.makedirs(RESULTS, exist_ok=True)
    ls.atomic.write_atomic(os.path.join(RESULTS, f"{args.out}.md"), render(payload, args))
    ls.atomic.write_atomic(os.path.join(RESULTS, f"{args.out}.json"), json.dumps(payload, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="write results/<--out>.{md,json}")
    parser.add_argument("--out", default="lapq_mnist", help="table: file stem under results/")
    parser.add_argument("--network", default=None,
                        help="a resnet20 checkpoint to load (path without .msgpack) instead of training")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--w-bits", type=int, default=3)
    parser.add_argument("--a-bits", type=int, default=3)
    parser.add_argument("--bits", nargs="+", default=["3,3"], help="table settings, e.g. 3,3 2,4")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", nargs="+", default=list(lq.ALL_ROWS), choices=lq.ALL_ROWS, metavar="ROW",
                        help=f"table: rows to compute (default all: {', '.join(lq.ALL_ROWS)})")
    parser.add_argument("--maxiter", type=int, default=2)
    parser.add_argument("--p-points", type=int, default=10)
    parser.add_argument("--skip-cd", action="store_true", help="benchmark: leave out CD (slow)")
    parser.add_argument("--to-target-iter", type=int, default=10,
                        help="benchmark: most batched iterations when running to Powell's loss")
    args = parser.parse_args(argv)
    # options of the other mode would be ignored silently (--table --w-bits 2 wrote a W3A3 table)
    modes = {"--table": ("bits", "seeds", "out", "rows"),
             "the benchmark (no --table)": ("w_bits", "a_bits", "skip_cd", "to_target_iter")}
    other = "the benchmark (no --table)" if args.table else "--table"
    foreign = [d for d in modes[other] if getattr(args, d) != parser.get_default(d)]
    if foreign:
        flags = {mode: "/".join("--" + d.replace("_", "-") for d in dests) for mode, dests in modes.items()}
        raise SystemExit(f"{', '.join('--' + d.replace('_', '-') for d in foreign)}: options of {other}; "
                         + "; ".join(f"{mode} takes {f}" for mode, f in flags.items()))
    ls.enable_compilation_cache()
    table(args) if args.table else benchmark(args)


if __name__ == "__main__":
    main()
