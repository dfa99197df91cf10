"""Cross-attention fusion and missing modalities: the fusion block's properties, modality
dropout, concat fusion pinned to its values before fusion existed, and the S1-only / S2-only
paths of evaluation and export."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny
from test_train import load_config, random_batch, setup

from mosaic_jax import models
from mosaic_jax.models import fusion
from mosaic_jax.training import configuration, train

# Computed with the code before `model.fusion` existed (2 devices, 3 steps of tiny MoSAiC-1 on
# random_batch(config, 16, seed=7)): concat fusion without modality dropout must reproduce them
# bit for bit.
PINNED_LOSSES = [18.0252742767334, 17.932897567749023, 18.317974090576172]
PINNED_PARAM_ABS_SUM = 3425.4567773310905
PINNED_MODULES = ["classifier", "enc_s1", "enc_s2", "fused", "inter_s1", "inter_s2",
                  "intra_s1", "intra_s2"]


def test_concat_fusion_without_dropout_is_bit_identical_to_before():
    config = tiny(load_config("mosaic1"))
    assert config.model.fusion == "concat" and config.model.modality_dropout == 0
    mesh, step, state = setup(config, jax.devices()[:2])
    batch = train.global_batch(random_batch(config, 16, seed=7), mesh, train.TRAIN_KEYS)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    params = jax.device_get(state.params)
    assert losses == PINNED_LOSSES
    assert sorted(params) == PINNED_MODULES
    total = float(sum(np.sum(np.abs(np.asarray(x, np.float64))) for x in jax.tree.leaves(params)))
    assert total == PINNED_PARAM_ABS_SUM


# ----------------------------------------------------------------------------------------------
# The fusion block

def test_alibi_slopes_are_geometric_and_bias_depends_only_on_relative_positions():
    slopes = fusion.alibi_slopes(8)
    np.testing.assert_allclose(slopes, [2.0 ** -(k) for k in range(1, 9)], rtol=1e-6)
    pos = fusion.grid_positions(3, 4, scale=4.0)
    bias = fusion.alibi_bias(pos, pos, 8)
    # Shifting every position by the same vector changes nothing.
    np.testing.assert_allclose(fusion.alibi_bias(pos + [1.7, -3.2], pos + [1.7, -3.2], 8), bias,
                               atol=1e-5)
    # Pairs of tokens with the same offset get the same bias, -slope * Euclidean distance.
    cells = [(i, j) for i in range(3) for j in range(4)]
    for q, (qi, qj) in enumerate(cells):
        for k, (ki, kj) in enumerate(cells):
            dist = np.hypot((qi - ki) * 4 / 3, (qj - kj) * 4 / 4)
            np.testing.assert_allclose(bias[:, q, k], -slopes * dist, rtol=1e-5, atol=1e-6)
    # Two grids of different sizes share the normalised grid: centres coincide.
    coarse, fine = fusion.grid_positions(1, 1, 2.0), fusion.grid_positions(2, 2, 2.0)
    np.testing.assert_allclose(coarse, [[1.0, 1.0]])
    np.testing.assert_allclose(fine.mean(axis=0), coarse[0])


def _numpy_attention(x, ctx, p, bias, heads):
    """The multi-head attention equations in NumPy from the module's parameters."""
    q = np.einsum("nd,dhe->nhe", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("nd,dhe->nhe", ctx, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("nd,dhe->nhe", ctx, p["value"]["kernel"]) + p["value"]["bias"]
    logits = np.einsum("qhe,khe->hqk", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    y = np.einsum("hqk,khe->qhe", w, v)
    return np.einsum("qhe,hed->qd", y, p["out"]["kernel"]) + p["out"]["bias"]


def test_attention_matches_numpy_and_one_token_cross_attention_reduces_to_value_projection():
    rng = np.random.default_rng(0)
    attn = fusion.Attention(num_heads=2)
    x, ctx = rng.normal(size=(1, 5, 8)), rng.normal(size=(1, 3, 8))
    bias = rng.normal(size=(2, 5, 3)).astype(np.float32)
    present = jnp.array([True])
    params = attn.init(jax.random.PRNGKey(0), x, ctx, bias, present)["params"]
    params = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape), params)  # nonzero bias
    p = jax.tree.map(np.asarray, params)
    got = attn.apply({"params": params}, x, ctx, bias, present)
    np.testing.assert_allclose(got[0], _numpy_attention(x[0], ctx[0], p, bias, 2), rtol=1e-4,
                               atol=1e-5)
    # One query token, one key token, no bias: softmax over one key is 1, so the output is the
    # value projection of the other modality's token through the output projection.
    one = attn.apply({"params": params}, x[:, :1], ctx[:, :1], None, present)
    v = np.einsum("d,dhe->he", ctx[0, 0], p["value"]["kernel"]) + p["value"]["bias"]
    expected = np.einsum("he,hed->d", v, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(one[0, 0], expected, rtol=1e-4, atol=1e-5)
    # No key present: the attention contributes nothing.
    none = attn.apply({"params": params}, x, ctx, bias, jnp.array([False]))
    np.testing.assert_array_equal(none, 0.0)


def _block_and_inputs(b=3):
    rng = np.random.default_rng(1)
    block = fusion.CrossAttentionFusion(dim=16, num_heads=4, num_layers=2)
    t1 = jnp.asarray(rng.normal(size=(b, 3, 3, 6)), jnp.float32)
    t2 = jnp.asarray(rng.normal(size=(b, 2, 2, 5)), jnp.float32)  # another grid size
    params = block.init(jax.random.PRNGKey(0), t1, t2, jnp.ones((b, 2), bool))
    return block, params, t1, t2


def test_fusion_with_s2_masked_out_ignores_the_s2_array_and_has_zero_gradient_for_it():
    block, params, t1, t2 = _block_and_inputs()
    present = jnp.array([[True, False], [True, False], [True, True]])
    out = block.apply(params, t1, t2, present)
    garbage = t2.at[:2].set(jnp.nan).at[2].set(t2[2])  # NaN in the absent rows only
    np.testing.assert_array_equal(block.apply(params, t1, garbage, present)[:2], out[:2])
    np.testing.assert_array_equal(block.apply(params, t1, t2 * 1e3 + 7, present)[:2], out[:2])
    grad = jax.grad(lambda t: jnp.sum(block.apply(params, t1, t, present)[:2] ** 2))(t2)
    np.testing.assert_array_equal(grad, 0.0)
    # The sample with both modalities does depend on S2, and S1-only outputs on S1.
    assert np.abs(block.apply(params, t1, t2 + 1.0, present)[2] - out[2]).max() > 1e-4
    assert np.abs(block.apply(params, t1 + 1.0, t2, present)[0] - out[0]).max() > 1e-4
    assert np.isfinite(np.asarray(out)).all()


def test_a_sample_without_any_modality_is_an_error():
    block, params, t1, t2 = _block_and_inputs(2)
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] have neither S1 nor S2"):
        block.apply(params, t1, t2, jnp.array([[True, False], [False, False]]))


def test_modality_dropout_drops_one_modality_per_sample_at_the_rate():
    key = jax.random.PRNGKey(0)
    assert bool(fusion.draw_presence(key, 1000, 0.0).all())
    always = np.asarray(fusion.draw_presence(key, 4000, 1.0))
    assert (always.sum(1) == 1).all()
    assert 0.45 < always[:, 0].mean() < 0.55
    some = np.asarray(fusion.draw_presence(key, 4000, 0.3))
    assert (some.sum(1) >= 1).all()
    assert 0.27 < (some.sum(1) == 1).mean() < 0.33


def _two_tower(config_arg, **model):
    config = tiny(load_config("mosaic1", config_arg))
    config.model.sync_bn = False
    for k, v in model.items():
        config.model[k] = v
    m = models.create_model(config)
    variables = models.init_variables(config, m, params_rng=jax.random.PRNGKey(0),
                                      dropout_rng=jax.random.PRNGKey(1))
    (h, w, c1), (_, _, c2) = models.input_shapes(config)
    rng = np.random.default_rng(2)
    s1 = jnp.asarray(rng.normal(size=(4, h, w, c1)), jnp.float32)
    s2 = jnp.asarray(rng.normal(size=(4, h, w, c2)), jnp.float32)
    return config, m, variables, s1, s2


def test_concat_fusion_replaces_an_absent_modality_by_its_learned_embedding():
    config, m, variables, s1, s2 = _two_tower("demo", modality_dropout=0.5)
    params = dict(variables["params"])
    params["missing_s1"] = params["missing_s1"] + 0.25  # as if learned
    variables = {**variables, "params": params}
    present = jnp.array([[True, True], [False, True], [True, False], [True, True]])
    out, _ = models.apply_model(m, variables, config, s1.at[1].set(jnp.nan), s2, train=False,
                                present=present)
    f1 = out["h_s1"].shape[-1]
    np.testing.assert_array_equal(out["h_fused"][1, :f1], params["missing_s1"])
    np.testing.assert_array_equal(out["h_fused"][2, f1:], params["missing_s2"])
    np.testing.assert_array_equal(out["h_fused"][0], jnp.concatenate([out["h_s1"][0],
                                                                      out["h_s2"][0]]))
    assert np.isfinite(np.asarray(out["logits"][1])).all()


def test_cross_attention_model_missing_variants_equal_explicit_presence_and_ignore_nan():
    config, m, variables, s1, s2 = _two_tower("demo,xattn")
    assert "fusion_block" in variables["params"]
    out, _ = models.apply_model(m, variables, config, s1, s2, train=False,
                                missing_variants=True)
    for name, mask, nan_s1, nan_s2 in (("s1_only", (True, False), s1, s2 * jnp.nan),
                                       ("s2_only", (False, True), s1 * jnp.nan, s2)):
        present = jnp.broadcast_to(jnp.array(mask), (4, 2))
        alone, _ = models.apply_model(m, variables, config, nan_s1, nan_s2, train=False,
                                      present=present)
        np.testing.assert_allclose(alone["logits"], out[f"logits_{name}"], rtol=1e-5, atol=1e-6)
    assert np.abs(out["logits_s1_only"] - out["logits"]).max() > 1e-5


@pytest.mark.parametrize("overrides", [
    {},
    {"model.dtype": "bfloat16", "model.remat": True, "loss.block_size": 4},
])
def test_cross_attention_train_step_runs_sharded_with_modality_dropout(overrides):
    config = tiny(load_config("mosaic1", "xattn"))
    config.model.fusion_dim, config.model.fusion_heads = 16, 2
    config.optimizer.warmup_steps = 0  # the first step's learning rate is the peak one
    for k, v in overrides.items():
        section, key = k.split(".")
        config[section][key] = v
    configuration.validate_config(config)
    mesh, step, state = setup(config, jax.devices()[:2])
    batch = train.global_batch(random_batch(config, 16, seed=3), mesh, train.TRAIN_KEYS)
    before = jax.device_get(state.params["fusion_block"])
    state, metrics = step(state, batch)
    assert bool(metrics[train.FINITE_KEY]) and np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state.params["fusion_block"])
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after),
                                                        jax.tree.leaves(before), strict=True)]
    assert max(moved) > 0  # the fused terms train the fusion block


