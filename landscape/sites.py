"""Quantization sites: how a network exposes its clipping values.

A *site* is one tensor that can be quantized with its own clipping value α: a conv/dense
weight (kind ``"weight"``) or an activation that feeds one (kind ``"activation"``): a ReLU
output (unsigned) or, in networks without ReLUs before their products (transformers), any
signed tensor a layer marks (:class:`landscape.layers.QuantIdentity`). The quantizable layers
in :mod:`landscape.layers` call :func:`weight_site` / :func:`activation_site` on those
tensors; what happens there depends on the *site context* active while the network is traced:

* none (training, FP32 evaluation): the tensor passes through unchanged;
* :func:`recording`: the site is appended to an ordered list (network = call order);
* :func:`quantizing`: the tensor is fake-quantized with its α (a traced array, so a jitted
  loss is a pure function of α);
* :func:`calibrating`: α is computed from the tensor by a calibration rule and recorded, and
  the tensor is quantized with it so that downstream statistics see quantized upstream
  sites (the reference's "online" initialisation) — or left FP32 if asked.

Every context has ``weight(name, w)`` and ``activation(name, x, signed)``; only recording
keeps ``signed`` (it becomes :attr:`Site.signed`), the others take the grid from the site's
:class:`SiteSpec`.

The context is read at trace time (like ``jax.default_matmul_precision``), so it must be
entered *inside* the function that is jitted; :class:`landscape.ClipLoss` does this.
Sites are named by their Flax module path, e.g. ``"layer1_0/conv1"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.extend as jex
import jax.numpy as jnp

from landscape import quantizers

KINDS = ("weight", "activation")

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("landscape_site_context", default=None)


@dataclasses.dataclass(frozen=True)
class Site:
    """One quantization site.

    Attributes:
      name: the Flax module path, "/"-joined.
      kind: "weight" or "activation".
      shape: the tensor's shape (weights: the full kernel, HWIO or (in, out);
        activations: per example, without the batch axis).
      index: position in network (call) order.
      channels: size of the output-channel axis (the last one) — the α count of a
        per-channel weight site.
      macs: weight sites: multiply-accumulates per example of the product the kernel takes part
        in, Σ over its applications of size(kernel) · (output positions), e.g. H_out·W_out·kh·kw·
        C_in·C_out for a convolution (H_out·W_out·kh·kw·(C_in/g)·C_out for one of g groups, whose
        kernel is (kh, kw, C_in/g, C_out)), in·out for a dense layer on (batch, in) and T·in·out on
        (batch, T, in) (a transformer's token-wise layers, once per token) — the MACs of a BOPs
        count (MACs · weight bits · activation bits). None for activation sites and for layers
        that do not report their output (:func:`note_output`).
      signed: activation sites whose values can be negative (quantized on the symmetric
        "midtread" grid, levels kΔ for |k| ≤ 2^(M−1) − 1); False for ReLU outputs and
        ``QuantIdentity(signed=False)`` sites such as softmax probabilities (the "unsigned"
        grid), and for weight sites, whose grid ClipLoss chooses.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    index: int
    macs: int | None = None
    signed: bool = False

    @property
    def grid(self) -> str | None:
        """An activation site's quantization grid ("unsigned" or "midtread"); None for weights."""
        if self.kind != "activation":
            return None
        return "midtread" if self.signed else "unsigned"

    @property
    def channels(self) -> int:
        return int(self.shape[-1])


@dataclasses.dataclass(frozen=True)
class SiteSpec:
    """How one active site is quantized (static: part of the traced program).

    bits: M in [2, 16]; grid: see :mod:`landscape.quantizers`; per_channel: one α per
    output channel (weights only); bias_correction: per-channel mean matching of the
    quantized weight (weights only).
    """

    bits: int
    grid: str
    per_channel: bool = False
    bias_correction: bool = False

    def alpha_size(self, site: Site) -> int:
        return site.channels if self.per_channel else 1


def site_name(module) -> str:
    return "/".join(module.path)


def weight_site(module, w):
    """Called by a layer on its kernel (output channels on the last axis)."""
    ctx = _CONTEXT.get()
    return w if ctx is None else ctx.weight(site_name(module), w)


def activation_site(module, x, *, signed: bool = False):
    """Called by a layer on an activation (batch axis first): a ReLU output, or with ``signed``
    a tensor whose values can be negative."""
    ctx = _CONTEXT.get()
    return x if ctx is None else ctx.activation(site_name(module), x, signed)


def note_output(module, y, x=None):
    """Quantizable layers report their product's output ``y`` (batch axis first) and input
    ``x``: the output's positions give the weight site's MACs (:attr:`Site.macs`); the input
    tells which activation site, if any, feeds the layer directly (:func:`direct_inputs`)."""
    ctx = _CONTEXT.get()
    if isinstance(ctx, _Recorder):
        name = site_name(module)
        ctx.outputs.setdefault(name, []).append(tuple(int(d) for d in y.shape))
        if x is not None:
            ctx.inputs.setdefault(name, []).append(x)


def note_conv_output(module, y):
    """Conv layers report their output so that BN folding can pair conv → BN."""
    ctx = _CONTEXT.get()
    if isinstance(ctx, _Recorder):
        ctx.conv_outputs.append((site_name(module), y))


def note_norm_input(module, x):
    ctx = _CONTEXT.get()
    if isinstance(ctx, _Recorder):
        for conv_name, y in ctx.conv_outputs:
            if y is x:
                ctx.bn_pairs.append((conv_name, site_name(module), float(module.epsilon)))


@contextlib.contextmanager
def _active(ctx):
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


# --------------------------------------------------------------------------- recording


class _Recorder:
    def __init__(self):
        self.sites: list[Site] = []
        self._seen: set[str] = set()
        self.conv_outputs: list = []
        self.bn_pairs: list[tuple[str, str, float]] = []
        self.outputs: dict[str, list[tuple[int, ...]]] = {}
        self.inputs: dict[str, list] = {}
        self.activation_values: list[tuple[str, object]] = []
        self.result = None  # what the traced function returned (shapes only)

    def _add(self, name, kind, shape, signed=False):
        if name in self._seen:  # a module applied twice shares one α
            return
        self._seen.add(name)
        self.sites.append(Site(name, kind, tuple(int(s) for s in shape), len(self.sites), signed=signed))

    def weight(self, name, w):
        self._add(name, "weight", w.shape)
        return w

    def activation(self, name, x, signed=False):
        self._add(name, "activation", x.shape[1:], bool(signed))
        self.activation_values.append((name, x))
        return x


class _LinkRecorder(_Recorder):
    """A :class:`_Recorder` whose every activation site yields a value of its own (an
    optimization barrier, the identity): two sites on one tensor, or a layer reading that
    tensor without a site, would otherwise share one jaxpr variable with the last site."""

    def activation(self, name, x, signed=False):
        return super().activation(name, jax.lax.optimization_barrier(x), signed)


def recording():
    """Context that records sites in call order: ``with recording() as rec: ...; rec.sites``."""
    return _active(_Recorder())


def _record(apply_fn: Callable, *args) -> _Recorder:
    """What a :class:`_Recorder` sees during ``apply_fn(*args)``, by abstract tracing."""
    rec = _Recorder()

    def run(*a):
        with _active(rec):
            return apply_fn(*a)

    rec.result = jax.eval_shape(run, *args)
    return rec


def trace_sites(apply_fn: Callable, *args, output: bool = False):
    """Sites (call order) and (conv, batchnorm, ε) triples of ``apply_fn(*args)``, by abstract
    tracing (no computation); with ``output``, also the shape/dtype of what ``apply_fn`` returns
    (a pytree of ``jax.ShapeDtypeStruct``, e.g. the logits)."""
    rec = _record(apply_fn, *args)
    found = [_with_macs(s, rec.outputs.get(s.name)) for s in rec.sites], rec.bn_pairs
    return (*found, rec.result) if output else found


#: Primitives whose every output value is one of its (first) operand's values: a layer reading a
#: quantized activation through them still multiplies numbers on that activation's grid. Max-pooling
#: is here; average pooling, sums and padding with constants are not.
VALUE_PRESERVING = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim",
                              "reduce_window_max", "reduce_max", "slice", "rev", "copy", "copy_p"})


