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


def _f3_flat_toy_gamma(flat, toy, gamma):
    """F3 data at 2, 4 and 8 bits for C3, C4 and C5: flat fraction, toy interaction fraction and γ
    (bit → value)."""
    data = {"bits": [2, 4, 8]}
    for b in (2, 4, 8):
        data[str(b)] = {"flat_fraction": flat[b], "toy": {"interaction": toy[b]}, "gamma": gamma[b], "T": 1.0,
                        "act_ste": {"trace": 1.0, "offdiag_ratio": 0.5}, "act_fd": {"trace": 1.0, "offdiag_ratio": 0.5}}
    return data


def test_f3_c3_needs_a_flat_region_that_shrinks_to_half_and_never_grows():
    """C3 passes for f(2) ≤ 0.5·f(8) with f non-increasing from 8 to 2 bits, and fails for a landscape
    that gets flatter at low bits (the verdict with f(8) and f(2) swapped passed it) or one whose flat
    fraction rises somewhere on the way down (a monotonicity test read the wrong way round)."""
    toy, gamma = {2: 0.5, 4: 0.1, 8: 0.05}, {2: 3.0, 4: 1.0, 8: 0.0}
    c3 = lambda flat: _verdicts(_f3_flat_toy_gamma(flat, toy, gamma))["C3"]  # noqa: E731
    assert c3({2: 0.1, 4: 0.3, 8: 0.7}).passed
    assert c3({2: 0.35, 4: 0.5, 8: 0.7}).passed  # exactly half: "f(2) ≤ 0.5·f(8)"
    assert c3({2: 0.1, 4: 0.3, 8: 0.7}).ours == "0.700 / 0.300 / 0.100 at 8/4/2 bits"
    assert not c3({2: 0.7, 4: 0.3, 8: 0.1}).passed  # flatter at 2 bits: the reverse of the claim
    assert not c3({2: 0.4, 4: 0.5, 8: 0.7}).passed  # monotone but 0.4 > 0.35
    assert not c3({2: 0.1, 4: 0.8, 8: 0.7}).passed  # small at 2 bits, but rises from 8 to 4


def test_f3_c4_needs_gamma_rising_at_each_step_down():
    """C4 is γ(2) > γ(4) > γ(8): γ(4) below γ(8) fails even when γ(2) is the largest (a check of the
    ends only passed it)."""
    flat, toy = {2: 0.1, 4: 0.3, 8: 0.7}, {2: 0.5, 4: 0.1, 8: 0.05}
    c4 = lambda gamma: _verdicts(_f3_flat_toy_gamma(flat, toy, gamma))["C4"]  # noqa: E731
    assert c4({2: 20.4, 4: 0.035, 8: -0.003}).passed  # the paper's values
    assert not c4({2: 20.4, 4: -0.5, 8: 0.1}).passed
    assert not c4({2: 0.01, 4: 0.5, 8: -0.003}).passed


def test_f3_c5_needs_the_2_bit_interaction_at_twice_the_8_bit_one():
    """C5's threshold is "2-bit ≥ 2 × 8-bit": a 2-bit interaction only 1.5 × the 8-bit one fails (the
    verdict without the factor 2 passed it), one 2.5 × passes."""
    flat, gamma = {2: 0.1, 4: 0.3, 8: 0.7}, {2: 3.0, 4: 1.0, 8: 0.0}
    c5 = lambda toy: _verdicts(_f3_flat_toy_gamma(flat, toy, gamma))["C5"]  # noqa: E731
    assert c5({2: 0.25, 4: 0.12, 8: 0.1}).passed
    assert c5({2: 0.2, 4: 0.12, 8: 0.1}).passed  # exactly 2×
    assert not c5({2: 0.15, 4: 0.12, 8: 0.1}).passed
    assert not c5({2: 0.05, 4: 0.12, 8: 0.1}).passed


def test_f2_c6_needs_adjacent_coupling_at_twice_the_distant_one():
    """C6 is "adjacent ≥ 2 × distant": coupling 1.5× the distant one fails (the verdict without the
    factor passed it), 3× passes, and a missing 2-bit Hessian gives no row."""

    def hessian(adjacent, distant, n=6):
        H = np.eye(n)
        for i in range(n - 1):
            H[i, i + 1] = H[i + 1, i] = adjacent
        for i in range(n):
            for j in range(i + 3, n):
                H[i, j] = H[j, i] = distant
        return H

    def c6(adjacent, distant):
        H = hessian(adjacent, distant)
        assert np.allclose(f2.coupling_by_distance(H), (adjacent, distant))
        (row,) = f2.claims({"2": {"ste": H.tolist(), "fd": H.tolist()}}, None)
        assert row.id == "C6"
        return row

    assert c6(0.3, 0.1).passed
    assert c6(0.2, 0.1).passed  # exactly 2×
    assert not c6(0.15, 0.1).passed
    assert not c6(0.05, 0.1).passed
    assert c6(0.3, 0.1).ours == "adjacent 0.300 vs distant 0.100 (STE, A2)"
    assert f2.claims({"4": {}}, None) == []


