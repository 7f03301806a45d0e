"""N:M and transposable N:M sparsity masks, their checkers, and mask diversity.

Convention
----------
``keep=K, block=M`` means: **K weights are kept out of every M** (M - K are pruned). The N:M paper
(Hubara et al., 2021) counts zeros ("at least N zeros in every M"), the SR-STE code counts kept
weights; at 50% (2:4, 4:8) both read the same. Here there is no ambiguity: ``keep`` is kept.

GEMM layout
-----------
A layer computes ``y = x @ W`` with ``W`` of shape ``(R, C)``: R is the reduction dimension and C the
output channels. A Flax conv kernel ``(H, W, Cin, Cout)`` is the GEMM matrix
``kernel.reshape(H*W*Cin, Cout)`` (:func:`gemm_matrix`); a mask for it is reshaped back with
``mask.reshape(kernel.shape)``. Plain N:M for the forward GEMM groups M consecutive entries along the
reduction axis, ``nm_mask(gemm_matrix(k), keep=K, block=M, axis=0)``.

A **transposable** K:M mask tiles the GEMM matrix into M x M tiles (rows ``bM..bM+M-1``, columns
``cM..cM+M-1``) and keeps K entries in every row and every column of every tile, so both ``W`` (forward,
groups along R) and ``W.T`` (backward data gradient, groups along C) are K:M.

Padding
-------
Shapes not divisible by M are padded (with entries that can never be kept) to whole groups / tiles,
solved, and cut back. A plain N:M group with r < M real entries keeps ``min(K, r)``. A transposable
tile with r real rows and c real columns keeps at most K per row and per column and, among those,
as many entries as possible:

    kept(tile) = min(r * min(K, c), c * min(K, r))

so a full tile keeps exactly K per row and per column; a tile cut at the right edge (c < M real
columns, r = M) keeps exactly K in each real column; a square corner keeps exactly min(K, r) per row
and column. Among the masks with that count the exact solver maximises the kept magnitude.

Exact solver (design)
---------------------
Per tile the problem is a max-weight degree-constrained bipartite subgraph (a transportation problem
with unit edge capacities); its constraint matrix is totally unimodular, so the LP is integral.
All tiles of a layer are solved together by a primal-dual method, vectorised over tiles:

1. **Prices.** Two Gauss-Seidel sweeps of dual coordinate ascent on column prices p_j
   (:func:`_column_prices`, float32): each sets p_j so that exactly K rows would keep column j.
2. **Start.** Every row keeps its K largest ``|w_ij| - p_j``. Whatever p is, this start is a
   min-cost flow *for its own column counts* (row potentials between each row's K-th and (K+1)-th
   value make every reduced cost >= 0). After the sweeps a random 8x8 tile at 4:8 has on average
   0.23 (max 2) entries too many in its columns, against 4.4 (max 11) without prices.
3. **Exchange rounds** (successive shortest paths). Columns with more than K kept are sources,
   columns with fewer are sinks. A Bellman-Ford on the residual graph (select (i, j): row->col,
   cost -|w_ij|; unselect: col->row, cost +|w_ij|) from all sources finds the cheapest exchange
   path to a sink; flipping its edges moves one kept entry from a full column to a short one and
   keeps every row at K. Augmenting along shortest paths keeps the flow min-cost, so when no
   column is over K the mask is optimal.

Tiles are laid out "structure of arrays", ``(M, M, n_tiles)``: every step is a branch-free
elementwise numpy operation over contiguous tile vectors (no Python loop over tiles; loops over
chunks of 4096 tiles and over the M rows/columns of a tile), and only the unbalanced tiles take
part in an exchange round.

Measured with ``bench/nm.py`` (25.5 M weights in ResNet-50's GEMM shapes, 398 k tiles, 4:8, a
2-core machine shared with other jobs, so wall > CPU time): this solver 1.6 s wall, 0.69 s CPU
(1.7 us CPU per tile); the reference approach, networkx min-cost flow per tile, 1.4 ms CPU per tile
(555 s CPU, 1100 s wall extrapolated); scipy's HiGHS dual simplex on one block-diagonal LP
0.6-1.1 ms per tile at 200-1000 tiles and 2.1 ms at 5000 (it grows superlinearly), so no faster
than networkx. A vmapped JAX while-loop was not built: it would run every tile for the worst
tile's number of rounds, which compaction avoids.

Arithmetic is float64 on magnitudes rescaled by a power of two (exact sums for float32 weights of
a sane dynamic range). The Bellman-Ford accepts strict improvements only, so its predecessor graph
is a tree even with tied magnitudes. Should a rounding error still leave an exchange path
unwalkable, that tile is re-solved by the HiGHS LP, so the result is always feasible and optimal
(never seen on float32 or integer weights; 5 of 32 k tiles whose magnitudes spanned 60 decades).

Greedy
------
Two different 2-approximations go by that name; ``method="greedy"`` is the reference CODE's
algorithm, not the one the paper states.

``"greedy"``, the reference code's keep-side "approx2" (``dynamic_TNM``'s ``update_mask_approx2``,
without its early ``break``): visit the entries of a tile by decreasing magnitude and keep one when
its row and its column both have fewer than K kept. It builds a maximal b-matching greedily, so its
kept magnitude is >= 1/2 of the optimum with at most K per row and column (which is >= the exact-K
optimum; on rare tiles greedy even beats "exact", which must keep exactly K). It never keeps more
than K per row or column but may keep fewer (density 0.49 at 4:8). Vectorised: one sort of every
tile, then M*M steps that are elementwise over all tiles (for M <= 8 each tile's counters and kept
set are packed into three uint64 words). Bench: 0.7 s wall (0.34 s CPU) for ResNet-50 at 4:8, kept
magnitude 0.988 of exact.

``"greedy_prune"``, the paper's prune-side algorithm (Hubara et al. 2021, N = M - K zeros): visit
the entries of a tile by increasing magnitude and prune one when its row **or** its column has
fewer than N pruned. The pruned set is a greedy b-edge cover, so its magnitude is <= 2x the optimal
pruned magnitude (over masks with >= N zeros per row and column, whose optimum is <= that of the
exact solver's exactly-N masks). Every row and column ends with at least N zeros (at most K kept),
but an entry pruned for its row's sake can push its column past N (and vice versa), so it
over-prunes: on Gaussian tiles density 0.373 at 2:4 and 0.404 at 4:8 (not 0.5), fewer than 2% of
tiles end at exactly N per line; pruned / exact pruned magnitude max 1.73 (2:4) and 1.45 (4:8),
kept / exact kept magnitude min 0.64 (2:4) and 0.84 (4:8), mean 0.90 and 0.92 (3600 and 1600
seeded tiles, matching the dossier). Among equal magnitudes the higher index is pruned first (the
keep-side greedy keeps the lower index first). In a partial edge tile the padded entries count as
pruned (they are zeros of the padded tile): a real row or column prunes real entries only while it
has fewer than N zeros in all, so it keeps at most K (a corner tile of r, c <= K real rows and
columns keeps everything, as "exact" does). Vectorised as
"greedy" (its counters saturate at N). Bench: 0.59 s wall (0.59 s CPU) for ResNet-50 at 4:8,
density 0.405, kept magnitude 0.923 of exact (pruned magnitude 1.22x exact's).

Reference layout
----------------
The reference code tiles a conv weight differently: it permutes PyTorch's (Cout, Cin, kh, kw) to
NHWC, flattens each output filter to a row of length kh*kw*Cin, pads it to a multiple of M*M and
takes each consecutive M*M chunk of ONE filter, reshaped (M, M), as a tile (``dynamic_TNM``'s
updates chunk the NCHW order (Cin, kh, kw) instead). ``layer_mask(..., layout="reference")`` and
``Recipe(layout="reference")`` reproduce the NHWC chunks for bit-parity experiments
(:func:`reference_mask`; a Flax kernel ``(kh, kw, Cin, Cout)`` is already in that order, filter c
is ``kernel[..., c].ravel()``; a Dense kernel chunks each output column). Each tile still keeps K
per row and column, so the constraint count and the mask diversity are those of the GEMM layout
and the mask is K:M along the reduction axis, but a tile's columns are strided entries of one
filter rather than M output channels: the mask is in general NOT K:M along C_out, so the backward
data-gradient GEMM gets no sparsity. A last chunk with l < M*M real entries keeps, by "exact",
``min(K, real entries)`` in each of its rows (q*K + min(K, s) for l = q*M + s), its padding never
kept (the reference code pads with zeros that it may keep).

Sparse training
---------------
:class:`Recipe` trains a network with N:M or transposable N:M masks from scratch through
``landscape.train.fit(model, data, recipe=Recipe(...))`` (the dynamic recipe of the N:M paper on top
of SR-STE, Zhou et al. 2021):

* the masks live in a ``"masks"`` collection beside ``"params"``, one boolean array of the kernel's
  shape per sparse layer (``masks/<module path>/kernel``); layers without an entry are dense. By
  default every conv/dense layer is sparse except the first and the last in call order;
* ``init_variables`` computes the masks of the initial weights (``init_method``, default the exact
  solver), ``after_step`` recomputes them from |W| after every ``update_every``-th step
  (``update_method``, default the keep-side greedy transposable solver, or plain N:M along the
  reduction axis), on the tiles ``layout`` names, so step s trains with the masks of step
  ``update_every * floor((s - 1) / update_every)`` (the first update follows step ``update_every``);
* the forward product uses ``W * mask``; the backward is straight-through (:func:`ste_mask`)::

      dL/dW = dL/dW~ |_(W~ = W * m)  +  decay * (1 - m) * W

  so pruned weights keep learning, may re-enter at the next update, and are pulled towards zero
  by the SR-STE term (on top of the optimizer's weight decay on all kernels);
* evaluation (``Network.apply``, ``Network.accuracy``) multiplies by the stored masks, with the true
  gradient ``m * dL/dW~``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from functools import cache, partial

import flax
import jax
import jax.numpy as jnp
import numpy as np

from landscape import layers, train

__all__ = [
    "GemmLayer",
    "MaskDiversity",
    "Recipe",
    "apply_masks",
    "check_grouped_masks",
    "density",
    "effective_params",
    "gemm_layers",
    "gemm_matrix",
    "is_nm",
    "is_transposable",
    "layer_mask",
    "mask_diversity",
    "refuse_grouped",
    "nm_mask",
    "reference_mask",
    "retained_magnitude",
    "select_layers",
    "ste_mask",
    "transposable_mask",
    "transposable_count",
]

# Tiles per vectorised chunk: (M, M, chunk) float64 work arrays stay in L2 for M = 8.
_CHUNK = 4096
# Tiles per greedy chunk: its state is a few (chunk,) vectors, so larger chunks amortise call overhead.
_GREEDY_CHUNK = 16384
# Gauss-Seidel price sweeps before the exchange rounds (see _column_prices).
_SWEEPS = 2


# --------------------------------------------------------------------------------------------------
# validation helpers


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


#: The largest block M accepted: masks pad a short last group or tile out to M (memory and time
#: grow with M, not with the weights), and N:M formats in use have M <= 16.
MAX_BLOCK = 1024


def _check_keep_block(keep, block) -> tuple[int, int]:
    K = _check_int(keep, "keep")
    M = _check_int(block, "block")
    if not 2 <= M <= MAX_BLOCK:
        raise ValueError(f"block must be an integer in [2, {MAX_BLOCK}], got block={M}")
    if not 1 <= K < M:
        raise ValueError(
            f"keep must satisfy 1 <= keep < block (keep = weights kept per block), "
            f"got keep={K}, block={M}"
        )
    return K, M


#: The transposable solvers (see the module docstring): the optimum, the reference code's keep-side
#: greedy and the paper's prune-side greedy.
TRANSPOSABLE_METHODS = ("exact", "greedy", "greedy_prune")
#: Where a layer's M x M tiles come from: tiles of its GEMM matrix, or chunks of one output filter.
LAYOUTS = ("gemm", "reference")


def _check_choice(value, name: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _as_weights(w, name: str = "w") -> np.ndarray:
    arr = np.asarray(w)
    if arr.dtype != object and arr.dtype.kind == "V" and jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(np.float32)  # bfloat16 and other ml_dtypes floats: exact in float32
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; it contains NaN or inf")
    return arr


def _as_matrix(w, name: str = "w") -> np.ndarray:
    arr = _as_weights(w, name)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D GEMM matrix (rows = reduction dim, columns = outputs), got shape "
            f"{arr.shape}; reshape a conv kernel with gemm_matrix(kernel)"
        )
    return arr


def _as_mask(mask, name: str = "mask") -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != bool:
        raise ValueError(f"{name} must be a boolean array, got dtype {arr.dtype}")
    return arr


def _normalise_axis(axis, ndim: int) -> int:
    ax = _check_int(axis, "axis")
    if not -ndim <= ax < ndim:
        raise ValueError(f"axis={ax} is out of range for an array with {ndim} dimension(s)")
    return ax % ndim


# --------------------------------------------------------------------------------------------------
# layout helpers


def gemm_matrix(kernel) -> np.ndarray:
    """The GEMM matrix of a layer kernel: ``(..., Cin, Cout) -> (prod(...) * Cin, Cout)``.

    A Flax conv kernel ``(H, W, Cin, Cout)`` becomes ``(H*W*Cin, Cout)`` (rows = reduction dimension,
    columns = output channels); a Dense kernel ``(in, out)`` is returned unchanged. The reshape is
    row-major, so ``mask.reshape(kernel.shape)`` maps a mask of the GEMM matrix back to the kernel.
    """
    arr = np.asarray(kernel)
    if arr.ndim < 2:
        raise ValueError(f"kernel must have at least 2 dimensions (..., Cin, Cout), got shape {arr.shape}")
    return arr.reshape(-1, arr.shape[-1])


def _group_view(x: np.ndarray, M: int, axis: int, fill) -> np.ndarray:
    """Move ``axis`` last, pad it to a multiple of M with ``fill`` and split it: (..., G, M)."""
    x = np.moveaxis(x, axis, -1)
    pad = (-x.shape[-1]) % M
    if pad:
        x = np.concatenate([x, np.full(x.shape[:-1] + (pad,), fill, dtype=x.dtype)], axis=-1)
    return x.reshape(x.shape[:-1] + (x.shape[-1] // M, M))


def _to_tiles(x: np.ndarray, M: int, fill) -> np.ndarray:
    """(R, C) -> (M, M, n_tiles), tile t = (row block t // Cb, column block t % Cb); padded with fill."""
    R, C = x.shape
    Rb, Cb = -(-R // M), -(-C // M)
    if (Rb * M, Cb * M) != (R, C):
        padded = np.full((Rb * M, Cb * M), fill, dtype=x.dtype)
        padded[:R, :C] = x
        x = padded
    return np.ascontiguousarray(x.reshape(Rb, M, Cb, M).transpose(1, 3, 0, 2).reshape(M, M, Rb * Cb))


def _from_tiles(t: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    M = t.shape[0]
    R, C = shape
    Rb, Cb = -(-R // M), -(-C // M)
    return t.reshape(M, M, Rb, Cb).transpose(2, 0, 3, 1).reshape(Rb * M, Cb * M)[:R, :C]


def _tile_extent(shape: tuple[int, int], M: int) -> tuple[np.ndarray, np.ndarray]:
    """Real rows r_t and real columns c_t of every tile, each (n_tiles,)."""
    R, C = shape
    Rb, Cb = -(-R // M), -(-C // M)
    r = np.minimum(M, R - M * np.arange(Rb))
    c = np.minimum(M, C - M * np.arange(Cb))
    return np.repeat(r, Cb), np.tile(c, Rb)


def _tile_quota(r: np.ndarray, c: np.ndarray, K: int) -> np.ndarray:
    """Entries kept by an optimal transposable mask in an r x c (real part of a) tile."""
    return np.minimum(r * np.minimum(K, c), c * np.minimum(K, r))


# --------------------------------------------------------------------------------------------------
# plain N:M


def nm_mask(w, *, keep: int, block: int, axis: int) -> np.ndarray:
    """Plain K:M mask by magnitude: keep the K largest |w| of every M consecutive entries along ``axis``.

    Args:
      w: array of any shape (numpy or JAX), real and finite.
      keep: K, entries kept per group (1 <= K < M).
      block: M, group length.
      axis: the grouped axis (for a GEMM matrix ``(R, C)`` the forward GEMM needs ``axis=0``).

    Returns:
      bool array of ``w.shape``; ``sum(mask[group]) = K`` for every full group. A last group with
      r < M real entries (the axis length is not a multiple of M) keeps ``min(K, r)``. Ties are
      broken towards the lower index.
    """
    K, M = _check_keep_block(keep, block)
    arr = _as_weights(w)
    if arr.ndim == 0:
        raise ValueError("w must have at least one dimension, got a scalar")
    ax = _normalise_axis(axis, arr.ndim)
    mag = np.abs(arr.astype(np.float64, copy=False))
    groups = _group_view(mag, M, ax, -np.inf)  # padding sorts last, so it is never among a group's top
    order = np.argsort(-groups, axis=-1, kind="stable")
    kept = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(kept, order[..., :K], True, axis=-1)
    kept = kept.reshape(kept.shape[:-2] + (-1,))[..., : arr.shape[ax]]
    return np.moveaxis(kept, -1, ax)


def is_nm(mask, *, keep: int, block: int, axis: int, exact: bool = False) -> bool:
    """Whether every group of M consecutive entries along ``axis`` keeps at most K (K:M valid).

    With ``exact=True``: every group keeps exactly K, and a last partial group of r real entries
    keeps exactly ``min(K, r)`` (what :func:`nm_mask` produces).
    """
    K, M = _check_keep_block(keep, block)
    m = _as_mask(mask)
    if m.ndim == 0:
        raise ValueError("mask must have at least one dimension, got a scalar")
    ax = _normalise_axis(axis, m.ndim)
    counts = _group_view(m, M, ax, False).sum(-1)
    if not exact:
        return bool(np.all(counts <= K))
    L = m.shape[ax]
    want = np.minimum(K, np.minimum(M, L - M * np.arange(counts.shape[-1])))
    return bool(np.all(counts == want))


# --------------------------------------------------------------------------------------------------
# transposable N:M


def transposable_mask(w, *, keep: int, block: int, method: str = "exact") -> np.ndarray:
    """Transposable K:M mask of a 2-D GEMM matrix: K kept per row and per column of every M x M tile.

    Args:
      w: ``(R, C)`` GEMM matrix (rows = reduction dim), numpy or JAX, real and finite. Reshape a conv
        kernel with :func:`gemm_matrix`.
      keep: K, kept entries per tile row and tile column (1 <= K < M).
      block: M, tile side.
      method: ``"exact"`` maximises ``sum(|w| * mask)`` with exactly K per row and column of every
        full tile (partial edge tiles: module docstring); ``"greedy"`` is the reference code's
        keep-side 2-approximation (kept magnitude >= 1/2 of the optimum), at most K per row and
        column; ``"greedy_prune"`` is the paper's prune-side 2-approximation (pruned magnitude <= 2x
        the optimum), at least N = M - K pruned per row and column, so also at most K kept, usually
        fewer. Both greedy methods visit entries by their float32-rounded magnitude (module
        docstring, "Greedy").

    Returns:
      bool ``(R, C)`` mask. Padding is never kept.

    Formula (one full tile, A = |W_tile|):
      max_S sum_ij A_ij S_ij   s.t.   sum_j S_ij = K,  sum_i S_ij = K,  S in {0, 1}^(M x M).
    """
    K, M = _check_keep_block(keep, block)
    arr = _as_matrix(w)
    _check_choice(method, "method", TRANSPOSABLE_METHODS)
    mag = _magnitudes(arr)
    R, C = mag.shape
    full, edge = _solvers(method)
    out = np.zeros((R, C), dtype=bool)
    Rf, Cf = R - R % M, C - C % M
    if Rf and Cf:
        out[:Rf, :Cf] = full(mag[:Rf, :Cf], M, K)
    # The edge strips hold exactly the partial tiles (they start at multiples of M).
    if Cf < C and R:
        out[:, Cf:] = edge(mag[:, Cf:], M, K)
    if Rf < R and Cf:
        out[Rf:, :Cf] = edge(mag[Rf:, :Cf], M, K)
    return out


def _magnitudes(arr: np.ndarray) -> np.ndarray:
    """|arr| in the solvers' dtype: float32 stays float32, everything else is float64 (and rescaled)."""
    # float64 for integers (abs(int8(-128)) overflows); float32 stays float32 until a chunk is solved.
    dtype = np.result_type(arr.dtype, np.float32) if arr.dtype.kind == "f" else np.float64
    mag = np.abs(arr.astype(dtype, copy=False))
    if dtype == np.float64:
        # float64 beyond float32's range: scale by a power of two (exact) so that the largest
        # magnitude is in (1/2, 1] before the float32 greedy and the exact solver's scaling see it
        # (1e-310 overflowed 2**-log2(max); 1e39 and 1e300 both became inf and tied in float32).
        top = float(mag.max(initial=0.0))
        if top > 0:
            mag = np.ldexp(mag, -math.frexp(top)[1])
    return mag


def _solvers(method: str):
    """(solver of a region of whole tiles, solver of an edge strip of partial tiles) for ``method``."""
    if method == "exact":
        return _exact_full, _exact_edge
    prune = method == "greedy_prune"
    return partial(_greedy_full, prune=prune), partial(_greedy_edge, prune=prune)


def is_transposable(mask, *, keep: int, block: int, exact: bool = False) -> bool:
    """Whether a 2-D mask keeps at most K per row and per column of every M x M tile.

    With ``exact=True`` additionally every tile keeps ``min(r*min(K, c), c*min(K, r))`` entries
    (r, c = its real rows and columns), i.e. exactly K per row and column of every full tile.
    """
    K, M = _check_keep_block(keep, block)
    m = _as_mask(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if m.size == 0:
        return True
    t = _to_tiles(m, M, False)
    rows, cols = t.sum(1), t.sum(0)
    ok = bool(np.all(rows <= K) and np.all(cols <= K))
    if not exact or not ok:
        return ok
    r, c = _tile_extent(m.shape, M)
    return bool(np.all(rows.sum(0) == _tile_quota(r, c, K)))


@cache
def _comparators(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sorting network on n wires (19 comparators for n = 8)."""
    size = 1 << max(0, (n - 1).bit_length())
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    # Wires >= n would carry +inf (already in place for an ascending sort): their comparators drop out.
    return [(i, j) for i, j in pairs if j < n]


def _sort_desc(wires: list[np.ndarray]) -> list[np.ndarray]:
    """Sort equal-shape arrays elementwise into descending order with a sorting network.

    Branch-free (one max and one min per comparator). The inputs are only read; every output wire
    is a fresh buffer, reused across comparators.
    """
    x = list(wires)
    owned = [False] * len(x)
    pool: list[np.ndarray] = []
    for i, j in _comparators(len(x)):
        hi = pool.pop() if pool else np.empty_like(x[i])
        np.maximum(x[i], x[j], out=hi)
        lo = x[j] if owned[j] else (pool.pop() if pool else np.empty_like(x[j]))
        np.minimum(x[i], x[j], out=lo)
        if owned[i]:
            pool.append(x[i])
        x[i], x[j] = hi, lo
        owned[i] = owned[j] = True
    return x


def _row_top(a: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Keep the ``quota[i]`` largest entries of every tile row: a (M, M, n), quota (M, n) -> bool.

    Rank of entry (i, j) in its row = #{j' : a_ij' > a_ij} + #{j' < j : a_ij' = a_ij} (ties to the
    lower column), counted with elementwise comparisons so tiles stay the contiguous axis.
    """
    M = a.shape[0]
    rank = np.zeros(a.shape, dtype=np.int16)
    for jp in range(M):
        col = a[:, jp, None, :]
        rank[:, :jp] += col > a[:, :jp]
        rank[:, jp + 1 :] += col >= a[:, jp + 1 :]
    return rank < quota[:, None, :]


def _column_prices(a: np.ndarray, K: int, sweeps: int) -> np.ndarray:
    """Dual coordinate ascent on column prices p (M, n) for full tiles a (M, M, n).

    Row i keeps its K largest ``a_ij - p_j``. Updating one column j with the others fixed: row i keeps
    j iff ``a_ij - p_j >= theta_ij``, theta_ij = K-th largest of row i without column j; setting p_j
    between the K-th and (K+1)-th largest of ``a_ij - theta_ij`` over i makes exactly K rows keep
    column j. Gauss-Seidel sweeps over the columns shrink the column imbalance fast (mean excess of a
    random 8x8 tile at 4:8: 4.4 -> 1.0 -> 0.23 -> 0.04). Any p gives a start that is min-cost for its
    own column counts, so prices only save exchange rounds; they never change the optimum.
    """
    M, _, n = a.shape
    a = a.astype(np.float32)  # prices are a heuristic: single precision halves the memory traffic
    p = np.zeros((M, n), dtype=np.float32)
    cols = [a[:, j] for j in range(M)]  # a_ij - p_j per column, each (M_i, n)
    for _ in range(sweeps):
        for j in range(M):
            theta = _sort_desc(cols[:j] + cols[j + 1 :])[K - 1]  # (M_i, n)
            top = _sort_desc(list(a[:, j] - theta))  # over rows, each (n,)
            np.add(top[K - 1], top[K], out=p[j])
            p[j] *= 0.5
            cols[j] = a[:, j] - p[j]
    return p


_BIG = 1e300  # "no edge" cost; finite so that 0 * _BIG stays 0 in the branch-free arithmetic below


def _exchange_round(a0, forbid, sel, excess) -> np.ndarray:
    """One shortest exchange path per tile, applied in place; returns the tiles whose walk failed.

    a0 (M, M, n) magnitudes in [0, 1] (0 on padding), forbid (M, M, n) = _BIG on padding or None, sel
    (M, M, n) mask, excess (M, n) = kept per column minus its cap (> 0 source, < 0 sink); every tile
    has a source. Updates are branch-free arithmetic: masked numpy writes are 20-50x slower.
    """
    M, _, n = a0.shape
    leave = a0 + _BIG * ~sel  # [i, j]: col j -> row i, unselect (i, j), cost +a_ij
    enter = _BIG * sel - a0  # [i, j]: row i -> col j, select (i, j), cost -a_ij
    if forbid is not None:
        enter += forbid
    dist_c = _BIG * (excess <= 0)
    dist_r = np.full((M, n), _BIG)
    pred_c = np.full((M, n), -1, dtype=np.int16)  # row whose edge reached column j
    pred_r = np.full((M, n), -1, dtype=np.int16)  # column through which row i was reached
    buf = np.empty((M, n))
    better = np.empty((M, n), dtype=bool)
    step = np.empty((M, n), dtype=np.int16)
    # Bellman-Ford with strict improvements only: its predecessor graph stays a tree (there is no
    # negative cycle), so the walk below terminates even with tied magnitudes. A shortest path
    # visits at most M rows, so M + 1 passes settle it; the extra pass confirms convergence.
    for _ in range(M + 2):
        for j in range(M):
            np.add(dist_c[j], leave[:, j], out=buf)
            np.less(buf, dist_r, out=better)
            np.minimum(buf, dist_r, out=dist_r)
            np.subtract(np.int16(j), pred_r, out=step)
            step *= better
            pred_r += step
        improved = False
        for i in range(M):
            np.add(dist_r[i], enter[i], out=buf)
            np.less(buf, dist_c, out=better)
            if better.any():
                improved = True
                np.minimum(buf, dist_c, out=dist_c)
                np.subtract(np.int16(i), pred_c, out=step)
                step *= better
                pred_c += step
        if not improved:
            break
    tiles = np.arange(n)
    sink = (dist_c + _BIG * (excess >= 0)).argmin(0)
    failed = dist_c[sink, tiles] >= 0.5 * _BIG
    j = sink.copy()
    done = failed.copy()
    for _ in range(M + 1):
        i = pred_c[j, tiles].astype(np.intp)
        done |= i < 0
        live = np.flatnonzero(~done)
        if live.size == 0:
            break
        il, jl = i[live], j[live]
        sel[il, jl, live] = True
        jp = pred_r[il, live].astype(np.intp)
        sel[il, jp, live] = False
        j[live] = jp
    failed |= ~done
    ok = ~failed
    excess[sink[ok], tiles[ok]] += 1
    excess[j[ok], tiles[ok]] -= 1
    failed |= excess[j, tiles] < 0  # the walk must end at a source
    return failed


def _exact_chunk(a, rq, cq, K: int, sweeps: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact masks of tiles a (M, M, n) (-inf = padding): rows keep exactly rq, columns at most cq.

    Returns the masks and a flag per tile whose exchange walk failed (to be re-solved by the LP).
    """
    start = a - _column_prices(a, K, sweeps) if sweeps else a
    sel = _row_top(start, rq)
    excess = sel.sum(0, dtype=np.int16) - cq
    failed = np.zeros(a.shape[2], dtype=bool)
    ids = np.flatnonzero((excess > 0).any(0))
    if ids.size == 0:
        return sel, failed
    # Work on the unbalanced tiles only, compacting as they finish.
    w_sel, w_exc = np.take(sel, ids, axis=2), np.take(excess, ids, axis=1)
    a0 = np.take(a, ids, axis=2)
    real = np.isfinite(a0)
    forbid = None
    if not real.all():
        a0, forbid = np.where(real, a0, 0.0), _BIG * ~real
    while ids.size:
        bad = _exchange_round(a0, forbid, w_sel, w_exc)
        failed[ids[bad]] = True
        going = ~bad & (w_exc > 0).any(0)
        if going.all():
            continue
        sel[:, :, ids[~going]] = w_sel[:, :, ~going]
        keep = np.flatnonzero(going)
        ids = ids[keep]
        w_sel, w_exc = np.take(w_sel, keep, axis=2), np.take(w_exc, keep, axis=1)
        a0 = np.take(a0, keep, axis=2)
        if forbid is not None:
            forbid = np.take(forbid, keep, axis=2)
    return sel, failed


def _pow2_scale(x: np.ndarray) -> float:
    """A power of two that maps max(x) into (1/2, 1]: exact, and keeps every path cost << _BIG."""
    top = float(x.max(initial=0.0))
    return 2.0 ** -math.ceil(math.log2(top)) if top > 0 else 1.0


def _exact_full(mag: np.ndarray, M: int, K: int) -> np.ndarray:
    """Exact masks of a region (R, C) made of whole tiles (R, C multiples of M)."""
    R, C = mag.shape
    Rb, Cb = R // M, C // M
    tiles = mag.reshape(Rb, M, Cb, M).transpose(1, 3, 0, 2).reshape(M, M, Rb * Cb)
    scale = _pow2_scale(mag)
    kept = np.empty(tiles.shape, dtype=bool)
    for start in range(0, Rb * Cb, _CHUNK):
        sl = slice(start, start + _CHUNK)
        a = tiles[:, :, sl].astype(np.float64) * scale
        quota = np.full((M, a.shape[2]), K, dtype=np.int16)
        sel, failed = _exact_chunk(a, quota, quota, K, _SWEEPS)
        for t in np.flatnonzero(failed):
            sel[:, :, t] = _lp_tile(a[:, :, t], quota[:, t], quota[:, t])
        kept[:, :, sl] = sel
    return kept.reshape(M, M, Rb, Cb).transpose(2, 0, 3, 1).reshape(R, C)


def _exact_edge(mag: np.ndarray, M: int, K: int) -> np.ndarray:
    """Exact masks of an edge strip whose tiles are partial (padding never kept, quotas per tile)."""
    tiles = _to_tiles(mag.astype(np.float64) * _pow2_scale(mag), M, -np.inf)
    r, c = _tile_extent(mag.shape, M)
    # A tile whose columns bind (r * min(K, c) > c * min(K, r)) is solved transposed, so that rows are
    # always the side with an exact count: rows keep min(K, c), columns at most min(K, r).
    flip = r * np.minimum(K, c) > c * np.minimum(K, r)
    a = np.where(flip, tiles.transpose(1, 0, 2), tiles)
    r, c = np.where(flip, c, r), np.where(flip, r, c)
    wire = np.arange(M)[:, None]
    rq = np.where(wire < r, np.minimum(K, c), 0).astype(np.int16)
    cq = np.where(wire < c, np.minimum(K, r), 0).astype(np.int16)
    sel, failed = _exact_chunk(a, rq, cq, K, 0)
    for t in np.flatnonzero(failed):
        sel[:, :, t] = _lp_tile(a[:, :, t], rq[:, t], cq[:, t])
    return _from_tiles(np.where(flip, sel.transpose(1, 0, 2), sel), mag.shape)


def _lp_tile(a: np.ndarray, rq: np.ndarray, cq: np.ndarray) -> np.ndarray:
    """One tile by the HiGHS dual simplex (a vertex of a totally unimodular LP is integral)."""
    from scipy.optimize import linprog

    M = a.shape[0]
    allowed = np.isfinite(a)
    n = M * M
    a_eq = np.zeros((M, n))
    a_ub = np.zeros((M, n))
    for i in range(M):
        a_eq[i, i * M : (i + 1) * M] = 1.0
        a_ub[i, i::M] = 1.0
    bounds = [(0.0, 1.0 if ok else 0.0) for ok in allowed.ravel()]
    cost = -np.where(allowed, a, 0.0).ravel()
    res = linprog(cost, A_ub=a_ub, b_ub=cq, A_eq=a_eq, b_eq=rq, bounds=bounds, method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on a tile: {res.message}")
    return res.x.reshape(M, M) > 0.5


def _greedy_full(mag: np.ndarray, M: int, K: int, prune: bool = False) -> np.ndarray:
    """Greedy masks of a region (R, C) made of whole tiles (``prune``: the paper's prune-side rule)."""
    R, C = mag.shape
    Rb, Cb = R // M, C // M
    flat = mag.astype(np.float32).reshape(Rb, M, Cb, M).transpose(0, 2, 1, 3).reshape(Rb * Cb, M * M)
    packed, indexed = (_prune_packed, _prune_indexed) if prune else (_greedy_packed, _greedy_indexed)
    if M <= 8:
        kept = np.empty(flat.shape, dtype=bool)
        for start in range(0, flat.shape[0], _GREEDY_CHUNK):
            sl = slice(start, start + _GREEDY_CHUNK)
            kept[sl] = packed(flat[sl], M, K)
    else:
        kept = indexed(flat, M, K)
    return kept.reshape(Rb, Cb, M, M).transpose(0, 2, 1, 3).reshape(R, C)


def _greedy_edge(mag: np.ndarray, M: int, K: int, prune: bool = False) -> np.ndarray:
    """Greedy masks of an edge strip of partial tiles (padding = -inf, never kept)."""
    tiles = _to_tiles(mag.astype(np.float32), M, -np.inf)
    flat = np.ascontiguousarray(tiles.reshape(M * M, -1).T)
    kept = (_prune_indexed if prune else _greedy_indexed)(flat, M, K)
    return _from_tiles(np.ascontiguousarray(kept.T).reshape(M, M, -1), mag.shape)


def _sorted_keys(flat: np.ndarray) -> np.ndarray:
    """Unique ascending sort keys of flat (n, M*M <= 64) non-negative float32 magnitudes, per tile.

    Key = the float64 bit pattern of |w| (monotone for non-negative floats; a float32 value leaves the
    low 29 mantissa bits zero) OR-ed with ``63 - index``: among equal magnitudes the higher index
    sorts first, and the index is read back as ``63 - (key & 63)``.
    """
    key = flat.astype(np.float64).view(np.uint64) | (np.uint64(63) - np.arange(flat.shape[1], dtype=np.uint64))
    key.sort(axis=1)
    return key


def _unpack(bits: np.ndarray, size: int) -> np.ndarray:
    """uint64 (n,) bit sets -> bool (n, size), bit k = entry k."""
    bytes_ = bits.astype("<u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(bytes_, axis=1, bitorder="little")[:, :size].view(bool)


def _packed_slot(key: np.ndarray, m: np.uint64, bits: np.uint64):
    """For sorted keys (:func:`_sorted_keys`): the entry index and the bit offsets of its row's and
    column's counters in the packed words."""
    idx = np.uint64(63) - (key & np.uint64(63))
    return idx, (idx // m) * bits, (idx % m) * bits


def _below(counters: np.ndarray, shift: np.ndarray, field: np.uint64, limit: np.uint64) -> np.ndarray:
    """Whether the packed counter at bit offset ``shift`` is below ``limit``."""
    return ((counters >> shift) & field) < limit


def _greedy_packed(flat: np.ndarray, M: int, K: int) -> np.ndarray:
    """Greedy for whole tiles with M <= 8: flat (n, M*M) float32 magnitudes -> kept (n, M*M).

    Entries are visited by decreasing :func:`_sorted_keys` (ties to the lower index). Every tile's M
    row counters, M column counters (bits(K) bits each) and kept set (M*M <= 64 bits) live in three
    uint64 words, so each of the M*M visiting steps is a few elementwise operations over all tiles.
    """
    n, size = flat.shape
    visit = np.ascontiguousarray(_sorted_keys(flat)[:, ::-1].T)  # (M*M, n): k-th largest key of every tile
    bits = np.uint64(K.bit_length())
    field = np.uint64((1 << K.bit_length()) - 1)
    limit, m = np.uint64(K), np.uint64(M)
    rows = np.zeros(n, dtype=np.uint64)
    cols = np.zeros(n, dtype=np.uint64)
    kept = np.zeros(n, dtype=np.uint64)
    for k in range(size):
        idx, r_shift, c_shift = _packed_slot(visit[k], m, bits)
        ok = _below(rows, r_shift, field, limit) & _below(cols, c_shift, field, limit)
        one = ok.astype(np.uint64)
        rows += one << r_shift
        cols += one << c_shift
        kept |= one << idx
    return _unpack(kept, size)


def _greedy_indexed(flat: np.ndarray, M: int, K: int) -> np.ndarray:
    """Greedy with explicit counters and gathers: any M, padding (-inf) allowed. flat (n, M*M)."""
    n, size = flat.shape
    order = np.argsort(-flat, axis=1, kind="stable")
    real = np.take_along_axis(flat, order, axis=1) > -np.inf
    tiles = np.arange(n)
    row_count = np.zeros((n, M), dtype=np.int32)
    col_count = np.zeros((n, M), dtype=np.int32)
    kept = np.zeros((n, size), dtype=bool)
    for k in range(size):
        idx = order[:, k]
        r, c = idx // M, idx % M
        ok = (row_count[tiles, r] < K) & (col_count[tiles, c] < K) & real[:, k]
        row_count[tiles, r] += ok
        col_count[tiles, c] += ok
        kept[tiles, idx] = ok
    return kept


def _prune_packed(flat: np.ndarray, M: int, K: int) -> np.ndarray:
    """The paper's prune-side greedy for whole tiles with M <= 8: flat (n, M*M) float32 -> kept.

    Entries are visited by increasing :func:`_sorted_keys` (among ties the higher index is pruned
    first, the mirror of the keep-side greedy's ties to the lower index); entry (i, j) is pruned when
    row i or column j has fewer than N = M - K pruned. The counters saturate at N (only "< N" is
    ever asked), so a field of bits(N) bits per row and column suffices, packed as in
    :func:`_greedy_packed`.
    """
    n, size = flat.shape
    visit = np.ascontiguousarray(_sorted_keys(flat).T)  # (M*M, n): k-th smallest key of every tile
    N = M - K
    bits = np.uint64(N.bit_length())
    field = np.uint64((1 << N.bit_length()) - 1)
    limit, m = np.uint64(N), np.uint64(M)
    rows = np.zeros(n, dtype=np.uint64)
    cols = np.zeros(n, dtype=np.uint64)
    pruned = np.zeros(n, dtype=np.uint64)
    for k in range(size):
        idx, r_shift, c_shift = _packed_slot(visit[k], m, bits)
        row_short = _below(rows, r_shift, field, limit)
        col_short = _below(cols, c_shift, field, limit)
        rows += row_short.astype(np.uint64) << r_shift
        cols += col_short.astype(np.uint64) << c_shift
        pruned |= (row_short | col_short).astype(np.uint64) << idx
    return _unpack(~pruned, size)


def _prune_indexed(flat: np.ndarray, M: int, K: int) -> np.ndarray:
    """The paper's prune-side greedy with explicit counters: any M, padding (-inf) allowed.

    flat (n, M*M) -> kept (n, M*M). Padding sorts first and is pruned unconditionally: it counts
    towards its row's and column's N zeros (it is a zero of the padded tile), so a real line of c
    real entries prunes real entries only while it has fewer than N zeros in all.
    """
    n, size = flat.shape
    N = M - K
    # Ascending, ties to the higher index (as _prune_packed): a stable sort of the reversed tile.
    order = (size - 1) - np.argsort(flat[:, ::-1], axis=1, kind="stable")
    pad = np.take_along_axis(flat, order, axis=1) == -np.inf
    tiles = np.arange(n)
    row_count = np.zeros((n, M), dtype=np.int32)
    col_count = np.zeros((n, M), dtype=np.int32)
    pruned = np.zeros((n, size), dtype=bool)
    for k in range(size):
        idx = order[:, k]
        r, c = idx // M, idx % M
        cut = (row_count[tiles, r] < N) | (col_count[tiles, c] < N) | pad[:, k]
        row_count[tiles, r] += cut
        col_count[tiles, c] += cut
        pruned[tiles, idx] = cut
    return ~pruned


# --------------------------------------------------------------------------------------------------
# measures


def density(mask) -> float:
    """Fraction of kept entries, ``mean(mask)``."""
    m = _as_mask(mask)
    if m.size == 0:
        raise ValueError("mask is empty")
    return float(m.mean())


def retained_magnitude(w, mask) -> float:
    """Fraction of the L1 magnitude a mask keeps: ``sum(|w| * mask) / sum(|w|)`` (1.0 when w = 0)."""
    arr = _as_weights(w)
    m = _as_mask(mask)
    if arr.shape != m.shape:
        raise ValueError(f"w and mask must have the same shape, got {arr.shape} and {m.shape}")
    mag = np.abs(arr.astype(np.float64, copy=False))
    total = mag.sum()
    return float(mag[m].sum() / total) if total > 0 else 1.0


# --------------------------------------------------------------------------------------------------
# mask diversity


# The most column-count states transposable_count may track, C(M + k, k) with k = min(K, M − K):
# its time grows with them (measured on one CPU core: C = 74 613 (M = 16, k = 6) 0.3 s, 245 157
# (16, 7) 1.2 s, 593 775 (24, 6) 4.2 s, 735 471 (16, 8) 2.9 s); (17, 8) with 1 081 575 and
# (24, 12) with 1.25e9 are refused rather than left running for minutes or hours.
TRANSPOSABLE_STATES_LIMIT = 10**6


@cache
def transposable_count(*, keep: int, block: int) -> int:
    """R(M, K): number of M x M 0/1 matrices with exactly K ones in every row and every column.

    Dynamic programme over rows; the state is how many columns already hold 0, 1, ..., K ones
    (columns are interchangeable). A row picks x_s columns from the n_s columns holding s ones
    (sum_s x_s = K, s < K) in prod_s C(n_s, x_s) ways and moves them to s + 1; the picks are made
    one class at a time. R(M, K) = R(M, M − K) (complements), so K ≤ M/2 is counted.
    R(4, 2) = 90, R(8, 4) = 116 963 796 250.

    Cost: up to C(M + k, k) states, k = min(K, M − K); every block ≤ 12 takes under 0.2 s,
    M = 16 at most ~3 s (k = 8), M = 24 ~4 s at k = 6. Beyond ``TRANSPOSABLE_STATES_LIMIT``
    (10^6) states — e.g. keep=8, block=17 or keep=12, block=24, which would run for minutes to
    hours — it raises ValueError.
    """
    K, M = _check_keep_block(keep, block)
    K = min(K, M - K)
    states_bound = math.comb(M + K, K)
    if states_bound > TRANSPOSABLE_STATES_LIMIT:
        raise ValueError(
            f"transposable_count(keep={keep}, block={block}) is too costly to count exactly: its dynamic "
            f"programme tracks up to C(block + k, k) = {states_bound:.3g} states (k = min(keep, block - keep) "
            f"= {K}), beyond the limit of {TRANSPOSABLE_STATES_LIMIT:.0e} (~3 s); every block <= 16 is "
            f"allowed, larger ones for small or large keep only"
        )
    comb = [[math.comb(n, x) for x in range(K + 1)] for n in range(M + 1)]
    states = {(M,) + (0,) * K: 1}
    for row in range(M):
        # One row picks K columns class by class, from the fullest class down: a column moved up to
        # s + 1 is never picked again in the same row.
        partial = {(state, K): ways for state, ways in states.items()}
        for s in range(K - 1, -1, -1):
            nxt: dict[tuple[tuple[int, ...], int], int] = {}
            for (state, left), ways in partial.items():
                n = state[s]
                for x in range(left if s == 0 else 0, min(left, n) + 1):
                    new = list(state)
                    new[s] -= x
                    new[s + 1] += x
                    key = (tuple(new), left - x)
                    nxt[key] = nxt.get(key, 0) + ways * comb[n][x]
            partial = nxt
        # Every column needs K ones by the last row: drop states with a column too far behind.
        behind = K - (M - row - 1)
        states = {state: ways for (state, _), ways in partial.items() if behind <= 0 or not any(state[:behind])}
    return states.get((0,) * K + (M,), 0)


@dataclass(frozen=True)
class MaskDiversity:
    """Number of masks a structure allows on ``size`` weights at density keep/block.

    Attributes:
      kind: "unstructured", "nm" or "transposable".
      keep, block: K kept out of every M.
      size: number of weights T.
      log10: log10(count), from log-gamma for "unstructured" (cheap for any T).
      count: exact number of admissible masks (Python int), built on first access: for
        "unstructured" at a layer's size that is C(T, T·K/M) with millions of digits (about 30 s
        at T = 2.4 M), so ``log10`` is what tables should use.
    """

    kind: str
    keep: int
    block: int
    size: int
    log10: float

    @functools.cached_property
    def count(self) -> int:
        T, K, M = self.size, self.keep, self.block
        if self.kind == "unstructured":
            return math.comb(T, T * K // M)
        if self.kind == "nm":
            return math.comb(M, K) ** (T // M)
        return transposable_count(keep=K, block=M) ** (T // (M * M))

    def __repr__(self) -> str:
        # The count can exceed the float range, so its scientific form is built from log10.
        exponent = math.floor(self.log10)
        mantissa = 10 ** (self.log10 - exponent)
        return (
            f"MaskDiversity(kind={self.kind!r}, keep={self.keep}, block={self.block}, size={self.size}, "
            f"count~{mantissa:.4f}e+{exponent}, log10={self.log10:.3f})"
        )


def mask_diversity(kind: str, *, keep: int, block: int, size: int) -> MaskDiversity:
    """Mask diversity (MD): how many masks a structure admits on T = ``size`` weights at density K/M.

    ``size`` is the number of weights T (not tiles or groups):

      unstructured:  C(T, T*K/M)               (T*K/M must be an integer)
      nm:            C(M, K) ** (T / M)        (T a multiple of M)
      transposable:  R(M, K) ** (T / M**2)     (T a multiple of M**2; R from :func:`transposable_count`)

    One 8x8 tile (T = 64) at 50%: unstructured 1.833e18, 4:8 70**8, 2:4 6**16, T-4:8 R(8,4) =
    116 963 796 250, T-2:4 90**4.

    "transposable" costs what :func:`transposable_count` costs (up to ~3 s for block 16 at keep 8)
    and refuses blocks whose count would take minutes or more (e.g. keep=8, block=17).
    """
    K, M = _check_keep_block(keep, block)
    T = _check_int(size, "size")
    if T < 1:
        raise ValueError(f"size (number of weights) must be >= 1, got {T}")
    if kind == "unstructured":
        if (T * K) % M:
            raise ValueError(f"size * keep / block must be an integer for unstructured, got size={T}")
        k = T * K // M
        log10 = (math.lgamma(T + 1) - math.lgamma(k + 1) - math.lgamma(T - k + 1)) / math.log(10)
    elif kind == "nm":
        if T % M:
            raise ValueError(f"size must be a multiple of block={M} for 'nm', got size={T}")
        log10 = (T // M) * math.log10(math.comb(M, K))
    elif kind == "transposable":
        if T % (M * M):
            raise ValueError(f"size must be a multiple of block**2={M * M} for 'transposable', got {T}")
        log10 = (T // (M * M)) * math.log10(transposable_count(keep=K, block=M))
    else:
        raise ValueError(f"kind must be 'unstructured', 'nm' or 'transposable', got {kind!r}")
    return MaskDiversity(kind=kind, keep=K, block=M, size=T, log10=log10)


# --------------------------------------------------------------------------------------------------
# sparse training: the layers of a network, masks of kernels, the straight-through product


@dataclass(frozen=True)
class GemmLayer:
    """One conv/dense product of a network (a :class:`landscape.layers.QuantConv` / ``QuantDense``).

    Attributes:
      path: the Flax module path, e.g. ``("layer1_0", "conv1")``: the kernel is
        ``params[path]["kernel"]`` and a mask ``masks[path]["kernel"]``.
      shape: the kernel's shape, ``(H, W, Cin, Cout)`` or ``(in, out)`` (a grouped conv's is
        ``(H, W, Cin / g, Cout)``).
      index: position in call order.
      groups: the conv's ``feature_group_count`` g (1: dense layers and ordinary convs).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    index: int
    groups: int = 1

    @property
    def name(self) -> str:
        """The "/"-joined module path (the name of its quantization site)."""
        return "/".join(self.path)


def gemm_layers(model, variables, x) -> tuple[GemmLayer, ...]:
    """Every conv/dense product of ``model.apply(variables, x, train=False)``, in call order.

    Found by abstract tracing (``jax.eval_shape``) with a recording GEMM hook, so nothing is computed;
    a module applied twice is listed once. ``x`` is an example batch (one image is enough).
    """
    found: dict[tuple[str, ...], tuple[tuple[int, ...], int]] = {}

    def record(module, inputs, kernel, gemm):
        found.setdefault(tuple(module.path), (tuple(int(d) for d in kernel.shape), layers.feature_groups(gemm)))
        return gemm(inputs, kernel)

    def run(v, inputs):
        with layers.gemm_hook(record):
            return model.apply(v, inputs, train=False)

    jax.eval_shape(run, variables, x)
    return tuple(GemmLayer(path, shape, i, groups) for i, (path, (shape, groups)) in enumerate(found.items()))


def refuse_grouped(chosen, method: str, hint: str = "") -> None:
    """A ValueError naming the first grouped/depthwise conv among ``chosen`` (:class:`GemmLayer`):
    K:M masks group the rows of the GEMM matrix ``(H*W*Cin, Cout)`` and, transposable, its columns,
    but a grouped conv is g separate products (a depthwise one's reduction is its H*W taps alone)."""
    for layer in chosen:
        if layer.groups > 1:
            raise ValueError(f"{method}: layer {layer.name!r} is a grouped convolution (feature_group_count="
                             f"{layer.groups}, kernel {layer.shape}); grouped/depthwise convolutions are not "
                             f"supported by K:M sparsity{hint}")


def check_grouped_masks(chosen, *, block: int, transposable: bool, method: str) -> None:
    """A ValueError naming the first grouped conv among ``chosen`` that K:M masks cannot serve.

    A grouped conv's GEMM matrix ``(H*W*Cin/g, Cout)`` is g products side by side, group j on the
    columns ``[j*Cout/g, (j+1)*Cout/g)``, each column still the reduction of one output channel.
    Plain K:M groups entries along that reduction, so it fits any g. A transposable mask also makes
    every row K:M along the columns of an M x M tile, and the backward data gradient of an input
    channel of group j reads that row over group j's columns only: the tiles must not straddle two
    groups, so M must divide Cout/g (a depthwise conv with one output per channel has Cout/g = 1).
    """
    if not transposable:
        return
    for layer in chosen:
        per_group = layer.shape[-1] // layer.groups
        if layer.groups > 1 and per_group % block:
            raise ValueError(
                f"{method}: layer {layer.name!r} is a grouped convolution (feature_group_count={layer.groups}, "
                f"kernel {layer.shape}) with Cout/g = {per_group} output channels per group; a transposable "
                f"K:M mask needs block={block} to divide Cout/g, so that no M x M tile straddles two groups. "
                "Pass transposable=False (plain K:M along each output channel's reduction, valid for any "
                "group count) or leave the layer dense by naming the others in layers=[...]"
            )


def select_layers(all_layers, *, dense_first_last: bool = True, names=None) -> tuple[GemmLayer, ...]:
    """The layers to make sparse, in call order.

    ``names`` ("/"-joined module paths) picks layers explicitly; otherwise every layer, except — with
    ``dense_first_last`` — the first and the last in call order (stem and classifier), as for
    quantization in the LAPQ reference.
    """
    all_layers = tuple(all_layers)
    if not isinstance(dense_first_last, bool):
        raise ValueError(f"dense_first_last must be True or False, got {dense_first_last!r}")
    if names is None:
        return all_layers[1:-1] if dense_first_last else all_layers
    wanted = [names] if isinstance(names, str) else list(names)
    known = {layer.name for layer in all_layers}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(
            f"unknown layer name(s) {unknown}; the network's conv/dense layers are {sorted(known)}"
        )
    return tuple(layer for layer in all_layers if layer.name in set(wanted))


def layer_mask(kernel, *, keep: int, block: int, transposable: bool = True,
               method: str = "greedy", layout: str = "gemm") -> np.ndarray:
    """Mask of a layer kernel ``(..., Cin, Cout)``.

    ``transposable=True``: a transposable mask by ``method`` ("exact", "greedy" or "greedy_prune",
    see :func:`transposable_mask`) on the M x M tiles that ``layout`` names:

    * ``"gemm"`` (default): tiles of the GEMM matrix ``(R, C)`` (:func:`gemm_matrix`), so it
      (forward, groups along R) and its transpose (backward data gradient, groups along C) are
      both K:M;
    * ``"reference"``: the N:M reference code's tiles, consecutive M*M chunks of one output filter
      (:func:`reference_mask`). Same number of constraints and mask diversity, but no backward
      sparsity: the mask is K:M along R, not along C.

    ``transposable=False``: :func:`nm_mask` along the reduction axis (``axis=0``, the forward GEMM);
    it is exact, and ``method`` and ``layout`` are only validated (a group of M consecutive rows of a
    GEMM column is M consecutive entries of one filter, so both layouts give the same groups).

    Returns a boolean mask of ``kernel.shape``.
    """
    _check_choice(method, "method", TRANSPOSABLE_METHODS)
    _check_choice(layout, "layout", LAYOUTS)
    if not isinstance(transposable, bool):
        raise ValueError(f"transposable must be True or False, got {transposable!r}")
    if transposable and layout == "reference":
        return reference_mask(kernel, keep=keep, block=block, method=method)
    w = gemm_matrix(kernel)
    if transposable:
        mask = transposable_mask(w, keep=keep, block=block, method=method)
    else:
        mask = nm_mask(w, keep=keep, block=block, axis=0)
    return mask.reshape(np.shape(kernel))


def reference_mask(kernel, *, keep: int, block: int, method: str = "exact") -> np.ndarray:
    """Transposable K:M mask in the N:M reference code's layout: tiles are chunks of one filter.

    Output filter c's weights ``v_c = kernel[..., c].ravel()`` (length L = H*W*Cin in (H, W, Cin)
    order: PyTorch's (Cout, Cin, kh, kw) permuted to NHWC and flattened per filter, as the
    reference's ``prune/*``) are padded to a multiple of M*M and cut into chunks; chunk k, reshaped
    row-major to (M, M), is a tile:

        tile[c, k][i, j] = v_c[k*M*M + i*M + j]

    and gets K kept per row and column by ``method`` (see :func:`transposable_mask`). A Dense
    kernel ``(in, out)`` is a 1 x 1 conv: output column c's vector ``kernel[:, c]`` (the row of
    PyTorch's Linear weight) is chunked.

    A last chunk with l = q*M + s < M*M real entries (rows 0..q-1 real, row q holds s) is
    padded with entries never kept. "exact" keeps ``min(K, real entries)`` in each of its rows,
    ``q*K + min(K, s)`` in all (the most possible with at most K per row and column), with at most
    ``min(K, real rows)`` per column; "greedy" keeps at most K per row and column; "greedy_prune"
    counts the padding as pruned (module docstring, "Greedy"). The reference code instead pads with
    zeros that may be kept, so its last chunk can keep fewer real weights.

    Args:
      kernel: ``(..., Cin, Cout)`` array, real and finite (at least 2-D).
      keep, block: K kept per row and column of every M x M chunk.
      method: "exact", "greedy" or "greedy_prune".

    Returns:
      bool mask of ``kernel.shape``: K:M along the reduction axis of the GEMM matrix (each chunk row
      is M consecutive entries of one filter), but in general not K:M along its output channels
      (the chunk columns are strided entries of one filter, not M output channels).
    """
    K, M = _check_keep_block(keep, block)
    _check_choice(method, "method", TRANSPOSABLE_METHODS)
    arr = _as_weights(kernel, "kernel")
    if arr.ndim < 2:
        raise ValueError(f"kernel must have at least 2 dimensions (..., Cin, Cout), got shape {arr.shape}")
    vec = _magnitudes(gemm_matrix(arr)).T  # (Cout, L): row c is v_c
    C, L = vec.shape
    n_full, tail = divmod(L, M * M)
    out = np.zeros((C, L), dtype=bool)
    if n_full and C:
        # Chunk (c, k) as the tile (c, k) of a (C*M, n_full*M) matrix of whole tiles.
        head = vec[:, : n_full * M * M].reshape(C, n_full, M, M).transpose(0, 2, 1, 3).reshape(C * M, n_full * M)
        kept = _solvers(method)[0](head, M, K)
        out[:, : n_full * M * M] = kept.reshape(C, M, n_full, M).transpose(0, 2, 1, 3).reshape(C, -1)
    if tail and C:
        out[:, n_full * M * M :] = _last_chunks(vec[:, n_full * M * M :], M, K, method)
    return out.T.reshape(arr.shape)


def _last_chunks(vec: np.ndarray, M: int, K: int, method: str) -> np.ndarray:
    """Masks of the partial last chunks ``vec`` (C, l), 0 < l < M*M, of every filter -> bool (C, l)."""
    C, l = vec.shape
    flat = np.full((C, M * M), -np.inf, dtype=np.float64)
    flat[:, :l] = vec
    if method != "exact":
        solve = _prune_indexed if method == "greedy_prune" else _greedy_indexed
        return solve(flat.astype(np.float32), M, K)[:, :l]
    q, s = divmod(l, M)
    wire = np.arange(M)
    # Rows keep exactly min(K, real entries); a column keeps at most min(K, real rows). Feasible (a
    # Gale-Ryser count over the q full rows, after row q has taken its min(K, s) first columns), so
    # every row reaches its bound: the most entries any mask with <= K per row and column can keep.
    rq = np.select([wire < q, wire == q], [K, min(K, s)], 0).astype(np.int16)
    cq = np.minimum(K, q + (wire < s)).astype(np.int16)
    a = np.ascontiguousarray(flat.reshape(C, M, M).transpose(1, 2, 0)) * _pow2_scale(vec)
    rq, cq = np.repeat(rq[:, None], C, 1), np.repeat(cq[:, None], C, 1)
    sel, failed = _exact_chunk(a, rq, cq, K, 0)
    for t in np.flatnonzero(failed):
        sel[:, :, t] = _lp_tile(a[:, :, t], rq[:, t], cq[:, t])
    return sel.transpose(2, 0, 1).reshape(C, M * M)[:, :l]


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ste_mask(w, mask, decay):
    return w * mask.astype(w.dtype)


def _ste_mask_fwd(w, mask, decay):
    return w * mask.astype(w.dtype), (w, mask)


def _ste_mask_bwd(decay, residuals, g):
    w, mask = residuals
    if decay:
        g = g + decay * jnp.where(mask, 0.0, w).astype(g.dtype)
    return g, None


_ste_mask.defvjp(_ste_mask_fwd, _ste_mask_bwd)


def ste_mask(w, mask, *, decay: float = 0.0):
    """``w * mask`` with a straight-through gradient and the SR-STE decay on pruned weights.

    Args:
      w: weights, any shape (float).
      mask: boolean array of ``w``'s shape (True = kept); it receives no gradient.
      decay: λ >= 0, the extra decay of pruned weights.

    The forward is ``w~ = w * mask``; for a cotangent g = dL/dw~ the backward returns

        dL/dw = g + λ (1 - mask) * w

    i.e. the dense gradient of the masked forward reaches every weight (pruned ones included, so
    they can re-enter when the mask is recomputed) and pruned weights decay towards zero.
    """
    if np.shape(mask) != np.shape(w):  # a broadcast mask would prune whole rows or columns silently
        raise ValueError(f"mask has shape {np.shape(mask)}; it must have the weights' shape {np.shape(w)}")
    return _ste_mask(w, mask, _check_decay(decay))


def _check_decay(decay) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not (
        math.isfinite(decay) and decay >= 0
    ):
        raise ValueError(f"decay must be a finite number >= 0, got {decay!r}")
    return float(decay)


def _flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def effective_params(variables) -> dict:
    """``variables["params"]`` with every masked kernel replaced by ``kernel * mask``.

    These are the weights the sparse network computes with (layers without an entry in the
    ``"masks"`` collection are unchanged). Use them wherever a network is evaluated without the
    recipe's GEMM hook (e.g. plain ``model.apply``).
    """
    params = _flat(variables["params"])
    for path, mask in _flat(variables.get("masks", {})).items():
        if path not in params:
            raise ValueError(f"mask {'/'.join(path)} has no matching parameter")
        params[path] = params[path] * jnp.asarray(mask, dtype=params[path].dtype)
    return flax.traverse_util.unflatten_dict(params)


def apply_masks(net: train.Network) -> train.Network:
    """The same network with every masked kernel stored as ``kernel * mask`` (masks kept).

    A network trained with :class:`Recipe` keeps dense kernels (the straight-through weights) and
    applies its masks in its GEMM hook, which only ``Network.apply``/``accuracy`` use. Tools that
    apply the model without the recipe's hook (BN folding, weight-space spectra of
    ``net.variables``) see the sparse network after this call; ``ClipLoss`` applies the masks itself.
    """
    variables = {**flax.core.unfreeze(net.variables), "params": effective_params(net.variables)}
    return dataclasses.replace(net, variables=variables, path=None)


@dataclass(frozen=True, repr=False, kw_only=True)
class Recipe(train.Recipe):
    """Sparse training with (transposable) K:M masks: ``fit(model, data, recipe=Recipe(...))``.

    Args:
      keep, block: K weights kept out of every M (``keep=4, block=8`` is 4:8, 50% sparse).
      transposable: transposable masks (K per row *and* column of every M x M tile of the GEMM
        matrix) or plain K:M groups along the reduction axis.
      update_every: masks are recomputed from |W| after every ``update_every``-th step.
      decay: SR-STE decay λ of pruned weights (:func:`ste_mask`), added to the optimizer's weight
        decay.
      dense_first_last: keep the first and last conv/dense layers (call order) dense.
      init_method: solver of the initial transposable masks: "exact" (as the reference's IP
        initialisation), "greedy" or "greedy_prune" (:func:`transposable_mask`).
      update_method: solver of the transposable masks recomputed every ``update_every`` steps:
        "greedy" (the reference code's approx2, default), "greedy_prune" (the paper's prune-side
        2-approximation, which keeps fewer weights) or "exact".
      layout: "gemm" (default) tiles the GEMM matrix, so the backward data gradient is K:M too;
        "reference" uses the reference code's per-filter chunks, for bit-parity experiments (no
        backward sparsity; :func:`reference_mask`). Plain K:M masks are the same in both.
      layers: the "/"-joined module paths of the layers to make sparse (in place of
        ``dense_first_last``'s choice), e.g. to leave a MobileNet's depthwise layers dense.

    Grouped and depthwise convolutions take plain K:M masks along each output channel's reduction;
    transposable ones need M to divide their output channels per group (:func:`check_grouped_masks`).

    The masks are a ``"masks"`` collection (see the module docstring), so a trained
    :class:`landscape.train.Network` carries them and evaluates sparse.
    """

    keep: int = 4
    block: int = 8
    transposable: bool = True
    update_every: int = 40
    decay: float = 2e-4
    dense_first_last: bool = True
    init_method: str = "exact"
    layers: tuple[str, ...] | None = None
    update_method: str = "greedy"
    layout: str = "gemm"

    def __post_init__(self):
        K, M = _check_keep_block(self.keep, self.block)
        if self.layers is not None:
            names = (self.layers,) if isinstance(self.layers, str) else self.layers
            try:
                names = tuple(names)
            except TypeError:
                names = None
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"layers must be None or a non-empty sequence of layer names ('/'-joined module "
                                 f"paths), got {self.layers!r}")
            object.__setattr__(self, "layers", names)
        for name in ("transposable", "dense_first_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        every = _check_int(self.update_every, "update_every")
        if every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {every}")
        _check_choice(self.init_method, "init_method", TRANSPOSABLE_METHODS)
        _check_choice(self.update_method, "update_method", TRANSPOSABLE_METHODS)
        _check_choice(self.layout, "layout", LAYOUTS)
        object.__setattr__(self, "keep", K)
        object.__setattr__(self, "block", M)
        object.__setattr__(self, "update_every", every)
        object.__setattr__(self, "decay", _check_decay(self.decay))

    @property
    def structure(self) -> str:
        """"T-4:8" (transposable) or "4:8"."""
        return f"{'T-' if self.transposable else ''}{self.keep}:{self.block}"

    def layer_mask(self, kernel, method: str) -> np.ndarray:
        """This recipe's mask of one kernel (see :func:`layer_mask`)."""
        return layer_mask(kernel, keep=self.keep, block=self.block, transposable=self.transposable,
                          method=method, layout=self.layout)

    def init_variables(self, model, variables, x):
        chosen = select_layers(gemm_layers(model, variables, x[:1]), dense_first_last=self.dense_first_last,
                               names=self.layers)
        # Reference-layout chunks lie inside one filter, so no tile straddles two groups of a grouped conv.
        check_grouped_masks(chosen, block=self.block, transposable=self.transposable and self.layout == "gemm",
                            method=f"{self!r}")
        if not chosen:
            raise ValueError(
                f"{self!r} leaves no layer to sparsify: the model has "
                f"{len(gemm_layers(model, variables, x[:1]))} landscape.layers conv/dense layer(s) (flax.linen's "
                f"own are not seen) and dense_first_last={self.dense_first_last}"
            )
        params = _flat(variables["params"])
        masks = {
            layer.path + ("kernel",): jnp.asarray(self.layer_mask(params[layer.path + ("kernel",)],
                                                                  self.init_method))
            for layer in chosen
        }
        return {**variables, "masks": flax.traverse_util.unflatten_dict(masks)}

    def update_masks(self, variables, method: str | None = None) -> dict:
        """Masks recomputed from the current kernels (by ``method``, default ``update_method``), for the
        layers that already have one."""
        method = self.update_method if method is None else method
        params = _flat(variables["params"])
        paths = _flat(variables["masks"])
        masks = {path: jnp.asarray(self.layer_mask(params[path], method)) for path in paths}
        return flax.traverse_util.unflatten_dict(masks)

    def after_step(self, step: int, variables):
        # Host side, between jitted steps: only every update_every-th step pays for the solver.
        if step % self.update_every or "masks" not in variables:
            return variables
        return {**variables, "masks": self.update_masks(variables)}

    def gemm_hook(self, phase: str):
        if phase not in ("train", "eval"):
            raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
        decay = self.decay

        def train_hook(module, x, kernel, gemm):
            if not module.has_variable("masks", "kernel"):
                return gemm(x, kernel)
            return gemm(x, ste_mask(kernel, module.get_variable("masks", "kernel"), decay=decay))

        def eval_hook(module, x, kernel, gemm):
            if not module.has_variable("masks", "kernel"):
                return gemm(x, kernel)
            mask = module.get_variable("masks", "kernel")
            return gemm(x, kernel * jnp.asarray(mask).astype(kernel.dtype))

        return train_hook if phase == "train" else eval_hook

    def __repr__(self) -> str:
        return (
            f"sparsity.Recipe(keep={self.keep}, block={self.block}, transposable={self.transposable}, "
            f"update_every={self.update_every}, decay={self.decay!r}, "
            f"dense_first_last={self.dense_first_last}, init_method={self.init_method!r}"
            # only when given, so that the cache keys of networks trained before the options stay the same
            + ("" if self.layers is None else f", layers={self.layers!r}")
            + ("" if self.update_method == "greedy" else f", update_method={self.update_method!r}")
            + ("" if self.layout == "gemm" else f", layout={self.layout!r}") + ")"
        )
