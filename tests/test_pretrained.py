"""Starting towers from torchvision/timm-named weight files (`mosaic_jax.models.pretrained`).

The files are written here with NumPy in torchvision's and timm's exact layouts (names and shapes
generated independently of the converters), with random weights and BatchNorm statistics.
"""

import builtins
import importlib.util
import json

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from test_convnext_timm import expected_timm_shapes, timm_convnext_features
from test_export import torchvision_resnet_eval

from data_builders import datasets
from mosaic_jax import models
from mosaic_jax.data import bands, input_norm
from mosaic_jax.export import timm_convnext, torchvision_resnet
from mosaic_jax.models import pretrained
from mosaic_jax.training import configuration

BEN_S2 = datasets.get("bigearthnet_v2").bands["s2"]  # 12 L2A bands, no B10


def torchvision_resnet_shapes(depth, width, in_chans, num_classes=0):
    """torchvision ``resnet{depth}(...).state_dict()`` shapes (``width`` = 64 normally)."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[depth]
    bottleneck = depth == 50
    shapes = {"conv1.weight": (width, in_chans, 7, 7)}

    def bn(name, c):
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
                       f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()})

    bn("bn1", width)
    cin = width
    for i, n in enumerate(blocks):
        f = width * 2 ** i
        out = 4 * f if bottleneck else f
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            if bottleneck:
                convs = [(f, cin, 1), (f, f, 3), (out, f, 1)]
            else:
                convs = [(f, cin, 3), (f, f, 3)]
            for k, (o, c, kk) in enumerate(convs, start=1):
                shapes[f"{p}.conv{k}.weight"] = (o, c, kk, kk)
                bn(f"{p}.bn{k}", o)
            if j == 0 and (i > 0 or cin != out):
                shapes[f"{p}.downsample.0.weight"] = (out, cin, 1, 1)
                bn(f"{p}.downsample.1", out)
            cin = out
    if num_classes:
        shapes.update({"fc.weight": (num_classes, cin), "fc.bias": (num_classes,)})
    return shapes


def random_state_dict(shapes, seed):
    """Random tensors: He-scaled kernels, BN scales and variances in [0.5, 1.5], offsets."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = np.asarray(7, np.int64)
        elif len(shape) >= 2:
            fan_in = np.prod(shape[1:])
            out[name] = (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)
        elif name.endswith(("running_var", "weight")):  # BN/LN/GRN scales, variances
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            out[name] = (0.2 * rng.normal(size=shape)).astype(np.float32)
    return out


def _config(s2_encoder="resnet50", s2_init="", s2_init_bands="ssl4eo_s2_l1c", width=1 / 16,
            s2_bands="s2_all", size=32):
    c = configuration.demo_overrides(configuration.base_config("mosaic1"))
    c.model.s2_encoder = s2_encoder
    c.model.s1_encoder = "resnet18"
    c.model.width_multiplier = width
    c.model.stem = "standard"
    c.model.s2_init = s2_init
    c.model.s2_init_bands = s2_init_bands
    c.data.s2_bands = s2_bands
    c.augment.out_size = size
    return c


def _templates(config):
    """Shapes of a fresh model's {"params", "batch_stats"} (nothing compiled)."""
    model = models.create_model(config)
    return jax.eval_shape(lambda: models.init_variables(
        config, model, params_rng=jax.random.key(0), dropout_rng=jax.random.key(1)))


def _write(tmp_path, tensors, name="w.safetensors"):
    path = str(tmp_path / name)
    safetensors.numpy.save_file(tensors, path)
    return path


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    """A TorchGeo-like SSL4EO-S12 S2 ResNet-50 (13 L1C bands, width 4) with an ImageNet fc."""
    sd = random_state_dict(torchvision_resnet_shapes(50, 4, 13, num_classes=7), seed=3)
    return _write(tmp_path_factory.mktemp("r50"), sd), sd


@pytest.fixture(scope="module")
def r50_imported(r50_file):
    path, sd = r50_file
    config = _config(s2_init=path)
    configuration.validate_config(config, 8)
    like = _templates(config)
    params, stats, records = pretrained.import_weights(config, like["params"],
                                                       like["batch_stats"])
    return config, params, stats, records


