"""The training program: optimizer, sharded train and eval steps, and the training loop.

The core (`create_optimizer`, `init_state`, `make_train_step`, `make_eval_step`) is pure:
arrays and pytrees in, arrays and pytrees out; the model comes from `mosaic_jax.models`
(`create_model`). `train_and_evaluate` is the edge that reads data and writes checkpoints,
metrics and pictures, in four named steps: set-up, restore-or-init, the loop, finish.

One jitted step runs under `jax.shard_map` over a mesh with one `data` axis spanning all
devices: each device augments and encodes its rows, the losses see the global batch through their
`axis_name`, BatchNorm statistics are averaged over the axis (unless `model.sync_bn` is False),
and `jax.grad` inside the map returns the exact global gradient (shard_map inserts the psum
of the replicated parameters' cotangents), so the optimizer update is replicated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_builders import atomic_files, datasets
from mosaic_jax import objectives
from mosaic_jax.data import augment, input_norm
from mosaic_jax.data.demo_data import demo_data_dir
from mosaic_jax.evaluation.metrics import (
    format_metrics_markdown,
    missing_modality_metrics,
    missing_modality_summary,
    multilabel_metrics,
)
from mosaic_jax.evaluation.tsne_plot import plot_tsne
from mosaic_jax.models import DATA_AXIS, apply_model, create_model, init_variables, pretrained
from mosaic_jax.models.fusion import fusion_parameter_line
from mosaic_jax.training import checkpoints, messages
from mosaic_jax.training import workdir as workdir_files
from mosaic_jax.training.configuration import validate_config
from mosaic_jax.training.distributed import PreemptionWatcher

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


def init_state(config: ml_collections.ConfigDict, model: nn.Module,
               tx: optax.GradientTransformation) -> TrainState:
    """Initial parameters, BatchNorm statistics and optimizer state from `config.seed`."""
    params_rng, dropout_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    variables = init_variables(config, model, params_rng=params_rng, dropout_rng=dropout_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"],
                      opt_state=tx.init(variables["params"]), rng=state_rng)


def random_state(config: ml_collections.ConfigDict, *, seed: int = 0, step: int = 0) -> TrainState:
    """A TrainState of `config`'s model with cheap random parameters and statistics (He-scaled
    kernels, scales and variances in [0.5, 1.5], small offsets) and a zero optimizer state,
    without compiling the initialisers: for benchmarks, exports and tests at sizes whose
    `init_state` would take long."""
    shapes = jax.eval_shape(lambda: init_state(config, create_model(config),
                                               create_optimizer(config)))
    rng = np.random.default_rng(seed)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        name = getattr(path[-1], "key", None)
        if name == "kernel":
            scale = 1.0 / np.sqrt(float(np.prod(leaf.shape[:-1])))
            return jnp.asarray(rng.normal(size=leaf.shape) * scale, leaf.dtype)
        if name in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return jnp.asarray(0.1 * rng.normal(size=leaf.shape), leaf.dtype)

    return shapes.replace(
        step=jnp.asarray(step, jnp.int32), params=jax.tree.map_with_path(fill, shapes.params),
        batch_stats=jax.tree.map_with_path(fill, shapes.batch_stats),
        opt_state=jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes.opt_state),
        rng=jnp.zeros(shapes.rng.shape, shapes.rng.dtype))


# What the encoders of an `init_from` run were trained to see: a probe or fine-tune keeps them.
INPUT_KEYS = ("s1_bands", "s2_bands", "s1_norm", "s2_norm", "s1_norm_mean", "s1_norm_std",
              "s2_norm_mean", "s2_norm_std")


def adopt_pretrained_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose `model` section, and input bands and normalisation (the
    `INPUT_KEYS` of `data`), are those of the `init_from` run."""
    pretrained = checkpoints.load_config(config.init_from)
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in pretrained.model.items():
        if key in config.model:
            config.model[key] = value
    for key in INPUT_KEYS:
        if key in pretrained.data and key in config.data:
            config.data[key] = pretrained.data[key]
    return config


