"""Export of a calibrated network: integer codes on the quantizer's grid, the loss's forward
pass reproduced from them, and a pickle-free round trip."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import types

import jax
import numpy as np
import optax
import pytest

import landscape as ls
from landscape import quantizers


@pytest.mark.parametrize("options", [
    dict(w_bits=4, a_bits=4),
    dict(w_bits=3, a_bits=2, per_channel=True, bias_correction=True),
    dict(w_bits=8, a_bits=None, weight_grid="midtread", fold_bn=True),
    dict(w_bits=8, a_bits=8, weight_grid="midtread", per_channel=True, bias_correction=True),
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
    ours, theirs = np.asarray(qnet.apply(x)), np.asarray(loss.logits(alpha, x))
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(ours, theirs)
    else:  # an H200 fused the two programs differently: last-bit differences, a few across a bin
        assert np.median(np.abs(ours - theirs)) <= 1e-6 * np.abs(theirs).max()
        assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.99
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
        assert codes.dtype.itemsize == (1 if s.bits <= 8 else 2)  # a byte per weight up to 8 bits, else two
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
    ls.export.save(qnet, tmp_path / "q")  # a path object, as for save
    back = ls.export.load(tiny_net.model, tmp_path / "q")
    assert back.codes.keys() == qnet.codes.keys()
    for name, codes in qnet.codes.items():
        assert back.codes[name].dtype == codes.dtype and np.array_equal(back.codes[name], codes)
        np.testing.assert_array_equal(back.sites[name].scale, qnet.sites[name].scale)
    # The loaded network runs the very weights the loss ran: the same logits to the last bit.
    x = digits.test.x[:500]
    np.testing.assert_array_equal(np.asarray(back.apply(x)), np.asarray(loss.logits(alpha, x)))
    assert "integer weight sites" in repr(back)


def test_sixteen_bit_codes_take_two_bytes(tiny_net, digits):
    """16-bit midrise codes run 0..65535: uint16, not int32; midtread's ±32767 are int16."""
    for grid, dtype in (("midrise", np.uint16), ("midtread", np.int16)):
        loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=16, a_bits=None, weight_grid=grid)
        alpha = np.asarray(loss.init("max"))
        qnet = ls.export.quantize_network(loss, alpha)
        assert {c.dtype for c in qnet.codes.values()} == {np.dtype(dtype)}
        x = digits.test.x[:64]
        np.testing.assert_array_equal(np.asarray(qnet.apply(x)), np.asarray(loss.logits(alpha, x)))


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
    _rewrite(tmp_path / "q", tmp_path / "evil", {"code/x": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="pickle"):
        ls.export.load(tiny_net.model, str(tmp_path / "evil"))


def _rewrite(src, dst, arrays):
    """``dst``.npz with ``arrays`` and ``dst``.json: ``src``.json with the new file's SHA-256."""
    import hashlib

    np.savez(f"{dst}.npz", **arrays)
    meta = json.loads(open(f"{src}.json").read())
    meta["npz_sha256"] = hashlib.sha256(open(f"{dst}.npz", "rb").read()).hexdigest()
    open(f"{dst}.json", "w").write(json.dumps(meta))


@pytest.fixture(scope="module")
def w3_and_w4(tiny_net, digits):
    """The same network exported at W3A3 and at W4A4 (MSE α): two saves to mix up."""
    out = []
    for bits in (3, 4):
        loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=bits, a_bits=bits)
        out.append(ls.export.quantize_network(loss, np.asarray(loss.init("mse"))))
    return tuple(out)