def direct_inputs(apply_fn: Callable, *args, through: frozenset[str] = VALUE_PRESERVING
                  ) -> dict[str, str]:
    """Weight site → the activation site whose values that layer multiplies, on every application.

    Found from the jaxpr of ``apply_fn(*args)``: each layer's input is followed back through the
    primitives named in ``through`` (default :data:`VALUE_PRESERVING`: reshapes, max-pooling, ...;
    an empty set asks for the activation itself) and nested jitted calls to the first value an
    activation site produced. Layers whose input passes through anything else (average pooling, a
    sum, arithmetic) or starts at the data are absent.
    """
    rec = _LinkRecorder()

    def run(*a):
        with _active(rec):
            apply_fn(*a)
        return [v for _, v in rec.activation_values], [x for xs in rec.inputs.values() for x in xs]

    closed = jax.make_jaxpr(run)(*args)
    n_act = len(rec.activation_values)
    outvars = closed.jaxpr.outvars
    # the activation sites' vars (each application its own, see _LinkRecorder)
    produced_by = {v: name for (name, _), v in zip(rec.activation_values, outvars[:n_act], strict=True)
                   if isinstance(v, jex.core.Var)}
    input_vars = iter(outvars[n_act:])
    found = {}
    for name, xs in rec.inputs.items():
        sources = {_source_site(closed.jaxpr, next(input_vars), produced_by, through) for _ in xs}
        if len(sources) == 1 and None not in sources:
            found[name] = sources.pop()
    return found


