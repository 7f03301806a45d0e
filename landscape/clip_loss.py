"""ClipLoss: the calibration loss of a trained network as a pure function of its clipping values.

    L(α) = (1/N) Σ_i CE(f(x_i; Q_α(W), Q_α(a)), y_i),      α ∈ R^n (one entry per site)

over a fixed calibration set. Everything else in the library consumes this object:
calibration rules initialise α, the analyzers differentiate or sample it, the optimizers
minimise it. Design points:

* **One compile.** The network, the calibration data and the site layout are fixed at
  construction; α is the only input, so ``loss(α)`` compiles once and every later call
  reuses it (``loss.compilations`` counts traces per entry point). The programs take the bit
  widths, variables and data as arguments, so every ClipLoss of the same model and sites
  shares them (:class:`_Programs`).
* **Many α at once.** ``loss.batch(alphas)`` evaluates (K, n) clipping vectors in one
  compiled call per chunk of ``chunk`` rows: ``vmap``-ed on accelerators, a compiled
  sequential loop on CPU (where vmapped convolution kernels are slower per α) that runs
  only the real rows, so a batch of K costs K evaluations whatever the padding.
* **Safe for derivative-free optimizers.** α ≤ 0, non-finite α or α above
  ``quantizers.ALPHA_MAX`` (1e38, where float32 overflows) gives +inf, never NaN; so does a
  valid α large enough to overflow the network's activations.
* **Data on device once**, sharded over ``jax.devices()`` along the batch axis when there
  are several (data parallel; the mean is reduced by XLA).
* **Differentiable** through straight-through rounding: ``loss.grad`` and ``loss.hessian``
  are the STE surrogate's derivatives (what the LAPQ authors computed).
* **True float32 on accelerators.** The network's products run at ``precision="highest"`` by
  default: GPUs otherwise compute float32 matmuls and convolutions in TF32 (10-bit mantissa),
  whose rounding moves pre-activations across quantization boundaries and turns the
  finite-difference clip Hessian into noise (measured on an H200: one diagonal entry of a
  smooth quadratic's FD Hessian off by 43%). No effect on CPU.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import functools
import math
import warnings
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from landscape import calibration, checks, folding, quantizers, runtime, sites
from landscape.data import Split, as_arrays, check_labels, spread_rows

_MEMORY_BUDGET = 2 * 1024**3  # bytes of activations one vmapped chunk may hold
_SHARED_PROGRAMS = 8  # program sets kept alive after their last ClipLoss (least recently used dropped)


def _sequential_batches() -> bool:
    """Whether ``ClipLoss.batch`` runs its chunk as a compiled loop over the real rows (CPU) rather
    than a vmap (accelerators). Convolutions whose kernels carry a vmapped axis become grouped
    convolutions, which XLA's CPU backend runs 2-3x slower per α than a plain one (measured on
    resnet8); on accelerators the vmapped rows, padding included, run in parallel."""
    return jax.default_backend() == "cpu"


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each active site's α lives in the flat vector."""

    sites: tuple[sites.Site, ...]
    specs: Mapping[str, sites.SiteSpec]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def n(self) -> int:
        return int(sum(self.sizes))

    def unflatten(self, alpha):
        out = {}
        for site, off, size in zip(self.sites, self.offsets, self.sizes, strict=True):
            out[site.name] = alpha[off] if size == 1 else alpha[off:off + size]
        return out

    def program_key(self) -> tuple:
        """What the compiled programs depend on: the sites and how each is quantized, but not the
        bit widths or whether weights are bias-corrected, which the programs take as data."""
        return tuple((site, dataclasses.replace(self.specs[site.name], bits=0, bias_correction=False))
                     for site in self.sites)


def _masked(variables, weight_grid: str) -> dict:
    """A sparse network's variables with every masked kernel as ``kernel * mask``: the network
    its ``Network.apply`` evaluates through the recipe's GEMM hook, which a ClipLoss's programs
    do not run (the dense straight-through kernels had been quantized instead, silently). The
    midrise grid has no zero level, so a pruned weight would come back as ±Δ/2: warned."""
    from landscape import sparsity  # sparsity imports train, which this module must not

    if weight_grid == "midrise":
        warnings.warn("ClipLoss: the network is sparse (a 'masks' collection) and weight_grid='midrise' has no "
                      "zero level, so every pruned weight is quantized to ±Δ/2; weight_grid='midtread' keeps "
                      "them 0", RuntimeWarning, stacklevel=3)
    return {**variables, "params": sparsity.effective_params(variables)}


def default_sites(all_sites: Iterable[sites.Site], quantize_first_last: bool) -> list[sites.Site]:
    """Sites quantized by default: all, except — unless ``quantize_first_last`` — the first
    and last weight sites (stem and classifier) and the last activation site (the
    classifier's input), so the first and last layers run in FP32. The LAPQ reference's list
    slicing also keeps the stem's ReLU output and the last conv in FP32 (36 α for ResNet-20
    against these 38); pass ``sites=[...]`` to ClipLoss for that subset.
    """
    all_sites = list(all_sites)
    if quantize_first_last:
        return all_sites
    weights = [s for s in all_sites if s.kind == "weight"]
    acts = [s for s in all_sites if s.kind == "activation"]
    skip = {s.name for s in weights[:1] + weights[-1:] + acts[-1:]}
    return [s for s in all_sites if s.name not in skip]


_CALLER: contextvars.ContextVar = contextvars.ContextVar("clip_loss_traces", default=None)


