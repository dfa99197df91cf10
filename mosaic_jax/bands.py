"""Band names, normalisation statistics and named band subsets for BigEarthNet v2 and SEN12MS.

The prepared TFDS datasets store every band of a modality in a fixed order (``STORED_BANDS``);
models select channels by *name*, so the channel order of a model input never depends on how a
dataset happens to store them. Statistics are the published per-band mean/std (REFERENCE.md
sections 3 and 4): BigEarthNet v2 S2 in L2A reflectance x 10000 and S1 in dB; SEN12MS S1 in dB
after clipping to [-25, 0] dB, SEN12MS S2 (L1C x 10000) for the 10 bands B02..B12 without
B01, B09 and B10 (those have no published statistics and cannot be normalised).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

BIGEARTHNET = "bigearthnet_v2"
SEN12MS = "sen12ms"
DATASETS = (BIGEARTHNET, SEN12MS)
MODALITIES = ("s1", "s2")

# Channel order of the arrays the prepared datasets return (last axis).
STORED_BANDS: dict[str, dict[str, tuple[str, ...]]] = {
    BIGEARTHNET: {
        "s1": ("VV", "VH"),
        "s2": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11",
               "B12"),
    },
    SEN12MS: {
        "s1": ("VV", "VH"),
        "s2": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
               "B11", "B12"),
    },
}

# Per-band (mean, std) in the stored units. BigEarthNet: official reBEN recipe (train split,
# 120x120, nearest upsampling). SEN12MS: the benchmark normalisation (S1 after clipping).
STATS: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    BIGEARTHNET: {
        "s1": {"VV": (-12.6439, 5.1335), "VH": (-19.3526, 5.5905)},
        "s2": {
            "B01": (361.0768, 575.0687),
            "B02": (438.3721, 607.0269),
            "B03": (614.0557, 603.2968),
            "B04": (588.4096, 684.5688),
            "B05": (942.8433, 738.4327),
            "B06": (1769.9316, 1100.4561),
            "B07": (2049.5515, 1275.8054),
            "B08": (2193.2920, 1369.3717),
            "B8A": (2235.5566, 1356.5441),
            "B09": (2241.4553, 1316.3933),
            "B11": (1568.2268, 1070.1612),
            "B12": (997.7325, 813.5276),
        },
    },
    SEN12MS: {
        "s1": {"VV": (-11.76858, 4.525339), "VH": (-18.294598, 4.3586307)},
        "s2": {
            "B02": (1226.4215, 741.6254),
            "B03": (1137.3799, 740.883),
            "B04": (1139.6792, 960.1045),
            "B05": (1350.9973, 946.76056),
            "B06": (1932.9058, 985.52747),
            "B07": (2211.1584, 1082.4341),
            "B08": (2154.9846, 1057.7628),
            "B8A": (2409.1128, 1136.1942),
            "B11": (2001.8622, 1132.7898),
            "B12": (1356.0801, 991.48016),
        },
    },
}

# Value range (dB) S1 is clipped to before normalisation; None: no clipping.
S1_CLIP_DB: dict[str, tuple[float, float] | None] = {BIGEARTHNET: None, SEN12MS: (-25.0, 0.0)}

_S2_10 = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")

# Named subsets (channel order of the model input). A subset may span both modalities; resolve it
# per modality with `resolve_bands`.
BAND_SUBSETS: dict[str, tuple[str, ...]] = {
    "s1": ("VV", "VH"),
    "s2_10": _S2_10,
    "official12": ("VV", "VH", *_S2_10),  # the reBEN S1+S2 recipe (B01, B09 dropped)
    "rgb": ("B04", "B03", "B02"),
    "s2_rgbn": ("B02", "B03", "B04", "B08"),  # the 10 m bands
}
# Subsets whose content depends on the dataset: every stored S2 band.
_DATASET_SUBSETS = {"s2_all": "s2"}


def _check(dataset: str, modality: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


def modality_of(band: str) -> str:
    """Returns "s1" for VV/VH and "s2" for Sentinel-2 band names (B01..B12, B8A)."""
    if band in ("VV", "VH"):
        return "s1"
    if band.startswith("B"):
        return "s2"
    raise ValueError(f"unknown band name {band!r}")


def resolve_bands(
    bands: str | Sequence[str], dataset: str, modality: str
) -> tuple[str, ...]:
    """Resolves a subset name or a sequence of band names to the band names of one modality.

    A string is a subset name (`BAND_SUBSETS`, or "s2_all" = every stored S2 band of `dataset`);
    its bands of other modalities are dropped (so "official12" gives VV, VH for "s1" and the 10
    S2 bands for "s2"). A sequence is taken as is and must contain only bands that `dataset`
    stores for `modality` (ValueError naming the offending band otherwise).
    """
    _check(dataset, modality)
    stored = STORED_BANDS[dataset][modality]
    if isinstance(bands, str):
        if bands in _DATASET_SUBSETS:
            names = STORED_BANDS[dataset][_DATASET_SUBSETS[bands]]
        elif bands in BAND_SUBSETS:
            names = BAND_SUBSETS[bands]
        else:
            known = sorted([*BAND_SUBSETS, *_DATASET_SUBSETS])
            raise ValueError(f"unknown band subset {bands!r}; known subsets: {known}")
        return tuple(b for b in names if modality_of(b) == modality)
    names = tuple(bands)
    for b in names:
        if b not in stored:
            raise ValueError(
                f"band {b!r} is not a {modality} band of {dataset}; stored bands: {stored}"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate band names in {names}")
    return names


@functools.lru_cache(maxsize=256)
def _plan(
    dataset: str, modality: str, bands: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(channel indices into the stored array, mean, std) for `bands`; cached."""
    names = resolve_bands(bands, dataset, modality)
    stats = STATS[dataset][modality]
    missing = [b for b in names if b not in stats]
    if missing:
        raise ValueError(
            f"band(s) {missing} of {dataset} {modality} have no normalisation statistics; "
            f"bands with statistics: {tuple(stats)}"
        )
    stored = STORED_BANDS[dataset][modality]
    idx = np.array([stored.index(b) for b in names], dtype=np.intp)
    mean = np.array([stats[b][0] for b in names], dtype=np.float32)
    std = np.array([stats[b][1] for b in names], dtype=np.float32)
    return idx, mean, std


