"""Tests of the on-accelerator augmentations (small images, CPU)."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_jax.data import augment as A

H = 16
NOPHOTO = dict(brightness=0.0, contrast=0.0, sar_noise_db=0.0, sar_offset_db=0.0)


def coord_images(b: int, h: int, w: int, c1: int = 2, c2: int = 5) -> tuple[np.ndarray, ...]:
    """S1/S2 batches whose channels encode (row, col): channel k = row * (k+1) + col * (k+2)."""
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                         indexing="ij")

    def make(c):
        im = np.stack([yy * (k + 1) + xx * (k + 2) for k in range(c)], -1)
        return np.broadcast_to(im, (b, h, w, c)).copy()

    return make(c1), make(c2)


def _rc(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c0, c1 = x[..., 0].astype(np.float64), x[..., 1].astype(np.float64)
    # c0 = y + 2x, c1 = 2y + 3x  ->  y = -3 c0 + 2 c1, x = 2 c0 - c1
    return -3 * c0 + 2 * c1, 2 * c0 - c1


def keys(seed: int, n: int) -> jax.Array:
    """n per-sample PRNG keys."""
    return jax.random.split(jax.random.key(seed), n)


def s2_view(seed: int, x: np.ndarray | jax.Array, cfg: A.AugmentConfig) -> np.ndarray:
    """One augmented view of the optical batch x [B, H, W, C] (S1 a zero channel)."""
    s1 = jnp.zeros((*x.shape[:-1], 1))
    return np.asarray(A.paired_views(keys(seed, x.shape[0]), s1, jnp.asarray(x), cfg, 1)[1][0])


def s1_view(seed: int, x: np.ndarray | jax.Array, cfg: A.AugmentConfig) -> np.ndarray:
    """One augmented view of the SAR batch x [B, H, W, C] (S2 a zero channel)."""
    s2 = jnp.zeros((*x.shape[:-1], 1))
    return np.asarray(A.paired_views(keys(seed, x.shape[0]), jnp.asarray(x), s2, cfg, 1)[0][0])


def batch_of_one_reference(k, s1, s2, cfg, num_views):
    """The composition the train step used before `paired_views` took per-sample keys: a vmap
    over samples of the batch form called on a batch of one, with the key's bits drawn as
    [V, 1, words] and the views vmapped over (views, samples)."""
    def batch_form(key, a, b):  # a [1, H, W, c1], b [1, H, W, c2] -> [V, 1, o, o, c]
        c1, c2 = a.shape[-1], b.shape[-1]
        num_u = A._num_uniforms(cfg, c2)
        words = cfg.out_size * cfg.out_size * ((c1 + 1) // 2) if cfg.sar_noise_db > 0 else 0
        bits = jax.random.bits(key, (num_views, 1, num_u + words), jnp.uint32)
        u = A._uniform_from_bits(bits[..., :num_u])
        noise = None if not words else A._normal_from_bits(
            bits[..., num_u:].reshape(num_views, 1, cfg.out_size, cfg.out_size, -1), c1)
        f = jax.vmap(jax.vmap(lambda u_, n_, x, y: A._pair_view(u_, n_, x, y, cfg)),
                     in_axes=(0, 0, None, None))
        y1, y2 = f(u, noise, a.astype(jnp.float32), b.astype(jnp.float32))
        return y1.astype(a.dtype), y2.astype(b.dtype)

    return jax.vmap(lambda key, a, b: jax.tree.map(lambda v: v[:, 0], batch_form(
        key, a[None], b[None])), out_axes=1)(k, s1, s2)


def dihedral(x: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of [H, W, C]."""
    return [np.rot90(f, k) for f in (x, x[:, ::-1]) for k in range(4)]


def test_shapes_dtypes_jit():
    cfg = A.AugmentConfig(out_size=12)
    s1, s2 = coord_images(3, H, H)
    f = jax.jit(functools.partial(A.paired_views, cfg=cfg, num_views=2))
    y1, y2 = f(keys(0, 3), jnp.asarray(s1), jnp.asarray(s2))
    assert y1.shape == (2, 3, 12, 12, 2) and y2.shape == (2, 3, 12, 12, 5)
    for dt in (jnp.bfloat16, jnp.float32):
        for y in f(keys(0, 3), jnp.asarray(s1, dt), jnp.asarray(s2, dt)):
            assert y.dtype == dt
            assert bool(jnp.isfinite(y.astype(jnp.float32)).all())
    # Upsampling works too.
    assert s2_view(2, s2, A.AugmentConfig(out_size=24)).shape == (3, 24, 24, 5)
    with pytest.raises(ValueError, match="one PRNG key per sample"):
        A.paired_views(keys(0, 2), jnp.asarray(s1), jnp.asarray(s2), cfg)
    with pytest.raises(ValueError, match="one PRNG key per sample"):
        A.paired_views(jax.random.key(0), jnp.asarray(s1), jnp.asarray(s2), cfg)


