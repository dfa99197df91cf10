"""The demo datasets, prepared once into a shared cache (mosaic_jax/data/demo_data.py)."""

import importlib
import os
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from mosaic_jax.data import demo_data
from mosaic_jax.training import configuration


def test_demo_cache_location_and_key(monkeypatch, tmp_path):
    monkeypatch.delenv(demo_data.CACHE_ENV, raising=False)
    assert demo_data.cache_root() == os.path.expanduser("~/.cache/mosaic_jax")
    monkeypatch.setenv(demo_data.CACHE_ENV, str(tmp_path / "env"))
    assert demo_data.cache_root() == str(tmp_path / "env")
    assert demo_data.cache_root(str(tmp_path / "cfg")) == str(tmp_path / "cfg")
    roots = {demo_data.demo_root("/c", num_patches=n, seed=s, version=v)
             for n, s, v in ((600, 0, 1), (601, 0, 1), (600, 1, 1), (600, 0, 2))}
    assert len(roots) == 4
    assert configuration.base_config().data.demo_cache_dir == ""
    import ml_collections

    bad = configuration.base_config().to_dict()
    bad["data"]["demo_cache_dir"] = 3  # e.g. from a hand-edited config.json
    bad = ml_collections.ConfigDict(bad)
    with pytest.raises(ValueError, match="data.demo_cache_dir"):
        configuration.validate_config(bad)


_PREPARE = """
import sys
from mosaic_jax.data.demo_data import demo_data_dir
print("DATA_DIR", demo_data_dir("", num_patches=40, seed=3), flush=True)
"""


@pytest.mark.slow
def test_two_demo_runs_at_once_write_the_data_once(tmp_path):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _PREPARE], cwd=REPO,
                              env=subprocess_env(MOSAIC_JAX_CACHE=str(cache)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    dirs = {line.split()[1] for out in outs for line in out.splitlines()
            if line.startswith("DATA_DIR")}
    root = demo_data.demo_root(str(cache), num_patches=40, seed=3)
    assert dirs == {os.path.join(root, "tfds")}
    assert sum(out.count("Demo data: writing 40") for out in outs) == 1
    # The demo's own synthetic metadata is no alarm (its md5 cannot be the release's).
    assert not any("md5" in out or "official release" in out for out in outs), outs
    assert all("Demo data (TFDS data_dir, e.g. for embed --data_dir): " in o for o in outs)
    assert not os.path.exists(os.path.join(root, "raw"))  # raw files are not kept
    import tensorflow_datasets as tfds

    import data_builders.bigearthnet_v2  # noqa: F401
    builder = tfds.builder("bigearthnet_v2", data_dir=os.path.join(root, "tfds"))
    assert builder.is_prepared() and sum(
        s.num_examples for s in builder.info.splits.values()) == 40


def test_sen12ms_demo_config_and_scenes():
    config = importlib.import_module("configs.mosaic1").get_config("demo,sen12ms")
    configuration.validate_config(config)
    assert config.data.name == "sen12ms" and config.data.demo and config.augment.out_size == 48
    scenes = demo_data.sen12ms_demo_scenes(config.data.demo_num_patches)
    assert sum(len(p) for p in scenes.values()) == config.data.demo_num_patches
    assert len(scenes[("fall", 6)]) == 30 and len(scenes[("spring", 63)]) == 4

