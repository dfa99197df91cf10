"""Entry point: python -m mosaic_jax.main --config=configs/mosaic1.py[:demo] --workdir=DIR.

Flags: `--config` (an ml_collections config file, overridable with `--config.KEY=VALUE`) and
`--workdir` (checkpoints, TensorBoard events, metrics JSON/markdown, t-SNE picture). A run
started on a workdir that holds a checkpoint resumes from it.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from mosaic_jax import train
    from mosaic_jax.configuration import validate_config

    try:
        validate_config(FLAGS.config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
