"""A new user's first hour: one-line errors, the cached demo dataset, honest report names, the
t-SNE picture, a quiet console (output captured where the point is what a person reads)."""

import errno
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_builders import cli_errors, console
from mosaic_jax.data import demo_data
from mosaic_jax.evaluation import report
from mosaic_jax.training import checkpoints, configuration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)


def _run(args, timeout=600, **env):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------
# One-line errors


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


@pytest.mark.slow
def test_main_config_typo_prints_one_line(tmp_path):
    result = _run(["-m", "mosaic_jax.main", "--config=configs/mosaic1.py:demo",
                   "--config.batchsize=64", f"--workdir={tmp_path}"], timeout=120)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: unknown config key in --config.batchsize")
    assert "did you mean 'batch_size'" in lines[-1]


@pytest.mark.slow
def test_main_unwritable_workdir_prints_one_line():
    # /sys refuses new folders (EPERM; a read-only mount gives EROFS, a full disk ENOSPC: the
    # same mapping, tested above).
    workdir = "/sys/mosaic_jax_test_workdir"
    if os.path.exists("/sys") and os.access("/sys", os.W_OK) is False:
        pytest.skip("needs /sys to refuse writes")
    result = _run(["-m", "mosaic_jax.main", "--config=configs/mosaic1.py:demo",
                   f"--workdir={workdir}"], timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = _error_lines(result.stderr)
    assert workdir in line and ("not permitted" in line or "read-only" in line
                                or "permission denied" in line)


def _workdir_with_checkpoint(root, config):
    workdir = root / "mosaic1_run"
    (workdir / "checkpoints" / "3" / "state").mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json())
    return workdir


def test_workdir_of_another_model_is_refused(tmp_path):
    import importlib

    mosaic1 = importlib.import_module("configs.mosaic1").get_config("demo")
    supervised = importlib.import_module("configs.supervised").get_config("demo")
    workdir = _workdir_with_checkpoint(tmp_path, mosaic1)
    checkpoints.check_workdir_matches(workdir, mosaic1)  # same model: resumes
    diffs = dict((k, (a, b)) for k, a, b in checkpoints.structure_differences(
        json.loads(mosaic1.to_json()), supervised))
    assert diffs["objective"] == ("mosaic1", "supervised")
    assert diffs["model.kind"] == ("two_tower", "single_tower")
    with pytest.raises(ValueError, match="holds a checkpoint of another model .*objective "
                       "'mosaic1' there, 'supervised' here.*choose a new --workdir"):
        checkpoints.check_workdir_matches(workdir, supervised)
    # A compute-only change (dtype) keeps the checkpoint's tree: no complaint.
    other_dtype = importlib.import_module("configs.mosaic1").get_config("demo")
    other_dtype.model.dtype = "bfloat16"
    checkpoints.check_workdir_matches(workdir, other_dtype)


