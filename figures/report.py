"""REPORT.md and report.json: the claims table, timings and outputs of one reproduction run."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

import figures
from figures import claims as claim_specs
from figures.common import Claim, write_json, write_text
from landscape import runtime


def claims_table(claims) -> str:
    head = ("| # | claim | quantity | paper | threshold | ours | verdict | figure |\n"
            "|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [c.row() for c in sorted(claims, key=lambda c: int(c.id[1:]))])


def compare(runs: list[tuple[str, Path]]) -> str:
    """A markdown table of the claims of several runs' ``report.json`` — another training seed
    (``--train-seed``), another machine, another commit — with how many runs pass each claim.
    ``runs``: (label, output directory) pairs."""
    reports = []
    for label, path in runs:
        file = Path(path) / "report.json"
        if not file.is_file():
            raise ValueError(f"{str(path)!r} holds no report.json; pass output directories of paper_repro runs")
        try:
            r = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON ({err}); a report.json written by paper_repro is") from None
        missing = [k for k in ("preset", "claims", "fp32_test_accuracy") if not isinstance(r, dict) or k not in r]
        if missing:
            raise ValueError(f"{file} lacks {missing}: not a report.json written by paper_repro")
        fields = ("id", "claim", "threshold", "ours", "passed")  # what the tables read of each claim
        damaged = [k for k, ok in (
            ("preset", isinstance(r["preset"], dict) and "name" in r["preset"]),
            ("fp32_test_accuracy", isinstance(r["fp32_test_accuracy"], int | float)),
            ("claims", isinstance(r["claims"], list)
             and all(isinstance(c, dict) and all(f in c for f in fields) for c in r["claims"]))) if not ok]
        if damaged:  # a KeyError or a format error after the others had been read
            raise ValueError(f"{file}: {damaged} not as paper_repro writes them (a preset with its name, a number, "
                             f"a list of claims with {list(fields)}): a damaged or hand-edited report")
        reports.append((label, r))
    lines = ["| run | preset | training seed | FP32 test accuracy | PASS | FAIL | code | CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in reports:
        passed = sum(c["passed"] for c in r["claims"])
        soft = r.get("software", {})
        lines.append(f"| {label} | {r['preset']['name']} | {r['preset'].get('train_seed', 0)} | "
                     f"{100 * r['fp32_test_accuracy']:.2f} % | {passed} | {len(r['claims']) - passed} | "
                     f"{soft.get('code') or '–'} | {soft.get('cpu', '–')} |")
    by_id = [{c["id"]: c for c in r["claims"]} for _, r in reports]
    lines += ["", "| claim | threshold | " + " | ".join(label for label, _ in reports) + " | passes |",
              "|---|---|" + "---|" * len(reports) + "---|"]
    for cid in claim_specs.CLAIMS:
        found = [claims.get(cid) for claims in by_id]
        first = next((c for c in found if c is not None), None)
        if first is None:
            continue
        cells = ["untested" if c is None else f"**{'PASS' if c['passed'] else 'FAIL'}** {c['ours']}" for c in found]
        tested = [c for c in found if c is not None]
        row = [f"{cid} {first['claim']}", first["threshold"], *cells,
               f"{sum(c['passed'] for c in tested)}/{len(tested)}"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class EarlierRun:
    """The figures of the run already in an output directory that a partial run (--only) leaves
    in place, and their claims: what the merged report carries over instead of dropping.

    figures: name → the earlier report's entry, with ``computed_by`` (the code that computed it);
    files: name → its files; claims: the earlier report's claim dicts of those figures."""

    figures: dict
    files: dict
    claims: list


