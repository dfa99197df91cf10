"""Contrastive and multi-label losses as pure JAX functions that also work across devices.

Every function takes un-normalised embeddings of any float dtype, L2-normalises them, computes in
float32 and returns a float32 scalar. Notation: N samples, two views `z1`, `z2` ([N, d] each),
s(a, b) = a.b / temperature.

Sharding. With `axis_name` set, the function runs inside `jax.shard_map` or `jax.pmap` with the
batch split over that axis: each device's rows are the anchors, the all-gathered global batch is
the key set, and every device returns the loss of the whole global batch. `jax.lax.all_gather`
transposes to a reduce-scatter, so gradients are exact: with `shard_map` and `jax.grad` outside
they equal the unsharded gradients; with `pmap` and `jax.grad` inside, each device holds
device-count times its rows' share, so `jax.lax.pmean` of parameter gradients is exact.

Memory. `nt_xent`, `cross_modal_infonce` and `multilabel_supcon` accept `block_size`: the
similarity matrix is then never materialised. Each loss is written as log-sum-exp terms over keys
plus terms linear in the keys (for MulSupCon, anchors dotted with the per-class sums of keys,
a [d, C] matrix), so only the log-sum-exp needs the N x N similarities; it is computed blockwise
with an online maximum and a custom VJP that recomputes the blocks in the backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

AxisName = Hashable | Sequence[Hashable] | None

_TINY = float(np.finfo(np.float32).tiny)

__all__ = [
    "nt_xent",
    "cross_modal_infonce",
    "multilabel_supcon",
    "supcon",
    "multilabel_bce",
]


# ----------------------------------------------------------------------------------------------
# Argument checks: errors name the argument and its shape or dtype.


def _check_embeddings(name: str, z: jax.Array) -> None:
    if not hasattr(z, "shape") or not hasattr(z, "dtype"):
        raise ValueError(f"{name} must be an array of shape [N, d], got {type(z).__name__}")
    if z.ndim != 2:
        raise ValueError(f"{name} must have shape [N, d], got shape {tuple(z.shape)}")
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {z.dtype} "
                         f"(shape {tuple(z.shape)})")


def _check_pair(z1: jax.Array, z2: jax.Array, names: tuple[str, str] = ("z1", "z2")) -> None:
    _check_embeddings(names[0], z1)
    _check_embeddings(names[1], z2)
    if z1.shape != z2.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")


def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float, np.floating)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")


def _check_block_size(block_size: int | None) -> None:
    if block_size is not None and (not isinstance(block_size, (int, np.integer))
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")


def _check_labels(labels: jax.Array, n: int, name: str = "labels") -> None:
    if not hasattr(labels, "shape") or labels.ndim != 2 or labels.shape[0] != n:
        shape = tuple(getattr(labels, "shape", ()))
        raise ValueError(f"{name} must be a multi-hot array of shape [N, C] with N = {n}, "
                         f"got shape {shape}")


def _label_mask_or_ones(label_mask: jax.Array | None, n: int) -> jax.Array:
    if label_mask is None:
        return jnp.ones((n,), bool)
    if not hasattr(label_mask, "shape") or tuple(label_mask.shape) != (n,):
        shape = tuple(getattr(label_mask, "shape", ()))
        raise ValueError(f"label_mask must have shape [N] = ({n},), got shape {shape}")
    return label_mask.astype(bool)


# ----------------------------------------------------------------------------------------------
# Cross-device helpers: identity when axis_name is None.


def _gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Concatenates the local rows of every device along axis 0, in device order."""
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _global_sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _row_offset(n_local: int, axis_name: AxisName) -> jax.Array | int:
    """Global index of this device's first row."""
    return 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_local


def _l2_normalize(z: jax.Array) -> jax.Array:
    z = z.astype(jnp.float32)
    sq = jnp.sum(z * z, axis=-1, keepdims=True)
    return z * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def _safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """total / count, and exactly 0 (with zero gradient) when count is 0."""
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


# ----------------------------------------------------------------------------------------------
# Log-sum-exp of anchors against keys, excluding each anchor's own key and invalid keys.


