"""Benchmark: where a resnet20 Hessian-vector product spends its time on the CPU, per convolution kind.

Why it exists: ``bench/hessian.py`` (a) compares our Lanczos with PyHessian's power iteration. Ours
needs a third of the HVPs, but each of our HVPs costs more than PyHessian's on the CPU. This script
finds which convolutions make the difference.

A forward-over-reverse HVP through a convolution y = conv(x, w) evaluates three kinds of product,
each twice for a 3×3 layer (once for each tangent):

* forward: conv(x, w), NHWC × HWIO;
* input gradient: the transposed convolution of an output cotangent with w;
* filter gradient: Σ over (n, h, w) of the input window times the output cotangent. Its output is
  only 3×3×C×C', but it contracts over N·H·W (131,072 at 128 images of 32×32).

The script times each kind, jitted, for every convolution shape of resnet20 on ``--n`` images. It
does the same with PyTorch's oneDNN kernels (``torch.nn.grad.conv2d_input`` and ``conv2d_weight``,
``--threads`` threads; what PyHessian runs), when torch is installed. For the filter gradient it
also times two rewrites of XLA's convolution as matrix products:

* "shifted": 9 matrix products, one per kernel tap: (x shifted)ᵀ · g;
* "im2col": the 9 shifts side by side, then one matrix product.

It then counts each kind in the linearized HVP of resnet20 (from its jaxpr) and adds up the time
that HVP spends in every convolution kind, for XLA and for oneDNN.

    python bench/conv_backward.py [--n 128] [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when the package is not installed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

import landscape  # noqa: E402,F401  (the XLA:CPU guard flag, before JAX starts its backend)
import models  # noqa: E402

DIMENSIONS = ("NHWC", "HWIO", "NHWC")
KINDS = ("forward", "input gradient", "filter gradient")


def median_ms(fn, *args, repeats: int) -> float:
    """Median wall milliseconds of ``fn(*args)`` over ``repeats`` calls, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def conv_shapes(n: int) -> collections.Counter:
    """Every convolution of resnet20's linearized HVP on n images of 32×32×3, by (kind, shape).

    A shape is (H, C, C', kernel size, stride) of the layer, H its input height. The kind of each
    ``conv_general_dilated`` follows from its operands: a filter gradient contracts two activations
    (the kernel operand has the batch size as its leading dimension), an input gradient has
    lhs_dilation > 1 or a kernel whose spec reads (in, out) swapped."""
    model = models.create("resnet20", num_classes=10)
    x = jnp.zeros((n, 32, 32, 3), jnp.float32)
    labels = jnp.zeros((n,), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    flat, unravel = jax.flatten_util.ravel_pytree(variables["params"])

    def loss(u):
        logits = model.apply({**variables, "params": unravel(u)}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    _, tangent = jax.linearize(jax.grad(loss), flat)
    census: collections.Counter = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                census[_classify(eqn)] += 1
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jax.make_jaxpr(tangent)(flat).jaxpr)
    return census


def _classify(eqn):
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    out = eqn.outvars[0].aval.shape
    spec = eqn.params["dimension_numbers"]
    if rhs[spec.rhs_spec[1]] == lhs[spec.lhs_spec[1]] and len(out) == 4 and out[0] != lhs[0]:
        # rhs carries the batch as its input-feature dimension: the filter gradient, output HWIO
        kernel = out[0]
        return "filter gradient", (lhs[1], lhs[3], out[3], kernel, round(lhs[1] / rhs[1]))
    if any(d > 1 for d in eqn.params["lhs_dilation"]) or spec.rhs_spec[:2] == (2, 3):
        stride = eqn.params["lhs_dilation"][0]
        kernel = rhs[0]
        return "input gradient", (out[1], out[3], lhs[3], kernel, stride)
    stride = eqn.params["window_strides"][0]
    return "forward", (lhs[1], lhs[3], out[3], rhs[0], stride)


def jax_programs(n, h, c, c_out, k, s):
    """Jitted XLA programs of each kind for one layer shape, with their arguments."""
    pad = ((k // 2, k // 2), (k // 2, k // 2))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (n, h, h, c))
    w = 0.1 * jax.random.normal(keys[1], (k, k, c, c_out))

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=DIMENSIONS)

    g = jax.random.normal(keys[2], jax.eval_shape(conv, x, w).shape)
    h_out = g.shape[1]

    def taps(x):
        xp = jnp.pad(x, ((0, 0), *pad, (0, 0)))
        return [xp[:, i:i + s * (h_out - 1) + 1:s, j:j + s * (h_out - 1) + 1:s, :]
                for i in range(k) for j in range(k)]

    def shifted(x, g):
        rows = g.reshape(-1, c_out)
        return jnp.stack([t.reshape(-1, c).T @ rows for t in taps(x)]).reshape(k, k, c, c_out)

    def im2col(x, g):
        patches = jnp.concatenate(taps(x), axis=-1).reshape(-1, k * k * c)
        return (patches.T @ g.reshape(-1, c_out)).reshape(k, k, c, c_out)

    return {
        "forward": (jax.jit(conv), (x, w)),
        "input gradient": (jax.jit(lambda w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]), (w, g)),
        "filter gradient": (jax.jit(lambda x, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]), (x, g)),
        "filter gradient, shifted": (jax.jit(shifted), (x, g)),
        "filter gradient, im2col": (jax.jit(im2col), (x, g)),
    }