def test_resnet50_round_trip_is_exact_except_the_dropped_b10_column(r50_file, r50_imported):
    _, sd = r50_file
    _, params, stats, records = r50_imported
    back = torchvision_resnet.resnet_state_dict(params["enc_s2"], stats["enc_s2"],
                                                num_batches_tracked=7)
    assert set(back) == set(sd) - {"fc.weight", "fc.bias"}
    for name, value in back.items():
        if name != "conv1.weight":
            np.testing.assert_array_equal(value, sd[name], err_msg=name)
    kept = [input_norm.SSL4EO_S2_L1C_BANDS.index(b) for b in BEN_S2]
    assert len(kept) == 12 and 10 not in kept  # B10 is channel 10 of the file
    np.testing.assert_array_equal(back["conv1.weight"], sd["conv1.weight"][:, kept])
    (record,) = records
    counters = [k for k in sd if k.endswith(".num_batches_tracked")]
    assert record["dropped_bands"] == ["B10"]
    assert record["tensors"] == len(sd) - 2 - len(counters) == 265
    assert record["ignored"] == sorted(["fc.bias", "fc.weight", *counters])
    assert record["normalisation"] == {"s2": "ssl4eo_s2_l1c"}
    assert "dropped from the file: B10" in pretrained.describe(record)


def test_resnet50_forward_equals_numpy_torchvision_with_b10_fed_as_zeros(r50_file, r50_imported):
    _, sd = r50_file
    config, params, stats, _ = r50_imported
    rng = np.random.default_rng(5)
    raw = rng.uniform(0, 4000, size=(2, 32, 32, 12)).astype(np.float32)  # L2A DN, BEN order
    x = bands.normalize(raw, "bigearthnet_v2", "s2", "s2_all",
                        stats=input_norm.norm_stats(config)["s2"])
    np.testing.assert_allclose(x, raw / 10000, rtol=1e-6)  # SSL4EO: reflectance
    encoder = models.build_encoder("resnet50", width_multiplier=1 / 16)
    ours = np.asarray(jax.jit(lambda v, a: encoder.apply(v, a, train=False))(
        {"params": params["enc_s2"], "batch_stats": stats["enc_s2"]}, x))
    x13 = np.insert(x, 10, 0.0, axis=-1)  # B10 as zeros, channel order of the file
    ref, _ = torchvision_resnet_eval(sd, x13.transpose(0, 3, 1, 2), maxpool=True)
    assert np.std(ref) > 1e-3
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,width,conv_mlp", [("convnextv2_atto", 1 / 8, True),
                                                 ("convnextv2_tiny", 1 / 16, False)])
