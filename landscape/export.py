"""A calibrated network as integer codes and scales, saved and loaded without pickle.

Calibration (a rule or :func:`landscape.lapq`) ends with a clipping vector α for a
:class:`~landscape.ClipLoss`; a deployment runtime wants what that α means per tensor: the
bit width, the grid, the step Δ, and the weights as integers. :func:`quantize_network` turns
(loss, α) into a :class:`QuantizedNetwork` holding, for every quantized site,

    weights:      Ŵ = Δ · q + offset − shift,  q integer codes (int8 when they fit)
    activations:  x̂ = Δ · round(clip(x / Δ, ...)) at inference, Δ and α stored

with, per grid (see :mod:`landscape.quantizers`), offset = −α for "midrise" (codes 0..2^M − 1)
and 0 for "unsigned" (0..2^M − 1) and "midtread" (−(2^(M−1) − 1)..2^(M−1) − 1); shift is the
per-channel bias correction (zero without it). Δ, offset and shift have one entry per output
channel (per-tensor α repeats). ``qnet.apply(x)`` runs the kernels the loss computed, which
``load`` checks against Δ·q + offset − shift (to 1e-5 · max|W|), and reproduces the loss's
quantized forward pass to the last bit (a forward rebuilt from the codes alone differs by float
rounding: resnet8 W4A4, 1,797 images, max |Δ logit| 0.019 per tensor, 0.11 per channel with bias
correction, no top-1 prediction changed); :func:`save` / :func:`load` store it as JSON
(the per-site table) and NumPy ``.npz`` (codes, the other variables, and the float kernels the
loss computed, so that a loaded network runs the same weights to the last bit), read back with
``allow_pickle=False``. The JSON carries the SHA-256 of its ``.npz``: a pair from two saves (a
save interrupted between its two files) is refused, as are codes outside their grid and
kernels that are not their codes' values.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from landscape import atomic, checks, quantizers, runtime, sites, train

__all__ = ["QuantizedNetwork", "SiteQuantization", "load", "quantize_network", "save"]

FORMAT_VERSION = 3  # 3: the site table's SHA-256; 2: the .npz's SHA-256 and the exact float kernels; 1, 2 still read


@dataclasses.dataclass(frozen=True)
class SiteQuantization:
    """How one site is quantized.

    Attributes:
        kind: "weight" or "activation".
        bits, grid: the width M and the grid ("midrise", "unsigned", "midtread").
        alpha: (C,) clipping values (C = output channels for a per-channel weight site, else 1).
        scale: Δ(α) of each entry of ``alpha``, as the quantizer computes it (floored at 1e-8).
        offset: (C,) −α for "midrise", else zeros; weights only (activations: zeros).
        shift: (C,) the per-channel bias-correction shift subtracted after dequantization
            (zeros without bias correction or for activations).
        per_channel: one α per output channel.
        bias_correction: whether ``shift`` comes from bias correction.
    """

    kind: str
    bits: int
    grid: str
    alpha: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    shift: np.ndarray
    per_channel: bool
    bias_correction: bool

    def code_range(self) -> tuple[int, int]:
        """The smallest and largest integer code of the grid."""
        if self.grid == "midtread":
            top = 2 ** (self.bits - 1) - 1
            return -top, top
        return 0, 2**self.bits - 1

    def to_json(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: Mapping) -> SiteQuantization:
        if d.get("kind") not in ("weight", "activation"):
            raise ValueError(f"site kind {d.get('kind')!r} is neither 'weight' nor 'activation'")
        grid = quantizers.check_grid(d.get("grid"), "saved site")
        bits = quantizers.check_bits(d.get("bits"), "saved site")
        if bits is None:
            raise ValueError("saved site: bits=None; a saved site is quantized")
        arrays = {k: np.asarray(d[k], np.float32) for k in ("alpha", "scale", "offset", "shift")}
        if len({a.shape for a in arrays.values()}) != 1 or arrays["alpha"].ndim != 1:
            raise ValueError(f"saved site: alpha, scale, offset and shift must be 1-D of one length, got "
                             f"{ {k: a.shape for k, a in arrays.items()} }")
        # The table must be one grid: an edited α, width or scale would load and run another
        # network than the one exported (α × 0.5 on one activation moved 132 of 500 predictions).
        alpha = arrays["alpha"]
        if not np.all(quantizers.valid_alpha(alpha)):
            raise ValueError(f"saved site: alpha={alpha.tolist()[:4]} must be finite and in "
                             f"(0, {quantizers.ALPHA_MAX:g}]")
        derived = {"scale": np.asarray(quantizers.step_size(jnp.asarray(alpha), bits, grid), np.float32),
                   "offset": -alpha if grid == "midrise" and d["kind"] == "weight" else np.zeros_like(alpha)}
        if not bool(d["bias_correction"]):
            derived["shift"] = np.zeros_like(alpha)
        for key, value in derived.items():
            if not np.allclose(arrays[key], value, rtol=1e-6, atol=0.0):
                raise ValueError(f"saved site: {key}={arrays[key].tolist()[:4]} is not that of a {bits}-bit {grid} "
                                 f"grid at alpha={alpha.tolist()[:4]} (expected {value.tolist()[:4]})")
        return cls(kind=d["kind"], bits=bits, grid=grid, per_channel=bool(d["per_channel"]),
                   bias_correction=bool(d["bias_correction"]), **arrays)


@dataclasses.dataclass(frozen=True)
class QuantizedNetwork:
    """A network whose quantized weights are integer codes with per-site scales.

    Attributes:
        model: the Flax module.
        variables: the network's variables with every quantized kernel replaced by its
            dequantized value Δ·q + offset − shift (BatchNorm already folded when the loss folded
            it); FP32 sites keep their weights.
        sites: site name → :class:`SiteQuantization`, network order.
        codes: weight site name → integer codes, the kernel's shape.
        precision: matmul/convolution precision of :meth:`apply` (the loss's; "highest", true
            float32, unless the loss asked otherwise: a GPU's default TF32 products would
            evaluate another network than the one calibrated).
        input_shape: the per-image shape the network takes (the loss's calibration images'),
            checked by :meth:`apply`; None (files saved before it was recorded): unchecked.
    """

    model: object
    variables: dict
    sites: dict[str, SiteQuantization]
    codes: dict[str, np.ndarray]
    precision: str = "highest"
    input_shape: tuple[int, ...] | None = None

    def dequantize(self, name: str) -> np.ndarray:
        """Ŵ = Δ · q + offset − shift for weight site ``name`` (float32)."""
        if name not in self.codes:
            raise ValueError(f"{name!r} is not a quantized weight site; those are {list(self.codes)}")
        s = self.sites[name]
        q = self.codes[name].astype(np.float32)
        return ((q * s.scale + s.offset) - s.shift).astype(np.float32)

    def apply(self, x) -> jax.Array:
        """Logits of ``x`` (batch first): the dequantized weights, activations quantized at their
        sites with the stored α — the forward pass the loss evaluated at this α."""
        checks.check_image_shape(np.shape(x), self.input_shape, "images x")
        forward, alphas, widths = self._forward
        return forward(self.variables, jnp.asarray(x, jnp.float32), alphas, widths)

    def accuracy(self, split, batch_size: int = 500) -> float:
        """Top-1 accuracy on a :class:`~landscape.data.Split` (or an (x, y) pair); labels outside
        the model's outputs are an error."""
        return train.accuracy(self, split, batch_size)

    @functools.cached_property
    def _forward(self):
        """(the jitted forward pass, the activation α and widths it takes). They are arguments,
        as in ClipLoss, not constants of the program (see :func:`landscape.sites.quantizing`):
        baked in, they moved a few test predictions of an MNIST resnet20 at W2A4 and W4A4."""
        specs = {n: sites.SiteSpec(s.bits, s.grid) for n, s in self.sites.items() if s.kind == "activation"}
        alphas = {n: jnp.asarray(s.alpha[0], jnp.float32) for n, s in self.sites.items() if s.kind == "activation"}

        def forward(variables, x, alphas, widths):
            # both contexts are read while tracing, as in ClipLoss
            with sites.quantizing(specs, alphas, widths), jax.default_matmul_precision(self.precision):
                return self.model.apply(variables, x, train=False)

        return jax.jit(forward), alphas, sites.traced_widths(specs)

    def __repr__(self) -> str:
        w = [f"{n} {s.bits}b" for n, s in self.sites.items() if s.kind == "weight"]
        a = [f"{n} {s.bits}b" for n, s in self.sites.items() if s.kind == "activation"]
        return (f"QuantizedNetwork({type(self.model).__name__}, {len(w)} integer weight sites, "
                f"{len(a)} quantized activation sites)")


