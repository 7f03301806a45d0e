"""Batch-norm folding: absorb each BN into the conv that feeds it.

For a conv with kernel W (…, C_out) (and bias b) followed by BN(γ, β, μ, σ², ε), with the
per-channel scale s = γ / √(σ² + ε)::

    W' = W·s,   b' = b·s,   BN → scale 1, bias β − μ·s, mean 0, var 1 − ε

so the BN becomes an exact identity plus a bias and the *folded* kernel is what gets
quantized (the LAPQ reference's ``-bnf`` option; off by default there and here).
Conv → BN pairs are found by tracing: a BN whose input is exactly a conv's output.
"""

from __future__ import annotations

import functools
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np

from landscape import runtime, sites

# Folding is exact up to float rounding (≈1e-6 of the logits in true float32); a change above
# this fraction of max |logit| means a folded conv's output has another reader, which now sees
# the scaled kernel. At a faster precision (a GPU's TF32: ~1e-3 relative per product) the check
# allows FOLD_TOL_FAST instead.
FOLD_TOL, FOLD_TOL_FAST = 1e-3, 2e-2


def batchnorm_pairs(model, variables, x) -> list[tuple[str, str, float]]:
    """(conv path, BN path, BN ε) for every BN applied directly to a conv's output."""
    _, pairs = sites.trace_sites(lambda v, x: model.apply(v, x, train=False), variables, x)
    return pairs


def fold_batchnorm(model, variables, x, *, precision: str = "highest") -> dict:
    """New variables with every conv → BN pair folded (``x``: an example batch, for tracing
    and for checking that the logits stay the same, computed at ``precision``).

    Raises:
        ValueError: folding changes the logits on ``x`` (by more than ``FOLD_TOL`` · max |logit|):
            a folded conv's output is read by something besides its BN, a side path that would
            see the scaled kernel. The error names the pairs that change the logits on their own.
    """
    pairs = batchnorm_pairs(model, variables, x)
    if not pairs and "batch_stats" in variables:
        # BatchNorm statistics but no pair: flax.linen.BatchNorm, or a BN not right after a conv
        warnings.warn(f"fold_batchnorm: {type(model).__name__} has BatchNorm statistics but no BatchNorm "
                      "applied directly to a QuantConv's output, so nothing is folded; only "
                      "landscape.layers.BatchNorm (not flax.linen.BatchNorm) right after a conv folds",
                      RuntimeWarning, stacklevel=2)
    folded = _fold(variables, pairs)
    if pairs:
        runtime.check_precision(precision, "fold_batchnorm")
        jitted = _eval_forward(model)

        def forward(v):
            with jax.default_matmul_precision(precision):  # part of jit's cache key: set on every call
                return np.asarray(jitted(v, x))

        reference = forward(variables)
        tol = FOLD_TOL if precision == "highest" else FOLD_TOL_FAST
        bound = tol * max(float(np.max(np.abs(reference))), 1e-12)

        def change(v):
            return float(np.max(np.abs(forward(v) - reference)))

        moved = change(folded)
        if moved > bound:
            bad = [f"{conv} → {bn}" for conv, bn, eps in pairs if change(_fold(variables, [(conv, bn, eps)])) > bound]
            raise ValueError(f"fold_batchnorm: folding changes the logits by {moved:.3g} (max |logit| "
                             f"{bound / tol:.3g}): the output of {', '.join(bad) or 'some conv'} is also read "
                             "besides its BatchNorm, and that reader would see the scaled kernel; leave the BNs "
                             "unfolded (ClipLoss(fold_bn=False); cross_layer_equalization needs foldable BNs)")
    return folded


@functools.lru_cache(maxsize=8)
def _eval_forward(model):
    """The jitted evaluation forward of ``model``, one per model (Flax modules hash by value):
    ``ClipLoss.with_options`` folds again for every new loss and would otherwise recompile."""
    return jax.jit(lambda v, xb: model.apply(v, xb, train=False))


def _fold(variables, pairs) -> dict:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
    out = dict(flat)
    for conv, bn, eps in pairs:
        mean, var = flat[f"batch_stats/{bn}/mean"], flat[f"batch_stats/{bn}/var"]
        gamma, beta = flat[f"params/{bn}/scale"], flat[f"params/{bn}/bias"]
        s = gamma / jnp.sqrt(var + eps)
        out[f"params/{conv}/kernel"] = flat[f"params/{conv}/kernel"] * s
        if f"params/{conv}/bias" in flat:
            out[f"params/{conv}/bias"] = flat[f"params/{conv}/bias"] * s
        out[f"params/{bn}/scale"] = jnp.ones_like(gamma)
        out[f"params/{bn}/bias"] = beta - mean * s
        out[f"batch_stats/{bn}/mean"] = jnp.zeros_like(mean)
        out[f"batch_stats/{bn}/var"] = jnp.full_like(var, 1.0 - eps)
    return flax.traverse_util.unflatten_dict(out, sep="/")