def torch_programs(torch, n, h, c, c_out, k, s):
    """oneDNN (PyTorch) callables of each kind for one layer shape (NCHW, as PyHessian's models)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, h, generator=gen)
    w = 0.1 * torch.randn(c_out, c, k, k, generator=gen)
    p = k // 2
    g = torch.randn(torch.nn.functional.conv2d(x, w, stride=s, padding=p).shape, generator=gen)
    return {
        "forward": lambda: torch.nn.functional.conv2d(x, w, stride=s, padding=p),
        "input gradient": lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride=s, padding=p),
        "filter gradient": lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, stride=s, padding=p),
    }


def torch_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128, help="images per batch (default 128)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per program (median)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="PyTorch intra-op threads (default: the cores this process may use)")
    args = parser.parse_args(argv)
    for name in ("n", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} must be a positive integer")
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None

    print(f"Convolution kinds of a resnet20 HVP: {args.n} images 32x32x3, float32, median of {args.repeats} calls")
    print(f"  jax {jax.__version__} on {jax.default_backend()} ({platform.processor() or platform.machine()}); "
          f"CPU cores {len(os.sched_getaffinity(0))}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"  torch {torch.__version__} ({args.threads} threads, oneDNN)" if torch else "  torch: not installed")
    census = conv_shapes(args.n)
    layers = sorted({shape for _, shape in census})
    print("\n  per layer shape (H, C -> C', kernel, stride): milliseconds per call; count = calls per HVP")
    totals = collections.Counter()
    for shape in layers:
        h, c, c_out, k, s = shape
        ours = jax_programs(args.n, *shape)
        theirs = torch_programs(torch, args.n, *shape) if torch else {}
        reference = ours["filter gradient"][0](*ours["filter gradient"][1])
        for name, (fn, call_args) in ours.items():
            kind = name.split(",")[0]
            count = census[(kind, shape)]
            if count == 0:
                continue
            ms = median_ms(fn, *call_args, repeats=args.repeats)
            line = f"  {h:3d}x{h:<3d} {c:3d} -> {c_out:3d} {k}x{k} s{s}  {name:26s} count {count:2d}  XLA {ms:7.2f} ms"
            if name == kind:
                totals[("XLA", kind)] += count * ms
                if kind in theirs:
                    t_ms = torch_ms(theirs[kind], args.repeats)
                    totals[("oneDNN", kind)] += count * t_ms
                    line += f"  oneDNN {t_ms:7.2f} ms  XLA/oneDNN {ms / t_ms:5.2f}x"
            else:
                error = float(jnp.max(jnp.abs(fn(*call_args) - reference)) / jnp.max(jnp.abs(reference)))
                totals[("XLA", name)] += count * ms
                line += f"  (max relative difference from XLA's {error:.1e})"
            print(line, flush=True)
    print("\n  one HVP's convolutions, summed over layers (count x milliseconds):")
    for kind in KINDS:
        xla = totals[("XLA", kind)]
        line = f"    {kind:16s} XLA {xla:7.1f} ms"
        if ("oneDNN", kind) in totals:
            line += f"   oneDNN {totals[('oneDNN', kind)]:7.1f} ms   XLA/oneDNN {xla / totals[('oneDNN', kind)]:5.2f}x"
        print(line)
    for variant in ("filter gradient, shifted", "filter gradient, im2col"):
        if ("XLA", variant) in totals:
            print(f"    {variant:26s} {totals[('XLA', variant)]:7.1f} ms   "
                  f"(XLA's convolution: {totals[('XLA', 'filter gradient')]:.1f} ms)")
    xla_all = sum(totals[("XLA", kind)] for kind in KINDS)
    print(f"    all three kinds    XLA {xla_all:7.1f} ms", end="")
    if torch:
        dnn_all = sum(totals[("oneDNN", kind)] for kind in KINDS)
        print(f"   oneDNN {dnn_all:7.1f} ms   XLA/oneDNN {xla_all / dnn_all:5.2f}x")
        xla_filter, dnn_filter = totals[("XLA", "filter gradient")], totals[("oneDNN", "filter gradient")]
        print(f"  filter gradients: {100 * xla_filter / xla_all:.0f}% of XLA's convolution time; with oneDNN's "
              f"filter gradients XLA's convolutions would take {xla_all - xla_filter + dnn_filter:.1f} ms")
    else:
        print()


if __name__ == "__main__":
    main()
