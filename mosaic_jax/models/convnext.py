"""ConvNeXt-V2 encoders (Woo et al., 2023) in Flax Linen, NHWC.

Layout (names mirror the official ConvNeXt-V2 module tree, for a later export):

- ``stem_conv`` (4x4 stride 4, bias) + ``stem_norm`` (LayerNorm)
  [official: ``downsample_layers.0.{0,1}``];
- ``downsample{i}_norm`` + ``downsample{i}_conv`` (2x2 stride 2) before stages 1..3
  [official: ``downsample_layers.{i}.{0,1}``];
- ``stage{i}_{j}`` blocks with ``dwconv``, ``norm``, ``pwconv1``, ``grn``, ``pwconv2``
  [official: ``stages.{i}.{j}.*``];
- global average pool + ``norm`` (LayerNorm) [official: ``norm``].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Official init: truncated normal std 0.02 for conv / linear weights, zero biases.
dense_init = nn.initializers.truncated_normal(stddev=0.02)

# (depths, dims) of the variants an encoder name can select (models.towers.CONVNEXT_NAMES).
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}

LN_EPS = 1e-6
GRN_EPS = 1e-6


class GRN(nn.Module):
    """Global Response Normalisation on ``[B, H, W, C]``.

    ``g = ||x||_2 over (H, W)`` per channel; ``n = g / (mean_C(g) + 1e-6)``;
    ``y = gamma * (x * n) + beta + x``. ``gamma``/``beta`` are ``[C]``, zero-initialised.
    The reduction runs in float32; the result has the input dtype.
    """

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.zeros, (c,), jnp.float32)
        beta = self.param("beta", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        g = jnp.sqrt(jnp.sum(jnp.square(xf), axis=(1, 2), keepdims=True))
        n = g / (jnp.mean(g, axis=-1, keepdims=True) + GRN_EPS)
        return (gamma * (xf * n) + beta + xf).astype(x.dtype)


class DropPath(nn.Module):
    """Per-sample stochastic depth on the residual branch; identity unless ``train`` and rate > 0.

    Uses the ``"dropout"`` rng stream. ``[B, ...] -> [B, ...]``.
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if not train or self.rate <= 0.0:
            return x
        keep = 1.0 - self.rate
        rng = self.make_rng("dropout")
        mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class ConvNeXtV2Block(nn.Module):
    """dwconv 7x7 -> LN -> Dense 4C -> GELU -> GRN -> Dense C -> drop path -> + residual.

    ``[B, H, W, C] -> [B, H, W, C]``.
    """

    dim: int
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = nn.Conv(
            self.dim,
            (7, 7),
            padding=((3, 3), (3, 3)),
            feature_group_count=self.dim,
            dtype=self.dtype,
            kernel_init=dense_init,
            name="dwconv",
        )(x)
        y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(y)
        y = nn.Dense(4 * self.dim, dtype=self.dtype, kernel_init=dense_init, name="pwconv1")(y)
        y = nn.gelu(y, approximate=False)
        y = GRN(name="grn")(y)
        y = nn.Dense(self.dim, dtype=self.dtype, kernel_init=dense_init, name="pwconv2")(y)
        y = DropPath(self.drop_path, name="drop_path")(y, train)
        return x + y


class ConvNeXtV2(nn.Module):
    """ConvNeXt-V2 backbone returning pooled, layer-normalised features.

    ``__call__(x: [B, H, W, C], train) -> [B, dims[-1]]`` float32. Computation runs in ``dtype``
    with float32 parameters; the pooling and the final LayerNorm run in float32.
    Stochastic depth rates grow linearly from 0 to ``drop_path_rate`` over the blocks (needs a
    ``"dropout"`` rng when training with a positive rate). ``remat`` recomputes each block's
    activations in the backward pass instead of keeping them (less memory, same values).

    The feature map before pooling is sown as ``intermediates/feature_map``; with
    ``return_feature_map`` the call returns ``(pooled [B, dims[-1]], feature map [B, h, w,
    dims[-1]] in dtype)`` (the tokens of cross-attention fusion).
    """

    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    dtype: Dtype = jnp.float32
    drop_path_rate: float = 0.0
    remat: bool = False
    return_feature_map: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if len(self.depths) != len(self.dims):
            raise ValueError("depths and dims must have the same length")
        total = sum(self.depths)
        rates = [self.drop_path_rate * k / max(total - 1, 1) for k in range(total)]

        x = x.astype(self.dtype)
        x = nn.Conv(
            self.dims[0],
            (4, 4),
            strides=(4, 4),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=dense_init,
            name="stem_conv",
        )(x)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="stem_norm")(x)

        block_cls = ConvNeXtV2Block
        if self.remat:
            block_cls = nn.remat(block_cls, static_argnums=(2,))  # (self, x, train)
        k = 0
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims, strict=True)):
            if i > 0:
                x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=f"downsample{i}_norm")(x)
                x = nn.Conv(
                    dim,
                    (2, 2),
                    strides=(2, 2),
                    padding="VALID",
                    dtype=self.dtype,
                    kernel_init=dense_init,
                    name=f"downsample{i}_conv",
                )(x)
            for j in range(depth):
                x = block_cls(dim, rates[k], self.dtype, name=f"stage{i}_{j}")(x, train)
                k += 1

        self.sow("intermediates", "feature_map", x)
        tokens = x
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name="norm")(x)
        return (x, tokens) if self.return_feature_map else x

    @property
    def num_features(self) -> int:
        """Size of the pooled feature vector."""
        return self.dims[-1]


def convnext_v2(variant: str, **kwargs: Any) -> ConvNeXtV2:
    """Build a named ConvNeXt-V2 variant (``atto``, ``nano``, ``tiny``, ``base``); ``kwargs`` go
    to :class:`ConvNeXtV2` (``dtype``, ``drop_path_rate``, or ``dims`` to override the widths)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ConvNeXt-V2 variant {variant!r}; valid: {sorted(VARIANTS)}")
    depths, dims = VARIANTS[variant]
    kwargs.setdefault("dims", dims)
    return ConvNeXtV2(depths=depths, **kwargs)
