"""BigEarthNet v2.0: the TFDS builder, the fake-data generator and the prepare command.

Every pixel the builder writes is compared with an independent rasterio read of the source
file (20/60 m bands upsampled with np.repeat). Tests on the real files (the official metadata and
the three official sample patches) run when the folder of real sample data beside the repository
(`SHARED` below) exists and are skipped otherwise; the real files are only ever read or copied
into pytest's tmp_path.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
rasterio = pytest.importorskip("rasterio")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import data_builders.bigearthnet_v2 as ben  # noqa: E402  (registers the builder)
from data_builders import fake_bigearthnet as fake  # noqa: E402
from data_builders import prepare  # noqa: E402
from data_builders.geotiff import PatchError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
BEN_SHARED = SHARED / "data" / "bigearthnet_v2"
SAMPLE = BEN_SHARED / "sample"
REAL_METADATA = BEN_SHARED / "metadata" / ben.METADATA_FILE
REAL_SNOW_CLOUD = BEN_SHARED / "metadata" / ben.SNOW_CLOUD_METADATA_FILE

needs_sample = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} not present")
needs_metadata = pytest.mark.skipif(not REAL_METADATA.is_file() or not REAL_SNOW_CLOUD.is_file(),
                                    reason="official metadata parquet files not present")


# ---------------------------------------------------------------------------------------------
# Helpers: building, reading back, and reading the source files independently of the builder.

def build(manual_dir: Path, data_dir: Path, config: str = "default", **kwargs):
    kwargs.setdefault("num_workers", 1)
    kwargs.setdefault("skip_checksums", True)  # fake and subset metadata files
    download_config = tfds.download.DownloadConfig(
        manual_dir=str(manual_dir), **kwargs.pop("download_config", {}))
    builder = tfds.builder(f"bigearthnet_v2/{config}", data_dir=str(data_dir),
                           file_format="array_record", **kwargs)
    builder.download_and_prepare(download_config=download_config)
    return builder


def read_back(builder) -> dict[str, list[dict]]:
    sources = builder.as_data_source()
    return {split: [source[i] for i in range(len(source))] for split, source in sources.items()}


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def tiff_path(directory: Path, stem: str) -> Path:
    found = [p for p in (directory / f"{stem}.tif", directory / f"{stem}.tiff") if p.is_file()]
    assert len(found) == 1, (directory, stem)
    return found[0]


def rasterio_read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        assert src.count == 1
        return src.read(1)


def direct_s2(root: Path, patch_id: str) -> np.ndarray:
    tile = "_".join(patch_id.split("_")[:-2])
    directory = root / "BigEarthNet-S2" / tile / patch_id
    bands = []
    for band in ben.S2_BANDS:
        data = rasterio_read(tiff_path(directory, f"{patch_id}_{band}"))
        factor = 120 // data.shape[0]
        bands.append(np.repeat(np.repeat(data, factor, axis=0), factor, axis=1))
    return np.stack(bands, axis=-1)


def direct_s1(root: Path, s1_name: str) -> np.ndarray:
    tile = "_".join(s1_name.split("_")[:-3])
    directory = root / "BigEarthNet-S1" / tile / s1_name
    return np.stack([rasterio_read(tiff_path(directory, f"{s1_name}_{band}"))
                     for band in ("VV", "VH")], axis=-1)


def direct_codes(root: Path, patch_id: str) -> np.ndarray:
    tile = "_".join(patch_id.split("_")[:-2])
    return rasterio_read(tiff_path(root / "Reference_Maps" / tile / patch_id,
                                   f"{patch_id}_reference_map"))


def codes_to_classes(codes: np.ndarray) -> np.ndarray:
    """Independent of the builder's lookup table: a plain loop over the CLC-code-to-class table of
    the BigEarthNet v2.0 19-class nomenclature (Clasen et al. 2025)."""
    out = np.full(codes.shape, 255, dtype=np.uint8)
    for code, cls in ben.CLC_TO_CLASS.items():
        out[codes == code] = cls
    return out


def metadata_rows(root: Path, name: str = ben.METADATA_FILE) -> dict[str, dict]:
    return {row["patch_id"]: row for row in pq.read_table(root / name).to_pylist()}


def check_every_pixel(builder, root: Path, rows: dict[str, dict], *, with_maps: bool) -> int:
    """Every example against the source files and its metadata row; returns the count."""
    count = 0
    for split, examples in read_back(builder).items():
        for ex in examples:
            patch_id = text(ex["patch_id"])
            row = rows[patch_id]
            assert row["split"] == split
            assert ex["s2"].dtype == np.uint16 and ex["s2"].shape == (120, 120, 12)
            np.testing.assert_array_equal(ex["s2"], direct_s2(root, patch_id))
            assert ex["s1"].dtype == np.float32 and ex["s1"].shape == (120, 120, 2)
            np.testing.assert_array_equal(ex["s1"], direct_s1(root, row["s1_name"]))
            expected = np.array([name in row["labels"] for name in ben.CLASS_NAMES])
            np.testing.assert_array_equal(ex["labels"], expected)
            assert ex["labels"].dtype == np.bool_
            assert text(ex["s1_name"]) == row["s1_name"]
            assert text(ex["country"]) == row["country"]
            assert bool(ex["contains_seasonal_snow"]) == row["contains_seasonal_snow"]
            assert bool(ex["contains_cloud_or_shadow"]) == row["contains_cloud_or_shadow"]
            if with_maps:
                assert ex["reference_map"].dtype == np.uint8
                np.testing.assert_array_equal(ex["reference_map"],
                                              codes_to_classes(direct_codes(root, patch_id)))
            else:
                assert "reference_map" not in ex
            count += 1
    return count


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ben_fake") / "manual"
    ids = fake.write_fake_bigearthnet(root, 10, seed=7, num_snow_cloud=4)
    assert len(ids) == 14
    return root


@pytest.fixture(scope="module")
def prepared(fake_root, tmp_path_factory):
    """Builds each config at most once per module."""
    data_dir = tmp_path_factory.mktemp("ben_data")
    cache = {}

    def get(config: str):
        if config not in cache:
            cache[config] = build(fake_root, data_dir, config)
        return cache[config]

    return get


def tiny_root(tmp_path: Path, n: int = 4, seed: int = 11, **kwargs) -> Path:
    root = tmp_path / "manual"
    fake.write_fake_bigearthnet(root, n, seed=seed, **kwargs)
    return root


# ---------------------------------------------------------------------------------------------
# Constants.

def test_constants_follow_the_reference():
    assert len(ben.CLASS_NAMES) == 19 == ben.NUM_CLASSES
    assert ben.CLASS_NAMES[6] == ("Land principally occupied by agriculture, with significant "
                                  "areas of natural vegetation")
    assert ben.CLASS_NAMES[13] == "Transitional woodland, shrub"
    assert ben.CLASS_NAMES[18] == "Marine waters"
    assert sorted(set(ben.CLC_TO_CLASS.values())) == list(range(19))
    assert len(ben.CLC_TO_CLASS) == 32
    assert ben.CLC_TO_CLASS[243] == 6 and ben.CLC_TO_CLASS[333] == 11
    assert ben.CLC_TO_CLASS[241] == 3 and 999 not in ben.CLC_TO_CLASS
    assert ben.S2_BANDS == ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A",
                            "B09", "B11", "B12")
    assert [b for b in ben.S2_BANDS if ben.S2_BAND_SIZE[b] == 120] == ["B02", "B03", "B04", "B08"]
    assert [b for b in ben.S2_BANDS if ben.S2_BAND_SIZE[b] == 20] == ["B01", "B09"]
    assert ben.S1_BANDS == ("VV", "VH")


def test_tile_dirs_strip_the_right_fields():
    pid = "S2A_MSIL2A_20170613T101031_N9999_R022_T34VER_00_45"
    s1 = "S1B_IW_GRDH_1SDV_20170613T160455_34VER_0_45"
    assert ben.s2_tile_dir(pid) == "S2A_MSIL2A_20170613T101031_N9999_R022_T34VER"
    assert ben.s1_tile_dir(s1) == "S1B_IW_GRDH_1SDV_20170613T160455"


def test_clc_mapping_incl_unlabelled_codes():
    codes = np.array(sorted(ben.CLC_TO_CLASS) + [999, 0, 1, 124, 141, 332, 335, 65535],
                     dtype=np.uint16)
    classes = ben.clc_to_classes(codes)
    assert classes.dtype == np.uint8
    assert list(classes[:32]) == [ben.CLC_TO_CLASS[c] for c in sorted(ben.CLC_TO_CLASS)]
    assert (classes[32:] == ben.UNLABELLED).all()
    with pytest.raises(TypeError):
        ben.clc_to_classes(codes.astype(np.int32))


def test_labels_to_multi_hot_matches_whole_names():
    hot = ben.labels_to_multi_hot(["Transitional woodland, shrub", "Urban fabric"], patch_id="p")
    assert list(np.flatnonzero(hot)) == [0, 13]
    with pytest.raises(PatchError, match="unknown label name 'Transitional woodland'"):
        ben.labels_to_multi_hot(["Transitional woodland"], patch_id="p")
    with pytest.raises(PatchError, match="no labels"):
        ben.labels_to_multi_hot([], patch_id="p")


def test_patch_error_survives_pickling():
    error = PatchError("boom", patch_id="p1", path="/x/y.tif")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, PatchError)
    assert (copy.patch_id, copy.path, str(copy)) == ("p1", "/x/y.tif", str(error))


def test_feature_spec_per_config():
    for config, maps in (("default", False), ("all", False), ("default_with_maps", True),
                         ("all_with_maps", True)):
        builder = tfds.builder(f"bigearthnet_v2/{config}", data_dir="/nonexistent")
        features = builder.info.features
        assert ("reference_map" in features) == maps
        assert features["s1"].shape == (120, 120, 2) and features["s1"].np_dtype == np.float32
        assert features["s2"].shape == (120, 120, 12) and features["s2"].np_dtype == np.uint16
        assert features["labels"].shape == (19,) and features["labels"].np_dtype == np.bool_
        if maps:
            assert features["reference_map"].shape == (120, 120)
            assert features["reference_map"].np_dtype == np.uint8
    text_ = str(tfds.builder_cls("bigearthnet_v2").MANUAL_DOWNLOAD_INSTRUCTIONS)
    for needle in ("BigEarthNet-S1.tar.zst", "BigEarthNet-S2.tar.zst", "Reference_Maps.tar.zst",
                   "55687065e77b6d0b0f1ff604a6e7b49c", "fe31856f4986d446c9468b59d6387c91"):
        assert needle in text_


# ---------------------------------------------------------------------------------------------
# The fake generator.

def test_fake_layout_ids_and_geotransforms(fake_root):
    rows = metadata_rows(fake_root)
    assert len(rows) == 10
    assert len(metadata_rows(fake_root, ben.SNOW_CLOUD_METADATA_FILE)) == 4
    for pid, row in rows.items():
        x, y = pid.split("_")[-2:]
        assert len(x) == len(y) == 2  # zero-padded
        assert row["s1_name"].split("_")[-2:] == [str(int(x)), str(int(y))]
        assert ben.s1_tile_dir(row["s1_name"]) != ben.s2_tile_dir(pid)
        assert row["labels"] == sorted(row["labels"]) and 1 <= len(row["labels"]) <= 4
        s2_dir = fake_root / "BigEarthNet-S2" / ben.s2_tile_dir(pid) / pid
        with rasterio.open(s2_dir / f"{pid}_B02.tif") as b02, \
                rasterio.open(s2_dir / f"{pid}_B01.tif") as b01:
            assert b02.crs.to_epsg() // 100 == 326 and b02.nodata == 0
            assert b01.transform.a == 60 and b01.transform.c == b02.transform.c
            tile_x0, tile_y0 = fake.patch_geo(pid)[1][2], fake.patch_geo(pid)[1][5]
            assert (b02.transform.c, b02.transform.f) == (tile_x0, tile_y0)
        vv = (fake_root / "BigEarthNet-S1" / ben.s1_tile_dir(row["s1_name"]) / row["s1_name"]
              / f"{row['s1_name']}_VV.tif")
        with rasterio.open(vv) as src:
            assert src.nodata is None and src.dtypes[0] == "float32"
            assert src.transform == b02.transform and src.crs == b02.crs
            data = src.read(1)
            assert -40 < data.mean() < 5


@pytest.mark.parametrize("size,dtype,nodata", [(120, np.uint16, 0), (60, np.uint16, 0),
                                               (20, np.uint16, 0), (120, np.float32, None)])
def test_fast_geotiff_writer_matches_rasterio(tmp_path, size, dtype, nodata):
    from data_builders.geotiff import write_tiff

    rng = np.random.default_rng(size)
    array = (rng.random((size, size)) * 5000 - (1000 if dtype == np.float32 else 0)).astype(dtype)
    transform = (1200 / size, 0.0, 303600.0, 0.0, -1200 / size, 5292000.0)
    ours, theirs, plain = tmp_path / "ours.tif", tmp_path / "theirs.tif", tmp_path / "plain.tif"
    fake.write_geotiff(ours, array, epsg=32633, transform=transform, nodata=nodata)
    write_tiff(theirs, array, crs="EPSG:32633", transform=transform, nodata=nodata)
    with rasterio.open(ours) as a, rasterio.open(theirs) as b:
        assert a.profile == b.profile and a.tags() == b.tags()
        assert tuple(a.transform)[:6] == transform
        np.testing.assert_array_equal(a.read(1), array)
    # Byte for byte what rasterio writes with its default GTiff creation options.
    from affine import Affine
    profile = dict(driver="GTiff", height=size, width=size, count=1, dtype=np.dtype(dtype).name,
                   crs="EPSG:32633", transform=Affine(*transform))
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(array, 1)
    assert ours.read_bytes() == plain.read_bytes()


@needs_sample
def test_fake_files_look_like_the_real_ones(fake_root):
    real = {p.name.rsplit("_", 1)[1]: p for p in SAMPLE.rglob("*.tif")}
    assert len(real) == 15
    fakes = {}
    for sub in ("BigEarthNet-S1", "BigEarthNet-S2", "Reference_Maps"):
        for p in sorted((fake_root / sub).rglob("*.tif")):
            fakes.setdefault(p.name.rsplit("_", 1)[1], p)
    for suffix, real_path in real.items():
        with rasterio.open(real_path) as r, rasterio.open(fakes[suffix]) as f:
            rp, fp = dict(r.profile), dict(f.profile)
            assert rp.pop("crs").to_epsg() // 100 == fp.pop("crs").to_epsg() // 100 == 326
            rt, ft = rp.pop("transform"), fp.pop("transform")
            assert (rt.a, rt.b, rt.d, rt.e) == (ft.a, ft.b, ft.d, ft.e)
            assert rp == fp, suffix
            assert r.tags() == f.tags()
        if suffix.startswith("B"):  # Uncompressed S2: the same layout, so the same size.
            assert fakes[suffix].stat().st_size == real_path.stat().st_size, suffix
    if REAL_METADATA.is_file():
        assert pq.read_schema(REAL_METADATA).equals(
            pq.read_schema(fake_root / ben.METADATA_FILE), check_metadata=False)
        assert pq.read_schema(REAL_SNOW_CLOUD).equals(
            pq.read_schema(fake_root / ben.SNOW_CLOUD_METADATA_FILE), check_metadata=False)


def test_fake_labels_agree_with_reference_maps(fake_root):
    for name in (ben.METADATA_FILE, ben.SNOW_CLOUD_METADATA_FILE):
        for pid, row in metadata_rows(fake_root, name).items():
            classes = set(np.unique(codes_to_classes(direct_codes(fake_root, pid)))) - {255}
            assert sorted(ben.CLASS_NAMES[c] for c in classes) == row["labels"]
    snow_cloud = metadata_rows(fake_root, ben.SNOW_CLOUD_METADATA_FILE).values()
    assert all(r["contains_seasonal_snow"] or r["contains_cloud_or_shadow"] for r in snow_cloud)


def test_fake_is_deterministic(tmp_path):
    a = fake.write_fake_bigearthnet(tmp_path / "a", 3, seed=5, num_snow_cloud=1)
    b = fake.write_fake_bigearthnet(tmp_path / "b", 3, seed=5, num_snow_cloud=1)
    c = fake.write_fake_bigearthnet(tmp_path / "c", 3, seed=6, num_snow_cloud=1)
    assert a == b and a != c
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tif"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.tif"))
    assert files_a == files_b and len(files_a) == 4 * 15
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert ((tmp_path / "a" / ben.METADATA_FILE).read_bytes()
            == (tmp_path / "b" / ben.METADATA_FILE).read_bytes())
    assert not list((tmp_path / "a").rglob("*.part"))


def _region_accuracy(learnable: bool, num: int = 120) -> float:
    """Nearest-centroid accuracy of per-region mean features (log S2 + S1) -> class."""
    rng = np.random.default_rng(0)
    features, classes = [], []
    for _ in range(num):
        patch = fake.synthesize_patch(rng, learnable=learnable)
        s2 = np.stack([np.repeat(np.repeat(patch.s2[b], 120 // ben.S2_BAND_SIZE[b], 0),
                                 120 // ben.S2_BAND_SIZE[b], 1) for b in ben.S2_BANDS], -1)
        pixels = np.concatenate([np.log(s2.astype(np.float32)), patch.s1 / 10], -1)
        for c in np.unique(patch.class_map):
            if c != 255:
                features.append(pixels[patch.class_map == c].mean(0))
                classes.append(c)
    x, y = np.array(features), np.array(classes)
    half = len(y) // 2
    known = np.unique(y[:half])
    centroids = np.stack([x[:half][y[:half] == c].mean(0) for c in known])
    predicted = known[np.argmin(((x[half:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    return float((predicted == y[half:]).mean())


def test_fake_classes_are_learnable_only_when_asked():
    assert _region_accuracy(True) > 0.7
    assert _region_accuracy(False) < 0.3


# ---------------------------------------------------------------------------------------------
# The builder on fake data.

def test_default_config_every_pixel_and_split_membership(prepared, fake_root):
    builder = prepared("default")
    rows = metadata_rows(fake_root)
    assert check_every_pixel(builder, fake_root, rows, with_maps=False) == len(rows)
    examples = read_back(builder)
    for split in ben.SPLITS:
        expected = {pid for pid, row in rows.items() if row["split"] == split}
        got = {text(ex["patch_id"]) for ex in examples.get(split, [])}
        assert got == expected, split
        if expected:
            assert builder.info.splits[split].num_examples == len(expected)
    report = json.loads((Path(builder.data_path) / ben.REPORT_NAME).read_text())
    assert report["skipped"] == [] and report["config"] == "default"


def test_all_config_with_maps_every_pixel(prepared, fake_root):
    builder = prepared("all_with_maps")
    rows = metadata_rows(fake_root) | metadata_rows(fake_root, ben.SNOW_CLOUD_METADATA_FILE)
    assert check_every_pixel(builder, fake_root, rows, with_maps=True) == 14
    default_ids = set(metadata_rows(fake_root))
    flagged = {text(ex["patch_id"]) for exs in read_back(builder).values() for ex in exs
               if ex["contains_seasonal_snow"] or ex["contains_cloud_or_shadow"]}
    assert flagged == set(rows) - default_ids and len(flagged) == 4


def test_reference_map_unlabelled_codes_become_255(tmp_path):
    root = tiny_root(tmp_path, n=2, seed=3)
    rows = metadata_rows(root)
    pid = next(iter(rows))
    codes = np.full((120, 120), 999, dtype=np.uint16)
    codes[:, :20] = 311  # Broad-leaved forest
    codes[:, 20:40] = 523  # Marine waters
    codes[:10, 40:] = 132  # Dump sites: not among the 19 classes
    codes[10:20, 40:] = 0
    codes[20:30, 40:] = 4242
    fake.write_reference_map(root, pid, codes)
    builder = build(root, tmp_path / "data", "default_with_maps")
    maps = {text(ex["patch_id"]): ex["reference_map"]
            for exs in read_back(builder).values() for ex in exs}
    expected = np.full((120, 120), 255, dtype=np.uint8)
    expected[:, :20], expected[:, 20:40] = 8, 18
    np.testing.assert_array_equal(maps[pid], expected)


def test_tiff_suffix_is_accepted(tmp_path):
    root = tiny_root(tmp_path, n=2, seed=4)
    for path in root.rglob("*.tif"):
        path.rename(path.with_suffix(".tiff"))
    builder = build(root, tmp_path / "data", "default_with_maps")
    assert check_every_pixel(builder, root, metadata_rows(root), with_maps=True) == 2


def test_missing_manual_content_is_explained(tmp_path):
    root = tiny_root(tmp_path, n=2, seed=4, with_reference_maps=False)
    with pytest.raises(FileNotFoundError, match="Reference_Maps"):
        build(root, tmp_path / "data", "default_with_maps")
    (root / ben.SNOW_CLOUD_METADATA_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="metadata_for_patches_with_snow"):
        build(root, tmp_path / "data", "all")


def test_metadata_md5_is_checked_unless_skipped(tmp_path, caplog):
    root = tiny_root(tmp_path, n=2, seed=4)
    with pytest.raises(ValueError, match=f"{root / ben.METADATA_FILE}: md5 [0-9a-f]{{32}} is not "
                       f"the official release's {ben.METADATA_MD5[ben.METADATA_FILE]}"):
        build(root, tmp_path / "strict", skip_checksums=False)
    assert not (tmp_path / "strict" / "bigearthnet_v2" / "default" / "1.0.0").exists()
    with caplog.at_level("INFO"):
        build(root, tmp_path / "data", skip_checksums=True)
    assert "building with it anyway" in caplog.text


def test_grid_cells_of_s1_and_s2_names():
    assert (ben.grid_cell("S2A_MSIL2A_20170613T101031_N9999_R022_T34VER_00_45")
            == ben.grid_cell("S1B_IW_GRDH_1SDV_20170613T160455_34VER_0_45") == ("34VER", 0, 45))
    with pytest.raises(PatchError, match="malformed patch name 'x_y'"):
        ben.grid_cell("x_y")


def test_duplicate_patch_ids_are_an_error(tmp_path):
    root = tiny_root(tmp_path, n=2, seed=4)
    table = pq.read_table(root / ben.METADATA_FILE)
    pq.write_table(table, root / ben.SNOW_CLOUD_METADATA_FILE)
    with pytest.raises(ValueError, match="more than once"):
        build(root, tmp_path / "data", "all")


def test_standard_tfds_generator_yields_the_same_examples(tmp_path):
    """`_generate_examples` (the plain TFDS interface, unused by download_and_prepare) agrees
    with `load_example`, and skips and reports like the parallel writer."""
    root = tiny_root(tmp_path, n=3, seed=5)
    rows = ben.read_metadata(root / ben.METADATA_FILE)
    _break("missing_band", root, rows[0].patch_id, rows[0]._asdict())
    builder = tfds.builder("bigearthnet_v2/default_with_maps", data_dir=str(tmp_path / "d"),
                           skip_bad_patches=True)
    got = list(builder._generate_examples(root, rows))
    assert [key for key, _ in got] == [row.patch_id for row in rows[1:]]
    for (_, example), row in zip(got, rows[1:], strict=True):
        expected = ben.load_example(root, row, with_reference_map=True)
        assert example.keys() == expected.keys()
        for key in example:
            np.testing.assert_array_equal(example[key], expected[key])
    assert [s["patch_id"] for s in ben.skipped_patches(builder.data_dir)] == [rows[0].patch_id]


# Bad patches: each kind stops the build with a PatchError naming file and patch.

def _s2_file(root, pid, band):
    return root / "BigEarthNet-S2" / ben.s2_tile_dir(pid) / pid / f"{pid}_{band}.tif"


def _s1_file(root, row, band):
    name = row["s1_name"]
    return root / "BigEarthNet-S1" / ben.s1_tile_dir(name) / name / f"{name}_{band}.tif"


def _rewrite_metadata_labels(root, pid, labels):
    table = pq.read_table(root / ben.METADATA_FILE).to_pylist()
    for row in table:
        if row["patch_id"] == pid:
            row["labels"] = labels
    pq.write_table(pa.Table.from_pylist(table, schema=fake.metadata_schema()),
                   root / ben.METADATA_FILE)


def _break(kind: str, root: Path, pid: str, row: dict) -> tuple[Path, str]:
    """Breaks patch `pid` in one way; returns (the file the error must name, a message part)."""
    epsg, transform = fake.patch_geo(pid)
    if kind == "missing_band":
        path = _s2_file(root, pid, "B05")
        path.unlink()
        return path, "missing file"
    if kind == "wrong_shape":
        path = _s2_file(root, pid, "B05")
        fake.write_geotiff(path, np.ones((120, 120), np.uint16), epsg=epsg, transform=transform)
        return path, "expected shape (60, 60)"
    if kind == "wrong_dtype":
        path = _s2_file(root, pid, "B02")
        fake.write_geotiff(path, np.ones((120, 120), np.float32), epsg=epsg, transform=transform)
        return path, "expected dtype uint16"
    if kind == "wrong_band_count":
        path = _s2_file(root, pid, "B03")
        from data_builders.geotiff import write_tiff
        write_tiff(path, np.ones((120, 120, 2), np.uint16), crs=f"EPSG:{epsg}",
                   transform=transform)
        return path, "expected 1 band"
    if kind == "garbage_tiff":
        path = _s1_file(root, row, "VV")
        path.write_bytes(b"this is not a tiff" * 10)
        return path, "unreadable GeoTIFF"
    if kind == "truncated_tiff":
        path = _s2_file(root, pid, "B08")
        path.write_bytes(path.read_bytes()[:5000])
        return path, "unreadable GeoTIFF"
    if kind == "nan_s1":
        path = _s1_file(root, row, "VH")
        data = rasterio_read(path)
        data[3, 4] = np.nan
        fake.write_geotiff(path, data, epsg=epsg, transform=transform)
        return path, "non-finite"
    if kind == "row_without_s1":
        path = _s1_file(root, row, "VV").parent
        shutil.rmtree(path)
        return path, "S1 patch directory missing"
    if kind == "row_without_s2":
        path = _s2_file(root, pid, "B01").parent
        shutil.rmtree(path)
        return path, "S2 patch directory missing"
    if kind == "missing_reference_map":
        path = (root / "Reference_Maps" / ben.s2_tile_dir(pid) / pid
                / f"{pid}_reference_map.tif")
        path.unlink()
        return path, "missing file"
    if kind == "symlink_loop":
        path = _s2_file(root, pid, "B03")
        path.unlink()
        path.symlink_to(path.name)  # points at itself
        return path, "symlink loop"
    if kind == "mispaired_s1":
        table = pq.read_table(root / ben.METADATA_FILE).to_pylist()
        other = next(r["s1_name"] for r in table if r["patch_id"] != pid)
        for r in table:
            if r["patch_id"] == pid:
                r["s1_name"] = other
        pq.write_table(pa.Table.from_pylist(table, schema=fake.metadata_schema()),
                       root / ben.METADATA_FILE)
        return root / ben.METADATA_FILE, f"s1_name {other} is not the S1 patch of this S2 patch"
    if kind == "unknown_label":
        _rewrite_metadata_labels(root, pid, ["Arable land", "Urban fabric, dense"])
        return root / ben.METADATA_FILE, "unknown label name 'Urban fabric, dense'"
    raise ValueError(kind)


BAD_KINDS = ("missing_band", "wrong_shape", "wrong_dtype", "wrong_band_count", "garbage_tiff",
             "truncated_tiff", "nan_s1", "row_without_s1", "row_without_s2",
             "missing_reference_map", "unknown_label", "symlink_loop", "mispaired_s1")


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_patch_stops_the_build_naming_file_and_patch(tmp_path, kind):
    root = tiny_root(tmp_path, n=3, seed=21)
    rows = metadata_rows(root)
    pid = sorted(rows)[1]
    path, message = _break(kind, root, pid, rows[pid])
    with pytest.raises(PatchError) as caught:
        build(root, tmp_path / "data", "default_with_maps")
    error = caught.value
    assert error.patch_id == pid
    assert error.path == str(path)
    assert pid in str(error) and str(path) in str(error) and message in str(error)
    assert not (tmp_path / "data" / "bigearthnet_v2" / "default_with_maps" / "1.0.0").exists()


def test_skip_mode_reports_every_bad_patch(tmp_path):
    root = tiny_root(tmp_path, n=len(BAD_KINDS) + 3, seed=22)
    rows = metadata_rows(root)
    ids = sorted(rows)
    broken = {}
    for kind, pid in zip(BAD_KINDS, ids, strict=False):
        broken[pid] = _break(kind, root, pid, rows[pid])
    builder = build(root, tmp_path / "data", "default_with_maps", skip_bad_patches=True)
    report = json.loads((Path(builder.data_path) / ben.REPORT_NAME).read_text())
    assert report["num_skipped"] == len(broken) == len(BAD_KINDS)
    by_id = {item["patch_id"]: item for item in report["skipped"]}
    assert set(by_id) == set(broken)
    for pid, (path, message) in broken.items():
        assert by_id[pid]["path"] == str(path)
        assert message in by_id[pid]["reason"]
        assert by_id[pid]["split"] == rows[pid]["split"]
    assert ben.skipped_patches(builder.data_path) == report["skipped"]
    good = {pid: row for pid, row in rows.items() if pid not in broken}
    assert check_every_pixel(builder, root, good, with_maps=True) == 3


def test_parallel_workers_write_the_same_data(tmp_path):
    """Spawned workers, several shards per split, skip mode: same examples, order and report as
    one process."""
    root = tiny_root(tmp_path, n=8, seed=23)
    rows = metadata_rows(root)
    pid = sorted(rows)[0]
    _break("garbage_tiff", root, pid, rows[pid])
    shards = {"download_config": {"num_shards": 2}}
    serial = build(root, tmp_path / "serial", "default", skip_bad_patches=True, **shards)
    parallel = build(root, tmp_path / "parallel", "default", skip_bad_patches=True,
                     num_workers=2, **shards)
    a, b = read_back(serial), read_back(parallel)
    assert list(a) == list(b)
    for split in a:
        assert [text(x["patch_id"]) for x in a[split]] == [text(x["patch_id"]) for x in b[split]]
        for x, y in zip(a[split], b[split], strict=True):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
    assert ben.skipped_patches(serial.data_path) == ben.skipped_patches(parallel.data_path)
    assert [s["patch_id"] for s in ben.skipped_patches(parallel.data_path)] == [pid]
    assert sum(s.num_examples for s in parallel.info.splits.values()) == 7
    assert parallel.info.splits["train"].num_shards == 2


# ---------------------------------------------------------------------------------------------
# Real files.

def _real_rows(patch_ids: list[str]):
    import pyarrow.compute as pc

    table = pq.read_table(REAL_METADATA)
    return table.filter(pc.is_in(table["patch_id"], value_set=pa.array(patch_ids)))


@needs_sample
@needs_metadata
def test_real_sample_patches_every_pixel(tmp_path):
    s2_dir = next((SAMPLE / "BigEarthNet-S2").glob("*/*"))
    s1_dir = next((SAMPLE / "BigEarthNet-S1").glob("*/*"))
    map_dir = next((SAMPLE / "Reference_Maps").glob("*/*"))
    s2_id, map_id = s2_dir.name, map_dir.name
    real_table = pq.read_table(REAL_METADATA, columns=["patch_id", "s1_name"])
    s1_to_pid = dict(zip(real_table["s1_name"].to_pylist(), real_table["patch_id"].to_pylist(),
                         strict=True))
    s1_id = s1_to_pid[s1_dir.name]
    table = _real_rows([s2_id, s1_id, map_id])
    assert table.num_rows == 3
    rows = {row["patch_id"]: row for row in table.to_pylist()}

    root = tmp_path / "manual"
    rng = np.random.default_rng(0)
    real_parts = {(s2_id, "s2"), (s1_id, "s1"), (map_id, "map")}
    for pid, row in rows.items():
        patch = fake.synthesize_patch(rng)
        for part, src, dest in (
                ("s2", s2_dir, root / "BigEarthNet-S2" / ben.s2_tile_dir(pid) / pid),
                ("s1", s1_dir, root / "BigEarthNet-S1" / ben.s1_tile_dir(row["s1_name"])
                 / row["s1_name"]),
                ("map", map_dir, root / "Reference_Maps" / ben.s2_tile_dir(pid) / pid)):
            if (pid, part) in real_parts:
                shutil.copytree(src, dest)
            elif part == "s2":
                fake.write_s2_patch(root, pid, patch.s2)
            elif part == "s1":
                fake.write_s1_patch(root, row["s1_name"], patch.s1)
            else:
                fake.write_reference_map(root, pid, patch.clc_codes)
    pq.write_table(table, root / ben.METADATA_FILE)

    builder = build(root, tmp_path / "data", "default_with_maps")
    assert check_every_pixel(builder, root, rows, with_maps=True) == 3
    examples = {text(ex["patch_id"]): ex for exs in read_back(builder).values() for ex in exs}
    # The real bands against the files in the shared folder themselves.
    np.testing.assert_array_equal(examples[s2_id]["s2"], direct_s2(SAMPLE, s2_id))
    np.testing.assert_array_equal(examples[s1_id]["s1"], direct_s1(SAMPLE, s1_dir.name))
    real_map = codes_to_classes(direct_codes(SAMPLE, map_id))
    np.testing.assert_array_equal(examples[map_id]["reference_map"], real_map)
    # Real data consistency: the classes of the real reference map are the patch's labels.
    present = set(np.unique(real_map)) - {255}
    assert sorted(ben.CLASS_NAMES[c] for c in present) == rows[map_id]["labels"]
    assert set(np.flatnonzero(examples[map_id]["labels"])) == present
    s2 = examples[s2_id]["s2"]
    assert 0 < s2.mean() < 10000 and s2[..., 0].std() > 0


@needs_metadata
def test_real_metadata_split_membership():
    """Facts of the official parquet files, read through the builder's own reader."""
    names_by_split = {}
    for path in (REAL_METADATA, REAL_SNOW_CLOUD):
        rows = ben.read_metadata(path)
        counts = collections.Counter(row.split for row in rows)
        names = {split: set() for split in ben.SPLITS}
        for row in rows:
            assert 1 <= len(row.labels) <= 11
            assert list(row.labels) == sorted(row.labels)
            names[row.split].update(row.labels)
        assert dict(counts) == ben.OFFICIAL_SPLIT_SIZES[path.name], path.name
        assert len({row.patch_id for row in rows}) == len(rows)
        assert all(ben.s1_tile_dir(row.s1_name)[:4] in ("S1A_", "S1B_") for row in rows)
        assert all(ben.grid_cell(row.s1_name) == ben.grid_cell(row.patch_id) for row in rows)
        assert ben.file_md5(path) == ben.METADATA_MD5[path.name]
        for split_names in names.values():
            assert split_names <= set(ben.CLASS_NAMES)  # Every label name is known.
        flagged = sum(row.contains_seasonal_snow or row.contains_cloud_or_shadow for row in rows)
        assert flagged == (0 if path == REAL_METADATA else len(rows))
        names_by_split[path.name] = names
    benchmark = names_by_split[ben.METADATA_FILE]
    snow_cloud = names_by_split[ben.SNOW_CLOUD_METADATA_FILE]
    for split in ben.SPLITS:  # All 19 classes in every benchmark split (and so in `all`).
        assert benchmark[split] == set(ben.CLASS_NAMES), split
    # The snow/cloud file alone lacks a few rare classes outside train (a fact of the data).
    assert set(ben.CLASS_NAMES) - snow_cloud["train"] == set()
    assert set(ben.CLASS_NAMES) - snow_cloud["validation"] == {"Agro-forestry areas"}
    assert set(ben.CLASS_NAMES) - snow_cloud["test"] == {"Agro-forestry areas",
                                                         "Beaches, dunes, sands"}
    assert sum(ben.OFFICIAL_SPLIT_SIZES[ben.METADATA_FILE].values()) == 480_038
    assert sum(ben.OFFICIAL_SPLIT_SIZES[ben.SNOW_CLOUD_METADATA_FILE].values()) == 69_450


