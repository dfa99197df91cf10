"""Writes a TFDS dataset's shards from worker processes, without TensorFlow: the machinery the
builders of `data_builders` share.

Why: TFDS's generic writer (`GeneratorBasedBuilder._generate_splits`) encodes every example in
one process and, once a split's serialised examples pass 1 GB, shuffles them through temporary
files written with `tf.io.gfile`, which needs TensorFlow. A builder here overrides
`_generate_splits` with `generate_splits`, which

1. puts each split's keyed items in the order of TFDS's own shuffling (md5 of the split name and
   the key) and cuts them into the number of shards TFDS's `ShardConfig` would choose for their
   estimated serialised size (boundaries as TFDS's `get_shard_boundaries`);
2. reads, encodes and serialises whole shards (TFDS's example serializer) and writes them (TFDS's
   file adapter) in this process or in spawned worker processes, with a progress bar;
3. with `skip_bad_patches`, leaves out items whose loading raises `PatchError` and collects skip
   records; otherwise the first such error stops the build;
4. renames the shards into place, writes the skip report and returns the `SplitInfo`s.

What is the dataset's own comes from the builder: the items of each split as (key, item) pairs,
an `ExampleLoader` (features, size estimate, how to load one item) and the report's name and
fields. The loader and the items travel to the workers by pickle, so the loader must be a
module-level class (the workers import its module) and the items picklable.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer, file_adapters, hashing
from tensorflow_datasets.core.naming import ShardedFileTemplate
from tensorflow_datasets.core.utils import shard_utils, tqdm_utils
from tensorflow_datasets.core.utils.shard_utils import ShardConfig

from data_builders import atomic_files
from data_builders.geotiff import PatchError

ItemT = TypeVar("ItemT")
Keyed = tuple[str, Any]
"""(example key, item): the key orders and names the example; the item is what the loader
reads."""

ITEMS_PER_WORKER = 500
"""Default parallelism: one worker process per this many items, at most one per usable CPU
(starting a worker, imports included, costs seconds; reading 500 patches about ten)."""


class ExampleLoader(abc.ABC, Generic[ItemT]):
    """The dataset's own part of writing a shard. Subclasses must be picklable and defined at
    module level: spawned workers unpickle them, importing their module."""

    @abc.abstractmethod
    def features(self) -> tfds.features.FeatureConnector:
        """The builder's feature spec (rebuilt in each worker to encode examples)."""

    @abc.abstractmethod
    def serialized_size(self) -> int:
        """Estimated bytes of one serialised example, for choosing the number of shards."""

    @abc.abstractmethod
    def load(self, item: ItemT) -> dict[str, Any]:
        """Reads one item into an example dict; `PatchError` when it cannot be read."""


def skip_record(split: str, error: PatchError) -> dict[str, Any]:
    """The report entry of a skipped item."""
    return {"split": split, "patch_id": error.patch_id, "path": error.path, "reason": str(error)}


