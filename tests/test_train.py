"""The training program: train step, device-count invariance, resume, configs, errors."""

import functools
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import program_config, tiny

from mosaic_jax import models
from mosaic_jax.training import checkpoints, configuration, train

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_NAMES = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")


def load_config(name, arg="demo"):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def random_batch(config, n, seed=0, size=24):
    rng = np.random.default_rng(seed)
    (_, _, c1), (_, _, c2) = models.input_shapes(config)
    labels = rng.random((n, configuration.num_classes(config))) < 0.3
    labels[:, 0] |= ~labels.any(axis=1)
    # Learnable signal: channel 0 of S2 carries the first label.
    s2 = rng.normal(size=(n, size, size, c2)).astype(np.float32)
    s2[..., 0] += 2.0 * labels[:, :1, None].astype(np.float32)
    return {"s1": rng.normal(size=(n, size, size, c1)).astype(np.float32), "s2": s2,
            "labels": labels.astype(np.float32), "label_mask": rng.random(n) < 0.8}


def setup(config, devices=None):
    mesh = train.make_mesh(devices)
    model = models.create_model(config)
    tx = train.create_optimizer(config)
    state = train.init_state(config, model, tx)
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return mesh, train.make_train_step(config, model, tx, mesh), state


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    config = tiny(load_config("mosaic1"))
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 0
    config.num_train_steps = 15
    # Deterministic views, so that the loss of successive steps is comparable.
    a = config.augment
    a.crop_scale, a.hflip, a.vflip, a.rot90 = (1.0, 1.0), False, False, False
    a.brightness = a.contrast = a.sar_noise_db = a.sar_offset_db = 0.0
    mesh, step, state = setup(config, jax.devices()[:1])
    batch = train.global_batch(random_batch(config, 16), mesh, train.TRAIN_KEYS)
    first = None
    for _ in range(config.num_train_steps):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
        assert np.isfinite(float(metrics["loss"]))
    assert float(metrics["loss"]) < 0.7 * first, (first, float(metrics["loss"]))
    assert int(state.step) == config.num_train_steps


