"""The shared shard writer: TFDS's order and shard cuts, skip handling and the report on a toy
builder, and both real builders preparing their fakes in a process without TensorFlow."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import hide_packages_source

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("rasterio")

from tensorflow_datasets.core import shuffle  # noqa: E402
from tensorflow_datasets.core.utils import shard_utils  # noqa: E402

from data_builders import shard_writer  # noqa: E402
from data_builders.geotiff import PatchError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Planning.

def _tfds_order(split: str, keys: list[str], tmp_path: Path) -> list[str]:
    """The order TFDS's own writer gives these keys (its in-memory shuffler)."""
    shuffler = shuffle.Shuffler(dirpath=tmp_path, hash_salt=split, disable_shuffling=False)
    for key in keys:
        shuffler.add(key, key.encode())
    return [data.decode() for _, data in shuffler]


def test_plan_split_follows_tfds_order_and_shard_boundaries(tmp_path):
    keys = [f"patch_{i}" for i in range(37)]
    items = [(key, i) for i, key in enumerate(keys)]
    for split in ("train", "test"):
        shards = shard_writer.plan_split(split, items, example_size=100,
                                         shard_config=shard_utils.ShardConfig(num_shards=4))
        flat = [key for shard in shards for key, _ in shard]
        assert flat == _tfds_order(split, keys, tmp_path)
        assert all(int(key.split("_")[1]) == i for shard in shards for key, i in shard)
        ends = np.cumsum([len(shard) for shard in shards]).tolist()
        assert ends == list(shard_utils.get_shard_boundaries(len(keys), 4))
    assert (_tfds_order("train", keys, tmp_path) != _tfds_order("test", keys, tmp_path))


def test_plan_split_shard_count_duplicates_and_edge_cases():
    items = [(f"k{i}", i) for i in range(40)]
    config = shard_utils.ShardConfig()
    size = 200 << 20  # 8 GB in all: TFDS would write several shards.
    shards = shard_writer.plan_split("train", items, example_size=size, shard_config=config)
    assert len(shards) == config.get_number_shards(40 * size, 40) > 1
    assert len(shard_writer.plan_split("train", items, example_size=10,
                                       shard_config=config)) == 1
    few = shard_writer.plan_split("train", items[:3], example_size=10,
                                  shard_config=shard_utils.ShardConfig(num_shards=8))
    assert [len(shard) for shard in few] == [1, 1, 1]
    assert shard_writer.plan_split("train", [], example_size=10, shard_config=config) == []
    with pytest.raises(ValueError, match="key k3 appears more than once in split train"):
        shard_writer.plan_split("train", [*items, ("k3", 99)], example_size=10,
                                shard_config=config)


def test_default_num_workers():
    cpus = shard_writer.available_cpus()
    assert shard_writer.default_num_workers(10) == 1
    assert shard_writer.default_num_workers(1000, items_per_worker=500) == min(cpus, 2)
    assert shard_writer.default_num_workers(10**9) == cpus


# ---------------------------------------------------------------------------------------------
# A toy dataset through the whole path (in this process).

@dataclasses.dataclass(frozen=True)
class ToyLoader(shard_writer.ExampleLoader[int]):
    """Item i -> {"value": i, "name": "k<i>"}; the items in `bad` raise `PatchError`."""

    bad: frozenset[int] = frozenset()

    def features(self) -> tfds.features.FeaturesDict:
        return tfds.features.FeaturesDict({"value": tfds.features.Scalar(dtype=np.int64),
                                           "name": tfds.features.Text()})

    def serialized_size(self) -> int:
        return 64

    def load(self, item: int) -> dict:
        if item in self.bad:
            raise PatchError("broken", patch_id=f"k{item}", path=f"/data/{item}.tif")
        return {"value": item, "name": f"k{item}"}


