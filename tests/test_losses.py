"""mosaic_jax.losses against float64 NumPy loop references, across devices, and on degenerate input.

The references below are written from the papers' definitions (NT-Xent: Chen et al. 2020;
CLIP-style InfoNCE: Radford et al. 2021; MulSupCon: Zhang & Wu 2024; SupCon L_out: Khosla et
al. 2020) with plain loops over anchors, labels and keys; they share no code with the library.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mosaic_jax import losses

N_DEV = 8

# ----------------------------------------------------------------------------------------------
# float64 references


def _unit(z):
    z = np.asarray(z, np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _logsumexp(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def ref_nt_xent(z1, z2, tau):
    z = _unit(np.concatenate([z1, z2]))
    two_n = len(z)
    total = 0.0
    for i in range(two_n):
        pos = (i + two_n // 2) % two_n
        sims = [z[i] @ z[k] / tau for k in range(two_n) if k != i]
        total += _logsumexp(sims) - z[i] @ z[pos] / tau
    return total / two_n


def ref_infonce(za, zb, tau):
    a, b = _unit(za), _unit(zb)
    n = len(a)
    rows = sum(_logsumexp([a[i] @ b[k] / tau for k in range(n)]) - a[i] @ b[i] / tau
               for i in range(n))
    cols = sum(_logsumexp([b[i] @ a[k] / tau for k in range(n)]) - a[i] @ b[i] / tau
               for i in range(n))
    return 0.5 * (rows / n + cols / n)


def ref_mulsupcon(z1, z2, labels, tau, weighting="mean", mask=None):
    z = _unit(np.concatenate([z1, z2]))
    y = np.concatenate([labels, labels]).astype(bool)
    n = len(z1)
    mask = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    valid = np.concatenate([mask, mask])
    rows, per_sample = [], []
    for i in range(2 * n):
        if not valid[i]:
            continue
        keys = [k for k in range(2 * n) if k != i and valid[k]]
        lse = _logsumexp([z[i] @ z[k] / tau for k in keys])
        mine = []
        for c in range(y.shape[1]):
            if not y[i, c]:
                continue
            positives = [k for k in keys if y[k, c]]
            loss = -sum(z[i] @ z[p] / tau - lse for p in positives) / len(positives)
            rows.append(loss)
            mine.append(loss)
        if mine:
            per_sample.append(sum(mine) / len(mine))
    chosen = rows if weighting == "mean" else per_sample
    return sum(chosen) / len(chosen) if chosen else 0.0


def ref_supcon(z1, z2, cls, tau, mask=None):
    z = _unit(np.concatenate([z1, z2]))
    c = np.concatenate([cls, cls])
    mask = np.ones(len(z1), bool) if mask is None else np.asarray(mask, bool)
    valid = np.concatenate([mask, mask])
    losses_ = []
    for i in range(len(z)):
        if not valid[i]:
            continue
        keys = [k for k in range(len(z)) if k != i and valid[k]]
        lse = _logsumexp([z[i] @ z[k] / tau for k in keys])
        positives = [k for k in keys if c[k] == c[i]]
        losses_.append(-sum(z[i] @ z[p] / tau - lse for p in positives) / len(positives))
    return sum(losses_) / len(losses_) if losses_ else 0.0


def ref_bce(logits, labels, mask=None):
    n, c = logits.shape
    mask = np.ones(n, bool) if mask is None else mask
    total, count = 0.0, 0
    for i in range(n):
        if not mask[i]:
            continue
        for j in range(c):
            x, y = float(logits[i, j]), float(labels[i, j])
            p = 1.0 / (1.0 + math.exp(-x))
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
            count += 1
    return total / count if count else 0.0


def _rand(rng, n, d, c=5, density=0.3):
    z1 = rng.normal(size=(n, d)).astype(np.float32)
    z2 = (z1 + 0.7 * rng.normal(size=(n, d))).astype(np.float32)
    y = rng.random((n, c)) < density
    y[np.arange(n), rng.integers(0, c, n)] = True  # at least one label per sample
    return z1, z2, y


# ----------------------------------------------------------------------------------------------
# values against the references


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_size", [None, 5])
def test_values_match_float64_reference(seed, block_size):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(3, 12)), int(rng.integers(2, 17))
    tau = float(rng.choice([0.05, 0.1, 0.5, 1.0]))
    z1, z2, y = _rand(rng, n, d, c=int(rng.integers(2, 8)), density=float(rng.uniform(0.1, .7)))
    mask = rng.random(n) < 0.7
    kw = dict(temperature=tau, block_size=block_size)
    np.testing.assert_allclose(losses.nt_xent(z1, z2, **kw), ref_nt_xent(z1, z2, tau), rtol=1e-5)
    np.testing.assert_allclose(losses.cross_modal_infonce(z1, z2, **kw),
                               ref_infonce(z1, z2, tau), rtol=1e-5)
    for weighting in ("mean", "per_sample"):
        np.testing.assert_allclose(
            losses.multilabel_supcon(z1, z2, y, weighting=weighting, **kw),
            ref_mulsupcon(z1, z2, y, tau, weighting), rtol=1e-5)
        np.testing.assert_allclose(
            losses.multilabel_supcon(z1, z2, y, weighting=weighting, label_mask=mask, **kw),
            ref_mulsupcon(z1, z2, y, tau, weighting, mask), rtol=1e-5, atol=1e-6)
    cls = rng.integers(0, 3, n)
    np.testing.assert_allclose(losses.supcon(z1, z2, jnp.asarray(cls), temperature=tau),
                               ref_supcon(z1, z2, cls, tau), rtol=1e-5)
    np.testing.assert_allclose(
        losses.supcon(z1, z2, jnp.asarray(cls), temperature=tau, label_mask=mask),
        ref_supcon(z1, z2, cls, tau, mask), rtol=1e-5, atol=1e-6)
    logits = (3 * rng.normal(size=y.shape)).astype(np.float32)
    np.testing.assert_allclose(losses.multilabel_bce(logits, y), ref_bce(logits, y), rtol=1e-5)
    np.testing.assert_allclose(losses.multilabel_bce(logits, y, label_mask=mask),
                               ref_bce(logits, y, mask), rtol=1e-5)


def test_overlap_weighting_counts_shared_labels():
    # Two samples sharing two labels: each label is its own row, so the pair is pulled twice.
    rng = np.random.default_rng(7)
    z1, z2, _ = _rand(rng, 4, 6)
    y = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]], bool)
    got = losses.multilabel_supcon(z1, z2, y, temperature=0.2)
    np.testing.assert_allclose(got, ref_mulsupcon(z1, z2, y, 0.2), rtol=1e-5)
    assert not np.isclose(got, ref_mulsupcon(z1, z2, y[:, :1] | y[:, 1:2], 0.2))


def _numeric_grad(f, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[idx] += eps
        lo[idx] -= eps
        g[idx] = (f(hi) - f(lo)) / (2 * eps)
    return g


@pytest.mark.parametrize("block_size", [None, 2])
def test_gradients_match_finite_differences_of_reference(block_size):
    rng = np.random.default_rng(3)
    z1, z2, y = _rand(rng, 4, 3, c=3)
    mask = np.array([True, True, False, True])
    tau = 0.3
    cases = [
        (lambda a: losses.nt_xent(a, z2, temperature=tau, block_size=block_size),
         lambda a: ref_nt_xent(a, z2, tau)),
        (lambda a: losses.cross_modal_infonce(a, z2, temperature=tau, block_size=block_size),
         lambda a: ref_infonce(a, z2, tau)),
        (lambda a: losses.multilabel_supcon(a, z2, y, temperature=tau, label_mask=mask,
                                            block_size=block_size),
         lambda a: ref_mulsupcon(a, z2, y, tau, mask=mask)),
        (lambda a: losses.supcon(a, z2, jnp.array([0, 1, 0, 1]), temperature=tau,
                                 label_mask=mask),
         lambda a: ref_supcon(a, z2, np.array([0, 1, 0, 1]), tau, mask)),
        (lambda a: losses.multilabel_bce(a, y.astype(np.float32), label_mask=mask),
         lambda a: ref_bce(a, y, mask)),
    ]
    for jax_fn, ref_fn in cases:
        got = jax.grad(jax_fn)(jnp.asarray(z1))
        np.testing.assert_allclose(got, _numeric_grad(ref_fn, z1), rtol=1e-3, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# jit, dtypes, blockwise equality


def _all_losses(z1, z2, y, cls, mask, block_size=None, axis_name=None):
    kw = dict(axis_name=axis_name)
    bkw = dict(kw, block_size=block_size)
    return jnp.stack([
        losses.nt_xent(z1, z2, temperature=0.5, **bkw),
        losses.cross_modal_infonce(z1, z2, temperature=0.1, **bkw),
        losses.multilabel_supcon(z1, z2, y, temperature=0.1, label_mask=mask, **bkw),
        losses.multilabel_supcon(z1, z2, y, temperature=0.1, weighting="per_sample", **bkw),
        losses.supcon(z1, z2, cls, temperature=0.1, label_mask=mask, **kw),
        losses.multilabel_bce(z1[:, : y.shape[1]], y, label_mask=mask, **kw),
    ])


def _batch(seed=0, n=16, d=8, c=4):
    rng = np.random.default_rng(seed)
    z1, z2, y = _rand(rng, n, d, c)
    cls = rng.integers(0, 3, n).astype(np.int32)
    mask = rng.random(n) < 0.75
    return z1, z2, y.astype(np.float32), cls, mask


def test_jit_matches_eager_and_returns_float32_scalars():
    args = _batch()
    eager = _all_losses(*args)
    jitted = jax.jit(_all_losses, static_argnums=(5,))(*args)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    for name in losses.__all__:
        assert jnp.ndim(eager[0]) == 0 and eager.dtype == jnp.float32, name


def test_bfloat16_inputs_finite_and_close_to_float32():
    z1, z2, y, cls, mask = _batch(1)
    f32 = _all_losses(z1, z2, y, cls, mask)
    bf16 = _all_losses(jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16), y, cls,
                       mask)
    assert bf16.dtype == jnp.float32 and np.all(np.isfinite(bf16))
    np.testing.assert_allclose(bf16, f32, rtol=3e-2)


@pytest.mark.parametrize("block_size", [2, 64])
def test_blockwise_values_and_gradients_equal_plain(block_size):
    z1, z2, y, cls, mask = _batch(2, n=13)

    def total(z1, z2, bs):
        return jnp.sum(_all_losses(z1, z2, y, cls, mask, block_size=bs)[:4])

    np.testing.assert_allclose(_all_losses(z1, z2, y, cls, mask, block_size=block_size),
                               _all_losses(z1, z2, y, cls, mask), rtol=2e-6)
    g_plain = jax.grad(total, argnums=(0, 1))(z1, z2, None)
    g_block = jax.jit(jax.grad(total, argnums=(0, 1)), static_argnums=2)(z1, z2, block_size)
    for a, b in zip(g_block, g_plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# across devices


def _mesh():
    if jax.device_count() < N_DEV:
        pytest.skip(f"needs {N_DEV} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return jax.make_mesh((N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:N_DEV])


@pytest.mark.parametrize("block_size", [None, 4])
def test_shard_map_values_and_gradients_equal_single_device(block_size):
    mesh = _mesh()
    z1, z2, y, cls, mask = _batch(4, n=16)

    sharded = jax.shard_map(
        functools.partial(_all_losses, block_size=block_size, axis_name="data"),
        mesh=mesh, in_specs=(P("data"),) * 5, out_specs=P())
    np.testing.assert_allclose(jax.jit(sharded)(z1, z2, y, cls, mask),
                               _all_losses(z1, z2, y, cls, mask), rtol=1e-5)

    # Jacobians of all six losses at once: one compilation instead of six.
    def jac(f):
        return jax.jacrev(lambda a, b: f(a, b, y, cls, mask), argnums=(0, 1))

    for got, want in zip(jax.jit(jac(sharded))(z1, z2), jac(_all_losses)(z1, z2), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("block_size", [None, 2])
def test_pmap_values_and_gradients_follow_data_parallel_convention(block_size):
    _mesh()
    z1, z2, y, cls, mask = _batch(5, n=16, d=6)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 6)).astype(np.float32)

    def with_params(w, z1, z2, y, cls, mask, axis_name=None):
        return _all_losses(z1 @ w, z2 @ w, y, cls, mask, block_size=block_size,
                           axis_name=axis_name)

    def split(x):
        return x.reshape((N_DEV, -1) + x.shape[1:])

    per_device = jax.pmap(functools.partial(with_params, axis_name="i"), axis_name="i",
                          in_axes=(None, 0, 0, 0, 0, 0))
    values = per_device(w, *map(split, (z1, z2, y, cls, mask)))
    single = with_params(w, z1, z2, y, cls, mask)
    for dev in range(N_DEV):
        np.testing.assert_allclose(values[dev], single, rtol=1e-5)

    gw_single, gz_single = jax.jacrev(with_params, argnums=(0, 1))(w, z1, z2, y, cls, mask)

    def step(w, z1, z2, y, cls, mask):
        gw, gz = jax.jacrev(with_params, argnums=(0, 1))(w, z1, z2, y, cls, mask, axis_name="i")
        return jax.lax.pmean(gw, "i"), gz

    gw, gz = jax.pmap(step, axis_name="i", in_axes=(None, 0, 0, 0, 0, 0))(
        w, *map(split, (z1, z2, y, cls, mask)))
    for dev in range(N_DEV):
        np.testing.assert_allclose(gw[dev], gw_single, rtol=1e-4, atol=1e-6)
    # Each device holds device-count times its own rows' share of the gradient.
    gz = np.moveaxis(np.asarray(gz), 0, 1).reshape((6,) + z1.shape)
    np.testing.assert_allclose(gz / N_DEV, gz_single, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# degenerate input


def _finite_value_and_grad(fn, *args):
    value, grads = jax.value_and_grad(fn, argnums=(0, 1))(*args)
    assert np.isfinite(value), value
    for g in grads:
        assert np.all(np.isfinite(g)), g
    return value, grads


@pytest.mark.parametrize("block_size", [None, 3])
def test_degenerate_inputs_give_finite_values_and_gradients(block_size):
    rng = np.random.default_rng(9)
    n, d, c = 6, 4, 5
    identical = np.ones((n, d), np.float32)
    y = np.zeros((n, c), np.float32)
    y[0, 4] = 1.0                       # label carried by a single sample
    y[1:, 0] = 1.0
    cls = np.zeros(n, np.int32)
    tau = 0.01  # the sharpest softmax: largest logits
    bkw = dict(temperature=tau, block_size=block_size)

    def all_four(a, b):
        return (losses.nt_xent(a, b, **bkw) + losses.cross_modal_infonce(a, b, **bkw)
                + losses.multilabel_supcon(a, b, y, **bkw)
                + losses.supcon(a, b, cls, temperature=tau))

    for z1, z2 in [(identical, identical), (rng.normal(size=(n, d)).astype(np.float32),) * 2]:
        # One compiled function; a NaN or Inf in any term or its gradient shows in the sum.
        _finite_value_and_grad(jax.jit(all_four), z1, z2)
    # Identical embeddings: every similarity equal, so NT-Xent is log(2N - 1).
    np.testing.assert_allclose(losses.nt_xent(identical, identical, block_size=block_size),
                               math.log(2 * n - 1), rtol=1e-6)
    # A zero embedding normalises to zero without NaN.
    zeros = np.zeros((n, d), np.float32)
    _finite_value_and_grad(lambda a, b: losses.nt_xent(a, b, block_size=block_size), zeros,
                           zeros)


@pytest.mark.parametrize("block_size", [None, 3])
def test_all_unlabelled_batch_gives_zero_loss_and_zero_gradient(block_size):
    rng = np.random.default_rng(1)
    z1, z2, y = _rand(rng, 5, 4)
    none = np.zeros(5, bool)
    for weighting in ("mean", "per_sample"):
        value, grads = _finite_value_and_grad(
            lambda a, b, w=weighting: losses.multilabel_supcon(
                a, b, y, label_mask=none, weighting=w, block_size=block_size), z1, z2)
        assert value == 0.0 and all(np.all(g == 0) for g in grads)
    value, grads = _finite_value_and_grad(
        lambda a, b: losses.supcon(a, b, jnp.zeros(5, jnp.int32), label_mask=none), z1, z2)
    assert value == 0.0 and all(np.all(g == 0) for g in grads)
    value, grads = _finite_value_and_grad(
        lambda a, b: losses.multilabel_bce(a, b, label_mask=none), z1, z2)
    assert value == 0.0 and all(np.all(g == 0) for g in grads)


def test_one_sample_per_device_sharded_is_finite_and_exact():
    mesh = _mesh()
    z1, z2, y, cls, mask = _batch(6, n=N_DEV)
    mask[:] = True
    mask[3] = False
    sharded = jax.jit(jax.shard_map(
        functools.partial(_all_losses, block_size=None, axis_name="data"),
        mesh=mesh, in_specs=(P("data"),) * 5, out_specs=P()))
    got = sharded(z1, z2, y, cls, mask)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _all_losses(z1, z2, y, cls, mask), rtol=1e-5)
    grads = jax.jit(jax.grad(lambda a: jnp.sum(sharded(a, z2, y, cls, mask))))(z1)
    assert np.all(np.isfinite(grads))


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda z, y: losses.nt_xent(z, z[:3]), ["z1", "z2", "(4, 3)", "(3, 3)"]),
        (lambda z, y: losses.nt_xent(z[0], z[0]), ["z1", "[N, d]", "(3,)"]),
        (lambda z, y: losses.nt_xent(z.astype(np.int32), z.astype(np.int32)),
         ["z1", "floating", "int32"]),
        (lambda z, y: losses.cross_modal_infonce(z, z[:, :2]), ["z_a", "z_b", "(4, 2)"]),
        (lambda z, y: losses.multilabel_supcon(z, z, y[0]), ["labels", "[N, C]", "(5,)"]),
        (lambda z, y: losses.multilabel_supcon(z, z, y[:3]), ["labels", "N = 4", "(3, 5)"]),
        (lambda z, y: losses.multilabel_supcon(z, z, y, weighting="sum"), ["weighting"]),
        (lambda z, y: losses.multilabel_supcon(z, z, y, label_mask=np.ones(3, bool)),
         ["label_mask", "(3,)"]),
        (lambda z, y: losses.supcon(z, z, np.zeros(4, np.float32)), ["class_ids", "integer"]),
        (lambda z, y: losses.multilabel_bce(z, y), ["labels", "(4, 3)", "(4, 5)"]),
        (lambda z, y: losses.nt_xent(z, z, temperature=0.0), ["temperature"]),
        (lambda z, y: losses.nt_xent(z, z, block_size=0), ["block_size"]),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(call, words):
    z = np.ones((4, 3), np.float32)
    y = np.ones((4, 5), bool)
    with pytest.raises(ValueError) as err:
        call(z, y)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
