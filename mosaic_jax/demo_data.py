"""The embedded demo dataset: synthetic BigEarthNet v2 in the official layout, prepared by the
real `bigearthnet_v2` builder, so the demo exercises the same code as a real run.

Classes are learnable from spectra and texture, and S1 and S2 agree (see
`data_builders.fake_bigearthnet`). The prepared dataset is written once into a shared cache,
one folder per (generator version, number of patches, seed), and reused by every demo run:

    <cache>/demo_data/bigearthnet_v2-v<VERSION>-n<patches>-seed<seed>/tfds   (TFDS data_dir)

`<cache>` is the config key `data.demo_cache_dir` when set, else `$MOSAIC_JAX_CACHE`, else
`~/.cache/mosaic_jax`. Two runs that start at once take turns through a file lock: the first
writes and prepares, the second waits and reuses. An interrupted preparation is redone (the raw
files carry a completion marker; TFDS writes its shards atomically). The raw files are deleted
once prepared (they are not read again).
"""

from __future__ import annotations

import contextlib
import fcntl
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


def demo_root(cache: str, *, num_patches: int, seed: int,
              version: int = GENERATOR_VERSION) -> str:
    """The folder of one demo dataset in `cache`, keyed by everything that changes its bytes."""
    return os.path.join(cache, "demo_data", f"bigearthnet_v2-v{version}-n{num_patches}-seed{seed}")


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
                         verbose: bool = True) -> str:
    """Writes the raw files under `root/raw` and prepares them into `root/tfds`, once.

    Safe to call from several processes at once (a file lock beside `root`). Returns the TFDS
    data_dir to read the `bigearthnet_v2` dataset from.
    """
    import tensorflow_datasets as tfds

    import data_builders.bigearthnet_v2  # noqa: F401  (registers the builder)
    from data_builders.fake_bigearthnet import write_fake_bigearthnet

    raw = os.path.join(root, "raw")
    data_dir = os.path.join(root, "tfds")
    say = print if verbose else (lambda *a, **k: None)
    with _locked(root.rstrip(os.sep) + ".lock"):
        builder = tfds.builder("bigearthnet_v2", data_dir=data_dir, file_format="array_record")
        if builder.is_prepared():
            return data_dir
        done = os.path.join(raw, f".complete_{num_patches}_{seed}")
        if not os.path.exists(done):
            say(f"Demo data: writing {num_patches} synthetic BigEarthNet v2 patches to {raw} "
                "...", flush=True)
            shutil.rmtree(raw, ignore_errors=True)
            write_fake_bigearthnet(raw, num_patches, seed=seed)
            open(done, "w").close()
        say(f"Demo data: preparing them with the bigearthnet_v2 builder into {data_dir} ...",
            flush=True)
        # TFDS prints "Downloading and preparing dataset Unknown size ..." to stdout: the line
        # above says what happens instead. Its progress bar (stderr) stays.
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=raw))
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(os.path.join(data_dir, "downloads"), ignore_errors=True)
    return data_dir


def demo_data_dir(cache_dir: str, *, num_patches: int, seed: int, verbose: bool = True) -> str:
    """Prepares (or reuses) the demo dataset of `(num_patches, seed)` in the cache
    (`cache_root(cache_dir)`) and returns its TFDS data_dir; prints where it is when
    `verbose`, so that `embed --data_dir` can be pointed there."""
    root = demo_root(cache_root(cache_dir), num_patches=num_patches, seed=seed)
    data_dir = prepare_demo_dataset(root, num_patches=num_patches, seed=seed, verbose=verbose)
    if verbose:
        print(f"Demo data (TFDS data_dir, e.g. for embed --data_dir): {data_dir}", flush=True)
    return data_dir