def test_bfloat16_compute_gives_the_float32_views_rounded():
    """A bfloat16 model's views (compute_dtype): the same transforms and jitter as float32,
    within bfloat16's rounding of a few operations (8 significant bits)."""
    cfg = A.AugmentConfig(out_size=12, sar_std_db=(5.0, 4.0), sar_offset_db=1.0)
    rng = np.random.default_rng(0)
    s1 = jnp.asarray(rng.normal(size=(4, H, H, 2)), jnp.float32)
    s2 = jnp.asarray(rng.normal(size=(4, H, H, 5)), jnp.float32)
    want = A.paired_views(keys(3, 4), s1, s2, cfg, 3)
    got = A.paired_views(keys(3, 4), s1, s2, cfg, 3, compute_dtype=jnp.bfloat16)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16 and g.shape == w.shape
        err = np.abs(np.asarray(g, np.float32) - np.asarray(w))
        assert err.max() < 0.06 * max(1.0, float(np.abs(np.asarray(w)).max()))
        assert err.mean() < 0.01  # rounding, not another transform


@pytest.mark.parametrize("cfg,num_views,dtype", [
    (A.AugmentConfig(out_size=8, sar_std_db=(5.0, 4.0), sar_offset_db=1.0), 3, jnp.float32),
    (A.AugmentConfig(out_size=12, share_spatial=False), 2, jnp.bfloat16),
    (A.AugmentConfig(out_size=6, sar_noise_db=0.0), 1, jnp.float32),
])
def test_per_sample_keys_give_the_views_of_the_batch_of_one_composition(cfg, num_views, dtype):
    rng = np.random.default_rng(0)
    s1 = jnp.asarray(rng.normal(size=(5, H, H, 2)), dtype)
    s2 = jnp.asarray(rng.normal(size=(5, H, H, 5)), dtype)
    k = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(7), jnp.arange(5))
    ref = jax.jit(functools.partial(batch_of_one_reference, cfg=cfg, num_views=num_views))(
        k, s1, s2)
    out = A.paired_views(k, s1, s2, cfg, num_views)
    for r, o in zip(ref, out, strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype
        np.testing.assert_array_equal(np.asarray(o.astype(jnp.float32)),
                                      np.asarray(r.astype(jnp.float32)))


def test_a_sample_views_depend_only_on_its_key_and_pixels():
    cfg = A.AugmentConfig(out_size=8)
    s1, s2 = (jnp.asarray(x) for x in coord_images(3, H, H))
    k = keys(0, 3)
    y1, y2 = A.paired_views(k, s1, s2, cfg)
    again = A.paired_views(k[1:2], s1[1:2], s2[1:2], cfg)  # sample 1 alone
    np.testing.assert_array_equal(np.asarray(y1[:, 1:2]), np.asarray(again[0]))
    np.testing.assert_array_equal(np.asarray(y2[:, 1:2]), np.asarray(again[1]))
    # Same pixels, different keys: different views.
    assert not np.allclose(y2[0, 0], y2[0, 1])


def test_paired_views_three_independent_views():
    cfg = A.AugmentConfig(out_size=8)
    s1, s2 = (jnp.asarray(x) for x in coord_images(2, H, H))
    v1, v2 = A.paired_views(keys(4, 2), s1, s2, cfg, 3)
    assert v1.shape == (3, 2, 8, 8, 2) and v2.shape == (3, 2, 8, 8, 5)
    for i, j in itertools.combinations(range(3), 2):  # three independent transforms
        assert not np.allclose(v2[i], v2[j]), (i, j)
    with pytest.raises(ValueError, match="num_views must be >= 1"):
        A.paired_views(keys(4, 2), s1, s2, cfg, 0)


def test_shared_spatial_keeps_s1_s2_coregistered_and_views_differ():
    cfg = A.AugmentConfig(out_size=10, **NOPHOTO)
    s1, s2 = coord_images(8, H, H)
    v1, v2 = (np.asarray(v) for v in A.paired_views(keys(3, 8), jnp.asarray(s1),
                                                    jnp.asarray(s2), cfg))
    for v in range(2):
        y1, x1 = _rc(v1[v])
        y2, x2 = _rc(v2[v])
        np.testing.assert_allclose(y1, y2, atol=1e-3)
        np.testing.assert_allclose(x1, x2, atol=1e-3)
        # All channels of S2 come from the same location: channel 4 = 5 y + 6 x.
        np.testing.assert_allclose(v2[v][..., 4], 5 * y2 + 6 * x2, atol=1e-3)
    assert not np.allclose(v2[0], v2[1], atol=1e-2)
    # Different samples get different transforms.
    assert not np.allclose(v2[0, 0], v2[0, 1], atol=1e-2)
    # Without sharing, S1 and S2 of a view are transformed independently.
    cfg2 = dataclasses.replace(cfg, share_spatial=False)
    w1, w2 = A.paired_views(keys(3, 8), jnp.asarray(s1), jnp.asarray(s2), cfg2)
    assert not np.allclose(_rc(np.asarray(w1[0]))[0], _rc(np.asarray(w2[0]))[0], atol=1e-2)


def test_shared_spatial_with_different_resolutions():
    """S1 at half the resolution of S2: the crop box is shared in relative coordinates."""
    cfg = A.AugmentConfig(out_size=8, **NOPHOTO)
    s1, _ = coord_images(4, H // 2, H // 2)
    _, s2 = coord_images(4, H, H)
    v1, v2 = A.paired_views(keys(5, 4), jnp.asarray(s1), jnp.asarray(s2), cfg)
    y1, x1 = _rc(np.asarray(v1[0]))
    y2, x2 = _rc(np.asarray(v2[0]))
    # Pixel centres: (y1 + 0.5) * 2 == y2 + 0.5 away from the clamped border.
    inner = (y2 > 1) & (y2 < H - 2) & (x2 > 1) & (x2 < H - 2)
    np.testing.assert_allclose(((y1 + 0.5) * 2 - 0.5)[inner], y2[inner], atol=1e-3)
    np.testing.assert_allclose(((x1 + 0.5) * 2 - 0.5)[inner], x2[inner], atol=1e-3)


def test_full_crop_without_flips_is_identity():
    cfg = A.AugmentConfig(out_size=H, crop_scale=(1.0, 1.0), hflip=False, vflip=False,
                          rot90=False, **NOPHOTO)
    s1, s2 = coord_images(4, H, H)
    v1, v2 = jax.jit(functools.partial(A.paired_views, cfg=cfg))(keys(0, 4), jnp.asarray(s1),
                                                                 jnp.asarray(s2))
    np.testing.assert_array_equal(np.asarray(v1[0]), s1)
    np.testing.assert_array_equal(np.asarray(v2[1]), s2)
    np.testing.assert_array_equal(np.asarray(A.center_resize(jnp.asarray(s2), H)), s2)


def test_flips_and_rot90_are_exact_permutations_covering_the_group():
    cfg = A.AugmentConfig(out_size=H, crop_scale=(1.0, 1.0), **NOPHOTO)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, H, H, 3)).astype(np.float32)
    out = s2_view(1, x, cfg)
    used = set()
    for i in range(64):
        matches = [k for k, d in enumerate(dihedral(x[i])) if np.array_equal(out[i], d)]
        assert len(matches) == 1, f"sample {i} is not an exact flip/rotation"
        used.add(matches[0])
    assert used == set(range(8))