def previous_report(out: Path) -> dict | None:
    """The report.json of the run already in ``out``, or None (none there, or not one of ours)."""
    try:
        previous = json.loads((Path(out) / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return previous if isinstance(previous, dict) and isinstance(previous.get("preset"), dict) else None


def preset_config(preset) -> dict:
    """``preset.config()`` as report.json holds it (tuples become lists)."""
    return json.loads(json.dumps(preset.config()))


def earlier_run(out: Path, preset, ran) -> EarlierRun | None:
    """What a partial run into ``out`` keeps of the run there: the figures it does not rerun, when
    that run had this configuration and their files are all still in ``out``; else None."""
    previous = previous_report(out)
    if previous is None or previous["preset"] != preset_config(preset):
        return None
    try:
        entries, files, claims = previous["figures"], previous["files"], previous["claims"]
        code = previous["software"].get("code") or "not a git checkout"
    except (KeyError, TypeError, AttributeError):
        return None  # not one of ours
    kept = {}
    for name, info in entries.items():
        if name in ran or not files.get(name) or not all((Path(out) / f).is_file() for f in files[name]):
            continue
        kept[name] = {**info, "computed_by": info.get("computed_by", code)}
    if not kept:
        return None
    ids = {cid for info in kept.values() for cid in info.get("claims", [])}
    return EarlierRun(kept, {name: files[name] for name in kept}, [c for c in claims if c.get("id") in ids])


def gallery(out: Path, preset, modules, datas, ctx, earlier: EarlierRun | None = None) -> Path:
    """``README.md`` of the output directory: every figure with what the paper showed and what
    this run measured (the second sentence is generated from the run's data). Figures of
    ``earlier`` are marked with the code that computed them."""
    ran = [m.NAME for m in modules if earlier is None or m.NAME not in earlier.figures]
    source = (f"`{command(preset)}`" if earlier is None else
              f"`{command(preset, ran)}` over an earlier run whose figures {', '.join(earlier.figures)} it kept")
    lines = [f"# Gallery — preset `{preset.name}` ({preset.model} on {preset.data})", "",
             f"Generated by {source}; see REPORT.md for the claims.", ""]
    for m in modules:
        kept = earlier is not None and m.NAME in earlier.figures
        lines += [f"## {m.NAME} — {m.TITLE}" + (f" (earlier run, code `{earlier.figures[m.NAME]['computed_by']}`)"
                                                 if kept else ""), "", f"![{m.NAME}]({m.SLUG}.png)", "",
                  f"*Paper:* {m.PAPER}", "", m.summary(datas[m.NAME], ctx), ""]
    return write_text(out / "README.md", "\n".join(lines))


def command(preset, only=None) -> str:
    """The paper_repro command line of a run of ``preset`` (its options that differ from the
    named preset's: --bits, --seeds, --train-seed, --data-dir; ``only``, the figures of a partial run)."""
    from figures.common import PRESETS

    base = PRESETS.get(preset.name)
    parts = ["python paper_repro.py"] + ([] if preset.name == "small" else [f"--preset {preset.name}"])
    if preset.data_dir:
        parts.append(f"--data-dir {preset.data_dir}")
    if only:
        parts.append(f"--only {','.join(only)}")
    if preset.headline_bits:
        parts.append(f"--bits {','.join(map(str, preset.headline_bits))}")
    if base is not None and preset.seeds != base.seeds:
        parts.append(f"--seeds {preset.seeds}")
    if preset.train_seed:
        parts.append(f"--train-seed {preset.train_seed}")
    return " ".join(parts)


def machine() -> str:
    """Where the run computed: JAX's accelerator when it has one, else the CPU cores."""
    cpu = f"{os.cpu_count()} CPU core(s) ({runtime.cpu_model()}, {platform.machine()})"
    accelerator = runtime.accelerator()
    return cpu if accelerator is None else f"{accelerator} with {cpu}"


def write(out: Path, preset, claims, results, files, wall: float, ctx, earlier: EarlierRun | None = None) -> None:
    """REPORT.md and report.json of a run. A partial run over an earlier run of the same
    configuration (``earlier``) carries that run's other figures and their claims over, marked
    with the code that computed them, so the report still covers every figure in the directory."""
    ran = list(results)
    everything = [m.NAME for m in figures.load_all()]
    kept_claims = []
    if earlier is not None:
        kept_claims = [Claim(**{k: v for k, v in c.items() if k in Claim.__dataclass_fields__})
                       for c in earlier.claims]
        claims = list(claims) + kept_claims
        merged = {**results, **earlier.figures}
        results = {name: merged[name] for name in everything if name in merged}
        files = {**files, **earlier.files}
    kept_ids = {c.id for c in kept_claims}
    tested = {c.id for c in claims}
    untested = [cid for cid in claim_specs.CLAIMS if cid not in tested]
    passed = sum(c.passed for c in claims)
    net = ctx.net
    partial = [name for name in everything if name in ran] != everything
    fresh = [results[name] for name in ran]
    loaded = sum(info["loaded"] for info in fresh)
    steps = loaded + sum(info["computed"] for info in fresh)
    provenance = (f" {loaded} of the {steps} cached steps were loaded from an earlier run's `.cache/`, so their "
                  "compute time is not in this wall time." if loaded else "")
    if earlier is not None:
        by_code = {}
        for name, info in earlier.figures.items():
            by_code.setdefault(info["computed_by"], []).append(name)
        provenance += (" Figures " + "; ".join(f"{', '.join(names)} (code `{code}`)" for code, names in by_code.items())
                       + " and their claims are carried over from the earlier run in this directory, which this "
                       "partial run did not recompute.")
    lines = [
        f"# LAPQ reproduction report — preset `{preset.name}`",
        "",
        f"{preset.model} on {preset.data}"
        + (f" (training seed {preset.train_seed})" if preset.train_seed else "")
        + f", FP32 test accuracy {net.accuracy(ctx.test):.4f}, from `{command(preset, partial and ran)}`; "
        f"{len(claims)} claims tested, **{passed} PASS, {len(claims) - passed} FAIL**; "
        f"wall time {wall / 60:.1f} min on {machine()}.{provenance}",
        "",
        "Every threshold was fixed in `figures/claims.py` before the run; a FAIL is reported as measured.",
        "Curvatures: 'STE' is the Hessian of the straight-through surrogate (autodiff), 'FD' the",
        "finite-difference curvature of the true, piecewise-constant loss.",
        "",
        claims_table([dataclasses.replace(c, figure=f"{c.figure} (earlier run)") if c.id in kept_ids else c
                      for c in claims]),
        "",
    ]
    notes = [c for c in claims if c.note]
    if notes:
        lines += ["## Notes", ""] + [f"* **{c.id}** — {c.note}" for c in notes] + [""]
    if untested:
        if list(results) != everything:  # some figures neither ran nor were kept
            scope = ("this run" + (" and the earlier one it kept" if earlier is not None else "")
                     + f" (figures {', '.join(results)} of {', '.join(everything)})")
        elif preset.headline_bits:
            scope = f"this run (`{command(preset)}`: a claim made at a width --bits leaves out is untested)"
        else:
            scope = "this preset"
        lines += [f"Not tested by {scope}: {', '.join(untested)}.", ""]
    lines += ["## Figures", "",
              "Each figure is drawn on a thread of its own while the next one computes.", "",
              "| figure | seconds to compute | seconds to draw | cached steps computed / loaded | files |",
              "|---|---|---|---|---|"]
    for name, info in results.items():
        label = name if "computed_by" not in info else f"{name} (earlier run, code `{info['computed_by']}`)"
        lines.append(f"| {label} | {info['seconds']} | {info['render_seconds']} | "
                     f"{info['computed']} / {info['loaded']} | {', '.join(files[name])} |")
    versions = runtime.software()
    lines += ["", "## Configuration", "", "```", repr(preset), "```", "",
              f"Ran with {runtime.describe_software(versions)}.", ""]
    write_text(out / "REPORT.md", "\n".join(lines))
    write_json(out / "report.json", {
        "preset": preset.config(), "software": versions, "wall_seconds": round(wall, 1),
        "fp32_test_accuracy": net.accuracy(ctx.test),
        "claims": [{**dataclasses.asdict(c), **({"earlier_run": True} if c.id in kept_ids else {})} for c in claims],
        "untested": untested,
        "figures": results, "files": files,
    })