def _keep_mask(self_index: jax.Array, key_index: jax.Array, key_valid: jax.Array) -> jax.Array:
    return key_valid[None, :] & (key_index[None, :] != self_index[:, None])


def _masked_lse(s: jax.Array, keep: jax.Array) -> jax.Array:
    """Row-wise log-sum-exp of s over `keep`; finite (log of the tiny float) for empty rows."""
    m = jax.lax.stop_gradient(jnp.max(jnp.where(keep, s, -jnp.inf), axis=1))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(keep, jnp.exp(jnp.where(keep, s - m[:, None], 0.0)), 0.0)
    return m + jnp.log(jnp.maximum(jnp.sum(e, axis=1), _TINY))


def _dense_lse(anchors, keys, self_index, key_valid, inv_tau):
    s = (anchors @ keys.T) * inv_tau
    keep = _keep_mask(self_index, jnp.arange(keys.shape[0]), key_valid)
    return _masked_lse(s, keep)


def _pad_rows(x: jax.Array, multiple: int, value) -> jax.Array:
    pad = (-x.shape[0]) % multiple
    if pad == 0:
        return x
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise_lse(anchors, keys, self_index, key_valid, inv_tau, block):
    return _blockwise_lse_fwd(anchors, keys, self_index, key_valid, inv_tau, block)[0]


def _blockwise_lse_fwd(anchors, keys, self_index, key_valid, inv_tau, block):
    m_rows = anchors.shape[0]
    a = _pad_rows(anchors, block, 0.0).reshape(-1, block, anchors.shape[1])
    ai = _pad_rows(self_index, block, -1).reshape(-1, block)
    k = _pad_rows(keys, block, 0.0)
    kv = _pad_rows(key_valid, block, False)
    n_key_blocks = k.shape[0] // block

    def anchor_block(args):
        a_blk, self_blk = args

        def key_block(carry, j):
            m, acc = carry
            kb = jax.lax.dynamic_slice_in_dim(k, j * block, block)
            vb = jax.lax.dynamic_slice_in_dim(kv, j * block, block)
            keep = _keep_mask(self_blk, j * block + jnp.arange(block), vb)
            s = (a_blk @ kb.T) * inv_tau
            new_m = jnp.maximum(m, jnp.max(jnp.where(keep, s, -jnp.inf), axis=1))
            safe_m = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
            e = jnp.where(keep, jnp.exp(jnp.where(keep, s - safe_m[:, None], 0.0)), 0.0)
            acc = acc * jnp.exp(m - safe_m) + jnp.sum(e, axis=1)
            return (new_m, acc), None

        # Initial carries derived from the inputs, so that they carry the same device-variance
        # type as the loop outputs inside shard_map.
        zero = jnp.zeros_like(a_blk[:, 0])
        (m, acc), _ = jax.lax.scan(key_block, (zero - jnp.inf, zero), jnp.arange(n_key_blocks))
        return jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.maximum(acc, _TINY))

    lse = jax.lax.map(anchor_block, (a, ai)).reshape(-1)[:m_rows]
    return lse, (anchors, keys, self_index, key_valid, lse)


