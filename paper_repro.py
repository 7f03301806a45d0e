"""Reproduce every figure and table of the LAPQ paper in one command, with a claims report.

    python paper_repro.py                         # --preset small: bundled digits, offline
    python paper_repro.py --preset mnist --data-dir ../shared/data/mnist
    python paper_repro.py --preset vit           # the claims on a Vision Transformer (digits, offline)
    python paper_repro.py --list
    python paper_repro.py --only F1,T1 --bits 2,4 --seeds 2 --out runs/quick   # partial: --out
    python paper_repro.py --train-seed 1 --out runs/seed1   # the claims on another trained network
    python paper_repro.py --compare seed0=figures seed1=runs/seed1   # their claims side by side

Each figure module in figures/ computes its data (cached by configuration, written
atomically, so a killed run resumes), writes PNG + PDF + the JSON behind it, and checks
the paper's claims it can test (figures/claims.py). The run ends with REPORT.md and report.json in the
output directory (for the small preset: figures/, next to the modules). Until then its outputs
wait in the output directory's .partial/, so that a killed run leaves the last finished run's
figures and report as they were. A partial run (--only) over a run of the same configuration
replaces its figures and carries the others, with their claims, into the report (marked).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAGING = ".partial"  # under the output directory: the outputs of the run in progress
REPORT_FILES = ("README.md", "report.json", "REPORT.md")  # moved into place last, in this order


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="small (default), mnist, cifar10, vit, tiny")
    parser.add_argument("--data-dir", default=None, help="local parquet copy (mnist/cifar10 presets)")
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    parser.add_argument("--only", default=None, help="comma-separated figure names (F1,T1) or slugs")
    parser.add_argument("--out", default=None, help="output directory (default figures/ for small, "
                                                   "figures/<preset>/ otherwise)")
    parser.add_argument("--bits", default=None,
                        help="bit widths of F1, F2 and F4 (instead of the paper's) and of T2 (those <= 4), "
                             "e.g. 2,3,4,8")
    parser.add_argument("--seeds", type=int, default=None,
                        help="calibration seeds for the tables (default: the preset's, 3 for small and mnist)")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="fit's seed for the network (default 0): the claims on another trained network")
    parser.add_argument("--compare", nargs="+", metavar="[LABEL=]DIR", default=None,
                        help="print a table of the claims of earlier runs' output directories and exit")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    import figures
    from figures import common

    try:
        modules = figures.select(args.only)
    except ValueError as err:
        raise SystemExit(f"--only {args.only!r}: {err}") from None
    if args.compare:
        from figures import report

        runs = [tuple(item.split("=", 1)) if "=" in item else (item, item) for item in args.compare]
        try:
            print(report.compare([(label, Path(path)) for label, path in runs]), end="")
        except ValueError as err:
            raise SystemExit(f"--compare: {err}") from None
        return 0
    if args.preset not in common.PRESETS:  # before --list too, which had accepted a typo
        raise SystemExit(f"unknown preset {args.preset!r}; known: {', '.join(common.PRESETS)}")
    if args.list:
        print(f"{'':4s} {'':18s} {'cost':>6s}  (compute seconds, small preset, every step computed; "
              f"{figures.COST_SOURCE})")
        for m in figures.load_all():
            print(f"{m.NAME:4s} {m.SLUG:18s} {m.EST_SECONDS:>4d} s  {m.TITLE}")
        return 0
    preset = common.PRESETS[args.preset]
    changes = {}
    if args.data_dir:
        if preset.data == "digits":
            raise SystemExit(f"--data-dir: preset {preset.name!r} uses scikit-learn's bundled digits, which need no "
                             "local copy; --data-dir is for the mnist and cifar10 presets")
        if not Path(args.data_dir).is_dir():
            raise SystemExit(f"--data-dir {args.data_dir!r} is not a directory (expected a local parquet copy "
                             "of the dataset in the hub's layout)")
        # The path is part of every cached step's key and of the configuration a partial run must
        # match: one copy named two ways (relative, absolute, a trailing slash) is one configuration.
        changes["data_dir"] = str(Path(args.data_dir).resolve())
    if args.bits is not None:
        try:
            bits = tuple(int(b) for b in args.bits.split(","))
        except ValueError:
            raise SystemExit(f"--bits {args.bits!r}: use comma-separated integers such as 2,3,4,8") from None
        if any(not 2 <= b <= 16 for b in bits):
            raise SystemExit(f"--bits {args.bits!r}: every bit width must be in [2, 16]")
        # one set of widths, ascending: --bits 4,2 and 2,4,2 are the run (and the cache keys) of --bits 2,4
        changes["bits"] = changes["headline_bits"] = tuple(sorted(set(bits)))
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"--seeds {args.seeds}: need at least one calibration seed")
        changes["seeds"] = args.seeds
    if args.train_seed < 0:
        raise SystemExit(f"--train-seed {args.train_seed}: must be an integer >= 0")
    changes["train_seed"] = args.train_seed
    preset = dataclasses.replace(preset, **changes)
    if preset.data in ("mnist", "cifar10") and preset.data_dir is None:  # offline: no hub download unasked
        raise SystemExit(f"--preset {preset.name} needs --data-dir PATH (a local parquet copy of {preset.data} in "
                         "the hub's layout)")

    if args.out is None:
        # The default directories hold the committed galleries: a partial or non-default run
        # would replace some of their figures and the whole report with its own.
        options = [name for name, given in (("--only", args.only), ("--bits", args.bits),
                                            ("--seeds", args.seeds is not None),
                                            ("--train-seed", args.train_seed != 0)) if given]
        if options:
            raise SystemExit(f"{', '.join(options)} without --out would write a partial or non-default run over "
                             f"the preset's gallery in figures/; pass --out DIR")
    out = Path(args.out) if args.out else (ROOT / "figures" if preset.name == "small"
                                           else ROOT / "figures" / preset.name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise SystemExit(f"--out {str(out)!r}: cannot write there ({err.strerror or err})") from None
    if len(modules) < len(figures.load_all()):
        _check_partial_run(out, preset)
    from landscape import runtime

    runtime.code_version()  # the code this run imports, whatever is committed while it runs
    with _exclusive(out):
        try:
            return run(preset, modules, out, progress=not args.no_progress)
        except KeyboardInterrupt:  # one line instead of JAX's traceback: nothing finished is lost
            print(f"\npaper_repro: interrupted; the finished steps are kept in {out / '.cache'} and {out} is as "
                  "the last finished run left it: rerun the same command to resume", file=sys.stderr)
            return 130


def _check_partial_run(out: Path, preset) -> None:
    """A partial run (--only) replaces some figures of ``out`` and carries the others into its
    report: refused where ``out`` holds a run of another configuration, whose figures and claims
    cannot stand beside this one's in one report."""
    from figures import report

    previous = report.previous_report(out)
    if previous is None:
        return  # no earlier run there (or not one of ours)
    previous, current = previous["preset"], report.preset_config(preset)
    if previous != current:
        changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
        raise SystemExit(f"--out {str(out)!r} holds a run of another configuration (it differs in {changed}); a "
                         "partial run (--only) there would mix the two: use another --out, or run every figure")


