"""Export of a trained run: files, the jax.export embedder, msgpack and torchvision weights."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE

from mosaic_jax import export, models
from mosaic_jax.data import augment, bands
from mosaic_jax.export import exporter, torchvision_resnet
from mosaic_jax.training import checkpoints, train

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(trained_workdir):
    return trained_workdir[0]


@pytest.fixture(scope="module")
def out(exported_dir):
    return exported_dir


@pytest.fixture(scope="module")
def restored(workdir):
    return checkpoints.restore_variables(workdir)


def _inputs(info, n, seed=0):
    rng = np.random.default_rng(seed)
    size = info["input_size"]
    return (rng.normal(size=(n, size, size, len(info["inputs"]["s1"]["bands"]))).astype(np.float32),
            rng.normal(size=(n, size, size, len(info["inputs"]["s2"]["bands"]))).astype(np.float32))


def _model_outputs(run, s1, s2):
    """The training program's eval transform and model, applied directly (one jit)."""
    config = run.config
    model = models.create_model(config)
    size = config.augment.out_size

    def apply(variables, a, b):
        out, _ = models.apply_model(model, variables, config, augment.center_resize(a, size),
                                     augment.center_resize(b, size), train=False)
        return out

    return jax.jit(apply)(run.variables, s1, s2)


# ----------------------------------------------------------------------------------------------
# An independent NumPy re-implementation of torchvision's ResNet forward pass in eval mode
# (NCHW, weights OIHW, torchvision padding), used to check the safetensors files.


