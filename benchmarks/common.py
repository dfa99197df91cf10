"""Shared helpers of the loss and train-step benchmarks: machine description, JSON output,
peak process memory. Imports only the standard library (jax when asked for, and the standard
library-only data_builders.atomic_files and mosaic_jax.evaluation.tables when their helpers are
called)."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

GIB = 1024**3


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=10).stdout
        return out + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(with_jax: bool = True) -> dict[str, Any]:
    """Platform, CPU model, usable cores, memory, load, library versions and the JAX device."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
    }
    if with_jax:
        import jax

        devices = jax.devices()
        info.update({
            "jax_version": jax.__version__,
            "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind,
            "device_count": len(devices),
        })
        for name in ("flax", "optax", "numpy"):
            try:
                info[f"{name}_version"] = __import__(name).__version__
            except ImportError:
                info[f"{name}_version"] = None
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for the printed report."""
    mem = info.get("memory_gib")
    parts = [f"{info['cpu_model']}, {info['usable_cores']} usable cores",
             f"{mem:.1f} GiB RAM" if mem else "RAM unknown", info["platform"]]
    if "jax_version" in info:
        parts.append(f"jax {info['jax_version']} ({info['backend']}: {info['device_count']} x "
                     f"{info['device_kind']})")
    load = info.get("load_average_1_5_15")
    if load:
        parts.append("load " + "/".join(f"{x:.1f}" for x in load))
    return ", ".join(parts)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Writes `payload` as indented JSON, creating the folder; atomic on POSIX."""
    from data_builders import atomic_files

    atomic_files.write_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")
    return Path(path)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown-style table with aligned columns (`mosaic_jax.evaluation.tables`, padded)."""
    from mosaic_jax.evaluation.tables import table_lines

    return "\n".join(table_lines(headers, rows, padded=True))
