"""landscape: the loss landscape of compressed neural networks, in JAX.

The centre is :class:`ClipLoss`, the calibration loss of a trained network as a pure
function of its clipping vector α. Data (:mod:`landscape.data`), training
(:mod:`landscape.train`), quantizers and quantizable layers feed it; calibration rules,
analyzers and optimizers consume it.
"""

# First: guards XLA:CPU before any JAX computation (see landscape/_xla_flags.py).
from landscape import _xla_flags  # noqa: F401  isort: skip
from landscape import (
    atomic,
    bit_allocation,
    calibration,
    data,
    equalization,
    export,
    folding,
    layers,
    layerwise,
    luq,
    quantizers,
    rounding,
    runtime,
    sites,
    sparsity,
    spectrum,
    surfaces,
    train,
)

# Like `lapq`, the functions `adaround` and `gptq` shadow their modules: ls.adaround(loss, alpha).
from landscape.adaround import adaround
from landscape.bit_allocation import allocate_bits, weight_sensitivity
from landscape.clip_hessian import clip_hessian
from landscape.clip_loss import ClipLoss, default_sites, sites_of
from landscape.gptq import gptq

# Like `separability`, the function `lapq` shadows its module on purpose: ls.lapq(loss).
from landscape.lapq import LAPQResult, MethodComparison, compare_methods, lapq
from landscape.rounding import RoundingResult
from landscape.runtime import enable_compilation_cache

# The function `separability` shadows the module of that name on purpose: ls.separability(H).
from landscape.separability import (
    anova_interaction,
    flat_fraction,
    gaussian_curvature,
    separability,
    separability_index,
)
from landscape.spectrum import HessianSpectrum, hessian_spectrum
from landscape.surfaces import loss_line, loss_surface, random_direction, weight_surface

__version__ = "0.1.0"

__all__ = [
    "ClipLoss", "HessianSpectrum", "LAPQResult", "MethodComparison", "RoundingResult", "adaround", "allocate_bits",
    "anova_interaction",
    "atomic", "bit_allocation", "calibration", "equalization", "export",
    "clip_hessian", "compare_methods", "data", "lapq",
    "default_sites", "enable_compilation_cache", "flat_fraction", "folding", "gaussian_curvature", "gptq",
    "hessian_spectrum", "layers", "layerwise", "loss_line", "loss_surface", "luq", "quantizers", "random_direction",
    "rounding", "runtime", "separability", "separability_index", "sites", "sites_of", "sparsity", "spectrum",
    "surfaces", "train", "weight_sensitivity", "weight_surface",
]