def test_f2_distant_pairs_start_at_half_the_sites():
    """|i − j| ≥ n/2 counts as distant, n/2 itself included: with 6 sites the pairs 3 apart are distant
    (a strict > left out the three pairs 3 apart)."""
    H = np.eye(6)
    H[0, 3] = H[3, 0] = 0.4  # 3 apart: distant
    _, distant = f2.coupling_by_distance(H)
    # distant pairs: (0,3) (1,4) (2,5) at distance 3, (0,4) (1,5) at 4, (0,5) at 5
    assert np.isclose(distant, 0.4 / 6)


def test_f4_c7_is_the_lowest_width_with_an_interior_p_star():
    """C7 is judged at the lowest bit width (the highest one's fit was judged instead) and asks for
    2 < p* < 4.5 with a convex fit: p* below 2 fails."""
    f4 = importlib.import_module("figures.f4_p_sweep")

    def data(low, high):
        return {"2": dict(zip(("r2", "p_star", "rule"), low, strict=True)),
                "4": dict(zip(("r2", "p_star", "rule"), high, strict=True))}

    def c7(low, high):
        (row,) = f4.claims(data(low, high), None)
        return row

    assert c7((0.94, 3.6, "vertex"), (0.39, 4.4, "vertex")).passed
    row = c7((0.5, 3.6, "vertex"), (0.95, 3.2, "vertex"))  # a poor fit at 2 bits fails, whatever 4 bits says
    assert not row.passed and row.ours.startswith("W2A2: R² 0.50")
    assert not c7((0.94, 1.5, "vertex"), (0.95, 3.2, "vertex")).passed  # p* at the grid's low side
    assert not c7((0.94, 3.6, "edge"), (0.95, 3.2, "vertex")).passed  # no convex fit
    assert not c7((0.94, 4.6, "vertex"), (0.95, 3.2, "vertex")).passed


def test_f6_c10_compares_the_worst_start_of_each_method():
    """C10 is "Powell's worst ≥ CD's worst" over the three starts: a Powell run collapsing from one
    start fails against a CD that never collapses, even when Powell's best start beats CD's best."""
    f6 = importlib.import_module("figures.f6_convergence")

    def data(powell, cd):
        runs = {}
        for method, accs in (("powell", powell), ("cd", cd), ("batched", (0.9, 0.9, 0.9))):
            for start, acc in zip(f6.STARTS, accs, strict=True):
                runs[f"{method}/{start}"] = {"test_acc": acc}
        return {"runs": runs, "config": "W3A32"}

    (row,) = f6.claims(data(powell=(0.99, 0.2, 0.95), cd=(0.9, 0.9, 0.9)), None)
    assert not row.passed and row.ours == "worst Powell 20.0% vs worst CD 90.0% (W3A32)"
    (row,) = f6.claims(data(powell=(0.92, 0.91, 0.95), cd=(0.99, 0.05, 0.9)), None)
    assert row.passed


def test_f7_c13_fails_a_drop_at_the_largest_size():
    """C13's saturation is |acc(last) − acc(second last)| ≤ 1 point: a 5-point drop at the largest
    calibration set fails (a signed difference passed it), as does a fall below the smallest size."""
    f7 = importlib.import_module("figures.f7_calib_size")

    def c13(accs):
        sizes = [32, 64, 128, 256]
        (row,) = f7.claims({"sizes": sizes, "lapq_acc": {str(s): [a, a] for s, a in zip(sizes, accs, strict=True)},
                            "config": "W4A4"}, None)
        return row

    assert c13([0.50, 0.55, 0.598, 0.599]).passed
    assert not c13([0.50, 0.55, 0.60, 0.55]).passed  # drops 5 points at the end
    assert not c13([0.50, 0.55, 0.60, 0.68]).passed  # still rising by 8 points
    assert not c13([0.60, 0.55, 0.50, 0.50]).passed  # below the smallest size
    assert f7.claims({"sizes": [32, 64], "lapq_acc": {}, "config": "W4A4"}, None) == []


def test_f8_c12_holds_a_line_fit_to_r2_of_0_9():
    """C12 fails at R² 0.85, below its printed threshold "R² ≥ 0.9"."""
    f8 = importlib.import_module("figures.f8_line")
    assert f8.claims({"r2": 0.95, "config": "W2A4"}, None)[0].passed
    assert f8.claims({"r2": 0.9, "config": "W2A4"}, None)[0].passed
    assert not f8.claims({"r2": 0.85, "config": "W2A4"}, None)[0].passed


def test_every_numeric_threshold_is_the_one_its_row_prints():
    """The report prints each claim's threshold text and judges by the numbers beside it: the two must
    say the same (a C1 ratio of 0.4 judged what the report called "ratio ≥ 4")."""
    from figures import claims

    for claim_id, c in claims.CLAIMS.items():
        for key in ("min_ratio", "min_r2", "min_gain", "max_gap", "max_last_gap", "max_low_over_high"):
            if key in c:
                value = c[key]
                text = f"{value:g}"
                assert text in c["threshold"], (claim_id, key, value, c["threshold"])
    rows = _verdicts(_f3_data({2: 0.39, 4: 0.1}, {2: 0.5, 4: 0.25}, {2: 2.0, 4: 0.5}))
    assert not rows["C1"].passed  # 3.9× < 4×


