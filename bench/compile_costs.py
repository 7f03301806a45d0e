"""Benchmark: the compile costs that README.md's design notes quote, measured on this machine.

Every measurement is cold unless it says otherwise: ``jax.clear_caches()`` runs just before it, and
JAX's persistent compilation cache is switched off for the whole process
(``jax_enable_compilation_cache`` False, whatever ``JAX_COMPILATION_CACHE_DIR`` says), so a timed
call traces, lowers and compiles everything it runs. Wall seconds come from ``time.perf_counter``
around the call and ``jax.block_until_ready`` of its result; the process's CPU seconds (all
threads) are shown beside them. Compilations are counted as the tests count them: a
``jax.monitoring`` listener on ``/jax/core/compile/backend_compile_duration`` (one event per XLA
program compiled); the seconds of tracing, lowering and compiling are summed from the same events.
Python-side state that ``jax.clear_caches()`` does not reset (imports, flax's module machinery) is
warm after the first section, so a section is slightly cheaper here than as the first thing a new
process does.

The network is resnet8 (``models.create("resnet8", num_classes=10)``) on the bundled sklearn
digits (8×8×1), as ``paper_repro.py``'s small preset builds it: ``landscape.train.fit`` with the
digits defaults (30 epochs, batch 64, lr 0.05, seed ``--train-seed``), loaded from the landscape
training cache when it is there (a first run trains it: ~10–30 s on 2 cores), calibration samples
from ``data.with_calib(size, 0)``.

(1) Spectra of ClipLoss objects of the same network and sites (README, ``alpha_loss``):
    ``ClipLoss(net, calib, w_bits=b, a_bits=b)`` on 256 calibration images (the small preset's
    calib_size) for each b of ``--bits`` (default 4, then 2, 3, 5, 8; n = 14 sites: 8 weight, 6
    activation), α = ``loss.init("lp", p=3.0)`` (computed before the timings; an interior α, not
    ``"max"``, whose largest elements sit on the clip boundary, a kink of the STE surrogate: see
    landscape/clip_hessian.py). After
    ``jax.clear_caches()``, ``hessian_spectrum(loss, alpha, seed=--seed)`` with its defaults
    (top_k=1, trace=True; n = 14, so the dense method: 14 HVPs) for each loss in turn: the first
    is cold, the others should compile nothing (their ``alpha_loss()`` Partials share the first's
    programs). Then, warm (nothing cleared), the contrast: ``hessian_spectrum(lambda a: loss(a),
    alpha)`` for two such closures (over the first two losses), each a new function object whose
    HVP programs are compiled again.
(2) T2's weight-space spectrum with ``probe_batch`` 1 and 16 (README, ``probe_batch``): T2 of the
    small preset on its FP32 network: ``ClipLoss(net, calib, w_bits=4, a_bits=4)`` on 128
    calibration images (``spectrum_batch``), ``f = loss.weight_loss(None)`` (FP32), x0 = the
    network's params (77,754 numbers), ``hessian_spectrum(f, params, top_k=5, tol=1e-3,
    trace=True, density=True, num_probes=32, density_runs=4, density_steps=30, seed=--seed,
    probe_batch=pb)``, cold for each pb of ``--probe-batches`` (default 1, 16); the seconds, HVP
    counts and the ratio of each to the first.
(3) threefry's two layouts (README, "Random numbers in threefry's classic layout"), each cold: the
    first call of ``jax.random.uniform(key, (3, 3, 8, 9))`` under
    ``jax.threefry_partitionable(True)`` and under ``(False)``, measured twice in alternating
    order (the first of all pays a little one-time setup); then resnet8's initialisation
    ``model.init(key, x0, train=False)`` on x0 = the first 64 training images (what ``fit``
    initialises on): op by op (not jitted) in the partitionable layout, jitted
    (``jax.jit(functools.partial(model.init, train=False))``) partitionable, jitted classic
    (what ``fit`` runs, in ``runtime.classic_threefry()``), and op by op classic for reference.
    ``import landscape`` changes no threefry setting; JAX's global default is printed.
(4) ``paper_repro.main(["--preset", "tiny", ...])`` in this process, everything cold (an empty
    ``LANDSCAPE_CACHE`` in a temporary directory, so the tiny network is trained; a fresh
    ``--out``; the persistent compilation cache off; ClipLoss's shared program sets emptied):
    the ClipLoss objects it constructs against the program sets (``clip_loss._Programs``) they
    construct, and the XLA programs compiled.

The report goes to stdout and, with ``--out PATH``, also to PATH (written atomically).

    python bench/compile_costs.py [--out results/compile_costs.txt] [--seed 0] [--train-seed 0]
                                  [--bits 4,2,3,5,8] [--probe-batches 1,16]
                                  [--skip-spectrum-reuse] [--skip-probe-batch] [--skip-threefry]
                                  [--skip-tiny] [--only reuse,probe-batch,threefry,tiny]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when the package is not installed
sys.path.insert(1, str(HERE))

import landscape as ls  # noqa: E402  (first: the XLA:CPU guard flag, before JAX starts its backend)

import jax  # noqa: E402  isort: skip
import numpy as np  # noqa: E402
from hessian import Clock  # noqa: E402  (wall, CPU and compile seconds of a block; its listener counts programs)

import models  # noqa: E402

SECTIONS = ("reuse", "probe-batch", "threefry", "tiny")
CALIB_SIZE = 256  # the small preset's calib_size (section 1)
SPECTRUM_BATCH = 128  # the small preset's spectrum_batch: T2's calibration images (section 2)
T2_SPECTRUM = dict(top_k=5, tol=1e-3, trace=True, density=True, num_probes=32, density_runs=4,
                   density_steps=30)  # the small preset's spectrum options, as t2_spectrum.py passes them
UNIFORM_SHAPE = (3, 3, 8, 9)
INIT_BATCH = 64  # fit's digits batch size: the x0 of its model.init


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more integers >= 1")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="also write the report to this path (default: print only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the spectra and of the threefry key (default 0)")
    p.add_argument("--train-seed", type=int, default=0,
                   help="fit's seed for resnet8 (default 0, the small preset's network)")
    p.add_argument("--bits", type=int_list, default=[4, 2, 3, 5, 8],
                   help="(1): W = A widths of the ClipLosses, the first one cold (default 4,2,3,5,8)")
    p.add_argument("--probe-batches", type=int_list, default=[1, 16],
                   help="(2): probe_batch values, each cold (default 1,16)")
    p.add_argument("--skip-spectrum-reuse", action="store_true", help="skip (1), the ClipLoss spectra")
    p.add_argument("--skip-probe-batch", action="store_true", help="skip (2), T2 with probe_batch 1 and 16")
    p.add_argument("--skip-threefry", action="store_true", help="skip (3), the threefry layouts")
    p.add_argument("--skip-tiny", action="store_true",
                   help="skip (4), paper_repro's tiny preset: ClipLoss objects and the program sets they share")
    p.add_argument("--only", default=None,
                   help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (overrides the --skip flags)")
    args = p.parse_args(argv)
    if args.seed < 0 or args.train_seed < 0:
        p.error("--seed and --train-seed must be >= 0")
    if max(args.bits) > 16:
        p.error(f"--bits: widths up to 16, got {args.bits}")
    if args.only is not None:
        chosen = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(chosen) - set(SECTIONS))
        if unknown or not chosen:
            p.error(f"--only {args.only!r}: choose from {', '.join(SECTIONS)}")
        args.sections = [s for s in SECTIONS if s in chosen]
    else:
        skip = {"reuse": args.skip_spectrum_reuse, "probe-batch": args.skip_probe_batch,
                "threefry": args.skip_threefry, "tiny": args.skip_tiny}
        args.sections = [s for s in SECTIONS if not skip[s]]
    return args


# --------------------------------------------------------------------------------------------------
# Measuring


class Report:
    """Lines printed as they come and kept for ``--out``."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, text: str = ""):
        print(text, flush=True)
        self.lines.extend(text.split("\n"))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def row(clock: Clock) -> str:
    """A timed block's figures as one report column."""
    return (f"wall {clock.wall:7.2f} s  cpu {clock.cpu:7.2f} s  XLA programs {clock.programs:4d} "
            f"(trace+lower+compile {clock.compile:6.2f} s)")


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def header(report: Report, argv) -> None:
    dev = jax.devices()[0]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    report("Compile costs of README.md's design notes (bench/compile_costs.py)")
    report(f"  command: python bench/compile_costs.py {' '.join(argv)}".rstrip())
    report(f"  jax {jax.__version__} on {dev.platform} ({dev.device_kind}); CPU cores {cpu_cores()} "
           f"({ls.runtime.cpu_model()}); load average {load}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    report(f"  {ls.runtime.describe_software()}")
    report(f"  persistent compilation cache: off; global jax_threefry_partitionable="
           f"{jax.config.jax_threefry_partitionable}; every timed call cold (jax.clear_caches() first) "
           "unless marked warm")


# --------------------------------------------------------------------------------------------------
# Setup


class Digits:
    """The small preset's data and resnet8, built once."""

    def __init__(self, train_seed: int):
        self.base = ls.data.load("digits", calib_size=1)
        start = time.perf_counter()
        self.net = ls.train.fit(models.create("resnet8", num_classes=self.base.num_classes), self.base,
                                seed=train_seed, progress=False)
        self.fit_seconds = time.perf_counter() - start
        self._calib = {}

    def calib(self, size: int, seed: int = 0):
        if size not in self._calib:
            self._calib[size] = self.base.with_calib(size, seed).calib
        return self._calib[size]

    def describe(self) -> str:
        c = self.net.config
        return (f"resnet8 on digits ({len(self.base.train)} training images 8x8x1): landscape.train.fit, "
                f"{c['epochs']} epochs, batch {c['batch_size']}, lr {c['lr']}, seed {c['seed']} (fit returned in "
                f"{self.fit_seconds:.1f} s, from its training cache if that is shorter than the "
                f"{c.get('seconds', float('nan')):.1f} s its training took)")


def describe_spectrum(spec) -> str:
    eig = spec.eigenvalues[0]
    trace = f", trace {spec.trace:.5g}" if spec.trace is not None else ""
    return f"lambda_max {eig:.6g}{trace}; {spec.n_hvp} HVPs"


# --------------------------------------------------------------------------------------------------
# (1) ClipLoss spectra sharing programs


def section_reuse(report: Report, digits: Digits, args) -> None:
    calib = digits.calib(CALIB_SIZE)
    losses = [ls.ClipLoss(digits.net, calib, w_bits=b, a_bits=b) for b in args.bits]
    alphas = [jax.block_until_ready(loss.init("lp", p=3.0)) for loss in losses]
    n = losses[0].n
    report("\n(1) hessian_spectrum(loss, alpha) of ClipLosses of the same network and sites "
           "(README, hessian_spectrum on any pytree loss)")
    report(f"  {losses[0]!r}; calibration {CALIB_SIZE} images (seed 0); alpha = loss.init('lp', p=3.0); "
           f"hessian_spectrum defaults (top_k=1, trace=True, method auto: "
           f"{'dense' if n <= ls.spectrum.DENSE_MAX_DIM else 'lanczos'} at n = {n}), seed {args.seed}")
    jax.clear_caches()
    for i, (bits, loss, alpha) in enumerate(zip(args.bits, losses, alphas, strict=True)):
        with Clock() as clock:
            spec = ls.hessian_spectrum(loss, alpha, seed=args.seed)
            jax.block_until_ready(spec.eigenvalues)
        label = "first, cold" if i == 0 else "further"
        report(f"  W{bits}A{bits} ClipLoss ({label:<11}) {row(clock)}  [{describe_spectrum(spec)}]")
    report("  contrast, warm (nothing cleared): a plain closure `lambda a: loss(a)`, a new function object each")
    for bits, loss, alpha in list(zip(args.bits, losses, alphas, strict=True))[:2]:
        closure = lambda a, loss=loss: loss(a)  # noqa: E731  (the point: a new function object)
        with Clock() as clock:
            spec = ls.hessian_spectrum(closure, alpha, seed=args.seed)
            jax.block_until_ready(spec.eigenvalues)
        report(f"  W{bits}A{bits} closure              {row(clock)}  [{describe_spectrum(spec)}]")


# --------------------------------------------------------------------------------------------------
# (2) T2 with probe_batch 1 and 16


def section_probe_batch(report: Report, digits: Digits, args) -> None:
    loss = ls.ClipLoss(digits.net, digits.calib(SPECTRUM_BATCH), w_bits=4, a_bits=4)
    f = loss.weight_loss(None)
    params = loss.variables["params"]
    dim = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    opts = ", ".join(f"{k}={v}" for k, v in T2_SPECTRUM.items())
    report("\n(2) T2's weight-space spectrum (small preset, FP32 network) by probe_batch "
           "(README, probe_batch)")
    report(f"  f = ClipLoss(net, {SPECTRUM_BATCH} calibration images, W4A4).weight_loss(None) (FP32), "
           f"x0 = params (n = {dim:,}); hessian_spectrum({opts}, seed={args.seed}, probe_batch=pb); "
           f"default probe_batch here: {ls.spectrum.default_probe_batch(jax.devices()[0])}")
    first = None
    for pb in args.probe_batches:
        jax.clear_caches()
        with Clock() as clock:
            spec = ls.hessian_spectrum(f, params, probe_batch=pb, seed=args.seed, **T2_SPECTRUM)
            jax.block_until_ready(spec.eigenvalues)
        first = first or (clock, spec)
        ratio = (f"; {clock.wall / first[0].wall:.2f}x the wall time of probe_batch={args.probe_batches[0]}"
                 if first[0] is not clock else "")
        counts = ", ".join(f"{k} {v}" for k, v in spec.hvp_counts.items())
        report(f"  probe_batch={pb:<3} {row(clock)}")
        report(f"      HVPs {spec.n_hvp} ({counts}); spectrum.seconds {spec.seconds:.2f}; "
               f"{describe_spectrum(spec)}{ratio}")


# --------------------------------------------------------------------------------------------------
# (3) threefry layouts


def timed_cold(fn):
    """(Clock, result) of ``fn()`` after ``jax.clear_caches()``, the result blocked on."""
    jax.clear_caches()
    with Clock() as clock:
        out = jax.block_until_ready(fn())
    return clock, out


def layout_name(partitionable: bool) -> str:
    return "partitionable" if partitionable else "classic      "


def section_threefry(report: Report, digits: Digits, args) -> None:
    key = jax.block_until_ready(jax.random.PRNGKey(args.seed))
    report("\n(3) threefry layouts, cold first calls (README, random numbers in threefry's classic layout)")
    report(f"  jax.random.uniform(key, {UNIFORM_SHAPE}):")
    for partitionable in (True, False, True, False):
        with jax.threefry_partitionable(partitionable):
            clock, _ = timed_cold(lambda: jax.random.uniform(key, UNIFORM_SHAPE))
        report(f"    {layout_name(partitionable)} {row(clock)}")
    model = models.create("resnet8", num_classes=digits.base.num_classes)
    x0 = np.asarray(digits.base.train.x[:INIT_BATCH])
    init = functools.partial(model.init, train=False)
    report(f"  resnet8 init: model.init(key, x0, train=False), x0 = {INIT_BATCH} training images {x0.shape[1:]}:")
    results = {}
    for name, partitionable, fn in (("op by op", True, init), ("jitted  ", True, jax.jit(init)),
                                    ("jitted  ", False, jax.jit(init)), ("op by op", False, init)):
        with jax.threefry_partitionable(partitionable):
            clock, variables = timed_cold(lambda fn=fn: fn(key, x0))
        results.setdefault(partitionable, []).append(variables)
        report(f"    {name} {layout_name(partitionable)} {row(clock)}")
    for partitionable, (a, b) in results.items():
        pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
        differ = sum(int(np.sum(np.asarray(u) != np.asarray(v))) for u, v in pairs)
        gap = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)), initial=0.0)) for u, v in pairs)
        report(f"    {layout_name(partitionable).strip()}: op-by-op vs jitted initial weights: {differ} of "
               f"{sum(np.size(u) for u, _ in pairs):,} numbers differ, by at most {gap:.2g}")


