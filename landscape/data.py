"""Datasets as NHWC float32 arrays: train / calib / test splits.

``load(name)`` returns a :class:`Dataset` whose ``.train``, ``.calib`` and ``.test`` are
:class:`Split` (``.x`` (N, H, W, C) float32, normalised; ``.y`` (N,) int32).
Calibration images are a seeded sample of the training split (never the test split).

* ``"digits"`` — scikit-learn's bundled 8×8 digits (1797 images), the offline default; pixels
  x/16 (0..16 in the bundle), then one mean and standard deviation of the training split.
  There is no official split: a fixed stratified 80/20 split (independent of ``seed``) so
  test accuracy is comparable across calibration seeds.
* ``"mnist"``, ``"cifar10"``, ``"cifar100"``, ``"imagenet"`` — through Hugging Face
  ``datasets``: the hub id by default, or ``data_dir`` holding a local copy in the hub's
  parquet layout (``**/*train*.parquet`` and ``**/*test*.parquet``, or
  ``*validation*`` for ImageNet). Decoded arrays are cached as ``.npz`` under the cache
  directory (``$LANDSCAPE_CACHE``, default ``~/.cache/landscape``), keyed by the files'
  names, sizes and modification times, so a second load skips PNG decoding; decoding a
  rewritten copy removes the arrays of its earlier versions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import importlib.util
import os
from collections.abc import Sequence

import numpy as np

from landscape import checks
from landscape.atomic import open_atomic

NAMES = ("digits", "mnist", "cifar10", "cifar100", "imagenet")

# Hub ids, image/label columns and normalisation constants (per channel).
_HUB = {
    "mnist": dict(hub="ylecun/mnist", image="image", label="label", test="test",
                  mean=(0.1307,), std=(0.3081,), classes=10),
    "cifar10": dict(hub="uoft-cs/cifar10", image="img", label="label", test="test",
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), classes=10),
    "cifar100": dict(hub="uoft-cs/cifar100", image="img", label="fine_label", test="test",
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), classes=100),
    # preprocess: part of the array cache's name, so that cached arrays of an earlier
    # preprocessing (before it matched torchvision's eval transform) are not read again
    "imagenet": dict(hub="ILSVRC/imagenet-1k", image="image", label="label", test="validation",
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), classes=1000,
                     preprocess="tveval"),
}


@dataclasses.dataclass(frozen=True)
class Split:
    """Images ``x`` (N, H, W, C) float32 and labels ``y`` (N,) int32."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"Split(x={self.x.shape}, y={self.y.shape})"

    def take(self, idx) -> Split:
        return Split(self.x[idx], self.y[idx])


def as_arrays(split, what: str = "split") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as float32 images and int32 labels from a :class:`Split` or an ``(x, y)`` pair,
    checking that both are non-empty arrays of one length, that the images are floating point
    (integer and bool images are refused: uint8 pixels 0–255 cast to float32 give a network
    inputs far outside the normalised range it was trained on, and a silently wrong accuracy)
    and that the labels are integer class indices (not one-hot); ``what`` names the argument in
    errors. Labels against a model's outputs: :func:`check_labels`."""
    if isinstance(split, Split):
        x, y = split.x, split.y
    elif isinstance(split, (tuple, list)) and len(split) == 2:
        x, y = split
    else:
        raise ValueError(f"{what} must be a landscape.data.Split or an (x, y) pair of arrays, got "
                         f"{type(split).__name__} {split!r:.60}")
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim == 2 and x.ndim >= 2 and len(x) == len(y) and len(x) > 0:
        hint = "a column: pass y[:, 0]" if y.shape[1] == 1 else "one-hot labels?: pass y.argmax(axis=1)"
        raise ValueError(f"{what}: labels y must be class indices of shape (N,), got shape {y.shape} ({hint})")
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{what} needs images x (N, ...) and labels y (N,) with the same N >= 1; got x "
                         f"{x.shape}, y {y.shape}")
    _check_float_images(x, what)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: labels y must be integers, got dtype {y.dtype}")
    return np.asarray(x, np.float32), y.astype(np.int32)


