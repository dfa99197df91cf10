"""Scene mapping (`mosaic_jax.inference.predict`) speed, host-time share and peak memory.

``python -m benchmarks.predict_scene`` writes synthetic scenes (`data_builders.fake_scene`)
and exports with **random weights** (speed does not depend on the weights), then maps each
workload in its own subprocess, so that its peak RSS (``ru_maxrss``) is that workload's alone:

- ``resnet50_sub``: the full-size ResNet-50 (``configs/supervised.py``: S1 + S2 early fusion,
  120 px, width 1) on a sub-scene (``--sub_size``, default 1200 x 2400 px);
- ``demo_full``: the demo's model size (``configs/mosaic1.py:demo``, two ResNet-18 towers of
  width 1/8 at 48 px) on a full Sentinel-2 tile (``--full_size``, default 10,980 x 10,980 px);
- ``demo_sub``: the demo's model on the sub-scene (same memory as ``demo_full`` when memory
  does not grow with the scene).

It prints a table (windows/s, km^2/s, peak RSS, seconds per stage, host share) and writes JSON
(``--output``, default ``benchmarks/results/predict_scene.json``; workloads of an earlier run that
are not rerun stay in it, each with its machine record). ``--quick`` is a smoke run
(small scenes, a tiny model). Scenes and exports are cached in ``--work_dir``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from data_builders import cli

WORKLOADS = ("resnet50_sub", "demo_full", "demo_sub")


def untrained_workdir(config: Any, workdir: Path, *, seed: int = 0) -> Path:
    """A training workdir whose one checkpoint (step 1) holds random variables of `config`'s
    model, saved as the training program saves them (no training, no data)."""
    from mosaic_jax.training import checkpoints, train

    state = train.random_state(config, seed=seed, step=1)
    return Path(checkpoints.write_workdir(workdir, config, state))


def untrained_export(config: Any, workdir: Path, out: Path, *, seed: int = 0,
                     platforms: tuple[str, ...] = ("cpu",)) -> dict[str, Any]:
    """`untrained_workdir`, exported to `out` (`mosaic_jax.export`); returns model.json."""
    from mosaic_jax.export import exporter

    untrained_workdir(config, workdir, seed=seed)
    return exporter.export_workdir(str(workdir), str(out), platforms=platforms)


def model_config(kind: str) -> Any:
    """``resnet50``: configs/supervised.py (full size); ``demo``: configs/mosaic1.py:demo;
    ``tiny``: the demo at test size (16 px, width 1/32)."""
    if kind == "resnet50":
        return importlib.import_module("configs.supervised").get_config()
    config = importlib.import_module("configs.mosaic1").get_config("demo")
    if kind == "tiny":
        config.augment.out_size = 16
        config.model.width_multiplier = 1 / 32
    return config


def prepare(work_dir: Path, model: str, scene: tuple[int, int]) -> tuple[Path, Path, Path]:
    """(export dir, s1, s2), created once and cached under `work_dir`."""
    from data_builders.fake_scene import write_fake_scene

    out = work_dir / f"export_{model}"
    if not (out / "model.json").exists():
        print(f"exporting a random-weight {model} model to {out} ...", flush=True)
        untrained_export(model_config(model), work_dir / f"run_{model}", out)
    h, w = scene
    s1, s2 = work_dir / f"s1_{h}x{w}.tif", work_dir / f"s2_{h}x{w}.tif"
    if not (s1.exists() and s2.exists()):
        print(f"writing a {h} x {w} px synthetic scene to {work_dir} ...", flush=True)
        write_fake_scene(s1, s2, height=h, width=w, seed=0)
    return out, s1, s2


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Maps one scene in this process; the summary plus this process's peak RSS."""
    from mosaic_jax.inference.predict import predict_scene

    summary = predict_scene(spec["export"], spec["s1"], spec["s2"], spec["output"],
                            stride=spec["stride"], batch_size=spec["batch_size"],
                            progress=False, quicklook=False, log=lambda s: None)
    seconds = summary["seconds"]
    return {**spec, "scene_px": summary["scene_px"], "windows": summary["windows"],
            "windows_run": summary["windows_run"], "km2": summary["km2"], "seconds": seconds,
            "windows_per_s": summary["windows_run"] / seconds["loop"],
            "km2_per_s": summary["km2"] / seconds["loop"], "host_share": summary["host_share"],
            "peak_rss_gib": common.peak_rss_bytes() / common.GIB}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.new_parser("python -m benchmarks.predict_scene", __doc__)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--full_size", type=int, nargs=2, default=[10980, 10980],
                   metavar=("H", "W"), help="full scene (one Sentinel-2 tile)")
    p.add_argument("--sub_size", type=int, nargs=2, default=[1200, 2400], metavar=("H", "W"))
    p.add_argument("--stride", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(),
                                                      "mosaic_predict_bench"),
                   help="cache of scenes and exports")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per workload")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 360 x 480 px scenes and a tiny model")
    p.add_argument("--output", default=str(common.RESULTS_DIR / "predict_scene.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    full, sub = tuple(args.full_size), tuple(args.sub_size)
    if args.quick:
        full, sub = (360, 480), (240, 360)
    previous = {}  # workloads of an earlier run not rerun now stay in the JSON
    if os.path.exists(args.output):
        with open(args.output) as f:
            old = json.load(f)
        if old.get("quick") == args.quick:
            previous = {r["workload"]: r for r in old.get("results", [])}
    results = []
    for name in args.workloads:
        model = "tiny" if args.quick else ("resnet50" if name.startswith("resnet50") else "demo")
        scene = full if name.endswith("_full") else sub
        export_dir, s1, s2 = prepare(work_dir, model, scene)
        spec = {"workload": name, "model": model, "export": str(export_dir), "s1": str(s1),
                "s2": str(s2), "output": str(work_dir / f"map_{name}.tif"),
                "stride": args.stride, "batch_size": args.batch_size}
        print(f"running {name} ({model} model, {scene[0]} x {scene[1]} px) ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.predict_scene", "--worker",
                               json.dumps(spec)], cwd=common.REPO, capture_output=True,
                              text=True, timeout=args.timeout)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"workload {name} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        result["machine"] = common.machine_info()
        results.append(result)
        previous.pop(name, None)
        payload = {"benchmark": "predict_scene", "quick": args.quick,
                   "machine": result["machine"], "results": [*previous.values(), *results]}
        common.write_json(args.output, payload)
    rows = []
    for r in payload["results"]:
        s = r["seconds"]
        rows.append([r["workload"], r["model"], f"{r['scene_px'][0]} x {r['scene_px'][1]}",
                     r["windows_run"], f"{r['windows_per_s']:.1f}", f"{r['km2_per_s']:.2f}",
                     f"{r['peak_rss_gib']:.2f}", f"{s['read']:.1f}", f"{s['prepare']:.1f}",
                     f"{s['model']:.1f}", f"{s['blend_write']:.1f}", f"{s['loop']:.1f}",
                     f"{r['host_share']:.0%}"])
    print(common.describe_machine(payload["machine"]))
    print(common.format_table(
        ["workload", "model", "scene px", "windows", "windows/s", "km^2/s", "peak RSS GiB",
         "read s", "prepare s", "model s", "blend+write s", "loop s", "host share"], rows))
    print(f"JSON: {args.output}")


if __name__ == "__main__":  # the convention of data_builders.cli: one `error:` line
    sys.exit(cli.run(main))