def test_dihedral_reduction_matches_numpy():
    x = np.arange(5 * 5 * 2, dtype=np.float32).reshape(5, 5, 2)

    @jax.jit
    def apply(h, v, k):
        fr, fc, t = A._dihedral(h, v, k)
        one, zero = jnp.float32(1), jnp.float32(0)
        sp = dict(y0=zero, x0=zero, hf=one, wf=one, flip_rows=fr, flip_cols=fc, transpose=t)
        return A._resample(jnp.asarray(x), sp, 5)

    for h, v, k in itertools.product([False, True], [False, True], range(4)):
        ref = x[:, ::-1] if h else x
        ref = ref[::-1] if v else ref
        np.testing.assert_array_equal(np.asarray(apply(h, v, k)), np.rot90(ref, k))


def test_only_rotations_or_only_flips():
    x = np.random.default_rng(1).normal(size=(32, H, H, 1)).astype(np.float32)
    base = dict(out_size=H, crop_scale=(1.0, 1.0), **NOPHOTO)
    rot = s2_view(0, x, A.AugmentConfig(hflip=False, vflip=False, **base))
    flip = s2_view(0, x, A.AugmentConfig(rot90=False, **base))
    for i in range(32):
        assert any(np.array_equal(rot[i], np.rot90(x[i], k)) for k in range(4))
        assert any(np.array_equal(flip[i], f) for f in
                   (x[i], x[i, ::-1], x[i, :, ::-1], x[i, ::-1, ::-1]))