class _Programs:
    """The jitted programs of one (network architecture, site layout, precision).

    Everything else a program needs arrives as data — α, the bit widths, the bias-correction
    switches, the network's variables, the calibration batches — so every ClipLoss with the same
    model and sites (another bit width, bias correction on or off, another calibration sample of
    the same size, another figure of a reproduction) runs the same programs, traced and
    compiled once per process instead of once per object. :func:`_programs_for` shares them;
    ``ClipLoss.compilations`` still counts the traces each object's own calls caused.
    """

    def __init__(self, model, layout: _Layout, precision: str):
        self.model, self.layout, self.precision = model, layout, precision
        self.call = jax.jit(self._traced("call", self.loss))
        self.batch = jax.jit(self._traced("batch", self.batched_loss))
        self.grad = jax.jit(self._traced("grad", jax.grad(self.loss)))
        self.hvp = jax.jit(self._traced("hvp", self.hvp_product))
        # α last, the data first: the function of the Partial that ClipLoss.alpha_loss returns.
        self.alpha_last = jax.jit(self._traced("alpha_last", self.loss_alpha_last))
        self.predict = jax.jit(self._traced("predict", self.predictions))
        self.logits = jax.jit(self._traced("logits", self.forward))
        # Weight-space losses (params → scalar, α fixed): α, the widths and switches are data here
        # too, so every α and bit width of these sites shares them; FP32 (None) and quantized.
        # weight_batch: the same on one batch {"x", "y"}, for weight_loss_batches.
        kinds = ((False, "fp32"), (True, "quantized"))
        self.weight_mean = {q: jax.jit(self._traced(f"weights_{name}", functools.partial(self.weight_space_loss, q)))
                            for q, name in kinds}
        self.weight_batch = {q: jax.jit(self._traced(f"weights_{name}_batch", functools.partial(
            self.weight_space_batch_loss, q))) for q, name in kinds}
        self.init: dict = {}

    def _traced(self, name, fn):
        precision = self.precision

        def counted(*args):
            traces = _CALLER.get()
            if traces is not None:
                traces[name] += 1
            with jax.default_matmul_precision(precision):  # read at trace time
                return fn(*args)

        # compile logs and profiles name the program ("jit(loss_batch)"), not the wrapper
        counted.__name__ = counted.__qualname__ = "loss_" + name.replace(":", "_")
        return counted

    def _traced_options(self, state):
        """Site → traced bit width, and site → traced bias-correction switch (0.0 / 1.0)."""
        names = [site.name for site in self.layout.sites]
        return ({name: state["bits"][i] for i, name in enumerate(names)},
                {name: state["corrections"][i] for i, name in enumerate(names)})

    def forward(self, alpha, state, x):
        bits, corrections = self._traced_options(state)
        with sites.quantizing(self.layout.specs, self.layout.unflatten(alpha), bits, corrections):
            return self.model.apply(state["variables"], x, train=False)

    def loss(self, alpha, state, xb, yb, wb):
        alpha = jnp.asarray(alpha, jnp.float32)
        valid = jnp.all(quantizers.valid_alpha(alpha))
        safe = jnp.where(valid, alpha, 1.0)
        value = _mean_cross_entropy(lambda x: self.forward(safe, state, x), xb, yb, wb)
        # A valid but huge α can still overflow the network (levels of ~1e37 times the next
        # layer's weights give inf − inf): the loss has diverged, +inf, not NaN.
        return jnp.where(valid & ~jnp.isnan(value), value, jnp.inf)

    def loss_alpha_last(self, state, xb, yb, wb, alpha):
        """:meth:`loss` with α as the last argument (``jax.tree_util.Partial`` binds leading ones)."""
        return self.loss(alpha, state, xb, yb, wb)

    def weight_space_loss(self, quantized, data, xb, yb, wb, params):
        """The loss as a function of the weights ``params``: quantized at ``data["alpha"]`` with
        the widths and switches of ``data`` (the same forward pass, to the last bit, as
        :meth:`loss` at that α) or FP32; ``data["others"]``: the other variable collections."""
        variables = {**data["others"], "params": params}
        if not quantized:
            return _mean_cross_entropy(lambda x: self.model.apply(variables, x, train=False), xb, yb, wb)
        state = {"variables": variables, "bits": data["bits"], "corrections": data["corrections"]}
        return self.loss(data["alpha"], state, xb, yb, wb)

    def weight_space_batch_loss(self, quantized, data, params, batch):
        """:meth:`weight_space_loss` over one batch ``{"x": (b, ...), "y": (b,)}``: its mean."""
        x, y = batch["x"], batch["y"]
        return self.weight_space_loss(quantized, data, x[None], y[None], jnp.ones((1,) + y.shape, jnp.float32),
                                      params)

    def batched_loss(self, alphas, count, state, xb, yb, wb):
        """Losses of the first ``count`` rows of ``alphas`` (chunk, n); the padding rows give +inf."""
        def one(alpha):
            return self.loss(alpha, state, xb, yb, wb)

        # The loop stops after the ``count`` real rows (a traced bound, so the padding costs
        # nothing and one program serves every K).
        if _sequential_batches():
            def body(i, out):
                return out.at[i].set(one(alphas[i]))

            return jax.lax.fori_loop(0, count, body, jnp.full(alphas.shape[:1], jnp.inf, jnp.float32))
        return jnp.where(jnp.arange(alphas.shape[0]) < count, jax.vmap(one)(alphas), jnp.inf)

    def hvp_product(self, alpha, v, state, xb, yb, wb):
        """Hessian-vector product of the STE surrogate, forward-over-reverse."""
        grad = jax.grad(self.loss)
        return jax.jvp(lambda a: grad(a, state, xb, yb, wb), (alpha,), (v,))[1]

    def predictions(self, alpha, state, x):
        return jnp.argmax(self.forward(jnp.asarray(alpha, jnp.float32), state, x), axis=-1)

    def init_program(self, rule: str, static: tuple, stats: str, stats_size: int, specs):
        """The compiled layer-wise calibration of ``rule`` (static options ``static``).
        ``specs``: the calling loss's site specs; their bit widths enter the program only for
        rules in ``calibration.STATIC_BITS_RULES``, and then they are part of the key; the
        bias-correction switches are always data (``state["corrections"]``)."""
        traced_bits = rule not in calibration.STATIC_BITS_RULES
        bits_key = None if traced_bits else tuple(specs[s.name].bits for s in self.layout.sites)
        key = (rule, static, stats, stats_size, bits_key)
        if key not in self.init:
            # Bits as data where the rule allows it (all built-in rules): one compile per rule
            # for every bit width of these sites, with bias correction on or off.
            def calibrate(state, x, traced):
                rule_fn = calibration.bind_rule(rule, **dict(static), **traced)
                bits, corrections = self._traced_options(state)
                with sites.calibrating(specs, rule_fn, quantize_upstream=stats == "quantized",
                                       bits=bits if traced_bits else None, corrections=corrections) as ctx:
                    self.model.apply(state["variables"], x, train=False)
                return ctx.alphas, ctx.minima

            self.init[key] = jax.jit(self._traced(f"init:{rule}", calibrate))
        return self.init[key]


