"""BigEarthNet v2 at full scale without the patches: planning, preparation and read-back.

The real metadata (549,488 rows in the official two parquet files) is at hand, the patches are
not. This rehearsal times the real builder on it and on synthetic patches in the official layout:

- `plan`: the builder's planning step (`_check_manual_dir`: md5 of the metadata files;
  `_plan`: read and validate every row; `shard_writer.plan_split`: shuffle and cut each split
  into shards) over the first 1/8, 1/4, 1/2 and all rows of `--metadata_dir`, each in a fresh
  process: seconds and peak RSS per size, so a super-linear growth shows. Planning opens no
  patch file (workers do), so no patch needs to exist for it.
- `prepare`: `--num_patches` rows drawn (seeded) from the real metadata get patch folders whose
  files are hard links to `--num_sources` real-sized fake patches written by
  `data_builders.fake_bigearthnet` (GeoTIFFs with the official sizes, dtypes and compression);
  every patch is distinct to the builder (its own id, folder and files), the bytes behind them
  are shared, so the source side stays in the page cache: reading is faster than from a real
  disk. Then the real builder prepares them (`bigearthnet_v2/default`, array_record) once per
  `--workers` value (0 = the builder's default): patches per wall second and per CPU-second
  (parent + workers), peak RSS of the parent and of the largest worker, bytes on disk per
  patch, and the hours for 549,488 patches on 16 cores (assuming the per-core rate scales).
- `read`: the prepared train split read as training reads it (`input_pipeline.make_train_dataset`
  with the 10 % protocol, `data.train_fraction=0.1`, official12 bands) with `worker_count` 0
  and 2: samples per wall second, per CPU-second of this process (worker_count 0), and how many
  host cores an accelerator consuming `--accelerator_rate` samples/s would need. The two views
  are drawn on the device from one host sample, so one host sample feeds both views.

- `resume`: a tiny model trained on the prepared data (10 % protocol) is stopped with SIGTERM
  after a few steps and started again: the time to the first step of each start, the step it
  resumed at, and the patch_id scan timed alone (extrapolated to the full train split).

    python -m benchmarks.bigearthnet_scale --part plan|prepare|read|resume|all \
        --metadata_dir DIR --work_dir /tmp/scale [--num_patches 50000] [--workers 0 2]

JSON: `--output` (default benchmarks/results/bigearthnet_scale.json), rewritten after each part.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, machine_info, write_json
from data_builders import cli

FULL_SIZE = 549_488
FULL_TRAIN_RECORDS = 237_871  # the train split of BigEarthNet v2 (metadata.parquet)
REPO = Path(__file__).resolve().parents[1]
TARGET_CORES = 16
PLAN_FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def _rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _run_child(args: list[str]) -> dict[str, Any]:
    """Runs this module with `args` in a fresh process; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bigearthnet_scale", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Planning


def subset_metadata(metadata_dir: Path, out: Path, fraction: float) -> Path:
    """A manual dir with the first `fraction` of each official metadata file's rows (symlinks to
    the files themselves at 1.0) and empty S1/S2 folders."""
    import pyarrow.parquet as pq

    from data_builders.bigearthnet_v2.bigearthnet_v2 import (
        METADATA_FILE,
        S1_DIR,
        S2_DIR,
        SNOW_CLOUD_METADATA_FILE,
    )

    out.mkdir(parents=True, exist_ok=True)
    for d in (S1_DIR, S2_DIR):
        (out / d).mkdir(exist_ok=True)
    for name in (METADATA_FILE, SNOW_CLOUD_METADATA_FILE):
        target = out / name
        if target.exists() or target.is_symlink():
            target.unlink()
        if fraction >= 1.0:
            target.symlink_to((metadata_dir / name).resolve())
        else:
            table = pq.read_table(metadata_dir / name)
            pq.write_table(table.slice(0, int(len(table) * fraction)), target)
    return out


