"""TFDS builder for BigEarthNet v2.0 (reBEN, Clasen et al. 2024): 549,488 co-registered
Sentinel-1 / Sentinel-2 patches of 1200 m x 1200 m with 19-class CORINE 2018 multi-labels.

Reads the extracted official archives from the manual directory and writes `array_record`
shards without TensorFlow::

    tfds.builder("bigearthnet_v2/default", data_dir=D, file_format="array_record")
        .download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=M))

Configs
    default            metadata.parquet only: the benchmark (237,871 / 122,342 / 119,825).
    all                metadata.parquet + metadata_for_patches_with_snow_cloud_or_shadow.parquet.
    default_with_maps  as default, plus the `reference_map` feature (needs Reference_Maps/).
    all_with_maps      as all, plus the `reference_map` feature.

Builder keyword arguments (`tfds.builder(..., skip_bad_patches=True, num_workers=8)`)
    skip_bad_patches   False (default): the first bad patch stops the build with a `PatchError`
                       naming the file and the patch. True: bad patches are left out and listed
                       in `skipped_patches.json` in the prepared dataset directory
                       (`builder.data_path`), as {"dataset", "config", "version", "num_skipped",
                       "skipped": [{"split", "patch_id", "path", "reason"}, ...]}. The report is
                       written in both modes (empty list when nothing was skipped).
    num_workers        processes that read, encode and write shards in parallel. Default: one
                       per 500 patches, at most one per usable CPU (small datasets are read in
                       this process: starting workers would cost more than it saves). 1 reads
                       in this process. Workers are spawned, so a script that prepares the data
                       needs the usual `if __name__ == "__main__":` guard.
    skip_checksums     False (default): a metadata parquet file whose md5 differs from the
                       official release's (`METADATA_MD5`) stops the build, naming the file.
                       True: build anyway (logged), for a newer metadata release, a subset
                       or synthetic data.
    synthetic          False (default). True: the manual dir holds synthetic data made to look
                       like the release (the demo, `mosaic_jax.data.demo_data`): its metadata
                       cannot have the release's md5, so the checksums are skipped and nothing
                       is logged about them.

A bad patch is one with a missing patch directory or band file, an unreadable TIFF, a band with
the wrong shape, band count or dtype, non-finite S1 values, or a metadata row with a null field,
no labels or a label name outside `CLASS_NAMES`. Nothing is ever cast, resampled other than the
documented upsampling, or filled in: an example is exactly what the files say, or absent.

Features
    s1              float32 [120, 120, 2]: VV, VH backscatter in dB, as in the files.
    s2              uint16 [120, 120, 12]: L2A reflectance x 10000 in ESA order `S2_BANDS`; 20 m
                    bands (60 x 60) and 60 m bands (20 x 20) nearest-upsampled by exact pixel
                    repetition (`np.repeat` by 2 and 6 along both axes). 0 is the nodata value.
    labels          bool [19]: multi-hot in the paper order `CLASS_NAMES`.
    patch_id        the S2 patch name (the example key).
    s1_name         the S1 patch name.
    country         text.
    contains_seasonal_snow, contains_cloud_or_shadow: bool, from the metadata.
    reference_map   (*_with_maps only) uint8 [120, 120]: class index 0..18 per pixel from the
                    CLC 2018 level-3 codes via `CLC_TO_CLASS`; 255 (`UNLABELLED`) for 999 and any
                    code outside the mapping.

Example order and shards
    Examples are written in the order of TFDS's own shuffling (md5 of the split name and the
    patch id), so the order depends only on the patch ids. TFDS's generic writer is bypassed:
    it needs TensorFlow to spill more than 1 GB to disk and encodes in one process; here each
    worker process reads, encodes and writes whole shards (`data_builders.shard_writer`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from data_builders import datasets, shard_writer
from data_builders.geotiff import (
    PatchError,
    exact_name_reads,
    find_tiff,
    is_symlink_loop,
    read_tiff,
)

# ---------------------------------------------------------------------------------------------
# Facts about the dataset (shared ones from the registry, `data_builders.datasets`).

PATCH_SIZE = datasets.BIGEARTHNET_V2.patch_size
"""Height and width of a patch at 10 m, pixels."""

CLASS_NAMES: tuple[str, ...] = datasets.BIGEARTHNET_V2.class_names
"""The 19 classes in the paper's order (index = position in `labels`). Names contain commas."""

