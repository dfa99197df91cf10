"""Test setup: 8 forced CPU devices for the sharding tests (set before jax is imported), and a
per-session persistent compilation cache so that identical programs compile once."""

import os
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mosaic_jax_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prepared_fake(tmp_path_factory):
    """TFDS data_dir holding a prepared 40-patch fake BigEarthNet v2 (official layout)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import data_builders.bigearthnet_v2  # noqa: F401  (registers the builder)
    from data_builders.fake_bigearthnet import write_fake_bigearthnet

    root = tmp_path_factory.mktemp("fake_bigearthnet")
    write_fake_bigearthnet(root / "raw", 40, seed=1)
    tfds.builder("bigearthnet_v2", data_dir=str(root / "tfds"),
                 file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root / "raw")))
    return str(root / "tfds")
