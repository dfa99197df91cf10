"""MoSAiC-2: MoSAiC-1 with supervision-aware (MulSupCon) intra-modal terms.

Usage: python -m mosaic_jax.main --config=configs/mosaic2.py[:ARGS] --workdir=DIR
ARGS, comma-separated: `demo` (synthetic data, tiny model, minutes on a CPU), `sen12ms`.
"""

from mosaic_jax.training import configuration


def get_config(arg: str | None = None):
    args = configuration.parse_args(arg, configuration.COMMON_ARGS)
    c = configuration.base_config("mosaic2")
    return configuration.apply_args(c, args)
