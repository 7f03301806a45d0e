"""Mixed-precision allocation: the exact knapsack against brute force, HAWQ-V2 sensitivities
against their definition, and the allocation feeding a ClipLoss."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
from landscape import quantizers
from landscape.bit_allocation import Sensitivity, allocate_bits


def synthetic(seed, layers=5, bits=(2, 3, 4, 8)):
    """Random sizes and Ω decreasing in the width (as ‖Q_b(W) − W‖² does, roughly 4^−b)."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([16, 48, 96, 160, 432], layers)
    curvature = rng.lognormal(0.0, 1.5, layers)
    error = sizes[:, None] * 4.0 ** -np.asarray(bits)[None, :] * rng.uniform(0.5, 2.0, (layers, len(bits)))
    omega = curvature[:, None] * error
    names = tuple(f"l{i}" for i in range(layers))
    return Sensitivity(names, sizes, tuple(bits), curvature * sizes, np.zeros(layers), error, omega, "synthetic")


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_brute_force_optimum(seed):
    s = synthetic(seed)
    total = int(s.sizes.sum())
    choices = list(itertools.product(range(len(s.bits)), repeat=len(s.sites)))
    cost = np.array([sum(s.sizes[i] * s.bits[c] for i, c in enumerate(ch)) for ch in choices])
    value = np.array([sum(s.omega[i, c] for i, c in enumerate(ch)) for ch in choices])
    for average in (2.0, 2.3, 2.5, 3.0, 3.7, 5.0, 8.0):
        budget = int(np.floor(average * total + 1e-9))
        best = value[cost <= budget].min()
        got = allocate_bits(s, average_bits=average)
        assert got.omega == pytest.approx(best, rel=1e-12)
        assert got.size_bits == got.cost <= budget == got.budget and got.constraint == "size"
        assert got.size_bits == sum(s.sizes[i] * got.bits[name] for i, name in enumerate(s.sites))
        assert got.omega == pytest.approx(sum(s.omega[i, s.bits.index(got.bits[n])] for i, n in enumerate(s.sites)))
        # The front: sizes increasing, Σ Ω strictly decreasing, every point feasible and optimal
        # for its own size.
        front = got.front
        assert np.all(np.diff(front[:, 0]) > 0) and np.all(np.diff(front[:, 1]) < 0)
        for size, omega in front:
            assert omega == pytest.approx(value[cost <= size].min(), rel=1e-12)
    assert allocate_bits(s, budget_bits=total * 8).bits == dict.fromkeys(s.sites, 8)
    assert allocate_bits(s, budget_bits=total * 2).bits == dict.fromkeys(s.sites, 2)


@pytest.mark.parametrize("seed", range(4))
def test_bops_allocation_is_the_brute_force_optimum(seed):
    s = synthetic(seed)
    rng = np.random.default_rng(100 + seed)
    s = dataclasses.replace(s, macs=s.sizes * rng.choice([1, 4, 16, 64], len(s.sites)))
    a_bits = {name: int(b) for name, b in zip(s.sites, rng.choice([4, 8], len(s.sites)), strict=True)}
    choices = list(itertools.product(range(len(s.bits)), repeat=len(s.sites)))
    bops = np.array([sum(s.macs[i] * s.bits[c] * a_bits[n] for (i, c), n in zip(enumerate(ch), s.sites, strict=True))
                     for ch in choices])
    value = np.array([sum(s.omega[i, c] for i, c in enumerate(ch)) for ch in choices])
    uniform = {b: s.bops(dict.fromkeys(s.sites, b), a_bits) for b in (2, 3, 4, 8)}
    assert uniform[4] == 2 * uniform[2] == int(sum(s.macs[i] * 4 * a_bits[n] for i, n in enumerate(s.sites)))
    for budget in np.linspace(uniform[2], uniform[8], 9).astype(np.int64):
        got = allocate_bits(s, budget_bops=int(budget), a_bits=a_bits)
        assert got.constraint == "bops" and got.budget == budget
        assert got.omega == pytest.approx(value[bops <= budget].min(), rel=1e-12)
        assert got.cost == s.bops(got.bits, a_bits) <= budget
        assert got.size_bits == sum(s.sizes[i] * got.bits[n] for i, n in enumerate(s.sites))
        for cost, omega in got.front:
            assert omega == pytest.approx(value[bops <= cost].min(), rel=1e-12)
    # One activation width for every layer: the same as the mapping with that width everywhere.
    one = allocate_bits(s, budget_bops=uniform[3] * 2, a_bits=8)
    assert one.bits == allocate_bits(s, budget_bops=uniform[3] * 2, a_bits=dict.fromkeys(s.sites, 8)).bits
    assert "budget BOPs" in repr(one)


