"""Benchmark: transposable 4:8 masks for a ResNet-50-sized network against networkx min-cost flow.

The weights are random (seeded, He-normal float32) with the shapes of ResNet-50's 53 convolutions
and its classifier, each as a GEMM matrix (H*W*Cin, Cout): 25.5 M weights, about 399 k 8x8 tiles.
Prints

* seconds for ``transposable_mask(..., method="exact")``, ``method="greedy"`` (the reference code's
  keep-side 2-approximation) and ``method="greedy_prune"`` (the paper's prune-side one) over all
  layers, with each greedy's density and kept magnitude relative to exact;
* the reference approach (the N:M paper's code): one networkx min-cost flow per 8x8 tile,
  source -> row (capacity K) -> column (capacity 1, cost -|w| scaled to integers) -> sink
  (capacity K). It is timed on a random sample of tiles and **extrapolated** to all tiles;
* the same sample as one block-diagonal HiGHS LP (scipy), the other exact option considered;
* ratios reference/exact (target >= 50), reference/greedy (target >= 500), and greedy kept
  magnitude / exact kept magnitude (target >= 0.97, mean over layers and over all weights);
* a validity check of every mask, and that the exact masks match networkx's optimum on the sample.

Timings are wall-clock seconds of one pass after a small warm-up, on whatever CPU cores this
process gets (the project's reference machine has 2, shared). Without networkx the reference is
skipped and the script still exits 0.

    python bench/nm.py [--quick] [--sample 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when the package is not installed

import numpy as np  # noqa: E402

from landscape import sparsity as sp  # noqa: E402

KEEP, BLOCK = 4, 8
TARGET_EXACT = 50.0  # reference / exact (issue 7, item 6)
TARGET_GREEDY = 500.0  # reference / greedy
TARGET_QUALITY = 0.97  # greedy kept magnitude / exact kept magnitude


def resnet50_gemm_shapes() -> list[tuple[str, tuple[int, int]]]:
    """(name, (H*W*Cin, Cout)) of every conv and the fc of torchvision's ResNet-50 (v1.5)."""
    shapes = [("conv1", (7 * 7 * 3, 64))]
    cin = 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        cout = 4 * width
        for b in range(blocks):
            name = f"layer{stage}.{b}"
            shapes.append((f"{name}.conv1", (cin, width)))
            shapes.append((f"{name}.conv2", (9 * width, width)))
            shapes.append((f"{name}.conv3", (width, cout)))
            if b == 0:
                shapes.append((f"{name}.downsample", (cin, cout)))
            cin = cout
    shapes.append(("fc", (2048, 1000)))
    return shapes


def make_weights(shapes, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * math.sqrt(2.0 / s[0])).astype(np.float32) for _, s in shapes]


def full_tiles(w: np.ndarray) -> list[np.ndarray]:
    R, C = w.shape
    starts = [(i, j) for i in range(0, R - BLOCK + 1, BLOCK) for j in range(0, C - BLOCK + 1, BLOCK)]
    return [w[i : i + BLOCK, j : j + BLOCK] for i, j in starts]


def relative_gap(tiles, masks_a, masks_b) -> float:
    """Largest |kept(a) - kept(b)| / sum|tile| over the tiles."""
    gaps = []
    for t, a, b in zip(tiles, masks_a, masks_b, strict=True):
        mag = np.abs(t).astype(np.float64)
        gaps.append(abs(mag[a].sum() - mag[b].sum()) / mag.sum())
    return max(gaps)


def networkx_tile(tile: np.ndarray, keep: int) -> np.ndarray:
    """The reference: one min-cost flow on a bipartite graph per tile (integer costs)."""
    import networkx as nx

    M = tile.shape[0]
    cost = np.rint(np.abs(tile) * 1e6 / max(np.abs(tile).max(), 1e-30)).astype(np.int64)
    g = nx.DiGraph()
    g.add_node("s", demand=-M * keep)
    g.add_node("t", demand=M * keep)
    for i in range(M):
        g.add_edge("s", ("r", i), capacity=keep, weight=0)
        g.add_edge(("c", i), "t", capacity=keep, weight=0)
        for j in range(M):
            g.add_edge(("r", i), ("c", j), capacity=1, weight=-int(cost[i, j]))
    flow = nx.min_cost_flow(g)
    return np.array([[flow[("r", i)][("c", j)] == 1 for j in range(M)] for i in range(M)])


