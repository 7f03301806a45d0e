"""Benchmark: the top Hessian eigenvalue over more data than one batch, against PyHessian's dataloader mode.

Setup as in ``bench/hessian.py`` (resnet20, images 32×32×3 of standard-normal noise with uniform
labels, a few Adam steps to a low-loss point, BN running statistics set to the data's own, BN in
eval mode on both sides, mean cross-entropy, float32, the Hessian with respect to all 272,474
trainable parameters), but over ``--batches`` (4) batches of ``--n`` (128) images: H is the Hessian
of the mean loss over all the images, Σ_b (n_b / N) H_b.

PyHessian: ``hessian(model, criterion, dataloader=...).eigenvalues(maxIter=100, tol=1e-3)`` (on
CUDA when JAX runs on a GPU, both sides in full float32); every power-iteration step runs, for each
batch, a forward pass, a backward pass with create_graph and the double backward. Ours:
``hessian_spectrum(f, params, batches=[...], top_k=1, trace=False, tol=1e-3, tol_on="eigenvalue")``
with f(params, (x, y)) the batch's mean loss; each Lanczos step runs one HVP per batch, with
``hvp="auto"`` (here "recompute": the four linearizations would store more than
``LINEARIZE_MAX_BYTES``) and with ``hvp="linearize"`` (the gradient of each batch linearized once,
then only tangent passes). "cold" includes compilation (a new function, ``jax.clear_caches()``
first), "warm" is the same call again with another seed. HVP counts are full-data products (each is
one product per batch). PyHessian runs twice with the same seed, the first run untimed (its first
run in a process pays torch's one-time costs). The two answers must agree within 1%, and both are
compared with a tight reference (ours at tol 1e-6, not timed).

    python bench/hessian_batches.py [--batches 4] [--n 128] [--seed 0] [--skip-reference]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when the package is not installed
sys.path.insert(1, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from hessian import (  # noqa: E402
    AGREE,
    EIG_KW,
    EIG_TOL,
    Clock,
    Sum,
    cpu_threads,
    import_pyhessian,
    make_batch,
    make_network,
    report,
)

import landscape as ls  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=4, help="number of batches (default 4)")
    p.add_argument("--n", type=int, default=128, help="images per batch (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    p.add_argument("--skip-reference", action="store_true", help="skip the tight reference eigenvalue")
    args = p.parse_args(argv)
    for name in ("batches", "n"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def batch_loss(net):
    """f(params, (x, y)): the batch's mean cross-entropy in eval mode, at true float32; a new
    function object on every call (so that a first call compiles)."""
    others = {k: v for k, v in net.variables.items() if k != "params"}

    def f(params, batch):
        x, y = batch
        with jax.default_matmul_precision("highest"):
            logits = net.model.apply({"params": params, **others}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return f


def main(argv=None) -> int:
    args = parse_args(argv)
    x, y = make_batch(args.n * args.batches, args.seed)
    with Clock() as clock:
        net, note = make_network(x, y, args.seed, "trained")
    params = jax.device_put(net.variables["params"])
    dim = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    batches = [(jnp.asarray(x[i:i + args.n]), jnp.asarray(y[i:i + args.n])) for i in range(0, len(x), args.n)]
    print(f"Hessian over batches: resnet20, {args.batches} batches of {args.n} images 32x32x3 (noise, uniform "
          f"labels), mean cross-entropy over all {len(x)}, float32, BN in eval mode, n = {dim:,} parameters")
    print(f"  weights: {note}; BN statistics of the data ({clock.wall:.1f} s)")
    print(f"  jax {jax.__version__} on {jax.devices()[0].platform}; CPU cores {cpu_threads()}")

    reference = None
    if not args.skip_reference:
        with Clock() as clock:
            ref = ls.hessian_spectrum(batch_loss(net), params, batches=batches, top_k=1, trace=False, tol=1e-6,
                                      seed=args.seed + 7)
        reference = float(ref.eigenvalues[0])
        print(f"  reference lambda_max {reference:.7g} (our Lanczos, tol 1e-6, {ref.n_hvp} HVPs, "
              f"{clock.wall:.1f} s; not timed)")

    print(f"\ntop eigenvalue, tolerance {EIG_TOL:g}")
    ours = {}
    for hvp in ("auto", "linearize"):
        jax.clear_caches()
        f = batch_loss(net)
        with Clock() as cold:
            spec = ls.hessian_spectrum(f, params, batches=batches, seed=args.seed, hvp=hvp, **EIG_KW)
        stored = spec.info["hvp_stored_bytes"]
        report("ours (cold)", f"Lanczos, hvp={hvp!r} -> {spec.info['hvp']}", spec.n_hvp, cold,
               f"   lambda_max {float(spec.eigenvalues[0]):.6g}{cold.compiled()}"
               + (f"; {stored / 1e9:.2f} GB stored" if stored else ""))
        with Clock() as warm:
            again = ls.hessian_spectrum(f, params, batches=batches, seed=args.seed + 1, hvp=hvp, **EIG_KW)
        report("ours (warm)", f"Lanczos, hvp={hvp!r}", again.n_hvp, warm,
               f"   lambda_max {float(again.eigenvalues[0]):.6g}")
        ours[hvp] = (cold, warm, float(spec.eigenvalues[0]))

    found = import_pyhessian()
    if found is None:
        print("  torch/pyhessian not installed: PyHessian comparison skipped")
        return 0
    torch, module = found
    from torch_models import from_flax, nchw

    torch.set_num_threads(args.threads or cpu_threads())
    # On a GPU, PyHessian runs on CUDA too, in full float32 as ours (TF32 off)
    cuda = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
    if cuda:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    where = "cuda" if cuda else "cpu"
    twin = from_flax(net.model, net.variables).to(where)
    loader = [(nchw(np.asarray(bx)), torch.from_numpy(np.asarray(by).astype(np.int64))) for bx, by in batches]
    print(f"  torch {torch.__version__} on {where}, PyHessian 0.1 (dataloader mode)")

    def pyhessian_run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # create_graph's reference-cycle warning
            with Clock() as setup:
                h = module.hessian(twin, torch.nn.CrossEntropyLoss(), dataloader=loader, cuda=cuda)
            # Its dataloader mode calls torch.autograd.grad itself: count the full-data products.
            products = []
            full_data_product = h.dataloader_hv_product
            h.dataloader_hv_product = lambda v: products.append(1) or full_data_product(v)
            torch.manual_seed(args.seed)
            with Clock() as run:
                values, _ = h.eigenvalues(maxIter=100, tol=EIG_TOL)
        return Sum(setup, run), values, products

    # Ours is compared warm: so is PyHessian (its first run in a process pays torch's and CUDA's
    # one-time costs, 29 % of a run at --n 32 on CPU), after one untimed run with the same seed.
    first, _, _ = pyhessian_run()
    print(f"  PyHessian's first run, untimed warm-up: {first.wall:.2f} s")
    theirs, values, products = pyhessian_run()
    report("PyHessian", "power iteration, dataloader, incl. setup", len(products), theirs,
           f"   lambda_max {float(values[0]):.6g}  ({len(products) * args.batches} batch HVPs)")
    lam, lam_p = ours["auto"][2], float(values[0])
    rel = abs(lam_p - lam) / abs(lam)
    print(f"  agreement: |PyHessian - ours| / ours = {rel:.2e}  ({'OK' if rel <= AGREE else 'DISAGREE'}, "
          f"limit {AGREE:g})")
    if reference is not None:
        err, err_p = abs(lam - reference) / reference, abs(lam_p - reference) / reference
        print(f"  relative error vs the tight reference ({reference:.7g}): ours {err:.1e}, PyHessian {err_p:.1e}")
    for hvp, (cold, warm, _) in ours.items():
        for label, clock in (("cold", cold), ("warm", warm)):
            print(f"  ratio PyHessian/ours {f'hvp={hvp!r} {label}':<22} wall {theirs.wall / clock.wall:6.2f}x  "
                  f"cpu {theirs.cpu / clock.cpu:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