# --------------------------------------------------------------------------------------------------
# (4) paper_repro's tiny preset: ClipLoss objects against the program sets they trace


def section_tiny(report: Report, digits: Digits, args) -> None:
    import contextlib
    import io
    import tempfile

    import paper_repro
    from landscape import clip_loss

    counts = {"ClipLoss": 0, "program sets": 0}

    def counting(cls, name):
        original = cls.__init__

        def init(self, *a, **k):
            counts[name] += 1
            original(self, *a, **k)

        return original, init

    patched = [(cls, *counting(cls, name)) for cls, name in ((clip_loss.ClipLoss, "ClipLoss"),
                                                             (clip_loss._Programs, "program sets"))]
    report("\n(4) python paper_repro.py --preset tiny, in this process, everything cold (README, one set of "
           "programs per network and sites)")
    report("  an empty LANDSCAPE_CACHE (the tiny network is trained), a fresh --out, no persistent compilation "
           "cache, no program set kept from (1)-(3); counted: ClipLoss objects constructed, program sets "
           "(clip_loss._Programs) constructed, XLA programs compiled")
    saved_cache = os.environ.get("LANDSCAPE_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LANDSCAPE_CACHE"] = os.path.join(tmp, "cache")
        clip_loss._PROGRAMS.clear()
        jax.clear_caches()
        for cls, _, init in patched:
            cls.__init__ = init
        try:
            with Clock() as clock, contextlib.redirect_stdout(io.StringIO()):
                code = paper_repro.main(["--preset", "tiny", "--out", os.path.join(tmp, "out"), "--no-progress"])
        finally:
            for cls, original, _ in patched:
                cls.__init__ = original
            if saved_cache is None:
                os.environ.pop("LANDSCAPE_CACHE", None)
            else:
                os.environ["LANDSCAPE_CACHE"] = saved_cache
    if code != 0:
        raise RuntimeError(f"paper_repro.main returned {code}")
    report(f"  {row(clock)}")
    report(f"  ClipLoss objects {counts['ClipLoss']}, program sets {counts['program sets']}")


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # Cold means cold: no program loaded from a persistent cache, whatever the environment says.
    jax.config.update("jax_enable_compilation_cache", False)
    report = Report()
    header(report, argv)
    start = time.perf_counter()
    digits = Digits(args.train_seed)
    report(f"  network: {digits.describe()}")
    sections = {"reuse": section_reuse, "probe-batch": section_probe_batch, "threefry": section_threefry,
                "tiny": section_tiny}
    for name in args.sections:
        sections[name](report, digits, args)
    report(f"\ntotal {time.perf_counter() - start:.1f} s; load average at the end "
           f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.out:
        ls.atomic.write_atomic(args.out, report.text())
        print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
