import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
import models
from landscape import clip_loss as clip_loss_module
from landscape.layers import QuantConv, QuantDense, QuantReLU


@pytest.fixture(scope="module")
def loss4(tiny_net, digits):
    return ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)


def test_sites_and_layout(loss4):
    names = [s.name for s in loss4.sites]
    # cnn(widths=(8, 16)): conv0_0 (first, FP32) ... fc (last, FP32); relu1_1 feeds fc (FP32).
    assert names == ["relu0_0", "conv0_1", "relu0_1", "conv1_0", "relu1_0", "conv1_1"]
    assert [s.kind for s in loss4.sites] == ["activation", "weight"] * 3
    assert loss4.sites[1].shape == (3, 3, 8, 8)
    assert loss4.n == 6 and len(loss4) == 6
    assert "n=6" in repr(loss4)


def test_loss_is_finite_positive_and_inf_for_bad_alpha(loss4):
    alpha = loss4.init("max")
    assert alpha.shape == (6,) and alpha.dtype == jnp.float32 and bool(jnp.all(alpha > 0))
    value = float(loss4(alpha))
    assert np.isfinite(value) and value > 0
    for bad in (alpha.at[2].set(0.0), alpha.at[0].set(-1.0), alpha.at[1].set(jnp.nan),
                alpha.at[3].set(jnp.inf)):
        assert float(loss4(bad)) == np.inf
    pair = np.asarray(loss4.batch(jnp.stack([alpha, -alpha])))
    assert pair[0] == pytest.approx(value, rel=1e-5) and pair[1] == np.inf


def test_a_valid_alpha_that_overflows_the_network_gives_inf_not_nan(loss4):
    """α within (0, ALPHA_MAX] at a weight site puts levels of ~1e37 into the network; the next
    layers overflow to inf − inf. The loss was NaN there, and np.argmin of a batch picked it."""
    alpha = np.asarray(loss4.init("max"))
    weights = [i for i, site in enumerate(loss4.sites) if site.kind == "weight"]
    values = []
    for i in weights:
        for huge in (1e36, 1e37, 1e38):
            big = np.where(np.arange(loss4.n) == i, np.float32(huge), alpha)
            value, batch = float(loss4(big)), np.asarray(loss4.batch(np.stack([alpha, big])))
            assert not np.isnan(value) and not np.isnan(batch).any(), (loss4.sites[i].name, huge)
            assert batch[1] == pytest.approx(value, rel=1e-5) or batch[1] == value == np.inf
            assert int(np.argmin(batch)) == 0
            values.append(value)
    assert np.inf in values  # some of these overflow (NaN before)


@pytest.fixture
def fresh_programs():
    """No compiled ClipLoss programs shared from earlier tests."""
    clip_loss_module._PROGRAMS.clear()


def test_one_compilation_per_clip_loss(tiny_net, digits, fresh_programs):
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=3)
    alpha = loss.init("max")
    for scale in np.linspace(0.5, 1.5, 7):
        loss(alpha * scale)
    loss(np.asarray(alpha))
    loss.batch(jnp.stack([alpha] * 5))
    loss.batch(jnp.stack([alpha] * 3))
    # On CPU a single α runs as one row of the batch program: one program serves both.
    expected = {"batch": 1} if jax.default_backend() == "cpu" else {"call": 1, "batch": 1}
    assert {k: v for k, v in loss.compilations.items() if k in ("call", "batch")} == expected
    if jax.default_backend() == "cpu":
        assert float(loss(alpha)) == float(loss.batch(np.stack([alpha * 0.5, alpha]))[1])


def test_losses_of_the_same_sites_share_their_programs(tiny_net, digits, fresh_programs):
    """Another bit width or calibration sample of the same sites runs the programs compiled for
    the first loss (widths, weights and data are arguments), and still computes its own values."""
    first = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=3)
    alpha = first.init("max")
    value = float(first(alpha))
    first.grad(alpha), first.batch(np.asarray(alpha)[None])
    other_calib = (digits.train.x[:len(digits.calib.x)], digits.train.y[:len(digits.calib.x)])
    second = ls.ClipLoss(tiny_net, other_calib, w_bits={"conv0_1": 5, "conv1_0": 2, "conv1_1": 6}, a_bits=2)
    beta = second.init("max")
    got = (float(second(beta)), np.asarray(second.grad(beta)), np.asarray(second.batch(np.stack([beta, alpha]))))
    assert second.compilations == {}, "the second loss traced programs of its own"
    assert got[0] != value and not np.allclose(beta, alpha)
    # The same loss built with nothing shared: the same numbers, from programs of its own.
    clip_loss_module._PROGRAMS.clear()
    alone = ls.ClipLoss(tiny_net, other_calib, w_bits={"conv0_1": 5, "conv1_0": 2, "conv1_1": 6}, a_bits=2)
    np.testing.assert_array_equal(alone.init("max"), beta)
    assert float(alone(beta)) == got[0]
    np.testing.assert_array_equal(alone.grad(beta), got[1])
    np.testing.assert_array_equal(alone.batch(np.stack([beta, alpha])), got[2])
    single = {} if jax.default_backend() == "cpu" else {"call": 1}  # on CPU a call is a batch row
    assert alone.compilations == {"init:max": 1, "grad": 1, "batch": 1, **single}
    # Other sites (first and last layers quantized too) are other programs.
    wider = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=3, quantize_first_last=True)
    wider(wider.init("max"))
    assert wider.compilations == {"init:max": 1, **(single or {"batch": 1})}


def test_bias_correction_on_and_off_share_their_programs(tiny_net, digits, fresh_programs):
    """Bias correction is a switch passed as data: turning it on (as ``lapq`` does) reuses every
    program, and still corrects (the same numbers as a corrected loss compiled on its own)."""
    plain = ls.ClipLoss(tiny_net, digits.calib, w_bits=2, a_bits=3)
    alpha = plain.init("max")
    off = (float(plain(alpha)), np.asarray(plain.grad(alpha)))
    corrected = plain.with_options(bias_correction=True)
    beta = corrected.init("max")
    on = (float(corrected(alpha)), np.asarray(corrected.grad(alpha)), float(corrected(beta)))
    assert corrected.compilations == {}, "bias correction traced programs of its own"
    assert on[0] != off[0] and not np.array_equal(on[1], off[1])
    assert not np.array_equal(beta, alpha)  # upstream weights are corrected during calibration
    clip_loss_module._PROGRAMS.clear()
    alone = ls.ClipLoss(tiny_net, digits.calib, w_bits=2, a_bits=3, bias_correction=True)
    np.testing.assert_array_equal(alone.init("max"), beta)
    assert (float(alone(alpha)), float(alone(beta))) == (on[0], on[2])
    np.testing.assert_array_equal(alone.grad(alpha), on[1])
    # The plain loss again, now sharing the corrected loss's programs: its own numbers.
    again = alone.with_options(bias_correction=False)
    assert (float(again(alpha)), again.compilations) == (off[0], {})


def test_no_xla_program_per_input_shape_or_type(loss4, count_compilations):
    """Optimizers evaluate batches of every size K and α of any dtype: after warm-up none of
    that may compile anything (each XLA:CPU executable costs memory mappings, and a long run
    would exhaust the process's limit)."""
    alpha = np.asarray(loss4.init("max"))
    alpha_jax = jnp.asarray(alpha)  # (jnp.asarray itself compiles a tiny program: not ours)
    loss4(alpha), loss4.batch(alpha[None]), loss4.grad(alpha)  # warm-up: the real programs
    with count_compilations() as events:
        for k in (2, 3, 5, 7, 33):
            loss4.batch(np.repeat(alpha[None].astype(np.float64), k, axis=0))
        loss4(alpha.astype(np.float64)), loss4(alpha_jax), loss4.grad(list(alpha))
    assert not events, events


