"""Reading and writing the GeoTIFFs of BigEarthNet v2 and SEN12MS, with errors that name the file.

Reading goes through rasterio (GDAL), which handles DEFLATE/LZW compression and both pixel-
interleaved and band-separate (planar) multi-band files. Writing is atomic (temporary file, then
rename), so an interrupted fake-data generator never leaves a half-written TIFF behind.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_builders import atomic_files

TIFF_SUFFIXES = (".tif", ".tiff")


class PatchError(ValueError):
    """A patch cannot be read as the dataset's contract says; the message names file and patch."""

    def __init__(self, message: str, *, patch_id: str, path: str | os.PathLike | None = None):
        self.reason = message
        self.patch_id = patch_id
        self.path = None if path is None else str(path)
        where = f" (file {self.path})" if self.path else ""
        super().__init__(f"patch {patch_id}: {message}{where}")

    def __reduce__(self):
        # Picklable despite the keyword-only arguments, so that it crosses process boundaries
        # (multiprocessing workers) unchanged.
        return _rebuild_patch_error, (self.reason, self.patch_id, self.path)


def _rebuild_patch_error(message: str, patch_id: str, path: str | None) -> PatchError:
    return PatchError(message, patch_id=patch_id, path=path)


def exact_name_reads() -> Any:
    """A rasterio environment for reading files opened by their exact names: GDAL skips its
    sidecar-file directory scan on every open (wrap a whole patch's reads in it)."""
    import rasterio  # GDAL: heavy, only needed to read or write files

    return rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR")


def is_symlink_loop(path: str | os.PathLike) -> bool:
    """True when resolving `path` runs into a cycle of symbolic links (ELOOP)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def find_tiff(directory: str | os.PathLike, stem: str, *, patch_id: str) -> Path:
    """Returns `directory/stem.tif` or `directory/stem.tiff`; `PatchError` when neither exists
    (or one is a symlink loop, which is named as such)."""
    directory = Path(directory)
    for suffix in TIFF_SUFFIXES:
        candidate = directory / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
        if is_symlink_loop(candidate):
            raise PatchError("symlink loop", patch_id=patch_id, path=candidate)
    raise PatchError(f"missing file {stem}.tif (or .tiff)", patch_id=patch_id,
                     path=directory / f"{stem}.tif")


def read_tiff(
    path: str | os.PathLike,
    *,
    patch_id: str,
    shape: Sequence[int],
    dtype: np.dtype | str,
    bands: int | None = None,
) -> np.ndarray:
    """Reads a GeoTIFF as [H, W] (bands=None, single band) or [H, W, bands].

    `shape` is the expected (H, W) and `dtype` the expected on-disk data type; any mismatch, an
    unreadable file or a wrong band count raises `PatchError` naming the file and the patch.
    """
    import rasterio  # Imported here: only dataset preparation needs GDAL.
    from rasterio.errors import RasterioError

    expected_count = 1 if bands is None else bands
    try:
        with rasterio.open(path) as src:
            if src.count != expected_count:
                raise PatchError(f"expected {expected_count} band(s), found {src.count}",
                                 patch_id=patch_id, path=path)
            if tuple(src.shape) != tuple(shape):
                raise PatchError(f"expected shape {tuple(shape)}, found {tuple(src.shape)}",
                                 patch_id=patch_id, path=path)
            if np.dtype(src.dtypes[0]) != np.dtype(dtype):
                raise PatchError(f"expected dtype {np.dtype(dtype).name}, found {src.dtypes[0]}",
                                 patch_id=patch_id, path=path)
            data = src.read()  # [bands, H, W], whatever the interleave on disk.
    except RasterioError as e:
        detail = f"{e}: {e.__cause__}" if e.__cause__ else str(e)  # GDAL's own message.
        raise PatchError(f"unreadable GeoTIFF: {detail}", patch_id=patch_id, path=path) from e
    return data[0] if bands is None else np.moveaxis(data, 0, -1)


def write_tiff(
    path: str | os.PathLike,
    array: np.ndarray,
    *,
    crs: str,
    transform: Sequence[float],
    nodata: float | None = None,
    compress: str | None = None,
    interleave: str = "band",
) -> None:
    """Atomically writes `array` ([H, W] or [H, W, bands]) as a GeoTIFF.

    `transform` is the affine (a, b, c, d, e, f) as in GDAL/rasterio (pixel size a, -e; origin c,
    f), `crs` e.g. "EPSG:32633", `interleave` "band" (planar) or "pixel".
    """
    import rasterio  # GDAL: heavy, only needed to read or write files
    from affine import Affine

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    profile = dict(driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                   dtype=data.dtype.name, crs=crs, transform=Affine(*transform[:6]),
                   interleave=interleave)
    if nodata is not None:
        profile["nodata"] = nodata
    if compress:
        profile["compress"] = compress
    with atomic_files.atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
