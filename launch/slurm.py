#!/usr/bin/env python3
"""Writes a SLURM batch script for multi-node GPU training of MoSAiC and submits it (sbatch).

Modes: `per-gpu` runs one process per GPU (`--ntasks-per-node=GPUS`, `--gpus-per-task=1`);
`per-node` runs one process per node that drives all of its GPUs (`--ntasks-per-node=1`,
`--gpus-per-node=GPUS`). `srun` starts `python -m mosaic_jax.main ... --multiprocess` on every
task and JAX's SLURM detection supplies the coordinator, the process count and each process's
id. With --requeue the job gets SIGTERM --signal_seconds before its time limit, the run saves a
checkpoint and exits, and the job requeues itself; the requeued job resumes from the checkpoint.
Standard library only (with `data_builders.cli`, which is too).

Example:
  python -m launch.slurm --nodes=2 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
      --workdir=/shared/runs/mosaic1 --data_dir=/shared/tensorflow_datasets --requeue \
      --override batch_size=1024 --dry-run
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from data_builders import cli
from launch.training_command import parse_override, training_command

REPO_ROOT = Path(__file__).resolve().parents[1]

# per-gpu: when SLURM binds one GPU to the task (CUDA_VISIBLE_DEVICES lists exactly one), JAX
# must use that GPU, ordinal 0; JAX's own default is the ordinal SLURM_LOCALID, which is right
# only when every task sees all GPUs of its node.
PER_GPU_TASK_WRAPPER = ('case "${CUDA_VISIBLE_DEVICES:-}" in ""|*,*) ;; '
                        '*) export JAX_LOCAL_DEVICE_IDS=0 ;; esac; exec "$@"')


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return n


def time_limit_seconds(value: str) -> int | None:
    """Seconds in a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]); None: unlimited."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not m:
        raise ValueError(value)
    days, a, b, c = m.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if c is not None:  # HH:MM:SS
        return (int(a) * 60 + int(b)) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # MM or MM:SS


def _time(value: str) -> str:
    try:
        time_limit_seconds(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected MM, HH:MM:SS or D-HH:MM:SS") from None
    return value


def _local_path(value: str) -> str:
    """Absolute path (relative paths are resolved here); URLs such as gs:// stay as they are."""
    if "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description="Write a SLURM batch script for multi-node GPU training and sbatch it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--verbose", action="store_true",
                   help="print the traceback of an error, not only its one line")
    res = p.add_argument_group("resources")
    res.add_argument("--nodes", type=_positive, default=1, help="number of nodes")
    res.add_argument("--gpus_per_node", type=_positive, required=True, help="GPUs per node")
    res.add_argument("--mode", choices=("per-gpu", "per-node"), default="per-gpu",
                     help="one process per GPU, or one process per node driving all its GPUs")
    res.add_argument("--partition", default=None, help="SLURM partition")
    res.add_argument("--time", type=_time, default="24:00:00", help="time limit")
    res.add_argument("--account", default=None, help="SLURM account")
    res.add_argument("--cpus_per_task", type=_positive, default=None,
                     help="CPU cores per task (input pipeline workers)")
    res.add_argument("--job_name", default=None, help="default: mosaic-<workdir name>")
    res.add_argument("--sbatch_option", action="append", default=[], metavar="OPTION",
                     help="extra #SBATCH option, e.g. --sbatch_option=--qos=high (repeatable)")
    res.add_argument("--output", default=None,
                     help="job log file (sbatch patterns allowed); default: <job_name>-%%j.out "
                     "next to the batch script")
    res.add_argument("--requeue", action="store_true",
                     help="SIGTERM before the time limit, checkpoint, and requeue the job")
    res.add_argument("--signal_seconds", type=_positive, default=120,
                     help="with --requeue: how long before the time limit SIGTERM arrives")
    run = p.add_argument_group("training")
    run.add_argument("--venv", default=os.environ.get("VIRTUAL_ENV"), type=_local_path,
                     help="virtual environment to activate on the nodes (default: the active "
                     "one)")
    run.add_argument("--repo_dir", default=str(REPO_ROOT), type=_local_path,
                     help="the mosaic_jax checkout on the shared filesystem")
    run.add_argument("--workdir", required=True, type=_local_path,
                     help="shared directory for checkpoints, TensorBoard events and metrics")
    run.add_argument("--data_dir", default=None, type=_local_path,
                     help="TFDS data_dir holding the prepared dataset")
    run.add_argument("--config", default="configs/mosaic1.py",
                     help="config file, relative to --repo_dir (optionally with :ARGS)")
    run.add_argument("--override", action="append", default=[], type=parse_override,
                     metavar="KEY=VALUE",
                     help="config override, becomes --config.KEY=VALUE (repeatable)")
    p.add_argument("--script_path", default=None,
                   help="where to write the batch script; default: <workdir name>.sbatch here")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the batch script and the sbatch command; write and run nothing")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and cross-checks the arguments (argparse exits with status 2 on errors)."""
    p = build_parser()
    args = p.parse_args(argv)
    name = os.path.basename(args.workdir.rstrip("/"))
    if not name:
        p.error(f"--workdir {args.workdir!r} has no directory name")
    if args.job_name is None:
        args.job_name = f"mosaic-{name}"
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.job_name):
        p.error(f"--job_name {args.job_name!r}: letters, digits and _.+- only")
    for flag in ("partition", "account"):  # SLURM names; a comma separates alternatives
        value = getattr(args, flag)
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.+,-]+", value):
            p.error(f"--{flag} {value!r}: letters, digits and _.+,- only")
    # Every other value is written into the script too: a line break or other control
    # character would end its #SBATCH line or shell command and start a new one.
    for flag, value in sorted(vars(args).items()):
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and any(ord(ch) < 32 or ord(ch) == 127 for ch in item):
                p.error(f"--{flag} {item!r}: control characters (line breaks, tabs) are not "
                        "allowed in values written into the batch script")
    args.script_path = os.path.abspath(args.script_path or f"{name}.sbatch")
    if args.output is None:
        args.output = os.path.join(os.path.dirname(args.script_path), f"{args.job_name}-%j.out")
    if args.requeue:
        limit = time_limit_seconds(args.time)
        if limit is not None and args.signal_seconds >= limit:
            p.error(f"--signal_seconds {args.signal_seconds} must be shorter than --time "
                    f"{args.time}")
    if any(o.startswith("--config.data.data_dir=") for o in args.override) and args.data_dir:
        p.error("give the data directory once: --data_dir or --override data.data_dir=...")
    for option in args.sbatch_option:
        if not option.startswith("-") or "\n" in option:
            p.error(f"--sbatch_option {option!r}: expected an sbatch option such as --qos=high")
    return args