class _exclusive:
    """Holds an exclusive lock on ``out/.lock`` for a run: a second run into the same directory
    is refused (it would delete the first run's staging directory and publish its files)."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # no flock (Windows): runs are not guarded against each other
            self.fh = None
            return self
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip()
            self.fh.close()
            raise SystemExit(f"--out {str(self.path.parent)!r}: another paper_repro run is writing there"
                             + (f" (pid {holder})" if holder else "") + "; wait for it or use another --out") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()  # releases the lock
        return False


def _quiet_datasets() -> None:
    """--no-progress for Hugging Face ``datasets`` too (its "Generating train split" bars)."""
    try:
        import datasets
    except ImportError:  # the loader names the missing package itself
        return
    datasets.disable_progress_bars()


def run(preset, modules, out: Path, *, progress: bool = True) -> int:
    import figures
    import landscape as ls
    from figures import common, report

    ls.enable_compilation_cache()
    t0 = time.time()
    # Outputs go to a staging directory and move into ``out`` once the report is written: a run
    # killed part-way leaves ``out`` as the last finished run left it (figures and the report
    # that describes them), and its finished steps in ``out/.cache`` for the rerun to resume.
    stage = out / STAGING
    shutil.rmtree(stage, ignore_errors=True)  # an unfinished run's outputs: the cache redraws them
    ctx = common.Context(preset, stage, progress=progress, cache_dir=out / ".cache")
    if not progress and preset.data != "digits":
        _quiet_datasets()
    try:
        ctx.data()  # a missing local copy or an unreachable hub: one line, before any work
    except (OSError, ValueError, ImportError) as err:
        shutil.rmtree(stage, ignore_errors=True)
        hint = "" if preset.data_dir else "; pass --data-dir PATH, a local parquet copy in the hub's layout"
        raise SystemExit(f"preset {preset.name!r}: cannot load {preset.data!r} ({err}){hint}") from None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(m.EST_SECONDS for m in modules), unit="s(est)", desc="paper_repro",
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} est-s [{elapsed}<{remaining}] {postfix}")
    ctx.log = (bar.write if bar is not None else print)
    ctx.log(f"preset {preset.name}: {preset.model} on {preset.data} → {out}")
    results, claims, files, datas = {}, [], {}, {}
    # Figures are drawn on a thread of their own while the next module computes: matplotlib
    # holds one core for 0.3-4 s per figure (PNG and PDF, tiny preset), time in which XLA
    # compiles or runs the next module's programs on the other. Only that thread touches
    # matplotlib; the file lists are logged once every figure is drawn.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="render") as renderer:
        try:
            drawn = {}
            for m in modules:
                if bar is not None:
                    bar.set_postfix_str(f"{m.NAME} {m.TITLE[:40]}")
                start, steps = time.time(), dict(ctx.steps)
                data = datas[m.NAME] = m.compute(ctx)
                common.write_json(stage / f"{m.SLUG}.json", data)
                drawn[m.NAME] = renderer.submit(_timed, m.render, data, ctx)
                found = m.claims(data, ctx)
                claims.extend(found)
                results[m.NAME] = {"seconds": round(time.time() - start, 1), "claims": [c.id for c in found],
                                   **{k: ctx.steps[k] - steps[k] for k in ("computed", "loaded")}}
                mappings = common.memory_mappings()  # what the module's programs hold, before release
                if mappings is not None:
                    results[m.NAME]["memory_mappings"] = {"held": mappings[0], "limit": mappings[1]}
                ctx.log(f"{m.NAME} computed in {time.time() - start:.1f} s")
                ctx.release()  # compiled programs are per module: free them (see Context.loss)
                if bar is not None:
                    bar.update(m.EST_SECONDS)
                for future in drawn.values():
                    if future.done():
                        future.result()  # a figure that failed to draw stops the run now
            for m in modules:
                paths, seconds = drawn[m.NAME].result()
                files[m.NAME] = [str(p.relative_to(stage)) for p in paths] + [f"{m.SLUG}.json"]
                results[m.NAME]["render_seconds"] = round(seconds, 1)
                ctx.log(f"{m.NAME} drawn in {seconds:.1f} s: {', '.join(files[m.NAME])}")
        except BaseException:
            renderer.shutdown(wait=True, cancel_futures=True)  # the figure in hand finishes writing
            raise
    if bar is not None:
        bar.close()
    wall = time.time() - t0
    # A partial run over an earlier run of this configuration keeps that run's other figures, and
    # the report carries them and their claims over (marked) rather than describing this run alone.
    earlier = report.earlier_run(out, preset, list(results))  # None after a full run: nothing left to keep
    report.write(stage, preset, claims, results, files, wall, ctx, earlier)
    everything = figures.load_all()
    if {m.NAME for m in modules} | set(earlier.figures if earlier else ()) == {m.NAME for m in everything}:
        for m in everything:  # the kept figures' data, as their JSON holds them
            if m.NAME not in datas:
                datas[m.NAME] = json.loads((out / f"{m.SLUG}.json").read_text())
        report.gallery(stage, preset, everything, datas, ctx, earlier)
    publish(stage, out)
    print(report.claims_table(claims))
    print(f"\nwall time {wall / 60:.1f} min; report: {out / 'REPORT.md'}")
    return 0


def publish(stage: Path, out: Path) -> None:
    """Move every file of ``stage`` into ``out`` (each an atomic rename), the report last, then
    remove ``stage``. Files of ``out`` that the run did not write (other figures of a run with
    --only) stay."""
    last = [stage / name for name in REPORT_FILES]
    for path in sorted(p for p in stage.iterdir() if p.is_file() and p not in last) + last:
        if path.exists():
            os.replace(path, out / path.name)
    from landscape.atomic import fsync_directory

    fsync_directory(out)  # the renames are durable before the staging directory goes
    stage.rmdir()


def _timed(fn, *args):
    """``(fn(*args), seconds)``."""
    start = time.time()
    return fn(*args), time.time() - start


if __name__ == "__main__":
    sys.exit(main())
