"""The Flax model zoo of `landscape`: every model is built from :mod:`landscape.layers`.

>>> import models
>>> model = models.create("resnet8", num_classes=10)

Models are Linen modules called as ``model.apply(variables, x, train=False)`` on NHWC
float32 images. A user's own module built from the same quantizable layers works with
every tool of the library exactly like these, as long as its quantizable layers are not
inside a Flax lifted transform (``nn.remat``, ``nn.scan``, ``nn.vmap``): those trace their
bodies apart from the site contexts, so calibration fails there with a leaked-tracer error
and :func:`landscape.sites.direct_inputs` finds none of their layers.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping

import numpy as np

from landscape import checks
from models.cnn import CNN
from models.mlp import MLP
from models.mobilenet import InvertedResidual, MobileNetV2
from models.resnet import BasicBlock, Bottleneck, CifarResNet, ImageNetResNet
from models.vit import ViT

_REGISTRY: dict[str, Callable] = {
    "mlp": lambda num_classes, **kw: MLP(num_classes, **kw),
    "cnn": lambda num_classes, **kw: CNN(num_classes, **kw),
    "resnet8": lambda num_classes, **kw: CifarResNet(num_classes, blocks_per_stage=1, **kw),
    "resnet20": lambda num_classes, **kw: CifarResNet(num_classes, blocks_per_stage=3, **kw),
    "resnet18": lambda num_classes, **kw: ImageNetResNet(num_classes, "basic", (2, 2, 2, 2), **kw),
    "resnet50": lambda num_classes, **kw: ImageNetResNet(num_classes, "bottleneck", (3, 4, 6, 3), **kw),
    "vit": lambda num_classes, **kw: ViT(num_classes, **kw),
    "mobilenet": lambda num_classes, **kw: MobileNetV2(num_classes, **kw),
}

NAMES = tuple(_REGISTRY)

# What each name fixes itself (an override would be another model under the same name).
_FIXED = {"resnet8": ("blocks_per_stage",), "resnet20": ("blocks_per_stage",),
          "resnet18": ("block", "stage_sizes"), "resnet50": ("block", "stage_sizes")}
# Layer widths: how many (None: any number, at least one) a model takes.
_WIDTHS = {"resnet8": 3, "resnet20": 3, "cnn": None}
_VIT_SIZES = ("dim", "depth", "heads", "mlp_dim", "patch")  # patch may also be None (H // 4)


def create(name: str, num_classes: int, **kw):
    """Build a zoo model by name: one of ``models.NAMES``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(NAMES)}")
    num_classes = checks.check_int(num_classes, "num_classes", minimum=2)
    fixed = [key for key in _FIXED.get(name, ()) if key in kw]
    if fixed:
        cls = type(_REGISTRY[name](2)).__name__
        raise ValueError(f"{name!r} sets {', '.join(fixed)} itself; build models.{cls} directly for another layout")
    for key in ("widths", "hidden"):  # layer widths: a zero would fail deep inside an initializer
        if key in kw:
            value = kw[key]
            if not isinstance(value, tuple | list) or not all(
                    checks.is_real(w) and isinstance(w, numbers.Integral) and w >= 1 for w in value):
                raise ValueError(f"{key}={value!r} must be a tuple of positive integers (layer widths)")
            count = _WIDTHS.get(name, len(value))
            if (count is None and not value) or (count is not None and len(value) != count):
                raise ValueError(f"{name}: {key}={value!r} must hold "
                                 + ("at least one width" if count is None else f"{count} widths, one per stage"))
    if name == "mobilenet":
        for key in ("stem", "last"):
            if key in kw:
                kw[key] = checks.check_int(kw[key], f"mobilenet: {key}")
        if "stages" in kw:
            stages = kw["stages"]
            if not isinstance(stages, tuple | list) or not stages or not all(
                    isinstance(st, tuple | list) and len(st) == 4
                    and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in st)
                    for st in stages):
                raise ValueError(f"mobilenet: stages={stages!r} must be a non-empty tuple of (expansion, channels, "
                                 "blocks, stride) tuples of positive integers")
            kw["stages"] = tuple(tuple(int(v) for v in st) for st in stages)
    if name == "vit":
        for key in _VIT_SIZES:
            if kw.get(key) is not None:
                kw[key] = checks.check_int(kw[key], f"vit: {key}")
        if "quantize_attention" in kw:
            kw["quantize_attention"] = checks.check_flag(kw["quantize_attention"], "vit: quantize_attention")
    return _REGISTRY[name](num_classes, **kw)


def import_torchvision(variables: Mapping, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Copy a torchvision ResNet ``state_dict`` (numpy arrays) into ``variables``.

    Names map by "." → "/" with ``layerX.Y`` → ``layerX_Y`` and ``downsample.Z`` →
    ``downsample_Z``; conv weights OIHW → HWIO, linear (out, in) → (in, out), BN
    weight/bias/running_mean/running_var → scale/bias/mean/var. Every array of
    ``variables`` must be covered and shapes must match; ``num_batches_tracked`` is ignored.
    """
    import flax

    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
    out = dict(flat)
    covered = set()
    for key, value in state_dict.items():
        parts = key.split(".")
        leaf = parts[-1]
        if leaf == "num_batches_tracked":
            continue
        mods, i = [], 0
        body = parts[:-1]
        while i < len(body):
            if i + 1 < len(body) and body[i + 1].isdigit():
                mods.append(f"{body[i]}_{body[i + 1]}")
                i += 2
            else:
                mods.append(body[i])
                i += 1
        path = "/".join(mods)
        value = np.asarray(value, np.float32)
        if leaf == "weight" and value.ndim == 4:
            target, value = f"params/{path}/kernel", value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and value.ndim == 2:
            target, value = f"params/{path}/kernel", value.T
        elif leaf == "weight":
            target = f"params/{path}/scale"
        elif leaf == "bias":
            target = f"params/{path}/bias"
        elif leaf == "running_mean":
            target = f"batch_stats/{path}/mean"
        elif leaf == "running_var":
            target = f"batch_stats/{path}/var"
        else:
            raise ValueError(f"state_dict key {key!r}: unknown parameter kind {leaf!r}")
        if target not in flat:
            raise ValueError(f"state_dict key {key!r} maps to {target!r}, which the model lacks")
        if tuple(flat[target].shape) != value.shape:
            raise ValueError(
                f"state_dict key {key!r}: shape {value.shape} != model's {tuple(flat[target].shape)}"
            )
        out[target] = value
        covered.add(target)
    missing = sorted(set(flat) - covered)
    if missing:
        raise ValueError(f"state_dict lacks {len(missing)} model arrays, e.g. {missing[:3]}")
    return flax.traverse_util.unflatten_dict(out, sep="/")


__all__ = [
    "BasicBlock", "Bottleneck", "CNN", "CifarResNet", "ImageNetResNet", "InvertedResidual", "MLP", "MobileNetV2",
    "NAMES", "ViT", "create",
    "import_torchvision",
]