def test_fusion_config_keys_are_validated():
    config = tiny(load_config("mosaic1", "xattn"))
    config.model.fusion_heads = 3
    with pytest.raises(ValueError, match="'model.fusion_dim': 512 is not divisible by "
                                         "model.fusion_heads=3"):
        configuration.validate_config(config)
    config = tiny(load_config("mosaic1"))
    config.model.fusion = "attention"
    with pytest.raises(ValueError, match="'model.fusion': 'attention' is not one of"):
        configuration.validate_config(config)
    config.model.fusion, config.model.modality_dropout = "concat", 1.5
    with pytest.raises(ValueError, match="'model.modality_dropout': must be a number"):
        configuration.validate_config(config)
    config = tiny(load_config("simclr"))
    config.model.modality_dropout = 0.2
    with pytest.raises(ValueError, match="'model.modality_dropout': fuses the two towers"):
        configuration.validate_config(config)


def test_fusion_parameter_line_counts_the_fusion_block():
    config, _, variables, _, _ = _two_tower("demo,xattn")
    count = sum(x.size for x in jax.tree.leaves(variables["params"]["fusion_block"]))
    line = fusion.fusion_parameter_line(config.model, variables["params"])
    assert line.startswith(f"Fusion: cross_attention, 2 layers x 4 heads, width 64: {count:,} "
                           "parameters")
    config, _, variables, _, _ = _two_tower("demo", modality_dropout=0.1)
    count = sum(variables["params"][k].size for k in ("missing_s1", "missing_s2"))
    assert fusion.fusion_parameter_line(config.model, variables["params"]).startswith(
        f"Fusion: concat with learned missing-modality embeddings: {count:,} parameters")
    config, _, variables, _, _ = _two_tower("demo")
    assert fusion.fusion_parameter_line(config.model, variables["params"]) is None


