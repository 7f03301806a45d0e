"""Atomic, durable file writes: every result file, checkpoint, export, figure and cache of
landscape goes through :func:`open_atomic`.

A file is written under a temporary name in its target directory, flushed and ``fsync``-ed,
renamed onto the target with ``os.replace`` and the directory entry ``fsync``-ed in turn. So a
run killed at any point, and a machine that loses power after the call returned, leave either
the old file or the complete new one: never half of one, never an empty file under the new name
(a rename can reach the disk before the data it points at unless the data is synced first).
A write that raises removes its temporary file and leaves the target untouched.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO


def fsync_directory(path: str | os.PathLike) -> None:
    """Make the directory entries of ``path`` (a rename into it) durable. A no-op where a
    directory cannot be opened for syncing (Windows)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is still atomic
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """``with open_atomic(path, "wb") as f:`` writes ``path`` as a whole or not at all.

    ``mode`` is "w" (text, UTF-8) or "wb". The parent directories are created. The temporary
    file, ``.<name>.<pid>-<random>.tmp`` beside the target, is created exclusively with the
    usual permissions (0666 less the umask), so concurrent writers never share one.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r}; allowed: 'w' (text) or 'wb' (bytes)")
    path = os.fspath(path)
    if not path or path.endswith(os.sep):
        raise ValueError(f"path={path!r} must name a file")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_directory(directory)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` through :func:`open_atomic`."""
    if not isinstance(data, str | bytes):
        raise TypeError(f"data must be str or bytes, got {type(data).__name__}")
    with open_atomic(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
