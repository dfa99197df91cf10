"""A small, faithful fake of BigEarthNet v2.0 in the official extracted layout.

`write_fake_bigearthnet(root, n)` writes what the official archives hold after extraction:

    root/metadata.parquet, root/metadata_for_patches_with_snow_cloud_or_shadow.parquet
    root/BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_<B01..B12>.tif
    root/BigEarthNet-S1/<s1 tile>/<s1_name>/<s1_name>_{VV,VH}.tif
    root/Reference_Maps/<tile>/<patch_id>/<patch_id>_reference_map.tif

as real GeoTIFFs shaped like the real ones (checked against the official sample with rasterio):
S2 uint16, GDAL nodata 0, 120/60/20 px for the 10/20/60 m bands; S1 float32 dB 120 px without
nodata; reference maps uint16 CLC codes, DEFLATE, nodata 0; all single-band, uncompressed strips
(except the maps), UTM CRS (EPSG:326zz from the tile) with the patch grid's geotransform
(x0 = tile origin x + 1200 m * grid x, y0 = tile origin y - 1200 m * grid y). Patch ids zero-pad
the grid indices (`..._T33UUP_05_43`), S1 names do not (`..._33UUP_5_43`) and live in S1 tile
directories named after S1 acquisitions (two per S2 tile), so S1 can only be found through the
`s1_name` column, as in the real data. The parquet files have the official schema.

With `learnable=True` the labels are learnable from both modalities: each patch gets a land-cover
map of 1-4 classes (smooth random blobs); every class has its own 12-band reflectance signature
(realistic x10000 values), its own S1 backscatter level (VV, VH in dB, -27..-5) and its own
texture (smooth water, noisy canopy, field blocks, crop rows, blocky urban, ...), with S1 speckle,
illumination changes and sensor noise on top. A class is a label iff it covers >= `min_fraction`
of the patch (smaller slivers are merged into the patch's dominant class, so the map, the images
and the labels always agree); the reference map holds a CLC code of each pixel's class, and some
patches have a small unlabelled area (999 or a CLC code outside the 19-class mapping). With
`learnable=False` the images ignore the map (a control for leakage tests).

Writing is fast (about 10 ms per patch on one core): uncompressed TIFFs are produced by patching
pixel data and the tie point into a header that GDAL itself wrote once per kind of file, so they
are byte-for-byte what rasterio would write; the DEFLATE maps go through rasterio.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from data_builders import atomic_files
from data_builders.bigearthnet_v2.bigearthnet_v2 import (
    CLASS_NAMES,
    CLC_TO_CLASS,
    METADATA_FILE,
    NUM_CLASSES,
    PATCH_SIZE,
    S1_BANDS,
    S2_BAND_SIZE,
    S2_BANDS,
    SNOW_CLOUD_METADATA_FILE,
    reference_map_dir,
    s1_patch_dir,
    s2_patch_dir,
)
from data_builders.geotiff import write_tiff

PATCH_METRES = 1200.0
"""Side of a patch in metres (120 px at 10 m)."""

# ---------------------------------------------------------------------------------------------
# Fake tiles, named like the real ones (mission, sensing time, processing baseline, orbit, tile).


@dataclasses.dataclass(frozen=True)
class FakeTile:
    s2_tile_dir: str
    country: str
    origin: tuple[float, float]
    s1_tile_dirs: tuple[str, ...]

    @property
    def tile_code(self) -> str:
        """'33UUP' for '..._T33UUP' (the S1 names carry it without the T)."""
        return self.s2_tile_dir.rsplit("_", 1)[1][1:]


FAKE_TILES: tuple[FakeTile, ...] = (
    FakeTile("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP", "Austria", (300000.0, 5400000.0),
             ("S1A_IW_GRDH_1SDV_20170613T165043", "S1B_IW_GRDH_1SDV_20170612T165809")),
    FakeTile("S2B_MSIL2A_20170924T093019_N9999_R136_T35VLH", "Finland", (300000.0, 6900000.0),
             ("S1A_IW_GRDH_1SDV_20170922T155112", "S1B_IW_GRDH_1SDV_20170923T154337")),
    FakeTile("S2A_MSIL2A_20170717T113321_N9999_R080_T29SND", "Portugal", (600000.0, 4300020.0),
             ("S1A_IW_GRDH_1SDV_20170717T183415", "S1B_IW_GRDH_1SDV_20170718T182630")),
    FakeTile("S2B_MSIL2A_20170814T092029_N9999_R093_T34TDQ", "Serbia", (399960.0, 5000040.0),
             ("S1A_IW_GRDH_1SDV_20170813T164422", "S1B_IW_GRDH_1SDV_20170814T045118")),
)

_TILE_ORIGINS = {tile.tile_code: tile.origin for tile in FAKE_TILES}
_DEFAULT_ORIGIN = (399960.0, 5000040.0)
GRID_SIZE = 91
"""Grid indices run 0..90 in both directions, as in the real data."""


def utm_epsg(tile_code: str) -> int:
    """EPSG code of the UTM zone of an MGRS tile code ('33UUP' -> 32633; bands C..M -> 327zz)."""
    zone, band = int(tile_code[:2]), tile_code[2].upper()
    return (32600 if band >= "N" else 32700) + zone


def _grid_position(name: str) -> tuple[str, int, int]:
    """(tile code, grid x, grid y) from an S2 patch id or an S1 name."""
    parts = name.split("_")
    tile = parts[-3]
    return (tile[1:] if tile.startswith("T") else tile), int(parts[-2]), int(parts[-1])


def patch_geo(name: str, pixel_size: float = 10.0) -> tuple[int, tuple[float, ...]]:
    """(EPSG code, affine transform (a, b, c, d, e, f)) of a patch from its S2 id or S1 name.

    Tiles of `FAKE_TILES` (T33UUP carries its real origin) use their origin, others a fixed
    plausible one: only the fakes' own tiles are meant to be exact."""
    tile, x, y = _grid_position(name)
    x0, y0 = _TILE_ORIGINS.get(tile, _DEFAULT_ORIGIN)
    return utm_epsg(tile), (pixel_size, 0.0, x0 + PATCH_METRES * x,
                            0.0, -pixel_size, y0 - PATCH_METRES * y)


