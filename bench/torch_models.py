"""PyTorch twins of the `landscape` CIFAR ResNets, for benchmarks against eager PyTorch.

A twin has the same topology, the same quantization sites in the same (call) order and the
same fake-quant semantics as the Flax model, written the way a PyTorch user would write
them: ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` in NCHW, and one explicit, eager
fake-quant per site::

    midrise  (weights):      Δ = 2α/(2^M − 1),  x̂ = round(clamp((x + α)/Δ, 0, 2^M − 1))·Δ − α
    unsigned (post-ReLU):    Δ = α/(2^M − 1),   x̂ = round(clamp(x/Δ, 0, 2^M − 1))·Δ
    midtread (signed):       Δ = α/(2^(M−1) − 1), x̂ = round(clamp(x/Δ, −T, T))·Δ,  T = 2^(M−1) − 1

with Δ floored at 1e-8, ``torch.round`` (half to even, like ``jnp.round``) and, when autograd
is recording, straight-through rounding ``z + (round(z) − z).detach()``.

Module paths mirror the Flax module paths with "/" → ".", e.g. Flax ``layer1_0/conv1`` is
``twin.layer1_0.conv1``, so :func:`load_flax_variables` is a renaming plus the layout
changes NHWC/HWIO → NCHW/OIHW (conv kernels), (in, out) → (out, in) (dense kernels) and
scale/bias/mean/var → weight/bias/running_mean/running_var (BatchNorm, ε = 1e-5,
PyTorch momentum 0.1 = Flax momentum 0.9).

Typical use (``loss`` a :class:`landscape.ClipLoss`)::

    twin = from_flax(loss.model, loss.variables)      # FP32 twin, eval mode
    twin.quantize(loss.specs)                          # same active sites as the loss
    assert twin.active_sites == [s.name for s in loss.sites]
    twin.set_alpha(alpha)                              # flat α in ClipLoss order
    logits = twin(nchw(x))
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DELTA_FLOOR = 1e-8
GRIDS = ("midrise", "unsigned", "midtread")


# --------------------------------------------------------------------------- fake-quant


def _round(z: torch.Tensor) -> torch.Tensor:
    # Straight-through only when autograd records: under no_grad the plain round is what
    # a PyTorch user would run, and it is two elementwise ops cheaper.
    if torch.is_grad_enabled() and z.requires_grad:
        return z + (torch.round(z) - z).detach()
    return torch.round(z)


def fake_quant(x: torch.Tensor, alpha: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    """Eager fake-quantization of ``x`` with clipping value ``alpha`` (broadcast against x).

    Args:
      x: any shape.
      alpha: a 0-d tensor, or per channel shaped to broadcast against ``x``.
      bits: M in [2, 16].
      grid: "midrise" | "unsigned" | "midtread" (see the module docstring).
    Returns:
      x̂, same shape and dtype as x.
    """
    if grid == "midrise":
        top = 2**bits - 1
        delta = torch.clamp(2.0 * alpha / top, min=DELTA_FLOOR)
        z = torch.clamp((x + alpha) / delta, 0.0, top)
        return _round(z) * delta - alpha
    if grid == "unsigned":
        top = 2**bits - 1
        delta = torch.clamp(alpha / top, min=DELTA_FLOOR)
        z = torch.clamp(x / delta, 0.0, top)
        return _round(z) * delta
    if grid == "midtread":
        top = 2 ** (bits - 1) - 1
        delta = torch.clamp(alpha / top, min=DELTA_FLOOR)
        z = torch.clamp(x / delta, -top, top)
        return _round(z) * delta
    raise ValueError(f"grid={grid!r} is not allowed; use one of {GRIDS}")


# --------------------------------------------------------------------------- sites


class _Site:
    """State shared by every quantizable module: its name, spec and α.

    ``spec`` is None (FP32) or anything with ``.bits``, ``.grid`` and optionally
    ``.per_channel`` / ``.bias_correction`` (e.g. :class:`landscape.sites.SiteSpec`).
    """

    kind = ""

    def _init_site(self):
        self.site_name = ""
        self.spec = None
        self.alpha: torch.Tensor | None = None
        self._recorder: list | None = None

    def _visit(self):
        if self._recorder is not None:
            self._recorder.append(self)

    @property
    def alpha_size(self) -> int:
        if self.spec is not None and getattr(self.spec, "per_channel", False):
            return int(self.weight.shape[0])
        return 1

    def _quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        self._visit()
        if self.spec is None:
            return w
        alpha = self.alpha.view((-1,) + (1,) * (w.dim() - 1)) if self.alpha.dim() else self.alpha
        w_hat = fake_quant(w, alpha, self.spec.bits, self.spec.grid)
        if getattr(self.spec, "bias_correction", False):
            axes = tuple(range(1, w.dim()))
            w_hat = w_hat - (w_hat.mean(axes, keepdim=True) - w.mean(axes, keepdim=True))
        return w_hat


class QuantConv2d(nn.Conv2d, _Site):
    """``nn.Conv2d`` whose weight is a weight site."""

    kind = "weight"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._init_site()

    def forward(self, x):
        w = self._quantize_weight(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(nn.Linear, _Site):
    """``nn.Linear`` whose weight is a weight site."""

    kind = "weight"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._init_site()

    def forward(self, x):
        return F.linear(x, self._quantize_weight(self.weight), self.bias)


class QuantReLU(nn.Module, _Site):
    """ReLU whose output is an activation site."""

    kind = "activation"

    def __init__(self):
        super().__init__()
        self._init_site()

    def forward(self, x):
        self._visit()
        y = F.relu(x)
        if self.spec is None:
            return y
        return fake_quant(y, self.alpha, self.spec.bits, self.spec.grid)


# --------------------------------------------------------------------------- networks


class QuantNet(nn.Module):
    """Base class of the twins: site bookkeeping (order, specs, α).

    Sites are ordered by a recorded forward pass on a small dummy input, i.e. in call order,
    which is also how :func:`landscape.sites.trace_sites` orders the Flax model's sites.
    """

    example_shape: tuple[int, ...] = (1, 3, 8, 8)

    def _name_sites(self):
        modules = {m: name for name, m in self.named_modules() if isinstance(m, _Site)}
        for module, name in modules.items():
            module.site_name = name.replace(".", "/")
        order: list = []
        for module in modules:
            module._recorder = order
        try:
            with torch.no_grad():
                self(torch.zeros(self.example_shape))
        finally:
            for module in modules:
                module._recorder = None
        seen, self._sites = set(), []
        for module in order:
            if id(module) not in seen:
                seen.add(id(module))
                self._sites.append(module)

    @property
    def site_modules(self) -> list:
        return list(self._sites)

    @property
    def all_sites(self) -> list[str]:
        """Every site's name, in call order (as ``ClipLoss.all_sites``)."""
        return [m.site_name for m in self._sites]

    @property
    def active_sites(self) -> list[str]:
        """Names of the quantized sites, in call order (as ``ClipLoss.sites``)."""
        return [m.site_name for m in self._sites if m.spec is not None]

    def quantize(self, specs: Mapping | None):
        """Quantize the sites named in ``specs`` (name → spec); every other site is FP32.

        Returns self. Unknown names raise ValueError.
        """
        specs = dict(specs or {})
        known = set(self.all_sites)
        unknown = sorted(set(specs) - known)
        if unknown:
            raise ValueError(f"unknown sites {unknown}; the twin's sites are {self.all_sites}")
        for m in self._sites:
            m.spec = specs.get(m.site_name)
            if m.spec is not None and m.spec.grid not in GRIDS:
                raise ValueError(f"site {m.site_name!r}: grid={m.spec.grid!r}; use one of {GRIDS}")
            m.alpha = None
        return self

    @property
    def n_alpha(self) -> int:
        return sum(m.alpha_size for m in self._sites if m.spec is not None)

    def set_alpha(self, alpha):
        """Set every active site's α from a flat vector in ``active_sites`` order, (n,).

        A per-channel weight site takes ``out_channels`` consecutive entries. α takes the
        dtype and device of the twin's parameters: call this after ``.double()`` / ``.to()``.
        """
        ref = next(self.parameters())
        alpha = torch.tensor(np.asarray(alpha), dtype=ref.dtype, device=ref.device)
        if alpha.shape != (self.n_alpha,):
            raise ValueError(f"alpha has shape {tuple(alpha.shape)}; expected ({self.n_alpha},) for "
                             f"{len(self.active_sites)} active sites")
        offset = 0
        for m in self._sites:
            if m.spec is None:
                continue
            k = m.alpha_size
            piece = alpha[offset:offset + k]
            m.alpha = piece if getattr(m.spec, "per_channel", False) else piece.reshape(())
            offset += k
        return self


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN pairs, a projection shortcut when the shape changes, ReLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = QuantConv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = QuantReLU()
        self.conv2 = QuantConv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.has_downsample = stride != 1 or in_ch != out_ch
        if self.has_downsample:
            self.downsample_0 = QuantConv2d(in_ch, out_ch, 1, stride, 0, bias=False)
            self.downsample_1 = nn.BatchNorm2d(out_ch)
        self.relu2 = QuantReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.has_downsample:
            x = self.downsample_1(self.downsample_0(x))
        return self.relu2(x + y)


