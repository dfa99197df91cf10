"""ConvNeXt-V2 encoders as timm state dicts: names and shapes equal timm's ``convnextv2_*``
models (built here from timm's module layout, without timm), and a NumPy forward pass of timm's
ConvNeXt computation (NCHW) on the written tensors gives the Flax encoder's features."""

import jax
import numpy as np
import pytest
from scipy.special import erf

from mosaic_jax.export import timm_convnext
from mosaic_jax.models.convnext import VARIANTS, ConvNeXtV2
from mosaic_jax.models.towers import build_encoder


def expected_timm_shapes(depths, dims, in_chans, *, conv_mlp, num_classes=0):
    """timm ConvNeXt(use_grn=True, ls_init_value=None, conv_mlp=...) state-dict shapes: patch
    stem (Conv2d 4x4 + LayerNorm), stage 0 without downsample, stages i >= 1 with
    downsample (LayerNorm, Conv2d 2x2), blocks conv_dw / norm / mlp (fc1, grn, fc2),
    NormMlpClassifierHead (head.norm, head.fc when num_classes > 0)."""
    def linear(out, inp):
        return (out, inp, 1, 1) if conv_mlp else (out, inp)

    shapes = {"stem.0.weight": (dims[0], in_chans, 4, 4), "stem.0.bias": (dims[0],),
              "stem.1.weight": (dims[0],), "stem.1.bias": (dims[0],)}
    for i, (depth, d) in enumerate(zip(depths, dims, strict=True)):
        if i > 0:
            p = f"stages.{i}.downsample"
            shapes.update({f"{p}.0.weight": (dims[i - 1],), f"{p}.0.bias": (dims[i - 1],),
                           f"{p}.1.weight": (d, dims[i - 1], 2, 2), f"{p}.1.bias": (d,)})
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}"
            shapes.update({
                f"{p}.conv_dw.weight": (d, 1, 7, 7), f"{p}.conv_dw.bias": (d,),
                f"{p}.norm.weight": (d,), f"{p}.norm.bias": (d,),
                f"{p}.mlp.fc1.weight": linear(4 * d, d), f"{p}.mlp.fc1.bias": (4 * d,),
                f"{p}.mlp.grn.weight": (4 * d,), f"{p}.mlp.grn.bias": (4 * d,),
                f"{p}.mlp.fc2.weight": linear(d, 4 * d), f"{p}.mlp.fc2.bias": (d,)})
    shapes.update({"head.norm.weight": (dims[-1],), "head.norm.bias": (dims[-1],)})
    if num_classes:
        shapes.update({"head.fc.weight": (num_classes, dims[-1]), "head.fc.bias": (num_classes,)})
    return shapes


def random_params(model, in_chans, size, seed):
    """Initialised params with every leaf replaced by random values (GRN's zero init would hide
    a wrong mapping of its parameters)."""
    x = np.zeros((1, size, size, in_chans), np.float32)
    params = model.init(jax.random.key(seed), x, train=False)["params"]
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [
        (1.0 + 0.2 * rng.normal(size=np.shape(v))) if np.ndim(v) == 1 and "scale" in str(k)
        else 0.2 * rng.normal(size=np.shape(v))
        for (k, _), v in zip(jax.tree_util.tree_flatten_with_path(params)[0], leaves,
                             strict=True)])