def _code_dtype(lo: int, hi: int):
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    raise AssertionError((lo, hi))  # 16-bit codes fit int32


def _kernel_path(name: str) -> tuple[str, ...]:
    return ("params", *name.split("/"), "kernel")


def quantize_network(loss, alpha) -> QuantizedNetwork:
    """The network of ``loss`` quantized at ``alpha``: integer weight codes and per-site scales.

    Args:
        loss: a :class:`~landscape.ClipLoss` (its sites, widths, grid, per-channel and bias
            correction settings, and BN folding are what gets exported).
        alpha: (n,) clipping vector, positive and finite (e.g. ``lapq(loss).alpha``).

    Returns:
        :class:`QuantizedNetwork`; ``qnet.apply(x)`` gives the logits the loss computes at α.
    """
    checks.check_clip_loss(loss, "quantize_network")
    alpha = checks.as_alpha(alpha)
    if alpha.shape != (loss.n,):
        raise ValueError(f"alpha has shape {alpha.shape}; expected ({loss.n},), one entry per α of {loss!r}")
    if not np.all(quantizers.valid_alpha(alpha)):
        bad = int(np.flatnonzero(~quantizers.valid_alpha(alpha))[0])
        raise ValueError(f"alpha[{bad}] = {alpha[bad]} is not a clipping value; every entry must be in "
                         f"(0, {quantizers.ALPHA_MAX:g}]")
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, jax.device_get(loss.variables)))
    slices = loss.site_slices()
    grid_values = grid_weights(loss, alpha)
    table, codes = {}, {}
    for site in loss.sites:
        spec = loss.specs[site.name]
        channels = site.channels if site.kind == "weight" else 1
        a_full = np.broadcast_to(alpha[slices[site.name]], (channels,)).astype(np.float32)
        scale = np.asarray(quantizers.step_size(jnp.asarray(a_full), spec.bits, spec.grid), np.float32)
        offset = -a_full if spec.grid == "midrise" else np.zeros_like(a_full)
        if site.kind == "activation":
            table[site.name] = SiteQuantization(site.kind, spec.bits, spec.grid, a_full, scale, np.zeros_like(a_full),
                                                np.zeros_like(a_full), False, False)
            continue
        key = _kernel_path(site.name)
        if key not in flat:
            raise ValueError(f"weight site {site.name!r} has no variable {'/'.join(key)}; export needs the "
                             "quantizable layers' 'kernel' parameters")
        w_hat, shift, used = (np.asarray(v, np.float32) for v in grid_values[site.name])
        s = SiteQuantization(site.kind, spec.bits, spec.grid, a_full, scale, offset, shift.reshape(channels),
                             spec.per_channel, spec.bias_correction)
        lo, hi = s.code_range()
        # w_hat is on the grid, so (w_hat − offset)/Δ is an integer up to rounding error.
        codes[site.name] = np.clip(np.rint((w_hat - offset) / scale), lo, hi).astype(_code_dtype(lo, hi))
        table[site.name] = s
        flat[key] = used  # the weights the loss uses, to the last bit (formed in the program, as there)
    variables = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    return QuantizedNetwork(loss.model, variables, table, codes, loss.precision,
                            tuple(int(d) for d in loss.calib.x.shape[1:]))


