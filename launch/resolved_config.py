#!/usr/bin/env python3
"""Prints the `config.json` a training command would write, as one line of JSON.

`python -m launch.resolved_config --config=CONFIG [--config.KEY=VALUE ...]` parses the config
and its overrides as `python -m mosaic_jax.main` does and, for a run with `init_from`, takes the
model section of the pretraining run as training does
(`mosaic_jax.training.train.adopt_pretrained_model`). `launch/label_sweep.py` runs it (in its
own process: it needs ml_collections, the sweep itself does not) to tell whether a workdir
already holds the run it was asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def resolved_config_json(argv: Sequence[str]) -> str:
    """The JSON text of the config that `--config=...` and `--config.KEY=VALUE` flags give."""
    from absl import flags
    from ml_collections import config_flags

    full = ["resolved_config", *argv]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                    flag_values=values, sys_argv=full)
    values(full)
    config = values.config
    if config.init_from and isinstance(config.init_from, str):
        from mosaic_jax.training.train import adopt_pretrained_model  # jax: only then

        config = adopt_pretrained_model(config)
    return config.to_json()


if __name__ == "__main__":
    print(resolved_config_json(sys.argv[1:]))