@pytest.mark.slow
def test_main_refuses_workdir_of_another_model_before_compiling(tmp_path):
    import importlib

    workdir = _workdir_with_checkpoint(
        tmp_path, importlib.import_module("configs.mosaic1").get_config("demo"))
    result = _run(["-m", "mosaic_jax.main", "--config=configs/supervised.py:demo",
                   f"--workdir={workdir}"], timeout=300,
                  MOSAIC_JAX_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "partial_restore" not in result.stderr
    (line,) = _error_lines(result.stderr)
    assert f"workdir {workdir} holds a checkpoint of another model" in line
    assert not (tmp_path / "cache").exists()  # refused before the demo data, before compiling


@pytest.mark.slow
def test_prepare_empty_manual_dir_is_one_line_and_leaves_nothing(tmp_path):
    empty, home = tmp_path / "empty", tmp_path / "home"
    empty.mkdir()
    home.mkdir()
    result = _run(["-m", "data_builders.prepare", "bigearthnet_v2", "--manual_dir", str(empty)],
                  timeout=300, HOME=str(home))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert _error_lines(result.stderr) == [
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


# ---------------------------------------------------------------------------------------------
# Demo data


def test_demo_cache_location_and_key(monkeypatch, tmp_path):
    monkeypatch.delenv(demo_data.CACHE_ENV, raising=False)
    assert demo_data.cache_root() == os.path.expanduser("~/.cache/mosaic_jax")
    monkeypatch.setenv(demo_data.CACHE_ENV, str(tmp_path / "env"))
    assert demo_data.cache_root() == str(tmp_path / "env")
    assert demo_data.cache_root(str(tmp_path / "cfg")) == str(tmp_path / "cfg")
    roots = {demo_data.demo_root("/c", num_patches=n, seed=s, version=v)
             for n, s, v in ((600, 0, 1), (601, 0, 1), (600, 1, 1), (600, 0, 2))}
    assert len(roots) == 4
    assert configuration.base_config().data.demo_cache_dir == ""
    import ml_collections

    bad = configuration.base_config().to_dict()
    bad["data"]["demo_cache_dir"] = 3  # e.g. from a hand-edited config.json
    bad = ml_collections.ConfigDict(bad)
    with pytest.raises(ValueError, match="data.demo_cache_dir"):
        configuration.validate_config(bad)


_PREPARE = """
import sys
from mosaic_jax.data.demo_data import demo_data_dir
print("DATA_DIR", demo_data_dir("", num_patches=40, seed=3), flush=True)
"""


@pytest.mark.slow
def test_two_demo_runs_at_once_write_the_data_once(tmp_path):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE], cwd=REPO,
                              env=_env(MOSAIC_JAX_CACHE=str(cache)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    dirs = {line.split()[1] for out in outs for line in out.splitlines()
            if line.startswith("DATA_DIR")}
    root = demo_data.demo_root(str(cache), num_patches=40, seed=3)
    assert dirs == {os.path.join(root, "tfds")}
    assert sum(out.count("Demo data: writing 40") for out in outs) == 1
    # The demo's own synthetic metadata is no alarm (its md5 cannot be the release's).
    assert not any("md5" in out or "official release" in out for out in outs), outs
    assert all("Demo data (TFDS data_dir, e.g. for embed --data_dir): " in o for o in outs)
    assert not os.path.exists(os.path.join(root, "raw"))  # raw files are not kept
    import tensorflow_datasets as tfds

    import data_builders.bigearthnet_v2  # noqa: F401
    builder = tfds.builder("bigearthnet_v2", data_dir=os.path.join(root, "tfds"))
    assert builder.is_prepared() and sum(
        s.num_examples for s in builder.info.splits.values()) == 40


# ---------------------------------------------------------------------------------------------
# Reports and pictures


def _metrics(seed):
    from mosaic_jax.evaluation.metrics import multilabel_metrics

    rng = np.random.default_rng(seed)
    labels = rng.random((30, 19)) < 0.3
    probs = np.clip(0.5 * labels + 0.6 * rng.random(labels.shape), 0, 1)
    return {"step": 10, "split": "validation", **multilabel_metrics(probs, labels)}


def _run_dir(root, name, objective, **config_keys):
    config = json.loads(configuration.base_config(objective).to_json())
    config.update(config_keys)
    workdir = root / name
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(config))
    (workdir / "metrics_validation.json").write_text(json.dumps(_metrics(len(name))))
    return str(workdir)


def test_report_names_downstream_runs_and_marks_untrained_classifiers(tmp_path):
    pre = _run_dir(tmp_path, "demo", "mosaic1")
    probe = _run_dir(tmp_path, "demo_probe", "supervised", init_from=pre,
                     train_mode="linear_probe")
    tune = _run_dir(tmp_path, "demo_ft", "supervised", init_from=pre, train_mode="full")
    simclr = _run_dir(tmp_path, "dual", "dual_simclr")
    result = report.write_report([pre, probe, tune, simclr], str(tmp_path / "out"))
    names = [r.method for r in result["runs"]]
    assert names == ["mosaic1", "mosaic1, linear probe", "mosaic1, fine-tune",
                     "dual_simclr (classifier untrained)"]
    md = (tmp_path / "out" / "comparison.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| dual_simclr"))
    assert row.count("untrained") == 5  # the name and the four AP / F1 columns
    assert "supervised" not in md
    with open(tmp_path / "out" / "comparison.csv") as f:
        import csv

        trained = {r["method"]: r["classifier_trained"] for r in csv.DictReader(f)}
    assert trained["dual_simclr (classifier untrained)"] == "False"
    assert trained["mosaic1, linear probe"] == "True"


