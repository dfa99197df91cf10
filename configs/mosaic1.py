"""MoSAiC-1 on BigEarthNet v2 with 10 % of the training data (the paper's protocol).

Usage: python -m mosaic_jax.main --config=configs/mosaic1.py[:ARGS] --workdir=DIR
ARGS, comma-separated: `demo` (synthetic data, tiny model, minutes on a CPU), `sen12ms`.
"""

from mosaic_jax.training import configuration


def get_config(arg: str | None = None):
    args = configuration.parse_args(arg, configuration.COMMON_ARGS)
    c = configuration.base_config("mosaic1")
    return configuration.apply_args(c, args)