def load_pretrained(state: TrainState, workdir: str) -> TrainState:
    """Copies the encoder and projection-head weights of `workdir`'s latest checkpoint.

    The classifier is always left as initialised (the downstream label set may differ); every
    other module must exist in the checkpoint with the same shapes, or ValueError names it.
    """
    restored = checkpoints.restore_variables(workdir).variables
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


def import_pretrained(state: TrainState, config: ml_collections.ConfigDict, workdir: str, *,
                      verbose: bool) -> TrainState:
    """`state` with the towers that `model.*init` names started from their weight files; the
    chief prints what it loaded and writes it to the workdir's `IMPORTED_WEIGHTS_FILE`."""
    if not pretrained.tower_inits(config):
        return state
    params, batch_stats, records = pretrained.import_weights(config, state.params,
                                                             state.batch_stats)
    if verbose:
        for record in records:
            print(pretrained.describe(record), flush=True)
        atomic_files.write_atomic(os.path.join(workdir, pretrained.IMPORTED_WEIGHTS_FILE),
                                  json.dumps(records, indent=1))
    return state.replace(params=jax.tree.map(jnp.asarray, params),
                         batch_stats=jax.tree.map(jnp.asarray, batch_stats))


def augment_config(config: ml_collections.ConfigDict) -> augment.AugmentConfig:
    """The `augment` section as an `AugmentConfig`, with the S1 std of the input normalisation
    (`data.s1_norm`; dB noise is drawn in dB and converted to normalised units)."""
    _, std = input_norm.norm_stats(config)["s1"]
    return augment.AugmentConfig(**config.augment, sar_std_db=tuple(float(x) for x in std))


