"""The training entry point (mosaic_jax/main.py) as a person runs it: one-line errors, a
quiet console, the closing lines after a resume and of a probe, the SEN12MS demo."""

import json
import os
import re

import pytest
from conftest import error_lines, run_python


@pytest.mark.slow
def test_main_config_typo_prints_one_line(tmp_path):
    result = run_python(["-m", "mosaic_jax.main", "--config=configs/mosaic1.py:demo",
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
    result = run_python(["-m", "mosaic_jax.main", "--config=configs/mosaic1.py:demo",
                         f"--workdir={workdir}"], timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert workdir in line and ("not permitted" in line or "read-only" in line
                                or "permission denied" in line)


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
    first = run_python([*main, *_tiny_flags(prepared_fake, workdir, 3)])
    assert first.returncode == 0, first.stderr[-3000:]
    # clu's parameter table goes to the workdir; the console gets one line.
    table = (workdir / "parameters.txt").read_text()
    assert "| Name" in table and "enc_s1/conv1/kernel" in table and "Total: " in table
    total = int(re.search(r"Total: ([\d,]+)", table).group(1).replace(",", ""))
    assert f"Model: {total:,} parameters (" in first.stdout
    assert "| Name" not in first.stdout + first.stderr
    second = run_python([*main, *_tiny_flags(prepared_fake, workdir, 5)])
    assert second.returncode == 0, second.stderr[-3000:]
    console_text = second.stdout + second.stderr
    for noise in ("Unable to initialize backend", "has no dataset_info.json",
                  "Downloading and preparing dataset"):
        assert noise not in console_text
    assert "Done: step 5; this run did 2 steps (resumed at step 3) in " in second.stdout
    # One progress line per log step; the other metrics only in TensorBoard.
    assert re.search(r"^step 5/5: loss \d+\.\d{4}", second.stdout, flags=re.M), second.stdout
    assert "train/grad_norm" not in console_text and "steps_per_sec" not in console_text
    probe = run_python(["-m", "mosaic_jax.main", "--config=configs/linear_probe.py:demo",
                        f"--config.init_from={workdir}",
                        *_tiny_flags(prepared_fake, tmp_path / "probe", 2)])
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert (f"Encoders from {workdir}, checkpoint step 5: frozen (linear probe: only the new "
            "classifier trains).") in probe.stdout
    events = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]
    blob = b"".join((workdir / f).read_bytes() for f in events)
    assert b"eval/tsne" in blob and b"\x89PNG" in blob


@pytest.mark.slow
def test_sen12ms_demo_learns(tmp_path):
    workdir = tmp_path / "demo_sen12ms"
    result = run_python(["-m", "mosaic_jax.main", "--config=configs/mosaic1.py:demo,sen12ms",
                         f"--workdir={workdir}"], timeout=1800,
                        MOSAIC_JAX_CACHE=str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / "metrics_validation.json").read_text())
    assert metrics["num_samples"] == 30
    assert metrics["macro_ap"] > metrics["label_frequency_macro_ap"] + 0.1
    assert "is clearly above the" in result.stdout

