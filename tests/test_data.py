import dataclasses
import importlib.util
import io
import json
import os
import platform
import shutil
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls


def test_digits_splits(digits):
    assert digits.train.x.dtype == np.float32 and digits.train.x.ndim == 4
    assert digits.train.x.shape[1:] == (8, 8, 1) and digits.num_classes == 10
    assert digits.train.y.dtype == np.int32
    assert len(digits.calib) == 256
    # Calibration images come from the training split, by index.
    np.testing.assert_array_equal(digits.calib.x, digits.train.x[digits.calib_index])
    # Train and test are disjoint (no image appears in both).
    train_rows = {r.tobytes() for r in digits.train.x}
    assert not any(r.tobytes() in train_rows for r in digits.test.x)
    assert len(digits.train) + len(digits.test) == 1797
    assert abs(float(digits.train.x.mean())) < 1e-4 and abs(float(digits.train.x.std()) - 1) < 1e-4


def test_calibration_seed_changes_sample_not_split():
    a = ls.data.load("digits", calib_size=100, seed=0)
    b = ls.data.load("digits", calib_size=100, seed=1)
    c = ls.data.load("digits", calib_size=100, seed=0)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    np.testing.assert_array_equal(a.calib_index, c.calib_index)
    assert not np.array_equal(a.calib_index, b.calib_index)
    d = a.with_calib(50, seed=3)
    assert len(d.calib) == 50 and set(d.calib_index) <= set(range(len(a.train)))


def test_bad_names_and_sizes():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*digits, mnist"):
        ls.data.load("svhn")
    with pytest.raises(ValueError, match="calib_size=5000"):
        ls.data.load("digits", calib_size=5000)
    with pytest.raises(ValueError, match="max_test=0"):
        ls.data.load("digits", max_test=0)
    with pytest.raises(ValueError, match="data_dir='/somewhere' is not used by 'digits'"):
        ls.data.load("digits", data_dir="/somewhere")
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        ls.data.load("digits", calib_size=10, seed=-1)
    with pytest.raises(ValueError, match="path=123 must be a directory path"):
        ls.enable_compilation_cache(123)
    with pytest.raises(ValueError, match="max_train=True must be None or a positive integer"):
        ls.data.load("digits", max_train=True)
    with pytest.raises(ValueError, match="calib_size=True must be an integer"):
        ls.data.load("digits", calib_size=True)
    data = ls.data.load("digits", max_train=np.int64(500), calib_size=10)  # numpy's integers are integers
    assert len(data.train) == 500


def _write_parquet(path, n, seed, first_label=0):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        arr = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
        labels.append(first_label + i % 10)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(images, type=image_type), "label": pa.array(labels, pa.int64())})
    pq.write_table(table, path)