class CifarResNet(QuantNet):
    """Twin of :class:`models.resnet.CifarResNet` (ResNet-(6n+2): 3×3 stem, three stages)."""

    def __init__(self, num_classes: int, blocks_per_stage: int = 3, widths=(16, 32, 64),
                 in_channels: int = 3):
        super().__init__()
        self.example_shape = (1, in_channels, 8, 8)
        self.conv1 = QuantConv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = QuantReLU()
        self.block_names = []
        ch = widths[0]
        for stage, width in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                name = f"layer{stage + 1}_{b}"
                self.add_module(name, BasicBlock(ch, width, stride))
                self.block_names.append(name)
                ch = width
        self.fc = QuantLinear(ch, num_classes)
        self.eval()
        self._name_sites()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.fc(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- Flax → PyTorch


def _flatten(tree, prefix=""):
    out = {}
    for key, value in dict(tree).items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = np.asarray(value, np.float32)
    return out


def load_flax_variables(twin: nn.Module, variables: Mapping) -> nn.Module:
    """Copy Flax ``variables`` ({"params", "batch_stats"}) into ``twin`` in place.

    Module path ``a.b`` ↔ Flax path ``a/b``. Conv kernels HWIO → OIHW, dense kernels
    (in, out) → (out, in), BN scale/bias/mean/var → weight/bias/running_mean/running_var.
    Every twin tensor and every Flax array must be matched, with equal shapes (ValueError).
    """
    flat = _flatten(variables)
    used = set()

    def take(key, transform=lambda a: a):
        if key not in flat:
            raise ValueError(f"Flax variables lack {key!r} (needed by the twin)")
        used.add(key)
        return transform(flat[key])

    def put(tensor, value, what):
        if tuple(tensor.shape) != value.shape:
            raise ValueError(f"{what}: Flax shape {value.shape} (after layout change) != twin's "
                             f"{tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(torch.tensor(value))

    for name, module in twin.named_modules():
        path = name.replace(".", "/")
        if isinstance(module, nn.Conv2d):
            put(module.weight, take(f"params/{path}/kernel", lambda a: a.transpose(3, 2, 0, 1)), path)
        elif isinstance(module, nn.Linear):
            put(module.weight, take(f"params/{path}/kernel", lambda a: a.T), path)
        elif isinstance(module, nn.BatchNorm2d):
            put(module.weight, take(f"params/{path}/scale"), path)
            put(module.bias, take(f"params/{path}/bias"), path)
            put(module.running_mean, take(f"batch_stats/{path}/mean"), path)
            put(module.running_var, take(f"batch_stats/{path}/var"), path)
            continue
        else:
            continue
        if module.bias is not None:
            put(module.bias, take(f"params/{path}/bias"), path)
    unused = sorted(set(flat) - used)
    if unused:
        raise ValueError(f"the twin has no place for {len(unused)} Flax arrays, e.g. {unused[:3]}")
    return twin


def from_flax(model, variables: Mapping) -> QuantNet:
    """The eval-mode PyTorch twin of a Flax zoo ``model`` with its ``variables`` copied in.

    Supported: :class:`models.resnet.CifarResNet` ("resnet8", "resnet20", …). Every site is
    FP32 until :meth:`QuantNet.quantize`.
    """
    kind = type(model).__name__
    if kind != "CifarResNet":
        raise ValueError(f"no PyTorch twin for {kind}; supported: CifarResNet (resnet8, resnet20)")
    params = variables["params"]
    in_channels = int(np.shape(params["conv1"]["kernel"])[2])
    conv_bias = "bias" in params["conv1"]
    if conv_bias:
        raise ValueError("the CifarResNet twin has bias-free convs; got a conv bias in the variables")
    twin = CifarResNet(model.num_classes, model.blocks_per_stage, tuple(model.widths), in_channels)
    return load_flax_variables(twin, variables).eval()


def nchw(x) -> torch.Tensor:
    """NHWC images (numpy or JAX) → a contiguous NCHW float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))
