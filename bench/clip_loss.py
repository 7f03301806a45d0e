"""Benchmark: ClipLoss evaluation against the same quantized forward in eager PyTorch.

resnet20 (CIFAR-style), N images of 32×32×3, W4A4 with α from ``loss.init(rule)``. Prints

* seconds per ``loss(α)`` and per α inside ``loss.batch`` of K rows (ours, JAX/XLA);
* seconds per quantized forward + cross-entropy in PyTorch eager (``torch.no_grad``,
  fake-quant written the obvious way: ``bench/torch_models.py``) with as many threads as
  XLA uses, and once more with one thread; eager PyTorch has no batched-α path, so its
  per-α cost is one forward (the median over the same K rows);
* ratios torch/ours (target ≥ 1.5 for a single evaluation);
* correctness: our loss vs PyTorch's on the same weights, data and α, in float64 (identical
  semantics must agree to rounding) and in float32 (where a 4-bit grid turns accumulation-
  order differences into occasional one-level flips), and the unquantized logits;
* the peak resident memory of the process (and of the accelerator, if any).

On a GPU both sides run at the same precision: ``--precision highest`` (default) is true float32
(ClipLoss's default; PyTorch with TF32 switched off for cuDNN and matmuls), ``--precision
default`` lets both use TF32 products (PyTorch's cuDNN default). On CPU the flag changes nothing.

The network is random-initialised (seeded); BatchNorm statistics and affine parameters are
randomised too, so that a layout or ε mismatch would show in the correctness check. Images
are standard-normal noise and labels uniform (the cost does not depend on the content).
Timings are medians over repeats after a warm-up call (which also compiles). Both
frameworks run on all the CPU cores this process may use; on a GPU JAX backend PyTorch runs
on CUDA when it can. Without torch installed the comparison is skipped and the script
still exits 0.

    python bench/clip_loss.py [--n 512] [--k 16] [--repeats 5] [--init max] [--precision highest]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when the package is not installed
sys.path.insert(1, str(HERE))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import landscape as ls  # noqa: E402
import models  # noqa: E402

TARGET_RATIO = 1.5  # torch / ours, single evaluation (issue 2, item 8)
REL_TOL = 1e-4  # our loss vs torch's, relative, float32 (see the float32-vs-float64 line)
REL_TOL_F64 = 1e-9  # the same in float64: identical semantics leave only rounding


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=512, help="calibration images (default 512)")
    p.add_argument("--k", type=int, default=16, help="α rows per loss.batch call (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of single calls")
    p.add_argument("--batch-repeats", type=int, default=3, help="timed repeats of batched calls")
    p.add_argument("--init", default="max", choices=("max", "mse"), help="α initialisation rule")
    p.add_argument("--bits", type=int, default=4, help="weight and activation bits (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="highest", choices=("highest", "default"),
                   help="products on a GPU: true float32 on both sides (default) or TF32 on both")
    args = p.parse_args(argv)
    for name in ("n", "k", "repeats", "batch_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def random_network(seed: int, x):
    """resnet20 with seeded random weights and randomised BN affine parameters and statistics."""
    model = models.create("resnet20", num_classes=10)
    variables = model.init(jax.random.PRNGKey(seed), x[:1])
    flat = flax.traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    rng = np.random.default_rng(seed)
    for key, leaf in flat.items():
        module = key.rsplit("/", 1)[0]
        shape = np.shape(leaf)
        if key.endswith("/mean"):
            flat[key] = rng.normal(0.0, 0.2, shape).astype(np.float32)
        elif key.endswith("/var"):
            flat[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith("/scale"):
            flat[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("/bias") and f"{module}/scale" in flat:  # a BatchNorm's shift
            flat[key] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    variables = flax.traverse_util.unflatten_dict(flat, sep="/")
    return ls.train.Network(model=model, variables=variables, config={"init": "random", "seed": seed},
                            history=[])


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn()`` over ``repeats`` calls (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def cpu_threads() -> int:
    """Cores this process may run on: what XLA's CPU thread pool sizes itself to."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def fmt_times(times):
    return "[" + ", ".join(f"{t:.3f}" for t in times) + "]"


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 1024**2 if platform.system() == "Darwin" else rss / 1024