def test_local_parquet_copy(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    _write_parquet(d / "train-00000-of-00001.parquet", 40, 0)
    _write_parquet(d / "test-00000-of-00001.parquet", 12, 1)
    data = ls.data.load("mnist", data_dir=str(d), calib_size=16, seed=0)
    assert data.train.x.shape == (40, 28, 28, 1) and data.test.x.shape == (12, 28, 28, 1)
    assert data.train.y.tolist() == [i % 10 for i in range(40)]
    # Normalised with MNIST's constants: pixel 0 → −0.1307/0.3081.
    assert data.train.x.min() == pytest.approx(-0.1307 / 0.3081, rel=1e-4)
    again = ls.data.load("mnist", data_dir=str(d), calib_size=16, seed=0)  # from the .npz cache
    np.testing.assert_array_equal(again.train.x, data.train.x)


def test_the_parquet_cache_key_sees_a_rewrite_within_the_same_second(tmp_path):
    """Another file of the same size written within the same second must not hit the old
    decoded copy: the key takes the modification time in nanoseconds."""
    f = tmp_path / "train-00000-of-00001.parquet"
    keys = []
    for content, ns in ((b"a" * 10, 1_700_000_000_100_000_000), (b"b" * 10, 1_700_000_000_900_000_000)):
        f.write_bytes(content)
        os.utime(f, ns=(ns, ns))
        keys.append(ls.data._files_key({"train": [str(f)]}))
    assert keys[0] != keys[1]
    assert keys[0][0] == keys[1][0]  # the same copy, another version of it


def test_a_rewritten_copy_replaces_its_earlier_decoded_arrays(tmp_path, monkeypatch):
    """One decoded .npz per copy and sizes: each rewrite of a copy had left another one behind."""
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "cache"))
    copies = []
    for name in ("a", "b"):
        d = tmp_path / name / "mnist"
        d.mkdir(parents=True)
        copies.append(d)
    cache = tmp_path / "cache" / "data"

    def write(d, ns, seed=0):
        for i, split in enumerate(("train", "test")):
            f = d / f"{split}-00000-of-00001.parquet"
            _write_parquet(f, 20 - 8 * i, seed + i)
            os.utime(f, ns=(ns, ns))

    write(copies[0], 1_700_000_000_000_000_000)
    write(copies[1], 1_700_000_000_000_000_000)
    old = [ls.data.load("mnist", data_dir=str(d), calib_size=8, seed=0) for d in copies]
    ls.data.load("mnist", data_dir=str(copies[0]), max_train=10, calib_size=8, seed=0)  # other sizes: kept
    first = sorted(p.name for p in cache.glob("*.npz"))
    assert len(first) == 3
    write(copies[0], 1_700_000_001_000_000_000, seed=5)  # copy a rewritten
    data = ls.data.load("mnist", data_dir=str(copies[0]), calib_size=8, seed=0)
    assert not np.array_equal(data.test.x, old[0].test.x)  # decoded again, not the old arrays
    after = sorted(p.name for p in cache.glob("*.npz"))
    assert len(after) == 3 and len(set(after) - set(first)) == 1
    (gone,) = set(first) - set(after)  # copy a's earlier full-size arrays; b's and the 10-image ones stay
    copy_a, _ = ls.data._files_key({s: [str(copies[0] / f"{s}-00000-of-00001.parquet")] for s in ("train", "test")})
    assert gone.startswith(f"mnist-{copy_a}-") and gone.endswith("-None-None.npz")


