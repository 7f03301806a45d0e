"""Every program the post-training tools compile runs its products at the precision asked for.

On CPU "highest" and "default" give the same numbers, so the tests read the compiled programs
instead: JAX writes each program it compiles (StableHLO) to ``jax_dump_ir_to``, and every
convolution and dot_general there carries its precision. On a GPU, "default" means TF32 products
(10-bit mantissa): with it, cross-layer equalization rejected every pair of resnet20 on an H200.
"""

from __future__ import annotations

import contextlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
from landscape import adaprune, equalization, export, layerwise
from landscape.adaround import adaround

PRODUCT = re.compile(r"stablehlo\.(convolution|dot_general)\b")


@contextlib.contextmanager
def compiled_products(folder):
    """Yields a list, filled on exit with one (program name, at HIGHEST precision) pair per
    convolution / dot_general compiled inside the block."""
    found: list[tuple[str, bool]] = []
    before = jax.config.read("jax_dump_ir_to")
    jax.config.update("jax_dump_ir_to", str(folder))
    try:
        yield found
    finally:
        jax.config.update("jax_dump_ir_to", before)
    for file in sorted(folder.glob("*.mlir")):
        found += [(file.name, "HIGHEST" in line) for line in file.read_text().splitlines() if PRODUCT.search(line)]


def highest(products) -> list[bool]:
    return [h for _, h in products]


def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME")


def test_the_reader_tells_highest_from_default(tmp_path):
    x, k = jnp.ones((1, 2, 5, 5)), jnp.ones((3, 2, 3, 3))
    # explicitly: off CPU the suite's own default is "highest" (conftest)
    with compiled_products(tmp_path / "default") as default, jax.default_matmul_precision("default"):
        jax.jit(lambda a, b: conv(a, b) + 1.0)(x, k)
    with compiled_products(tmp_path / "highest") as high, jax.default_matmul_precision("highest"):
        jax.jit(lambda a, b: conv(a, b) + 2.0)(x, k)
    assert highest(default) == [False]
    assert highest(high) == [True]


def test_equalization_checks_pairs_in_true_float32(tiny_net, digits, tmp_path):
    x = digits.calib.x[:16]
    with compiled_products(tmp_path / "highest") as products:
        eq = equalization.cross_layer_equalization(tiny_net.model, tiny_net.variables, x)
    assert eq.pairs and products and all(highest(products))
    with compiled_products(tmp_path / "default") as products:
        equalization.cross_layer_equalization(tiny_net.model, tiny_net.variables, x, precision="default")
    assert products and not any(highest(products))
    with pytest.raises(ValueError, match="precision='tf32'.*allowed"):
        equalization.cross_layer_equalization(tiny_net.model, tiny_net.variables, x, precision="tf32")


def test_adaround_and_its_network_run_at_the_loss_precision(tiny_net, digits, tmp_path):
    calib = ls.data.Split(digits.calib.x[:64], digits.calib.y[:64])
    loss = ls.ClipLoss(tiny_net, calib, w_bits=3, a_bits=4)
    alpha = loss.init("mse")
    with compiled_products(tmp_path / "highest") as products:
        result = adaround(loss, alpha, num_images=16, iterations=20)
        result.network.apply(digits.test.x[:8])
    assert result.network.precision == result.nearest.precision == "highest"
    assert len(products) > 10 and all(highest(products))

    fast = ls.ClipLoss(tiny_net, calib, w_bits=3, a_bits=4, precision="default")
    with compiled_products(tmp_path / "default") as products:
        result = adaround(fast, alpha, num_images=16, iterations=20)
    assert result.network.precision == "default"
    # all but the Gram products G·W of the rounding loop ("_optimize"), which are HIGHEST by design
    assert {name for name, h in products if h} and all("jit__optimize" in name for name, h in products if h)
    assert not any(h for name, h in products if "jit__optimize" not in name)
    with pytest.raises(ValueError, match="loss's precision"):
        adaround(loss, alpha, precision="highest")


def test_saved_network_keeps_its_precision(tiny_net, digits, tmp_path):
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=None, precision="float32")
    qnet = export.quantize_network(loss, loss.init("max"))
    path = export.save(qnet, str(tmp_path / "net"))
    assert export.load(tiny_net.model, path).precision == "float32"
    # files written before the precision was stored load at the default
    meta = json.loads((tmp_path / "net.json").read_text())
    del meta["precision"]
    (tmp_path / "net.json").write_text(json.dumps(meta))
    old = export.load(tiny_net.model, path)
    assert old.precision == "highest"
    np.testing.assert_allclose(np.asarray(old.apply(digits.test.x[:8])),  # codes · Δ: float rounding
                               np.asarray(qnet.apply(digits.test.x[:8])), rtol=1e-5, atol=1e-5)
    meta["precision"] = "fastest"
    (tmp_path / "net.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="precision='fastest'"):
        export.load(tiny_net.model, path)


def test_adaprune_records_and_fits_in_true_float32(tiny_net, digits, tmp_path):
    x = digits.calib.x[:32]
    with compiled_products(tmp_path) as products:
        res = adaprune.adaprune(tiny_net, x, keep=2, block=4, iterations=5)
    assert res.network.config["adaprune"]["precision"] == "highest"
    assert products and all(highest(products))
    with pytest.raises(ValueError, match="record_layers: precision='low'"):
        layerwise.record_layers(tiny_net.model, tiny_net.variables, x, ["conv0"], precision="low")


def test_gptq_runs_at_the_loss_precision(tiny_net, digits, tmp_path):
    calib = ls.data.Split(digits.calib.x[:64], digits.calib.y[:64])
    for precision in ("highest", "default"):
        loss = ls.ClipLoss(tiny_net, calib, w_bits=3, a_bits=4, precision=precision)
        with compiled_products(tmp_path / precision) as products:
            result = ls.gptq(loss, loss.init("mse"), num_images=16)
        assert result.network.precision == precision
        assert products and all(h == (precision == "highest") for h in highest(products))
