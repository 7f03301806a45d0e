"""Layer-wise reconstruction: what AdaPrune, AdaRound and GPTQ record and measure.

Each of these post-training methods changes one layer's kernel W at a time so that the layer's
output over a calibration set stays close to the original's. This module holds the two pieces they
share: recording a layer's inputs X and outputs Y = X ⊛ W (⊛ the layer's own bilinear product, the
bias excluded, through the GEMM hook of :mod:`landscape.layers`), and the output error of a
candidate kernel W̃ (and bias shift Δb),

    MSE(W̃, Δb) = mean over (rows, outputs) of ( X ⊛ W̃ + Δb − Y )².

A new layer-wise rule records with :func:`record_layers` or :func:`layer_inputs` and scores its
candidates with :func:`layer_mse`. A layer applied more than once (shared weights) is recorded
at its first application, with a warning naming it: the rules then reconstruct that application
only.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from landscape import checks, runtime, sites
from landscape import layers as qlayers

__all__ = ["layer_inputs", "layer_mse", "record_layers"]


def record_layers(model, variables, x, names, *, precision: str = "highest"
                  ) -> dict[str, tuple[jax.Array, jax.Array, object]]:
    """Inputs X, outputs Y = gemm(X, W) and the GEMM callable of the named layers.

    One eager forward pass of ``model`` (evaluation mode, no hook otherwise) over ``x`` with a
    recording GEMM hook; returns ``{name: (X, Y, gemm)}`` ("/"-joined module paths). ``gemm`` is
    the layer's own bilinear product (pure: a conv's strides and padding are bound in it).
    ``precision`` is the pass's matmul/convolution precision ("highest": true float32).
    """
    runtime.check_precision(precision, "record_layers")
    if isinstance(names, str):  # one layer's name, not a set of one-letter names
        names = [names]
    store: dict[str, tuple] = {}
    calls: dict[str, int] = {}
    with qlayers.gemm_hook(_recorder(names, store, calls, lambda x, y, gemm: (x, y, gemm))), \
            jax.default_matmul_precision(precision):
        model.apply(variables, jnp.asarray(x), train=False)
    return _all_called(names, store, calls)


def layer_inputs(model, names, act_specs=None, act_alphas=None):
    """A compiled ``(variables, x) → {name: the layer's input X}`` for the named layers.

    With ``act_specs`` ({site: :class:`~landscape.sites.SiteSpec`}) and ``act_alphas`` ({site: α})
    those activation sites are quantized on the way (the inputs the quantized network feeds each
    layer); without, the float network's. Evaluation mode; the caller's matmul precision applies.
    A name in ``act_specs`` that is not an activation site of ``model`` is refused when the returned
    function first runs (a typo left the inputs unquantized), one without an α at once.
    """
    if isinstance(names, str):  # one layer's name, as in record_layers
        names = [names]
    act_specs = act_specs or {}
    no_alpha = sorted(set(act_specs) - set(act_alphas or {}))
    if no_alpha:
        raise ValueError(f"act_specs names {no_alpha}, which act_alphas gives no α; give one α per site")
    # α and widths enter as arguments, as in ClipLoss (see landscape.sites.quantizing)
    alphas = {k: jnp.asarray(v, jnp.float32) for k, v in (act_alphas or {}).items()}
    widths = sites.traced_widths(act_specs)

    def run(variables, x, act_alphas, widths):  # the checks run once, when jit traces it
        if act_specs:
            found, _ = sites.trace_sites(lambda v, u: model.apply(v, u, train=False), variables, x)
            known = [s.name for s in found if s.kind == "activation"]
            unknown = sorted(set(act_specs) - set(known))
            if unknown:
                raise ValueError(f"act_specs names {unknown}, which are not activation sites of the model; its "
                                 f"activation sites are {known}")
        store, calls = {}, {}
        with qlayers.gemm_hook(_recorder(names, store, calls, lambda x, y, gemm: x)), \
                sites.quantizing(act_specs, act_alphas, widths):
            model.apply(variables, x, train=False)
        return _all_called(names, store, calls)

    jitted = jax.jit(run)
    return lambda variables, x: jitted(variables, x, alphas, widths)


def _recorder(names, store, calls, entry):
    """A GEMM hook that stores ``entry(X, Y, gemm)`` under the name of each wanted layer at its
    first call and counts its calls in ``calls`` (the layer's output Y is computed as usual)."""
    wanted = set(names)

    def record(module, inputs, kernel, gemm):
        y = gemm(inputs, kernel)
        name = "/".join(module.path)
        if name in wanted:
            calls[name] = calls.get(name, 0) + 1
            if name not in store:
                store[name] = entry(inputs, y, gemm)
        return y

    return record


def _all_called(names, store, calls):
    """``store``, after checking that every named layer was recorded; warns about any layer
    applied more than once."""
    missing = set(names) - set(store)
    if missing:
        raise ValueError(f"layers {sorted(missing)} were not called by the model")
    shared = {name: n for name, n in calls.items() if n > 1}
    if shared:
        warnings.warn(f"layers applied more than once (calls per layer: {shared}) are recorded at their first "
                      "application only; a rounding or pruning rule reconstructs that application's output",
                      stacklevel=3)
    return store


def layer_mse(gemm, x, y, w, b=0.0, chunk: int = 256) -> float:
    """mean of (gemm(x, w) + b − y)² over all entries of y: the output MSE of kernel ``w`` with
    bias shift ``b`` ((C,) or a scalar), in chunks of ``chunk`` rows (bounded memory)."""
    chunk = checks.check_int(chunk, "chunk")  # chunk=-1 made the loop empty: an MSE of 0
    if np.shape(x)[0] != np.shape(y)[0]:  # a y of one row broadcast against every output: a wrong mean
        raise ValueError(f"layer_mse: x has {np.shape(x)[0]} rows and y {np.shape(y)[0]}; y must hold the layer's "
                         "outputs for the same examples as x")
    if x.shape[0] <= chunk:  # no slicing: an eager slice of a device array compiles per shape
        return float(_sum_of_squares(gemm, x, y, w, b)) / y.size
    total = 0.0
    for start in range(0, x.shape[0], chunk):
        total += float(_sum_of_squares(gemm, x[start:start + chunk], y[start:start + chunk], w, b))
    return total / y.size


@functools.partial(jax.jit, static_argnums=0)
def _sum_of_squares(gemm, x, y, w, b):
    """Σ (gemm(x, w) + b − y)²: one program per layer and chunk shape, not one per operation."""
    return jnp.sum(jnp.square(gemm(x, w) + b - y))
