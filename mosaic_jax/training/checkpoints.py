"""A workdir's checkpoints and config: written by training, read by every other tool.

A workdir written by `mosaic_jax.training.train.train_and_evaluate` holds ``config.json`` and
``checkpoints/<step>/`` with two Orbax items: ``state`` (a ``StandardSave`` of ``TrainState``)
and ``data`` (the input iterator's JSON state). Steps are listed by Orbax's own
``CheckpointManager`` (``all_steps`` / ``latest_step``), which knows which step folders are
finished on local disks and on ``gs://``.

Training uses `open_manager`, `save` and `restore`; export, embed, report and the downstream
protocols use `load_config` and `restore_variables`, which need neither the optimizer nor the
device topology of the training run: the checkpoint's own metadata gives the shapes and dtypes,
and only ``params``, ``batch_stats`` and ``step`` are read, onto one local device, then copied
to host numpy arrays.

The file names and the config reader are the workdir contract's
(`mosaic_jax.training.workdir`). The workdir may be a local path or a URL
(``gs://bucket/runs/x``: anything with ``://``), read through ``etils.epath``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from data_builders import atomic_files
from mosaic_jax import objectives
from mosaic_jax.training import configuration
from mosaic_jax.training.workdir import CONFIG_FILE, config_path, read_config, resolve_workdir

CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """What a workdir's checkpoint holds for inference.

    Attributes:
      workdir: absolute path (or URL) of the workdir.
      step: training step of the checkpoint.
      config: the run's ``ml_collections.ConfigDict``.
      variables: ``{"params": ..., "batch_stats": ...}`` nested dicts of host numpy arrays,
        ready for ``model.apply``.
    """

    workdir: str
    step: int
    config: Any
    variables: dict[str, Any]


def checkpoint_dir(workdir: str | os.PathLike[str]) -> str:
    """``workdir/checkpoints``: the folder Orbax manages."""
    return os.path.join(resolve_workdir(workdir), CHECKPOINT_DIR)


def open_manager(workdir: str | os.PathLike[str], *, keep: int | None = None,
                 create: bool = True) -> ocp.CheckpointManager:
    """The Orbax manager of ``workdir``'s checkpoints, keeping the newest `keep` (None: all)."""
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create))


@contextlib.contextmanager
def _reader(workdir: str) -> Iterator[ocp.CheckpointManager | None]:
    """A manager for reading, or None when the workdir has no checkpoint folder."""
    if not epath.Path(checkpoint_dir(workdir)).is_dir():
        yield None
        return
    manager = open_manager(workdir, create=False)
    try:
        yield manager
    finally:
        manager.close()


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any, *,
         force: bool = False) -> None:
    """Saves the train state and the input iterator's state as checkpoint `step` (async)."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)


def restore(manager: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, Any]:
    """(train state shaped and sharded like `like`, input iterator state) of checkpoint `step`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the run's ``config.json``: what export, report and embed rebuild the model from."""
    atomic_files.write_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json(indent=1))


def write_workdir(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict,
                  state: Any) -> str:
    """A workdir holding `config.json` and `state` as its one checkpoint (at `state.step`), laid
    out as the training program writes it (the input position is empty). Returns its path."""
    workdir = resolve_workdir(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    write_config(workdir, config)
    with open_manager(workdir) as manager:
        save(manager, int(state.step), state, {})
        manager.wait_until_finished()
    return workdir


def checkpoint_steps(workdir: str | os.PathLike[str]) -> list[int]:
    """Sorted steps of the finished checkpoints in ``workdir/checkpoints`` (may be empty)."""
    with _reader(resolve_workdir(workdir)) as manager:
        return [] if manager is None else sorted(manager.all_steps())


def latest_step(workdir: str | os.PathLike[str]) -> int:
    """The newest checkpoint step; FileNotFoundError naming the workdir when there is none."""
    workdir = resolve_workdir(workdir)
    if not epath.Path(workdir).is_dir():
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"workdir {workdir!r} has no checkpoint (no finished step folder under "
            f"{os.path.join(workdir, CHECKPOINT_DIR)!r}); train first with "
            f"python -m mosaic_jax.main --config=... --workdir={workdir}")
    return steps[-1]


def load_config(workdir: str | os.PathLike[str]) -> Any:
    """The run's config (``config.json`` rebuilt as an ``ml_collections.ConfigDict``); keys
    that the run's version did not have yet take today's defaults."""
    workdir = resolve_workdir(workdir)
    saved = read_config(workdir)
    if saved is None:
        raise FileNotFoundError(
            f"workdir {workdir!r} has no {CONFIG_FILE} (is it a mosaic_jax training workdir?)")
    # Keys added to the config since the run was written take their defaults; keys the config
    # no longer has (data.num_classes: now the dataset's) are dropped.
    saved.get("data", {}).pop("num_classes", None)
    objective = saved.get("objective")
    defaults = (configuration.base_config(objective).to_dict()
                if objective in objectives.OBJECTIVES else {})
    return ml_collections.ConfigDict(_merged(defaults, saved))