def _check_float_images(x: np.ndarray, what: str) -> None:
    """Images of a floating dtype (numpy's, or ml_dtypes' bfloat16 / float8 as JAX arrays give
    them); integer and bool images are named with their range."""
    dtype = x.dtype
    if dtype.kind == "f" or (dtype.kind == "V" and dtype.name.startswith(("bfloat", "float"))):
        return
    if dtype.kind in "biu" or (dtype.kind == "V" and dtype.name.startswith(("int", "uint"))):
        values = f" with values in [{x.min()}, {x.max()}]" if x.size else ""
        raise ValueError(f"{what}: images x must be floating point, normalised as the network was trained "
                         "(landscape.data.load gives float32 (x/255 - mean)/std, digits (x/16 - mean)/std); "
                         f"got dtype {dtype}{values}. "
                         "Integer pixels (uint8 0-255) are not converted: scale and normalise them first")
    raise ValueError(f"{what}: images x must be a floating-point array, got dtype {dtype}")


def check_dataset(data: Dataset, what: str = "data") -> None:
    """The checks of :func:`as_arrays` on each split of a :class:`Dataset` (named
    ``data.train``, ``data.calib``, ``data.test`` in errors), with every image finite and the
    three splits' images of one shape: what :func:`landscape.train.fit` runs on a dataset, so
    that a user-built one is refused by name before any training step."""
    if not isinstance(data, Dataset):
        raise ValueError(f"{what} must be a landscape.data.Dataset (from landscape.data.load), got "
                         f"{type(data).__name__}")
    shape = None
    for name in ("train", "calib", "test"):
        x, _ = as_arrays(getattr(data, name), f"{what}.{name}")
        checks.check_finite_images(x, f"{what}.{name}")
        if shape is None:
            shape = x.shape[1:]
        elif x.shape[1:] != shape:
            raise ValueError(f"{what}.{name} images have shape {x.shape}; {what}.train's are "
                             f"(N, {', '.join(map(str, shape))}): every split must hold images of one shape")


def check_labels(y, num_classes: int, what: str = "split") -> None:
    """Every label in [0, num_classes), the model's output width: a label outside would make the
    cross-entropy NaN and the accuracy silently 0."""
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{what}: labels y must be in [0, {num_classes}) for a model with {num_classes} "
                         f"outputs; got labels from {y.min()} to {y.max()}")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset's splits. ``calib`` ⊂ ``train`` (a seeded sample); ``test`` is disjoint."""

    name: str
    train: Split
    calib: Split
    test: Split
    num_classes: int
    calib_index: np.ndarray  # rows of ``train`` that form ``calib``

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    def fingerprint(self) -> str:
        """A short hash of the train/test arrays (part of training-cache keys)."""
        h = hashlib.sha256()
        for a in (self.train.x, self.train.y, self.test.x, self.test.y):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def with_calib(self, calib_size: int, seed: int) -> Dataset:
        """The same train/test with a fresh calibration sample."""
        index = calibration_index(len(self.train), calib_size, seed)
        return dataclasses.replace(self, calib=self.train.take(index), calib_index=index)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.train)}, calib={len(self.calib)}, "
                f"test={len(self.test)}, input={self.input_shape}, classes={self.num_classes})")


def cache_dir() -> str:
    return os.environ.get("LANDSCAPE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "landscape"))


def spread_rows(n: int, k: int) -> np.ndarray:
    """k of n rows spread evenly over them, (i · n) // k for i < k (all n rows when k ≥ n).

    How the library takes k images from a calibration set (``ClipLoss.init``'s ``stats_size``,
    AdaRound's and GPTQ's ``num_images``): the set is sorted by training row
    (:func:`calibration_index`), so its first k images are the lowest training rows, of the first
    classes only in a training split stored class by class (as image-folder conversions are);
    every (n/k)-th image spans the whole split.
    """
    if k >= n:
        return np.arange(n)
    return (np.arange(k) * n) // k


def calibration_index(n_train: int, calib_size: int, seed: int) -> np.ndarray:
    """A sorted seeded sample of ``calib_size`` training rows (without replacement)."""
    if isinstance(calib_size, bool | np.bool_) or not isinstance(calib_size, int | np.integer) \
            or not 1 <= calib_size <= n_train:
        raise ValueError(f"calib_size={calib_size!r} must be an integer in [1, {n_train}] "
                         "(the size of the training split)")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xCA11B]))
    return np.sort(rng.choice(n_train, size=int(calib_size), replace=False))


