"""Land-cover probability maps of whole Sentinel-1/Sentinel-2 scenes with an exported model.

``python -m mosaic_jax predict --export OUT --s1 s1.tif --s2 s2.tif --output map.tif
(or ``--s1`` alone, ``--s2`` alone: a map from one modality, the other treated as missing)
[--stride 60] [--batch_size 256] [--min_valid 0.5] [--labels_threshold 0.5]
[--reference labels.tif]`` slides windows of the model's patch size (``model.json["input_size"]``)
over the scene every ``--stride`` pixels, runs them in batches through the exported embedder
(`mosaic_jax.export.load_embedder`, no training code) and blends overlapping predictions (mean
per output cell). Three units, each testable alone: `scene_reader.SceneReader` (bands of rows in
the model's units), `scene_windows.RowAccumulator` (the blend; geometry in
`mosaic_jax.inference.scene_windows`) and `map_writer.MapWriter` (the outputs); this module
checks the inputs and runs the windows through the model between them.

Inputs: one GeoTIFF per modality (local path or ``gs://``, read through GDAL's ``/vsigs/``),
every band at the S2 10 m grid, in ``model.json``'s units (S1 backscatter in dB, S2 reflectance
x 10000). Bands are taken by name when the file's band descriptions name them (any order, extra
bands ignored), otherwise the file must hold exactly the model's bands in ``model.json``'s
order. S1 on another grid than S2 is resampled onto the S2 grid (bilinear, rasterio
``WarpedVRT``; ``--grid_mismatch error`` refuses instead). Units are checked on a sample of rows
(`mosaic_jax.inference.input_units`): S1 that looks like linear power is refused unless
``--s1_linear`` converts it to dB; S2 as float reflectance in 0..1 is multiplied by 10000 (and
the run says so); S2 far outside the model's range (a scaled 8-bit picture) is refused naming
the band; so is a ``model.json`` with a std that is not positive. Pixels with NaN, an S2
all-zero fill or the file's nodata value are invalid: they are fed as the band mean, and windows
with less than ``--min_valid`` valid pixels are skipped (their cells are nodata unless another
window covers them).

Output, on the S2 grid at the stride's resolution (pixel = ``stride`` input pixels, same CRS,
origin and orientation): a Cloud Optimized GeoTIFF (GDAL's COG driver: 256 px tiles, DEFLATE
with floating-point predictor, internal average overviews when the map is larger than one tile)
with one float32 band per class probability (band description = class name, nodata NaN); with
``--labels_threshold T`` a second COG ``<output>_labels.tif``, uint8 multi-hot (1 where p >= T,
0 below, 255 nodata, nearest overviews); and a quick-look PNG ``<output>.png``
(`mosaic_jax.inference.quicklook`). An output that is one of the inputs is refused before any
work. The files are made in a hidden temp folder and published so that they always belong to
one run (`mosaic_jax.inference.map_writer`). Reads and writes are windowed: memory is bounded by
the batch and one band of rows, not by the scene size. With ``--reference`` the map's per-class
AP against a reference label raster is printed (`mosaic_jax.inference.map_accuracy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from tqdm import tqdm

from data_builders import cli
from mosaic_jax.export import (
    MODEL_FILE,
    load_embedder,
    load_model_info,
    untrained_absence_note,
)
from mosaic_jax.inference import input_units, map_accuracy, scene_windows
from mosaic_jax.inference.input_units import s1_units
from mosaic_jax.inference.map_writer import MapWriter, check_outputs_spare_inputs, output_paths
from mosaic_jax.inference.quicklook import title_lines, write_quicklook
from mosaic_jax.inference.scene_reader import AbsentModality, RowBand, SceneReader


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


def check_arguments(size: int, stride: int, batch_size: int, min_valid: float,
                    labels_threshold: float | None, grid_mismatch: str,
                    class_names: Sequence[str], quicklook_classes: Sequence[str] | None) -> None:
    """ValueError naming the option when an argument of `predict_scene` is out of range."""
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
    for name in quicklook_classes or ():
        if name not in class_names:
            raise ValueError(f"--quicklook_class: {name!r} is not a class of the export; "
                             f"classes: {list(class_names)}")


@dataclasses.dataclass(frozen=True)
class SceneInputs:
    """The opened scene: ``s1`` on the S2 grid (the file, or a resampling VRT), ``s2``, the
    1-based band indexes of the model's bands, whether S1 was resampled, the S2 factor into the
    model's units (`input_units.s2_scale`)."""

    s1: Any
    s2: Any
    s1_bands: list[int]
    s2_bands: list[int]
    s1_resampled: bool
    s2_scale: float