def test_load_refuses_a_mixed_or_damaged_pair(tiny_net, w3_and_w4, tmp_path):
    """A .json and .npz from two saves (one interrupted between its files), codes off their grid,
    and kernels that are not their codes' values are errors, not a silently different network."""
    q3, q4 = w3_and_w4
    stem = str(tmp_path / "net")
    ls.export.save(q3, stem)
    json3 = open(stem + ".json").read()
    ls.export.save(q4, stem)
    open(stem + ".json", "w").write(json3)  # the W4A4 save's npz, the W3A3 save's table
    with pytest.raises(ValueError, match="net.npz is not the file .*net.json was saved with"):
        ls.export.load(tiny_net.model, stem)
    ls.export.save(q3, stem)
    with np.load(stem + ".npz") as archive:
        arrays = {k: archive[k] for k in archive.files}
    name = next(iter(q3.codes))
    bad = dict(arrays, **{f"code/{name}": arrays[f"code/{name}"] + 8})  # a 3-bit code is at most 7
    _rewrite(stem, tmp_path / "codes", bad)
    with pytest.raises(ValueError, match=rf"codes of '{name}' span \[8, .*outside \[0, 7\], the 3-bit midrise grid"):
        ls.export.load(tiny_net.model, str(tmp_path / "codes"))
    bad = dict(arrays, **{f"code/{name}": arrays[f"code/{name}"] + np.float32(0.25)})  # not integers
    _rewrite(stem, tmp_path / "floats", bad)
    with pytest.raises(ValueError, match=f"the codes of '{name}' are float32, not integers"):
        ls.export.load(tiny_net.model, str(tmp_path / "floats"))
    act = next(n for n, site in q3.sites.items() if site.kind == "activation")
    saved = json.loads(open(stem + ".json").read())["sites"]
    alpha, channels = saved[act]["alpha"][0], len(saved[name]["alpha"])
    for site, change, match in (
            (name, dict(grid="log"), "saved site: grid='log' is not allowed"),
            (name, dict(bits=1), "saved site: bits=1 is not allowed"),
            (name, dict(kind="bias"), "site kind 'bias' is neither"),
            (name, dict(scale=[1.0, 2.0], alpha=[1.0, 2.0], offset=[-1.0, -2.0], shift=[0.0, 0.0]),
             "scale=\\[1.0, 2.0\\] is not that of a 3-bit midrise grid"),
            (name, dict(scale=[2 / 7, 4 / 7], alpha=[1.0, 2.0], offset=[-1.0, -2.0], shift=[0.0, 0.0]),
             f"'{name}' has 2 scales for codes of shape"),  # one grid, but not one scale per channel
            # edits that loaded and ran another network (α × 0.5 moved 132 of 500 predictions)
            (act, dict(alpha=[alpha / 2]), rf"site '{act}': saved site: scale=.* is not that of a 3-bit unsigned grid"),
            (act, dict(alpha=[-1.0]), rf"site '{act}': saved site: alpha=\[-1.0\] must be finite and in \(0, "),
            (act, dict(bits=2), "is not that of a 2-bit unsigned grid"),
            (name, dict(offset=[0.0] * channels), "offset=.* is not that of a 3-bit midrise grid"),
            (name, dict(shift=[0.1] * channels), "shift=.* is not that of a 3-bit midrise grid")):
        for rehash in (False, True):  # an edit, and one whose author recomputed the table's hash
            meta = json.loads(open(stem + ".json").read())
            meta["sites"][site].update(change)
            if rehash:
                meta["sites_sha256"] = ls.export._table_sha256(meta["sites"])
            (tmp_path / "table.json").write_text(json.dumps(meta))
            shutil.copy(stem + ".npz", tmp_path / "table.npz")
            with pytest.raises(ValueError, match=match if rehash else "its site table is not the one saved"):
                ls.export.load(tiny_net.model, str(tmp_path / "table"))
    meta = json.loads(open(stem + ".json").read())  # a name the model has no site for (a typo, another model)
    meta["sites"]["conv9_9"] = meta["sites"].pop(act)
    meta["sites_sha256"] = ls.export._table_sha256(meta["sites"])
    (tmp_path / "table.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"table.json lists sites the model does not have \(name and kind\): "
                                         r"'conv9_9' \(activation\);"):
        ls.export.load(tiny_net.model, str(tmp_path / "table"))
    bad = {k: v for k, v in arrays.items() if k != f"kernel/{name}"}
    _rewrite(stem, tmp_path / "nokernel", bad)
    with pytest.raises(ValueError, match=f"lacks kernel/{name}, the float kernel format 3 stores"):
        ls.export.load(tiny_net.model, str(tmp_path / "nokernel"))
    bad = dict(arrays, **{f"kernel/{name}": arrays[f"kernel/{name}"] * 1.01})
    _rewrite(stem, tmp_path / "kernel", bad)
    with pytest.raises(ValueError, match=f"stored kernel of '{name}' is not"):
        ls.export.load(tiny_net.model, str(tmp_path / "kernel"))
    # A file of format 1 (no hash, no kernels) still loads, its weights from the codes.
    meta = json.loads(open(stem + ".json").read())
    meta["format"] = 1
    del meta["npz_sha256"]
    np.savez(tmp_path / "old.npz", **{k: v for k, v in arrays.items() if not k.startswith("kernel/")})
    (tmp_path / "old.json").write_text(json.dumps(meta))
    old = ls.export.load(tiny_net.model, str(tmp_path / "old"))
    np.testing.assert_allclose(old.variables["params"][name]["kernel"], q3.dequantize(name), rtol=0, atol=0)


