"""Host input pipeline on Grain: read prepared TFDS examples, normalise, batch, shard.

The host only decodes, selects and normalises bands and batches (augmentation runs on the
accelerator, see `mosaic_jax.data.augment`). Sources are random-access (``len`` and ``__getitem__``
returning a dict of numpy arrays), e.g. the TFDS array_record data source from `open_source`, or
a plain list of such dicts in tests.

Sharding: every process builds the same global element order (epoch e is a numpy permutation
seeded by (seed, e)); global batch ``k`` is the elements ``k*G .. k*G+G-1`` of that order and
process ``p`` takes elements ``p*b .. p*b+b-1`` of it (``b = G // process_count``). So the union
of the local batches of all processes is exactly the one-process global batch, epochs run into
each other without a partial batch, and the element order does not depend on the number of Grain
worker processes. Each Grain element is one local batch, so an iterator's state is just the
next batch index: `get_state()` / `set_state()` resume exactly.

Reading: for TFDS array_record sources only the needed features (s1, s2, labels; patch_id for
subsets) are decoded, by TFDS's own NumPy decoder; other sources are indexed normally.

Subsets: `train_fraction` and `label_fraction` select patches by a stable hash of
(subset_seed, patch_id) (`subset_mask`), the same on every host, run and storage order. A patch
with hash value u in [0, 1) is in the training subset iff u < train_fraction and labelled iff
u < train_fraction * label_fraction, so labelled subsets are nested within the training subset and
within each other (the 1 % labelled patches are part of the 10 % ones).
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import math
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from etils import epath

from mosaic_jax.data import bands as bands_lib

_PREPARE_HINT = (
    "prepare it with: python -m data_builders.prepare {name} --manual_dir <raw data dir> "
    "--data_dir {data_dir}"
)


# ---------------------------------------------------------------------------------------------
# Sources


def _versions(directory: str) -> list[tuple[tuple[int, ...], str]]:
    """(parsed version, path) of the prepared versions (with dataset_info.json) in directory.

    `directory` is a local path or a URL (``gs://...``), listed through ``etils.epath``.
    """
    out = []
    folder = epath.Path(directory)
    if folder.is_dir():
        for child in folder.iterdir():
            v = child.name
            if (child / "dataset_info.json").is_file():
                try:
                    out.append((tuple(int(p) for p in v.split(".")), os.path.join(directory, v)))
                except ValueError:
                    continue
    return out


def _find_prepared(name: str, data_dir: str) -> str | None:
    """Directory of a prepared dataset, newest version, or None.

    `name` is "dataset", "dataset/config" or either with ":version"; layouts
    data_dir/dataset/version and data_dir/dataset/config/version. Without a config, a dataset
    prepared with configs resolves to its "default" config, or to its only config. `data_dir` is
    a local path or a URL (``gs://bucket/tfds``).
    """
    base, _, version = name.partition(":")
    dataset, _, config = base.partition("/")
    root = os.path.join(data_dir, dataset)
    if config:
        dirs = [os.path.join(root, config)]
    elif _versions(root):
        dirs = [root]
    else:
        root_path = epath.Path(root)
        configs = sorted(c.name for c in root_path.iterdir()
                         if _versions(os.path.join(root, c.name))) if root_path.is_dir() else []
        if "default" in configs:
            configs = ["default"]
        if len(configs) > 1:
            raise ValueError(f"{dataset} is prepared with several configs {configs} in "
                             f"{data_dir}; name one, e.g. {dataset}/{configs[0]}")
        dirs = [os.path.join(root, c) for c in configs]
    found = [v for d in dirs for v in _versions(d)]
    if version:
        found = [v for v in found if os.path.basename(v[1]) == version]
    return max(found)[1] if found else None


def open_source(name: str, split: str, data_dir: str) -> Any:
    """Opens a prepared TFDS dataset as a random-access array_record data source.

    Args:
      name: TFDS name, e.g. "bigearthnet_v2" or "sen12ms", optionally with a config and/or
        version ("bigearthnet_v2/default:1.0.0"); without a config, "default" is used when the
        dataset was prepared with configs.
      split: TFDS split spec, e.g. "train", "validation", "test[:1000]".
      data_dir: TFDS data directory the dataset was prepared into: a local path or a URL
        (``gs://bucket/tfds``).

    Returns:
      A data source with len() and __getitem__ returning a dict of numpy arrays.

    Raises:
      FileNotFoundError: the dataset is not prepared in data_dir (the message says how to).
      ValueError: it was prepared in another file format than array_record.
    """
    path = _find_prepared(name, data_dir)
    if path is None:
        dataset, _, config = name.partition(":")[0].partition("/")
        hint = _PREPARE_HINT.format(name=dataset, data_dir=data_dir)
        raise FileNotFoundError(f"dataset {name!r} is not prepared in {data_dir!r}; " + hint
                                + (f" --config {config}" if config else ""))
    import tensorflow_datasets as tfds  # heavy import: only when a source is opened

    # Reading from the directory needs neither TensorFlow nor the builder's code.
    builder = tfds.builder_from_directory(path)
    file_format = getattr(builder.info, "file_format", None)
    file_format = str(getattr(file_format, "value", file_format) or "")
    if "array_record" not in file_format:
        raise ValueError(
            f"{path} was prepared as {file_format or 'unknown format'!r}, random access needs "
            "array_record; re-prepare with file_format=array_record"
        )
    return builder.as_data_source(split=split)


class _FeatureReader:
    """Reads examples of a TFDS data source decoding only `keys`, with TFDS's own NumPy decoder
    (`FeaturesDict.deserialize_example_np` over the selected features): the other features
    (e.g. the reference maps) are parsed by protobuf but neither converted nor copied out."""

    def __init__(self, source: Any, keys: Sequence[str]):
        import tensorflow_datasets as tfds  # heavy import: only for TFDS sources

        features = source.dataset_info.features
        missing = [k for k in keys if k not in features]
        if missing:
            raise KeyError(f"the dataset has no feature {missing}; it has {sorted(features)}")
        self.raw = source.data_source
        self.features = tfds.features.FeaturesDict({k: features[k] for k in keys})

    def decode(self, record: bytes) -> dict[str, np.ndarray]:
        return self.features.deserialize_example_np(record)

    def read(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        # One record at a time: array_record's batched read starts a thread pool per call, which
        # costs more CPU than it saves here; parallelism comes from Grain threads / workers.
        return [self.decode(self.raw[i]) for i in indices]


def _is_tfds_source(source: Any) -> bool:
    """A TFDS data source (serialized records in `data_source`, features in `dataset_info`)."""
    return hasattr(source, "data_source") and hasattr(source, "dataset_info")


def _make_reader(source: Any, keys: Sequence[str]) -> Any:
    """A `read(indices) -> list[dict]` for `source`: `keys` only for a TFDS source."""
    if _is_tfds_source(source):
        return _FeatureReader(source, keys).read
    return functools.partial(_get_many, source)


def _to_str(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        x = x.item()
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)
    return str(x)


def read_patch_ids(source: Any, *, chunk_size: int = 256,
                   num_threads: int | None = None) -> list[str]:
    """patch_id of every example of `source`, in source order.

    Reads only what is needed: a source exposing `patch_ids` is used as is; for a TFDS
    array_record source the raw records are read in chunks by `num_threads` threads (default:
    min(16, CPU count)) and TFDS's decoder converts only the `patch_id` feature (the images are
    not decoded; the records still have to be read, decompressed and parsed); any other source
    is indexed example by example. Nothing is cached.
    """
    ids = getattr(source, "patch_ids", None)
    if ids is not None:
        return [_to_str(i) for i in ids]
    n = len(source)
    if not _is_tfds_source(source) or len(source.data_source) != n:
        return [_to_str(source[i]["patch_id"]) for i in range(n)]
    reader = _FeatureReader(source, ("patch_id",))

    def chunk(start: int) -> list[str]:
        return [_to_str(ex["patch_id"])
                for ex in reader.read(range(start, min(n, start + chunk_size)))]

    starts = range(0, n, chunk_size)
    threads = num_threads or min(16, os.cpu_count() or 1)
    if threads <= 1 or len(starts) <= 1:
        return [pid for s in starts for pid in chunk(s)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return [pid for part in pool.map(chunk, starts) for pid in part]


# ---------------------------------------------------------------------------------------------
# Subsets


def _check_fraction(name: str, fraction: float) -> float:
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"{name} must be in [0, 1], got {fraction}")
    return fraction


def subset_hash(patch_ids: Sequence[str | bytes], seed: int) -> np.ndarray:
    """Stable per-patch value in [0, 1): first 8 bytes of sha256(f"{seed}:{patch_id}") / 2**64.

    Identical on every host, run and Python version (unlike `hash`). float64 [len(patch_ids)].
    """
    out = np.empty(len(patch_ids), np.float64)
    for i, pid in enumerate(patch_ids):
        digest = hashlib.sha256(f"{seed}:{_to_str(pid)}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return out


def subset_mask(patch_ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Deterministic subset membership: bool [len(patch_ids)], True iff subset_hash < fraction.

    About `fraction` of the patches are selected; a larger fraction selects a superset; another
    seed selects an independent subset. ValueError unless 0 <= fraction <= 1.
    """
    fraction = _check_fraction("fraction", fraction)
    return subset_hash(patch_ids, seed) < fraction


# ---------------------------------------------------------------------------------------------
# Datasets


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"invalid process_index {process_index} / process_count {process_count}")
    return int(process_index), int(process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of "
            f"process_count {process_count}"
        )
    return global_batch_size // process_count


def _get_many(source: Any, indices: Sequence[int]) -> list[dict]:
    """Reads several examples; uses the source's batched read when it has one."""
    if hasattr(source, "__getitems__"):
        return list(source.__getitems__(list(indices)))
    return [source[i] for i in indices]


# modality ("s1", "s2") -> (mean, std) float32 [bands] in stored units (`data.input_norm`).
NormStats = Mapping[str, tuple[np.ndarray, np.ndarray]]


class _Normalizer:
    """Band selection + normalisation of one example's s1/s2 into batch buffers."""

    def __init__(self, dataset: str, s1_bands: str | Sequence[str], s2_bands: str | Sequence[str],
                 norm_stats: NormStats | None = None):
        self.dataset = dataset
        self.s1_bands = bands_lib.resolve_bands(s1_bands, dataset, "s1")
        self.s2_bands = bands_lib.resolve_bands(s2_bands, dataset, "s2")
        self.stats = dict(norm_stats or {})  # modality -> (mean, std) replacing the dataset's
        # Fail early on bands without statistics.
        if "s1" not in self.stats:
            bands_lib.band_stats(dataset, "s1", self.s1_bands)
        if "s2" not in self.stats:
            bands_lib.band_stats(dataset, "s2", self.s2_bands)

    def new_batch(self, example: dict, size: int) -> dict[str, np.ndarray]:
        """Zeroed buffers for `size` examples shaped like `example`."""
        h1, w1 = np.shape(example["s1"])[:2]
        h2, w2 = np.shape(example["s2"])[:2]
        return dict(
            s1=np.zeros((size, h1, w1, len(self.s1_bands)), np.float32),
            s2=np.zeros((size, h2, w2, len(self.s2_bands)), np.float32),
            labels=np.zeros((size, np.shape(example["labels"])[-1]), np.float32),
        )

    def fill(self, batch: dict[str, np.ndarray], j: int, example: dict) -> None:
        bands_lib.normalize(example["s1"], self.dataset, "s1", self.s1_bands, out=batch["s1"][j],
                            stats=self.stats.get("s1"))
        bands_lib.normalize(example["s2"], self.dataset, "s2", self.s2_bands, out=batch["s2"][j],
                            stats=self.stats.get("s2"))
        batch["labels"][j] = np.asarray(example["labels"], np.float32)


class _EpochOrder:
    """The global element order: epoch e is a permutation of range(n) seeded by (seed, e).

    numpy's PCG64 seeded with a SeedSequence of (seed, e): the same on every host (given the
    same numpy). Permutations are computed lazily and the last two are cached (O(n) memory).
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # Grain calls batches from several threads

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                if len(self._cache) >= 2:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = perm
            return perm

    def take(self, start: int, count: int) -> np.ndarray:
        """Elements start .. start+count-1 of the infinite order (positions into range(n))."""
        out = np.empty(count, np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.n)
            m = min(count - done, self.n - offset)
            out[done:done + m] = self._perm(epoch)[offset:offset + m]
            done += m
        return out

    def __getstate__(self) -> dict:
        return dict(n=self.n, seed=self.seed)

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["n"], state["seed"])


class _TrainBatch:
    """Local train batch k -> dict of numpy arrays (picklable for Grain worker processes)."""

    def __init__(self, source: Any, order: _EpochOrder, kept: np.ndarray,
                 labelled: np.ndarray, norm: _Normalizer, global_batch_size: int,
                 local_batch_size: int, process_index: int):
        self.order, self.kept, self.labelled = order, kept, labelled
        self.read = _make_reader(source, ("s1", "s2", "labels"))
        self.norm = norm
        self.g, self.b, self.p = global_batch_size, local_batch_size, process_index

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        start = int(k) * self.g + self.p * self.b
        pos = self.order.take(start, self.b)
        examples = self.read([int(i) for i in self.kept[pos]])
        batch = self.norm.new_batch(examples[0], self.b)
        for j, ex in enumerate(examples):
            self.norm.fill(batch, j, ex)
        mask = self.labelled[pos]
        batch["labels"] *= mask[:, None]
        batch["label_mask"] = mask.copy()
        return batch


class _EvalBatch:
    """Local eval batch k -> dict with a `valid` mask; padding rows are zeros."""

    def __init__(self, source: Any, norm: _Normalizer, global_batch_size: int,
                 local_batch_size: int, process_index: int):
        self.source, self.norm = source, norm
        self.read = _make_reader(source, ("s1", "s2", "labels"))
        self.g, self.b, self.p = global_batch_size, local_batch_size, process_index
        self.n = len(source)

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        start = int(k) * self.g + self.p * self.b
        index = np.arange(start, start + self.b, dtype=np.int64)
        valid = index < self.n
        examples = self.read([int(i) for i in index[valid]])
        template = examples[0] if examples else self.source[0]
        batch = self.norm.new_batch(template, self.b)
        for j, ex in enumerate(examples):  # valid rows come first
            self.norm.fill(batch, j, ex)
        batch["valid"] = valid
        batch["index"] = np.where(valid, index, -1)
        return batch


def _read_options(prefetch_buffer: int) -> grain.ReadOptions:
    if prefetch_buffer < 0:
        raise ValueError(f"prefetch_buffer must be >= 0, got {prefetch_buffer}")
    # Each element is a whole batch; threads beyond the buffer size would idle.
    return grain.ReadOptions(num_threads=prefetch_buffer, prefetch_buffer_size=prefetch_buffer)


PARENT_POLL_SECONDS = 0.5


def exit_with_parent(worker_index: int = 0, worker_count: int = 0) -> None:
    """Grain worker start-up: the worker ends itself once its parent process is gone.

    A trainer killed without warning (SIGKILL, the OOM killer) cannot stop its workers, which
    would otherwise live on, holding memory, until the machine is rebooted; when they end,
    multiprocessing's resource tracker sees its last client go and ends too. The check is a
    daemon thread comparing ``os.getppid()`` with the parent at start (orphans are re-parented).
    """
    del worker_index, worker_count
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def make_train_dataset(
    source: Any,
    *,
    dataset: str,
    global_batch_size: int,
    seed: int,
    s1_bands: str | Sequence[str],
    s2_bands: str | Sequence[str],
    train_fraction: float = 1.0,
    label_fraction: float = 1.0,
    subset_seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    prefetch_buffer: int = 2,
    norm_stats: NormStats | None = None,
) -> grain.IterDataset:
    """Infinite, shuffled, process-sharded training batches.

    Args:
      source: random-access source of examples (dict with s1, s2, labels, patch_id).
      dataset: "bigearthnet_v2" or "sen12ms" (selects band layout and statistics).
      global_batch_size: batch size over all processes (multiple of process_count).
      seed: shuffle seed; epoch e uses a permutation derived from (seed, e), equal on all hosts.
      s1_bands, s2_bands: band names in model channel order, or a subset name ("official12").
      train_fraction: fraction of the split kept (by patch_id hash, see module docstring).
      label_fraction: fraction of the kept patches whose labels are used (the rest have
        label_mask False and zeroed labels).
      subset_seed: seed of the patch_id hash.
      process_index, process_count: this process's slice; default jax.process_index/count().
      worker_count: Grain worker processes (0: threads in this process only). Grain reads its
        absl flags when it starts them, so the program must have parsed absl's flags (an absl
        app, as ``python -m mosaic_jax.main``; in a plain script or test,
        ``absl.flags.FLAGS.mark_as_parsed()`` at start-up): ValueError otherwise.
      prefetch_buffer: local batches prefetched (per worker when worker_count > 0).
      norm_stats: per modality (mean, std) replacing the dataset's statistics
        (`mosaic_jax.data.input_norm.norm_stats`); default: the dataset's.

    Returns:
      IterDataset of dicts: s1 float32 [b, H, W, c1], s2 float32 [b, H, W, c2], labels float32
      [b, C], label_mask bool [b], with b = global_batch_size // process_count. Its iterator
      supports get_state()/set_state() for exact resumption.
    """
    p, count = _process_info(process_index, process_count)
    b = _local_batch_size(global_batch_size, count)
    train_fraction = _check_fraction("train_fraction", train_fraction)
    label_fraction = _check_fraction("label_fraction", label_fraction)
    if train_fraction == 0.0:
        raise ValueError("train_fraction must be > 0")
    norm = _Normalizer(dataset, s1_bands, s2_bands, norm_stats)
    n = len(source)
    if n == 0:
        raise ValueError("the source is empty")
    label_cut = train_fraction * label_fraction
    if train_fraction < 1.0 or 0.0 < label_cut < train_fraction:
        u = subset_hash(read_patch_ids(source), subset_seed)
        kept = np.flatnonzero(u < train_fraction)
        labelled = u[kept] < label_cut
        if kept.size == 0:
            raise ValueError(f"train_fraction {train_fraction} keeps none of {n} examples")
    else:  # no patch ids needed
        kept = np.arange(n)
        labelled = np.full(n, label_cut > 0.0)
    order = _EpochOrder(int(kept.size), seed)
    num_batches = (sys.maxsize - global_batch_size) // global_batch_size
    ds = grain.MapDataset.range(num_batches).map(
        _TrainBatch(source, order, kept, labelled, norm, global_batch_size, b, p)
    )
    if worker_count > 0:
        _require_parsed_flags(worker_count)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        return it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=max(1, prefetch_buffer)
            ),
            worker_init_fn=exit_with_parent,
        )
    return ds.to_iter_dataset(_read_options(prefetch_buffer))


def _require_parsed_flags(worker_count: int) -> None:
    """Grain reads absl flags (its ``grain_*`` options) when it starts worker processes; the
    program, not this library, decides whether absl's flags are parsed."""
    if not flags.FLAGS.is_parsed():
        raise ValueError(
            f"worker_count={worker_count} starts Grain worker processes, which read absl "
            "flags, but this program has not parsed them: run it as an absl app "
            "(absl.app.run) or call absl.flags.FLAGS.mark_as_parsed() at start-up")


