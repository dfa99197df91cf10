"""The training program: model, optimizer, sharded train step, evaluation, checkpoints.

The core (`create_model`, `create_optimizer`, `init_state`, `make_train_step`,
`make_eval_step`) is pure: arrays and pytrees in, arrays and pytrees out. `train_and_evaluate` is
the edge that reads data, writes checkpoints, metrics and pictures.

One jitted step runs under `jax.shard_map` over a mesh with one `data` axis spanning all devices:
each device augments and encodes its rows, the losses see the global batch through their
`axis_name`, BatchNorm statistics are averaged over the axis (unless `model.sync_bn` is False),
and `jax.grad` inside the map returns the exact global gradient (shard_map inserts the psum
of the replicated parameters' cotangents), so the optimizer update is replicated.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mosaic_jax import atomic_files, augment, objectives
from mosaic_jax.models import SingleTower, TwoTower

DATA_AXIS = "data"
Batch = Mapping[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
    """Everything a training run carries from step to step (replicated over the mesh)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]; the step's key is fold_in(rng, step).


# ----------------------------------------------------------------------------------------------
# Model, optimizer, state


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The two-tower (S1, S2) or single-tower model that `config.model` describes."""
    m = config.model
    common = dict(width_multiplier=m.width_multiplier, stem=m.stem,
                  proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim,
                  num_classes=config.data.num_classes, dtype=jnp.dtype(m.dtype),
                  bn_axis_name=DATA_AXIS if m.sync_bn else None, bn_momentum=m.bn_momentum,
                  drop_path_rate=m.drop_path_rate, remat=m.remat)
    if m.kind == "two_tower":
        return TwoTower(s1_encoder=m.s1_encoder, s2_encoder=m.s2_encoder, **common)
    return SingleTower(encoder=m.encoder, **common)


def model_outputs(model: nn.Module, variables: Any, config: ml_collections.ConfigDict,
                  s1: jax.Array, s2: jax.Array, *, train: bool, rng: jax.Array | None = None):
    """Applies the model to an S1/S2 batch; returns (outputs dict, new batch_stats or None)."""
    if config.model.kind == "two_tower":
        args = (s1, s2)
    else:
        inputs = {"s1": s1, "s2": s2, "s1s2": None}[config.model.inputs]
        args = (jnp.concatenate([s1, s2], axis=-1) if inputs is None else inputs,)
    rngs = {"dropout": rng} if rng is not None else {}
    if train:
        out, updates = model.apply(variables, *args, train=True, mutable=["batch_stats"],
                                   rngs=rngs)
        return out, updates["batch_stats"]
    return model.apply(variables, *args, train=False), None


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to `optimizer.learning_rate`, then cosine decay to zero."""
    o = config.optimizer
    warmup = min(o.warmup_steps, max(config.num_train_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.num_train_steps, warmup + 1), end_value=0.0)


def _decay_mask(params: Any) -> Any:
    """Weight decay (and LARS adaptation) on kernels only, not on biases or norm parameters."""
    return jax.tree.map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW, momentum SGD or LARS with the warmup + cosine schedule."""
    o = config.optimizer
    schedule = learning_rate_schedule(config)
    if o.name == "adamw":
        tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                         mask=_decay_mask)
    elif o.name == "sgd":  # momentum SGD with decoupled weight decay on kernels
        tx = optax.chain(optax.add_decayed_weights(o.weight_decay, mask=_decay_mask),
                         optax.sgd(schedule, momentum=o.momentum))
    else:
        tx = optax.lars(schedule, weight_decay=o.weight_decay, weight_decay_mask=_decay_mask,
                        trust_coefficient=o.trust_coefficient, trust_ratio_mask=_decay_mask,
                        momentum=o.momentum)
    if o.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    if config.train_mode == "linear_probe":  # only the classifier learns
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()},
            lambda params: {k: "train" if k == "classifier" else "frozen" for k in params})
    return tx


def input_shapes(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-sample model input shapes (H, W, C) of S1 and S2 after augmentation."""
    from mosaic_jax import bands

    size = config.augment.out_size
    c1 = len(bands.resolve_bands(config.data.s1_bands, config.data.name, "s1"))
    c2 = len(bands.resolve_bands(config.data.s2_bands, config.data.name, "s2"))
    return (size, size, c1), (size, size, c2)


