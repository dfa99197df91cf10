"""launch/tpu_pod.py and launch/slurm.py: the commands and batch scripts they produce.

Nothing runs for real: the launchers print with --dry-run, or call stand-ins for gcloud, sbatch,
srun, scancel and scontrol put first on PATH; generated shell is checked with `bash -n` or run
against those stand-ins.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = "launch.tpu_pod"  # run as python -m launch.tpu_pod, as launch/README.md says
SLURM = "launch.slurm"
TPU_ARGS = ["--name=mosaic-v4", "--zone=us-central2-b", "--accelerator_type=v4-32",
            "--workdir=gs://bucket/runs/m1"]


def _run(module, *args, cwd=None, env=None, check_rc=0):
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=60)
    if check_rc is not None:
        assert result.returncode == check_rc, (result.stdout, result.stderr)
    return result


def _tpu_commands(*args):
    """argv lists of the dry-run's commands."""
    out = _run(TPU_POD, *TPU_ARGS, *args, "--dry-run").stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def _verb(argv):
    assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], argv
    return argv[4]


def _remote(argv):
    """The shell script that an ssh command runs on the workers."""
    [command] = [a for a in argv if a.startswith("--command=")]
    return command.removeprefix("--command=")


def _bash_syntax_ok(script: str) -> None:
    result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, (result.stderr, script)


def _training_argv(script: str) -> list[str]:
    tokens = shlex.split(script)
    start = tokens.index("mosaic_jax.main") - 2
    assert tokens[start:start + 3] == ["python", "-m", "mosaic_jax.main"], tokens
    end = tokens.index("--multiprocess", start)
    return tokens[start:end + 1]


# ----------------------------------------------------------------------------- TPU pod


def test_tpu_dry_run_prints_every_step_with_quoting():
    commands = _tpu_commands("--spot", "--project=my-proj", "--data_dir=gs://bucket/tfds",
                             "--override", "batch_size=1024", "--override",
                             "note=two words, it's", "--delete_after")
    assert [_verb(c) for c in commands] == ["create", "scp", "ssh", "ssh", "ssh", "delete"]
    for argv in commands:
        assert "--zone=us-central2-b" in argv and "--project=my-proj" in argv
    create = commands[0]
    assert create[5] == "mosaic-v4"
    assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"} <= set(create)
    scp, unpack, install, train, delete = commands[1:]
    assert "--worker=all" in scp and scp[6] == "mosaic-v4:mosaic_jax_code.tar.gz"
    assert scp[5].endswith("mosaic-v4-mosaic_jax_code.tar.gz")
    for ssh in (unpack, install, train):
        assert ssh[5] == "mosaic-v4" and "--worker=all" in ssh
        _bash_syntax_ok(_remote(ssh))
    assert "tar -xzf" in _remote(unpack)
    assert "python -m pip install --quiet 'jax[tpu]' -e '.[train]'" in _remote(install)
    assert "venv" in _remote(install)
    script = _remote(train)
    assert "nohup" in script and "mosaic_jax_train.log" in script and "wait $pid" in script
    assert _training_argv(script) == [
        "python", "-m", "mosaic_jax.main", "--config=configs/mosaic1.py",
        "--workdir=gs://bucket/runs/m1", "--config.data.data_dir=gs://bucket/tfds",
        "--config.batch_size=1024", "--config.note=two words, it's", "--multiprocess"]
    assert delete[5] == "mosaic-v4" and "--quiet" in delete


def test_tpu_reuse_describes_instead_of_creating():
    commands = _tpu_commands("--reuse", "--override=config.optimizer.learning_rate=2e-3")
    verbs = [_verb(c) for c in commands]
    assert verbs[0] == "describe" and "create" not in verbs and "delete" not in verbs
    assert "--format=value(state)" in commands[0]
    assert "--config.optimizer.learning_rate=2e-3" in _training_argv(_remote(commands[-1]))


def test_tpu_git_repo_is_cloned_on_every_worker():
    commands = _tpu_commands("--repo=https://github.com/example/mosaic_jax.git",
                             "--git_ref=v1.0", "--config=configs/mosaic2.py:sen12ms")
    assert [_verb(c) for c in commands] == ["create", "ssh", "ssh", "ssh"]
    clone = _remote(commands[1])
    assert "git clone --quiet https://github.com/example/mosaic_jax.git" in clone
    assert "checkout --quiet v1.0" in clone
    _bash_syntax_ok(clone)
    assert "--config=configs/mosaic2.py:sen12ms" in _training_argv(_remote(commands[-1]))