# ---------------------------------------------------------------------------------------------
# Fast GeoTIFF writing.

@dataclasses.dataclass(frozen=True)
class _Template:
    header: bytes
    data_offset: int
    tiepoint_offset: int


_TEMPLATES: dict[tuple, _Template | None] = {}


def _tiff_template(height: int, width: int, dtype: np.dtype, epsg: int, pixel_size: float,
                   nodata: float | None) -> _Template | None:
    """A GDAL-written single-band uncompressed TIFF of this kind, with where its pixels and its
    tie point live; None when its layout is not the plain one this module can patch."""
    key = (height, width, np.dtype(dtype).str, epsg, pixel_size, nodata)
    if key in _TEMPLATES:
        return _TEMPLATES[key]
    import rasterio  # GDAL: heavy, only needed to read or write files
    from affine import Affine

    profile = dict(driver="GTiff", height=height, width=width, count=1, dtype=np.dtype(dtype).name,
                   crs=f"EPSG:{epsg}", transform=Affine(pixel_size, 0, 0, 0, -pixel_size, 0))
    if nodata is not None:
        profile["nodata"] = nodata
    # Non-zero pixels: for all-zero blocks GDAL writes padded strips, unlike for real data.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "template.tif"
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.ones((1, height, width), dtype=dtype))
        header = path.read_bytes()
    _TEMPLATES[key] = template = _parse_template(header, height, width * np.dtype(dtype).itemsize)
    return template


def _parse_template(data: bytes, height: int, row_bytes: int) -> _Template | None:
    if data[:4] != b"II*\x00":
        return None
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    tags = {}
    for i in range(count):
        tag, typ, n, value = struct.unpack_from("<HHII", data, ifd + 2 + 12 * i)
        tags[tag] = (typ, n, value, ifd + 2 + 12 * i + 8)

    def values(tag: int) -> list[int]:
        typ, n, value, inline_at = tags[tag]
        fmt = {3: "H", 4: "I"}[typ]
        at = inline_at if n * struct.calcsize(fmt) <= 4 else value
        return list(struct.unpack_from(f"<{n}{fmt}", data, at))

    try:
        if values(259) != [1] or values(277) != [1] or 33922 not in tags:
            return None
        offsets, counts = values(273), values(279)
        rows_per_strip = values(278)[0]
    except (KeyError, struct.error):
        return None
    for k in range(len(offsets) - 1):  # Strips must be contiguous and full, in row order.
        if counts[k] != rows_per_strip * row_bytes or offsets[k + 1] != offsets[k] + counts[k]:
            return None
    if sum(counts) < height * row_bytes or tags[33922][1] != 6:
        return None
    return _Template(data, offsets[0], tags[33922][2])