def plan_once(manual_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Times the `all` config's planning on `manual_dir` in this process."""
    import tensorflow_datasets as tfds

    from data_builders import shard_writer
    from data_builders.bigearthnet_v2 import bigearthnet_v2 as ben

    rss0 = _rss_mib()
    builder = ben.BigearthnetV2(config="all", data_dir=os.fspath(data_dir), skip_checksums=True)
    t0, c0 = time.perf_counter(), time.process_time()
    builder._check_manual_dir(manual_dir)
    t1 = time.perf_counter()
    by_split, rejected = builder._plan(manual_dir)
    t2 = time.perf_counter()
    shard_config = tfds.download.DownloadConfig().get_shard_config()
    loader = builder._loader(manual_dir)
    shards = {split: len(shard_writer.plan_split(
        split, [(r.patch_id, r) for r in rows], example_size=loader.serialized_size(),
        shard_config=shard_config)) for split, rows in by_split.items()}
    t3, c3 = time.perf_counter(), time.process_time()
    return {"rows": sum(map(len, by_split.values())) + len(rejected),
            "rows_by_split": {k: len(v) for k, v in by_split.items()},
            "rejected": len(rejected), "shards": shards,
            "check_md5_s": t1 - t0, "plan_rows_s": t2 - t1, "plan_shards_s": t3 - t2,
            "total_s": t3 - t0, "total_cpu_s": c3 - c0,
            "rss_before_mib": rss0, "peak_rss_mib": _rss_mib()}


def part_plan(metadata_dir: Path, work: Path) -> dict[str, Any]:
    sizes = []
    for fraction in PLAN_FRACTIONS:
        manual = subset_metadata(metadata_dir, work / f"plan_{fraction}", fraction)
        row = _run_child(["--part", "plan_one", "--manual_dir", os.fspath(manual),
                          "--work_dir", os.fspath(work)])
        row["fraction"] = fraction
        sizes.append(row)
        print(f"plan {row['rows']} rows: {row['total_s']:.1f} s ({row['total_cpu_s']:.1f} CPU-s), "
              f"peak RSS "
              f"{row['peak_rss_mib']:.0f} MiB", flush=True)
    half, full = sizes[-2], sizes[-1]
    return {"sizes": sizes,
            "time_ratio_full_over_half": full["total_s"] / half["total_s"],
            "cpu_ratio_full_over_half": full["total_cpu_s"] / half["total_cpu_s"],
            "rows_ratio_full_over_half": full["rows"] / half["rows"],
            "us_per_row_full": full["total_s"] / full["rows"] * 1e6}


# ----------------------------------------------------------------------------------------------
# Preparation


def _source_files(root: Path, patch_id: str, s1_name: str) -> dict[str, Path]:
    from data_builders.bigearthnet_v2 import bigearthnet_v2 as ben

    files = {f"s2_{b}": ben.s2_patch_dir(root, patch_id) / f"{patch_id}_{b}.tif"
             for b in ben.S2_BANDS}
    files.update({f"s1_{b}": ben.s1_patch_dir(root, s1_name) / f"{s1_name}_{b}.tif"
                  for b in ben.S1_BANDS})
    return files


def build_manual_dir(metadata_dir: Path, root: Path, num_patches: int, num_sources: int,
                     seed: int = 0) -> dict[str, Any]:
    """`num_patches` real metadata rows (seeded draw) in the official layout under `root`, their
    band files hard links to `num_sources` fake patches; returns timing and sizes."""
    import numpy as np
    import pyarrow.parquet as pq

    from data_builders.bigearthnet_v2 import bigearthnet_v2 as ben
    from data_builders.fake_bigearthnet import write_fake_bigearthnet

    if root.exists():
        shutil.rmtree(root)
    src = root.parent / (root.name + "_sources")
    t0 = time.perf_counter()
    if not src.exists():
        write_fake_bigearthnet(src, num_sources, seed=seed, with_reference_maps=False)
    t1 = time.perf_counter()
    sources = pq.read_table(src / ben.METADATA_FILE, columns=["patch_id", "s1_name"]).to_pylist()
    source_files = [_source_files(src, s["patch_id"], s["s1_name"]) for s in sources]
    table = pq.read_table(metadata_dir / ben.METADATA_FILE)
    pick = np.sort(np.random.default_rng(seed).choice(len(table), num_patches, replace=False))
    table = table.take(pick)
    (root / ben.S1_DIR).mkdir(parents=True)
    (root / ben.S2_DIR).mkdir()
    pq.write_table(table, root / ben.METADATA_FILE)
    for i, (pid, s1) in enumerate(zip(table["patch_id"].to_pylist(),
                                      table["s1_name"].to_pylist(), strict=True)):
        for key, target in _source_files(root, pid, s1).items():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source_files[i % len(source_files)][key], target)
    t2 = time.perf_counter()
    source_bytes = sum(f.stat().st_size for f in source_files[0].values())
    return {"num_patches": num_patches, "num_sources": num_sources,
            "fake_write_s": t1 - t0, "link_s": t2 - t1,
            "patch_file_bytes": source_bytes}


