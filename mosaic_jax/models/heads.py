"""Projection heads for contrastive objectives."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class ProjectionHead(nn.Module):
    """SimCLR-style MLP: Dense(hidden, no bias) -> BatchNorm -> ReLU -> Dense(out).

    ``__call__(h: [B, F], train) -> [B, out_dim]`` float32, *not* L2-normalised (the losses
    normalise). Layer names: ``dense1``, ``bn``, ``dense2`` (torch: ``0``, ``1``, ``3``).
    ``bn_axis_name`` synchronises the BatchNorm statistics over a mapped axis when training.
    """

    hidden_dim: int = 512
    out_dim: int = 128
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, h: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = h.astype(self.dtype)
        x = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, name="dense1")(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name=self.bn_axis_name,
            name="bn",
        )(x)
        x = nn.relu(x)
        x = nn.Dense(self.out_dim, dtype=self.dtype, name="dense2")(x)
        return x.astype(jnp.float32)
