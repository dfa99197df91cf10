"""Multi-process (multi-host) start-up and preemption handling.

JAX's multi-controller runtime runs one process per host (TPU VM worker) or per GPU/node
(SLURM); `jax.distributed.initialize` connects them, after which `jax.devices()` lists the
devices of every process and one global mesh spans them all.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
    """Connects this process to the others; returns True when the run is multi-process.

    Explicit `coordinator_address` (host:port), `num_processes` and `process_id` are used as
    given (any cluster, or several processes on one machine). Otherwise, with `auto` or inside
    a SLURM job of several tasks, JAX detects the cluster itself (TPU pod metadata, SLURM
    variables). A single process does nothing.
    """
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
        return True
    if auto or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False


class PreemptionWatcher:
    """Turns SIGTERM into a request to save a checkpoint and stop at the next step boundary.

    `should_stop()` is collective: every process learns that some process was signalled, so all
    of them stop after the same step (a checkpoint is written by all processes together).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._flag = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._flag.set()

    def should_stop(self) -> bool:
        local = self._flag.is_set()
        if jax.process_count() == 1:
            return local

        flags = multihost_utils.process_allgather(np.array([local]))
        return bool(np.any(flags))

    def close(self) -> None:
        """Restores the previous signal handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