def test_convnext_import_round_trip_and_forward_equal_timm(tmp_path, name, width, conv_mlp):
    """ImageNet RGB weights of timm's layout into an S2 tower on B04 B03 B02."""
    depths, dims = models.convnext.VARIANTS[name.removeprefix("convnextv2_")]
    dims = tuple(max(1, int(np.floor(d * width + 0.5))) for d in dims)
    sd = random_state_dict(expected_timm_shapes(depths, dims, 3, conv_mlp=conv_mlp,
                                                num_classes=9), seed=4)
    config = _config(s2_encoder=name, s2_init=_write(tmp_path, sd), s2_init_bands="imagenet_rgb",
                     width=width, s2_bands="rgb")
    configuration.validate_config(config, 8)
    like = _templates(config)
    params, _, (record,) = pretrained.import_weights(config, like["params"],
                                                     like["batch_stats"])
    back = timm_convnext.timm_state_dict(params["enc_s2"], conv_mlp=conv_mlp)
    assert set(back) == set(sd) - {"head.fc.weight", "head.fc.bias"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    assert record["normalisation"] == {"s2": "imagenet_rgb"}

    raw = np.random.default_rng(6).uniform(0, 3000, size=(2, 32, 32, 12)).astype(np.float32)
    x = bands.normalize(raw, "bigearthnet_v2", "s2", "rgb",
                        stats=input_norm.norm_stats(config)["s2"])
    rgb = raw[..., [BEN_S2.index(b) for b in ("B04", "B03", "B02")]] / 10000
    np.testing.assert_allclose(x, (rgb - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
                               rtol=1e-5, atol=1e-5)
    encoder = models.build_encoder(name, width_multiplier=width)
    ours = np.asarray(encoder.apply({"params": params["enc_s2"]}, x, train=False))
    ref = timm_convnext_features(sd, x.transpose(0, 3, 1, 2).astype(np.float64), depths)
    assert np.std(ref) > 0.1
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_first_conv_band_mapping_rules():
    w = np.arange(2 * 3 * 1 * 1, dtype=np.float32).reshape(2, 3, 1, 1)
    rgb = ("B04", "B03", "B02")
    got, how = pretrained.map_first_conv(w, rgb, ("B02", "B04"), "error")
    np.testing.assert_array_equal(got, w[:, [2, 0]])
    assert how == {"B02": "B02", "B04": "B04"}
    with pytest.raises(ValueError, match="band B08 of the run is not among the file's bands "
                                         r"\(B04 B03 B02\).*'zeros' or 'repeat'"):
        pretrained.map_first_conv(w, rgb, ("B04", "B08"), "error")
    got, how = pretrained.map_first_conv(w, rgb, ("B04", "B08"), "zeros")
    np.testing.assert_array_equal(got, np.stack([w[:, 0], 0 * w[:, 0]], axis=1))
    assert how["B08"] == "zeros"
    # timm's adapt_input_conv: repeat the columns, keep the first C, scale by 3 / C.
    run = ("B02", "B03", "B04", "B08", "B11")
    got, _ = pretrained.map_first_conv(w, rgb, run, "repeat")
    np.testing.assert_allclose(got, np.concatenate([w, w], axis=1)[:, :5] * 3 / 5)
    got, _ = pretrained.map_first_conv(w, rgb, ("B08",), "repeat")
    np.testing.assert_allclose(got, w.sum(axis=1, keepdims=True))


def _import_error(tmp_path, tensors, **kw):
    config = _config(s2_init=_write(tmp_path, tensors), **kw)
    configuration.validate_config(config, 8)
    like = _templates(config)
    with pytest.raises(ValueError) as info:
        pretrained.import_weights(config, like["params"], like["batch_stats"])
    message = str(info.value)
    assert "\n" not in message and message.startswith("config key 'model.s2_init': ")
    return message


def test_wrong_architecture_missing_extra_and_shape_errors_name_the_tensor(tmp_path):
    r18 = random_state_dict(torchvision_resnet_shapes(18, 4, 13), seed=0)
    assert "it holds a resnet18, but the tower's encoder is resnet50" in _import_error(
        tmp_path, r18)
    r50 = random_state_dict(torchvision_resnet_shapes(50, 4, 13), seed=0)
    missing = {k: v for k, v in r50.items() if k != "layer4.2.bn3.running_var"}
    assert "lacks tensor 'layer4.2.bn3.running_var' that resnet50 needs" in _import_error(
        tmp_path, missing)
    assert "has tensor 'extra.weight' that resnet50 does not have" in _import_error(
        tmp_path, {**r50, "extra.weight": np.zeros(3, np.float32)})
    wide = random_state_dict(torchvision_resnet_shapes(50, 8, 13), seed=0)
    assert ("tensor 'bn1.bias' has shape (8,) in the file, but resnet50 needs (4,)"
            in _import_error(tmp_path, wide))
    assert ("first convolution conv1.weight has 13 input channels (4, 13, 7, 7), but "
            "model.s2_init_bands names 3 bands" in _import_error(
                tmp_path, r50, s2_init_bands="imagenet_rgb", s2_bands="rgb"))


def test_a_band_the_file_lacks_stops_the_import_naming_it(tmp_path):
    sd = random_state_dict(torchvision_resnet_shapes(50, 4, 3), seed=0)
    message = _import_error(tmp_path, sd, s2_init_bands="imagenet_rgb", s2_bands="s2_rgbn")
    assert "band B08 of the run is not among the file's bands (B04 B03 B02)" in message


def test_files_that_are_missing_or_not_state_dicts(tmp_path):
    with pytest.raises(FileNotFoundError, match="config key 'model.s2_init': no such file"):
        pretrained.read_state_dict(str(tmp_path / "nope.safetensors"), "model.s2_init")
    with pytest.raises(FileNotFoundError, match="config key 'model.s2_init': no such file"):
        pretrained.check_files(_config(s2_init=str(tmp_path / "nope.safetensors")))
    pretrained.check_files(_config())  # no weight file: nothing to check
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="bad.safetensors is not a safetensors file"):
        pretrained.read_state_dict(str(bad))
    other = tmp_path / "w.npz"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"is neither \.safetensors nor \.pth/\.pt"):
        pretrained.read_state_dict(str(other))
    with pytest.raises(ValueError, match=r"x.pth is not a state dict .*a dict with keys "
                                         r"\['epoch', 'optimizer'\]"):
        pretrained.unwrap_state_dict({"epoch": 3, "optimizer": {"lr": 0.1}}, "x.pth")
    with pytest.raises(ValueError, match="x.pth is not a state dict.*a list"):
        pretrained.unwrap_state_dict([1, 2], "x.pth")