def grid_weights(loss, alpha, variables=None) -> dict:
    """Weight site → (Q(W) on the grid, bias-correction shift, Q(W) − shift) as the loss's own
    quantizer computes them inside a compiled pass at ``alpha`` (checked by the caller), for the
    loss's variables or ``variables`` (e.g. kernels whose codes a rounding rule chose).

    Why not Δ·q + offset in NumPy: XLA fuses round(z)·Δ + offset into one multiply-add, so a
    re-derivation can differ in the last bit, and an ulp can move a later activation across a
    rounding tie; the values formed in the program are the ones the loss, and the export, use.
    """
    slices = loss.site_slices()
    alphas = {s.name: alpha[slices[s.name]] if loss.specs[s.name].per_channel else alpha[slices[s.name]][0]
              for s in loss.sites}
    with jax.default_matmul_precision(loss.precision):
        return sites.quantized_weights(lambda v, x: loss.model.apply(v, x, train=False), loss.specs,
                                       {k: jnp.asarray(v) for k, v in alphas.items()},
                                       loss.variables if variables is None else variables,
                                       jnp.asarray(loss.calib.x[:1]), bits=sites.traced_widths(loss.specs))


def _stem(path, action: str) -> str:
    """The stem of a saved network's two files: ``path`` itself, or without a ``.json`` / ``.npz``
    suffix (``"w4.npz"`` and ``"w4.json"`` name the pair ``w4.json`` + ``w4.npz`` too)."""
    stem = os.fspath(path) if isinstance(path, str | os.PathLike) else ""
    for suffix in (".json", ".npz"):
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
            break
    if not stem or stem.endswith(os.sep) or os.path.basename(stem) in (".", ".."):
        raise ValueError(f"path={path!r} must name a file (the stem of {action} .json and .npz, a str or "
                         "os.PathLike), not be empty or a directory")
    return stem


