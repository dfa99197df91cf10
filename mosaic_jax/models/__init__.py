"""Flax Linen models: ResNet and ConvNeXt-V2 encoders, projection heads, one/two-tower models,
and the factory that builds and applies the model a config describes."""

from mosaic_jax.models.convnext import GRN, ConvNeXtV2, ConvNeXtV2Block, DropPath, convnext_v2
from mosaic_jax.models.factory import (
    DATA_AXIS,
    apply_model,
    create_model,
    init_variables,
    input_shapes,
    model_inputs,
)
from mosaic_jax.models.heads import ProjectionHead
from mosaic_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from mosaic_jax.models.towers import (
    ENCODER_NAMES,
    SingleTower,
    TwoTower,
    build_encoder,
    encoder_num_features,
)

__all__ = [
    "DATA_AXIS",
    "ENCODER_NAMES",
    "GRN",
    "BasicBlock",
    "Bottleneck",
    "ConvNeXtV2",
    "ConvNeXtV2Block",
    "DropPath",
    "ProjectionHead",
    "ResNet",
    "SingleTower",
    "TwoTower",
    "apply_model",
    "build_encoder",
    "convnext_v2",
    "create_model",
    "encoder_num_features",
    "init_variables",
    "input_shapes",
    "model_inputs",
]
