"""The embedded demo datasets: synthetic BigEarthNet v2 or SEN12MS in the official layout,
prepared by the real `bigearthnet_v2` / `sen12ms` builder, so the demo exercises the same code
as a real run.

Classes are learnable from the images, and S1 and S2 agree (see
`data_builders.fake_bigearthnet`; for SEN12MS `data_builders.fake_sen12ms.learnable_triplet`:
every pixel's spectrum follows its IGBP class). The prepared dataset is written once into a
shared cache, one folder per (dataset, generator version, number of patches, seed), and reused
by every demo run:

    <cache>/demo_data/<dataset>-v<VERSION>-n<patches>-seed<seed>/tfds   (TFDS data_dir)

`<cache>` is the config key `data.demo_cache_dir` when set, else `$MOSAIC_JAX_CACHE`, else
`~/.cache/mosaic_jax`. Two runs that start at once take turns through a file lock: the first
writes and prepares, the second waits and reuses. An interrupted preparation is redone (the raw
files carry a completion marker; TFDS writes its shards atomically). The raw files are deleted
once prepared (they are not read again).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import io
import os
import shutil
from collections.abc import Iterator

# Bump when the synthetic data generator changes what it writes: old caches are then not reused.
GENERATOR_VERSION = 1
CACHE_ENV = "MOSAIC_JAX_CACHE"
DEFAULT_CACHE = "~/.cache/mosaic_jax"


def cache_root(configured: str = "") -> str:
    """The cache folder: `configured` (config key `data.demo_cache_dir`), else
    `$MOSAIC_JAX_CACHE`, else `~/.cache/mosaic_jax`; `~` expanded, made absolute."""
    root = configured or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return os.path.abspath(os.path.expanduser(root))


def demo_root(cache: str, *, num_patches: int, seed: int, version: int = GENERATOR_VERSION,
              dataset: str = "bigearthnet_v2") -> str:
    """The folder of one demo dataset in `cache`, keyed by everything that changes its bytes."""
    return os.path.join(cache, "demo_data",
                        f"{dataset}-v{version}-n{num_patches}-seed{seed}")


def sen12ms_demo_scenes(num_patches: int) -> dict[tuple[str, int], list[int]]:
    """Patch numbers per fake SEN12MS scene: a quarter of `num_patches` in the validation scene,
    4 in the hold-out (test) scene, the rest split between the two train scenes (see
    `data_builders.fake_sen12ms.DEFAULT_SCENES`)."""
    from data_builders.fake_sen12ms import DEFAULT_SCENES  # TFDS, GDAL: only the demo needs them

    test, validation, train_a, train_b = (("spring", 63), ("fall", 6), ("summer", 146),
                                          ("winter", 2))
    assert {test, validation, train_a, train_b} == set(DEFAULT_SCENES)
    n_val = max(num_patches // 4, 1)
    n_train = max(num_patches - n_val - 4, 2)
    counts = {test: 4, validation: n_val, train_a: n_train // 2,
              train_b: n_train - n_train // 2}
    return {scene: list(range(1, n + 1)) for scene, n in counts.items()}


def _write_raw(dataset: str, raw: str, num_patches: int, seed: int) -> None:
    if dataset == "sen12ms":
        # TFDS, GDAL: only the demo needs them
        from data_builders.fake_sen12ms import write_fake_sen12ms

        scenes = sen12ms_demo_scenes(num_patches)
        write_fake_sen12ms(raw, list(scenes), scenes, seed=seed,
                           include_broken_triplet=False, learnable=True)
    else:
        # TFDS, GDAL: only the demo needs them
        from data_builders.fake_bigearthnet import write_fake_bigearthnet

        write_fake_bigearthnet(raw, num_patches, seed=seed)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created) while the block runs; other processes
    taking the same lock wait."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_demo_dataset(root: str, *, num_patches: int = 600, seed: int = 0,
                         verbose: bool = True, dataset: str = "bigearthnet_v2") -> str:
    """Writes the raw files under `root/raw` and prepares them into `root/tfds`, once.

    Safe to call from several processes at once (a file lock beside `root`). Returns the TFDS
    data_dir to read `dataset` ("bigearthnet_v2" or "sen12ms") from.
    """
    import tensorflow_datasets as tfds  # TFDS, GDAL: only the demo needs them

    importlib.import_module(f"data_builders.{dataset}")  # registers the builder

    raw = os.path.join(root, "raw")
    data_dir = os.path.join(root, "tfds")
    say = print if verbose else (lambda *a, **k: None)
    with _locked(root.rstrip(os.sep) + ".lock"):
        # The synthetic metadata is not the official release: no checksum to match, and
        # nothing to say about it.
        extra = {"synthetic": True} if dataset == "bigearthnet_v2" else {}
        builder = tfds.builder(dataset, data_dir=data_dir, file_format="array_record", **extra)
        if builder.is_prepared():
            return data_dir
        done = os.path.join(raw, f".complete_{num_patches}_{seed}")
        if not os.path.exists(done):
            say(f"Demo data: writing {num_patches} synthetic {dataset} patches to {raw} ...",
                flush=True)
            shutil.rmtree(raw, ignore_errors=True)
            _write_raw(dataset, raw, num_patches, seed)
            open(done, "w").close()
        say(f"Demo data: preparing them with the {dataset} builder into {data_dir} ...",
            flush=True)
        # TFDS prints "Downloading and preparing dataset Unknown size ..." to stdout: the line
        # above says what happens instead. Its progress bar (stderr) stays.
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=raw))
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(os.path.join(data_dir, "downloads"), ignore_errors=True)
    return data_dir


def demo_data_dir(cache_dir: str, *, num_patches: int, seed: int, verbose: bool = True,
                  dataset: str = "bigearthnet_v2") -> str:
    """Prepares (or reuses) the demo `dataset` of `(num_patches, seed)` in the cache
    (`cache_root(cache_dir)`) and returns its TFDS data_dir; prints where it is when
    `verbose`, so that `embed --data_dir` can be pointed there."""
    root = demo_root(cache_root(cache_dir), num_patches=num_patches, seed=seed, dataset=dataset)
    data_dir = prepare_demo_dataset(root, num_patches=num_patches, seed=seed, verbose=verbose,
                                    dataset=dataset)
    if verbose:
        print(f"Demo data (TFDS data_dir, e.g. for embed --data_dir): {data_dir}", flush=True)
    return data_dir
