"""TFDS builder for SEN12MS (Schmitt et al. 2019): co-registered Sentinel-1 / Sentinel-2 / MODIS
land-cover triplets, 256 x 256 px at 10 m, four seasons, with the simplified 10-class IGBP
multi-labels of Schmitt & Wu (2021) computed from the land-cover raster itself.

Reads the extracted official archives and writes shards without TensorFlow (use
`file_format="array_record"`; `data_builders.shard_writer` does the writing, in parallel worker
processes). Layout under the manual directory::

    ROIs{1158_spring,1868_summer,1970_fall,2017_winter}/{s1,s2,lc}_<scene>/
        ROIs<seed>_<season>_<s1|s2|lc>_<scene>_p<patch>.tif

Identifiers
    A scene is (season, scene number); scene numbers repeat across seasons (e.g. 146 exists in
    spring, summer and winter), so the number alone never identifies a scene. An example's key
    and `patch_id` are `ROIs<seed>_<season>_<scene>_p<patch>`, e.g. `ROIs1158_spring_106_p30`:
    the official file name without the modality field and the suffix
    (`ROIs1158_spring_s2_106_p30.tif` in the official lists is `ROIs1158_spring_106_p30` here).
    `season` is the bare season name ("spring", "summer", "fall", "winter"), `scene_id` the scene
    number, `patch` the patch number.

Splits (by whole scenes, never by patch)
    test: the 26 official hold-out scenes (`HOLDOUT_SCENES`, SEN12MS_holdOutScenes.txt).
    validation: every other scene whose key "ROIs<seed>_<season>/<scene>" hashes (SHA-256, first
        8 bytes as a big-endian integer / 2**64) below `validation_fraction` (default 0.1); see
        `validation_scene`. The choice depends on nothing but the scene's own key, so it is the
        same for any subset of the data and on every machine.
    train: the rest.
    A split with no scene in the manual directory is not generated, nor is one whose every patch
    is skipped as bad; when no patch at all can be read the build fails with a `PatchError`.

Labels
    `igbp_fractions[k]` = (pixels with IGBP class k+1 in the LC raster's band 1) / (H * W).
    IGBP values outside 1..17 (the official band should hold only 1..17; a fill value would be
    such a value) count towards no class: they stay in the denominator, so such a patch's
    fractions sum to less than 1 and its labels are judged against all H * W pixels.
    `labels[j]` is True when the summed fraction of simplified class j's IGBP sources is >= 0.1,
    evaluated exactly on integer counts (10 * count >= H * W). The official label pickle is never
    read.

Bad data
    The known broken triplet (ROIs1868_summer scene 146 patch 202, NaN in S1) is always left out,
    as in the official lists. Any other non-finite S1 value, a missing modality file, an
    unreadable TIFF or a wrong band count / shape / dtype raises `PatchError` naming file and
    patch; with `skip_bad_patches` such a patch is skipped instead. `skipped_patches.json` in the
    prepared dataset directory (`builder.data_path`) is written in both modes, as
    {"dataset", "config", "version", "num_skipped", "skipped": [{"split", "patch_id", "path",
    "reason"}, ...], "left_out": [{"patch_id", "reason"}]} ("left_out": the broken triplet when
    present). With `nonfinite_s1_fill` set, non-finite S1 values (NaN, +-inf) are replaced by that
    value (dB) instead of being an error.

Builder options: config fields of `Sen12msConfig` (skip_bad_patches, nonfinite_s1_fill,
validation_fraction) or the keyword arguments `tfds.builder("sen12ms", ..., skip_bad_patches=True,
nonfinite_s1_fill=-25.0, num_workers=4)`, which override the config's values. `num_workers`:
processes that read, encode and write shards; default one per 500 triplets, at most one per
usable CPU; 1 reads in this process. Workers are spawned, so a script that prepares the data
needs the usual `if __name__ == "__main__":` guard.

Example order and shards
    As TFDS's own writer would order them (md5 of the split name and the patch id) and as many
    shards as its shard config chooses for the estimated size, but written by worker processes
    without TFDS's shuffle (which needs TensorFlow past 1 GB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_builders import datasets, shard_writer
from data_builders.geotiff import PatchError, exact_name_reads, find_tiff, read_tiff

# ---------------------------------------------------------------------------------------------
# Facts about the dataset.

PATCH_SIZE = datasets.SEN12MS.patch_size
"""Height and width of every SEN12MS raster, pixels (10 m)."""

SEASON_DIRS: dict[str, str] = {
    "spring": "ROIs1158_spring",
    "summer": "ROIs1868_summer",
    "fall": "ROIs1970_fall",
    "winter": "ROIs2017_winter",
}
"""Season name -> the official archive / top-level directory name (ROIs<seed>_<season>)."""

S1_BANDS = datasets.SEN12MS.bands["s1"]
S2_BANDS = datasets.SEN12MS.bands["s2"]
LC_BANDS = ("IGBP", "LCCS_LC", "LCCS_LU", "LCCS_SH")

MODALITIES: dict[str, tuple[np.dtype, int]] = {
    "s1": (np.dtype(np.float32), len(S1_BANDS)),
    "s2": (np.dtype(np.uint16), len(S2_BANDS)),
    "lc": (np.dtype(np.uint16), len(LC_BANDS)),
}
"""Modality -> (on-disk dtype, band count)."""

NUM_IGBP_CLASSES = 17
SIMPLIFIED_CLASSES = datasets.SEN12MS.class_names
IGBP_TO_SIMPLIFIED: tuple[int, ...] = (0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 5, 7, 8, 9)
"""Simplified class index of IGBP classes 1..17 (entry k is IGBP class k + 1)."""

LABEL_THRESHOLD = 0.1
"""A simplified class is present when its pixel fraction is >= this."""

BROKEN_TRIPLETS: frozenset[tuple[str, int, int]] = frozenset({("summer", 146, 202)})
"""(season, scene, patch) of triplets the official lists drop (NaN in S1); always left out."""

HOLDOUT_SCENES: tuple[tuple[str, int], ...] = (
    ("spring", 63), ("spring", 146), ("spring", 97), ("spring", 124), ("spring", 15),
    ("spring", 17),
    ("summer", 43), ("summer", 131), ("summer", 19), ("summer", 104), ("summer", 72),
    ("summer", 15), ("summer", 79),
    ("fall", 120), ("fall", 39), ("fall", 144), ("fall", 35), ("fall", 61), ("fall", 47),
    ("fall", 30), ("fall", 141),
    ("winter", 64), ("winter", 146), ("winter", 32), ("winter", 107), ("winter", 135),
)
"""The 26 official hold-out (test) scenes, in the order of SEN12MS_holdOutScenes.txt."""

VALIDATION_FRACTION = 0.1

_SEASON_OF_DIR = {v: k for k, v in SEASON_DIRS.items()}
_FILE_RE = re.compile(
    r"^ROIs(?P<seed>\d+)_(?P<season>[a-z]+)_(?P<modality>s1|s2|lc)_(?P<scene>\d+)"
    r"_p(?P<patch>\d+)\.tiff?$")
_SCENE_DIR_RE = re.compile(r"^(?P<modality>s1|s2|lc)_(?P<scene>\d+)$")

REPORT_NAME = "skipped_patches.json"


# ---------------------------------------------------------------------------------------------
# Pure functions: naming, splits, labels.

def season_name(season: str) -> str:
    """Accepts "spring" or "ROIs1158_spring" (either form of any season); returns "spring"."""
    if season in SEASON_DIRS:
        return season
    if season in _SEASON_OF_DIR:
        return _SEASON_OF_DIR[season]
    raise ValueError(f"unknown SEN12MS season {season!r}; expected one of {sorted(SEASON_DIRS)} "
                     f"or {sorted(_SEASON_OF_DIR)}")


def make_patch_id(season: str, scene: int, patch: int) -> str:
    """The example key / `patch_id`, e.g. ("spring", 106, 30) -> "ROIs1158_spring_106_p30"."""
    return f"{SEASON_DIRS[season_name(season)]}_{scene}_p{patch}"


def file_stem(season: str, modality: str, scene: int, patch: int) -> str:
    """Official file name without suffix, e.g. "ROIs1158_spring_s1_106_p30"."""
    return f"{SEASON_DIRS[season_name(season)]}_{modality}_{scene}_p{patch}"


def parse_file_name(name: str) -> tuple[str, str, int, int]:
    """Parses an official file name ("ROIs1158_spring_s2_124_p100.tif") into
    (season, modality, scene, patch) = ("spring", "s2", 124, 100); ValueError if malformed."""
    m = _FILE_RE.match(name.strip())
    if m is None:
        raise ValueError(f"not a SEN12MS file name: {name!r}")
    season_dir = f"ROIs{m['seed']}_{m['season']}"
    if season_dir not in _SEASON_OF_DIR:
        raise ValueError(f"unknown SEN12MS season directory {season_dir!r} in {name!r}")
    return _SEASON_OF_DIR[season_dir], m["modality"], int(m["scene"]), int(m["patch"])


def is_holdout_scene(season: str, scene: int) -> bool:
    """True for the 26 official hold-out (test) scenes."""
    return (season_name(season), int(scene)) in _HOLDOUT_SET


_HOLDOUT_SET = frozenset(HOLDOUT_SCENES)


def validation_scene(season: str, scene: int, fraction: float = VALIDATION_FRACTION) -> bool:
    """Whether a non-hold-out scene belongs to the carved validation split.

    Deterministic and independent of which other scenes exist: the SHA-256 of
    "ROIs<seed>_<season>/<scene>" (e.g. "ROIs1868_summer/146"), first 8 bytes read as a big-endian
    integer u, selects the scene when u / 2**64 < fraction. Roughly `fraction` of all scenes.
    """
    key = f"{SEASON_DIRS[season_name(season)]}/{int(scene)}".encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    return u < fraction * 2.0**64


def scene_split(season: str, scene: int, validation_fraction: float = VALIDATION_FRACTION) -> str:
    """"test" for hold-out scenes, else "validation" or "train" (see `validation_scene`)."""
    if is_holdout_scene(season, scene):
        return "test"
    if validation_scene(season, scene, validation_fraction):
        return "validation"
    return "train"


def igbp_counts(igbp: np.ndarray) -> np.ndarray:
    """Pixel counts [17] (int64) of IGBP classes 1..17 in an integer raster of any shape; values
    outside 1..17 are counted in no class."""
    counts = np.bincount(np.asarray(igbp).ravel(), minlength=NUM_IGBP_CLASSES + 1)
    return counts[1:NUM_IGBP_CLASSES + 1].astype(np.int64)


def igbp_fractions(igbp: np.ndarray) -> np.ndarray:
    """Fractions [17] (float32) of all pixels of `igbp` that carry IGBP class 1..17."""
    return (igbp_counts(igbp) / np.asarray(igbp).size).astype(np.float32)


def simplified_labels(counts: np.ndarray, num_pixels: int) -> np.ndarray:
    """Simplified 10-class multi-label [10] (bool) from IGBP counts [17] out of `num_pixels`.

    Class j is present when sum of counts of its IGBP sources >= 0.1 * num_pixels, decided on
    integers (10 * count >= num_pixels), so no float rounding sits at the threshold.
    """
    grouped = np.zeros(len(SIMPLIFIED_CLASSES), np.int64)
    np.add.at(grouped, np.asarray(IGBP_TO_SIMPLIFIED), np.asarray(counts, np.int64))
    return grouped * round(1 / LABEL_THRESHOLD) >= num_pixels


# ---------------------------------------------------------------------------------------------
# Finding patches on disk.

@dataclasses.dataclass(frozen=True)
class PatchRef:
    """One triplet to read: its identity and the three modality directories."""

    season: str
    scene: int
    patch: int
    season_dir: Path

    @property
    def patch_id(self) -> str:
        return make_patch_id(self.season, self.scene, self.patch)

    def modality_dir(self, modality: str) -> Path:
        return self.season_dir / f"{modality}_{self.scene}"


def find_season_dirs(root: str | os.PathLike) -> dict[str, Path]:
    """Season -> its directory under `root` (or, when `root` has none, one level deeper, e.g.
    an extra `SEN12MS/` folder). Missing seasons are absent; ValueError when none is found."""
    root = Path(root)
    found = {s: root / d for s, d in SEASON_DIRS.items() if (root / d).is_dir()}
    if not found and root.is_dir():
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            found = {s: sub / d for s, d in SEASON_DIRS.items() if (sub / d).is_dir()}
            if found:
                break
    if not found:
        raise ValueError(f"no SEN12MS season directory ({', '.join(SEASON_DIRS.values())}) in "
                         f"{root}; extract the official archives there")
    return found


def list_patches(root: str | os.PathLike) -> list[PatchRef]:
    """Every triplet under `root`, sorted by (season, scene, patch); a patch is listed when a file
    of any modality names it (a missing partner file is reported when the patch is read).
    Files and folders not following the official naming are ignored."""
    refs: list[PatchRef] = []
    for season, season_dir in sorted(find_season_dirs(root).items()):
        scenes: dict[int, set[int]] = {}
        with os.scandir(season_dir) as it:
            scene_dirs = [e for e in it if e.is_dir() and _SCENE_DIR_RE.match(e.name)]
        for entry in scene_dirs:
            m = _SCENE_DIR_RE.match(entry.name)
            modality, scene = m["modality"], int(m["scene"])
            scenes.setdefault(scene, set())  # A folder without patch files adds no patch.
            with os.scandir(entry.path) as files:
                for f in files:
                    fm = _FILE_RE.match(f.name)
                    if (fm and fm["modality"] == modality and int(fm["scene"]) == scene
                            and f"ROIs{fm['seed']}_{fm['season']}" == season_dir.name):
                        scenes[scene].add(int(fm["patch"]))
        for scene in sorted(scenes):
            refs.extend(PatchRef(season, scene, p, season_dir) for p in sorted(scenes[scene]))
    return refs


# ---------------------------------------------------------------------------------------------
# Reading one triplet.

def read_patch(ref: PatchRef, *, nonfinite_s1_fill: float | None = None) -> dict[str, Any]:
    """Reads one triplet into the builder's example dict.

    Returns s1 float32 [256, 256, 2] (VV, VH dB), s2 uint16 [256, 256, 13] (B01..B12 incl. B10),
    lc uint16 [256, 256, 4], labels bool [10], igbp_fractions float32 [17] and the identifiers.
    Raises `PatchError` (naming file and patch) for a missing or unreadable file, a wrong band
    count, shape or dtype, and non-finite S1 values unless `nonfinite_s1_fill` replaces them.
    """
    pid = ref.patch_id
    arrays = {}
    for modality, (dtype, bands) in MODALITIES.items():
        stem = file_stem(ref.season, modality, ref.scene, ref.patch)
        path = find_tiff(ref.modality_dir(modality), stem, patch_id=pid)
        arrays[modality] = read_tiff(path, patch_id=pid, shape=(PATCH_SIZE, PATCH_SIZE),
                                     dtype=dtype, bands=bands)
        if modality == "s1":
            finite = np.isfinite(arrays["s1"])
            if not finite.all():
                if nonfinite_s1_fill is None:
                    raise PatchError(f"{int((~finite).sum())} non-finite S1 value(s)",
                                     patch_id=pid, path=path)
                arrays["s1"] = np.where(finite, arrays["s1"], np.float32(nonfinite_s1_fill))
    counts = igbp_counts(arrays["lc"][..., 0])
    num_pixels = PATCH_SIZE * PATCH_SIZE
    return {
        "s1": arrays["s1"],
        "s2": arrays["s2"],
        "lc": arrays["lc"],
        "labels": simplified_labels(counts, num_pixels),
        "igbp_fractions": (counts / num_pixels).astype(np.float32),
        "patch_id": pid,
        "season": ref.season,
        "scene_id": ref.scene,
        "patch": ref.patch,
    }


def make_features() -> tfds.features.FeaturesDict:
    """The builder's feature spec. Rasters are stored as raw bytes: the default encoding writes
    one protobuf varint / float per value, ~30x slower to serialise and to decode for
    256 x 256 x 13 arrays."""
    hw = (PATCH_SIZE, PATCH_SIZE)
    raw = tfds.features.Encoding.BYTES
    return tfds.features.FeaturesDict({
        "s1": tfds.features.Tensor(shape=(*hw, len(S1_BANDS)), dtype=np.float32, encoding=raw),
        "s2": tfds.features.Tensor(shape=(*hw, len(S2_BANDS)), dtype=np.uint16, encoding=raw),
        "lc": tfds.features.Tensor(shape=(*hw, len(LC_BANDS)), dtype=np.uint16, encoding=raw),
        "labels": tfds.features.Tensor(shape=(len(SIMPLIFIED_CLASSES),), dtype=np.bool_),
        "igbp_fractions": tfds.features.Tensor(shape=(NUM_IGBP_CLASSES,), dtype=np.float32),
        "patch_id": tfds.features.Text(),
        "season": tfds.features.Text(),
        "scene_id": tfds.features.Scalar(dtype=np.int32),
        "patch": tfds.features.Scalar(dtype=np.int32),
    })


# ---------------------------------------------------------------------------------------------
# Writing shards: what `data_builders.shard_writer` needs to know about this dataset.

@dataclasses.dataclass(frozen=True)
class Sen12msLoader(shard_writer.ExampleLoader[PatchRef]):
    """Reads a triplet into an example (picklable: it travels to the worker processes)."""

    nonfinite_s1_fill: float | None = None

    def features(self) -> tfds.features.FeaturesDict:
        return make_features()

    def serialized_size(self) -> int:
        """Bytes of one serialised example (the rasters dominate)."""
        channels = 4 * len(S1_BANDS) + 2 * len(S2_BANDS) + 2 * len(LC_BANDS)
        return PATCH_SIZE * PATCH_SIZE * channels + 1024

    def load(self, item: PatchRef) -> dict[str, Any]:
        with exact_name_reads():
            return read_patch(item, nonfinite_s1_fill=self.nonfinite_s1_fill)


# ---------------------------------------------------------------------------------------------
# The builder.

@dataclasses.dataclass(eq=False)
class Sen12msConfig(tfds.core.BuilderConfig):
    """Options of the SEN12MS builder.

    skip_bad_patches: skip (and list in skipped_patches.json) triplets that cannot be read as
        specified instead of raising `PatchError`.
    nonfinite_s1_fill: when set, non-finite S1 values are replaced by this value (dB) instead of
        being an error. The known broken triplet is left out regardless.
    validation_fraction: approximate fraction of non-test scenes carved out as validation.
    """

    skip_bad_patches: bool = False
    nonfinite_s1_fill: float | None = None
    validation_fraction: float = VALIDATION_FRACTION


class Sen12ms(tfds.core.GeneratorBasedBuilder):
    """SEN12MS S1/S2/land-cover triplets with simplified IGBP multi-labels; see module docs."""

    name = "sen12ms"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: official hold-out test split, hashed validation "
                              "scenes, labels computed from the LC raster."}
    BUILDER_CONFIGS = [
        Sen12msConfig(name="default", description="All triplets; bad patches are an error."),
    ]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download the four official SEN12MS archives from https://mediatum.ub.tum.de/1474000
    (ROIs1158_spring.tar.gz, ROIs1868_summer.tar.gz, ROIs1970_fall.tar.gz,
    ROIs2017_winter.tar.gz; each holds s1_<scene>, s2_<scene> and lc_<scene> folders, possibly
    split into ROIs<...>_{s1,s2,lc}.tar.gz parts) and extract them into the manual directory so
    that it contains

        ROIs1158_spring/s1_<scene>/ROIs1158_spring_s1_<scene>_p<patch>.tif
        ROIs1158_spring/s2_<scene>/...   ROIs1158_spring/lc_<scene>/...
        ROIs1868_summer/...   ROIs1970_fall/...   ROIs2017_winter/...

    (one extra enclosing folder, e.g. SEN12MS/, is also accepted). Do not add the official label
    pickle: labels are computed from the land-cover rasters.
    """

    def __init__(
        self,
        *,
        skip_bad_patches: bool | None = None,
        nonfinite_s1_fill: float | None = None,
        num_workers: int | None = None,
        **kwargs: Any,
    ):
        """`skip_bad_patches` / `nonfinite_s1_fill`, when given, override the config's values;
        `num_workers`: processes that read and write shards (see the module docstring)."""
        self._skip_override = skip_bad_patches
        self._fill_override = nonfinite_s1_fill
        self._num_workers = num_workers
        self._skipped: list[dict[str, Any]] = []
        self._left_out: list[str] = []
        super().__init__(**kwargs)

    @property
    def skip_bad_patches(self) -> bool:
        if self._skip_override is not None:
            return bool(self._skip_override)
        return bool(self.builder_config.skip_bad_patches)

    @property
    def nonfinite_s1_fill(self) -> float | None:
        if self._fill_override is not None:
            return float(self._fill_override)
        return self.builder_config.nonfinite_s1_fill

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "SEN12MS: Sentinel-1 (VV, VH dB), Sentinel-2 L1C (13 bands) and MODIS land-cover "
                "(IGBP, LCCS LC/LU/SH) triplets, 256x256 px at 10 m; simplified 10-class IGBP "
                "multi-labels (fraction >= 0.1) computed from the IGBP band."),
            features=make_features(),
            homepage="https://mediatum.ub.tum.de/1474000",
            citation="""@article{schmitt2019sen12ms,
  title={SEN12MS -- A Curated Dataset of Georeferenced Multi-Spectral Sentinel-1/2 Imagery for
         Deep Learning and Data Fusion},
  author={Schmitt, Michael and Hughes, Lloyd Haydn and Qiu, Chunping and Zhu, Xiao Xiang},
  journal={ISPRS Annals of the Photogrammetry, Remote Sensing and Spatial Information Sciences},
  volume={IV-2/W7}, pages={153--160}, year={2019}}""",
        )

    def _plan(self, root: str | os.PathLike) -> tuple[dict[str, list[PatchRef]], list[str]]:
        """Triplets per split in `list_patches` order, and the ids of the left-out ones."""
        by_split: dict[str, list[PatchRef]] = {"train": [], "validation": [], "test": []}
        left_out = []
        fraction = self.builder_config.validation_fraction
        for ref in list_patches(root):
            if (ref.season, ref.scene, ref.patch) in BROKEN_TRIPLETS:
                left_out.append(ref.patch_id)
                continue
            by_split[scene_split(ref.season, ref.scene, fraction)].append(ref)
        return by_split, left_out

    def _loader(self) -> Sen12msLoader:
        return Sen12msLoader(self.nonfinite_s1_fill)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """The standard TFDS interface (one process, TFDS's writer); `_generate_splits` does
        the same work in parallel and is what `download_and_prepare` uses."""
        by_split, self._left_out = self._plan(dl_manager.manual_dir)
        self._skipped = []
        self._write_report(self._skipped)
        return {split: self._generate_examples(split, split_refs)
                for split, split_refs in by_split.items() if split_refs}

    def _generate_examples(self, split: str, refs: Iterable[PatchRef]):
        yield from shard_writer.generate_examples(
            self._loader(), split, [(ref.patch_id, ref) for ref in refs],
            skip_bad_patches=self.skip_bad_patches, skipped=self._skipped)
        self._write_report(self._skipped)

    def _generate_splits(self, dl_manager: tfds.download.DownloadManager,
                         download_config: tfds.download.DownloadConfig):
        """Plans shards per split, writes them (in parallel), returns the `SplitInfo`s."""
        by_split, self._left_out = self._plan(dl_manager.manual_dir)
        return shard_writer.generate_splits(
            self, {split: [(ref.patch_id, ref) for ref in refs]
                   for split, refs in by_split.items()},
            self._loader(), download_config=download_config,
            skip_bad_patches=self.skip_bad_patches, num_workers=self._num_workers,
            report=self._write_report, source=dl_manager.manual_dir)

    def _write_report(self, skipped: list[dict[str, Any]]) -> None:
        """Writes skipped_patches.json into the dataset directory being prepared (TFDS moves it
        into place with the data); skip records sorted by split name, then patch id."""
        left_out = [{"patch_id": p, "reason": "known broken triplet (NaN in S1); dropped by the "
                                              "official lists"}
                    for p in self._left_out]
        shard_writer.write_report(self, skipped, name=REPORT_NAME, extra={"left_out": left_out})