def load(name: str, *, data_dir: str | None = None, calib_size: int = 512, seed: int = 0,
         max_train: int | None = None, max_test: int | None = None) -> Dataset:
    """Load a dataset by name (see module docstring). ``seed`` picks the calibration sample.

    ``max_train`` / ``max_test`` keep a fixed (seed-independent) subset of each split,
    decoded and cached at that size; ImageNet defaults to 10,000 of each (a decoded
    224×224 ImageNet image is 600 KB of float32).
    """
    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(NAMES)}")
    for arg, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and (isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer)
                                  or value < 1):
            raise ValueError(f"{arg}={value!r} must be None or a positive integer")
    max_train, max_test = (None if v is None else int(v) for v in (max_train, max_test))
    if name == "imagenet":
        max_train, max_test = max_train or 10_000, max_test or 10_000
    if name == "digits":
        if data_dir is not None:  # bundled with scikit-learn: a directory here would be silently unused
            raise ValueError(f"data_dir={data_dir!r} is not used by 'digits' (bundled with scikit-learn); "
                             "leave it None")
        train, test, classes = _digits()
        train, test = _subset(train, max_train), _subset(test, max_test)
    else:
        train, test, classes = _hub_dataset(name, data_dir, max_train, max_test)
    index = calibration_index(len(train), calib_size, seed)
    return Dataset(name, train, train.take(index), test, classes, index)


def _digits() -> tuple[Split, Split, int]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int32)
    # Fixed stratified split: within each class, a seeded 20% goes to test.
    rng = np.random.default_rng(0)
    test_mask = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test_mask[rng.choice(idx, size=int(round(0.2 * len(idx))), replace=False)] = True
    mean, std = x[~test_mask].mean(), x[~test_mask].std()
    x = ((x - mean) / std)[..., None]
    return Split(x[~test_mask], y[~test_mask]), Split(x[test_mask], y[test_mask]), 10


def _parquet_files(data_dir: str, split: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(data_dir, "**", f"*{split}*.parquet"), recursive=True))
    return files


def _subset_index(n: int, limit: int | None) -> np.ndarray | None:
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(1234).choice(n, size=limit, replace=False))


def _subset(split: Split, limit: int | None) -> Split:
    index = _subset_index(len(split), limit)
    return split if index is None else split.take(index)


def _hub_dataset(name: str, data_dir: str | None, max_train, max_test) -> tuple[Split, Split, int]:
    meta = _HUB[name]
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            what = "is a file, not a directory" if os.path.exists(data_dir) else "does not exist"
            raise FileNotFoundError(f"data_dir={data_dir!r} {what} (expected a local copy of "
                                    f"{meta['hub']} in the hub's parquet layout)")
        files = {s: _parquet_files(data_dir, s) for s in ("train", meta["test"])}
        for split, found in files.items():
            if not found:
                raise FileNotFoundError(
                    f"no '*{split}*.parquet' files under data_dir={data_dir!r}; expected the hub's "
                    f"parquet layout of {meta['hub']}, e.g. {split}-00000-of-00001.parquet")
        copy, version = _files_key(files)
        key = f"{copy}-{version}"
    else:
        key = meta["hub"].replace("/", "__")
    tag = f"-{meta['preprocess']}" if "preprocess" in meta else ""
    cached = os.path.join(cache_dir(), "data", f"{name}{tag}-{key}-{max_train}-{max_test}.npz")
    if os.path.exists(cached):
        with np.load(cached) as z:
            return Split(z["xtr"], z["ytr"]), Split(z["xte"], z["yte"]), meta["classes"]
    raw = _load_splits(name, meta, files if data_dir is not None else None)
    (xtr, ytr), (xte, yte) = (
        _to_arrays(raw[s], meta, limit) for s, limit in (("train", max_train), (meta["test"], max_test))
    )
    with open_atomic(cached, "wb") as f:  # a killed run never leaves a half-written cache
        np.savez(f, xtr=xtr, ytr=ytr, xte=xte, yte=yte)
    if data_dir is not None:
        _drop_older_versions(cached, copy, version)
    return Split(xtr, ytr), Split(xte, yte), meta["classes"]


def _files_key(files: dict[str, Sequence[str]]) -> tuple[str, str]:
    """``(copy, version)``: a hash of the files' paths (which copy) and one of their sizes and
    modification times (which version of it), 12 hex digits each."""
    where, version = hashlib.sha256(), hashlib.sha256()
    for split in sorted(files):
        for f in files[split]:
            st = os.stat(f)
            where.update(f"{os.path.abspath(f)}\n".encode())
            # nanoseconds: a file rewritten within the same second must not hit the old cache
            version.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
    return where.hexdigest()[:12], version.hexdigest()[:12]