NUM_CLASSES = len(CLASS_NAMES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}

CLC_TO_CLASS: dict[int, int] = {
    111: 0, 112: 0,
    121: 1,
    211: 2, 212: 2, 213: 2,
    221: 3, 222: 3, 223: 3, 241: 3,
    231: 4,
    242: 5,
    243: 6,
    244: 7,
    311: 8,
    312: 9,
    313: 10,
    321: 11, 333: 11,
    322: 12, 323: 12,
    324: 13,
    331: 14,
    411: 15, 412: 15,
    421: 16, 422: 16,
    511: 17, 512: 17,
    521: 18, 522: 18, 523: 18,
}
"""CORINE Land Cover 2018 level-3 code -> class index; every other code (999 included) is
unlabelled."""

UNLABELLED = 255
"""`reference_map` value for pixels whose CLC code is not in `CLC_TO_CLASS`."""

S2_BANDS: tuple[str, ...] = datasets.BIGEARTHNET_V2.bands["s2"]
"""Sentinel-2 bands in ESA order (no B10 in L2A) = channel order of `s2`."""

S2_BAND_SIZE: dict[str, int] = {
    "B01": 20, "B02": 120, "B03": 120, "B04": 120, "B05": 60, "B06": 60, "B07": 60,
    "B08": 120, "B8A": 60, "B09": 20, "B11": 60, "B12": 60}
"""Side length in pixels of each band's file: 120 (10 m), 60 (20 m), 20 (60 m)."""