def test_checkpoint_wrappers_and_name_prefixes_are_unwrapped():
    w = np.zeros((2, 3))
    lightning = {"epoch": 9, "state_dict": {"model.conv1.weight": w, "model.bn1.bias": w[0]}}
    assert set(pretrained.unwrap_state_dict(lightning, "c.ckpt")) == {"conv1.weight", "bn1.bias"}
    nested = {"model": {"module.backbone.conv1.weight": w}}
    assert set(pretrained.unwrap_state_dict(nested, "c.pth")) == {"conv1.weight"}
    plain = {"conv1.weight": w, "fc.bias": w[0]}
    assert pretrained.unwrap_state_dict(plain, "p.pth") == plain


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_a_pth_file_without_torch_names_pip_install_torch(tmp_path):
    path = tmp_path / "moco.pth"
    path.write_bytes(b"PK\x03\x04 a zip that torch.save would write")
    with pytest.raises(ValueError, match=r"^config key 'model.s1_init': reading .*moco.pth \(a "
                                         "PyTorch file\\) needs torch: pip install torch"):
        pretrained.read_state_dict(str(path), "model.s1_init")


def test_pth_import_error_is_the_real_missing_import(tmp_path, monkeypatch):
    """The .pth branch catches ImportError of `import torch` itself (forced here)."""
    real = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    path = tmp_path / "m.pt"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="needs torch: pip install torch"):
        pretrained.read_state_dict(str(path))


def test_normalisation_presets_and_the_default_are_what_they_say():
    c = configuration.base_config("mosaic1")
    for m in ("s1", "s2"):  # default: the dataset statistics, bit for bit
        mean, std = bands.band_stats("bigearthnet_v2", m, c.data[f"{m}_bands"])
        got = input_norm.norm_stats(c)[m]
        np.testing.assert_array_equal(got[0], mean)
        np.testing.assert_array_equal(got[1], std)
        assert input_norm.norm_name(c, m) == "dataset"
    c.data.s1_norm = "ssl4eo_s1"
    c.data.s2_norm = "imagenet_rgb"
    c.data.s2_bands = "s2_rgbn"  # B02 B03 B04 B08
    mean, std, _ = input_norm.input_stats(c, "s1")
    np.testing.assert_allclose(mean, [-12.59, -20.26])
    np.testing.assert_allclose(std, [5.26, 5.91])
    mean, std, _ = input_norm.input_stats(c, "s2")
    # B08: the average of ImageNet's three
    np.testing.assert_allclose(mean, [4060, 4560, 4850, 4490], rtol=1e-6)
    np.testing.assert_allclose(std, [2250, 2240, 2290, 2260], rtol=1e-6)
    c.data.s2_norm = "custom"
    c.data.s2_norm_mean = (1.0, 2.0, 3.0, 4.0)
    c.data.s2_norm_std = (4.0, 5.0, 6.0, 7.0)
    assert input_norm.input_stats(c, "s2") == ([1.0, 2.0, 3.0, 4.0], [4.0, 5.0, 6.0, 7.0],
                                               "custom")


