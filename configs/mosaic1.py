"""MoSAiC-1 on BigEarthNet v2 with 10 % of the training data (the paper's protocol).

Usage: python -m mosaic_jax.main --config=configs/mosaic1.py[:ARGS] --workdir=DIR
ARGS, comma-separated: `demo` (synthetic data, tiny model, minutes on a CPU), `sen12ms`,
`xattn` (cross-attention fusion of the two towers with modality dropout 0.3; see README
"Fusion and missing modalities").
"""

from mosaic_jax.training import configuration


def get_config(arg: str | None = None):
    args = configuration.parse_args(arg, (*configuration.COMMON_ARGS, "xattn"))
    c = configuration.base_config("mosaic1")
    c = configuration.apply_args(c, args)
    if "xattn" in args:
        configuration.cross_attention_overrides(c, demo="demo" in args)
    return c