S1_BANDS: tuple[str, ...] = datasets.BIGEARTHNET_V2.bands["s1"]
"""Sentinel-1 polarisations = channel order of `s1`."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")

S1_DIR = "BigEarthNet-S1"
S2_DIR = "BigEarthNet-S2"
REFERENCE_MAPS_DIR = "Reference_Maps"
METADATA_FILE = "metadata.parquet"
SNOW_CLOUD_METADATA_FILE = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
METADATA_MD5: dict[str, str] = {
    METADATA_FILE: "55687065e77b6d0b0f1ff604a6e7b49c",
    SNOW_CLOUD_METADATA_FILE: "fe31856f4986d446c9468b59d6387c91",
}
METADATA_COLUMNS: tuple[str, ...] = (
    "patch_id", "labels", "split", "country", "s1_name", "s2v1_name",
    "contains_seasonal_snow", "contains_cloud_or_shadow")
"""Columns of both official parquet files (labels: list<string>, sorted within a row)."""

REPORT_NAME = "skipped_patches.json"
"""Name of the skip report written into the prepared dataset directory."""

OFFICIAL_SPLIT_SIZES: dict[str, dict[str, int]] = {
    METADATA_FILE: {"train": 237_871, "validation": 122_342, "test": 119_825},
    SNOW_CLOUD_METADATA_FILE: {"train": 34_673, "validation": 17_235, "test": 17_542},
}
"""Rows per split of the official parquet files (for checks; fakes are smaller)."""


# ---------------------------------------------------------------------------------------------
# Paths.

def s2_tile_dir(patch_id: str) -> str:
    """S2 tile directory of a patch: the patch id minus its last two '_' fields (grid x, y)."""
    parts = patch_id.split("_")
    if len(parts) < 3:
        raise PatchError("malformed S2 patch id (expected <tile>_<x>_<y>)", patch_id=patch_id)
    return "_".join(parts[:-2])


def s1_tile_dir(s1_name: str) -> str:
    """S1 tile directory of a patch: the S1 name minus its last three '_' fields (tile, x, y)."""
    parts = s1_name.split("_")
    if len(parts) < 4:
        raise PatchError(f"malformed s1_name {s1_name!r} (expected <scene>_<tile>_<x>_<y>)",
                         patch_id=s1_name)
    return "_".join(parts[:-3])


def s2_patch_dir(root: str | os.PathLike, patch_id: str) -> Path:
    """`root/BigEarthNet-S2/<tile dir>/<patch_id>`."""
    return Path(root) / S2_DIR / s2_tile_dir(patch_id) / patch_id


def s1_patch_dir(root: str | os.PathLike, s1_name: str) -> Path:
    """`root/BigEarthNet-S1/<S1 tile dir>/<s1_name>`."""
    return Path(root) / S1_DIR / s1_tile_dir(s1_name) / s1_name


def reference_map_dir(root: str | os.PathLike, patch_id: str) -> Path:
    """`root/Reference_Maps/<S2 tile dir>/<patch_id>`."""
    return Path(root) / REFERENCE_MAPS_DIR / s2_tile_dir(patch_id) / patch_id


# ---------------------------------------------------------------------------------------------
# Metadata.

class PatchRow(NamedTuple):
    """One metadata row (a NamedTuple: 480k of them are built in about a second). `labels`
    holds the class names exactly as in the parquet file; any field may be None when the file
    has a null there (`validate_row` rejects such rows)."""

    patch_id: str
    s1_name: str
    labels: tuple[str, ...]
    split: str
    country: str
    contains_seasonal_snow: bool
    contains_cloud_or_shadow: bool


METADATA_TYPES: dict[str, str] = {
    "patch_id": "string", "labels": "list<string>", "split": "string", "country": "string",
    "s1_name": "string", "s2v1_name": "string", "contains_seasonal_snow": "bool",
    "contains_cloud_or_shadow": "bool"}
"""The type each metadata column must have (the official files' schema; large and dictionary
encoded strings are accepted as strings)."""


def _is_string(data_type) -> bool:
    import pyarrow as pa  # pyarrow: heavy, kept out of import time

    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    return pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _has_type(data_type, expected: str) -> bool:
    """Whether a pyarrow type is the `METADATA_TYPES` kind `expected`."""
    import pyarrow as pa  # pyarrow: heavy, kept out of import time

    if expected == "bool":
        return pa.types.is_boolean(data_type)
    if expected == "list<string>":
        return ((pa.types.is_list(data_type) or pa.types.is_large_list(data_type))
                and _is_string(data_type.value_type))
    return _is_string(data_type)


def check_metadata_types(schema, path: str | os.PathLike) -> None:
    """ValueError naming the file, the column, its type and the expected one for every column
    of the wrong type, before any row is read (e.g. `labels` as one string per row instead of a
    list, which would otherwise be read character by character)."""
    wrong = [f"column {name!r} is {schema.field(name).type}, expected {expected}"
             for name, expected in METADATA_TYPES.items()
             if name in schema.names and not _has_type(schema.field(name).type, expected)]
    if wrong:
        raise ValueError(f"{path}: metadata of the wrong type: {'; '.join(wrong)} (the official "
                         "BigEarthNet v2 metadata schema)")


def read_metadata(path: str | os.PathLike) -> list[PatchRow]:
    """Reads one official metadata parquet file into rows, in file order.

    Raises ValueError (naming the file) for missing columns, columns of the wrong type
    (`check_metadata_types`) or a split value outside `SPLITS`; per-row problems (nulls, unknown
    labels) are left to `validate_row` so that they can be
    skipped like any other bad patch.
    """
    import pyarrow.compute as pc  # pyarrow: heavy, only to read metadata
    import pyarrow.parquet as pq

    path = Path(path)
    schema = pq.read_schema(path)
    missing = [c for c in METADATA_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: missing metadata column(s) {missing}")
    check_metadata_types(schema, path)
    table = pq.read_table(path, columns=list(PatchRow._fields))
    bad_split = pc.invert(pc.is_in(table["split"], value_set=_string_array(SPLITS)))
    if pc.any(bad_split).as_py():
        i = pc.index(bad_split, True).as_py()
        raise ValueError(f"{path}: row {i} (patch {table['patch_id'][i]}) has split "
                         f"{table['split'][i]}, expected one of {SPLITS}")
    columns = [table[name].to_pylist() for name in PatchRow._fields]
    label_column = PatchRow._fields.index("labels")
    columns[label_column] = [None if labels is None else tuple(labels)
                             for labels in columns[label_column]]
    return [PatchRow._make(values) for values in zip(*columns, strict=True)]


def _string_array(values: Sequence[str]):
    """A pyarrow string array (kept out of module import time)."""
    import pyarrow as pa  # pyarrow: heavy, kept out of import time

    return pa.array(list(values), type=pa.string())


def labels_to_multi_hot(labels: Iterable[str], *, patch_id: str) -> np.ndarray:
    """Class names -> bool [19] in `CLASS_NAMES` order; `PatchError` for an unknown name or an
    empty list. Names are matched whole (they contain commas)."""
    multi_hot = np.zeros(NUM_CLASSES, dtype=np.bool_)
    for name in labels:
        index = CLASS_INDEX.get(name)
        if index is None:
            raise PatchError(f"unknown label name {name!r}", patch_id=patch_id)
        multi_hot[index] = True
    if not multi_hot.any():
        raise PatchError("no labels", patch_id=patch_id)
    return multi_hot


def grid_cell(name: str) -> tuple[str, int, int]:
    """(MGRS tile, x, y) of an S2 patch id or an S1 name: their last three '_' fields, tile
    without the S2 'T' prefix, x and y as integers (S2 pads them to two digits, S1 does not)."""
    parts = name.split("_")
    try:
        return parts[-3].removeprefix("T"), int(parts[-2]), int(parts[-1])
    except (IndexError, ValueError):
        raise PatchError(f"malformed patch name {name!r} (expected ..._<tile>_<x>_<y>)",
                         patch_id=name) from None


def validate_row(row: PatchRow) -> None:
    """`PatchError` when a metadata row cannot describe an example (null field, bad labels, an
    S1 patch from another grid cell than its S2 patch: every official row pairs the same cell)."""
    for name, value in zip(PatchRow._fields, row, strict=True):
        if value is None:
            raise PatchError(f"metadata field {name} is null",
                             patch_id=row.patch_id or "<null patch_id>")
    if grid_cell(row.s1_name) != grid_cell(row.patch_id):
        raise PatchError(f"s1_name {row.s1_name} is not the S1 patch of this S2 patch (grid "
                         f"cells {grid_cell(row.s1_name)} and {grid_cell(row.patch_id)})",
                         patch_id=row.patch_id)
    labels_to_multi_hot(row.labels, patch_id=row.patch_id)


def file_md5(path: str | os.PathLike) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading one patch.

_CLC_LUT = np.full(1 << 16, UNLABELLED, dtype=np.uint8)
for _code, _cls in CLC_TO_CLASS.items():
    _CLC_LUT[_code] = _cls
_CLC_LUT.setflags(write=False)


def clc_to_classes(codes: np.ndarray) -> np.ndarray:
    """CLC 2018 level-3 codes (uint16, any shape) -> uint8 class indices, `UNLABELLED` (255)
    for 999 and every code outside `CLC_TO_CLASS`."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint16:
        raise TypeError(f"expected uint16 CLC codes, got {codes.dtype}")
    return _CLC_LUT[codes]


