"""IaI-SimCLR baseline (Prexl & Schmitt 2023, "Multi-Modal Multi-Objective Contrastive Learning
for Sentinel-1/2 Imagery"): intra S1 + intra S2 + inter NT-Xent.

Temperature 0.5, Adam 1e-4 without weight decay, and three forward passes per step (the
inter-modal term on its own third view), as published. `loss.inter_view='shared'` reads the
inter-modal term off the two intra-modal views instead: two passes, a third less compute.

Usage: python -m mosaic_jax.main --config=configs/iai_simclr.py[:ARGS] --workdir=DIR
ARGS, comma-separated: `demo` (synthetic data, tiny model, minutes on a CPU), `sen12ms`.
"""

from mosaic_jax.training import configuration


def get_config(arg: str | None = None):
    args = configuration.parse_args(arg, configuration.COMMON_ARGS)
    c = configuration.base_config("iai_simclr")
    c.loss.t_intra = 0.5
    c.loss.t_inter = 0.5
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 0.0
    c.loss.inter_view = "third"
    return configuration.apply_args(c, args)
