#!/usr/bin/env python3
"""Launches MoSAiC training on a Cloud TPU VM (single host or pod) with `gcloud`.

Steps: create the TPU (or reuse it with --reuse), copy the code to every worker (a tarball of
this checkout, or a `git clone` of --repo), install it into a virtual environment on every
worker, start `python -m mosaic_jax.main ... --multiprocess` on all workers at once, and
optionally delete the TPU afterwards. --dry-run prints the commands, one per line, and runs
nothing. --aot_check=TOPOLOGY first compiles the run for that TPU topology on this machine
(`python -m mosaic_jax aot`, which needs jax[tpu] here) and stops, before anything is created,
when it does not fit. Standard library only (with `data_builders.cli`, which is too).

Example:
  python -m launch.tpu_pod --name=mosaic-v4 --zone=us-central2-b --accelerator_type=v4-32 \
      --spot --workdir=gs://BUCKET/runs/mosaic1 --data_dir=gs://BUCKET/tensorflow_datasets \
      --override batch_size=1024 --dry-run
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from data_builders import cli
from launch.training_command import parse_override, training_command

REPO_ROOT = Path(__file__).resolve().parents[1]

VENV_DIR = "mosaic_venv"  # on each worker, relative to the home directory
TARBALL_NAME = "mosaic_jax_code.tar.gz"
# Default software version per TPU generation (accelerator type prefix).
DEFAULT_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Directories never packed when copying a checkout that is not a git repository.
SKIP_DIRS = {".git", ".venv", "venv", "runs", "build", "__pycache__", ".pytest_cache",
             ".ruff_cache"}


class LaunchError(Exception):
    """A step failed; the message says which and what to do."""


def _shared_path(value: str) -> str:
    if re.match(r"gs://[^/]", value) or value.startswith("/"):
        return value.rstrip("/") or "/"
    raise argparse.ArgumentTypeError(
        f"{value!r}: must be a gs:// path (or an absolute path that every worker sees)")


def _name(value: str) -> str:
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: lowercase letters, digits and hyphens, starting with a letter")
    return value


def _accelerator(value: str) -> str:
    if not re.fullmatch(r"v\d+[a-z]*-\d+", value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected e.g. v4-32, v5litepod-16, v6e-8")
    return value


def _topology(value: str) -> str:
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+){1,2}", value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected a TPU topology such as v5e:4x4 or v4:2x2x4")
    return value


def _home_name(value: str) -> str:
    """A plain file or directory name, used inside $HOME on the workers."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", value):
        raise argparse.ArgumentTypeError(
            f"{value!r}: a plain name (letters, digits, _.-), for a path in $HOME")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.tpu_pod",
        description="Create a Cloud TPU VM, install mosaic_jax on every worker and train.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--verbose", action="store_true",
                   help="print the traceback of an error, not only its one line")
    tpu = p.add_argument_group("TPU")
    tpu.add_argument("--name", required=True, type=_name, help="TPU VM name")
    tpu.add_argument("--zone", required=True, help="e.g. us-central2-b")
    tpu.add_argument("--accelerator_type", required=True, type=_accelerator,
                     help="e.g. v4-32 (a pod slice of 4 workers) or v5litepod-16")
    tpu.add_argument("--version", default=None,
                     help="TPU software version; default by generation: "
                     + ", ".join(f"{k}: {v}" for k, v in DEFAULT_VERSIONS.items()))
    tpu.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    kind = tpu.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="create a Spot TPU")
    kind.add_argument("--preemptible", action="store_true", help="create a preemptible TPU")
    tpu.add_argument("--reuse", action="store_true",
                     help="use the TPU if it exists (gcloud describe) instead of creating it")
    tpu.add_argument("--delete_after", action="store_true",
                     help="delete the TPU once training has finished successfully")
    tpu.add_argument("--create_arg", action="append", default=[], metavar="ARG",
                     help="extra argument for `tpu-vm create`, e.g. --create_arg=--internal-ips "
                     "(repeatable)")
    tpu.add_argument("--internal_ip", action="store_true",
                     help="ssh/scp to the workers' internal IPs")
    code = p.add_argument_group("code")
    code.add_argument("--repo", default=str(REPO_ROOT),
                      help="local checkout to copy to every worker, or a git URL to clone there")
    code.add_argument("--git_ref", default=None, help="branch, tag or commit (with a git URL)")
    code.add_argument("--remote_dir", default="mosaic_jax", type=_home_name,
                      help="code directory on each worker, in $HOME (replaced on every launch)")
    code.add_argument("--skip_install", action="store_true",
                      help="do not copy or install the code (it is already on the workers)")
    run = p.add_argument_group("training")
    run.add_argument("--workdir", required=True,
                     type=_shared_path,
                     help="gs:// directory for checkpoints, TensorBoard events and metrics")
    run.add_argument("--data_dir", default=None,
                     type=_shared_path,
                     help="gs:// TFDS data_dir holding the prepared dataset")
    run.add_argument("--config", default="configs/mosaic1.py",
                     help="config file, relative to the checkout (optionally with :ARGS)")
    run.add_argument("--override", action="append", default=[], type=parse_override,
                     metavar="KEY=VALUE", help="config override, becomes --config.KEY=VALUE "
                     "(repeatable)")
    run.add_argument("--log_file", default="mosaic_jax_train.log", type=_home_name,
                     help="log file on each worker, in $HOME (the previous one becomes .1)")
    run.add_argument("--detach", action="store_true",
                     help="start training in the background and return at once")
    p.add_argument("--aot_check", default=None, type=_topology, metavar="TOPOLOGY",
                   help="first compile the run's train and eval steps here for this TPU "
                   "topology (e.g. v5e:4x4 for v5litepod-16; needs jax[tpu] locally) and stop "
                   "before anything starts if they do not fit the chips' HBM; also with "
                   "--dry-run")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the commands, one per line, and run nothing")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and cross-checks the arguments (argparse exits with status 2 on errors)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.version is None:
        family = args.accelerator_type.rsplit("-", 1)[0]
        if family not in DEFAULT_VERSIONS:
            p.error(f"no default --version for {args.accelerator_type}; pass --version")
        args.version = DEFAULT_VERSIONS[family]
    if args.detach and args.delete_after:
        p.error("--delete_after needs the launcher to wait for training: drop --detach")
    if any(o.startswith("--config.data.data_dir=") for o in args.override) and args.data_dir:
        p.error("give the data directory once: --data_dir or --override data.data_dir=...")
    args.git_url = None
    if not os.path.isdir(args.repo):
        if re.match(r"^([a-z+]+://|[\w.-]+@[\w.-]+:)", args.repo):
            args.git_url = args.repo
        else:
            p.error(f"--repo {args.repo!r} is neither a directory nor a git URL")
    elif not os.path.isfile(os.path.join(args.repo, "mosaic_jax", "main.py")):
        p.error(f"--repo {args.repo!r} does not hold a mosaic_jax checkout "
                "(no mosaic_jax/main.py)")
    if args.git_ref and not args.git_url:
        p.error("--git_ref goes with a git URL in --repo")
    return args