def _merged(defaults: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """`saved` over `defaults`, recursively (nested dicts merged, other values replaced)."""
    out = dict(defaults)
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def restore_variables(workdir: str | os.PathLike[str], step: int | None = None) -> RestoredRun:
    """Restores ``params`` and ``batch_stats`` of checkpoint ``step`` (default: the latest).

    Works on any device count: the training mesh is replaced by one local device. Raises
    FileNotFoundError naming the workdir when it has no checkpoint (or no such step) or no
    ``config.json``.
    """
    workdir = resolve_workdir(workdir)
    if step is None:
        step = latest_step(workdir)
    elif step not in checkpoint_steps(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} has no checkpoint at step {step}; "
                                f"its steps: {checkpoint_steps(workdir)}")
    config = load_config(workdir)
    path = epath.Path(workdir) / CHECKPOINT_DIR / str(step) / "state"
    handler = ocp.StandardCheckpointHandler()
    metadata = handler.metadata(path)
    tree = getattr(metadata, "tree", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    wanted = {k: tree[k] for k in ("params", "batch_stats", "step") if k in tree}
    if "params" not in wanted:
        raise ValueError(f"checkpoint {path} holds no 'params' (keys: {sorted(tree)})")

    def abstract_of(subtree: Any) -> Any:
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), subtree)

    abstract = abstract_of(wanted)
    try:
        # Only the wanted subtrees are read (not the optimizer state, often 2x the parameters).
        args = ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True)
    except TypeError:  # an orbax without partial restores: read everything, keep what we need
        restored = handler.restore(path, args=ocp.args.StandardRestore(abstract_of(dict(tree))))
    else:
        restored = ocp.PyTreeCheckpointHandler().restore(path, args=args)
    restored = jax.device_get(restored)
    variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}
    variables = jax.tree.map(np.asarray, variables)
    return RestoredRun(workdir=workdir, step=int(step), config=config, variables=variables)


def nonfinite_arrays(tree: Any) -> tuple[list[str], int]:
    """(paths of the floating-point arrays of `tree` holding a NaN or inf, number of arrays)."""
    bad, total = [], 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaf = np.asarray(leaf)
        total += 1
        if np.issubdtype(leaf.dtype, np.inexact) and not np.isfinite(leaf).all():
            bad.append("/".join(str(getattr(k, "key", k)) for k in path))
    return bad, total


def require_finite(run: RestoredRun) -> None:
    """ValueError when the checkpoint of `run` holds non-finite parameters or statistics."""
    bad, total = nonfinite_arrays(run.variables)
    if bad:
        raise ValueError(
            f"checkpoint step {run.step} of {run.workdir} holds non-finite values in {len(bad)} "
            f"of {total} arrays (first: {bad[0]}): the run diverged; use an earlier step "
            f"(steps: {checkpoint_steps(run.workdir)})")


# Config keys that decide the checkpoint's tree (parameters and optimizer state): a workdir whose
# checkpoint was written with other values cannot be resumed with this config.
STRUCTURE_KEYS = ("objective", "train_mode", "data.name", "optimizer.name", "model.kind",
                  "model.s1_encoder", "model.s2_encoder", "model.encoder", "model.inputs",
                  "model.width_multiplier", "model.stem", "model.proj_hidden_dim",
                  "model.proj_dim")


def structure_differences(saved: Any, config: Any) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each `STRUCTURE_KEYS` entry on which two configs
    differ (pure; the single-tower `model.encoder` and the towers' encoders are compared only
    for the model kind that uses them)."""
    def get(c: Any, key: str) -> Any:
        for part in key.split("."):
            c = c.get(part) if hasattr(c, "get") else None
        return c

    kind = get(config, "model.kind")
    unused = (("model.encoder", "model.inputs") if kind == "two_tower"
              else ("model.s1_encoder", "model.s2_encoder"))
    diffs = []
    for key in STRUCTURE_KEYS:
        if key in unused:
            continue
        old, new = get(saved, key), get(config, key)
        if old != new:
            diffs.append((key, old, new))
    return diffs


def check_workdir_matches(workdir: str | os.PathLike[str], config: Any) -> None:
    """Raises ValueError before any compile when `workdir` holds a checkpoint of another model
    (objective, encoders, sizes) than `config`, instead of Orbax's tree-mismatch traceback at
    restore time. A workdir without a checkpoint or config.json passes."""
    workdir = resolve_workdir(workdir)
    if not checkpoint_steps(workdir) or not config_path(workdir).is_file():
        return
    diffs = structure_differences(load_config(workdir), config)
    if diffs:
        listed = ", ".join(f"{k} {old!r} there, {new!r} here" for k, old, new in diffs)
        raise ValueError(f"workdir {workdir} holds a checkpoint of another model ({listed}); "
                         "choose a new --workdir for this config (or rerun that workdir's own "
                         "config to resume it)")
