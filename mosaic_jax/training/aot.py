"""Ahead-of-time check that a run fits a TPU slice, on a host without TPUs.

With `libtpu` installed, XLA compiles for a TPU topology described by name (`v5e:16x16`) on any
host. `compile_for_topology` builds the abstract train state and a global batch with the run's
real shardings (a `data` mesh over the topology's devices; no array is allocated), compiles the
train step and the eval step of `mosaic_jax.training.train` for it, and reports per chip: memory
(arguments, temporaries, outputs, from XLA's memory analysis) against the chip's HBM, FLOPs
(XLA's cost analysis), and the collectives of the optimised HLO with their bytes per step.

    python -m mosaic_jax aot --config=configs/mosaic1.py --topology=v5e:16x16 \
        [--config.batch_size=4096] [--output=aot.json]

prints a table, writes the report as JSON with --output, and exits with status 3
(`DOES_NOT_FIT_STATUS`) when a step does not fit the chip's HBM; 1 on any other failure (e.g.
`libtpu` missing), 2 on a wrong command line, topology or config key (README,
Troubleshooting).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from data_builders import atomic_files, cli
from mosaic_jax import models
from mosaic_jax.evaluation.tables import table_lines
from mosaic_jax.training import configuration, train
from mosaic_jax.training.configuration import validate_config

GIB = 1024**3

# HBM per JAX device by `device_kind`, from Google Cloud's TPU documentation (the "System
# architecture" page of each generation: v2 16 GiB and v3 32 GiB per chip of two TensorCores,
# each core one JAX device; v4 32 GiB, v5e 16 GB, v5p 95 GB, v6e 32 GB per chip, one device per
# chip). The figures are read as GiB; the runtime keeps a little for itself, so a program within
# a few percent of the limit may still fail on the chip.
HBM_GIB_PER_DEVICE: dict[str, float] = {
    "TPU v2": 8.0,
    "TPU v3": 16.0,
    "TPU v4": 32.0,
    "TPU v5 lite": 16.0,
    "TPU v5": 95.0,
    "TPU v6 lite": 32.0,
}

TOPOLOGY_RE = re.compile(r"v\d+[a-z]*:\d+(x\d+){1,2}")
COLLECTIVE_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                    "collective-permute")
# Purposes of the collectives the train step issues (see classify_collective).
LOSS_GATHER = "loss: all-gathered embeddings/labels"
BATCHNORM = "BatchNorm statistics"
GRADIENTS = "gradient all-reduce"
OTHER = "other (metrics, loss cotangents, RNG)"

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
               "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}


class LibtpuMissingError(RuntimeError):
    """`libtpu` is not installed, so XLA cannot compile for TPUs here."""


def require_libtpu() -> None:
    """Raises LibtpuMissingError (one line saying how to install it) unless libtpu imports."""
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuMissingError(
            "libtpu is not installed, so XLA cannot compile for a TPU topology on this host; "
            f"install it with: pip install \"jax[tpu]=={jax.__version__}\"")


def check_topology_name(topology: str) -> None:
    """ValueError naming --topology unless it reads like `v5e:2x2` or `v4:2x2x2`."""
    if not TOPOLOGY_RE.fullmatch(topology):
        raise ValueError(f"--topology {topology!r}: expected GENERATION:AxB[xC], e.g. v5e:2x2, "
                         "v5e:16x16, v4:2x2x2, v5p:4x4x4")


def compile_only_environment() -> None:
    """Environment for compiling only, set before libtpu loads (variables already set win).

    No other process's claim on the TPUs matters (libtpu's single-process lock is skipped), and
    without a TPU VM's metadata libtpu would warn about the accelerator type and worker
    hostnames it cannot find.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU slice (`v5e:16x16`: 256 chips); needs libtpu."""
    check_topology_name(topology)
    require_libtpu()

    compile_only_environment()
    try:
        return list(topologies.get_topology_desc(platform="tpu",
                                                 topology_name=topology).devices)
    except Exception as e:  # noqa: BLE001 - libtpu's errors are plain runtime errors
        raise ValueError(f"--topology {topology!r}: libtpu does not know this topology "
                         f"({str(e).splitlines()[0]})") from None


def hbm_bytes(device_kind: str) -> int | None:
    """HBM of one device of that kind in bytes, None for kinds not in HBM_GIB_PER_DEVICE."""
    gib = HBM_GIB_PER_DEVICE.get(device_kind)
    return None if gib is None else int(gib * GIB)


# ----------------------------------------------------------------------------------------------
# Abstract inputs


def abstract_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Any:
    """The TrainState as ShapeDtypeStructs replicated over `mesh` (nothing is allocated)."""
    model, tx = models.create_model(config), train.create_optimizer(config)
    shapes = jax.eval_shape(lambda: train.init_state(config, model, tx))
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        shapes)


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   batch_size: int, keys: Sequence[str]) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch of `keys` (float32 s1/s2 [B, H, W, c] at `augment.out_size`, labels
    [B, C], label_mask [B]) sharded over the `data` axis, as the input pipeline feeds it."""
    (h, w, c1), (_, _, c2) = models.input_shapes(config)
    shapes = {"s1": ((batch_size, h, w, c1), jnp.float32),
              "s2": ((batch_size, h, w, c2), jnp.float32),
              "labels": ((batch_size, configuration.num_classes(config)), jnp.float32),
              "label_mask": ((batch_size,), jnp.bool_)}
    sharding = NamedSharding(mesh, P(models.DATA_AXIS))
    return {k: jax.ShapeDtypeStruct(*shapes[k], sharding=sharding) for k in keys}


