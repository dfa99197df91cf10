"""Supervised baseline: BCE only; S1+S2 channels early-fused into one ResNet-50.

Extra ARGS: `convnext` uses ConvNeXt-V2-base; `late` uses two towers (late fusion).

Usage: python -m mosaic_jax.main --config=configs/supervised.py[:ARGS] --workdir=DIR
ARGS, comma-separated: `demo` (synthetic data, tiny model, minutes on a CPU), `sen12ms`.
"""

from mosaic_jax.training import configuration


def get_config(arg: str | None = None):
    args = configuration.parse_args(arg, configuration.COMMON_ARGS + ("convnext", "late"))
    c = configuration.base_config("supervised")
    c.model.kind = "two_tower" if "late" in args else "single_tower"
    c.model.inputs = "s1s2"
    c.model.stem = "standard"
    encoder = "convnextv2_base" if "convnext" in args else "resnet50"
    c.model.encoder = c.model.s1_encoder = c.model.s2_encoder = encoder
    return configuration.apply_args(c, args)