def _blockwise_lse_bwd(inv_tau, block, residuals, g):
    anchors, keys, self_index, key_valid, lse = residuals
    m_rows, k_rows, d = anchors.shape[0], keys.shape[0], anchors.shape[1]
    a = _pad_rows(anchors, block, 0.0).reshape(-1, block, d)
    ai = _pad_rows(self_index, block, -1).reshape(-1, block)
    gl = _pad_rows(jnp.stack([g, lse], axis=1), block, 0.0).reshape(-1, block, 2)
    k = _pad_rows(keys, block, 0.0)
    kv = _pad_rows(key_valid, block, False)
    n_key_blocks = k.shape[0] // block

    def anchor_block(dk, args):
        a_blk, self_blk, gl_blk = args
        g_blk, lse_blk = gl_blk[:, 0], gl_blk[:, 1]

        def key_block(carry, j):
            da, dk = carry
            kb = jax.lax.dynamic_slice_in_dim(k, j * block, block)
            vb = jax.lax.dynamic_slice_in_dim(kv, j * block, block)
            keep = _keep_mask(self_blk, j * block + jnp.arange(block), vb)
            s = (a_blk @ kb.T) * inv_tau
            p = jnp.where(keep, jnp.exp(jnp.where(keep, s - lse_blk[:, None], 0.0)), 0.0)
            ds = p * (g_blk * inv_tau)[:, None]
            da = da + ds @ kb
            dk_blk = jax.lax.dynamic_slice_in_dim(dk, j * block, block) + ds.T @ a_blk
            dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_blk, j * block, axis=0)
            return (da, dk), None

        (da, dk), _ = jax.lax.scan(key_block, (jnp.zeros_like(a_blk), dk),
                                   jnp.arange(n_key_blocks))
        return dk, da

    dk, da = jax.lax.scan(anchor_block, jnp.zeros_like(k), (a, ai, gl))
    return da.reshape(-1, d)[:m_rows], dk[:k_rows], None, None


_blockwise_lse.defvjp(_blockwise_lse_fwd, _blockwise_lse_bwd)


def _lse(anchors: jax.Array, keys: jax.Array, self_index: jax.Array, key_valid: jax.Array,
         temperature: float, block_size: int | None) -> jax.Array:
    """[M] log sum_k exp(anchor_m . key_k / temperature) over valid keys k != self_index[m]."""
    inv_tau = 1.0 / temperature
    if block_size is None:
        return _dense_lse(anchors, keys, self_index, key_valid, inv_tau)
    return _blockwise_lse(anchors, keys, self_index.astype(jnp.int32), key_valid,
                          inv_tau, int(block_size))


def _two_view_keys(z1: jax.Array, z2: jax.Array, axis_name: AxisName):
    """Normalised local anchors [2n, d], global keys [2N, d], anchors' own key index, N.

    Keys are ordered [all view-1 rows of every device; all view-2 rows], so local row r of
    device d is key d*n + r (view 1) and N + d*n + r (view 2).
    """
    n = z1.shape[0]
    a1, a2 = _l2_normalize(z1), _l2_normalize(z2)
    k1, k2 = _gather(a1, axis_name), _gather(a2, axis_name)
    n_global = k1.shape[0]
    rows = _row_offset(n, axis_name) + jnp.arange(n)
    self_index = jnp.concatenate([rows, rows + n_global])
    return jnp.concatenate([a1, a2]), jnp.concatenate([k1, k2]), self_index, n_global


# ----------------------------------------------------------------------------------------------
# Public losses.


def nt_xent(
    z1: jax.Array,
    z2: jax.Array,
    *,
    temperature: float = 0.5,
    axis_name: AxisName = None,
    block_size: int | None = None,
) -> jax.Array:
    """SimCLR NT-Xent over the 2N stacked views.

    For each of the 2N views the positive is its partner view and the softmax runs over the other
    2N - 1 views. Returns the mean over all 2N anchors of -log softmax. IaI-SimCLR uses it with
    temperature 0.5, also for the inter-modal term (z1 = S1, z2 = S2 projections).

    Args:
      z1, z2: [N, d] (local rows when `axis_name` is set) un-normalised embeddings.
      temperature: softmax temperature tau > 0.
      axis_name: mapped batch axis, or None for a single device.
      block_size: compute the log-sum-exp over blocks of this many keys (memory O(N * block)).
    """
    _check_pair(z1, z2)
    _check_temperature(temperature)
    _check_block_size(block_size)
    anchors, keys, self_index, n_global = _two_view_keys(z1, z2, axis_name)
    lse = _lse(anchors, keys, self_index, jnp.ones(keys.shape[0], bool), temperature,
               block_size)
    partner = jnp.concatenate([anchors[z1.shape[0]:], anchors[: z1.shape[0]]])
    positive = jnp.sum(anchors * partner, axis=1) / temperature
    return _global_sum(jnp.sum(lse - positive), axis_name) / (2 * n_global)


