"""Cross-attention fusion and missing modalities: the fusion block's properties, modality
dropout, concat fusion pinned to its values before fusion existed, and the S1-only / S2-only
paths of evaluation and export."""

import jax
import numpy as np
from conftest import tiny
from test_train import load_config, random_batch, setup

from mosaic_jax.training import train

# Computed with the code before `model.fusion` existed (2 devices, 3 steps of tiny MoSAiC-1 on
# random_batch(config, 16, seed=7)): concat fusion without modality dropout must reproduce them
# bit for bit.
PINNED_LOSSES = [18.0252742767334, 17.932897567749023, 18.317974090576172]
PINNED_PARAM_ABS_SUM = 3425.4567773310905
PINNED_MODULES = ["classifier", "enc_s1", "enc_s2", "fused", "inter_s1", "inter_s2",
                  "intra_s1", "intra_s2"]


def test_concat_fusion_without_dropout_is_bit_identical_to_before():
    config = tiny(load_config("mosaic1"))
    assert config.model.fusion == "concat" and config.model.modality_dropout == 0
    mesh, step, state = setup(config, jax.devices()[:2])
    batch = train.global_batch(random_batch(config, 16, seed=7), mesh, train.TRAIN_KEYS)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    params = jax.device_get(state.params)
    assert losses == PINNED_LOSSES
    assert sorted(params) == PINNED_MODULES
    total = float(sum(np.sum(np.abs(np.asarray(x, np.float64))) for x in jax.tree.leaves(params)))
    assert total == PINNED_PARAM_ABS_SUM
