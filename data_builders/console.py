"""A quiet console: the run's metrics and progress, not the libraries' start-up chatter.

`quiet_console()` is called once at start-up by every entry point (training, export, embed,
report, prepare), before TensorFlow or JAX are imported where it can be. It hides:
- INFO lines of libraries (JAX's "Unable to initialize backend 'tpu'", Orbax, TFDS,
  matplotlib's font cache), whether they log through absl or through their own Python loggers;
- TensorFlow's C++ INFO notices (oneDNN), through `TF_CPP_MIN_LOG_LEVEL` unless it is set;
- TFDS warnings that are expected in normal use ("Variant folder ... has no
  dataset_info.json" before a dataset is prepared).
Warnings and errors otherwise pass, and our own INFO lines (and clu's metric lines) stay.

`progress_line` is the training loop's one line per log step (step, loss, throughput, ETA);
the full metrics go to TensorBoard and the metrics files, not to the console.
"""

from __future__ import annotations

import logging
import os
import re

# Libraries whose INFO lines are noise on the console (matched against the logging call's file
# path for absl records, and as Python logger names).
NOISY_LIBRARIES = ("orbax", "tensorflow_datasets", "jax", "jaxlib", "matplotlib", "grain",
                   "etils", "absl")
# Library warnings that are expected in normal use.
EXPECTED_WARNINGS = (re.compile(r"Variant folder .* has no dataset_info\.json"),)


def is_noise(record: logging.LogRecord) -> bool:
    """Whether a log record is library chatter to keep off the console."""
    message = record.getMessage() if record.args else str(record.msg)
    if record.levelno < logging.ERROR and any(p.search(message) for p in EXPECTED_WARNINGS):
        return True
    if record.levelno >= logging.WARNING:
        return False
    path = record.pathname.replace("\\", "/")
    from_library = any(f"/{lib}/" in path for lib in NOISY_LIBRARIES)
    ours = any(f"/{own}/" in path for own in ("mosaic_jax", "data_builders", "clu"))
    return from_library and not ours


class LibraryNoiseFilter(logging.Filter):
    """A logging filter that drops `is_noise` records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record)


_FILTER = LibraryNoiseFilter()


def quiet_console() -> None:
    """Installs the filters (idempotent); see the module docstring."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TF's C++ INFO (oneDNN notices)
    for name in ("absl", "", "jax", "jax._src.xla_bridge", "orbax", "tensorflow_datasets"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for name in ("jax", "jaxlib", "matplotlib", "orbax", "etils"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)

