"""A small, faithful fake of the extracted SEN12MS archives, for tests and dry runs.

Writes real GeoTIFFs in the official layout and naming with the official dtypes and band counts
(S1 float32 VV/VH dB, S2 uint16 13 bands, LC uint16 4 bands), a UTM CRS per scene and 10 m
geotransforms::

    root/ROIs1158_spring/{s1,s2,lc}_<scene>/ROIs1158_spring_{s1,s2,lc}_<scene>_p<patch>.tif

The default scenes cover all three splits of the `sen12ms` builder (one official hold-out scene,
one hashed validation scene, two train scenes) and the known broken triplet (summer scene 146
patch 202, NaN in S1). Pixel content is random but plausible; the IGBP band is blocky (like MODIS
500 m pixels resampled to 10 m) with 1 to 4 dominant classes plus scattered pixels of others, so
labels vary between patches and some classes sit below the 0.1 threshold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from data_builders.geotiff import write_tiff
from data_builders.sen12ms.sen12ms import (
    BROKEN_TRIPLETS,
    LC_BANDS,
    S1_BANDS,
    S2_BANDS,
    SEASON_DIRS,
    file_stem,
    make_patch_id,
    season_name,
)

DEFAULT_SCENES: tuple[tuple[str, int], ...] = (
    ("spring", 63),   # Official hold-out scene -> test.
    ("summer", 146),  # Train; holds the broken triplet (patch 202).
    ("fall", 6),      # Hashed into validation.
    ("winter", 2),    # Train.
)

_SEASON_INDEX = {s: i for i, s in enumerate(SEASON_DIRS)}
# Plausible L1C reflectance (x 10000) mean and spread per S2 band, B01..B12 incl. B10.
_S2_MEAN = np.array([1400, 1200, 1100, 1150, 1350, 1900, 2200, 2150, 2400, 900, 20, 2000, 1350])
_S2_STD = np.array([250, 400, 450, 650, 600, 700, 800, 800, 850, 400, 8, 700, 650])
_LCCS_CODES = (
    np.array([1, 2, 11, 12, 13, 14, 15, 16, 21, 22, 31, 32, 41, 42, 43], np.uint16),  # Land cover.
    np.array([1, 2, 3, 9, 10, 20, 25, 30, 35, 36, 40], np.uint16),  # Land use.
    np.array([1, 2, 3, 10, 20, 27, 50, 51], np.uint16),  # Surface hydrology.
)


def _blocky(rng: np.random.Generator, values: np.ndarray, weights: np.ndarray, size: int,
            block: int) -> np.ndarray:
    """[size, size] raster of `values` drawn per block x block cell with probabilities `weights`."""
    cells = -(-size // block)
    grid = rng.choice(values, size=(cells, cells), p=weights)
    return np.repeat(np.repeat(grid, block, 0), block, 1)[:size, :size]


def fake_igbp(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """IGBP band [size, size] uint16 in 1..17: 1 to 4 dominant classes in 16 px blocks with
    Dirichlet weights, plus ~4% scattered pixels of any class."""
    k = int(rng.integers(1, 5))
    classes = rng.choice(np.arange(1, 18), size=k, replace=False)
    igbp = _blocky(rng, classes, rng.dirichlet(np.ones(k)), size, 16)
    scatter = rng.random((size, size)) < 0.04
    igbp = np.where(scatter, rng.integers(1, 18, size=(size, size)), igbp)
    return igbp.astype(np.uint16)


def _class_signatures() -> tuple[np.ndarray, np.ndarray]:
    """Fixed per-IGBP-class spectra: S2 [17, 13] reflectance and S1 [17, 2] dB."""
    rng = np.random.default_rng(12)
    s2 = _S2_MEAN + rng.normal(0.0, 1.2, (17, len(S2_BANDS))) * _S2_STD
    s1 = np.array([-11.8, -18.3]) + rng.normal(0.0, 4.0, (17, 2))
    return s2, s1


def learnable_triplet(rng: np.random.Generator, size: int = 256,
                      broken: bool = False) -> dict[str, np.ndarray]:
    """As `fake_triplet`, but every pixel's S1 and S2 values are its IGBP class's spectrum plus
    noise, so that the labels can be learned from the images (for the SEN12MS demo)."""
    arrays = fake_triplet(rng, size, broken)
    igbp = arrays["lc"][..., 0].astype(int) - 1
    sig_s2, sig_s1 = _class_signatures()
    s2 = sig_s2[igbp] + rng.normal(0.0, 0.3, igbp.shape + (len(S2_BANDS),)) * _S2_STD
    s1 = sig_s1[igbp] + rng.normal(0.0, 1.5, igbp.shape + (2,))
    s1 = np.where(np.isnan(arrays["s1"]), np.nan, s1).astype(np.float32)
    return {"s1": s1, "s2": np.clip(s2, 0, 28000).astype(np.uint16), "lc": arrays["lc"]}


def fake_triplet(rng: np.random.Generator, size: int = 256,
                 broken: bool = False) -> dict[str, np.ndarray]:
    """Random S1 float32 [size, size, 2] dB, S2 uint16 [size, size, 13], LC uint16
    [size, size, 4]; `broken` puts NaN into some S1 pixels (like the official broken triplet)."""
    s1 = np.stack([rng.normal(-11.8, 4.5, (size, size)), rng.normal(-18.3, 4.4, (size, size))], -1)
    s1 = s1.astype(np.float32)
    if broken:
        s1[: size // 8, : size // 8, :] = np.nan
    s2 = rng.normal(_S2_MEAN, _S2_STD, (size, size, len(S2_BANDS)))
    s2 = np.clip(s2, 0, 28000).astype(np.uint16)
    lccs = [_blocky(rng, codes, rng.dirichlet(np.ones(len(codes))), size, 16)
            for codes in _LCCS_CODES]
    lc = np.stack([fake_igbp(rng, size), *lccs], -1).astype(np.uint16)
    assert s1.shape[-1] == len(S1_BANDS) and lc.shape[-1] == len(LC_BANDS)
    return {"s1": s1, "s2": s2, "lc": lc}


def write_fake_sen12ms(
    root: str | os.PathLike,
    scenes: Sequence[tuple[str, int]] = DEFAULT_SCENES,
    patches_per_scene: int | Mapping[tuple[str, int], Sequence[int]] = 2,
    *,
    seed: int = 0,
    interleave: str = "band",
    size: int = 256,
    include_broken_triplet: bool = True,
    compress: str | None = None,
    learnable: bool = False,
) -> list[str]:
    """Writes a fake SEN12MS tree under `root`; returns the patch ids written (builder format,
    e.g. "ROIs1158_spring_63_p17"), sorted by (season, scene, patch), including the broken
    triplet when written.

    scenes: (season, scene) pairs; season as "spring" or "ROIs1158_spring".
    patches_per_scene: a count (patch numbers drawn from 1..999 per scene) or, per scene key
        (bare season name, scene), the exact patch numbers.
    seed: the content of a patch depends only on (seed, season, scene, patch).
    interleave: "band" (planar, as the official files) or "pixel".
    size: raster height and width in pixels (the real data and the builder use 256).
    include_broken_triplet: when summer scene 146 is among `scenes`, also write patch 202 with
        NaN in S1, like the official broken triplet.
    learnable: S1/S2 pixels follow their IGBP class (`learnable_triplet`), for the demo.
    """
    root = Path(root)
    written = []
    for season, scene in scenes:
        season = season_name(season)
        if isinstance(patches_per_scene, Mapping):
            patches = sorted(int(p) for p in patches_per_scene[(season, scene)])
        else:
            pick = np.random.default_rng([seed, _SEASON_INDEX[season], scene])
            candidates = [p for p in range(1, 1000) if (season, scene, p) not in BROKEN_TRIPLETS]
            patches = sorted(int(p) for p in pick.choice(candidates, patches_per_scene, False))
        if include_broken_triplet:
            patches = sorted(set(patches) | {p for s, n, p in BROKEN_TRIPLETS
                                             if (s, n) == (season, scene)})
        zone = 31 + (scene % 8)  # A UTM zone per scene (EPSG:326xx, northern hemisphere).
        crs = f"EPSG:326{zone:02d}"
        for patch in patches:
            rng = np.random.default_rng([seed, _SEASON_INDEX[season], scene, patch])
            broken = (season, scene, patch) in BROKEN_TRIPLETS
            arrays = (learnable_triplet if learnable else fake_triplet)(rng, size, broken=broken)
            # Patches of a scene tile a 10 m grid (origin easting/northing in metres).
            x0 = 300_000.0 + (patch % 32) * size * 10.0
            y0 = 5_000_000.0 - (patch // 32) * size * 10.0
            transform = (10.0, 0.0, x0, 0.0, -10.0, y0)
            for modality, array in arrays.items():
                path = (root / SEASON_DIRS[season] / f"{modality}_{scene}"
                        / f"{file_stem(season, modality, scene, patch)}.tif")
                write_tiff(path, array, crs=crs, transform=transform, compress=compress,
                           interleave=interleave)
            written.append((season, scene, patch))
    return [make_patch_id(*key) for key in sorted(written)]
