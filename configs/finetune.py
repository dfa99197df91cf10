"""Full fine-tuning of a pretrained model with BCE.

Downstream protocol of a pretraining run, with the 10 % data protocol of the paper:
  python -m mosaic_jax.main --config=configs/finetune.py[:ARGS] --workdir=DIR \\
      --config.init_from=PRETRAINING_WORKDIR
The model architecture is taken from the pretraining run's config.json; the classifier is new.
ARGS, comma-separated: `demo` (synthetic data, tiny sizes), `sen12ms` (the SEN12MS dataset).
"""

from mosaic_jax import configuration


def get_config(arg: str | None = None):
    args = configuration.parse_args(arg, configuration.COMMON_ARGS)
    c = configuration.base_config("supervised")
    c.train_mode = "full"
    c.num_train_steps = 2000
    c.optimizer.warmup_steps = 100
    c.optimizer.learning_rate = 1e-4
    c.optimizer.weight_decay = 1e-4
    c.augment.crop_scale = (0.8, 1.0)
    return configuration.apply_args(c, args)