def write_geotiff(path: str | os.PathLike, array: np.ndarray, *, epsg: int,
                  transform: Sequence[float], nodata: float | None = None,
                  compress: str | None = None) -> None:
    """Writes a single-band [H, W] array as a GeoTIFF like the official files, atomically.

    Uncompressed files reuse a GDAL-written header (same bytes as rasterio would write);
    compressed ones, and any layout this module does not recognise, go through rasterio."""
    array = np.asarray(array)
    pixel_size = float(transform[0])
    template = None
    if compress is None and array.ndim == 2 and transform[1] == 0 and transform[3] == 0 \
            and transform[4] == -pixel_size:
        template = _tiff_template(array.shape[0], array.shape[1], array.dtype, epsg, pixel_size,
                                  nodata)
    if template is None:
        write_tiff(path, array, crs=f"EPSG:{epsg}", transform=transform, nodata=nodata,
                   compress=compress)
        return
    buffer = bytearray(template.header)
    pixels = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    buffer[template.data_offset:template.data_offset + len(pixels)] = pixels
    struct.pack_into("<dd", buffer, template.tiepoint_offset + 24, transform[2], transform[5])
    atomic_files.write_atomic(path, bytes(buffer))


def write_s2_patch(root: str | os.PathLike, patch_id: str, bands: Mapping[str, np.ndarray], *,
                   suffix: str = ".tif") -> list[Path]:
    """Writes the 12 band files of an S2 patch (uint16 arrays at native size, see
    `S2_BAND_SIZE`, keyed by band name); returns their paths in `S2_BANDS` order."""
    directory = s2_patch_dir(root, patch_id)
    paths = []
    for band in S2_BANDS:
        size = S2_BAND_SIZE[band]
        epsg, transform = patch_geo(patch_id, PATCH_METRES / size)
        path = directory / f"{patch_id}_{band}{suffix}"
        write_geotiff(path, bands[band], epsg=epsg, transform=transform, nodata=0)
        paths.append(path)
    return paths


def write_s1_patch(root: str | os.PathLike, s1_name: str, s1: np.ndarray, *,
                   suffix: str = ".tif") -> list[Path]:
    """Writes VV and VH (float32 [120, 120, 2], dB) of an S1 patch; returns the two paths."""
    directory = s1_patch_dir(root, s1_name)
    epsg, transform = patch_geo(s1_name)
    paths = []
    for i, band in enumerate(S1_BANDS):
        path = directory / f"{s1_name}_{band}{suffix}"
        write_geotiff(path, np.ascontiguousarray(s1[..., i]), epsg=epsg, transform=transform)
        paths.append(path)
    return paths


def write_reference_map(root: str | os.PathLike, patch_id: str, codes: np.ndarray, *,
                        suffix: str = ".tif") -> Path:
    """Writes a reference map (uint16 [120, 120] CLC codes, DEFLATE, nodata 0)."""
    epsg, transform = patch_geo(patch_id)
    path = reference_map_dir(root, patch_id) / f"{patch_id}_reference_map{suffix}"
    write_geotiff(path, codes.astype(np.uint16), epsg=epsg, transform=transform, nodata=0,
                  compress="deflate")
    return path


def metadata_schema():
    """The pyarrow schema of the official parquet files."""
    import pyarrow as pa  # pyarrow: heavy, only for the parquet files

    return pa.schema([
        ("patch_id", pa.string()),
        ("labels", pa.list_(pa.field("element", pa.string()))),
        ("split", pa.string()),
        ("country", pa.string()),
        ("s1_name", pa.string()),
        ("s2v1_name", pa.string()),
        ("contains_seasonal_snow", pa.bool_()),
        ("contains_cloud_or_shadow", pa.bool_()),
    ])