def _script(steps: Sequence[str]) -> str:
    """Joins shell steps into one line: `; ` after each, a bare space after a trailing `&`."""
    return "".join(s + (" " if s.endswith("&") else "; ") for s in steps).rstrip("; ")


def _home(path: str) -> str:
    """A shell word for $HOME/path on the worker."""
    return '"$HOME"/' + shlex.quote(path)


class Launcher:
    """Builds the gcloud commands and runs (or, dry, prints) them in order."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tarball = os.path.join(tempfile.gettempdir(), f"{args.name}-{TARBALL_NAME}")
        self.tpu_up = False  # set once the TPU was created or found READY

    def gcloud(self, verb: str, *extra: str, positional: Sequence[str] = ()) -> list[str]:
        """`gcloud compute tpus tpu-vm VERB NAME --zone=Z [--project=P] EXTRA`; `positional`
        replaces NAME."""
        argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *(positional or [self.args.name]),
                f"--zone={self.args.zone}"]
        if self.args.project:
            argv.append(f"--project={self.args.project}")
        return [*argv, *extra]

    def ssh_all(self, script: str) -> list[str]:
        """Runs `script` (a shell command line) on every worker at once."""
        extra = ["--worker=all"] + (["--internal-ip"] if self.args.internal_ip else [])
        return self.gcloud("ssh", *extra, f"--command={script}")

    def create(self) -> list[str]:
        a = self.args
        argv = self.gcloud("create", f"--accelerator-type={a.accelerator_type}",
                           f"--version={a.version}")
        if a.spot:
            argv.append("--spot")
        if a.preemptible:
            argv.append("--preemptible")
        return [*argv, *a.create_arg]

    def describe(self) -> list[str]:
        return self.gcloud("describe", "--format=value(state)")

    def delete(self) -> list[str]:
        return self.gcloud("delete", "--quiet")

    def copy_commands(self) -> list[list[str]]:
        """Commands that put the code into $HOME/<remote_dir> on every worker."""
        a, code = self.args, _home(self.args.remote_dir)
        if a.git_url:
            clone = f"git clone --quiet {shlex.quote(a.git_url)} {code}"
            if a.git_ref:
                clone += f" && git -C {code} checkout --quiet {shlex.quote(a.git_ref)}"
            return [self.ssh_all(f"set -e; rm -rf {code}; {clone}")]
        extra = ["--worker=all"] + (["--internal-ip"] if a.internal_ip else [])
        scp = self.gcloud("scp", *extra,
                          positional=[self.tarball, f"{a.name}:{TARBALL_NAME}"])
        unpack = (f"set -e; rm -rf {code}; mkdir -p {code}; "
                  f"tar -xzf {_home(TARBALL_NAME)} -C {code}; rm -f {_home(TARBALL_NAME)}")
        return [scp, self.ssh_all(unpack)]

    def install_command(self) -> list[str]:
        """Python >= 3.11 (apt if missing), a venv, then jax[tpu] and the project's [train]."""
        code, venv = _home(self.args.remote_dir), _home(VENV_DIR)
        script = _script([
            "set -e",
            'PY=""',
            "for p in python3.13 python3.12 python3.11; do "
            'if command -v $p >/dev/null; then PY=$p; break; fi; done',
            'if [ -z "$PY" ]; then PY=python3.11; sudo apt-get update -qq; '
            "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11; fi",
            '"$PY" -c "import ensurepip" 2>/dev/null || { sudo apt-get update -qq; '
            'sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PY-venv"; }',
            f'[ -x {venv}/bin/python ] || "$PY" -m venv {venv}',
            f". {venv}/bin/activate",
            "python -m pip install --quiet --upgrade pip",
            f"cd {code}",
            # One resolution, so jax[tpu] agrees with the project's jax pin.
            "python -m pip install --quiet 'jax[tpu]' -e '.[train]'",
            # Imports only: touching the TPU here would need every worker in one program.
            "python -c 'import jax, mosaic_jax; print(\"installed: jax\", jax.__version__)'",
        ])
        return self.ssh_all(script)

    def train_command(self) -> list[str]:
        """Starts training on every worker; waits for it (tailing the log) unless --detach."""
        a = self.args
        train = shlex.join(training_command(a.config, a.workdir, a.data_dir, a.override))
        log = _home(a.log_file)
        steps = [
            "set -e",
            f"cd {_home(a.remote_dir)}",
            f". {_home(VENV_DIR)}/bin/activate",
            "export PYTHONUNBUFFERED=1",
            f"if [ -f {log} ]; then mv -f {log} {log}.1; fi",
            f": > {log}",
        ]
        if a.detach:
            steps.append(f"setsid nohup {train} >> {log} 2>&1 < /dev/null &")
            steps.append(f'echo "training started on $(hostname); log: {a.log_file}"')
        else:  # nohup: a dropped ssh connection leaves the run going; the tail then stops.
            steps += [f"nohup {train} >> {log} 2>&1 < /dev/null &", "pid=$!",
                      f"tail -n +1 --pid=$pid -f {log}", "wait $pid"]
        return self.ssh_all(_script(steps))

    def pack(self) -> None:
        """Writes the tarball of the local checkout (files git tracks or does not ignore)."""
        root = Path(self.args.repo).resolve()
        files = _checkout_files(root)
        with tarfile.open(self.tarball, "w:gz") as tar:
            for rel in files:
                tar.add(root / rel, arcname=rel, recursive=False)
        print(f"packed {len(files)} files of {root} into {self.tarball}", file=sys.stderr)