def batch_script(args: argparse.Namespace) -> str:
    """The text of the SLURM batch script."""
    per_gpu = args.mode == "per-gpu"
    tasks = args.gpus_per_node if per_gpu else 1
    sbatch = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
              f"--ntasks-per-node={tasks}"]
    sbatch.append("--gpus-per-task=1" if per_gpu else f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        sbatch.append(f"--cpus-per-task={args.cpus_per_task}")
    sbatch.append(f"--time={args.time}")
    if args.partition:
        sbatch.append(f"--partition={args.partition}")
    if args.account:
        sbatch.append(f"--account={args.account}")
    sbatch.append(f"--output={args.output}")
    if args.requeue:
        # B: the signal goes to this batch shell, which passes it on to the training processes
        # and then requeues the job.
        sbatch += ["--requeue", f"--signal=B:TERM@{args.signal_seconds}", "--open-mode=append"]
    sbatch += args.sbatch_option

    processes = args.nodes * tasks
    train = training_command(args.config, args.workdir, args.data_dir, args.override)
    srun = ["srun", "--kill-on-bad-exit=1"]
    if per_gpu:
        srun += ["bash", "-c", PER_GPU_TASK_WRAPPER, "bash"]
    srun_line = shlex.join([*srun, *train])

    lines = [
        "#!/bin/bash",
        f"# MoSAiC training: {args.nodes} node(s) x {args.gpus_per_node} GPU(s), "
        f"{processes} process(es) ({args.mode}). Written by launch/slurm.py.",
        *(f"#SBATCH {shlex.quote(o)}" for o in sbatch),
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(args.repo_dir)}",
    ]
    if args.venv:
        activate = shlex.quote(os.path.join(args.venv, "bin", "activate"))
        lines.append(f"set +u; source {activate}; set -u  # activate may read unset variables")
    lines += ["export PYTHONUNBUFFERED=1"]
    if not per_gpu:  # JAX's SLURM default would give each process only GPU SLURM_LOCALID.
        ids = ",".join(str(i) for i in range(args.gpus_per_node))
        lines.append(f"export JAX_LOCAL_DEVICE_IDS={ids}")
    lines.append('echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on '
                 '${SLURM_JOB_NODELIST}: $(date)"')
    if not args.requeue:
        lines.append(srun_line)
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "# SIGTERM (time limit near, or preemption): the run saves a checkpoint and exits 0;",
        "# then this job requeues itself and the requeued job resumes from the checkpoint.",
        "requeue=0",
        "on_term() {",
        '  echo "SIGTERM: asking the run to checkpoint and stop; the job will be requeued"',
        "  requeue=1",
        "  # To the tasks, not to srun: srun answers SIGTERM by killing its tasks (SIGKILL).",
        '  scancel --signal=TERM "$SLURM_JOB_ID" || true',
        "}",
        "trap on_term TERM",
        f"{srun_line} &",
        "srun_pid=$!",
        "while :; do  # wait returns early when the trap runs: wait again until srun ends",
        '  status=0; wait "$srun_pid" || status=$?',
        '  kill -0 "$srun_pid" 2>/dev/null || break',
        "done",
        "# A wait cut short by the trap says 128+15 even when srun ended meanwhile: ask again.",
        'if [ "$status" -gt 128 ]; then status=0; wait "$srun_pid" || status=$?; fi',
        'if [ "$requeue" = 1 ]; then',
        '  scontrol requeue "$SLURM_JOB_ID" || true',
        "fi",
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same directory."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".sbatch", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (convention of `data_builders.cli`); returns the exit status."""
    args = parse_args(argv)
    return cli.run(lambda: _main(args), argv)


def _main(args: argparse.Namespace) -> int:
    if args.venv and not os.path.isfile(os.path.join(args.venv, "bin", "activate")):
        print(f"warning: {args.venv}/bin/activate does not exist here", file=sys.stderr)
    if not args.venv:
        print("warning: no --venv (and no active one): the nodes use the python on their PATH",
              file=sys.stderr)
    script = batch_script(args)
    submit = ["sbatch", args.script_path]
    if args.dry_run:
        print(script, end="")
        print(shlex.join(submit))
        return 0
    try:
        write_atomic(args.script_path, script)
    except OSError as e:
        print(f"error: cannot write {args.script_path}: {e}", file=sys.stderr)
        return 1
    print(args.script_path)
    try:
        subprocess.run(submit, check=True)
    except FileNotFoundError:
        print("error: sbatch not found on PATH (run this on a SLURM login node); the script "
              f"is in {args.script_path}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"error: sbatch failed (exit status {e.returncode}): {shlex.join(submit)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
