"""Tests for mosaic_jax.models (tiny widths, small images: fast on one CPU core).

The sharding tests need the 8 forced CPU devices that tests/conftest.py sets up.
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mosaic_jax.models import (
    ENCODER_NAMES,
    GRN,
    BasicBlock,
    Bottleneck,
    ConvNeXtV2,
    DropPath,
    ProjectionHead,
    ResNet,
    SingleTower,
    TwoTower,
    build_encoder,
    convnext_v2,
    encoder_num_features,
)

TINY = 0.0625  # ResNet width 64 -> 4


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_variables(model, channels: int = 3, size: int = 64):
    """Variable shapes without allocating or computing anything."""
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def rand(seed: int, shape, dtype=jnp.float32) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def fake_init(model, *args, seed: int = 0, **kwargs):
    """Variables with the model's exact layout, filled from numpy (no RNG compilation).

    Threefry-based ``model.init`` takes tens of seconds to compile on a loaded CPU, so tests
    that do not test the initialisers use this: kernels ~ N(0, 1/fan_in), scales/vars ~ 1,
    everything else (biases, GRN gamma/beta, running means) small and non-zero.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        noise = rng.standard_normal(s.shape).astype(np.float32)
        if name == "kernel":
            return jnp.asarray(noise / np.sqrt(np.prod(s.shape[:-1])))
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * noise)
        if name == "var":
            return jnp.asarray(1.0 + 0.1 * np.abs(noise))
        return jnp.asarray(0.1 * noise)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def fast_key(seed: int = 0) -> jax.Array:
    """An "rbg" key: real ``init`` compiles in seconds instead of tens of seconds on CPU."""
    return jax.random.key(seed, impl="rbg")


# --------------------------------------------------------------------------- encoders


EXPECTED_TINY_FEATURES = {
    "resnet18": 32,
    "resnet34": 32,
    "resnet50": 128,
    "convnextv2_atto": 20,  # 320 / 16
    "convnextv2_nano": 40,
    "convnextv2_tiny": 48,
    "convnextv2_base": 64,
}


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_build_encoder_shapes(name: str) -> None:
    """Shapes and dtypes by abstract evaluation (real forwards run in the tests below)."""
    assert set(ENCODER_NAMES) == set(EXPECTED_TINY_FEATURES)
    model = build_encoder(name, width_multiplier=TINY)
    x = jax.ShapeDtypeStruct((2, 32, 32, 5), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(1), x, train=False), x)
    f = EXPECTED_TINY_FEATURES[name]
    assert encoder_num_features(name, TINY) == f
    assert model.num_features == f
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))

    y_train, updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
    )
    assert y_train.shape == (2, f) and y_train.dtype == jnp.float32
    if name.startswith("resnet"):
        assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
            variables["batch_stats"]
        )
    else:
        assert "batch_stats" not in variables

    xb = jax.ShapeDtypeStruct((2, 32, 32, 5), jnp.bfloat16)
    y16 = jax.eval_shape(
        lambda v, x: build_encoder(name, width_multiplier=TINY, dtype=jnp.bfloat16).apply(
            v, x, train=False
        ),
        variables,
        xb,
    )
    assert y16.shape == (2, f) and y16.dtype == jnp.float32


def test_build_encoder_errors() -> None:
    with pytest.raises(ValueError, match="resnet18.*convnextv2_base"):
        build_encoder("vit_b16")
    with pytest.raises(ValueError):
        build_encoder("convnextv2_tiny", stem="iai")
    with pytest.raises(ValueError):
        encoder_num_features("resnet101")


def test_width_multiplier_rounding() -> None:
    assert build_encoder("resnet18", width_multiplier=TINY).width == 4
    assert build_encoder("resnet18", width_multiplier=1e-3).width == 1
    assert build_encoder("convnextv2_tiny", width_multiplier=TINY).dims == (6, 12, 24, 48)
    assert build_encoder("convnextv2_atto", width_multiplier=TINY).dims == (3, 5, 10, 20)
    assert convnext_v2("base").dims == (128, 256, 512, 1024)
    with pytest.raises(ValueError):
        convnext_v2("huge-ish")


# --------------------------------------------------------------------------- parameter counts


