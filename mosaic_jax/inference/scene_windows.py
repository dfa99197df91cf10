"""The pure core of scene mapping (`mosaic_jax.inference.predict`): window grid, nodata masking,
input normalisation and the blending of overlapping window predictions. Arrays in, arrays out.

Geometry along one axis of a scene of ``length`` pixels, windows of ``size`` pixels every
``stride`` pixels (``stride <= size <= length``):

- window offsets are ``0, stride, 2 stride, ...`` while the window fits, plus one last window
  aligned to the scene's edge when the regular ones stop short of it, so every pixel is covered;
- the output grid has ``ceil(length / stride)`` cells of ``stride`` pixels (the last one may be
  cut by the edge); a window contributes to the cells whose centre (of the part inside the
  scene) lies inside the window, and a cell's value is the mean over those windows. With
  ``stride == size`` every cell gets exactly one window: its prediction, unblended.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mosaic_jax.data import bands


def check_geometry(length: int, size: int, stride: int, *, axis: str = "scene") -> None:
    """ValueError unless ``1 <= stride <= size <= length`` (what `window_offsets` needs)."""
    if not 1 <= stride <= size:
        raise ValueError(f"stride must be between 1 and the patch size {size}, got {stride} "
                         "(a larger stride would leave pixels no window sees)")
    if length < size:
        raise ValueError(f"the {axis} ({length} px) is smaller than the model's patch size "
                         f"({size} px)")


def window_offsets(length: int, size: int, stride: int) -> np.ndarray:
    """int64 [n]: start pixel of every window along an axis, the last one aligned to the edge."""
    check_geometry(length, size, stride)
    offsets = np.arange(0, length - size + 1, stride, dtype=np.int64)
    if offsets[-1] + size < length:
        offsets = np.append(offsets, length - size)
    return offsets


def output_length(length: int, stride: int) -> int:
    """Number of output cells along an axis: ``ceil(length / stride)``."""
    return -(-length // stride)


def covered_cells(offsets: np.ndarray, size: int, length: int, stride: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) int64 [n]: window i contributes to output cells ``lo[i] <= cell < hi[i]``, those
    whose centre (of the part of the cell inside the scene) lies in ``[offset, offset + size)``.
    Centres are compared doubled, so everything stays in integers."""
    n = output_length(length, stride)
    starts = np.arange(n, dtype=np.int64) * stride
    centres2 = starts + np.minimum(starts + stride, length)  # 2 x centre
    offsets = np.asarray(offsets, dtype=np.int64)
    lo = np.searchsorted(centres2, 2 * offsets, side="left")
    hi = np.searchsorted(centres2, 2 * (offsets + size), side="left")
    return lo.astype(np.int64), hi.astype(np.int64)


def has_data(x: np.ndarray, *, nodata: float | None = None,
             zero_fill: bool = False) -> np.ndarray:
    """bool [...]: pixels of ``x`` [..., c] (file units) with data: finite in every band, not
    the file's ``nodata`` value in every band and, with ``zero_fill``, not zero in every band
    (Sentinel-2's no-data fill)."""
    valid = np.isfinite(x).all(axis=-1)
    if zero_fill:
        valid &= (x != 0).any(axis=-1)
    if nodata is not None and not np.isnan(nodata):
        valid &= (x != nodata).any(axis=-1)
    return valid


def valid_pixels(s1: np.ndarray, s2: np.ndarray, *, s1_nodata: float | None = None,
                 s2_nodata: float | None = None, s2_zero_fill: bool = True) -> np.ndarray:
    """bool [h, w]: pixels with data in both modalities (`has_data` of ``s1`` [h, w, c1] and
    ``s2`` [h, w, c2], file units); S2's all-zero fill counts as no data unless
    ``s2_zero_fill=False`` (e.g. for a stand-in of a missing S2)."""
    return (has_data(s1, nodata=s1_nodata)
            & has_data(s2, nodata=s2_nodata, zero_fill=s2_zero_fill))


def window_valid_fractions(valid: np.ndarray, col_offsets: np.ndarray, size: int) -> np.ndarray:
    """float64 [n]: share of valid pixels in each ``size``-wide window of a row band.

    ``valid`` bool [size, w] (the rows of one window row), ``col_offsets`` int [n] window starts.
    """
    cols = np.concatenate([[0], np.cumsum(valid.sum(axis=0, dtype=np.int64))])
    col_offsets = np.asarray(col_offsets, dtype=np.int64)
    return (cols[col_offsets + size] - cols[col_offsets]) / float(valid.shape[0] * size)