def cross_modal_infonce(
    z_a: jax.Array,
    z_b: jax.Array,
    *,
    temperature: float = 0.1,
    axis_name: AxisName = None,
    block_size: int | None = None,
) -> jax.Array:
    """CLIP-style symmetric InfoNCE between two modalities.

    Logits are z_a x z_b [N, N]; the loss is the mean of the row-wise and column-wise
    cross-entropies with the matching sample (the diagonal) as target.

    Args:
      z_a, z_b: [N, d] embeddings of the same N samples in two modalities (e.g. S1 and S2).
      temperature, axis_name, block_size: as in `nt_xent`.
    """
    _check_pair(z_a, z_b, ("z_a", "z_b"))
    _check_temperature(temperature)
    _check_block_size(block_size)
    a, b = _l2_normalize(z_a), _l2_normalize(z_b)
    ka, kb = _gather(a, axis_name), _gather(b, axis_name)
    no_self = jnp.full((a.shape[0],), -1)
    valid = jnp.ones(ka.shape[0], bool)
    lse_rows = _lse(a, kb, no_self, valid, temperature, block_size)
    lse_cols = _lse(b, ka, no_self, valid, temperature, block_size)
    positive = jnp.sum(a * b, axis=1) / temperature
    local = jnp.sum(lse_rows - positive) + jnp.sum(lse_cols - positive)
    return _global_sum(local, axis_name) / (2 * ka.shape[0])


def multilabel_supcon(
    z1: jax.Array,
    z2: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.1,
    weighting: str = "mean",
    label_mask: jax.Array | None = None,
    axis_name: AxisName = None,
    block_size: int | None = None,
) -> jax.Array:
    """Multi-label supervised contrastive loss (MulSupCon, Zhang & Wu 2024), in-batch two-view form.

    Anchors are all 2N views, keys the other 2N - 1 views. Every (anchor i, positive label c of i)
    is its own row: its positives are the keys carrying label c and the softmax runs over all
    keys, loss(i, c) = -mean over positives p of log softmax(s_i)_p. A key sharing m labels with
    the anchor is pulled m times (the overlap weighting).

    Args:
      z1, z2: [N, d] embeddings of two views of the same N samples.
      labels: [N, C] multi-hot (bool, int or float 0/1).
      temperature: softmax temperature.
      weighting: "mean" averages over all (anchor, label) rows of the global batch;
        "per_sample" averages over each anchor's labels first, then over anchors with a label.
      label_mask: [N] bool; samples whose entry is False take no part at all (neither anchors
        nor keys). A batch without labelled samples gives 0 with zero gradient.
      axis_name, block_size: as in `nt_xent`.
    """
    _check_pair(z1, z2)
    n = z1.shape[0]
    _check_labels(labels, n)
    _check_temperature(temperature)
    _check_block_size(block_size)
    if weighting not in ("mean", "per_sample"):
        raise ValueError(f"weighting must be 'mean' or 'per_sample', got {weighting!r}")
    mask = _label_mask_or_ones(label_mask, n)
    y = labels.astype(jnp.float32) * mask[:, None]
    anchors, keys, self_index, _ = _two_view_keys(z1, z2, axis_name)
    y_keys = jnp.concatenate([_gather(y, axis_name)] * 2)          # [2N, C]
    key_valid = jnp.concatenate([_gather(mask, axis_name)] * 2)    # [2N]
    y_anchor = jnp.concatenate([y, y])                             # [2n, C]

    lse = _lse(anchors, keys, self_index, key_valid, temperature, block_size)   # [2n]
    # sum over positive keys k != i of s(i, k), for every label c: linear in the keys.
    class_sums = keys.T @ y_keys                                    # [d, C]
    self_sim = jnp.sum(anchors * anchors, axis=1, keepdims=True)
    positive_sum = (anchors @ class_sums - y_anchor * self_sim) / temperature    # [2n, C]
    num_positive = jnp.sum(y_keys, axis=0)[None, :] - y_anchor                   # [2n, C]
    row_loss = lse[:, None] - positive_sum / jnp.maximum(num_positive, 1.0)      # [2n, C]
    row_loss = jnp.where(y_anchor > 0, row_loss, 0.0)

    if weighting == "mean":
        total = _global_sum(jnp.sum(row_loss), axis_name)
        count = _global_sum(jnp.sum(y_anchor), axis_name)
    else:
        n_labels = jnp.sum(y_anchor, axis=1)
        per_anchor = jnp.sum(row_loss, axis=1) / jnp.maximum(n_labels, 1.0)
        total = _global_sum(jnp.sum(per_anchor), axis_name)
        count = _global_sum(jnp.sum(n_labels > 0), axis_name)
    return _safe_mean(total, count)