def _check_s1_units(s1: Any, bands: list[int], path: str, s1_linear: bool) -> None:
    units, share = s1_units(_sample_rows(s1, bands))
    if units == "linear" and not s1_linear:
        raise ValueError(
            f"S1 file {path} looks like linear power, not dB ({share:.0%} of the sampled "
            "values are >= 0; dB backscatter is almost all negative): convert it with "
            "10 log10(x), or pass --s1_linear")
    if units == "dB" and s1_linear and share < 0.5:
        raise ValueError(f"--s1_linear, but S1 file {path} looks like dB already "
                         f"({1 - share:.0%} of the sampled values are negative)")


def open_inputs(stack: contextlib.ExitStack, spec: dict[str, Any], s1_path: str | None,
                s2_path: str | None, *, grid_mismatch: str = "resample", s1_linear: bool = False,
                log: Callable[[str], None] = print) -> SceneInputs:
    """Opens the files (closed with `stack`), finds the model's bands, puts S1 on the S2 grid
    and checks the modalities' units against ``spec`` (``model.json["inputs"]``) on a sample
    of rows: ValueError naming the file otherwise. A modality without a path is an
    `AbsentModality` on the grid of the other one."""
    s2 = stack.enter_context(rasterio.open(gdal_path(s2_path))) if s2_path else None
    s1_file = stack.enter_context(rasterio.open(gdal_path(s1_path))) if s1_path else None
    s2 = s2 if s2 is not None else AbsentModality(s1_file, spec["s2"])
    s1_file = s1_file if s1_file is not None else AbsentModality(s2, spec["s1"])
    s2_idx = band_indexes(s2.descriptions, s2.count, spec["s2"]["bands"], s2_path, "s2")
    s1_idx = band_indexes(s1_file.descriptions, s1_file.count, spec["s1"]["bands"],
                          s1_path, "s1")
    resampled = not _same_grid(s1_file, s2)
    s1 = s1_file
    if resampled:
        text = (f"S1 file {s1_path} ({_grid_text(s1_file)}) is not on the grid of S2 file "
                f"{s2_path} ({_grid_text(s2)})")
        if grid_mismatch == "error":
            raise ValueError(text + "; resample it, or pass --grid_mismatch resample")
        float_s1 = np.dtype(s1_file.dtypes[0]).kind == "f"
        s1 = stack.enter_context(WarpedVRT(
            s1_file, crs=s2.crs, transform=s2.transform, width=s2.width, height=s2.height,
            resampling=Resampling.bilinear, nodata=np.nan if float_s1 else s1_file.nodata))
        log(text + ": resampling S1 onto the S2 grid (bilinear, WarpedVRT)")
    if s1_path:
        _check_s1_units(s1, s1_idx, s1_path, s1_linear)
    factor = 1.0
    if s2_path:
        factor = input_units.s2_scale(_sample_rows(s2, s2_idx), spec["s2"], s2_path,
                                      is_float=np.dtype(s2.dtypes[0]).kind == "f",
                                      nodata=s2.nodata)
    if factor != 1.0:
        log(input_units.describe_scale(s2_path, factor, spec["s2"]["units"]))
    return SceneInputs(s1, s2, s1_idx, s2_idx, resampled, factor)


@dataclasses.dataclass(frozen=True)
class WindowGrid:
    """Window offsets (pixels) along rows and columns, the (lo, hi) output cells each window
    covers (`scene_windows.covered_cells`) and the output size in cells."""

    rows: np.ndarray
    cols: np.ndarray
    row_cells: tuple[np.ndarray, np.ndarray]
    col_cells: tuple[np.ndarray, np.ndarray]
    out_h: int
    out_w: int

    @classmethod
    def of_scene(cls, height: int, width: int, size: int, stride: int,
                 name: str = "scene") -> WindowGrid:
        scene_windows.check_geometry(height, size, stride, axis=f"{name} height")
        scene_windows.check_geometry(width, size, stride, axis=f"{name} width")
        rows = scene_windows.window_offsets(height, size, stride)
        cols = scene_windows.window_offsets(width, size, stride)
        return cls(rows, cols, scene_windows.covered_cells(rows, size, height, stride),
                   scene_windows.covered_cells(cols, size, width, stride),
                   scene_windows.output_length(height, stride),
                   scene_windows.output_length(width, stride))

    def profile(self, like: Any, stride: int) -> dict[str, Any]:
        """rasterio profile of the output map: the grid of `like` (the S2 file) at `stride`."""
        return dict(driver="GTiff", width=self.out_w, height=self.out_h, crs=like.crs,
                    transform=like.transform @ like.transform.scale(stride, stride))

    def complete_rows(self, open_band: int) -> int:
        """Output rows before this one are final once every window of the bands before
        ``open_band`` is accumulated (no later window reaches them)."""
        return self.out_h if open_band >= len(self.rows) else int(self.row_cells[0][open_band])


