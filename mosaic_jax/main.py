"""Entry point: python -m mosaic_jax.main --config=configs/mosaic1.py[:demo] --workdir=DIR.

Flags: `--config` (an ml_collections config file, overridable with `--config.KEY=VALUE`),
`--workdir` (checkpoints, TensorBoard events, metrics JSON/markdown, t-SNE picture), and for
multi-process runs `--multiprocess` (cluster auto-detection) or `--coordinator_address`,
`--num_processes`, `--process_id`. A run started on a workdir that holds a checkpoint resumes
from it; SIGTERM saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from data_builders import cli, console
from mosaic_jax.training import distributed, train

FLAGS = flags.FLAGS
_HOLDERS = [
    config_flags.DEFINE_config_file("config", None, "Training configuration file, FILE[:ARGS] "
                                    "(e.g. configs/mosaic1.py:demo); override a key with "
                                    "--config.KEY=VALUE.", lock_config=True),
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results."),
    flags.DEFINE_bool("multiprocess", False,
                      "Multi-process run: connect to the other processes with "
                      "jax.distributed.initialize(), detecting the cluster (TPU pod, SLURM)."),
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0, for an explicit multi-process run."),
    flags.DEFINE_integer("num_processes", None,
                         "Number of processes (with --coordinator_address)."),
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address)."),
    flags.DEFINE_bool("verbose", False, "Print the traceback of an error, not only its one line."),
]
flags.mark_flags_as_required(["config", "workdir"])


def _train(argv: list[str]) -> None:
    del argv  # only the program name: cli.parse_absl refuses positional words
    distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                           auto=FLAGS.multiprocess)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)  # validates the config first


def main(argv: Sequence[str] | None = None) -> None:
    """Trains with the flags of `argv` (program name first; default `sys.argv`) under the
    convention of `data_builders.cli`: every error ends in one `error:` line."""
    argv = list(sys.argv if argv is None else argv)
    console.quiet_console()
    workdir = cli.flag_value(argv, "workdir")
    prog = "python -m mosaic_jax.main"
    cli.run(lambda: app.run(_train, argv=argv, flags_parser=lambda a: cli.parse_absl(
        FLAGS, a, _HOLDERS, prog=prog, doc=__doc__)), argv, paths=[workdir] if workdir else [])


if __name__ == "__main__":
    main()