def save(qnet: QuantizedNetwork, path: str) -> str:
    """Write ``path``.npz (codes, the variables that are not quantized kernels, and the
    quantized kernels as floats) and then ``path``.json (the per-site table and the .npz's
    SHA-256), each atomically. Returns ``path``, the stem of the two files: a ``path`` ending in
    ``.json`` or ``.npz`` names the stem without it (``save(q, "w4.npz")`` writes ``w4.npz`` and
    ``w4.json``).

    The float kernels are the weights ``qnet`` runs with, to the last bit (Δ·q + offset − shift
    recomputed in NumPy can differ by an ulp, enough to move an activation across a rounding
    tie); :func:`load` checks them against the codes."""
    if not isinstance(qnet, QuantizedNetwork):
        if hasattr(qnet, "network") and isinstance(qnet.network, QuantizedNetwork):
            hint = ": pass its .network (the rounded network of adaround / gptq)"
        else:
            hint = " (from ls.export.quantize_network(loss, alpha), or result.network of adaround / gptq)"
        raise ValueError(f"save needs a QuantizedNetwork, got a {type(qnet).__name__}{hint}")
    path = _stem(path, "the saved network's")
    flat = traverse_util.flatten_dict(jax.device_get(qnet.variables))
    quantized = {_kernel_path(n) for n in qnet.codes}
    arrays = {"code/" + n: c for n, c in qnet.codes.items()}
    arrays |= {"var/" + "/".join(k): np.asarray(v) for k, v in flat.items() if k not in quantized}
    arrays |= {"kernel/" + n: np.asarray(flat[_kernel_path(n)], np.float32) for n in qnet.codes}
    meta = {"format": FORMAT_VERSION, "model": repr(qnet.model),
            "sites": {n: s.to_json() for n, s in qnet.sites.items()},
            "kernels": {n: "/".join(_kernel_path(n)) for n in qnet.codes}, "precision": qnet.precision}
    if qnet.input_shape is not None:
        meta["input_shape"] = [int(d) for d in qnet.input_shape]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    blob = buffer.getvalue()
    meta["npz_sha256"] = hashlib.sha256(blob).hexdigest()
    meta["sites_sha256"] = _table_sha256(meta["sites"])
    atomic.write_atomic(path + ".npz", blob)
    atomic.write_atomic(path + ".json", json.dumps(meta, indent=1) + "\n")
    return path


