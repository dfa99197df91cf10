"""Workdirs and data_dirs given as URLs (``gs://...``), read and written through etils.epath.

No network: a fake ``gs://`` path class, registered only inside each test, serves
``gs://BUCKET/...`` from a local folder (creating parent folders on write, as an object store
needs none). Everything that goes through ``etils.epath`` is exercised; the array_record
reader opens files with its own C++ I/O, so no record is read from the fake bucket here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from etils.epath import backend as backend_lib
from etils.epath import gpath, register

from mosaic_jax.data import input_pipeline as ip
from mosaic_jax.training import checkpoints

BUCKET = "gs://bucket"


class _LocalBucketBackend:
    """An epath backend serving ``gs://...`` from ``root/...`` through the local os backend."""

    def __init__(self, root: str) -> None:
        self.root = root

    def local(self, path: Any) -> str:
        path = os.fspath(path)
        return os.path.join(self.root, path[len("gs://"):]) if path.startswith("gs://") else path

    def remote(self, path: Any) -> str:
        return "gs://" + os.path.relpath(os.fspath(path), self.root)

    def open(self, path: Any, mode: str) -> Any:
        if "r" not in mode:  # objects need no parent folders
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
        return backend_lib.os_backend.open(self.local(path), mode)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(backend_lib.os_backend, name)

        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if name in ("copy", "rename", "replace"):
                args = (self.local(args[0]), *args[1:])
            out = fn(self.local(path), *args, **kwargs)
            if name == "glob":
                return [self.remote(p) for p in out]
            if name == "walk":
                return ((self.remote(r), d, f) for r, d, f in out)
            return out

        return call


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> Iterator[str]:
    """The local folder behind the fake ``gs://`` scheme; the test runs in an empty cwd."""
    root = tmp_path / "buckets"
    (root / "bucket").mkdir(parents=True)
    backend = _LocalBucketBackend(str(root))

    class FakeGcsPath(gpath.PosixGPath):
        @property
        def _backend(self) -> Any:
            return backend if self._uri_scheme == "gs" else super()._backend

    monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "gs://", FakeGcsPath)
    # Orbax asks the GCS API whether a bucket has a hierarchical namespace; the fake is flat.
    from orbax.checkpoint._src.path import gcs_utils

    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield str(root / "bucket")
    # A URL mistaken for a local path would have become a folder "gs:" here.
    assert os.listdir(cwd) == []


# ---------------------------------------------------------------------------------------------
# checkpoints on a remote workdir


def _step(root: str, name: str, *, committed: bool) -> None:
    os.makedirs(os.path.join(root, "checkpoints", name, "state"))
    if committed:
        open(os.path.join(root, "checkpoints", name, "commit_success.txt"), "w").close()


def test_checkpoints_on_remote_workdir(bucket):
    run = os.path.join(bucket, "runs", "x")
    _step(run, "3", committed=True)
    _step(run, "6", committed=True)
    _step(run, "9", committed=False)  # orbax writes gs:// steps in place: unfinished
    _step(run, "12.orbax-checkpoint-tmp-1", committed=False)
    os.makedirs(os.path.join(run, "checkpoints", "15"))  # no state item
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump({"seed": 7, "model": {"kind": "two_tower"}}, f)

    url = f"{BUCKET}/runs/x"
    assert checkpoints.resolve_workdir(url) == url
    assert checkpoints.checkpoint_steps(url) == [3, 6]
    assert checkpoints.latest_step(url) == 6
    config = checkpoints.load_config(url)
    assert config.seed == 7 and config.model.kind == "two_tower"

    with pytest.raises(FileNotFoundError, match="gs://bucket/runs/nothing"):
        checkpoints.latest_step(f"{BUCKET}/runs/nothing")
    os.makedirs(os.path.join(bucket, "runs", "empty"))
    assert checkpoints.checkpoint_steps(f"{BUCKET}/runs/empty") == []
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        checkpoints.latest_step(f"{BUCKET}/runs/empty")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        checkpoints.load_config(f"{BUCKET}/runs/empty")


