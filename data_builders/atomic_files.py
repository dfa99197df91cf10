"""Atomic file writes: a reader (or a job killed mid-write) sees the old file or the new one,
never a partial one.

Local paths go through a temp file in the same folder and ``os.replace``; URLs (``gs://...``)
are written as one whole object through ``etils.epath``, since an object store's single write
is atomic already.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from etils import epath

# Read once: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = os.umask(0)
os.umask(_UMASK)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (``gs://...``) rather than a local path."""
    return "://" in os.fspath(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temp path beside local `path` for any writer (rasterio, pyarrow, savefig ...).

    On a clean exit the temp file is renamed onto `path`, with the permissions a plain
    ``open(path, "w")`` would give; on an exception it is removed and `path` is untouched.
    Creates the folder if needed.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yields a binary file to write `path` through, atomically: a temp file beside a local path
    (streamed, so large outputs are not held in memory), or an in-memory buffer uploaded as one
    object to a URL on a clean exit. On an exception nothing is written."""
    if is_remote(path):
        buffer = io.BytesIO()
        yield buffer
        epath.Path(os.fspath(path)).write_bytes(buffer.getvalue())
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` (str as UTF-8) to a local path or a URL, atomically."""
    with open_atomic(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