class ShardWriterToy(tfds.core.GeneratorBasedBuilder):
    """Writes `items` (split -> item ints, key "k<i>") through `shard_writer.generate_splits`."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, items: dict[str, list[int]], bad: frozenset[int] = frozenset(),
                 skip: bool = True, **kwargs):
        self._items, self._bad, self._skip = items, bad, skip
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=ToyLoader().features())

    def _split_generators(self, dl_manager):
        raise NotImplementedError

    def _generate_examples(self):
        raise NotImplementedError

    def _generate_splits(self, dl_manager, download_config):
        return shard_writer.generate_splits(
            self, {split: [(f"k{i}", i) for i in items] for split, items in self._items.items()},
            ToyLoader(self._bad), download_config=download_config, skip_bad_patches=self._skip,
            num_workers=1, report=self._report, skipped=[
                {"split": "train", "patch_id": "k-1", "path": None, "reason": "planning"}],
            source="/data")

    def _report(self, skipped):
        shard_writer.write_report(self, skipped, name="report.json",
                                  split_order=("train", "test"), extra={"note": "toy"})


def _toy(tmp_path: Path, name: str, **kwargs):
    download = tfds.download.DownloadConfig(num_shards=kwargs.pop("num_shards", 2),
                                            max_examples_per_split=kwargs.pop("limit", None))
    builder = ShardWriterToy(data_dir=tmp_path / name, file_format="array_record", **kwargs)
    builder.download_and_prepare(download_config=download)
    return builder


def _values(builder) -> dict[str, list[int]]:
    return {split: [int(source[i]["value"]) for i in range(len(source))]
            for split, source in builder.as_data_source().items()}


def test_toy_dataset_order_shards_skips_and_report(tmp_path):
    items = {"train": list(range(20)), "test": list(range(100, 106)),
             "validation": [200, 201]}
    bad = frozenset({3, 7, 104, 200, 201})
    builder = _toy(tmp_path, "toy", items=items, bad=bad)
    got = _values(builder)
    assert set(got) == {"train", "test"}  # Every validation item was bad: no split.
    for split in got:
        keys = _tfds_order(split, [f"k{i}" for i in items[split] if i not in bad], tmp_path)
        assert [f"k{v}" for v in got[split]] == keys
    info = builder.info.splits
    assert info["train"].num_shards == 2 and sum(info["train"].shard_lengths) == 18
    assert info["test"].num_examples == 5
    files = sorted(p.name for p in Path(builder.data_path).iterdir())
    assert "shard_writer_toy-train.array_record-00001-of-00002" in files
    assert not [f for f in files if f.endswith(".tmp")]
    report = json.loads((Path(builder.data_path) / "report.json").read_text())
    assert report["dataset"] == "shard_writer_toy" and report["version"] == "1.0.0"
    assert report["note"] == "toy" and report["num_skipped"] == 6
    assert [(r["split"], r["patch_id"]) for r in report["skipped"]] == [
        ("train", "k-1"), ("train", "k3"), ("train", "k7"), ("test", "k104"),
        ("validation", "k200"), ("validation", "k201")]
    assert report["skipped"][1]["path"] == "/data/3.tif"
    assert report["skipped"][1]["reason"] == "patch k3: broken (file /data/3.tif)"
    assert shard_writer.read_skipped(builder.data_path, "report.json") == report["skipped"]
    assert shard_writer.read_skipped(tmp_path, "report.json") == []


def test_toy_dataset_strict_empty_and_limited(tmp_path):
    with pytest.raises(PatchError, match="patch k2: broken"):
        _toy(tmp_path, "strict", items={"train": [1, 2, 3]}, bad=frozenset({2}), skip=False)
    with pytest.raises(PatchError, match=r"patch \*: no readable patch at all \(file /data\)"):
        _toy(tmp_path, "empty", items={"train": [1, 2]}, bad=frozenset({1, 2}))
    limited = _toy(tmp_path, "limited", items={"train": [5, 6, 7, 8], "test": [9]}, limit=2,
                   num_shards=None)
    assert {split: sorted(v) for split, v in _values(limited).items()} == {
        "train": [5, 6], "test": [9]}


def test_generate_examples_skips_and_counts():
    skipped: list[dict] = []
    calls = []
    out = list(shard_writer.generate_examples(
        ToyLoader(frozenset({2})), "train", [("k1", 1), ("k2", 2), ("k3", 3)],
        skip_bad_patches=True, skipped=skipped, on_item=lambda: calls.append(1)))
    assert [key for key, _ in out] == ["k1", "k3"] and out[1][1]["value"] == 3
    assert [s["patch_id"] for s in skipped] == ["k2"] and len(calls) == 3
    with pytest.raises(PatchError):
        list(shard_writer.generate_examples(ToyLoader(frozenset({2})), "train", [("k2", 2)],
                                            skip_bad_patches=False, skipped=[]))


# ---------------------------------------------------------------------------------------------
# Both builders without TensorFlow.

LAUNCHER = (
    '"""Runs `python -m data_builders.prepare` as if TensorFlow were not installed."""\n'
    # At import time, so that spawned workers (which import the file as __mp_main__) hide it too.
    + hide_packages_source(("tensorflow",))
    + '''\
import importlib.util  # noqa: E402
import os  # noqa: E402

assert importlib.util.find_spec("tensorflow") is None
if __name__ == "__mp_main__":  # A spawned worker: leave a mark that it ran without TensorFlow.
    open(os.path.join(os.environ["NO_TF_WORKER_MARKS"], str(os.getpid())), "w").close()
from tensorflow_datasets.core import shuffle  # noqa: E402

shuffle.MAX_MEM_BUFFER_SIZE = 0  # TFDS's own writer would now need TensorFlow at any size.
from data_builders import prepare  # noqa: E402

if __name__ == "__main__":
    status = prepare.main(sys.argv[1:])
    assert "tensorflow" not in sys.modules
    sys.exit(status)
''')


def _write_fake(name: str, manual: Path) -> int:
    """Writes a small fake of dataset `name`; returns the number of examples it yields."""
    if name == "bigearthnet_v2":
        from data_builders.fake_bigearthnet import write_fake_bigearthnet

        return len(write_fake_bigearthnet(manual, 4, seed=41))
    from data_builders.fake_sen12ms import DEFAULT_SCENES, write_fake_sen12ms

    ids = write_fake_sen12ms(manual, DEFAULT_SCENES, 1, seed=41)
    return len(ids) - 1  # The known broken triplet is left out.


@pytest.mark.parametrize("name", ["bigearthnet_v2", "sen12ms"])
def test_prepare_without_tensorflow(tmp_path, name):
    """Both builders prepare their fakes with two spawned workers in a process (and workers)
    where TensorFlow cannot be imported and TFDS's shuffler would need it."""
    expected = _write_fake(name, tmp_path / "manual")
    launcher = tmp_path / "launch_without_tf.py"
    launcher.write_text(textwrap.dedent(LAUNCHER))
    marks = tmp_path / "worker_marks"
    marks.mkdir()
    env = dict(os.environ, NO_TF_WORKER_MARKS=str(marks), PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    result = subprocess.run(
        [sys.executable, str(launcher), name, "--manual_dir", str(tmp_path / "manual"),
         "--data_dir", str(tmp_path / "data"), "--num_workers", "2", "--skip_bad_patches",
         *(["--skip_checksums"] if name == "bigearthnet_v2" else [])],  # fake metadata
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped patches: 0" in result.stdout
    assert len(list(marks.iterdir())) == 2  # Both workers ran (and without TensorFlow).
    importlib.import_module(f"data_builders.{name}")
    builder = tfds.builder(name, data_dir=str(tmp_path / "data"))
    assert sum(split.num_examples for split in builder.info.splits.values()) == expected