def test_tpu_detach_and_skip_install():
    commands = _tpu_commands("--detach", "--skip_install", "--accelerator_type=v5litepod-16",
                             "--internal_ip")
    assert [_verb(c) for c in commands] == ["create", "ssh"]
    assert "--version=v2-alpha-tpuv5-lite" in commands[0]
    assert "--internal-ip" in commands[1]
    script = _remote(commands[1])
    _bash_syntax_ok(script)
    assert "setsid nohup" in script and "tail" not in script


@pytest.mark.parametrize("args, message", [
    (["--override", "batch_size"], "KEY=VALUE"),
    (["--override", "=3"], "KEY=VALUE"),
    (["--workdir=runs/local"], "gs://"),
    (["--accelerator_type=tpu32"], "v4-32"),
    (["--name=Bad_Name"], "lowercase"),
    (["--accelerator_type=v9-8"], "--version"),
    (["--detach", "--delete_after"], "--detach"),
    (["--spot", "--preemptible"], "not allowed with"),
    (["--repo=/nonexistent/dir"], "neither a directory nor a git URL"),
    (["--git_ref=main"], "git URL"),
    (["--data_dir=gs://b/d", "--override=data.data_dir=gs://b/e"], "once"),
])
def test_tpu_bad_arguments_fail_clearly(args, message):
    result = _run(TPU_POD, *TPU_ARGS, *args, "--dry-run", check_rc=2)
    assert message in result.stderr and not result.stdout


def test_tpu_missing_required_argument():
    result = _run(TPU_POD, "--name=x", "--workdir=gs://b/w", "--dry-run", check_rc=2)
    assert "--zone" in result.stderr


