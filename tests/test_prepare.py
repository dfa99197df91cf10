"""The prepare command (data_builders/prepare.py): a failure leaves nothing behind."""

import os

import pytest
from conftest import error_lines, run_python


@pytest.mark.slow
def test_prepare_empty_manual_dir_is_one_line_and_leaves_nothing(tmp_path):
    empty, home = tmp_path / "empty", tmp_path / "home"
    empty.mkdir()
    home.mkdir()
    result = run_python(["-m", "data_builders.prepare", "bigearthnet_v2", "--manual_dir",
                         str(empty)], timeout=300, HOME=str(home))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_lines(result.stderr) == [
        f"error: manual dir {empty} is empty: extract the official archives of bigearthnet_v2 "
        "there"]
    assert not (home / "tensorflow_datasets").exists()


def test_prepare_failure_removes_tfds_scaffolding(tmp_path):
    from data_builders import prepare

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "readme.txt").write_text("not the archives")
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError, AssertionError), match="lacks"):
        prepare.prepare("bigearthnet_v2", junk, out)
    assert sorted(os.listdir(out)) == [] if out.exists() else True
    assert prepare._parser().parse_args(["bigearthnet_v2", "--manual_dir", "m"]).data_dir == (
        "~/tensorflow_datasets")