# ----------------------------------------------------------------------------------------------
# Reading the compiled program (pure)


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, tuple shapes summed: `(f32[2,3]{1,0}, bf16[4])` -> 32."""
    total = 0.0
    for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", shape):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _largest_shape_bytes(shape: str) -> int:
    sizes = [shape_bytes(f"{d}[{s}]") for d, s in
             re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", shape)]
    return max(sizes, default=0)


def _group_size(line: str) -> int:
    """Devices per replica group: `replica_groups={{0,1},{2,3}}` -> 2, `=[4,64]<=[256]` -> 64."""
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len([d for d in m.group(1).split(",") if d])
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    return int(m.group(2)) if m else 1


def classify_collective(kind: str, op_name: str) -> str:
    """The purpose of a collective of the train step, from its kind and `op_name` metadata.

    The losses all-gather embeddings and labels (their backward is a reduce-scatter); BatchNorm
    with `sync_bn` all-reduces its batch statistics (module names `bn`, `bn1`, `downsample_bn`,
    ...); the shard_map transpose all-reduces the replicated parameters' gradients. XLA merges
    small all-reduces into one named after its first operand, so each row may carry a few
    neighbours (BatchNorm's backward sums travel with the gradients and vice versa).
    """
    if kind in ("all-gather", "reduce-scatter") or "all_gather" in op_name:
        return LOSS_GATHER
    if kind == "all-reduce":
        if re.search(r"/(\w+_)?bn\d*/", op_name):
            return BATCHNORM
        if "transpose(" in op_name:
            return GRADIENTS
    return OTHER


def parse_collectives(hlo_text: str) -> list[dict[str, Any]]:
    """Collectives of an optimised HLO module, grouped by (kind, purpose).

    Returns rows {kind, purpose, count, bytes} sorted by bytes, where `bytes` is per device and
    step: an all-gather's output, an all-reduce's operands, a reduce-scatter's input (output x
    group size), an all-to-all's or collective-permute's output. Async pairs count once (at
    `-start`); collectives in a while loop with a known trip count count once per iteration.
    """
    trip_counts: dict[str, int] = {}
    for m in re.finditer(r"while\(.*?body=%?([\w.\-]+).*?\"known_trip_count\":\{\"n\":\"(\d+)\"",
                         hlo_text):
        trip_counts[m.group(1)] = int(m.group(2))
    kinds = "|".join(COLLECTIVE_KINDS)
    instr = re.compile(rf"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+"
                       rf"(?P<kind>{kinds})(?P<start>-start)?\(")
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    computation = ""
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            computation = head.group(1)
            continue
        m = instr.match(line)
        if not m:
            continue
        kind, shape = m.group("kind"), m.group("shape")
        if m.group("start") and kind != "all-reduce":  # (operands, outputs[, contexts])
            size = _largest_shape_bytes(shape)
        else:
            size = shape_bytes(shape)
        if kind == "reduce-scatter":
            size *= _group_size(line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        purpose = classify_collective(kind, op_name.group(1) if op_name else "")
        times = trip_counts.get(computation, 1)
        row = rows.setdefault((kind, purpose), {"kind": kind, "purpose": purpose, "count": 0,
                                                "bytes": 0})
        row["count"] += times
        row["bytes"] += times * size
    return sorted(rows.values(), key=lambda r: -r["bytes"])


def memory_report(stats: Any) -> dict[str, int]:
    """Per-device bytes from `compiled.memory_analysis()`; `total` = arguments + outputs -
    aliased (donated) + temporaries + generated code: what the program needs resident."""
    fields = {"arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
              "aliased": "alias_size_in_bytes", "temporaries": "temp_size_in_bytes",
              "code": "generated_code_size_in_bytes"}
    out = {k: int(getattr(stats, attr, 0) or 0) for k, attr in fields.items()}
    out["total"] = (out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
                    + out["code"])
    return out


def fits(total_bytes: int, hbm: int | None) -> bool | None:
    """Whether a program needing `total_bytes` per device fits `hbm` bytes; None if unknown."""
    return None if hbm is None else total_bytes <= hbm


def flops_per_device(compiled: Any) -> float | None:
    """FLOPs of one call per device from XLA's cost analysis (None when not reported)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def _program_report(lowered: Any, hbm: int | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA's compile errors are plain runtime errors
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
            raise
        # XLA:TPU refuses a program whose buffers cannot fit the chip: it does not fit.
        return {"compile_s": round(time.perf_counter() - t0, 1), "memory_bytes": None,
                "flops_per_chip": None, "collectives": [], "fits": False,
                "compile_error": message.strip().splitlines()[0][:300]}
    seconds = time.perf_counter() - t0
    memory = memory_report(compiled.memory_analysis())
    return {"compile_s": round(seconds, 1), "memory_bytes": memory,
            "flops_per_chip": flops_per_device(compiled),
            "collectives": parse_collectives(compiled.as_text()),
            "fits": fits(memory["total"], hbm)}


