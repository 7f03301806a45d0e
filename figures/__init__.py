"""One module per figure/table of the LAPQ paper reproduction (see figures/common.py).

``FIGURES`` lists them in run order; ``load(name)`` imports one by NAME ("F1") or slug.
"""

from __future__ import annotations

import importlib

FIGURES = (
    "f1_contours", "f2_hessians", "f3_separability", "f4_p_sweep", "f5_lp_error",
    "f6_convergence", "f7_calib_size", "f8_line", "t1_accuracy", "t2_spectrum",
)

#: Where each module's ``EST_SECONDS`` comes from: its seconds in the run that made the committed
#: figures/ (``figures/report.json``, "figures" → seconds, rounded, at least 1).
COST_SOURCE = "figures/report.json: the committed figures' run, 2-core Intel Xeon"


def load_all():
    return [importlib.import_module(f"figures.{slug}") for slug in FIGURES]


def select(names: str | None):
    """Modules for a comma-separated list of NAMEs or slugs (None: all), in run order."""
    modules = load_all()
    if not names:
        return modules
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {m.NAME.lower(): m for m in modules} | {m.SLUG.lower(): m for m in modules}
    if not wanted:  # "," ran nothing and replaced a report with an empty one
        raise ValueError("no figure named; known: " + ", ".join(f"{m.NAME} ({m.SLUG})" for m in modules))
    unknown = [n for n in wanted if n.lower() not in known]
    if unknown:
        listing = ", ".join(f"{m.NAME} ({m.SLUG})" for m in modules)
        raise ValueError(f"unknown figure(s) {unknown}; known: {listing}")
    chosen = {known[n.lower()].SLUG for n in wanted}
    return [m for m in modules if m.SLUG in chosen]
