"""SEN12MS builder: prepared from a faithful fake and checked against direct GeoTIFF reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
tfds = pytest.importorskip("tensorflow_datasets")

from data_builders import sen12ms  # noqa: E402  (registers the builder)
from data_builders.fake_sen12ms import DEFAULT_SCENES, write_fake_sen12ms  # noqa: E402
from data_builders.geotiff import PatchError, write_tiff  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_SEN12MS = SHARED / "data" / "sen12ms"
REPO = Path(__file__).resolve().parents[1]

# Independent restatement of the simplified IGBP scheme (Schmitt & Wu 2021).
SIMPLIFIED_SOURCES = {0: [1, 2, 3, 4, 5], 1: [6, 7], 2: [8, 9], 3: [10], 4: [11], 5: [12, 14],
                      6: [13], 7: [15], 8: [16], 9: [17]}
SEASON_DIR = {"spring": "ROIs1158_spring", "summer": "ROIs1868_summer", "fall": "ROIs1970_fall",
              "winter": "ROIs2017_winter"}


def _prepare(manual: Path, data: Path, **kwargs):
    builder = tfds.builder("sen12ms", data_dir=data, file_format="array_record", **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return builder


def _examples(builder) -> dict[str, list[dict]]:
    out = {}
    for split, source in builder.as_data_source().items():
        rows = []
        for i in range(len(source)):
            ex = dict(source[i])
            for key in ("patch_id", "season"):
                ex[key] = ex[key].decode() if isinstance(ex[key], bytes) else ex[key]
            rows.append(ex)
        out[split] = rows
    return out


def _path(manual: Path, season: str, modality: str, scene: int, patch: int) -> Path:
    d = SEASON_DIR[season]
    return manual / d / f"{modality}_{scene}" / f"{d}_{modality}_{scene}_p{patch}.tif"


def _direct(path: Path) -> np.ndarray:
    """[H, W, bands] straight from rasterio, whatever the interleave."""
    with rasterio.open(path) as src:
        return np.moveaxis(src.read(), 0, -1)


def _expected_labels(igbp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fractions [17] of IGBP 1..17 over all pixels, simplified labels [10]) by plain loops."""
    total = igbp.shape[0] * igbp.shape[1]
    fractions = np.zeros(17)
    for k in range(1, 18):
        fractions[k - 1] = np.count_nonzero(igbp == k) / total
    labels = np.zeros(10, bool)
    for j, sources in SIMPLIFIED_SOURCES.items():
        labels[j] = sum(fractions[k - 1] for k in sources) >= 0.1
    return fractions, labels


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("sen12ms")
    manual = root / "manual"
    ids = write_fake_sen12ms(manual, DEFAULT_SCENES, 2, seed=0)
    builder = _prepare(manual, root / "data")
    return manual, ids, builder, _examples(builder)


def _ref(manual: Path, season: str, scene: int, patch: int) -> sen12ms.PatchRef:
    return sen12ms.PatchRef(season, scene, patch, manual / SEASON_DIR[season])


# ----------------------------------------------------------------------------------------------
# Prepared data against direct reads.

def test_prepare_yields_every_written_patch_but_the_broken_triplet(fake):
    _, ids, builder, examples = fake
    got = sorted(ex["patch_id"] for rows in examples.values() for ex in rows)
    assert "ROIs1868_summer_146_p202" in ids
    assert got == sorted(set(ids) - {"ROIs1868_summer_146_p202"})
    assert set(examples) == {"train", "validation", "test"}
    assert builder.version == "1.0.0" and builder.name == "sen12ms"
    report = json.loads((Path(builder.data_dir) / sen12ms.REPORT_NAME).read_text())
    assert report["num_skipped"] == 0 and report["skipped"] == []
    assert [r["patch_id"] for r in report["left_out"]] == ["ROIs1868_summer_146_p202"]
    # Rasters stored as raw bytes (the default writes one protobuf number per value: ~20x slower).
    for modality in ("s1", "s2", "lc"):
        assert builder.info.features[modality].to_json_content().encoding == "bytes"


