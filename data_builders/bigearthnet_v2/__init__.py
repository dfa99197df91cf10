"""BigEarthNet v2.0 TFDS builder; importing this package registers `bigearthnet_v2` with TFDS.

See `data_builders.bigearthnet_v2.bigearthnet_v2` for configs, features and options.
"""

from data_builders.bigearthnet_v2.bigearthnet_v2 import *  # noqa: F403
from data_builders.bigearthnet_v2.bigearthnet_v2 import __all__  # noqa: F401