def prepare_once(manual_dir: Path, data_dir: Path, workers: int) -> dict[str, Any]:
    """Prepares `bigearthnet_v2/default` from `manual_dir` in this process (and its workers)."""
    import tensorflow_datasets as tfds

    from data_builders import shard_writer
    from data_builders.bigearthnet_v2 import bigearthnet_v2 as ben

    if data_dir.exists():
        shutil.rmtree(data_dir)
    builder = ben.BigearthnetV2(config="default", data_dir=os.fspath(data_dir),
                                skip_checksums=True, num_workers=workers or None,
                                file_format="array_record")
    n = len(list(ben.read_metadata(manual_dir / ben.METADATA_FILE)))
    used = workers or shard_writer.default_num_workers(n)
    w0, c0 = time.perf_counter(), _cpu_s(resource.RUSAGE_SELF)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    wall = time.perf_counter() - w0
    cpu_self = _cpu_s(resource.RUSAGE_SELF) - c0
    cpu_children = _cpu_s(resource.RUSAGE_CHILDREN)
    on_disk = sum(f.stat().st_blocks * 512 for f in data_dir.rglob("*") if f.is_file())
    cpu = cpu_self + cpu_children
    per_core = n / cpu
    return {"workers_flag": workers, "workers": used, "patches": n, "wall_s": wall,
            "cpu_s_parent": cpu_self, "cpu_s_workers": cpu_children,
            "patches_per_s_wall": n / wall, "patches_per_cpu_s": per_core,
            "peak_rss_parent_mib": _rss_mib(),
            "peak_rss_largest_worker_mib": _rss_mib(resource.RUSAGE_CHILDREN),
            "bytes_on_disk": on_disk, "bytes_on_disk_per_patch": on_disk / n,
            "full_size_hours_on_16_cores": FULL_SIZE / (per_core * TARGET_CORES) / 3600,
            "splits": {k: v.num_examples for k, v in builder.info.splits.items()}}


