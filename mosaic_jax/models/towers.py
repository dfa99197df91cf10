"""Encoder factory and the single- and two-tower models used by every objective."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mosaic_jax.models.convnext import VARIANTS as CONVNEXT_VARIANTS
from mosaic_jax.models.convnext import ConvNeXtV2
from mosaic_jax.models.fusion import CrossAttentionFusion, check_present, draw_presence
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
    return_feature_map: bool = False,
) -> nn.Module:
    """Build an encoder ``(x: [B, H, W, C], train) -> [B, F]`` float32 by name.

    Names: ``resnet18``, ``resnet34``, ``resnet50``, ``convnextv2_atto``, ``convnextv2_nano``,
    ``convnextv2_tiny``, ``convnextv2_base``. ``width_multiplier`` scales the ResNet base width
    (64) and the ConvNeXt dims (rounded, at least 1). ``stem`` (``"standard"``/``"iai"``),
    ``bn_axis_name`` and ``bn_momentum`` apply to ResNets;
    ``drop_path_rate`` to ConvNeXts (which have no BatchNorm and only their patchify stem, so
    ``stem="iai"`` or ``drop_path_rate > 0`` with the other family raises ``ValueError``).
    ``remat`` recomputes each block in the backward pass (less activation memory).
    ``return_feature_map``: the call returns ``(pooled [B, F], feature map [B, h, w, F])``.

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
            return_feature_map=return_feature_map,
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
            return_feature_map=return_feature_map,
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
        return_feature_map=getattr(tower, "fusion", "concat") == "cross_attention",
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
    - ``h_fused``: with ``fusion="concat"`` [B, F1 + F2], their concatenation (S1 first);
      with ``fusion="cross_attention"`` [B, fusion_dim], the pooled joint tokens of
      `CrossAttentionFusion` (module ``fusion_block``) over both encoders' last feature maps;
    - ``intra_s1``, ``intra_s2``, ``inter_s1``, ``inter_s2``, ``z_fused`` [B, proj_dim]:
      un-normalised projections (heads of the same names; ``fused`` for ``z_fused``);
    - ``logits`` [B, num_classes]: ``classifier`` on ``h_fused``;
    - with ``missing_variants=True`` also ``logits_s1_only`` and ``logits_s2_only``: the
      classifier on the fused features of S1 alone / S2 alone (one encoder pass for all three).

    Missing modalities touch the fused path only (``h_fused``, ``z_fused``, ``logits``); the
    per-modality features and projections always read their own encoder. ``present`` bool
    [B, 2] (S1, S2; None: both) says which modality each sample has; in training with
    ``modality_dropout > 0`` one modality (uniformly which) is also dropped per sample with that
    probability (needs a ``"dropout"`` rng). An absent modality is replaced, for concat fusion,
    by a learned embedding (params ``missing_s1`` [F1], ``missing_s2`` [F2], present only when
    ``modality_dropout > 0``; zeros otherwise) and, for cross-attention, masked out.

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
    fusion: str = "concat"
    fusion_dim: int = 512
    fusion_heads: int = 8
    fusion_layers: int = 2
    modality_dropout: float = 0.0

    def setup(self) -> None:
        if self.fusion not in ("concat", "cross_attention"):
            raise ValueError(f"fusion must be 'concat' or 'cross_attention', got {self.fusion!r}")
        self.enc_s1 = _tower_encoder(self, self.s1_encoder)
        self.enc_s2 = _tower_encoder(self, self.s2_encoder)
        if self.fusion == "cross_attention":
            self.fusion_block = CrossAttentionFusion(
                dim=self.fusion_dim, num_heads=self.fusion_heads, num_layers=self.fusion_layers,
                dtype=self.dtype)
        elif self.modality_dropout > 0:
            zeros = nn.initializers.zeros
            self.missing_s1 = self.param("missing_s1", zeros, (self._features("s1"),))
            self.missing_s2 = self.param("missing_s2", zeros, (self._features("s2"),))
        self.intra_s1 = _tower_head(self)
        self.intra_s2 = _tower_head(self)
        self.inter_s1 = _tower_head(self)
        self.inter_s2 = _tower_head(self)
        self.fused = _tower_head(self)
        self.classifier = nn.Dense(self.num_classes, dtype=jnp.float32)

    def _features(self, modality: str) -> int:
        name = self.s1_encoder if modality == "s1" else self.s2_encoder
        return encoder_num_features(name, self.width_multiplier)

    def _fuse(self, h_s1, h_s2, tokens, present):
        """h_fused [B, .] of the pooled features (and token grids) for ``present`` [B, 2]
        (None: both present, today's concatenation exactly)."""
        if self.fusion == "cross_attention":
            if present is None:
                present = jnp.ones((h_s1.shape[0], 2), bool)
            return self.fusion_block(*tokens, present)
        if present is None:
            return jnp.concatenate([h_s1, h_s2], axis=-1)
        check_present(present)
        fill = ((self.missing_s1, self.missing_s2) if self.modality_dropout > 0 else
                (jnp.zeros(h_s1.shape[-1]), jnp.zeros(h_s2.shape[-1])))
        sides = [jnp.where(present[:, i, None], h, jnp.broadcast_to(e, h.shape))
                 for i, (h, e) in enumerate(zip((h_s1, h_s2), fill, strict=True))]
        return jnp.concatenate(sides, axis=-1)

    def __call__(self, s1: jnp.ndarray, s2: jnp.ndarray, train: bool,
                 present: jnp.ndarray | None = None,
                 missing_variants: bool = False) -> dict[str, jnp.ndarray]:
        if self.fusion == "cross_attention":
            (h_s1, t1), (h_s2, t2) = self.enc_s1(s1, train), self.enc_s2(s2, train)
            tokens = (t1, t2)
        else:
            h_s1, h_s2, tokens = self.enc_s1(s1, train), self.enc_s2(s2, train), None
        if train and self.modality_dropout > 0:
            drawn = draw_presence(self.make_rng("dropout"), h_s1.shape[0], self.modality_dropout)
            present = drawn if present is None else present & (drawn | ~present.all(-1)[:, None])
        h_fused = self._fuse(h_s1, h_s2, tokens, present)
        extra = {}
        if missing_variants:
            for name, mask in (("s1_only", (True, False)), ("s2_only", (False, True))):
                only = jnp.broadcast_to(jnp.asarray(mask), (h_s1.shape[0], 2))
                extra[f"logits_{name}"] = self.classifier(
                    self._fuse(h_s1, h_s2, tokens, only)).astype(jnp.float32)
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
            **extra,
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
