"""A probability map against the truth: per-class average precision (AP) of a scene map's cells.

``python -m mosaic_jax map_accuracy --map maps/area.tif --reference
scenes/labels.tif [--output ap.json]`` (or ``predict --reference``) compares a map written by
`mosaic_jax.inference.predict` with a reference label raster on the scene's grid, such as the
one `data_builders.fake_scene` writes beside its synthetic scene (format:
`data_builders.reference_labels`: uint8 class index per pixel, 255 unlabelled or no data, the
class names in a tag).

A map cell covers ``stride x stride`` scene pixels; its truth is multi-hot: the classes present
in any of its pixels (BigEarthNet's rule for a patch, applied to a cell). Cells without data in
the map (NaN) or without a labelled pixel are left out. AP per class over the remaining cells
follows `mosaic_jax.evaluation.metrics` (scikit-learn's definition; NaN for a class no cell
has, left out of the mean). Memory: the reference raster and one class's mask at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_builders import atomic_files, cli, reference_labels
from mosaic_jax.evaluation.metrics import average_precision_per_class
from mosaic_jax.evaluation.tables import table_lines
from mosaic_jax.inference.scene_windows import output_length


def reference_cells(classes: np.ndarray, stride: int, num_classes: int,
                    nodata: int = reference_labels.NODATA) -> tuple[np.ndarray, np.ndarray]:
    """(truth bool [h, w, C], labelled bool [h, w]) of map cells of ``stride`` px over a class
    index raster ``classes`` [H, W] (``h = ceil(H / stride)``; the last cells may be cut by the
    edge): class c is true in a cell when a pixel of it is c; labelled when a pixel is not
    ``nodata``."""
    height, width = classes.shape
    h, w = output_length(height, stride), output_length(width, stride)
    padded = np.full((h * stride, w * stride), nodata, dtype=classes.dtype)
    padded[:height, :width] = classes
    blocks = padded.reshape(h, stride, w, stride)
    truth = np.zeros((h, w, num_classes), bool)
    for c in range(num_classes):
        truth[..., c] = (blocks == c).any(axis=(1, 3))
    return truth, (blocks != nodata).any(axis=(1, 3))


def cell_average_precision(probs: np.ndarray, truth: np.ndarray, labelled: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, int]:
    """(AP [C], positive cells [C], cells used) of a map ``probs`` [h, w, C] (NaN: no data)
    against `reference_cells`'s ``truth`` [h, w, C] and ``labelled`` [h, w]."""
    use = labelled & np.isfinite(probs).all(axis=-1)
    scores, labels = probs[use], truth[use]
    return average_precision_per_class(scores, labels), labels.sum(axis=0), int(use.sum())


def _stride_between(map_src: Any, ref_src: Any, map_path: str, ref_path: str) -> int:
    """The map's cell size in reference pixels; ValueError unless the map is the reference's
    grid coarsened by an integer factor (same CRS, origin and orientation)."""
    m, r = map_src.transform, ref_src.transform
    ratio = m.a / r.a if r.a else 0.0
    stride = round(ratio)
    expected = r @ r.scale(stride, stride) if stride >= 1 else None
    shape = (output_length(ref_src.height, max(stride, 1)),
             output_length(ref_src.width, max(stride, 1)))  # the map predict writes
    if (map_src.crs != ref_src.crs or stride < 1 or not math.isclose(ratio, stride)
            or not m.almost_equals(expected) or (map_src.height, map_src.width) != shape):
        raise ValueError(f"map {map_path} ({map_src.width} x {map_src.height} cells, {m}) is not "
                         f"the grid of reference {ref_path} ({ref_src.width} x {ref_src.height} "
                         f"px, {r}) coarsened by an integer stride; map the scene the reference "
                         "was written for")
    return stride


def evaluate_map(map_path: str, reference_path: str) -> dict[str, Any]:
    """Per-class AP of the map file against the reference file (module doc): a dict with
    ``class_names``, ``ap`` (None where undefined), ``positive_cells``, ``cells``,
    ``macro_ap`` (mean over defined APs), ``chance_ap`` and ``chance_macro_ap`` (the AP of a
    constant map: the share of cells with the class). Classes of the map the reference does
    not name get ``ap`` None. ValueError naming the files when the grids do not match."""
    import rasterio  # GDAL: only to read the files

    with rasterio.open(map_path) as msrc, rasterio.open(reference_path) as rsrc:
        stride = _stride_between(msrc, rsrc, map_path, reference_path)
        ref_names = reference_labels.class_names_of(rsrc.tags(), reference_path)
        map_names = [d or "" for d in msrc.descriptions]
        classes = rsrc.read(1)
        probs = np.moveaxis(msrc.read(), 0, -1).astype(np.float64)
    truth_all, labelled = reference_cells(classes, stride, len(ref_names))
    known = [n in ref_names for n in map_names]
    truth = np.zeros(probs.shape, bool)
    for i, name in enumerate(map_names):
        if known[i]:
            truth[..., i] = truth_all[..., ref_names.index(name)]
    ap, positives, cells = cell_average_precision(probs, truth, labelled)
    ap = np.where(known, ap, np.nan)
    defined = np.isfinite(ap)
    chance = np.where(defined, positives / max(cells, 1), np.nan)  # AP of a constant map
    return {"map": map_path, "reference": reference_path, "stride_px": stride,
            "class_names": map_names, "cells": cells,
            "ap": [None if not np.isfinite(a) else float(a) for a in ap],
            "positive_cells": [int(p) if k else None for p, k in zip(positives, known,
                                                                     strict=True)],
            "chance_ap": [float(c) if d else None for c, d in zip(chance, defined, strict=True)],
            "macro_ap": float(ap[defined].mean()) if defined.any() else None,
            "chance_macro_ap": float(chance[defined].mean()) if defined.any() else None}


def format_ap_table(result: dict[str, Any]) -> str:
    """Markdown table of `evaluate_map`'s result: class, positive cells, AP and the chance AP
    (a constant map's: the share of cells with the class); then the means."""

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    rows = [(name, "-" if pos is None else pos, fmt(ap), fmt(chance))
            for name, pos, ap, chance in zip(result["class_names"], result["positive_cells"],
                                             result["ap"], result["chance_ap"], strict=True)]
    rows.append(("**mean over classes with cells**", f"{result['cells']} cells",
                 fmt(result["macro_ap"]), fmt(result["chance_macro_ap"])))
    return "\n".join(table_lines(("class", "cells with it", "AP", "chance AP"), rows,
                                  ("left", "right", "right", "right")))


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.new_parser("python -m mosaic_jax map_accuracy", __doc__)
    parser.add_argument("--map", required=True, help="probability map written by predict")
    parser.add_argument("--reference", required=True,
                        help="reference class-index GeoTIFF on the scene's grid")
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)

    def work() -> dict[str, Any]:
        cli.check_input(args.map, "--map")
        cli.check_input(args.reference, "--reference")
        if args.output:
            cli.check_output(args.output)
        result = evaluate_map(args.map, args.reference)
        if args.output:
            atomic_files.write_atomic(args.output, json.dumps(result, indent=1))
        return result

    print(format_ap_table(cli.run(work, argv, paths=[args.output] if args.output else [])))


if __name__ == "__main__":
    main()