def part_prepare(metadata_dir: Path, work: Path, num_patches: int, num_sources: int,
                 workers: list[int]) -> dict[str, Any]:
    manual = work / "manual"
    out: dict[str, Any] = {"manual_dir": build_manual_dir(metadata_dir, manual, num_patches,
                                                          num_sources), "runs": []}
    print(f"manual dir: {out['manual_dir']}", flush=True)
    for w in workers:
        row = _run_child(["--part", "prepare_one", "--manual_dir", os.fspath(manual),
                          "--work_dir", os.fspath(work), "--workers", str(w)])
        out["runs"].append(row)
        print(f"prepare workers={row['workers']}: {row['patches_per_s_wall']:.1f} patches/s, "
              f"{row['patches_per_cpu_s']:.1f} per CPU-s, parent "
              f"{row['peak_rss_parent_mib']:.0f} MiB, worker "
              f"{row['peak_rss_largest_worker_mib']:.0f} MiB", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# Reading back


def part_read(data_dir: Path, batch_size: int, num_batches: int, accelerator_rate: float,
              worker_counts: list[int]) -> dict[str, Any]:
    """Training's host pipeline on the prepared train split (10 % protocol)."""
    from mosaic_jax.data import input_pipeline as ip

    source = ip.open_source("bigearthnet_v2", "train", os.fspath(data_dir))
    out: dict[str, Any] = {"train_records": len(source), "batch_size": batch_size,
                           "num_batches": num_batches, "train_fraction": 0.1, "runs": []}
    for workers in worker_counts:
        w0, c0 = time.perf_counter(), time.process_time()
        ds = ip.make_train_dataset(source, dataset="bigearthnet_v2", global_batch_size=batch_size,
                                   seed=0, s1_bands="official12", s2_bands="official12",
                                   train_fraction=0.1, process_index=0, process_count=1,
                                   worker_count=workers)
        it = iter(ds)
        next(it)
        first_s = time.perf_counter() - w0  # the patch_id scan of the subset + start-up
        w1, c1 = time.perf_counter(), time.process_time()
        for _ in range(num_batches):
            next(it)
        wall, cpu = time.perf_counter() - w1, time.process_time() - c1
        row = {"worker_count": workers, "first_batch_s": first_s,
               "setup_cpu_s": c1 - c0, "samples_per_s_wall": num_batches * batch_size / wall}
        if workers == 0:  # this process did all the work: a per-core figure
            per_core = num_batches * batch_size / cpu
            row.update(samples_per_cpu_s=per_core,
                       host_cores_for_accelerator=accelerator_rate / per_core)
        out["runs"].append(row)
        print(f"read worker_count={workers}: {row}", flush=True)
    out["accelerator_rate"] = accelerator_rate
    return out


RESUME_FLAGS = ("--config.data.demo=False", "--config.data.train_fraction=0.1",
                "--config.batch_size=32", "--config.num_train_steps=100000",
                "--config.log_every_steps=1", "--config.eval_every_steps=0",
                "--config.checkpoint_every_steps=100000", "--config.tsne_points=0",
                "--config.augment.out_size=32", "--config.model.width_multiplier=0.125",
                "--config.model.proj_hidden_dim=32", "--config.model.proj_dim=16")


def _run_until(argv: list[str], steps: int) -> dict[str, Any]:
    """Starts a training process, times its first progress line, SIGTERMs it after `steps`
    progress lines and waits for it to save and exit: seconds and the steps it printed."""
    import signal

    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    first, seen = None, []
    for line in proc.stdout:
        if line.startswith("step ") and "loss" in line:
            first = first or time.perf_counter() - t0
            seen.append(int(line.split()[1].split("/")[0]))
            if len(seen) == steps:
                proc.send_signal(signal.SIGTERM)
        elif "Preempted" in line or line.startswith("error:"):
            print(line.rstrip(), flush=True)
    proc.wait()
    return {"first_step_s": first, "steps": seen, "returncode": proc.returncode,
            "total_s": time.perf_counter() - t0}


def part_resume(data_dir: Path, work: Path, steps: int = 5) -> dict[str, Any]:
    """A tiny model trained on the prepared data with the 10 % protocol: started, stopped with
    SIGTERM after `steps` steps (a checkpoint with the input position), started again; the
    time to the first step of each start, and the patch_id scan (the part of a start that grows
    with the train split) timed alone."""
    from mosaic_jax.data import input_pipeline as ip

    workdir = work / "resume_run"
    shutil.rmtree(workdir, ignore_errors=True)
    argv = [sys.executable, "-m", "mosaic_jax.main", "--config=configs/mosaic1.py",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *RESUME_FLAGS]
    first = _run_until(argv, steps)
    again = _run_until(argv, 1)
    source = ip.open_source("bigearthnet_v2", "train", os.fspath(data_dir))
    w0, c0 = time.perf_counter(), time.process_time()
    ids = ip.read_patch_ids(source)
    scan_wall, scan_cpu = time.perf_counter() - w0, time.process_time() - c0
    out = {"train_records": len(source), "first_start": first, "resumed_start": again,
           "resumed_at_step": again["steps"][0] if again["steps"] else None,
           "patch_id_scan_s": scan_wall, "patch_id_scan_cpu_s": scan_cpu,
           "patch_id_scan_full_size_cpu_s": scan_cpu / len(ids) * FULL_TRAIN_RECORDS}
    print(f"resume: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = cli.new_parser("python -m benchmarks.bigearthnet_scale", __doc__)
    p.add_argument("--part", choices=("plan", "prepare", "read", "resume", "all", "plan_one",
                                      "prepare_one"), default="all")
    p.add_argument("--metadata_dir", type=Path, help="the official metadata parquet files")
    p.add_argument("--work_dir", type=Path, default=Path("/tmp/bigearthnet_scale"))
    p.add_argument("--manual_dir", type=Path, help="(plan_one, prepare_one) the manual dir")
    p.add_argument("--num_patches", type=int, default=50_000)
    p.add_argument("--num_sources", type=int, default=500,
                   help="distinct fake patches behind the hard links")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="builder worker counts to prepare with (0: the builder's default)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_batches", type=int, default=50)
    p.add_argument("--read_workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--accelerator_rate", type=float, default=4500.0,
                   help="samples/s one accelerator consumes (the IaI goal for one H100)")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "bigearthnet_scale.json")
    args = p.parse_args(argv)
    work = args.work_dir
    if args.part == "plan_one":
        print(json.dumps(plan_once(args.manual_dir, work / "plan_tfds")))
        return 0
    if args.part == "prepare_one":
        print(json.dumps(prepare_once(args.manual_dir, work / "tfds", args.workers[0])))
        return 0
    if args.part in ("plan", "prepare", "all") and args.metadata_dir is None:
        p.error(f"--part {args.part} needs --metadata_dir (the official metadata parquet files)")
    payload = (json.loads(args.output.read_text()) if args.output.exists() else {})
    payload["machine"] = machine_info(with_jax=False)
    if args.part in ("plan", "all"):
        payload["plan"] = part_plan(args.metadata_dir, work)
        write_json(args.output, payload)
    if args.part in ("prepare", "all"):
        payload["prepare"] = part_prepare(args.metadata_dir, work, args.num_patches,
                                          args.num_sources, args.workers)
        write_json(args.output, payload)
    if args.part in ("read", "all"):
        payload["read"] = part_read(work / "tfds", args.batch_size, args.num_batches,
                                    args.accelerator_rate, args.read_workers)
        write_json(args.output, payload)
    if args.part in ("resume", "all"):
        payload["resume"] = part_resume(work / "tfds", work)
        write_json(args.output, payload)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
