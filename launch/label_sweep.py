#!/usr/bin/env python3
"""Runs one config at several label fractions, each an ordinary run with its own workdir.

Every run is `python -m mosaic_jax.main --config=CONFIG --workdir=ROOT/NAME_label<F>
--config.data.label_fraction=<F> [--config.KEY=VALUE ...]`, one after the other on this
machine. The seed and the subset scheme stay those of the config (`seed`, `data.subset_seed`):
the labelled subsets are chosen by a hash of each patch id, so a smaller fraction's labelled
patches are part of every larger one's. `--key train_fraction` sweeps the training subset
instead (fewer patches, all labelled). A workdir that already holds evaluation metrics
(`metrics_*.json`) is skipped, so an interrupted sweep continues where it stopped; the first
failing run stops the sweep. Then `python -m mosaic_jax report --workdirs ROOT/* --output DIR`
draws the label-efficiency curve. Standard library only (with `data_builders.cli`, which is
too).

Example (the demo data, three fractions; `--dry-run` prints the commands only):
  python -m launch.label_sweep --config=configs/mosaic1.py:demo --root=runs/sweep \
      --fractions 0.1 0.3 1.0 --override num_train_steps=60 --dry-run
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

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
    for f in fractions:
        workdir = os.path.join(root, f"{name}_{KEYS[key]}{f:g}")
        argv = ["python", "-m", "mosaic_jax.main", f"--config={config}", f"--workdir={workdir}"]
        if data_dir:
            argv.append(f"--config.data.data_dir={data_dir}")
        argv += [*overrides, f"--config.data.{key}={f!r}"]
        runs.append((workdir, argv))
    return runs


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