def _conv2d(x, w, stride, pad):
    n, c, h, wd = x.shape
    o, ci, kh, kw = w.shape
    assert c == ci, (x.shape, w.shape)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    cols = np.empty((n, c, kh, kw, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i:i + stride * (ho - 1) + 1:stride,
                                  j:j + stride * (wo - 1) + 1:stride]
    return np.einsum("ncijhw,ocij->nohw", cols, w.astype(np.float64))


def _batchnorm(x, sd, name, eps=1e-5):
    g = lambda k: sd[f"{name}.{k}"].astype(np.float64)[None, :, None, None]  # noqa: E731
    return (x - g("running_mean")) / np.sqrt(g("running_var") + eps) * g("weight") + g("bias")


def _relu(x):
    return np.maximum(x, 0.0)


def _maxpool_3x3_s2(x):
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = (x.shape[2] - 1) // 2 + 1, (x.shape[3] - 1) // 2 + 1
    win = [xp[:, :, i:i + 2 * (h - 1) + 1:2, j:j + 2 * (w - 1) + 1:2]
           for i in range(3) for j in range(3)]
    return np.max(np.stack(win), axis=0)


def torchvision_resnet_eval(sd, x_nchw, *, maxpool):
    """Pooled features [N, F] (and fc logits when `fc.weight` is present) of torchvision's ResNet
    (BasicBlock or v1.5 Bottleneck) in eval mode."""
    x = x_nchw.astype(np.float64)
    x = _relu(_batchnorm(_conv2d(x, sd["conv1.weight"], 2, 3), sd, "bn1"))
    if maxpool:
        x = _maxpool_3x3_s2(x)
    for layer in range(1, 5):
        j = 0
        while f"layer{layer}.{j}.conv1.weight" in sd:
            p = f"layer{layer}.{j}"
            stride = 2 if layer > 1 and j == 0 else 1
            if f"{p}.conv3.weight" in sd:  # Bottleneck: stride on the 3x3 conv
                y = _relu(_batchnorm(_conv2d(x, sd[f"{p}.conv1.weight"], 1, 0), sd, f"{p}.bn1"))
                y = _relu(_batchnorm(_conv2d(y, sd[f"{p}.conv2.weight"], stride, 1), sd,
                                     f"{p}.bn2"))
                y = _batchnorm(_conv2d(y, sd[f"{p}.conv3.weight"], 1, 0), sd, f"{p}.bn3")
            else:  # BasicBlock
                y = _relu(_batchnorm(_conv2d(x, sd[f"{p}.conv1.weight"], stride, 1), sd,
                                     f"{p}.bn1"))
                y = _batchnorm(_conv2d(y, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                identity = _batchnorm(_conv2d(x, sd[f"{p}.downsample.0.weight"], stride, 0), sd,
                                      f"{p}.downsample.1")
            else:
                identity = x
            x = _relu(y + identity)
            j += 1
    feats = x.mean(axis=(2, 3))
    if "fc.weight" in sd:
        return feats, feats @ sd["fc.weight"].astype(np.float64).T + sd["fc.bias"]
    return feats, None


def _torchvision_names(blocks, bottleneck):
    """Every state_dict key of a torchvision ResNet without fc."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names = {"conv1.weight", *(f"bn1.{k}" for k in bn)}
    for layer, n in enumerate(blocks, start=1):
        for j in range(n):
            p = f"layer{layer}.{j}"
            for c in range(1, 4 if bottleneck else 3):
                names |= {f"{p}.conv{c}.weight", *(f"{p}.bn{c}.{k}" for k in bn)}
            if j == 0 and (layer > 1 or bottleneck):
                names |= {f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{k}" for k in bn)}
    return names


# ----------------------------------------------------------------------------------------------
# Tests


@pytest.mark.slow
def test_export_writes_the_files_and_describes_the_model(workdir, out, restored):
    info = export.load_model_info(out)
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "model.json", "params.msgpack", "embedder.jax_export",
         "encoder_s1.safetensors", "encoder_s2.safetensors"])
    config = restored.config
    assert info["source"] == {"workdir": workdir, "step": 6}
    assert info["objective"] == "mosaic1" and info["dataset"] == "bigearthnet_v2"
    assert info["num_classes"] == 19 and len(info["class_names"]) == 19
    assert info["class_names"][0] == "Urban fabric"
    assert info["model"] == config.model.to_dict()
    for modality, setting in (("s1", config.data.s1_bands), ("s2", config.data.s2_bands)):
        names = bands.resolve_bands(setting, "bigearthnet_v2", modality)
        mean, std = bands.band_stats("bigearthnet_v2", modality, names)
        spec = info["inputs"][modality]
        assert spec["bands"] == list(names)
        np.testing.assert_allclose(spec["mean"], mean, rtol=1e-6)
        np.testing.assert_allclose(spec["std"], std, rtol=1e-6)
    assert info["inputs"]["s1"]["bands"] == ["VV", "VH"]
    assert info["input_size"] == 120 and info["model_input_size"] == 16
    assert info["embedding_keys"] == ["embedding", "h_s1", "h_s2", "inter_s1", "inter_s2",
                                      "probs"]
    assert info["embedder"]["outputs"]["embedding"]["shape"] == ["b", 32]
    assert info["embedder"]["outputs"]["probs"]["shape"] == ["b", 19]
    assert set(info["embedder"]["platforms"]) == {"cpu", "cuda", "tpu"}
    assert info["encoders"]["s1"]["maxpool"] is False and info["encoders"]["s1"]["in_channels"] == 2
    # Nothing left behind by the atomic write.
    assert sorted(os.listdir(os.path.dirname(out))) == ["export"]


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 1])
def test_exported_embedder_gives_the_model_outputs(out, restored, n):
    info = export.load_model_info(out)
    embed = export.load_embedder(out)
    s1, s2 = _inputs(info, n, seed=n)
    got = embed(s1, s2)
    ref = _model_outputs(restored, s1, s2)
    assert sorted(got) == info["embedding_keys"]
    for key, ref_key in (("embedding", "h_fused"), ("h_s1", "h_s1"), ("h_s2", "h_s2"),
                         ("inter_s1", "inter_s1"), ("inter_s2", "inter_s2")):
        assert got[key].shape == (n, *info["embedder"]["outputs"][key]["shape"][1:])
        np.testing.assert_allclose(got[key], ref[ref_key], rtol=1e-5, atol=1e-5, err_msg=key)
    np.testing.assert_allclose(got["probs"], jax.nn.sigmoid(ref["logits"]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_embedder_rejects_wrong_input_shapes(out):
    embed = export.load_embedder(out)
    with pytest.raises(ValueError, match=r"s2 must have shape \[b, 120, 120, 10\]"):
        embed(np.zeros((2, 120, 120, 2), np.float32), np.zeros((2, 120, 120, 3), np.float32))


_LOADER_SCRIPT = """
import sys
import numpy as np
from mosaic_jax.export import load_embedder
embed = load_embedder(sys.argv[1])
x = np.load(sys.argv[2])
out = embed(x["s1"], x["s2"])
np.savez(sys.argv[3], **{k: np.asarray(v) for k, v in out.items()})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in (
    "flax", "orbax", "optax", "ml_collections", "tensorflow", "tensorflow_datasets", "grain",
    "safetensors", "clu", "sklearn", "matplotlib")
    or m in ("mosaic_jax.training.train", "mosaic_jax.models"))
print("HEAVY", heavy)
"""


@pytest.mark.slow
def test_loader_runs_in_a_process_with_only_jax_and_numpy(out, tmp_path):
    info = export.load_model_info(out)
    s1, s2 = _inputs(info, 2, seed=7)
    np.savez(tmp_path / "in.npz", s1=s1, s2=s2)
    # One device, and this session's compile settings (they move the last float bits).
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE)
    proc = subprocess.run([sys.executable, "-c", _LOADER_SCRIPT, out, str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
    got = np.load(tmp_path / "out.npz")
    ref = export.load_embedder(out)(s1, s2)
    assert sorted(got.files) == sorted(ref)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_params_round_trip_through_msgpack(out, restored):
    import flax.serialization

    with open(os.path.join(out, "params.msgpack"), "rb") as f:
        data = f.read()
    loaded = flax.serialization.msgpack_restore(data)
    assert sorted(loaded) == ["batch_stats", "params"]
    want = jax.tree.leaves_with_path(restored.variables)
    got = jax.tree.leaves_with_path(loaded)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want, strict=True):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(a, b)
    # And the model runs on them like on the checkpoint.
    template = jax.tree.map(np.zeros_like, restored.variables)
    again = flax.serialization.from_bytes(template, data)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(restored.variables), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_safetensors_encoders_match_the_flax_encoders(out, restored):
    import safetensors.numpy
    from safetensors import safe_open

    info = export.load_model_info(out)
    s1, s2 = _inputs(info, 2, seed=3)
    ref = _model_outputs(restored, s1, s2)
    size = restored.config.augment.out_size
    for modality, x in (("s1", s1), ("s2", s2)):
        path = os.path.join(out, f"encoder_{modality}.safetensors")
        sd = safetensors.numpy.load_file(path)
        assert set(sd) == _torchvision_names((2, 2, 2, 2), bottleneck=False)
        assert sd["bn1.num_batches_tracked"].dtype == np.int64
        assert sd["bn1.num_batches_tracked"].shape == () and int(sd["bn1.num_batches_tracked"]) == 6
        with safe_open(path, "np") as f:
            meta = f.metadata()
        assert meta["stem"] == "iai" and json.loads(meta["maxpool"]) is False
        assert json.loads(meta["bands"]) == info["inputs"][modality]["bands"]
        x_model = np.asarray(augment.center_resize(x, size))  # what the encoder sees (NHWC)
        feats, logits = torchvision_resnet_eval(sd, x_model.transpose(0, 3, 1, 2), maxpool=False)
        assert logits is None and np.std(feats) > 1e-3  # not a degenerate comparison
        np.testing.assert_allclose(feats, ref[f"h_{modality}"], rtol=1e-4, atol=1e-4)


def test_resnet50_standard_stem_and_classifier_match_the_numpy_reference(tmp_path):
    import safetensors.numpy

    from mosaic_jax.models import ResNet

    model = ResNet(depth=50, width=4, stem="standard")
    x = np.random.default_rng(0).normal(size=(2, 33, 33, 3)).astype(np.float32)
    # Random values in the shapes of the variables (compiling Flax's initialisers is slow), with
    # non-trivial BatchNorm parameters and statistics so that every one of them matters.
    shapes = jax.eval_shape(lambda v: model.init(jax.random.PRNGKey(0), v, train=False), x)
    rng = np.random.default_rng(1)

    def fill(path, v):
        name = path[-1].key
        if name == "kernel":  # [kh, kw, in, out]
            return (rng.normal(size=v.shape) / np.sqrt(np.prod(v.shape[:3]))).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        return (0.2 * rng.normal(size=v.shape)).astype(np.float32)  # bias, mean

    variables = jax.tree.map_with_path(fill, shapes)
    ref = np.asarray(jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x))
    classifier = {"kernel": rng.normal(size=(ref.shape[1], 5)).astype(np.float32),
                  "bias": rng.normal(size=5).astype(np.float32)}
    sd = torchvision_resnet.resnet_state_dict(variables["params"], variables["batch_stats"],
                                  num_batches_tracked=11, classifier=classifier)
    path = str(tmp_path / "r50.safetensors")
    safetensors.numpy.save_file(sd, path)
    sd = safetensors.numpy.load_file(path)
    assert set(sd) == _torchvision_names((3, 4, 6, 3), bottleneck=True) | {"fc.weight",
                                                                          "fc.bias"}
    assert sd["conv1.weight"].shape == (4, 3, 7, 7) and sd["fc.weight"].shape == (5, 128)
    feats, logits = torchvision_resnet_eval(sd, x.transpose(0, 3, 1, 2), maxpool=True)
    assert np.std(ref) > 1e-3
    np.testing.assert_allclose(feats, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, ref @ classifier["kernel"] + classifier["bias"], rtol=1e-4,
                               atol=1e-4)


def test_resnet_state_dict_rejects_other_encoders():
    with pytest.raises(ValueError, match="not a torchvision ResNet parameter"):
        torchvision_resnet.resnet_state_dict({"stem_norm": {"gamma": np.ones(3)}}, {})


@pytest.mark.slow
def test_export_of_a_workdir_without_checkpoint_names_it(workdir, tmp_path, capsys):
    empty = tmp_path / "not_trained"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
    with pytest.raises(FileNotFoundError, match=f"workdir '{empty}' has no checkpoint"):
        exporter.export_workdir(str(empty), str(tmp_path / "out"))
    with pytest.raises(SystemExit) as e:
        exporter.main(["--workdir", str(empty), "--output", str(tmp_path / "out")])
    assert e.value.code == 1 and str(empty) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.latest_step(tmp_path / "missing")


@pytest.mark.slow
def test_export_replaces_a_previous_export_but_no_other_folder(workdir, tmp_path):
    target = tmp_path / "exp"
    exporter.export_workdir(workdir, str(target), step=3, platforms=("cpu",))
    assert export.load_model_info(target)["source"]["step"] == 3
    exporter.export_workdir(workdir, str(target), platforms=("cpu",))
    assert export.load_model_info(target)["source"]["step"] == 6
    assert sorted(os.listdir(tmp_path)) == ["exp"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a previous export"):
        exporter.export_workdir(workdir, str(foreign))
    assert os.listdir(foreign) == ["notes.txt"]


@pytest.mark.slow
def test_checkpoints_restores_every_step(workdir):
    assert checkpoints.checkpoint_steps(workdir) == [3, 6]
    early = checkpoints.restore_variables(workdir, 3)
    late = checkpoints.restore_variables(workdir)
    assert early.step == 3 and late.step == 6
    a = jax.tree.leaves(early.variables["params"])
    b = jax.tree.leaves(late.variables["params"])
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 4"):
        checkpoints.restore_variables(workdir, 4)
    assert jnp.asarray(a[0]).dtype == jnp.float32


def _untrained_workdir(path, config, poison=None):
    """A workdir whose only checkpoint (step 5) holds random variables saved like the training
    program saves them (`train.random_state`: no training). `poison`: a parameter name
    ("bias", ...) whose first array gets a NaN, as after a divergence."""
    state = train.random_state(config, step=5)
    if poison:
        hit = []

        def nan_first(p, v):
            if getattr(p[-1], "key", None) == poison and not hit:
                hit.append(p)
                return v.at[(0,) * v.ndim].set(jnp.nan)
            return v

        state = state.replace(params=jax.tree.map_with_path(nan_first, state.params))
        assert hit
    return checkpoints.write_workdir(path, config, state)


def _export_untrained_supervised(tmp_path, arg, width):
    """configs/supervised.py:`arg` at 32 px and `width`, initialised, saved and exported:
    (workdir, export folder, model info)."""
    import importlib

    config = importlib.import_module("configs.supervised").get_config(arg)
    config.augment.out_size = 32
    config.model.width_multiplier = width
    config.model.proj_hidden_dim = 16
    config.model.proj_dim = 8
    workdir = _untrained_workdir(tmp_path / "run", config)
    out = str(tmp_path / "export")
    return workdir, out, exporter.export_workdir(workdir, out, platforms=("cpu",))


@pytest.mark.slow
def test_single_tower_resnet50_export(tmp_path):
    """Early fusion (S1 + S2 channels) into a ResNet-50 with the standard stem: the embedder,
    and encoder.safetensors with fc, against the model and the NumPy torchvision reference."""
    import safetensors.numpy

    workdir, out, info = _export_untrained_supervised(tmp_path, "demo", 1 / 16)
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "model.json", "params.msgpack", "embedder.jax_export",
         "encoder.safetensors"])
    assert info["embedding_keys"] == ["embedding", "probs"]
    enc = info["encoders"]["s1s2"]
    assert enc["architecture"] == "resnet50" and enc["maxpool"] is True and enc["fc"] is True
    assert enc["bands"] == info["inputs"]["s1"]["bands"] + info["inputs"]["s2"]["bands"]

    run = checkpoints.restore_variables(workdir)
    s1, s2 = _inputs(info, 2, seed=11)
    ref = _model_outputs(run, s1, s2)
    got = export.load_embedder(out)(s1, s2)
    np.testing.assert_allclose(got["embedding"], ref["h"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["probs"], jax.nn.sigmoid(ref["logits"]), rtol=1e-5, atol=1e-6)

    sd = safetensors.numpy.load_file(os.path.join(out, "encoder.safetensors"))
    assert set(sd) == _torchvision_names((3, 4, 6, 3), bottleneck=True) | {"fc.weight",
                                                                          "fc.bias"}
    x = np.concatenate([np.asarray(augment.center_resize(v, 32)) for v in (s1, s2)], axis=-1)
    feats, logits = torchvision_resnet_eval(sd, x.transpose(0, 3, 1, 2), maxpool=True)
    assert np.std(feats) > 1e-3
    np.testing.assert_allclose(feats, ref["h"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, ref["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_convnext_export_has_the_embedder_params_and_timm_named_safetensors(tmp_path):
    """ConvNeXt-V2: msgpack, model.json, the jax.export embedder (which gives the model's
    outputs) and encoder.safetensors with timm's convnextv2_base names (tests/
    test_convnext_timm.py checks the names, shapes and forward pass against timm's layout)."""
    import safetensors.numpy
    from flax import serialization

    from mosaic_jax.export import timm_convnext

    workdir, out, info = _export_untrained_supervised(tmp_path, "demo,convnext", 1 / 32)
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "model.json", "params.msgpack", "embedder.jax_export",
         "encoder.safetensors"])
    assert info["model"]["encoder"] == "convnextv2_base"
    enc = info["encoders"]["s1s2"]
    assert enc["in_channels"] == 12 and enc["dims"] == [4, 8, 16, 32] and enc["fc"]
    assert enc["timm_create_model"] == (
        "timm.create_model('convnextv2_base', pretrained=False, in_chans=12, num_classes=19, "
        "dims=(4, 8, 16, 32))")
    tensors = safetensors.numpy.load_file(os.path.join(out, "encoder.safetensors"))
    run = checkpoints.restore_variables(workdir)
    want = timm_convnext.timm_state_dict(run.variables["params"]["enc"], conv_mlp=False,
                                         classifier=run.variables["params"]["classifier"])
    assert sorted(tensors) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(tensors[k], v)

    s1, s2 = _inputs(info, 3, seed=12)
    ref = _model_outputs(run, s1, s2)
    got = export.load_embedder(out)(s1, s2)
    assert np.std(ref["h"]) > 1e-4
    np.testing.assert_allclose(got["embedding"], ref["h"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["probs"], jax.nn.sigmoid(ref["logits"]), rtol=1e-5, atol=1e-6)
    with open(os.path.join(out, "params.msgpack"), "rb") as f:
        params = serialization.msgpack_restore(f.read())["params"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(run.variables["params"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_restore_reads_everything_when_orbax_has_no_partial_restore(workdir, restored,
                                                                    monkeypatch):
    import orbax.checkpoint as ocp

    def no_partial(*args, **kwargs):
        raise TypeError("unexpected keyword argument 'partial_restore'")

    monkeypatch.setattr(ocp.args, "PyTreeRestore", no_partial)
    again = checkpoints.restore_variables(workdir)
    for a, b in zip(jax.tree.leaves(again.variables), jax.tree.leaves(restored.variables),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_config_gives_keys_added_since_the_run_their_defaults(tmp_path):
    import importlib

    config = importlib.import_module("configs.iai_simclr").get_config("demo").to_dict()
    del config["model"]["remat"], config["loss"]["inter_view"]
    config["model"]["width_multiplier"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = checkpoints.load_config(tmp_path)
    assert loaded.model.remat is False and loaded.loss.inter_view == "shared"
    assert loaded.model.width_multiplier == 0.5 and loaded.objective == "iai_simclr"
    assert loaded.loss.t_inter == 0.5 and loaded.data.demo is True


def test_export_and_loader_refuse_non_finite_parameters(tmp_path, monkeypatch, capsys):
    import importlib

    config = importlib.import_module("configs.supervised").get_config("demo")
    config.augment.out_size = 16
    config.model.width_multiplier = 1 / 32
    workdir = _untrained_workdir(tmp_path / "run", config, poison="bias")
    with pytest.raises(ValueError, match=r"checkpoint step 5 of .*run holds non-finite values "
                       r"in 1 of \d+ arrays .*diverged"):
        exporter.export_workdir(workdir, str(tmp_path / "out"), platforms=("cpu",))
    with pytest.raises(SystemExit) as e:
        exporter.main(["--workdir", workdir, "--output", str(tmp_path / "out")])
    assert e.value.code == 1 and "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # An export written before this check (or by hand) is refused when loaded.
    monkeypatch.setattr(checkpoints, "require_finite", lambda run: None)
    exporter.export_workdir(workdir, str(tmp_path / "out"), platforms=("cpu",))
    with pytest.raises(ValueError, match="non-finite .*diverged"):
        export.load_embedder(tmp_path / "out")


def test_loader_names_a_damaged_export(tmp_path):
    info = {"dataset": "bigearthnet_v2", "input_size": 120, "class_names": ["a"],
            "inputs": {m: {"bands": ["B"], "mean": [0.0], "std": [1.0]} for m in ("s1", "s2")}}
    model_json = tmp_path / export.MODEL_FILE
    model_json.write_text(json.dumps(info))
    assert export.load_model_info(tmp_path) == info
    del info["inputs"]["s2"]["std"], info["input_size"]
    model_json.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=f"{model_json} lacks input_size, inputs.s2.std: "):
        export.load_model_info(tmp_path)
    model_json.write_text('{"dataset": "bigearthnet_v2", ')  # truncated
    with pytest.raises(ValueError, match=f"{model_json} is not valid JSON"):
        export.load_model_info(tmp_path)
    (tmp_path / export.EMBEDDER_FILE).write_bytes(b"\x10\x00\x00\x00partial")
    want = f"{tmp_path / export.EMBEDDER_FILE} (11 bytes) is not a readable jax.export embedder"
    with pytest.raises(ValueError, match=re.escape(want)):
        export.load_embedder(tmp_path)


@pytest.mark.parametrize("platforms,message", [
    ("cpu,bogus", "unknown platform(s) 'bogus'"), ("gpu", "unknown platform(s) 'gpu'"),
    (",", "no platform"), ("cpu,cpu", "repeated platforms in ['cpu', 'cpu']")])
def test_export_refuses_unknown_platforms_before_any_work(tmp_path, capsys, platforms, message):
    # The workdir does not exist: the platform error comes first, before anything is read.
    with pytest.raises(SystemExit) as e:
        exporter.main(["--workdir", str(tmp_path / "missing"), "--output",
                       str(tmp_path / "out"), "--platforms", platforms])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --platforms: {message}; valid: cpu, cuda, rocm, tpu" in err
    assert not (tmp_path / "out").exists()
    assert exporter.check_platforms(["tpu", "cpu"]) == ("tpu", "cpu")