class ModelPipeline:
    """Windows through the embedder in batches of ``batch``, two batches in flight (one filled
    while the device runs the other); finished predictions go into ``accumulator``
    (`scene_windows.RowAccumulator`). ``model_seconds``, ``blend_seconds``: time spent."""

    def __init__(self, embed: Callable[..., Any], batch: int, size: int, channels: tuple[int, int],
                 accumulator: scene_windows.RowAccumulator):
        self.embed, self.batch, self.accumulator = embed, batch, accumulator
        self.buffers = [tuple(np.zeros((batch, size, size, c), np.float32) for c in channels)
                        for _ in range(2)]
        self.slot, self.meta, self.pending = 0, [], None
        self.model_seconds = self.blend_seconds = 0.0
        self.windows_run = 0

    def compile(self) -> float:
        """Compiles for the batch shape (one call); its seconds."""
        t = time.perf_counter()
        jax.block_until_ready(self.embed(*self.buffers[0]))
        return time.perf_counter() - t

    def add(self, s1: np.ndarray, s2: np.ndarray, cells: tuple[int, int, int, int, int]) -> None:
        """Queues one normalised window (s1 [S, S, c1], s2 [S, S, c2]); ``cells``: (band,
        row lo, row hi, col lo, col hi). Runs the batch when it is full."""
        i = len(self.meta)
        self.buffers[self.slot][0][i] = s1
        self.buffers[self.slot][1][i] = s2
        self.meta.append(cells)
        if len(self.meta) == self.batch:
            self._launch()

    def _launch(self) -> None:
        t = time.perf_counter()
        launched = (self.embed(*self.buffers[self.slot])["probs"], self.meta)  # asynchronous
        self.model_seconds += time.perf_counter() - t
        if self.pending is not None:
            self._finish(self.pending)
        self.pending, self.slot, self.meta = launched, 1 - self.slot, []

    def _finish(self, pending: tuple[Any, list]) -> None:
        out, meta = pending
        t = time.perf_counter()
        probs = np.asarray(jax.device_get(out))[:len(meta)]
        self.model_seconds += time.perf_counter() - t
        t = time.perf_counter()
        m = np.asarray(meta, dtype=np.int64)
        self.accumulator.add(probs, (m[:, 1], m[:, 2]), (m[:, 3], m[:, 4]))
        self.blend_seconds += time.perf_counter() - t
        self.windows_run += len(meta)

    def drain(self) -> None:
        """Runs the last (partial) batch and waits for every prediction."""
        if self.meta:
            self._launch()
        if self.pending is not None:
            self._finish(self.pending)
            self.pending = None

    def first_open_band(self, next_band: int) -> int:
        """The first band with windows not accumulated yet (``next_band``: not read yet)."""
        bands = [next_band] + [meta[0][0] for meta in (self.meta, self.pending and
                                                        self.pending[1]) if meta]
        return min(bands)


