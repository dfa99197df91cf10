"""Where a profiled step spends its device time: the top ops of a `jax.profiler` trace.

`profile(fn, steps, log_dir)` traces `steps` calls of `fn` with
``jax.profiler.trace(..., create_perfetto_trace=True)``; `summarise(log_dir, steps)` reads the
Perfetto JSON it writes (standard library only) and sums the durations of the complete ("X")
events by name, per step. On a GPU it reads the device's "XLA Ops" line (one event per HLO op
or fusion; the module and stream lines cover the same time again, so they are left out); where
no device line exists (CPU) it reads the host's events, which include Python frames and
runtime calls, so the CPU summary is a smoke test rather than a profile.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
from collections.abc import Callable
from typing import Any


def profile(fn: Callable[[], Any], steps: int, log_dir: str) -> None:
    """Runs `fn` (one step, blocking until done) `steps` times under the profiler."""
    import jax

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            fn()


def _load_events(log_dir: str) -> list[dict[str, Any]]:
    paths = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True))
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarise(log_dir: str, steps: int, top: int = 15) -> dict[str, Any]:
    """Top ops by time of the newest trace under `log_dir`.

    Returns {"source": which events were read, "busy_ms_per_step": their summed time per step,
    "top_ops": [{"name", "ms_per_step", "share"} ...] (share of busy time, largest first)}.
    """
    events = _load_events(log_dir)
    processes: dict[Any, str] = {}
    threads: dict[tuple[Any, Any], str] = {}
    for e in events:
        if e.get("ph") != "M":
            continue
        if e.get("name") == "process_name":
            processes[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    device = {pid for pid, name in processes.items() if name.startswith("/device:")}
    op_lines = {key for key, name in threads.items() if key[0] in device and name == "XLA Ops"}
    if op_lines:
        source = "device XLA Ops"

        def keep(e):
            return (e["pid"], e.get("tid")) in op_lines
    elif device:
        source = "device (all lines but XLA Modules)"

        def keep(e):
            return e["pid"] in device and threads.get((e["pid"], e.get("tid"))) != "XLA Modules"
    else:
        source = "host (no device line: not a device profile)"

        def keep(e):
            return True

    totals: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and keep(e):
            totals[e.get("name", "?")] += float(e.get("dur", 0.0))  # microseconds
    busy = sum(totals.values())
    return {
        "source": source,
        "busy_ms_per_step": busy / 1e3 / steps,
        "top_ops": [{"name": name, "ms_per_step": us / 1e3 / steps,
                     "share": us / busy if busy else 0.0}
                    for name, us in totals.most_common(top)],
    }
