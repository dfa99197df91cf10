"""Atomic writes: the new content or the old, never a partial file; permissions as open()."""

import os
import stat

import pytest

from data_builders import atomic_files


def test_write_replaces_whole_file_with_plain_permissions(tmp_path):
    path = tmp_path / "new" / "folder" / "a.json"
    atomic_files.write_atomic(path, "first")
    atomic_files.write_atomic(str(path), b"second \xff")
    assert path.read_bytes() == b"second \xff"
    assert os.listdir(path.parent) == ["a.json"]
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_files.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half a pic")
            assert path.read_bytes() == b"old"  # nothing visible before the rename
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["picture.png"]


def test_writer_that_never_opens_the_temp_still_gives_the_file(tmp_path):
    # mkstemp made the temp file; a writer may replace it (e.g. rasterio, pyarrow).
    path = tmp_path / "t.txt"
    with atomic_files.atomic_path(path) as tmp:
        os.remove(tmp)
        with open(tmp, "w") as f:
            f.write("ok")
    assert path.read_text() == "ok"


def test_is_remote():
    assert atomic_files.is_remote("gs://bucket/run")
    assert not atomic_files.is_remote("/tmp/run")
    assert not atomic_files.is_remote(os.path.join("runs", "x"))


def test_open_atomic_streams_to_the_file_and_keeps_the_old_one_on_failure(tmp_path):
    path = tmp_path / "embeddings.npz"
    with atomic_files.open_atomic(path) as f:
        f.write(b"new ")
        f.write(b"content")
        assert not path.exists()  # visible only once complete
    assert path.read_bytes() == b"new content"
    with pytest.raises(OSError, match="quota"):
        with atomic_files.open_atomic(path) as f:
            f.write(b"partial")
            raise OSError("quota exceeded")
    assert path.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["embeddings.npz"]
