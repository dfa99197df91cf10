#!/usr/bin/env python3
"""Runs one config at several label fractions, each an ordinary run with its own workdir.

Every run is `python -m mosaic_jax.main --config=CONFIG --workdir=ROOT/NAME_label<F>_<HASH>
--config.data.label_fraction=<F> [--config.KEY=VALUE ...]`, one after the other on this
machine. `<F>` is the fraction's exact `repr` and `<HASH>` a short hash of the other settings
(config, data_dir, overrides), so runs of distinct settings never share a workdir. The seed
and the subset scheme stay those of the config (`seed`, `data.subset_seed`): the labelled
subsets are chosen by a hash of each patch id, so a smaller fraction's labelled
patches are part of every larger one's. `--key train_fraction` sweeps the training subset
instead (fewer patches, all labelled). A workdir that already holds evaluation metrics
(`metrics_*.json`) is skipped, so an interrupted sweep continues where it stopped, but only when
its `config.json` is the config the sweep asks for (`launch/resolved_config.py`): a run of other
settings under that name stops the sweep with the keys that differ. The first failing run stops
the sweep. Then `python -m mosaic_jax report --workdirs ROOT/* --output DIR`
draws the label-efficiency curve. Standard library only (with `data_builders.cli`, which is
too).

Example (the demo data, three fractions; `--dry-run` prints the commands only):
  python -m launch.label_sweep --config=configs/mosaic1.py:demo --root=runs/sweep \
      --fractions 0.1 0.3 1.0 --override num_train_steps=60 --dry-run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_builders import cli
from launch.training_command import parse_override

KEYS = {"label_fraction": "label", "train_fraction": "train"}
DEFAULT_FRACTIONS = (0.01, 0.05, 0.1, 0.5, 1.0)


def fraction(text: str) -> float:
    """A fraction in (0, 1]; argparse error otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction must be a number in (0, 1]")
    return value


def config_name(config: str) -> str:
    """`configs/mosaic1.py:demo` -> `mosaic1`."""
    return Path(config.partition(":")[0]).stem


def sweep_commands(config: str, root: str, fractions: Sequence[float], *, key: str,
                   name: str, data_dir: str | None, overrides: Sequence[str]
                   ) -> list[tuple[str, list[str]]]:
    """[(workdir, argv)] of the sweep's runs, in the order of `fractions`."""
    runs = []
    digest = settings_hash(config, data_dir, overrides)
    for f in fractions:
        workdir = os.path.join(root, f"{name}_{KEYS[key]}{f!r}_{digest}")
        argv = ["python", "-m", "mosaic_jax.main", f"--config={config}", f"--workdir={workdir}"]
        if data_dir:
            argv.append(f"--config.data.data_dir={data_dir}")
        argv += [*overrides, f"--config.data.{key}={f!r}"]
        runs.append((workdir, argv))
    return runs


def settings_hash(config: str, data_dir: str | None, overrides: Sequence[str]) -> str:
    """8 hex digits of sha256 over the settings every run of a sweep shares."""
    text = json.dumps([config, data_dir or "", sorted(overrides)])
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} of nested dicts."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(there: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """`KEY: VALUE there, VALUE here` for every config key whose value differs (missing keys
    read `absent`), sorted by key."""
    a, b = _flat(there), _flat(here)
    keys = sorted(set(a) | set(b), key=lambda k: (k.count("."), k))  # `objective` first
    return [f"{k}: {a.get(k, 'absent')!r} there, {b.get(k, 'absent')!r} here"
            for k in keys if a.get(k, "absent") != b.get(k, "absent")]


def expected_config(command: Sequence[str]) -> dict[str, Any]:
    """The config.json a run command (`sweep_commands` argv) writes, parsed by
    `launch.resolved_config` in a child process; RuntimeError with its message if the
    config cannot be built."""
    flags = [a for a in command[3:] if a.startswith("--config")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}  # config paths stay the user's
    result = subprocess.run([sys.executable, "-m", "launch.resolved_config", *flags],
                            capture_output=True, text=True, cwd=os.getcwd(), env=env)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RuntimeError(f"cannot build the config of {shlex.join(command)}: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def mismatch(workdir: str, command: Sequence[str]) -> list[str]:
    """The differences between `workdir/config.json` and the config `command` asks for ([]
    when the workdir has no config.json, or the same one)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        there = json.load(f)
    return config_differences(there, expected_config(command))


def is_done(workdir: str) -> bool:
    """Whether the workdir holds evaluation metrics of a finished run."""
    return os.path.isdir(workdir) and any(
        n.startswith("metrics_") and n.endswith(".json") for n in os.listdir(workdir))


def build_parser() -> argparse.ArgumentParser:
    p = cli.new_parser("python -m launch.label_sweep", __doc__)
    p.add_argument("--config", required=True,
                   help="config file with its arguments, e.g. configs/mosaic1.py:demo")
    p.add_argument("--root", required=True, help="folder of the sweep's workdirs")
    p.add_argument("--fractions", nargs="+", type=fraction, default=list(DEFAULT_FRACTIONS),
                   help="fractions to run (default: 0.01 0.05 0.1 0.5 1.0)")
    p.add_argument("--key", choices=list(KEYS), default="label_fraction",
                   help="config key swept (data.label_fraction or data.train_fraction)")
    p.add_argument("--name", default=None,
                   help="workdir name prefix (default: the config file's name)")
    p.add_argument("--data_dir", default=None, help="TFDS data directory (data.data_dir)")
    p.add_argument("--override", action="append", default=[], type=parse_override,
                   metavar="KEY=VALUE", help="config override for every run (repeatable)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the commands, run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (convention of `data_builders.cli`); returns the exit status."""
    args = build_parser().parse_args(argv)
    return cli.run(lambda: _sweep(args), argv, paths=[args.root])


def _sweep(args: argparse.Namespace) -> int:
    if not args.dry_run:  # before the first run starts (a dry run only prints)
        cli.check_config_file(args.config)
    if len(set(args.fractions)) != len(args.fractions):
        print(f"error: --fractions repeats a value: {args.fractions}", file=sys.stderr)
        return 2
    for override in args.override:
        if override.startswith(f"--config.data.{args.key}="):
            print(f"error: --override data.{args.key} is what the sweep sets; use --fractions",
                  file=sys.stderr)
            return 2
    runs = sweep_commands(args.config, args.root, args.fractions, key=args.key,
                          name=args.name or config_name(args.config),
                          data_dir=args.data_dir, overrides=args.override)
    for i, (workdir, command) in enumerate(runs, start=1):
        if args.dry_run:
            print(shlex.join(command))
            continue
        try:
            differences = mismatch(workdir, command)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if differences:
            more = f"; and {len(differences) - 8} more" if len(differences) > 8 else ""
            print(f"error: {workdir} holds a run of other settings than this sweep's "
                  f"({'; '.join(differences[:8])}{more}); move it away or choose another "
                  "--root", file=sys.stderr)
            return 1
        if is_done(workdir):
            print(f"[{i}/{len(runs)}] {workdir} has finished already; skipped", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {shlex.join(command)}", flush=True)
        result = subprocess.run([sys.executable, *command[1:]])
        if result.returncode != 0:
            print(f"error: the run in {workdir} failed (exit status {result.returncode}); "
                  "rerun the sweep to continue from it", file=sys.stderr)
            return 1
    if not args.dry_run:
        report = shlex.quote(args.root.rstrip("/") + "_report")
        print(f"Done. The curve: python -m mosaic_jax report --workdirs "
              f"{shlex.quote(args.root)}/* --output {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