def test_batch_equals_individual_calls(loss4):
    rng = np.random.default_rng(0)
    base = np.asarray(loss4.init("mse"))
    alphas = base * rng.uniform(0.5, 1.5, size=(5, loss4.n)).astype(np.float32)
    batched = np.asarray(loss4.batch(alphas))
    single = np.array([float(loss4(a)) for a in alphas])
    # vmapped convolutions may sum in another order: an element at a rounding boundary can
    # flip one level, so agreement is to ~1e-4, not bitwise.
    np.testing.assert_allclose(batched, single, rtol=1e-4)


def test_loss_matches_manual_quantized_forward(tiny_net, digits):
    """Quantizing by hand (weights and ReLU outputs) gives the same cross-entropy."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=None, a_bits=2, sites=["relu0_0"])
    a = 1.3
    params = tiny_net.variables

    x = jnp.asarray(digits.calib.x)
    with ls.sites.quantizing({"relu0_0": ls.sites.SiteSpec(2, "unsigned")}, {"relu0_0": jnp.float32(a)}):
        ref_logits = tiny_net.model.apply(params, x)
    ce = -jnp.mean(jax.nn.log_softmax(ref_logits)[jnp.arange(len(x)), digits.calib.y])
    assert float(loss(jnp.array([a]))) == pytest.approx(float(ce), rel=1e-5)
    assert loss.n == 1 and loss.sites[0].kind == "activation"


def test_fp32_sites_reproduce_fp32_loss(tiny_net, digits):
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=16, a_bits=16)
    logits = tiny_net.apply(digits.calib.x)
    ce = -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(len(digits.calib)), digits.calib.y])
    assert float(loss(loss.init("max"))) == pytest.approx(float(ce), rel=1e-3, abs=1e-5)


def test_grad_and_hessian_are_ste_derivatives(loss4):
    alpha = loss4.init("mse")
    g = np.asarray(loss4.grad(alpha))
    assert g.shape == (6,) and np.all(np.isfinite(g))
    # ClipLoss composes with JAX transformations (hessian_spectrum relies on it).
    np.testing.assert_allclose(g, np.asarray(jax.grad(loss4)(alpha)), rtol=1e-3, atol=1e-6)
    h = np.asarray(loss4.hessian(alpha))
    assert h.shape == (6, 6)
    np.testing.assert_allclose(h, h.T, rtol=1e-3, atol=1e-5)
    # Symmetry alone holds by construction (h + hᵀ was symmetric too, at twice the curvature):
    # the values are the Hessian's. Each column is the HVP with that basis vector, and the whole
    # matrix is JAX's forward-over-reverse Hessian of the same loss.
    scale = np.abs(h).max()
    assert scale > 1e-3  # a point with curvature, so a factor of 2 shows
    eye = np.eye(loss4.n, dtype=np.float32)
    columns = np.stack([np.asarray(loss4.hvp(alpha, eye[i])) for i in range(loss4.n)], axis=1)
    np.testing.assert_allclose(h, columns, rtol=1e-3, atol=1e-4 * scale)
    # and symmetrised exactly, (C + Cᵀ)/2 of those columns (unsymmetrised they differ in the last bits)
    assert not np.array_equal(columns, columns.T)
    np.testing.assert_array_equal(h, 0.5 * (columns + columns.T))
    reference = np.asarray(jax.hessian(loss4.alpha_loss())(alpha))
    np.testing.assert_allclose(h, reference, rtol=1e-3, atol=1e-4 * scale)


def test_init_rules_and_stats_modes(loss4):
    rules = {"max": {}, "percentile": {"q": 99.9}, "mse": {}, "lp": {"p": 3.0}, "aciq": {}, "kl": {}}
    values = {}
    for rule, kw in rules.items():
        alpha = np.asarray(loss4.init(rule, **kw))
        assert alpha.shape == (loss4.n,) and np.all(alpha > 0) and np.all(np.isfinite(alpha))
        values[rule] = alpha
    assert np.all(values["percentile"] <= values["max"] + 1e-6)
    assert np.all(values["mse"] <= values["max"] + 1e-6)
    # Weight sites do not depend on the statistics mode; activations downstream of a
    # quantized site may.
    fp32 = np.asarray(loss4.init("max", stats="fp32"))
    weights = [i for i, s in enumerate(loss4.sites) if s.kind == "weight"]
    np.testing.assert_allclose(fp32[weights], values["max"][weights])
    # FP32 statistics are those of the float network: activation α do not depend on the weight
    # width (they did: the weights were quantized upstream even in this mode).
    by_width = {}
    for w_bits in (2, None):
        other = loss4.with_options(w_bits=w_bits)
        alpha, slices = np.asarray(other.init("max", stats="fp32")), other.site_slices()
        by_width[w_bits] = {s.name: alpha[slices[s.name]] for s in other.sites if s.kind == "activation"}
    assert by_width[2].keys() == by_width[None].keys() and len(by_width[2]) > 1
    for name, alpha in by_width[None].items():
        np.testing.assert_array_equal(by_width[2][name], alpha, err_msg=name)
    quantized = np.asarray(loss4.with_options(w_bits=2).init("max"))
    assert not np.allclose(quantized[[i for i, s in enumerate(loss4.sites) if s.kind == "activation"]],
                           np.concatenate(list(by_width[None].values())))
    with pytest.raises(ValueError, match="stats='x'"):
        loss4.init("max", stats="x")
    with pytest.raises(ValueError, match="unknown calibration rule"):
        loss4.init("median")


def test_init_stats_size_takes_calibration_images_spread_over_the_set(tiny_net, digits, loss4):
    """init(stats_size=k) takes its activation statistics from k calibration images spread over the
    set (every 4th here; the first k are the lowest training rows, of the first classes where the
    training split is stored by class): the α of a loss built on those k images alone, and not the
    α of all 256 (an ignored stats_size calibrated on every image)."""
    x, y = digits.calib.x, digits.calib.y
    assert len(x) == 256
    rows = ls.data.spread_rows(256, 64)
    np.testing.assert_array_equal(rows, np.arange(0, 256, 4))
    spread = ls.ClipLoss(tiny_net, (x[rows], y[rows]), w_bits=4, a_bits=4)
    got = np.asarray(loss4.init("max", stats_size=64))
    np.testing.assert_array_equal(got, np.asarray(spread.init("max")))
    first = ls.ClipLoss(tiny_net, (x[:64], y[:64]), w_bits=4, a_bits=4)
    assert not np.array_equal(got, np.asarray(first.init("max")))
    full = np.asarray(loss4.init("max"))  # stats_size=512 > 256: every image
    np.testing.assert_array_equal(full, np.asarray(loss4.init("max", stats_size=256)))
    assert not np.array_equal(got, full)  # so the first comparison can tell them apart
    activations = [i for i, s in enumerate(loss4.sites) if s.kind == "activation"]
    assert not np.array_equal(got[activations], full[activations])


def test_per_channel_max_init_is_each_output_channels_max_abs_weight(tiny_net, digits):
    """init("max") of a per-channel weight site: max |W| over each output channel (the kernel's
    last axis, HWIO). Reshaping the kernel to (C, −1) without moving that axis first grouped
    consecutive entries of the flattened kernel instead, mixing the channels."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=None, per_channel=True)
    alpha, slices = np.asarray(loss.init("max")), loss.site_slices()
    assert [s.kind for s in loss.sites] == ["weight"] * 3 and loss.n == 8 + 16 + 16
    for site in loss.sites:
        kernel = np.asarray(tiny_net.variables["params"][site.name]["kernel"])
        assert kernel.shape == site.shape and kernel.ndim == 4
        expected = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)
        assert len(np.unique(expected)) == kernel.shape[-1]  # the channels' maxima differ
        np.testing.assert_allclose(alpha[slices[site.name]], expected, rtol=1e-6, err_msg=site.name)