def write_metadata(path: str | os.PathLike, rows: Iterable[Mapping]) -> None:
    """Writes metadata rows (dicts with the official column names) as an official-schema
    parquet file; label lists are sorted within each row, as in the official files."""
    import pyarrow as pa  # pyarrow: heavy, only for the parquet files
    import pyarrow.parquet as pq

    schema = metadata_schema()
    rows = list(rows)
    columns = {name: [row[name] for row in rows] for name in schema.names}
    columns["labels"] = [sorted(labels) for labels in columns["labels"]]
    with atomic_files.atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pydict(columns, schema=schema), tmp)


# ---------------------------------------------------------------------------------------------
# Synthesis.

# 12-band reflectance x 10000 (B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12) per class; the
# last row is for unlabelled pixels (bare rock-like).
_SIGNATURES = np.array([
    [1200, 1100, 1050, 1100, 1300, 1450, 1550, 1600, 1650, 700, 1900, 1700],   # urban
    [1500, 1450, 1450, 1550, 1650, 1700, 1750, 1800, 1820, 760, 2500, 2350],   # industrial
    [900, 800, 950, 1050, 1450, 2100, 2500, 2700, 2800, 900, 2700, 1900],      # arable
    [700, 620, 800, 760, 1250, 2000, 2350, 2500, 2600, 850, 2300, 1500],       # permanent crops
    [480, 400, 720, 480, 1150, 2700, 3400, 3650, 3750, 1150, 2050, 1050],      # pastures
    [650, 560, 760, 720, 1180, 2300, 2800, 3000, 3100, 960, 2350, 1350],       # complex cult.
    [550, 460, 680, 560, 1050, 2300, 2900, 3100, 3200, 990, 1950, 1050],       # agri + natural
    [620, 520, 640, 760, 1050, 1750, 2100, 2250, 2350, 780, 2250, 1600],       # agro-forestry
    [300, 250, 480, 260, 820, 2600, 3300, 3500, 3600, 1050, 1650, 700],        # broad-leaved
    [230, 180, 320, 180, 560, 1350, 1700, 1800, 1900, 640, 900, 400],          # coniferous
    [270, 220, 400, 220, 700, 1950, 2450, 2650, 2750, 840, 1280, 560],         # mixed forest
    [850, 760, 980, 1120, 1400, 1750, 1950, 2050, 2150, 760, 2900, 2250],      # nat. grassland
    [520, 420, 560, 540, 880, 1400, 1650, 1750, 1850, 640, 1900, 1250],        # moors
    [420, 340, 580, 420, 950, 2100, 2600, 2750, 2850, 880, 1800, 950],         # transitional
    [1900, 2000, 2350, 2650, 2800, 2900, 3000, 3100, 3150, 1250, 3800, 3200],  # beaches
    [450, 400, 620, 520, 820, 1500, 1800, 1900, 1950, 610, 1250, 650],         # inland wetlands
    [620, 580, 740, 640, 880, 1150, 1300, 1350, 1400, 470, 1050, 640],         # coastal wetl.
    [520, 470, 540, 380, 330, 280, 250, 220, 210, 90, 130, 95],                # inland waters
    [640, 580, 460, 260, 210, 160, 150, 130, 120, 55, 75, 55],                 # marine waters
    [1300, 1250, 1300, 1400, 1550, 1650, 1750, 1800, 1850, 800, 2500, 2200],   # unlabelled
], dtype=np.float32)

# Mean backscatter (VV, VH) in dB per class, last row unlabelled.
_S1_LEVELS = np.array([
    [-6.0, -12.0], [-5.0, -13.5], [-12.0, -19.0], [-10.0, -16.0], [-13.0, -20.5],
    [-11.0, -17.5], [-10.5, -16.8], [-9.0, -15.0], [-8.0, -13.5], [-7.5, -12.8],
    [-7.8, -14.0], [-14.0, -21.5], [-13.5, -19.8], [-9.5, -15.6], [-17.0, -26.0],
    [-15.0, -22.0], [-16.0, -23.5], [-21.0, -27.0], [-19.0, -25.5], [-12.0, -19.0],
], dtype=np.float32)

