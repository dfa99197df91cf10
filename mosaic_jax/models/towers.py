"""Encoder factory and the single- and two-tower models used by every objective."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mosaic_jax.models.convnext import VARIANTS as CONVNEXT_VARIANTS
from mosaic_jax.models.convnext import ConvNeXtV2
from mosaic_jax.models.heads import ProjectionHead
from mosaic_jax.models.resnet import ResNet

Dtype = Any

RESNET_DEPTHS: dict[str, int] = {"resnet18": 18, "resnet34": 34, "resnet50": 50}
CONVNEXT_NAMES: dict[str, str] = {
    "convnextv2_atto": "atto",
    "convnextv2_nano": "nano",
    "convnextv2_tiny": "tiny",
    "convnextv2_base": "base",
}
ENCODER_NAMES: tuple[str, ...] = (*RESNET_DEPTHS, *CONVNEXT_NAMES)


def _scale(base: int, width_multiplier: float) -> int:
    """``round(base * width_multiplier)`` (half up), at least 1."""
    return max(1, math.floor(base * width_multiplier + 0.5))


def build_encoder(
    name: str,
    *,
    width_multiplier: float = 1.0,
    stem: str = "standard",
    dtype: Dtype = jnp.float32,
    bn_axis_name: str | None = None,
    bn_momentum: float = 0.9,
    drop_path_rate: float = 0.0,
    remat: bool = False,
) -> nn.Module:
    """Build an encoder ``(x: [B, H, W, C], train) -> [B, F]`` float32 by name.

    Names: ``resnet18``, ``resnet34``, ``resnet50``, ``convnextv2_atto``, ``convnextv2_nano``,
    ``convnextv2_tiny``, ``convnextv2_base``. ``width_multiplier`` scales the ResNet base width
    (64) and the ConvNeXt dims (rounded, at least 1). ``stem`` (``"standard"``/``"iai"``),
    ``bn_axis_name`` and ``bn_momentum`` apply to ResNets;
    ``drop_path_rate`` to ConvNeXts (which have no BatchNorm and only their patchify stem, so
    ``stem="iai"`` or ``drop_path_rate > 0`` with the other family raises ``ValueError``).
    ``remat`` recomputes each block in the backward pass (less activation memory).

    Called from a parent's ``setup`` and assigned to an attribute, the module takes that name.
    """
    if name in RESNET_DEPTHS:
        if drop_path_rate:
            raise ValueError("drop_path_rate is only supported by the ConvNeXt-V2 encoders")
        return ResNet(
            depth=RESNET_DEPTHS[name],
            width=_scale(64, width_multiplier),
            stem=stem,
            dtype=dtype,
            bn_axis_name=bn_axis_name,
            bn_momentum=bn_momentum,
            remat=remat,
        )
    if name in CONVNEXT_NAMES:
        if stem != "standard":
            raise ValueError(f"stem={stem!r} is only supported by the ResNet encoders")
        depths, dims = CONVNEXT_VARIANTS[CONVNEXT_NAMES[name]]
        return ConvNeXtV2(
            depths=depths,
            dims=tuple(_scale(d, width_multiplier) for d in dims),
            dtype=dtype,
            drop_path_rate=drop_path_rate,
            remat=remat,
        )
    raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(ENCODER_NAMES)}")


def encoder_num_features(name: str, width_multiplier: float = 1.0) -> int:
    """Size F of the pooled features of ``build_encoder(name, width_multiplier=...)``."""
    if name in RESNET_DEPTHS:
        return _scale(64, width_multiplier) * (32 if RESNET_DEPTHS[name] == 50 else 8)
    if name in CONVNEXT_NAMES:
        return _scale(CONVNEXT_VARIANTS[CONVNEXT_NAMES[name]][1][-1], width_multiplier)
    raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(ENCODER_NAMES)}")


def _tower_encoder(tower: TwoTower | SingleTower, name: str) -> nn.Module:
    """``build_encoder(name)`` with a tower's options. ``drop_path_rate`` goes to ConvNeXt
    encoders only, so a ResNet S1 tower and a ConvNeXt S2 tower can share one setting."""
    return build_encoder(
        name,
        width_multiplier=tower.width_multiplier,
        stem=tower.stem,
        dtype=tower.dtype,
        bn_axis_name=tower.bn_axis_name,
        bn_momentum=tower.bn_momentum,
        drop_path_rate=tower.drop_path_rate if name in CONVNEXT_NAMES else 0.0,
        remat=tower.remat,
    )


def _tower_head(tower: TwoTower | SingleTower) -> ProjectionHead:
    """A projection head with a tower's options."""
    return ProjectionHead(
        hidden_dim=tower.proj_hidden_dim,
        out_dim=tower.proj_dim,
        bn_axis_name=tower.bn_axis_name,
        dtype=tower.dtype,
        bn_momentum=tower.bn_momentum,
    )