def _table_sha256(table: Mapping) -> str:
    """SHA-256 of a site table in a canonical JSON form (sorted keys): an edit of the .json's
    table (a deleted activation entry ran that activation unquantized) no longer loads."""
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def _sha256(filename: str) -> str:
    digest = hashlib.sha256()
    with open(filename, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(model, path: str) -> QuantizedNetwork:
    """Read what :func:`save` wrote (``allow_pickle=False``) for ``model``, the same Flax module.
    ``path`` is the stem :func:`save` returned, or either file's name (``.json`` / ``.npz``)."""
    checks.check_module(model, "export.load")
    path = _stem(path, "a saved network's")
    with open(path + ".json") as fh:
        meta = json.load(fh)
    if meta.get("format") not in (1, 2, FORMAT_VERSION):
        raise ValueError(f"{path}.json has format {meta.get('format')!r}; this version reads 1 to {FORMAT_VERSION}")
    if meta["model"] != repr(model):
        raise ValueError(f"{path} was saved for the model\n{meta['model']}\nnot\n{model!r}")
    if meta["format"] >= 2 and _sha256(path + ".npz") != meta.get("npz_sha256"):
        raise ValueError(f"{path}.npz is not the file {path}.json was saved with (its SHA-256 differs): "
                         "the two come from different saves, e.g. one interrupted between them; save again")
    if meta["format"] >= 3 and _table_sha256(meta["sites"]) != meta.get("sites_sha256"):
        raise ValueError(f"{path}.json: its site table is not the one saved (its SHA-256 differs): an entry was "
                         "edited or removed after saving; export the network again")
    table = {}
    for n, d in meta["sites"].items():
        try:
            table[n] = SiteQuantization.from_json(d)
        except ValueError as err:
            raise ValueError(f"{path}.json, site {n!r}: {err}") from None
    with np.load(path + ".npz", allow_pickle=False) as archive:
        codes = {k[len("code/"):]: archive[k] for k in archive.files if k.startswith("code/")}
        kernels = {k[len("kernel/"):]: archive[k] for k in archive.files if k.startswith("kernel/")}
        flat = {tuple(k[len("var/"):].split("/")): archive[k] for k in archive.files if k.startswith("var/")}
    # files written before the precision was stored were evaluated at the default, "highest"
    precision = runtime.check_precision(meta.get("precision", "highest"), f"{path}.json")
    shape = meta.get("input_shape")  # absent from files saved before it was recorded
    if shape is not None and not (isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise ValueError(f"{path}.json: input_shape={shape!r} is not a list of positive integers")
    qnet = QuantizedNetwork(model, {}, table, codes, precision, None if shape is None else tuple(shape))
    for name, c in codes.items():
        if name not in table or table[name].kind != "weight":
            raise ValueError(f"{path}.npz has codes for {name!r}, which {path}.json lists as no weight site")
        lo, hi = table[name].code_range()
        if table[name].scale.shape[0] not in (1, c.shape[-1]):
            raise ValueError(f"{path}: {name!r} has {table[name].scale.shape[0]} scales for codes of shape {c.shape}; "
                             "need one, or one per output channel (the last axis)")
        if not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"{path}: the codes of {name!r} are {c.dtype}, not integers")
        if meta["format"] >= 2 and name not in kernels:
            raise ValueError(f"{path}.npz lacks kernel/{name}, the float kernel format {meta['format']} stores "
                             "with every code array")
        if c.size and (int(c.min()) < lo or int(c.max()) > hi):
            raise ValueError(f"{path}: the codes of {name!r} span [{int(c.min())}, {int(c.max())}], outside "
                             f"[{lo}, {hi}], the {table[name].bits}-bit {table[name].grid} grid")
        values = qnet.dequantize(name)
        kernel = kernels.get(name, values)  # format 1 stored no kernels: Δ·q + offset − shift
        if kernel.shape != values.shape or np.max(np.abs(kernel - values), initial=0.0) > 1e-5 * max(
                float(np.max(np.abs(values), initial=0.0)), 1e-12):
            raise ValueError(f"{path}: the stored kernel of {name!r} is not Δ·q + offset − shift of its codes")
        flat[_kernel_path(name)] = kernel
    variables = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})
    if shape is not None:  # the model's own sites (abstract trace): every table entry must be one of them
        found = {site.name: site.kind for site in sites.trace_sites(
            lambda v, x: model.apply(v, x, train=False), variables, jnp.zeros((1, *shape), jnp.float32))[0]}
        wrong = [f"{n!r} ({s.kind})" for n, s in table.items() if found.get(n) != s.kind]
        if wrong:
            raise ValueError(f"{path}.json lists sites the model does not have (name and kind): {', '.join(wrong)}; "
                             f"the model's sites are {sorted(f'{n} ({k})' for n, k in found.items())}")
    return dataclasses.replace(qnet, variables=variables)