def _t1_data(acc):
    """T1 data: configuration → row → accuracy (one seed)."""
    return {"configs": [[name, 0, 0] for name in acc], "seeds": [0],
            "cells": {f"{name}/0": {row: {"acc": a, "loss": 0.0} for row, a in rows.items()}
                      for name, rows in acc.items()}}


def test_t1_c8_c9_c11_verdicts():
    """C8 needs Lp(p*) at least as good as both L2 and max at the most aggressive (last) configuration;
    C9 a LAPQ gain of ≥ 1 point there that is at least the W8A8 gain; C11 |W8A8 gain| ≤ 1 point, a loss
    of 5 points failing as a gain would."""
    t1 = importlib.import_module("figures.t1_accuracy")

    def rows(acc):
        return {c.id: c for c in t1.claims(_t1_data(acc), None)}

    w8 = {"Lp(p*)": 0.97, "L2": 0.96, "max": 0.95, "LAPQ": 0.972}
    good = rows({"W8A8": w8, "W2A4": {"Lp(p*)": 0.60, "L2": 0.50, "max": 0.30, "LAPQ": 0.70}})
    assert good["C8"].passed and good["C9"].passed and good["C11"].passed
    assert good["C8"].ours.startswith("W2A4: Lp(p*) 60.0%")
    # C8: beats L2 but not max, at the last configuration (the first one's verdict is beside the point)
    r = rows({"W8A8": w8, "W2A4": {"Lp(p*)": 0.60, "L2": 0.50, "max": 0.65, "LAPQ": 0.70}})
    assert not r["C8"].passed
    r = rows({"W8A8": {**w8, "L2": 0.99}, "W2A4": {"Lp(p*)": 0.60, "L2": 0.50, "max": 0.30, "LAPQ": 0.70}})
    assert r["C8"].passed
    r = rows({"W8A8": w8, "W2A4": {"Lp(p*)": 0.60, "L2": 0.65, "max": 0.30, "LAPQ": 0.70}})
    assert not r["C8"].passed
    # C9: a 2-point gain at W2A4 but a 3-point gain at W8A8 fails; a 0.5-point gain fails
    r = rows({"W8A8": {**w8, "LAPQ": 1.0}, "W2A4": {"Lp(p*)": 0.60, "L2": 0.50, "max": 0.30, "LAPQ": 0.62}})
    assert not r["C9"].passed
    r = rows({"W8A8": w8, "W2A4": {"Lp(p*)": 0.60, "L2": 0.50, "max": 0.30, "LAPQ": 0.605}})
    assert not r["C9"].passed
    # C11: LAPQ 5 points below Lp(p*) at W8A8 is no "within 1 point"
    r = rows({"W8A8": {**w8, "LAPQ": 0.92}, "W2A4": {"Lp(p*)": 0.60, "L2": 0.50, "max": 0.30, "LAPQ": 0.70}})
    assert not r["C11"].passed and r["C11"].ours == "W8A8: |-5.00| points"
    # C11 is the paper's "A4": measured at W32A4 when the preset has it, whatever W8A8 says
    w32a4 = {"Lp(p*)": 0.95, "L2": 0.9, "max": 0.8, "LAPQ": 0.93}
    r = rows({"W8A8": w8, "W32A4": w32a4, "W2A4": {"Lp(p*)": 0.60, "L2": 0.50, "max": 0.30, "LAPQ": 0.70}})
    assert not r["C11"].passed and r["C11"].ours == "W32A4: |-2.00| points"
    r = rows({"W8A8": {**w8, "LAPQ": 0.92}, "W32A4": {**w32a4, "LAPQ": 0.955},
              "W2A4": {"Lp(p*)": 0.60, "L2": 0.50, "max": 0.30, "LAPQ": 0.70}})
    assert r["C11"].passed and r["C11"].ours == "W32A4: |+0.50| points"


def test_f3_toy_is_the_reference_notebooks_grid():
    """C5's matmul toy on the reference notebook's grid, linspace(0.1, max, 30) per axis
    (jupyter/quant_sep.ipynb): its interaction fraction falls from about 0.5 at 2 bits to the
    notebook's 0.065 at 8. The grid from 1/30 reached into the collapse at tiny α, which alone reads
    as interaction: 0.144–0.146 at 4–8 bits."""
    f3 = importlib.import_module("figures.f3_separability")
    two, eight = f3.toy_matmul(2), f3.toy_matmul(8)
    np.testing.assert_allclose(two["clips"], np.linspace(0.1, 1.0, 30))
    assert two["interaction"] > 0.4 and eight["interaction"] < 0.08, (two["interaction"], eight["interaction"])