def test_bops_budget_errors():
    s = synthetic(0)
    with pytest.raises(ValueError, match="carry no MACs"):
        allocate_bits(s, budget_bops=10**9, a_bits=8)
    s = dataclasses.replace(s, macs=s.sizes * 4)
    floor = s.bops(dict.fromkeys(s.sites, 2), 8)
    for width, match in ((0, "bits=0 is not allowed"), (3.9, "bits=3.9 is not allowed"), (None, "width None")):
        with pytest.raises(ValueError, match=match):  # 0 and 3.9 (truncated to 3) were counted
            s.bops({**dict.fromkeys(s.sites, 2), s.sites[1]: width}, 8)
    with pytest.raises(ValueError, match="a_bits .* goes with budget_bops"):
        allocate_bits(s, budget_bops=floor)
    with pytest.raises(ValueError, match="a_bits .* goes with budget_bops"):
        allocate_bits(s, average_bits=3.0, a_bits=8)
    with pytest.raises(ValueError, match="exactly one"):
        allocate_bits(s, average_bits=3.0, budget_bops=floor, a_bits=8)
    with pytest.raises(ValueError, match=rf"below the {floor} BOPs of every site at 2 bits"):
        allocate_bits(s, budget_bops=floor - 1, a_bits=8)
    with pytest.raises(ValueError, match=r"missing \['l4'\]"):
        allocate_bits(s, budget_bops=floor, a_bits={n: 8 for n in s.sites[:-1]})
    with pytest.raises(ValueError, match=r"unknown \['x'\]"):
        allocate_bits(s, budget_bops=floor, a_bits={**dict.fromkeys(s.sites, 8), "x": 8})
    for bad in (0, 33, 4.0, None):
        with pytest.raises(ValueError, match=rf"a_bits={bad}.* integer in \[1, 32\]"):
            s.bops(dict.fromkeys(s.sites, 2), bad)
    with pytest.raises(ValueError, match=r"a_bits\['l1'\]=0 is not an activation width"):
        allocate_bits(s, budget_bops=floor, a_bits={**dict.fromkeys(s.sites, 8), "l1": 0})
    with pytest.raises(ValueError, match=r"no entry for sites \['l1', 'l2', 'l3', 'l4'\], unknown sites \[\]"):
        s.bops({"l0": 2}, 8)
    with pytest.raises(ValueError, match=r"no entry for sites \[\], unknown sites \['l5'\]"):  # not priced as 0
        s.bops({**dict.fromkeys(s.sites, 2), "l5": 2}, 8)


def test_allocation_rejects_bad_budgets():
    s = synthetic(0)
    total = int(s.sizes.sum())
    with pytest.raises(ValueError, match="exactly one"):
        allocate_bits(s)
    with pytest.raises(ValueError, match="exactly one"):
        allocate_bits(s, average_bits=3.0, budget_bits=3 * total)
    with pytest.raises(ValueError, match=r"below the .* bits of every site at 2 bits"):
        allocate_bits(s, average_bits=1.9)
    for name, bad in (("average_bits", float("nan")), ("average_bits", "3"), ("budget_bits", float("inf")),
                      ("budget_bops", float("nan")), ("budget_bits", -5)):
        with pytest.raises(ValueError, match=f"{name}={bad!r} must be a positive finite number"):
            allocate_bits(s, **{name: bad}, **({"a_bits": 8} if name == "budget_bops" else {}))