def compile_for_topology(config: ml_collections.ConfigDict, topology: str, *,
                         eval_step: bool = True) -> dict[str, Any]:
    """Compiles `config`'s train (and eval) step for a TPU slice; returns the report dict.

    Raises LibtpuMissingError without libtpu, ValueError for a bad topology or config (an
    invalid key, a batch size the chips do not divide), naming the flag or config key.
    """
    devices = topology_devices(topology)
    chips = len(devices)
    validate_config(config, device_count=chips)
    kind = devices[0].device_kind
    hbm = hbm_bytes(kind)
    mesh = train.make_mesh(devices)
    model, tx = models.create_model(config), train.create_optimizer(config)
    state = abstract_state(config, mesh)
    report: dict[str, Any] = {
        "topology": topology, "device_kind": kind, "chips": chips,
        "hbm_bytes_per_chip": hbm, "objective": config.objective,
        "encoders": (config.model.s1_encoder, config.model.s2_encoder)
        if config.model.kind == "two_tower" else (config.model.encoder,),
        "image_px": config.augment.out_size, "dtype": config.model.dtype,
        "remat": bool(config.model.remat), "loss_block_size": int(config.loss.block_size),
        "global_batch": config.batch_size, "per_chip_batch": config.batch_size // chips,
        "jax": jax.__version__,
    }
    step = train.make_train_step(config, model, tx, mesh)
    batch = abstract_batch(config, mesh, config.batch_size, train.TRAIN_KEYS)
    report["train_step"] = _program_report(step.lower(state, batch), hbm)
    programs = [report["train_step"]]
    if eval_step:
        evaluate = train.make_eval_step(config, model, mesh)
        eval_batch = abstract_batch(config, mesh, config.eval_batch_size, ("s1", "s2"))
        report["eval_step"] = _program_report(evaluate.lower(state, eval_batch), hbm)
        report["eval_global_batch"] = config.eval_batch_size
        programs.append(report["eval_step"])
    verdicts = [p["fits"] for p in programs]
    report["fits"] = None if None in verdicts else all(verdicts)
    return report