def test_accuracy_and_monotone_damage(tiny_net, digits):
    fp = tiny_net.accuracy(digits.test)
    l8 = ls.ClipLoss(tiny_net, digits.calib, w_bits=8, a_bits=8)
    l2 = ls.ClipLoss(tiny_net, digits.calib, w_bits=2, a_bits=2)
    acc8 = l8.accuracy(l8.init("max"), digits.test)
    acc2 = l2.accuracy(l2.init("max"), digits.test)
    assert abs(acc8 - fp) < 0.02
    assert acc2 < acc8
    assert float(l2(l2.init("max"))) > float(l8(l8.init("max")))


def test_per_channel_bias_correction_and_fold(tiny_net, digits):
    pc = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=None, per_channel=True)
    assert pc.n == 8 + 16 + 16  # conv0_1, conv1_0, conv1_1 output channels
    assert np.isfinite(float(pc(pc.init("max"))))
    bc = ls.ClipLoss(tiny_net, digits.calib, w_bits=2, a_bits=None, bias_correction=True)
    plain = bc.with_options(bias_correction=False)
    alpha = bc.init("max")
    assert float(bc(alpha)) != float(plain(alpha))
    folded = ls.ClipLoss(tiny_net, digits.calib, w_bits=16, a_bits=None, fold_bn=True)
    fp = ls.ClipLoss(tiny_net, digits.calib, w_bits=16, a_bits=None)
    assert float(folded(folded.init("max"))) == pytest.approx(float(fp(fp.init("max"))), rel=1e-3)
    # the weight-space loss of a folded loss takes its folded params; the network's own params
    # before the folded BNs are another network
    alpha = folded.init("max")
    f = folded.weight_loss(alpha)
    assert float(f(folded.params)) == float(folded(alpha))
    assert folded.params is folded.variables["params"]
    assert abs(float(f(tiny_net.variables["params"])) - float(folded(alpha))) > 0.1 * float(folded(alpha))


def test_per_site_bit_widths(tiny_net, digits, loss4):
    """A mapping names each site's bits: the same widths as an int give the same loss, changing
    one site's width changes it, and unnamed sites stay FP32."""
    uniform = {s.name: 4 for s in loss4.sites if s.kind == "weight"}
    acts = {s.name: 4 for s in loss4.sites if s.kind == "activation"}
    mixed = ls.ClipLoss(tiny_net, digits.calib, w_bits=uniform, a_bits=acts)
    alpha = loss4.init("max")
    assert float(mixed(alpha)) == pytest.approx(float(loss4(alpha)), rel=1e-6)
    assert mixed.bits == loss4.bits and set(loss4.bits.values()) == {4}
    assert repr(mixed) == repr(loss4)

    two = ls.ClipLoss(tiny_net, digits.calib, w_bits={**uniform, "conv1_0": 2}, a_bits=acts)
    assert two.bits["conv1_0"] == 2 and two.bits["conv0_1"] == 4
    assert "weight @ 2–4b mixed" in repr(two)
    assert float(two(alpha)) != pytest.approx(float(loss4(alpha)), rel=1e-3)

    only = ls.ClipLoss(tiny_net, digits.calib, w_bits={"conv1_1": 3}, a_bits=None)
    assert [s.name for s in only.sites] == ["conv1_1"] and only.bits == {"conv1_1": 3}
    manual = ls.ClipLoss(tiny_net, digits.calib, w_bits=3, a_bits=None, sites=["conv1_1"])
    a = manual.init("mse")
    assert float(only(a)) == pytest.approx(float(manual(a)), rel=1e-6)
    # options keep the mapping (a copy, in site-name order), and with_options goes through it
    assert only.options["w_bits"] == {"conv1_1": 3}
    assert only.with_options(w_bits={"conv1_1": 2}).bits == {"conv1_1": 2}


@pytest.mark.parametrize("kw,match", [
    ({"w_bits": {"relu0_0": 4}, "a_bits": 4}, r"w_bits names \['relu0_0'\], which are not quantizable weight"),
    ({"w_bits": {"conv0_0": 4}, "a_bits": None}, r"quantize_first_last=True"),
    ({"w_bits": 4, "a_bits": {"relu0_1": 1}}, r"site 'relu0_1': bits=1"),
    ({"w_bits": {3: 4}, "a_bits": None}, r"keyed by site name"),
])
def test_bad_per_site_bits(tiny_net, digits, kw, match):
    with pytest.raises(ValueError, match=match):
        ls.ClipLoss(tiny_net, digits.calib, **kw)


@pytest.mark.parametrize("kw,match", [
    ({"w_bits": 1, "a_bits": 4}, r"w_bits: bits=1 is not allowed; use an integer in \[2, 16\]"),
    ({"w_bits": 4, "a_bits": 20}, r"a_bits: bits=20 is not allowed"),
    # checked even where no site of its kind is quantized (stored as given before)
    ({"w_bits": 1, "a_bits": 4, "sites": ["relu0_0"]}, r"w_bits: bits=1 is not allowed"),
    ({"w_bits": "four", "a_bits": 4, "sites": ["relu0_0"]}, r"w_bits: bits='four' is not allowed"),
    ({"w_bits": 4, "a_bits": 4, "sites": ["nope"]}, "unknown sites"),
    ({"w_bits": 4, "a_bits": 4, "weight_grid": "log"}, "grid='log'"),
    ({"w_bits": 4, "a_bits": 4, "weight_grid": "unsigned"},  # accepted once: negative weights became 0
     r"weight_grid='unsigned' is not allowed; use one of \('midrise', 'midtread'\)"),
    ({"w_bits": 4, "a_bits": 4, "chunk": 0}, "chunk=0"),
    ({"w_bits": 4, "a_bits": 4, "chunk": 2.7}, "chunk=2.7 must be a positive integer"),
    ({"w_bits": 4, "a_bits": 4, "batch_size": 0}, "batch_size=0 must be a positive integer"),
    ({"w_bits": 4, "a_bits": 4, "precision": "fp64"}, "precision='fp64'; allowed: 'highest'"),
    ({"w_bits": 4, "a_bits": 4, "per_channel": "no"}, "per_channel='no' must be True or False"),
    ({"w_bits": 4, "a_bits": 4, "bias_correction": "False"}, "bias_correction='False' must be True or False"),
    ({"w_bits": 4, "a_bits": 4, "quantize_first_last": 1}, "quantize_first_last=1 must be True or False"),
])
def test_bad_construction(tiny_net, digits, kw, match):
    with pytest.raises(ValueError, match=match):
        ls.ClipLoss(tiny_net, digits.calib, **kw)


def test_bit_widths_are_stored_as_python_ints(tiny_net, digits):
    """np.int64(4) was stored as given, and json.dumps(loss.options) (compare_methods' store) failed."""
    import json

    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=np.int64(4), a_bits=np.int32(4))
    assert type(loss.options["w_bits"]) is int and type(loss.options["a_bits"]) is int
    assert json.loads(json.dumps(loss.options))["w_bits"] == 4


def test_bad_alpha_shape(loss4):
    with pytest.raises(ValueError, match=r"shape \(3,\).*n = 6"):
        loss4(jnp.ones(3))
    with pytest.raises(ValueError, match=r"^v has shape \(3,\)"):  # it said "alpha"
        loss4.hvp(loss4.init("max"), np.ones(3))
    for bad in (np.ones(6) + 1j, np.ones(6, bool)):  # complex dropped its imaginary part, bool became 1.0
        with pytest.raises(ValueError, match=f"alpha must be real numbers; got dtype {bad.dtype}"):
            loss4(bad)
    with pytest.raises(ValueError, match=r"\(K, n\)"):
        loss4.batch(jnp.ones(6))


