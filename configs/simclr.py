"""SimCLR baseline: one ResNet-18 on one modality (S2), NT-Xent between two views.

Usage: python -m mosaic_jax.main --config=configs/simclr.py[:ARGS] --workdir=DIR
ARGS, comma-separated: `demo` (synthetic data, tiny model, minutes on a CPU), `sen12ms`.
"""

from mosaic_jax.training import configuration


def get_config(arg: str | None = None):
    args = configuration.parse_args(arg, configuration.COMMON_ARGS)
    c = configuration.base_config("simclr")
    c.model.kind = "single_tower"
    c.model.inputs = "s2"
    return configuration.apply_args(c, args)
