"""TPU pod readiness from a CPU host: `mosaic_jax.training.aot` over workloads and slices.

Runs `python -m mosaic_jax aot` (one subprocess, one compile at a time) for:

- weak scaling: each workload at a fixed per-chip batch on v5e 2x2, 4x4, 16x16 and v4 2x2x2,
  recording per-chip memory, FLOPs and collective bytes per step as the chip count grows;
- the largest per-chip batch that fits on v5e:2x2 (doubling from the fixed batch, then
  bisection to `--resolution` samples per chip), and whether the first batch that does not fit
  does with `model.remat=True` and `loss.block_size`.

Workloads (bf16, two towers, BigEarthNet v2 band sets): `mosaic1_r50_120` (configs/mosaic1.py
with ResNet-50 towers, 120 px; `mosaic1_xattn_r50_120` the same with cross-attention fusion,
`configs/mosaic1.py:xattn`), `iai_120` and `iai_256` (configs/iai_simclr.py, ResNet-18
towers, three views, 120 and 256 px). Only the train step is compiled (`--noeval_step`); it is
the larger program. The JSON (`--output`) is rewritten after every row, and rows already in it
with a result (fits or does not fit) are not compiled again, so a sweep that was stopped
resumes where it was; a row that timed out or failed is compiled again.

Usage: python -m benchmarks.aot_sweep [--part weak|fit|all] [--workloads ...]
       [--topologies ...] [--per_chip_batch 64] [--quick] [--output PATH] [--markdown]
       python -m benchmarks.aot_sweep --anchor FILE --topologies v5e:2x2 v5e:4x4
(`--anchor`: our iai step against a plain Flax step, see benchmarks/anchor_aot.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS_DIR, format_table, machine_info, write_json
from data_builders import cli

# The purposes mosaic_jax.training.aot gives collectives (not imported: this script needs no jax).
LOSS_GATHER = "loss: all-gathered embeddings/labels"
GRADIENTS = "gradient all-reduce"
BATCHNORM = "BatchNorm statistics"

# name -> (config file, config overrides)
WORKLOADS: dict[str, tuple[str, dict[str, Any]]] = {
    "mosaic1_r50_120": ("configs/mosaic1.py", {"model.s1_encoder": "resnet50",
                                               "model.s2_encoder": "resnet50",
                                               "augment.out_size": 120}),
    "mosaic1_xattn_r50_120": ("configs/mosaic1.py:xattn", {"model.s1_encoder": "resnet50",
                                                           "model.s2_encoder": "resnet50",
                                                           "augment.out_size": 120}),
    "iai_120": ("configs/iai_simclr.py", {"augment.out_size": 120}),
    "iai_256": ("configs/iai_simclr.py", {"augment.out_size": 256}),
}
TOPOLOGIES = ("v5e:2x2", "v5e:16x16", "v4:2x2x2", "v5e:4x4")
FIT_TOPOLOGY = "v5e:2x2"
# Tiny sizes for --quick (the test): 16 px, width 1/32.
QUICK = {"augment.out_size": 16, "model.width_multiplier": 1 / 32, "model.proj_hidden_dim": 16,
         "model.proj_dim": 8, "model.s1_encoder": "resnet18", "model.s2_encoder": "resnet18"}


def aot_command(workload: str, topology: str, per_chip_batch: int, chips: int, *,
                remat: bool = False, block_size: int = 0, quick: bool = False,
                output: str) -> list[str]:
    """argv of one `mosaic_jax.training.aot` run (bf16, global batch = per-chip batch x chips)."""
    config, overrides = WORKLOADS[workload]
    overrides = {**overrides, **(QUICK if quick else {}), "model.dtype": "bfloat16",
                 "batch_size": per_chip_batch * chips, "eval_batch_size": per_chip_batch * chips,
                 "model.remat": remat, "loss.block_size": block_size}
    return [sys.executable, "-m", "mosaic_jax", "aot", f"--config={config}",
            f"--topology={topology}", "--noeval_step", f"--output={output}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def chips_of(topology: str) -> int:
    """Chips of a slice name: `v5e:4x4` -> 16, `v4:2x2x2` -> 8."""
    count = 1
    for d in topology.split(":")[1].split("x"):
        count *= int(d)
    return count


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The row kept in the sweep's JSON: sizes, memory, FLOPs, collective bytes by purpose."""
    step = report["train_step"]
    by_purpose: dict[str, int] = {}
    for c in step["collectives"]:
        by_purpose[c["purpose"]] = by_purpose.get(c["purpose"], 0) + c["bytes"]
    return {"chips": report["chips"], "device_kind": report["device_kind"],
            "global_batch": report["global_batch"], "per_chip_batch": report["per_chip_batch"],
            "compile_s": step["compile_s"], "memory_bytes": step["memory_bytes"],
            "hbm_bytes_per_chip": report["hbm_bytes_per_chip"],
            "flops_per_chip": step["flops_per_chip"], "collective_bytes": by_purpose,
            "collectives": step["collectives"], "fits": step["fits"],
            **({"compile_error": step["compile_error"]} if step.get("compile_error") else {})}