def test_tsne_palette_tells_neighbouring_classes_apart():
    from matplotlib.colors import to_rgb

    from mosaic_jax.evaluation.tsne_plot import KELLY_COLORS, _class_colors

    colors = _class_colors(19)[:, :3]
    assert np.allclose(colors, [to_rgb(c) for c in KELLY_COLORS[:19]])
    gaps = np.linalg.norm(np.diff(colors, axis=0), axis=1)
    assert gaps.min() > 0.25  # tab20's pale/dark pairs are ~0.2 apart
    assert len({tuple(np.round(c, 3)) for c in colors}) == 19


def test_tsne_returns_the_picture_for_tensorboard(tmp_path):
    from mosaic_jax.evaluation.tsne_plot import plot_tsne

    rng = np.random.default_rng(0)
    labels = rng.random((60, 4)) < 0.4
    emb = rng.normal(size=(60, 8)) + 3 * labels[:, :1]
    image = plot_tsne(emb, labels, list("abcd"), tmp_path / "t.png", title="t-SNE of h_fused")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[:2] == (650, 900)
    from matplotlib.image import imread

    assert imread(tmp_path / "t.png").shape[:2] == image.shape[:2]


def test_progress_line_is_one_short_line():
    line = console.progress_line(20, 160, 16.03142, 2.049, 32)
    assert line == "step 20/160: loss 16.0314, 2.05 steps/s (66 patches/s), ETA 1 min"
    assert console.progress_line(150, 160, 1.0, 2.0, 8).endswith("ETA 5 s")
    assert console.progress_line(1000, 100000, 0.5, 2.0, 8).endswith("ETA 13 h 45 min")
    assert console.progress_line(20, 160, 1.0, 0.5, 8).endswith("ETA 5 min")
    assert console.progress_line(1, 160, 1.0, None, 8) == "step 1/160: loss 1.0000"


def test_run_messages():
    assert console.init_from_line("/r/demo", 160, "linear_probe") == (
        "Encoders from /r/demo, checkpoint step 160: frozen (linear probe: only the new "
        "classifier trains).")
    assert "fine-tuned" in console.init_from_line("/r/demo", 160, "full")
    assert console.done_line(160, 0, 12.3) == "Done: 160 steps in 12 s."
    assert console.done_line(160, 80, 7.0) == (
        "Done: step 160; this run did 80 steps (resumed at step 80) in 7 s.")


# ---------------------------------------------------------------------------------------------
# Quiet console


def _record(level, path, msg):
    return logging.LogRecord("absl", level, path, 1, msg, None, None)


def test_console_filter_drops_library_chatter_only():
    site = "/venv/lib/python3.11/site-packages"
    assert console.is_noise(_record(logging.INFO, f"{site}/jax/_src/xla_bridge.py",
                                    "Unable to initialize backend 'tpu'"))
    assert console.is_noise(_record(logging.WARNING,
                                    f"{site}/tensorflow_datasets/core/utils/file_utils.py",
                                    "Variant folder /d/bigearthnet_v2/default/1.0.0 has no "
                                    "dataset_info.json"))
    assert console.is_noise(_record(logging.INFO, f"{site}/matplotlib/font_manager.py", "x"))
    assert not console.is_noise(_record(logging.WARNING, f"{site}/orbax/checkpoint/x.py", "w"))
    assert not console.is_noise(_record(logging.INFO, f"{site}/clu/metric_writers/x.py",
                                        "[20] train/loss=1"))
    assert not console.is_noise(
        _record(logging.INFO, "/repo/mosaic_jax/training/train.py", "Resumed"))


def test_quiet_console_filters_jax_own_logger(caplog):
    console.quiet_console()
    logger = logging.getLogger("jax._src.xla_bridge")
    with caplog.at_level(logging.INFO):
        logger.info("Unable to initialize backend 'tpu'")
        logger.warning("a real warning")
    messages = [r.getMessage() for r in caplog.records]
    assert "a real warning" in messages and "Unable to initialize backend 'tpu'" not in messages