@pytest.fixture(scope="module")
def sensitivity(tiny_net, digits):
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    return loss, ls.weight_sensitivity(loss, bits=(4, 2, 3), num_probes=30, seed=1)


def test_sensitivity_is_hawq_v2_omega(sensitivity, tiny_net, digits):
    loss, s = sensitivity
    assert s.sites == ("conv0_1", "conv1_0", "conv1_1") and s.bits == (2, 3, 4)
    assert list(s.sizes) == [3 * 3 * 8 * 8, 3 * 3 * 8 * 16, 3 * 3 * 16 * 16]
    # tr H_ii is the spectrum's per-leaf trace of that kernel.
    params = s.spectrum.trace_per_leaf
    assert s.trace[2] == params["conv1_1"]["kernel"] and s.trace_stderr[2] > 0
    np.testing.assert_allclose(s.omega, (s.trace / s.sizes)[:, None] * s.error)
    assert np.all(np.diff(s.error, axis=1) < 0)  # more bits, smaller perturbation
    # The perturbation is the loss's own quantizer at that width's MSE α.
    single = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=None, sites=["conv1_0"])
    alpha = float(single.init("mse")[0])
    w = np.asarray(tiny_net.variables["params"]["conv1_0"]["kernel"], np.float32)
    w_hat = np.asarray(quantizers.quantize(w, alpha, 3, "midrise"), np.float64)
    assert s.error[1, 1] == pytest.approx(float(np.sum((w_hat - w) ** 2)), rel=1e-5)
    assert "conv1_1" in repr(s) and "Ω(2)" in repr(s)
    # MACs per example: kernel size × output positions, the positions from Flax's own record of
    # each module's output.
    _, inter = jax.eval_shape(lambda x: tiny_net.model.apply(tiny_net.variables, x, train=False,
                                                               capture_intermediates=True, mutable=["intermediates"]),
                              jnp.zeros((1,) + digits.calib.x.shape[1:], jnp.float32))
    out = {name: inter["intermediates"][name]["__call__"][0].shape for name in s.sites}
    assert list(s.macs) == [n * math.prod(out[name][1:-1]) for n, name in zip(s.sizes, s.sites, strict=True)]


def test_a_trace_within_two_standard_errors_of_zero_warns(sensitivity):
    loss, s = sensitivity
    doubtful = jax.tree.map(lambda t: t, s.spectrum.trace_per_leaf)
    doubtful["conv1_0"]["kernel"] = -0.1  # Ω ∝ trace: a negative one ranks the widths backwards
    spectrum = dataclasses.replace(s.spectrum, trace_per_leaf=doubtful)
    with pytest.warns(RuntimeWarning, match=r"block traces of \['conv1_0'\] are within two standard errors"):
        ls.weight_sensitivity(loss, bits=(2, 3, 4), spectrum=spectrum)


def test_sensitivity_reuses_a_spectrum_and_feeds_clip_loss(sensitivity, tiny_net, digits):
    loss, s = sensitivity
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the real traces are well above zero: no warning
        again = ls.weight_sensitivity(loss, bits=(2, 3, 4), spectrum=s.spectrum)
    assert again.spectrum is s.spectrum
    np.testing.assert_allclose(again.omega, s.omega)
    allocation = ls.allocate_bits(s, average_bits=3.0)
    assert set(allocation.bits) == set(s.sites) and allocation.average_bits <= 3.0
    mixed = ls.ClipLoss(tiny_net, digits.calib, w_bits=allocation.bits, a_bits=None)
    assert mixed.bits == allocation.bits
    assert np.isfinite(float(mixed(mixed.init("mse"))))
    no_trace = ls.hessian_spectrum(loss.weight_loss(None), loss.variables["params"], top_k=1, trace=False,
                                   tol=1e-1)
    with pytest.raises(ValueError, match="no per-leaf traces"):
        ls.weight_sensitivity(loss, spectrum=no_trace)
    with pytest.raises(ValueError, match="no quantized weight sites"):
        ls.weight_sensitivity(loss.with_options(w_bits=None))
    with pytest.raises(ValueError, match="bits=1"):
        ls.weight_sensitivity(loss, bits=(1, 4), spectrum=s.spectrum)
    with pytest.raises(ValueError, match="bits=2.7 is not allowed"):  # not cut down to 2
        ls.weight_sensitivity(loss, bits=(2.7, 4), spectrum=s.spectrum)
    with pytest.raises(ValueError, match=r"None, FP32, is not a candidate"):
        ls.weight_sensitivity(loss, bits=(None, 4), spectrum=s.spectrum)
    with pytest.raises(ValueError, match=r"bits=4 must be a sequence of candidate widths, e.g. \(2, 3, 4, 8\)"):
        ls.weight_sensitivity(loss, bits=4, spectrum=s.spectrum)