class TwoTower(nn.Module):
    """One encoder per modality, four per-modality projection heads, a fused head, a classifier.

    ``__call__(s1: [B, H, W, C1], s2: [B, H, W, C2], train) -> dict`` of float32 arrays:

    - ``h_s1`` [B, F1], ``h_s2`` [B, F2]: pooled encoder features;
    - ``h_fused`` [B, F1 + F2]: their concatenation (S1 first);
    - ``intra_s1``, ``intra_s2``, ``inter_s1``, ``inter_s2``, ``z_fused`` [B, proj_dim]:
      un-normalised projections (heads of the same names; ``fused`` for ``z_fused``);
    - ``logits`` [B, num_classes]: ``classifier`` on ``h_fused``.

    Every head is evaluated on every call, so all objectives share one parameter (and
    ``batch_stats``) layout; heads an objective ignores get zero gradient.
    ``stem`` applies to both encoders (ResNets only); ``drop_path_rate`` to ConvNeXt encoders;
    ``remat`` (recompute blocks in the backward pass) to both.
    """

    s1_encoder: str = "resnet18"
    s2_encoder: str = "resnet18"
    width_multiplier: float = 1.0
    stem: str = "standard"
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    num_classes: int = 19
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    drop_path_rate: float = 0.0
    remat: bool = False

    def setup(self) -> None:
        self.enc_s1 = _tower_encoder(self, self.s1_encoder)
        self.enc_s2 = _tower_encoder(self, self.s2_encoder)
        self.intra_s1 = _tower_head(self)
        self.intra_s2 = _tower_head(self)
        self.inter_s1 = _tower_head(self)
        self.inter_s2 = _tower_head(self)
        self.fused = _tower_head(self)
        self.classifier = nn.Dense(self.num_classes, dtype=jnp.float32)

    def __call__(self, s1: jnp.ndarray, s2: jnp.ndarray, train: bool) -> dict[str, jnp.ndarray]:
        h_s1 = self.enc_s1(s1, train)
        h_s2 = self.enc_s2(s2, train)
        h_fused = jnp.concatenate([h_s1, h_s2], axis=-1)
        return {
            "h_s1": h_s1,
            "h_s2": h_s2,
            "h_fused": h_fused,
            "intra_s1": self.intra_s1(h_s1, train),
            "intra_s2": self.intra_s2(h_s2, train),
            "inter_s1": self.inter_s1(h_s1, train),
            "inter_s2": self.inter_s2(h_s2, train),
            "z_fused": self.fused(h_fused, train),
            "logits": self.classifier(h_fused).astype(jnp.float32),
        }


class SingleTower(nn.Module):
    """One encoder (``enc``), a projection head (``proj``) and a linear ``classifier``.

    ``__call__(x: [B, H, W, C], train) -> {"h": [B, F], "z": [B, proj_dim],
    "logits": [B, num_classes]}`` (float32). For one-modality SimCLR/SupCon, and for early
    fusion (S1 and S2 channels concatenated into ``x``).
    """

    encoder: str = "resnet18"
    width_multiplier: float = 1.0
    stem: str = "standard"
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    num_classes: int = 19
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    drop_path_rate: float = 0.0
    remat: bool = False

    def setup(self) -> None:
        self.enc = _tower_encoder(self, self.encoder)
        self.proj = _tower_head(self)
        self.classifier = nn.Dense(self.num_classes, dtype=jnp.float32)

    def __call__(self, x: jnp.ndarray, train: bool) -> dict[str, jnp.ndarray]:
        h = self.enc(x, train)
        return {
            "h": h,
            "z": self.proj(h, train),
            "logits": self.classifier(h).astype(jnp.float32),
        }