# Texture kind and amplitude per class, last entry unlabelled.
_TEXTURES: tuple[tuple[str, float], ...] = (
    ("urban", 0.30), ("urban", 0.20), ("fields", 0.18), ("rows", 0.14), ("fields", 0.08),
    ("fields", 0.22), ("patchy", 0.15), ("rows", 0.10), ("canopy", 0.12), ("canopy", 0.08),
    ("canopy", 0.10), ("patchy", 0.10), ("patchy", 0.14), ("canopy", 0.16), ("smooth", 0.05),
    ("patchy", 0.08), ("smooth", 0.06), ("smooth", 0.02), ("smooth", 0.015), ("patchy", 0.12),
)

# How often each class is drawn (roughly the real frequencies, all classes possible).
_CLASS_WEIGHTS = np.array([9, 3, 14, 3, 9, 8, 9, 2, 10, 11, 11, 2, 2, 10, 1, 3, 1, 4, 4],
                          dtype=np.float64)
_CLASS_WEIGHTS /= _CLASS_WEIGHTS.sum()

_CLASS_CODES: tuple[tuple[int, ...], ...] = tuple(
    tuple(code for code, cls in sorted(CLC_TO_CLASS.items()) if cls == c)
    for c in range(NUM_CLASSES))
UNLABELLED_CODES: tuple[int, ...] = (999, 124, 132, 141, 142, 332, 334)
"""CLC codes the 19-class nomenclature leaves unlabelled, used for the fakes' unlabelled areas."""

_CLOUD = np.array([5200, 5000, 4900, 5000, 5100, 5200, 5300, 5300, 5350, 1800, 4200, 3400],
                  dtype=np.float32)
_SNOW = np.array([8200, 8500, 8300, 8100, 7900, 7600, 7300, 7000, 6800, 2400, 700, 450],
                 dtype=np.float32)


def _interpolation_matrix(coarse: int, fine: int = PATCH_SIZE) -> np.ndarray:
    """[fine, coarse] linear interpolation weights (smooth upsampling of a coarse grid)."""
    positions = np.linspace(0, coarse - 1, fine)
    low = np.floor(positions).astype(int).clip(0, coarse - 2)
    frac = positions - low
    matrix = np.zeros((fine, coarse), dtype=np.float32)
    matrix[np.arange(fine), low] = 1 - frac
    matrix[np.arange(fine), low + 1] = frac
    return matrix


_SMOOTH6 = _interpolation_matrix(6)
_SMOOTH12 = _interpolation_matrix(12)


def _smooth_field(rng: np.random.Generator, count: int, matrix: np.ndarray) -> np.ndarray:
    """`count` smooth random fields [count, 120, 120], ~unit variance."""
    coarse = rng.standard_normal((count, matrix.shape[1], matrix.shape[1]), dtype=np.float32)
    return matrix @ coarse @ matrix.T * 1.6