def _tiny_flags(data_dir, workdir, steps):
    return ["--config.data.demo=False", f"--config.data.data_dir={data_dir}",
            f"--workdir={workdir}", f"--config.num_train_steps={steps}",
            "--config.checkpoint_every_steps=3", "--config.batch_size=16",
            "--config.eval_batch_size=16", "--config.augment.out_size=16",
            "--config.model.width_multiplier=0.03125", "--config.model.proj_hidden_dim=16",
            "--config.model.proj_dim=8", "--config.log_every_steps=2", "--config.tsne_points=24"]


@pytest.mark.slow
def test_training_console_resume_and_probe(prepared_fake, tmp_path):
    """What a person reads: no library chatter; "Done" after a resume counts this run's steps;
    a probe says where its encoders come from and that they are frozen; the t-SNE picture is
    in TensorBoard too."""
    workdir = tmp_path / "pre"
    main = ["-m", "mosaic_jax.main", "--config=configs/mosaic1.py:demo"]
    first = _run([*main, *_tiny_flags(prepared_fake, workdir, 3)])
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run([*main, *_tiny_flags(prepared_fake, workdir, 5)])
    assert second.returncode == 0, second.stderr[-3000:]
    console_text = second.stdout + second.stderr
    for noise in ("Unable to initialize backend", "has no dataset_info.json",
                  "Downloading and preparing dataset"):
        assert noise not in console_text
    assert "Done: step 5; this run did 2 steps (resumed at step 3) in " in second.stdout
    # One progress line per log step; the other metrics only in TensorBoard.
    assert re.search(r"^step 5/5: loss \d+\.\d{4}", second.stdout, flags=re.M), second.stdout
    assert "train/grad_norm" not in console_text and "steps_per_sec" not in console_text
    probe = _run(["-m", "mosaic_jax.main", "--config=configs/linear_probe.py:demo",
                  f"--config.init_from={workdir}",
                  *_tiny_flags(prepared_fake, tmp_path / "probe", 2)])
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert (f"Encoders from {workdir}, checkpoint step 5: frozen (linear probe: only the new "
            "classifier trains).") in probe.stdout
    events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
    blob = b"".join((workdir / f).read_bytes() for f in events)
    assert b"eval/tsne" in blob and b"\x89PNG" in blob


# ---------------------------------------------------------------------------------------------
# The SEN12MS demo


def test_sen12ms_demo_config_and_scenes():
    import importlib

    config = importlib.import_module("configs.mosaic1").get_config("demo,sen12ms")
    configuration.validate_config(config)
    assert config.data.name == "sen12ms" and config.data.demo and config.augment.out_size == 48
    scenes = demo_data.sen12ms_demo_scenes(config.data.demo_num_patches)
    assert sum(len(p) for p in scenes.values()) == config.data.demo_num_patches
    assert len(scenes[("fall", 6)]) == 30 and len(scenes[("spring", 63)]) == 4


def test_learnable_sen12ms_pixels_follow_their_class():
    from data_builders.fake_sen12ms import learnable_triplet

    arrays = learnable_triplet(np.random.default_rng(0), size=64)
    igbp = arrays["lc"][..., 0]
    s2 = arrays["s2"].astype(float)
    classes = np.unique(igbp)
    # Between-class spread of the mean spectrum dominates the within-class spread.
    means = np.stack([s2[igbp == k].mean(0) for k in classes])
    within = np.mean([s2[igbp == k].std(0).mean() for k in classes])
    assert len(classes) >= 2 and means.std(0).mean() > within
    assert arrays["s1"].dtype == np.float32 and arrays["s2"].dtype == np.uint16


@pytest.mark.slow
def test_sen12ms_demo_learns(tmp_path):
    workdir = tmp_path / "demo_sen12ms"
    result = _run(["-m", "mosaic_jax.main", "--config=configs/mosaic1.py:demo,sen12ms",
                   f"--workdir={workdir}"], timeout=1800, MOSAIC_JAX_CACHE=str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / "metrics_validation.json").read_text())
    assert metrics["num_samples"] == 30
    assert metrics["macro_ap"] > metrics["label_frequency_macro_ap"] + 0.1
    assert "is clearly above the" in result.stdout