def init_state(config: ml_collections.ConfigDict, model: nn.Module,
               tx: optax.GradientTransformation) -> TrainState:
    """Initial parameters, BatchNorm statistics and optimizer state from `config.seed`."""
    rng = jax.random.PRNGKey(config.seed)
    init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    (h, w, c1), (_, _, c2) = input_shapes(config)
    s1, s2 = jnp.zeros((2, h, w, c1)), jnp.zeros((2, h, w, c2))
    if config.model.kind == "two_tower":
        args = (s1, s2)
    else:
        args = ({"s1": s1, "s2": s2, "s1s2": jnp.concatenate([s1, s2], -1)}[config.model.inputs],)
    # Initialise outside any mapped axis: BatchNorm must not look for the `data` axis here.
    init = jax.jit(model.clone(bn_axis_name=None).init, static_argnames="train")
    variables = init({"params": init_rng, "dropout": dropout_rng}, *args, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=state_rng)


def adopt_pretrained_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose `model` section is the one of the `init_from` run."""
    from mosaic_jax import checkpoint_io

    pretrained = checkpoint_io.load_config(config.init_from)
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in pretrained.model.items():
        if key in config.model:
            config.model[key] = value
    return config


def load_pretrained(state: TrainState, workdir: str) -> TrainState:
    """Copies the encoder and projection-head weights of `workdir`'s latest checkpoint.

    The classifier is always left as initialised (the downstream label set may differ); every
    other module must exist in the checkpoint with the same shapes, or ValueError names it.
    """
    from mosaic_jax import checkpoint_io

    restored = checkpoint_io.restore_variables(workdir).variables
    params, batch_stats = dict(state.params), dict(state.batch_stats)
    for name in params:
        if name == "classifier":
            continue
        if name not in restored["params"]:
            raise ValueError(f"config key 'init_from': {workdir} has no module {name!r}")
        mine = jax.tree.map(jnp.shape, params[name])
        theirs = jax.tree.map(jnp.shape, restored["params"][name])
        if mine != theirs:
            raise ValueError(f"config key 'init_from': module {name!r} of {workdir} has other "
                             f"shapes than this config's model (check config.model)")
        params[name] = restored["params"][name]
        if name in batch_stats:
            batch_stats[name] = restored["batch_stats"][name]
    return state.replace(params=params, batch_stats=batch_stats)


def augment_config(config: ml_collections.ConfigDict) -> augment.AugmentConfig:
    a = config.augment
    sar_std = None
    if config.data.name:
        from mosaic_jax import bands

        _, std = bands.band_stats(config.data.name, "s1", config.data.s1_bands)
        sar_std = tuple(float(s) for s in std)
    return augment.AugmentConfig(
        out_size=a.out_size, crop_scale=tuple(a.crop_scale), crop_ratio=tuple(a.crop_ratio),
        hflip=a.hflip, vflip=a.vflip, rot90=a.rot90, brightness=a.brightness,
        contrast=a.contrast, sar_noise_db=a.sar_noise_db, sar_offset_db=a.sar_offset_db,
        sar_std_db=sar_std, share_spatial=a.share_spatial)


def loss_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    lc = config.loss
    return dict(weights=dict(lc.weights), t_intra=lc.t_intra, t_inter=lc.t_inter,
                t_sup=lc.t_sup, mulsupcon_weighting=lc.mulsupcon_weighting,
                block_size=lc.block_size if lc.block_size > 0 else None)


# ----------------------------------------------------------------------------------------------
# Steps


def make_mesh(devices: list | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh whose `data` axis spans `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                             axis_types=(jax.sharding.AxisType.Explicit,))


FINITE_KEY = "all_finite"  # the train step's bool metric: loss, gradient norm, new state finite


def all_finite(tree: Any) -> jax.Array:
    """bool[]: every element of every floating-point leaf of `tree` is finite."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss, gradient or state; nothing of it was saved."""