def test_crop_scale_and_ratio_statistics():
    """The crop box stays inside the image and its area follows crop_scale."""
    cfg = A.AugmentConfig(crop_scale=(0.3, 0.6))
    u = jax.random.uniform(jax.random.key(0), (2000, A._SPATIAL))
    sp = jax.jit(jax.vmap(lambda v: A._spatial_from_uniform(v, cfg, 120, 120)))(u)
    area = np.asarray(sp["hf"] * sp["wf"])
    ratio = np.asarray(sp["wf"] / sp["hf"])
    assert area.min() >= 0.3 - 1e-5 and area.max() <= 0.6 + 1e-5
    assert abs(area.mean() - 0.45) < 0.01
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    assert np.all(np.asarray(sp["y0"] + sp["hf"]) <= 1 + 1e-6)
    assert np.all(np.asarray(sp["x0"] + sp["wf"]) <= 1 + 1e-6)
    assert np.all(np.asarray(sp["y0"]) >= 0)


def test_crop_is_a_bilinear_zoom():
    """With a sub-image crop, outputs are a bilinear sample of the crop box (linear ramps stay
    linear with a constant step)."""
    cfg = A.AugmentConfig(out_size=16, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0),
                          hflip=False, vflip=False, rot90=False, **NOPHOTO)
    _, s2 = coord_images(4, H, H)
    y, x = _rc(s2_view(2, s2, cfg))
    step = 0.5 * H / 16  # box side (half the image) / output side
    i = np.arange(16) + 0.5
    for b in range(4):
        # Output pixel i samples box start + (i + 1/2) step (pixel centres), clamped at the edge;
        # the middle pixel is never clamped, so it gives the box start.
        top = y[b, 8, 0] + 0.5 - i[8] * step
        left = x[b, 0, 8] + 0.5 - i[8] * step
        assert -1e-4 <= top <= H / 2 + 1e-4 and -1e-4 <= left <= H / 2 + 1e-4  # box inside
        np.testing.assert_allclose(y[b], np.clip(top + i * step - 0.5, 0, H - 1)[:, None]
                                   * np.ones(16), atol=1e-3)
        np.testing.assert_allclose(x[b], np.clip(left + i * step - 0.5, 0, H - 1)[None, :]
                                   * np.ones((16, 1)), atol=1e-3)


def test_sar_noise_statistics():
    sigma, std_db = 1.5, (5.0, 2.5)
    cfg = A.AugmentConfig(out_size=32, crop_scale=(1.0, 1.0), hflip=False, vflip=False,
                          rot90=False, brightness=0.0, contrast=0.0, sar_noise_db=sigma,
                          sar_offset_db=0.0, sar_std_db=std_db)
    x = jnp.zeros((16, 32, 32, 2))
    y = s1_view(0, x, cfg)
    for c in range(2):
        noise_db = y[..., c] * std_db[c]
        assert abs(noise_db.mean()) < 0.03
        assert abs(noise_db.std() - sigma) < 0.03
    # Independent between pixels and bands.
    assert abs(np.corrcoef(y[..., 0].ravel(), y[..., 1].ravel())[0, 1]) < 0.03
    # Per-image offset: constant over pixels and bands of one image, in dB.
    cfg_off = dataclasses.replace(cfg, sar_noise_db=0.0, sar_offset_db=2.0)
    y = s1_view(1, x, cfg_off) * np.array(std_db)
    per_image = y[:, 0, 0, 0]
    np.testing.assert_allclose(y, np.broadcast_to(per_image[:, None, None, None], y.shape),
                               atol=1e-5)
    assert np.abs(per_image).max() <= 2.0 and per_image.std() > 0.3
    # S1 noise does not touch S2 and vice versa.
    cfg_n = dataclasses.replace(cfg, sar_std_db=None)
    s1, s2 = coord_images(2, 32, 32)
    v1, v2 = A.paired_views(keys(2, 2), jnp.asarray(s1), jnp.asarray(s2), cfg_n)
    np.testing.assert_array_equal(np.asarray(v2[0]), s2)
    assert 1.2 < float(jnp.std(v1[0] - s1)) < 1.8


