"""Per-modality input normalisation: the dataset's statistics, or those a pretrained encoder
was trained with.

Every model input band is normalised as ``(clip(x) - mean) / std`` with ``x`` in the prepared
dataset's stored units (S1 dB, S2 reflectance x 10000; clip only for SEN12MS S1). The config keys
``data.s1_norm`` / ``data.s2_norm`` choose (mean, std):

- ``"dataset"``: the dataset registry's per-band statistics (`mosaic_jax.data.bands`), as
  before these keys existed (bit-identical);
- a preset name (`PRESETS`): the input convention of published weights;
- ``"custom"``: ``data.<m>_norm_mean`` / ``data.<m>_norm_std``, one value per band of
  ``data.<m>_bands``, in stored units;
- ``"auto"`` (default): the preset of the tower's weight file (``model.s2_init_bands`` etc.)
  when that tower starts from a file with a preset, else ``"dataset"`` (also for a file whose
  bands are the run's own, ``init_bands=""``); a file with an explicit band list needs an
  explicit normalisation.

A preset states (mean, std) in the units its weights expect after multiplying stored values by
``scale``; ``(x * scale - m) / s == (x - m / scale) / (s / scale)``, so it becomes a stored-unit
(mean, std) pair and the host pipeline, the export's ``model.json`` and every inference tool
keep one formula.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_builders import datasets
from mosaic_jax.data import bands as bands_lib

SSL4EO_S2_L1C_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09",
                       "B10", "B11", "B12")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A pretrained encoder's input channels and normalisation.

    Attributes:
      bands: the weight file's input channels, in order (its first convolution's columns).
      scale: stored units -> the units the weights expect (1e-4: DN -> reflectance).
      stats: band -> (mean, std) in those units.
      other: (mean, std) for bands of the same modality the preset does not list (None, or a
        band of the other modality: an error).
      source: where the numbers come from.
    """

    bands: tuple[str, ...]
    scale: float
    stats: dict[str, tuple[float, float]]
    other: tuple[float, float] | None
    source: str


_IMAGENET = {"B04": (0.485, 0.229), "B03": (0.456, 0.224), "B02": (0.406, 0.225)}

PRESETS: dict[str, Preset] = {
    "ssl4eo_s2_l1c": Preset(
        bands=SSL4EO_S2_L1C_BANDS, scale=1e-4,
        stats={b: (0.0, 1.0) for b in SSL4EO_S2_L1C_BANDS}, other=(0.0, 1.0),
        source="TorchGeo SENTINEL2_ALL_MOCO / _DINO / _DECUR (torchgeo/models/resnet.py): 13 "
               "Sentinel-2 L1C bands, input = reflectance x 10000 / 10000"),
    "ssl4eo_s1": Preset(
        bands=("VV", "VH"), scale=1.0,
        stats={"VV": (-12.59, 5.26), "VH": (-20.26, 5.91)}, other=None,
        source="TorchGeo SENTINEL1_GRD_MOCO / _DECUR: VV, VH in dB standardised with SSL4EO-S12's "
               "mean and std"),
    "imagenet_rgb": Preset(
        bands=("B04", "B03", "B02"), scale=1e-4, stats=dict(_IMAGENET),
        other=(float(np.mean([m for m, _ in _IMAGENET.values()])),
               float(np.mean([s for _, s in _IMAGENET.values()]))),
        source="timm / torchvision ImageNet weights: RGB in [0, 1] (here B04 B03 B02 "
               "reflectance), ImageNet mean and std; other bands: the mean of the three"),
}
NORM_CHOICES = ("auto", "dataset", "custom", *PRESETS)


def _init_keys(config: Any, modality: str) -> tuple[str, str] | None:
    """(file key, bands key) of the tower that reads `modality`, or None for no such tower."""
    m = config.model
    if m.kind == "two_tower":
        return f"model.{modality}_init", f"model.{modality}_init_bands"
    if m.inputs in (modality, "s1s2"):
        return "model.init", "model.init_bands"
    return None