def _mean_cross_entropy(logits_of, xb, yb, wb):
    """Σ_b Σ_i w_bi · CE(logits_of(x_b)_i, y_bi) / Σ w over batches xb (nb, bs, ...), one forward
    pass per batch (``lax.map``), so that memory is that of one batch."""
    def batch_sum(args):
        x, y, w = args
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits_of(x), y) * w)

    if xb.shape[0] == 1:
        total = batch_sum((xb[0], yb[0], wb[0]))
    else:
        total = jnp.sum(jax.lax.map(batch_sum, (xb, yb, wb)))
    return total / jnp.sum(wb)


_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def _programs_for(model, layout: _Layout, precision: str) -> _Programs:
    """The shared :class:`_Programs` of this model, layout and precision (least recently used
    sets beyond ``_SHARED_PROGRAMS`` are dropped; a live ClipLoss keeps its own alive)."""
    try:
        key = (model, layout.program_key(), precision)
        hash(key)
    except TypeError:  # an unhashable model: programs for this loss alone
        return _Programs(model, layout, precision)
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
    else:
        _PROGRAMS[key] = _Programs(model, layout, precision)
        while len(_PROGRAMS) > _SHARED_PROGRAMS:
            _PROGRAMS.popitem(last=False)
    return _PROGRAMS[key]