def _texture(rng: np.random.Generator, kind: str, amplitude: float) -> np.ndarray:
    """Multiplicative texture [120, 120] around 1 of one kind of surface."""
    n = PATCH_SIZE
    if kind == "smooth":
        return 1 + amplitude * rng.standard_normal((n, n), dtype=np.float32)
    if kind == "canopy":  # Crowns: strong pixel-to-pixel variation.
        return 1 + amplitude * rng.standard_normal((n, n), dtype=np.float32) * 1.5
    if kind == "patchy":
        return 1 + amplitude * _smooth_field(rng, 1, _SMOOTH12)[0]
    if kind == "fields":  # Parcels with their own brightness.
        block = int(rng.integers(12, 31))
        cells = -(-n // block)
        levels = 1 + amplitude * rng.standard_normal((cells, cells), dtype=np.float32)
        return np.repeat(np.repeat(levels, block, 0), block, 1)[:n, :n]
    if kind == "rows":  # Orchards, vineyards: periodic rows.
        period = float(rng.uniform(3.5, 6.0))
        phase = float(rng.uniform(0, 2 * np.pi))
        angle = 2 * np.pi * np.arange(n, dtype=np.float32) / period + phase
        stripes = 1 + amplitude * np.sin(angle)
        return np.broadcast_to(stripes[None, :] if rng.random() < 0.5 else stripes[:, None],
                               (n, n)).astype(np.float32)
    if kind == "urban":  # Buildings and streets: blocky, high contrast.
        cells = -(-n // 3)
        levels = 1 + amplitude * rng.standard_normal((cells, cells), dtype=np.float32)
        return np.repeat(np.repeat(levels, 3, 0), 3, 1)[:n, :n]
    raise ValueError(kind)


@dataclasses.dataclass(frozen=True)
class FakePatch:
    """One synthetic patch: class_map uint8 [120, 120] (class index, 255 unlabelled); clc_codes
    uint16 [120, 120]; s2 band name -> uint16 array at the band's native size; s1 float32
    [120, 120, 2] dB; labels the sorted class names present."""

    class_map: np.ndarray
    clc_codes: np.ndarray
    s2: dict[str, np.ndarray]
    s1: np.ndarray
    labels: tuple[str, ...]


def synthesize_patch(rng: np.random.Generator, *, learnable: bool = True, snow: bool = False,
                     cloud: bool = False, min_fraction: float = 0.05,
                     unlabelled_probability: float = 0.15) -> FakePatch:
    """Draws one patch: land-cover map, CLC codes, S2 bands, S1 and labels (see module doc)."""
    n = PATCH_SIZE
    k = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.28, 0.12]))
    classes = rng.choice(NUM_CLASSES, size=k, replace=False, p=_CLASS_WEIGHTS)
    fields = _smooth_field(rng, k, _SMOOTH6) + rng.normal(0, 0.6, size=(k, 1, 1))
    class_map = classes[np.argmax(fields, axis=0)].astype(np.uint8)
    if rng.random() < unlabelled_probability:
        blob = _smooth_field(rng, 1, _SMOOTH6)[0]
        class_map[blob > np.quantile(blob, 1 - rng.uniform(0.02, 0.10))] = 255
    counts = np.bincount(class_map.ravel(), minlength=256)
    dominant = int(np.argmax(counts[:NUM_CLASSES]))
    for c in classes:
        if 0 < counts[c] < min_fraction * n * n:
            class_map[class_map == c] = dominant
    present = [c for c in range(NUM_CLASSES) if (class_map == c).any()]
    labels = tuple(sorted(CLASS_NAMES[c] for c in present))

    code_of = np.zeros(256, dtype=np.uint16)
    for c in present:
        code_of[c] = rng.choice(_CLASS_CODES[c])
    code_of[255] = rng.choice(UNLABELLED_CODES)
    clc_codes = code_of[class_map]

    index_map = np.where(class_map == 255, NUM_CLASSES, class_map).astype(np.intp)
    texture = np.ones((n, n), dtype=np.float32)
    for c in np.unique(index_map):
        kind, amplitude = _TEXTURES[c] if learnable else ("patchy", 0.1)
        mask = index_map == c
        texture[mask] = _texture(rng, kind, amplitude)[mask]
    if learnable:
        signature = _SIGNATURES[index_map]
        level = _S1_LEVELS[index_map]
    else:
        signature = np.broadcast_to(_SIGNATURES.mean(0), (n, n, len(S2_BANDS)))
        level = np.broadcast_to(_S1_LEVELS.mean(0), (n, n, len(S1_BANDS)))

    illumination = rng.uniform(0.85, 1.15)
    noise = rng.standard_normal((n, n, len(S2_BANDS)), dtype=np.float32)
    s2 = signature * (illumination * texture)[..., None] * (1 + 0.03 * noise) + 8 * noise
    for flag, colour in ((cloud, _CLOUD), (snow, _SNOW)):
        if flag:
            blob = _smooth_field(rng, 1, _SMOOTH6)[0]
            alpha = np.clip(blob - np.quantile(blob, rng.uniform(0.3, 0.8)), 0, 1)[..., None]
            s2 = (1 - alpha) * s2 + alpha * colour
    s2_bands = {}
    for i, band in enumerate(S2_BANDS):
        size = S2_BAND_SIZE[band]
        f = n // size
        data = s2[..., i] if f == 1 else s2[..., i].reshape(size, f, size, f).mean(axis=(1, 3))
        s2_bands[band] = np.clip(np.rint(data), 1, 65535).astype(np.uint16)

    speckle = rng.standard_gamma(4.5, size=(n, n, len(S1_BANDS)), dtype=np.float32) / 4.5
    s1 = (level + (5 * np.log10(np.maximum(texture, 0.05)))[..., None]
          + 10 * np.log10(np.maximum(speckle, 1e-4))).astype(np.float32)
    return FakePatch(class_map=class_map, clc_codes=clc_codes, s2=s2_bands, s1=s1,
                     labels=labels)