FAKE_GCLOUD = """#!{python}
import json, os, sys, tarfile
argv = sys.argv[1:]
verb = argv[3]
record = {{"argv": argv}}
if verb == "scp":
    with tarfile.open(argv[4]) as tar:
        record["files"] = sorted(tar.getnames())
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(record) + "\\n")
if verb == "describe":
    state = os.environ.get("FAKE_STATE", "NOT_FOUND")
    if state == "NOT_FOUND":
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found")
    print(state)
fail = os.environ.get("FAKE_FAIL", "")
if fail and fail in " ".join(argv):
    sys.exit(3)
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    """A checkout to copy, a stand-in gcloud that logs its calls, and the env to use them."""
    checkout = tmp_path / "checkout"
    (checkout / "mosaic_jax").mkdir(parents=True)
    (checkout / "mosaic_jax" / "main.py").write_text("# main\n")
    (checkout / "pyproject.toml").write_text("[project]\n")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "python").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               FAKE_LOG=str(log), TMPDIR=str(tmp_path))

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()]

    return checkout, env, calls


def test_tpu_real_run_calls_gcloud_in_order(fake_gcloud, tmp_path):
    checkout, env, calls = fake_gcloud
    _run(TPU_POD, *TPU_ARGS, f"--repo={checkout}", "--reuse", "--delete_after", env=env)
    log = calls()
    verbs = [c["argv"][3] for c in log]
    # describe finds nothing, so the TPU is created.
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "delete"]
    assert log[2]["files"] == ["mosaic_jax/main.py", "pyproject.toml"]  # no .venv
    assert not list(tmp_path.glob("*.tar.gz"))  # the tarball is removed after copying
    assert "--multiprocess" in _remote(["gcloud", *log[5]["argv"]])


def test_tpu_real_run_reuses_a_ready_tpu(fake_gcloud):
    checkout, env, calls = fake_gcloud
    env["FAKE_STATE"] = "READY"
    _run(TPU_POD, *TPU_ARGS, f"--repo={checkout}", "--reuse", env=env)
    assert [c["argv"][3] for c in calls()] == ["describe", "scp", "ssh", "ssh", "ssh"]


def test_tpu_real_run_recreates_a_preempted_tpu(fake_gcloud):
    checkout, env, calls = fake_gcloud
    env["FAKE_STATE"] = "PREEMPTED"
    _run(TPU_POD, *TPU_ARGS, f"--repo={checkout}", "--reuse", "--skip_install", env=env)
    assert [c["argv"][3] for c in calls()] == ["describe", "delete", "create", "ssh"]


def test_tpu_real_run_stops_at_the_first_failure(fake_gcloud):
    checkout, env, calls = fake_gcloud
    env["FAKE_FAIL"] = "pip install"
    result = _run(TPU_POD, *TPU_ARGS, f"--repo={checkout}", "--delete_after", env=env,
                  check_rc=1)
    assert "error: installing mosaic_jax on the workers failed (exit status 3)" in result.stderr
    assert "tpu-vm delete mosaic-v4" in result.stderr  # says how to delete the kept TPU
    assert [c["argv"][3] for c in calls()] == ["create", "scp", "ssh", "ssh"]


def test_tpu_real_run_without_gcloud(fake_gcloud, tmp_path):
    checkout, env, _ = fake_gcloud
    env["PATH"] = str(tmp_path / "empty")
    result = _run(TPU_POD, *TPU_ARGS, f"--repo={checkout}", env=env, check_rc=1)
    assert "gcloud not found on PATH" in result.stderr


# ----------------------------------------------------------------------------- SLURM


def _slurm(tmp_path, *args, **kwargs):
    return _run(SLURM, "--workdir=/shared/runs/m1", *args, cwd=tmp_path, **kwargs)


def _dry_script(tmp_path, *args, written=False):
    out = _slurm(tmp_path, *args, "--dry-run").stdout
    script, _, submit = out.rstrip("\n").rpartition("\n")
    assert submit == f"sbatch {tmp_path / 'm1.sbatch'}"
    assert (tmp_path / "m1.sbatch").exists() == written  # a dry run writes nothing
    return script + "\n"


def _sbatch_lines(script):
    return [line.removeprefix("#SBATCH ") for line in script.splitlines()
            if line.startswith("#SBATCH ")]


def _srun_argv(script):
    [line] = [line for line in script.splitlines() if line.startswith("srun ")]
    return shlex.split(line.removesuffix(" &"))


def test_slurm_per_gpu_script(tmp_path):
    script = _dry_script(tmp_path, "--nodes=2", "--gpus_per_node=8", "--partition=gpu",
                         "--time=1-12:00:00", "--account=proj", "--cpus_per_task=6",
                         "--venv=/opt/venv", "--data_dir=/shared/tfds",
                         "--override", "batch_size=1024", "--override", "note=two words")
    assert script.startswith("#!/bin/bash\n")
    sbatch = _sbatch_lines(script)
    assert {"--job-name=mosaic-m1", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-task=1",
            "--cpus-per-task=6", "--time=1-12:00:00", "--partition=gpu",
            "--account=proj"} <= set(sbatch)
    assert f"--output={tmp_path}/mosaic-m1-%j.out" in sbatch
    assert not any(o.startswith(("--requeue", "--signal", "--gpus-per-node")) for o in sbatch)
    assert "source /opt/venv/bin/activate" in script
    assert not any(line.startswith("export JAX_") for line in script.splitlines())
    srun = _srun_argv(script)
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
    i = srun.index("python")
    assert srun[i:] == [
        "python", "-m", "mosaic_jax.main", "--config=configs/mosaic1.py",
        "--workdir=/shared/runs/m1", "--config.data.data_dir=/shared/tfds",
        "--config.batch_size=1024", "--config.note=two words", "--multiprocess"]
    assert f"cd {REPO}" in script
    _bash_syntax_ok(script)


def test_slurm_per_node_script(tmp_path):
    script = _dry_script(tmp_path, "--mode=per-node", "--nodes=3", "--gpus_per_node=4")
    sbatch = _sbatch_lines(script)
    assert {"--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=4"} <= set(sbatch)
    assert not any(o.startswith("--gpus-per-task") for o in sbatch)
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script.splitlines()
    srun = _srun_argv(script)
    assert srun[2:5] == ["python", "-m", "mosaic_jax.main"] and srun[-1] == "--multiprocess"
    _bash_syntax_ok(script)


def test_slurm_requeue_script(tmp_path):
    script = _dry_script(tmp_path, "--gpus_per_node=2", "--requeue", "--signal_seconds=300",
                         "--time=2:00:00")
    sbatch = _sbatch_lines(script)
    assert {"--requeue", "--signal=B:TERM@300", "--open-mode=append"} <= set(sbatch)
    assert "trap on_term TERM" in script
    assert 'scancel --signal=TERM "$SLURM_JOB_ID"' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert _srun_argv(script)[-1] == "--multiprocess"
    _bash_syntax_ok(script)


@pytest.mark.parametrize("args, message", [
    (["--nodes=0", "--gpus_per_node=8"], "not a positive integer"),
    (["--gpus_per_node=-1"], "not a positive integer"),
    (["--gpus_per_node=x"], "not a positive integer"),
    (["--gpus_per_node=8", "--override", "batch_size"], "KEY=VALUE"),
    (["--gpus_per_node=8", "--override", "bad key=1"], "KEY=VALUE"),
    (["--gpus_per_node=8", "--time=soon"], "--time"),
    (["--gpus_per_node=8", "--mode=per-core"], "invalid choice"),
    (["--gpus_per_node=8", "--requeue", "--time=2", "--signal_seconds=120"], "shorter"),
    (["--gpus_per_node=8", "--sbatch_option=qos=high"], "--sbatch_option"),
    (["--nodes=2"], "--gpus_per_node"),
    (["--gpus_per_node=8", "--partition=gpu\ntouch pwned\n#"], "--partition"),
    (["--gpus_per_node=8", "--partition=gpu;touch pwned"], "--partition"),
    (["--gpus_per_node=8", "--account=a\rb"], "--account"),
    (["--gpus_per_node=8", "--output=log\ntouch pwned\n#"], "--output"),
    (["--gpus_per_node=8", "--config=configs/mosaic1.py\ntouch pwned"], "--config"),
    (["--gpus_per_node=8", "--override", "seed=1\ntouch pwned"], "--override"),
    (["--gpus_per_node=8", "--data_dir=/d\x7f"], "--data_dir"),
])
def test_slurm_bad_arguments_fail_clearly(tmp_path, args, message):
    result = _slurm(tmp_path, *args, "--dry-run", check_rc=2)
    assert message in result.stderr and not result.stdout


def test_slurm_time_formats():
    slurm = importlib.import_module(SLURM)
    assert slurm.time_limit_seconds("30") == 1800
    assert slurm.time_limit_seconds("30:15") == 1815
    assert slurm.time_limit_seconds("2:00:00") == 7200
    assert slurm.time_limit_seconds("1-2") == 93600
    assert slurm.time_limit_seconds("1-02:30") == 95400
    assert slurm.time_limit_seconds("UNLIMITED") is None


def _fake_bin(tmp_path, name, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)
    return bin_dir


def test_slurm_writes_the_script_and_submits_it(tmp_path):
    bin_dir = _fake_bin(tmp_path, "sbatch", 'echo "$@" > "$FAKE_LOG"; echo "Submitted batch job 7"')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               FAKE_LOG=str(tmp_path / "sbatch.log"))
    result = _slurm(tmp_path, "--gpus_per_node=4", env=env)
    path = tmp_path / "m1.sbatch"
    assert result.stdout.splitlines() == [str(path), "Submitted batch job 7"]
    assert (tmp_path / "sbatch.log").read_text().split() == [str(path)]
    dry = _dry_script(tmp_path, "--gpus_per_node=4", written=True)
    assert path.read_text() == dry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "m1.sbatch", "sbatch.log"]

    custom = tmp_path / "jobs" / "run.sbatch"
    custom.parent.mkdir()
    result = _slurm(tmp_path, "--gpus_per_node=4", f"--script_path={custom}", env=env)
    assert result.stdout.splitlines()[0] == str(custom) and custom.exists()


def test_slurm_reports_sbatch_failure(tmp_path):
    bin_dir = _fake_bin(tmp_path, "sbatch", "echo 'sbatch: error: invalid partition' >&2; exit 1")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = _slurm(tmp_path, "--gpus_per_node=4", env=env, check_rc=1)
    assert "error: sbatch failed (exit status 1)" in result.stderr


def _slurm_env(tmp_path, bin_dir):
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node[01-02]")


def test_slurm_script_runs_srun_with_the_gpu_settings(tmp_path):
    """The generated per-node and per-gpu scripts, run by bash against a stand-in srun."""
    bin_dir = _fake_bin(tmp_path, "srun", 'shift  # --kill-on-bad-exit\n'
                        'if [ "$1" = bash ]; then exec "$@"; fi\n'
                        'echo "ids=${JAX_LOCAL_DEVICE_IDS:-unset} args=$*"')
    _fake_bin(tmp_path, "python", 'echo "ids=${JAX_LOCAL_DEVICE_IDS:-unset} args=python $*"')
    env = _slurm_env(tmp_path, bin_dir)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export ACTIVATED=1\n")

    def run(*args, **extra_env):
        script = tmp_path / "job.sh"
        script.write_text(_dry_script(tmp_path, f"--venv={venv}", *args))
        result = subprocess.run(["bash", str(script)], env={**env, **extra_env},
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()[-1]

    line = run("--mode=per-node", "--gpus_per_node=4")
    assert line.startswith("ids=0,1,2,3 args=python -m mosaic_jax.main")
    assert line.endswith("--multiprocess")
    # per-gpu: a task bound to one GPU uses it (ordinal 0); one that sees all keeps JAX's default.
    assert run("--gpus_per_node=4", CUDA_VISIBLE_DEVICES="3").startswith("ids=0 args=python")
    assert run("--gpus_per_node=4", CUDA_VISIBLE_DEVICES="0,1,2,3").startswith("ids=unset")
    assert run("--gpus_per_node=4").startswith("ids=unset")


FAKE_TASK = """
import os, signal, sys, time
def on_term(signum, frame):
    open(os.environ["TASK_LOG"], "a").write("task got SIGTERM, saved checkpoint\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(os.environ["TASK_PID"], "w").write(str(os.getpid()))
time.sleep(30)
sys.exit(5)
"""


def test_slurm_requeue_forwards_sigterm_and_requeues(tmp_path):
    """The batch shell gets SIGTERM (--signal=B:TERM): the tasks get it, then the job requeues."""
    task = tmp_path / "task.py"
    task.write_text(FAKE_TASK)
    bin_dir = _fake_bin(tmp_path, "srun", f'exec {shlex.quote(sys.executable)} {task}')
    _fake_bin(tmp_path, "scancel",
              'echo "scancel $*" >> "$TASK_LOG"; kill -TERM "$(cat "$TASK_PID")"')
    _fake_bin(tmp_path, "scontrol", 'echo "scontrol $*" >> "$TASK_LOG"')
    log, pid_file = tmp_path / "task.log", tmp_path / "task.pid"
    env = dict(_slurm_env(tmp_path, bin_dir), TASK_LOG=str(log), TASK_PID=str(pid_file))
    script = tmp_path / "job.sh"
    script.write_text(_dry_script(tmp_path, "--gpus_per_node=2", "--requeue"))
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        if pid_file.exists() and pid_file.read_text():
            try:  # the stand-in task, if it is still there
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, out
    assert log.read_text().splitlines() == [
        "scancel --signal=TERM 42", "task got SIGTERM, saved checkpoint", "scontrol requeue 42"]
    assert "the job will be requeued" in out


def test_tarball_has_only_the_checkout_files(fake_gcloud, tmp_path):
    """Packing a git checkout keeps tracked and untracked-but-not-ignored files only."""
    checkout, env, calls = fake_gcloud
    (checkout / ".gitignore").write_text(".venv/\nruns/\n")
    (checkout / "runs").mkdir()
    (checkout / "runs" / "big.ckpt").write_text("x")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(checkout)]
    if subprocess.run([*git, "init", "-q"], capture_output=True).returncode != 0:
        pytest.skip("git unavailable")
    subprocess.run([*git, "add", "mosaic_jax"], check=True)
    (checkout / "notes.md").write_text("untracked, not ignored\n")
    _run(TPU_POD, *TPU_ARGS, f"--repo={checkout}", "--skip_install", env=env)  # no copy
    assert [c["argv"][3] for c in calls()] == ["create", "ssh"]
    _run(TPU_POD, *TPU_ARGS, f"--repo={checkout}", "--reuse", env={**env, "FAKE_STATE": "READY"})
    files = [c for c in calls() if c["argv"][3] == "scp"][0]["files"]
    assert files == [".gitignore", "mosaic_jax/main.py", "notes.md", "pyproject.toml"]