def test_input_widths_follow_the_activation_sites(digits):
    import models

    model = models.create("resnet8", num_classes=10)
    net = ls.train.Network(model, model.init(jax.random.key(0), digits.calib.x[:1]), {}, [])
    loss = ls.ClipLoss(net, digits.calib, w_bits=4, a_bits={"layer1_0/relu1": 3, "layer2_0/relu1": 5})
    widths = ls.bit_allocation.input_widths(loss)
    assert set(widths) == {s.name for s in loss.sites if s.kind == "weight"}
    # conv2 of a block reads its relu1; everything else reads an FP32 activation here.
    assert widths["layer1_0/conv2"] == 3 and widths["layer2_0/conv2"] == 5
    assert all(v == 32 for k, v in widths.items() if k not in ("layer1_0/conv2", "layer2_0/conv2"))
    assert ls.bit_allocation.input_widths(loss, default=8)["layer1_0/conv1"] == 8
    uniform = ls.ClipLoss(net, digits.calib, w_bits=4, a_bits=4)
    assert set(ls.bit_allocation.input_widths(uniform).values()) == {4}
    with pytest.raises(ValueError, match="default=0 is not an activation width"):
        ls.bit_allocation.input_widths(loss, default=0)


def test_input_widths_pass_max_pooling(tiny_net, digits):
    loss = ls.ClipLoss(tiny_net, (digits.calib.x[:16], digits.calib.y[:16]), w_bits=4,
                       a_bits={"relu0_0": 5, "relu0_1": 3, "relu1_0": 6})
    # conv1_0 reads relu0_1 through the max-pool between the stages; fc reads a global average.
    assert ls.bit_allocation.input_widths(loss) == {"conv0_1": 5, "conv1_0": 3, "conv1_1": 6}


def test_allocate_bits_names_what_it_was_given():
    """A ClipLoss (or anything else) in place of the sensitivities is named, with the call to make them."""
    class LossLike:
        n, sites = 3, ()

        def init(self, rule):
            return None

    with pytest.raises(ValueError, match=r"allocate_bits needs the Sensitivity that weight_sensitivity returns, got "
                                         r"a LossLike: compute it from the loss first, ls.weight_sensitivity\(loss\)"):
        allocate_bits(LossLike(), average_bits=3)
    with pytest.raises(ValueError, match="got a dict$"):
        allocate_bits({}, average_bits=3)


def test_weight_sensitivity_checks_the_rule_before_the_spectrum(tiny_net, digits, monkeypatch):
    import landscape.spectrum

    def no_spectrum(*a, **kw):
        raise AssertionError("the Hessian spectrum ran before the rule was checked")

    monkeypatch.setattr(landscape.spectrum, "hessian_spectrum", no_spectrum)
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=None)
    for kw, match in (({"rule": "MSE"}, "unknown calibration rule 'MSE'; known rules: max, percentile"),
                      ({"rule": None}, "rule=None must be a calibration rule's name"),
                      ({"rule_kw": 3.0}, r"rule_kw=3.0 must be a mapping of the rule's options"),
                      ({"rule": "lp", "rule_kw": {"q": 3}}, r"rule 'lp' got unknown options \['q'\]"),
                      ({"rule": "lp", "rule_kw": {"p": -1}}, r"lp p=-1 must be a number")):
        with pytest.raises(ValueError, match=match):
            ls.weight_sensitivity(loss, **kw)