def test_derivatives_and_predictions_need_a_positive_finite_alpha(loss4, digits):
    """The loss is +inf at α ≤ 0 (for optimizers); a gradient, Hessian, logits, accuracy or
    weight loss there would be silently meaningless (zeros, chance accuracy), so they refuse."""
    alpha = np.asarray(loss4.init("max"))
    for bad, shown in ((np.where(np.arange(6) == 2, 0.0, alpha), r"alpha\[2\] = 0\.0 \(site 'relu0_1'\)"),
                       (np.full(6, np.nan), r"alpha\[0\] = nan \(site 'relu0_0'\), 6 such entries")):
        calls = (loss4.grad, loss4.hessian, lambda a: loss4.hvp(a, alpha), lambda a: loss4.logits(a, digits.test.x[:4]),
                 lambda a: loss4.accuracy(a, digits.test), loss4.weight_loss, loss4.weight_loss_batches)
        for call in calls:
            with pytest.raises(ValueError, match=r"alpha must be in \(0, 1e\+38\] here; " + shown):
                call(bad)
    assert float(loss4(np.full(6, np.nan))) == np.inf  # the loss itself still answers
    # A finite α beyond ALPHA_MAX: the midrise grid's 2α overflowed float32 and the loss was NaN.
    weight = [i for i, site in enumerate(loss4.sites) if site.kind == "weight"][0]
    for huge in (2e38, 3e38):
        big = np.where(np.arange(6) == weight, np.float32(huge), alpha)
        assert float(loss4(big)) == np.inf and np.all(np.asarray(loss4.batch(big[None])) == np.inf)
        with pytest.raises(ValueError, match=rf"alpha\[{weight}\] = [0-9.e+]+ \(site '{loss4.sites[weight].name}'\)"):
            loss4.grad(big)
    np.testing.assert_array_equal(np.asarray(loss4.hvp(alpha, -alpha)), -np.asarray(loss4.hvp(alpha, alpha)))


def test_labels_outside_the_logits_and_bad_sizes_are_named(tiny_net, digits, loss4):
    x, y = digits.calib.x, digits.calib.y
    for labels in (y + 10, y - 20):
        with pytest.raises(ValueError, match=r"calib: labels y must be in \[0, 10\) for a model with 10 outputs"):
            ls.ClipLoss(tiny_net, (x, labels), w_bits=4, a_bits=4)
    alpha = loss4.init("max")
    outside = r"split: labels y must be in \[0, 10\) for a model with 10 outputs; got labels from 10 to 19"
    with pytest.raises(ValueError, match=outside):
        loss4.accuracy(alpha, (digits.test.x, digits.test.y + 10))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"batch_size={bad!r} must be a positive integer"):
            loss4.accuracy(alpha, digits.test, batch_size=bad)
        with pytest.raises(ValueError, match=f"stats_size={bad!r} must be a positive integer"):
            loss4.init("max", stats_size=bad)


def test_user_model_from_quantizable_layers(digits):
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = QuantConv(4, name="c1")(x)
            x = QuantReLU(name="r1")(x)
            x = QuantConv(4, name="c2")(x)
            x = QuantReLU(name="r2")(x)
            x = QuantDense(10, name="head")(x.reshape(x.shape[0], -1))
            return x

    net = ls.train.fit(Tiny(), digits, epochs=1)
    loss = ls.ClipLoss(net, digits.calib, w_bits=4, a_bits=4)
    assert [s.name for s in loss.sites] == ["r1", "c2"]
    assert np.isfinite(float(loss(loss.init("lp", p=2.5))))


def _sharded_measure(net, data):
    """What the sharded test compares, computed on the devices of this process."""
    loss = ls.ClipLoss(net, data.calib, w_bits=3, a_bits=3)
    a = loss.init("max")
    out = dict(devices=len(jax.devices()), loss=float(loss(a)),
               batch=np.asarray(loss.batch(np.stack([a, a * 1.1]))).tolist(), grad=np.asarray(loss.grad(a)).tolist(),
               alpha=np.asarray(a).tolist(), mse=np.asarray(loss.init("mse")).tolist())
    f, batches = loss.weight_loss_batches(a, batch_size=24)  # 24, 24, 18: the last does not split over 4
    out["weight_batches"] = sum(len(b["y"]) / loss.n_calib * float(f(loss.variables["params"], b)) for b in batches)
    out["weight_full"] = float(loss.weight_loss(a)(loss.variables["params"]))
    out["shards"] = [len(b["x"].addressable_shards[0].data) for b in batches]  # rows per device
    return out


# Run in a child process with four virtual CPU devices, after the source of _sharded_measure.
_SHARDED_MAIN = textwrap.dedent("""
    import json, sys
    import models
    data = ls.data.load("digits", calib_size=66, seed=0)
    net = ls.train.load_network(models.create("cnn", num_classes=10, widths=(4, 8)), sys.argv[1])
    print("RESULT" + json.dumps(_sharded_measure(net, data)))
""")


def test_sharded_calibration_matches_single_device(tmp_path):
    """One network and calibration set on this process's single CPU device and, in a child
    process, on four virtual devices (each calibration batch split over them). 66 images: on four devices one
    batch of 68, two of them padding, which must not enter the mean. Off CPU, the single device is
    a second CPU child: an H200's float32 moved the STE gradients by up to 80 % against the CPU's."""
    data = ls.data.load("digits", calib_size=66, seed=0)
    # No training needed to compare devices: a seeded initialisation, written for the child.
    model = models.create("cnn", num_classes=10, widths=(4, 8))
    variables = jax.device_get(model.init(jax.random.PRNGKey(0), data.calib.x[:1]))
    net = ls.train.Network(model=model, variables=variables, config={}, history=[])
    path = ls.train.save_network(net, str(tmp_path / "net"))
    script = "import jax\nimport numpy as np\nimport landscape as ls\n\n" + inspect.getsource(_sharded_measure) \
        + _SHARDED_MAIN

    def child(devices):
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        return subprocess.Popen([sys.executable, "-c", script, path], env=dict(os.environ, JAX_PLATFORMS="cpu",
                                XLA_FLAGS=flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(process):
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-2000:]
        return json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])

    children = [child(4)] if jax.default_backend() == "cpu" else [child(4), child(1)]
    one = _sharded_measure(net, data) if len(children) == 1 else result(children[1])  # meanwhile, here
    four = result(children[0])
    assert one["devices"] == 1 and four["devices"] == 4
    np.testing.assert_allclose(four["alpha"], one["alpha"], rtol=1e-6)
    # A 1-D search over a sharded mean: same minimum up to the reduction order.
    np.testing.assert_allclose(four["mse"], one["mse"], rtol=1e-3)
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-5)
    np.testing.assert_allclose(four["batch"], one["batch"], rtol=1e-5)
    np.testing.assert_allclose(four["grad"], one["grad"], rtol=1e-4, atol=1e-6)
    assert one["shards"] == [24, 24, 18] and four["shards"] == [6, 6, 18]  # 18 rows: on every device
    for run in (one, four):
        assert run["weight_batches"] == pytest.approx(run["weight_full"], rel=1e-5)
    assert four["weight_batches"] == pytest.approx(one["weight_batches"], rel=1e-5)