def test_every_pixel_equals_a_direct_read(fake):
    manual, _, _, examples = fake
    for rows in examples.values():
        for ex in rows:
            assert ex["patch_id"] == f"{SEASON_DIR[ex['season']]}_{ex['scene_id']}_p{ex['patch']}"
            for modality, dtype, bands in (("s1", np.float32, 2), ("s2", np.uint16, 13),
                                           ("lc", np.uint16, 4)):
                want = _direct(_path(manual, ex["season"], modality, ex["scene_id"], ex["patch"]))
                assert ex[modality].dtype == dtype and want.dtype == dtype
                assert ex[modality].shape == (256, 256, bands)
                np.testing.assert_array_equal(ex[modality], want)


def test_labels_and_fractions_match_an_independent_computation(fake):
    manual, _, _, examples = fake
    label_sets = set()
    for rows in examples.values():
        for ex in rows:
            igbp = _direct(_path(manual, ex["season"], "lc", ex["scene_id"], ex["patch"]))[..., 0]
            fractions, labels = _expected_labels(igbp)
            assert ex["igbp_fractions"].dtype == np.float32 and ex["labels"].dtype == bool
            np.testing.assert_allclose(ex["igbp_fractions"], fractions, rtol=0, atol=1e-7)
            np.testing.assert_array_equal(ex["labels"], labels)
            label_sets.add(tuple(labels))
    assert len(label_sets) > 2, "the fake's labels should vary between patches"
    assert any(sum(s) >= 2 for s in label_sets)


def test_out_of_range_igbp_counts_in_no_class():
    igbp = np.full((256, 256), 10, np.uint16)
    igbp[:64] = 0  # 25% fill value.
    igbp[64:70] = 255
    fractions = sen12ms.igbp_fractions(igbp)
    assert fractions[9] == pytest.approx((256 - 70) / 256)
    assert fractions.sum() == pytest.approx((256 - 70) / 256)
    labels = sen12ms.simplified_labels(sen12ms.igbp_counts(igbp), igbp.size)
    np.testing.assert_array_equal(labels, np.arange(10) == 3)


def test_label_threshold_is_inclusive():
    igbp = np.full((100, 100), 17, np.uint16)
    igbp.flat[:1000] = 13  # Exactly 0.1 urban.
    igbp.flat[1000:1999] = 16  # 0.0999 barren.
    labels = sen12ms.simplified_labels(sen12ms.igbp_counts(igbp), igbp.size)
    np.testing.assert_array_equal(np.flatnonzero(labels), [6, 9])


@pytest.mark.parametrize("compress", [None, "deflate"])
def test_pixel_interleaved_and_band_separate_read_alike(tmp_path, compress):
    scenes = [("winter", 2)]
    band = write_fake_sen12ms(tmp_path / "band", scenes, 2, seed=3, interleave="band")
    pixel = write_fake_sen12ms(tmp_path / "pixel", scenes, 2, seed=3, interleave="pixel",
                               compress=compress)
    assert band == pixel
    for patch_id in pixel:
        patch = int(patch_id.rsplit("_p", 1)[1])
        with rasterio.open(_path(tmp_path / "pixel", "winter", "s2", 2, patch)) as src:
            assert src.interleaving.name == "pixel"
        with rasterio.open(_path(tmp_path / "band", "winter", "s2", 2, patch)) as src:
            assert src.interleaving.name == "band"
        a = sen12ms.read_patch(_ref(tmp_path / "band", "winter", 2, patch))
        b = sen12ms.read_patch(_ref(tmp_path / "pixel", "winter", 2, patch))
        for modality in ("s1", "s2", "lc"):
            want = _direct(_path(tmp_path / "pixel", "winter", modality, 2, patch))
            np.testing.assert_array_equal(b[modality], want)
            np.testing.assert_array_equal(a[modality], want)
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_fake_is_georeferenced_in_utm_at_10m(fake):
    manual = fake[0]
    path = next((manual / "ROIs1158_spring" / "s1_63").glob("*.tif"))
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() // 100 == 326
        assert (src.transform.a, src.transform.e) == (10.0, -10.0)
        assert src.dtypes == ("float32", "float32")