def ours_float64(loss, x, y, alpha) -> float:
    """Our quantized loss recomputed in float64: the same site contexts and model code as
    ``ClipLoss`` (which is float32 by design), for the exact-semantics check."""
    slices = loss.site_slices()
    a64 = np.asarray(alpha, np.float64)
    alphas = {name: a64[sl] if sl.stop - sl.start > 1 else a64[sl.start] for name, sl in slices.items()}
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(loss.variables))

        def f(variables, x, y, alphas):
            with ls.sites.quantizing(loss.specs, alphas):
                logits = loss.model.apply(variables, x, train=False)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        return float(jax.jit(f)(variables, np.asarray(x, np.float64), y, alphas))


def compare_torch(args, net, loss, x, y, alpha, alphas, timings, threads):
    """The PyTorch half: timings, ratios and the correctness checks. Returns False if torch
    is not installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return False
    from torch_models import from_flax, nchw

    on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:  # the same products as ours: true float32, or TF32 (cuDNN's default) for "default"
        torch.backends.cudnn.allow_tf32 = args.precision != "highest"
        torch.backends.cuda.matmul.allow_tf32 = args.precision != "highest"
    torch.set_num_threads(threads)
    twin = from_flax(net.model, jax.device_get(loss.variables)).quantize(loss.specs).to(device)
    ours_order = [s.name for s in loss.sites]
    if twin.active_sites != ours_order:
        raise SystemExit(f"site order differs: torch {twin.active_sites} vs ours {ours_order}")
    xt, yt = nchw(x).to(device), torch.from_numpy(y.astype(np.int64)).to(device)

    def torch_loss(model, a, inputs=xt):
        model.set_alpha(a)
        with torch.no_grad():
            return float(F.cross_entropy(model(inputs), yt))  # float() waits for the device

    alpha_np, alphas_np = np.asarray(alpha), np.asarray(alphas)
    theirs = torch_loss(twin, alpha_np)  # warm-up
    t_torch, times = timed(lambda: torch_loss(twin, alpha_np), args.repeats)
    where = f"{torch.get_num_threads()} intra-op threads" if device.type == "cpu" else "CUDA"
    print(f"torch  eager forward+CE:   {t_torch:.4f} s  (median of {args.repeats} {fmt_times(times)}; "
          f"torch {torch.__version__}, {where}, no_grad, NCHW)")
    t_torch1 = None
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        torch_loss(twin, alpha_np)
        t_torch1, times = timed(lambda: torch_loss(twin, alpha_np), args.repeats)
        torch.set_num_threads(threads)
        print(f"torch  same, 1 thread:     {t_torch1:.4f} s  (median of {args.repeats} {fmt_times(times)}; "
              "OpenMP threads spin and suffer most when the cores are shared)")

    # Eager PyTorch has no batched-α path: its per-α cost is one forward. Each of the K rows
    # is timed separately and the median taken; the K losses also check loss.batch.
    theirs_batch, row_times = np.zeros(args.k), []
    for i, a in enumerate(alphas_np):
        t0 = time.perf_counter()
        theirs_batch[i] = torch_loss(twin, a)
        row_times.append(time.perf_counter() - t0)
    t_row = statistics.median(row_times)
    print(f"torch  loop over K={args.k}:    {t_row:.4f} s per alpha  (median over the {args.k} rows, "
          f"{sum(row_times):.2f} s in all)")

    ratio = t_torch / timings["single"]
    verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
    print(f"ratio  torch/ours single:  {ratio:.2f}x  ({verdict} target >= {TARGET_RATIO}; "
          "equal thread counts)")
    if t_torch1 is not None:
        print(f"ratio  torch(1 thread)/ours single: {t_torch1 / timings['single']:.2f}x")
    print(f"ratio  torch/ours per alpha in batch of {args.k}: {t_row / timings['per_alpha']:.2f}x")

    # Correctness. float64 first: same weights, data and α, so any semantic difference
    # (padding, BN ε, rounding, layout) shows; float32 then differs only by accumulation
    # order, which a 4-bit grid amplifies wherever a value sits on a rounding boundary.
    twin64 = copy.deepcopy(twin).double()
    theirs64 = torch_loss(twin64, alpha_np, xt.double())
    ours64 = ours_float64(loss, x, y, alpha)
    rel64 = abs(ours64 - theirs64) / abs(theirs64)
    ok64 = "OK" if rel64 <= REL_TOL_F64 else "MISMATCH"
    print(f"check  float64: ours {ours64:.12f} vs torch {theirs64:.12f}: rel diff {rel64:.1e}  "
          f"({ok64}, tolerance {REL_TOL_F64:g})")
    ours = timings["loss"]
    rel = abs(ours - theirs) / abs(theirs)
    rel_batch = float(np.max(np.abs(timings["batch_losses"] - theirs_batch) / np.abs(theirs_batch)))
    ok32 = "within" if max(rel, rel_batch) <= REL_TOL else "above"
    print(f"check  float32: ours {ours:.7f} vs torch {theirs:.7f}: rel diff {rel:.2e}; batch of {args.k}: "
          f"max rel diff {rel_batch:.2e}  ({ok32} {REL_TOL:g})")
    print(f"       float32 vs exact (float64): ours {abs(ours - ours64) / ours64:.2e}, torch "
          f"{abs(theirs - theirs64) / theirs64:.2e}: float32 rounding moves values across the "
          f"{args.bits}-bit grid's boundaries in both frameworks, differently")
    with torch.no_grad():
        twin.quantize(None)
        fp32_torch = twin(xt[:64]).cpu().numpy()
        twin.quantize(loss.specs)
    with jax.default_matmul_precision(args.precision):  # torch's side is true float32 too
        fp32_ours = np.asarray(net.apply(x[:64]))
    diff = np.max(np.abs(fp32_ours - fp32_torch))
    print(f"check  FP32 (unquantized) logits, 64 images: max |ours - torch| = {diff:.2e} "
          f"(max |logit| {np.max(np.abs(fp32_ours)):.2f})")
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.n, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, args.n).astype(np.int32)
    net = random_network(args.seed, x)
    threads = cpu_threads()
    dev = jax.devices()[0]

    print("ClipLoss benchmark: resnet20, random-init weights (seed "
          f"{args.seed}, randomised BN statistics), {args.n} images 32x32x3 (Gaussian noise), "
          f"W{args.bits}A{args.bits}, alpha from init({args.init!r})")
    print(f"  jax {jax.__version__} on {dev.platform} x{len(jax.devices())} ({dev.device_kind}); "
          f"CPU cores available (= XLA:CPU threads): {threads}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
          + ("" if dev.platform == "cpu" else f"; precision {args.precision!r} on both sides "
             f"({'float32' if args.precision == 'highest' else 'TF32 products'})"))

    t0 = time.perf_counter()
    loss = ls.ClipLoss(net, (x, y), w_bits=args.bits, a_bits=args.bits, precision=args.precision)
    alpha = jax.block_until_ready(loss.init(args.init))
    print(f"  {loss!r}; init({args.init!r}) incl. construction {time.perf_counter() - t0:.2f} s")

    t0 = time.perf_counter()
    ours = float(jax.block_until_ready(loss(alpha)))
    t_compile = time.perf_counter() - t0
    t_single, times = timed(lambda: jax.block_until_ready(loss(alpha)), args.repeats)
    print(f"ours   loss(alpha):        {t_single:.4f} s  (median of {args.repeats} "
          f"{fmt_times(times)}; first call incl. compile {t_compile:.2f} s)")

    scales = rng.uniform(0.7, 1.3, (args.k, loss.n)).astype(np.float32)
    alphas = jnp.asarray(np.asarray(alpha)[None, :] * scales)
    t0 = time.perf_counter()
    batch_losses = np.asarray(jax.block_until_ready(loss.batch(alphas)))
    t_bcompile = time.perf_counter() - t0
    t_batch, times = timed(lambda: jax.block_until_ready(loss.batch(alphas)), args.batch_repeats)
    per_alpha = t_batch / args.k
    print(f"ours   loss.batch (K={args.k}): {per_alpha:.4f} s per alpha  ({t_batch:.3f} s per call, "
          f"chunk={loss.chunk}; median of {args.batch_repeats} {fmt_times(times)}; first call incl. "
          f"compile {t_bcompile:.2f} s)")

    timings = dict(single=t_single, per_alpha=per_alpha, loss=ours, batch_losses=batch_losses)
    rss_ours = peak_rss_mib()
    if not compare_torch(args, net, loss, x, y, alpha, alphas, timings, threads):
        print("torch  not installed: PyTorch comparison skipped "
              "(pip install torch==2.13.0, or the 'bench' extra)")

    print(f"memory peak RSS of this process: {rss_ours:.0f} MiB after our timings (before torch is "
          f"imported), {peak_rss_mib():.0f} MiB at exit")
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        print(f"memory peak {dev.platform} memory in use: {stats['peak_bytes_in_use'] / 1024**2:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
