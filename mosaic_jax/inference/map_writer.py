"""The writing side of scene mapping (`mosaic_jax.inference.predict`): a run's outputs, written
in a hidden folder and published so that the files on disk always belong together.

A run writes the probability map ``<output>`` and its companions, the labels
``<output>_labels.tif`` and the quick look ``<output>.png`` (`output_paths`). All of them are
made in one hidden temp folder beside a local output (``.<name>.predict-<pid>-*``; in the system
temp folder for a ``gs://`` output), then published in this order:

1. companions of an earlier run that are on disk are removed (they describe the old map);
2. the map is moved into place (one atomic rename, or one object upload);
3. the new companions are moved into place.

A run killed at any point leaves either the old map alone, or the new map with none, some or
all of its own companions: never a companion beside a map of another run. Every file carries
the run's id (GeoTIFF tag and PNG text ``MOSAIC_RUN``) so a reader can check. Temp folders of
killed runs (their process is gone) are removed by the next run writing the same output.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from etils import epath
from rasterio.windows import Window

from data_builders import atomic_files
from mosaic_jax.inference import scene_windows

LABEL_NODATA = 255
RUN_TAG = "MOSAIC_RUN"
"""GeoTIFF metadata tag and PNG text key holding the id of the run that wrote the file."""
_TEMP_MARK = ".predict-"


def replace_suffix(path: str, suffix: str) -> str:
    """``maps/a.tif`` -> ``maps/a<suffix>`` (also for gs:// paths)."""
    base, ext = os.path.splitext(path)
    return (base if ext.lower() in (".tif", ".tiff") else path) + suffix


def output_paths(output: str) -> dict[str, str]:
    """The files a run may write: ``map``, ``labels`` and ``quicklook`` paths."""
    return {"map": output, "labels": replace_suffix(output, "_labels.tif"),
            "quicklook": replace_suffix(output, ".png")}


def _identity(path: str) -> str:
    """A comparable form of a local path (symlinks resolved, ``~`` expanded) or a URL
    (``gs://`` and GDAL's ``/vsigs/`` spelled alike)."""
    p = os.fspath(path)
    if p.startswith("/vsigs/"):
        p = "gs://" + p[len("/vsigs/"):]
    if atomic_files.is_remote(p):
        return p
    return os.path.realpath(os.path.expanduser(p))


def check_outputs_spare_inputs(inputs: Mapping[str, str], outputs: Mapping[str, str]) -> None:
    """ValueError naming both paths when an output (``{"map": path, ...}``) is one of the
    ``inputs`` (``{"--s2": path, ...}``): the same path, through a symlink, a relative vs an
    absolute spelling or a hard link. Called before any work, so nothing is overwritten."""
    for out_key, out_path in outputs.items():
        out_id = _identity(out_path)
        for in_key, in_path in inputs.items():
            same = out_id == _identity(in_path)
            if not same and not atomic_files.is_remote(out_id) and os.path.exists(out_id):
                with contextlib.suppress(OSError):
                    same = os.path.samefile(out_id, _identity(in_path))
            if same:
                what = (f"--output {out_path}" if out_key == "map" else
                        f"the {out_key} file {out_path} of --output {outputs.get('map')}")
                raise ValueError(f"{what} would overwrite the {in_key} input {in_path} (the "
                                 "same file); choose another --output")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def temp_folder_parent(output: str) -> str:
    """Where a run's hidden temp folder goes: beside a local output (so publishing is a
    rename), the system temp folder for a URL."""
    if atomic_files.is_remote(output):
        return tempfile.gettempdir()
    return os.path.dirname(os.path.abspath(os.path.expanduser(output)))


def remove_stale_temp(output: str, log: Callable[[str], None] = print) -> list[str]:
    """Removes the temp folders of earlier runs writing `output` whose process is gone (killed
    before they cleaned up); returns their paths. Folders of live runs stay."""
    parent = temp_folder_parent(output)
    prefix = "." + os.path.basename(output) + _TEMP_MARK
    removed = []
    for folder in sorted(glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*"))):
        pid_text = os.path.basename(folder)[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or not os.path.isdir(folder) or _pid_alive(int(pid_text)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log(f"removed {folder}, left by a killed run writing {output}")
    return removed


def _to_cog(src_path: str, dst_path: str, resampling: str) -> None:
    """GDAL COG copy: 256 px tiles, DEFLATE, internal overviews with `resampling`."""
    with rasterio.open(src_path) as src:
        predictor = "FLOATING_POINT" if np.dtype(src.dtypes[0]).kind == "f" else "NO"
    rasterio.shutil.copy(src_path, dst_path, driver="COG", COMPRESS="DEFLATE",
                         PREDICTOR=predictor, BLOCKSIZE=256, OVERVIEWS="AUTO",
                         RESAMPLING=resampling)


def _remove(path: str) -> bool:
    """Deletes a local file or an object; whether there was one."""
    if atomic_files.is_remote(path):
        p = epath.Path(path)
        if not p.exists():
            return False
        p.unlink()
        return True
    try:
        os.remove(os.path.expanduser(path))
    except FileNotFoundError:
        return False
    return True


def _move(local: str, path: str) -> None:
    """Moves the finished file ``local`` to ``path`` atomically: one rename (same folder) with
    the permissions a plain ``open`` would give, or one object upload to a URL."""
    if atomic_files.is_remote(path):
        with open(local, "rb") as src, atomic_files.open_atomic(path) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(local, 0o666 & ~umask)
    os.replace(local, os.path.expanduser(path))


class MapWriter:
    """Writes a run's outputs row by row into its hidden temp folder, then publishes them.

    Args:
      output: the map path (local or ``gs://``).
      profile: rasterio profile of the map grid (driver GTiff, width, height, crs, transform).
      class_names: one band per class, named after it.
      labels_threshold: also write the multi-hot labels (1 where p >= it) when not None.
      run_id: written into every file (`RUN_TAG`).
    Use as a context manager: the temp folder goes when it exits, published or not.
    """

    def __init__(self, output: str, profile: Mapping[str, Any], class_names: Sequence[str], *,
                 labels_threshold: float | None, run_id: str,
                 log: Callable[[str], None] = print):
        self.output, self.paths, self.log = output, output_paths(output), log
        self.class_names, self.threshold, self.run_id = list(class_names), labels_threshold, run_id
        remove_stale_temp(output, log)
        parent = temp_folder_parent(output)
        os.makedirs(parent, exist_ok=True)
        prefix = "." + os.path.basename(output) + f"{_TEMP_MARK}{os.getpid()}-"
        self.folder = tempfile.mkdtemp(prefix=prefix, dir=parent)
        self.rows_written = 0
        self.class_sum = np.zeros(len(class_names))
        self.cells = 0
        self._files: dict[str, Any] = {}
        try:
            self._open_files(profile)
        except BaseException:
            self.__exit__()
            raise

    def _open_files(self, profile: Mapping[str, Any]) -> None:
        kinds = [("probs", "float32", np.nan)]
        if self.threshold is not None:
            kinds.append(("labels", "uint8", LABEL_NODATA))
        for name, dtype, nodata in kinds:
            f = rasterio.open(os.path.join(self.folder, f"{name}.tif"), "w",
                              count=len(self.class_names), dtype=dtype, nodata=nodata,
                              **{**profile, "compress": "deflate", "tiled": False,
                                 "blockysize": max(1, min(16, profile["height"]))})
            self._files[name] = f
            f.descriptions = tuple(self.class_names)
            f.update_tags(**{RUN_TAG: self.run_id})

    def __enter__(self) -> MapWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close_files()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def write_rows(self, probs: np.ndarray) -> None:
        """Writes the next output rows, probs float32 [n, W, C] (NaN: no data), and their
        labels; keeps the per-class sum over cells with data (for `mean_probability`)."""
        n = len(probs)
        if n == 0:
            return
        seen = ~np.isnan(probs).all(axis=-1)
        self.class_sum += probs[seen].sum(axis=0, dtype=np.float64)
        self.cells += int(seen.sum())
        window = Window(0, self.rows_written, probs.shape[1], n)
        self._files["probs"].write(np.moveaxis(probs, -1, 0), window=window)
        if "labels" in self._files:
            labels = scene_windows.multi_hot(probs, self.threshold, LABEL_NODATA)
            self._files["labels"].write(np.moveaxis(labels, -1, 0), window=window)
        self.rows_written += n

    def mean_probability(self) -> np.ndarray:
        """float64 [C]: mean probability per class over the cells with data so far."""
        return self.class_sum / max(self.cells, 1)

    def finish(self, quicklook: Callable[[str, str], None] | None) -> dict[str, str | None]:
        """Makes the COGs (and the quick look: ``quicklook(map_cog, png_path)``) in the temp
        folder, then publishes (module doc). Returns the published paths (None: not written)."""
        self._close_files()
        ready = {"map": os.path.join(self.folder, "probs_cog.tif")}
        _to_cog(os.path.join(self.folder, "probs.tif"), ready["map"], "AVERAGE")
        if self.threshold is not None:
            ready["labels"] = os.path.join(self.folder, "labels_cog.tif")
            _to_cog(os.path.join(self.folder, "labels.tif"), ready["labels"], "NEAREST")
        if quicklook is not None:
            ready["quicklook"] = os.path.join(self.folder, "quicklook.png")
            quicklook(ready["map"], ready["quicklook"])
        self.publish(ready)
        return {k: (self.paths[k] if k in ready else None) for k in self.paths}

    def publish(self, ready: Mapping[str, str]) -> None:
        """Moves the finished files ``ready`` (kind -> temp path) into place: stale companions
        removed first, the map next, its companions last (module doc)."""
        for kind in ("labels", "quicklook"):
            if _remove(self.paths[kind]) and kind not in ready:
                self.log(f"removed {self.paths[kind]}, the {kind} of the map this run replaces")
        _move(ready["map"], self.paths["map"])
        for kind in ("labels", "quicklook"):
            if kind in ready:
                _move(ready[kind], self.paths[kind])