def test_a_positive_trace_within_two_standard_errors_still_warns(sensitivity):
    """The warning's bound is two standard errors: a trace of 1.5 standard errors (positive, but not
    reliably so) warns; one of 2.5 does not. Guards against a bound of one standard error."""
    loss, s = sensitivity
    err = float(s.spectrum.trace_per_leaf_stderr["conv1_0"]["kernel"])
    assert err > 0

    def with_trace(t):
        traces = jax.tree.map(lambda v: v, s.spectrum.trace_per_leaf)
        traces["conv1_0"]["kernel"] = t
        return dataclasses.replace(s.spectrum, trace_per_leaf=traces)

    with pytest.warns(RuntimeWarning, match=r"block traces of \['conv1_0'\] are within two standard errors"):
        ls.weight_sensitivity(loss, bits=(2, 4), spectrum=with_trace(1.5 * err))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ls.weight_sensitivity(loss, bits=(2, 4), spectrum=with_trace(2.5 * err))


@pytest.mark.parametrize("option", ["per_channel", "bias_correction"])
def test_the_perturbation_is_the_losss_own_per_channel_and_bias_corrected_quantizer(sensitivity, tiny_net, digits,
                                                                                   option):
    """With per-channel α or bias correction on the ClipLoss, ‖Q_b(W) − W‖² is measured with them:
    one α per output channel (not the first channel's α for all), the per-channel mean restored. Guards
    against either option being dropped from the sensitivity."""
    _, s = sensitivity
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=None, **{option: True})
    got = ls.weight_sensitivity(loss, bits=(3,), spectrum=s.spectrum)
    single = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=None, sites=["conv1_0"], **{option: True})
    alpha = np.asarray(single.init("mse"))
    w = np.asarray(tiny_net.variables["params"]["conv1_0"]["kernel"], np.float32)
    w_hat = quantizers.quantize(w, alpha if option == "per_channel" else alpha[0], 3, "midrise")
    if option == "bias_correction":
        w_hat = quantizers.bias_correct(w_hat, w)
    want = float(np.sum((np.asarray(w_hat, np.float64) - w) ** 2))
    assert got.error[1, 0] == pytest.approx(want, rel=1e-5)
    assert got.error[1, 0] != pytest.approx(s.error[1, 1], rel=1e-3)  # not the plain per-tensor error
    if option == "per_channel":
        assert alpha.shape == (w.shape[-1],) and np.ptp(alpha) > 0


def test_fp32_inputs_are_32_bit_activations_in_a_bops_count():
    """a_bits=32 stands for FP32 inputs (input_widths' default for layers fed by no quantized site):
    counted, not refused, at 32 bit operations per MAC and weight bit."""
    s = synthetic(1)
    s = dataclasses.replace(s, macs=s.sizes * 9)
    w4 = dict.fromkeys(s.sites, 4)
    assert s.bops(w4, 32) == 4 * s.bops(w4, 8) == int(np.sum(s.macs)) * 4 * 32
    mixed = {**dict.fromkeys(s.sites, 8), "l0": 32}
    assert s.bops(w4, mixed) == int(s.macs[0]) * 4 * 32 + int(np.sum(s.macs[1:])) * 4 * 8
    got = allocate_bits(s, budget_bops=s.bops(dict.fromkeys(s.sites, 3), mixed), a_bits=mixed)
    assert got.cost == s.bops(got.bits, mixed) <= got.budget


def test_bops_prices_one_weight_bit():
    """bench/bit_allocation.py sets its BOPs budget as budget · bops(every site at 1 bit, a): the count per
    weight bit. A price, not a quantizer width: 1 to 32 bits are counted (1 was refused as a quantizer width,
    so the benchmark's first BOPs row raised); 0, 33 and fractions are not."""
    s = dataclasses.replace(synthetic(2), macs=synthetic(2).sizes * 9)
    per_bit = s.bops(dict.fromkeys(s.sites, 1), 8)
    assert per_bit == int(np.sum(s.macs)) * 8 and s.bops(dict.fromkeys(s.sites, 3), 8) == 3 * per_bit
    assert s.bops(dict.fromkeys(s.sites, 32), 8) == 32 * per_bit
    got = allocate_bits(s, budget_bops=int(2.5 * per_bit), a_bits=8)
    assert got.cost == s.bops(got.bits, 8) <= 2.5 * per_bit
    for bad in (0, 33, 2.5):
        with pytest.raises(ValueError, match=rf"site 'l1'.*bits={bad} is not allowed; use an integer in \[1, 32\]"):
            s.bops({**dict.fromkeys(s.sites, 2), "l1": bad}, 8)