def _get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def norm_name(config: Any, modality: str) -> str:
    """The normalisation `modality` gets: "dataset", "custom" or a preset name ("auto"
    resolved as the module docstring says)."""
    name = config.data[f"{modality}_norm"]
    if name != "auto":
        return name
    keys = _init_keys(config, modality)
    if keys and _get(config, keys[0]):
        setting = _get(config, keys[1])
        if isinstance(setting, str) and setting in PRESETS:
            return setting
    return "dataset"


def preset_stats(preset: str, band_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float64 [len(band_names)] in stored units of `preset` for these bands."""
    p = PRESETS[preset]
    modality = bands_lib.modality_of(p.bands[0])
    rows = []
    for b in band_names:
        if b in p.stats:
            rows.append(p.stats[b])
        elif p.other is not None and bands_lib.modality_of(b) == modality:
            rows.append(p.other)
        else:
            raise ValueError(f"normalisation preset {preset!r} has no statistics for band {b!r} "
                             f"(its bands: {', '.join(p.bands)})")
    mean, std = np.asarray(rows, np.float64).T.reshape(2, len(rows))
    return mean / p.scale, std / p.scale


def input_stats(config: Any, modality: str) -> tuple[list[float], list[float], str]:
    """(mean, std, name) of `modality`'s input bands (``data.<m>_bands`` order), stored units.

    "dataset" returns the registry's published values (Python floats, as the export writes).
    ValueError naming the config key for a bad custom list or a preset without a band.
    """
    d = config.data
    names = bands_lib.resolve_bands(d[f"{modality}_bands"], d.name, modality)
    name = norm_name(config, modality)
    if name == "dataset":
        bands_lib.band_stats(d.name, modality, names)  # ValueError for bands without statistics
        stats = datasets.get(d.name).band_stats[modality]
        return [stats[b][0] for b in names], [stats[b][1] for b in names], name
    if name == "custom":
        mean, std = d[f"{modality}_norm_mean"], d[f"{modality}_norm_std"]
        for key, values in (("mean", mean), ("std", std)):
            if len(values) != len(names):
                raise ValueError(f"config key 'data.{modality}_norm_{key}': needs one value per "
                                 f"band of data.{modality}_bands {names}, got {tuple(values)}")
        return [float(v) for v in mean], [float(v) for v in std], name
    mean, std = preset_stats(name, names)
    return mean.tolist(), std.tolist(), name


def norm_stats(config: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"s1": (mean, std), "s2": (mean, std)} float32 for the host pipeline's normaliser."""
    out = {}
    for modality in ("s1", "s2"):
        mean, std, _ = input_stats(config, modality)
        out[modality] = (np.asarray(mean, np.float32), np.asarray(std, np.float32))
    return out


def validate_norm(config: Any) -> None:
    """ValueError naming the key for an unknown normalisation, a non-positive std, or a tower
    that starts from a file with a custom band list but no stated normalisation."""
    for modality in ("s1", "s2"):
        key = f"data.{modality}_norm"
        if config.data[f"{modality}_norm"] not in NORM_CHOICES:
            raise ValueError(f"config key '{key}': {config.data[f'{modality}_norm']!r} is not one "
                             f"of {', '.join(NORM_CHOICES)}")
        init = _init_keys(config, modality)
        if (config.data[f"{modality}_norm"] == "auto" and init and _get(config, init[0])
                and _get(config, init[1]) not in ("", *PRESETS)):
            raise ValueError(f"config key '{key}': {init[0]} is set with a band list, not a "
                             f"preset, in {init[1]}, so say how its inputs were normalised: "
                             f"'dataset', 'custom' (with {key}_mean/_std) or a preset "
                             f"({', '.join(PRESETS)})")
        try:
            _, std, _ = input_stats(config, modality)
        except ValueError as e:
            message = str(e)
            raise ValueError(message if message.startswith("config key") else
                             f"config key '{key}': {message}") from None
        if any(not s > 0 for s in std):
            raise ValueError(f"config key '{key}': every std must be > 0, got {std}")