def _patch_dir_or_error(directory: Path, what: str, patch_id: str) -> Path:
    if is_symlink_loop(directory):
        raise PatchError(f"{what} patch directory is a symlink loop", patch_id=patch_id,
                         path=directory)
    if not directory.is_dir():
        raise PatchError(f"{what} patch directory missing", patch_id=patch_id, path=directory)
    return directory


def read_s2(root: str | os.PathLike, patch_id: str) -> np.ndarray:
    """Reads the 12 S2 band files of a patch -> uint16 [120, 120, 12] in `S2_BANDS` order, 20 m
    and 60 m bands upsampled by pixel repetition."""
    directory = _patch_dir_or_error(s2_patch_dir(root, patch_id), "S2", patch_id)
    out = np.empty((len(S2_BANDS), PATCH_SIZE, PATCH_SIZE), dtype=np.uint16)
    for i, band in enumerate(S2_BANDS):
        size = S2_BAND_SIZE[band]
        path = find_tiff(directory, f"{patch_id}_{band}", patch_id=patch_id)
        data = read_tiff(path, patch_id=patch_id, shape=(size, size), dtype=np.uint16)
        factor = PATCH_SIZE // size
        out[i] = data if factor == 1 else np.repeat(np.repeat(data, factor, 0), factor, 1)
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def read_s1(root: str | os.PathLike, s1_name: str, *, patch_id: str) -> np.ndarray:
    """Reads VV and VH of a patch -> float32 [120, 120, 2] in dB; `PatchError` on NaN/inf."""
    directory = _patch_dir_or_error(s1_patch_dir(root, s1_name), "S1", patch_id)
    out = np.empty((PATCH_SIZE, PATCH_SIZE, len(S1_BANDS)), dtype=np.float32)
    for i, band in enumerate(S1_BANDS):
        path = find_tiff(directory, f"{s1_name}_{band}", patch_id=patch_id)
        data = read_tiff(path, patch_id=patch_id, shape=(PATCH_SIZE, PATCH_SIZE),
                         dtype=np.float32)
        if not np.isfinite(data).all():
            raise PatchError(f"{int((~np.isfinite(data)).sum())} non-finite S1 value(s)",
                             patch_id=patch_id, path=path)
        out[..., i] = data
    return out