# ----------------------------------------------------------------------------------------------
# Splits.

def test_test_split_is_the_hold_out_scenes_and_no_scene_is_in_two_splits(fake):
    _, _, _, examples = fake
    scenes = {split: {(ex["season"], int(ex["scene_id"])) for ex in rows}
              for split, rows in examples.items()}
    holdout = set(sen12ms.HOLDOUT_SCENES)
    assert scenes["test"] == holdout & set(DEFAULT_SCENES)
    assert not (scenes["train"] | scenes["validation"]) & holdout
    assert not scenes["train"] & scenes["validation"]
    assert not scenes["train"] & scenes["test"] and not scenes["validation"] & scenes["test"]
    for split, split_scenes in scenes.items():
        for season, scene in split_scenes:
            assert sen12ms.scene_split(season, scene) == split


def test_validation_is_a_fixed_hash_of_the_scene():
    # Pinned: changing the rule would silently move scenes between splits.
    assert sen12ms.scene_split("fall", 6) == "validation"
    assert sen12ms.scene_split("summer", 146) == "train"
    assert sen12ms.scene_split("spring", 63) == "test"
    # Scene numbers repeat across seasons; the season is part of the key.
    assert sen12ms.validation_scene("fall", 6) != sen12ms.validation_scene("spring", 6)
    keys = [(s, n) for s in SEASON_DIR for n in range(1, 400)]
    first = [sen12ms.validation_scene(*k) for k in keys]
    assert first == [sen12ms.validation_scene(*k) for k in reversed(keys)][::-1]
    assert 0.07 < np.mean(first) < 0.13
    # Hold-out scenes stay in test even when they hash into validation.
    assert all(sen12ms.scene_split(*k) == "test" for k in sen12ms.HOLDOUT_SCENES)
    assert all(sen12ms.scene_split(*k, validation_fraction=1.0) in ("validation", "test")
               for k in keys)


def test_validation_does_not_depend_on_which_scenes_exist(tmp_path):
    manual = tmp_path / "manual"
    write_fake_sen12ms(manual, [("fall", 6)], 1, seed=1)
    builder = _prepare(manual, tmp_path / "data", num_workers=1)  # Also the unthreaded path.
    assert set(builder.info.splits) == {"validation"}


# ----------------------------------------------------------------------------------------------
# Bad data.

def test_broken_triplet_is_left_out_and_reported(tmp_path):
    manual = tmp_path / "manual"
    ids = write_fake_sen12ms(manual, [("summer", 146)], 1, seed=2)
    assert "ROIs1868_summer_146_p202" in ids
    builder = _prepare(manual, tmp_path / "data", skip_bad_patches=True)
    got = [ex["patch_id"] for rows in _examples(builder).values() for ex in rows]
    assert got == [i for i in ids if i != "ROIs1868_summer_146_p202"]
    report = json.loads((Path(builder.data_dir) / sen12ms.REPORT_NAME).read_text())
    assert report["skipped"] == []
    assert [r["patch_id"] for r in report["left_out"]] == ["ROIs1868_summer_146_p202"]