def test_checkpoints_local_paths_unchanged(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    _step(run, "3", committed=False)  # locally orbax renames a finished step: no commit file
    _step(run, "5.orbax-checkpoint-tmp-1", committed=False)
    assert checkpoints.checkpoint_steps(run) == [3]
    monkeypatch.chdir(tmp_path)
    assert checkpoints.resolve_workdir("run") == run
    assert checkpoints.latest_step("run") == 3
    monkeypatch.setenv("HOME", str(tmp_path))
    assert checkpoints.resolve_workdir("~/run") == run


# ---------------------------------------------------------------------------------------------
# Prepared-dataset discovery on a remote data_dir


def _prepared(root: str, *parts: str) -> None:
    folder = os.path.join(root, *parts)
    os.makedirs(folder)
    open(os.path.join(folder, "dataset_info.json"), "w").close()


def test_find_prepared_on_remote_data_dir(bucket):
    tfds_dir = os.path.join(bucket, "tfds")
    _prepared(tfds_dir, "plain", "1.0.0")
    _prepared(tfds_dir, "plain", "1.2.0")
    os.makedirs(os.path.join(tfds_dir, "plain", "2.0.0"))  # no dataset_info.json: unfinished
    _prepared(tfds_dir, "configs", "default", "1.0.0")
    _prepared(tfds_dir, "configs", "other", "1.1.0")
    _prepared(tfds_dir, "two", "a", "1.0.0")
    _prepared(tfds_dir, "two", "b", "1.0.0")

    data_dir = f"{BUCKET}/tfds"
    assert ip._find_prepared("plain", data_dir) == f"{data_dir}/plain/1.2.0"
    assert ip._find_prepared("plain:1.0.0", data_dir) == f"{data_dir}/plain/1.0.0"
    assert ip._find_prepared("configs", data_dir) == f"{data_dir}/configs/default/1.0.0"
    assert ip._find_prepared("configs/other", data_dir) == f"{data_dir}/configs/other/1.1.0"
    assert ip._find_prepared("absent", data_dir) is None
    with pytest.raises(ValueError, match="several configs"):
        ip._find_prepared("two", data_dir)
    with pytest.raises(FileNotFoundError, match="not prepared in 'gs://bucket/tfds'"):
        ip.open_source("absent", "train", data_dir)


def test_open_source_on_remote_data_dir(bucket):
    tfds = pytest.importorskip("tensorflow_datasets")

    class MosaicRemoteTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"x": tfds.features.Tensor(shape=(2,), dtype=np.float32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield i, {"x": np.full((2,), i, np.float32)}

    # Prepared locally, straight into the folder behind gs://bucket/tfds.
    MosaicRemoteTiny(data_dir=os.path.join(bucket, "tfds"),
                     file_format="array_record").download_and_prepare()
    src = ip.open_source("mosaic_remote_tiny", "train", f"{BUCKET}/tfds")
    assert len(src) == 5  # from dataset_info.json: no record is read here
    assert os.fspath(src.dataset_info.data_dir) == f"{BUCKET}/tfds/mosaic_remote_tiny/1.0.0"


# ---------------------------------------------------------------------------------------------
# train's outputs on a remote workdir


@pytest.mark.parametrize("remote", [False, True], ids=["local", "remote"])
def test_eval_outputs_accumulate(bucket, tmp_path, remote):
    from data_builders import atomic_files
    from mosaic_jax.evaluation.metrics import multilabel_metrics
    from mosaic_jax.training import train

    if remote:
        workdir, folder = f"{BUCKET}/runs/x", os.path.join(bucket, "runs", "x")
    else:
        workdir = folder = str(tmp_path / "run")
        os.makedirs(folder)
    rng = np.random.default_rng(0)
    labels = rng.random((24, 3)) < 0.5
    embeddings = rng.normal(size=(24, 4)) + labels @ rng.normal(size=(3, 4)) * 3
    metrics = multilabel_metrics(rng.random((24, 3)), labels)
    names = ["a", "b", "c"]
    for step in (2, 4):
        train.write_eval_outputs(workdir, "validation", step, metrics, embeddings, labels, names,
                                 tsne_points=24 if step == 4 else 0)

    history = open(os.path.join(folder, "eval_history.jsonl")).read().splitlines()
    assert [json.loads(line)["step"] for line in history] == [2, 4]
    record = json.load(open(os.path.join(folder, "metrics_validation.json")))
    assert record["step"] == 4 and record["split"] == "validation"
    assert record["macro_ap"] == pytest.approx(metrics["macro_ap"])
    md = open(os.path.join(folder, "metrics_validation.md")).read()
    assert md.startswith("# validation metrics at step 4\n")
    with open(os.path.join(folder, "tsne_validation.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(folder)) == [  # no temporary file left behind
        "eval_history.jsonl", "metrics_validation.json", "metrics_validation.md",
        "tsne_validation.png"]

    atomic_files.write_atomic(os.path.join(workdir, "config.json"), '{"a": 1}')
    atomic_files.write_atomic(os.path.join(workdir, "config.json"), '{"a": 2}')
    assert json.load(open(os.path.join(folder, "config.json"))) == {"a": 2}
    assert "config.json" in os.listdir(folder) and len(os.listdir(folder)) == 5