def read_reference_map(root: str | os.PathLike, patch_id: str) -> np.ndarray:
    """Reads the reference map of a patch -> uint8 [120, 120] class indices (255 unlabelled)."""
    directory = _patch_dir_or_error(reference_map_dir(root, patch_id), "reference map",
                                    patch_id)
    path = find_tiff(directory, f"{patch_id}_reference_map", patch_id=patch_id)
    codes = read_tiff(path, patch_id=patch_id, shape=(PATCH_SIZE, PATCH_SIZE), dtype=np.uint16)
    return clc_to_classes(codes)


def load_example(root: str | os.PathLike, row: PatchRow, *,
                 with_reference_map: bool = False) -> dict[str, Any]:
    """Reads one patch into the builder's example dict (numpy values); `PatchError` naming the
    file and the patch when anything is not as specified."""
    validate_row(row)
    example: dict[str, Any] = {
        "s1": read_s1(root, row.s1_name, patch_id=row.patch_id),
        "s2": read_s2(root, row.patch_id),
        "labels": labels_to_multi_hot(row.labels, patch_id=row.patch_id),
        "patch_id": row.patch_id,
        "s1_name": row.s1_name,
        "country": row.country,
        "contains_seasonal_snow": bool(row.contains_seasonal_snow),
        "contains_cloud_or_shadow": bool(row.contains_cloud_or_shadow),
    }
    if with_reference_map:
        example["reference_map"] = read_reference_map(root, row.patch_id)
    return example