def _product_precisions(jaxpr):
    """The precision of every dot_general / convolution in a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _product_precisions(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _product_precisions(sub)
    return found


def test_products_run_at_the_requested_precision(tiny_net, digits):
    """True float32 by default: on GPUs the backend default is TF32, which moves values across
    quantization boundaries (see the module docstring)."""
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    params = tiny_net.variables["params"]
    for precision in ("highest", "default"):
        loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, precision=precision)
        alpha = loss.init("max")
        programs = [(loss, alpha), (loss.batch, jnp.stack([alpha, alpha])), (loss.grad, alpha),
                    (loss.weight_loss(alpha), params), (loss.weight_loss(), params)]
        for fn, x in programs:
            found = _product_precisions(jax.make_jaxpr(fn)(x).jaxpr)
            assert len(found) >= 3  # the network's convolutions and its dense layer
            if precision == "highest":
                assert all(p == highest for p in found), (fn, set(found))
            else:
                assert not any(p == highest for p in found), (fn, set(found))
        assert loss.with_options(w_bits=2).precision == precision


def test_weight_losses_of_every_alpha_and_bit_width_share_their_programs(tiny_net, digits, count_compilations):
    """weight_loss binds α, the widths and the calibration set as data (a jax.tree_util.Partial):
    its value is the ClipLoss's to the last bit, and a Hessian spectrum at another α and bit
    width compiles no XLA program, with the eigenvalue of a loss compiled on its own."""
    params = tiny_net.variables["params"]
    loss4 = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    loss2 = ls.ClipLoss(tiny_net, digits.calib, w_bits=2, a_bits=2)
    a4, a2 = loss4.init("max"), loss2.init("max")
    f4 = loss4.weight_loss(a4)
    assert float(f4(params)) == float(loss4(a4))
    kw = dict(top_k=1, trace=False, method="lanczos", tol=1e-5)
    first = ls.hessian_spectrum(f4, params, **kw)
    f2 = loss2.weight_loss(a2)
    assert float(loss2(a2)) > float(loss4(a4))  # (the ClipLoss programs, compiled before listening)
    with count_compilations() as compiled:
        value = float(f2(params))
        second = ls.hessian_spectrum(f2, params, **kw)
    assert not compiled, compiled
    assert value == float(loss2(a2))
    assert second.eigenvalues[0] != pytest.approx(first.eigenvalues[0], rel=1e-3)
    alone = ls.hessian_spectrum(lambda p: loss2.weight_loss(a2)(p), params, **kw)  # a closure: its own programs
    np.testing.assert_allclose(second.eigenvalues, alone.eigenvalues, rtol=1e-4)


def test_weight_loss_batches_are_the_weight_loss_one_batch_at_a_time(tiny_net, digits):
    """Batches of 100, 100 and 56 (padding only inside ClipLoss): weighted by n_b / N they give
    weight_loss's value and gradient (FP32 and quantized) and its top Hessian eigenvalue."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, batch_size=100)
    params = loss.variables["params"]
    for alpha in (None, loss.init("max")):
        full = loss.weight_loss(alpha)
        f, batches = loss.weight_loss_batches(alpha)
        sizes = [len(b["y"]) for b in batches]
        assert sizes == [100, 100, 56]
        np.testing.assert_array_equal(np.concatenate([np.asarray(b["y"]) for b in batches]), digits.calib.y)

        def mean(p, f=f, batches=batches, sizes=sizes):
            return sum(n / sum(sizes) * f(p, b) for n, b in zip(sizes, batches, strict=True))

        (v, g), (w, h) = (jax.jit(jax.value_and_grad(fn))(params) for fn in (mean, full))
        assert float(v) == pytest.approx(float(w), rel=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(h), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The last (quantized) pair: the Hessian spectrum over the batches.
    one = ls.hessian_spectrum(full, params, top_k=1, trace=False, method="lanczos", tol=1e-5)
    many = ls.hessian_spectrum(f, params, top_k=1, trace=False, method="lanczos", tol=1e-5, batches=batches)
    assert many.info["batches"] == 3
    np.testing.assert_allclose(many.eigenvalues, one.eigenvalues, rtol=1e-4)
    f, batches = loss.weight_loss_batches(batch_size=1000)
    assert len(batches) == 1 and len(batches[0]["y"]) == 256
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"batch_size={bad!r} must be a positive integer"):
            loss.weight_loss_batches(batch_size=bad)


class _ReluTwice(nn.Module):
    """One QuantReLU module applied twice (one site, one α); its second input is 10× smaller."""

    @nn.compact
    def __call__(self, x, train=False):
        relu = QuantReLU(name="relu")
        x = relu(QuantDense(16, name="fc0")(x.reshape(x.shape[0], -1)))
        x = relu(0.1 * QuantDense(16, name="fc1")(x))
        return QuantDense(10, name="fc2")(x)


def test_a_site_applied_twice_is_calibrated_on_both_applications(digits):
    model = _ReluTwice()
    variables = model.init(jax.random.key(0), digits.calib.x[:1])
    net = ls.train.Network(model, variables, config={}, history=[])
    loss = ls.ClipLoss(net, digits.calib, w_bits=None, a_bits=8, sites=["relu"])
    assert [s.name for s in loss.sites] == ["relu"]
    p = variables["params"]
    first = np.maximum(digits.calib.x.reshape(len(digits.calib.x), -1) @ np.asarray(p["fc0"]["kernel"])
                       + np.asarray(p["fc0"]["bias"]), 0.0)
    # max over both applications: the first's (the second's inputs are ~10× smaller); the last
    # application's statistics alone gave 0.197 here, clipping the first application 18-fold.
    assert float(loss.init("max")[0]) == pytest.approx(float(first.max()), rel=1e-5)
    assert float(loss.init("percentile")[0]) > 0.5 * float(first.max())


def test_a_trained_network_is_needed_not_its_module(tiny_net, digits):
    """ClipLoss(net.model, ...) failed with "'CNN' object has no attribute 'model'"."""
    with pytest.raises(ValueError, match=r"ClipLoss needs a trained network \(a landscape.train.Network, e.g. net = "
                                         r"ls.train.fit\(model, data\)\), got the flax module CNN: pass net, not "
                                         r"net.model"):
        ls.ClipLoss(tiny_net.model, digits.calib, w_bits=4, a_bits=4)
    with pytest.raises(ValueError, match=r"ClipLoss needs a trained network .* got a str"):
        ls.ClipLoss("cnn", digits.calib, w_bits=4, a_bits=4)


