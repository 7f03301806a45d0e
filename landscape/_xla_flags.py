"""A guard against XLA:CPU miscompilations in jaxlib >= 0.10.2.

jaxlib 0.10.2 started routing reductions on CPU through YNNPACK fusions, which silently
return wrong values for some batched reductions (jax-ml/jax#39103: a vmapped product
followed by a reduction; we measured errors of ~700 on a (16, 5000) float32 case) and crash
on others (jax-ml/jax#39257, #40412). Taking reductions out of YNN fusion
(``--xla_cpu_experimental_ynn_fusion_type=-reduce``) restores correct results. The flag
must be in ``XLA_FLAGS`` before the CPU backend starts, so ``import landscape`` sets it
first thing — unless the user already chose a value for that flag. Older jaxlib releases
lack the flag (and the bug), so nothing is set there.
"""

from __future__ import annotations

import os
import warnings
from importlib import metadata

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}=-reduce"
FIRST_AFFECTED = (0, 10, 2)


def _version(package: str) -> tuple[int, ...] | None:
    try:
        parts = metadata.version(package).split(".")[:3]
        return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)
    except metadata.PackageNotFoundError:
        return None


def apply() -> bool:
    """Add the flag to ``XLA_FLAGS`` when jaxlib is affected; True when it was added."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG_NAME in flags:
        return False
    version = _version("jaxlib")
    if version is None or version < FIRST_AFFECTED:
        return False
    import sys

    backend_module = sys.modules.get("jax._src.xla_bridge")
    if backend_module is not None and getattr(backend_module, "_backends", None):
        warnings.warn(
            f"landscape: JAX's CPU backend started before `import landscape`, so {FLAG} could not "
            "be applied; jaxlib >= 0.10.2 can return wrong results for batched reductions on CPU "
            "(jax-ml/jax#39103). Import landscape first or set XLA_FLAGS yourself.", stacklevel=3)
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True


apply()