def test_optical_brightness_contrast():
    cfg = A.AugmentConfig(out_size=16, crop_scale=(1.0, 1.0), hflip=False, vflip=False,
                          rot90=False, brightness=0.3, contrast=0.5, sar_noise_db=0.0)
    x = np.random.default_rng(0).normal(size=(64, 16, 16, 4)).astype(np.float32)
    y = s2_view(0, x, cfg)
    # y = gain * x + shift per image and band.
    xc = x - x.mean(axis=(1, 2), keepdims=True)
    gain = (xc * (y - y.mean(axis=(1, 2), keepdims=True))).sum(axis=(1, 2)) / (xc**2).sum(
        axis=(1, 2))
    shift = (y - gain[:, None, None] * x).mean(axis=(1, 2))
    np.testing.assert_allclose(y, gain[:, None, None] * x + shift[:, None, None], atol=1e-5)
    assert gain.min() >= 0.5 - 1e-4 and gain.max() <= 1.5 + 1e-4 and gain.std() > 0.1
    assert np.abs(shift).max() <= 0.3 + 1e-5 and shift.std() > 0.1
    assert np.ptp(shift, axis=1).min() > 0 and np.ptp(gain, axis=1).min() > 0  # per band
    # S2 jitter leaves S1 alone.
    cfg1 = dataclasses.replace(cfg, sar_noise_db=0.0, sar_offset_db=0.0)
    np.testing.assert_array_equal(s1_view(0, x[..., :2], cfg1), x[..., :2])


def test_center_resize():
    _, s2 = coord_images(2, H, H)
    out = np.asarray(A.center_resize(jnp.asarray(s2), 8))
    y, x = _rc(out)
    np.testing.assert_allclose(y[0, :, 0], np.arange(8) * 2 + 0.5, atol=1e-4)
    np.testing.assert_allclose(x[0, 0, :], np.arange(8) * 2 + 0.5, atol=1e-4)
    # A non-square image: the central square of side min(H, W).
    _, wide = coord_images(1, 8, H)
    y, x = _rc(np.asarray(A.center_resize(jnp.asarray(wide), 8)))
    np.testing.assert_allclose(y[0, :, 0], np.arange(8), atol=1e-4)
    np.testing.assert_allclose(x[0, 0, :], np.arange(8) + 4, atol=1e-4)
    assert A.center_resize(jnp.asarray(s2[0], jnp.bfloat16), 4).dtype == jnp.bfloat16


def test_config_validation():
    with pytest.raises(ValueError):
        A.AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError):
        A.AugmentConfig(crop_scale=(0.8, 0.5))
    with pytest.raises(ValueError):
        A.AugmentConfig(brightness=-1.0)
    hash(A.AugmentConfig(sar_std_db=[5.0, 5.0]))  # hashable: usable as a static argument
    with pytest.raises(ValueError, match="sar_std_db"):
        s1_view(0, jnp.zeros((1, 4, 4, 3)), A.AugmentConfig(out_size=4, sar_std_db=(1.0, 1.0)))


def test_batch_sharded_inputs_give_the_same_views():
    """Under a data-parallel mesh (Auto, or Explicit inside jax.set_mesh) the views equal the
    unsharded ones, and the outputs keep the batch sharding."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    n = len(jax.devices())
    if n < 2:
        pytest.skip("needs several devices (tests/conftest.py forces 8 CPU devices)")
    cfg = A.AugmentConfig(out_size=8, sar_std_db=(5.0, 5.0), sar_offset_db=1.0)
    s1, s2 = (jnp.asarray(a) for a in coord_images(2 * n, H, H))
    k = keys(0, 2 * n)
    f = jax.jit(lambda k, x, y: A.paired_views(k, x, y, cfg))
    ref = f(k, s1, s2)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((n,), ("data",), axis_types=(axis_type,))
        sh = NamedSharding(mesh, P("data"))
        with jax.set_mesh(mesh):
            out = f(*(jax.device_put(v, sh) for v in (k, s1, s2)))
        for o, r in zip(out, ref, strict=True):
            np.testing.assert_array_equal(np.asarray(o), np.asarray(r))
            assert o.sharding.spec[1] == "data"