def _checkout_files(root: Path) -> list[str]:
    """Relative paths to copy: git's tracked and untracked-not-ignored files, else a walk."""
    if (root / ".git").exists():
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, text=True)
        if out.returncode == 0:
            return sorted(f for f in set(out.stdout.split("\0"))
                          if f and (root / f).is_file())
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                  if not f.endswith((".pyc", ".tar.gz"))]
    return sorted(files)


def _run(argv: list[str], what: str) -> None:
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    try:
        subprocess.run(argv, check=True)
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]} not found on PATH (install the Google Cloud SDK)") from None
    except subprocess.CalledProcessError as e:
        raise LaunchError(f"{what} failed (exit status {e.returncode}): "
                          f"{shlex.join(argv)}") from None


def _tpu_state(launcher: Launcher) -> str | None:
    """The TPU's state (READY, PREEMPTED, ...), or None when it does not exist."""
    argv = launcher.describe()
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    try:
        out = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise LaunchError("gcloud not found on PATH (install the Google Cloud SDK)") from None
    if out.returncode == 0:
        return out.stdout.strip() or "UNKNOWN"
    if "not_found" in out.stderr.lower() or "not found" in out.stderr.lower():
        return None
    raise LaunchError(f"could not describe TPU {launcher.args.name}: {out.stderr.strip()}")


