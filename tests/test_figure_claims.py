"""The verdict logic of paper_repro's claims on hand-made figure data (no run): a claim passes only
for the quantity it names, and degenerate inputs fail with a readable row instead of passing or
raising."""

from __future__ import annotations

import importlib

import numpy as np

f2 = importlib.import_module("figures.f2_hessians")
f3 = importlib.import_module("figures.f3_separability")


def _f3_data(trace, offdiag, fd_trace):
    """F3 data at 2 and 4 bits: STE trace and off-diagonal ratio, FD trace (bit → value)."""
    data = {"bits": [2, 4]}
    for b in (2, 4):
        data[str(b)] = {"act_ste": {"trace": trace[b], "offdiag_ratio": offdiag[b]},
                        "act_fd": {"trace": fd_trace[b], "offdiag_ratio": 0.1}}
    return data


def _verdicts(data):
    return {c.id: c for c in f3.claims(data, None)}


def test_f3_c1_c2_pass_on_growing_curvature_and_coupling():
    rows = _verdicts(_f3_data({2: 1.0, 4: 0.1}, {2: 0.5, 4: 0.25}, {2: 2.0, 4: 0.5}))
    assert rows["C1"].passed and rows["C2"].passed
    assert rows["C1"].ours == "10.0× (trace 0.1 → 1)" and "FD (true-loss) trace ratio 4.0×" in rows["C1"].note


def test_f3_c1_fails_for_negative_traces_and_c2_for_two_diagonal_hessians():
    rows = _verdicts(_f3_data({2: -1.0, 4: -0.1}, {2: 0.0, 4: 0.0}, {2: -2.19, 4: 0.0169}))
    assert not rows["C1"].passed  # -1 / -0.1 = 10 is no growth of curvature
    assert not rows["C2"].passed  # 0 → 0 passed "2-bit ≥ 1.2 × 4-bit"
    assert "not both positive, no ratio" in rows["C1"].note


def test_f3_c1_with_a_zero_fd_trace_is_a_row_not_a_crash():
    rows = _verdicts(_f3_data({2: 1.0, 4: 0.1}, {2: 0.5, 4: 0.25}, {2: 1.0, 4: 0.0}))
    assert rows["C1"].passed and "0 → 1: not both positive" in rows["C1"].note


def test_f2_coupling_by_distance_leaves_out_zero_diagonals():
    H = np.diag([2.0, 0.0, 3.0, 4.0, 1.0])
    H[0, 1] = H[1, 0] = 0.5  # a pair with H_11 = 0: no coupling; the 1e-30 floor made it 2.5e29
    H[2, 3] = H[3, 2] = 0.6
    H[0, 4] = H[4, 0] = 0.1
    adjacent, distant = f2.coupling_by_distance(H)
    # adjacent pairs (0,1) left out, (1,2) left out, (2,3) 0.6/√12, (3,4) 0
    assert np.isclose(adjacent, (0.6 / np.sqrt(12) + 0.0) / 2)
    # distant pairs |i−j| ≥ 2.5: (0,3) 0, (0,4) 0.1/√2, (1,4) left out
    assert np.isclose(distant, (0.0 + 0.1 / np.sqrt(2)) / 2)