def test_step_on_eight_devices_matches_one_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    config = tiny(load_config("mosaic1"))
    local = random_batch(config, 16, seed=3)
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        mesh, step, state = setup(config, devices)
        batch = train.global_batch(local, mesh, train.TRAIN_KEYS)
        for _ in range(2):
            state, metrics = step(state, batch)
        results.append((jax.device_get(state), jax.device_get(metrics)))
    (s1, m1), (s8, m8) = results
    for key in m1:
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves((s8.params, s8.batch_stats, s8.opt_state)),
                    jax.tree.leaves((s1.params, s1.batch_stats, s1.opt_state)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_third_view_feeds_the_inter_term_and_matches_an_independent_forward():
    # IaI-SimCLR as published: intra terms on views a and b, the inter term on a third view.
    from mosaic_jax import losses
    from mosaic_jax.data import augment

    config = tiny(load_config("iai_simclr"))
    assert config.loss.inter_view == "third"
    config.model.sync_bn = False  # so that the model also applies outside the mapped step
    n = 8
    local = random_batch(config, n, seed=5)
    mesh, step, state = setup(config, jax.devices()[:1])
    before = jax.device_get(state)
    _, metrics = step(state, train.global_batch(local, mesh, train.TRAIN_KEYS))

    # The step's documented randomness: per-sample keys folded from the step's augment key.
    aug_rng = jax.random.split(jax.random.fold_in(before.rng, 0))[0]
    aug = train.augment_config(config)
    # Sample by sample (a batch of one each), independently of the step's batched call.
    views = [augment.paired_views(jax.random.fold_in(aug_rng, i)[None], local["s1"][i:i + 1],
                                  local["s2"][i:i + 1], aug, 3) for i in range(n)]
    v1 = jnp.concatenate([v[0] for v in views], axis=1)  # [3, n, o, o, c1]
    v2 = jnp.concatenate([v[1] for v in views], axis=1)
    model = models.create_model(config)
    out, _ = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        {"params": before.params, "batch_stats": before.batch_stats},
        v1.reshape(3 * n, *v1.shape[2:]), v2.reshape(3 * n, *v2.shape[2:]))
    a, b, c = ({k: t[i * n:(i + 1) * n] for k, t in out.items()} for i in range(3))
    expected = {
        "loss_intra_s1": losses.nt_xent(a["intra_s1"], b["intra_s1"], temperature=0.5),
        "loss_intra_s2": losses.nt_xent(a["intra_s2"], b["intra_s2"], temperature=0.5),
        "loss_inter": losses.nt_xent(c["inter_s1"], c["inter_s2"], temperature=0.5),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(metrics[key], value, rtol=2e-5, err_msg=key)
    # Reading the inter term off views a and b instead is a different number.
    shared = 0.5 * (losses.nt_xent(a["inter_s1"], a["inter_s2"], temperature=0.5)
                    + losses.nt_xent(b["inter_s1"], b["inter_s2"], temperature=0.5))
    assert abs(float(shared) - float(metrics["loss_inter"])) > 1e-4


def test_third_view_costs_half_as_much_again():
    flops = {}
    for view in ("shared", "third"):
        config = tiny(load_config("iai_simclr"))
        config.loss.inter_view = view
        cost = _compile_step(config, jax.devices()[:1], lower_only=True).cost_analysis()
        flops[view] = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    assert 1.35 < flops["third"] / flops["shared"] < 1.55, flops


def _compile_step(config, devices=None, lower_only=False):
    """The train step compiled ahead of time (or only lowered) for abstract state and batch."""
    mesh = train.make_mesh(devices)
    model = models.create_model(config)
    tx = train.create_optimizer(config)
    state = jax.eval_shape(lambda: train.init_state(config, model, tx))
    shapes = models.input_shapes(config)
    b = config.batch_size
    batch = {"s1": jax.ShapeDtypeStruct((b, 24, 24, shapes[0][-1]), jnp.float32),
             "s2": jax.ShapeDtypeStruct((b, 24, 24, shapes[1][-1]), jnp.float32),
             "labels": jax.ShapeDtypeStruct((b, configuration.num_classes(config)), jnp.float32),
             "label_mask": jax.ShapeDtypeStruct((b,), jnp.bool_)}
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                         state)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data) for k, v in batch.items()}
    lowered = train.make_train_step(config, model, tx, mesh).lower(state, batch)
    return lowered if lower_only else lowered.compile()


@pytest.mark.slow
@pytest.mark.parametrize("name, arg", [(n, "demo") for n in CONFIG_NAMES]
                         + [("supervised", "demo,convnext"), ("supervised", "demo,late")])
def test_every_config_builds_and_its_step_compiles_ahead_of_time(name, arg):
    config = tiny(load_config(name, arg))
    if config.train_mode == "linear_probe":
        config.init_from = "a pretraining workdir (not read here)"
    configuration.validate_config(config)
    compiled = _compile_step(config)
    _, metrics = compiled.out_info
    from mosaic_jax import objectives

    terms = objectives.terms_of(config.objective)
    assert {f"loss_{t}" for t in terms} | {"loss", "grad_norm"} <= set(metrics)
    assert all(m.shape == () for m in metrics.values())


# ----------------------------------------------------------------------------------------------
# Configuration errors


def test_full_recipe_uses_ten_percent_of_the_training_data():
    config = load_config("mosaic1", None)
    configuration.validate_config(config)
    assert config.data.train_fraction == 0.1 and not config.data.demo
    assert config.data.name == "bigearthnet_v2"


