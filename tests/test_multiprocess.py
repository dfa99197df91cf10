"""Multi-process runs and preemption, with real processes of `python -m mosaic_jax.main`.

A tiny MoSAiC-1 run on 2 processes of 4 CPU devices each (connected on 127.0.0.1) must end
with the parameters of 1 process with 8 devices; a run stopped by SIGTERM, or killed by SIGKILL
while writing a checkpoint, must restart and end with the parameters of an uninterrupted run.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE

pytestmark = pytest.mark.slow  # the integration tier: multi-process program runs

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6  # as conftest.program_config, whose in-process run is the reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(data_dir, workdir, *extra):
    """The command line of conftest.program_config (same training, same compiled programs)."""
    return [sys.executable, "-m", "mosaic_jax.main", "--config=configs/mosaic1.py:demo",
            f"--workdir={workdir}", "--config.data.demo=False",
            f"--config.data.data_dir={data_dir}", f"--config.num_train_steps={STEPS}",
            "--config.checkpoint_every_steps=3", "--config.batch_size=16",
            "--config.eval_batch_size=16", "--config.augment.out_size=16",
            "--config.model.width_multiplier=0.03125", "--config.model.proj_hidden_dim=16",
            "--config.model.proj_dim=8", "--config.tsne_points=0", "--config.log_every_steps=2",
            *extra]


def _start(data_dir, workdir, devices=None, extra=(), launcher=("-m", "mosaic_jax.main")):
    """Starts the program (`launcher` after the interpreter) on `devices` CPU devices, by default
    this session's count, so that results match the in-process reference bit for bit."""
    env = dict(os.environ, XLA_FLAGS=(f"--xla_force_host_platform_device_count="
                                      f"{devices or jax.device_count()} {FAST_COMPILE}"),
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, *launcher, *_command(data_dir, workdir, *extra)[3:]]
    return subprocess.Popen(command, cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _params(workdir, step=STEPS):
    from mosaic_jax.training import checkpoints

    # Restored onto one local device, whatever topology wrote the checkpoint.
    variables = checkpoints.restore_variables(workdir, step).variables
    return [np.asarray(x) for x in jax.tree.leaves(variables["params"])]


def _steps(workdir):
    ckpt = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.glob("*") if p.name.isdigit()) if ckpt.exists() else []


@pytest.fixture(scope="module")
def reference(trained_workdir):
    """Parameters after STEPS steps of the uninterrupted in-process run on this session's
    devices (8 forced CPU devices, tests/conftest.py)."""
    return _params(trained_workdir[0])


def test_two_processes_of_four_devices_match_one_process_of_eight(prepared_fake, tmp_path):
    # The cross-process reductions sum in another order; this tiny contrastive model amplifies
    # such float noise by ~10x a step (and Adam turns noise in ~0 gradients into full steps),
    # so the comparison uses momentum SGD over 2 steps.
    short = ("--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.05",
             "--config.num_train_steps=2", "--config.log_every_steps=1")
    # All three processes at once: each compiles mostly on one core.
    single = _start(prepared_fake, tmp_path / "one", devices=8, extra=short)
    port = _free_port()
    procs = [_start(prepared_fake, tmp_path / "two", devices=4,
                    extra=(*short, f"--coordinator_address=127.0.0.1:{port}",
                           "--num_processes=2", f"--process_id={i}")) for i in range(2)]
    one = _finish(single)
    two = [_finish(p) for p in procs]
    assert "Done:" in one and "Done:" in two[0] and "Done:" not in two[1]  # process 0 reports

    def losses(workdir):  # the full-precision values process 0 wrote to TensorBoard
        from tensorboard.backend.event_processing import event_accumulator

        acc = event_accumulator.EventAccumulator(str(workdir))
        acc.Reload()
        return [e.value for e in acc.Scalars("train/loss")]

    assert len(losses(tmp_path / "one")) == 2
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    # Float noise after 2 steps is ~1e-6 on weights of ~0.1; a wrong data shard or reduction
    # changes them by orders of magnitude more.
    for got, want in zip(_params(tmp_path / "two", 2), _params(tmp_path / "one", 2),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_sigterm_saves_and_the_restarted_run_matches(prepared_fake, reference, tmp_path):
    proc = _start(prepared_fake, tmp_path)
    # config.json is written once the SIGTERM handler is in place.
    deadline = time.time() + 600
    while not (tmp_path / "config.json").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert "Preempted (SIGTERM)" in out, out[-3000:]
    stopped = max(_steps(tmp_path))
    assert 1 <= stopped < STEPS
    out = _finish(_start(prepared_fake, tmp_path))
    assert f"Resuming from the checkpoint at step {stopped}" in out
    for got, want in zip(_params(tmp_path), reference, strict=True):
        np.testing.assert_array_equal(got, want)


# Runs the program with orbax's checkpoint commit (the rename of a step's finished temporary
# folder to the step's name) held back from the second checkpoint on, after writing argv[1] (a
# marker file) with the temporary folder's path: a SIGKILL then always lands during a write.
HELD_COMMIT_LAUNCHER = """\
import asyncio, os, pathlib, runpy, sys
from orbax.checkpoint._src.path import atomicity

sys.path.insert(0, os.getcwd())  # the repository, as `python -m` has it
marker = pathlib.Path(sys.argv.pop(1))
finalize = atomicity.AtomicRenameTemporaryPath.finalize
calls = []


async def held_finalize(self):
    step = pathlib.Path(self.get()).name.split(".")[0].isdigit()  # a step, not one of its items
    calls.extend([self] if step else [])
    if step and len(calls) == 2:
        marker.write_text(str(self.get()))
        await asyncio.sleep(3600)
    await finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = held_finalize
runpy.run_module("mosaic_jax.main", run_name="__main__", alter_sys=True)
"""


def test_sigkill_during_a_checkpoint_write_restarts_from_the_previous_one(prepared_fake,
                                                                          reference, tmp_path):
    # A checkpoint every step (the interval does not change the training): writes at 1..6; the
    # launcher holds the commit of step 2, so step 1 is the last finished one.
    every_step = ("--config.checkpoint_every_steps=1",)
    launcher = tmp_path / "held_commit.py"
    launcher.write_text(HELD_COMMIT_LAUNCHER)
    marker = tmp_path / "writing"
    workdir = tmp_path / "run"
    proc = _start(prepared_fake, workdir, extra=every_step, launcher=(str(launcher), str(marker)))
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.time() < deadline, "the second checkpoint write never started"
            time.sleep(0.05)
        writing = pathlib.Path(marker.read_text())
        assert writing.is_dir() and writing.parent == workdir / "checkpoints", writing
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert writing.exists()  # killed mid-write: the temporary folder is left behind
    assert _steps(workdir) == [1]
    out = _finish(_start(prepared_fake, workdir, extra=every_step))
    assert "Resuming from the checkpoint at step 1" in out
    for got, want in zip(_params(workdir), reference, strict=True):
        np.testing.assert_array_equal(got, want)