def highs_tiles(tiles: list[np.ndarray], keep: int) -> np.ndarray:
    """All sample tiles as one block-diagonal LP (HiGHS dual simplex); returns masks (n, M, M)."""
    from scipy import sparse
    from scipy.optimize import linprog

    n, M = len(tiles), tiles[0].shape[0]
    var = np.arange(n * M * M)
    tile = np.arange(n)[:, None, None] * M
    row_of = np.broadcast_to(tile + np.arange(M)[None, :, None], (n, M, M)).ravel()
    col_of = np.broadcast_to(tile + np.arange(M)[None, None, :], (n, M, M)).ravel()
    ones = np.ones(n * M * M)
    a_eq = sparse.vstack(
        [
            sparse.csr_matrix((ones, (row_of, var)), shape=(n * M, n * M * M)),
            sparse.csr_matrix((ones, (col_of, var)), shape=(n * M, n * M * M)),
        ]
    ).tocsr()
    cost = -np.abs(np.stack(tiles)).astype(np.float64).ravel()
    res = linprog(cost, A_eq=a_eq, b_eq=np.full(2 * n * M, keep), bounds=(0, 1), method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed: {res.message}")
    return res.x.reshape(n, M, M) > 0.5


def timed(fn):
    """(wall seconds, result); the process CPU seconds of the last call are kept in ``timed.cpu``."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    timed.cpu = time.process_time() - c0
    return time.perf_counter() - t0, out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few layers and a small sample (seconds)")
    p.add_argument("--sample", type=int, default=None, help="tiles timed with networkx (200; quick: 40)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.sample is None:
        args.sample = 40 if args.quick else 200
    if args.sample < 1:
        p.error(f"--sample must be >= 1, got {args.sample}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shapes = resnet50_gemm_shapes()
    if args.quick:
        shapes = shapes[:8] + shapes[-1:]
    weights = make_weights(shapes, args.seed)
    n_weights = sum(w.size for w in weights)
    n_tiles = sum(math.ceil(w.shape[0] / BLOCK) * math.ceil(w.shape[1] / BLOCK) for w in weights)
    n_full = sum((w.shape[0] // BLOCK) * (w.shape[1] // BLOCK) for w in weights)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    subset = " (quick subset)" if args.quick else ""
    print(f"transposable {KEEP}:{BLOCK} masks, ResNet-50 GEMM shapes{subset}")
    print(f"  {len(weights)} layers, {n_weights:,} weights, {n_tiles:,} tiles ({n_tiles - n_full} partial), "
          f"seed {args.seed}")
    print(f"  python {platform.python_version()}, numpy {np.__version__}, {cores} CPU core(s)")

    sp.transposable_mask(weights[0][:64, :64], keep=KEEP, block=BLOCK)  # warm-up (imports, caches)
    sp.transposable_mask(weights[0][:64, :64], keep=KEEP, block=BLOCK, method="greedy")
    sp.transposable_mask(weights[0][:64, :64], keep=KEEP, block=BLOCK, method="greedy_prune")

    t_exact, exact = timed(lambda: [sp.transposable_mask(w, keep=KEEP, block=BLOCK) for w in weights])
    cpu_exact = timed.cpu
    t_greedy, greedy = timed(
        lambda: [sp.transposable_mask(w, keep=KEEP, block=BLOCK, method="greedy") for w in weights]
    )
    cpu_greedy = timed.cpu
    t_prune, prune = timed(
        lambda: [sp.transposable_mask(w, keep=KEEP, block=BLOCK, method="greedy_prune") for w in weights]
    )
    cpu_prune = timed.cpu
    valid_exact = all(sp.is_transposable(m, keep=KEEP, block=BLOCK, exact=True) for m in exact)
    valid_greedy = all(sp.is_transposable(m, keep=KEEP, block=BLOCK) for m in greedy)
    valid_prune = all(sp.is_transposable(m, keep=KEEP, block=BLOCK) for m in prune)  # >= N zeros per line
    kept_exact = np.array([np.abs(w)[m].sum(dtype=np.float64) for w, m in zip(weights, exact, strict=True)])
    kept_greedy = np.array([np.abs(w)[m].sum(dtype=np.float64) for w, m in zip(weights, greedy, strict=True)])
    quality_layers = kept_greedy / kept_exact
    quality_all = kept_greedy.sum() / kept_exact.sum()
    dens_greedy = sum(int(m.sum()) for m in greedy) / n_weights
    kept_prune = np.array([np.abs(w)[m].sum(dtype=np.float64) for w, m in zip(weights, prune, strict=True)])
    quality_prune = kept_prune / kept_exact
    dens_prune = sum(int(m.sum()) for m in prune) / n_weights
    total = np.array([np.abs(w).sum(dtype=np.float64) for w in weights])
    pruned_ratio = (total - kept_prune).sum() / (total - kept_exact).sum()  # the paper's bound: <= 2 per tile

    print()
    print(f"  exact  (vectorised exchange solver): {t_exact:8.3f} s (cpu {cpu_exact:.3f} s)  "
          f"{t_exact / n_tiles * 1e6:6.2f} us/tile   valid: {valid_exact}")
    print(f"  greedy (vectorised 2-approximation): {t_greedy:8.3f} s (cpu {cpu_greedy:.3f} s)  "
          f"{t_greedy / n_tiles * 1e6:6.2f} us/tile   valid: {valid_greedy}   density {dens_greedy:.4f}")
    print(f"  greedy_prune (paper's, prune-side):  {t_prune:8.3f} s (cpu {cpu_prune:.3f} s)  "
          f"{t_prune / n_tiles * 1e6:6.2f} us/tile   valid: {valid_prune}   density {dens_prune:.4f}")
    print(f"  greedy_prune / exact: kept magnitude {kept_prune.sum() / kept_exact.sum():.4f} "
          f"(layers: mean {quality_prune.mean():.4f}, min {quality_prune.min():.4f}), "
          f"pruned magnitude {pruned_ratio:.4f}")

    rng = np.random.default_rng(args.seed + 1)
    all_tiles = [tile for w in weights for tile in full_tiles(w)]
    pick = rng.choice(len(all_tiles), size=min(args.sample, len(all_tiles)), replace=False)
    sample = [all_tiles[k] for k in pick]

    try:
        import networkx  # noqa: F401
    except ImportError:
        print("\n  networkx is not installed (pip install networkx): reference comparison skipped")
        return 0

    networkx_tile(sample[0], KEEP)  # warm-up: imports
    highs_tiles(sample[:2], KEEP)
    t_nx, nx_masks = timed(lambda: [networkx_tile(t, KEEP) for t in sample])
    cpu_nx = timed.cpu
    per_tile_nx = t_nx / len(sample)
    t_ref = per_tile_nx * n_tiles
    ours = [sp.transposable_mask(t, keep=KEEP, block=BLOCK) for t in sample]
    t_lp, lp_masks = timed(lambda: highs_tiles(sample, KEEP))
    gap, lp_gap = relative_gap(sample, ours, nx_masks), relative_gap(sample, ours, lp_masks)

    print()
    print(f"  reference: networkx min_cost_flow per 8x8 tile, {len(sample)} random tiles in {t_nx:.3f} s "
          f"(cpu {cpu_nx:.3f} s) = {per_tile_nx * 1e3:.3f} ms/tile")
    print(f"             EXTRAPOLATED to {n_tiles:,} tiles: {t_ref:,.1f} s "
          f"(cpu {cpu_nx / len(sample) * n_tiles:,.1f} s)")
    print(f"  HiGHS LP (scipy, one block-diagonal LP of the same {len(sample)} tiles): {t_lp:.3f} s "
          f"= {t_lp / len(sample) * 1e3:.3f} ms/tile")
    print(f"  exact vs networkx optimum on the sample: max relative gap {gap:.1e} (integer-rounded costs); "
          f"vs HiGHS: {lp_gap:.1e}")

    r_exact = t_ref / t_exact
    r_greedy = t_ref / t_greedy

    def verdict(ok):
        return "meets target" if ok else "BELOW TARGET"

    print()
    flat_w = np.concatenate([w.ravel() for w in weights])
    retained_exact = sp.retained_magnitude(flat_w, np.concatenate([m.ravel() for m in exact]))
    retained_greedy = sp.retained_magnitude(flat_w, np.concatenate([m.ravel() for m in greedy]))
    retained_prune = sp.retained_magnitude(flat_w, np.concatenate([m.ravel() for m in prune]))
    print(f"  reference / exact  = {r_exact:10.1f}x   (target >= {TARGET_EXACT:g})   "
          f"{verdict(r_exact >= TARGET_EXACT)}")
    print(f"  reference / greedy = {r_greedy:10.1f}x   (target >= {TARGET_GREEDY:g})  "
          f"{verdict(r_greedy >= TARGET_GREEDY)}")
    cpu_ref = cpu_nx / len(sample) * n_tiles
    print(f"  (same ratios in process CPU time: exact {cpu_ref / cpu_exact:.1f}x, "
          f"greedy {cpu_ref / cpu_greedy:.1f}x)")
    print(f"  greedy / exact kept magnitude: mean over layers {quality_layers.mean():.4f} "
          f"(min {quality_layers.min():.4f}), all weights {quality_all:.4f}   (target >= {TARGET_QUALITY})   "
          f"{verdict(quality_layers.mean() >= TARGET_QUALITY)}")
    print(f"  retained |w| fraction: exact {retained_exact:.4f}, greedy {retained_greedy:.4f}, "
          f"greedy_prune {retained_prune:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
