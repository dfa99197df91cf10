"""Are a scene's values in the units the export was trained on? Cheap checks of a sample of the
scene's rows against ``model.json["inputs"]`` (bands, mean, std, units), before any mapping.

A model normalises its input as ``(x - mean) / std`` (the dataset's statistics, or a weight
file's preset) in fixed units (S1 backscatter in dB; S2 reflectance x 10000). A scene in other
units still runs through the model and gives a plausible-looking but wrong map, so the units are
checked here:

- S1 in linear power (never negative) instead of dB (almost all negative): `s1_units`;
- S2 as reflectance in 0..1 (float) instead of x 10000: unambiguous, converted (`s2_scale`);
- S2 far below the model's range (a scaled 8-bit picture, 0..255) or far above it: refused,
  naming the band and what the model expects;
- a ``model.json`` whose std is zero, negative or not finite (every input would divide by it):
  refused, naming the key (`check_normalisation`).

Pure functions of arrays and dicts; the sampling of the files is in
`mosaic_jax.inference.predict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mosaic_jax.inference import scene_windows

S1_LINEAR_SHARE = 0.95
"""S1 whose sampled values are >= 0 for more than this share looks like linear power."""
S2_FRACTION_MAX = 2.0
"""S2 whose every band stays below this (99th percentile) is reflectance as a fraction (0..1;
bright snow and cloud reach ~1.5), not reflectance x 10000 (where 2 means 0.02 %)."""
S2_FRACTION_FACTOR = 10000.0
S2_RANGE_FACTOR = 10.0
# The brightest band's typical value in reflectance x 10000 (0.25: near-infrared over
# vegetation): the range check's reference when model.json's mean is not the dataset's (a
# weight file's preset, e.g. mean 0 and std 10000 for value / 10000).
S2_TYPICAL_BRIGHTEST = 2500.0
"""S2 whose brightest band's 99th percentile is below ``1 / S2_RANGE_FACTOR`` of the model's
largest band mean (or whose darkest band's 1st percentile is above that mean times this factor)
is in other units: a real scene in reflectance x 10000 has near-infrared values in the
thousands; a scaled 8-bit picture stops at 255."""


def check_normalisation(info: Mapping[str, Any], source: str) -> None:
    """ValueError naming the ``model.json`` key (``inputs.s2.std[3] (B05)``) unless every
    modality's mean is finite and every std finite and > 0, one of each per band; `source`
    names the file in the message."""
    for modality, spec in info["inputs"].items():
        bands = list(spec["bands"])
        for key in ("mean", "std"):
            values = spec.get(key)
            if values is None or len(values) != len(bands):
                raise ValueError(f"{source}: inputs.{modality}.{key} must list one value per "
                                 f"band {bands}, got {values!r}")
            for i, v in enumerate(values):
                ok = isinstance(v, (int, float)) and math.isfinite(v)
                if key == "std":
                    ok = ok and v > 0
                if not ok:
                    need = "positive and finite" if key == "std" else "finite"
                    raise ValueError(
                        f"{source}: inputs.{modality}.{key}[{i}] ({bands[i]}) is {v!r}; it must "
                        f"be {need} (inputs are normalised as (x - mean) / std): the export is "
                        "broken, export the run again")


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


def s2_valid_values(sample: np.ndarray, nodata: float | None) -> list[np.ndarray]:
    """Per band, the float64 values of ``sample`` [c, ...] at pixels with data: finite in every
    band, not zero in every band (Sentinel-2's fill) and not the file's nodata in every band."""
    x = np.asarray(sample, dtype=np.float64).reshape(sample.shape[0], -1)
    keep = scene_windows.has_data(x.T, nodata=nodata, zero_fill=True)
    return [band[keep] for band in x]


def s2_scale(sample: np.ndarray, spec: Mapping[str, Any], path: str, *, is_float: bool,
             nodata: float | None = None) -> float:
    """The factor that brings S2 ``sample`` [c, ...] (the model's bands, in ``spec["bands"]``
    order, file values) into ``spec``'s units: 1.0 when it is in them already;
    `S2_FRACTION_FACTOR` when a float file holds reflectance in 0..1 and the model wants
    reflectance x 10000. Otherwise ValueError naming the file, the band and the range the model
    expects. Checks nothing when ``spec["units"]`` is not a reflectance x 10000 or the sample
    has no valid pixel."""
    units = str(spec.get("units", ""))
    values = s2_valid_values(sample, nodata)
    if "x 10000" not in units or values[0].size == 0:
        return 1.0
    bands, mean, std = list(spec["bands"]), np.asarray(spec["mean"]), np.asarray(spec["std"])
    high = np.array([np.percentile(v, 99) for v in values])
    low = np.array([np.percentile(v, 1) for v in values])
    if is_float and high.max() <= S2_FRACTION_MAX:
        return S2_FRACTION_FACTOR
    ref = int(np.argmax(mean))  # the band the model expects brightest
    top = int(np.argmax(high))
    if spec.get("norm", "dataset") == "dataset":
        bright = float(mean[ref])
        expects = (f"the model expects {units} (model.json inputs.s2: band {bands[ref]} has "
                   f"mean {mean[ref]:.0f}, std {std[ref]:.0f})")
    else:
        bright = S2_TYPICAL_BRIGHTEST
        expects = (f"the model expects {units} (brightest band typically about "
                   f"{bright:.0f})")
    if high[top] < bright / S2_RANGE_FACTOR:
        hint = (" (a scaled 8-bit picture?)" if high[top] <= 255 else "")
        raise ValueError(
            f"S2 file {path}: even its brightest band {bands[top]} stays below "
            f"{high[top]:.4g} (99th percentile of the sampled rows){hint}; {expects}. Give the "
            f"S2 bands in {units}")
    bottom = int(np.argmin(low))
    if low[bottom] > bright * S2_RANGE_FACTOR:
        raise ValueError(
            f"S2 file {path}: even its darkest band {bands[bottom]} stays above "
            f"{low[bottom]:.4g} (1st percentile of the sampled rows); {expects}. Give the S2 "
            f"bands in {units}")
    return 1.0


def describe_scale(path: str, factor: float, units: str) -> str:
    """The log line of a conversion `s2_scale` chose."""
    return (f"S2 file {path} holds reflectance in 0..1 (every band's 99th percentile <= "
            f"{S2_FRACTION_MAX:g}); multiplying it by {factor:g} into the model's {units}")

