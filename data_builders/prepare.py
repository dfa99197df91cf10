"""Prepares one of the datasets of `data_builders` as array_record shards (no TensorFlow needed).

    python -m data_builders.prepare NAME --manual_dir M [--data_dir D] [--config C]
        [--skip_bad_patches] [--num_workers N] [--max_examples_per_split K] [--overwrite]

D defaults to ~/tensorflow_datasets, as for every other tool. NAME is a builder package of
`data_builders` (bigearthnet_v2, sen12ms, ...): importing
`data_builders.NAME` registers the TFDS builder of the same name. The data is written to
D/NAME/<config>/<version>/ with `file_format="array_record"`; read it back with
`tfds.builder(NAME, data_dir=D, config=C).as_data_source()` (after importing the package) or
`tfds.data_sources`. A progress bar runs while patches are read; at the end a summary lists
splits, example counts, shards, bytes, the output directory and the skipped patches (from the
`skipped_patches.json` the builders write beside the shards).

`--file_format tfrecord` writes TFRecord shards instead, which `tfds.load` reads into tf.data
(writing them needs TensorFlow).

Exit status: 0 on success, 1 when preparation failed (e.g. a bad patch without
--skip_bad_patches: the message names file and patch), 2 for usage errors (unknown NAME or
config, missing or empty manual dir, an option the builder does not support). A failed
preparation removes the folders it created (`downloads/`, `NAME/.config/`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import pkgutil
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

import data_builders
from data_builders import cli, console
from data_builders.geotiff import PatchError

REPORT_NAME = "skipped_patches.json"
"""The skip report every builder of `data_builders` writes into its prepared directory."""


class UsageError(cli.UsageError, ValueError):
    """A request that cannot be served as given (unknown dataset, config, option, directory)."""


FILE_FORMATS = ("array_record", "tfrecord")


def available_datasets() -> list[str]:
    """Names of the builder packages in `data_builders` (sub-packages, e.g. bigearthnet_v2)."""
    return sorted(info.name for info in pkgutil.iter_modules(data_builders.__path__)
                  if info.ispkg)


def builder_class(name: str) -> type:
    """Imports `data_builders.<name>` (which registers its builder) and returns the builder
    class; `UsageError` when there is no such dataset."""
    known = available_datasets()
    if name not in known:
        raise UsageError(f"unknown dataset {name!r}; available: {', '.join(known) or 'none'}")
    importlib.import_module(f"data_builders.{name}")
    return tfds.builder_cls(name)


def _builder_kwargs(cls: type, *, skip_bad_patches: bool, num_workers: int | None,
                    skip_checksums: bool = False) -> dict:
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    for option, value, flag in (("skip_bad_patches", skip_bad_patches, "--skip_bad_patches"),
                                ("num_workers", num_workers, "--num_workers"),
                                ("skip_checksums", skip_checksums, "--skip_checksums")):
        if value is None or value is False:
            continue
        if option not in accepted:
            raise UsageError(f"builder {cls.name} does not support {flag}")
        kwargs[option] = value
    return kwargs


def prepare(name: str, manual_dir: str | Path, data_dir: str | Path, *,
            config: str | None = None, skip_bad_patches: bool = False,
            num_workers: int | None = None, max_examples_per_split: int | None = None,
            overwrite: bool = False, skip_checksums: bool = False,
            file_format: str = "array_record"):
    """Prepares dataset `name` (config `config`, default: the builder's default) from
    `manual_dir` into `data_dir` as `file_format` shards and returns the prepared TFDS builder.

    "array_record" (random access: `tfds.data_source`, Grain, this project's training) needs no
    TensorFlow; "tfrecord" is for `tfds.load` / tf.data and needs TensorFlow to write."""
    cls = builder_class(name)
    configs = [c.name for c in (cls.BUILDER_CONFIGS or [])]
    if config is not None and config not in configs:
        raise UsageError(f"unknown config {config!r} of {name}; available: {', '.join(configs)}")
    if file_format not in FILE_FORMATS:
        raise UsageError(f"unknown file format {file_format!r}; choose one of "
                         f"{', '.join(FILE_FORMATS)}")
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir():
        raise UsageError(f"manual dir {manual_dir} does not exist (see the download "
                         f"instructions of {name}: python -c \"import data_builders.{name}, "
                         f"tensorflow_datasets as t; print(t.builder_cls('{name}')"
                         f".MANUAL_DOWNLOAD_INSTRUCTIONS)\")")
    if not any(manual_dir.iterdir()):
        raise UsageError(f"manual dir {manual_dir} is empty: extract the official archives of "
                         f"{name} there")
    data_dir = Path(data_dir).expanduser()
    kwargs = _builder_kwargs(cls, skip_bad_patches=skip_bad_patches, num_workers=num_workers,
                             skip_checksums=skip_checksums)
    builder = tfds.builder(name if config is None else f"{name}/{config}",
                           data_dir=str(data_dir), file_format=file_format, **kwargs)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    with _removed_on_failure([data_dir / "downloads", data_dir / name]):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=str(manual_dir), download_mode=mode,
            max_examples_per_split=max_examples_per_split))
    return builder


@contextlib.contextmanager
def _removed_on_failure(paths: Sequence[Path]) -> Iterator[None]:
    """Removes those of `paths` that the block created when it raises (TFDS's scaffolding of
    a preparation that did not finish); folders that existed before are left alone."""
    created = [p for p in paths if not p.exists()]
    try:
        yield
    except BaseException:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise


def read_skip_report(data_path: str | Path) -> list[dict[str, Any]] | None:
    """The skipped patches listed in a prepared directory's report (None: no report)."""
    path = Path(data_path) / REPORT_NAME
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return list(report["skipped"] if isinstance(report, dict) else report)


def _human_bytes(num: int) -> str:
    size = float(num)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def summary(builder, seconds: float | None = None, max_listed: int = 20) -> str:
    """A human-readable summary of a prepared builder: splits, counts, bytes, skips."""
    info = builder.info
    lines = [f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''} "
             f"{builder.version} prepared in {builder.data_path}"]
    total_examples = total_bytes = 0
    for split_name, split in info.splits.items():
        lines.append(f"  {split_name:<12} {split.num_examples:>9,} examples  "
                     f"{split.num_shards:>4} shard(s)  {_human_bytes(split.num_bytes):>11}")
        total_examples += split.num_examples
        total_bytes += split.num_bytes
    lines.append(f"  {'total':<12} {total_examples:>9,} examples  {'':>13}"
                 f"{_human_bytes(total_bytes):>11} serialized")
    on_disk = sum(f.stat().st_size for f in Path(builder.data_path).iterdir() if f.is_file())
    lines.append(f"  on disk {_human_bytes(on_disk)} (shards are compressed)")
    if seconds is not None:
        lines.append(f"  time {seconds:.1f} s ({total_examples / max(seconds, 1e-9):.1f} "
                     "examples/s)")
    skipped = read_skip_report(builder.data_path)
    if skipped is None:
        lines.append("  skipped patches: no report")
    else:
        lines.append(f"  skipped patches: {len(skipped)} (report: "
                     f"{Path(builder.data_path) / REPORT_NAME})")
        for item in skipped[:max_listed]:
            lines.append(f"    {item.get('split', '?')} {item.get('patch_id')}: "
                         f"{item.get('reason')}")
        if len(skipped) > max_listed:
            lines.append(f"    ... and {len(skipped) - max_listed} more")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = cli.new_parser("python -m data_builders.prepare", __doc__)
    parser.add_argument("name", help="dataset: a package of data_builders, e.g. bigearthnet_v2")
    parser.add_argument("--manual_dir", required=True, help="extracted official files")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets",
                        help="where prepared datasets live (default: ~/tensorflow_datasets)")
    parser.add_argument("--config", default=None, help="builder config (default: the default)")
    parser.add_argument("--skip_bad_patches", action="store_true",
                        help="skip unreadable patches and list them in skipped_patches.json")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="parallel worker processes (default: the builder's choice)")
    parser.add_argument("--max_examples_per_split", type=int, default=None,
                        help="for quick trials: at most this many examples per split")
    parser.add_argument("--skip_checksums", action="store_true",
                        help="build even when a metadata file's md5 is not the "
                        "official release's (a newer metadata release)")
    parser.add_argument("--overwrite", action="store_true",
                        help="prepare again even if the prepared data exists")
    parser.add_argument("--file_format", default="array_record", choices=FILE_FORMATS,
                        help="array_record (random access, no TensorFlow; what training "
                             "reads) or tfrecord (for tfds.load / tf.data; needs TensorFlow)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (the convention of `data_builders.cli`, exit status in the
    module docstring); returns 0 or exits."""
    console.quiet_console()
    args = _parser().parse_args(argv)
    return cli.run(lambda: _prepare(args), argv, paths=[args.data_dir])


def _prepare(args: argparse.Namespace) -> int:
    tfds.display_progress_bar(True)
    start = time.monotonic()
    try:
        builder = prepare(args.name, args.manual_dir, args.data_dir, config=args.config,
                          skip_bad_patches=args.skip_bad_patches, num_workers=args.num_workers,
                          max_examples_per_split=args.max_examples_per_split,
                          overwrite=args.overwrite, skip_checksums=args.skip_checksums,
                          file_format=args.file_format)
    except (UsageError, OSError):
        raise
    except (PatchError, ValueError, AssertionError) as e:
        hint = " (use --skip_bad_patches to skip such patches)" if isinstance(
            e, PatchError) and not args.skip_bad_patches else ""
        raise ValueError(f"preparing {args.name} failed: {e}{hint}") from e
    print(summary(builder, time.monotonic() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
