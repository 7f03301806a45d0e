"""landscape: the loss landscape of compressed neural networks, in JAX.

The centre is :class:`ClipLoss`, the calibration loss of a trained network as a pure
function of its clipping vector α. Data (:mod:`landscape.data`), training
(:mod:`landscape.train`), quantizers and quantizable layers feed it; calibration rules,
analyzers and optimizers consume it.
"""

from landscape import calibration, data, folding, layers, quantizers, sites, train
from landscape.clip_loss import ClipLoss, default_sites, sites_of

__version__ = "0.1.0"

__all__ = [
    "ClipLoss", "calibration", "data", "default_sites", "folding", "layers", "quantizers", "sites",
    "sites_of", "train",
]