def make_features(with_reference_map: bool) -> tfds.features.FeaturesDict:
    """The builder's feature spec. Rasters are stored as raw bytes (`Encoding.BYTES`): the
    default encoding writes one protobuf varint/float per value, ~30x slower."""
    raw = tfds.features.Encoding.BYTES
    hw = (PATCH_SIZE, PATCH_SIZE)
    features: dict[str, tfds.features.FeatureConnector] = {
        "s1": tfds.features.Tensor(shape=(*hw, len(S1_BANDS)), dtype=np.float32, encoding=raw,
                                   doc="Sentinel-1 VV, VH backscatter, dB"),
        "s2": tfds.features.Tensor(shape=(*hw, len(S2_BANDS)), dtype=np.uint16, encoding=raw,
                                   doc="Sentinel-2 L2A reflectance x 10000, bands " +
                                       " ".join(S2_BANDS) + ", nearest-upsampled to 10 m"),
        "labels": tfds.features.Tensor(shape=(NUM_CLASSES,), dtype=np.bool_,
                                       doc="multi-hot, order: " + " | ".join(CLASS_NAMES)),
        "patch_id": tfds.features.Text(doc="S2 patch name"),
        "s1_name": tfds.features.Text(doc="S1 patch name"),
        "country": tfds.features.Text(),
        "contains_seasonal_snow": tfds.features.Scalar(dtype=np.bool_),
        "contains_cloud_or_shadow": tfds.features.Scalar(dtype=np.bool_),
    }
    if with_reference_map:
        features["reference_map"] = tfds.features.Tensor(
            shape=hw, dtype=np.uint8, encoding=raw,
            doc="class index per pixel (CLC 2018 level 3 mapped), 255 = unlabelled")
    return tfds.features.FeaturesDict(features)


# ---------------------------------------------------------------------------------------------
# Writing shards: what `data_builders.shard_writer` needs to know about this dataset.



@dataclasses.dataclass(frozen=True)
class BigEarthNetV2Loader(shard_writer.ExampleLoader[PatchRow]):
    """Reads a metadata row's patch into an example (picklable: it travels to the workers)."""

    root: str
    with_reference_map: bool

    def features(self) -> tfds.features.FeaturesDict:
        return make_features(self.with_reference_map)

    def serialized_size(self) -> int:
        """Bytes of one serialised example (the rasters dominate)."""
        size = PATCH_SIZE * PATCH_SIZE * (4 * len(S1_BANDS) + 2 * len(S2_BANDS)) + 1024
        return size + (PATCH_SIZE * PATCH_SIZE if self.with_reference_map else 0)

    def load(self, item: PatchRow) -> dict[str, Any]:
        with exact_name_reads():
            return load_example(self.root, item, with_reference_map=self.with_reference_map)


# ---------------------------------------------------------------------------------------------
# The builder.

@dataclasses.dataclass(eq=False)
class BigEarthNetV2Config(tfds.core.BuilderConfig):
    """metadata_files: parquet files (in the manual dir) whose rows make up the dataset.
    with_reference_map: add the `reference_map` feature (reads Reference_Maps/)."""

    metadata_files: tuple[str, ...] = (METADATA_FILE,)
    with_reference_map: bool = False


