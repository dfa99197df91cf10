"""A synthetic Sentinel-1/Sentinel-2 scene pair for `mosaic_jax.inference.predict`, built from fake
BigEarthNet v2 patches.

``python -m data_builders.fake_scene --s1 s1.tif --s2 s2.tif [--height 1200 --width 1800]
[--seed 0] [--nodata_edge 0]`` tiles `data_builders.fake_bigearthnet.synthesize_patch` patches
(learnable land cover, 120 px each) over a UTM grid (EPSG:32633, 10 m pixels) and writes:

- S2: uint16, the 12 BigEarthNet v2 L2A bands (B01..B12 without B10, reflectance x 10000) at
  10 m, the 20 m and 60 m bands nearest-upsampled by pixel repetition exactly as the dataset
  builder does, band descriptions = band names, GDAL nodata 0;
- S1: float32 VV, VH backscatter in dB, band descriptions = band names, no nodata value.

So the window at patch-grid position (i, j) is exactly a dataset example. ``--nodata_edge N``
blanks the last N columns (S2 0, S1 NaN), like the edge of an orbit's swath. Both files are
DEFLATE-compressed strips, written one row of patches at a time (memory is a few patch rows,
whatever the scene size) and atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from data_builders import atomic_files, cli
from data_builders.bigearthnet_v2.bigearthnet_v2 import (
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


def patch_row(rng: np.random.Generator, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One row of patches, cropped to ``width``: (s1 float32 [120, width, 2] dB, s2 uint16
    [120, width, 12] at 10 m)."""
    n = -(-width // PATCH_SIZE)
    s1 = np.empty((PATCH_SIZE, n * PATCH_SIZE, len(S1_BANDS)), np.float32)
    s2 = np.empty((PATCH_SIZE, n * PATCH_SIZE, len(S2_BANDS)), np.uint16)
    for j in range(n):
        patch = synthesize_patch(rng, unlabelled_probability=0.0)
        cols = slice(j * PATCH_SIZE, (j + 1) * PATCH_SIZE)
        s1[:, cols] = patch.s1
        for b, band in enumerate(S2_BANDS):
            f = PATCH_SIZE // S2_BAND_SIZE[band]
            s2[:, cols, b] = np.repeat(np.repeat(patch.s2[band], f, 0), f, 1)
    return s1[:, :width], s2[:, :width]


def write_fake_scene(s1_path: str | os.PathLike[str], s2_path: str | os.PathLike[str], *,
                     height: int = 1200, width: int = 1800, seed: int = 0,
                     nodata_edge: int = 0) -> dict[str, object]:
    """Writes the scene pair (module doc); returns its CRS, transform and shape."""
    import rasterio  # GDAL: only needed to write files
    from affine import Affine
    from rasterio.windows import Window

    if height < 1 or width < 1:
        raise ValueError(f"--height and --width must be >= 1, got {height} x {width}")
    if not 0 <= nodata_edge <= width:
        raise ValueError(f"--nodata_edge must be in [0, width={width}], got {nodata_edge}")
    rng = np.random.default_rng(seed)
    transform = Affine(PIXEL_METRES, 0.0, ORIGIN[0], 0.0, -PIXEL_METRES, ORIGIN[1])
    common = dict(driver="GTiff", height=height, width=width, crs=f"EPSG:{EPSG}",
                  transform=transform, compress="deflate", zlevel=1, tiled=False,
                  blockysize=16)
    with (atomic_files.atomic_path(s1_path) as t1, atomic_files.atomic_path(s2_path) as t2,
          rasterio.open(t1, "w", count=len(S1_BANDS), dtype="float32", **common) as f1,
          rasterio.open(t2, "w", count=len(S2_BANDS), dtype="uint16", nodata=0,
                        **common) as f2):
        f1.descriptions = S1_BANDS
        f2.descriptions = S2_BANDS
        for top in range(0, height, PATCH_SIZE):
            s1, s2 = patch_row(rng, width)
            rows = min(PATCH_SIZE, height - top)
            s1, s2 = s1[:rows], s2[:rows]
            if nodata_edge:
                s1[:, width - nodata_edge:] = np.nan
                s2[:, width - nodata_edge:] = 0
            window = Window(0, top, width, rows)
            f1.write(np.moveaxis(s1, -1, 0), window=window)
            f2.write(np.moveaxis(s2, -1, 0), window=window)
    return {"crs": f"EPSG:{EPSG}", "transform": tuple(transform)[:6], "shape": (height, width)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.new_parser("python -m data_builders.fake_scene", __doc__)
    parser.add_argument("--s1", required=True, help="output Sentinel-1 GeoTIFF")
    parser.add_argument("--s2", required=True, help="output Sentinel-2 GeoTIFF")
    parser.add_argument("--height", type=int, default=1200, help="rows (pixels of 10 m)")
    parser.add_argument("--width", type=int, default=1800, help="columns (pixels of 10 m)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nodata_edge", type=int, default=0,
                        help="blank this many columns at the right edge (no data)")
    args = parser.parse_args(argv)

    def work() -> dict:
        for flag, path in (("--s1", args.s1), ("--s2", args.s2)):
            cli.check_output(path, flag)
        return write_fake_scene(args.s1, args.s2, height=args.height, width=args.width,
                                seed=args.seed, nodata_edge=args.nodata_edge)

    geo = cli.run(work, argv, paths=[args.s1])
    print(f"Wrote a {args.height} x {args.width} px scene ({geo['crs']}, 10 m): "
          f"{os.path.abspath(args.s1)}, {os.path.abspath(args.s2)}")


if __name__ == "__main__":
    main()
