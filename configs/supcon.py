"""SupCon baseline: single-label SupCon on the fused projection (class = first label).

Usage: python -m mosaic_jax.main --config=configs/supcon.py[:ARGS] --workdir=DIR
ARGS, comma-separated: `demo` (synthetic data, tiny model, minutes on a CPU), `sen12ms`.
"""

from mosaic_jax.training import configuration


def get_config(arg: str | None = None):
    args = configuration.parse_args(arg, configuration.COMMON_ARGS)
    c = configuration.base_config("supcon")
    return configuration.apply_args(c, args)