def _normalised(band: RowBand, spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    n1 = scene_windows.normalise(band.s1, spec["s1"]["mean"], spec["s1"]["std"],
                                 spec["s1"].get("clip_db"))
    n2 = scene_windows.normalise(band.s2, spec["s2"]["mean"], spec["s2"]["std"])
    if not band.valid.all():  # invalid pixels are fed as the band mean
        n1[~band.valid] = 0.0
        n2[~band.valid] = 0.0
    return n1, n2


def map_windows(reader: SceneReader, grid: WindowGrid, pipeline: ModelPipeline,
                writer: MapWriter, spec: dict[str, Any], *, size: int, min_valid: float,
                bar: Any = None, row_km2: float = 0.0) -> dict[str, float]:
    """The windows' pass: reads each band of rows, queues its windows with enough valid pixels,
    writes the output rows no later window reaches. Returns seconds per host stage. ``bar``: a
    tqdm bar advanced per window, its postfix the km^2 covered (``row_km2`` per pixel row)."""
    seconds = {"prepare": 0.0, "blend_write": 0.0}

    def flush(next_band: int) -> None:
        t = time.perf_counter()
        limit = grid.complete_rows(pipeline.first_open_band(next_band))
        writer.write_rows(pipeline.accumulator.pop(limit))
        seconds["blend_write"] += time.perf_counter() - t

    for k, band in enumerate(reader.bands(grid.rows)):
        t = time.perf_counter()
        fractions = scene_windows.window_valid_fractions(band.valid, grid.cols, size)
        keep = np.flatnonzero(fractions >= min_valid if min_valid > 0 else fractions > 0)
        if keep.size:
            n1, n2 = _normalised(band, spec)
        seconds["prepare"] += time.perf_counter() - t
        for j in keep:
            c0 = int(grid.cols[j])
            pipeline.add(n1[:, c0:c0 + size], n2[:, c0:c0 + size],
                         (k, int(grid.row_cells[0][k]), int(grid.row_cells[1][k]),
                          int(grid.col_cells[0][j]), int(grid.col_cells[1][j])))
        if bar is not None:
            bar.update(len(grid.cols))
            bar.set_postfix(km2=f"{(int(grid.rows[k]) + size) * row_km2:,.1f}", refresh=False)
        flush(k + 1)
    pipeline.drain()
    flush(len(grid.rows))
    return seconds


def window_pass(scene: SceneInputs, grid: WindowGrid, embed: Callable[..., Any],
                writer: MapWriter, spec: dict[str, Any], *, size: int, batch_size: int,
                min_valid: float, s1_linear: bool, progress: bool
                ) -> tuple[ModelPipeline, dict[str, float]]:
    """Compiles the embedder for the batch, then runs `map_windows` with a `SceneReader` of
    the scene; (the pipeline, seconds per stage: read, prepare, model, blend_write, compile,
    loop)."""
    total = len(grid.rows) * len(grid.cols)
    reader = SceneReader(scene.s1, scene.s2, scene.s1_bands, scene.s2_bands, size,
                         s1_linear=s1_linear, s2_scale=scene.s2_scale)
    pipeline = ModelPipeline(embed, min(batch_size, total), size,
                             (len(scene.s1_bands), len(scene.s2_bands)),
                             scene_windows.RowAccumulator(grid.out_w, len(writer.class_names)))
    compile_seconds = pipeline.compile()
    t_loop = time.perf_counter()
    with tqdm(total=total, unit="win", desc="mapping", disable=not progress,
              dynamic_ncols=True) as bar:
        host = map_windows(reader, grid, pipeline, writer, spec, size=size,
                           min_valid=min_valid, bar=bar,
                           row_km2=scene.s2.width * _pixel_km2(scene.s2))
    return pipeline, {"read": reader.wait_seconds, "prepare": host["prepare"],
                      "model": pipeline.model_seconds,
                      "blend_write": host["blend_write"] + pipeline.blend_seconds,
                      "compile": compile_seconds, "loop": time.perf_counter() - t_loop}


def _check_files(export_dir: str, info: dict[str, Any], inputs: dict[str, str | None],
                 output: str) -> None:
    """Before any work: a scene to map, model.json's normalisation usable, no output that is
    an input."""
    if inputs["--s1"] is None and inputs["--s2"] is None:
        raise ValueError("give --s1, --s2 or both")
    input_units.check_normalisation(info, os.path.join(export_dir, MODEL_FILE))
    check_outputs_spare_inputs({k: v for k, v in inputs.items() if v}, output_paths(output))


def _embedder(export_dir: str, info: dict[str, Any], s1_path: str | None,
              s2_path: str | None, log: Callable[[str], None]) -> Callable[..., Any]:
    """The export's embedder (`load_embedder` refuses a diverged model). With a modality
    missing, ``embed(s1, s2)`` passes None for it, and is tried once on zeros so that an export
    that cannot take a missing modality fails before any work; a model trained without
    modality dropout is warned about (`untrained_absence_note`)."""
    embed = load_embedder(export_dir)
    if s1_path and s2_path:
        return embed
    note = untrained_absence_note(info, "s2" if s1_path else "s1")
    if note:
        log(note)
    size = int(info["input_size"])
    embed(*(np.zeros((1, size, size, len(info["inputs"][m]["bands"])), np.float32)
            if path else None for m, path in (("s1", s1_path), ("s2", s2_path))))
    return lambda s1, s2: embed(s1 if s1_path else None, s2 if s2_path else None)


def _missing_text(s1_path: str | None, s2_path: str | None) -> str:
    """What a map from one modality is made from (the summary, the quick look); empty with
    both modalities."""
    if s1_path and s2_path:
        return ""
    return "from S1 alone (S2 missing)" if s1_path else "from S2 alone (S1 missing)"


def _scene_name(s1_path: str | None, s2_path: str | None, alone: str) -> str:
    """The quick look's scene: the files' names, and what is missing."""
    files = " + ".join(os.path.basename(p) for p in (s2_path, s1_path) if p)
    return f"{files} ({alone})" if alone else files


def _export_name(export_dir: str, info: dict[str, Any]) -> str:
    name = os.path.basename(os.path.normpath(export_dir))
    return f"{name} ({info.get('objective', '?')}, {info.get('dataset', '?')})"


def predict_scene(export_dir: str, s1_path: str | None, s2_path: str | None, output: str, *,
                  stride: int | None = None, batch_size: int = 256, min_valid: float = 0.5,
                  labels_threshold: float | None = None,
                  quicklook_classes: Sequence[str] | None = None, quicklook: bool = True,
                  quicklook_note: str | None = None, grid_mismatch: str = "resample",
                  s1_linear: bool = False, reference: str | None = None,
                  progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Maps a scene with an export; writes the COG(s) and PNG the module doc lists.

    Args:
      export_dir: folder written by ``python -m mosaic_jax export``.
      s1_path, s2_path: the scene's GeoTIFFs (local or ``gs://``); one may be None: a map from
        the other modality alone (`mosaic_jax.export.load_embedder` with None).
      output: probability map path (``.tif``; local or ``gs://``), none of its files an input.
      stride: window step in input pixels, 1..patch size (default: half the patch size).
      batch_size: windows per embedder call (the last batch is padded).
      min_valid: windows with a smaller share of valid pixels are skipped (0..1).
      labels_threshold: if set (0..1), also writes the multi-hot label COG.
      quicklook_classes: class names for the PNG (default: the 3 with the highest mean).
      quicklook_note: a free text line under the quick look's title (e.g. the modalities).
      grid_mismatch: "resample" S1 onto the S2 grid, or "error".
      s1_linear: the S1 file holds linear power; converted to dB.
      reference: a reference class-index GeoTIFF on the S2 grid (`data_builders.fake_scene`):
        the summary gets the map's per-class AP against it (`map_accuracy.evaluate_map`).

    Returns a summary: paths, grid, window counts, km^2, seconds per stage (``loop``: the pass
    after the one compile; ``read``: waiting for the read-ahead thread; ``host_share``: read +
    prepare + blend/write over ``loop``).
    """
    t_start = time.perf_counter()
    info = load_model_info(export_dir)
    size = int(info["input_size"])
    stride = size // 2 if stride is None else int(stride)
    class_names = list(info["class_names"])
    check_arguments(size, stride, batch_size, min_valid, labels_threshold, grid_mismatch,
                    class_names, quicklook_classes)
    _check_files(export_dir, info, {"--s1": s1_path, "--s2": s2_path, "--reference": reference},
                 output)
    s1_linear = s1_linear and s1_path is not None
    embed = _embedder(export_dir, info, s1_path, s2_path, log)
    spec = {m: info["inputs"][m] for m in ("s1", "s2")}
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
    alone = _missing_text(s1_path, s2_path)
    with contextlib.ExitStack() as stack:
        scene = open_inputs(stack, spec, s1_path, s2_path, grid_mismatch=grid_mismatch,
                            s1_linear=s1_linear, log=log)
        height, width = scene.s2.height, scene.s2.width
        grid = WindowGrid.of_scene(height, width, size, stride, name=(
            f"S2 scene {s2_path}" if s2_path else f"S1 scene {s1_path}"))
        total = len(grid.rows) * len(grid.cols)
        writer = stack.enter_context(MapWriter(output, grid.profile(scene.s2, stride),
                                               class_names, log=log,
                                               labels_threshold=labels_threshold, run_id=run_id))
        pipeline, timing = window_pass(scene, grid, embed, writer, spec, size=size,
                                       batch_size=batch_size, min_valid=min_valid,
                                       s1_linear=s1_linear, progress=progress)
        t = time.perf_counter()
        mean = writer.mean_probability()
        chosen = list(quicklook_classes or [class_names[i] for i in np.argsort(-mean)[:3]])
        title = title_lines(_scene_name(s1_path, s2_path, alone),
                            _export_name(export_dir, info), quicklook_note)
        paths = writer.finish(functools.partial(
            write_quicklook, classes=chosen, class_names=class_names, title=title,
            run_id=run_id) if quicklook else None)
        timing["finish"] = time.perf_counter() - t
        pixel_km2 = _pixel_km2(scene.s2)
    timing["total"] = time.perf_counter() - t_start
    summary = {
        "output": output, "labels": paths["labels"], "quicklook": paths["quicklook"],
        "run_id": run_id, "quicklook_classes": chosen, "s1_resampled": scene.s1_resampled,
        "modalities_missing": alone, "s2_scale": scene.s2_scale, "scene_px": [height, width],
        "map_px": [grid.out_h, grid.out_w], "patch_px": size, "stride_px": stride,
        "windows": total, "windows_run": pipeline.windows_run,
        "windows_skipped": total - pipeline.windows_run, "km2": height * width * pixel_km2,
        "cells_with_data": writer.cells,
        "mean_probability": dict(zip(class_names, mean.tolist(), strict=True)),
        "seconds": timing, "host_share": _host_share(timing)}
    if reference:
        summary["reference"] = map_accuracy.evaluate_map(gdal_path(output), gdal_path(reference))
    return summary


def _host_share(seconds: dict[str, float]) -> float:
    """Share of the windows' pass spent on the host: read + prepare + blend/write over loop."""
    host = seconds["read"] + seconds["prepare"] + seconds["blend_write"]
    return host / seconds["loop"] if seconds["loop"] > 0 else 0.0


def _check_raster(path: str, flag: str) -> None:
    """Raises before any work when the input `path` of `flag` is missing, a folder, empty, not
    a raster GDAL reads, or a `gs://` object that cannot be read; the error names flag and
    path (GDAL's own message does not always name the file)."""
    cli.check_input(path, flag)
    try:
        with rasterio.open(gdal_path(path)) as src:
            # The last pixel lies in the file's last block: a truncated file fails here, not
            # after minutes of mapping (GDAL reads missing header tags as absent).
            src.read(1, window=Window(src.width - 1, src.height - 1, 1, 1))
            crs = src.crs
    except rasterio.errors.RasterioIOError as e:
        detail = " ".join(str(e.__cause__ or e).split())  # "Read failed" names its cause
        raise OSError(f"{flag} {path} cannot be read as a GeoTIFF: {detail}") from e
    if crs is None:
        raise ValueError(f"{flag} {path} has no coordinate reference system: not a "
                         "georeferenced GeoTIFF (or a truncated one)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.new_parser("python -m mosaic_jax predict", __doc__)
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
    parser.add_argument("--quicklook_class", action="append", default=[], metavar="NAME",
                        help="a class shown in <output>.png, its name whole (BigEarthNet "
                             "names hold commas: quote it); repeat for one panel each "
                             "(default: the 3 with the highest mean probability)")
    parser.add_argument("--no_quicklook", action="store_true", help="do not write the PNG")
    parser.add_argument("--grid_mismatch", choices=("resample", "error"), default="resample",
                        help="S1 not on the S2 grid: resample it onto S2's, or stop")
    parser.add_argument("--s1_linear", action="store_true",
                        help="the S1 file holds linear power; convert it to dB")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--reference", default=None,
                        help="reference class-index GeoTIFF on the S2 grid (data_builders."
                             "fake_scene --reference): print the map's per-class AP against it")
    args = parser.parse_args(argv)
    classes = [c.strip() for c in args.quicklook_class if c.strip()]

    def work() -> dict[str, Any]:
        if args.s1 is None and args.s2 is None:
            raise cli.UsageError("give --s1, --s2 or both")
        for flag, path in (("--s1", args.s1), ("--s2", args.s2)):
            if path is not None:
                _check_raster(path, flag)
        cli.check_output(args.output)
        return predict_scene(
            args.export, args.s1, args.s2, args.output, stride=args.stride,
            batch_size=args.batch_size, min_valid=args.min_valid,
            labels_threshold=args.labels_threshold, quicklook_classes=classes or None,
            quicklook=not args.no_quicklook, grid_mismatch=args.grid_mismatch,
            s1_linear=args.s1_linear, reference=args.reference,
            progress=not args.no_progress)

    summary = cli.run(work, argv, paths=[args.output])
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
    if args.reference:
        print(f"The map against {args.reference}, per output cell:")
        print(map_accuracy.format_ap_table(summary["reference"]))


if __name__ == "__main__":
    main()
