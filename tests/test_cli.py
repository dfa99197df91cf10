"""The command-line convention of every entry point (`data_builders/cli.py`, README
Troubleshooting): `--help` answers with exit status 0 and lists the flags; a missing input ends
in exactly one `error:` line on stderr with exit status 1 (2 for a wrong command line); Ctrl-C
ends in one line with status 130. In-process `main(argv)` calls where the tool allows it;
`python -m mosaic_jax.main` and `aot` define absl flags of the same names, so they run in
subprocesses (slow tier)."""

from __future__ import annotations

import errno
import importlib
import os
import subprocess
import sys
import tempfile

import pytest
from absl import flags
from ml_collections import config_flags

from data_builders import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _exit_status(main, argv):
    """The exit status of `main(argv)`: its SystemExit's code or its return value."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    return 0 if status is None else status


def _one_error(capsys, main, argv, status):
    """Runs `main(argv)`; asserts its exit status and exactly one `error:` line (the last line of
    stderr, no traceback); returns that line."""
    got = _exit_status(main, argv)
    err = capsys.readouterr().err
    assert got == status, err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1] == lines[0] and "Traceback" not in err
    return lines[0]


def _help(capsys, main, argv, *flag_names):
    assert _exit_status(main, argv) == 0
    out = capsys.readouterr().out
    for name in ("--verbose", *flag_names):
        assert name in out, (name, out)
    return out


# ---------------------------------------------------------------------------------------------
# The module itself


def test_interrupt_is_one_line_with_status_130(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        cli.run(interrupted, ["prog", "--verbose"])
    assert info.value.code == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_usage_errors_exit_2_and_os_errors_name_the_file():
    assert cli.describe(cli.UsageError("bad\nflag")) == ("bad flag", 2)
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/s1.tif")
    assert cli.describe(missing) == ("No such file or directory: /data/s1.tif", 1)
    # GDAL's words (rasterio raises an OSError subclass): its own message, not "unexpected".
    assert cli.describe(OSError("x.tif: not recognized as a supported file format.")) == (
        "x.tif: not recognized as a supported file format.", 1)


def test_check_output_refuses_a_folder_and_a_read_only_one(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=f"--output {tmp_path} is an existing folder"):
        cli.check_output(str(tmp_path))
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is an existing file; give a folder"):
        cli.check_output(str(afile), folder=True)
    with pytest.raises(ValueError, match=f"{afile} is a file, not a folder"):
        cli.check_output(str(afile / "sub" / "out.json"))
    cli.check_output(str(tmp_path / "new" / "deeper" / "out.tif"))  # created later: fine
    assert os.listdir(tmp_path) == ["a.txt"]  # the check leaves nothing behind

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", "/x/.write_check_1")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as info:
        cli.check_output(str(tmp_path / "out.tif"))
    line, status = cli.describe(info.value)
    assert line.startswith(f"read-only file system writing {tmp_path}:") and status == 1


def test_check_input_refuses_missing_folder_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="--s1 .*nope.tif does not exist"):
        cli.check_input(str(tmp_path / "nope.tif"), "--s1")
    with pytest.raises(ValueError, match="is a folder; give a file"):
        cli.check_input(str(tmp_path), "--s1")
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.tif is empty \(0 bytes\)"):
        cli.check_input(str(tmp_path / "empty.tif"), "--s1")
    cli.check_input("gs://bucket/s1.tif", "--s1")  # remote: the reader's to judge


@pytest.fixture
def absl_flags():
    """A private absl FlagValues with a config file flag, as mosaic_jax.main defines them."""
    values = flags.FlagValues()
    holders = [config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                               flag_values=values, lock_config=True),
               flags.DEFINE_string("workdir", None, "Run folder.", flag_values=values)]
    return values, holders


def _parse(absl_flags, *argv):
    values, holders = absl_flags
    return cli.parse_absl(values, ["prog", *argv], holders, prog="prog", doc="Trains.\n\nMore.")


def test_absl_config_typos_are_usage_errors_with_a_suggestion(absl_flags, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(cli.UsageError) as info:
        _parse(absl_flags, "--config=configs/mosiac1.py", "--workdir=w")
    assert str(info.value) == ("--config: config file configs/mosiac1.py does not exist; did "
                               "you mean 'configs/mosaic1.py'?")
    assert cli.describe(info.value)[1] == 2
    with pytest.raises(cli.UsageError) as info:
        _parse(absl_flags, "--config=configs/mosaic1.py:dmeo", "--workdir=w")
    line = str(info.value)
    assert line.startswith("--config=configs/mosaic1.py:dmeo: unknown config argument 'dmeo'; "
                           "did you mean 'demo'?")
    assert "\n" not in line and "Traceback" not in line
    with pytest.raises(cli.UsageError, match="Unknown command line flag 'wrokdir'"):
        _parse(absl_flags, "--config=configs/mosaic1.py", "--wrokdir=w")
    with pytest.raises(cli.UsageError, match="unexpected arguments: extra"):
        _parse(absl_flags, "--config=configs/mosaic1.py", "--workdir=w", "extra")
    assert _parse(absl_flags, "--config=configs/mosaic1.py:demo", "--workdir=w",
                  "--config.batch_size=24", "--config.optimizer.name=sgd") == ["prog"]
    config = absl_flags[0].config
    assert (config.batch_size, config.optimizer.name) == (24, "sgd") and config.data.demo


def test_absl_help_lists_the_flags_and_exits_0(absl_flags, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(absl_flags, "--help")
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert out.startswith("usage: prog [flags]\n\nTrains.\n")
    assert "  --config: Training configuration file." in out and "  --workdir: Run folder." in out


# ---------------------------------------------------------------------------------------------
# Every entry point: --help, and a missing input


def test_dispatcher_help_and_unknown_tool(capsys):
    from mosaic_jax import __main__ as dispatcher

    assert _exit_status(dispatcher.main, ["--help"]) == 0
    out = capsys.readouterr().out
    assert all(tool in out for tool in dispatcher.TOOLS)
    line = _one_error(capsys, dispatcher.main, ["predcit"], 2)
    assert line.startswith("error: unknown tool 'predcit'; did you mean 'predict'?")


@pytest.mark.parametrize("module, flags_listed", [
    ("mosaic_jax.export.exporter", ["--workdir", "--output", "--step"]),
    ("mosaic_jax.inference.embed", ["--export", "--split", "--output"]),
    ("mosaic_jax.inference.predict", ["--export", "--s1", "--s2", "--quicklook_class"]),
    ("mosaic_jax.inference.map_accuracy", ["--map", "--reference", "--output"]),
    ("mosaic_jax.evaluation.retrieval", ["--query_npz", "--archive_npz", "--output"]),
    ("mosaic_jax.evaluation.report", ["--workdirs", "--output"]),
    ("data_builders.prepare", ["--manual_dir", "--data_dir"]),
    ("data_builders.fake_scene", ["--s1", "--s2", "--height"]),
    ("launch.label_sweep", ["--config", "--root", "--fractions"]),
    ("launch.slurm", ["--nodes", "--gpus_per_node", "--workdir"]),
    ("launch.tpu_pod", ["--name", "--zone", "--aot_check"]),
    ("benchmarks.aot_sweep", ["--part", "--output"]),
    ("benchmarks.anchor_aot", ["--anchor", "--side", "--topology"]),
    ("benchmarks.bigearthnet_scale", ["--part", "--metadata_dir", "--num_patches"]),
    ("benchmarks.fusion_flops", ["--output"]),
    ("benchmarks.pretrained_import", ["--output"]),
    ("benchmarks.data_pipeline", ["--quick", "--output"]),
    ("benchmarks.loss_memory", ["--quick", "--output"]),
    ("benchmarks.predict_scene", ["--quick", "--output"]),
    ("benchmarks.retrieval", ["--quick", "--output"]),
    ("benchmarks.train_step", ["--quick", "--output"]),
])
def test_help_answers_and_lists_the_flags(capsys, module, flags_listed):
    main = importlib.import_module(module).main
    _help(capsys, main, ["--help"], *flags_listed)


def test_missing_inputs_end_in_one_error_line(tmp_path, capsys):
    from data_builders import fake_scene, prepare
    from launch import label_sweep, slurm
    from mosaic_jax.evaluation import report, retrieval
    from mosaic_jax.export import exporter
    from mosaic_jax.inference import embed, map_accuracy, predict

    nope = str(tmp_path / "nope")
    out = str(tmp_path / "out")
    line = _one_error(capsys, exporter.main, ["--workdir", nope, "--output", out], 1)
    assert nope in line
    line = _one_error(capsys, embed.main, ["--export", nope, "--split", "test", "--output",
                                           out + ".npz"], 1)
    assert nope in line and "model.json" in line
    line = _one_error(capsys, predict.main, ["--export", nope, "--s1", nope + ".tif", "--s2",
                                             nope + ".tif", "--output", out + ".tif"], 1)
    assert line == f"error: --s1 {nope}.tif does not exist"
    line = _one_error(capsys, predict.main, ["--export", nope, "--output", out + ".tif"], 2)
    assert line == "error: give --s1, --s2 or both"
    line = _one_error(capsys, map_accuracy.main, ["--map", nope + ".tif", "--reference",
                                                  nope + "_ref.tif"], 1)
    assert line == f"error: --map {nope}.tif does not exist"
    line = _one_error(capsys, retrieval.main, ["--query_npz", nope + ".npz", "--archive_npz",
                                               nope + ".npz", "--output", out], 1)
    assert line == f"error: --query_npz {nope}.npz does not exist"
    line = _one_error(capsys, report.main, ["--workdirs", nope, "--output", out], 1)
    assert nope in line
    line = _one_error(capsys, prepare.main, ["bigearthnet_v2", "--manual_dir", nope,
                                             "--data_dir", str(tmp_path)], 2)
    assert nope in line and "does not exist" in line
    # fake_scene reads nothing: its output in a "folder" that is a file.
    (tmp_path / "afile").write_text("x")
    line = _one_error(capsys, fake_scene.main, ["--s1", str(tmp_path / "afile" / "s1.tif"),
                                                "--s2", out + "_s2.tif"], 1)
    assert "afile is a file, not a folder" in line
    line = _one_error(capsys, label_sweep.main, ["--config=configs/mosiac1.py", f"--root={out}"],
                      2)
    assert "configs/mosiac1.py does not exist" in line
    line = _one_error(capsys, slurm.main, ["--workdir=/shared/run", "--gpus_per_node=1",
                                           f"--script_path={tmp_path / 'afile' / 'job.sbatch'}",
                                           "--config=configs/mosaic1.py"], 1)
    assert "afile" in line
    assert not os.path.exists(out) and not os.path.exists(out + ".npz")


def _run(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("tool", [["mosaic_jax.main"], ["mosaic_jax", "train"],
                                  ["mosaic_jax", "aot"]])
def test_absl_entry_points_in_a_subprocess(tool, tmp_path):
    extra = ["--workdir=w"] if tool[-1] != "aot" else ["--topology=v5e:2x2"]
    result = _run(*tool, "--help")
    assert result.returncode == 0 and "--config:" in result.stdout, result.stderr
    for config, want in (("configs/mosiac1.py", "did you mean 'configs/mosaic1.py'?"),
                         ("configs/mosaic1.py:dmeo", "did you mean 'demo'?")):
        result = _run(*tool, f"--config={config}", *extra)
        assert result.returncode == 2, result.stderr
        assert _error_lines(result.stderr) == result.stderr.strip().splitlines()[-1:]
        assert want in result.stderr and "Traceback" not in result.stderr
    if tool[-1] == "aot":  # a misspelt key; an unwritable --output before minutes of compiling
        result = _run(*tool, "--config=configs/mosaic1.py", *extra, "--config.batchsize=8")
        assert result.returncode == 2 and "did you mean 'batch_size'?" in result.stderr
        result = _run(*tool, "--config=configs/mosaic1.py", *extra, "--output=README.md/a.json")
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines()[-1].endswith(
            "README.md is a file, not a folder")


def test_config_key_typo_is_one_line_with_suggestion():
    import ml_collections

    config = ml_collections.ConfigDict({"batch_size": 1})
    with pytest.raises(AttributeError) as info:
        config.batchsize  # noqa: B018  (the lookup ml_collections' config flags do)
    line, status = cli.describe(info.value, ["--config=x.py", "--config.batchsize=64"])
    assert status == cli.USAGE_STATUS
    assert "--config.batchsize" in line and "did you mean 'batch_size'" in line
    assert "\n" not in line


@pytest.mark.parametrize("code, word", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EROFS, "read-only file system"),
                                        (errno.EACCES, "permission denied")])
def test_os_errors_name_the_path(code, word):
    exc = OSError(code, os.strerror(code), "/data/run/checkpoints/80")
    line, status = cli.describe(exc)
    assert line.startswith(f"{word} writing /data/run/checkpoints/80:") and status == 1
    # Re-raised by a library as text inside another exception: still recognised.
    try:
        try:
            raise exc
        except OSError as inner:
            raise ValueError(f"Error writing '/data/run/x': {inner.strerror}") from None
    except ValueError as wrapped:
        line, _ = cli.describe(wrapped, paths=["/data/run"])
    assert line.startswith(f"{word} writing /data/run/x:")


def test_run_cli_prints_one_line_and_traceback_only_when_verbose(capsys):
    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SystemExit) as info:
        cli.run(full_disk, ["prog"], paths=["/runs/demo"])
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert err.splitlines() == ["error: no space left on the device writing /runs/demo: free "
                                "some space there or choose a folder on another disk"]
    with pytest.raises(SystemExit):
        cli.run(full_disk, ["prog", "--verbose"], paths=["/runs/demo"])
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("error:")


def test_unexpected_errors_say_how_to_see_the_traceback():
    line, status = cli.describe(RuntimeError("boom\nsecond line"))
    assert line == f"unexpected RuntimeError: boom second line ({cli.VERBOSE_HINT})"
    assert status == 1