def _as_tuple(bands: str | Sequence[str], dataset: str, modality: str) -> tuple[str, ...]:
    return resolve_bands(bands, dataset, modality) if isinstance(bands, str) else tuple(bands)


def band_stats(
    dataset: str, modality: str, bands: str | Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (mean, std) float32 [len(bands)] in stored units (dB for S1, DN for S2)."""
    _, mean, std = _plan(dataset, modality, _as_tuple(bands, dataset, modality))
    return mean.copy(), std.copy()


def normalize(
    x: np.ndarray,
    dataset: str,
    modality: str,
    bands: str | Sequence[str],
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Selects `bands` from a stored-order array and normalises them to zero mean, unit std.

    Args:
      x: [..., C_stored] array whose last axis follows `STORED_BANDS[dataset][modality]`
        (S1 float dB, S2 uint16 DN).
      dataset: "bigearthnet_v2" or "sen12ms".
      modality: "s1" or "s2".
      bands: band names (model channel order) or a subset name, see `resolve_bands`.
      out: optional float32 [..., len(bands)] buffer to write into (avoids a copy when batching).

    Returns:
      float32 [..., len(bands)]: (x - mean) / std, SEN12MS S1 clipped to [-25, 0] dB first.
    """
    idx, mean, std = _plan(dataset, modality, _as_tuple(bands, dataset, modality))
    x = np.asarray(x)
    if x.shape[-1] != len(STORED_BANDS[dataset][modality]):
        raise ValueError(
            f"{dataset} {modality} arrays have {len(STORED_BANDS[dataset][modality])} channels "
            f"in the last axis, got shape {x.shape}"
        )
    shape = (*x.shape[:-1], len(idx))
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
    clip = S1_CLIP_DB[dataset] if modality == "s1" else None
    if clip is None:
        # One pass over the selected channels (cast inside the ufunc), one in-place division.
        np.subtract(x[..., idx], mean, out=out, dtype=np.float32)
    else:
        out[...] = x[..., idx]
        np.clip(out, clip[0], clip[1], out=out)
        out -= mean
    out /= std
    return out
