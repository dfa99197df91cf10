"""Cross-attention fusion of the S1 and S2 token grids, and missing modalities.

The paper (Gupta et al. 2025) fuses by concatenating the two pooled encoder outputs and names
"more advanced fusion techniques (e.g., cross-attention)" as the next step. `CrossAttentionFusion`
is that step, in the manner of CROMA (Fuller et al., NeurIPS 2023): each encoder's last feature
map is a grid of tokens; both grids are projected to a common width and go through joint layers
that, for each modality, apply self-attention within the modality, cross-attention to the other
modality and an MLP (pre-LayerNorm residual blocks, separate weights per modality), with a 2D
ALiBi positional bias on every attention's logits. The joint tokens are mean-pooled to ``h_fused``.

2D-ALiBi (CROMA): head ``k`` of ``H`` adds ``-slope_k * distance(query, key)`` to its logits,
``slope_k = 2 ** (-8 k / H)`` (k = 1..H, geometric as in ALiBi, Press et al. 2022) and the
distance Euclidean between the token positions. The two grids may differ in size (e.g. a ResNet
S1 tower and a ConvNeXt S2 tower), so positions live on one common grid: token ``(i, j)`` of an
``h x w`` grid sits at the centre of its cell, ``((i + 0.5) / h, (j + 0.5) / w) * G`` with
``G = max(h, w)`` over both grids, i.e. distances are measured in cells of the finer grid (for
two equal grids: CROMA's distance in patches).

Missing modalities: a per-sample presence mask ``present`` bool [B, 2] (S1, S2). An absent
modality's tokens are replaced by zeros before anything reads them (``jnp.where``: NaN or
garbage in the absent array cannot leak), get a large negative logit as keys, contribute nothing
through cross-attention and are left out of the pooling. A sample must have at least one
modality.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
MASKED_LOGIT = -1e30  # logit of an absent key: exp underflows to exactly 0 beside a present one
MLP_RATIO = 4  # hidden width of the joint layers' MLP, in units of the fusion width


def alibi_slopes(num_heads: int) -> np.ndarray:
    """float32 [H]: ALiBi's geometric head slopes ``2 ** (-8 k / H)``, k = 1..H."""
    return (2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)).astype(np.float32)


def grid_positions(height: int, width: int, scale: float) -> np.ndarray:
    """float32 [height * width, 2]: row-major cell centres of an ``height x width`` token grid
    on the common normalised grid, ``((i + 0.5) / height, (j + 0.5) / width) * scale``."""
    i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pos = np.stack([(i.ravel() + 0.5) / height, (j.ravel() + 0.5) / width], axis=-1)
    return (pos * scale).astype(np.float32)


def alibi_bias(query_pos: np.ndarray, key_pos: np.ndarray, num_heads: int) -> np.ndarray:
    """float32 [H, Nq, Nk]: ``-slope_h * ||query_pos[q] - key_pos[k]||_2`` (2D-ALiBi)."""
    dist = np.linalg.norm(query_pos[:, None, :] - key_pos[None, :, :], axis=-1)
    return (-alibi_slopes(num_heads)[:, None, None] * dist[None]).astype(np.float32)


def attention_weights(q: jax.Array, k: jax.Array, bias: jax.Array | None,
                      key_present: jax.Array) -> jax.Array:
    """float32 [B, H, Nq, Nk]: softmax of ``q . k / sqrt(d) + bias`` over the keys.

    ``q`` [B, Nq, H, d], ``k`` [B, Nk, H, d], ``bias`` [H, Nq, Nk] or None, ``key_present``
    bool [B] (all keys of a sample present, or none: then uniform weights over zero tokens,
    which the caller discards)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = logits / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias[None]
    logits = jnp.where(key_present[:, None, None, None], logits, MASKED_LOGIT)
    return jax.nn.softmax(logits, axis=-1)


class Attention(nn.Module):
    """Multi-head attention of ``x`` [B, Nq, D] to ``context`` [B, Nk, D] with an additive
    logit bias [H, Nq, Nk] (or None); returns [B, Nq, D] in ``dtype``, zero for samples whose
    ``key_present`` [B] is False. Layers ``query``, ``key``, ``value``, ``out``."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, bias: jax.Array | None,
                 key_present: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"fusion width {dim} is not divisible by {self.num_heads} heads")
        head = dim // self.num_heads

        def proj(name: str, y: jax.Array) -> jax.Array:
            return nn.DenseGeneral((self.num_heads, head), dtype=self.dtype, name=name)(y)

        q, k, v = proj("query", x), proj("key", context), proj("value", context)
        weights = attention_weights(q, k, bias, key_present)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v)
        y = nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, name="out")(y)
        return jnp.where(key_present[:, None, None], y, jnp.zeros((), y.dtype))


