"""Throughput of the full train step (augmentation, forward, losses, backward, optimizer).

Times `mosaic_jax.training.train.make_train_step` on synthetic inputs already on the device, for:

- `iai_120`: IaI-SimCLR (configs/iai_simclr.py: two ResNet-18 towers with the iai stem, S1 2 and
  S2 10 channels, three views per sample in one batched forward pass), batch 256, 120 px;
- `iai_256`: the same at 256 px;
- `mosaic1_r50_120`: MoSAiC-1 (configs/mosaic1.py) with two ResNet-50 towers, batch 256, 120 px.

Reports samples/s, TFLOP/s from XLA's cost analysis of the compiled step and, for the IaI
workloads, from the FLOPs per sample of a PyTorch IaI-SimCLR step (74.1 GFLOP at 120 px, 326
GFLOP at 256 px, 3 passes of both encoders per sample like this one; benchmarks/RESULTS.md,
"Figures from outside this repository"), and the fraction of the bf16 matrix-multiply throughput
measured on the device kind where one is recorded (`MEASURED_BF16_MATMUL_FLOPS`).

`--anchor PATH` also runs the `run(bs, img, dtype, iters)` function of a plain Flax step to
compare against, the module at PATH (imported by path at run time), on the same batch, image and
dtype, for the ratio.
`--profile DIR` traces a few more steps of each workload and reports its top ops by device time
(`benchmarks/trace_summary.py`), so that one GPU call also brings back where the time goes.

Usage: python -m benchmarks.train_step [--quick] [--workloads ...] [--dtype bfloat16|float32]
       [--batch B] [--image PX] [--steps N] [--anchor PATH] [--remat] [--compile-only]
       [--profile DIR [--profile-steps N]] [--output PATH]
Imports jax, flax, optax, numpy and the project's core modules only
(mosaic_jax.training.train imports ml_collections for its config type).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    describe_machine,
    format_table,
    machine_info,
    write_json,
)
from data_builders import cli

# name -> (config module, encoder override, image px, batch)
WORKLOADS: dict[str, tuple[str, str | None, int, int]] = {
    "iai_120": ("iai_simclr", None, 120, 256),
    "iai_256": ("iai_simclr", None, 256, 256),
    "mosaic1_r50_120": ("mosaic1", "resnet50", 120, 256),
}
# GFLOP per sample of a PyTorch IaI-SimCLR training step (3 forward passes of both ResNet-18
# encoders, 3 NT-Xent, Adam), counted on one H100 80GB with PyTorch 2.11 (benchmarks/RESULTS.md,
# "Figures from outside this repository").
PYTORCH_IAI_GFLOP_PER_SAMPLE = {("iai_simclr", 120): 74.1, ("iai_simclr", 256): 326.0}
# bf16 matrix-multiply throughput (FLOP/s) measured on a device kind (substring of jax's
# device_kind): about 798 TFLOP/s on one H100 80GB, measured with PyTorch 2.11 next to the step
# above (same RESULTS.md section). Device kinds without a measurement report n/a.
MEASURED_BF16_MATMUL_FLOPS: tuple[tuple[str, float], ...] = (("H100", 798e12),)
NUM_CLASSES = 19


def measured_bf16_matmul_flops(device_kind: str) -> float | None:
    """The measured bf16 matmul FLOP/s of a device kind (case-insensitive substring match),
    None when none is recorded (CPUs and unmeasured accelerators)."""
    for key, flops in MEASURED_BF16_MATMUL_FLOPS:
        if key.lower() in device_kind.lower():
            return flops
    return None


def step_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled executable, from XLA's cost analysis (None if absent)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    flops = float(cost["flops"])
    return flops if flops > 0 else None


def build_config(name: str, args: argparse.Namespace):
    """The workload's config from configs/, with the benchmark's sizes and dtype."""
    from mosaic_jax.training import configuration

    module, encoder, image, batch = WORKLOADS[name]
    c = importlib.import_module(f"configs.{module}").get_config()
    if encoder:
        c.model.s1_encoder = c.model.s2_encoder = encoder
    c.augment.out_size = args.image or image
    c.batch_size = args.batch or batch
    c.model.dtype = args.dtype
    c.model.remat = args.remat
    if args.quick:
        c.model.width_multiplier = 0.125
        c.model.proj_hidden_dim = 64
        c.model.proj_dim = 32
    configuration.validate_config(c)
    return c


def synthetic_batch(config, seed: int = 0) -> dict[str, Any]:
    """Host arrays of one global batch: normalised-looking S1/S2, multi-hot labels, all labelled."""
    import numpy as np

    from mosaic_jax import models
    from mosaic_jax.training import configuration

    (h, w, c1), (_, _, c2) = models.input_shapes(config)
    b = config.batch_size
    rng = np.random.default_rng(seed)
    return {
        "s1": rng.standard_normal((b, h, w, c1), dtype=np.float32),
        "s2": rng.standard_normal((b, h, w, c2), dtype=np.float32),
        "labels": (rng.random((b, configuration.num_classes(config))) < 0.15).astype(np.float32),
        "label_mask": np.ones((b,), bool),
    }


def bench_workload(name: str, args: argparse.Namespace, peak: float | None) -> dict[str, Any]:
    """Compiles and times one workload's train step."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mosaic_jax import models
    from mosaic_jax.training import train

    config = build_config(name, args)
    module = WORKLOADS[name][0]
    image, batch = config.augment.out_size, config.batch_size
    record: dict[str, Any] = {
        "workload": name, "config": f"configs/{module}.py", "objective": config.objective,
        "encoders": [config.model.s1_encoder, config.model.s2_encoder],
        "width_multiplier": config.model.width_multiplier, "image": image, "batch": batch,
        "dtype": config.model.dtype, "block_size": config.loss.block_size,
        "remat": config.model.remat, "inter_view": config.loss.inter_view,
    }
    mesh = train.make_mesh()
    model = models.create_model(config)
    tx = train.create_optimizer(config)
    # One jitted program: compiles faster on CPU than initialising op by op; same values.
    state = jax.jit(lambda: train.init_state(config, model, tx))()
    state = jax.device_put(state, NamedSharding(mesh, P()))
    batch_arrays = train.global_batch(synthetic_batch(config), mesh, train.TRAIN_KEYS)
    step = train.make_train_step(config, model, tx, mesh)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arrays).compile()
    record["compile_s"] = time.perf_counter() - t0
    flops = step_flops(compiled)
    record["flops_per_step_xla"] = flops
    record["gflop_per_sample_xla"] = flops / batch / 1e9 if flops else None
    ref = PYTORCH_IAI_GFLOP_PER_SAMPLE.get((module, image)) if not args.quick else None
    record["reference_gflop_per_sample"] = ref
    if args.compile_only:
        return record

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch_arrays)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    loss = float(metrics["loss"])
    record.update({
        "steps": args.steps, "warmup": args.warmup, "step_times_s": times,
        "step_ms": med * 1e3, "samples_per_s": batch / med, "loss": loss,
        "loss_finite": bool(np.isfinite(loss)),
        "tflops_xla": flops / med / 1e12 if flops else None,
        "tflops_reference_figure": ref * 1e9 * batch / med / 1e12 if ref else None,
        "bf16_peak_tflops": peak / 1e12 if peak else None,
    })
    # JSON keys keep their first names ("peak"): the value is the measured matmul throughput.
    record["fraction_of_bf16_peak_xla"] = (record["tflops_xla"] * 1e12 / peak
                                           if peak and flops else None)
    record["fraction_of_bf16_peak_reference"] = (record["tflops_reference_figure"] * 1e12 / peak
                                                 if peak and ref else None)
    try:
        stats = jax.devices()[0].memory_stats() or {}
        record["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - CPU devices may not report
        record["device_peak_bytes_in_use"] = None
    if args.profile:
        from benchmarks import trace_summary

        log_dir = os.path.join(args.profile, name)
        holder = [state]

        def one_step():
            holder[0], m = compiled(holder[0], batch_arrays)
            jax.block_until_ready(m)

        trace_summary.profile(one_step, args.profile_steps, log_dir)
        record["profile"] = {"trace_dir": log_dir, "steps": args.profile_steps,
                             **trace_summary.summarise(log_dir, args.profile_steps)}
    return record


def run_anchor(path: str, record: dict[str, Any], steps: int) -> dict[str, Any]:
    """Runs the comparison step's `run(bs, img, dtype, iters)` on the workload's sizes."""
    import jax.numpy as jnp

    if record["image"] not in (120, 256):
        return {"error": "the anchor knows FLOPs for 120 and 256 px only; not run"}
    spec = importlib.util.spec_from_file_location("plain_flax_anchor", path)
    if spec is None or spec.loader is None:
        return {"error": f"cannot import {path}"}
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[record["dtype"]]
    result = dict(module.run(record["batch"], record["image"], dtype, iters=steps))
    if "samples_per_s" in record and result.get("samples_per_s"):
        result["ratio_samples_per_s"] = record["samples_per_s"] / result["samples_per_s"]
    return result


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(records: list[dict[str, Any]]) -> str:
    headers = ["workload", "encoders", "px", "batch", "dtype", "step ms", "samples/s",
               "GFLOP/sample (XLA)", "TFLOP/s (XLA)", "TFLOP/s (PyTorch FLOPs)",
               "% bf16 matmul (XLA)", "compile s", "anchor samples/s", "ours / anchor"]
    rows = []
    for r in records:
        if "error" in r:
            rows.append([r["workload"], "-", "-", "-", "-", "ERROR", r["error"][:60]]
                        + ["-"] * (len(headers) - 7))
            continue
        frac = r.get("fraction_of_bf16_peak_xla")
        anchor = r.get("anchor") or {}
        rows.append([
            r["workload"], "+".join(r["encoders"])
            + (f" x{r['width_multiplier']:g}" if r["width_multiplier"] != 1 else "")
            + (" remat" if r.get("remat") else ""),
            r["image"], r["batch"], r["dtype"], _f(r.get("step_ms"), ".1f"),
            _f(r.get("samples_per_s"), ",.1f"), _f(r.get("gflop_per_sample_xla"), ".2f"),
            _f(r.get("tflops_xla"), ".3f"), _f(r.get("tflops_reference_figure"), ".3f"),
            "n/a" if frac is None else f"{100 * frac:.1f}%", _f(r.get("compile_s"), ".1f"),
            _f(anchor.get("samples_per_s"), ",.1f") if anchor else "-",
            _f(anchor.get("ratio_samples_per_s"), ".2f") if anchor else "-",
        ])
    return format_table(headers, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.new_parser("python -m benchmarks.train_step", __doc__)
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None,
                   help="default: all three (with --quick: iai_120 only)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="global batch (overrides workloads)")
    p.add_argument("--image", type=int, default=None, help="image px (overrides workloads)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (20; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps after compilation (3; --quick: 1)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace a few steps of each workload into DIR/<workload> and report "
                   "the top ops by device time (benchmarks/trace_summary.py)")
    p.add_argument("--profile-steps", type=int, default=3, help="steps traced with --profile")
    p.add_argument("--remat", action="store_true",
                   help="config model.remat=True: recompute encoder blocks in the backward pass")
    p.add_argument("--compile-only", action="store_true",
                   help="compile and report XLA FLOPs without running")
    p.add_argument("--anchor", default=None,
                   help="path of a plain Flax step to compare against, whose run() to time as well")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run for CI: iai_120 only unless --workloads says otherwise, "
                   "width x0.125, 32 px, batch 16, 2 steps")
    p.add_argument("--output", default=str(RESULTS_DIR / "train_step.json"))
    args = p.parse_args(argv)
    if args.workloads is None:
        args.workloads = ["iai_120"] if args.quick else list(WORKLOADS)
    if args.quick:
        args.image = args.image or 32
        args.batch = args.batch or 16
    if args.steps is None:
        args.steps = 2 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    if args.dtype is None:
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    machine = machine_info()
    peak = measured_bf16_matmul_flops(machine["device_kind"])
    print(f"machine: {describe_machine(machine)}", flush=True)
    print(f"measured bf16 matmul throughput of {machine['device_kind']}: "
          f"{'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}", flush=True)
    records: list[dict[str, Any]] = []

    def save(finished: bool) -> Path:
        # After every workload, so that a run cut short by a time limit keeps what it measured.
        return write_json(args.output, {
            "benchmark": "train_step", "quick": args.quick,
            "settings": {k: v for k, v in vars(args).items() if k != "output"},
            "machine": machine, "bf16_peak_tflops": peak / 1e12 if peak else None,
            "results": records,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z") if finished else None})

    for name in args.workloads:
        print(f"  running {name} ...", flush=True)
        try:
            record = bench_workload(name, args, peak)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: report and go on
            traceback.print_exc()
            record = {"workload": name, "error": f"{type(e).__name__}: {e}"[:2000]}
        if args.anchor and "error" not in record and not args.compile_only:
            if WORKLOADS[name][0] != "iai_simclr":
                record["anchor"] = {"error": "the anchor is an IaI-SimCLR step; not run"}
            else:
                print(f"  running the anchor for {name} ...", flush=True)
                try:
                    record["anchor"] = run_anchor(args.anchor, record, args.steps)
                except Exception as e:  # noqa: BLE001
                    record["anchor"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        records.append(record)
        print(report(records[-1:]), flush=True)
        save(finished=False)
    print(report(records), flush=True)
    for r in records:
        if r.get("profile"):
            prof = r["profile"]
            print(f"\n{r['workload']}: top ops, {prof['source']}, "
                  f"{prof['busy_ms_per_step']:.1f} ms busy per step")
            print(format_table(["op", "ms/step", "share"],
                               [[o["name"][:80], f"{o['ms_per_step']:.2f}",
                                 f"{100 * o['share']:.1f}%"] for o in prof["top_ops"]]))
    if any(r.get("reference_gflop_per_sample") for r in records):
        print("PyTorch FLOPs: GFLOP/sample of a PyTorch IaI-SimCLR step (3 passes of both "
              "encoders per sample, as here; benchmarks/RESULTS.md) x samples/s.")
    path = save(finished=True)
    print(f"wrote {path}")
    return 1 if any("error" in r or not r.get("loss_finite", True) for r in records) else 0


if __name__ == "__main__":  # the convention of data_builders.cli: one `error:` line
    sys.exit(cli.run(main))