# ---------------------------------------------------------------------------------------------
# The prepare command.

def _exit_status(main, argv):
    """The exit status of a command-line `main(argv)`: its return value, or its SystemExit's."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_prepare_main_end_to_end(tmp_path, capsys):
    root = tiny_root(tmp_path, n=4, seed=31, num_snow_cloud=2)
    rows = metadata_rows(root)
    pid = sorted(rows)[0]
    _break("missing_band", root, pid, rows[pid])
    args = ["bigearthnet_v2", "--manual_dir", str(root), "--data_dir", str(tmp_path / "data"),
            "--config", "all", "--num_workers", "1"]
    assert _exit_status(prepare.main, args) == 1  # fake metadata: not the official md5
    err = capsys.readouterr().err
    assert f"{root / ben.METADATA_FILE}: md5 " in err and "--skip_checksums" in err
    args.append("--skip_checksums")
    assert _exit_status(prepare.main, args) == 1
    assert pid in capsys.readouterr().err
    assert prepare.main(args + ["--skip_bad_patches"]) == 0
    out = capsys.readouterr().out
    assert "skipped patches: 1" in out and pid in out
    assert str(tmp_path / "data" / "bigearthnet_v2" / "all" / "1.0.0") in out
    assert "total" in out and " 5 examples" in out
    assert _exit_status(prepare.main, ["no_such_dataset", "--manual_dir", str(root),
                                       "--data_dir", str(tmp_path)]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert _exit_status(prepare.main, ["bigearthnet_v2", "--manual_dir",
                                       str(tmp_path / "absent"), "--data_dir",
                                       str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert "bigearthnet_v2" in prepare.available_datasets()


def test_prepare_command_line(tmp_path):
    root = tiny_root(tmp_path, n=3, seed=32)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    result = subprocess.run(
        [sys.executable, "-m", "data_builders.prepare", "bigearthnet_v2", "--manual_dir",
         str(root), "--data_dir", str(tmp_path / "data"), "--num_workers", "1",
         "--skip_checksums"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "skipped patches: 0" in result.stdout
    assert "Reading patches" in result.stderr  # The progress bar.
    prepared_dir = tmp_path / "data" / "bigearthnet_v2" / "default" / "1.0.0"
    assert list(prepared_dir.glob("bigearthnet_v2-*.array_record-*"))


def _retype_column(path: Path, name: str, values, data_type):
    """Rewrites one metadata column with other values and type (the rest unchanged)."""
    table = pq.read_table(path)
    i = table.schema.get_field_index(name)
    pq.write_table(table.set_column(i, pa.field(name, data_type), pa.array(values, data_type)),
                   path)


@pytest.mark.parametrize("skip", [False, True])
def test_metadata_columns_of_the_wrong_type_are_named_up_front(tmp_path, skip):
    """`labels` as one string per row was read character by character ("unknown label name
    'A'" for every patch); the type check names the column, its type and the expected one."""
    root = tiny_root(tmp_path, n=3, seed=41)
    path = root / ben.METADATA_FILE
    labels = [";".join(r) for r in pq.read_table(path)["labels"].to_pylist()]
    _retype_column(path, "labels", labels, pa.string())
    with pytest.raises(ValueError) as caught:
        build(root, tmp_path / "data", skip_bad_patches=skip)
    assert str(caught.value) == (
        f"{path}: metadata of the wrong type: column 'labels' is string, expected list<string> "
        "(the official BigEarthNet v2 metadata schema)")
    flags = pq.read_table(path)["contains_seasonal_snow"].to_pylist()
    _retype_column(path, "contains_seasonal_snow", [str(f) for f in flags], pa.string())
    with pytest.raises(ValueError, match="column 'labels' is string, expected list<string>; "
                       "column 'contains_seasonal_snow' is string, expected bool"):
        ben.read_metadata(path)


@needs_metadata
def test_the_official_metadata_passes_the_type_check():
    for path in (REAL_METADATA, REAL_SNOW_CLOUD):
        ben.check_metadata_types(pq.read_schema(path), path)
    schema = pa.schema([("labels", pa.large_list(pa.large_string())),
                        ("split", pa.dictionary(pa.int32(), pa.string()))])
    ben.check_metadata_types(schema, "x.parquet")  # other encodings of the same types pass


def test_prepare_does_not_suggest_a_flag_already_given(tmp_path, capsys):
    root = tiny_root(tmp_path, n=2, seed=42)
    shutil.rmtree(root / ben.S2_DIR)
    (root / ben.S2_DIR).mkdir()  # every patch unreadable
    args = ["bigearthnet_v2", "--manual_dir", str(root), "--data_dir", str(tmp_path / "data"),
            "--num_workers", "1", "--skip_checksums"]
    with pytest.raises(SystemExit) as e:
        prepare.main(args)
    assert e.value.code == 1
    assert "(use --skip_bad_patches to skip such patches)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        prepare.main([*args, "--skip_bad_patches"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "no readable patch at all" in err and "--skip_bad_patches" not in err


def test_synthetic_data_builds_without_a_checksum_message(tmp_path, caplog):
    """The demo's synthetic metadata cannot match the release's md5: no alarm about it."""
    root = tiny_root(tmp_path, n=2, seed=43)
    with caplog.at_level("DEBUG"):
        builder = build(root, tmp_path / "data", skip_checksums=False, synthetic=True)
    assert builder.is_prepared()
    assert "md5" not in caplog.text and "official release" not in caplog.text