def test_a_single_site_name_is_one_site(tiny_net, digits):
    """sites="conv0_1" was read as its characters: "unknown sites ['c', 'o', 'n', ...]"."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, sites="conv0_1")
    assert [s.name for s in loss.sites] == ["conv0_1"] and loss.options["sites"] == ("conv0_1",)
    assert [s.name for s in loss.with_options(w_bits=3).sites] == ["conv0_1"]
    with pytest.raises(ValueError, match=r"unknown sites \['conv9'\]"):
        ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, sites="conv9")


def test_images_in_another_layout_are_named(tiny_net, digits, loss4):
    """Flat, channel-less and NCHW images failed inside Flax with a ScopeParamShapeError naming
    only kernel shapes. fit records the images' shape on the network; the loss checks its
    calibration images against it, and the images of logits / accuracy against its own."""
    x, y = digits.calib.x, digits.calib.y
    assert tiny_net.input_shape == (8, 8, 1) and loss4.input_shape == (8, 8, 1)
    for bad in (x.reshape(len(x), -1), x[..., 0], x.transpose(0, 3, 1, 2)):
        with pytest.raises(ValueError, match=re.escape(f"calib images have shape {bad.shape}; this network takes "
                                                       "(N, 8, 8, 1) (NHWC)")):
            ls.ClipLoss(tiny_net, (bad, y), w_bits=4, a_bits=4)
    alpha = loss4.init("max")
    with pytest.raises(ValueError, match=re.escape("images x have shape (4, 64); this network takes (N, 8, 8, 1)")):
        loss4.logits(alpha, x[:4].reshape(4, -1))
    with pytest.raises(ValueError, match=re.escape("split images have shape (4, 1, 8, 8); this network takes")):
        loss4.accuracy(alpha, (x[:4].transpose(0, 3, 1, 2), y[:4]))
    # A network that does not record its shape (a checkpoint saved before it was): Flax's error,
    # with the images' shape named.
    unrecorded = dataclasses.replace(tiny_net, input_shape=None)
    with pytest.raises(ValueError, match=re.escape(f"calib images have shape {x[..., 0].shape}, which the "
                                                   "network's variables do not fit")):
        ls.ClipLoss(unrecorded, (x[..., 0], y), w_bits=4, a_bits=4)


def test_non_finite_calibration_images_are_refused(tiny_net, digits):
    """A NaN image made init("max") NaN and L(α) = +inf for every α (lapq then blamed its sweep)."""
    x = digits.calib.x.copy()
    x[3, 0, 0, 0] = np.nan
    x[7, 2, 1, 0] = -np.inf
    with pytest.raises(ValueError, match=re.escape(f"calib images must be finite: 2 of {len(x)} hold NaN or inf "
                                                   "(images 3, 7; 2 values in all), the first at x[3, 0, 0, 0]")):
        ls.ClipLoss(tiny_net, (x, digits.calib.y), w_bits=4, a_bits=4)


def _kernel(net, layer: str) -> np.ndarray:
    """A writable copy of ``layer``'s kernel in ``net``."""
    return np.array(flax.traverse_util.flatten_dict(net.variables["params"], sep="/")[layer + "/kernel"])


def _with_kernel(net, layer: str, kernel):
    """``net`` with ``layer``'s kernel replaced by ``kernel``."""
    params = {**flax.traverse_util.flatten_dict(net.variables["params"], sep="/"), layer + "/kernel": kernel}
    return dataclasses.replace(net, variables={**net.variables,
                                               "params": flax.traverse_util.unflatten_dict(params, sep="/")})


def test_a_non_finite_alpha_from_init_is_named(tiny_net, digits):
    """Finite images, but a weight that overflowed to inf: init("max") returned inf α for that
    layer (and the sites downstream), silently; now the sites are named."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    weight = next(s for s in loss.sites if s.kind == "weight")
    kernel = _kernel(tiny_net, weight.name)
    kernel.flat[0] = np.inf
    broken = ls.ClipLoss(_with_kernel(tiny_net, weight.name, kernel), digits.calib, w_bits=4, a_bits=4)
    with pytest.raises(ValueError, match=rf"init\('max'\): the α of sites \['{weight.name}'.*\] is not finite"):
        broken.init("max")
    assert np.all(np.isfinite(np.asarray(loss.init("max"))))


def test_a_result_for_alpha_is_named(loss4):
    """loss(res) for a LAPQResult res gave NumPy's "float() argument must be ... not 'LAPQResult'"."""
    alpha = np.asarray(loss4.init("max"))
    res = importlib.import_module("landscape.lapq").LAPQResult(alpha, 1.0, "batched", None, alpha, 1.0, 1, 0.0, [],
                                                                 False, "")
    for call in (loss4, loss4.grad, lambda a: loss4.logits(a, np.zeros((1, 8, 8, 1), np.float32))):
        with pytest.raises(ValueError, match=r"alpha must be an \(n,\) array of clipping values; got a LAPQResult "
                                             r"— pass its clipping vector, res.alpha"):
            call(res)


class _FlaxOnly(nn.Module):
    """flax.linen layers only: no quantization site."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10)(nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1)))))


class _TwoLayer(nn.Module):
    """Quantizable, but every site is the first or last layer's."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = QuantReLU(name="r1")(QuantDense(16, name="d1")(x.reshape((x.shape[0], -1))))
        return QuantDense(10, name="head")(x)


class _NoTrain(nn.Module):
    @nn.compact
    def __call__(self, x):
        return QuantDense(10, name="head")(x.reshape((x.shape[0], -1)))


class _TupleOut(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = QuantReLU(name="r1")(QuantDense(16, name="d1")(x.reshape((x.shape[0], -1))))
        h = QuantReLU(name="r2")(QuantDense(16, name="d2")(h))
        return QuantDense(10, name="head")(h), h


class _FlaxBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = QuantReLU(name="r1")(QuantConv(4, name="c1")(x))
        x = nn.BatchNorm(use_running_average=not train, name="bn")(QuantConv(4, name="c2")(x))
        x = QuantReLU(name="r2")(x)
        return QuantDense(10, name="head")(x.mean(axis=(1, 2)))


def _untrained(model, digits, **init_kw):
    variables = model.init(jax.random.key(0), digits.calib.x[:2], **init_kw)
    return ls.train.Network(model, variables, {}, [])


def test_a_loss_that_quantizes_nothing_says_why(digits):
    """Bit widths given and no site chosen: an empty loss had passed silently, and lapq then
    asked for bit widths that had been given."""
    with pytest.raises(ValueError, match=r"ClipLoss\(w_bits=4, a_bits=4\) quantizes no site of this _FlaxOnly: it "
                                         r"has no weight or activation sites\. Build its layers from landscape"):
        ls.ClipLoss(_untrained(_FlaxOnly(), digits), digits.calib, w_bits=4, a_bits=4)
    two = _untrained(_TwoLayer(), digits)
    with pytest.raises(ValueError, match=r"its only weight sites \['d1', 'head'\] are the first and last layers.*"
                                         r"quantize_first_last=True"):
        ls.ClipLoss(two, digits.calib, w_bits=4, a_bits=None)
    with pytest.raises(ValueError, match=r"its only weight and activation sites \['d1', 'r1', 'head'\]"):
        ls.ClipLoss(two, digits.calib, w_bits=4, a_bits=4)
    # asked for, the same sites quantize; and an FP32 loss (no widths) stays allowed
    assert ls.ClipLoss(two, digits.calib, w_bits=4, a_bits=4, quantize_first_last=True).n == 3
    assert ls.ClipLoss(two, digits.calib, w_bits=None, a_bits=None).n == 0


def test_models_outside_the_call_contract_are_named(digits):
    with pytest.raises(ValueError, match=r"_NoTrain.__call__\(self, x\) takes no train argument.*"
                                         r"__call__\(self, x, train: bool = False\)"):
        ls.ClipLoss(_untrained(_NoTrain(), digits), digits.calib, w_bits=4, a_bits=4)
    with pytest.raises(ValueError, match=r"fit: _NoTrain.__call__\(self, x\) takes no train argument"):
        ls.train.fit(_NoTrain(), digits, epochs=1)
    with pytest.raises(ValueError, match=r"_TupleOut must return \(N, classes\) logits, got a tuple"):
        ls.ClipLoss(_untrained(_TupleOut(), digits), digits.calib, w_bits=4, a_bits=4)
    with pytest.raises(ValueError, match=r"fit: _TupleOut must return \(N, classes\) logits, got a tuple"):
        ls.train.fit(_TupleOut(), digits, epochs=1, cache=False)


def test_fold_bn_warns_when_a_batchnorm_does_not_fold(digits):
    """flax.linen.BatchNorm is not a site the tracer sees: fold_bn folded nothing, silently."""
    net = _untrained(_FlaxBatchNorm(), digits)
    with pytest.warns(RuntimeWarning, match=r"_FlaxBatchNorm has BatchNorm statistics but no BatchNorm applied "
                                            r"directly to a QuantConv's output, so nothing is folded"):
        folded = ls.ClipLoss(net, digits.calib, w_bits=4, a_bits=4, fold_bn=True)
    np.testing.assert_array_equal(folded.params["c2"]["kernel"], net.variables["params"]["c2"]["kernel"])


def test_batch_spans_several_chunks(tiny_net, digits, loss4):
    """K = 5 rows in chunks of 2 (2 + 2 + 1 real rows, one padding row): each row's own loss, in order
    (every chunk had been given the first chunk's rows, or its last row was dropped)."""
    rng = np.random.default_rng(3)
    alphas = np.asarray(loss4.init("max")) * rng.uniform(0.3, 1.2, size=(5, loss4.n)).astype(np.float32)
    want = np.array([float(loss4(a)) for a in alphas])
    assert len(np.unique(want)) == 5
    small = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, chunk=2)
    assert small.chunk == 2
    np.testing.assert_allclose(np.asarray(small.batch(alphas)), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(small.batch(alphas[:4])), want[:4], rtol=1e-5)


