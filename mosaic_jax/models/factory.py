"""The model a config describes: building it, its input shapes, and applying it to a batch.

Training, export, embedding and the benchmarks build models through these functions, so the
`model` section of a config (two towers or one, encoders, heads, dtype) is read in one place.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from data_builders import datasets
from mosaic_jax.data import bands
from mosaic_jax.models.towers import SingleTower, TwoTower

DATA_AXIS = "data"  # the mesh axis of the batch; BatchNorm averages over it in training


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The two-tower (S1, S2) or single-tower model that `config.model` describes.

    With `model.sync_bn`, BatchNorm averages its training statistics over `DATA_AXIS` (the model
    must then be trained inside a map over that axis; inference needs none).
    """
    m = config.model
    common = dict(width_multiplier=m.width_multiplier, stem=m.stem,
                  proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim,
                  num_classes=datasets.get(config.data.name).num_classes,
                  dtype=jnp.dtype(m.dtype), bn_axis_name=DATA_AXIS if m.sync_bn else None,
                  bn_momentum=m.bn_momentum, drop_path_rate=m.drop_path_rate, remat=m.remat)
    if m.kind == "two_tower":
        return TwoTower(s1_encoder=m.s1_encoder, s2_encoder=m.s2_encoder, **common,
                        **fusion_fields(m))
    return SingleTower(encoder=m.encoder, **common)


def fusion_fields(m: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `TwoTower` fusion and missing-modality fields of a config's `model` section (configs
    written before these keys existed: concat fusion, no modality dropout)."""
    return dict(fusion=m.get("fusion", "concat"), fusion_dim=m.get("fusion_dim", 512),
                fusion_heads=m.get("fusion_heads", 8), fusion_layers=m.get("fusion_layers", 2),
                modality_dropout=m.get("modality_dropout", 0.0))


def input_shapes(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-sample model input shapes (H, W, C) of S1 and S2 after augmentation."""
    size = config.augment.out_size
    c1 = len(bands.resolve_bands(config.data.s1_bands, config.data.name, "s1"))
    c2 = len(bands.resolve_bands(config.data.s2_bands, config.data.name, "s2"))
    return (size, size, c1), (size, size, c2)


def model_inputs(config: ml_collections.ConfigDict, s1: jax.Array,
                 s2: jax.Array) -> tuple[jax.Array, ...]:
    """The positional inputs of the model for an S1 [B, H, W, c1] / S2 [B, H, W, c2] batch: both
    for two towers; one modality, or both concatenated on channels, for a single tower."""
    if config.model.kind == "two_tower":
        return s1, s2
    if config.model.inputs == "s1":
        return (s1,)
    if config.model.inputs == "s2":
        return (s2,)
    return (jnp.concatenate([s1, s2], axis=-1),)


def apply_model(model: nn.Module, variables: Any, config: ml_collections.ConfigDict,
                s1: jax.Array, s2: jax.Array, *, train: bool,
                rng: jax.Array | None = None, **two_tower: Any
                ) -> tuple[dict[str, jax.Array], Any]:
    """Applies the model to an S1/S2 batch; returns (outputs dict, new batch_stats or None).

    With `train`, BatchNorm uses batch statistics and returns its updated running averages, and
    `rng` (if given) drives dropout / drop-path / modality dropout; otherwise inference mode,
    batch_stats None. `two_tower` keywords (`present` [B, 2], `missing_variants`) go to a
    `TwoTower` model and are ignored by a single tower.
    """
    args = model_inputs(config, s1, s2)
    kwargs = two_tower if config.model.kind == "two_tower" else {}
    if train:
        rngs = {"dropout": rng} if rng is not None else {}
        out, updates = model.apply(variables, *args, train=True, mutable=["batch_stats"],
                                   rngs=rngs, **kwargs)
        return out, updates["batch_stats"]
    return model.apply(variables, *args, train=False, **kwargs), None


def init_variables(config: ml_collections.ConfigDict, model: nn.Module, *,
                   params_rng: jax.Array, dropout_rng: jax.Array) -> dict[str, Any]:
    """Initial {"params", "batch_stats"} of `model` for `config`'s input shapes (jitted)."""
    (h, w, c1), (_, _, c2) = input_shapes(config)
    args = model_inputs(config, jnp.zeros((2, h, w, c1)), jnp.zeros((2, h, w, c2)))
    # Initialise outside any mapped axis: BatchNorm must not look for one here.
    init = jax.jit(model.clone(bn_axis_name=None).init, static_argnames="train")
    variables = init({"params": params_rng, "dropout": dropout_rng}, *args, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