def test_a_copy_with_labels_outside_the_classes_is_refused(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    _write_parquet(d / "train-00000-of-00001.parquet", 20, 0)
    _write_parquet(d / "test-00000-of-00001.parquet", 12, 1, first_label=3)  # labels 3..12
    with pytest.raises(ValueError, match=r"labels of this copy of .* run from 3 to 12, outside \[0, 10\)"):
        ls.data.load("mnist", data_dir=str(d), calib_size=8, seed=0)


def test_another_datasets_copy_is_named(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    _write_parquet(d / "train-00000-of-00001.parquet", 20, 0)
    _write_parquet(d / "test-00000-of-00001.parquet", 12, 1)
    with pytest.raises(ValueError, match=r"this copy has no column\(s\) \['img'\] .*uoft-cs/cifar10 stores its "
                                         r"images in 'img' .*is data_dir a copy of that dataset\?"):
        ls.data.load("cifar10", data_dir=str(d), calib_size=8, seed=0)


def test_imagenet_eval_crop_is_torchvisions():
    """Resize(256) + CenterCrop(224) as torchvision computes them: the long side ⌊256·long/short⌋, the
    offsets round((size − 224)/2); CMYK images converted to RGB by PIL (their 4 channels were read as RGBA)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for w, h, resized, box in ((640, 427, (383, 256), (80, 16)), (300, 301, (256, 256), (16, 16)),
                               (375, 500, (256, 341), (16, 58)), (256, 300, (256, 300), (16, 38))):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = im.resize(resized, Image.BILINEAR) if resized != (w, h) else im
        ref = np.asarray(ref.crop((box[0], box[1], box[0] + 224, box[1] + 224)))
        np.testing.assert_array_equal(ls.data._center_crop(im), ref, err_msg=f"{w}x{h}")
    red = Image.new("CMYK", (300, 260), (0, 255, 255, 0))
    buffer = io.BytesIO()
    red.save(buffer, format="JPEG")
    meta = dict(ls.data._HUB["imagenet"])
    x, y = ls.data._to_arrays({"image": [{"bytes": buffer.getvalue()}], "label": [3]}, meta, None)
    pixel = x[0, 112, 112] * np.asarray(meta["std"]) + np.asarray(meta["mean"])
    assert pixel[0] > 0.9 and pixel[1] < 0.1 and pixel[2] < 0.1 and y.tolist() == [3]


def test_missing_local_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ls.data.load("mnist", data_dir=str(tmp_path / "absent"))
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        ls.data.load("mnist", data_dir=str(tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\*train\*.parquet"):
        ls.data.load("mnist", data_dir=str(tmp_path / "empty"))


def test_unreachable_hub_says_how_to_use_a_local_copy(monkeypatch, tmp_path):
    pytest.importorskip("datasets")  # the hub needs it (the GPU image has none)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConnectionError, match="data_dir="):
        ls.data.load("cifar10")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_write_atomic_replaces_whole_files_only(tmp_path):
    path = tmp_path / "sub" / "table.md"
    ls.atomic.write_atomic(str(path), "old\n")
    assert path.read_text() == "old\n"
    ls.atomic.write_atomic(path, b"new\n")  # bytes and path objects too
    assert path.read_text() == "new\n"
    with pytest.raises(TypeError, match="data must be str or bytes, got int"):
        ls.atomic.write_atomic(str(path), 3)
    with pytest.raises(ZeroDivisionError), ls.atomic.open_atomic(path) as f:
        f.write("half of a ta")
        1 / 0  # noqa: B018  (a write that fails midway)
    assert path.read_text() == "new\n"  # the old content survives a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.md"]  # no temp file left
    with pytest.raises(ValueError, match=r"mode='a'; allowed: 'w' \(text\) or 'wb'"):
        with ls.atomic.open_atomic(path, "a"):
            pass


def test_atomic_writes_sync_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """Durability: a rename that reaches the disk before its data leaves an empty file after a
    power loss, so the data is fsync-ed first and the directory entry after the rename."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.getsize(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ls.atomic.write_atomic(tmp_path / "r.json", "{}" * 1000)
    assert events == [("fsync", False), ("replace", 2000), ("fsync", True)]


@pytest.mark.parametrize("writer", ["network", "export", "figure", "data"])
def test_every_file_writer_goes_through_open_atomic(writer, tmp_path, monkeypatch, digits, tiny_net):
    written = []
    real = ls.atomic.open_atomic

    def spy(path, mode="w"):
        written.append(os.path.basename(os.fspath(path)))
        return real(path, mode)

    from landscape import plots  # matplotlib: not imported by `import landscape`

    monkeypatch.setattr(ls.atomic, "open_atomic", spy)
    for module in (ls.data, plots):
        monkeypatch.setattr(module, "open_atomic", spy)
    if writer == "network":
        ls.train.save_network(tiny_net, str(tmp_path / "net"))
        assert written == ["net.msgpack", "net.json"]
    elif writer == "export":
        loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=8)
        ls.export.save(ls.export.quantize_network(loss, loss.init("mse")), str(tmp_path / "q"))
        assert written == ["q.npz", "q.json"]
    elif writer == "figure":
        import matplotlib.figure

        plots.save_figure(matplotlib.figure.Figure(), tmp_path / "fig", formats=("png",))
        assert written == ["fig.png"]
    else:
        monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "cache"))
        (tmp_path / "mnist").mkdir()
        _write_parquet(tmp_path / "mnist" / "train-00000-of-00001.parquet", 8, 0)
        _write_parquet(tmp_path / "mnist" / "test-00000-of-00001.parquet", 8, 1)
        ls.data.load("mnist", data_dir=str(tmp_path / "mnist"), calib_size=4)
        assert len(written) == 1 and written[0].startswith("mnist-")
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_read_json_resumes_a_store_or_starts_from_a_fresh_default(tmp_path):
    path = str(tmp_path / "runs.json")
    default = {"runs": {}}
    store = ls.runtime.read_json(path, default)
    assert store == {"runs": {}}
    store["runs"]["a"] = 1.5
    assert default == {"runs": {}}  # a copy: filling the store leaves the default alone
    ls.atomic.write_atomic(path, json.dumps(store))
    assert ls.runtime.read_json(path, default) == {"runs": {"a": 1.5}}
    (tmp_path / "broken.json").write_text('{"runs": {')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        ls.runtime.read_json(str(tmp_path / "broken.json"), default)


