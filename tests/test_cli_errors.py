"""One-line errors for every entry point (data_builders/cli_errors.py)."""

import errno
import os

import pytest

from data_builders import cli_errors


def test_config_key_typo_is_one_line_with_suggestion():
    import ml_collections

    config = ml_collections.ConfigDict({"batch_size": 1})
    with pytest.raises(AttributeError) as info:
        config.batchsize  # noqa: B018  (the lookup ml_collections' config flags do)
    line, status = cli_errors.describe(info.value, ["--config=x.py", "--config.batchsize=64"])
    assert status == cli_errors.USAGE_STATUS
    assert "--config.batchsize" in line and "did you mean 'batch_size'" in line
    assert "\n" not in line


@pytest.mark.parametrize("code, word", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EROFS, "read-only file system"),
                                        (errno.EACCES, "permission denied")])
def test_os_errors_name_the_path(code, word):
    exc = OSError(code, os.strerror(code), "/data/run/checkpoints/80")
    line, status = cli_errors.describe(exc)
    assert line.startswith(f"{word} writing /data/run/checkpoints/80:") and status == 1
    # Re-raised by a library as text inside another exception: still recognised.
    try:
        try:
            raise exc
        except OSError as inner:
            raise ValueError(f"Error writing '/data/run/x': {inner.strerror}") from None
    except ValueError as wrapped:
        line, _ = cli_errors.describe(wrapped, paths=["/data/run"])
    assert line.startswith(f"{word} writing /data/run/x:")


def test_run_cli_prints_one_line_and_traceback_only_when_verbose(capsys):
    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SystemExit) as info:
        cli_errors.run_cli(full_disk, ["prog"], paths=["/runs/demo"])
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert err.splitlines() == ["error: no space left on the device writing /runs/demo: free "
                                "some space there or choose a folder on another disk"]
    with pytest.raises(SystemExit):
        cli_errors.run_cli(full_disk, ["prog", "--verbose"], paths=["/runs/demo"])
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("error:")


def test_unexpected_errors_say_how_to_see_the_traceback():
    line, status = cli_errors.describe(RuntimeError("boom\nsecond line"))
    assert line == f"unexpected RuntimeError: boom second line ({cli_errors.VERBOSE_HINT})"
    assert status == 1