@pytest.mark.parametrize("change, key", [
    (lambda c: c.unlock().__setattr__("batchsize", 3), "batchsize"),
    (lambda c: c.model.unlock().__setattr__("encoders", "x"), "model.encoders"),
    (lambda c: setattr(c, "batch_size", 12), "batch_size"),
    (lambda c: setattr(c.model, "s1_encoder", "resnet99"), "model.s1_encoder"),
    (lambda c: setattr(c.loss, "t_sup", -0.1), "loss.t_sup"),
    (lambda c: setattr(c.data, "train_fraction", 1.5), "data.train_fraction"),
    (lambda c: setattr(c.data, "s2_bands", "s2_everything"), "data.s2_bands"),
    (lambda c: setattr(c.optimizer, "name", "rmsprop"), "optimizer.name"),
    (lambda c: c.loss.weights.unlock().__setattr__("intra", 1.0), "loss.weights.intra"),
    (lambda c: setattr(c, "objective", "mosaic3"), "objective"),
    (lambda c: setattr(c.loss, "inter_view", "fourth"), "loss.inter_view"),
    (lambda c: c.model.unlock().__setattr__("remat", None), "model.remat"),
    (lambda c: setattr(c.optimizer, "learning_rate", float("inf")), "optimizer.learning_rate"),
    (lambda c: setattr(c.loss, "t_intra", float("inf")), "loss.t_intra"),
    (lambda c: setattr(c.loss, "t_sup", float("nan")), "loss.t_sup"),
    (lambda c: setattr(c.loss.weights, "bce", float("inf")), "loss.weights.bce"),
    (lambda c: setattr(c.augment, "crop_ratio", (0.5, float("inf"))), "augment.crop_ratio"),
])
def test_invalid_config_raises_an_error_naming_the_key(change, key):
    config = load_config("mosaic1")
    change(config)
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        configuration.validate_config(config)


def test_third_view_needs_an_inter_modal_term():
    config = load_config("supcon")
    config.loss.inter_view = "third"
    with pytest.raises(ValueError, match="config key 'loss.inter_view'.*does not have"):
        configuration.validate_config(config)


def test_self_supervised_runs_point_to_the_linear_probe():
    assert train.linear_probe_hint(load_config("mosaic1"), "runs/m") is None
    for arg in ("demo", "sen12ms"):
        hint = train.linear_probe_hint(load_config("iai_simclr", arg), "runs/iai")
        assert (f"--config=configs/linear_probe.py:{arg} --config.init_from=runs/iai "
                "--workdir=runs/iai_probe") in hint
        probe = load_config("linear_probe", arg)  # the command names a valid config
        probe.init_from = "runs/iai"
        configuration.validate_config(probe)
    hint = train.linear_probe_hint(load_config("simclr", None), "gs://b/r")
    assert "--config=configs/linear_probe.py --config.init_from=gs://b/r " in hint


def test_a_bce_term_of_weight_zero_also_points_to_the_linear_probe():
    # The report calls such a run's classifier untrained; the closing hint agrees.
    config = load_config("mosaic1")
    config.loss.weights.bce = 0.0
    assert "does not train the classifier" in train.linear_probe_hint(config, "runs/m")


def test_unknown_config_argument_is_rejected():
    with pytest.raises(ValueError, match="unknown config argument 'dmeo'"):
        load_config("mosaic1", "dmeo")