def _lapq_result(alpha):
    """A LAPQResult holding ``alpha``, as ``lapq(loss)`` returns it (no optimisation run)."""
    lq = importlib.import_module("landscape.lapq")  # the attribute landscape.lapq is the function
    return lq.LAPQResult(alpha, 1.0, "batched", None, alpha, 1.0, 1, 0.0, [], False, "")


def test_wrong_objects_for_alpha_loss_and_network_are_named(tiny_net, digits, tmp_path):
    """A LAPQResult for α gave NumPy's "float() argument must be ... not 'LAPQResult'"; a Network
    for the loss or the quantized network an AttributeError about one of their fields."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    alpha = np.asarray(loss.init("max"))
    with pytest.raises(ValueError, match=r"alpha must be an \(n,\) array of clipping values; got a LAPQResult "
                                         r"— pass its clipping vector, res.alpha"):
        ls.export.quantize_network(loss, _lapq_result(alpha))
    with pytest.raises(ValueError, match=r"quantize_network needs a ClipLoss, got a Network; build one from the "
                                         r"trained network: ls.ClipLoss\(net, data.calib"):
        ls.export.quantize_network(tiny_net, alpha)
    qnet = ls.export.quantize_network(loss, alpha)
    with pytest.raises(ValueError, match=r"save needs a QuantizedNetwork, got a Network \(from "
                                         r"ls.export.quantize_network\(loss, alpha\)"):
        ls.export.save(tiny_net, str(tmp_path / "q"))
    with pytest.raises(ValueError, match="save needs a QuantizedNetwork, got a SimpleNamespace: pass its .network"):
        ls.export.save(types.SimpleNamespace(network=qnet), str(tmp_path / "q"))
    ls.export.save(qnet, str(tmp_path / "q"))
    with pytest.raises(ValueError, match=r"export.load needs a flax module, got a trained Network; pass its "
                                         r"module \(and variables\): net.model"):
        ls.export.load(tiny_net, str(tmp_path / "q"))
    assert not list(tmp_path.glob("q.*.*"))


def test_images_in_another_layout_are_named_by_apply(tiny_net, digits, tmp_path):
    """Flat, channel-less and NCHW images failed inside Flax, naming only kernel shapes. The
    input shape is the loss's calibration images', and a saved network keeps it."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    qnet = ls.export.quantize_network(loss, loss.init("max"))
    assert qnet.input_shape == (8, 8, 1)
    x = digits.test.x[:16]
    for bad in (x.reshape(16, -1), x[..., 0], x.transpose(0, 3, 1, 2)):
        shape = re.escape(str(bad.shape))
        with pytest.raises(ValueError, match=rf"images x have shape {shape}; this network takes "
                                             rf"\(N, 8, 8, 1\) \(NHWC\)"):
            qnet.apply(bad)
    with pytest.raises(ValueError, match=r"images x have shape \(16, 64\)"):
        qnet.accuracy((x.reshape(16, -1), digits.test.y[:16]))
    loaded = ls.export.load(tiny_net.model, ls.export.save(qnet, str(tmp_path / "q")))
    assert loaded.input_shape == (8, 8, 1)
    with pytest.raises(ValueError, match=r"images x have shape \(16, 8, 8\)"):
        loaded.apply(x[..., 0])


