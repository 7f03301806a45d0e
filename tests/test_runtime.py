"""Process-level helpers (landscape.runtime) and atomic writes (landscape.atomic)."""

import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
from landscape import atomic, runtime


def test_result_store_computes_once_writes_through_and_resumes_its_own_config(tmp_path):
    path = tmp_path / "store.json"
    config = {"bits": (4, 8), "seed": 0}  # a tuple: read back from JSON as a list, still the same config
    calls = []

    def compute(value):
        calls.append(value)
        return value

    lines = []
    store = runtime.ResultStore(path, config, say=lines.append)
    assert store.get("a", lambda: compute([1.5, None])) == [1.5, None]
    assert store.get("a", lambda: compute("again")) == [1.5, None]  # stored: not computed again
    assert calls == [[1.5, None]] and not lines
    assert json.loads(path.read_text()) == {"config": {"bits": [4, 8], "seed": 0}, "steps": {"a": [1.5, None]}}

    resumed = runtime.ResultStore(str(path), dict(config), say=lines.append)
    assert lines == [f"resuming: 1 finished results in {path}"]
    assert "a" in resumed.steps and resumed.get("a", lambda: compute("fresh")) == [1.5, None]
    assert calls == [[1.5, None]]

    other = runtime.ResultStore(path, {**config, "seed": 1}, say=lines.append)
    assert lines[-1] == f"{path} holds another configuration's results; starting afresh"
    assert other.steps == {} and other.get("a", lambda: compute(2)) == 2
    assert json.loads(path.read_text())["steps"] == {"a": 2}  # the other configuration's rows are replaced
    other.finish()
    assert not path.exists()
    other.finish()  # no file: nothing to do

    memory = runtime.ResultStore(None, config, say=lines.append)
    assert memory.get("k", lambda: 3) == 3 and memory.get("k", lambda: 4) == 3
    memory.finish()
    assert sorted(os.listdir(tmp_path)) == []


def test_classic_threefry_draws_in_the_original_layout_whatever_the_global_flag():
    key = jax.random.key(7)
    with jax.threefry_partitionable(False):
        classic = np.asarray(jax.random.uniform(key, (6,)))
    with jax.threefry_partitionable(True):
        partitionable = np.asarray(jax.random.uniform(key, (6,)))
        with runtime.classic_threefry():
            drawn = np.asarray(jax.random.uniform(key, (6,)))
    assert not np.allclose(classic, partitionable)  # the two layouts differ, so the test can tell
    np.testing.assert_array_equal(drawn, classic)


def test_split_partial_splits_only_partials_of_arrays_and_call_split_puts_x_after_the_bound_args():
    def f(a, x, y=0.0, *, scale):
        return scale * (a - x) + y

    p = jax.tree_util.Partial(f, jnp.float32(5.0), scale=np.float32(2.0))
    fn, bound = runtime.split_partial(p)
    assert fn is f and len(bound[0]) == 1 and set(bound[1]) == {"scale"}
    assert float(runtime.call_split(fn, bound, 1.0)) == pytest.approx(8.0)  # 2 · (5 − 1)
    assert float(runtime.call_split(fn, bound, 1.0, 0.5)) == pytest.approx(8.5)  # extra args after x
    assert float(runtime.call_split(lambda x, y=0.0: x - y, None, 3.0, 1.0)) == 2.0
    names = jax.tree_util.Partial(f, "not an array", scale=1.0)  # a string cannot be jit data
    assert runtime.split_partial(names) == (names, None)

    def plain(x):
        return x

    assert runtime.split_partial(plain) == (plain, None)


def test_weak_entry_keeps_one_table_per_function_and_does_not_keep_it_alive():
    import weakref

    table = weakref.WeakKeyDictionary()

    def g(x):
        return x

    entry, ref = runtime.weak_entry(table, g)
    entry["program"] = 1
    again, _ = runtime.weak_entry(table, g)
    assert again is entry and ref() is g
    del g
    import gc

    gc.collect()
    assert len(table) == 0
    fresh, get = runtime.weak_entry(table, [1])  # unhashable: a dict for this call only
    assert fresh == {} and get() == [1] and len(table) == 0


def test_check_precision_names_the_caller():
    for level in runtime.PRECISIONS:
        assert runtime.check_precision(level, "here") == level
    for bad in ("fast", None, "HIGHEST"):
        with pytest.raises(ValueError, match=rf"here: precision={bad!r}; allowed: 'highest', 'float32'"):
            runtime.check_precision(bad, "here")


def test_enable_compilation_cache_defaults_to_the_landscape_cache():
    path = ls.enable_compilation_cache()  # as conftest already did: the same directory
    assert path == os.path.join(ls.data.cache_dir(), "xla") and os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0  # small programs are cached too
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0


def test_describe_software_names_the_code_once():
    versions = {"code": "abc123", "python": "3.x", "jax": "0.0"}
    assert runtime.describe_software(versions) == "code `abc123`; python 3.x, jax 0.0"
    assert runtime.describe_software({**versions, "code": None}).startswith("code `not a git checkout`; python")


def test_software_names_the_accelerator_only_when_jax_has_one(monkeypatch):
    """A GPU's float32 rounds differently from the CPU's, so result files name it (a GPU table had
    recorded only its host's CPU model); CPU runs keep the keys they had."""
    class FakeCPU:
        platform, device_kind = "cpu", "cpu"

    class FakeGPU:
        platform, device_kind = "gpu", "NVIDIA H200"

    monkeypatch.setattr(jax, "devices", lambda *a: [FakeCPU()])
    assert runtime.accelerator() is None and "accelerator" not in runtime.software()

    monkeypatch.setattr(jax, "devices", lambda *a: [FakeGPU(), FakeGPU()])
    assert runtime.accelerator() == "2 × NVIDIA H200 (gpu)"
    versions = runtime.software()
    assert versions["accelerator"] == "2 × NVIDIA H200 (gpu)" and versions["cpu"] == runtime.cpu_model()
    assert "accelerator 2 × NVIDIA H200 (gpu)" in runtime.describe_software(versions)


def test_atomic_write_renames_within_the_target_directory_with_the_usual_permissions(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((os.path.dirname(os.path.abspath(src)), os.path.dirname(os.path.abspath(dst))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "out" / "r.txt"
    atomic.write_atomic(target, "α ≤ 1\n")
    assert renames == [(str(target.parent), str(target.parent))]  # a rename inside one directory is atomic
    assert target.read_bytes() == "α ≤ 1\n".encode()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    for bad in ("", str(tmp_path / "out") + os.sep):
        with pytest.raises(ValueError, match="must name a file"):
            atomic.write_atomic(bad, "x")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r.txt"]
