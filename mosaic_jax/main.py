"""Entry point: python -m mosaic_jax.main --config=configs/mosaic1.py[:demo] --workdir=DIR.

Flags: `--config` (an ml_collections config file, overridable with `--config.KEY=VALUE`),
`--workdir` (checkpoints, TensorBoard events, metrics JSON/markdown, t-SNE picture), and for
multi-process runs `--multiprocess` (cluster auto-detection) or `--coordinator_address`,
`--num_processes`, `--process_id`. A run started on a workdir that holds a checkpoint resumes
from it; SIGTERM saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from data_builders import cli_errors, console
from mosaic_jax.training import distributed, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_bool("multiprocess", False,
                  "Multi-process run: connect to the other processes with "
                  "jax.distributed.initialize(), detecting the cluster (TPU pod, SLURM).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for an explicit multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_bool("verbose", False, "Print the traceback of an error, not only its one line.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                           auto=FLAGS.multiprocess)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)  # validates the config first


def run() -> None:
    """Runs `main` with the flags of `sys.argv`; every error ends in one `error:` line."""
    console.quiet_console()
    workdir = cli_errors.flag_value(sys.argv, "workdir")
    cli_errors.run_cli(lambda: app.run(main), sys.argv, paths=[workdir] if workdir else [])


if __name__ == "__main__":
    run()