def layer_norm_nchw(x, w, b, eps=1e-6):
    mean = x.mean(axis=1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w[None, :, None, None] + b[None, :, None, None]


def patch_conv(x, w, b):
    """Conv2d with kernel = stride = k, no padding: [B, C, H, W] -> [B, O, H/k, W/k]."""
    bsz, c, h, wd = x.shape
    k = w.shape[-1]
    patches = x.reshape(bsz, c, h // k, k, wd // k, k)
    return np.einsum("bcikjl,ockl->boij", patches, w) + b[None, :, None, None]


def depthwise7(x, w, b):
    xp = np.pad(x, ((0, 0), (0, 0), (3, 3), (3, 3)))
    h, wd = x.shape[2:]
    out = sum(xp[:, :, u:u + h, v:v + wd] * w[None, :, 0, u, v, None, None]
              for u in range(7) for v in range(7))
    return out + b[None, :, None, None]


def pointwise(x, w, b):
    w = w.reshape(w.shape[0], w.shape[1])  # [out, in] from Linear or a 1x1 Conv2d
    return np.einsum("bchw,oc->bohw", x, w) + b[None, :, None, None]


def timm_convnext_features(sd, x, depths):
    """timm ConvNeXt (convnextv2 settings) forward in float64 NCHW: the pooled, head-normed
    features (``num_classes=0``)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    x = patch_conv(x, sd["stem.0.weight"], sd["stem.0.bias"])
    x = layer_norm_nchw(x, sd["stem.1.weight"], sd["stem.1.bias"])
    for i, depth in enumerate(depths):
        if i > 0:
            p = f"stages.{i}.downsample"
            x = layer_norm_nchw(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"])
            x = patch_conv(x, sd[f"{p}.1.weight"], sd[f"{p}.1.bias"])
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}"
            y = depthwise7(x, sd[f"{p}.conv_dw.weight"], sd[f"{p}.conv_dw.bias"])
            y = layer_norm_nchw(y, sd[f"{p}.norm.weight"], sd[f"{p}.norm.bias"])
            y = pointwise(y, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])
            y = 0.5 * y * (1.0 + erf(y / np.sqrt(2.0)))  # nn.GELU (exact)
            g = np.sqrt((y ** 2).sum(axis=(2, 3), keepdims=True))  # GlobalResponseNorm
            n = g / (g.mean(axis=1, keepdims=True) + 1e-6)
            y = (y + sd[f"{p}.mlp.grn.bias"][None, :, None, None]
                 + sd[f"{p}.mlp.grn.weight"][None, :, None, None] * (y * n))
            x = x + pointwise(y, sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
    pooled = x.mean(axis=(2, 3))[:, :, None, None]
    return layer_norm_nchw(pooled, sd["head.norm.weight"], sd["head.norm.bias"])[:, :, 0, 0]


@pytest.mark.parametrize("name,width,conv_mlp", [("convnextv2_atto", 1 / 8, True),
                                                 ("convnextv2_tiny", 1 / 16, False)])
def test_names_shapes_and_forward_equal_timm(name, width, conv_mlp):
    variant = name.removeprefix("convnextv2_")
    assert (variant in timm_convnext.CONV_MLP_VARIANTS) == conv_mlp
    model = build_encoder(name, width_multiplier=width)
    depths, dims = model.depths, model.dims
    params = random_params(model, 3, 32, seed=1)
    classifier = {"kernel": np.ones((dims[-1], 5)), "bias": np.arange(5.0)}
    sd = timm_convnext.timm_state_dict(params, conv_mlp=conv_mlp, classifier=classifier)
    want = expected_timm_shapes(depths, dims, 3, conv_mlp=conv_mlp, num_classes=5)
    assert {k: v.shape for k, v in sd.items()} == want
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in sd.values())
    np.testing.assert_array_equal(sd["head.fc.bias"], np.arange(5.0))

    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(model.apply({"params": params}, x, train=False))
    ref = timm_convnext_features(sd, x.transpose(0, 3, 1, 2).astype(np.float64), depths)
    assert np.std(ours) > 0.1
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-4)


def test_create_model_call_names_dims_only_when_scaled():
    tiny = VARIANTS["tiny"][1]
    assert timm_convnext.timm_create_model_call("convnextv2_tiny", 12, 0, tiny) == (
        "timm.create_model('convnextv2_tiny', pretrained=False, in_chans=12, num_classes=0)")
    assert timm_convnext.timm_create_model_call("convnextv2_atto", 2, 19, (5, 10, 20, 40)) == (
        "timm.create_model('convnextv2_atto', pretrained=False, in_chans=2, num_classes=19, "
        "dims=(5, 10, 20, 40))")


def test_a_resnet_parameter_is_rejected_by_name():
    with pytest.raises(ValueError, match="not a timm ConvNeXt-V2 parameter: layer1_0/conv1"):
        timm_convnext.timm_state_dict({"layer1_0": {"conv1": {"kernel": np.zeros((3, 3, 4, 4))}}},
                                      conv_mlp=False)


def test_timm_loads_the_state_dict_and_gives_the_same_features():
    """Where timm and torch are installed: timm's own model loads the tensors strictly and its
    features equal the Flax encoder's."""
    timm = pytest.importorskip("timm", reason="timm (and torch) not installed")
    import torch

    model = ConvNeXtV2(depths=VARIANTS["atto"][0], dims=(8, 16, 24, 32))
    params = random_params(model, 4, 32, seed=3)
    sd = timm_convnext.timm_state_dict(params, conv_mlp=True)
    call = timm_convnext.timm_create_model_call("convnextv2_atto", 4, 0, (8, 16, 24, 32))
    net = eval(call, {"timm": timm})
    net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    net.eval()
    x = np.random.default_rng(4).normal(size=(2, 32, 32, 4)).astype(np.float32)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    ours = np.asarray(model.apply({"params": params}, x, train=False))
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