def test_padded_calibration_batches_do_not_enter_the_mean(tiny_net, digits, loss4):
    """256 images in batches of 100 hold 44 padding images (zeros, label 0): the loss is still the mean
    over the 256 real images, the value of one batch of all of them."""
    alpha = loss4.init("max")
    batched = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, batch_size=100)
    assert batched.batch_size == 100 and batched.n_calib == 256
    assert float(batched(alpha)) == pytest.approx(float(loss4(alpha)), rel=1e-5)


def test_default_batch_size_is_every_image_up_to_1024(tiny_net, digits):
    """The documented default: all calibration images in one pass when there are at most 1024, else 512;
    a batch_size above the number of images is one batch of them all."""
    x, y = digits.train.x, digits.train.y
    for n, want in ((1024, 1024), (1025, 512), (40, 40)):
        assert ls.ClipLoss(tiny_net, (x[:n], y[:n]), w_bits=4, a_bits=4).batch_size == want, n
    assert ls.ClipLoss(tiny_net, (x[:40], y[:40]), w_bits=4, a_bits=4, batch_size=1000).batch_size == 40


def test_init_remembers_each_statistics_mode_apart(tiny_net, digits):
    """init("max") then init("max", stats="fp32") on one loss: the second is the FP32-statistics α (a
    fresh loss's), not the first call's remembered quantized-statistics α."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=2, a_bits=4)
    quantized = np.asarray(loss.init("max"))
    fp32 = np.asarray(loss.init("max", stats="fp32"))
    fresh = np.asarray(loss.with_options().init("max", stats="fp32"))
    np.testing.assert_array_equal(fp32, fresh)
    assert not np.array_equal(fp32, quantized)
    np.testing.assert_array_equal(np.asarray(loss.init("max")), quantized)


def test_accuracy_counts_a_partial_last_batch(tiny_net, digits, loss4):
    """359 test images in batches of 50: seven full batches and 9 images in a padded last one; the
    accuracy is the fraction of argmax-correct logits over all 359."""
    alpha = loss4.init("max")
    x, y = digits.test.x, digits.test.y
    assert len(x) % 50 != 0
    want = float(np.mean(np.argmax(np.asarray(loss4.logits(alpha, x)), axis=-1) == y))
    assert loss4.accuracy(alpha, digits.test, batch_size=50) == pytest.approx(want, abs=1e-12)
    # a different answer on the last batch alone shows: the first 350 images scored on their own
    head = float(np.mean(np.argmax(np.asarray(loss4.logits(alpha, x[:350])), axis=-1) == y[:350]))
    assert head != want


def test_shared_programs_drop_the_least_recently_used(tiny_net, digits):
    """Beyond 8 shared program sets the least recently used goes: a layout used again stays, and the
    oldest untouched one is the one dropped."""
    clip_loss_module._PROGRAMS.clear()
    names = [s.name for s in ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, quantize_first_last=True).sites]
    clip_loss_module._PROGRAMS.clear()
    assert len(names) >= 9

    def build(name):
        return ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, sites=[name])

    first = build(names[0])
    second = build(names[1])
    for name in names[2:8]:
        build(name)
    assert len(clip_loss_module._PROGRAMS) == 8
    assert build(names[0])._programs is first._programs  # shared, and now the most recently used
    build(names[8])  # a ninth layout: one set goes
    assert len(clip_loss_module._PROGRAMS) == 8
    assert build(names[0])._programs is first._programs
    assert build(names[1])._programs is not second._programs  # the least recently used was dropped


def test_with_options_takes_another_calibration_set_and_names_unknown_options(tiny_net, digits, loss4):
    """with_options(calib=...) is the loss on those images (a fresh loss's size, images and values) with every
    other option kept (dropping calib would keep the old images, silently); an unknown option
    is named, not passed on to the constructor as a TypeError."""
    x, y = digits.calib.x[:64], digits.calib.y[:64]
    alpha = loss4.init("max")
    other = loss4.with_options(calib=(x, y), w_bits=3)
    fresh = ls.ClipLoss(tiny_net, (x, y), w_bits=3, a_bits=4)
    assert other.n_calib == 64 and other.options == fresh.options
    np.testing.assert_array_equal(other.calib.x, x)
    assert float(other(alpha)) == float(fresh(alpha))
    assert float(other(alpha)) != pytest.approx(float(loss4.with_options(w_bits=3)(alpha)), rel=1e-4)
    with pytest.raises(ValueError, match=r"unknown ClipLoss options \['a_bit', 'calib_size'\]; allowed: \['a_bits', "):
        loss4.with_options(a_bit=3, calib_size=64)


def test_midtread_weight_grid_is_the_loss_of_the_kernel_rounded_by_hand(tiny_net, digits):
    """weight_grid="midtread" at 2 bits: L(α) is the FP32 loss of the network whose kernel is rounded by hand
    to the levels {−α, 0, α}; the midrise grid ({±α/3, ±α}) gives another value."""
    site = "conv1_0"
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=2, a_bits=None, sites=[site], weight_grid="midtread")
    assert loss.specs[site].grid == "midtread"
    params = flax.traverse_util.flatten_dict(loss.params, sep="/")
    kernel = np.asarray(params[site + "/kernel"])
    a = np.float32(0.5 * np.abs(kernel).max())
    hand = np.round(np.clip(kernel / a, -1.0, 1.0)).astype(np.float32) * a
    assert set(np.unique(hand)) == {-a, 0.0, a}
    params[site + "/kernel"] = hand
    want = float(loss.weight_loss()(flax.traverse_util.unflatten_dict(params, sep="/")))
    assert float(loss(np.array([a]))) == pytest.approx(want, rel=1e-5)
    assert float(loss.with_options(weight_grid="midrise")(np.array([a]))) != pytest.approx(want, rel=1e-3)


def test_sites_are_quantized_in_network_order_whatever_the_order_given(tiny_net, digits, loss4):
    """sites=[...] in any order: α follows the network's order (as the sites property says), and each entry is
    its site's (weight α depend on the weights alone, the first activation site on the FP32 stem alone)."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, sites=["conv1_1", "relu0_0", "conv0_1"])
    assert [s.name for s in loss.sites] == ["relu0_0", "conv0_1", "conv1_1"]
    assert loss.site_slices() == {"relu0_0": slice(0, 1), "conv0_1": slice(1, 2), "conv1_1": slice(2, 3)}
    full = np.asarray(loss4.init("max"))
    np.testing.assert_array_equal(np.asarray(loss.init("max")), full[[0, 1, 5]])


def test_init_remembers_each_rule_option_apart_and_traces_p_once(tiny_net, digits, fresh_programs):
    """init("lp", p=2) then p=3 on one loss: two α (not the first call's, remembered for both), each
    a fresh loss's, from one traced program (p is data, not a constant of the program)."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=None, a_bits=4, sites=["relu0_1", "relu1_0"])
    two, three = np.asarray(loss.init("lp", p=2.0)), np.asarray(loss.init("lp", p=3.0))
    assert not np.array_equal(two, three)
    assert loss.compilations == {"init:lp": 1}
    np.testing.assert_array_equal(np.asarray(loss.with_options().init("lp", p=3.0)), three)


def test_accuracy_pads_a_partial_last_batch_into_the_same_program(tiny_net, digits, fresh_programs):
    """359 images in batches of 50: the last 9 are padded to 50, so one predict program serves every batch
    (an unpadded last batch would trace a second one)."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    loss.accuracy(loss.init("max"), digits.test, batch_size=50)
    assert len(digits.test.x) % 50 == 9 and loss.compilations["predict"] == 1


def test_the_site_list_of_a_loss_is_its_own(tiny_net, digits):
    """sites_of remembers each network's sites: a loss hands out a copy, so changing one loss's list does not
    change the next loss's."""
    first = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    names = [s.name for s in first.all_sites]
    first.all_sites.clear()
    assert [s.name for s in ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4).all_sites] == names


