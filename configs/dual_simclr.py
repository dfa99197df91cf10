"""Dual SimCLR baseline: two towers trained by the inter-modal NT-Xent only.

Usage: python -m mosaic_jax.main --config=configs/dual_simclr.py[:ARGS] --workdir=DIR
ARGS, comma-separated: `demo` (synthetic data, tiny model, minutes on a CPU), `sen12ms`.
"""

from mosaic_jax.training import configuration


def get_config(arg: str | None = None):
    args = configuration.parse_args(arg, configuration.COMMON_ARGS)
    c = configuration.base_config("dual_simclr")
    return configuration.apply_args(c, args)