def _poison_s1(manual: Path, season: str, scene: int, patch: int, value: float) -> np.ndarray:
    path = _path(manual, season, "s1", scene, patch)
    s1 = _direct(path)
    s1[3, 5, 1] = value
    s1[100, 7, 0] = value
    with rasterio.open(path) as src:
        crs, transform = src.crs.to_string(), tuple(src.transform)
    write_tiff(path, s1, crs=crs, transform=transform)
    return s1


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_s1_elsewhere_raises_naming_the_file_and_fill_replaces(tmp_path, value):
    manual = tmp_path / "manual"
    [pid] = write_fake_sen12ms(manual, [("winter", 2)], 1, seed=4)
    patch = int(pid.rsplit("_p", 1)[1])
    poisoned = _poison_s1(manual, "winter", 2, patch, value)
    with pytest.raises(PatchError, match=f"ROIs2017_winter_s1_2_p{patch}.tif") as err:
        sen12ms.read_patch(_ref(manual, "winter", 2, patch))
    assert err.value.patch_id == pid and "non-finite" in str(err.value)
    filled = sen12ms.read_patch(_ref(manual, "winter", 2, patch), nonfinite_s1_fill=-40.0)
    want = np.where(np.isfinite(poisoned), poisoned, np.float32(-40.0))
    np.testing.assert_array_equal(filled["s1"], want)


def test_non_finite_s1_through_the_builder(tmp_path):
    manual = tmp_path / "manual"
    [pid] = write_fake_sen12ms(manual, [("winter", 2)], 1, seed=4)
    patch = int(pid.rsplit("_p", 1)[1])
    poisoned = _poison_s1(manual, "winter", 2, patch, np.nan)
    with pytest.raises(PatchError, match=f"ROIs2017_winter_s1_2_p{patch}.tif"):
        _prepare(manual, tmp_path / "strict")
    config = sen12ms.Sen12msConfig(name="fill", nonfinite_s1_fill=-25.0)
    builder = _prepare(manual, tmp_path / "fill", config=config)
    [ex] = _examples(builder)["train"]
    np.testing.assert_array_equal(ex["s1"], np.nan_to_num(poisoned, nan=-25.0))
    builder = _prepare(manual, tmp_path / "kwarg", nonfinite_s1_fill=-30.0)
    [ex] = _examples(builder)["train"]
    np.testing.assert_array_equal(ex["s1"], np.nan_to_num(poisoned, nan=-30.0))


def _damage(manual: Path, how: str, patch: int) -> Path:
    """Breaks one file of winter scene 2 `patch`; returns the path the error must name."""
    grid = dict(crs="EPSG:32633", transform=(10.0, 0.0, 0.0, 0.0, -10.0, 0.0))
    if how == "missing_s2":
        path = _path(manual, "winter", "s2", 2, patch)
        path.unlink()
    elif how == "garbage_lc":
        path = _path(manual, "winter", "lc", 2, patch)
        path.write_bytes(b"II*\x00 definitely not a tiff")
    elif how == "small_s1":
        path = _path(manual, "winter", "s1", 2, patch)
        write_tiff(path, np.zeros((128, 128, 2), np.float32), **grid)
    elif how == "float_s2":
        path = _path(manual, "winter", "s2", 2, patch)
        write_tiff(path, np.zeros((256, 256, 13), np.float32), **grid)
    elif how == "three_band_lc":
        path = _path(manual, "winter", "lc", 2, patch)
        write_tiff(path, np.ones((256, 256, 3), np.uint16), **grid)
    elif how == "nan_s1":
        path = _path(manual, "winter", "s1", 2, patch)
        _poison_s1(manual, "winter", 2, patch, np.nan)
    else:
        raise AssertionError(how)
    return path