def _run_main(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "mosaic_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_line_rejects_unknown_key_and_missing_dataset(tmp_path):
    bad = _run_main("--config=configs/mosaic1.py", f"--workdir={tmp_path}/w",
                    "--config.model.widht_multiplier=2")
    assert bad.returncode != 0 and "widht_multiplier" in bad.stderr
    missing = _run_main("--config=configs/mosaic1.py", f"--workdir={tmp_path}/w",
                        f"--config.data.data_dir={tmp_path}/nothing")
    assert missing.returncode != 0
    assert "python -m data_builders.prepare bigearthnet_v2" in missing.stderr, missing.stderr


# ----------------------------------------------------------------------------------------------
# The whole program on a prepared fake dataset


def _state_of(workdir, step):
    return checkpoints.restore_variables(workdir, step).variables


@pytest.mark.slow
def test_resumed_run_ends_like_an_uninterrupted_run(prepared_fake, trained_workdir, tmp_path,
                                                    capsys):
    config = program_config(prepared_fake)
    full, metrics_full = trained_workdir
    resumed = str(tmp_path / "resumed")
    # Interrupt after the step-3 checkpoint: run, then drop the later checkpoint and rerun.
    train.train_and_evaluate(config, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    capsys.readouterr()
    metrics_resumed = train.train_and_evaluate(config, resumed)
    assert "Resuming from the checkpoint at step 3" in capsys.readouterr().out

    for a, b in zip(jax.tree.leaves(_state_of(full, 6)), jax.tree.leaves(_state_of(resumed, 6)),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert metrics_full == metrics_resumed
    for name in ("metrics_validation.json", "metrics_validation.md", "config.json"):
        assert os.path.getsize(os.path.join(full, name)) > 0
    record = json.loads(open(os.path.join(full, "metrics_validation.json")).read())
    assert record["step"] == 6 and record["macro_ap"] == metrics_full["macro_ap"]


@pytest.mark.slow
def test_load_pretrained_copies_encoders_and_heads_but_not_the_classifier(trained_workdir):
    workdir, _ = trained_workdir
    config = program_config("unused")
    model = models.create_model(config)
    tx = train.create_optimizer(config)
    fresh = train.init_state(config, model, tx)
    loaded = train.load_pretrained(fresh, workdir)
    saved = _state_of(workdir, 6)
    for name in loaded.params:
        want = fresh.params[name] if name == "classifier" else saved["params"][name]
        for a, b in zip(jax.tree.leaves(loaded.params[name]), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_linear_probe_trains_only_the_classifier(prepared_fake, trained_workdir, tmp_path):
    workdir, _ = trained_workdir
    config = tiny(load_config("linear_probe"))
    config.data.demo = False
    config.data.data_dir = prepared_fake
    config.init_from = workdir
    config.num_train_steps = 3
    config.tsne_points = 0
    config.model.width_multiplier = 1.0   # replaced by the pretraining run's model
    metrics = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(metrics["macro_ap"])
    probe, saved = _state_of(str(tmp_path), 3), _state_of(workdir, 6)
    for name in saved["params"]:
        same = [np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(probe["params"][name]), jax.tree.leaves(saved["params"][name]),
            strict=True)]
        assert all(same) == (name != "classifier"), name
    for a, b in zip(jax.tree.leaves(probe["batch_stats"]), jax.tree.leaves(saved["batch_stats"]),
                    strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Divergence: never save a non-finite state


def test_step_reports_whether_loss_gradient_and_state_are_finite():
    config = tiny(load_config("mosaic1"))
    mesh, step, state = setup(config, jax.devices()[:1])
    local = random_batch(config, 16, seed=4)
    _, metrics = step(state, train.global_batch(local, mesh, train.TRAIN_KEYS))
    assert metrics[train.FINITE_KEY].dtype == bool and bool(metrics[train.FINITE_KEY])
    mesh, step, state = setup(config, jax.devices()[:1])
    local["s2"][3, 0, 0, 0] = np.nan  # one NaN pixel of one sample
    _, metrics = step(state, train.global_batch(local, mesh, train.TRAIN_KEYS))
    assert not bool(metrics[train.FINITE_KEY])
    # A state that is non-finite before the step (finite loss aside) is reported too.
    mesh, step, state = setup(config, jax.devices()[:1])
    params = jax.tree.map(lambda x: x, jax.device_get(state.params))
    params["classifier"]["bias"] = np.full_like(params["classifier"]["bias"], np.inf)
    state = jax.device_put(state.replace(params=params),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    _, metrics = step(state, train.global_batch(random_batch(config, 16), mesh, train.TRAIN_KEYS))
    assert not bool(metrics[train.FINITE_KEY])


def test_all_finite_reads_every_float_leaf_and_ignores_integers():
    tree = {"a": jnp.ones(3), "b": [jnp.zeros((2, 2), jnp.bfloat16)], "n": jnp.arange(3)}
    assert bool(train.all_finite(tree))
    tree["b"][0] = tree["b"][0].at[1, 1].set(jnp.inf)
    assert not bool(train.all_finite(tree))
    assert bool(train.all_finite({"n": jnp.arange(2)}))


@pytest.mark.parametrize("values, first", [
    ({"loss_intra_s1": 1.0, "loss_bce": np.nan, "loss": np.nan, "grad_norm": np.nan},
     "loss term(s) bce (nan)"),
    ({"loss_bce": 1.0, "loss": np.inf, "grad_norm": 1.0}, "the total loss (inf)"),
    ({"loss_bce": 1.0, "loss": 1.0, "grad_norm": np.nan}, "the gradient (norm nan)"),
    ({"loss_bce": 1.0, "loss": 1.0, "grad_norm": 2.0}, "the updated parameters"),
])
def test_divergence_message_names_the_step_the_first_term_and_the_last_checkpoint(values, first):
    metrics = {**values, "learning_rate": 0.1, train.FINITE_KEY: False}
    with pytest.raises(train.DivergenceError) as error:
        train.check_finite(17, metrics, 16, "/w/checkpoints")
    message = str(error.value)
    assert "diverged at step 17" in message and first in message
    assert "last good checkpoint is step 16 in /w/checkpoints" in message
    with pytest.raises(train.DivergenceError, match="no checkpoint had been saved yet"):
        train.check_finite(1, metrics, None, "/w/checkpoints")
    train.check_finite(17, {**metrics, train.FINITE_KEY: True}, 16, "/w/checkpoints")


def _checkpoint_is_finite(workdir, step):
    return all(np.isfinite(x).all() for x in jax.tree.leaves(_state_of(workdir, step)))


@pytest.mark.slow
def test_nan_between_log_steps_is_caught_at_its_step_and_never_saved(prepared_fake, tmp_path,
                                                                    monkeypatch):
    # Step 3 sees a NaN pixel; logs come every 6 steps, checkpoints every 2: the old guard
    # (the logged loss average) would have saved the NaN state as checkpoint 4.
    config = program_config(prepared_fake)
    config.num_train_steps, config.log_every_steps, config.checkpoint_every_steps = 6, 6, 2
    calls = []
    real = train.global_batch

    def poisoned(local, mesh, keys):
        calls.append(1)
        if len(calls) == 3 and "labels" in keys:
            local = dict(local, s2=np.where(np.arange(local["s2"].shape[0])[:, None, None, None]
                                            == 0, np.nan, local["s2"]))
        return real(local, mesh, keys)

    monkeypatch.setattr(train, "global_batch", poisoned)
    workdir = str(tmp_path / "w")
    with pytest.raises(train.DivergenceError, match="diverged at step 3:.*last good checkpoint "
                       "is step 2"):
        train.train_and_evaluate(config, workdir)
    assert checkpoints.checkpoint_steps(workdir) == [2]
    assert _checkpoint_is_finite(workdir, 2)


@pytest.mark.slow
def test_diverging_command_exits_non_zero_and_keeps_the_last_finite_checkpoint(prepared_fake,
                                                                              tmp_path):
    workdir = tmp_path / "nan"
    result = _run_main(
        "--config=configs/mosaic1.py:demo", f"--workdir={workdir}",
        "--config.data.demo=False", f"--config.data.data_dir={prepared_fake}",
        "--config.batch_size=16", "--config.eval_batch_size=16", "--config.augment.out_size=16",
        "--config.model.width_multiplier=0.03125", "--config.tsne_points=0",
        "--config.num_train_steps=8", "--config.checkpoint_every_steps=2",
        "--config.log_every_steps=8", "--config.optimizer.warmup_steps=1",
        "--config.optimizer.learning_rate=1e6")
    assert result.returncode != 0, result.stdout
    assert "error: training diverged at step" in result.stderr, result.stderr
    assert "Done" not in result.stdout
    steps = checkpoints.checkpoint_steps(workdir)
    for step in steps:
        assert _checkpoint_is_finite(workdir, step), step