# ----------------------------------------------------------------------------------------------
# Printing (the edge)


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def _size(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned text tables: one summary per program, then its collectives."""
    hbm = report["hbm_bytes_per_chip"]
    lines = [f"{report['objective']} ({'/'.join(report['encoders'])}, {report['image_px']} px, "
             f"{report['dtype']}, remat={report['remat']}, "
             f"loss.block_size={report['loss_block_size']}) on {report['topology']}: "
             f"{report['chips']} x {report['device_kind']}, HBM {_gib(hbm)} per chip "
             f"(Google Cloud TPU docs)", ""]
    header = ("program", "global batch", "per chip", "compile s", "arguments", "temporaries",
              "outputs", "total", "of HBM", "TFLOP/chip", "fits")
    rows = []
    for name in ("train_step", "eval_step"):
        if name not in report:
            continue
        p = report[name]
        mem = p["memory_bytes"] or dict.fromkeys(("arguments", "temporaries", "outputs", "total"))
        batch = report["global_batch"] if name == "train_step" else report["eval_global_batch"]
        flops = p["flops_per_chip"]
        share = "?" if hbm is None or mem["total"] is None else f"{mem['total'] / hbm:.0%}"
        rows.append((name, str(batch), str(batch // report["chips"]), f"{p['compile_s']:.0f}",
                     _gib(mem["arguments"]), _gib(mem["temporaries"]), _gib(mem["outputs"]),
                     _gib(mem["total"]), share,
                     "?" if flops is None else f"{flops / 1e12:.3f}",
                     {True: "yes", False: "NO", None: "unknown"}[p["fits"]]))
    lines += table_lines(header, rows, padded=True)
    for name in ("train_step", "eval_step"):
        if name in report and report[name]["collectives"]:
            lines += ["", f"collectives per chip and step ({name}, optimised HLO):"]
            lines += table_lines(("kind", "purpose", "count", "bytes"),
                                 [(c["kind"], c["purpose"], str(c["count"]), _size(c["bytes"]))
                                  for c in report[name]["collectives"]], padded=True)
    for name in ("train_step", "eval_step"):
        if name in report and report[name].get("compile_error"):
            lines += ["", f"{name}: XLA refused to compile it for lack of memory: "
                      f"{report[name]['compile_error']}"]
    return "\n".join(lines)


FLAGS = flags.FLAGS
_HOLDERS = [
    config_flags.DEFINE_config_file("config", None, "Training configuration file, FILE[:ARGS]; "
                                    "override a key with --config.KEY=VALUE.", lock_config=True),
    flags.DEFINE_string("topology", None, "TPU slice to compile for, e.g. v5e:2x2, v5e:16x16, "
                        "v4:2x2x2, v5p:4x4x4."),
    flags.DEFINE_string("output", None, "Also write the report as JSON to this path."),
    flags.DEFINE_bool("eval_step", True, "Also compile the eval step."),
    flags.DEFINE_bool("verbose", False, "Print the traceback of an error, not only its one line."),
]
flags.mark_flags_as_required(["config", "topology"])
DOES_NOT_FIT_STATUS = 3  # a step needs more HBM than the chip has (1 is any failure, 2 usage)


def _compile(argv: list[str]) -> int:
    del argv  # only the program name: cli.parse_absl refuses positional words
    if FLAGS.output:  # before minutes of compiling
        cli.check_output(FLAGS.output)
    compile_only_environment()
    if "JAX_PLATFORMS" not in os.environ:  # the host runs nothing: XLA:TPU only compiles
        jax.config.update("jax_platforms", "cpu")
    try:
        report = compile_for_topology(FLAGS.config, FLAGS.topology, eval_step=FLAGS.eval_step)
    except ValueError as e:  # a bad topology or config key: the command line (status 2)
        raise cli.UsageError(str(e)) from e
    except LibtpuMissingError as e:  # the host, not the command line: a failure (status 1)
        raise ValueError(str(e)) from e
    print(format_report(report), flush=True)
    if FLAGS.output:
        atomic_files.write_atomic(FLAGS.output, json.dumps(report, indent=1) + "\n")
    if report["fits"] is False:
        print(f"DOES NOT FIT: a step needs more than the {_gib(report['hbm_bytes_per_chip'])} "
              f"of HBM per chip of {report['topology']}", file=sys.stderr)
        return DOES_NOT_FIT_STATUS
    if report["fits"] is None:
        print(f"HBM of {report['device_kind']} unknown: cannot tell whether it fits",
              file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Compiles with the flags of `argv` (program name first; default `sys.argv`) under the
    convention of `data_builders.cli`; exits DOES_NOT_FIT_STATUS when a step does not fit."""
    argv = list(sys.argv if argv is None else argv)
    output = cli.flag_value(argv, "output")
    prog = "python -m mosaic_jax aot"
    cli.run(lambda: app.run(_compile, argv=argv, flags_parser=lambda a: cli.parse_absl(
        FLAGS, a, _HOLDERS, prog=prog, doc=__doc__)), argv, paths=[output] if output else [])


if __name__ == "__main__":
    main()