def dry_run(launcher: Launcher) -> None:
    """Prints every command, one per line (stdout); notes go to stderr."""
    a = launcher.args
    commands = []
    if a.reuse:
        commands.append(launcher.describe())
        print(f"# dry run: assuming {a.name} exists and is READY; if describe finds none, the "
              f"launcher runs: {shlex.join(launcher.create())}", file=sys.stderr)
    else:
        commands.append(launcher.create())
    if not a.skip_install:
        if not a.git_url:
            print(f"# dry run: the launcher first packs {Path(a.repo).resolve()} into "
                  f"{launcher.tarball}", file=sys.stderr)
        commands += [*launcher.copy_commands(), launcher.install_command()]
    commands.append(launcher.train_command())
    if a.delete_after:
        commands.append(launcher.delete())
    for argv in commands:
        print(shlex.join(argv))


def launch(launcher: Launcher) -> None:
    """Runs the steps for real, stopping at the first failure (LaunchError)."""
    a = launcher.args
    state = _tpu_state(launcher) if a.reuse else None
    if state in ("PREEMPTED", "TERMINATED"):
        print(f"{a.name} is {state}: deleting and recreating it", file=sys.stderr)
        _run(launcher.delete(), f"deleting the {state} TPU")
        state = None
    if state is None:
        _run(launcher.create(), "creating the TPU")
    elif state == "STOPPED":
        _run(launcher.gcloud("start"), "starting the stopped TPU")
    elif state != "READY":
        raise LaunchError(f"TPU {a.name} is {state}; wait until it is READY, or delete it")
    else:
        print(f"reusing {a.name} (READY)", file=sys.stderr)
    launcher.tpu_up = True
    if not a.skip_install:
        if not a.git_url:
            launcher.pack()
        try:
            for argv in launcher.copy_commands():
                _run(argv, "copying the code to the workers")
        finally:
            if not a.git_url and os.path.exists(launcher.tarball):
                os.remove(launcher.tarball)
        _run(launcher.install_command(), "installing mosaic_jax on the workers")
    _run(launcher.train_command(), "training")
    if a.detach:
        print(f"training runs in the background; logs: ~/{a.log_file} on each worker, "
              f"outputs in {a.workdir}", file=sys.stderr)
    elif a.delete_after:
        _run(launcher.delete(), "deleting the TPU")


def aot_check_command(args: argparse.Namespace) -> list[str]:
    """argv of the local ahead-of-time check (`python -m mosaic_jax aot`) of the run."""
    return [sys.executable, "-m", "mosaic_jax", "aot", f"--config={args.config}",
            f"--topology={args.aot_check}", *args.override]


def aot_check(args: argparse.Namespace) -> None:
    """Compiles the run for `--aot_check`'s topology on this machine; LaunchError unless the
    steps fit (exit status 3, DOES_NOT_FIT_STATUS of mosaic_jax.training.aot) or compile at all
    (any other status)."""
    argv = aot_check_command(args)
    root = args.repo if not args.git_url else str(REPO_ROOT)
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)
    status = subprocess.run(argv, cwd=root, stdout=sys.stderr).returncode
    if status == 3:
        raise LaunchError(f"the run does not fit {args.aot_check} (see the table above); "
                          "lower batch_size, or set model.remat=True or loss.block_size")
    if status != 0:
        raise LaunchError(f"the ahead-of-time check failed (exit status {status}): "
                          f"{shlex.join(argv)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (convention of `data_builders.cli`); returns the exit status."""
    args = parse_args(argv)
    return cli.run(lambda: _main(args), argv)


def _main(args: argparse.Namespace) -> int:
    launcher = Launcher(args)
    if args.aot_check:
        try:
            aot_check(args)
        except LaunchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if args.dry_run:
        dry_run(launcher)
        return 0
    try:
        launch(launcher)
    except KeyboardInterrupt:
        print("interrupted; a run already started keeps going on the workers (see "
              "launch/README.md to stop it)", file=sys.stderr)
        return 130
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        if launcher.tpu_up:
            print(f"The TPU {args.name} is kept; rerun with --reuse to resume from the last "
                  f"checkpoint in {args.workdir}, or delete it with: "
                  f"{shlex.join(launcher.delete())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