def test_splits_and_pairs_are_accepted_and_anything_else_is_named(digits, tiny_net):
    x, y = ls.data.as_arrays(digits.test)
    assert x.dtype == np.float32 and y.dtype == np.int32 and len(x) == len(y) == len(digits.test)
    x2, y2 = ls.data.as_arrays((digits.test.x.astype(np.float64), digits.test.y.astype(np.int64)))
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    bad = [("test", r"split must be a landscape.data.Split or an \(x, y\) pair of arrays, got str 'test'"),
           ((digits.test.x, digits.test.y[:5]), r"same N >= 1; got x \(\d+, 8, 8, 1\), y \(5,\)"),
           ((digits.test.x[:0], digits.test.y[:0]), r"same N >= 1"),
           ((digits.test.x, digits.test.y + 0.5), r"labels y must be integers, got dtype float64")]
    for value, match in bad:
        with pytest.raises(ValueError, match=match):
            ls.data.as_arrays(value)
    # the public entry points that take a split say so too
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=None)
    alpha = loss.init("max")
    for call in (lambda: loss.accuracy(alpha, "test"), lambda: tiny_net.accuracy("test"),
                 lambda: ls.export.quantize_network(loss, alpha).accuracy("test")):
        with pytest.raises(ValueError, match="split must be a landscape.data.Split"):
            call()
    with pytest.raises(ValueError, match="calib must be a landscape.data.Split"):
        ls.ClipLoss(tiny_net, digits.calib.x, w_bits=4, a_bits=4)
    assert loss.accuracy(alpha, (digits.test.x, digits.test.y)) == loss.accuracy(alpha, digits.test)


def test_integer_and_bool_images_are_refused_with_their_dtype_and_range(digits, tiny_net):
    """uint8 pixels 0-255 were cast to float32 as they were: a network trained on normalised images
    scored a silent fraction of its accuracy on them. Every entry point that takes images through
    as_arrays (ClipLoss, its accuracy, Network.accuracy, an exported network's) now names them."""
    x, y = digits.test.x[:64], digits.test.y[:64]
    pixels = ((x - x.min()) / (x.max() - x.min()) * 255).round().astype(np.uint8)
    assert pixels.min() == 0 and pixels.max() == 255
    bad = [(pixels, r"got dtype uint8 with values in \[0, 255\]"),
           (pixels.astype(np.int64) - 128, r"got dtype int64 with values in \[-128, 127\]"),
           (x > 0, r"got dtype bool with values in \[False, True\]")]
    for images, match in bad:
        with pytest.raises(ValueError, match=r"split: images x must be floating point, normalised as the network "
                                             r"was trained \(landscape.data.load gives float32 .* " + match):
            ls.data.as_arrays((images, y))
    with pytest.raises(ValueError, match=r"split: images x must be a floating-point array, got dtype <U1"):
        ls.data.as_arrays((np.full(x.shape, "a"), y))
    loss = ls.ClipLoss(tiny_net, digits.calib, w_bits=4, a_bits=4)
    alpha = loss.init("max")
    entry_points = [lambda: ls.ClipLoss(tiny_net, (pixels, y), w_bits=4, a_bits=4),
                    lambda: loss.accuracy(alpha, (pixels, y)), lambda: tiny_net.accuracy((pixels, y)),
                    lambda: ls.train.accuracy(tiny_net, ls.data.Split(pixels, y)),
                    lambda: ls.export.quantize_network(loss, alpha).accuracy((pixels, y))]
    for call in entry_points:
        with pytest.raises(ValueError, match=r"images x must be floating point.*got dtype uint8"):
            call()
    # floating images of any width are accepted, as float32
    for images in (x.astype(np.float16), x.astype(np.float64), np.asarray(jnp.asarray(x, jnp.bfloat16))):
        x32, y32 = ls.data.as_arrays((images, y))
        assert x32.dtype == np.float32 and y32.dtype == np.int32
        np.testing.assert_allclose(x32, x, atol=0.05 * np.abs(x).max())


