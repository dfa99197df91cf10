"""Our train step against a plain Flax step, compiled side by side for a TPU slice on a CPU host.

The anchor is a plain Flax Linen IaI-SimCLR step in a Python file given with `--anchor` (never
shipped with the repository): its module must define `IaI(dtype)` (two ResNet-18 towers whose
call `(s1, s2, train)` returns the four projections inter_s1, inter_s2, intra_s1, intra_s2) and
`nt_xent(a, b)`. `anchor_step` rebuilds the step that file times: three ready views per modality
(no augmentation), one forward pass per view pair, the inter-modal NT-Xent on the first pair and
the two intra-modal ones on the other two, Adam 1e-4, bf16 compute, donated state. It is
compiled as plain `jax.jit` code with the global batch sharded over the slice's chips (GSPMD),
the state replicated. Our side is `mosaic_jax.training.train.make_train_step` for
`configs/iai_simclr.py` at the same global batch, image size and dtype, augmentation on the
device included.

For each side one compile records, per chip and step: FLOPs and bytes accessed (XLA's
`cost_analysis`), memory (arguments, temporaries; `memory_analysis`), collectives, the largest
instructions of the optimised HLO by bytes touched, and a roofline lower bound on the step time,
max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth), from the chip's published figures
(`PEAK`). The bound is an estimate: it ignores collectives, overlap and XLA's own cost model.

    python -m benchmarks.anchor_aot --anchor FILE --side anchor --topology v5e:2x2 \
        --image_px 120 [--per_chip_batch 64] [--set loss.inter_view=shared] [--output PATH]

`--side augment` compiles our on-device augmentation alone (no config key switches it off
inside the step), to attribute its share. Each call compiles one side and adds (or replaces)
its row in the JSON (default `benchmarks/results/aot_anchor.json`);
`python -m benchmarks.aot_sweep --anchor FILE` runs the rows of both sides one subprocess at a time.
`--markdown` prints the ratios table of the rows present.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.common import RESULTS_DIR, machine_info, write_json
from data_builders import cli

DEFAULT_OUTPUT = RESULTS_DIR / "aot_anchor.json"
# Published per-chip peaks by `device_kind`: (bf16 FLOP/s, HBM bytes/s). TPU v5e: Google Cloud's
# "TPU v5e" page (System architecture, key chip specifications): 197 TFLOPs bf16, HBM2
# 819 GBps.
PEAK: dict[str, tuple[float, float]] = {"TPU v5 lite": (197e12, 819e9)}
ANCHOR_CHANNELS = (2, 10)  # S1, S2 channels of the anchor's views, as its file feeds them


def load_anchor(path: str | os.PathLike) -> ModuleType:
    """The anchor file as a module; ValueError naming the file if it lacks IaI or nt_xent."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--anchor {path}: no such file")
    spec = importlib.util.spec_from_file_location("anchor_step_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [n for n in ("IaI", "nt_xent") if not hasattr(module, n)]
    if missing:
        raise ValueError(f"--anchor {path}: defines no {' or '.join(missing)}")
    return module


def anchor_step(module: ModuleType, dtype: Any):
    """(model, optimizer, step) of the anchor: step(state, views) -> (state, loss), where
    state = (params, batch_stats, adam state) and views = six [B, H, W, c] float32 arrays
    (three S1 views, then three S2 views)."""
    import jax
    import optax

    model, tx = module.IaI(dtype), optax.adam(1e-4)

    def step(state, xs):
        params, bstats, opt = state

        def loss_fn(p):
            stats, outs = bstats, []
            for s1, s2 in ((xs[0], xs[3]), (xs[1], xs[4]), (xs[2], xs[5])):
                o, upd = model.apply({"params": p, "batch_stats": stats}, s1, s2,
                                     mutable=["batch_stats"])
                stats = upd["batch_stats"]
                outs.append(o)
            loss = (module.nt_xent(outs[0][0], outs[0][1]) + module.nt_xent(outs[1][2], outs[2][2])
                    + module.nt_xent(outs[1][3], outs[2][3]))
            return loss, stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), new_stats, opt), loss

    return model, tx, step


