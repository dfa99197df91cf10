"""The training command both launchers start on every worker, and their --override parsing.

Standard library only: the launchers run on a workstation that need not have JAX.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence


def parse_override(text: str) -> str:
    """KEY=VALUE (KEY may start with `config.`) -> `--config.KEY=VALUE`."""
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected KEY=VALUE with a config key such as "
            "batch_size=512 or optimizer.learning_rate=1e-3")
    return f"--config.{key}={value}"


def training_command(config: str, workdir: str, data_dir: str | None,
                     overrides: Sequence[str]) -> list[str]:
    """argv of the multi-process training command (overrides already `--config.KEY=VALUE`)."""
    argv = ["python", "-m", "mosaic_jax.main", f"--config={config}", f"--workdir={workdir}"]
    if data_dir:
        argv.append(f"--config.data.data_dir={data_dir}")
    return [*argv, *overrides, "--multiprocess"]