def largest_fitting(fits_at: Callable[[int], bool | None], start: int, resolution: int,
                    limit: int) -> tuple[int | None, int | None]:
    """(largest per-chip batch that fits, smallest that does not) by doubling from `start`,
    then bisection to a multiple of `resolution`; None where none was found below `limit`."""
    good, bad = None, None
    b = start
    while b <= limit:
        if fits_at(b):
            good, b = b, b * 2
        else:
            bad = b
            break
    if good is None and bad is not None:  # even `start` does not fit: bisect below it
        lo, hi = 0, bad
    elif bad is None:
        return good, None
    else:
        lo, hi = good, bad
    while hi - lo > resolution:
        mid = (lo + hi) // 2 // resolution * resolution
        if mid <= lo:
            break
        if fits_at(mid):
            lo = mid
        else:
            hi = mid
    return (lo or None), hi


class Sweep:
    """Runs rows (one compile each), keeps them in `self.rows` and rewrites the JSON."""

    def __init__(self, output: Path, quick: bool, timeout: float):
        self.output, self.quick, self.timeout = output, quick, timeout
        self.payload: dict[str, Any] = {"machine": machine_info(with_jax=False), "rows": []}
        if output.exists():
            self.payload["rows"] = json.loads(output.read_text()).get("rows", [])

    def row(self, workload: str, topology: str, per_chip_batch: int, *, remat: bool = False,
            block_size: int = 0, part: str) -> dict[str, Any]:
        key = {"workload": workload, "topology": topology, "per_chip_batch": per_chip_batch,
               "remat": remat, "loss_block_size": block_size}
        for r in list(self.payload["rows"]):
            if all(r.get(k) == v for k, v in key.items()):
                if r.get("status") in ("fits", "does not fit"):
                    return r
                self.payload["rows"].remove(r)  # a timeout or error is compiled again
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "report.json")
            argv = aot_command(workload, topology, per_chip_batch, chips_of(topology),
                               remat=remat, block_size=block_size, quick=self.quick,
                               output=out)
            t0 = time.time()
            try:
                proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                                      timeout=self.timeout)
                # 3: mosaic_jax.training.aot.DOES_NOT_FIT_STATUS (not imported: no jax here)
                status = {0: "fits", 3: "does not fit"}.get(proc.returncode, "error")
                tail = proc.stderr.strip().splitlines()[-1:] if status == "error" else []
            except subprocess.TimeoutExpired:
                status, tail = "timeout", [f"no result within {self.timeout:.0f} s"]
            record = {**key, "part": part, "status": status, "wall_s": round(time.time() - t0)}
            if status in ("fits", "does not fit") and not os.path.exists(out):
                status = "error"  # it crashed before writing its report
                tail = proc.stderr.strip().splitlines()[-1:]
                record["status"] = status
            if status in ("fits", "does not fit"):
                record.update(summarise(json.loads(Path(out).read_text())))
            else:
                record["error"] = tail[0] if tail else "unknown"
        self.payload["rows"].append(record)
        write_json(self.output, self.payload)
        mem = (record.get("memory_bytes") or {}).get("total")
        print(f"{workload} {topology} per-chip {per_chip_batch} remat={remat} "
              f"block={block_size}: {status}"
              + (f", {mem / 1024**3:.2f} GiB per chip" if mem else "")
              + f" ({record['wall_s']} s)", flush=True)
        return record