class ModalityBlock(nn.Module):
    """One modality's half of a joint layer: ``x += SelfAttn(LN x)``, ``x += CrossAttn(LN x,
    LN other)``, ``x += MLP(LN x)``. ``x`` [B, N, D], ``other`` [B, M, D] -> [B, N, D]."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, other: jax.Array, biases: tuple[Any, Any],
                 present: jax.Array, other_present: jax.Array) -> jax.Array:
        def norm(name: str, y: jax.Array) -> jax.Array:
            return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)(y)

        y = norm("norm_self", x)
        x = x + Attention(self.num_heads, self.dtype, name="self_attn")(y, y, biases[0], present)
        x = x + Attention(self.num_heads, self.dtype, name="cross_attn")(
            norm("norm_query", x), norm("norm_context", other), biases[1], other_present)
        y = nn.Dense(MLP_RATIO * x.shape[-1], dtype=self.dtype, name="mlp_in")(norm("norm_mlp", x))
        return x + nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(nn.gelu(y))


def check_present(present: Any) -> None:
    """ValueError when a concrete presence mask has a sample with neither modality."""
    if isinstance(present, jax.core.Tracer):
        return
    both_absent = ~np.asarray(present).any(axis=-1)
    if both_absent.any():
        raise ValueError(f"presence mask: sample(s) {np.flatnonzero(both_absent)[:10].tolist()} "
                         "have neither S1 nor S2; every sample needs at least one modality")


class CrossAttentionFusion(nn.Module):
    """Joint layers over the S1 and S2 token grids, pooled to one vector per sample.

    ``__call__(t1 [B, h1, w1, C1], t2 [B, h2, w2, C2], present bool [B, 2]) -> [B, dim]``
    float32: the average over the present modalities of their mean final token,
    layer-normalised. Submodules:
    ``proj_s1``, ``proj_s2`` (to the width ``dim``), ``layer{i}_s1``, ``layer{i}_s2``
    (`ModalityBlock`, i < ``num_layers``; each layer updates both modalities from the layer's
    input tokens), ``norm``.
    """

    dim: int = 512
    num_heads: int = 8
    num_layers: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t1: jax.Array, t2: jax.Array, present: jax.Array) -> jax.Array:
        check_present(present)
        b = t1.shape[0]
        p1, p2 = present[:, 0], present[:, 1]
        grids = (t1.shape[1:3], t2.shape[1:3])
        scale = float(max(*grids[0], *grids[1]))
        pos = [grid_positions(h, w, scale) for h, w in grids]
        bias = {(a, c): jnp.asarray(alibi_bias(pos[a], pos[c], self.num_heads))
                for a in (0, 1) for c in (0, 1)}
        x1 = jnp.where(p1[:, None, None, None], t1, jnp.zeros((), t1.dtype))
        x2 = jnp.where(p2[:, None, None, None], t2, jnp.zeros((), t2.dtype))
        x1 = nn.Dense(self.dim, dtype=self.dtype, name="proj_s1")(x1.astype(self.dtype))
        x2 = nn.Dense(self.dim, dtype=self.dtype, name="proj_s2")(x2.astype(self.dtype))
        x1, x2 = x1.reshape(b, -1, self.dim), x2.reshape(b, -1, self.dim)
        for i in range(self.num_layers):
            x1, x2 = (
                ModalityBlock(self.num_heads, self.dtype, name=f"layer{i}_s1")(
                    x1, x2, (bias[0, 0], bias[0, 1]), p1, p2),
                ModalityBlock(self.num_heads, self.dtype, name=f"layer{i}_s2")(
                    x2, x1, (bias[1, 1], bias[1, 0]), p2, p1))
        w1 = p1.astype(jnp.float32)[:, None] / x1.shape[1]
        w2 = p2.astype(jnp.float32)[:, None] / x2.shape[1]
        zero = jnp.zeros((), jnp.float32)
        total = (w1 * jnp.where(p1[:, None], x1.astype(jnp.float32).sum(1), zero)
                 + w2 * jnp.where(p2[:, None], x2.astype(jnp.float32).sum(1), zero))
        pooled = total / (p1.astype(jnp.float32) + p2.astype(jnp.float32))[:, None]
        return nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, name="norm")(pooled)


def draw_presence(rng: jax.Array, batch: int, rate: float) -> jax.Array:
    """bool [batch, 2]: per sample, with probability ``rate`` one modality (S1 or S2, equally
    likely) is absent; otherwise both are present (modality dropout)."""
    k_drop, k_which = jax.random.split(rng)
    drop = jax.random.bernoulli(k_drop, rate, (batch,))
    drop_s2 = jax.random.bernoulli(k_which, 0.5, (batch,))
    return jnp.stack([~(drop & ~drop_s2), ~(drop & drop_s2)], axis=-1)


def fusion_parameter_count(params: Any) -> int | None:
    """Number of parameters of a two-tower model's fusion block (``fusion`` subtree, or the
 concat fusion's learned missing-modality embeddings), None when it has neither."""
    keys = [k for k in ("fusion_block", "missing_s1", "missing_s2") if k in params]
    if not keys:
        return None
    return int(sum(np.size(x) for k in keys for x in jax.tree.leaves(params[k])))


def fusion_parameter_line(model_config: Any, params: Any) -> str | None:
    """The start-of-run line about the fusion block, e.g. ``Fusion: cross_attention, 2 layers x
    8 heads, width 512: 12,345,678 parameters (...)``; None when there is none (a single tower,
    or plain concatenation without learned missing-modality embeddings)."""
    count = fusion_parameter_count(params) if model_config.kind == "two_tower" else None
    if not count:
        return None
    m = model_config
    total = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    what = (f"cross_attention, {m.fusion_layers} layers x {m.fusion_heads} heads, width "
            f"{m.fusion_dim}" if m.fusion == "cross_attention" else
            "concat with learned missing-modality embeddings")
    return (f"Fusion: {what}: {count:,} parameters ({100 * count / max(total, 1):.1f} % of "
            f"{total:,}); modality dropout {m.modality_dropout}")