def make_eval_dataset(
    source: Any,
    *,
    dataset: str,
    global_batch_size: int,
    s1_bands: str | Sequence[str],
    s2_bands: str | Sequence[str],
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch_buffer: int = 2,
    norm_stats: NormStats | None = None,
) -> grain.IterDataset:
    """One ordered pass over `source`; every example appears exactly once over all processes.

    Global batch k holds examples k*G .. k*G+G-1 (process p: its slice p*b .. p*b+b-1); all
    processes yield ceil(len / G) batches (static shapes for SPMD). Elements: s1, s2, labels as in
    `make_train_dataset`, `valid` bool [b] (False on padding rows, which are zeros and come
    last) and `index` int64 [b] (example index in the source, -1 on padding). `norm_stats` as
    in `make_train_dataset`.
    """
    p, count = _process_info(process_index, process_count)
    b = _local_batch_size(global_batch_size, count)
    norm = _Normalizer(dataset, s1_bands, s2_bands, norm_stats)
    n = len(source)
    if n == 0:
        raise ValueError("the source is empty")
    num_batches = -(-n // global_batch_size)
    ds = grain.MapDataset.range(num_batches).map(_EvalBatch(source, norm, global_batch_size, b, p))
    return ds.to_iter_dataset(_read_options(prefetch_buffer))