def normalise(x: np.ndarray, mean: Sequence[float], std: Sequence[float],
              clip: Sequence[float] | None = None) -> np.ndarray:
    """float32 [..., c]: ``(clip(x) - mean) / std`` per band (last axis), as the export's
    ``model.json`` defines the embedder's input; ``clip`` (lo, hi) or None. A new contiguous
    array; the formula is `mosaic_jax.data.bands.standardize`'s."""
    return bands.standardize(x, mean, std, clip)


def accumulate(sums: np.ndarray, counts: np.ndarray, probs: np.ndarray,
               rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray],
               row_base: int = 0) -> None:
    """Adds each window's ``probs`` [n, C] to the cells it covers, in place.

    ``sums`` float64 [r, W, C] and ``counts`` int [r, W] hold output rows ``row_base ..
    row_base + r``; ``rows`` and ``cols`` are the (lo, hi) cell ranges [n] of the windows (from
    `covered_cells`), which must lie inside that row range.
    """
    for p, r0, r1, c0, c1 in zip(probs, rows[0] - row_base, rows[1] - row_base, cols[0], cols[1],
                                 strict=True):
        if r0 < 0 or r1 > sums.shape[0]:
            raise ValueError(f"window rows {r0 + row_base}..{r1 + row_base} fall outside the "
                             f"accumulated rows {row_base}..{row_base + sums.shape[0]}")
        sums[r0:r1, c0:c1] += p
        counts[r0:r1, c0:c1] += 1


def blend(sums: np.ndarray, counts: np.ndarray, nodata: float = np.nan) -> np.ndarray:
    """float32 [..., C]: mean prediction per cell, ``nodata`` where no window contributed."""
    out = np.full(sums.shape, nodata, dtype=np.float32)
    seen = counts > 0
    out[seen] = (sums[seen] / counts[seen][:, None]).astype(np.float32)
    return out


def multi_hot(probs: np.ndarray, threshold: float, nodata: int = 255) -> np.ndarray:
    """uint8 [..., C]: 1 where ``probs >= threshold``, 0 below, ``nodata`` where probs is NaN."""
    out = (probs >= threshold).astype(np.uint8)
    out[np.isnan(probs)] = nodata
    return out


class RowAccumulator:
    """Blends window predictions into output rows, holding only the rows still open.

    Windows arrive in row order (a band of windows at a time, in batches); `add` sums each
    window's probabilities into the cells it covers, `pop` blends (`blend`) and hands out the
    rows up to a limit the caller knows to be complete (no later window covers them), then
    forgets them. Memory: the open rows only, ``[rows, out_w, C]`` float64 sums and int counts.
    """

    def __init__(self, out_w: int, num_classes: int):
        self.out_w, self.num_classes = out_w, num_classes
        self.written = 0  # rows before this one were handed out by `pop`; sums[0] is this row
        self.sums = np.zeros((0, out_w, num_classes))
        self.counts = np.zeros((0, out_w), np.int64)

    def add(self, probs: np.ndarray, rows: tuple[np.ndarray, np.ndarray],
            cols: tuple[np.ndarray, np.ndarray]) -> None:
        """Adds windows' ``probs`` [n, C] over their (lo, hi) cell ranges ``rows``, ``cols``
        [n] (from `covered_cells`). ValueError for a window reaching rows already handed out."""
        if len(probs) == 0:
            return
        lo = int(np.min(rows[0]))
        if lo < self.written:
            raise ValueError(f"a window covers output row {lo}, already written (rows before "
                             f"{self.written} are)")
        grow = int(np.max(rows[1])) - self.written - len(self.sums)
        if grow > 0:
            self.sums = np.concatenate([self.sums, np.zeros((grow, *self.sums.shape[1:]))])
            self.counts = np.concatenate([self.counts, np.zeros((grow, self.out_w), np.int64)])
        accumulate(self.sums, self.counts, probs, rows, cols, row_base=self.written)

    def pop(self, limit: int) -> np.ndarray:
        """float32 [limit - written, out_w, C]: the blended rows ``written .. limit`` (NaN where
        no window contributed), then forgotten; empty when ``limit <= written``."""
        n = limit - self.written
        if n <= 0:
            return np.zeros((0, self.out_w, self.num_classes), np.float32)
        sums = np.zeros((n, self.out_w, self.num_classes))
        counts = np.zeros((n, self.out_w), np.int64)
        have = min(n, len(self.sums))
        sums[:have], counts[:have] = self.sums[:have], self.counts[:have]
        self.sums, self.counts = self.sums[have:].copy(), self.counts[have:].copy()
        self.written = limit
        return blend(sums, counts)
