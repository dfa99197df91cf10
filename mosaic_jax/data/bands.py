"""Band selection by name and per-band normalisation of the prepared datasets' arrays.

The prepared TFDS datasets store every band of a modality in a fixed order (the registry's
`DatasetFacts.bands`); models select channels by *name* or named subset (`BAND_SUBSETS`), so the
channel order of a model input never depends on how a dataset stores them. Statistics and S1
clipping are the registry's (`data_builders.datasets`): BigEarthNet v2 S2 in L2A reflectance x
10000 and S1 in dB; SEN12MS S1 in dB after clipping to [-25, 0] dB, S2 (L1C x 10000) without
statistics for B01, B09 and B10 (those cannot be normalised).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from data_builders import datasets

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
    datasets.get(dataset)
    if modality not in datasets.MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {datasets.MODALITIES}")


def stored_bands(dataset: str, modality: str) -> tuple[str, ...]:
    """Band names in the channel order of the prepared arrays of `dataset`'s `modality`."""
    _check(dataset, modality)
    return datasets.get(dataset).bands[modality]


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
    stored = stored_bands(dataset, modality)
    if isinstance(bands, str):
        if bands in _DATASET_SUBSETS:
            names = stored_bands(dataset, _DATASET_SUBSETS[bands])
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
    stats = datasets.get(dataset).band_stats[modality]
    missing = [b for b in names if b not in stats]
    if missing:
        raise ValueError(
            f"band(s) {missing} of {dataset} {modality} have no normalisation statistics; "
            f"bands with statistics: {tuple(stats)}"
        )
    stored = stored_bands(dataset, modality)
    idx = np.array([stored.index(b) for b in names], dtype=np.intp)
    mean = np.array([stats[b][0] for b in names], dtype=np.float32)
    std = np.array([stats[b][1] for b in names], dtype=np.float32)
    return idx, mean, std


@functools.lru_cache(maxsize=256)
def _indices(dataset: str, modality: str, bands: tuple[str, ...]) -> np.ndarray:
    """Channel indices of `bands` into the stored array; cached."""
    stored = stored_bands(dataset, modality)
    return np.array([stored.index(b) for b in resolve_bands(bands, dataset, modality)],
                    dtype=np.intp)


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
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Selects `bands` from a stored-order array and normalises them to zero mean, unit std.

    Args:
      x: [..., C_stored] array whose last axis follows `stored_bands(dataset, modality)`
        (S1 float dB, S2 uint16 DN).
      dataset: "bigearthnet_v2" or "sen12ms".
      modality: "s1" or "s2".
      bands: band names (model channel order) or a subset name, see `resolve_bands`.
      out: optional float32 [..., len(bands)] buffer to write into (avoids a copy when batching).
      stats: optional (mean, std) float32 [len(bands)] in stored units replacing the dataset's
        (`mosaic_jax.data.input_norm`: the statistics a pretrained encoder expects).

    Returns:
      float32 [..., len(bands)]: (x - mean) / std, SEN12MS S1 clipped to [-25, 0] dB first.
    """
    if stats is None:
        idx, mean, std = _plan(dataset, modality, _as_tuple(bands, dataset, modality))
    else:  # any stored band: the registry need not have statistics for it
        idx = _indices(dataset, modality, _as_tuple(bands, dataset, modality))
        mean, std = stats
        if np.shape(mean) != idx.shape or np.shape(std) != idx.shape:
            raise ValueError(f"stats must be two [{len(idx)}] arrays, got {np.shape(mean)} and "
                             f"{np.shape(std)}")
    x = np.asarray(x)
    stored = stored_bands(dataset, modality)
    if x.shape[-1] != len(stored):
        raise ValueError(
            f"{dataset} {modality} arrays have {len(stored)} channels "
            f"in the last axis, got shape {x.shape}"
        )
    shape = (*x.shape[:-1], len(idx))
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
    clip = datasets.get(dataset).s1_clip_db if modality == "s1" else None
    return standardize(x[..., idx], mean, std, clip, out=out)


def standardize(x: np.ndarray, mean: Sequence[float], std: Sequence[float],
                clip: Sequence[float] | None = None, *, out: np.ndarray | None = None
                ) -> np.ndarray:
    """float32 [..., c]: ``(clip(x) - mean) / std`` per band (last axis); ``clip`` (lo, hi) in
    the input's units, or None. The one home of the normalisation formula: the training input
    (`normalize`) and the scene mapper (`mosaic_jax.inference.scene_windows`, with the
    statistics of an export's ``model.json``) both call it.

    ``out``: optional C-contiguous float32 buffer of ``x``'s shape to write into."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    if out is None:
        out = np.empty(np.shape(x), np.float32)
    if clip is None:
        # One pass over the channels (cast inside the ufunc), one in-place division.
        np.subtract(x, mean, out=out, dtype=np.float32)
    else:
        out[...] = x
        np.clip(out, clip[0], clip[1], out=out)
        out -= mean
    out /= std
    return out
