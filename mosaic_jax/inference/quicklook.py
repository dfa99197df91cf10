"""The quick-look picture of a probability map (`mosaic_jax.inference.predict`'s ``<output>.png``).

One PNG that says what it shows: a title with the scene's file name and the export (plus a free
text line, e.g. the modalities mapped), a colour composite of up to three classes (red, green,
blue = their probabilities), one panel per chosen class (0..1 colour scale) and a legend of the
composite's class colours and of the grey of cells without data (windows skipped for too few
valid pixels; hatched in the composite, where probabilities near 0.5 are grey too). The map
is read decimated to at most `QUICKLOOK_MAX_SIDE` px a side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling

from data_builders import atomic_files

QUICKLOOK_MAX_SIDE = 1024
NODATA_GREY = 0.6
"""Grey level (0 black .. 1 white) of cells without data, in every panel."""
COMPOSITE_COLOURS = ("red", "green", "blue")


def _short(name: str, limit: int = 32) -> str:
    return name if len(name) <= limit else name[:limit - 2] + "..."


def composite(data: np.ndarray) -> np.ndarray:
    """float32 [h, w, 3] RGB of up to three probability maps ``data`` [k, h, w] (k <= 3; the
    missing channels 0), clipped to 0..1; `NODATA_GREY` where every map is NaN."""
    h, w = data.shape[1:]
    rgb = np.zeros((h, w, 3), np.float32)
    k = min(3, len(data))
    rgb[..., :k] = np.moveaxis(np.nan_to_num(data[:k], nan=0.0), 0, -1).clip(0, 1)
    rgb[np.isnan(data).all(axis=0)] = NODATA_GREY
    return rgb


def _hatch(ax: Any, mask: np.ndarray) -> None:
    """Hatches the cells of ``mask`` [h, w] on an image axis (contours of the mask repeated
    ``k`` times a side, so the outline follows the cell edges)."""
    if not mask.any():
        return
    k = max(1, min(4, 2048 // max(mask.shape)))
    fine = np.kron(mask.astype(np.float32), np.ones((k, k), np.float32))
    ys = (np.arange(fine.shape[0]) + 0.5) / k - 0.5
    xs = (np.arange(fine.shape[1]) + 0.5) / k - 0.5
    ax.contourf(xs, ys, fine, levels=[0.5, 1.5], colors="none", hatches=["//"])


def title_lines(scene: str, export: str, note: str | None = None) -> list[str]:
    """The quick look's title: ``scene: <file name>``, ``model: <export>``, then `note`."""
    return [f"scene: {scene}   model: {export}", *([note] if note else [])]


def write_quicklook(map_path: str, png_path: str, classes: Sequence[str],
                    class_names: Sequence[str], *, title: Sequence[str] = (),
                    run_id: str | None = None) -> None:
    """Writes the PNG (module doc) of the local map file `map_path` to `png_path` (atomically).

    ``classes``: the classes to show (the first three also in the composite); ``title``: lines
    on top; ``run_id``: stored as the PNG text ``MOSAIC_RUN``.
    """
    from matplotlib import colormaps  # matplotlib: heavy, only for the quick-look picture
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    with rasterio.open(map_path) as src:
        scale = max(1.0, max(src.height, src.width) / QUICKLOOK_MAX_SIDE)
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        idx = [list(class_names).index(c) + 1 for c in classes]
        data = src.read(idx, out_shape=(len(idx), *shape), resampling=Resampling.nearest)
    cols = len(classes) + 1
    fig = Figure(figsize=(3.2 * cols + 1.0, 3.2 * shape[0] / shape[1] + 1.4 + 0.2 * len(title)),
                 dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle("\n".join(title), fontsize=9)
    ax = fig.add_subplot(1, cols, 1)
    ax.imshow(composite(data), interpolation="nearest")
    _hatch(ax, np.isnan(data).all(axis=0))
    ax.set_title("composite", fontsize=8)
    cmap = colormaps["viridis"].with_extremes(bad=str(NODATA_GREY))
    image = None
    for i, name in enumerate(classes):
        ax_i = fig.add_subplot(1, cols, i + 2)
        image = ax_i.imshow(np.ma.masked_invalid(data[i]), cmap=cmap, vmin=0, vmax=1,
                            interpolation="nearest")
        ax_i.set_title(_short(name), fontsize=8)
    for a in fig.axes:
        a.set_xticks([])
        a.set_yticks([])
    fig.colorbar(image, ax=fig.axes[1:], shrink=0.8, label="probability")
    handles = [Patch(color=c, label=f"{c}: {_short(name, 40)}")
               for c, name in zip(COMPOSITE_COLOURS, classes, strict=False)]
    handles.append(Patch(facecolor=str(NODATA_GREY), hatch="//", label="grey: no data"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)),
               fontsize=7, frameon=False)
    metadata = {"MOSAIC_RUN": run_id} if run_id else None
    with atomic_files.open_atomic(png_path) as f:
        fig.savefig(f, format="png", metadata=metadata)
