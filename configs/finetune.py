"""Full fine-tuning of a pretrained model with BCE.

  python -m mosaic_jax.main --config=configs/finetune.py[:ARGS] --workdir=DIR \\
      --config.init_from=PRETRAINING_WORKDIR
The model architecture is taken from the pretraining run's config.json; the classifier is new.
ARGS, comma-separated: `demo` (synthetic data, tiny sizes), `sen12ms` (the SEN12MS dataset).
"""

from mosaic_jax.training import configuration


def get_config(arg: str | None = None):
    args = configuration.parse_args(arg, configuration.COMMON_ARGS)
    return configuration.downstream_config("full", args)
