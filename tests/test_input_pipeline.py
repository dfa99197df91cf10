"""Tests of band tables / normalisation and the Grain input pipeline (tiny in-memory sources)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mosaic_jax.data import bands
from mosaic_jax.data import input_pipeline as ip

BEN, SEN = "bigearthnet_v2", "sen12ms"
SIZE = 16

# Published statistics: BigEarthNet v2 (the official reBEN training recipe, Clasen et al. 2025;
# stored ESA order) and SEN12MS (benchmark normalisation, Schmitt et al. 2019).
BEN_S2_MEAN = [361.0768, 438.3721, 614.0557, 588.4096, 942.8433, 1769.9316, 2049.5515, 2193.2920,
               2235.5566, 2241.4553, 1568.2268, 997.7325]
BEN_S2_STD = [575.0687, 607.0269, 603.2968, 684.5688, 738.4327, 1100.4561, 1275.8054, 1369.3717,
              1356.5441, 1316.3933, 1070.1612, 813.5276]
BEN_S1 = [(-12.6439, 5.1335), (-19.3526, 5.5905)]
SEN_S1 = [(-11.76858, 4.525339), (-18.294598, 4.3586307)]
SEN_S2_10_MEAN = [1226.4215, 1137.3799, 1139.6792, 1350.9973, 1932.9058, 2211.1584, 2154.9846,
                  2409.1128, 2001.8622, 1356.0801]
SEN_S2_10_STD = [741.6254, 740.883, 960.1045, 946.76056, 985.52747, 1082.4341, 1057.7628,
                 1136.1942, 1132.7898, 991.48016]


def make_source(n: int, dataset: str = BEN, size: int = SIZE, seed: int = 0) -> list[dict]:
    """In-memory source in the prepared-dataset format. S1 VV encodes the example index (dB)."""
    rng = np.random.default_rng(seed)
    c2, c = (12, 19) if dataset == BEN else (13, 10)
    out = []
    for i in range(n):
        s1 = rng.normal(-15.0, 3.0, (size, size, 2)).astype(np.float32)
        s1[..., 0] = -float(i) if dataset == SEN else float(i)  # SEN12MS clips to [-25, 0]
        labels = rng.random(c) < 0.3
        labels[i % c] = True
        ex = dict(s1=s1, s2=rng.integers(1, 6000, (size, size, c2)).astype(np.uint16),
                  labels=labels, patch_id=f"S2A_MSIL2A_T{i:05d}_{i % 7:02d}_{i % 11:02d}")
        out.append(ex)
    return out


def example_index(batch_s1: np.ndarray, dataset: str = BEN) -> np.ndarray:
    """Recovers the source index from normalised S1 VV (see make_source)."""
    mean, std = (BEN_S1 if dataset == BEN else SEN_S1)[0]
    vv = batch_s1[:, 0, 0, 0] * std + mean
    return np.rint(np.abs(vv)).astype(int)


def take(dataset, num: int) -> list[dict[str, np.ndarray]]:
    """First `num` elements of a fresh iterator of a Grain dataset."""
    it = iter(dataset)
    return [next(it) for _ in range(num)]


def train_ds(src, **kw):
    args = dict(dataset=BEN, global_batch_size=8, seed=3, s1_bands="s1", s2_bands="s2_10",
                process_index=0, process_count=1)
    args.update(kw)
    return ip.make_train_dataset(src, **args)


# ---------------------------------------------------------------------------------------------
# Bands and normalisation


def test_bigearthnet_normalisation_matches_reference():
    s2 = np.array(BEN_S2_MEAN, np.float64) + np.array(BEN_S2_STD)  # one std above the mean
    s2 = np.broadcast_to(np.rint(s2), (3, 3, 12)).astype(np.uint16)
    out = bands.normalize(s2, BEN, "s2", "s2_all")
    assert out.dtype == np.float32 and out.shape == (3, 3, 12)
    expect = (np.rint(np.array(BEN_S2_MEAN) + BEN_S2_STD) - BEN_S2_MEAN) / BEN_S2_STD
    np.testing.assert_allclose(out[1, 1], expect, rtol=1e-5)
    s1 = np.array([[[-7.5104, -30.0]]], np.float32)  # no clipping for BigEarthNet
    np.testing.assert_allclose(bands.normalize(s1, BEN, "s1", ["VV", "VH"])[0, 0],
                               [1.0, (-30.0 + 19.3526) / 5.5905], rtol=1e-5)


def test_bigearthnet_band_selection_by_name():
    s2 = np.broadcast_to(np.arange(12, dtype=np.uint16) * 100 + 1000, (2, 2, 12))
    names = ["B12", "B02", "B8A"]
    out = bands.normalize(s2, BEN, "s2", names)
    stored = bands.stored_bands(BEN, "s2")
    for j, b in enumerate(names):
        k = stored.index(b)
        np.testing.assert_allclose(out[0, 0, j], (1000 + 100 * k - BEN_S2_MEAN[k]) / BEN_S2_STD[k],
                                   rtol=1e-5)
    assert bands.resolve_bands("official12", BEN, "s1") == ("VV", "VH")
    assert bands.resolve_bands("official12", BEN, "s2") == (
        "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
    assert bands.resolve_bands("s2_10", BEN, "s1") == ()
    assert len(bands.resolve_bands("s2_all", BEN, "s2")) == 12
    assert len(bands.resolve_bands("s2_all", SEN, "s2")) == 13


def test_sen12ms_normalisation_clips_s1_and_skips_b01_b09_b10():
    s1 = np.array([[[-30.0, 3.0], [-11.76858, -18.294598]]], np.float32)
    out = bands.normalize(s1, SEN, "s1", "s1")
    expect = [(-25 + 11.76858) / 4.525339, (0 + 18.294598) / 4.3586307]
    np.testing.assert_allclose(out[0, 0], expect, rtol=1e-5)
    np.testing.assert_allclose(out[0, 1], [0.0, 0.0], atol=1e-6)
    s2 = np.broadcast_to(np.arange(13, dtype=np.uint16) * 150 + 500, (1, 1, 13))
    out = bands.normalize(s2, SEN, "s2", "s2_10")
    k = [1, 2, 3, 4, 5, 6, 7, 8, 11, 12]  # stored indices of B02..B8A, B11, B12
    expect = (np.array(k) * 150 + 500 - np.array(SEN_S2_10_MEAN)) / SEN_S2_10_STD
    np.testing.assert_allclose(out[0, 0], expect, rtol=1e-5)


@pytest.mark.parametrize("dataset,band", [(SEN, "B01"), (SEN, "B09"), (SEN, "B10")])
def test_band_without_statistics_is_named_in_error(dataset, band):
    x = np.zeros((2, 2, 13), np.uint16)
    with pytest.raises(ValueError, match=band):
        bands.normalize(x, dataset, "s2", ["B02", band])
    with pytest.raises(ValueError, match="statistics"):
        bands.normalize(x, SEN, "s2", "s2_all")


def test_band_errors():
    with pytest.raises(ValueError, match="B10"):  # not stored by BigEarthNet
        bands.normalize(np.zeros((2, 2, 12), np.uint16), BEN, "s2", ["B10"])
    with pytest.raises(ValueError, match="VV"):  # S1 band asked of S2
        bands.resolve_bands(["VV"], BEN, "s2")
    with pytest.raises(ValueError, match="unknown band subset"):
        bands.resolve_bands("nope", BEN, "s2")
    with pytest.raises(ValueError, match="channels"):
        bands.normalize(np.zeros((2, 2, 13), np.uint16), BEN, "s2", "s2_10")
    with pytest.raises(ValueError, match="unknown dataset"):
        bands.normalize(np.zeros((2, 2, 2)), "ben", "s1", "s1")


# ---------------------------------------------------------------------------------------------
# Subsets


def test_subset_mask_deterministic_accurate_seeded():
    ids = [f"patch_{i}" for i in range(20000)]
    m = ip.subset_mask(ids, 0.1, seed=0)
    assert m.dtype == bool and m.shape == (20000,)
    assert np.array_equal(m, ip.subset_mask(list(ids), 0.1, seed=0))
    assert abs(m.mean() - 0.1) < 0.01
    other = ip.subset_mask(ids, 0.1, seed=1)
    assert abs(other.mean() - 0.1) < 0.01
    assert (m & other).mean() < 0.02  # independent subsets overlap ~1 %
    assert np.all(m <= ip.subset_mask(ids, 0.3, seed=0))  # nested in the fraction
    assert not ip.subset_mask(ids[:50], 0.0, 0).any() and ip.subset_mask(ids[:50], 1.0, 0).all()
    # Membership depends on the patch only, not on its position or the other patches.
    assert np.array_equal(ip.subset_mask(ids[::-1], 0.1, 0), m[::-1])
    assert np.array_equal(ip.subset_mask([i.encode() for i in ids[:100]], 0.1, 0), m[:100])
    # sha256("0:patch_0") starts with a fixed value on every machine.
    assert ip.subset_hash(["patch_0"], 0)[0] == pytest.approx(
        int.from_bytes(__import__("hashlib").sha256(b"0:patch_0").digest()[:8], "big") / 2**64)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_subset_mask_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError):
        ip.subset_mask(["a"], fraction, 0)


# ---------------------------------------------------------------------------------------------
# Train dataset


def test_train_batches_shapes_dtypes_labels():
    src = make_source(40)
    it = iter(train_ds(src, label_fraction=0.5))
    seen = 0
    for _ in range(5):
        b = next(it)
        assert set(b) == {"s1", "s2", "labels", "label_mask"}
        assert b["s1"].shape == (8, SIZE, SIZE, 2) and b["s1"].dtype == np.float32
        assert b["s2"].shape == (8, SIZE, SIZE, 10) and b["s2"].dtype == np.float32
        assert b["labels"].shape == (8, 19) and b["labels"].dtype == np.float32
        assert b["label_mask"].shape == (8,) and b["label_mask"].dtype == bool
        idx = example_index(b["s1"])
        for j, i in enumerate(idx):
            np.testing.assert_allclose(b["s2"][j], bands.normalize(src[i]["s2"], BEN, "s2",
                                                                   "s2_10"), rtol=1e-6)
            want = src[i]["labels"].astype(np.float32) * b["label_mask"][j]
            np.testing.assert_array_equal(b["labels"][j], want)
        seen += b["label_mask"].sum()
    # label_mask is a function of patch_id: the labelled set is the hash subset.
    mask = ip.subset_mask([e["patch_id"] for e in src], 0.5, 0)
    assert 0 < mask.sum() < 40 and 0 < seen < 40


def test_train_epochs_cover_split_and_reshuffle():
    src = make_source(40)
    it = iter(train_ds(src))
    epochs = [np.concatenate([example_index(next(it)["s1"]) for _ in range(5)]) for _ in range(2)]
    for e in epochs:
        assert sorted(e) == list(range(40))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(40))
    first = np.concatenate([example_index(b["s1"]) for b in take(train_ds(src), 5)])
    assert np.array_equal(first, epochs[0])  # deterministic
    other = np.concatenate([example_index(b["s1"]) for b in take(train_ds(src, seed=4), 5)])
    assert not np.array_equal(other, epochs[0])


def test_train_fraction_and_label_fraction_subsets():
    src = make_source(50)
    ids = [e["patch_id"] for e in src]
    keep = ip.subset_mask(ids, 0.6, seed=7)
    labelled = ip.subset_mask(ids, 0.6 * 0.5, seed=7)
    it = iter(train_ds(src, train_fraction=0.6, label_fraction=0.5, subset_seed=7))
    seen = {}
    for _ in range(12):
        b = next(it)
        for i, m in zip(example_index(b["s1"]), b["label_mask"], strict=True):
            seen[int(i)] = bool(m)
    assert set(seen) == set(np.flatnonzero(keep))
    for i, m in seen.items():
        assert m == labelled[i]
    assert all(keep[np.flatnonzero(labelled)])


def test_label_fraction_zero_and_one():
    src = make_source(16)
    b = take(train_ds(src, label_fraction=0.0), 1)[0]
    assert not b["label_mask"].any() and not b["labels"].any()
    b = take(train_ds(src), 1)[0]
    assert b["label_mask"].all() and b["labels"].any()


def test_process_slices_make_up_the_global_batch():
    src = make_source(30)
    kw = dict(train_fraction=0.8, label_fraction=0.5, global_batch_size=8)
    glob = take(train_ds(src, **kw), 6)  # spans an epoch boundary
    parts = [take(train_ds(src, process_index=p, process_count=2, **kw), 6) for p in (0, 1)]
    for k in range(6):
        assert parts[0][k]["s1"].shape[0] == 4
        for key in glob[k]:
            np.testing.assert_array_equal(
                np.concatenate([parts[0][k][key], parts[1][k][key]]), glob[k][key])


def test_train_rejects_bad_arguments():
    src = make_source(8)
    with pytest.raises(ValueError, match="multiple"):
        train_ds(src, global_batch_size=7, process_count=2)
    with pytest.raises(ValueError):
        train_ds(src, train_fraction=0.0)
    with pytest.raises(ValueError):
        train_ds(src, label_fraction=1.2)
    with pytest.raises(ValueError, match="B10"):
        train_ds(src, s2_bands=["B02", "B10"])


def test_train_state_restore_continues_exactly():
    src = make_source(30)
    ds = train_ds(src, label_fraction=0.5)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    after = [next(it) for _ in range(5)]
    it2 = iter(train_ds(src, label_fraction=0.5))
    it2.set_state(state)
    again = [next(it2) for _ in range(5)]
    for a, b in zip(after, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_sen12ms_train_batches():
    src = make_source(12, dataset=SEN)
    b = take(train_ds(src, dataset=SEN, global_batch_size=4, s2_bands="s2_10"), 1)[0]
    assert b["s2"].shape == (4, SIZE, SIZE, 10) and b["labels"].shape == (4, 10)
    assert set(example_index(b["s1"], SEN)) <= set(range(12))
    assert b["s1"][..., 0].max() <= (0 + 11.76858) / 4.525339 + 1e-5  # clipped at 0 dB


def test_worker_processes_give_the_same_batches():
    src = make_source(16)
    want = take(train_ds(src), 4)
    it = iter(train_ds(src, worker_count=2))
    try:
        got = [next(it) for _ in range(4)]
    finally:
        it.close()
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a["s1"], b["s1"])
        np.testing.assert_array_equal(a["label_mask"], b["label_mask"])


# ---------------------------------------------------------------------------------------------
# Eval dataset


@pytest.mark.parametrize("count", [1, 2])
def test_eval_covers_every_example_once(count):
    src = make_source(30)
    seen = []
    lengths = set()
    for p in range(count):
        ds = ip.make_eval_dataset(src, dataset=BEN, global_batch_size=8, s1_bands="s1",
                                  s2_bands="official12", process_index=p, process_count=count)
        batches = list(ds)
        lengths.add(len(batches))
        for b in batches:
            assert b["s1"].shape == (8 // count, SIZE, SIZE, 2)
            assert b["s2"].shape == (8 // count, SIZE, SIZE, 10)
            assert b["valid"].dtype == bool
            v = b["valid"]
            np.testing.assert_array_equal(example_index(b["s1"][v]), b["index"][v])
            assert np.all(b["index"][~v] == -1) and not b["s2"][~v].any()
            assert not b["labels"][~v].any()
            for j in np.flatnonzero(v):
                np.testing.assert_array_equal(b["labels"][j], src[b["index"][j]]["labels"])
            seen.extend(b["index"][v].tolist())
    assert lengths == {4}  # ceil(30 / 8) on every process
    assert sorted(seen) == list(range(30))
    if count == 1:
        assert seen == list(range(30))  # in order


def test_eval_state_restore():
    src = make_source(30)
    kw = dict(dataset=BEN, global_batch_size=4, s1_bands="s1", s2_bands="s2_10",
              process_index=0, process_count=1)
    it = iter(ip.make_eval_dataset(src, **kw))
    next(it)
    next(it)
    state = it.get_state()
    rest = [b["index"] for b in it]
    it2 = iter(ip.make_eval_dataset(src, **kw))
    it2.set_state(state)
    assert [b["index"].tolist() for b in it2] == [r.tolist() for r in rest]


# ---------------------------------------------------------------------------------------------
# TFDS sources


def test_open_source_not_prepared(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m data_builders.prepare bigearthnet_v2"):
        ip.open_source("bigearthnet_v2", "train", str(tmp_path))


def _tiny_tfds_dataset(data_dir: str, n: int) -> None:
    """Prepares a tiny array_record TFDS dataset with the BigEarthNet feature contract."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class MosaicPipelineTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            f = tfds.features
            return tfds.core.DatasetInfo(builder=self, features=f.FeaturesDict({
                "s1": f.Tensor(shape=(SIZE, SIZE, 2), dtype=np.float32),
                "s2": f.Tensor(shape=(SIZE, SIZE, 12), dtype=np.uint16),
                "labels": f.Tensor(shape=(19,), dtype=np.bool_),
                "patch_id": f.Text(),
                "country": f.Text(),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for ex in make_source(n):
                yield ex["patch_id"], dict(ex, country="Austria")

    MosaicPipelineTiny(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_source_patch_ids_and_pipeline(tmp_path):
    _tiny_tfds_dataset(str(tmp_path), 20)
    src = ip.open_source("mosaic_pipeline_tiny", "train", str(tmp_path))
    assert len(src) == 20
    ids = ip.read_patch_ids(src)
    assert ids == [ip._to_str(src[i]["patch_id"]) for i in range(20)]
    assert ip.read_patch_ids(src, chunk_size=3, num_threads=3) == ids
    assert sorted(ids) == sorted(e["patch_id"] for e in make_source(20))
    # The reader decodes s1, s2 and labels only, exactly as the source's full decode does.
    for i, got in enumerate(ip._FeatureReader(src, ("s1", "s2", "labels")).read(range(20))):
        assert sorted(got) == ["labels", "s1", "s2"]
        for key in ("s1", "s2", "labels"):
            assert got[key].dtype == src[i][key].dtype
            np.testing.assert_array_equal(got[key], src[i][key])
    with pytest.raises(KeyError, match="no feature \\['nir'\\]"):
        ip._FeatureReader(src, ("s1", "nir"))
    b = take(train_ds(src, train_fraction=0.7, label_fraction=0.5, global_batch_size=4), 2)
    want = ip.subset_mask(ids, 0.7, 0)
    for batch in b:
        assert batch["s2"].shape == (4, SIZE, SIZE, 10)
        for i in example_index(batch["s1"]):
            assert want[ids.index(make_source(20)[i]["patch_id"])]
    with pytest.raises(ValueError):
        ip.open_source("mosaic_pipeline_tiny", "nosuchsplit", str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The real builders on fake data in the official layout (skipped where a builder is absent).


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not (_has("data_builders.bigearthnet_v2")
                         and _has("data_builders.fake_bigearthnet")),
                    reason="data_builders.bigearthnet_v2 / fake_bigearthnet not available")
def test_real_bigearthnet_builder_end_to_end(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import data_builders.bigearthnet_v2  # noqa: F401  # registers the builder
    from data_builders.fake_bigearthnet import write_fake_bigearthnet

    raw, data_dir = tmp_path / "raw", str(tmp_path / "tfds")
    write_fake_bigearthnet(raw, 16, seed=1, split_fractions=(0.75, 0.25, 0.0),
                           with_reference_maps=False)
    builder = tfds.builder("bigearthnet_v2/default", data_dir=data_dir,
                           file_format="array_record", num_workers=1, skip_checksums=True)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))

    src = ip.open_source("bigearthnet_v2", "train", data_dir)
    n = len(src)
    assert n >= 8
    ids = ip.read_patch_ids(src)
    assert ids == [ip._to_str(src[i]["patch_id"]) for i in range(n)]
    row_of = {pid: i for i, pid in enumerate(ids)}

    ds = ip.make_train_dataset(src, dataset=BEN, global_batch_size=4, seed=0,
                               s1_bands="official12", s2_bands="official12",
                               train_fraction=0.8, label_fraction=0.5,
                               process_index=0, process_count=1)
    it = iter(ds)
    b = next(it)
    assert b["s1"].shape == (4, 120, 120, 2) and b["s2"].shape == (4, 120, 120, 10)
    assert b["labels"].shape == (4, 19) and b["label_mask"].shape == (4,)
    assert np.isfinite(b["s1"]).all() and np.isfinite(b["s2"]).all()
    # Each row is the normalised version of some kept example of the split.
    keep = ip.subset_mask(ids, 0.8, 0)
    for j in range(4):
        hits = [i for i in np.flatnonzero(keep) if np.allclose(
            bands.normalize(src[i]["s2"], BEN, "s2", "official12"), b["s2"][j])]
        assert len(hits) == 1
        assert b["label_mask"][j] == ip.subset_mask([ids[hits[0]]], 0.4, 0)[0]
    state = it.get_state()
    more = [next(it)["s2"] for _ in range(2)]
    it2 = iter(ds)
    it2.set_state(state)
    for m in more:
        np.testing.assert_array_equal(next(it2)["s2"], m)

    ev = list(ip.make_eval_dataset(src, dataset=BEN, global_batch_size=4, s1_bands="s1",
                                   s2_bands="s2_10", process_index=0, process_count=1))
    seen = np.concatenate([e["index"][e["valid"]] for e in ev])
    assert seen.tolist() == list(range(n))
    assert len(row_of) == n
    with pytest.raises(FileNotFoundError, match="data_builders.prepare"):
        ip.open_source("sen12ms", "train", data_dir)


@pytest.mark.skipif(not (_has("data_builders.sen12ms") and _has("data_builders.fake_sen12ms")),
                    reason="data_builders.sen12ms / fake_sen12ms not available")
def test_real_sen12ms_builder_end_to_end(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import data_builders.sen12ms  # noqa: F401  # registers the builder
    from data_builders.fake_sen12ms import write_fake_sen12ms

    raw, data_dir = tmp_path / "raw", str(tmp_path / "tfds")
    write_fake_sen12ms(raw, scenes=[("spring", 1), ("fall", 2)], patches_per_scene=3, seed=0)
    builder = tfds.builder("sen12ms", data_dir=data_dir, file_format="array_record",
                           num_workers=1)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
    splits = [s for s in builder.info.splits if s in ("train", "validation")]
    src = ip.open_source("sen12ms", splits[0], data_dir)
    b = take(ip.make_train_dataset(src, dataset=SEN, global_batch_size=2, seed=0,
                                      s1_bands="s1", s2_bands="s2_10", process_index=0,
                                      process_count=1), 1)[0]
    assert b["s1"].shape == (2, 256, 256, 2) and b["s2"].shape == (2, 256, 256, 10)
    assert b["labels"].shape == (2, 10)
    for c, (mean, std) in enumerate(SEN_S1):  # clipped to [-25, 0] dB before normalising
        assert (-25 - mean) / std - 1e-4 <= b["s1"][..., c].min()
        assert b["s1"][..., c].max() <= (0 - mean) / std + 1e-4


def _live_descendants(pid: int) -> set[int]:
    """Processes below `pid` (from /proc) that are not zombies."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_workers_exit_when_the_trainer_is_killed():
    script = (f"import sys, time; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
              "from absl import flags; flags.FLAGS.mark_as_parsed()\n"
              "from test_input_pipeline import make_source, train_ds\n"
              "it = iter(train_ds(make_source(16), worker_count=2)); next(it)\n"
              "print('ready', flush=True); time.sleep(600)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers: set[int] = set()
    try:
        assert trainer.stdout.readline().strip() == "ready"
        workers = _live_descendants(trainer.pid)
        assert len(workers) >= 2, workers  # two Grain workers (and maybe the resource tracker)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 20
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in workers if _alive(p)], "workers outlived the killed trainer"
    finally:
        trainer.kill()
        for pid in workers | _live_descendants(trainer.pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_worker_processes_need_the_program_to_parse_absl_flags(monkeypatch):
    # The library does not change absl's global flags; it says what the program must do.
    import types

    from absl import flags

    unparsed = types.SimpleNamespace(FLAGS=flags.FlagValues())  # as in a plain script
    monkeypatch.setattr(ip, "flags", unparsed)
    with pytest.raises(ValueError, match="worker_count=2 starts Grain worker processes.*"
                       "mark_as_parsed"):
        train_ds(make_source(16), worker_count=2)