# ----------------------------------------------------------------------------------------------
# Evaluation and report


def test_missing_modality_metrics_markdown_and_report_columns():
    from mosaic_jax.evaluation import metrics as metrics_lib
    from mosaic_jax.evaluation import report

    rng = np.random.default_rng(0)
    labels = rng.random((40, 3)) < 0.4
    probs = {"s1_only": rng.random((40, 3)), "s2_only": labels * 0.8 + 0.1}
    extra = metrics_lib.missing_modality_metrics(probs, labels)
    for prefix, p in probs.items():
        full = metrics_lib.multilabel_metrics(p, labels)
        assert extra[f"{prefix}_macro_ap"] == full["macro_ap"]
        assert extra[f"{prefix}_ap_per_class"] == full["ap_per_class"]
    assert extra["s2_only_macro_ap"] == 1.0
    m = {**metrics_lib.multilabel_metrics(rng.random((40, 3)), labels), **extra}
    md = metrics_lib.format_metrics_markdown(m, ["a", "b", "c"])
    assert "| macro AP, S2 only (S1 missing) | 1.0000 |" in md
    assert f"| macro AP, S1 only (S2 missing) | {extra['s1_only_macro_ap']:.4f} |" in md
    assert "S2 only (S1 missing) macro AP 1.0000" in metrics_lib.missing_modality_summary(m)

    def run(name, metrics):
        return report.Run(workdir=f"/runs/{name}", method=name, dataset="demo", split="v",
                          metrics=metrics, class_names=["a", "b", "c"], tsne=None,
                          objective="mosaic1")

    single = metrics_lib.multilabel_metrics(rng.random((40, 3)), labels)
    md, csv = report.comparison_table([run("xattn", m), run("simclr", single)])
    header = md.splitlines()[0]
    assert header.endswith("| macro AP, S1 only (S2 missing) | macro AP, S2 only (S1 missing) |")
    assert md.splitlines()[2].endswith(f"| {extra['s1_only_macro_ap']:.4f} | 1.0000 |")
    assert md.splitlines()[3].endswith("| n/a | n/a |")
    csv_header = csv.splitlines()[0].split(",")
    assert csv_header[-4:] == ["s1_only_macro_ap", "s2_only_macro_ap", "classifier_trained",
                               "workdir"]
    assert csv.splitlines()[1].split(",")[-3] == "1.0"