class ClipLoss:
    """The calibration cross-entropy as a function of the clipping vector α (n,).

    The per-image loss is optax's float32 cross-entropy logsumexp(z) − z_y, as the reference's
    PyTorch loss: an image whose correct logit leads by more than about 17 contributes exactly 0,
    so on an easily fitted calibration set L(α) can be exactly 0 over a region of α.

    Args:
      net: a trained network (anything with ``.model`` and ``.variables``, e.g. the result
        of :func:`landscape.train.fit`).
      calib: the calibration :class:`~landscape.data.Split` (or an ``(x, y)`` pair); finite
        images of the shape the network takes (a network from :func:`~landscape.train.fit`
        records it: ``net.input_shape``).
      w_bits, a_bits: bit widths of weight / activation sites, in [2, 16], or None (FP32); or,
        for mixed precision, a mapping site name → bits (or None) over the chosen sites of that
        kind, those not named staying FP32 (see :func:`landscape.bit_allocation.allocate_bits`).
      quantize_first_last: also quantize the first and last layers (default FP32).
      sites: names of the sites to quantize (overrides the first/last rule); others FP32. A
        single name (a str) is one site. A named site whose kind has no width (``a_bits=None``
        for an activation site) stays FP32; names that leave no site quantized while a width
        is given raise (both widths None is the FP32 loss).
      weight_grid: "midrise" (reference, no zero level) or "midtread" (signed with zero).
        Activation sites take their grid from the layer: "unsigned" for a ReLU output,
        "midtread" for a signed site (:class:`landscape.layers.QuantIdentity`).
      per_channel: one α per output channel of every weight site.
      bias_correction: per-channel mean correction of quantized weights, inside every
        evaluation (the reference's ``-bcw``).
      fold_bn: fold BatchNorm into the preceding conv before quantizing. The loss then holds
        the folded variables (:attr:`variables`, :attr:`params`), and its weight-space losses
        take the folded params.
      batch_size: calibration images per forward pass (default: all of them when there are
        at most 1024, else 512).
      chunk: α rows per vmapped call in :meth:`batch` (default from a 2 GB budget).
      precision: matmul/convolution precision of every compiled program (a
        ``jax.default_matmul_precision`` value): "highest" (default, true float32) or
        "default" (the backend's fast path: TF32 on recent NVIDIA GPUs, bf16 passes on TPU).
    """

    def __init__(self, net, calib, *, w_bits: int | Mapping[str, int | None] | None,
                 a_bits: int | Mapping[str, int | None] | None,
                 quantize_first_last: bool = False, sites: Iterable[str] | None = None,
                 weight_grid: str = "midrise", per_channel: bool = False,
                 bias_correction: bool = False, fold_bn: bool = False,
                 batch_size: int | None = None, chunk: int | None = None,
                 precision: str = "highest"):
        runtime.check_precision(precision, "ClipLoss")
        for name, value in (("quantize_first_last", quantize_first_last), ("per_channel", per_channel),
                            ("bias_correction", bias_correction), ("fold_bn", fold_bn)):
            checks.check_flag(value, name)
        checks.check_network(net, "ClipLoss")
        if isinstance(sites, str):  # one site's name, not the characters of one
            sites = (sites,)
        self.net = net
        self.model = net.model
        checks.check_call_signature(self.model, "ClipLoss (net.model)")
        x, y = as_arrays(calib, "calib")
        checks.check_image_shape(x.shape, getattr(net, "input_shape", None), "calib images")
        # A NaN image turns every activation statistic (init) NaN and L(α) +inf for every α.
        checks.check_finite_images(x, "calib")
        self.input_shape = tuple(x.shape[1:])  # the images this loss's programs take
        if weight_grid not in quantizers.WEIGHT_GRIDS:
            raise ValueError(f"ClipLoss weight_grid={weight_grid!r} is not allowed; use one of "
                             f"{quantizers.WEIGHT_GRIDS} (an unsigned grid would clip every negative weight to 0)")
        w_bits, a_bits = _checked_bits(w_bits, "w_bits"), _checked_bits(a_bits, "a_bits")
        self.options = dict(w_bits=w_bits, a_bits=a_bits, quantize_first_last=quantize_first_last,
                            sites=None if sites is None else tuple(sites), weight_grid=weight_grid,
                            per_channel=per_channel, bias_correction=bias_correction, fold_bn=fold_bn,
                            batch_size=batch_size, chunk=chunk, precision=precision)
        variables = net.variables
        if "masks" in variables:  # a sparse network (sparsity.Recipe, adaprune): its masked kernels
            variables = _masked(variables, weight_grid)
        with checks.explained_input_shape(x.shape, "calib images"):  # a network that does not record its input shape
            if fold_bn:
                variables = folding.fold_batchnorm(self.model, variables, x[:1], precision=precision)
            self.all_sites, _, logits = sites_of(self.model, variables, x[:1], output=True)
        self.num_classes = checks.check_logits(logits, self.model, "ClipLoss")
        check_labels(y, self.num_classes, "calib")  # labels the logits can score
        self._layout = self._make_layout(sites, w_bits, a_bits, quantize_first_last, weight_grid,
                                         per_channel, bias_correction)
        self._traces: collections.Counter = collections.Counter()
        if chunk is not None:
            checks.check_int(chunk, "chunk")
        self._place_data(variables, x, y, batch_size)
        self.chunk = self._default_chunk() if chunk is None else int(chunk)
        self._programs = _programs_for(self.model, self._layout, precision)
        self._init_cache: dict = {}

    # ------------------------------------------------------------------ construction

    def _make_layout(self, names, w_bits, a_bits, quantize_first_last, weight_grid, per_channel,
                     bias_correction) -> _Layout:
        known = {s.name: s for s in self.all_sites}
        if names is None:
            chosen = default_sites(self.all_sites, quantize_first_last)
        else:
            names = list(names)
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"unknown sites {unknown}; the network's sites are {list(known)}")
            chosen = [s for s in self.all_sites if s.name in set(names)]
        for kind, given in (("weight", w_bits), ("activation", a_bits)):
            if isinstance(given, Mapping):
                eligible = [s.name for s in chosen if s.kind == kind]
                stray = [k for k in given if k not in eligible]
                if stray:
                    raise ValueError(
                        f"{kind[0]}_bits names {stray}, which are not quantizable {kind} sites here; the "
                        f"{kind} sites are {eligible} (first and last layers need quantize_first_last=True "
                        "or sites=...)")
        active, specs = [], {}
        for site in chosen:
            bits = w_bits if site.kind == "weight" else a_bits
            if isinstance(bits, Mapping):
                bits = bits.get(site.name)
            if bits is None:
                continue
            quantizers.check_bits(bits, f"site {site.name!r} ({site.kind})")
            if site.kind == "weight":
                spec = sites.SiteSpec(bits, weight_grid, per_channel, bias_correction)
            else:
                spec = sites.SiteSpec(bits, site.grid)  # "unsigned" after a ReLU, else "midtread"
            active.append(site)
            specs[site.name] = spec
        if not active and any(isinstance(b, int) for b in (w_bits, a_bits)):
            raise ValueError(self._no_sites_message(w_bits, a_bits, names, chosen))
        sizes = tuple(specs[s.name].alpha_size(s) for s in active)
        offsets = tuple(int(o) for o in np.cumsum((0,) + sizes[:-1])) if sizes else ()
        return _Layout(tuple(active), specs, offsets, sizes)

    def _no_sites_message(self, w_bits, a_bits, names, chosen) -> str:
        """Why bit widths were given and no site is quantized: sites=[...] (``names``) of other kinds
        than the widths given, a model without landscape's quantized layers, or one whose only sites
        are the first and last layers (FP32 by default). An empty loss would otherwise pass silently
        and fail later with errors about α."""
        given = ", ".join(f"{k}={v}" for k, v in (("w_bits", w_bits), ("a_bits", a_bits)) if v is not None)
        if names is not None:
            kinds = {s.name: s.kind for s in chosen}
            return (f"ClipLoss({given}, sites={names}) quantizes no site: the sites chosen are {kinds}, and their "
                    "kinds have no bit width; give it (w_bits= for weight sites, a_bits= for activation sites) or "
                    "choose sites of the kind given")
        kinds = [kind for kind, b in (("weight", w_bits), ("activation", a_bits)) if b is not None]
        candidates = [s.name for s in self.all_sites if s.kind in kinds]
        head = f"ClipLoss({given}) quantizes no site of this {type(self.model).__name__}"
        if not candidates:
            return (f"{head}: it has no {' or '.join(kinds)} sites. Build its layers from landscape.layers "
                    "(QuantConv, QuantDense, QuantReLU, QuantIdentity); flax.linen's own layers are not quantized")
        return (f"{head}: its only {' and '.join(kinds)} sites {candidates} are the first and last layers, "
                "which stay FP32 by default; pass quantize_first_last=True or sites=[...]")

    def _place_data(self, variables, x, y, batch_size):
        devices = jax.devices()
        nd = len(devices)
        n = len(x)
        if batch_size is None:
            batch_size = n if n <= 1024 else 512
        checks.check_int(batch_size, "batch_size")
        bs = int(math.ceil(min(int(batch_size), n) / nd) * nd)
        nb = int(math.ceil(n / bs))
        pad = nb * bs - n
        w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
        xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)])
        yp = np.concatenate([y, np.zeros(pad, np.int32)])
        self.mesh = Mesh(np.array(devices), ("data",))
        batch_sharding = NamedSharding(self.mesh, P(None, "data"))
        replicated = self._replicated = NamedSharding(self.mesh, P())
        self._x = jax.device_put(xp.reshape((nb, bs) + x.shape[1:]), batch_sharding)
        self._y = jax.device_put(yp.reshape(nb, bs), batch_sharding)
        self._w = jax.device_put(w.reshape(nb, bs), batch_sharding)
        self.variables = jax.device_put(variables, replicated)
        # Bit widths travel as data, not as constants of the program: every bit width of the
        # same sites compiles to the same program (a persistent-cache hit after the first).
        # So do the bias-correction switches: with and without it, the programs are the same.
        specs = [self._layout.specs[s.name] for s in self._layout.sites]
        site_bits = np.array([spec.bits for spec in specs], np.float32)
        corrections = np.array([spec.bias_correction for spec in specs], np.float32)
        self._state = {"variables": self.variables, "bits": jax.device_put(site_bits, replicated),
                       "corrections": jax.device_put(corrections, replicated)}
        self.n_calib, self.batch_size = n, bs
        self._calib_host = (x, y)

    def _default_chunk(self) -> int:
        if _sequential_batches():  # memory does not grow with the chunk
            return 32
        per_example = sum(int(np.prod(s.shape)) for s in self.all_sites if s.kind == "activation")
        per_alpha = 4 * 4 * per_example * self.batch_size  # ~4 live tensors per site, float32
        return int(np.clip(_MEMORY_BUDGET // max(per_alpha, 1), 1, 32))

    def _run(self, program, *args):
        """``program(*args)``, its traces (if any) counted as this loss's compilations."""
        token = _CALLER.set(self._traces)
        try:
            return program(*args)
        finally:
            _CALLER.reset(token)

    # ------------------------------------------------------------------ public API

    @property
    def sites(self) -> tuple[sites.Site, ...]:
        """The quantized sites, in network order (α follows this order)."""
        return self._layout.sites

    @property
    def specs(self) -> Mapping[str, sites.SiteSpec]:
        return self._layout.specs

    @property
    def n(self) -> int:
        """Length of α (sites, or channels for per-channel weight sites)."""
        return self._layout.n

    def __len__(self) -> int:
        return self.n

    @property
    def compilations(self) -> dict[str, int]:
        """Number of traces (= XLA compilations) per entry point so far."""
        return dict(self._traces)

    def site_slices(self) -> dict[str, slice]:
        """Site name → slice of α."""
        return {s.name: slice(o, o + k) for s, o, k in
                zip(self._layout.sites, self._layout.offsets, self._layout.sizes, strict=True)}

    def _check_alpha(self, alpha, batched: bool = False, positive: bool = False, name: str = "alpha"):
        """α as float32 (host numpy, or jnp inside a user's transformation) of shape (n,) or
        (K, n). With ``positive``, every entry must be finite and > 0: the loss itself is +inf
        there (what optimizers expect), but a gradient, Hessian, logits or accuracy at such a
        point would be silently meaningless."""
        traced = isinstance(alpha, jax.core.Tracer)  # called inside a user's transformation
        # Host-side conversion: an eager jnp op would compile a small XLA program for every new
        # input shape, and a long run (optimizers evaluate batches of many sizes) would pile up
        # thousands of them.
        alpha = jnp.asarray(alpha, jnp.float32) if traced else checks.as_alpha(alpha, name)
        want = (self.n,)
        got = alpha.shape[1:] if batched else alpha.shape
        if (batched and alpha.ndim != 2) or got != want:
            shape = "(K, n)" if batched else "(n,)"
            raise ValueError(f"{name} has shape {alpha.shape}; expected {shape} with n = {self.n} "
                             f"({len(self.sites)} sites)")
        if positive and not traced:
            bad = np.flatnonzero(~quantizers.valid_alpha(alpha))
            if bad.size:
                site = next(n for n, sl in self.site_slices().items() if sl.start <= bad[0] < sl.stop)
                raise ValueError(f"{name} must be in (0, {quantizers.ALPHA_MAX:g}] here; "
                                 f"{name}[{bad[0]}] = {alpha[bad[0]]} "
                                 f"(site {site!r}), {bad.size} such entr{'y' if bad.size == 1 else 'ies'}")
        return alpha

    def _place(self, alpha):
        if isinstance(alpha, jax.core.Tracer):
            return alpha
        # One placement for every input (numpy, jax, any device): one compilation.
        return jax.device_put(alpha, self._replicated)

    def __call__(self, alpha) -> jax.Array:
        """L(α): mean cross-entropy over the calibration set; +inf for α ≤ 0 or non-finite."""
        alpha = self._check_alpha(alpha)
        if _sequential_batches() and not isinstance(alpha, jax.core.Tracer):
            # The batch program loops over the real rows only, so one row of it is this call at
            # the same cost: a loss evaluated both ways compiles one program, not two.
            # (Inside a user's transformation the plain program stays differentiable.)
            return self._run_chunk(np.broadcast_to(alpha, (self.chunk, self.n)), 1)[0]
        return self._run(self._programs.call, self._place(alpha), self._state, self._x, self._y, self._w)

    def _run_chunk(self, rows, count: int) -> jax.Array:
        """The batch program on one chunk of ``self.chunk`` rows, of which the first ``count`` are real."""
        return self._run(self._programs.batch, self._place(rows), self._place(np.int32(count)), self._state,
                         self._x, self._y, self._w)

    def batch(self, alphas) -> jax.Array:
        """(K, n) → (K,) losses in one compiled call per chunk of ``self.chunk`` rows (one
        compile): vmapped on accelerators, a compiled sequential map on CPU. K is padded to
        a multiple of the chunk on the host, so any K reuses the same program; on CPU the
        padding rows are never evaluated."""
        alphas = self._check_alpha(alphas, batched=True)
        k = alphas.shape[0]
        xp = jnp if isinstance(alphas, jax.core.Tracer) else np
        if k == 0:
            return jnp.zeros((0,), jnp.float32)
        pad = (-k) % self.chunk
        if pad:
            alphas = xp.concatenate([alphas, xp.repeat(alphas[:1], pad, axis=0)])
        out = [self._run_chunk(alphas[i:i + self.chunk], min(self.chunk, k - i))
               for i in range(0, alphas.shape[0], self.chunk)]
        if xp is jnp:
            return jnp.concatenate(out)[:k]
        return jax.device_put(np.concatenate([np.asarray(o) for o in out])[:k])

    def grad(self, alpha) -> jax.Array:
        """∇L(α) of the straight-through surrogate, (n,)."""
        return self._run(self._programs.grad, self._place(self._check_alpha(alpha, positive=True)), self._state,
                         self._x, self._y, self._w)

    def hvp(self, alpha, v) -> jax.Array:
        """∇²L(α)·v of the straight-through surrogate (forward-over-reverse), (n,)."""
        alpha, v = self._place(self._check_alpha(alpha, positive=True)), self._place(self._check_alpha(v, name="v"))
        return self._run(self._programs.hvp, alpha, v, self._state, self._x, self._y, self._w)

    def hessian(self, alpha) -> jax.Array:
        """∇²L(α) of the straight-through surrogate, (n, n): n forward-over-reverse HVPs with
        the basis vectors (one compile), symmetrised. On CPU this is ~2x faster than
        ``jax.hessian``, whose vmapped tangents batch the convolution kernels."""
        alpha = self._place(self._check_alpha(alpha, positive=True))
        eye = np.eye(self.n, dtype=np.float32)
        cols = [self._run(self._programs.hvp, alpha, self._place(eye[i]), self._state, self._x, self._y, self._w)
                for i in range(self.n)]
        h = jnp.stack(cols, axis=1) if cols else jnp.zeros((0, 0), jnp.float32)
        return 0.5 * (h + h.T)

    def logits(self, alpha, x) -> jax.Array:
        """(N, classes) logits of the quantized network at ``alpha`` for images ``x`` (N, ...):
        the forward pass the loss averages over, in one compiled call. The images must have the
        calibration images' shape (``input_shape``)."""
        alpha = self._place(self._check_alpha(alpha, positive=True))
        checks.check_image_shape(np.shape(x), self.input_shape, "images x")
        return self._run(self._programs.logits, alpha, self._state, jnp.asarray(x, jnp.float32))

    def accuracy(self, alpha, split, batch_size: int = 500) -> float:
        """Top-1 accuracy of the quantized network on ``split`` (a Split or (x, y))."""
        alpha = self._place(self._check_alpha(alpha, positive=True))
        x, y = as_arrays(split)
        checks.check_image_shape(x.shape, self.input_shape, "split images")
        check_labels(y, self.num_classes, "split")
        checks.check_int(batch_size, "batch_size")
        bs = min(batch_size, len(x))
        correct = 0
        for start in range(0, len(x), bs):
            chunk = x[start:start + bs]
            real = len(chunk)
            if real < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - real,) + chunk.shape[1:], np.float32)])
            pred = np.asarray(self._run(self._programs.predict, alpha, self._state, chunk))[:real]
            correct += int(np.sum(pred == y[start:start + real]))
        return correct / len(x)

    def init(self, rule: str = "max", *, stats: str = "quantized", stats_size: int = 512, **kw):
        """Layer-wise α by a calibration rule, (n,) float32.

        ``rule``: "max", "percentile" (q), "mse", "lp" (p), "aciq" (distribution), "kl"
        (see :mod:`landscape.calibration`). Activation statistics come from ``stats_size``
        calibration images spread over the set (:func:`landscape.data.spread_rows`; all of
        them when it has no more) with every upstream site already quantized at
        its new α (``stats="quantized"``, the reference's online init) or in FP32
        (``stats="fp32"``). Weight α depend only on the weights.
        """
        if stats not in ("quantized", "fp32"):
            raise ValueError(f"stats={stats!r} is not allowed; use 'quantized' or 'fp32'")
        checks.check_int(stats_size, "stats_size")
        calibration.make_rule(rule, **kw)  # validates the rule name and options
        traced_names = calibration.TRACED_OPTIONS.get(rule, ())
        static = tuple(sorted((k, v) for k, v in kw.items() if k not in traced_names))
        traced = {k: jnp.float32(v) for k, v in kw.items() if k in traced_names}
        result_key = (rule, tuple(sorted(kw.items())), stats, stats_size)
        if result_key in self._init_cache:
            return self._init_cache[result_key]
        program = self._programs.init_program(rule, static, stats, stats_size, self._layout.specs)
        x = self._calib_host[0]
        if stats_size < len(x):  # the whole set stays a view: no copy of the calibration images
            x = x[spread_rows(len(x), stats_size)]
        if len(x) % len(jax.devices()) == 0:
            x = jax.device_put(x, NamedSharding(self.mesh, P("data")))
        alphas, minima = self._run(program, self._state, x, traced)
        _warn_negative_unsigned(minima, alphas)
        flat = [jnp.reshape(alphas[s.name], (-1,)) for s in self.sites]
        alpha = (jnp.concatenate(flat) if flat else jnp.zeros((0,))).astype(jnp.float32)
        bad = [s.name for s, a in zip(self.sites, flat, strict=True) if not np.all(np.isfinite(np.asarray(a)))]
        if bad:  # a NaN/inf weight or activation gives a NaN/inf α, which every later step would carry on
            raise ValueError(f"init({rule!r}): the α of sites {bad} is not finite: their weights or (on the first "
                             f"{len(x)} calibration images) activations hold NaN or ±inf values")
        self._init_cache[result_key] = jax.device_put(alpha, self._replicated)
        return self._init_cache[result_key]

    def alpha_loss(self):
        """L as a pure JAX function α (n,) → scalar, for transformations and analyzers.

        A ``jax.tree_util.Partial`` of the program shared by every ClipLoss of this network, site
        layout and precision, with the bit widths, bias-correction switches, variables and
        calibration set bound as data; it computes what :meth:`__call__` computes (+inf for
        α ≤ 0 or non-finite α). ``hessian_spectrum(loss, alpha)`` differentiates this function,
        so a spectrum at another α, bit width or calibration sample of the same size compiles
        nothing; ``jax.grad(loss.alpha_loss())`` is :meth:`grad`.
        """
        return jax.tree_util.Partial(self._programs.alpha_last, self._state, self._x, self._y, self._w)

    def weight_loss(self, alpha=None):
        """The calibration loss as a function of the network's *weights*: params → scalar.

        Quantized at the fixed clipping vector ``alpha`` (straight-through in the weights),
        or FP32 with ``alpha=None``. For weight-space analyses such as
        ``landscape.hessian_spectrum(loss.weight_loss(alpha), loss.params)``. It takes this
        loss's params (:attr:`params`): with ``fold_bn=True`` those are the folded kernels
        beside BatchNorms reduced to a bias, and the network's own ``net.variables["params"]``
        would put unfolded kernels before those BNs, another network, with no error. The
        calibration batches and the other collections (BN statistics) are bound to it,
        so one call differentiates through all of them at once: its memory grows with the
        calibration set. :meth:`weight_loss_batches` takes one batch at a time.

        The result is a ``jax.tree_util.Partial`` of a program shared by every α and bit width
        of this loss's sites, with α, the widths, the BN statistics and the calibration set
        bound as data. Calling it runs that one compiled program, and ``hessian_spectrum``
        passes the bound data to its programs as arguments, so a second α, another bit width
        or a second call compiles nothing. At ``alpha`` its forward pass is :meth:`__call__`'s,
        so ``weight_loss(alpha)(loss.params) == loss(alpha)`` to the last bit.
        """
        data = self._weight_data(alpha)
        return jax.tree_util.Partial(self._programs.weight_mean[alpha is not None], data,
                                     self._x, self._y, self._w)

    def weight_loss_batches(self, alpha=None, batch_size: int | None = None):
        """``(f, batches)``: :meth:`weight_loss` one calibration batch at a time.

        ``f(params, batch)`` is the mean cross-entropy over ``batch = {"x": (b, ...), "y": (b,)}``
        and ``batches`` splits the calibration set in order into batches of ``batch_size``
        examples (default: this loss's ``batch_size``), the last one possibly smaller. Since
        ``hessian_spectrum(f, params, batches=batches)`` weights batch b by n_b / N, it computes
        the Hessian of the same loss as ``weight_loss(alpha)`` with the memory of one batch (a
        smaller last batch compiles its own programs once). The batches are placed on the
        devices once, split over them where the batch size allows. ``f`` is a
        ``jax.tree_util.Partial`` with α bound as data and takes :attr:`params`, as
        :meth:`weight_loss` does.
        """
        n = self.n_calib
        batch_size = self.batch_size if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer (one batch holds all "
                             f"{n} calibration examples from {n} up)")
        f = jax.tree_util.Partial(self._programs.weight_batch[alpha is not None], self._weight_data(alpha))
        x, y = self._calib_host
        nd = self.mesh.devices.size
        batches = []
        for start in range(0, n, int(batch_size)):
            xs, ys = x[start:start + batch_size], y[start:start + batch_size]
            where = (NamedSharding(self.mesh, P("data")) if len(ys) % nd == 0
                     else NamedSharding(self.mesh, P()))
            batches.append({"x": jax.device_put(xs, where), "y": jax.device_put(ys, where)})
        return f, batches

    def _weight_data(self, alpha):
        """What a weight-space loss binds: the other variable collections (BN statistics), and
        for a quantized one α and the per-site widths and bias-correction switches."""
        data = {"others": {k: v for k, v in self.variables.items() if k != "params"}}
        if alpha is not None:
            fixed = self._check_alpha(alpha, positive=True)
            data.update(alpha=jax.device_put(np.asarray(fixed, np.float32), self._replicated),
                        bits=self._state["bits"], corrections=self._state["corrections"])
        return data

    @property
    def precision(self) -> str:
        """The matmul/convolution precision of this loss's compiled programs."""
        return self.options["precision"]

    @property
    def params(self):
        """The params this loss quantizes, the point :meth:`weight_loss` and
        :meth:`weight_loss_batches` take: the network's, or with ``fold_bn=True`` the folded ones."""
        return self.variables["params"]

    @property
    def calib(self) -> Split:
        """The calibration split this loss averages over."""
        return Split(*self._calib_host)

    def with_options(self, calib=None, **changes) -> ClipLoss:
        """A new ClipLoss on the same network with some constructor options changed
        (e.g. ``bias_correction=True``, ``w_bits=2``) and optionally another calibration set."""
        unknown = set(changes) - set(self.options)
        if unknown:
            raise ValueError(f"unknown ClipLoss options {sorted(unknown)}; allowed: {sorted(self.options)}")
        return ClipLoss(self.net, self.calib if calib is None else calib, **{**self.options, **changes})

    @property
    def bits(self) -> dict[str, int]:
        """Bit width of each quantized site, in network order."""
        return {s.name: self._layout.specs[s.name].bits for s in self.sites}

    def __repr__(self) -> str:
        kinds = collections.Counter(s.kind for s in self.sites)
        widths = {k: sorted({self._layout.specs[s.name].bits for s in self.sites if s.kind == k}) for k in kinds}
        label = {k: f"{v[0]}b" if len(v) == 1 else f"{v[0]}–{v[-1]}b mixed" for k, v in widths.items()}
        desc = ", ".join(f"{kinds[k]} {k} @ {label[k]}" for k in ("weight", "activation") if k in kinds)
        return (f"ClipLoss({type(self.model).__name__}, n={self.n} ({desc or 'all FP32'}), "
                f"calib={self.n_calib}, devices={len(jax.devices())})")


