"""TensorBoard event writer without TensorFlow, with the interface of clu's metric writers.

clu's default writer (`clu.metric_writers.create_default_writer`) writes events through
TensorFlow, and importing anything under `clu.metric_writers` imports TensorFlow (its package
`__init__` imports the TF summary writer). `TensorBoardWriter` offers the same methods the
training loop calls on a clu writer (`write_scalars`, `write_images`, `write_texts`,
`write_hparams`, `flush`, `close`) and writes the events with tensorboardX, which reads and writes
the event format with protobuf alone. A writer without an event file (non-chief processes) logs
its scalars instead (like clu's `LoggingWriter`); one with a file keeps them off the console.

It does not subclass `clu.metric_writers.MetricWriter`: that import alone pulls in TensorFlow.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams as hparams_summary

from data_builders import atomic_files

__all__ = ["TensorBoardWriter", "ReportProgress", "create_writer"]


def _as_images(name: str, value: Any) -> np.ndarray:
    """[N, H, W, C] uint8 from an [H, W, C] or [N, H, W, C] image, C in {1, 3, 4}; float images
    are taken to be in [0, 1]."""
    image = np.asarray(value)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image {name!r}: expected [H, W, C] or [N, H, W, C] with C in 1, 3, 4; "
                         f"got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.rint(np.asarray(image, np.float64) * 255.0), 0, 255).astype(np.uint8)
    return image


class TensorBoardWriter:
    """Writes TensorBoard events into `logdir` (None: only logs scalars).

    Args:
      logdir: folder of the event file (local path, or ``gs://`` with google-cloud-storage
        installed); None writes no events.
      flush_secs: events are written to the file at least this often (and on `flush`/`close`).
    """

    def __init__(self, logdir: str | None, *, flush_secs: int = 30):
        self._writer = None
        self._log_scalars = logdir is None  # with an event file, scalars stay off the console
        if logdir is not None:
            if atomic_files.is_remote(logdir) and not str(logdir).startswith("gs://"):
                raise ValueError(f"workdir {logdir!r}: TensorBoard events can be written to "
                                 "local folders and gs:// only")
            if (str(logdir).startswith("gs://")
                    and importlib.util.find_spec("google.cloud.storage") is None):
                raise ImportError(f"workdir {logdir!r}: writing TensorBoard events to gs:// "
                                  "needs google-cloud-storage (pip install google-cloud-storage)")
            self._writer = SummaryWriter(str(logdir), flush_secs=flush_secs)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One scalar per tag at `step`; float() of each value (0-d arrays included)."""
        values = {k: float(v) for k, v in scalars.items()}
        if self._log_scalars:
            logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Images per tag: [H, W, C] or [N, H, W, C], uint8 or float in [0, 1]; N > 1 images
        are written as tags ``tag/0``, ``tag/1``, ... (as clu does)."""
        if self._writer is None:
            return
        for tag, value in images.items():
            batch = _as_images(tag, value)
            for i, image in enumerate(batch):
                name = tag if len(batch) == 1 else f"{tag}/{i}"
                self._writer.add_image(name, image, global_step=step, dataformats="HWC")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """One (markdown) text per tag at `step`."""
        if self._writer is not None:
            for tag, text in texts.items():
                self._writer.add_text(tag, str(text), global_step=step)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Hyperparameters for TensorBoard's HPARAMS tab, in this run (no sub-run folder):
        numbers and bools as they are, anything else as its string."""
        if self._writer is None:
            return
        values = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                  for k, v in hparams.items()}
        file_writer = self._writer._get_file_writer()
        for summary in hparams_summary(values, {}):
            file_writer.add_summary(summary)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def create_writer(workdir: str, *, just_logging: bool = False) -> TensorBoardWriter:
    """The training loop's writer: events in `workdir`, or only logged scalars when
    `just_logging` (non-chief processes), like `clu.metric_writers.create_default_writer`."""
    return TensorBoardWriter(None if just_logging else workdir)


class ReportProgress:
    """Every `every_steps` steps: writes ``steps_per_sec`` and keeps it in `steps_per_sec`
    (None until measured) for the loop's console line
    (`mosaic_jax.training.messages.progress_line`).

    The training-loop hook of `clu.periodic_actions.ReportProgress` (call it with the step after
    each step), which cannot be used without TensorFlow (it imports `clu.metric_writers`).
    """

    def __init__(self, *, num_train_steps: int, writer: TensorBoardWriter, every_steps: int):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.total, self.writer, self.every = num_train_steps, writer, every_steps
        self._last: tuple[int, float] | None = None
        self.steps_per_sec: float | None = None

    def __call__(self, step: int) -> None:
        now = time.time()
        if self._last is None:  # the first call only starts the clock (it includes compiles)
            self._last = (step, now)
            return
        if step % self.every:
            return
        last_step, last_time = self._last
        self._last = (step, now)
        if step <= last_step or now <= last_time:
            return
        rate = (step - last_step) / (now - last_time)
        self.steps_per_sec = rate
        self.writer.write_scalars(step, {"steps_per_sec": rate})