@pytest.mark.parametrize("change,message", [
    (dict(data__s2_norm="mine"), "config key 'data.s2_norm': 'mine' is not one of"),
    (dict(data__s2_norm="custom", data__s2_norm_mean=(1.0,)),
     "config key 'data.s2_norm_mean': needs one value per band"),
    (dict(model__s2_init="w.safetensors"), "config key 'model.stem': model.s2_init holds a "),
    (dict(model__stem="standard", model__s2_init="w.pth", model__s2_init_bands="B02,X9"),
     "config key 'model.s2_init_bands': 'X9' is neither a preset"),
    (dict(model__stem="standard", model__s2_init="w.pth", model__s2_init_bands="B02,B03"),
     "config key 'data.s2_norm': model.s2_init is set with a band list"),
    (dict(model__init_band_fill="mean"), "config key 'model.init_band_fill': 'mean' is not"),
    (dict(data__s1_norm="imagenet_rgb"), "preset 'imagenet_rgb' has no statistics for band "
                                         "'VV'"),
])
def test_config_errors_name_the_key(change, message):
    c = configuration.base_config("mosaic1")
    for key, value in change.items():
        section, name = key.split("__")
        c[section][name] = value
    with pytest.raises(configuration.ConfigError) as info:
        configuration.validate_config(c, 8)
    assert message in str(info.value)


def test_auto_normalisation_follows_the_tower_preset():
    c = _config(s2_init="w.safetensors")
    c.model.s1_init = "s1.safetensors"
    c.model.s1_init_bands = "ssl4eo_s1"
    configuration.validate_config(c, 8)
    assert input_norm.norm_name(c, "s1") == "ssl4eo_s1"
    assert input_norm.norm_name(c, "s2") == "ssl4eo_s2_l1c"
    c.data.s2_norm = "dataset"  # an explicit choice wins
    assert input_norm.norm_name(c, "s2") == "dataset"
    single = ml_collections.ConfigDict(c.to_dict())
    single.model.kind = "single_tower"
    single.model.inputs = "s2"
    single.model.init = "x.safetensors"
    single.model.init_bands = "imagenet_rgb"
    single.data.s2_norm = "auto"
    assert input_norm.norm_name(single, "s2") == "imagenet_rgb"
    assert input_norm.norm_name(single, "s1") == "dataset"
    assert [t.module for t in pretrained.tower_inits(single)] == ["enc"]


def test_sen12ms_l1c_takes_every_ssl4eo_band_under_the_preset_only():
    """SEN12MS has no statistics for B01, B09, B10: with the dataset's normalisation they are
    refused, with the SSL4EO-S12 preset all 13 L1C bands are the file's channels exactly."""
    c = _config(s2_init="w.safetensors")
    configuration.apply_args(c, ("sen12ms",))
    c.data.s2_norm = "dataset"
    with pytest.raises(configuration.ConfigError, match="config key 'data.s2_bands'.*B01"):
        configuration.validate_config(c, 8)
    c.data.s2_norm = "auto"
    configuration.validate_config(c, 8)
    (tower,) = pretrained.tower_inits(c)
    assert tower.run_bands == tower.file_bands == input_norm.SSL4EO_S2_L1C_BANDS
    mean, std = input_norm.norm_stats(c)["s2"]
    assert mean.tolist() == [0.0] * 13 and std.tolist() == [10000.0] * 13
    raw = np.arange(2 * 13, dtype=np.uint16).reshape(2, 13) * 100
    got = bands.normalize(raw, "sen12ms", "s2", "s2_all", stats=(mean, std))
    np.testing.assert_allclose(got, raw / 10000, rtol=1e-6)


def test_normalize_with_stats_checks_their_length():
    x = np.ones((2, 2, 12), np.uint16)
    with pytest.raises(ValueError, match=r"stats must be two \[3\] arrays"):
        bands.normalize(x, "bigearthnet_v2", "s2", "rgb", stats=(np.zeros(2), np.ones(2)))


def test_report_names_runs_after_their_weight_files():
    from mosaic_jax.evaluation import report

    config = {"objective": "mosaic1", "num_train_steps": 0,
              "model": {"s1_init": "gs://b/ssl4eo_s1_moco.pth", "s2_init": "/w/s2_moco.safetensors",
                        "init": ""}}
    assert report.method_name(config, "/runs/x") == "ssl4eo_s1_moco + s2_moco"
    config["num_train_steps"] = 100
    assert report.method_name(config, "/runs/x") == "mosaic1 from ssl4eo_s1_moco + s2_moco"
    assert report.method_name({"objective": "mosaic1", "model": {}}, "/x") == "mosaic1"


