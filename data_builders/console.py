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


def init_from_line(init_from: str, step: int, train_mode: str) -> str:
    """What a probe or fine-tune run says about the encoders it starts from."""
    if train_mode == "linear_probe":
        how = "frozen (linear probe: only the new classifier trains)"
    else:
        how = "fine-tuned (every weight trains; the classifier is new)"
    return f"Encoders from {init_from}, checkpoint step {step}: {how}."


def done_line(final_step: int, start_step: int, seconds: float) -> str:
    """The first words of the closing line: steps done in this run and their time (after a
    resume, how far the run got before)."""
    done = final_step - start_step
    if start_step:
        return (f"Done: step {final_step}; this run did {done} steps (resumed at step "
                f"{start_step}) in {seconds:.0f} s.")
    return f"Done: {final_step} steps in {seconds:.0f} s."


def _duration(seconds: float) -> str:
    """`42 s`, `7 min`, `3 h 05 min`."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(round(seconds / 60))
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def progress_line(step: int, total: int, loss: float, steps_per_sec: float | None,
                  batch_size: int) -> str:
    """The one console line of a training log step: step, loss, throughput and ETA (the other
    metrics go to TensorBoard). `steps_per_sec` is None before the first measured interval."""
    line = f"step {step}/{total}: loss {loss:.4f}"
    if steps_per_sec:
        line += (f", {steps_per_sec:.2f} steps/s ({steps_per_sec * batch_size:.0f} patches/s)"
                 f", ETA {_duration((total - step) / steps_per_sec)}")
    return line