def test_one_hot_labels_are_named_as_such(digits):
    x, y = digits.test.x[:16], digits.test.y[:16]
    with pytest.raises(ValueError, match=r"calib: labels y must be class indices of shape \(N,\), got shape "
                                         r"\(16, 10\) \(one-hot labels\?: pass y.argmax\(axis=1\)\)"):
        ls.data.as_arrays((x, np.eye(10, dtype=np.int32)[y]), "calib")
    with pytest.raises(ValueError, match=r"got shape \(16, 1\) \(a column: pass y\[:, 0\]\)"):
        ls.data.as_arrays((x, y[:, None]), "calib")


def test_check_dataset_names_the_split_and_passes_the_loaders_datasets(digits):
    ls.data.check_dataset(digits)  # load's float32 images and int32 labels pass
    with pytest.raises(ValueError, match="data must be a landscape.data.Dataset .* got Split"):
        ls.data.check_dataset(digits.train)
    nan = digits.test.x.copy()
    nan[0, 0, 0, 0] = np.inf
    cases = [(dict(calib=ls.data.Split(digits.calib.x.astype(np.int32), digits.calib.y)),
              r"data.calib: images x must be floating point.*got dtype int32"),
             (dict(test=ls.data.Split(nan, digits.test.y)), r"data.test images must be finite: 1 of 359"),
             (dict(calib=ls.data.Split(digits.calib.x.reshape(256, 8, 4, 2), digits.calib.y)),
              r"data.calib images have shape \(256, 8, 4, 2\); data.train's are \(N, 8, 8, 1\)")]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            ls.data.check_dataset(dataclasses.replace(digits, **change))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_code_version_names_the_commit_of_a_checkout(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert ls.runtime.code_version(repo) is None  # not a checkout
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org",
           "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "one"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    assert ls.runtime.code_version(repo) == head
    (repo / "b.txt").write_text("untracked files do not count")
    assert ls.runtime.code_version(repo) == head
    (repo / "a.txt").write_text("2")
    assert ls.runtime.code_version(repo) == head + "+dirty"
    (repo / "sub").mkdir()
    assert ls.runtime.code_version(repo / "sub") is None  # inside a repository, not its root


def test_the_own_code_version_is_the_one_at_the_first_call(monkeypatch):
    """A long run records the code it imported: a commit made while paper_repro ran (43 minutes) had
    been recorded as the run's code. An explicit root is asked afresh each time."""
    answers = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd"])
    monkeypatch.setattr(ls.runtime, "_checkout_version", lambda root: next(answers))
    ls.runtime._own_code_version.cache_clear()
    try:
        assert ls.runtime.code_version() == "aaaaaaaaaaaa"
        assert ls.runtime.code_version() == "aaaaaaaaaaaa"  # a commit since: still the code this process runs
        assert ls.runtime.software()["code"] == "aaaaaaaaaaaa"
        assert ls.runtime.code_version("/elsewhere") == "bbbbbbbbbbbb"
        assert ls.runtime.code_version("/elsewhere") == "cccccccccccc"
    finally:
        ls.runtime._own_code_version.cache_clear()


def test_result_files_record_the_cpu_model(tmp_path):
    """XLA:CPU compiles for the host's instruction set, so result files name the CPU model."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Fake CPU 9000 @ 3.0GHz\n\n"
                    "processor\t: 1\nmodel name\t: Fake CPU 9000 @ 3.0GHz\n")
    assert ls.runtime.cpu_model(str(info)) == "Fake CPU 9000 @ 3.0GHz"
    fallback = ls.runtime.cpu_model(str(tmp_path / "missing"))
    assert fallback and fallback == (platform.processor() or platform.machine() or "unknown")
    versions = ls.runtime.software()
    assert versions["cpu"] == ls.runtime.cpu_model()
    assert f"cpu {versions['cpu']}" in ls.runtime.describe_software(versions)


def test_calibration_sample_is_distinct_rows_from_the_whole_training_split(digits):
    """calib_index: sorted distinct rows (a draw without replacement), spread over the whole training
    split, up to all of it. Guards against a draw with replacement (repeated calibration images), a
    calib_size equal to the training split refused, and a sample drawn from range(len(test))."""
    n = len(digits.train)
    index = digits.calib_index
    assert len(index) == 256 and np.all(np.diff(index) > 0)  # sorted, no repeats
    assert index.max() > len(digits.test)  # rows beyond the first len(test) rows are drawn too
    np.testing.assert_array_equal(ls.data.calibration_index(n, n, seed=5), np.arange(n))
    whole = ls.data.load("digits", calib_size=n, seed=2)
    np.testing.assert_array_equal(whole.calib_index, np.arange(n))
    np.testing.assert_array_equal(whole.calib.x, whole.train.x)
    for size in (2, 100, n - 1):
        drawn = ls.data.calibration_index(n, size, seed=3)
        assert len(np.unique(drawn)) == size and drawn.min() >= 0 and drawn.max() < n


def test_subsets_of_the_calibration_sample_span_the_training_split():
    """The library takes k of a calibration set's images (ClipLoss.init's stats_size, AdaRound's and
    GPTQ's num_images). The set is sorted by training row, so its first 512 of 1024 images held only
    classes 0-4 of a training split stored class by class; spread_rows takes every other one."""
    y = np.repeat(np.arange(10), 1000)  # a training split stored class by class
    index = ls.data.calibration_index(len(y), 1024, seed=0)
    assert np.bincount(y[index[:512]], minlength=10)[5:].sum() == 0  # the prefix: classes 0-4
    for k in (64, 512, 1023):
        rows = ls.data.spread_rows(len(index), k)
        assert len(np.unique(rows)) == k and rows.min() == 0 and rows.max() < len(index)
        counts = np.bincount(y[index[rows]], minlength=10)
        assert counts.min() > 0 and counts.max() < 2 * k / 10, (k, counts)
    np.testing.assert_array_equal(ls.data.spread_rows(100, 100), np.arange(100))
    np.testing.assert_array_equal(ls.data.spread_rows(100, 500), np.arange(100))
    np.testing.assert_array_equal(ls.data.spread_rows(10, 4), [0, 2, 5, 7])


def test_with_calib_draws_the_sample_of_its_seed(digits):
    """with_calib(size, seed) is the sample load(calib_size=size, seed=seed) draws, and another seed
    draws another (the seed was not passed on)."""
    a, b = digits.with_calib(50, seed=3), digits.with_calib(50, seed=4)
    np.testing.assert_array_equal(a.calib_index, ls.data.load("digits", calib_size=50, seed=3).calib_index)
    np.testing.assert_array_equal(a.calib_index, ls.data.calibration_index(len(digits.train), 50, 3))
    assert not np.array_equal(a.calib_index, b.calib_index)
    np.testing.assert_array_equal(a.calib.x, digits.train.x[a.calib_index])
    np.testing.assert_array_equal(a.test.x, digits.test.x)  # train and test untouched


def test_digits_test_split_is_a_stratified_fifth(digits):
    """Within each class, round(20 %) of its images go to test (359 of 1797 in all). Guards against
    another test fraction (the suite's accuracy thresholds are on this split)."""
    assert len(digits.test) == 359 and len(digits.train) == 1438
    for c in range(10):
        in_test, in_train = int(np.sum(digits.test.y == c)), int(np.sum(digits.train.y == c))
        assert in_test == int(round(0.2 * (in_test + in_train))), c


def test_fingerprint_covers_the_labels_and_the_test_split(digits):
    """The fingerprint keys cached networks: relabelled training images, relabelled or other test
    images must not find a network trained on the original data. The calibration sample is no part
    of it (it does not change what fit trains)."""
    fp = digits.fingerprint()
    assert digits.with_calib(10, seed=7).fingerprint() == fp
    relabel = lambda s: ls.data.Split(s.x, ((s.y + 1) % 10).astype(np.int32))  # noqa: E731
    changed = [dataclasses.replace(digits, train=relabel(digits.train)),
               dataclasses.replace(digits, test=relabel(digits.test)),
               dataclasses.replace(digits, test=ls.data.Split(digits.test.x * 1.01, digits.test.y)),
               dataclasses.replace(digits, train=ls.data.Split(digits.train.x * 1.01, digits.train.y))]
    assert len({fp} | {d.fingerprint() for d in changed}) == 5


def test_local_parquet_pixels_are_normalised_from_0_255(tmp_path):
    """Every decoded pixel p becomes (p/255 − 0.1307)/0.3081: the brightest pixel 255 maps to
    (1 − 0.1307)/0.3081 (a division by 256 was off by 0.4 % there, invisible at pixel 0)."""
    d = tmp_path / "mnist"
    d.mkdir()
    _write_parquet(d / "train-00000-of-00001.parquet", 12, 0)
    _write_parquet(d / "test-00000-of-00001.parquet", 12, 1)
    data = ls.data.load("mnist", data_dir=str(d), calib_size=4, seed=0)
    rng = np.random.default_rng(0)  # the images _write_parquet drew for the training split
    pixels = np.stack([rng.integers(0, 256, size=(28, 28), dtype=np.uint8) for _ in range(12)])
    assert pixels.max() == 255
    want = (pixels.astype(np.float32) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(data.train.x[..., 0], want, rtol=1e-6, atol=1e-6)
    assert data.train.x.max() == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-6)


def test_check_labels_refuses_the_label_equal_to_the_class_count():
    """Labels run over [0, num_classes): the label num_classes itself is one too many."""
    ls.data.check_labels(np.array([0, 3, 9]), 10)
    for y, low, high in (([0, 10], 0, 10), ([-1, 2], -1, 2)):
        with pytest.raises(ValueError, match=rf"labels y must be in \[0, 10\) .*got labels from {low} to {high}"):
            ls.data.check_labels(np.array(y), 10, "split")


def _write_table(path, images, labels, label_type=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": images, "label": pa.array(labels, label_type)}), path)


def _png(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


@pytest.mark.parametrize("case", ["rgb", "flat", "float pixels", "16-bit", "mixed shapes", "float labels",
                                  "string labels", "null label"])
def test_a_copy_in_another_layout_is_named_not_cast(case, tmp_path):
    """A local copy whose images or labels are not what the hub's holds was cast into silently
    wrong data: RGB images for MNIST lost two channels, flat pixel lists became (N, 1) "images",
    float pixels in [0, 1] became all zero, 16-bit pixels wrapped modulo 256 and float labels
    were truncated (3.7 → 3). Each is now refused by name before anything is cached."""
    rng = np.random.default_rng(0)
    gray = lambda i: _png(rng.integers(0, 256, (28, 28), dtype=np.uint8))  # noqa: E731
    image, labels, label_type = gray, [i % 10 for i in range(6)], None
    if case == "rgb":
        image = lambda i: _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))  # noqa: E731
    elif case == "flat":
        image = lambda i: rng.integers(0, 256, 784).tolist()  # noqa: E731
    elif case == "float pixels":
        image = lambda i: rng.random((28, 28)).tolist()  # noqa: E731
    elif case == "16-bit":
        image = lambda i: _png(rng.integers(0, 65536, (28, 28)).astype(np.uint16))  # noqa: E731
    elif case == "mixed shapes":
        image = lambda i: _png(rng.integers(0, 256, (28, 28 + i % 2), dtype=np.uint8))  # noqa: E731
    elif case == "float labels":
        labels = [i % 10 + 0.7 for i in range(6)]
    elif case == "string labels":
        labels = [str(i % 10) for i in range(6)]
    elif case == "null label":
        labels = [None, 1, 2, 3, 4, 5]
    expected = {"rgb": r"have shape \(32, 32, 3\); expected \(H, W\) or \(H, W, C\) with C in \[1\]",
                "flat": r"have shape \(784,\)", "float pixels": r"8-bit pixels .*got dtype float64 with values in \[0",
                "16-bit": r"8-bit pixels .*got dtype uint16 with values in", "mixed shapes": r"differ in shape",
                "float labels": r"integer class indices; got dtype float64, first \[0.7, 1.7, 2.7\]",
                "string labels": r"integer class indices; got dtype <U1", "null label": r"1 missing \(null\)"}[case]
    d = tmp_path / "mnist"
    d.mkdir()
    for split in ("train", "test"):
        _write_table(d / f"{split}-00000-of-00001.parquet", [image(i) for i in range(6)], labels, label_type)
    with pytest.raises(ValueError, match=expected):
        ls.data.load("mnist", data_dir=str(d), calib_size=2)


def test_an_empty_or_damaged_copy_is_a_value_error_naming_the_files(tmp_path):
    """An empty split made datasets raise its own DatasetGenerationError, which paper_repro did
    not catch (a traceback instead of its one-line 'cannot load')."""
    import pyarrow as pa

    d = tmp_path / "mnist"
    d.mkdir()
    _write_parquet(d / "train-00000-of-00001.parquet", 12, 0)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    _write_table(d / "test-00000-of-00001.parquet", pa.array([], image_type), [], pa.int64())
    with pytest.raises(ValueError, match=r"could not read the parquet files of this copy of ylecun/mnist \(.*"
                                         r"test-00000-of-00001.parquet\)"):
        ls.data.load("mnist", data_dir=str(d), calib_size=2)


def test_a_local_copy_without_datasets_reads_the_same_arrays_with_pyarrow(tmp_path, monkeypatch):
    """Without `datasets` (a GPU image with pyarrow had none) a local copy is read by pyarrow: the
    same arrays, the same errors; the hub still needs `datasets` and says so."""
    d = tmp_path / "mnist"
    d.mkdir()
    _write_parquet(d / "train-00000-of-00001.parquet", 20, 0)
    _write_parquet(d / "test-00000-of-00001.parquet", 12, 1)
    with_datasets = None
    if importlib.util.find_spec("datasets") is not None:
        monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "cache_datasets"))
        with_datasets = ls.data.load("mnist", data_dir=str(d), calib_size=4, max_train=15, max_test=10)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "cache_pyarrow"))
    data = ls.data.load("mnist", data_dir=str(d), calib_size=4, max_train=15, max_test=10)
    assert (len(data.train), len(data.test), data.input_shape) == (15, 10, (28, 28, 1))
    if with_datasets is not None:
        for ours, theirs in ((data.train, with_datasets.train), (data.test, with_datasets.test)):
            np.testing.assert_array_equal(ours.x, theirs.x)
            np.testing.assert_array_equal(ours.y, theirs.y)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": pq.read_table(d / "train-00000-of-00001.parquet")["image"]}),
                   d / "train-00001-of-00001.parquet")  # a second file without labels
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "cache_columns"))
    columns = r"the 'train' files hold other columns: \[\['image', 'label'\], \['image'\]\]"
    with pytest.raises(ValueError, match=columns):
        ls.data.load("mnist", data_dir=str(d), calib_size=4)
    (d / "train-00001-of-00001.parquet").unlink()
    (d / "test-00000-of-00001.parquet").write_bytes(b"PAR1 not a parquet file")
    monkeypatch.setenv("LANDSCAPE_CACHE", str(tmp_path / "cache_damaged"))
    with pytest.raises(ValueError, match=r"could not read the parquet files of this copy of ylecun/mnist \(.*"
                                         r"test-00000-of-00001.parquet\)"):
        ls.data.load("mnist", data_dir=str(d), calib_size=4)
    with pytest.raises(ImportError, match=r"loading 'mnist' needs the Hugging Face `datasets` package"):
        ls.data.load("mnist", calib_size=4)


def test_a_local_copy_is_read_without_the_network(tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE in the environment, datasets sent a request to count the load
    (datasets.load.increase_load_count) before reading local parquet files."""
    import socket

    datasets = pytest.importorskip("datasets")  # what is tested is datasets' own request
    from huggingface_hub import constants

    for module in (datasets.config, constants):  # as for a user without HF_HUB_OFFLINE (conftest sets it)
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    d = tmp_path / "mnist"
    d.mkdir()
    _write_parquet(d / "train-00000-of-00001.parquet", 12, 0)
    _write_parquet(d / "test-00000-of-00001.parquet", 12, 1)
    data = ls.data.load("mnist", data_dir=str(d), calib_size=4)
    assert len(data.train) == 12 and attempts == []
    assert datasets.config.HF_HUB_OFFLINE is False  # the caller's setting is restored