class BigearthnetV2(tfds.core.GeneratorBasedBuilder):
    """BigEarthNet v2.0 S1/S2 patches with 19-class multi-labels; see the module docstring."""

    name = "bigearthnet_v2"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        BigEarthNetV2Config(
            name="default", metadata_files=(METADATA_FILE,),
            description="Benchmark: the 480,038 patches of metadata.parquet."),
        BigEarthNetV2Config(
            name="all", metadata_files=(METADATA_FILE, SNOW_CLOUD_METADATA_FILE),
            description="All 549,488 patches, incl. those with snow, cloud or shadow."),
        BigEarthNetV2Config(
            name="default_with_maps", metadata_files=(METADATA_FILE,), with_reference_map=True,
            description="As default, plus the per-pixel reference map."),
        BigEarthNetV2Config(
            name="all_with_maps", metadata_files=(METADATA_FILE, SNOW_CLOUD_METADATA_FILE),
            with_reference_map=True,
            description="As all, plus the per-pixel reference map."),
    ]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download from https://bigearth.net (BigEarthNet v2.0 / reBEN):
      BigEarthNet-S1.tar.zst, BigEarthNet-S2.tar.zst, Reference_Maps.tar.zst (only for the
      *_with_maps configs), {METADATA_FILE} (md5 {METADATA_MD5[METADATA_FILE]}) and
      {SNOW_CLOUD_METADATA_FILE}
      (md5 {METADATA_MD5[SNOW_CLOUD_METADATA_FILE]}; only for the all* configs).
    Extract the archives (e.g. `tar --zstd -xf BigEarthNet-S2.tar.zst`) into the manual
    directory and put the parquet files beside them:

      <manual_dir>/{METADATA_FILE}
      <manual_dir>/{SNOW_CLOUD_METADATA_FILE}
      <manual_dir>/{S2_DIR}/<tile>/<patch_id>/<patch_id>_<B01..B12>.tif
      <manual_dir>/{S1_DIR}/<s1 tile>/<s1_name>/<s1_name>_{{VV,VH}}.tif
      <manual_dir>/{REFERENCE_MAPS_DIR}/<tile>/<patch_id>/<patch_id>_reference_map.tif
    """

    def __init__(self, *, skip_bad_patches: bool = False, num_workers: int | None = None,
                 skip_checksums: bool = False, synthetic: bool = False, **kwargs: Any):
        """skip_bad_patches: leave bad patches out and list them in `skipped_patches.json`
        instead of failing. num_workers: parallel processes (default: see module docstring).
        skip_checksums: warn instead of failing on metadata files that are not the official
        release's. synthetic: synthetic data, no checksum and no word about it."""
        self._skip_bad_patches = bool(skip_bad_patches)
        self._skip_checksums = bool(skip_checksums)
        self._synthetic = bool(synthetic)
        self._num_workers = num_workers
        self._serial_skipped: list[dict[str, Any]] = []
        super().__init__(**kwargs)

    @property
    def skip_bad_patches(self) -> bool:
        return self._skip_bad_patches

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "BigEarthNet v2.0 (reBEN): co-registered Sentinel-1 (VV, VH, dB) and Sentinel-2 "
                "L2A (12 bands, upsampled to 10 m) patches of 120 x 120 px with 19-class CORINE "
                "2018 multi-labels; optional per-pixel reference maps."),
            features=make_features(self.builder_config.with_reference_map),
            homepage="https://bigearth.net",
            citation="""@inproceedings{clasen2025reben,
  title={reBEN: Refined BigEarthNet Dataset for Remote Sensing Image Analysis},
  author={Clasen, Kai Norman and Hackel, Leonard and Burgert, Tom and Sumbul, Gencer and
          Demir, Beg{\\"u}m and Markl, Volker},
  booktitle={IEEE International Geoscience and Remote Sensing Symposium (IGARSS)},
  year={2025}}""",
        )

    # -- planning ------------------------------------------------------------------------------

    def _check_manual_dir(self, root: Path) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"manual dir {root} does not exist.\n"
                                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        needed = [*self.builder_config.metadata_files, S1_DIR, S2_DIR]
        if self.builder_config.with_reference_map:
            needed.append(REFERENCE_MAPS_DIR)
        missing = [name for name in needed if not (root / name).exists()]
        if missing:
            raise FileNotFoundError(
                f"manual dir {root} lacks {missing} (config {self.builder_config.name}).\n"
                f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        for name in () if self._synthetic else self.builder_config.metadata_files:
            actual = file_md5(root / name)
            if actual == METADATA_MD5[name]:
                continue
            message = (f"{root / name}: md5 {actual} is not the official release's "
                       f"{METADATA_MD5[name]}")
            if not self._skip_checksums:
                raise ValueError(f"{message} (a damaged download? With a newer metadata "
                                 "release, build anyway with --skip_checksums)")
            # Asked for by the caller (a newer metadata release, or synthetic data): no warning.
            logging.info("%s; building with it anyway (skip_checksums)", message)

    def _plan(self, root: Path) -> tuple[dict[str, list[PatchRow]], list[dict[str, Any]]]:
        """Rows per split in metadata order, and the rows already rejected as bad (a bad row's
        `PatchError` names the metadata file)."""
        by_split: dict[str, list[PatchRow]] = {split: [] for split in SPLITS}
        rejected = []
        seen: set[str] = set()
        for name in self.builder_config.metadata_files:
            for row in read_metadata(root / name):
                if row.patch_id in seen:
                    raise ValueError(f"patch id {row.patch_id} appears more than once in "
                                     f"{self.builder_config.metadata_files}")
                seen.add(row.patch_id)
                try:
                    try:
                        validate_row(row)
                    except PatchError as e:
                        raise PatchError(e.reason, patch_id=e.patch_id, path=root / name) from e
                except PatchError as e:
                    if not self.skip_bad_patches:
                        raise
                    rejected.append(shard_writer.skip_record(row.split, e))
                    continue
                by_split[row.split].append(row)
        return by_split, rejected

    def _loader(self, root: Path) -> BigEarthNetV2Loader:
        return BigEarthNetV2Loader(os.fspath(root), self.builder_config.with_reference_map)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """The standard TFDS interface (one process, TFDS's writer); `_generate_splits` does
        the same work in parallel and is what `download_and_prepare` uses."""
        root = Path(dl_manager.manual_dir)
        self._check_manual_dir(root)
        by_split, self._serial_skipped = self._plan(root)
        return {split: self._generate_examples(root, rows)
                for split, rows in by_split.items() if rows}

    def _generate_examples(self, root: Path, rows: Sequence[PatchRow]):
        loader = self._loader(root)
        for row in rows:
            yield from shard_writer.generate_examples(
                loader, row.split, [(row.patch_id, row)], skip_bad_patches=self.skip_bad_patches,
                skipped=self._serial_skipped)
        self._write_report(self._serial_skipped)

    # -- writing ---------------------------------------------------------------------------------

    def _generate_splits(self, dl_manager: tfds.download.DownloadManager,
                         download_config: tfds.download.DownloadConfig):
        """Plans shards per split, writes them (in parallel), returns the `SplitInfo`s."""
        root = Path(dl_manager.manual_dir)
        self._check_manual_dir(root)
        by_split, skipped = self._plan(root)
        return shard_writer.generate_splits(
            self, {split: [(row.patch_id, row) for row in rows]
                   for split, rows in by_split.items()},
            self._loader(root), download_config=download_config,
            skip_bad_patches=self.skip_bad_patches, num_workers=self._num_workers,
            report=self._write_report, skipped=skipped, source=root)

    def _write_report(self, skipped: list[dict[str, Any]]) -> None:
        """Writes `skipped_patches.json` into the directory being prepared (TFDS moves it into
        place with the shards)."""
        shard_writer.write_report(self, skipped, name=REPORT_NAME, split_order=SPLITS)


def skipped_patches(data_path: str | os.PathLike) -> list[dict[str, Any]]:
    """The `skipped` list of a prepared dataset's report ([] when there is no report)."""
    return shard_writer.read_skipped(data_path, REPORT_NAME)


__all__ = [
    "CLASS_INDEX", "CLASS_NAMES", "CLC_TO_CLASS", "METADATA_COLUMNS", "METADATA_FILE",
    "METADATA_MD5", "METADATA_TYPES", "NUM_CLASSES", "OFFICIAL_SPLIT_SIZES", "PATCH_SIZE",
    "REFERENCE_MAPS_DIR",
    "REPORT_NAME", "S1_BANDS", "S1_DIR", "S2_BANDS", "S2_BAND_SIZE", "S2_DIR",
    "SNOW_CLOUD_METADATA_FILE", "SPLITS", "UNLABELLED", "BigEarthNetV2Config", "BigearthnetV2",
    "PatchRow", "check_metadata_types", "clc_to_classes", "file_md5", "grid_cell",
    "labels_to_multi_hot", "load_example",
    "make_features",
    "read_metadata", "read_reference_map", "read_s1", "read_s2", "reference_map_dir",
    "s1_patch_dir", "s1_tile_dir", "s2_patch_dir", "s2_tile_dir", "skipped_patches",
    "validate_row",
]