def _drop_older_versions(cached: str, copy: str, version: str) -> None:
    """Remove the decoded arrays of earlier versions of the same copy (same files, sizes and
    limits; another modification time): a copy rewritten again and again had left one stale
    .npz of some hundred MB per rewrite."""
    folder, name = os.path.split(cached)
    prefix, suffix = name.split(f"-{copy}-{version}-")
    for other in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(prefix)}-{copy}-*-{glob.escape(suffix)}")):
        if other != cached:
            with contextlib.suppress(OSError):  # another process may have removed it first
                os.remove(other)


def _load_splits(name, meta, files):
    """The raw splits, by split name: the local parquet ``files`` (None: the hub) read by
    ``datasets``, or by pyarrow where ``datasets`` is not installed (local files only)."""
    try:
        import datasets
    except ImportError as e:  # the GPU image and minimal installs may lack it
        if files is not None and importlib.util.find_spec("pyarrow") is not None:
            return _load_with_pyarrow(meta, files)
        raise ImportError(f"loading {name!r} needs the Hugging Face `datasets` package: "
                          "pip install datasets" + ("" if files is None else " (or pyarrow, for a local copy)")) from e
    if files is not None:
        # Local files need no network, yet unless HF_HUB_OFFLINE is set, datasets first sends a
        # request to count the load (datasets.load.increase_load_count): offline while it reads them.
        saved = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = True
        try:
            return datasets.load_dataset("parquet", data_files={k: list(v) for k, v in files.items()})
        except Exception as e:  # an empty or damaged file: datasets' own errors come in many types
            cause = f"{e}" + (f": {e.__cause__}" if e.__cause__ is not None else "")
            raise ValueError(f"could not read the parquet files of this copy of {meta['hub']} "
                             f"({', '.join(f for v in files.values() for f in v)}): {cause}") from e
        finally:
            datasets.config.HF_HUB_OFFLINE = saved
    try:
        return datasets.load_dataset(meta["hub"])
    except Exception as e:  # connection errors come in many types across datasets versions
        raise ConnectionError(
            f"could not load {name!r} from the Hugging Face hub ({meta['hub']}): {e}. "
            f"Without network access, download the parquet files elsewhere and pass "
            f"data_dir='path/to/{name}' (a local copy in the hub's parquet layout)."
        ) from e


