"""The XLA:CPU guard (landscape/_xla_flags.py) is active and fixes jax-ml/jax#39103's case."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from landscape import _xla_flags


def test_flag_is_set_for_affected_jaxlib():
    version = _xla_flags._version("jaxlib")
    if version is not None and version >= _xla_flags.FIRST_AFFECTED:
        assert _xla_flags.FLAG_NAME in os.environ.get("XLA_FLAGS", "")


def test_batched_reduction_is_correct_under_jit():
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=5000).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(16, 5000)).astype(np.float32)
    got = jax.jit(lambda v: jnp.asarray(b)[None] * jnp.sum(jnp.asarray(a) * v, axis=1)[:, None])(v)
    expected = b[None] * (v.astype(np.float64) @ a.astype(np.float64))[:, None]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-3, atol=1e-2)
