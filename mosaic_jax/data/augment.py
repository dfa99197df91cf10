"""On-accelerator data augmentation for co-registered Sentinel-1 / Sentinel-2 image pairs.

Everything here is pure JAX with explicit PRNG keys, static shapes, and works under `jax.jit`
and `jax.vmap`; it runs inside the train step (the host pipeline only decodes, normalises and
batches), which keeps augmentation cost measurable and makes resumption deterministic: the same
key and batch always give the same views.

Spatial transform (per sample): random resized crop (area fraction `crop_scale`, aspect ratio
`crop_ratio`, sampled so that the box always fits, no rejection loop) resampled bilinearly to
`out_size` x `out_size` (half-pixel centres, edge clamp, no antialiasing), then an element of the
dihedral group: horizontal/vertical flips and 90-degree rotations. Flips and rotations are folded
into the sampling grid (index reversal plus an optional transpose), so with a full-size crop they
are exact pixel permutations.

Photometric transform: optical (S2) images get a per-band multiplicative contrast gain (about the
dataset band mean, i.e. 0 in normalised units) and a per-band additive brightness shift
(normalised units); SAR (S1) images get additive Gaussian noise in dB (speckle is multiplicative
in linear power, hence additive in dB) and an optional per-image dB offset, both converted to
normalised units with `sar_std_db`.

Randomness: the caller gives one PRNG key per sample, and all random numbers of a sample come
from one draw of random bits from its key, so a sample's views depend only on its key and pixels,
never on the batch it sits in or on how the batch is split over devices (the train step folds
the global sample index into its augment key).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings (hashable: usable as a static jit argument).

    Attributes:
      out_size: side of the square output views, pixels.
      crop_scale: (min, max) area of the crop box as a fraction of the input image, in (0, 1].
      crop_ratio: (min, max) width/height ratio of the crop box (log-uniform).
      hflip, vflip: random horizontal / vertical flips (probability 1/2 each).
      rot90: random rotation by k * 90 degrees, k uniform in {0, 1, 2, 3}.
      brightness: optical per-band additive shift ~ U(-brightness, brightness), normalised units.
      contrast: optical per-band gain ~ U(1 - contrast, 1 + contrast), multiplying the
        normalised values (i.e. acting about the dataset band mean).
      sar_noise_db: std of the per-pixel, per-band Gaussian noise added to S1, dB.
      sar_offset_db: per-image offset ~ U(-sar_offset_db, sar_offset_db) added to all S1 bands, dB.
      sar_std_db: per-band std (dB) used to normalise the S1 input (`bands.band_stats`), so that
        dB noise is converted to normalised units; None means the S1 input is in dB.
      share_spatial: S1 and S2 of one sample in one view get the same spatial transform
        (co-registered); False draws independent ones.
    """

    out_size: int = 120
    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    sar_noise_db: float = 0.5
    sar_offset_db: float = 0.5
    sar_std_db: tuple[float, ...] | None = None
    share_spatial: bool = True

    def __post_init__(self) -> None:
        # Each message starts with the field's name: `validate_config` names the config key.
        if isinstance(self.out_size, bool) or not isinstance(self.out_size, int) \
                or self.out_size < 1:
            raise ValueError(f"out_size must be a positive integer, got {self.out_size!r}")
        for name in ("crop_scale", "crop_ratio"):
            value = tuple(getattr(self, name))
            if len(value) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v)
                                          for v in value) or not 0.0 < value[0] <= value[1]:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {value}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        if self.crop_scale[1] > 1.0:
            raise ValueError(f"crop_scale max must be <= 1, got {self.crop_scale}")
        for name in ("brightness", "contrast", "sar_noise_db", "sar_offset_db"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.sar_std_db is not None:
            object.__setattr__(self, "sar_std_db", tuple(float(s) for s in self.sar_std_db))


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for low-precision or non-float inputs, the input dtype for float32/float64."""
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32:
        return dtype
    return jnp.float32


# Randomness: every random number of a sample comes from a single draw of random bits from its
# key, sliced per use. One random op keeps compile time low (with the default threefry PRNG each
# random op costs about as much to compile as the whole resampling).
_SPATIAL = 7  # uniforms per spatial transform


def _num_uniforms(cfg: AugmentConfig, c2: int) -> int:
    """Uniforms per sample and view: spatial (x2 when S1 has its own) + S2 jitter + S1 offset."""
    spatial = _SPATIAL * (1 if cfg.share_spatial else 2)
    return spatial + 2 * c2 + 1


def _spatial_from_uniform(u: jax.Array, cfg: AugmentConfig, height: int, width: int) -> dict:
    """One spatial transform from 7 uniforms in [0, 1): crop box (fractions of the image) plus
    the dihedral bits.

    The aspect-ratio interval is intersected with the ratios for which a box of the sampled area
    fits inside the image, so the area is always honoured without a rejection loop.
    """
    u = u.astype(jnp.float32)
    lo, hi = cfg.crop_scale
    scale = lo + (hi - lo) * u[0]
    aspect = height / width
    log_lo = jnp.maximum(math.log(cfg.crop_ratio[0]), jnp.log(scale / aspect))
    log_hi = jnp.minimum(math.log(cfg.crop_ratio[1]), jnp.log(1.0 / (scale * aspect)))
    log_lo = jnp.minimum(log_lo, log_hi)
    ratio = jnp.exp(log_lo + (log_hi - log_lo) * u[1])
    # Box width/height as fractions of the image width/height: w*h = scale, (w W)/(h H) = ratio.
    wf = jnp.minimum(jnp.sqrt(scale * ratio * aspect), 1.0)
    hf = jnp.minimum(jnp.sqrt(scale / (ratio * aspect)), 1.0)
    false = jnp.zeros((), bool)
    hflip = (u[4] < 0.5) if cfg.hflip else false
    vflip = (u[5] < 0.5) if cfg.vflip else false
    k = jnp.minimum(jnp.floor(u[6] * 4), 3).astype(jnp.int32) if cfg.rot90 else jnp.int32(0)
    flip_rows, flip_cols, transpose = _dihedral(hflip, vflip, k)
    return dict(y0=u[2] * (1.0 - hf), x0=u[3] * (1.0 - wf), hf=hf, wf=wf, flip_rows=flip_rows,
                flip_cols=flip_cols, transpose=transpose)


def _dihedral(
    hflip: jax.Array, vflip: jax.Array, k: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reduces "flip (h, v), then rotate k times like np.rot90" to (flip_rows, flip_cols,
    transpose): flip the rows/columns of the resampled image, then optionally transpose it.

    Uses np.rot90(A) == flipud(A.T) and transpose(flip_rows(A)) == flip_cols(transpose(A)).
    """
    flip_rows, flip_cols = jnp.asarray(vflip, bool), jnp.asarray(hflip, bool)
    transpose = jnp.zeros((), bool)
    for r in range(3):
        apply = k > r
        transpose = transpose ^ apply
        flip_rows = jnp.where(apply & ~transpose, ~flip_rows, flip_rows)
        flip_cols = jnp.where(apply & transpose, ~flip_cols, flip_cols)
    return flip_rows, flip_cols, transpose


def _axis_coords(
    start: jax.Array, frac: jax.Array, size: int, out: int, flip: jax.Array
) -> jax.Array:
    """Source pixel coordinates [out] of the output pixel centres along one axis."""
    i = jnp.arange(out, dtype=jnp.float32)
    i = jnp.where(flip, (out - 1) - i, i)
    return start * size + (i + 0.5) * (frac * size / out) - 0.5


def _interp_rows(x: jax.Array, coords: jax.Array, axis: int) -> jax.Array:
    """Linear interpolation of `x` along `axis` at fractional `coords` (edge clamp), by
    gathering whole slices (rows): cheap, since each slice is contiguous."""
    n = x.shape[axis]
    c = jnp.clip(coords, 0.0, n - 1)
    i0 = jnp.floor(c).astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = coords.shape[0]
    w1 = (c - i0).astype(x.dtype).reshape(shape)
    a = jnp.take(x, i0, axis=axis, mode="clip")
    b = jnp.take(x, i1, axis=axis, mode="clip")
    return a + (b - a) * w1


def _interp_matrix(coords: jax.Array, n: int, dtype: jnp.dtype) -> jax.Array:
    """[len(coords), n] linear-interpolation weights (two non-zeros per row, edge clamp)."""
    c = jnp.clip(coords, 0.0, n - 1)
    i0 = jnp.floor(c).astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, n - 1)
    w1 = (c - i0)[:, None]
    return (jax.nn.one_hot(i0, n, dtype=jnp.float32) * (1.0 - w1)
            + jax.nn.one_hot(i1, n, dtype=jnp.float32) * w1).astype(dtype)


