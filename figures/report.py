"""REPORT.md and report.json: the claims table, timings and outputs of one reproduction run."""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

from figures import claims as claim_specs
from figures.common import write_json, write_text


def claims_table(claims) -> str:
    head = ("| # | claim | quantity | paper | threshold | ours | verdict | figure |\n"
            "|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [c.row() for c in sorted(claims, key=lambda c: int(c.id[1:]))])


def write(out: Path, preset, claims, results, files, wall: float, ctx) -> None:
    tested = {c.id for c in claims}
    untested = [cid for cid in claim_specs.CLAIMS if cid not in tested]
    passed = sum(c.passed for c in claims)
    net = ctx.net
    lines = [
        f"# LAPQ reproduction report — preset `{preset.name}`",
        "",
        f"{preset.model} on {preset.data}, FP32 test accuracy {net.accuracy(ctx.test):.4f}; "
        f"{len(claims)} claims tested, **{passed} PASS, {len(claims) - passed} FAIL**; "
        f"wall time {wall / 60:.1f} min on {os.cpu_count()} CPU core(s) "
        f"({platform.processor() or platform.machine()}).",
        "",
        "Every threshold was fixed in `figures/claims.py` before the run; a FAIL is reported as measured.",
        "Curvatures: 'STE' is the Hessian of the straight-through surrogate (autodiff), 'FD' the",
        "finite-difference curvature of the true, piecewise-constant loss.",
        "",
        claims_table(claims),
        "",
    ]
    notes = [c for c in claims if c.note]
    if notes:
        lines += ["## Notes", ""] + [f"* **{c.id}** — {c.note}" for c in notes] + [""]
    if untested:
        lines += [f"Not tested by this preset: {', '.join(untested)}.", ""]
    lines += ["## Figures", "", "| figure | seconds | files |", "|---|---|---|"]
    for name, info in results.items():
        lines.append(f"| {name} | {info['seconds']} | {', '.join(files[name])} |")
    lines += ["", "## Configuration", "", "```", repr(preset), "```", ""]
    write_text(out / "REPORT.md", "\n".join(lines))
    write_json(out / "report.json", {
        "preset": preset.config(), "wall_seconds": round(wall, 1),
        "fp32_test_accuracy": net.accuracy(ctx.test),
        "claims": [dataclasses.asdict(c) for c in claims], "untested": untested,
        "figures": results, "files": files,
    })