def test_repr_and_options_describe_the_loss(tiny_net, digits, loss4):
    """repr names the model, the sites per kind with their widths and the calibration size; a bit-width mapping
    is stored in site-name order, whatever the order given (options is a stable description)."""
    assert repr(loss4) == (f"ClipLoss(CNN, n=6 (3 weight @ 4b, 3 activation @ 4b), calib=256, "
                           f"devices={len(jax.devices())})")
    fp32 = ls.ClipLoss(tiny_net, (digits.calib.x[:40], digits.calib.y[:40]), w_bits=None, a_bits=None)
    assert "n=0 (all FP32), calib=40," in repr(fp32)
    mixed = ls.ClipLoss(tiny_net, digits.calib, w_bits={"conv1_1": 3, "conv0_1": 2}, a_bits=None)
    assert list(mixed.options["w_bits"]) == ["conv0_1", "conv1_1"]
    assert json.dumps(mixed.options) == json.dumps(mixed.with_options(w_bits={"conv0_1": 2, "conv1_1": 3}).options)


def test_a_batch_of_no_rows_is_no_losses(loss4):
    """K = 0 (an optimizer's empty batch): an empty (0,) float32 array, not NumPy's "need at least one array to
    concatenate"."""
    out = loss4.batch(np.zeros((0, loss4.n), np.float32))
    assert out.shape == (0,) and out.dtype == jnp.float32


def test_the_gradient_at_an_invalid_alpha_is_zero_not_nan(loss4):
    """Inside a transformation α is not refused: at α with a NaN or negative entry the loss is +inf and its
    gradient 0 (the forward pass runs at a placeholder α), not NaN, which would poison a line search or an
    optimizer state."""
    alpha = np.asarray(loss4.init("max"))
    for bad in (np.full(6, np.nan, np.float32), np.where(np.arange(6) == 3, np.nan, alpha).astype(np.float32),
                np.where(np.arange(6) == 1, -alpha, alpha).astype(np.float32)):
        assert float(loss4(bad)) == np.inf
        np.testing.assert_array_equal(np.asarray(jax.grad(loss4)(bad)), np.zeros(6, np.float32))


def test_one_non_finite_channel_of_a_per_channel_alpha_is_named(tiny_net, digits):
    """Per-channel weight α: one inf weight makes one channel's α inf and the others finite; the site is named
    all the same (every entry must be finite, not just one)."""
    kernel = _kernel(tiny_net, "conv1_0")
    kernel[..., 5] = 0.0
    kernel[0, 0, 0, 5] = np.inf
    broken = ls.ClipLoss(_with_kernel(tiny_net, "conv1_0", kernel), digits.calib, w_bits=4, a_bits=None,
                         per_channel=True, sites=["conv1_0"])
    with pytest.raises(ValueError, match=r"init\('max'\): the α of sites \['conv1_0'\] is not finite"):
        broken.init("max")


_FORWARDS: list = []


class _CountingForwards(nn.Module):
    """A small quantizable MLP that counts its forward passes as they run (a host callback in compiled code)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        jax.debug.callback(lambda: _FORWARDS.append(1))
        h = QuantReLU(name="r1")(QuantDense(16, name="d1")(x.reshape((x.shape[0], -1))))
        h = QuantReLU(name="r2")(QuantDense(16, name="d2")(h))
        return QuantDense(10, name="head")(h)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the compiled loop over the real rows is the CPU path")
def test_a_batch_of_k_rows_runs_k_forward_passes_on_cpu(digits):
    """On CPU a chunk of 32 rows runs only its real rows (the module docstring: "a batch of K costs K evaluations
    whatever the padding"), and loss(α), one row of that program, one forward pass per calibration batch: 2 here."""
    loss = ls.ClipLoss(_untrained(_CountingForwards(), digits), digits.calib, w_bits=4, a_bits=4, batch_size=128,
                       quantize_first_last=True)
    alpha = np.asarray(loss.init("max"))
    assert loss.chunk == 32 and loss.n == 5
    for run, rows, passes in ((lambda: loss(alpha), 1, 2), (lambda: loss.batch(np.stack([alpha] * 3)), 3, 6),
                              (lambda: loss.batch(np.stack([alpha] * 33)), 33, 66)):
        jax.effects_barrier()
        _FORWARDS.clear()
        out = np.asarray(run())
        jax.effects_barrier()
        assert len(_FORWARDS) == passes, (rows, len(_FORWARDS))
        assert out.size == rows and np.all(out == out.flat[0])


def test_batch_inside_a_transformation_is_k_losses(loss4):
    """loss.batch under jit (a traced (K, n)): the K losses, not the K rows padded to the chunk's 32."""
    alpha = np.asarray(loss4.init("max"))
    alphas = np.stack([alpha, 0.5 * alpha, -alpha])
    got = np.asarray(jax.jit(loss4.batch)(alphas))
    assert got.shape == (3,) and got[2] == np.inf
    np.testing.assert_allclose(got, np.asarray(loss4.batch(alphas)), rtol=1e-6)


def test_alpha_loss_weights_out_the_padding_of_the_last_batch(tiny_net, digits):
    """256 images in batches of 100 (44 padding images): the pure function alpha_loss() is the loss itself, the
    mean over the real images (the padding is weighted out there too)."""
    batched = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, batch_size=100)
    alpha = batched.init("max")
    assert float(batched.alpha_loss()(alpha)) == pytest.approx(float(batched(alpha)), rel=1e-6)


def test_chosen_sites_without_a_width_of_their_kind_are_named(tiny_net, digits):
    """sites=[...] holding only weight sites with a_bits alone given (or no site at all): no α to choose, which
    had given an empty loss silently. Widths None for both kinds stay an FP32 loss of those sites."""
    with pytest.raises(ValueError, match=r"ClipLoss\(a_bits=4, sites=\['conv0_1'\]\) quantizes no site: the "
                                         r"sites chosen are \{'conv0_1': 'weight'\}, and their kinds have no bit "
                                         r"width; give it \(w_bits= for weight sites"):
        ls.ClipLoss(tiny_net, digits.calib, w_bits=None, a_bits=4, sites=["conv0_1"])
    with pytest.raises(ValueError, match=r"ClipLoss\(w_bits=4, a_bits=4, sites=\[\]\) quantizes no site"):
        ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, sites=[])
    assert ls.ClipLoss(tiny_net, digits.calib, w_bits=None, a_bits=None, sites=["conv0_1"]).n == 0
    assert ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=None, sites=["conv0_1", "relu0_1"]).n == 1