def lower_anchor(module: ModuleType, devices: list, global_batch: int, image_px: int):
    """The anchor's step lowered for `devices`: batch sharded over them, state replicated."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    model, tx, step = anchor_step(module, jnp.bfloat16)
    mesh = Mesh(np.asarray(devices), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def init():
        k = jax.random.PRNGKey(0)
        v = model.init(k, jnp.zeros((2, 32, 32, ANCHOR_CHANNELS[0])),
                       jnp.zeros((2, 32, 32, ANCHOR_CHANNELS[1])))
        return v["params"], v["batch_stats"], tx.init(v["params"])

    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                         jax.eval_shape(init))
    views = tuple(jax.ShapeDtypeStruct((global_batch, image_px, image_px, c), jnp.float32,
                                       sharding=sharded)
                  for c in (ANCHOR_CHANNELS[0],) * 3 + (ANCHOR_CHANNELS[1],) * 3)
    jitted = jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=(0,))
    return jitted.lower(state, views)


def lower_ours(devices: list, global_batch: int, image_px: int, overrides: dict[str, str]):
    """Our train step for configs/iai_simclr.py (bf16, `overrides` applied) lowered for
    `devices`, exactly as `python -m mosaic_jax aot` compiles it."""
    from configs import iai_simclr
    from mosaic_jax import models
    from mosaic_jax.training import aot, train
    from mosaic_jax.training.configuration import validate_config

    config = iai_simclr.get_config()
    settings = {"augment.out_size": image_px, "model.dtype": "bfloat16",
                "batch_size": global_batch, "eval_batch_size": global_batch, **overrides}
    _apply(config, settings)
    validate_config(config, device_count=len(devices))
    mesh = train.make_mesh(devices)
    model, tx = models.create_model(config), train.create_optimizer(config)
    step = train.make_train_step(config, model, tx, mesh)
    state = aot.abstract_state(config, mesh)
    batch = aot.abstract_batch(config, mesh, global_batch, train.TRAIN_KEYS)
    return step.lower(state, batch)


def lower_augment(devices: list, global_batch: int, image_px: int,
                  overrides: dict[str, str]):
    """Our step's on-device augmentation alone (`augment.paired_views` on each chip's shard,
    keys and views as `train.make_train_step` makes them), lowered for `devices`: what the
    augmentation costs by itself, since no config key switches it off inside the step."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from configs import iai_simclr
    from mosaic_jax.data import augment
    from mosaic_jax.training import aot, train

    config = iai_simclr.get_config()
    _apply(config, {"augment.out_size": image_px, "batch_size": global_batch,
                    "model.dtype": "bfloat16", **overrides})  # as `lower_ours`
    mesh = train.make_mesh(devices)
    aug = train.augment_config(config)
    num_views = 3 if config.loss.inter_view == "third" else 2

    def per_device(rng, batch):
        n = batch["s1"].shape[0]
        first = jax.lax.axis_index(train.DATA_AXIS) * n
        keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, first + jnp.arange(n))
        return augment.paired_views(keys, batch["s1"], batch["s2"], aug, num_views,
                                    compute_dtype=train.view_dtype(config))

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(train.DATA_AXIS)),
                            out_specs=P(None, train.DATA_AXIS))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=jax.sharding.NamedSharding(mesh, P()))
    batch = aot.abstract_batch(config, mesh, global_batch, ("s1", "s2"))
    return jax.jit(sharded).lower(rng, batch)


def _apply(config: Any, settings: dict[str, Any]) -> None:
    """Sets dotted config keys; string values are parsed to the existing value's type."""
    for key, value in settings.items():
        parent = config
        *path, leaf = key.split(".")
        for name in path:
            parent = parent[name]
        old = parent[leaf]
        parent[leaf] = type(old)(_parse(value)) if isinstance(old, (bool, int, float)) \
            and isinstance(value, str) else value


def _parse(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    return float(value) if "." in value or "e" in low else int(value)


# ----------------------------------------------------------------------------------------------
# Reading the compiled program (pure)

# Instructions that move no HBM bytes of their own (copy-done pairs its copy-start).
FREE_OPS = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy-done",
            "after-all", "partition-id", "replica-id")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
                    r"(?P<op>[a-z][\w\-]*)\((?P<args>.*)$")


_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]"
                    r"(?:\{([\d,]*)(?::[^}]*?T\((\d+),(\d+)\))?)?")


