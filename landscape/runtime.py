"""Process-level helpers: JAX's persistent compilation cache, how analyzers share programs among
``jax.tree_util.Partial`` losses, resumable result stores (written through ``landscape.atomic``),
the threefry layout every random draw of landscape uses, the matmul precision levels the compiled
programs accept, and the code and library versions a result file records.

Within a process, every ClipLoss of the same network, site layout and precision shares one set
of compiled programs; across processes a persistent cache turns the second and later compiles
(a resumed run, the next script) into a disk read: on 2 CPU cores, resnet8's
calibration program drops from ~3 s to ~0.3 s. The CLIs (``paper_repro.py``,
``python -m landscape lapq``) and the test suite enable it; a library import does not
change global JAX configuration on its own.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import weakref
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from landscape.atomic import write_atomic
from landscape.data import cache_dir


def enable_compilation_cache(path: str | None = None) -> str:
    """Store compiled XLA programs under ``path`` (default ``$LANDSCAPE_CACHE/xla``)."""
    if path is not None and not isinstance(path, str | os.PathLike):
        raise ValueError(f"path={path!r} must be a directory path (str or os.PathLike) or None")
    path = os.fspath(path) if path else os.path.join(cache_dir(), "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def read_json(path: str, default: dict) -> dict:
    """The JSON object at ``path`` (an earlier, possibly interrupted run's results, written by
    :func:`landscape.atomic.write_atomic`), or a fresh copy of ``default`` when there is no file yet: how the
    resumable scripts pick up where they stopped."""
    if not os.path.exists(path):
        return json.loads(json.dumps(default))  # a deep copy: the caller fills it in
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); move it away to start afresh") from err


class ResultStore:
    """The finished results of a long run by key, in a JSON file rewritten atomically after each
    one: a rerun under the same ``config`` takes them from there instead of recomputing, and a file
    left by another configuration is started afresh. ``path=None`` keeps them in memory only.

    ``store.get(key, compute)`` returns the stored result or ``compute()``'s (which must be
    JSON-serialisable), stored first; ``key in store.steps`` says whether an earlier run left it;
    ``finish()`` removes the file once the results are kept elsewhere. ``say`` reports resuming."""

    def __init__(self, path: str | os.PathLike | None, config: dict, say: Callable[[str], None] = print):
        self.path = None if path is None else os.fspath(path)
        self.config = json.loads(json.dumps(config))  # as read back: tuples become lists
        self.steps: dict = {}
        if self.path is None:
            return
        saved = read_json(self.path, {})
        if saved.get("config") == self.config:
            self.steps = saved["steps"]
            say(f"resuming: {len(self.steps)} finished results in {self.path}")
        elif saved:
            say(f"{self.path} holds another configuration's results; starting afresh")

    def get(self, key: str, compute: Callable[[], object]):
        if key not in self.steps:
            self.steps[key] = compute()
            if self.path is not None:
                write_atomic(self.path, json.dumps({"config": self.config, "steps": self.steps}) + "\n")
        return self.steps[key]

    def finish(self) -> None:
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)


def classic_threefry():
    """The context in which landscape draws random numbers: JAX's original threefry layout
    (``jax.threefry_partitionable(False)``), whatever the user's global setting.

    Why: XLA:CPU (jaxlib 0.10.2) compiles the partitionable layout, JAX's default since 0.5,
    about 15× slower, and our draws are never sharded. Measured on 2 cores: ``uniform(key,
    (3, 3, 8, 9))`` compiles in 3.9 s against 0.27 s, and resnet8's jitted initialisation in
    5.5 s against 2.3 s (10.6 s op by op). A seed gives the same numbers in every session,
    since the layout no longer follows a global flag. Use it as ``with runtime.classic_threefry():``
    around the draw, inside a jitted function too (the layout is chosen when it is traced).
    """
    return jax.threefry_partitionable(False)


# jax.default_matmul_precision's named levels (it also takes dot-algorithm names, not offered here).
# "highest" is true float32; "default" is the backend's fast path (TF32 on recent NVIDIA GPUs).
PRECISIONS = ("highest", "float32", "high", "tensorfloat32", "default", "bfloat16")


_ARRAY_LIKE = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)


def split_partial(f):
    """(the function whose programs are compiled, the data bound to it, or None).

    A ``jax.tree_util.Partial`` whose bound arguments are all arrays splits into its function and
    ``(args, keywords)``; the analyzers (``hessian_spectrum``, ``weight_surface``) then pass
    those to their compiled programs as data, as ``jax.jit`` treats a Partial argument, so that
    partials of one function with other data of the same shapes (``ClipLoss.weight_loss`` at
    another α or bit width) share the programs. Any other f is compiled with what it closes
    over as constants, once per f."""
    if isinstance(f, jax.tree_util.Partial):
        bound = (f.args, f.keywords)
        if all(isinstance(leaf, _ARRAY_LIKE) for leaf in jax.tree.leaves(bound)):
            return f.func, bound
    return f, None


def call_split(fn, bound, x, *rest):
    """fn applied to x as :func:`split_partial` split it: ``fn(x, *rest)`` without bound data,
    else ``fn(*args, x, *rest, **keywords)`` with ``bound = (args, keywords)``."""
    if bound is None:
        return fn(x, *rest)
    args, keywords = bound
    return fn(*args, x, *rest, **keywords)


def weak_entry(table: weakref.WeakKeyDictionary, fn) -> tuple[dict, Callable]:
    """(``table``'s dict of compiled programs for ``fn``, a callable returning ``fn``).

    The programs must reach ``fn`` only through that callable (a weak reference): a strong
    reference from a cached value would keep its key, and the data ``fn`` closes over, alive
    forever. An ``fn`` that cannot be weakly referenced or hashed gets a fresh dict (programs
    for this call only)."""
    try:
        return table.setdefault(fn, {}), weakref.ref(fn)
    except TypeError:
        return {}, (lambda: fn)


def check_precision(precision, where: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ValueError naming ``where``."""
    if precision not in PRECISIONS:
        raise ValueError(f"{where}: precision={precision!r}; allowed: {', '.join(map(repr, PRECISIONS))}")
    return precision


def code_version(root: str | os.PathLike | None = None) -> str | None:
    """The git commit (12 hex digits) of the checkout at ``root`` (default: the one this package
    was imported from), ``+dirty`` when tracked files differ from it; None when ``root`` is not
    the top of a git checkout (an installed package) or git is missing. Result files record it so
    that a committed figure or table says which code made it.

    For the default root the first answer is kept for the rest of the process: the process runs
    the code it imported, and a commit made while a long run was going (paper_repro took 43
    minutes) had been recorded as the run's code. Long runs call it when they start."""
    if root is None:
        return _own_code_version()
    return _checkout_version(Path(root))


@functools.cache
def _own_code_version() -> str | None:
    return _checkout_version(Path(__file__).parent.parent)


def _checkout_version(root: Path) -> str | None:
    root = root.resolve()

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None  # installed inside some other repository: its commit is not ours
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor", …): the first
    "model name" of Linux's ``cpuinfo``, else what :mod:`platform` knows (often just the
    architecture).

    Result files record it because XLA:CPU compiles for the host's instruction set: the same
    code, seed and libraries can round differently on another CPU model. Measured: resnet8 on
    digits, trained by ``fit`` from one seed, reached 99.16 % test accuracy on an Intel Xeon and
    99.72 % on an AMD EPYC."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def accelerator() -> str | None:
    """JAX's accelerator, ``"1 × NVIDIA H200 (gpu)"``, or None when JAX computes on the CPU."""
    devices = jax.devices()
    if devices[0].platform == "cpu":
        return None
    return f"{len(devices)} × {devices[0].device_kind} ({devices[0].platform})"


def software() -> dict:
    """The code (:func:`code_version`), library versions and CPU model (:func:`cpu_model`) of
    this process, for result files; also the accelerator (:func:`accelerator`) when JAX has one,
    since a GPU's float32 arithmetic differs from the CPU's in the last bits."""
    import flax
    import jaxlib
    import numpy
    import optax

    versions = {"code": code_version(), "python": platform.python_version(), "jax": jax.__version__,
                "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
                "numpy": numpy.__version__, "cpu": cpu_model()}
    device = accelerator()
    return versions if device is None else {**versions, "accelerator": device}


def describe_software(versions: dict | None = None) -> str:
    """One line for a report: ``code `<commit>`; python 3.11.7, jax 0.10.2, …``."""
    versions = versions or software()
    code = versions.get("code") or "not a git checkout"
    return f"code `{code}`; " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "code")
