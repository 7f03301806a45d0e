"""The LAPQ paper's checkable claims and the thresholds we hold them to.

Every threshold is fixed here, in code, before any run; the report compares our measured
value against it and prints PASS or FAIL. A FAIL is reported as is — never re-tuned. The
paper's magnitudes come from ImageNet ResNets; a small network is more robust, so most
thresholds ask for the *direction* of the effect with a modest margin rather than the
paper's factor.
"""

from __future__ import annotations

CLAIMS = {
    "C1": dict(claim="Curvature of L(α) grows sharply as bits decrease",
               quantity="trace of the STE clip Hessian over the activation α (weights FP32), A2 / A4",
               paper="65× from A4 to A2 (ResNet-18)", threshold="ratio ≥ 4", min_ratio=4.0),
    "C2": dict(claim="Non-separability grows as bits decrease",
               quantity="‖H − diag H‖_F / ‖H‖_F of the activation clip Hessian (STE, weights FP32), A2 vs A4",
               paper="0.27 → 0.53 (A4 → A2)", threshold="2-bit ≥ 1.2 × 4-bit", min_ratio=1.2),
    "C3": dict(claim="The low-bit landscape is sharp, the high-bit one flat",
               quantity="fraction of a grid over two adjacent activation α (weights FP32) within min + 0.05",
               paper="0.72 (A6–8), 0.17 (A4), 0.022 (A3), 0.005 (A2)",
               threshold="non-increasing from 8 to 2 bits and f(2) ≤ 0.5·f(8)", max_low_over_high=0.5),
    "C4": dict(claim="The additive-separability statistic rises at low bits",
               quantity="γ of the sampling test over the activation α, weights FP32 (T in the note)",
               paper="γ −0.003 / 0.035 / 20.4 at 8 / 4 / 2 bits", threshold="γ(2) > γ(4) > γ(8)"),
    "C5": dict(claim="Matmul toy: the interaction term appears at low bits (network-free: the same "
                     "seeded Y = W X for every network and preset)",
               quantity="ANOVA interaction fraction of MSE(α₁, α₂) for Y = W X",
               paper="0.50 / 0.11 / 0.07 / 0.065 at 2 / 3 / 4 / 8 bits",
               threshold="2-bit ≥ 2 × 8-bit", min_ratio=2.0),
    "C6": dict(claim="Pairwise coupling is local: adjacent layers couple, distant ones barely",
               quantity="mean |H_ij|/√(H_ii H_jj) of the activation clip Hessian (weights FP32), "
                        "adjacent (|i−j| = 1) vs distant (|i−j| ≥ n/2), A2",
               paper="L1–L2 0.47 vs L1–L15 0.001", threshold="adjacent ≥ 2 × distant", min_ratio=2.0),
    "C7": dict(claim="Calibration loss is ≈ quadratic in p with an interior minimum",
               quantity="R² of the quadratic fit on p ∈ [2, 4.5] and p*, lowest bit width",
               paper="p* ≈ 3.2 (R18 A2); 3.0–3.5 (R50)", threshold="R² ≥ 0.8, convex, 2 < p* < 4.5",
               min_r2=0.8),
    "C8": dict(claim="Lp(p*) initialisation beats MMSE (p = 2) and max",
               quantity="test accuracy after layer-wise init, most aggressive table config",
               paper="W4 R18: max 1.7, L2 48.7, L3 57.3",
               threshold="Lp(p*) ≥ L2 and ≥ max (mean over seeds)"),
    "C9": dict(claim="Joint Powell beats the layer-wise Lp init, most at low bits",
               quantity="accuracy gain of LAPQ-Powell over Lp(p*), most aggressive config vs W8A8",
               paper="W4A4 43.6 → 60.2 (L2 init); W4A32 57.2 → 62.6",
               threshold="gain ≥ 1 point and ≥ the W8A8 gain", min_gain=1.0),
    "C10": dict(claim="Joint Powell is more robust than coordinate descent",
                quantity="worst accuracy over starts {L1, L2, L3}, Powell vs CD",
                paper="W3A32 from L3: CD 0.7 vs Powell 40.7; W4A4 from L1: 0.1 vs 45.0",
                threshold="Powell's worst ≥ CD's worst"),
    "C11": dict(claim="At mild quantization joint optimisation barely helps",
                quantity="|acc(LAPQ) − acc(Lp(p*))| at W32A4 (W8A8 where the preset has no W32A4)",
                paper="A4: all methods within ≈1%", threshold="≤ 1 point", max_gap=1.0),
    "C12": dict(claim="Near α*, the loss along a line is quadratic",
                quantity="R² of a quadratic fit along α*·[0.8, 1.5]",
                paper="fig/resnet18_quadratic_loss_vs_distance.pdf", threshold="R² ≥ 0.9", min_r2=0.9),
    "C13": dict(claim="Accuracy rises with calibration size and saturates",
                quantity="LAPQ test accuracy vs calibration images",
                paper="W4A4: 50.4 (32) → 59.8 (512), 59.9 (1024)",
                threshold="largest ≥ smallest, last two within 1 point", max_last_gap=1.0),
}


def spec(claim_id: str) -> dict:
    return CLAIMS[claim_id]


def make(claim_id: str, ours: str, passed: bool, figure: str, note: str = ""):
    """A :class:`figures.common.Claim` row for ``claim_id`` with our value and verdict."""
    from figures.common import Claim

    c = CLAIMS[claim_id]
    return Claim(claim_id, c["claim"], c["quantity"], c["paper"], c["threshold"], ours, bool(passed),
                 figure, note)
