"""Land-cover probability maps of whole Sentinel-1/Sentinel-2 scenes with an exported model.

``python -m mosaic_jax predict --export OUT --s1 s1.tif --s2 s2.tif --output map.tif
(or ``--s1`` alone, ``--s2`` alone: a map from one modality, the other treated as missing)
[--stride 60] [--batch_size 256] [--min_valid 0.5] [--labels_threshold 0.5]`` slides windows of
the model's patch size (``model.json["input_size"]``) over the scene every ``--stride`` pixels,
runs them in batches through the exported embedder (`mosaic_jax.export.load_embedder`, no
training code) and blends overlapping predictions (mean per output cell; geometry in
`mosaic_jax.inference.scene_windows`).

Inputs: one GeoTIFF per modality (local path or ``gs://``, read through GDAL's ``/vsigs/``),
every band at the S2 10 m grid, in ``model.json``'s units (S1 backscatter in dB, S2 reflectance
x 10000). Bands are taken by name when the file's band descriptions name them (any order, extra
bands ignored), otherwise the file must hold exactly the model's bands in ``model.json``'s
order. S1 on another grid than S2 is resampled onto the S2 grid (bilinear, rasterio
``WarpedVRT``; ``--grid_mismatch error`` refuses instead). S1 that looks like linear power is
refused unless ``--s1_linear`` converts it to dB. Pixels with NaN, an S2 all-zero fill or the
file's nodata value are invalid: they are fed as the band mean, and windows with less than
``--min_valid`` valid pixels are skipped (their cells are nodata unless another window covers
them).

Output, on the S2 grid at the stride's resolution (pixel = ``stride`` input pixels, same CRS,
origin and orientation): a Cloud Optimized GeoTIFF (GDAL's COG driver: 256 px tiles, DEFLATE
with floating-point predictor, internal average overviews when the map is larger than one tile)
with one float32 band per class probability (band description = class name, nodata NaN); with
``--labels_threshold T`` a second COG ``<output>_labels.tif``, uint8 multi-hot (1 where p >= T,
0 below, 255 nodata, nearest overviews); and a quick-look PNG ``<output>.png`` of chosen classes.
Each file is written atomically (`mosaic_jax.atomic_files`). Reads and writes are windowed:
memory is bounded by the batch and one band of rows, not by the scene size.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from tqdm import tqdm

from data_builders import atomic_files
from mosaic_jax.export import load_embedder, load_model_info
from mosaic_jax.inference import scene_windows

LABEL_NODATA = 255
QUICKLOOK_MAX_SIDE = 1024
S1_LINEAR_SHARE = 0.95
"""S1 whose sampled values are >= 0 for more than this share looks like linear power."""


def gdal_path(path: str | os.PathLike[str]) -> str:
    """A path GDAL can open: ``gs://bucket/key`` -> ``/vsigs/bucket/key``; ``~`` expanded."""
    p = os.fspath(path)
    if p.startswith("gs://"):
        return "/vsigs/" + p[len("gs://"):]
    return os.path.expanduser(p)


def band_indexes(descriptions: Sequence[str | None], count: int, want: Sequence[str],
                 path: str, modality: str) -> list[int]:
    """1-based band indexes of the model's ``want`` bands in a file.

    With band descriptions, the bands are found by name (ValueError naming the file and the
    missing bands when some are absent); without, the file must have exactly ``len(want)``
    bands, taken in ``model.json``'s order.
    """
    names = [d.strip() if d else "" for d in descriptions]
    if any(names):
        missing = [b for b in want if b not in names]
        if missing:
            raise ValueError(f"{modality} file {path}: its band descriptions {names} do not name "
                             f"the model's band(s) {missing}; the model needs {list(want)}")
        return [names.index(b) + 1 for b in want]
    if count != len(want):
        raise ValueError(f"{modality} file {path} has {count} band(s) without descriptions; the "
                         f"model needs {len(want)}, in this order: {list(want)}")
    return list(range(1, count + 1))


def s1_units(sample: np.ndarray) -> tuple[str, float]:
    """("dB" or "linear", share of values >= 0) of finite S1 sample values.

    Backscatter in dB is almost all negative (BigEarthNet S1 means -12.6 dB VV, -19.4 dB VH);
    linear power (or amplitude) is never negative.
    """
    values = sample[np.isfinite(sample)]
    if values.size == 0:
        return "dB", 0.0
    share = float(np.mean(values >= 0))
    return ("linear" if share > S1_LINEAR_SHARE else "dB"), share


