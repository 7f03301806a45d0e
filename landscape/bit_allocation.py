"""Mixed-precision bit allocation from per-layer curvature (HAWQ-V2).

Which layers can take fewer bits? HAWQ-V2 (Dong et al., NeurIPS 2020) ranks weight layers by

    Ω_i(b) = (tr H_ii / n_i) · ‖Q_b(W_i) − W_i‖²,

the average curvature of the loss along layer i's n_i weights times the squared quantization
perturbation at b bits: the second-order loss increase of quantizing that layer alone, if the
perturbation were isotropic. It then picks one width per layer to minimise Σ_i Ω_i(b_i) under a
size budget Σ_i n_i b_i ≤ B, or (as HAWQ-V3 does) a compute budget in bit operations,
BOPs = Σ_i MACs_i · b_i · a_i with a_i the width of layer i's input activations.

* :func:`weight_sensitivity` measures Ω for the quantized weight sites of a
  :class:`~landscape.ClipLoss`: tr H_ii from one :func:`~landscape.hessian_spectrum` call on the
  FP32 weight-space loss (``trace_per_leaf``: every layer's block trace from the same Hutch++
  probes), and Q_b with the loss's own weight quantizer, its α from a calibration rule at b bits.
* :func:`allocate_bits` solves the budgeted choice exactly (a multiple-choice knapsack) by
  merging per-layer options into the Pareto front of (size, Σ Ω), and returns the widths as a
  mapping that ``ClipLoss(..., w_bits=allocation.bits)`` takes directly.

``bench/bit_allocation.py`` compares the allocation against uniform widths and random
allocations of the same size on the MNIST resnet20.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from landscape import calibration, checks, quantizers, sites

__all__ = ["Allocation", "Sensitivity", "allocate_bits", "input_widths", "weight_sensitivity"]


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """Per-layer HAWQ-V2 sensitivities of a network's quantized weight sites.

    Attributes:
        sites: the weight sites, in network order.
        sizes: (L,) weights per site, n_i.
        bits: (B,) the candidate widths, ascending.
        trace: (L,) tr H_ii of each site's kernel block (FP32 weight-space Hessian).
        trace_stderr: (L,) its standard error.
        error: (L, B) ‖Q_b(W_i) − W_i‖², the squared perturbation at each width.
        omega: (L, B) Ω_i(b) = trace / sizes · error.
        rule: the calibration rule that set each site's α at each width.
        spectrum: the :class:`~landscape.HessianSpectrum` behind ``trace``.
        macs: (L,) multiply-accumulates per example of each site's layer (:attr:`~landscape.sites.Site.macs`), for
            BOPs budgets; None when a layer does not report them.
    """

    sites: tuple[str, ...]
    sizes: np.ndarray
    bits: tuple[int, ...]
    trace: np.ndarray
    trace_stderr: np.ndarray
    error: np.ndarray
    omega: np.ndarray
    rule: str
    spectrum: object = dataclasses.field(repr=False, default=None)
    macs: np.ndarray | None = None

    def bops(self, widths: Mapping[str, int], a_bits: int | Mapping[str, int]) -> int:
        """Σ_i MACs_i · b_i · a_i per example: the bit operations of the weight widths ``widths``
        (site → bits, every site) with input activations at ``a_bits`` (one width, or site → the
        width of that layer's input)."""
        if not isinstance(widths, Mapping):  # one width is a_bits' form; here it was a TypeError about an int
            raise ValueError(f"bops: widths={widths!r} must map every site to its weight width, e.g. "
                             f"dict.fromkeys(sensitivity.sites, 4) for uniform 4-bit weights")
        missing = [n for n in self.sites if n not in widths]
        stray = sorted(set(widths) - set(self.sites), key=str)
        if missing or stray:  # a misspelt site had been priced as nothing, silently
            raise ValueError(f"widths must map every weight site to its width: no entry for sites {missing}, "
                             f"unknown sites {stray}")
        none = [n for n in self.sites if widths[n] is None]
        if none:
            raise ValueError(f"bops: site {none[0]!r} has width None (FP32); a BOPs count needs an integer width "
                             "for every site (32 for FP32 weights)")
        # a price, not a quantizer: 1 (the BOPs per weight bit, as bench/bit_allocation.py asks) to 32
        bits = [_bops_width(widths[n], f"bops: site {n!r}") for n in self.sites]
        return int(np.sum(self._bops_per_bit(a_bits) * np.array(bits)))

    def _bops_per_bit(self, a_bits) -> np.ndarray:
        """(L,) MACs_i · a_i, int64: the BOPs of each site per bit of its weights."""
        if self.macs is None or any(m is None for m in self.macs):
            raise ValueError("these sensitivities carry no MACs (a layer did not report its output "
                             "through landscape.sites.note_output); a BOPs budget needs them")
        if isinstance(a_bits, Mapping):
            stray = sorted(set(a_bits) - set(self.sites))
            missing = [n for n in self.sites if n not in a_bits]
            if stray or missing:
                raise ValueError(f"a_bits must map every weight site to its input width: unknown {stray}, "
                                 f"missing {missing}")
            widths = [_activation_width(a_bits[n], f"a_bits[{n!r}]") for n in self.sites]
        else:
            widths = [_activation_width(a_bits, "a_bits")] * len(self.sites)
        return np.asarray(self.macs, np.int64) * np.asarray(widths, np.int64)


    def __repr__(self) -> str:
        head = f"Sensitivity({len(self.sites)} weight sites, bits {list(self.bits)}, α by {self.rule!r})"
        width = max(len(s) for s in self.sites)
        cols = "  ".join(f"{'Ω(' + str(b) + ')':>9}" for b in self.bits)
        macs = self.macs is not None
        lines = [head, f"  {'site':<{width}} {'size':>7}{'  MACs/example' if macs else ''} {'tr H_ii/n_i':>11}  {cols}"]
        for i, name in enumerate(self.sites):
            row = "  ".join(f"{v:>9.3g}" for v in self.omega[i])
            mac = f"  {self.macs[i]:>12}" if macs else ""
            lines.append(f"  {name:<{width}} {self.sizes[i]:>7}{mac} {self.trace[i] / self.sizes[i]:>11.3g}  {row}")
        return "\n".join(lines)


def _bops_width(bits, where: str) -> int:
    """A weight width for a BOPs count: an integer in [1, 32] (1: the count per weight bit)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 32:
        raise ValueError(f"{where}: bits={bits!r} is not allowed; use an integer in [1, 32] (1 prices one "
                         "weight bit, 32 FP32 weights)")
    return int(bits)


def _activation_width(bits, where: str) -> int:
    """An input activation width for a BOPs count: an integer in [1, 32] (32: FP32 inputs)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 32:
        raise ValueError(f"{where}={bits!r} is not an activation width; use an integer in [1, 32] "
                         "(32 for FP32 inputs)")
    return int(bits)


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The result of :func:`allocate_bits`.

    Attributes:
        bits: site → width, in network order (``ClipLoss(..., w_bits=allocation.bits)``).
        omega: Σ_i Ω_i(b_i) of this choice.
        size_bits: Σ_i n_i b_i.
        average_bits: size_bits / Σ_i n_i.
        constraint: "size" (Σ_i n_i b_i ≤ budget) or "bops" (Σ_i MACs_i b_i a_i ≤ budget).
        budget: the budget it was chosen under, in bits ("size") or bit operations per example
            ("bops").
        cost: the choice's Σ_i n_i b_i ("size") or BOPs ("bops").
        front: (K, 2) the Pareto front of (cost, omega) over all choices within the budget, by
            increasing cost; the allocation is its last point.
    """

    bits: dict[str, int]
    omega: float
    size_bits: int
    average_bits: float
    constraint: str
    budget: int
    cost: int
    front: np.ndarray

    def __repr__(self) -> str:
        widths = ", ".join(f"{k} {v}" for k, v in self.bits.items())
        unit = "budget bits" if self.constraint == "size" else "budget BOPs"
        return (f"Allocation(average {self.average_bits:.3f} bits, {self.cost} of {self.budget} {unit}, "
                f"Σ Ω {self.omega:.4g}; {widths})")


def _at_kernel(tree, name):
    """The leaf of a params-shaped tree at a weight site's kernel: the site's module path (Flax
    names sites by it, "/"-joined), then "kernel"."""
    node = tree
    for key in name.split("/") + ["kernel"]:
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"weight site {name!r} has no params entry {name}/kernel; "
                             "weight_sensitivity needs the quantizable layers' 'kernel' parameters")
        node = node[key]
    return node


def _kernel(params, site):
    """A weight site's kernel in params, checked against the shape the site sees."""
    node = _at_kernel(params, site.name)
    if tuple(np.shape(node)) != tuple(site.shape):
        raise ValueError(f"params {site.name}/kernel has shape {np.shape(node)}, but the site sees "
                         f"{site.shape}; weight_sensitivity cannot pair them")
    return node


def input_widths(loss, default: int = 32) -> dict[str, int]:
    """Weight site → the width of the activations it multiplies in ``loss``, for BOPs budgets.

    A layer that multiplies a quantized activation site's values, directly or through
    value-preserving operations (a reshape, max-pooling: :func:`landscape.sites.direct_inputs`),
    gets that site's width; one fed by an FP32 site, by the input data or through anything else
    (average pooling, a sum) gets ``default`` (32: FP32). Covers every quantized weight site of
    ``loss``.
    """
    width = _activation_width(default, "default")
    feeds = sites.direct_inputs(lambda v, x: loss.model.apply(v, x, train=False), loss.variables,
                                np.asarray(loss.calib.x[:1]))
    bits = {s.name: loss.specs[s.name].bits for s in loss.sites if s.kind == "activation"}
    return {s.name: bits.get(feeds.get(s.name), width) for s in loss.sites if s.kind == "weight"}


def weight_sensitivity(loss, bits: Sequence[int] = (2, 3, 4, 8), *, rule: str = "mse",
                       rule_kw: Mapping | None = None, spectrum=None, seed: int = 0,
                       **spectrum_kw) -> Sensitivity:
    """HAWQ-V2 sensitivities Ω_i(b) of the weight sites of ``loss`` at each width in ``bits``.

    Args:
        loss: a :class:`~landscape.ClipLoss` whose quantized weight sites are the layers to rank
            (its activation sites and bit widths are ignored; the calibration set, BN folding,
            weight grid, per-channel α and bias correction are used).
        bits: candidate widths, each in [2, 16].
        rule, rule_kw: the calibration rule setting each width's α, ``loss.init(rule, **rule_kw)``:
            "mse" (default), "max", "lp" with ``rule_kw={"p": 3.0}``, "aciq", ...
        spectrum: a :class:`~landscape.HessianSpectrum` of ``loss.weight_loss(None)`` at
            ``loss.variables["params"]`` with ``trace=True``, to reuse; computed otherwise.
        seed: seed of the Hutch++ probes.
        **spectrum_kw: passed to :func:`~landscape.hessian_spectrum` (defaults: top_k=1,
            tol=1e-2, tol_on="eigenvalue", num_probes=48).

    Returns:
        :class:`Sensitivity`.
    """
    from landscape.spectrum import hessian_spectrum

    # The rule and its options first: they are used only after the Hessian spectrum, minutes in.
    if rule_kw is not None and not isinstance(rule_kw, Mapping):
        raise ValueError(f"rule_kw={rule_kw!r} must be a mapping of the rule's options, e.g. "
                         "rule_kw={'p': 3.0} for rule='lp', or None")
    if not isinstance(rule, str):
        raise ValueError(f"rule={rule!r} must be a calibration rule's name, one of {calibration.RULES}")
    calibration.make_rule(rule, **(rule_kw or {}))  # an unknown rule or option, a bad value
    if isinstance(bits, str) or np.ndim(np.asarray(bits, dtype=object)) != 1:
        raise ValueError(f"bits={bits!r} must be a sequence of candidate widths, e.g. (2, 3, 4, 8)")
    if any(b is None for b in bits):
        raise ValueError(f"bits={tuple(bits)!r}: every candidate width must be an integer in [2, 16] (None, "
                         "FP32, is not a candidate)")
    bits = tuple(sorted({quantizers.check_bits(b, "weight_sensitivity") for b in bits}))
    if not bits:
        raise ValueError("bits is empty; give the candidate widths, e.g. (2, 3, 4, 8)")
    weight_sites = [s for s in loss.sites if s.kind == "weight"]
    if not weight_sites:
        raise ValueError(f"{loss!r} has no quantized weight sites; construct it with w_bits set")
    params = loss.variables["params"]
    kernels = {s.name: _kernel(params, s) for s in weight_sites}
    if spectrum is None:
        kw = dict(top_k=1, tol=1e-2, tol_on="eigenvalue", num_probes=48) | spectrum_kw
        spectrum = hessian_spectrum(loss.weight_loss(None), params, trace=True, seed=seed, **kw)
    if spectrum.trace_per_leaf is None:
        raise ValueError("spectrum has no per-leaf traces; compute it with trace=True")
    trace_of, err_of = spectrum.trace_per_leaf, spectrum.trace_per_leaf_stderr
    trace = np.array([_at_kernel(trace_of, s.name) for s in weight_sites], np.float64)
    trace_stderr = np.array([_at_kernel(err_of, s.name) for s in weight_sites], np.float64)
    sizes = np.array([int(np.prod(s.shape)) for s in weight_sites])
    macs = None if any(s.macs is None for s in weight_sites) else np.array([s.macs for s in weight_sites], np.int64)

    error = np.zeros((len(weight_sites), len(bits)))
    names = [s.name for s in weight_sites]
    for j, b in enumerate(bits):
        at_b = loss.with_options(w_bits={name: b for name in names}, a_bits=None)
        alpha = np.asarray(at_b.init(rule, **(rule_kw or {})))
        slices = at_b.site_slices()
        for i, site in enumerate(weight_sites):
            spec = at_b.specs[site.name]
            w = np.asarray(kernels[site.name], np.float32)
            a = alpha[slices[site.name]]
            w_hat = quantizers.quantize(w, a if spec.per_channel else a[0], b, spec.grid)
            if spec.bias_correction:
                w_hat = quantizers.bias_correct(w_hat, w)
            error[i, j] = float(np.sum((np.asarray(w_hat, np.float64) - w) ** 2))
    omega = (trace / sizes)[:, None] * error
    broken = [n for n, t, e in zip(names, trace, trace_stderr, strict=True) if not np.isfinite(t + e)]
    if broken:  # a NaN compared false below: no warning, and allocate_bits stopped at the smallest widths
        warnings.warn(f"weight_sensitivity: the Hessian block traces of {broken} (or their standard errors) are "
                      "not finite, so their Ω is undefined and allocate_bits refuses these sensitivities; is the "
                      "weight-space loss finite at these params?", RuntimeWarning, stacklevel=2)
    doubtful = [n for n, t, e in zip(names, trace, trace_stderr, strict=True) if n not in broken and t - 2 * e <= 0]
    if doubtful:  # Ω ∝ trace: a trace at or below zero would rank the layer's widths backwards
        warnings.warn(f"weight_sensitivity: the Hessian block traces of {doubtful} are within two standard "
                      "errors of zero or below it, so their Ω (∝ trace) is not a reliable sensitivity; "
                      "raise num_probes (spectrum_kw) for a tighter trace", RuntimeWarning, stacklevel=2)
    return Sensitivity(tuple(names), sizes, bits, trace, trace_stderr, error, omega, rule, spectrum, macs)


def _check_table(s: Sensitivity) -> None:
    """A Sensitivity that allocate_bits can optimise: at least one site, distinct widths, sizes (and MACs)
    one per site, and a finite Ω of shape (sites, widths). A hand-made table that broke these was used as far
    as it went (extra rows ignored), and one NaN Ω stopped the search at the smallest widths."""
    n_sites, n_bits = len(s.sites), len(s.bits)
    if n_sites == 0 or n_bits == 0 or len(set(s.bits)) != n_bits:
        raise ValueError(f"the Sensitivity has sites {list(s.sites)} and widths {list(s.bits)}; allocate_bits "
                         "needs at least one site and one or more distinct widths")
    shapes = {"sizes": (n_sites,), "omega": (n_sites, n_bits)} | ({"macs": (n_sites,)} if s.macs is not None else {})
    for field, want in shapes.items():
        if np.shape(getattr(s, field)) != want:
            raise ValueError(f"the Sensitivity's {field} has shape {np.shape(getattr(s, field))}; {n_sites} sites "
                             f"and widths {list(s.bits)} need {want}")
    empty = [name for name, size in zip(s.sites, np.asarray(s.sizes), strict=True) if not size >= 1]
    if empty:  # a size of 0 or below costs nothing: the search would give that site every bit for free
        raise ValueError(f"the Sensitivity's sizes of sites {empty} are not positive; allocate_bits needs each "
                         "site's weight count (≥ 1)")
    bad = [name for name, row in zip(s.sites, np.asarray(s.omega, np.float64), strict=True)
           if not np.all(np.isfinite(row))]
    if bad:
        raise ValueError(f"the Ω of sites {bad} is not finite (a NaN or infinite block trace?); allocate_bits "
                         "needs a finite Ω for every site and width")


def allocate_bits(sensitivity: Sensitivity, *, average_bits: float | None = None,
                  budget_bits: int | None = None, budget_bops: int | None = None,
                  a_bits: int | Mapping[str, int] | None = None) -> Allocation:
    """The widths minimising Σ_i Ω_i(b_i) under a size or a compute budget, exactly.

    Give exactly one budget:

    * ``average_bits`` (per weight of the ranked sites) or ``budget_bits``: Σ_i n_i b_i ≤ budget;
    * ``budget_bops`` with ``a_bits``: Σ_i MACs_i · b_i · a_i ≤ budget, bit operations per
      example, a_i the width of layer i's input activations (one width, or site → width, e.g.
      :func:`input_widths` of a ClipLoss with the activation widths to deploy).
      ``sensitivity.bops(widths, a_bits)`` prices a configuration, e.g. uniform 4-bit weights.

    The search merges the layers one at a time into the Pareto front of (cost, Σ Ω) — a choice
    is kept only if no other choice is both cheaper and better — so the optimum is exact; the
    front stays small because the costs are few distinct multiples.

    Returns:
        :class:`Allocation`; ``allocation.bits`` maps each site to its width.

    Raises:
        ValueError: ``sensitivity`` not a :class:`Sensitivity` (a ClipLoss: pass
        ``weight_sensitivity(loss)``), no budget or two, ``a_bits`` missing or given without ``budget_bops``, a
        budget below the smallest width everywhere, or (a hand-made table) no sites, repeated widths, ``sizes``,
        ``omega`` or ``macs`` not one row per site (and ``omega`` one column per width), or an Ω not finite.
    """
    if not isinstance(sensitivity, Sensitivity):
        hint = (": compute it from the loss first, ls.weight_sensitivity(loss)"
                if all(hasattr(sensitivity, a) for a in ("n", "sites", "init")) else "")
        raise ValueError(f"allocate_bits needs the Sensitivity that weight_sensitivity returns, got a "
                         f"{type(sensitivity).__name__}{hint}")
    s = sensitivity
    _check_table(s)
    if sum(b is not None for b in (average_bits, budget_bits, budget_bops)) != 1:
        raise ValueError("give exactly one of average_bits, budget_bits and budget_bops")
    if (budget_bops is None) != (a_bits is None):
        raise ValueError("a_bits (the input activations' width) goes with budget_bops, and only with it")
    total = int(np.sum(s.sizes))
    for name, value in (("average_bits", average_bits), ("budget_bits", budget_bits), ("budget_bops", budget_bops)):
        if value is not None and not checks.is_positive_finite(value):
            raise ValueError(f"{name}={value!r} must be a positive finite number")
    if budget_bops is not None:
        constraint, per_bit, budget = "bops", s._bops_per_bit(a_bits), budget_bops
        unit = "BOPs"
    else:
        constraint, per_bit, unit = "size", np.asarray(s.sizes, np.int64), "bits"
        if budget_bits is None:
            budget_bits = int(np.floor(average_bits * total + 1e-9))
        budget = budget_bits
    budget = int(budget)
    floor = int(np.sum(per_bit)) * min(s.bits)
    if budget < floor:
        given, allowed = f"budget of {budget} {unit}", f"≥ {floor}"
        if average_bits is not None:
            given, allowed = f"average_bits={average_bits!r} (a {given})", f"average_bits ≥ {min(s.bits)}"
        raise ValueError(f"{given} is below the {floor} {unit} of every site at {min(s.bits)} bits; "
                         f"allowed: {allowed}")
    # Front entries: (cost, omega, choice index per layer so far); kept sorted by cost with
    # strictly decreasing omega.
    cost_so_far = np.zeros(1, np.int64)
    omega_so_far = np.zeros(1)
    choice = np.zeros((1, 0), np.int64)
    widths = np.asarray(s.bits, np.int64)
    for i in range(len(s.sites)):
        cand_cost = (cost_so_far[:, None] + per_bit[i] * widths[None, :]).ravel()
        cand_omega = (omega_so_far[:, None] + s.omega[i][None, :]).ravel()
        parent = np.repeat(np.arange(len(cost_so_far)), len(s.bits))
        pick = np.tile(np.arange(len(s.bits)), len(cost_so_far))
        # The remaining layers need at least their smallest width: prune what cannot fit.
        rest = int(np.sum(per_bit[i + 1:])) * min(s.bits)
        fits = cand_cost + rest <= budget
        cand_cost, cand_omega, parent, pick = cand_cost[fits], cand_omega[fits], parent[fits], pick[fits]
        order = np.lexsort((cand_omega, cand_cost))
        best = np.minimum.accumulate(cand_omega[order])
        keep = order[np.concatenate([[True], cand_omega[order][1:] < best[:-1]])]
        cost_so_far, omega_so_far = cand_cost[keep], cand_omega[keep]
        choice = np.concatenate([choice[parent[keep]], pick[keep][:, None]], axis=1)
    k = int(np.argmin(omega_so_far))
    chosen = {name: int(s.bits[c]) for name, c in zip(s.sites, choice[k], strict=True)}
    size = int(sum(n * chosen[name] for n, name in zip(s.sizes, s.sites, strict=True)))
    front = np.stack([cost_so_far.astype(np.float64), omega_so_far], axis=1)
    return Allocation(chosen, float(omega_so_far[k]), size, size / total, constraint, budget,
                      int(cost_so_far[k]), front)
