"""The reading side of scene mapping (`mosaic_jax.inference.predict`): bands of a scene's rows,
one window high, in the model's units, with the mask of pixels that have data.

A `SceneReader` reads from two open rasterio datasets (S1 already on the S2 grid, e.g. a
``WarpedVRT``); ``read(r0)`` is one band of rows, ``bands(offsets)`` all of them with one reader
thread reading the next band while the caller works on this one (GDAL releases the GIL; only
that thread touches the files while the bands are iterated).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from rasterio.windows import Window

from mosaic_jax.inference import scene_windows
from mosaic_jax.inference.input_units import to_db


class AbsentModality:
    """Stands in for the file of a missing modality (``predict --s1`` or ``--s2`` alone): the
    grid of the present file ``like``, and reads that give the band means of ``spec``
    (``model.json["inputs"][modality]``) in file units, so its pixels count as valid and are
    zeros once normalised. The embedder is called with None for this modality, so these values
    never reach the model."""

    def __init__(self, like: Any, spec: dict[str, Any]):
        self.crs, self.transform = like.crs, like.transform
        self.width, self.height = like.width, like.height
        self.xy = like.xy
        self.descriptions = tuple(spec["bands"])
        self.count = len(spec["bands"])
        self.dtypes = ("float32",) * self.count
        self.nodata = None
        self.mean = np.asarray(spec["mean"], np.float32)

    def read(self, indexes: Sequence[int], window: Window) -> np.ndarray:
        """float32 [len(indexes), window rows, window cols] of the band means."""
        shape = (int(window.height), int(window.width))
        return np.stack([np.full(shape, self.mean[i - 1], np.float32) for i in indexes])


@dataclasses.dataclass(frozen=True)
class RowBand:
    """Rows ``top .. top + size`` of the scene: ``s1`` float32 [size, W, c1] dB, ``s2`` float32
    [size, W, c2] in the model's units, ``valid`` bool [size, W] (pixels with data in both)."""

    top: int
    s1: np.ndarray
    s2: np.ndarray
    valid: np.ndarray


class SceneReader:
    """Bands of rows of an S1/S2 pair on one grid, converted to the model's units.

    Args:
      s1, s2: open rasterio datasets (or VRTs) of the same width and height.
      s1_bands, s2_bands: 1-based band indexes of the model's bands, in its order.
      size: rows per band (the model's patch size).
      s1_linear: the S1 file holds linear power: converted to dB (values <= 0 become NaN).
      s2_scale: factor from the S2 file's values to the model's units (1: none).
    """

    def __init__(self, s1: Any, s2: Any, s1_bands: Sequence[int], s2_bands: Sequence[int],
                 size: int, *, s1_linear: bool = False, s2_scale: float = 1.0):
        self.s1, self.s2 = s1, s2
        self.s1_bands, self.s2_bands = list(s1_bands), list(s2_bands)
        self.size, self.s1_linear, self.s2_scale = size, s1_linear, float(s2_scale)
        self.s1_nodata = None if s1_linear else s1.nodata  # linear <= 0 is NaN after to_db
        self.s2_nodata = s2.nodata
        self.wait_seconds = 0.0  # time `bands` waited for the reader thread

    def read(self, top: int) -> RowBand:
        """The band of rows starting at ``top`` (``size`` rows, the scene's full width)."""
        window = Window(0, top, self.s2.width, self.size)
        x1 = np.moveaxis(self.s1.read(self.s1_bands, window=window), 0, -1)
        x2 = np.moveaxis(self.s2.read(self.s2_bands, window=window), 0, -1)
        if self.s1_linear:
            x1 = to_db(x1)
        valid = scene_windows.valid_pixels(
            x1, x2, s1_nodata=self.s1_nodata, s2_nodata=self.s2_nodata,
            s2_zero_fill=not isinstance(self.s2, AbsentModality))  # a preset's means may be 0
        x1 = x1.astype(np.float32, copy=False)
        x2 = x2.astype(np.float32)
        if self.s2_scale != 1.0:
            x2 *= np.float32(self.s2_scale)
        return RowBand(top, x1, x2, valid)

    def bands(self, offsets: Sequence[int]) -> Iterator[RowBand]:
        """`read` of every offset in order, the next one read ahead in a thread."""
        if len(offsets) == 0:
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = pool.submit(self.read, int(offsets[0]))
            for k in range(len(offsets)):
                t = time.perf_counter()
                band = ahead.result()
                self.wait_seconds += time.perf_counter() - t
                if k + 1 < len(offsets):
                    ahead = pool.submit(self.read, int(offsets[k + 1]))
                yield band
