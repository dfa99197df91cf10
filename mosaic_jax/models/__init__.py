"""Flax Linen models: ResNet and ConvNeXt-V2 encoders, projection heads, one/two-tower models."""

from mosaic_jax.models.convnext import GRN, ConvNeXtV2, ConvNeXtV2Block, DropPath, convnext_v2
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
    "build_encoder",
    "convnext_v2",
    "encoder_num_features",
]