def test_bops_names_one_width_given_for_the_weight_widths():
    """One width is a_bits' form, not widths': bops(4, 8) was a TypeError about iterating an int."""
    s = dataclasses.replace(synthetic(2), macs=synthetic(2).sizes * 9)
    for bad in (4, None):
        with pytest.raises(ValueError, match=rf"widths={bad} must map every site to its weight width, e.g. "
                                             r"dict.fromkeys\(sensitivity.sites, 4\)"):
            s.bops(bad, 8)


def test_allocation_refuses_a_table_it_cannot_optimise():
    """A hand-made criterion (an Ω table in a Sensitivity) whose Ω is not finite or does not match its sites
    and widths is refused, naming the field: a NaN Ω stopped the search at a worse choice (Σ Ω 10 where 4 was
    within the budget), extra rows were ignored, duplicated widths made the chosen Ω ambiguous, and missing
    entries or no sites failed with an IndexError or a ZeroDivisionError."""
    sizes = np.array([16, 48, 96])
    omega = np.array([[4.0, 2.0, 1.0], [8.0, 3.0, 1.0], [2.0, 1.0, 0.5]])
    s = Sensitivity(("a", "b", "c"), sizes, (2, 3, 4), np.ones(3), np.zeros(3), omega, omega, "x")
    budget = 3 * int(sizes.sum())
    assert allocate_bits(s, budget_bits=budget).omega == 4.0
    nan = omega.copy()
    nan[1, 1] = np.nan
    cases = ((dict(omega=nan), r"the Ω of sites \['b'\] is not finite"),
             (dict(omega=np.vstack([omega, omega[:1]])), r"omega has shape \(4, 3\); 3 sites and widths \[2, 3, 4\] "
                                                         r"need \(3, 3\)"),
             (dict(omega=omega[:, :2]), r"omega has shape \(3, 2\)"),
             (dict(sizes=sizes[:2]), r"sizes has shape \(2,\)"),
             (dict(macs=sizes[:2]), r"macs has shape \(2,\)"),
             (dict(bits=(2, 2, 4)), r"widths \[2, 2, 4\]; allocate_bits needs at least one site and one or more "
                                    "distinct widths"),
             (dict(sites=(), sizes=sizes[:0], omega=omega[:0]), r"sites \[\] and widths"),
             (dict(sizes=np.array([16, 0, -4])), r"sizes of sites \['b', 'c'\] are not positive"))
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            allocate_bits(dataclasses.replace(s, **change), budget_bits=budget)


def test_a_too_small_average_is_named_with_the_average_allowed():
    s = synthetic(0)
    with pytest.raises(ValueError, match=r"average_bits=1.9 \(a budget of \d+ bits\) is below the \d+ bits of every "
                                         r"site at 2 bits; allowed: average_bits ≥ 2$"):
        allocate_bits(s, average_bits=1.9)


def test_a_nan_trace_warns_and_is_refused_by_the_allocation(sensitivity):
    """A NaN block trace compared false against two standard errors: no warning, and allocate_bits returned
    the smallest widths with Σ Ω nan."""
    loss, s = sensitivity
    traces = jax.tree.map(lambda v: v, s.spectrum.trace_per_leaf)
    traces["conv1_0"]["kernel"] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"block traces of \['conv1_0'\] \(or their standard errors\) are not "
                                            "finite"):
        nan = ls.weight_sensitivity(loss, bits=(2, 4), spectrum=dataclasses.replace(s.spectrum, trace_per_leaf=traces))
    with pytest.raises(ValueError, match=r"the Ω of sites \['conv1_0'\] is not finite"):
        allocate_bits(nan, average_bits=3.0)