def test_save_and_load_take_either_file_name_for_the_stem(tiny_net, digits, tmp_path):
    """save(q, "w4.npz") wrote w4.npz.npz and w4.npz.json; load(model, "w4.json") looked for
    w4.json.json. A .json or .npz suffix now names the stem without it."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    qnet = ls.export.quantize_network(loss, loss.init("max"))
    assert ls.export.save(qnet, str(tmp_path / "w4.npz")) == str(tmp_path / "w4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4.json", "w4.npz"]
    ls.export.save(qnet, tmp_path / "w4.json")  # a pathlib.Path too: the same pair, rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4.json", "w4.npz"]
    x = digits.test.x[:8]
    for name in ("w4", "w4.json", "w4.npz"):
        loaded = ls.export.load(tiny_net.model, str(tmp_path / name))
        np.testing.assert_array_equal(np.asarray(loaded.apply(x)), np.asarray(qnet.apply(x)))
    for bad in (".npz", str(tmp_path) + "/.json"):
        with pytest.raises(ValueError, match="must name a file"):
            ls.export.save(qnet, bad)


def test_load_refuses_what_the_hashes_and_the_table_checks_leave_open(tiny_net, w3_and_w4, tmp_path):
    """Edits that kept a file loading as another network: a format-2 pair from two saves (format 2
    stores the .npz's hash too), an activation relabelled as a weight site (it then ran
    unquantized), codes for an activation site, and an input shape with a zero dimension."""
    q3, q4 = w3_and_w4
    stem = str(tmp_path / "net")
    ls.export.save(q3, stem)
    meta3 = json.loads(open(stem + ".json").read())
    # a format-2 .json (no table hash) beside the .npz of another save
    ls.export.save(q4, stem)
    old = dict(meta3, format=2)
    del old["sites_sha256"]
    open(stem + ".json", "w").write(json.dumps(old))
    with pytest.raises(ValueError, match="net.npz is not the file .*net.json was saved with"):
        ls.export.load(tiny_net.model, stem)
    ls.export.save(q3, stem)
    act = next(n for n, site in q3.sites.items() if site.kind == "activation")
    name = next(iter(q3.codes))

    def edited(change, arrays=None):
        meta = json.loads(open(stem + ".json").read())
        change(meta)
        meta["sites_sha256"] = ls.export._table_sha256(meta["sites"])  # an author who rehashed the table
        (tmp_path / "edit.json").write_text(json.dumps(meta))
        if arrays is None:
            shutil.copy(stem + ".npz", tmp_path / "edit.npz")
        else:
            _rewrite(tmp_path / "edit", tmp_path / "edit", arrays)
        return str(tmp_path / "edit")

    # the activation relabelled "weight": its unsigned grid passes the table checks, and the
    # network ran that activation unquantized
    path = edited(lambda meta: meta["sites"][act].update(kind="weight"))
    with pytest.raises(ValueError, match=rf"lists sites the model does not have \(name and kind\): '{act}' \(weight\); "
                       rf"the model's sites are \[.*'{act} \(activation\)'"):
        ls.export.load(tiny_net.model, path)
    # codes (and a matching kernel) for the activation site
    with np.load(stem + ".npz") as archive:
        arrays = {k: archive[k] for k in archive.files}
    codes = np.array([[1, 2], [3, 4]], np.uint8)
    extra = dict(arrays, **{f"code/{act}": codes,
                            f"kernel/{act}": (codes * q3.sites[act].scale[0]).astype(np.float32)})
    path = edited(lambda meta: None, extra)
    with pytest.raises(ValueError, match=rf"edit.npz has codes for '{act}', which .*edit.json lists as no weight site"):
        ls.export.load(tiny_net.model, path)
    # a zero in the input shape
    path = edited(lambda meta: meta.update(input_shape=[8, 0, 1]))
    with pytest.raises(ValueError, match=r"input_shape=\[8, 0, 1\] is not a list of positive integers"):
        ls.export.load(tiny_net.model, path)
    # the unedited table still loads (the checks above are the edits')
    back = ls.export.load(tiny_net.model, edited(lambda meta: None))
    np.testing.assert_array_equal(back.codes[name], q3.codes[name])


def test_a_saved_network_keeps_its_precision(tiny_net, digits, tmp_path):
    """The loss's matmul precision is part of the network (a GPU's TF32 products evaluate another
    network): load gives back the saved one, not "highest" whatever was saved."""
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4, precision="float32")
    qnet = ls.export.quantize_network(loss, loss.init("max"))
    assert qnet.precision == "float32"
    back = ls.export.load(tiny_net.model, ls.export.save(qnet, tmp_path / "q"))
    assert back.precision == "float32"
    meta = json.loads((tmp_path / "q.json").read_text())
    meta["precision"] = "fast"
    (tmp_path / "q.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"q.json: precision='fast'; allowed"):
        ls.export.load(tiny_net.model, tmp_path / "q")
