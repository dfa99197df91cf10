"""The reference label raster of a scene: the truth a scene map is compared with.

One GeoTIFF band on the scene's pixel grid (same CRS, transform and size as the S2 file), uint8
class index per pixel, `NODATA` (255) where a pixel has no label (unlabelled land cover or no
data), band description `BAND_NAME`, and the class names of the index values as a JSON list in
the dataset tag `CLASS_NAMES_TAG` (``["Urban fabric", ...]``: index 0 is the first). Written by
`data_builders.fake_scene`; read by `mosaic_jax.inference.map_accuracy`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

NODATA = 255
BAND_NAME = "class_index"
CLASS_NAMES_TAG = "class_names"


def class_names_tag(class_names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """The dataset tags naming the classes of the index values."""
    if len(class_names) >= NODATA:
        raise ValueError(f"a reference raster holds at most {NODATA} classes, got "
                         f"{len(class_names)}")
    return {CLASS_NAMES_TAG: json.dumps(list(class_names))}


def class_names_of(tags: Mapping[str, str], path: str) -> list[str]:
    """The class names from a reference raster's dataset tags; ValueError naming `path` when
    the tag is missing or not a JSON list of names."""
    text = tags.get(CLASS_NAMES_TAG)
    try:
        names = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"reference {path} has no {CLASS_NAMES_TAG!r} tag holding a JSON list "
                         f"of class names (got {text!r}); it is not a reference label raster "
                         "(data_builders.reference_labels)")
    return names