# ---------------------------------------------------------------------------------------------
# The whole fake dataset.

def _split_assignment(rng: np.random.Generator, n: int,
                      fractions: Sequence[float]) -> list[str]:
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"split_fractions must be 3 non-negative numbers, got {fractions}")
    total = float(sum(fractions))
    n_train = round(n * fractions[0] / total)
    n_val = min(n - n_train, round(n * fractions[1] / total))
    splits = ["train"] * n_train + ["validation"] * n_val + ["test"] * (n - n_train - n_val)
    return [splits[i] for i in rng.permutation(n)]


def write_fake_bigearthnet(root: str | os.PathLike, num_patches: int = 60, *, seed: int = 0,
                           split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
                           with_reference_maps: bool = True, num_snow_cloud: int = 0,
                           learnable: bool = True) -> list[str]:
    """Writes a fake BigEarthNet v2.0 manual directory under `root` (see module docstring).

    `num_patches` rows go to metadata.parquet and `num_snow_cloud` more (with snow and/or
    cloud drawn into their S2 images and the flags set) to the snow/cloud parquet file, which is
    always written. Splits are drawn with `split_fractions` (train, validation, test) in each
    file. Deterministic given `seed`. Returns the patch ids, metadata.parquet's first.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    total = num_patches + num_snow_cloud
    tile_of = rng.integers(0, len(FAKE_TILES), size=total)
    cells: dict[int, list[int]] = {}
    for t in range(len(FAKE_TILES)):
        needed = int((tile_of == t).sum())
        cells[t] = list(rng.choice(GRID_SIZE * GRID_SIZE, size=needed, replace=False))
    splits = (_split_assignment(rng, num_patches, split_fractions)
              + _split_assignment(rng, num_snow_cloud, split_fractions))

    rows: list[dict] = []
    for i in range(total):
        tile = FAKE_TILES[int(tile_of[i])]
        x, y = divmod(int(cells[int(tile_of[i])].pop()), GRID_SIZE)
        patch_id = f"{tile.s2_tile_dir}_{x:02d}_{y:02d}"
        s1_dir = tile.s1_tile_dirs[int(rng.integers(len(tile.s1_tile_dirs)))]
        s1_name = f"{s1_dir}_{tile.tile_code}_{x}_{y}"
        snow = cloud = False
        if i >= num_patches:
            kind = rng.choice(3, p=[0.6, 0.3, 0.1])
            cloud, snow = kind in (0, 2), kind in (1, 2)
        patch = synthesize_patch(rng, learnable=learnable, snow=snow, cloud=cloud)
        write_s2_patch(root, patch_id, patch.s2)
        write_s1_patch(root, s1_name, patch.s1)
        if with_reference_maps:
            write_reference_map(root, patch_id, patch.clc_codes)
        rows.append({
            "patch_id": patch_id, "labels": list(patch.labels), "split": splits[i],
            "country": tile.country, "s1_name": s1_name,
            "s2v1_name": "_".join(tile.s2_tile_dir.split("_")[:3]) + f"_{x}_{y}",
            "contains_seasonal_snow": snow, "contains_cloud_or_shadow": cloud,
        })
    write_metadata(root / METADATA_FILE, rows[:num_patches])
    write_metadata(root / SNOW_CLOUD_METADATA_FILE, rows[num_patches:])
    return [row["patch_id"] for row in rows]


__all__ = [
    "FAKE_TILES", "GRID_SIZE", "PATCH_METRES", "UNLABELLED_CODES", "FakePatch",
    "FakeTile", "metadata_schema", "patch_geo", "synthesize_patch", "utm_epsg",
    "write_fake_bigearthnet", "write_geotiff", "write_metadata", "write_reference_map",
    "write_s1_patch", "write_s2_patch",
]
