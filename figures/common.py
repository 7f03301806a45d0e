"""What every figure module shares: presets, the run context, the result cache, claims.

A figure module (``figures/f1_contours.py`` …) defines::

    NAME = "F1"                  # the paper figure/table it reproduces
    SLUG = "f1_contours"         # file stem of its outputs
    TITLE = "…"                  # one line
    EST_SECONDS = 40             # its compute seconds on the small preset (progress bar, --list)
    def compute(ctx) -> dict     # the data behind the figure (JSON-able), via ctx.cached(...)
    def render(data, ctx) -> list[Path]   # PNG + PDF files written under ctx.out
    def claims(data, ctx) -> list[Claim]  # the paper's claims (figures/claims.py) it can test (may be empty)

``compute`` stores every expensive step with :meth:`Context.cached`, keyed by a hash of
its configuration, the network's weights and the code (:func:`code_fingerprint`) and written
atomically, so a killed run resumes where it stopped, a finished figure is not recomputed,
and a rerun after a code change computes anew. Thresholds of the claims live in
:mod:`figures.claims`, fixed in code before any run.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from landscape.atomic import write_atomic
from landscape.train import weights_fingerprint

# --------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    """One configuration of the reproduction. ``tiny`` is the smoke test's."""

    name: str
    model: str
    data: str
    model_kw: tuple = ()
    data_dir: str | None = None
    calib_size: int = 256             # 512 in the paper; 256 keeps the small preset within 15 min
    train_epochs: int | None = None   # None: the dataset default of landscape.train
    train_lr: float | None = None     # None: likewise (the vit preset trains at 0.1)
    bits: tuple[int, ...] = (2, 3, 4, 8)            # W = A bit widths of the headline figures
    sweep_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)  # F3
    seeds: int = 3                    # calibration-sampling seeds for tables
    table_configs: tuple = (("W8A8", 8, 8), ("W4A4", 4, 4), ("W4A32", 4, None), ("W32A4", None, 4),
                            ("W3A3", 3, 3), ("W2A4", 2, 4))
    grid: int = 31                    # points per axis of 2-D surfaces (F1)
    p_points: int = 50                # F4: p ∈ linspace(2, 4.5, p_points)
    calib_sizes: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    lapq_maxiter: int = 1             # Powell/CD sweeps (the reference: 2 for ResNet-18, 1 for the rest)
    spectrum: dict = dataclasses.field(default_factory=lambda: dict(top_k=5, tol=1e-3, num_probes=32,
                                                                   density_runs=4, density_steps=30))
    spectrum_batch: int = 128         # T2: calibration images in the weight-space loss
    separability_samples: int = 50    # F3: γ/T sampling test (the reference notebook used 50)
    calib_size_seeds: int = 2         # F7: calibration seeds per size
    headline_bits: tuple[int, ...] | None = None  # --bits: F1, F2, F4 at these widths, not the paper's
    train_seed: int = 0               # --train-seed: fit's seed (initialisation, data order), another network
    dpi: int = 200                    # PNG resolution (rendering only: not part of any cache key)

    def config(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_kw"] = dict(self.model_kw)
        if d["headline_bits"] is None:  # left out, so the cache keys of runs without --bits stay valid
            del d["headline_bits"]
        if d["train_seed"] == 0:  # likewise for runs without --train-seed
            del d["train_seed"]
        if d["train_lr"] is None:  # likewise for the presets that train at fit's default
            del d["train_lr"]
        del d["dpi"]  # how the figures are drawn, not what is computed
        return d

    def widths(self, paper: tuple[int, ...]) -> tuple[int, ...]:
        """The bit widths of a headline figure: the paper's (``paper``) unless --bits gave others."""
        return tuple(self.headline_bits) if self.headline_bits else tuple(paper)


def widths_of(data: dict) -> list[int]:
    """The bit widths a figure's data holds (its keys "2", "4", …), ascending."""
    return sorted(int(k) for k in data if k.isdigit())


PRESETS = {
    "small": Preset("small", "resnet8", "digits"),
    "mnist": Preset("mnist", "resnet20", "mnist", calib_size=512, lapq_maxiter=2, grid=41),
    "cifar10": Preset("cifar10", "resnet20", "cifar10", calib_size=512, lapq_maxiter=2, grid=41),
    # The claims on a Vision Transformer (signed activation sites; fit's digits lr of 0.05 leaves it at 93 %).
    "vit": Preset("vit", "vit", "digits", train_lr=0.1),
    # The smoke test's configuration: every figure, in seconds.
    "tiny": Preset("tiny", "cnn", "digits", model_kw=(("widths", (4, 8)),), calib_size=64,
                   train_epochs=2, bits=(2,), sweep_bits=(2, 4, 8), seeds=1,
                   table_configs=(("W4A4", 4, 4), ("W2A4", 2, 4)), grid=7, p_points=6,
                   calib_sizes=(32, 64), lapq_maxiter=1,
                   spectrum=dict(top_k=2, tol=1e-2, num_probes=8, density_runs=2, density_steps=8),
                   spectrum_batch=64, separability_samples=12, calib_size_seeds=1,
                   dpi=50),  # a 200-dpi PNG takes ~1 s to render, more than most tiny figures compute
}

# --------------------------------------------------------------------------- claims


@dataclasses.dataclass
class Claim:
    """One row of the claims report: a quantity of ours against a fixed threshold."""

    id: str
    claim: str
    quantity: str
    paper: str
    threshold: str
    ours: str
    passed: bool
    figure: str
    note: str = ""

    def row(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"| {self.id} | {self.claim} | {self.quantity} | {self.paper} | {self.threshold} | "
                f"{self.ours} | **{verdict}** | {self.figure} |")


# --------------------------------------------------------------------------- JSON helpers


def to_jsonable(obj: Any):
    """numpy / jax arrays and scalars → lists and floats (NaN/inf as strings)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__array__") and not isinstance(obj, str | bytes):
        arr = np.asarray(obj)
        return to_jsonable(arr.tolist()) if arr.ndim else to_jsonable(arr.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    return obj


def from_json_float(x) -> float:
    return float(x) if not isinstance(x, str) else float(x.replace("Infinity", "inf"))


def write_json(path: Path, obj) -> Path:
    """Write JSON atomically (:func:`landscape.atomic.write_atomic`)."""
    write_atomic(path, json.dumps(to_jsonable(obj), indent=1, sort_keys=True))
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    """Write text atomically (:func:`landscape.atomic.write_atomic`)."""
    write_atomic(path, text)
    return Path(path)


def config_hash(config) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(config), sort_keys=True).encode()).hexdigest()[:16]


CODE_PACKAGES = ("landscape", "models", "figures")


def code_fingerprint() -> str:
    """SHA-256 (16 hex digits) of the Python sources that compute the figures: every ``.py``
    file of ``landscape/``, ``models/`` and ``figures/``. Part of every cache key, so a rerun
    after a code change recomputes instead of reporting an older version's results."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- context


def memory_mappings() -> tuple[int, int] | None:
    """(memory mappings this process holds, the kernel's per-process limit ``vm.max_map_count``),
    or None where they cannot be read (not Linux). Every XLA:CPU executable holds some, and at
    the limit LLVM fails ("Cannot allocate memory")."""
    try:
        with open("/proc/sys/vm/max_map_count") as fh:
            limit = int(fh.read())
        with open("/proc/self/maps") as fh:
            held = sum(1 for _ in fh)
    except (OSError, ValueError):
        return None
    return held, limit


def mapping_fraction() -> float:
    """:func:`memory_mappings` as a fraction of the limit; 1.0 where they cannot be read, so
    callers release."""
    counts = memory_mappings()
    return 1.0 if counts is None else counts[0] / max(counts[1], 1)


class Context:
    """Shared state of one reproduction run: the preset, data, trained network, ClipLosses,
    and a resumable cache of every expensive step."""

    MAX_LIVE_LOSSES = 6
    MAPPINGS_SHORT = 0.25  # fraction of vm.max_map_count past which compiled programs are freed

    def __init__(self, preset: Preset, out: Path, *, progress: bool = True, log: Callable = print,
                 cache_dir: Path | None = None):
        self.preset = preset
        self.out = Path(out)  # where figures and tables are written (paper_repro: a staging directory)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.out / ".cache"
        self.progress = progress
        self.log = log
        self._base = None
        self._data: dict = {}
        self._net = None
        self._losses: dict = {}
        self.timings: dict[str, float] = {}
        # cached steps of this run: computed now, or loaded from an earlier run's cache (a step
        # asked for again counts once, as computed or loaded, in the figure that first asked)
        self.steps = {"computed": 0, "loaded": 0}
        self._computed_now: set[Path] = set()
        self._loaded_now: set[Path] = set()  # a step loaded once counts once, in the figure that loaded it
        self._fingerprints = None  # (code, weights), taken at the first cached step

    # data and network ---------------------------------------------------------
    def data(self, seed: int = 0, calib_size: int | None = None):
        """The dataset with calibration sample ``seed`` of size ``calib_size`` (train split)."""
        import landscape as ls

        if self._base is None:
            self._base = ls.data.load(self.preset.data, data_dir=self.preset.data_dir, calib_size=1)
        size = min(calib_size or self.preset.calib_size, len(self._base.train))
        key = (seed, size)
        if key not in self._data:
            self._data[key] = self._base.with_calib(size, seed)
        return self._data[key]

    @property
    def net(self):
        """The FP32 network (trained once, then loaded from the landscape training cache)."""
        if self._net is None:
            import landscape as ls
            import models

            data = self.data()
            model = models.create(self.preset.model, num_classes=data.num_classes,
                                  **dict(self.preset.model_kw))
            self._net = ls.train.fit(model, data, epochs=self.preset.train_epochs, lr=self.preset.train_lr,
                                     seed=self.preset.train_seed, progress=self.progress)
        return self._net

    @property
    def test(self):
        return self.data().test

    def loss(self, w_bits, a_bits, *, seed: int = 0, calib_size: int | None = None, **options):
        """A memoised ClipLoss on calibration sample ``seed``."""
        import landscape as ls

        key = (w_bits, a_bits, seed, calib_size, tuple(sorted(options.items())))
        if key in self._losses:
            self._losses[key] = self._losses.pop(key)  # most recently used last
            return self._losses[key]
        if len(self._losses) >= self.MAX_LIVE_LOSSES:
            # Every live ClipLoss holds its calibration data on the device and keeps its compiled
            # programs alive (each XLA:CPU executable holds memory mappings, and a whole preset's
            # worth exceeds the kernel's per-process limit, vm.max_map_count). Drop the oldest.
            self._losses.pop(next(iter(self._losses)))
            if mapping_fraction() > self.MAPPINGS_SHORT:
                gc.collect()  # a full collection costs ~0.25 s: only when the mappings run short
        data = self.data(seed, calib_size)
        self._losses[key] = ls.ClipLoss(self.net, data.calib, w_bits=w_bits, a_bits=a_bits, **options)
        return self._losses[key]

    def release(self):
        """Drop every memoised ClipLoss (between figure modules), and JAX's compiled programs too
        once the process holds a quarter of the kernel's memory-mapping limit. Programs kept are
        reused: ClipLosses of the same sites in the next figure share them."""
        import jax

        self._losses.clear()
        # The next module may compile as much again. A full collection (about 0.25 s with a
        # figure's objects alive) is needed only then: freeing is for the mappings' sake.
        if mapping_fraction() > self.MAPPINGS_SHORT:
            gc.collect()
            jax.clear_caches()

    def save_figure(self, fig, slug: str) -> list[Path]:
        """``fig`` as ``<out>/<slug>.png`` (at the preset's dpi) and ``.pdf``, atomically."""
        from landscape import plots

        return plots.save_figure(fig, self.out / slug, dpi=self.preset.dpi)

    def aggressive_config(self) -> tuple[str, int | None, int | None]:
        """The most aggressive table configuration (the last of ``preset.table_configs``)."""
        return tuple(self.preset.table_configs[-1])

    def lapq_run(self, w_bits, a_bits, *, seed: int = 0, method: str = "powell", init=None,
                 calib_size: int | None = None, maxiter: int | None = None,
                 iteration_accuracy: bool = False) -> dict:
        """``landscape.lapq`` on calibration sample ``seed`` (bias correction on), cached.

        ``init``: None (Lp sweep → p*), a rule name, or ("lp", p). With
        ``iteration_accuracy`` the test accuracy after every iteration is recorded too.
        """
        from landscape.lapq import lapq

        maxiter = maxiter or self.preset.lapq_maxiter
        config = {"w": w_bits, "a": a_bits, "seed": seed, "method": method, "init": init,
                  "calib": calib_size or self.preset.calib_size, "maxiter": maxiter,
                  "iteration_accuracy": iteration_accuracy}

        def run():
            loss = self.loss(w_bits, a_bits, seed=seed, calib_size=calib_size, bias_correction=True)
            start = None
            if isinstance(init, list | tuple):
                start = loss.init(init[0], p=float(init[1]))
            elif init is not None:
                start = loss.init(init)
            alphas = []
            callback = (lambda info: alphas.append(np.asarray(info["alpha"]))) if iteration_accuracy else None
            res = lapq(loss, method=method, maxiter=maxiter, init=start, callback=callback, on_interrupt="raise")
            out = {"alpha": res.alpha, "loss": res.loss, "p_star": res.p_star,
                   "p_rule": res.p_selection.rule if res.p_selection else None,
                   "init_alpha": res.init_alpha, "init_loss": res.init_loss, "n_evals": res.n_evals,
                   "seconds": res.seconds,
                   "history": [{k: v for k, v in h.items() if k != "alpha"} for h in res.history],
                   "test_acc": loss.accuracy(res.alpha, self.test),
                   "init_acc": loss.accuracy(res.init_alpha, self.test)}
            if iteration_accuracy:
                out["iteration_acc"] = [out["init_acc"]] + [loss.accuracy(a, self.test) for a in alphas]
                out["iteration_loss"] = [res.init_loss] + [float(loss(a)) for a in alphas]
            return out

        return self.cached("lapq", config, run)

    # caching --------------------------------------------------------------------
    def cached(self, name: str, config: dict, compute: Callable[[], dict]) -> dict:
        """``compute()`` once per (name, config, preset, network and its weights, code version):
        stored as JSON, atomically."""
        network = {k: v for k, v in self.net.config.items() if k != "seconds"}
        if self._fingerprints is None:
            self._fingerprints = (code_fingerprint(), weights_fingerprint(self.net.variables))
        code, weights = self._fingerprints
        full = {"name": name, "config": config, "preset": self.preset.config(), "network": network,
                "code": code, "weights": weights}
        path = self.cache_dir / f"{name}-{config_hash(full)}.json"
        if path.exists():
            if path not in self._computed_now and path not in self._loaded_now:
                self.steps["loaded"] += 1
                self._loaded_now.add(path)
            return json.loads(path.read_text())
        t0 = time.time()
        value = to_jsonable(compute())
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - t0
        write_json(path, value)
        self.steps["computed"] += 1
        self._computed_now.add(path)
        # what a resumed run loads (keys sorted by the JSON): a figure drawn from this step is the
        # same whether it was computed now or in an interrupted run (F1's markers had swapped)
        return json.loads(path.read_text())