def markdown(payload: dict[str, Any]) -> str:
    """The sweep's rows as the Markdown table of benchmarks/RESULTS.md (GiB and MiB per chip)."""
    head = ("| workload | topology | chips | per-chip / global batch | remat, block | per-chip "
            "memory (args / temps / total) | of HBM | TFLOP/chip | loss all-gather | gradient "
            "all-reduce | BN stats | other | compile s | status |")
    lines = [head, "|" + "---|" * 14]
    mib = lambda n: f"{n / 1024**2:.2f} MiB"  # noqa: E731
    for r in payload["rows"]:
        if not r.get("memory_bytes"):
            why = r.get("error") or r.get("compile_error", "")
            lines.append(f"| {r['workload']} | {r['topology']} | {r.get('chips', '')} | "
                         f"{r['per_chip_batch']} / {r.get('global_batch', '')} | "
                         f"{r['remat']}, {r['loss_block_size']} | | | | | | | | | "
                         f"{r['status']}: {why} |")
            continue
        m, c = r["memory_bytes"], r["collective_bytes"]
        lines.append(
            f"| {r['workload']} | {r['topology']} | {r['chips']} | {r['per_chip_batch']} / "
            f"{r['global_batch']} | {r['remat']}, {r['loss_block_size']} | "
            f"{m['arguments'] / 1024**3:.2f} / {m['temporaries'] / 1024**3:.2f} / "
            f"{m['total'] / 1024**3:.2f} GiB | {m['total'] / r['hbm_bytes_per_chip']:.0%} | "
            f"{(r['flops_per_chip'] or 0) / 1e12:.2f} | {mib(c.get(LOSS_GATHER, 0))} | "
            f"{mib(c.get(GRADIENTS, 0))} | {mib(c.get(BATCHNORM, 0))} | "
            f"{mib(sum(v for k, v in c.items() if k not in (LOSS_GATHER, GRADIENTS, BATCHNORM)))}"
            f" | {r['compile_s']:.0f} | "
            f"{r['status']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.new_parser("python -m benchmarks.aot_sweep", __doc__)
    p.add_argument("--part", choices=("weak", "fit", "all"), default="all")
    p.add_argument("--workloads", nargs="+", choices=tuple(WORKLOADS), default=tuple(WORKLOADS))
    p.add_argument("--topologies", nargs="+", default=TOPOLOGIES)
    p.add_argument("--per_chip_batch", type=int, default=64,
                   help="per-chip batch of the weak-scaling rows")
    p.add_argument("--resolution", type=int, default=32,
                   help="per-chip batch resolution of the largest-fit search")
    p.add_argument("--limit", type=int, default=2048, help="largest per-chip batch tried")
    p.add_argument("--block_size", type=int, default=1024,
                   help="loss.block_size tried where a batch does not fit")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per compile")
    p.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--markdown", action="store_true",
                   help="print the rows already in --output as RESULTS.md's table; compile nothing")
    p.add_argument("--anchor", type=Path, default=None,
                   help="a plain Flax IaI step's file: compile it and our iai step side by side "
                   "(benchmarks/anchor_aot.py) at 120 and 256 px on --topologies instead")
    args = p.parse_args(argv)
    if args.anchor is not None:
        from benchmarks import anchor_aot

        anchor_aot.sweep(args.anchor, list(args.topologies), [120, 256], args.per_chip_batch)
        return 0
    if args.per_chip_batch < 1 or args.resolution < 1:
        p.error("--per_chip_batch and --resolution must be positive")
    output = args.output or RESULTS_DIR / ("aot_sweep_quick.json" if args.quick
                                           else "aot_sweep.json")
    if args.markdown:
        print(markdown(json.loads(output.read_text())))
        return 0
    sweep = Sweep(output, args.quick, args.timeout)
    if args.part in ("weak", "all"):
        for topology in args.topologies:
            for w in args.workloads:
                sweep.row(w, topology, args.per_chip_batch, part="weak")
    if args.part in ("fit", "all"):
        for w in args.workloads:
            def fits_at(b: int, w: str = w) -> bool:
                return sweep.row(w, FIT_TOPOLOGY, b, part="fit")["status"] == "fits"

            good, bad = largest_fitting(fits_at, args.per_chip_batch, args.resolution,
                                        args.limit)
            if bad is not None:  # does the first batch that does not fit, fit with help?
                sweep.row(w, FIT_TOPOLOGY, bad, remat=True, part="fit")
                sweep.row(w, FIT_TOPOLOGY, bad, remat=True, block_size=args.block_size,
                          part="fit")
            sweep.payload.setdefault("largest_fit", {})[w] = {
                "topology": FIT_TOPOLOGY, "per_chip_batch": good, "first_not_fitting": bad}
            write_json(output, sweep.payload)
    rows = [[r["workload"], r["topology"], r["per_chip_batch"], r.get("global_batch", ""),
             r["remat"], r["loss_block_size"], r["status"],
             f"{r['memory_bytes']['total'] / 1024**3:.2f}" if r.get("memory_bytes") else "",
             f"{(r.get('flops_per_chip') or 0) / 1e12:.2f}" if r.get("memory_bytes") else "",
             r.get("compile_s", "")] for r in sweep.payload["rows"]]
    print(format_table(["workload", "topology", "per chip", "global", "remat", "block",
                        "status", "GiB/chip", "TFLOP/chip", "compile s"], rows))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":  # the convention of data_builders.cli: one `error:` line
    sys.exit(cli.run(main))
