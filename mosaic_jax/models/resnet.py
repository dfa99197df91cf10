"""ResNet-18/34/50 encoders in Flax Linen (NHWC), torchvision-compatible layout.

Parameter names follow torchvision so that an export step can map them one to one:

=====================================  ======================================
Flax path                              torchvision name
=====================================  ======================================
``conv1/kernel``                       ``conv1.weight``
``bn1/{scale,bias}``                   ``bn1.{weight,bias}``
``layer{i}_{j}/conv{k}/kernel``        ``layer{i}.{j}.conv{k}.weight``
``layer{i}_{j}/bn{k}/...``             ``layer{i}.{j}.bn{k}...``
``layer{i}_{j}/downsample_conv``       ``layer{i}.{j}.downsample.0``
``layer{i}_{j}/downsample_bn``         ``layer{i}.{j}.downsample.1``
=====================================  ======================================

Batch statistics (``batch_stats`` collection) hold ``mean``/``var`` (torchvision:
``running_mean``/``running_var``). Conv kernels are ``[kh, kw, in, out]`` (torchvision:
``[out, in, kh, kw]``). ResNet-50 is the v1.5 variant (stride on the 3x3 conv), like torchvision.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any

# He-normal with fan_out, as torchvision initialises its ResNet convolutions.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
}


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding k // 2 on both spatial axes (torchvision convention)."""
    p = k // 2
    return ((p, p), (p, p))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    ``[B, H, W, Cin] -> [B, H/stride, W/stride, features]``.
    """

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        bn = _bn_factory(self, train)
        out_features = self.features * self.expansion
        y = _conv(self, self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(bn("bn1")(y))
        y = _conv(self, self.features, 3, 1, "conv2")(y)
        y = bn("bn2")(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = _conv(self, out_features, 1, self.stride, "downsample_conv")(x)
            x = bn("downsample_bn")(x)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, with a residual connection (ResNet-50).

    ``[B, H, W, Cin] -> [B, H/stride, W/stride, 4 * features]``.
    """

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        bn = _bn_factory(self, train)
        out_features = self.features * self.expansion
        y = _conv(self, self.features, 1, 1, "conv1")(x)
        y = nn.relu(bn("bn1")(y))
        y = _conv(self, self.features, 3, self.stride, "conv2")(y)
        y = nn.relu(bn("bn2")(y))
        y = _conv(self, out_features, 1, 1, "conv3")(y)
        y = bn("bn3")(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = _conv(self, out_features, 1, self.stride, "downsample_conv")(x)
            x = bn("downsample_bn")(x)
        return nn.relu(y + x)


def _conv(module: nn.Module, features: int, k: int, stride: int, name: str) -> nn.Conv:
    """Bias-free k x k convolution with torchvision padding, computing in ``module.dtype``."""
    return nn.Conv(
        features,
        (k, k),
        strides=(stride, stride),
        padding=_pad(k),
        use_bias=False,
        dtype=module.dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init,
        name=name,
    )


def _bn_factory(module: nn.Module, train: bool):
    """Return ``make(name) -> nn.BatchNorm`` configured from ``module``'s fields."""

    def make(name: str) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=module.bn_momentum,
            epsilon=1e-5,
            dtype=module.dtype,
            param_dtype=jnp.float32,
            axis_name=module.bn_axis_name,
            name=name,
        )

    return make


class ResNet(nn.Module):
    """ResNet backbone returning globally average-pooled features.

    ``__call__(x: [B, H, W, C], train) -> [B, F]`` float32, with ``F = 8 * width`` for depth
    18/34 (BasicBlock) and ``F = 32 * width`` for depth 50 (Bottleneck).

    Attributes:
        depth: 18, 34 or 50.
        width: channels of the stem and of the first stage (64 in the standard network).
        stem: ``"standard"`` (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or ``"iai"`` (the same
            without the max-pool, as in IaI-SimCLR).
        dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
        bn_axis_name: mapped axis over which BatchNorm statistics are averaged in training (for
            use inside ``jax.shard_map``/``pmap``); ``None`` = per-device statistics.
        bn_momentum: running-average decay (0.9 = torchvision momentum 0.1).
        remat: recompute each residual block's activations in the backward pass instead of
            keeping them (``nn.remat``): less memory for more compute; same values, same
            parameter layout.

    The feature map before pooling is sown as ``intermediates/feature_map`` (only kept when the
    ``intermediates`` collection is mutable); with ``return_feature_map`` the call returns
    ``(pooled [B, F], feature map [B, h, w, F] in dtype)`` (the tokens of cross-attention fusion).
    """

    depth: int = 18
    width: int = 64
    stem: str = "standard"
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    remat: bool = False
    return_feature_map: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be in {sorted(STAGE_BLOCKS)}, got {self.depth}")
        if self.stem not in ("standard", "iai"):
            raise ValueError(f"ResNet stem must be 'standard' or 'iai', got {self.stem!r}")
        block_cls = Bottleneck if self.depth == 50 else BasicBlock
        if self.remat:
            block_cls = nn.remat(block_cls, static_argnums=(2,))  # (self, x, train)
        bn = _bn_factory(self, train)

        x = x.astype(self.dtype)
        x = _conv(self, self.width, 7, 2, "conv1")(x)
        x = nn.relu(bn("bn1")(x))
        if self.stem == "standard":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        for i, n_blocks in enumerate(STAGE_BLOCKS[self.depth]):
            for j in range(n_blocks):
                x = block_cls(
                    features=self.width * 2**i,
                    stride=2 if (i > 0 and j == 0) else 1,
                    dtype=self.dtype,
                    bn_axis_name=self.bn_axis_name,
                    bn_momentum=self.bn_momentum,
                    name=f"layer{i + 1}_{j}",
                )(x, train)

        self.sow("intermediates", "feature_map", x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return (pooled, x) if self.return_feature_map else pooled

    @property
    def num_features(self) -> int:
        """Size F of the pooled feature vector."""
        return self.width * 8 * (4 if self.depth == 50 else 1)