def check_finite(step: int, metrics: Mapping[str, Any], last_good: int | None,
                 checkpoint_dir: str) -> None:
    """Raises DivergenceError when step `step`'s metrics say it went non-finite.

    The message names the step, what went non-finite first (in the order the step computes
    them: the loss terms, the total loss, the gradient, the updated state) and the last good
    checkpoint, which stays in place since no non-finite state is ever saved.
    """
    if bool(metrics[FINITE_KEY]):
        return
    values = {k: float(v) for k, v in metrics.items() if k != FINITE_KEY}
    bad_terms = [k.removeprefix("loss_") for k, v in values.items()
                 if k.startswith("loss_") and not np.isfinite(v)]
    if bad_terms:
        what = "the loss term(s) " + ", ".join(f"{t} ({values['loss_' + t]})" for t in bad_terms)
    elif not np.isfinite(values["loss"]):
        what = f"the total loss ({values['loss']})"
    elif not np.isfinite(values["grad_norm"]):
        what = f"the gradient (norm {values['grad_norm']})"
    else:
        what = "the updated parameters, BatchNorm statistics or optimizer state"
    kept = (f"the last good checkpoint is step {last_good} in {checkpoint_dir}"
            if last_good is not None else "no checkpoint had been saved yet")
    raise DivergenceError(
        f"training diverged at step {step}: {what} went non-finite first. Nothing of that step "
        f"was saved; {kept}. Lower optimizer.learning_rate (or raise optimizer.warmup_steps, set "
        "optimizer.grad_clip_norm) and rerun the same command to resume from it.")


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted, donated step (state, global batch) -> (new state, scalar metrics).

    The batch holds normalised `s1` [B, H, W, c1], `s2` [B, H, W, c2], `labels` [B, C] and
    `label_mask` [B], sharded over the `data` axis; metrics are replicated float32 scalars, plus
    the bool `metrics[FINITE_KEY]` (loss, gradient norm and new state all finite).
    """
    objective = config.objective
    hp = loss_hparams(config)
    aug = augment_config(config)
    schedule = learning_rate_schedule(config)
    sync_bn = config.model.sync_bn
    num_views = 3 if config.loss.inter_view == "third" else 2

    def per_device(state: TrainState, batch: Batch):
        step_rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, drop_rng = jax.random.split(step_rng)
        n = batch["s1"].shape[0]
        # One key per global sample index: the views do not depend on the device count.
        first = jax.lax.axis_index(DATA_AXIS) * n
        keys = jax.vmap(jax.random.fold_in, (None, 0))(aug_rng, first + jnp.arange(n))
        v1, v2 = augment.paired_views(keys, batch["s1"], batch["s2"], aug, num_views)
        drop_rng = jax.random.fold_in(drop_rng, jax.lax.axis_index(DATA_AXIS))
        # All views in one forward pass: [V * n, ...], view-major.
        s1 = v1.reshape(num_views * n, *v1.shape[2:])
        s2 = v2.reshape(num_views * n, *v2.shape[2:])

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            # A linear probe reads frozen encoders in inference mode (running BN statistics).
            out, batch_stats = model_outputs(model, variables, config, s1, s2,
                                             train=config.train_mode != "linear_probe",
                                             rng=drop_rng)
            batch_stats = state.batch_stats if batch_stats is None else batch_stats
            per_view = [jax.tree.map(lambda t, i=i: t[i * n:(i + 1) * n], out)
                        for i in range(num_views)]
            loss, terms = objectives.compute_objective(
                objective, per_view[0], per_view[1], batch["labels"], batch["label_mask"], hp,
                axis_name=DATA_AXIS, out_inter=per_view[2] if num_views == 3 else None)
            return loss, (terms, batch_stats)

        (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        if not sync_bn:  # per-device statistics; keep one running average.
            batch_stats = jax.lax.pmean(batch_stats, DATA_AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        labelled = jax.lax.psum(jnp.sum(batch["label_mask"]), DATA_AXIS)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()},
                   "learning_rate": schedule(state.step),
                   "grad_norm": grad_norm,
                   "labelled_fraction": labelled / (n * jax.lax.axis_size(DATA_AXIS))}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        metrics[FINITE_KEY] = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                               & all_finite((params, batch_stats, opt_state)))
        return new_state, metrics

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                            out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)


def make_eval_step(config: ml_collections.ConfigDict, model: nn.Module,
                   mesh: jax.sharding.Mesh) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Jitted (state, batch) -> {"probs" [B, C], "embedding" [B, F]} on centre-resized input."""
    size = config.augment.out_size
    embed_key = "h_fused" if config.model.kind == "two_tower" else "h"

    def step(state: TrainState, batch: Batch):
        s1 = augment.center_resize(batch["s1"], size)
        s2 = augment.center_resize(batch["s2"], size)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        out, _ = model_outputs(model, variables, config, s1, s2, train=False)
        return {"probs": jax.nn.sigmoid(out["logits"]), "embedding": out[embed_key]}

    return jax.jit(step, out_shardings=NamedSharding(mesh, P(DATA_AXIS)))


