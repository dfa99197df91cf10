"""The dataset registry: every fact about BigEarthNet v2 and SEN12MS that more than one module
reads (classes, native patch size, stored band order, normalisation statistics, S1 clipping,
default model bands).

The builders, the input pipeline, training, export and the reports all read these values from
here; nothing else restates them. It imports only the standard library, so it is cheap for
code that must not pull in TFDS or JAX.

Sources: BigEarthNet v2.0 / reBEN (Clasen et al., IGARSS 2025: the 19-class nomenclature, the
official S1 and S2 per-band statistics of the train split at 120 x 120 px); SEN12MS (Schmitt et
al., ISPRS Annals 2019, with the simplified 10-class IGBP scheme of its benchmark code and that
code's per-band statistics: S1 after clipping to [-25, 0] dB; no statistics for B01, B09, B10).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

MODALITIES: tuple[str, ...] = ("s1", "s2")


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
    """What the code needs to know about one dataset.

    Attributes:
      name: the TFDS name (`data.name` in configs).
      class_names: label names, index = position in the multi-hot `labels` feature.
      patch_size: native side of a patch in pixels at 10 m.
      bands: modality -> band names in the channel order of the prepared arrays.
      band_stats: modality -> band -> (mean, std) in stored units (S1 dB, S2 DN).
      s1_clip_db: (low, high) dB range S1 is clipped to before normalisation, or None.
      default_bands: modality -> the band subset a config selects by default.
    """

    name: str
    class_names: tuple[str, ...]
    patch_size: int
    bands: Mapping[str, tuple[str, ...]]
    band_stats: Mapping[str, Mapping[str, tuple[float, float]]]
    s1_clip_db: tuple[float, float] | None
    default_bands: Mapping[str, str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


BIGEARTHNET_V2 = DatasetFacts(
    name="bigearthnet_v2",
    class_names=(
        "Urban fabric",
        "Industrial or commercial units",
        "Arable land",
        "Permanent crops",
        "Pastures",
        "Complex cultivation patterns",
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
        "Agro-forestry areas",
        "Broad-leaved forest",
        "Coniferous forest",
        "Mixed forest",
        "Natural grassland and sparsely vegetated areas",
        "Moors, heathland and sclerophyllous vegetation",
        "Transitional woodland, shrub",
        "Beaches, dunes, sands",
        "Inland wetlands",
        "Coastal wetlands",
        "Inland waters",
        "Marine waters",
    ),
    patch_size=120,
    bands={
        "s1": ("VV", "VH"),
        # ESA order; L2A has no B10.
        "s2": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11",
               "B12"),
    },
    band_stats={
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
    s1_clip_db=None,
    default_bands={"s1": "s1", "s2": "s2_10"},
)

SEN12MS = DatasetFacts(
    name="sen12ms",
    class_names=("Forest", "Shrubland", "Savanna", "Grassland", "Wetlands", "Croplands",
                 "Urban/Built-up", "Snow/Ice", "Barren", "Water"),
    patch_size=256,
    bands={
        "s1": ("VV", "VH"),
        "s2": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
               "B11", "B12"),
    },
    band_stats={
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
    s1_clip_db=(-25.0, 0.0),
    default_bands={"s1": "s1", "s2": "s2_10"},
)

DATASETS: dict[str, DatasetFacts] = {d.name: d for d in (BIGEARTHNET_V2, SEN12MS)}


def get(name: str) -> DatasetFacts:
    """The facts of dataset `name`; ValueError listing the known datasets otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]