def to_db(linear: np.ndarray) -> np.ndarray:
    """float32 ``10 log10(x)``; NaN where ``x <= 0`` (no-data fill of linear products)."""
    x = np.asarray(linear, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 10.0 * np.log10(x)
    out[~(x > 0)] = np.nan
    return out.astype(np.float32)


def _sample_rows(src: Any, indexes: list[int], blocks: int = 8, rows: int = 16,
                 max_cols: int = 2048) -> np.ndarray:
    """A few evenly spaced row blocks of a raster (columns subsampled), float32 [c, r, w]."""
    step = max(1, src.width // max_cols)
    parts = []
    for top in np.linspace(0, max(src.height - rows, 0), blocks).astype(int):
        block = src.read(indexes, window=Window(0, int(top), src.width, min(rows, src.height)))
        parts.append(block[:, :, ::step].astype(np.float32))
    return np.concatenate(parts, axis=1)


def _same_grid(a: Any, b: Any) -> bool:
    return (a.crs == b.crs and (a.width, a.height) == (b.width, b.height)
            and a.transform.almost_equals(b.transform))


def _grid_text(src: Any) -> str:
    t = src.transform
    return (f"{src.width} x {src.height} px, {src.crs}, origin ({t.c:g}, {t.f:g}), "
            f"pixel {t.a:g} x {-t.e:g}")


def _pixel_km2(src: Any) -> float:
    """Area of one input pixel in km^2 (projected CRS: its linear units; geographic: degrees
    at the scene centre's latitude on a sphere of radius 6371 km)."""
    t = src.transform
    area = abs(t.a * t.e - t.b * t.d)
    if src.crs is not None and src.crs.is_geographic:
        lat = math.radians(src.xy(src.height / 2, src.width / 2)[1])
        deg = math.pi * 6371.0 / 180.0
        return area * deg * deg * math.cos(lat)
    factor = src.crs.linear_units_factor[1] if src.crs is not None else 1.0
    return area * factor * factor / 1e6


def _replace_suffix(path: str, suffix: str) -> str:
    """``maps/a.tif`` -> ``maps/a<suffix>`` (also for gs:// paths)."""
    base, ext = os.path.splitext(path)
    return (base if ext.lower() in (".tif", ".tiff") else path) + suffix


def _publish(local: str, path: str) -> None:
    """Moves the finished file ``local`` to ``path`` atomically: renamed beside a local path,
    uploaded as one object to a URL (the maps are small: scene size / stride^2)."""
    if atomic_files.is_remote(path):
        with open(local, "rb") as src, atomic_files.open_atomic(path) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return
    with atomic_files.atomic_path(path) as tmp:
        os.replace(local, tmp)


def _to_cog(src_path: str, dst_path: str, resampling: str) -> None:
    """GDAL COG copy: 256 px tiles, DEFLATE, internal overviews with `resampling`."""
    with rasterio.open(src_path) as src:
        predictor = "FLOATING_POINT" if np.dtype(src.dtypes[0]).kind == "f" else "NO"
    rasterio.shutil.copy(src_path, dst_path, driver="COG", COMPRESS="DEFLATE",
                         PREDICTOR=predictor, BLOCKSIZE=256, OVERVIEWS="AUTO",
                         RESAMPLING=resampling)


def write_quicklook(map_path: str, png_path: str, classes: Sequence[str],
                    class_names: Sequence[str], note: str = "") -> None:
    """PNG of the probability maps of `classes` (one panel each, 0..1 colour scale, nodata
    grey), read decimated to at most `QUICKLOOK_MAX_SIDE` px a side from the local map file;
    `note` (e.g. "from S1 alone (S2 missing)") becomes the figure's title."""
    from matplotlib import colormaps  # matplotlib: heavy, only for the quick-look picture
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with rasterio.open(map_path) as src:
        scale = max(1.0, max(src.height, src.width) / QUICKLOOK_MAX_SIDE)
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        idx = [list(class_names).index(c) + 1 for c in classes]
        data = src.read(idx, out_shape=(len(idx), *shape), resampling=Resampling.nearest)
    cols = len(classes)
    fig = Figure(figsize=(3.2 * cols + 1.0, 3.2 * shape[0] / shape[1] + 0.6), dpi=110,
                 layout="constrained")
    FigureCanvasAgg(fig)
    cmap = colormaps["viridis"].with_extremes(bad="0.6")
    image = None
    for i, name in enumerate(classes):
        ax = fig.add_subplot(1, cols, i + 1)
        image = ax.imshow(np.ma.masked_invalid(data[i]), cmap=cmap, vmin=0, vmax=1,
                          interpolation="nearest")
        ax.set_title(name if len(name) <= 32 else name[:30] + "...", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="probability")
    if note:
        fig.suptitle(f"Class probabilities {note}", fontsize=9)
    with atomic_files.open_atomic(png_path) as f:
        fig.savefig(f, format="png")


class AbsentModality:
    """Stands in for the file of a missing modality (``--s1`` or ``--s2`` alone): the grid of
    the present file ``like``, and reads that give the band means in file units (valid
    pixels, zeros once normalised). The embedder is called with None for this modality, so its
    values never reach the model."""

    def __init__(self, like: Any, spec: dict[str, Any]):
        self.crs, self.transform = like.crs, like.transform
        self.width, self.height = like.width, like.height
        self.xy = like.xy
        self.descriptions = tuple(spec["bands"])
        self.count = len(spec["bands"])
        self.dtypes = ("float32",) * self.count
        self.nodata = None
        self.mean = np.asarray(spec["mean"], np.float32)

    def read(self, indexes: list[int], window: Window) -> np.ndarray:
        """float32 [len(indexes), window rows, window cols] of the band means."""
        shape = (int(window.height), int(window.width))
        return np.stack([np.full(shape, self.mean[i - 1], np.float32) for i in indexes])


def _absent_aware(embed: Callable, s1_absent: bool, s2_absent: bool) -> Callable:
    """``embed(s1, s2)`` that passes None for the missing modality."""
    if not (s1_absent or s2_absent):
        return embed
    return lambda s1, s2: embed(None if s1_absent else s1, None if s2_absent else s2)


def predict_scene(export_dir: str, s1_path: str | None, s2_path: str | None, output: str, *,
                  stride: int | None = None, batch_size: int = 256, min_valid: float = 0.5,
                  labels_threshold: float | None = None,
                  quicklook_classes: Sequence[str] | None = None, quicklook: bool = True,
                  grid_mismatch: str = "resample", s1_linear: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Maps a scene with an export; writes the COG(s) and PNG the module doc lists.

    Args:
      export_dir: folder written by ``python -m mosaic_jax export``.
      s1_path, s2_path: the scene's GeoTIFFs (local or ``gs://``); one may be None (a map from
        the other modality alone, which the quick look's title says; the export must accept a
        missing modality, see `mosaic_jax.export.load_embedder`).
      output: probability map path (``.tif``; local or ``gs://``).
      stride: window step in input pixels, 1..patch size (default: half the patch size).
      batch_size: windows per embedder call (the last batch is padded).
      min_valid: windows with a smaller share of valid pixels are skipped (0..1).
      labels_threshold: if set (0..1), also writes the multi-hot label COG.
      quicklook_classes: class names for the PNG (default: the 3 with the highest mean).
      grid_mismatch: "resample" S1 onto the S2 grid, or "error".
      s1_linear: the S1 file holds linear power; converted to dB.

    Returns a summary: paths, grid, window counts, km^2, seconds per stage (``loop``: the
    windows' pass after the one compile; ``read``: waiting for the reader thread, which reads
    one band of rows ahead; ``host_share``: read + prepare + blend/write over ``loop``).
    """
    t_start = time.perf_counter()
    info = load_model_info(export_dir)
    size = int(info["input_size"])
    stride = size // 2 if stride is None else int(stride)
    if not 1 <= stride <= size:
        raise ValueError(f"--stride must be between 1 and the model's patch size {size}, "
                         f"got {stride}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= min_valid <= 1.0:
        raise ValueError(f"--min_valid must be in [0, 1], got {min_valid}")
    if labels_threshold is not None and not 0.0 <= labels_threshold <= 1.0:
        raise ValueError(f"--labels_threshold must be in [0, 1], got {labels_threshold}")
    if grid_mismatch not in ("resample", "error"):
        raise ValueError(f"--grid_mismatch must be 'resample' or 'error', got {grid_mismatch!r}")
    class_names = list(info["class_names"])
    for name in quicklook_classes or ():
        if name not in class_names:
            raise ValueError(f"--quicklook_classes: {name!r} is not a class of the export; "
                             f"classes: {class_names}")
    if s1_path is None and s2_path is None:
        raise ValueError("give --s1, --s2 or both")
    s1_linear = s1_linear and s1_path is not None
    embed = load_embedder(export_dir)  # refuses a diverged (non-finite) model
    embed = _absent_aware(embed, s1_path is None, s2_path is None)
    spec = {m: info["inputs"][m] for m in ("s1", "s2")}

    with contextlib.ExitStack() as stack:
        s2 = stack.enter_context(rasterio.open(gdal_path(s2_path))) if s2_path else None
        s1_file = stack.enter_context(rasterio.open(gdal_path(s1_path))) if s1_path else None
        s2 = s2 if s2 is not None else AbsentModality(s1_file, spec["s2"])
        s1_file = s1_file if s1_file is not None else AbsentModality(s2, spec["s1"])
        if s1_path is None or s2_path is None:  # the first call fails early when it cannot
            embed(*(np.zeros((1, size, size, len(spec[m]["bands"])), np.float32)
                    for m in ("s1", "s2")))
        s2_idx = band_indexes(s2.descriptions, s2.count, spec["s2"]["bands"], s2_path, "s2")
        s1_idx = band_indexes(s1_file.descriptions, s1_file.count, spec["s1"]["bands"],
                              s1_path, "s1")
        resampled = not _same_grid(s1_file, s2)
        if resampled:
            text = (f"S1 file {s1_path} ({_grid_text(s1_file)}) is not on the grid of S2 file "
                    f"{s2_path} ({_grid_text(s2)})")
            if grid_mismatch == "error":
                raise ValueError(text + "; resample it, or pass --grid_mismatch resample")
            float_s1 = np.dtype(s1_file.dtypes[0]).kind == "f"
            s1 = stack.enter_context(WarpedVRT(
                s1_file, crs=s2.crs, transform=s2.transform, width=s2.width, height=s2.height,
                resampling=Resampling.bilinear,
                nodata=np.nan if float_s1 else s1_file.nodata))
            log(text + ": resampling S1 onto the S2 grid (bilinear, WarpedVRT)")
        else:
            s1 = s1_file
        units, share = s1_units(_sample_rows(s1, s1_idx))
        if units == "linear" and not s1_linear:
            raise ValueError(
                f"S1 file {s1_path} looks like linear power, not dB ({share:.0%} of the sampled "
                "values are >= 0; dB backscatter is almost all negative): convert it with "
                "10 log10(x), or pass --s1_linear")
        if units == "dB" and s1_linear and share < 0.5:
            raise ValueError(f"--s1_linear, but S1 file {s1_path} looks like dB already "
                             f"({1 - share:.0%} of the sampled values are negative)")

        height, width = s2.height, s2.width
        scene_windows.check_geometry(height, size, stride, axis=f"S2 scene {s2_path} height")
        scene_windows.check_geometry(width, size, stride, axis=f"S2 scene {s2_path} width")
        row_offsets = scene_windows.window_offsets(height, size, stride)
        col_offsets = scene_windows.window_offsets(width, size, stride)
        row_cells = scene_windows.covered_cells(row_offsets, size, height, stride)
        col_cells = scene_windows.covered_cells(col_offsets, size, width, stride)
        out_h = scene_windows.output_length(height, stride)
        out_w = scene_windows.output_length(width, stride)
        num_classes = len(class_names)
        total_windows = len(row_offsets) * len(col_offsets)
        batch = min(batch_size, total_windows)
        pixel_km2 = _pixel_km2(s2)
        transform = s2.transform @ s2.transform.scale(stride, stride)
        s1_nodata = None if s1_linear else s1.nodata  # linear <= 0 becomes NaN in to_db
        s2_nodata = s2.nodata

        folder = None  # intermediate files beside a local output, in the system temp else
        if not atomic_files.is_remote(output):
            folder = os.path.dirname(os.path.abspath(os.path.expanduser(output)))
            os.makedirs(folder, exist_ok=True)
        tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix=".mosaic_predict_",
                                                                 dir=folder))
        profile = dict(driver="GTiff", width=out_w, height=out_h, crs=s2.crs,
                       transform=transform, compress="deflate", tiled=False,
                       blockysize=max(1, min(16, out_h)))
        probs_tmp = os.path.join(tmpdir, "probs.tif")
        dst = stack.enter_context(rasterio.open(probs_tmp, "w", count=num_classes,
                                                dtype="float32", nodata=np.nan, **profile))
        dst.descriptions = tuple(class_names)
        labels_dst = None
        if labels_threshold is not None:
            labels_tmp = os.path.join(tmpdir, "labels.tif")
            labels_dst = stack.enter_context(rasterio.open(
                labels_tmp, "w", count=num_classes, dtype="uint8", nodata=LABEL_NODATA,
                **profile))
            labels_dst.descriptions = tuple(class_names)

        c1, c2 = len(s1_idx), len(s2_idx)
        buffers = [(np.zeros((batch, size, size, c1), np.float32),
                    np.zeros((batch, size, size, c2), np.float32)) for _ in range(2)]
        timing = dict.fromkeys(("read", "prepare", "model", "blend_write"), 0.0)
        state = {"acc_base": 0, "sums": np.zeros((0, out_w, num_classes)),
                 "counts": np.zeros((0, out_w), np.int64), "written": 0,
                 "class_sum": np.zeros(num_classes), "cells": 0, "run": 0}

        def write_rows(limit: int) -> None:
            """Blends and writes output rows [written, limit) (all their windows are in)."""
            lo = state["written"]
            if limit <= lo:
                return
            base = state["acc_base"]
            have = max(0, min(limit, base + len(state["sums"])) - lo)
            sums = np.zeros((limit - lo, out_w, num_classes))
            counts = np.zeros((limit - lo, out_w), np.int64)
            sums[:have] = state["sums"][lo - base:lo - base + have]
            counts[:have] = state["counts"][lo - base:lo - base + have]
            probs = scene_windows.blend(sums, counts)
            seen = counts > 0
            state["class_sum"] += probs[seen].sum(axis=0, dtype=np.float64)
            state["cells"] += int(seen.sum())
            window = Window(0, lo, out_w, limit - lo)
            dst.write(np.moveaxis(probs, -1, 0), window=window)
            if labels_dst is not None:
                labels = scene_windows.multi_hot(probs, labels_threshold, LABEL_NODATA)
                labels_dst.write(np.moveaxis(labels, -1, 0), window=window)
            drop = max(0, limit - base)
            state["sums"] = state["sums"][drop:].copy()
            state["counts"] = state["counts"][drop:].copy()
            state["acc_base"] = base + drop
            state["written"] = limit

        def accumulate(probs: np.ndarray, meta: list[tuple[int, int, int, int]]) -> None:
            m = np.asarray(meta, dtype=np.int64)
            hi = int(m[:, 1].max())
            base = state["acc_base"]
            grow = hi - base - len(state["sums"])
            if grow > 0:
                state["sums"] = np.concatenate(
                    [state["sums"], np.zeros((grow, out_w, num_classes))])
                state["counts"] = np.concatenate(
                    [state["counts"], np.zeros((grow, out_w), np.int64)])
            scene_windows.accumulate(state["sums"], state["counts"], probs,
                                     (m[:, 0], m[:, 1]), (m[:, 2], m[:, 3]), row_base=base)

        def dispatch(slot: int, meta: list) -> tuple[Any, list, int]:
            t = time.perf_counter()
            out = embed(*buffers[slot])["probs"]  # asynchronous: fetched in finish()
            timing["model"] += time.perf_counter() - t
            return out, meta, slot

        def finish(pending: tuple[Any, list, int]) -> None:
            out, meta, _ = pending
            t = time.perf_counter()
            probs = np.asarray(jax.device_get(out))[:len(meta)]
            timing["model"] += time.perf_counter() - t
            t = time.perf_counter()
            accumulate(probs, [m[1:] for m in meta])
            timing["blend_write"] += time.perf_counter() - t
            state["run"] += len(meta)

        def first_open_band(pending: tuple | None, meta: list, next_band: int) -> int:
            bands = [next_band]
            if pending is not None and pending[1]:
                bands.append(pending[1][0][0])
            if meta:
                bands.append(meta[0][0])
            return min(bands)

        def flush_rows(pending: tuple | None, meta: list, next_band: int) -> None:
            band = first_open_band(pending, meta, next_band)
            limit = out_h if band >= len(row_offsets) else int(row_cells[0][band])
            t = time.perf_counter()
            write_rows(limit)
            timing["blend_write"] += time.perf_counter() - t

        t = time.perf_counter()  # compile for the batch shape before the timed loop
        jax.block_until_ready(embed(*buffers[0]))
        compile_seconds = time.perf_counter() - t
        t_loop = time.perf_counter()
        bar = tqdm(total=total_windows, unit="win", desc="mapping", disable=not progress,
                   dynamic_ncols=True)
        pending = None
        slot, meta = 0, []
        km2 = 0.0
        def read_band(r0: int) -> tuple[np.ndarray, np.ndarray]:
            window = Window(0, r0, width, size)
            return s1.read(s1_idx, window=window), s2.read(s2_idx, window=window)

        # One reader thread reads the next band of rows while this one is prepared and run
        # (GDAL releases the GIL); only that thread touches the files during the loop.
        reader = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        ahead = reader.submit(read_band, int(row_offsets[0]))
        for k, r0 in enumerate(row_offsets):
            t = time.perf_counter()
            x1, x2 = ahead.result()
            if k + 1 < len(row_offsets):
                ahead = reader.submit(read_band, int(row_offsets[k + 1]))
            timing["read"] += time.perf_counter() - t
            t = time.perf_counter()
            x1 = np.moveaxis(x1, 0, -1)
            x2 = np.moveaxis(x2, 0, -1)
            if s1_linear:
                x1 = to_db(x1)
            valid = scene_windows.valid_pixels(x1, x2, s1_nodata=s1_nodata, s2_nodata=s2_nodata)
            fractions = scene_windows.window_valid_fractions(valid, col_offsets, size)
            keep = np.flatnonzero(fractions >= min_valid) if min_valid > 0 else \
                np.flatnonzero(fractions > 0)
            if keep.size:
                n1 = scene_windows.normalise(x1, spec["s1"]["mean"], spec["s1"]["std"],
                                             spec["s1"].get("clip_db"))
                n2 = scene_windows.normalise(x2, spec["s2"]["mean"], spec["s2"]["std"])
                if not valid.all():
                    n1[~valid] = 0.0
                    n2[~valid] = 0.0
            timing["prepare"] += time.perf_counter() - t
            for j in keep:
                t = time.perf_counter()
                c0 = int(col_offsets[j])
                i = len(meta)
                buffers[slot][0][i] = n1[:, c0:c0 + size]
                buffers[slot][1][i] = n2[:, c0:c0 + size]
                meta.append((k, int(row_cells[0][k]), int(row_cells[1][k]),
                             int(col_cells[0][j]), int(col_cells[1][j])))
                timing["prepare"] += time.perf_counter() - t
                if len(meta) == batch:
                    launched = dispatch(slot, meta)
                    if pending is not None:
                        finish(pending)
                    pending, slot, meta = launched, 1 - slot, []
                    flush_rows(pending, meta, k)
            km2 += (size if k == 0 else int(r0 - row_offsets[k - 1])) * width * pixel_km2
            bar.update(len(col_offsets))
            bar.set_postfix(km2=f"{km2:,.1f}", refresh=False)
            flush_rows(pending, meta, k + 1)
        if meta:
            launched = dispatch(slot, meta)
            if pending is not None:
                finish(pending)
            pending = launched
        if pending is not None:
            finish(pending)
        flush_rows(None, [], len(row_offsets))
        bar.close()
        loop_seconds = time.perf_counter() - t_loop
        dst.close()
        if labels_dst is not None:
            labels_dst.close()

        t = time.perf_counter()
        probs_cog = os.path.join(tmpdir, "probs_cog.tif")
        _to_cog(probs_tmp, probs_cog, "AVERAGE")
        mean = state["class_sum"] / max(state["cells"], 1)
        chosen = list(quicklook_classes or [class_names[i] for i in np.argsort(-mean)[:3]])
        png_path = _replace_suffix(output, ".png") if quicklook else None
        alone = ("" if s1_path and s2_path else
                 "from S1 alone (S2 missing)" if s1_path else "from S2 alone (S1 missing)")
        if png_path:
            write_quicklook(probs_cog, png_path, chosen, class_names, note=alone)
        labels_path = None
        if labels_threshold is not None:
            labels_path = _replace_suffix(output, "_labels.tif")
            labels_cog = os.path.join(tmpdir, "labels_cog.tif")
            _to_cog(labels_tmp, labels_cog, "NEAREST")
            _publish(labels_cog, labels_path)
        _publish(probs_cog, output)
        timing["finish"] = time.perf_counter() - t
    host = timing["read"] + timing["prepare"] + timing["blend_write"]
    return {
        "output": output, "labels": labels_path, "quicklook": png_path,
        "quicklook_classes": chosen, "s1_resampled": resampled, "modalities_missing": alone,
        "scene_px": [height, width], "map_px": [out_h, out_w], "patch_px": size,
        "stride_px": stride, "windows": total_windows, "windows_run": state["run"],
        "windows_skipped": total_windows - state["run"], "km2": height * width * pixel_km2,
        "cells_with_data": state["cells"], "mean_probability": dict(zip(class_names, mean.tolist(),
                                                                         strict=True)),
        "seconds": {**timing, "compile": compile_seconds, "loop": loop_seconds,
                    "total": time.perf_counter() - t_start},
        "host_share": host / loop_seconds if loop_seconds > 0 else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mosaic_jax predict",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="folder written by mosaic_jax.export")
    parser.add_argument("--s1", default=None, help="Sentinel-1 GeoTIFF (dB), local or gs://; "
                        "alone (no --s2): a map from radar alone")
    parser.add_argument("--s2", default=None, help="Sentinel-2 GeoTIFF, local or gs://; alone "
                        "(no --s1): a map from optical alone")
    parser.add_argument("--output", required=True, help="probability map .tif, local or gs://")
    parser.add_argument("--stride", type=int, default=None,
                        help="window step in pixels (default: half the patch size)")
    parser.add_argument("--batch_size", type=int, default=256, help="windows per model call")
    parser.add_argument("--min_valid", type=float, default=0.5,
                        help="skip windows with a smaller share of valid pixels (0..1)")
    parser.add_argument("--labels_threshold", type=float, default=None,
                        help="also write <output>_labels.tif: 1 where probability >= this")
    parser.add_argument("--quicklook_classes", default="",
                        help="comma-separated class names for <output>.png (default: the 3 "
                             "with the highest mean probability)")
    parser.add_argument("--no_quicklook", action="store_true", help="do not write the PNG")
    parser.add_argument("--grid_mismatch", choices=("resample", "error"), default="resample",
                        help="S1 not on the S2 grid: resample it onto S2's, or stop")
    parser.add_argument("--s1_linear", action="store_true",
                        help="the S1 file holds linear power; convert it to dB")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.s1 is None and args.s2 is None:
        parser.error("give --s1, --s2 or both")
    classes = [c.strip() for c in args.quicklook_classes.split(",") if c.strip()]
    try:
        summary = predict_scene(
            args.export, args.s1, args.s2, args.output, stride=args.stride,
            batch_size=args.batch_size, min_valid=args.min_valid,
            labels_threshold=args.labels_threshold, quicklook_classes=classes or None,
            quicklook=not args.no_quicklook, grid_mismatch=args.grid_mismatch,
            s1_linear=args.s1_linear, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    s = summary["seconds"]
    print(f"Mapped {summary['scene_px'][0]} x {summary['scene_px'][1]} px "
          f"({summary['km2']:,.1f} km^2) in {s['total']:.1f} s: {summary['windows_run']} of "
          f"{summary['windows']} windows run ({summary['windows_skipped']} without enough "
          f"valid data), map {summary['map_px'][0]} x {summary['map_px'][1]} cells of "
          f"{summary['stride_px']} px -> {summary['output']}")
    if summary["modalities_missing"]:
        print(f"  the map is {summary['modalities_missing']}")
    for key in ("labels", "quicklook"):
        if summary[key]:
            print(f"  {key}: {summary[key]}")


if __name__ == "__main__":
    main()