def _resample(img: jax.Array, sp: dict, out: int) -> jax.Array:
    """Applies a spatial transform to images [..., H, W, C] -> [..., out, out, C].

    Separable bilinear resampling: rows by gathering the two neighbouring rows (contiguous
    slices), columns by a small matrix product with the interpolation matrix (a gather of
    C-sized slices would be slow). Weights of exactly 0 and 1 make full-size crops and flips
    exact.
    """
    h, w = img.shape[-3], img.shape[-2]
    y = _interp_rows(img, _axis_coords(sp["y0"], sp["hf"], h, out, sp["flip_rows"]), axis=-3)
    rx = _interp_matrix(_axis_coords(sp["x0"], sp["wf"], w, out, sp["flip_cols"]), w, img.dtype)
    y = jnp.einsum("pw,...owc->...opc", rx, y, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(sp["transpose"], jnp.swapaxes(y, -3, -2), y)


def _jitter_s2(x: jax.Array, u: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Per-band contrast (multiplicative) then brightness (additive); x [H, W, C] normalised,
    u [2C] uniforms. The gain acts about 0, i.e. about the dataset band mean."""
    c = x.shape[-1]
    v = (2.0 * u - 1.0).astype(x.dtype)  # U(-1, 1)
    if cfg.contrast > 0:
        x = x * jnp.maximum(1.0 + cfg.contrast * v[:c], 0.0)
    if cfg.brightness > 0:
        x = x + cfg.brightness * v[c:]
    return x


def _sar_inv_std(cfg: AugmentConfig, c: int, dtype: jnp.dtype) -> jax.Array:
    if cfg.sar_std_db is None:
        return jnp.ones((c,), dtype)
    if len(cfg.sar_std_db) != c:
        raise ValueError(f"sar_std_db has {len(cfg.sar_std_db)} entries but S1 has {c} channels")
    return 1.0 / jnp.asarray(cfg.sar_std_db, dtype)


def _jitter_s1(x: jax.Array, u: jax.Array, noise: jax.Array | None,
               cfg: AugmentConfig) -> jax.Array:
    """Adds dB noise (noise: standard normal like x, or None) and a per-image dB offset (u: one
    uniform), converted to the units of x; x [H, W, C]."""
    delta = jnp.zeros((), x.dtype)
    if noise is not None and cfg.sar_noise_db > 0:
        delta = delta + cfg.sar_noise_db * noise.astype(x.dtype)
    if cfg.sar_offset_db > 0:
        delta = delta + cfg.sar_offset_db * (2.0 * u.astype(x.dtype) - 1.0)
    if cfg.sar_noise_db == 0 and cfg.sar_offset_db == 0:
        return x
    return x + delta * _sar_inv_std(cfg, x.shape[-1], x.dtype)


def _uniform_from_bits(bits: jax.Array) -> jax.Array:
    """uint32 random bits -> float32 uniforms in [0, 1) (23 mantissa bits)."""
    one = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
    return one - 1.0


def _normal_from_bits(bits: jax.Array, c: int) -> jax.Array:
    """Standard normals [..., c] from uint32 bits [..., ceil(c / 2)]: Box-Muller on two 16-bit
    uniforms per word, both outputs used (noise quantisation 2**-16, tails to 4.7 sigma: ample
    for augmentation, and half the random bits of `jax.random.normal`)."""
    u1 = ((bits >> 16).astype(jnp.float32) + 0.5) * (1.0 / 65536.0)  # (0, 1)
    u2 = ((bits & jnp.uint32(0xFFFF)).astype(jnp.float32) + 0.5) * (1.0 / 65536.0)
    r = jnp.sqrt(-2.0 * jnp.log(u1))
    theta = (2.0 * math.pi) * u2
    return jnp.concatenate([r * jnp.cos(theta), r * jnp.sin(theta)], axis=-1)[..., :c]


def _draw(key: jax.Array, cfg: AugmentConfig, num_views: int, num_u: int, c1: int
          ) -> tuple[jax.Array, jax.Array | None]:
    """All random numbers of one sample from ONE draw of random bits from its `key`: uniforms
    [num_views, num_u] and, when SAR noise is on, standard normals [num_views, o, o, c1].
    """
    words = 0
    noise_words = None
    if c1 > 0 and cfg.sar_noise_db > 0:
        noise_words = (num_views, cfg.out_size, cfg.out_size, (c1 + 1) // 2)
        words = math.prod(noise_words[1:])
    bits = jax.random.bits(key, (num_views, num_u + words), jnp.uint32)
    u = _uniform_from_bits(bits[:, :num_u])
    if noise_words is None:
        return u, None
    return u, _normal_from_bits(bits[:, num_u:].reshape(noise_words), c1)


def _pair_view(u: jax.Array, noise: jax.Array | None, s1: jax.Array, s2: jax.Array,
               cfg: AugmentConfig) -> tuple[jax.Array, jax.Array]:
    """One view of one sample: s1 [H1, W1, c1], s2 [H2, W2, c2] -> [o, o, c1], [o, o, c2]."""
    c2 = s2.shape[-1]
    sp2 = _spatial_from_uniform(u[:_SPATIAL], cfg, s2.shape[-3], s2.shape[-2])
    rest = u[_SPATIAL:]
    if cfg.share_spatial:
        sp1 = sp2
    else:
        sp1 = _spatial_from_uniform(rest[:_SPATIAL], cfg, s1.shape[-3], s1.shape[-2])
        rest = rest[_SPATIAL:]
    y2 = _jitter_s2(_resample(s2, sp2, cfg.out_size), rest[: 2 * c2], cfg)
    y1 = _jitter_s1(_resample(s1, sp1, cfg.out_size), rest[2 * c2], noise, cfg)
    return y1, y2


def _check_image(x: jax.Array, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be [B, H, W, C], got shape {x.shape}")


def _out_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


@functools.partial(jax.jit, static_argnames=("cfg", "num_views", "compute_dtype"))
def paired_views(
    keys: jax.Array, s1: jax.Array, s2: jax.Array, cfg: AugmentConfig, num_views: int = 2,
    compute_dtype: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """`num_views` independently augmented views of a batch of co-registered S1/S2 pairs.

    Args:
      keys: [B] PRNG keys, one per sample (a sample's views depend only on its key and pixels).
      s1: [B, H, W, c1] normalised SAR batch; s2: [B, H, W, c2] normalised optical batch (same B;
        H, W may differ between modalities: the crop box is shared in relative coordinates).
      cfg: AugmentConfig (static).
      num_views: V >= 1 (static).
      compute_dtype: dtype of the image arithmetic and of the views (static). None: float32
        (float64 for float64 inputs), views in the input dtypes. A bfloat16 model passes
        bfloat16: it reads the views in bfloat16 anyway, and on TPU the float32 interpolation
        at full precision costs several times the memory traffic (benchmarks/RESULTS.md).

    Returns:
      (s1 views [V, B, out, out, c1], s2 views [V, B, out, out, c2]). With
      `cfg.share_spatial`, the S1 and S2 of one view share one crop/flip/rotation per sample;
      every sample and view draws its own transform.
    """
    _check_image(s1, "s1")
    _check_image(s2, "s2")
    if s1.shape[0] != s2.shape[0]:
        raise ValueError(f"batch sizes differ: s1 {s1.shape}, s2 {s2.shape}")
    if keys.ndim < 1 or keys.shape[0] != s1.shape[0]:
        raise ValueError(f"keys must hold one PRNG key per sample: keys {keys.shape}, "
                         f"s1 {s1.shape}")
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    if compute_dtype is None:
        d1, d2 = _out_dtype(s1.dtype), _out_dtype(s2.dtype)
        s1c, s2c = s1.astype(_compute_dtype(s1.dtype)), s2.astype(_compute_dtype(s2.dtype))
    else:
        d1 = d2 = jnp.dtype(compute_dtype)
        s1c, s2c = s1.astype(d1), s2.astype(d2)
    num_u = _num_uniforms(cfg, s2.shape[-1])

    def per_sample(key, a, b):  # -> [V, o, o, c1], [V, o, o, c2]
        u, noise = _draw(key, cfg, num_views, num_u, a.shape[-1])
        return jax.vmap(lambda u_, n_: _pair_view(u_, n_, a, b, cfg))(u, noise)

    y1, y2 = jax.vmap(per_sample, out_axes=1)(keys, s1c, s2c)
    return y1.astype(d1), y2.astype(d2)


@functools.partial(jax.jit, static_argnames=("out_size",))
def center_resize(x: jax.Array, out_size: int) -> jax.Array:
    """Deterministic evaluation transform: central square crop of side min(H, W), bilinear
    resize to out_size.

    Args:
      x: [..., H, W, C] images (any leading dims).
      out_size: side of the square output, pixels.

    Returns:
      [..., out_size, out_size, C] in the input float dtype; identity when out_size == H == W.
    """
    if x.ndim < 3:
        raise ValueError(f"x must be [..., H, W, C], got shape {x.shape}")
    h, w = x.shape[-3], x.shape[-2]
    side = min(h, w)
    hf, wf = side / h, side / w
    f = jnp.zeros((), bool)
    sp = dict(y0=jnp.float32((1 - hf) / 2), x0=jnp.float32((1 - wf) / 2), hf=jnp.float32(hf),
              wf=jnp.float32(wf), flip_rows=f, flip_cols=f, transpose=f)
    y = _resample(x.astype(_compute_dtype(x.dtype)), sp, out_size)
    return y.astype(_out_dtype(x.dtype))