DAMAGES = ["missing_s2", "garbage_lc", "small_s1", "float_s2", "three_band_lc", "nan_s1"]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Winter scene 2 with one patch per kind of damage plus one intact patch, and a test scene."""
    manual = tmp_path_factory.mktemp("sen12ms_bad") / "manual"
    ids = write_fake_sen12ms(manual, [("winter", 2)], len(DAMAGES) + 1, seed=5, size=256)
    write_fake_sen12ms(manual, [("spring", 63)], 1, seed=5)
    patches = [int(i.rsplit("_p", 1)[1]) for i in ids]
    paths = {how: _damage(manual, how, p) for how, p in zip(DAMAGES, patches, strict=False)}
    bad = dict(zip(DAMAGES, ids, strict=False))
    return manual, bad, paths, ids[len(DAMAGES)], patches


@pytest.mark.parametrize("how", DAMAGES)
def test_bad_patch_raises_naming_file_and_patch(damaged, how):
    manual, bad, paths, _, patches = damaged
    patch = patches[DAMAGES.index(how)]
    with pytest.raises(PatchError) as err:
        sen12ms.read_patch(_ref(manual, "winter", 2, patch))
    assert err.value.patch_id == bad[how]
    assert bad[how] in str(err.value) and paths[how].name in str(err.value)


def test_bad_patches_stop_a_strict_prepare(damaged, tmp_path):
    manual = damaged[0]
    with pytest.raises(PatchError, match="ROIs2017_winter"):
        _prepare(manual, tmp_path / "data")


def test_skip_bad_patches_skips_and_reports(damaged, tmp_path):
    manual, bad, paths, good, _ = damaged
    builder = _prepare(manual, tmp_path / "data", skip_bad_patches=True)
    examples = _examples(builder)
    assert [ex["patch_id"] for ex in examples["train"]] == [good]
    assert len(examples["test"]) == 1
    report = json.loads((Path(builder.data_dir) / sen12ms.REPORT_NAME).read_text())
    assert report["num_skipped"] == len(DAMAGES)
    by_id = {r["patch_id"]: r for r in report["skipped"]}
    assert set(by_id) == set(bad.values())
    for how, pid in bad.items():
        assert by_id[pid]["split"] == "train"
        assert Path(by_id[pid]["path"]).name == paths[how].name
        assert paths[how].name in by_id[pid]["reason"]


def test_parallel_workers_write_the_same_data(tmp_path):
    """Spawned workers, several shards per split, skip mode: the same shards, examples, order and
    report as one process."""
    manual = tmp_path / "manual"
    ids = write_fake_sen12ms(manual, [("winter", 2)], 5, seed=8)
    write_fake_sen12ms(manual, [("fall", 6)], 3, seed=8)
    bad = ids[2]
    path = _damage(manual, "garbage_lc", int(bad.rsplit("_p", 1)[1]))
    shards = tfds.download.DownloadConfig(manual_dir=str(manual), num_shards=2)
    built = {}
    for workers in (1, 2):
        builder = tfds.builder("sen12ms", data_dir=tmp_path / f"w{workers}",
                               file_format="array_record", skip_bad_patches=True,
                               num_workers=workers)
        builder.download_and_prepare(download_config=shards)
        built[workers] = builder
    serial, parallel = built[1], built[2]
    a, b = _examples(serial), _examples(parallel)
    assert list(a) == list(b) == ["train", "validation"]
    for split in a:
        assert [x["patch_id"] for x in a[split]] == [x["patch_id"] for x in b[split]]
        for x, y in zip(a[split], b[split], strict=True):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
    for split in a:
        assert (serial.info.splits[split].shard_lengths
                == parallel.info.splits[split].shard_lengths)
        assert parallel.info.splits[split].num_shards == 2
    assert sorted(x["patch_id"] for x in b["train"]) == sorted(set(ids) - {bad})
    reports = [(Path(x.data_dir) / sen12ms.REPORT_NAME).read_text() for x in (serial, parallel)]
    assert reports[0] == reports[1]
    [skipped] = json.loads(reports[1])["skipped"]
    assert skipped["patch_id"] == bad and skipped["path"] == str(path)


def test_standard_tfds_generator_yields_the_same_examples(damaged, tmp_path):
    """`_generate_examples` (the plain TFDS interface, unused by download_and_prepare) agrees
    with `read_patch`, and skips and reports like the parallel writer."""
    manual, bad, _, good, _ = damaged
    refs = [r for r in sen12ms.list_patches(manual) if r.season == "winter"]
    builder = tfds.builder("sen12ms", data_dir=tmp_path / "d", skip_bad_patches=True)
    got = list(builder._generate_examples("train", refs))
    assert [key for key, _ in got] == [good]
    expected = sen12ms.read_patch(next(r for r in refs if r.patch_id == good))
    assert got[0][1].keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[0][1][key], value)
    report = json.loads((Path(builder.data_dir) / sen12ms.REPORT_NAME).read_text())
    assert sorted(r["patch_id"] for r in report["skipped"]) == sorted(bad.values())
    with pytest.raises(PatchError):
        list(tfds.builder("sen12ms", data_dir=tmp_path / "e")._generate_examples("train", refs))


def test_layout_tolerates_tiff_suffix_stray_files_and_an_enclosing_folder(tmp_path):
    manual = tmp_path / "SEN12MS"
    [pid] = write_fake_sen12ms(manual, [("fall", 6)], 1, seed=6)
    patch = int(pid.rsplit("_p", 1)[1])
    s2 = _path(manual, "fall", "s2", 6, patch)
    s2.rename(s2.with_suffix(".tiff"))
    (s2.parent / "notes.txt").write_text("not a patch")
    (s2.parent / "ROIs1970_fall_s2_7_p1.tif").write_text("other scene: ignored")
    (manual / "ROIs1970_fall" / "extra").mkdir()
    refs = sen12ms.list_patches(tmp_path)  # One folder above the season directories.
    assert [r.patch_id for r in refs] == [pid]
    ex = sen12ms.read_patch(refs[0])
    np.testing.assert_array_equal(ex["s2"], _direct(s2.with_suffix(".tiff")))
    with pytest.raises(ValueError, match="no SEN12MS season directory"):
        sen12ms.list_patches(tmp_path / "SEN12MS" / "ROIs1970_fall")


# ----------------------------------------------------------------------------------------------
# Shipped facts against the official files.

@pytest.mark.skipif(not SHARED_SEN12MS.is_dir(), reason="shared SEN12MS files absent")
def test_shipped_hold_out_scenes_equal_the_official_list():
    lines = (SHARED_SEN12MS / "SEN12MS_holdOutScenes.txt").read_text().split()
    assert len(lines) == 26
    official = []
    for line in lines:
        season_dir, scene_dir = line.split("/")
        official.append((sen12ms.season_name(season_dir), int(scene_dir.split("_")[1])))
    assert list(sen12ms.HOLDOUT_SCENES) == official


@pytest.mark.skipif(not SHARED_SEN12MS.is_dir(), reason="shared SEN12MS files absent")
def test_official_test_list_lies_in_the_hold_out_scenes():
    names = (SHARED_SEN12MS / "test_list.txt").read_text().split()
    assert len(names) == 18_106
    parsed = [sen12ms.parse_file_name(n) for n in names]
    assert {m for _, m, _, _ in parsed} == {"s2"}
    scenes = {(season, scene) for season, _, scene, _ in parsed}
    assert scenes == set(sen12ms.HOLDOUT_SCENES)
    assert all(sen12ms.scene_split(season, scene) == "test" for season, scene in scenes)
    ids = {sen12ms.make_patch_id(s, n, p) for s, _, n, p in parsed}
    assert len(ids) == 18_106 and "ROIs1868_summer_146_p202" not in ids


# ----------------------------------------------------------------------------------------------
# The generic prepare entry point (written separately; skipped until it exists).

def test_prepare_cli(tmp_path):
    pytest.importorskip("data_builders.prepare")
    manual = tmp_path / "manual"
    write_fake_sen12ms(manual, [("spring", 63), ("fall", 6)], 1, seed=7)
    proc = subprocess.run(
        [sys.executable, "-m", "data_builders.prepare", "sen12ms", "--manual_dir", str(manual),
         "--data_dir", str(tmp_path / "data"), "--skip_bad_patches"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version_dir = tmp_path / "data" / "sen12ms" / "default" / "1.0.0"
    assert (version_dir / "dataset_info.json").is_file()
    assert (version_dir / sen12ms.REPORT_NAME).is_file()