def view_dtype(config: ml_collections.ConfigDict) -> Any:
    """The dtype the augmentation computes the views in: bfloat16 for a bfloat16 model (it
    reads them in bfloat16; float32 interpolation costs TPUs several times the HBM traffic,
    benchmarks/RESULTS.md), else None (float32, `augment.paired_views`' default)."""
    return jnp.bfloat16 if config.model.dtype == "bfloat16" else None


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
    aug = augment_config(config)
    schedule = learning_rate_schedule(config)
    sync_bn = config.model.sync_bn
    num_views = 3 if config.loss.inter_view == "third" else 2
    views_in = view_dtype(config)

    def per_device(state: TrainState, batch: Batch):
        step_rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, drop_rng = jax.random.split(step_rng)
        n = batch["s1"].shape[0]
        # One key per global sample index: the views do not depend on the device count.
        first = jax.lax.axis_index(DATA_AXIS) * n
        keys = jax.vmap(jax.random.fold_in, (None, 0))(aug_rng, first + jnp.arange(n))
        v1, v2 = augment.paired_views(keys, batch["s1"], batch["s2"], aug, num_views,
                                      compute_dtype=views_in)
        drop_rng = jax.random.fold_in(drop_rng, jax.lax.axis_index(DATA_AXIS))
        # All views in one forward pass: [V * n, ...], view-major.
        s1 = v1.reshape(num_views * n, *v1.shape[2:])
        s2 = v2.reshape(num_views * n, *v2.shape[2:])

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            # A linear probe reads frozen encoders in inference mode (running BN statistics).
            out, batch_stats = apply_model(model, variables, config, s1, s2,
                                           train=config.train_mode != "linear_probe",
                                           rng=drop_rng)
            batch_stats = state.batch_stats if batch_stats is None else batch_stats
            per_view = [jax.tree.map(lambda t, i=i: t[i * n:(i + 1) * n], out)
                        for i in range(num_views)]
            loss, terms = objectives.compute_objective(
                objective, per_view[0], per_view[1], batch["labels"], batch["label_mask"],
                config.loss,
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
    """Jitted (state, batch) -> {"probs" [B, C], "embedding" [B, F]} on centre-resized input;
    two towers also give "probs_s1_only" / "probs_s2_only" [B, C] (one modality missing)."""
    size = config.augment.out_size
    two = config.model.kind == "two_tower"
    embed_key = "h_fused" if two else "h"

    def step(state: TrainState, batch: Batch):
        s1 = augment.center_resize(batch["s1"], size)
        s2 = augment.center_resize(batch["s2"], size)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        kw = {"missing_variants": True} if two else {}
        out, _ = apply_model(model, variables, config, s1, s2, train=False, **kw)
        probs = {f"probs{k[len('logits'):]}": jax.nn.sigmoid(v) for k, v in out.items()
                 if k.startswith("logits")}
        return {**probs, "embedding": out[embed_key]}

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


def evaluate(state: TrainState, eval_step: Callable, eval_ds: Any, mesh: jax.sharding.Mesh, *,
             max_batches: int = 0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Runs the eval step over one pass of `eval_ds`; returns (probs, labels, embeddings,
    {"s1_only"/"s2_only": probs with one modality missing}, empty for a single tower)."""
    probs, labels, embeddings, variants = [], [], [], {}
    for i, local in enumerate(eval_ds):
        if max_batches and i >= max_batches:
            break
        batch = global_batch(local, mesh, ("s1", "s2"))
        out = eval_step(state, batch)
        out = multihost_utils.process_allgather(out, tiled=True)
        valid = multihost_utils.process_allgather(np.asarray(local["valid"]), tiled=True)
        lab = multihost_utils.process_allgather(np.asarray(local["labels"]), tiled=True)
        probs.append(np.asarray(out["probs"])[valid])
        for key in out:
            if key.startswith("probs_"):
                variants.setdefault(key[len("probs_"):], []).append(np.asarray(out[key])[valid])
        embeddings.append(np.asarray(out["embedding"])[valid])
        labels.append(lab[valid] > 0)
    return (np.concatenate(probs), np.concatenate(labels), np.concatenate(embeddings),
            {k: np.concatenate(v) for k, v in variants.items()})


def write_eval_outputs(workdir: str, split: str, step: int, metrics: dict,
                       embeddings: np.ndarray, labels: np.ndarray, class_names: list[str],
                       tsne_points: int, embedding_name: str = "embeddings") -> np.ndarray | None:
    """JSON and markdown metrics, a t-SNE PNG, and a line in the eval history (process 0).

    Returns the t-SNE picture as [H, W, 3] uint8 (None when none was drawn)."""
    record = {"step": step, "split": split, **metrics}
    atomic_files.write_atomic(os.path.join(workdir, workdir_files.metrics_file(split)),
                              json.dumps(record, indent=1))
    atomic_files.write_atomic(os.path.join(workdir, workdir_files.metrics_markdown_file(split)),
                              f"# {split} metrics at step {step}\n\n"
                              + format_metrics_markdown(metrics, class_names))
    history = os.path.join(workdir, workdir_files.EVAL_HISTORY_FILE)
    line = json.dumps(record) + "\n"
    if atomic_files.is_remote(history):  # objects cannot be appended to: read, then rewrite whole
        old = epath.Path(history)
        atomic_files.write_atomic(history, (old.read_text() if old.exists() else "") + line)
    else:
        with open(history, "a") as f:
            f.write(line)
    if tsne_points > 0 and len(embeddings) >= 5:
        png = os.path.join(workdir, workdir_files.tsne_file(split))
        title = f"t-SNE of the {embedding_name}, {split} split, step {step}"
        return plot_tsne(embeddings, labels, class_names, png, max_points=tsne_points,
                         title=title)
    return None


def embedding_name(config: ml_collections.ConfigDict) -> str:
    """What the evaluation's embedding is (the t-SNE picture's title says it)."""
    if config.model.kind == "two_tower":
        return "fused S1+S2 encoder features (h_fused)"
    return f"{config.model.inputs.upper()} encoder features (h)"


def linear_probe_hint(config: ml_collections.ConfigDict, workdir: str) -> str | None:
    """For an objective that does not train the classifier, the command that measures its
    encoders (a linear probe on the same data); None otherwise."""
    if workdir_files.classifier_trained(config.to_dict()):
        return None
    args = ",".join(a for a, on in (("demo", config.data.demo),
                                    ("sen12ms", config.data.name == "sen12ms")) if on)
    return (f"Objective {config.objective} does not train the classifier, so that AP is an "
            "untrained head's; measure the encoders with a linear probe: python -m "
            f"mosaic_jax.main --config=configs/linear_probe.py{':' + args if args else ''} "
            f"--config.init_from={workdir} --workdir={workdir}_probe")


@dataclasses.dataclass
class _Run:
    """What the training loop works with; built once by `_set_up`."""

    config: ml_collections.ConfigDict
    workdir: str
    is_chief: bool
    mesh: jax.sharding.Mesh
    state: TrainState  # initialised (or pretrained) and replicated; replaced by a restore
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    eval_step: Callable[[TrainState, Batch], dict[str, jax.Array]]
    train_iter: Iterator[dict[str, np.ndarray]]  # a checkpointable Grain iterator
    eval_ds: Any
    manager: Any  # orbax.checkpoint.CheckpointManager
    writer: Any  # tensorboard_writer.TensorBoardWriter (clu's writer methods)
    progress: Callable[[int], None]
    preemption: PreemptionWatcher
    class_names: list[str]
    steps_run: int = 0  # steps this invocation trained (after a resume: fewer than the total)
    train_seconds: float = 0.0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates.

    Returns the final evaluation metrics (also written to the workdir), or
    {"preempted_at_step": step} when a SIGTERM stopped the run after saving a checkpoint.
    Raises ValueError for an invalid config (naming the key) and DivergenceError when a step
    goes non-finite (nothing of it is saved).
    """
    if config.init_from and isinstance(config.init_from, str):
        config = adopt_pretrained_model(config)
    validate_config(config)
    # While the run lasts, SIGTERM asks for a checkpoint at the next step boundary.
    preemption = PreemptionWatcher()
    try:
        run = _set_up(config, workdir, preemption)
        try:
            state, start_step = _restore_or_init(run)
            state, preempted = _train(run, state, start_step)
            if preempted:
                return {"preempted_at_step": int(state.step)}
            return _finish(run, state)
        finally:
            run.manager.close()
    finally:
        preemption.close()


def _set_up(config: ml_collections.ConfigDict, workdir: str,
            preemption: PreemptionWatcher) -> _Run:
    """Data, model, steps, checkpoint manager and metric writer of a run."""
    # The train extra (Grain, tensorboardX, clu): the core above imports without it, as on
    # accelerator images.
    from clu import parameter_overview

    from mosaic_jax.data import input_pipeline
    from mosaic_jax.training import tensorboard_writer

    workdir = checkpoints.resolve_workdir(workdir)  # a URL (gs://bucket/runs/x) as given
    checkpoints.check_workdir_matches(workdir, config)  # before any compile
    importing = not config.init_from and not checkpoints.checkpoint_steps(workdir)  # no resume
    if importing:
        pretrained.check_files(config)  # before any compile
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    is_chief = jax.process_index() == 0
    d = config.data
    data_dir = os.path.expanduser(d.data_dir)
    if d.demo:  # every process prepares or waits (a file lock), then reads the shared cache
        data_dir = demo_data_dir(d.demo_cache_dir, num_patches=d.demo_num_patches,
                                 seed=d.demo_seed, verbose=is_chief, dataset=d.name)
    train_ds = input_pipeline.make_train_dataset(
        input_pipeline.open_source(d.name, d.train_split, data_dir), dataset=d.name,
        global_batch_size=config.batch_size, seed=config.seed, s1_bands=d.s1_bands,
        s2_bands=d.s2_bands, train_fraction=d.train_fraction, label_fraction=d.label_fraction,
        subset_seed=d.subset_seed, worker_count=d.worker_count,
        prefetch_buffer=d.prefetch_buffer, norm_stats=input_norm.norm_stats(config))
    eval_ds = input_pipeline.make_eval_dataset(
        input_pipeline.open_source(d.name, d.eval_split, data_dir), dataset=d.name,
        global_batch_size=config.eval_batch_size, s1_bands=d.s1_bands, s2_bands=d.s2_bands,
        norm_stats=input_norm.norm_stats(config))

    mesh = make_mesh()
    model = create_model(config)
    tx = create_optimizer(config)
    state = init_state(config, model, tx)
    if importing:
        state = import_pretrained(state, config, workdir, verbose=is_chief)
    if config.init_from:
        state = load_pretrained(state, config.init_from)
        if is_chief:
            print(messages.init_from_line(config.init_from, checkpoints.latest_step(
                config.init_from), config.train_mode), flush=True)
    if is_chief:  # the Flax examples' parameter table, in the workdir rather than the console
        path = os.path.join(workdir, workdir_files.PARAMETERS_FILE)
        atomic_files.write_atomic(path, parameter_overview.get_parameter_overview(
            state.params, include_stats=False) + "\n")
        print(messages.parameters_line(
            parameter_overview.count_parameters(state.params),
            sum(x.nbytes for x in jax.tree.leaves(state.params)), path), flush=True)
    fusion_line = fusion_parameter_line(config.model, state.params)
    if is_chief and fusion_line:
        print(fusion_line, flush=True)
    writer = tensorboard_writer.create_writer(workdir, just_logging=not is_chief)
    progress = tensorboard_writer.ReportProgress(
        num_train_steps=config.num_train_steps, writer=writer, every_steps=config.log_every_steps)
    return _Run(config=config, workdir=workdir, is_chief=is_chief, mesh=mesh,
                state=jax.device_put(state, NamedSharding(mesh, P())),
                train_step=make_train_step(config, model, tx, mesh),
                eval_step=make_eval_step(config, model, mesh), train_iter=iter(train_ds),
                eval_ds=eval_ds, manager=checkpoints.open_manager(
                    workdir, keep=config.keep_checkpoints),
                writer=writer, progress=progress, preemption=preemption,
                class_names=list(datasets.get(d.name).class_names))


def _restore_or_init(run: _Run) -> tuple[TrainState, int]:
    """The state to start from: the latest checkpoint's (and the input position), else the
    initial one; writes `config.json` and, for a new run, the hyper-parameters."""
    state, start_step = run.state, 0
    latest = run.manager.latest_step()
    if latest is not None:
        state, data_state = checkpoints.restore(run.manager, latest, like=state)
        run.train_iter.set_state(data_state)
        start_step = int(state.step)
        logging.info("Resumed from checkpoint at step %d in %s", start_step, run.workdir)
        if run.is_chief:
            print(f"Resuming from the checkpoint at step {start_step}.", flush=True)
    if run.is_chief:
        checkpoints.write_config(run.workdir, run.config)
    if start_step == 0:
        run.writer.write_hparams({k: str(v) for k, v in run.config.to_dict().items()})
    return state, start_step


def _ensure_finite(run: _Run, step: int, metrics: Mapping[str, Any]) -> None:
    """`check_finite`; on a divergence, pending checkpoint writes finish first, so that the
    message names the last checkpoint on disk."""
    if bool(metrics[FINITE_KEY]):
        return
    run.manager.wait_until_finished()
    run.writer.flush()
    check_finite(step, metrics, run.manager.latest_step(),
                 checkpoints.checkpoint_dir(run.workdir))


def _save(run: _Run, state: TrainState, step: int, *, force: bool = False) -> None:
    checkpoints.save(run.manager, step, state, run.train_iter.get_state(), force=force)


def _train(run: _Run, state: TrainState, start_step: int) -> tuple[TrainState, bool]:
    """Steps `start_step + 1 .. num_train_steps`: logs, checkpoints, periodic evaluations.

    Every step's finiteness is read one step later (so the host never waits for the device) and
    always before a checkpoint is saved. Returns (state, whether a SIGTERM stopped the run).
    """
    config = run.config
    sums: dict[str, jax.Array] | None = None  # metrics summed since the last log line
    count = 0
    unchecked = None  # (step, metrics) whose finiteness is still to be read
    t0 = time.time()
    for step in range(start_step + 1, config.num_train_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = global_batch(next(run.train_iter), run.mesh, TRAIN_KEYS)
            state, metrics = run.train_step(state, batch)
        if unchecked is not None:
            _ensure_finite(run, *unchecked)
        unchecked = (step, metrics)
        scalars = {k: v for k, v in metrics.items() if k != FINITE_KEY}
        sums = scalars if sums is None else jax.tree.map(jnp.add, sums, scalars)
        count += 1
        run.steps_run += 1
        run.train_seconds = time.time() - t0
        run.progress(step)
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
            means = {f"train/{k}": float(v) / count for k, v in sums.items()}
            run.writer.write_scalars(step, means)
            if run.is_chief:
                print(messages.progress_line(step, config.num_train_steps, means["train/loss"],
                                            run.progress.steps_per_sec, config.batch_size),
                      flush=True)
            sums, count = None, 0
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
            _ensure_finite(run, *unchecked)
            _save(run, state, step)
        if step < config.num_train_steps and run.preemption.should_stop():
            _ensure_finite(run, *unchecked)
            if run.manager.latest_step() != step:
                _save(run, state, step, force=True)
            run.manager.wait_until_finished()
            run.writer.flush()
            if run.is_chief:
                print(f"Preempted (SIGTERM): saved the checkpoint of step {step}; run the same "
                      "command again to resume.", flush=True)
            return state, True
        if (config.eval_every_steps and step % config.eval_every_steps == 0
                and step != config.num_train_steps):
            _evaluate_and_write(run, state, step)
    if unchecked is not None:
        _ensure_finite(run, *unchecked)
    return state, False


def _evaluate_and_write(run: _Run, state: TrainState, step: int) -> dict[str, Any]:
    """Evaluates on `data.eval_split`; writes the metrics files, scalars and the t-SNE."""
    config, split = run.config, run.config.data.eval_split
    probs, labels, emb, variants = evaluate(state, run.eval_step, run.eval_ds, run.mesh,
                                            max_batches=config.eval_max_batches)
    metrics = {**multilabel_metrics(probs, labels), **missing_modality_metrics(variants, labels)}
    if run.is_chief:
        picture = write_eval_outputs(run.workdir, split, step, metrics, emb, labels,
                                     run.class_names, config.tsne_points, embedding_name(config))
        if picture is not None:
            run.writer.write_images(step, {"eval/tsne": picture[None]})
        run.writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()
                                        if isinstance(v, float)})
        print(f"step {step}: eval on {split} ({metrics['num_samples']} patches): "
              f"macro AP {metrics['macro_ap']:.4f}, micro AP {metrics['micro_ap']:.4f}, "
              f"macro F1 {metrics['macro_f1']:.4f}, micro F1 {metrics['micro_f1']:.4f}"
              + missing_modality_summary(metrics), flush=True)
    return metrics


def _finish(run: _Run, state: TrainState) -> dict[str, Any]:
    """The final checkpoint and evaluation, and the closing lines."""
    final_step = int(state.step)
    if run.manager.latest_step() != final_step:
        _save(run, state, final_step, force=True)
    run.manager.wait_until_finished()
    metrics = _evaluate_and_write(run, state, final_step)
    run.writer.flush()
    if run.is_chief:
        chance = metrics["label_frequency_macro_ap"]
        verdict = ("clearly above" if metrics["macro_ap"] > chance + 0.1 else
                   "NOT clearly above")
        print(f"{messages.done_line(final_step, final_step - run.steps_run, run.train_seconds)}"
              f" Final macro AP {metrics['macro_ap']:.4f} is {verdict} the {chance:.4f} that "
              f"label frequencies alone give. Outputs in {run.workdir}", flush=True)
        hint = linear_probe_hint(run.config, run.workdir)
        if hint:
            print(hint, flush=True)
    return metrics