def test_records_are_json(r50_imported):
    *_, records = r50_imported
    assert json.loads(json.dumps(records))[0]["bands"]["B01"] == "B01"


@pytest.mark.slow
def test_step0_run_exports_the_imported_encoder_and_resumes_without_importing(
        prepared_fake, tmp_path):
    """A MoSAiC config with an SSL4EO-S12-like S2 ResNet-50 file and num_train_steps=0: the
    checkpoint of step 0 exports the file's tensors again (conv1: the kept columns), model.json
    and embed use the file's normalisation, a rerun restores instead of importing, and a linear
    probe starts from the step-0 checkpoint."""
    from conftest import program_config

    from mosaic_jax.evaluation import report
    from mosaic_jax.export import exporter
    from mosaic_jax.inference import embed
    from mosaic_jax.training import checkpoints, train

    sd = random_state_dict(torchvision_resnet_shapes(50, 2, 13, num_classes=5), seed=8)
    weights = tmp_path / "ssl4eo_s2_moco.safetensors"
    safetensors.numpy.save_file(sd, str(weights))
    config = program_config(prepared_fake)
    config.num_train_steps = 0
    config.model.stem = "standard"
    config.model.s2_encoder = "resnet50"
    config.model.s2_init = str(weights)
    config.model.s2_init_bands = "ssl4eo_s2_l1c"
    config.data.s2_bands = "s2_all"
    workdir = str(tmp_path / "ssl4eo_s2_moco_step0")
    train.train_and_evaluate(config, workdir)
    assert checkpoints.checkpoint_steps(workdir) == [0]
    (record,) = json.loads((tmp_path / workdir / pretrained.IMPORTED_WEIGHTS_FILE).read_text())
    assert record["file"] == str(weights) and record["dropped_bands"] == ["B10"]

    out = str(tmp_path / "export")
    info = exporter.export_workdir(workdir, out, platforms=("cpu",))
    assert info["inputs"]["s2"]["norm"] == "ssl4eo_s2_l1c"
    assert info["inputs"]["s2"]["mean"] == [0.0] * 12
    assert info["inputs"]["s2"]["std"] == [10000.0] * 12
    assert info["inputs"]["s1"]["norm"] == "dataset"
    back = safetensors.numpy.load_file(f"{out}/encoder_s2.safetensors")
    kept = [input_norm.SSL4EO_S2_L1C_BANDS.index(b) for b in BEN_S2]
    for name, value in sd.items():
        if name == "conv1.weight":
            np.testing.assert_array_equal(back[name], value[:, kept])
        elif not name.endswith("num_batches_tracked") and not name.startswith("fc."):
            np.testing.assert_array_equal(back[name], value, err_msg=name)

    # embed normalises with the export's statistics (reflectance here, not the dataset's).
    got = embed.embed_split(out, split="validation", data_dir=prepared_fake, batch_size=4,
                            max_batches=1, progress=False, patch_ids=False)
    from mosaic_jax.data import input_pipeline
    source = input_pipeline.open_source("bigearthnet_v2", "validation", prepared_fake)
    s1 = np.stack([bands.normalize(source[i]["s1"], "bigearthnet_v2", "s1",
                                   config.data.s1_bands) for i in range(4)])
    s2 = np.stack([source[i]["s2"].astype(np.float32) / 10000 for i in range(4)])
    from mosaic_jax import export
    want = export.load_embedder(out)(s1, s2)
    np.testing.assert_allclose(got["h_s2"], want["h_s2"], rtol=1e-6, atol=1e-6)

    weights.unlink()  # a rerun restores the checkpoint; it must not read the file again
    train.train_and_evaluate(config, workdir)
    probe = importlib.import_module("configs.linear_probe").get_config("demo")
    probe.init_from = workdir
    probe.data.demo = False
    probe.data.data_dir = prepared_fake
    probe.num_train_steps = 1
    probe.batch_size = probe.eval_batch_size = 16
    probe.tsne_points = 0
    metrics = train.train_and_evaluate(probe, str(tmp_path / "probe"))
    assert "macro_ap" in metrics
    probed = report.load_run(str(tmp_path / "probe"))
    assert probed.method == "ssl4eo_s2_moco, linear probe"