def resnet_count_formula(depth: int, in_ch: int) -> tuple[int, int]:
    """(params, batch-stat entries) of a torchvision ResNet without fc, counted by hand."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    params = 7 * 7 * in_ch * 64 + 2 * 64
    bn_channels = 64
    c_in = 64
    for stage, n in enumerate(blocks):
        mid = 64 * 2**stage
        for j in range(n):
            if depth == 50:
                out = 4 * mid
                params += c_in * mid + 9 * mid * mid + mid * out
                bn = mid + mid + out
            else:
                out = mid
                params += 9 * c_in * mid + 9 * mid * mid
                bn = mid + mid
            if j == 0 and (stage > 0 or c_in != out):
                params += c_in * out
                bn += out
            params += 2 * bn
            bn_channels += bn
            c_in = out
    return params, 2 * bn_channels


def convnext_v2_count_formula(depths, dims, in_ch: int) -> int:
    """Parameters of a ConvNeXt-V2 backbone (with the final LayerNorm, without the fc head)."""
    total = 4 * 4 * in_ch * dims[0] + dims[0] + 2 * dims[0]  # stem conv + LN
    for i, (n, d) in enumerate(zip(depths, dims, strict=True)):
        if i > 0:
            total += 2 * dims[i - 1] + 2 * 2 * dims[i - 1] * d + d  # LN + 2x2 conv
        # dwconv (49d + d), LN (2d), pw1 (4d^2 + 4d), GRN (8d), pw2 (4d^2 + d)
        total += n * (8 * d * d + 65 * d)
    return total + 2 * dims[-1]


@pytest.mark.parametrize(
    "depth, torchvision_no_fc",
    [
        # torchvision totals minus the fc layer: 11,689,512 - 513,000; 21,797,672 - 513,000;
        # 25,557,032 - 2,049,000.
        (18, 11_176_512),
        (34, 21_284_672),
        (50, 23_508_032),
    ],
)
def test_resnet_param_counts(depth: int, torchvision_no_fc: int) -> None:
    v = abstract_variables(ResNet(depth=depth))
    formula, stats = resnet_count_formula(depth, 3)
    assert formula == torchvision_no_fc
    assert n_params(v["params"]) == torchvision_no_fc
    assert n_params(v["batch_stats"]) == stats
    # Other input channels only change the first conv: S1 (2) and S2 (10) bands.
    for c in (2, 10):
        v = abstract_variables(ResNet(depth=depth), channels=c)
        assert n_params(v["params"]) == torchvision_no_fc + 7 * 7 * 64 * (c - 3)
        assert n_params(v["params"]) == resnet_count_formula(depth, c)[0]


def test_resnet_param_dtype_and_features() -> None:
    v = abstract_variables(ResNet(depth=50, dtype=jnp.bfloat16))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))
    assert ResNet(depth=50).num_features == 2048
    assert ResNet(depth=18).num_features == 512


@pytest.mark.parametrize(
    "variant, with_head",
    [
        # Published totals incl. the 1000-class head (norm + Linear(dims[-1], 1000)):
        # atto 3.7M, nano 15.6M, tiny 28.6M, base 89M.
        ("atto", 3_708_400),
        ("nano", 15_623_800),
        ("tiny", 28_635_496),
        ("base", 88_717_800),
    ],
)
def test_convnext_v2_param_counts(variant: str, with_head: int) -> None:
    model = convnext_v2(variant)
    backbone = n_params(abstract_variables(model)["params"])
    assert backbone == convnext_v2_count_formula(model.depths, model.dims, 3)
    assert backbone + model.dims[-1] * 1000 + 1000 == with_head
    if variant == "tiny":
        assert backbone == 27_866_496
        # Cross-check with torchvision's ConvNeXt-V1 tiny (28,589,128): V2 drops the layer
        # scale (d per block) and adds GRN (8d per block).
        assert with_head == 28_589_128 + 7 * sum(
            n * d for n, d in zip(model.depths, model.dims, strict=True)
        )


# --------------------------------------------------------------------------- structure / names


def test_resnet_layer_names() -> None:
    p18 = abstract_variables(ResNet(depth=18, width=4))["params"]
    expected = {"conv1", "bn1"} | {f"layer{i}_{j}" for i in range(1, 5) for j in range(2)}
    assert set(p18) == expected
    assert set(p18["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert set(p18["layer2_0"]) == {
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "downsample_conv",
        "downsample_bn",
    }
    assert set(p18["layer2_0"]["bn1"]) == {"scale", "bias"}
    assert p18["conv1"]["kernel"].shape == (7, 7, 3, 4)

    p50 = abstract_variables(ResNet(depth=50, width=4))["params"]
    assert set(p50["layer1_0"]) == {
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "conv3",
        "bn3",
        "downsample_conv",
        "downsample_bn",
    }
    assert "downsample_conv" not in p50["layer1_1"]
    assert {k for k in p50 if k.startswith("layer3_")} == {f"layer3_{j}" for j in range(6)}
    # v1.5: the stride sits on the 3x3 conv; the 1x1 convs keep kernel (1, 1).
    assert p50["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 8, 8)
    assert p50["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 16, 32)


def test_block_initialisers() -> None:
    """Real initialisers: BN scales 1, biases 0, He-normal (fan_out) conv kernels."""
    x = rand(0, (2, 8, 8, 8))
    blocks = {
        "basic": (BasicBlock(8, stride=2), "bn2"),
        "bottleneck": (Bottleneck(4), "bn3"),
    }
    init_all = jax.jit(lambda key: {k: m.init(key, x, train=False) for k, (m, _) in blocks.items()})
    inits = init_all(fast_key())
    for kind, (_, last) in blocks.items():
        v = inits[kind]
        p = v["params"]
        np.testing.assert_array_equal(p[last]["scale"], 1.0)
        np.testing.assert_array_equal(p["bn1"]["scale"], 1.0)
        np.testing.assert_array_equal(p["downsample_bn"]["scale"], 1.0)
        np.testing.assert_array_equal(p["bn1"]["bias"], 0.0)
        np.testing.assert_array_equal(v["batch_stats"]["bn1"]["var"], 1.0)
        # He-normal (fan_out) conv kernels, no conv biases.
        assert set(p["conv2"]) == {"kernel"}
        k = np.asarray(p["conv2"]["kernel"])
        fan_out = k.shape[0] * k.shape[1] * k.shape[3]
        assert 0.5 < k.std() * np.sqrt(fan_out / 2.0) < 1.5


@pytest.mark.parametrize("depth", [18, 50])
def test_iai_stem_has_no_maxpool(depth: int) -> None:
    """120 px: conv1 -> 60; standard: max-pool -> 30, stages 30, 15, 8, 4; iai: 60, 30, 15, 8."""
    x = jax.ShapeDtypeStruct((1, 120, 120, 2), jnp.float32)
    c = 4 * (4 if depth == 50 else 1)
    expected = {"standard": (30, 4), "iai": (60, 8)}  # (layer1 output, final map) sizes
    trees = {}
    for stem, (s1, s4) in expected.items():
        model = ResNet(depth=depth, width=4, stem=stem)
        variables = jax.eval_shape(lambda x, m=model: m.init(jax.random.key(0), x, train=False), x)
        trees[stem] = jax.tree.map(lambda a: a.shape, variables)
        _, state = jax.eval_shape(
            lambda v, x, m=model: m.apply(
                v, x, train=False, capture_intermediates=True, mutable=["intermediates"]
            ),
            variables,
            x,
        )
        inter = state["intermediates"]
        assert inter["bn1"]["__call__"][0].shape == (1, 60, 60, 4)  # the stem conv
        assert inter["layer1_0"]["__call__"][0].shape == (1, s1, s1, c)
        assert inter["feature_map"][0].shape == (1, s4, s4, 8 * c)
    assert trees["standard"] == trees["iai"]  # the max-pool has no parameters


# --------------------------------------------------------------------------- precision


def _relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", ["resnet18", "convnext"])
def test_bf16_compute_close_to_fp32(name: str) -> None:
    if name == "resnet18":

        def make(dtype):
            return ResNet(depth=18, width=4, stem="iai", dtype=dtype)
    else:

        def make(dtype):
            return ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), dtype=dtype)

    x = rand(0, (8, 32, 32, 4))
    m32, m16 = make(jnp.float32), make(jnp.bfloat16)
    variables = fake_init(m32, x, train=False)
    shapes16 = jax.eval_shape(lambda: m16.init(jax.random.key(0), x, train=False))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes16))
    assert jax.tree.map(lambda a: a.shape, shapes16) == jax.tree.map(jnp.shape, variables)

    has_bn = "batch_stats" in variables

    @jax.jit
    def both(v, x):
        out = {}
        for tag, m, xi in (("32", m32, x), ("16", m16, x.astype(jnp.bfloat16))):
            if has_bn:  # train mode: batch statistics
                out["train" + tag], upd = m.apply(v, xi, train=True, mutable=["batch_stats"])
                out["stats" + tag] = upd["batch_stats"]
            else:  # ConvNeXt: no train/eval difference without drop path
                out["eval" + tag] = m.apply(v, xi, train=False)
        return out

    out = both(variables, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(out))
    if not has_bn:
        err_eval = _relative_error(out["eval16"], out["eval32"])
        assert 0.0 < err_eval < 0.02, err_eval  # bf16 really ran, and stays close
    else:
        # Train-mode BN over few values per channel amplifies rounding a little.
        err_train = _relative_error(out["train16"], out["train32"])
        assert 0.0 < err_train < 0.05, err_train
        for a, b in zip(
            jax.tree.leaves(out["stats16"]), jax.tree.leaves(out["stats32"]), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------- BN synchronisation


def _shard_vs_single(model, ref_model, variables, x, n_dev: int):
    """Train-mode forward of ``model`` under shard_map over ``n_dev`` devices, and of
    ``ref_model`` (no BN axis) on one device with the full batch."""
    mesh = jax.make_mesh((n_dev,), ("data",), devices=jax.devices()[:n_dev])

    def fwd(v, x, m=model):
        return m.apply(v, x, train=True, mutable=["batch_stats"])

    def per_device(v, x):
        y, upd = fwd(v, x)
        # Stack the (possibly device-varying) statistics along a new device axis.
        return y, jax.tree.map(lambda a: a[None], upd["batch_stats"])

    sharded = jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P("data"))
        )
    )
    v_rep = jax.device_put(variables, NamedSharding(mesh, P()))
    x_sh = jax.device_put(x, NamedSharding(mesh, P("data")))
    y_sh, stats_sh = sharded(v_rep, x_sh)
    y_single, upd_single = jax.jit(partial(fwd, m=ref_model))(variables, x)
    return y_sh, stats_sh, y_single, upd_single["batch_stats"]


N_DEV = 8
needs_8_devices = pytest.mark.skipif(
    jax.device_count() < N_DEV, reason="needs 8 (forced CPU) devices; see tests/conftest.py"
)


@needs_8_devices
@pytest.mark.parametrize("kind", ["block", "head"])
def test_bn_sync_across_devices(kind: str) -> None:
    """Numerically: a residual block (stride 2, with downsample BN) and a projection head."""
    if kind == "block":
        x = rand(0, (2 * N_DEV, 8, 8, 4))

        def make(axis):
            return BasicBlock(8, stride=2, bn_axis_name=axis)
    else:
        x = rand(0, (4 * N_DEV, 12))

        def make(axis):
            return ProjectionHead(hidden_dim=16, out_dim=8, bn_axis_name=axis)

    # Non-trivial running statistics, so the momentum update is exercised as well.
    variables = fake_init(make(None), x, train=False)

    y_sh, stats_sh, y_ref, stats_ref = _shard_vs_single(
        make("data"), make(None), variables, x, N_DEV
    )
    np.testing.assert_allclose(y_sh, y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(stats_sh), jax.tree.leaves(stats_ref), strict=True):
        a = np.asarray(a)
        assert a.shape == (N_DEV, *b.shape)
        for d in range(N_DEV):  # every device holds the same, global statistics
            np.testing.assert_allclose(a[d], b, rtol=1e-4, atol=1e-5)

    # Per-device statistics (axis None) give different outputs and statistics.
    y_loc, stats_loc, _, _ = _shard_vs_single(make(None), make(None), variables, x, N_DEV)
    assert not np.allclose(y_loc, y_ref, rtol=1e-3, atol=1e-3)
    means_loc = np.asarray(jax.tree.leaves(stats_loc)[0])
    assert not np.allclose(means_loc[0], means_loc[1], atol=1e-4)


@needs_8_devices
@pytest.mark.parametrize("model_name", ["resnet18", "resnet50", "two_tower"])
def test_bn_axis_reaches_every_batchnorm(model_name: str) -> None:
    """Structurally (tracing only): one cross-device reduction per BatchNorm layer."""
    mesh = jax.make_mesh((N_DEV,), ("data",), devices=jax.devices()[:N_DEV])
    shape = (2 * N_DEV, 16, 16, 3)

    def make(axis):
        if model_name == "two_tower":
            return TwoTower(bn_axis_name=axis, **TOWER_KW)
        return build_encoder(model_name, width_multiplier=TINY, bn_axis_name=axis)

    n_inputs = 2 if model_name == "two_tower" else 1
    plain = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(
        lambda *xs: make(None).init(jax.random.key(0), *xs, train=False), *[plain] * n_inputs
    )
    n_bn = sum(
        1
        for path, _ in jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
        if path[-1].key == "mean"
    )
    rep = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())),
        variables,
    )
    xs = [jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P("data")))]

    counts = {}
    for axis in ("data", None):
        model = make(axis)
        fwd = jax.shard_map(
            lambda v, *xs, m=model: m.apply(v, *xs, train=True, mutable=["batch_stats"])[0],
            mesh=mesh,
            in_specs=(P(), *[P("data")] * n_inputs),
            out_specs=P("data"),
        )
        text = str(jax.make_jaxpr(fwd)(rep, *xs * n_inputs))
        counts[axis] = len(re.findall(r"\bpsum\w*\[", text))
    assert counts == {"data": n_bn, None: 0}
    assert n_bn == {"resnet18": 20, "resnet50": 53, "two_tower": 45}[model_name]


# --------------------------------------------------------------------------- ConvNeXt pieces


def test_grn_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    gamma = rng.normal(size=(7,)).astype(np.float32)
    beta = rng.normal(size=(7,)).astype(np.float32)
    params = jax.jit(GRN().init)(fast_key(), x)["params"]
    assert set(params) == {"gamma", "beta"}
    np.testing.assert_array_equal(params["gamma"], 0.0)  # identity at init
    np.testing.assert_array_equal(GRN().apply({"params": params}, x), x)

    y = GRN().apply({"params": {"gamma": gamma, "beta": beta}}, x)
    xd = x.astype(np.float64)
    g = np.sqrt((xd**2).sum(axis=(1, 2), keepdims=True))  # [B, 1, 1, C]
    n = g / (g.mean(axis=-1, keepdims=True) + 1e-6)
    expected = gamma * (xd * n) + beta + xd
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_drop_path() -> None:
    x = rand(0, (8, 4, 4, 3))
    dp = DropPath(rate=0.5)
    np.testing.assert_array_equal(dp.apply({}, x, train=False), x)
    np.testing.assert_array_equal(DropPath(rate=0.0).apply({}, x, train=True), x)
    y = np.asarray(dp.apply({}, x, train=True, rngs={"dropout": fast_key(3)}))
    xs = np.asarray(x)
    kept = [not np.allclose(y[i], 0.0) for i in range(8)]
    for i in range(8):  # each sample is either dropped or scaled by 1 / keep
        if kept[i]:
            np.testing.assert_allclose(y[i], 2.0 * xs[i], rtol=1e-6)
    assert 0 < sum(kept) < 8


def test_convnext_drop_path_identity_in_eval() -> None:
    kw = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    net_dp = ConvNeXtV2(drop_path_rate=0.5, **kw)
    net = ConvNeXtV2(**kw)
    x = rand(1, (4, 32, 32, 3))
    variables = fake_init(net, x, train=False)  # GRN gamma/beta non-zero

    @jax.jit
    def run(v, x, key):
        rngs = {"dropout": key}
        return (
            net.apply(v, x, train=False),
            net_dp.apply(v, x, train=False),
            net_dp.apply(v, x, train=True, rngs=rngs),
        )

    ref, eval_dp, train_dp = run(variables, x, fast_key(5))
    np.testing.assert_array_equal(eval_dp, ref)
    assert train_dp.shape == ref.shape
    assert not np.allclose(train_dp, ref, atol=1e-4)


def test_convnext_layout() -> None:
    model = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    x = jax.ShapeDtypeStruct((3, 32, 32, 10), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    p = variables["params"]
    assert set(p) == {
        "stem_conv",
        "stem_norm",
        "norm",
        *(f"downsample{i}_{k}" for i in (1, 2, 3) for k in ("norm", "conv")),
        *(f"stage{i}_0" for i in range(4)),
    }
    assert set(p["stage2_0"]) == {"dwconv", "norm", "pwconv1", "grn", "pwconv2"}
    assert p["stage2_0"]["dwconv"]["kernel"].shape == (7, 7, 1, 32)
    assert p["stage2_0"]["pwconv1"]["kernel"].shape == (32, 128)
    assert p["stem_conv"]["kernel"].shape == (4, 4, 10, 8)
    assert p["downsample1_conv"]["kernel"].shape == (2, 2, 8, 16)
    y, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]), variables, x
    )
    assert y.shape == (3, 64) and y.dtype == jnp.float32
    assert state["intermediates"]["feature_map"][0].shape == (3, 1, 1, 64)


# --------------------------------------------------------------------------- towers


TOWER_KW = dict(width_multiplier=TINY, proj_hidden_dim=16, proj_dim=8, num_classes=19)
HEADS = {"intra_s1", "intra_s2", "inter_s1", "inter_s2", "fused"}


@pytest.mark.parametrize("s2_encoder", ["resnet18", "convnextv2_atto"])
def test_two_tower_shapes(s2_encoder: str) -> None:
    # drop_path_rate reaches only a ConvNeXt tower (a ResNet tower accepts and ignores it).
    model = TwoTower(s1_encoder="resnet18", s2_encoder=s2_encoder, drop_path_rate=0.1, **TOWER_KW)
    s1 = jax.ShapeDtypeStruct((3, 32, 32, 2), jnp.float32)
    s2 = jax.ShapeDtypeStruct((3, 32, 32, 10), jnp.float32)
    variables = jax.eval_shape(
        lambda a, b: model.init(jax.random.key(0), a, b, train=False), s1, s2
    )
    assert set(variables["params"]) == {"enc_s1", "enc_s2", "classifier"} | HEADS
    assert HEADS <= set(variables["batch_stats"])
    assert variables["params"]["classifier"]["kernel"].shape == (
        32 + encoder_num_features(s2_encoder, TINY),
        19,
    )

    f2 = encoder_num_features(s2_encoder, TINY)
    expected = {
        "h_s1": (3, 32),
        "h_s2": (3, f2),
        "h_fused": (3, 32 + f2),
        **{k: (3, 8) for k in ("intra_s1", "intra_s2", "inter_s1", "inter_s2", "z_fused")},
        "logits": (3, 19),
    }
    for dtype in (jnp.float32, jnp.bfloat16):
        m = model.clone(dtype=dtype)
        out, updates = jax.eval_shape(
            lambda v, a, b, m=m: m.apply(
                v, a, b, train=True, mutable=["batch_stats"], rngs={"dropout": fast_key()}
            ),
            variables,
            s1,
            s2,
        )
        assert {k: v.shape for k, v in out.items()} == expected
        assert all(v.dtype == jnp.float32 for v in out.values())
        assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
            variables["batch_stats"]
        )


def test_two_tower_forward_and_gradients() -> None:
    model = TwoTower(s1_encoder="resnet18", s2_encoder="resnet18", stem="iai", **TOWER_KW)
    s1 = rand(0, (3, 16, 16, 2))
    s2 = rand(1, (3, 16, 16, 10))
    variables = fake_init(model, s1, s2, train=False)

    # A loss that uses only some heads: the others get exactly zero gradient. (Gradients are
    # taken w.r.t. the heads only, to keep the compile small.)
    encoders = {k: variables["params"][k] for k in ("enc_s1", "enc_s2")}
    heads = {k: v for k, v in variables["params"].items() if k not in encoders}

    @jax.jit
    def loss_and_grad(heads):
        def loss(h):
            out, upd = model.apply(
                {"params": {**encoders, **h}, "batch_stats": variables["batch_stats"]},
                s1,
                s2,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(out["intra_s1"] ** 2), (out, upd)

        return jax.grad(loss, has_aux=True)(heads)

    grads, (out, updates) = loss_and_grad(heads)
    np.testing.assert_array_equal(
        out["h_fused"], np.concatenate([out["h_s1"], out["h_s2"]], axis=-1)
    )
    assert all(np.all(np.isfinite(np.asarray(v))) for v in out.values())
    # The two towers see different inputs and have different weights.
    assert not np.allclose(out["intra_s1"], out["inter_s1"])
    for k in ("inter_s1", "inter_s2", "intra_s2", "fused", "classifier"):
        assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads[k])), k
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads["intra_s1"]))
    # Every head's BN statistics move in train mode.
    for k in HEADS:
        assert not np.allclose(
            updates["batch_stats"][k]["bn"]["mean"], variables["batch_stats"][k]["bn"]["mean"]
        ), k


def test_single_tower() -> None:
    x = jax.ShapeDtypeStruct((2, 32, 32, 12), jnp.float32)  # early fusion: 2 S1 + 10 S2
    for encoder, f in (("resnet18", 32), ("resnet50", 128), ("convnextv2_nano", 40)):
        model = SingleTower(encoder=encoder, stem="standard", **TOWER_KW)
        variables = jax.eval_shape(lambda x, m=model: m.init(jax.random.key(0), x, train=False), x)
        assert set(variables["params"]) == {"enc", "proj", "classifier"}
        out, _ = jax.eval_shape(
            lambda v, x, m=model: m.apply(v, x, train=True, mutable=["batch_stats"]),
            variables,
            x,
        )
        assert {k: v.shape for k, v in out.items()} == {
            "h": (2, f),
            "z": (2, 8),
            "logits": (2, 19),
        }
        assert all(v.dtype == jnp.float32 for v in out.values())


def test_projection_head() -> None:
    head = ProjectionHead(hidden_dim=16, out_dim=8)
    h = rand(0, (4, 32))
    variables = jax.jit(head.init, static_argnames="train")(fast_key(), h, train=False)
    p = variables["params"]
    assert set(p) == {"dense1", "bn", "dense2"}
    assert "bias" not in p["dense1"] and "bias" in p["dense2"]
    assert p["dense1"]["kernel"].shape == (32, 16) and p["dense2"]["kernel"].shape == (16, 8)
    z, upd = head.apply(variables, h, train=True, mutable=["batch_stats"])
    assert z.shape == (4, 8) and z.dtype == jnp.float32
    norms = np.linalg.norm(np.asarray(z), axis=-1)
    assert not np.allclose(norms, 1.0)  # not normalised
    # momentum 0.9: new running mean = 0.9 * 0 + 0.1 * batch mean of the hidden layer.
    hidden = np.asarray(h) @ np.asarray(p["dense1"]["kernel"])
    np.testing.assert_allclose(upd["batch_stats"]["bn"]["mean"], 0.1 * hidden.mean(0), atol=1e-5)


def test_remat_keeps_layout_values_and_gradients() -> None:
    # Rematerialised blocks recompute activations in the backward pass: nothing else changes.
    # One model covers both families: a ResNet S1 tower and a ConvNeXt S2 tower.
    s1, s2 = rand(0, (2, 16, 16, 2)), rand(1, (2, 16, 16, 10))
    plain = TwoTower(s1_encoder="resnet18", s2_encoder="convnextv2_atto", **TOWER_KW)
    remat = plain.clone(remat=True)
    variables = fake_init(plain, s1, s2, train=False)
    assert (jax.tree.map(jnp.shape, jax.eval_shape(partial(remat.init, train=False),
                                                   jax.random.key(0), s1, s2))
            == jax.tree.map(jnp.shape, variables))

    def loss_and_grad(model):
        def loss(params):
            out, upd = model.apply({**variables, "params": params}, s1, s2, train=True,
                                   mutable=["batch_stats"])
            return jnp.sum(out["z_fused"] ** 2) + jnp.sum(out["logits"]), upd

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    (v0, u0), g0 = loss_and_grad(plain)
    (v1, u1), g1 = loss_and_grad(remat)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((g1, u1)), jax.tree.leaves((g0, u0)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The recomputation is really there: the backward pass holds fewer saved activations.
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(remat.apply(
        {**variables, "params": p}, s1, s2, train=True, mutable=["batch_stats"])[0]["z_fused"])))(
            variables["params"]))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
