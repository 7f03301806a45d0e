"""Smoke test: the whole reproduction pipeline on the tiny preset (every figure, the report)."""

import json
import os
import shutil
from pathlib import Path

import jax
import pytest

import figures
import paper_repro


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    assert paper_repro.main(["--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    return out


def test_every_figure_writes_png_pdf_and_json(tiny_run):
    for module in figures.load_all():
        for ext in ("png", "pdf"):
            path = tiny_run / f"{module.SLUG}.{ext}"
            assert path.exists() and path.stat().st_size > 1000, path
        data = json.loads((tiny_run / f"{module.SLUG}.json").read_text())
        assert data, module.SLUG


def test_report_lists_claims_with_verdicts(tiny_run):
    report = json.loads((tiny_run / "report.json").read_text())
    # a fresh run computes every step itself (a step reused within the run is not "loaded")
    assert all(info["loaded"] == 0 for info in report["figures"].values())
    assert sum(info["computed"] for info in report["figures"].values()) >= 10
    assert "earlier run" not in (tiny_run / "REPORT.md").read_text()
    ids = [c["id"] for c in report["claims"]]
    assert len(ids) == len(set(ids)) >= 8
    assert all(isinstance(c["passed"], bool) and c["threshold"] and c["ours"] for c in report["claims"])
    assert set(ids) | set(report["untested"]) == {f"C{k}" for k in range(1, 14)}
    text = (tiny_run / "REPORT.md").read_text()
    for cid in ids:
        assert f"| {cid} |" in text
    assert "PASS" in text or "FAIL" in text
    assert report["software"]["jax"] == jax.__version__ and f"jax {jax.__version__}" in text
    assert f"Ran with code `{report['software']['code'] or 'not a git checkout'}`; python" in text
    assert set(report["figures"]) == {m.NAME for m in figures.load_all()}
    assert all(info["render_seconds"] >= 0 for info in report["figures"].values())
    if Path("/proc/self/maps").exists():  # the memory mappings held after each module (Linux)
        held = [info["memory_mappings"]["held"] for info in report["figures"].values()]
        assert all(isinstance(h, int) and 0 < h < info["memory_mappings"]["limit"]
                   for h, info in zip(held, report["figures"].values(), strict=True))
    assert "| seconds to compute | seconds to draw |" in text
    gallery = (tiny_run / "README.md").read_text()
    for module in figures.load_all():
        assert f"({module.SLUG}.png)" in gallery and module.PAPER in gallery


def test_rerun_resumes_from_the_cache(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)  # tiny_run stays the full run the other tests read
    cache = out / ".cache"
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(before) >= 10
    assert paper_repro.main(["--preset", "tiny", "--out", str(out), "--no-progress", "--only", "F4,T1"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert after == before, "a finished step was recomputed"


def test_a_figure_that_fails_to_draw_stops_the_run(tiny_run, tmp_path, monkeypatch):
    """Figures are drawn on a thread of their own; its error reaches the caller, and no report
    claims the run finished."""
    shutil.copytree(tiny_run / ".cache", tmp_path / ".cache")
    module = figures.select("F8")[0]

    def broken(data, ctx):
        raise RuntimeError("no room on the canvas")

    monkeypatch.setattr(module, "render", broken)
    with pytest.raises(RuntimeError, match="no room on the canvas"):
        paper_repro.main(["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--only", "F7,F8"])
    # what the run finished waits in the staging directory; nothing claims the run finished
    assert (tmp_path / ".partial" / "f7_calib_size.png").exists() and (tmp_path / ".partial" / "f8_line.json").exists()
    assert not (tmp_path / "f7_calib_size.png").exists() and not (tmp_path / "report.json").exists()


def test_a_killed_run_leaves_the_finished_run_as_it_was(tiny_run, tmp_path, monkeypatch, capsys):
    """A run stopped part-way (here: Ctrl-C in F8, after F7 finished) changes none of the output
    directory's figures or its report, and says so in one line (exit status 130, as a shell's);
    the rerun resumes from the cache and publishes."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    module = figures.select("F8")[0]

    def interrupted(ctx):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(module, "compute", interrupted)
        assert paper_repro.main(["--preset", "tiny", "--out", str(out), "--no-progress", "--only", "F7,F8"]) == 130
    assert "paper_repro: interrupted; the finished steps are kept in" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (out / ".partial" / "f7_calib_size.json").exists()
    cache = {p.name for p in (out / ".cache").iterdir()}
    assert paper_repro.main(["--preset", "tiny", "--out", str(out), "--no-progress", "--only", "F7,F8"]) == 0
    assert {p.name for p in (out / ".cache").iterdir()} == cache, "the rerun recomputed a finished step"
    assert not (out / ".partial").exists()
    report, earlier = json.loads((out / "report.json").read_text()), json.loads(before["report.json"])
    assert report != earlier
    assert (out / "f8_line.json").read_bytes() == before["f8_line.json"]  # the same data, republished
    # The other figures stay, and the report carries them and their claims over, marked, rather
    # than describing F7 and F8 alone (it had dropped eight figures' claims).
    assert list(report["figures"]) == [m.NAME for m in figures.load_all()]
    kept = {name for name, info in report["figures"].items() if "computed_by" in info}
    assert kept == set(report["figures"]) - {"F7", "F8"}
    assert {report["figures"][name]["computed_by"] for name in kept} == {earlier["software"]["code"]}
    assert [c for c in report["claims"] if not c.get("earlier_run")] == [
        c for c in earlier["claims"] if c["figure"] in ("F7", "F8")]
    assert sorted((c for c in report["claims"] if c.get("earlier_run")), key=lambda c: c["id"]) == sorted(
        ({**c, "earlier_run": True} for c in earlier["claims"] if c["figure"] not in ("F7", "F8")),
        key=lambda c: c["id"])
    assert report["untested"] == earlier["untested"]
    text = (out / "REPORT.md").read_text()
    assert "and their claims are carried over from the earlier run in this directory" in text
    assert "| F2 (earlier run) |" in text and "| F8 |" in text
    # The gallery is redrawn with the kept figures' summaries read back from their JSON: the same text.
    gallery = (out / "README.md").read_text()
    assert "--only F7,F8` over an earlier run whose figures F1, F2, F3, F4, F5, F6, T1, T2 it kept" in gallery

    def body(text):
        return [line for line in text.splitlines() if not line.startswith(("Generated by", "## "))]

    assert body(gallery) == body(before["README.md"].decode())


def test_no_progress_silences_the_datasets_bars_too():
    """--no-progress left datasets' "Generating train split" bars on for the parquet presets."""
    datasets = pytest.importorskip("datasets")
    try:
        datasets.enable_progress_bars()
        paper_repro._quiet_datasets()
        assert datasets.are_progress_bars_disabled()
    finally:
        datasets.enable_progress_bars()


def test_cli_list_and_bad_arguments(capsys, tmp_path):
    assert paper_repro.main(["--list"]) == 0
    listing = capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown preset 'nope'; known: "):  # --list had accepted a typo
        paper_repro.main(["--preset", "nope", "--list"])
    for module in figures.load_all():
        assert module.NAME in listing and module.SLUG in listing
    with pytest.raises(SystemExit, match=r"--only 'F99': unknown figure\(s\) \['F99'\]; known: F1"):
        paper_repro.main(["--only", "F99", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown preset"):
        paper_repro.main(["--preset", "huge", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--bits"):
        paper_repro.main(["--preset", "tiny", "--bits", "1,x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="data-dir"):
        paper_repro.main(["--preset", "mnist", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="uses scikit-learn's bundled digits"):
        paper_repro.main(["--preset", "tiny", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    missing = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=f"--data-dir '{missing}' is not a directory"):
        paper_repro.main(["--preset", "mnist", "--data-dir", missing, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--preset cifar10 needs --data-dir PATH"):  # offline, as mnist
        paper_repro.main(["--preset", "cifar10", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--bits '': use comma-separated integers"):  # was ignored
        paper_repro.main(["--preset", "tiny", "--bits", "", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--only ',': no figure named; known: F1"):  # ran nothing
        paper_repro.main(["--preset", "tiny", "--only", ",", "--out", str(tmp_path)])
    assert not os.listdir(tmp_path)
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(SystemExit, match=f"--out '{out}': cannot write there"):
            paper_repro.main(["--preset", "tiny", "--out", str(out), "--no-progress"])
    empty = tmp_path / "mnist"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"preset 'mnist': cannot load 'mnist' \(no '\*train\*.parquet' files"):
        paper_repro.main(["--preset", "mnist", "--data-dir", str(empty), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m" / ".partial").exists()
    # partial or non-default runs need --out: they would overwrite the committed galleries
    for extra in (["--only", "F8"], ["--bits", "2"], ["--seeds", "1"], ["--train-seed", "1"]):
        with pytest.raises(SystemExit, match=f"{extra[0]} without --out would write a partial or non-default run"):
            paper_repro.main(["--preset", "tiny", *extra])


def test_a_code_change_recomputes_instead_of_reusing_the_cache(tiny_run, tmp_path, monkeypatch):
    shutil.copytree(tiny_run / ".cache", tmp_path / ".cache")
    args = ["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--only", "F8"]
    assert paper_repro.main(args) == 0
    assert json.loads((tmp_path / "report.json").read_text())["figures"]["F8"]["computed"] == 0
    monkeypatch.setattr(figures.common, "code_fingerprint", lambda: "0123456789abcdef")
    assert paper_repro.main(args) == 0
    f8 = json.loads((tmp_path / "report.json").read_text())["figures"]["F8"]
    assert f8["computed"] > 0 and f8["loaded"] == 0


def test_report_says_what_came_from_the_cache_and_what_was_not_run(tiny_run, tmp_path):
    """A rerun of F4 and T1 loads every step: its report says so and names the figures it ran;
    in a directory of its own it blames itself, not the preset, for the claims it did not test."""
    shutil.copytree(tiny_run / ".cache", tmp_path / ".cache")
    assert paper_repro.main(["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--only", "F4,T1"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["figures"]) == {"F4", "T1"}  # nothing earlier to carry over
    assert all(info["computed"] == 0 and info["loaded"] > 0 for info in report["figures"].values())
    text = (tmp_path / "REPORT.md").read_text()
    loaded = sum(info["loaded"] for info in report["figures"].values())
    assert f"{loaded} of the {loaded} cached steps were loaded from an earlier run" in text
    # each step counts once (a step asked for twice was counted twice, more than the cache held)
    assert loaded <= len(list((tmp_path / ".cache").iterdir()))
    assert "from `python paper_repro.py --preset tiny --only F4,T1`" in text
    assert "Not tested by this run (figures F4, T1 of F1," in text
    assert not (tmp_path / "README.md").exists()  # no gallery of two figures


def test_bits_sets_the_widths_of_the_headline_figures(tmp_path):
    """--bits 3 puts F2 and F4 at 3 bits instead of the paper's (2, 4) and (2, 3, 4); C6, a
    2-bit claim, is then untested rather than measured at another width."""
    assert paper_repro.main(["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--only", "F2,F4",
                             "--bits", "3"]) == 0
    for slug in ("f2_hessians", "f4_p_sweep"):
        data = json.loads((tmp_path / f"{slug}.json").read_text())
        assert [k for k in data if k.isdigit()] == ["3"], slug
    report = json.loads((tmp_path / "report.json").read_text())
    claims = {c["id"]: c for c in report["claims"]}
    assert "C6" not in claims and "C6" in report["untested"]
    assert "--only F2,F4 --bits 3`" in (tmp_path / "REPORT.md").read_text()
    assert claims["C7"]["ours"].startswith("W3A3:")
    # without --bits, the preset's configuration (and so every cache key) is what it was
    from figures.common import PRESETS

    assert "headline_bits" not in PRESETS["tiny"].config()


def test_train_seed_reruns_the_claims_on_another_network(tiny_run, tmp_path):
    """--train-seed 1 trains another network (fit's seed), so F5's activation statistics differ
    from the default run's; the report names the seed. Without it the keys are unchanged."""
    from figures.common import PRESETS

    assert paper_repro.main(["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--only", "F5",
                             "--train-seed", "1"]) == 0
    assert "(training seed 1)" in (tmp_path / "REPORT.md").read_text()
    assert "training seed" not in (tiny_run / "REPORT.md").read_text()
    ours, default = (json.loads((d / "f5_lp_error.json").read_text()) for d in (tmp_path, tiny_run))
    assert ours["activation"]["max_abs"] != default["activation"]["max_abs"]
    networks = os.path.join(os.environ["LANDSCAPE_CACHE"], "networks")
    seeds = {json.load(open(os.path.join(networks, name)))["config"]["seed"]
             for name in os.listdir(networks) if name.endswith(".json")}
    assert {0, 1} <= seeds
    assert "train_seed" not in PRESETS["tiny"].config()
    with pytest.raises(SystemExit, match="--train-seed -1: must be an integer >= 0"):
        paper_repro.main(["--preset", "tiny", "--train-seed", "-1", "--out", str(tmp_path / "bad")])


def test_compare_tables_the_claims_of_several_runs(tiny_run, tmp_path, capsys):
    """--compare LABEL=DIR ...: one row per run, one per claim with each run's verdict and how
    many runs pass it; a directory without report.json is a clear error."""
    report = json.loads((tiny_run / "report.json").read_text())
    flipped = json.loads(json.dumps(report))
    first = flipped["claims"][0]
    first["passed"] = not first["passed"]
    flipped["preset"]["train_seed"] = 7
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text(json.dumps(flipped))
    assert paper_repro.main(["--compare", f"a={tiny_run}", f"b={other}"]) == 0
    text = capsys.readouterr().out
    rows = {line[2:].split(" ")[0]: line for line in text.splitlines() if line.startswith("| C")}
    assert set(rows) == {c["id"] for c in report["claims"]}
    assert rows[first["id"]].endswith(" | 1/2 |")
    for c in report["claims"][1:]:
        assert rows[c["id"]].endswith(f" | {2 * int(c['passed'])}/2 |")
    assert "| b | tiny | 7 |" in text and "| a | tiny | 0 |" in text
    with pytest.raises(SystemExit, match="holds no report.json"):
        paper_repro.main(["--compare", str(tmp_path / "nowhere")])


def test_a_step_asked_for_twice_counts_once(tmp_path):
    """A step loaded from an earlier run and asked for again (another figure reusing it) is one
    loaded step: counted per lookup, a warm run reported 30 of 30 steps loaded from a 27-step cache."""
    from figures import common

    first = common.Context(common.PRESETS["tiny"], tmp_path / "a", progress=False, cache_dir=tmp_path / "cache")
    first.cached("step", {"k": 1}, lambda: {"v": 1})
    first.cached("step", {"k": 1}, lambda: {"v": 2})
    assert first.steps == {"computed": 1, "loaded": 0}
    again = common.Context(common.PRESETS["tiny"], tmp_path / "b", progress=False, cache_dir=tmp_path / "cache")
    assert [again.cached("step", {"k": 1}, lambda: {"v": 3}) for _ in range(3)] == [{"v": 1}] * 3
    assert again.steps == {"computed": 0, "loaded": 1}


def test_compare_names_a_damaged_report(tmp_path):
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "report.json").write_text('{"preset":\n')
    with pytest.raises(SystemExit, match=r"--compare: .*cut/report.json is not valid JSON"):
        paper_repro.main(["--compare", str(tmp_path / "cut")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "report.json").write_text('{"preset": {}, "claims": []}')
    with pytest.raises(SystemExit, match=r"other/report.json lacks \['fp32_test_accuracy'\]"):
        paper_repro.main(["--compare", str(tmp_path / "other")])


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    """Two runs sharing --out deleted each other's staging directory and published each other's
    files; the second now stops at once, naming the first."""
    import fcntl

    with open(tmp_path / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        with pytest.raises(SystemExit, match=r"another paper_repro run is writing there \(pid 4242\)"):
            paper_repro.main(["--preset", "tiny", "--out", str(tmp_path), "--no-progress", "--only", "F8"])
    assert not (tmp_path / ".partial").exists()


def test_a_partial_run_over_another_configuration_is_refused(tiny_run, tmp_path):
    """--only into a directory holding a run of another configuration would leave its other figures
    beside a report that no longer describes them."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_run / "report.json", out / "report.json")
    with pytest.raises(SystemExit, match=r"holds a run of another configuration \(it differs in \['train_seed'\]\)"):
        paper_repro.main(["--preset", "tiny", "--out", str(out), "--no-progress", "--only", "F8", "--train-seed", "1"])


def test_release_frees_compiled_programs_only_when_mappings_run_short(monkeypatch, tmp_path):
    """Between figure modules the memoised losses go; JAX's compiled programs go only once the
    process holds a quarter of the kernel's memory-mapping limit (else the next figure reuses them)."""
    import jax

    from figures import common

    held = common.mapping_fraction()
    assert 0.0 < held <= 1.0
    cleared = []
    monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(True))
    ctx = common.Context(common.PRESETS["tiny"], tmp_path, progress=False)
    ctx._losses["stale"] = object()
    for fraction, expected in ((0.1, []), (0.3, [True])):
        monkeypatch.setattr(common, "mapping_fraction", lambda fraction=fraction: fraction)
        ctx.release()
        assert ctx._losses == {} and cleared == expected


def test_presets_train_at_their_learning_rate(tmp_path):
    """The vit preset trains at lr 0.1 (fit's digits default leaves the ViT at 93 %); the presets
    without a train_lr keep their configuration, and so their cache keys, unchanged."""
    import dataclasses

    from figures import common

    vit = common.PRESETS["vit"]
    assert (vit.model, vit.data, vit.config()["train_lr"]) == ("vit", "digits", 0.1)
    assert all("train_lr" not in common.PRESETS[name].config() for name in ("small", "mnist", "tiny"))
    ctx = common.Context(dataclasses.replace(common.PRESETS["tiny"], train_lr=0.123), tmp_path, progress=False)
    assert ctx.net.config["lr"] == 0.123


def test_the_listed_costs_are_the_committed_runs_seconds(capsys):
    """--list prints each module's cost, EST_SECONDS, which must be what the committed figures'
    run measured (figures/report.json), not a guess."""
    measured = json.loads((Path(figures.__file__).parent / "report.json").read_text())["figures"]
    assert paper_repro.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "figures/report.json" in listing
    for module in figures.load_all():
        assert module.EST_SECONDS == max(1, round(measured[module.NAME]["seconds"])), module.NAME
        assert f"{module.NAME:4s} {module.SLUG:18s} {module.EST_SECONDS:>4d} s  {module.TITLE}" in listing


def test_a_step_computed_now_is_what_a_resumed_run_loads(tmp_path):
    """A fresh step kept its keys in the order computed, one loaded after an interruption came back
    sorted (the JSON's order): F1's markers and colours swapped between an uninterrupted run and a
    resumed one."""
    from figures import common

    step = lambda: {"points": {"L2": 1, "L3": 2, "ACIQ": 3}, "z": (1.0, float("inf"))}  # noqa: E731
    fresh = common.Context(common.PRESETS["tiny"], tmp_path / "a", progress=False, cache_dir=tmp_path / "cache")
    computed = fresh.cached("step", {"k": 1}, step)
    resumed = common.Context(common.PRESETS["tiny"], tmp_path / "b", progress=False, cache_dir=tmp_path / "cache")
    loaded = resumed.cached("step", {"k": 1}, step)
    assert resumed.steps == {"computed": 0, "loaded": 1}
    assert computed == loaded and list(computed["points"]) == list(loaded["points"])


def test_one_data_dir_named_two_ways_is_one_configuration(tmp_path, monkeypatch):
    """--data-dir is part of every cached step's key and of the configuration a partial run must
    match: a relative path, the absolute one or a trailing slash recomputed every step (and refused
    --only over the run) though they name one copy; so did --bits 4,2 after --bits 2,4."""
    (tmp_path / "copy").mkdir()
    monkeypatch.chdir(tmp_path)
    presets = []
    monkeypatch.setattr(paper_repro, "run", lambda preset, modules, out, progress=True: presets.append(preset))
    for spelling in ("copy", "./copy/", str(tmp_path / "copy")):
        paper_repro.main(["--preset", "mnist", "--data-dir", spelling, "--out", str(tmp_path / "out")])
    assert {p.data_dir for p in presets} == {str((tmp_path / "copy").resolve())}
    assert len({json.dumps(p.config(), sort_keys=True) for p in presets}) == 1
    presets.clear()
    for bits in ("2,4", "4,2", "2,4,2"):  # likewise one set of widths in another order, or repeated
        paper_repro.main(["--preset", "tiny", "--bits", bits, "--out", str(tmp_path / "out")])
    assert {p.headline_bits for p in presets} == {(2, 4)} and {p.bits for p in presets} == {(2, 4)}


def test_compare_names_a_report_whose_claims_are_damaged(tmp_path):
    """A report.json with its keys but a claim without "passed", or an accuracy that is not a
    number, ended --compare in a KeyError traceback or a bare format error."""
    for name, report in (("claim", {"preset": {"name": "tiny"}, "claims": [{"id": "C1", "ours": "x"}],
                                    "fp32_test_accuracy": 0.5}),
                         ("accuracy", {"preset": {"name": "tiny"}, "claims": [], "fp32_test_accuracy": "n/a"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        damaged = "claims" if name == "claim" else "fp32_test_accuracy"
        with pytest.raises(SystemExit, match=rf"--compare: .*{name}/report.json: \['{damaged}'\] not as paper_repro "
                                             r"writes them"):
            paper_repro.main(["--compare", str(tmp_path / name)])