def tiled_bytes(shape: str) -> int:
    """Bytes of an HLO shape string as laid out in memory: with a TPU tiled layout
    (`f32[64,120,120,2]{3,2,1,0:T(8,128)}`) the two most minor dimensions are padded to the
    first tile (here 2 -> 128 lanes and 120 -> 120 sublanes), which is what HBM holds and moves;
    shapes without a tile count as dense. Tuple shapes are summed."""
    from mosaic_jax.training.aot import DTYPE_BYTES

    total = 0.0
    for dtype, dims, layout, t0, t1 in _ARRAY.findall(shape):
        if dtype not in DTYPE_BYTES:
            continue
        sizes = [int(d) for d in dims.split(",") if d]
        if t0 and layout and len(sizes) >= 1:
            order = [int(d) for d in layout.split(",") if d]  # minor to major
            sizes[order[0]] = -(-sizes[order[0]] // int(t1)) * int(t1)
            if len(order) > 1:
                sizes[order[1]] = -(-sizes[order[1]] // int(t0)) * int(t0)
        count = 1
        for d in sizes:
            count *= d
        total += DTYPE_BYTES[dtype] * count
    return int(total)


def hlo_top(hlo_text: str, n: int = 12) -> list[dict[str, Any]]:
    """The `n` largest instructions of an optimised HLO module outside fusion bodies, by bytes
    touched (output + operands, each operand's size read from its defining instruction, TPU
    tile padding included: `tiled_bytes`), with
    op and op_name. A rough map of where HBM traffic goes, not XLA's own byte count."""
    rows, inside_fusion, sizes = [], False, {}
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            inside_fusion = "fused" in head.group(1) or "fusion" in head.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        sizes[m.group("name")] = tiled_bytes(m.group("shape"))
        if inside_fusion or m.group("op") in FREE_OPS:
            continue
        args = re.split(r"\),?\s*(?:kind=|calls=|metadata=|custom_call_target=|window=|"
                        r"dim_labels=|backend_config=|to_apply=|dimensions=|slice=)",
                        m.group("args"))[0]
        operands = sum(sizes.get(a, 0) for a in re.findall(r"%([\w.\-]+)", args))
        op_name = re.search(r'op_name="([^"]*)"', line)
        rows.append({"name": m.group("name"), "op": m.group("op"),
                     "output_bytes": sizes[m.group("name")],
                     "bytes": sizes[m.group("name")] + operands,
                     "op_name": op_name.group(1)[-160:] if op_name else ""})
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:n]


def op_totals(hlo_text: str) -> dict[str, int]:
    """Bytes touched per op kind (fusion, copy, convolution, ...) outside fusion bodies."""
    totals: dict[str, int] = {}
    for r in hlo_top(hlo_text, n=10**9):
        totals[r["op"]] = totals.get(r["op"], 0) + r["bytes"]
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def roofline_s(flops: float, bytes_accessed: float, device_kind: str) -> float | None:
    """Lower bound on one step's time on one chip, seconds: max(FLOPs / peak, bytes / HBM
    bandwidth) with the published peaks of `PEAK`; None for a chip not listed."""
    if device_kind not in PEAK:
        return None
    peak, bandwidth = PEAK[device_kind]
    return max(flops / peak, bytes_accessed / bandwidth)


def program_summary(compiled: Any, device_kind: str, per_chip_batch: int) -> dict[str, Any]:
    """FLOPs, bytes accessed, memory, collectives, roofline and largest ops of a compiled step."""
    from mosaic_jax.training.aot import memory_report, parse_collectives

    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    text = compiled.as_text()
    roof = roofline_s(flops, nbytes, device_kind)
    return {"flops_per_chip": flops, "bytes_accessed_per_chip": nbytes,
            "flops_per_sample": flops / per_chip_batch,
            "bytes_accessed_per_sample": nbytes / per_chip_batch,
            "memory_bytes": memory_report(compiled.memory_analysis()),
            "collectives": parse_collectives(text),
            "roofline_step_s": roof,
            "bound": None if roof is None else
            ("HBM" if nbytes / PEAK[device_kind][1] >= flops / PEAK[device_kind][0] else "FLOPs"),
            "bytes_by_op": op_totals(text), "largest_ops": hlo_top(text)}


# ----------------------------------------------------------------------------------------------
# Rows and the table (the edge)


def row_key(side: str, topology: str, image_px: int, per_chip_batch: int,
            overrides: dict[str, str]) -> dict[str, Any]:
    return {"side": side, "topology": topology, "image_px": image_px,
            "per_chip_batch": per_chip_batch, "overrides": dict(sorted(overrides.items()))}


def find_row(rows: list[dict[str, Any]], key: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)


def compile_row(anchor: str | None, side: str, topology: str, image_px: int,
                per_chip_batch: int, overrides: dict[str, str]) -> dict[str, Any]:
    """Compiles one side for one slice and returns its row (key + summary + compile time)."""
    from mosaic_jax.training import aot

    devices = aot.topology_devices(topology)
    global_batch = per_chip_batch * len(devices)
    if side == "anchor":
        lowered = lower_anchor(load_anchor(anchor), devices, global_batch, image_px)
    elif side == "augment":
        lowered = lower_augment(devices, global_batch, image_px, overrides)
    else:
        lowered = lower_ours(devices, global_batch, image_px, overrides)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    kind = devices[0].device_kind
    return {**row_key(side, topology, image_px, per_chip_batch, overrides),
            "device_kind": kind, "chips": len(devices), "global_batch": global_batch,
            "compile_s": round(seconds, 1),
            **program_summary(compiled, kind, per_chip_batch)}


RATIO_FIELDS = (("FLOPs", "flops_per_chip"), ("bytes accessed", "bytes_accessed_per_chip"),
                ("temporaries", None), ("roofline time", "roofline_step_s"))


def ratios(ours: dict[str, Any], anchor: dict[str, Any]) -> dict[str, float]:
    """ours / anchor for FLOPs, bytes accessed, temporaries and roofline time."""
    out = {}
    for label, field in RATIO_FIELDS:
        if field is None:
            a, b = ours["memory_bytes"]["temporaries"], anchor["memory_bytes"]["temporaries"]
        else:
            a, b = ours[field], anchor[field]
        out[label] = a / b if a and b else float("nan")
    return out


def markdown(payload: dict[str, Any]) -> str:
    """The rows as RESULTS.md's side-by-side table (ratios against the anchor of the slice)."""
    lines = ["| topology | px | per chip | ours | GFLOP/sample ours / anchor | MB accessed/sample "
             "ours / anchor | temporaries GiB ours / anchor | roofline ms ours / anchor "
             "(bound) | ratios FLOPs, bytes, temps, roofline |", "|" + "---|" * 9]
    rows = payload["rows"]
    for r in rows:
        if r["side"] != "ours":
            continue
        a = find_row(rows, row_key("anchor", r["topology"], r["image_px"], r["per_chip_batch"],
                                   {}))
        if a is None:
            continue
        q = ratios(r, a)
        ours = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "as configured"
        lines.append(
            f"| {r['topology']} | {r['image_px']} | {r['per_chip_batch']} | {ours} | "
            f"{r['flops_per_sample'] / 1e9:.1f} / {a['flops_per_sample'] / 1e9:.1f} | "
            f"{r['bytes_accessed_per_sample'] / 1e6:.0f} / "
            f"{a['bytes_accessed_per_sample'] / 1e6:.0f} | "
            f"{r['memory_bytes']['temporaries'] / 1024**3:.2f} / "
            f"{a['memory_bytes']['temporaries'] / 1024**3:.2f} | "
            f"{r['roofline_step_s'] * 1e3:.1f} / {a['roofline_step_s'] * 1e3:.1f} "
            f"({r['bound']} / {a['bound']}) | "
            + ", ".join(f"{v:.2f}x" for v in q.values()) + " |")
    return "\n".join(lines)


def sweep(anchor: str | os.PathLike, topologies: list[str], image_sizes: list[int],
          per_chip_batch: int, output: Path = DEFAULT_OUTPUT) -> None:
    """Both sides for every (topology, size), one subprocess per compile, rows already in
    `output` skipped (a stopped sweep resumes); prints the ratios table at the end."""
    for topology in topologies:
        for px in image_sizes:
            for side in ("anchor", "ours"):
                rows = json.loads(output.read_text())["rows"] if output.exists() else []
                if find_row(rows, row_key(side, topology, px, per_chip_batch, {})):
                    continue
                subprocess.run([sys.executable, "-m", "benchmarks.anchor_aot", "--anchor",
                                os.fspath(anchor), "--side", side, "--topology", topology,
                                "--image_px", str(px), "--per_chip_batch", str(per_chip_batch),
                                "--output", os.fspath(output)], check=True)
    print(markdown(json.loads(output.read_text())))


def main(argv: list[str] | None = None) -> int:
    p = cli.new_parser("python -m benchmarks.anchor_aot", __doc__)
    p.add_argument("--anchor", help="the plain Flax step's Python file (needed for --side anchor)")
    p.add_argument("--side", choices=("anchor", "ours", "augment"), default="ours",
                   help="augment: our on-device augmentation alone")
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--image_px", type=int, default=120)
    p.add_argument("--per_chip_batch", type=int, default=64)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override of our side (an ablation), e.g. model.sync_bn=false")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--markdown", action="store_true", help="print the table; compile nothing")
    args = p.parse_args(argv)
    payload = (json.loads(args.output.read_text()) if args.output.exists()
               else {"machine": machine_info(with_jax=False), "rows": []})
    if args.markdown:
        print(markdown(payload))
        return 0
    if args.side == "anchor" and not args.anchor:
        p.error("--side anchor needs --anchor FILE")
    overrides = dict(s.split("=", 1) for s in args.set)
    if args.side == "anchor" and overrides:
        p.error("--set applies to our side only")
    from mosaic_jax.training import aot

    aot.compile_only_environment()
    import jax

    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    try:
        row = compile_row(args.anchor, args.side, args.topology, args.image_px,
                          args.per_chip_batch, overrides)
    except (ValueError, aot.LibtpuMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    key = row_key(args.side, args.topology, args.image_px, args.per_chip_batch, overrides)
    payload["rows"] = [r for r in payload["rows"]
                       if not all(r.get(k) == v for k, v in key.items())] + [row]
    write_json(args.output, payload)
    print(json.dumps({k: row[k] for k in ("side", "topology", "image_px", "compile_s",
                                          "flops_per_sample", "bytes_accessed_per_sample",
                                          "roofline_step_s", "bound")}
                     | {"temporaries": row["memory_bytes"]["temporaries"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