def _warn_negative_unsigned(minima: Mapping, alphas: Mapping) -> None:
    """Warn about activation sites on the unsigned grid (ReLU outputs, ``QuantIdentity(signed=False)``)
    whose calibration values go below 0: their quantizer clips every negative value to 0."""
    bad = {name: float(m) for name, m in minima.items() if float(m) < 0.0}
    if bad:
        listed = ", ".join(f"{name} (least value {m:.4g}, α {float(np.max(alphas[name])):.4g})"
                           for name, m in bad.items())
        warnings.warn(f"activation sites on the unsigned grid see negative values, which their quantizer "
                      f"clips to 0: {listed}; make them signed (QuantIdentity(signed=True)) if the tensor "
                      f"can be negative", stacklevel=3)


def _checked_bits(bits, name: str = "bits"):
    """An int bit width (numpy's too) checked and returned as a Python int, None as is; a mapping as a
    validated dict copy in site-name order, so that ``options`` stays a stable (and JSON-serialisable)
    description of the loss. A scalar is checked whether or not a site of its kind is quantized
    (``w_bits=1`` with activation sites only was stored as given, and np.int64(4) broke JSON)."""
    if not isinstance(bits, Mapping):
        return quantizers.check_bits(bits, name)
    out = {}
    for name in sorted(bits):
        if not isinstance(name, str):
            raise ValueError(f"bit-width mappings are keyed by site name (str), got key {name!r}")
        out[name] = quantizers.check_bits(bits[name], f"site {name!r}")
    return out