def generate_examples(loader: ExampleLoader, split: str, items: Iterable[Keyed], *,
                      skip_bad_patches: bool, skipped: list[dict[str, Any]],
                      on_item: Callable[[], None] | None = None,
                      ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (key, example) for `items` in order. An item whose loading raises `PatchError`
    stops the generator with that error or, with `skip_bad_patches`, is left out and recorded
    in `skipped`. `on_item` is called once per item, skipped or not (progress)."""
    for key, item in items:
        try:
            example = loader.load(item)
        except PatchError as e:
            if not skip_bad_patches:
                raise
            skipped.append(skip_record(split, e))
            example = None
        if on_item is not None:
            on_item()
        if example is not None:
            yield key, example


# ---------------------------------------------------------------------------------------------
# Planning.

@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One shard to write: its items in order and where to write them (a temporary name)."""

    split: str
    index: int
    path: str
    items: tuple[Keyed, ...]
    loader: ExampleLoader
    skip_bad_patches: bool
    file_format: str


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """What writing a `ShardTask` produced."""

    split: str
    index: int
    path: str
    num_examples: int
    num_bytes: int
    skipped: tuple[dict[str, Any], ...]


def plan_split(split: str, items: Sequence[Keyed], *, example_size: int,
               shard_config: ShardConfig) -> list[tuple[Keyed, ...]]:
    """`items` in TFDS's shuffled order (md5 of `split` and the key), cut into the shards TFDS's
    `shard_config` chooses for `len(items) * example_size` bytes. ValueError for a repeated
    key (TFDS's writer rejects those too)."""
    if not items:
        return []
    seen: set[str] = set()
    for key, _ in items:
        if key in seen:
            raise ValueError(f"key {key} appears more than once in split {split}")
        seen.add(key)
    hasher = hashing.Hasher(split)
    ordered = sorted(items, key=lambda keyed: hasher.hash_key(keyed[0]))
    num_shards = shard_config.get_number_shards(len(ordered) * example_size, len(ordered))
    num_shards = max(1, min(num_shards, len(ordered)))
    bounds = [0, *shard_utils.get_shard_boundaries(len(ordered), num_shards)]
    return [tuple(ordered[start:stop]) for start, stop in zip(bounds, bounds[1:], strict=False)]


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        return os.cpu_count() or 1


def default_num_workers(num_items: int, items_per_worker: int = ITEMS_PER_WORKER) -> int:
    """One worker per `items_per_worker` items, at least one, at most one per usable CPU."""
    return min(available_cpus(), max(1, num_items // items_per_worker))


# ---------------------------------------------------------------------------------------------
# Writing shards (in worker processes or in this one).

def write_shard(task: ShardTask, on_item: Callable[[], None]) -> ShardResult:
    """Loads, encodes and serialises the task's items and writes them, in order, to one shard
    file. Raises the first `PatchError` unless skipping."""
    features = task.loader.features()
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    skipped: list[dict[str, Any]] = []
    sizes: list[int] = []

    def serialized() -> Iterator[tuple[str, bytes]]:
        for key, example in generate_examples(task.loader, task.split, task.items,
                                              skip_bad_patches=task.skip_bad_patches,
                                              skipped=skipped, on_item=on_item):
            data = serializer.serialize_example(features.encode_example(example))
            sizes.append(len(data))
            yield key, data

    adapter = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat(task.file_format)]
    adapter.write_examples(task.path, serialized())
    return ShardResult(task.split, task.index, task.path, len(sizes), sum(sizes), tuple(skipped))


_progress_queue: Any = None


def _init_worker(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _write_shard_in_worker(task: ShardTask) -> ShardResult:
    pending = [0]

    def on_item() -> None:  # Batched, so that the queue is not a bottleneck.
        pending[0] += 1
        if pending[0] >= 16:
            _progress_queue.put(pending[0])
            pending[0] = 0

    try:
        return write_shard(task, on_item)
    finally:
        if pending[0]:
            _progress_queue.put(pending[0])


def run_tasks(tasks: Sequence[ShardTask], num_workers: int,
              progress: Callable[[int], None]) -> list[ShardResult]:
    """Runs the shard tasks in this process (num_workers == 1 or a single task) or in spawned
    worker processes; `progress(n)` is called as items are done.

    Spawn is safe whatever threads the parent runs (e.g. JAX's); like any spawn-based
    multiprocessing it re-imports the main script in the workers, so a script that prepares a
    dataset needs an `if __name__ == "__main__":` guard (without one, the workers fail and this
    raises `BrokenProcessPool` instead of hanging)."""
    num_workers = max(1, min(num_workers, len(tasks)))
    if num_workers == 1:
        return [write_shard(task, lambda: progress(1)) for task in tasks]
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()

    def drain() -> None:
        while True:
            try:
                progress(progress_queue.get_nowait())
            except queue.Empty:
                return

    results = []
    pool = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=context, initializer=_init_worker, initargs=(progress_queue,))
    try:
        pending = {pool.submit(_write_shard_in_worker, task) for task in tasks}
        while pending:
            done, pending = concurrent.futures.wait(
                pending, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED)
            drain()
            results.extend(future.result() for future in done)  # Re-raises a PatchError.
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        processes = getattr(pool, "_processes", None) or {}  # Private; stop running shards.
        for process in list(processes.values()):
            process.terminate()
        raise
    pool.shutdown(wait=True)
    time.sleep(0.05)
    drain()
    return results


def finish_splits(results: Sequence[ShardResult],
                  templates: Mapping[str, ShardedFileTemplate],
                  ) -> tuple[list[tfds.core.SplitInfo], list[dict[str, Any]]]:
    """Renames each split's non-empty shards to their final names (in shard order) and deletes
    empty ones; returns the `SplitInfo`s (none for a split whose every item was skipped) and
    the skip records in split and shard order."""
    split_infos = []
    skipped: list[dict[str, Any]] = []
    for split, template in templates.items():
        shards = sorted((r for r in results if r.split == split), key=lambda r: r.index)
        for r in shards:
            skipped.extend(r.skipped)
        kept = [r for r in shards if r.num_examples]
        for r in shards:
            if not r.num_examples:
                Path(r.path).unlink(missing_ok=True)
        if not kept:
            continue
        for i, r in enumerate(kept):
            os.replace(r.path, template.sharded_filepath(shard_index=i, num_shards=len(kept)))
        split_infos.append(tfds.core.SplitInfo(
            name=split, shard_lengths=[r.num_examples for r in kept],
            num_bytes=sum(r.num_bytes for r in kept), filename_template=template))
    return split_infos, skipped


def generate_splits(
    builder: tfds.core.GeneratorBasedBuilder,
    items_by_split: Mapping[str, Sequence[Keyed]],
    loader: ExampleLoader,
    *,
    download_config: tfds.download.DownloadConfig,
    skip_bad_patches: bool,
    num_workers: int | None,
    report: Callable[[list[dict[str, Any]]], None],
    skipped: Sequence[dict[str, Any]] = (),
    items_per_worker: int = ITEMS_PER_WORKER,
    source: str | os.PathLike | None = None,
) -> list[tfds.core.SplitInfo]:
    """The body of a builder's `_generate_splits`: plans, writes (in parallel) and returns the
    `SplitInfo`s of every split with at least one example.

    `items_by_split`: each split's (key, item) pairs; `download_config.max_examples_per_split`
    keeps the first ones. `skipped`: skip records made while planning. `report(skipped)` is
    called with every skip record before returning (or raising `PatchError` when no item at
    all could be read; `source` is the path that error names). `num_workers`: None or 0 for
    `default_num_workers`."""
    file_format = builder.info.file_format.value
    shard_config = download_config.get_shard_config()
    limit = download_config.max_examples_per_split
    tasks: list[ShardTask] = []
    templates: dict[str, ShardedFileTemplate] = {}
    for split, items in items_by_split.items():
        items = list(items if limit is None else items[:limit])
        shards = plan_split(split, items, example_size=loader.serialized_size(),
                            shard_config=shard_config)
        if not shards:
            continue
        template = builder._get_filename_template(split_name=split)
        templates[split] = template
        for i, shard_items in enumerate(shards):
            path = template.data_dir / f"{template.dataset_name}-{split}.shard{i:05d}.tmp"
            tasks.append(ShardTask(split=split, index=i, path=os.fspath(path), items=shard_items,
                                   loader=loader, skip_bad_patches=skip_bad_patches,
                                   file_format=file_format))
    total = sum(len(task.items) for task in tasks)
    workers = num_workers or default_num_workers(total, items_per_worker)
    with tqdm_utils.tqdm(total=total, desc="Reading patches", unit=" patches",
                         mininterval=1.0, leave=False) as bar:
        results = run_tasks(tasks, workers, bar.update)
    split_infos, shard_skipped = finish_splits(results, templates)
    report([*skipped, *shard_skipped])
    if not split_infos:
        raise PatchError("no readable patch at all", patch_id="*", path=source)
    return split_infos


# ---------------------------------------------------------------------------------------------
# The skip report.

def write_report(builder: tfds.core.DatasetBuilder, skipped: Sequence[dict[str, Any]], *,
                 name: str, split_order: Sequence[str] = (),
                 extra: Mapping[str, Any] | None = None) -> None:
    """Writes the skip report `name` into the directory being prepared (TFDS moves it into
    place with the shards): {"dataset", "config", "version", "num_skipped", "skipped", **extra}.
    Records are sorted by split (`split_order` first, the rest by name) and key."""
    rank = {split: i for i, split in enumerate(split_order)}
    report = {
        "dataset": builder.name,
        "config": builder.builder_config.name if builder.builder_config else None,
        "version": str(builder.version),
        "num_skipped": len(skipped),
        "skipped": sorted(skipped, key=lambda s: (rank.get(s["split"], len(rank)), s["split"],
                                                  s["patch_id"])),
        **(extra or {}),
    }
    atomic_files.write_atomic(os.path.join(os.fspath(builder.data_dir), name),
                              json.dumps(report, indent=2) + "\n")


def read_skipped(data_path: str | os.PathLike, name: str) -> list[dict[str, Any]]:
    """The `skipped` list of a prepared dataset's report `name` ([] when there is none)."""
    path = Path(data_path) / name
    if not path.is_file():
        return []
    return list(json.loads(path.read_text())["skipped"])


__all__ = [
    "ITEMS_PER_WORKER", "ExampleLoader", "Keyed", "ShardResult", "ShardTask", "available_cpus",
    "default_num_workers", "finish_splits", "generate_examples", "generate_splits",
    "plan_split", "read_skipped", "run_tasks", "skip_record", "write_report", "write_shard",
]