class _Columns:
    """A parquet split read by pyarrow, as much of a ``datasets.Dataset`` as :func:`_to_arrays`
    uses: ``column_names``, ``len``, a column by name (a list) and ``select`` (rows)."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.column_names = list(columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def __getitem__(self, name: str) -> list:
        return self.columns[name]

    def select(self, index) -> _Columns:
        return _Columns({k: [v[i] for i in index] for k, v in self.columns.items()})


def _load_with_pyarrow(meta, files) -> dict[str, _Columns]:
    """A local copy read without ``datasets`` (absent from, e.g., a GPU image that has pyarrow):
    the same rows and columns, images left as ``{"bytes": …}`` for :func:`_decode`."""
    import pyarrow.parquet as pq

    splits = {}
    for split, paths in files.items():
        try:
            tables = [pq.read_table(path).to_pydict() for path in paths]
            if any(list(t) != list(tables[0]) for t in tables):  # rows would fall out of step
                raise ValueError(f"the {split!r} files hold other columns: {[list(t) for t in tables]}")
            columns = _Columns({k: [v for t in tables for v in t[k]] for k in tables[0]})
            if not len(columns):  # datasets refuses an empty split too
                raise ValueError(f"the {split!r} split has no rows")
        except Exception as e:  # noqa: BLE001  pyarrow's errors for a damaged file vary
            raise ValueError(f"could not read the parquet files of this copy of {meta['hub']} "
                             f"({', '.join(f for v in files.values() for f in v)}): {e}") from e
        splits[split] = columns
    return splits


def _to_arrays(split, meta, limit) -> tuple[np.ndarray, np.ndarray]:
    columns = list(getattr(split, "column_names", None) or split)
    missing = [c for c in (meta["image"], meta["label"]) if c not in columns]
    if missing:  # another dataset's copy (cifar10 is "img", mnist "image")
        raise ValueError(f"this copy has no column(s) {missing} (it has {columns}); {meta['hub']} stores its images "
                         f"in {meta['image']!r} and labels in {meta['label']!r}: is data_dir a copy of that dataset?")
    index = _subset_index(len(split), limit)
    if index is not None:
        split = split.select(index)
    if meta["hub"].startswith("ILSVRC"):  # cropped from the PIL image: CMYK/palette converted to RGB first
        images = [_center_crop(_decode(im)) for im in split[meta["image"]]]
    else:  # as decoded: a cast to uint8 here wrapped 16-bit pixels and zeroed float ones
        images = [np.asarray(_decode(im)) for im in split[meta["image"]]]
    x = _check_images(images, meta).astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] != len(meta["mean"]):  # grayscale images of an RGB dataset (e.g. ImageNet's)
        x = np.broadcast_to(x[..., :1], x.shape[:-1] + (len(meta["mean"]),)).copy()
    x = (x - np.asarray(meta["mean"], np.float32)) / np.asarray(meta["std"], np.float32)
    y = np.asarray(split[meta["label"]])
    if y.dtype.kind not in "iu":  # float labels were truncated (3.7 → 3), strings parsed, nulls a TypeError
        nulls = sum(v is None for v in y.ravel()) if y.dtype == object else 0
        raise ValueError(f"the labels of this copy of {meta['hub']} ({meta['label']!r}) must be integer class "
                         f"indices; got dtype {y.dtype}, first {y.ravel()[:3].tolist()}"
                         + (f", {nulls} missing (null)" if nulls else "") + ": is data_dir a copy of that dataset?")
    y = y.astype(np.int32)
    if y.size and (y.min() < 0 or y.max() >= meta["classes"]):  # a wrong copy, caught before it is cached
        raise ValueError(f"the labels of this copy of {meta['hub']} run from {y.min()} to {y.max()}, outside "
                         f"[0, {meta['classes']}): is data_dir a copy of that dataset?")
    return x.astype(np.float32), y


def _check_images(images: list, meta) -> np.ndarray:
    """The decoded images of a split stacked, once they are what the hub's copy holds: 8-bit pixels
    (integers in [0, 255]), each (H, W) or (H, W, C) with C = 1 or the dataset's channels, all of
    one shape. Anything else (float or 16-bit pixels, flat pixel lists, RGBA or RGB images of a
    grayscale dataset) is named here instead of being cast into silently wrong inputs."""
    what = f"this copy of {meta['hub']}"
    if not images:
        raise ValueError(f"a split of {what} holds no images")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"the images of {what} differ in shape ({', '.join(map(str, sorted(shapes)[:4]))}"
                         f"{', …' if len(shapes) > 4 else ''}): every image of a split must have one shape")
    shape, channels = images[0].shape, len(meta["mean"])
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[-1] not in (1, channels)):
        raise ValueError(f"the images of {what} have shape {shape}; expected (H, W) or (H, W, C) with C in "
                         f"{sorted({1, channels})}: is data_dir a copy of that dataset?")
    x = np.stack(images)
    if x.dtype.kind not in "iu" or (x.size and (x.min() < 0 or x.max() > 255)):
        values = f" with values in [{x.min()}, {x.max()}]" if x.size and x.dtype.kind in "biuf" else ""
        raise ValueError(f"the images of {what} must hold 8-bit pixels (integers 0-255, as the hub's PNGs); "
                         f"got dtype {x.dtype}{values}")
    return x


def _decode(im):
    """PIL images pass through; ``{"bytes": ...}`` dicts (undecoded parquet) are decoded."""
    if isinstance(im, dict):
        import io

        from PIL import Image

        return Image.open(io.BytesIO(im["bytes"]))
    return im


def _center_crop(im, resize: int = 256, crop: int = 224) -> np.ndarray:
    """ImageNet eval transform, as torchvision's ``Resize(256)`` + ``CenterCrop(224)`` on a PIL
    image: RGB (CMYK, palette and grayscale images converted by PIL), the shorter side to 256 and
    the longer to ⌊256·long/short⌋ (bilinear), then the centre crop at offsets round((size −
    224)/2). Imported torchvision weights then see the images their reference evaluation saw."""
    from PIL import Image

    im = Image.fromarray(im) if isinstance(im, np.ndarray) else im
    im = im.convert("RGB")
    w, h = im.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    if size != (w, h):
        im = im.resize(size, Image.BILINEAR)
    w, h = im.size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    return np.asarray(im.crop((left, top, left + crop, top + crop)))