_SITES: collections.OrderedDict = collections.OrderedDict()


def sites_of(model, variables, x, *, output: bool = False) -> tuple:
    """All quantization sites of ``model`` (network order) and its conv→BN pairs; with ``output``
    also the shape of the logits (a ``jax.ShapeDtypeStruct``), from the same abstract trace.

    The trace depends only on the model and the shapes and dtypes of ``variables`` and ``x``;
    its result is remembered per such key (every ClipLoss of a network asks again)."""
    x = jnp.asarray(x)
    try:
        leaves, tree = jax.tree.flatten(variables)
        key = (model, tree, tuple((tuple(np.shape(v)), str(jnp.result_type(v))) for v in leaves),
               x.shape, str(x.dtype))
        hash(key)
    except TypeError:  # an unhashable model: trace every time
        key = None
    if key is None or key not in _SITES:
        found = sites.trace_sites(lambda v, x: model.apply(v, x, train=False), variables, x, output=True)
        if key is None:
            return found if output else found[:2]
        _SITES[key] = found
        while len(_SITES) > 32:
            _SITES.popitem(last=False)
    _SITES.move_to_end(key)
    all_sites, pairs, logits = _SITES[key]
    return (list(all_sites), list(pairs), logits) if output else (list(all_sites), list(pairs))
