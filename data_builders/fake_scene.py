"""A synthetic Sentinel-1/Sentinel-2 scene pair for `mosaic_jax.inference.predict`, built from fake
BigEarthNet v2 patches.

``python -m data_builders.fake_scene --s1 s1.tif --s2 s2.tif [--reference labels.tif]
[--height 1200 --width 1800] [--seed 0] [--nodata_edge 0]`` tiles
`data_builders.fake_bigearthnet.synthesize_patch` patches over a UTM grid (EPSG:32633, 10 m
pixels). Each patch is a mosaic of 1 to 4 land-cover regions of known BigEarthNet v2 classes,
each region with its class's spectral signature, backscatter level and texture (the generator
of the fake dataset the demo model trains on), so a map of the scene can be checked against the
truth. It writes:

- S2: uint16, the 12 BigEarthNet v2 L2A bands (B01..B12 without B10, reflectance x 10000) at
  10 m, the 20 m and 60 m bands nearest-upsampled by pixel repetition exactly as the dataset
  builder does, band descriptions = band names, GDAL nodata 0;
- S1: float32 VV, VH backscatter in dB, band descriptions = band names, no nodata value;
- with ``--reference``, the truth: a reference label raster on the same pixel grid
  (`data_builders.reference_labels`: uint8 index of the pixel's class in BigEarthNet v2's 19
  classes, 255 where no data; the class names in its ``class_names`` tag).
  ``python -m mosaic_jax predict ... --reference labels.tif`` compares a map with it
  (`mosaic_jax.inference.map_accuracy`).

So the window at patch-grid position (i, j) is exactly a dataset example. ``--nodata_edge N``
blanks the last N columns (S2 0, S1 NaN, reference 255), like the edge of an orbit's swath. The
files are DEFLATE-compressed strips, written one row of patches at a time (memory is a few patch
rows, whatever the scene size) and atomically.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np

from data_builders import atomic_files, cli, reference_labels
from data_builders.bigearthnet_v2.bigearthnet_v2 import (
    CLASS_NAMES,
    PATCH_SIZE,
    S1_BANDS,
    S2_BAND_SIZE,
    S2_BANDS,
)
from data_builders.fake_bigearthnet import synthesize_patch

EPSG = 32633
ORIGIN = (399960.0, 5000040.0)
"""Upper-left corner (UTM 33N metres) of the fake scene."""
PIXEL_METRES = 10.0


def patch_row(rng: np.random.Generator, width: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row of patches, cropped to ``width``: (s1 float32 [120, width, 2] dB, s2 uint16
    [120, width, 12] at 10 m, classes uint8 [120, width]: each pixel's class index in
    `CLASS_NAMES`)."""
    n = -(-width // PATCH_SIZE)
    s1 = np.empty((PATCH_SIZE, n * PATCH_SIZE, len(S1_BANDS)), np.float32)
    s2 = np.empty((PATCH_SIZE, n * PATCH_SIZE, len(S2_BANDS)), np.uint16)
    classes = np.empty((PATCH_SIZE, n * PATCH_SIZE), np.uint8)
    for j in range(n):
        patch = synthesize_patch(rng, unlabelled_probability=0.0)
        cols = slice(j * PATCH_SIZE, (j + 1) * PATCH_SIZE)
        s1[:, cols] = patch.s1
        classes[:, cols] = patch.class_map
        for b, band in enumerate(S2_BANDS):
            f = PATCH_SIZE // S2_BAND_SIZE[band]
            s2[:, cols, b] = np.repeat(np.repeat(patch.s2[band], f, 0), f, 1)
    return s1[:, :width], s2[:, :width], classes[:, :width]


def write_fake_scene(s1_path: str | os.PathLike[str], s2_path: str | os.PathLike[str], *,
                     height: int = 1200, width: int = 1800, seed: int = 0,
                     nodata_edge: int = 0,
                     reference_path: str | os.PathLike[str] | None = None) -> dict[str, object]:
    """Writes the scene pair and, with `reference_path`, its reference labels (module doc);
    returns the CRS, transform and shape."""
    import rasterio  # GDAL: only needed to write files
    from affine import Affine
    from rasterio.windows import Window

    if height < 1 or width < 1:
        raise ValueError(f"--height and --width must be >= 1, got {height} x {width}")
    if not 0 <= nodata_edge <= width:
        raise ValueError(f"--nodata_edge must be in [0, width={width}], got {nodata_edge}")
    paths = [os.path.abspath(os.fspath(p)) for p in (s1_path, s2_path, reference_path) if p]
    if len(set(paths)) < len(paths):
        raise ValueError(f"--s1, --s2 and --reference must be three different files, got "
                         f"{s1_path}, {s2_path}, {reference_path}")
    rng = np.random.default_rng(seed)
    transform = Affine(PIXEL_METRES, 0.0, ORIGIN[0], 0.0, -PIXEL_METRES, ORIGIN[1])
    common = dict(driver="GTiff", height=height, width=width, crs=f"EPSG:{EPSG}",
                  transform=transform, compress="deflate", zlevel=1, tiled=False,
                  blockysize=16)
    with contextlib.ExitStack() as stack:
        files = []
        for path, bands, dtype, nodata in (
                (s1_path, S1_BANDS, "float32", None), (s2_path, S2_BANDS, "uint16", 0),
                (reference_path, (reference_labels.BAND_NAME,), "uint8", reference_labels.NODATA)):
            if path is None:
                continue
            tmp = stack.enter_context(atomic_files.atomic_path(path))
            f = stack.enter_context(rasterio.open(tmp, "w", count=len(bands), dtype=dtype,
                                                  nodata=nodata, **common))
            f.descriptions = tuple(bands)
            files.append(f)
        if reference_path is not None:
            files[2].update_tags(**reference_labels.class_names_tag(CLASS_NAMES))
        for top in range(0, height, PATCH_SIZE):
            rows = min(PATCH_SIZE, height - top)
            arrays = [a[:rows] for a in patch_row(rng, width)]
            if nodata_edge:
                for a, fill in zip(arrays, (np.nan, 0, reference_labels.NODATA), strict=True):
                    a[:, width - nodata_edge:] = fill
            arrays[2] = arrays[2][..., None]
            for f, a in zip(files, arrays, strict=False):
                f.write(np.moveaxis(a, -1, 0), window=Window(0, top, width, rows))
    return {"crs": f"EPSG:{EPSG}", "transform": tuple(transform)[:6], "shape": (height, width)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.new_parser("python -m data_builders.fake_scene", __doc__)
    parser.add_argument("--s1", required=True, help="output Sentinel-1 GeoTIFF")
    parser.add_argument("--s2", required=True, help="output Sentinel-2 GeoTIFF")
    parser.add_argument("--reference", default=None,
                        help="also write the reference labels here (class index GeoTIFF)")
    parser.add_argument("--height", type=int, default=1200, help="rows (pixels of 10 m)")
    parser.add_argument("--width", type=int, default=1800, help="columns (pixels of 10 m)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nodata_edge", type=int, default=0,
                        help="blank this many columns at the right edge (no data)")
    args = parser.parse_args(argv)

    def work() -> dict:
        for flag, path in (("--s1", args.s1), ("--s2", args.s2), ("--reference", args.reference)):
            if path:
                cli.check_output(path, flag)
        return write_fake_scene(args.s1, args.s2, height=args.height, width=args.width,
                                seed=args.seed, nodata_edge=args.nodata_edge,
                                reference_path=args.reference)

    geo = cli.run(work, argv, paths=[args.s1])
    print(f"Wrote a {args.height} x {args.width} px scene ({geo['crs']}, 10 m): "
          f"{os.path.abspath(args.s1)}, {os.path.abspath(args.s2)}")
    if args.reference:
        print(f"Reference labels (class index per pixel): {os.path.abspath(args.reference)}")


if __name__ == "__main__":
    main()