# ----------------------------------------------------------------------------------------------
# Export and scene mapping with a missing modality


@pytest.fixture(scope="module")
def xattn_export(tmp_path_factory):
    """(export dir, model.json, config) of an untrained test-size cross-attention MoSAiC-1."""
    from benchmarks.predict_scene import model_config, untrained_export

    config = configuration.cross_attention_overrides(model_config("tiny"))
    config.model.fusion_dim, config.model.fusion_heads = 16, 2
    root = tmp_path_factory.mktemp("xattn_export")
    info = untrained_export(config, root / "run", root / "export")
    return str(root / "export"), info, config


def _export_inputs(info, n, seed=0):
    rng = np.random.default_rng(seed)
    size = info["input_size"]
    return tuple(rng.normal(size=(n, size, size, len(info["inputs"][m]["bands"])))
                 .astype(np.float32) for m in ("s1", "s2"))


def test_exported_embedder_takes_a_missing_modality(xattn_export):
    from mosaic_jax import export
    from mosaic_jax.data import augment
    from mosaic_jax.training import checkpoints

    export_dir, info, _ = xattn_export
    assert info["embedder"]["args"] == ["s1", "s2", "present"]
    embed = export.load_embedder(export_dir)
    s1, s2 = _export_inputs(info, 3)
    alone = embed(s1, None)
    garbage = embed(s1, np.full_like(s2, np.nan), present=np.array([[True, False]] * 3))
    for key in alone:
        np.testing.assert_array_equal(garbage[key], alone[key], err_msg=key)
    np.testing.assert_array_equal(alone["h_s2"], 0.0)
    np.testing.assert_array_equal(alone["inter_s2"], 0.0)
    # Against the model applied directly with S2 marked absent.
    run = checkpoints.restore_variables(str(pathlib.Path(export_dir).parent / "run"))
    model, size = models.create_model(run.config), run.config.augment.out_size
    out, _ = models.apply_model(model, run.variables, run.config,
                                augment.center_resize(s1, size), augment.center_resize(s2, size),
                                train=False, missing_variants=True)
    np.testing.assert_allclose(alone["probs"], jax.nn.sigmoid(out["logits_s1_only"]), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(alone["h_s1"], out["h_s1"], rtol=1e-5, atol=1e-6)
    both = embed(s1, s2)
    np.testing.assert_allclose(both["probs"], jax.nn.sigmoid(out["logits"]), rtol=1e-5,
                               atol=1e-6)
    # Per sample: the second row without S1.
    mixed = embed(s1, s2, present=np.array([[True, True], [False, True], [True, True]]))
    np.testing.assert_allclose(mixed["probs"][1], embed(None, s2)["probs"][1], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(mixed["probs"][0], both["probs"][0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="both None"):
        embed(None, None)
    with pytest.raises(ValueError, match=r"sample\(s\) \[2\] have neither S1 nor S2"):
        embed(s1, s2, present=np.array([[True, True], [False, True], [False, False]]))


def test_an_export_without_the_presence_input_still_loads_and_names_what_it_needs(
        xattn_export, tmp_path):
    import shutil

    from mosaic_jax import export
    from mosaic_jax.export import exporter
    from mosaic_jax.training import checkpoints

    export_dir, info, _ = xattn_export
    old = tmp_path / "old_export"
    shutil.copytree(export_dir, old)
    run = checkpoints.restore_variables(str(pathlib.Path(export_dir).parent / "run"))
    fn, _ = exporter.make_embed_fn(run.config, run.variables, info["input_size"])
    (b,) = jax.export.symbolic_shape("b")
    args = [jax.ShapeDtypeStruct((b, *x.shape[1:]), jnp.float32)
            for x in _export_inputs(info, 1)]
    two_inputs = jax.export.export(jax.jit(lambda a, c: fn(a, c)), platforms=("cpu",))(*args)
    (old / export.EMBEDDER_FILE).write_bytes(two_inputs.serialize())
    embed = export.load_embedder(old)
    s1, s2 = _export_inputs(info, 2)
    np.testing.assert_allclose(embed(s1, s2)["probs"],
                               export.load_embedder(export_dir)(s1, s2)["probs"], rtol=1e-5)
    with pytest.raises(ValueError, match="this export needs S2: its embedder has no presence "
                                         "input .* re-export"):
        embed(s1, None)


def test_a_scene_is_mapped_from_s1_alone(xattn_export, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from data_builders.fake_scene import write_fake_scene
    from mosaic_jax import export
    from mosaic_jax.data import bands
    from mosaic_jax.inference import predict

    export_dir, info, _ = xattn_export
    size = info["input_size"]
    s1_path, s2_path = str(tmp_path / "s1.tif"), str(tmp_path / "s2.tif")
    write_fake_scene(s1_path, s2_path, height=2 * size, width=2 * size, seed=3)
    summary = predict.predict_scene(export_dir, s1_path, None, str(tmp_path / "map.tif"),
                                    stride=size, progress=False, log=lambda _: None)
    assert summary["modalities_missing"] == "from S1 alone (S2 missing)"
    assert os.path.isfile(summary["quicklook"])
    with rasterio.open(s1_path) as src:
        x1 = np.moveaxis(src.read(), 0, -1)
    n1 = bands.normalize(x1, info["dataset"], "s1", info["inputs"]["s1"]["bands"])
    n1[np.isnan(x1).any(-1)] = 0
    windows = np.stack([n1[r:r + size, c:c + size] for r in (0, size) for c in (0, size)])
    want = np.asarray(export.load_embedder(export_dir)(windows, None)["probs"])
    with rasterio.open(summary["output"]) as src:
        got = np.moveaxis(src.read(), 0, -1)  # [2, 2, C]: one cell per window
    np.testing.assert_allclose(got.reshape(4, -1), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="give --s1, --s2 or both"):
        predict.predict_scene(export_dir, None, None, str(tmp_path / "x.tif"), progress=False)


def test_a_missing_modality_on_a_model_trained_without_dropout_is_warned_about():
    from mosaic_jax.export import untrained_absence_note

    concat = {"model": {"kind": "two_tower", "modality_dropout": 0.0}}
    assert untrained_absence_note(concat, "s2").startswith(
        "warning: S2 is missing, but this model was trained with both modalities")
    assert untrained_absence_note({"model": {"kind": "two_tower", "modality_dropout": 0.3}},
                                  "s2") == ""
    assert untrained_absence_note({"model": {"kind": "single_tower"}}, "s1") == ""
