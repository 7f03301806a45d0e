"""The resume logic of bench/luq.py, bench/lapq.py and bench/equalization.py: what a rerun takes
from an earlier, possibly interrupted run's files and what it recomputes. Pure functions only (and
one single-seed ``compare_methods`` on a tiny network); no bench run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import landscape as ls
import models
from landscape import luq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # the scripts import their sibling mnist_resnet20


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_luq, bench_lapq, bench_eq = _script("luq"), _script("lapq"), _script("equalization")
Progress = bench_eq.Progress  # bench/mnist_resnet20.py's store of finished steps


# --------------------------------------------------------------------------- luq: training-run records


def test_luq_training_record_is_reused_only_under_its_training_configuration(monkeypatch):
    """A stored run is kept only under fit's configuration (here the widths differ, which the old
    epochs-and-recipe check missed); a record without one is retrained; a current one is not."""
    data = ls.data.load("digits", calib_size=64, seed=0)
    monkeypatch.setattr(bench_luq, "VARIANTS", [("FP32", dict(mode="fp32", finetune_epochs=0))])
    monkeypatch.setattr(bench_luq, "WIDTHS", (4, 8))
    fits = []
    real_fit = ls.train.fit
    monkeypatch.setattr(ls.train, "fit", lambda *a, **k: fits.append(k) or real_fit(*a, progress=False, **k))
    store = {"runs": {}}
    bench_luq.training_runs("digits", data, 1, [0], store, save=lambda: None)
    record = store["runs"]["digits/FP32/seed0"]
    model = models.create("cnn", num_classes=10, widths=(4, 8))
    recipe = luq.Recipe(mode="fp32", finetune_epochs=0)
    assert record["training_key"] == ls.train.config_key(ls.train.training_config(model, data, epochs=1,
                                                                                  recipe=recipe))
    assert len(fits) == 1

    bench_luq.training_runs("digits", data, 1, [0], store, save=lambda: None)
    assert len(fits) == 1 and store["runs"]["digits/FP32/seed0"] is record  # current: kept, not refit

    other = models.create("cnn", num_classes=10, widths=(8, 16))  # same epochs and recipe, other widths
    store["runs"]["digits/FP32/seed0"] = dict(record, training_key=ls.train.config_key(
        ls.train.training_config(other, data, epochs=1, recipe=recipe)), test_acc=-1.0)
    bench_luq.training_runs("digits", data, 1, [0], store, save=lambda: None)
    assert len(fits) == 2 and store["runs"]["digits/FP32/seed0"]["test_acc"] == record["test_acc"]

    del store["runs"]["digits/FP32/seed0"]["training_key"]  # written before the key was recorded
    bench_luq.training_runs("digits", data, 1, [0], store, save=lambda: None)
    assert len(fits) == 3 and "training_key" in store["runs"]["digits/FP32/seed0"]


# --------------------------------------------------------------------------- luq: gradient-bias records


def test_luq_bias_record_is_reused_only_under_its_configuration():
    args = argparse.Namespace(samples=(1, 4, 16), draws=32)
    x, y = np.zeros((4, 8, 8, 1), np.float32), np.arange(4, dtype=np.int32)
    net1 = {"params": {"conv": {"kernel": np.zeros((3, 3, 1, 4), np.float32)}}}
    net2 = {"params": {"conv": {"kernel": np.ones((3, 3, 1, 4), np.float32)}}}  # e.g. trained for longer
    recipe = luq.Recipe(mode="luq", samples=1)
    config = bench_luq.bias_config(net1, x, y, recipe, args)
    stored = {"rel_error": [0.3, 0.15, 0.07], "config": json.loads(json.dumps(config))}  # through the JSON
    assert bench_luq.stale(stored, config) is None
    assert bench_luq.stale(stored, bench_luq.bias_config(net2, x, y, recipe, args)) == ["network"]
    assert bench_luq.stale(stored, bench_luq.bias_config(net1, x + 1, y, recipe, args)) == ["batch"]
    assert bench_luq.stale(stored, bench_luq.bias_config(net1, x, y, luq.Recipe(mode="rdn"), args)) == ["recipe"]
    more = argparse.Namespace(samples=(1, 4, 16, 64), draws=64)
    assert bench_luq.stale(stored, bench_luq.bias_config(net1, x, y, recipe, more)) == ["draws", "samples"]
    # a record written before configurations were recorded cannot be vouched for; none at all: compute
    assert bench_luq.stale({"rel_error": [0.3]}, config) == ["configuration not recorded"]
    assert bench_luq.stale(None, config) == []


# --------------------------------------------------------------------------- lapq --table


def _committed(name):
    return json.loads((ROOT / "results" / f"{name}.json").read_text())


ALL = list(bench_lapq.lq.ALL_ROWS)


@pytest.mark.parametrize("name,bits,rows", [("lapq_mnist", ["3,3"], ALL), ("lapq_mnist_w2a4", ["2,4"], ALL),
                                            ("lapq_mnist_mse", ["3,3", "2,4"], ["FP32", "max", "MSE"])])
def test_lapq_committed_tables_read_back_and_render_as_before(name, bits, rows):
    """A stored setting is rebuilt exactly (so a resumed run writes the same JSON and tables), and
    the committed files render as committed, apart from what the library changed since (sample
    instead of population std: the ± figures) and the --calib-size flag added to the command line."""
    payload = _committed(name)
    for entry in payload["settings"]:
        stored = {k: v for k, v in entry.items() if k not in ("claims", "software")}  # kept beside the table
        assert bench_lapq.lq.MethodComparison.from_dict(entry).to_dict() == stored
    args = argparse.Namespace(bits=bits, seeds=3, maxiter=1, p_points=5, calib_size=512, out=name,
                              network="results/networks/cifarresnet-8888f8fd66902a057f7b", rows=rows)

    def mask(text):
        return re.sub(r" ± [0-9.]+", "", text.replace(" --calib-size 512", ""))

    assert mask(bench_lapq.render(payload, args)) == mask((ROOT / "results" / f"{name}.md").read_text())


def test_lapq_table_reuses_a_setting_only_under_the_same_configuration():
    entry = _committed("lapq_mnist")["settings"][0]
    ident = dict(network_sha256="aa", data_fingerprint="bb")
    payload = dict(data="mnist", model="resnet20", settings=[entry], **ident)
    setting, seeds = entry["setting"], entry["seeds"]
    assert bench_lapq.reusable(payload, ident, setting, seeds) is entry
    assert bench_lapq.reusable(payload, dict(ident, network_sha256="cc"), setting, seeds) is None  # other weights
    assert bench_lapq.reusable(payload, dict(ident, data_fingerprint="cc"), setting, seeds) is None
    assert bench_lapq.reusable(payload, ident, dict(setting, maxiter=2), seeds) is None
    assert bench_lapq.reusable(payload, ident, dict(setting, p_grid=[2.0, 3.0, 4.0]), seeds) is None
    assert bench_lapq.reusable(payload, ident, dict(setting, calib_size=256), seeds) is None
    assert bench_lapq.reusable(payload, ident, setting, [0, 1]) is None
    assert bench_lapq.reusable(_committed("lapq_mnist"), ident, setting, seeds) is None  # no identity recorded
    assert bench_lapq.reusable({}, ident, setting, seeds) is None


def _only_rows(entry, rows):
    """A stored setting as if computed with ``--rows rows``."""
    part = {k: ({r: v[r] for r in rows} if isinstance(v, dict) and set(v) == set(entry["rows"]) else v)
            for k, v in entry.items() if k != "claims"}
    return dict(part, rows=list(rows))


@pytest.mark.parametrize("name", ["lapq_mnist", "lapq_mnist_w2a4"])
def test_lapq_claims_of_a_full_table_are_the_committed_ones(name):
    for entry in _committed(name)["settings"]:
        table = bench_lapq.lq.MethodComparison.from_dict(entry)
        assert [dict(claim=text, holds=ok) for text, ok in bench_lapq.claims(table)] == entry["claims"]


def test_lapq_claims_without_their_rows_are_listed_as_not_checked():
    entry = _committed("lapq_mnist")["settings"][0]
    only = bench_lapq.lq.MethodComparison.from_dict(_only_rows(entry, ("FP32", "max", "MSE")))
    checks = bench_lapq.claims(only)
    assert [ok for _, ok in checks] == [None, None, None]
    assert checks[0][0] == ("best layer-wise rule vs FP32: not checked (rows not computed: percentile, ACIQ, "
                            "KL, Lp(p*))")
    assert checks[1][0].endswith("not checked (rows not computed: LAPQ (Powell), Lp(p*))")
    # every layer-wise rule and FP32: the first claim is checked, as in the full table
    rules = ("FP32", *bench_lapq.LAYERWISE, "batched")
    checks = bench_lapq.claims(bench_lapq.lq.MethodComparison.from_dict(_only_rows(entry, rules)))
    assert checks[0] == (entry["claims"][0]["claim"], entry["claims"][0]["holds"])
    assert [ok for _, ok in checks[1:]] == [None, None]
    assert "rows not computed: LAPQ (Powell))" in checks[2][0]


def test_lapq_table_with_some_rows_renders_its_command_and_unchecked_claims():
    entry = _committed("lapq_mnist")["settings"][0]
    rows = ["FP32", "MSE", "Lp(p*)", "LAPQ (Powell)"]
    part = _only_rows(entry, rows)
    table = bench_lapq.lq.MethodComparison.from_dict(part)
    claimed = [dict(claim=text, holds=ok) for text, ok in bench_lapq.claims(table)]
    payload = dict(entry=None, software=_committed("lapq_mnist")["software"],
                   settings=[dict(part, claims=claimed)])
    args = argparse.Namespace(bits=["3,3"], seeds=3, maxiter=1, p_points=5, calib_size=512, out="x",
                              network=None, rows=rows)
    text = bench_lapq.render(payload, args)
    assert "--calib-size 512 --rows FP32 MSE 'Lp(p*)' 'LAPQ (Powell)' --out x`" in text
    assert "- [–] best layer-wise rule vs FP32: not checked" in text
    assert "| KL |" not in text and "| LAPQ (Powell) |" in text
    # a stored setting of other rows is not reused; of the same rows, it is
    ident = dict(network_sha256="aa", data_fingerprint="bb")
    stored = dict(settings=[part], **ident)
    assert bench_lapq.reusable(stored, ident, part["setting"], part["seeds"]) is None  # all rows asked
    assert bench_lapq.reusable(stored, ident, part["setting"], part["seeds"], tuple(rows)) is part


def test_lapq_rows_is_an_option_of_the_table_only():
    with pytest.raises(SystemExit, match="--rows: options of --table"):
        bench_lapq.main(["--rows", "FP32", "MSE"])


@pytest.fixture(scope="module")
def small_loss():
    data = ls.data.load("digits", calib_size=64, seed=0)
    net = ls.train.fit(models.create("cnn", num_classes=10, widths=(4, 8)), data, epochs=1, progress=False)
    return ls.ClipLoss(net, data.calib, w_bits=3, a_bits=3, bias_correction=True), data


def test_lapq_expected_setting_is_what_compare_methods_records(small_loss):
    """The table recognises a stored setting by the ``setting`` compare_methods records: computed
    beforehand, it must be that exactly, or no setting would ever be reused."""
    loss, data = small_loss
    args = argparse.Namespace(maxiter=1, p_points=3)
    res = bench_lapq.lq.compare_methods(loss, data, seeds=[0], rows=("FP32",), maxiter=args.maxiter,
                             p_grid=bench_lapq.p_grid(args))
    assert bench_lapq.expected_setting(loss, args) == json.loads(json.dumps(res.to_dict()))["setting"]


# --------------------------------------------------------------------------- equalization


def test_equalization_rows_resume_by_key(tmp_path):
    class Data:
        def fingerprint(self):
            return "d0"

    keys = {bench_eq.row_key(kind, w, a, variant, network)
            for kind in ("mse", "lapq") for w, a in ((4, None), (4, 4), (3, 4))
            for variant in ("BN folded, per-tensor α", "BN folded + CLE, per-tensor α") for network in ("n1", "n2")}
    assert len(keys) == 24  # every part of a row's configuration tells rows apart
    path, calls = str(tmp_path / "eq.progress.json"), []

    def compute(value):
        calls.append(value)
        return dict(w_bits=4, a_bits=None, variant="BN folded + CLE, per-tensor α", test_acc=value)

    key = bench_eq.row_key("mse", 4, None, "BN folded + CLE, per-tensor α", "n1")
    assert Progress(path, bench_eq.progress_settings(Data())).get(key, lambda: compute(0.5))["test_acc"] == 0.5
    again = Progress(path, bench_eq.progress_settings(Data()))  # a rerun after an interruption
    assert again.get(key, lambda: compute(0.7))["test_acc"] == 0.5 and calls == [0.5]
    assert again.get(bench_eq.row_key("mse", 4, None, "BN folded + CLE, per-tensor α", "n2"),
                     lambda: compute(0.6))["test_acc"] == 0.6  # other CLE weights: computed
    other = Data()
    other.fingerprint = lambda: "d1"
    assert Progress(path, bench_eq.progress_settings(other)).steps == {}  # other data: nothing reused


def test_a_bench_rerun_after_a_code_change_starts_afresh(tmp_path, monkeypatch):
    """The benches' progress files are keyed by the code too: a rerun after a change had taken
    the earlier code's steps into the new table (bench/bit_allocation.py's sensitivities and MSE
    rows, after the MSE rule changed)."""
    path, lines = str(tmp_path / "b.progress.json"), []
    monkeypatch.setattr(ls.runtime, "code_version", lambda root=None: "aaaaaaaaaaaa")
    Progress(path, {"seed": 0}, say=lines.append).get("row", lambda: 1)
    assert Progress(path, {"seed": 0}, say=lines.append).steps == {"row": 1}  # same code: resumed
    monkeypatch.setattr(ls.runtime, "code_version", lambda root=None: "bbbbbbbbbbbb")
    assert Progress(path, {"seed": 0}, say=lines.append).steps == {}
    assert lines[-1].endswith("holds another configuration's results; starting afresh")
