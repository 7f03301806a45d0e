"""Export of a calibrated network: integer codes on the quantizer's grid, the loss's forward
pass reproduced from them, and a pickle-free round trip."""

from __future__ import annotations

import numpy as np
import optax
import pytest

import landscape as ls
from landscape import quantizers


@pytest.mark.parametrize("options", [
    dict(w_bits=4, a_bits=4),
    dict(w_bits=3, a_bits=2, per_channel=True, bias_correction=True),
    dict(w_bits=8, a_bits=None, weight_grid="midtread", fold_bn=True),
    dict(w_bits=4, a_bits=3, fold_bn=True),
    dict(w_bits={"conv1_0": 2, "conv1_1": 8}, a_bits=5),
])
def test_export_reproduces_the_quantized_forward_pass(tiny_net, digits, options, tmp_path):
    loss = ls.ClipLoss(tiny_net, digits.calib, **options)
    alpha = np.asarray(loss.init("mse")) * np.random.default_rng(0).uniform(0.7, 1.1, loss.n).astype(np.float32)
    qnet = ls.export.quantize_network(loss, alpha)
    # The network run from the integer codes gives the loss's value at α.
    logits = qnet.apply(digits.calib.x)
    ce = float(optax.softmax_cross_entropy_with_integer_labels(logits, digits.calib.y).mean())
    assert ce == pytest.approx(float(loss(alpha)), rel=1e-5, abs=1e-6)
    assert qnet.accuracy(digits.test) == pytest.approx(loss.accuracy(alpha, digits.test), abs=1e-9)
    with pytest.raises(ValueError, match=r"labels y must be in \[0, 10\) for a model with 10 outputs"):
        qnet.accuracy((digits.test.x[:8], np.full(8, 10)))  # label 10 of a 10-way head: not a silent miss
    # To the last bit: α and the widths enter both programs as data (as constants, XLA rewrote
    # the quantizer's arithmetic and the fold_bn case below differed by 4e-6).
    x = digits.test.x[:500]
    np.testing.assert_array_equal(np.asarray(qnet.apply(x)), np.asarray(loss.logits(alpha, x)))
    slices = loss.site_slices()
    for site in loss.sites:
        s = qnet.sites[site.name]
        assert (s.kind, s.bits, s.grid) == (site.kind, loss.specs[site.name].bits, loss.specs[site.name].grid)
        if site.kind == "activation":
            assert site.name not in qnet.codes and s.alpha.tolist() == [alpha[slices[site.name]][0]]
            continue
        codes = qnet.codes[site.name]
        lo, hi = s.code_range()
        assert np.issubdtype(codes.dtype, np.integer) and codes.min() >= lo and codes.max() <= hi
        assert codes.dtype.itemsize == (1 if s.bits <= 8 else 2)  # a byte per weight up to 8 bits
        # Δ·q + offset − shift is the weight the network runs with, and it is what the quantizer
        # makes of W (an eager re-derivation may round a weight sitting on a .5 tie the other way).
        w = np.asarray(loss.variables["params"][site.name]["kernel"], np.float32)
        tol = 1e-6 * np.abs(w).max()
        np.testing.assert_allclose(qnet.dequantize(site.name), qnet.variables["params"][site.name]["kernel"],
                                   rtol=0, atol=tol)
        a = alpha[slices[site.name]]
        expect = np.asarray(quantizers.quantize(w, a if s.per_channel else a[0], s.bits, s.grid))
        if s.bias_correction:
            expect = np.asarray(quantizers.bias_correct(expect, w))
        z = (w - s.offset) / s.scale
        off = np.abs(qnet.dequantize(site.name) - expect) > tol
        assert np.all(np.abs(np.abs(z[off] - np.floor(z[off])) - 0.5) < 1e-4), "codes off the quantizer's grid"
        assert off.mean() < 1e-3
        assert np.any(s.shift != 0) == s.bias_correction
    # Saved and loaded without pickle: the same codes, table and logits.
    ls.export.save(qnet, str(tmp_path / "q"))
    back = ls.export.load(tiny_net.model, str(tmp_path / "q"))
    assert back.codes.keys() == qnet.codes.keys()
    for name, codes in qnet.codes.items():
        assert back.codes[name].dtype == codes.dtype and np.array_equal(back.codes[name], codes)
        np.testing.assert_array_equal(back.sites[name].scale, qnet.sites[name].scale)
    # Loaded weights are Δ·q + offset − shift recomputed from the codes: the same up to float rounding.
    x = digits.calib.x[:64]
    np.testing.assert_allclose(np.asarray(back.apply(x)), np.asarray(qnet.apply(x)), rtol=1e-5, atol=1e-5)
    assert "integer weight sites" in repr(back)


def test_export_errors(tiny_net, digits, tmp_path):
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    alpha = np.asarray(loss.init("max"))
    with pytest.raises(ValueError, match=rf"alpha has shape \(3,\); expected \({loss.n},\)"):
        ls.export.quantize_network(loss, alpha[:3])
    bad = alpha.copy()
    bad[2] = 0.0
    with pytest.raises(ValueError, match=r"alpha\[2\] = 0.0 is not a clipping value"):
        ls.export.quantize_network(loss, bad)
    qnet = ls.export.quantize_network(loss, alpha)
    with pytest.raises(ValueError, match="not a quantized weight site"):
        qnet.dequantize("relu0_0")
    for bad in ("", str(tmp_path) + "/", None):
        with pytest.raises(ValueError, match="must name a file"):
            ls.export.save(qnet, bad)
    ls.export.save(qnet, str(tmp_path / "q"))
    import models

    other = models.create("mlp", num_classes=10)
    with pytest.raises(ValueError, match="was saved for the model"):
        ls.export.load(other, str(tmp_path / "q"))
    # The arrays are read with allow_pickle=False: an object array in the file is refused.
    np.savez(tmp_path / "evil.npz", **{"code/x": np.array([object()], dtype=object)})
    (tmp_path / "evil.json").write_text((tmp_path / "q.json").read_text())
    with pytest.raises(ValueError, match="pickle"):
        ls.export.load(tiny_net.model, str(tmp_path / "evil"))