def supcon(
    z1: jax.Array,
    z2: jax.Array,
    class_ids: jax.Array,
    *,
    temperature: float = 0.1,
    label_mask: jax.Array | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """Single-label supervised contrastive loss (Khosla et al. 2020, L_out), two views.

    Anchors are the 2N views; positives are the other views of the same class (the anchor's
    partner view always among them); the softmax runs over the other 2N - 1 views. Mean over
    anchors.

    Args:
      z1, z2: [N, d] embeddings of two views.
      class_ids: [N] integer class of each sample.
      label_mask: [N] bool; samples whose entry is False take no part (neither anchors nor
        keys). A batch without labelled samples gives 0 with zero gradient.
      temperature, axis_name: as in `nt_xent`.
    """
    _check_pair(z1, z2)
    n = z1.shape[0]
    if (not hasattr(class_ids, "shape") or tuple(class_ids.shape) != (n,)
            or not jnp.issubdtype(class_ids.dtype, jnp.integer)):
        raise ValueError(f"class_ids must be an integer array of shape [N] = ({n},), got shape "
                         f"{tuple(getattr(class_ids, 'shape', ()))} and dtype "
                         f"{getattr(class_ids, 'dtype', type(class_ids).__name__)}")
    _check_temperature(temperature)
    mask = _label_mask_or_ones(label_mask, n)
    anchors, keys, self_index, _ = _two_view_keys(z1, z2, axis_name)
    cls_keys = jnp.concatenate([_gather(class_ids, axis_name)] * 2)
    key_valid = jnp.concatenate([_gather(mask, axis_name)] * 2)
    cls_anchor = jnp.concatenate([class_ids, class_ids])
    anchor_valid = jnp.concatenate([mask, mask])
    s = (anchors @ keys.T) / temperature
    keep = _keep_mask(self_index, jnp.arange(keys.shape[0]), key_valid)
    lse = _masked_lse(s, keep)
    positive = keep & (cls_anchor[:, None] == cls_keys[None, :])
    n_positive = jnp.maximum(jnp.sum(positive, axis=1), 1)
    mean_positive = jnp.sum(jnp.where(positive, s, 0.0), axis=1) / n_positive
    row_loss = jnp.where(anchor_valid, lse - mean_positive, 0.0)
    return _safe_mean(_global_sum(jnp.sum(row_loss), axis_name),
                      _global_sum(jnp.sum(anchor_valid), axis_name))


def multilabel_bce(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_mask: jax.Array | None = None,
    axis_name: AxisName = None,
) -> jax.Array:
    """Numerically stable sigmoid cross-entropy, mean over labelled samples and classes.

    Args:
      logits: [N, C] classifier outputs (any float dtype).
      labels: [N, C] multi-hot targets.
      label_mask: [N] bool; unlabelled samples are ignored. All unlabelled gives 0.
      axis_name: mapped batch axis; the mean is then over the global batch.
    """
    _check_embeddings("logits", logits)
    n, c = logits.shape
    if not hasattr(labels, "shape") or tuple(labels.shape) != (n, c):
        raise ValueError(f"labels must have the shape of logits {(n, c)}, got shape "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    mask = _label_mask_or_ones(label_mask, n)
    x = logits.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    per_element = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
    total = _global_sum(jnp.sum(jnp.where(mask[:, None], per_element, 0.0)), axis_name)
    count = _global_sum(jnp.sum(mask) * c, axis_name)
    return _safe_mean(total, count)