def global_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                 keys: tuple[str, ...]) -> dict[str, jax.Array]:
    """Assembles each process's local rows into global arrays sharded over `data`."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
            for k in keys}


TRAIN_KEYS = ("s1", "s2", "labels", "label_mask")


# ----------------------------------------------------------------------------------------------
# The program (the edge: data, checkpoints, logs, files)


def evaluate(config, state, eval_step, eval_ds, mesh, *, max_batches: int = 0):
    """Runs the eval step over one pass of `eval_ds`; returns (probs, labels, embeddings)."""
    from jax.experimental import multihost_utils

    probs, labels, embeddings = [], [], []
    for i, local in enumerate(eval_ds):
        if max_batches and i >= max_batches:
            break
        batch = global_batch(local, mesh, ("s1", "s2"))
        out = eval_step(state, batch)
        out = multihost_utils.process_allgather(out, tiled=True)
        valid = multihost_utils.process_allgather(np.asarray(local["valid"]), tiled=True)
        lab = multihost_utils.process_allgather(np.asarray(local["labels"]), tiled=True)
        probs.append(np.asarray(out["probs"])[valid])
        embeddings.append(np.asarray(out["embedding"])[valid])
        labels.append(lab[valid] > 0)
    return np.concatenate(probs), np.concatenate(labels), np.concatenate(embeddings)


def write_eval_outputs(workdir: str, split: str, step: int, metrics: dict,
                       embeddings: np.ndarray, labels: np.ndarray, class_names: list[str],
                       tsne_points: int) -> None:
    """JSON and markdown metrics, a t-SNE PNG, and a line in the eval history (process 0)."""
    from mosaic_jax.metrics import format_metrics_markdown
    from mosaic_jax.tsne_plot import plot_tsne

    record = {"step": step, "split": split, **metrics}
    atomic_files.write_atomic(os.path.join(workdir, f"metrics_{split}.json"),
                              json.dumps(record, indent=1))
    atomic_files.write_atomic(os.path.join(workdir, f"metrics_{split}.md"),
                              f"# {split} metrics at step {step}\n\n"
                              + format_metrics_markdown(metrics, class_names))
    history, line = os.path.join(workdir, "eval_history.jsonl"), json.dumps(record) + "\n"
    if atomic_files.is_remote(history):  # objects cannot be appended to: read, then rewrite whole
        old = epath.Path(history)
        atomic_files.write_atomic(history, (old.read_text() if old.exists() else "") + line)
    else:
        with open(history, "a") as f:
            f.write(line)
    if tsne_points > 0 and len(embeddings) >= 5:
        png = os.path.join(workdir, f"tsne_{split}.png")
        title = f"embeddings, {split} split, step {step}"
        plot_tsne(embeddings, labels, class_names, png, max_points=tsne_points, title=title)


def linear_probe_hint(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """For an objective that does not train the classifier, the command that measures its
    encoders (a linear probe on the same data); None otherwise."""
    if "bce" in objectives.terms_of(config.objective):
        return None
    args = ",".join(a for a, on in (("demo", config.data.demo),
                                    ("sen12ms", config.data.name == "sen12ms")) if on)
    return (f"Objective {config.objective} does not train the classifier, so that AP is an "
            "untrained head's; measure the encoders with a linear probe: python -m "
            f"mosaic_jax.main --config=configs/linear_probe.py{':' + args if args else ''} "
            f"--config.init_from={workdir} --workdir={workdir}_probe")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates.

    Returns the final evaluation metrics (also written to the workdir), or
    {"preempted_at_step": step} when a SIGTERM stopped the run after saving a checkpoint.
    """
    from mosaic_jax.distributed import PreemptionWatcher

    # While the run lasts, SIGTERM asks for a checkpoint at the next step boundary.
    preemption = PreemptionWatcher()
    try:
        return _train_and_evaluate(config, workdir, preemption)
    finally:
        preemption.close()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        preemption: Any) -> dict[str, Any]:
    import orbax.checkpoint as ocp
    from clu import metric_writers, periodic_actions
    from clu import metrics as clu_metrics

    from mosaic_jax import checkpoint_io, input_pipeline
    from mosaic_jax.configuration import validate_config
    from mosaic_jax.metrics import multilabel_metrics

    validate_config(config)
    if config.init_from:
        config = adopt_pretrained_model(config)
        validate_config(config)
    workdir = checkpoint_io.resolve_workdir(workdir)  # a URL (gs://bucket/runs/x) as given
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    is_chief = jax.process_index() == 0
    d = config.data

    data_dir = os.path.expanduser(d.data_dir)
    if d.demo:
        from jax.experimental import multihost_utils

        from mosaic_jax.demo_data import prepare_demo_dataset

        demo_root = os.path.join(workdir, "demo_data")
        if is_chief:
            prepare_demo_dataset(demo_root, num_patches=d.demo_num_patches, seed=d.demo_seed)
        multihost_utils.sync_global_devices("demo dataset prepared")
        data_dir = os.path.join(demo_root, "tfds")
    train_source = input_pipeline.open_source(d.name, d.train_split, data_dir)
    eval_source = input_pipeline.open_source(d.name, d.eval_split, data_dir)
    train_ds = input_pipeline.make_train_dataset(
        train_source, dataset=d.name, global_batch_size=config.batch_size, seed=config.seed,
        s1_bands=d.s1_bands, s2_bands=d.s2_bands, train_fraction=d.train_fraction,
        label_fraction=d.label_fraction, subset_seed=d.subset_seed,
        worker_count=d.worker_count, prefetch_buffer=d.prefetch_buffer)
    eval_ds = input_pipeline.make_eval_dataset(
        eval_source, dataset=d.name, global_batch_size=config.eval_batch_size,
        s1_bands=d.s1_bands, s2_bands=d.s2_bands)

    mesh = make_mesh()
    model = create_model(config)
    tx = create_optimizer(config)
    state = init_state(config, model, tx)
    if config.init_from:
        state = load_pretrained(state, config.init_from)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    train_step = make_train_step(config, model, tx, mesh)
    eval_step = make_eval_step(config, model, mesh)
    class_names = checkpoint_io.class_names(d.name, d.num_classes)

    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
    train_iter = iter(train_ds)
    start_step = 0
    if manager.latest_step() is not None:
        latest = manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        state = restored["state"]
        train_iter.set_state(restored["data"])
        start_step = int(state.step)
        logging.info("Resumed from checkpoint at step %d in %s", start_step, workdir)
        if is_chief:
            print(f"Resuming from the checkpoint at step {start_step}.", flush=True)

    if is_chief:  # what export, report and embedding tools rebuild the model from
        atomic_files.write_atomic(os.path.join(workdir, "config.json"), config.to_json(indent=1))
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if start_step == 0:
        writer.write_hparams({k: str(v) for k, v in config.to_dict().items()})
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                             writer=writer, every_secs=None,
                                             every_steps=config.log_every_steps)]

    def save(step: int, force: bool = False) -> None:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(train_iter.get_state())),
            force=force)

    def run_eval(step: int) -> dict[str, Any]:
        probs, labels, emb = evaluate(config, state, eval_step, eval_ds, mesh,
                                      max_batches=config.eval_max_batches)
        metrics = multilabel_metrics(probs, labels)
        if is_chief:
            write_eval_outputs(workdir, d.eval_split, step, metrics, emb, labels, class_names,
                               config.tsne_points)
            writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()
                                        if isinstance(v, float)})
            print(f"step {step}: eval on {d.eval_split} ({metrics['num_samples']} patches): "
                  f"macro AP {metrics['macro_ap']:.4f}, micro AP {metrics['micro_ap']:.4f}, "
                  f"macro F1 {metrics['macro_f1']:.4f}, micro F1 {metrics['micro_f1']:.4f}",
                  flush=True)
        return metrics

    checkpoint_dir = os.path.join(workdir, "checkpoints")

    def ensure_finite(step: int, metrics: Mapping[str, Any]) -> None:
        try:
            check_finite(step, metrics, manager.latest_step(), checkpoint_dir)
        except DivergenceError:
            manager.wait_until_finished()
            manager.close()
            writer.flush()
            raise

    train_metrics = None  # clu.metrics collection of the steps since the last log line
    unchecked = None  # (step, metrics) whose finiteness is read one step later: no stall
    t0 = time.time()
    for step in range(start_step + 1, config.num_train_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = global_batch(next(train_iter), mesh, TRAIN_KEYS)
            state, metrics = train_step(state, batch)
        if unchecked is not None:
            ensure_finite(*unchecked)
        unchecked = (step, metrics)
        metrics = {k: v for k, v in metrics.items() if k != FINITE_KEY}
        if train_metrics is None:
            collection = clu_metrics.Collection.create(
                **{k: clu_metrics.Average.from_output(k) for k in metrics})
            train_metrics = collection.single_from_model_output(**metrics)
        else:
            train_metrics = train_metrics.merge(
                train_metrics.single_from_model_output(**metrics))
        for hook in hooks:
            hook(step)
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
            summary = {k: float(v) for k, v in train_metrics.compute().items()}
            train_metrics = None
            writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
            ensure_finite(*unchecked)
            save(step)
        if step < config.num_train_steps and preemption.should_stop():
            ensure_finite(*unchecked)
            if manager.latest_step() != step:
                save(step, force=True)
            manager.wait_until_finished()
            manager.close()
            writer.flush()
            if is_chief:
                print(f"Preempted (SIGTERM): saved the checkpoint of step {step}; run the same "
                      "command again to resume.", flush=True)
            return {"preempted_at_step": step}
        if (config.eval_every_steps and step % config.eval_every_steps == 0
                and step != config.num_train_steps):
            run_eval(step)
    if unchecked is not None:
        ensure_finite(*unchecked)
    final_step = int(state.step)
    if manager.latest_step() != final_step:
        save(final_step, force=True)
    manager.wait_until_finished()
    metrics = run_eval(final_step)
    writer.flush()
    if is_chief:
        chance = metrics["label_frequency_macro_ap"]
        verdict = ("clearly above" if metrics["macro_ap"] > chance + 0.1 else
                   "NOT clearly above")
        print(f"Done: {final_step} steps in {time.time() - t0:.0f} s. Final macro AP "
              f"{metrics['macro_ap']:.4f} is {verdict} the {chance:.4f} that label frequencies "
              f"alone give. Outputs in {workdir}", flush=True)
        hint = linear_probe_hint(config, workdir)
        if hint:
            print(hint, flush=True)
    manager.close()
    return metrics