def _source_site(jaxpr, var, produced_by, through):
    """The activation site at the start of var's value-preserving chain in ``jaxpr``, or None."""
    scopes = []  # (outer jaxpr, call equation) of each nested call entered, to climb back out
    while isinstance(var, jex.core.Var):
        if not scopes and var in produced_by:
            return produced_by[var]
        eqn, index = _producer(jaxpr, var)
        if eqn is None:  # an input (or constant) of this jaxpr: leave the call through its operand
            if not scopes or var not in jaxpr.invars:
                return None
            jaxpr, call = scopes.pop()
            var = call.invars[_inner(call).invars.index(var)]
        elif _inner(eqn) is not None and len(_inner(eqn).outvars) == len(eqn.outvars):
            scopes.append((jaxpr, eqn))
            jaxpr = _inner(eqn)
            var = jaxpr.outvars[index]
        elif eqn.primitive.name in through:
            var = eqn.invars[0]
        else:
            return None
    return None


def _producer(jaxpr, var):
    """(equation, output index) that defines var in jaxpr, or (None, None)."""
    for eqn in jaxpr.eqns:
        for i, out in enumerate(eqn.outvars):
            if out is var:
                return eqn, i
    return None, None


def _inner(eqn):
    """The jaxpr of a call-like equation (jit, custom_jvp/vjp calls), or None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        inner = eqn.params.get(key)
        if inner is not None:
            return getattr(inner, "jaxpr", inner)
    return None


def _with_macs(site: Site, outputs) -> Site:
    """The site with its MACs per example, from the output shapes its layer reported."""
    if site.kind != "weight" or not outputs:
        return site
    size = math.prod(site.shape)
    return dataclasses.replace(site, macs=sum(size * math.prod(shape[1:-1]) for shape in outputs))


# --------------------------------------------------------------------------- capturing


class _Capturer:
    def __init__(self, names):
        self.names = set(names)
        self.values: dict[str, jax.Array] = {}

    def weight(self, name, w):
        if name in self.names:
            self.values[name] = w
        return w

    def activation(self, name, x, signed=False):
        if name in self.names:
            self.values[name] = x
        return x


def capture(apply_fn: Callable, names, *args) -> dict[str, jax.Array]:
    """The FP32 tensors at the named sites during ``apply_fn(*args)`` (one jitted pass)."""
    names = tuple(names)

    def run(*a):
        cap = _Capturer(names)
        with _active(cap):
            apply_fn(*a)
        return cap.values

    values = jax.jit(run)(*args)
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"sites {missing} were not reached by the forward pass")
    return values


# --------------------------------------------------------------------------- quantizing


def _shift(w_hat, w, spec: SiteSpec, correction):
    """The bias-correction shift of a quantized weight (None without correction): the traced
    0/1 ``correction`` when given, else ``spec.bias_correction`` decides."""
    if correction is not None:
        return correction * quantizers.bias_shift(w_hat, w)  # exactly 0 or the shift
    return quantizers.bias_shift(w_hat, w) if spec.bias_correction else None


class _Quantizer:
    def __init__(self, specs: Mapping[str, SiteSpec], alphas: Mapping[str, jax.Array], bits,
                 corrections=None):
        self.specs = specs
        self.alphas = alphas
        self.bits = bits or {}
        self.corrections = corrections or {}

    def _bits(self, name, spec):
        return self.bits.get(name, spec.bits)

    def weight(self, name, w):
        spec = self.specs.get(name)
        if spec is None:
            return w
        w_hat = quantizers.quantize(w, self.alphas[name], self._bits(name, spec), spec.grid)
        shift = _shift(w_hat, w, spec, self.corrections.get(name))
        used = w_hat if shift is None else w_hat - shift
        self._seen_weight(name, w_hat, shift, used)
        return used

    def _seen_weight(self, name, w_hat, shift, used):
        """Hook for :func:`quantized_weights`: the grid value, the bias-correction shift and
        the weight the layer uses."""

    def activation(self, name, x, signed=False):
        spec = self.specs.get(name)
        if spec is None:
            return x
        return quantizers.quantize(x, self.alphas[name], self._bits(name, spec), spec.grid)


def quantizing(specs: Mapping[str, SiteSpec], alphas: Mapping[str, jax.Array],
               bits: Mapping[str, jax.Array] | None = None,
               corrections: Mapping[str, jax.Array] | None = None):
    """Context that fake-quantizes every site in ``specs`` with ``alphas[name]``.

    ``alphas[name]`` is a scalar, or (C,) for a per-channel weight site. Sites absent from
    ``specs`` stay FP32. ``bits`` optionally overrides ``spec.bits`` per site with (traced)
    values, so one compiled program serves every bit width; ``corrections`` likewise overrides
    ``spec.bias_correction`` of weight sites with traced 0.0 / 1.0 (Ŵ − c · shift).

    To reproduce a ClipLoss's forward pass to the last bit, pass α and the widths as traced
    float32 values as it does (:func:`traced_widths`): with constants, XLA folds and rewrites
    the quantizer's arithmetic (Δ = α/(2^M − 1), x/Δ), and a last-bit difference before a
    rounding moves a value one level.
    """
    return _active(_Quantizer(specs, alphas, bits, corrections))


def traced_widths(specs: Mapping[str, SiteSpec]) -> dict[str, jax.Array]:
    """Site → its bit width as a float32 array, the form ClipLoss passes to :func:`quantizing`."""
    return {name: jnp.asarray(spec.bits, jnp.float32) for name, spec in specs.items()}


class _WeightRecorder(_Quantizer):
    def __init__(self, specs, alphas, bits=None, corrections=None):
        super().__init__(specs, alphas, bits, corrections)
        self.values: dict[str, tuple] = {}

    def _seen_weight(self, name, w_hat, shift, used):
        if shift is None:
            shift = jnp.zeros((1,) * (w_hat.ndim - 1) + w_hat.shape[-1:], w_hat.dtype)
        self.values[name] = (w_hat, shift, used)


def quantized_weights(apply_fn: Callable, specs: Mapping[str, SiteSpec], alphas: Mapping[str, jax.Array],
                      *args, bits: Mapping[str, jax.Array] | None = None,
                      corrections: Mapping[str, jax.Array] | None = None
                      ) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    """Weight site → (Q(W) on the grid, bias-correction shift, Q(W) − shift) as a jitted
    quantized pass of ``apply_fn(*args)`` computes them (the shift has W's rank, size 1 on
    every axis but the last, and is zero without bias correction). The third is the weight the
    layer uses, computed in the program as in a ClipLoss: Q(W) − shift formed outside can
    differ in the last bit (XLA fuses round(z)·Δ − shift into one fused multiply-add).
    ``bits`` and ``corrections`` as in :func:`quantizing` (traced, as ClipLoss passes them)."""

    def run(alphas, bits, corrections, *a):
        rec = _WeightRecorder(specs, alphas, bits, corrections)
        with _active(rec):
            apply_fn(*a)
        return rec.values

    return jax.jit(run)(alphas, bits, corrections, *args)


# --------------------------------------------------------------------------- calibrating

Rule = Callable[[jax.Array, SiteSpec, str], jax.Array]


class _Calibrator:
    def __init__(self, specs, rule: Rule, quantize_upstream: bool, bits, corrections=None):
        self.specs = specs
        self.rule = rule
        self.quantize_upstream = quantize_upstream
        self.bits = bits or {}
        self.corrections = corrections or {}
        self.alphas: dict[str, jax.Array] = {}
        # the least value each unsigned activation site saw: the unsigned grid clips negatives to 0
        self.minima: dict[str, jax.Array] = {}
        self._seen: dict[str, list[jax.Array]] = {}  # each activation site's values so far

    def _spec(self, name):
        spec = self.specs.get(name)
        if spec is not None and name in self.bits:
            spec = dataclasses.replace(spec, bits=self.bits[name])
        return spec

    def _alpha(self, x, spec, kind):
        if kind == "weight" and spec.per_channel:
            per_channel = jnp.moveaxis(x, -1, 0).reshape(x.shape[-1], -1)
            return jax.vmap(lambda c: self.rule(c, spec, kind))(per_channel)
        return self.rule(x, spec, kind)

    def weight(self, name, w):
        spec = self._spec(name)
        if spec is None:
            return w
        alpha = self._alpha(w, spec, "weight")
        self.alphas[name] = alpha
        if not self.quantize_upstream:  # FP32 statistics: downstream activations see FP32 weights
            return w
        w_hat = quantizers.quantize(w, alpha, spec.bits, spec.grid)
        shift = _shift(w_hat, w, spec, self.corrections.get(name))
        return w_hat if shift is None else w_hat - shift

    def activation(self, name, x, signed=False):
        spec = self._spec(name)
        if spec is None:
            return x
        # A module applied more than once shares one α: the rule sees every value the site has
        # had so far (the last application's α is the rule over all of them), not only the last.
        seen = self._seen.setdefault(name, [])
        seen.append(x.reshape(-1))
        values = x if len(seen) == 1 else jnp.concatenate(seen)
        alpha = self._alpha(values, spec, "activation")
        self.alphas[name] = alpha
        if spec.grid == "unsigned":
            self.minima[name] = jnp.min(values)
        if not self.quantize_upstream:
            return x
        return quantizers.quantize(x, alpha, spec.bits, spec.grid)


def calibrating(specs: Mapping[str, SiteSpec], rule: Rule, *, quantize_upstream: bool = True,
                bits: Mapping[str, jax.Array] | None = None,
                corrections: Mapping[str, jax.Array] | None = None):
    """Context that sets each site's α = rule(tensor, spec, kind), in call order.

    With ``quantize_upstream`` the tensor is quantized with its new α before it flows on,
    so every activation's statistics are taken with all upstream sites quantized (the
    LAPQ reference's online initialisation); otherwise statistics are FP32. After the
    traced call, ``ctx.alphas`` maps site name → α, and ``ctx.minima`` each activation site on
    the unsigned grid → the least value it saw (negative values there are clipped to 0). An
    activation site applied more than once (one module called twice shares its α) gets the rule
    over all its applications' values; each application is quantized with the α of the values seen up to it. ``bits``
    optionally overrides ``spec.bits`` with traced values (for rules whose program does not
    depend on the bit width), and
    ``corrections`` overrides ``spec.bias_correction`` as in :func:`quantizing`.
    """
    return _active(_Calibrator(specs, rule, quantize_upstream, bits, corrections))
