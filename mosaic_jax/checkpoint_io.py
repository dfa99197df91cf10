"""Reading a training workdir back: its config, latest checkpoint, parameters and class names.

Shared by `mosaic_jax.export`, `mosaic_jax.report` and `mosaic_jax.embed`. A workdir written by
`mosaic_jax.train.train_and_evaluate` holds ``config.json`` and ``checkpoints/<step>/state`` (an
orbax ``StandardSave`` of ``TrainState``). Restoring here does not need the optimizer or the
device topology of the training run: the checkpoint's own metadata gives the shapes and dtypes,
and only ``params``, ``batch_stats`` and ``step`` are read, onto one local device, then copied to
host numpy arrays.

The workdir may be a local path or a URL (``gs://bucket/runs/x``: anything with ``://``), read
through ``etils.epath``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from etils import epath

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
# Orbax writes gs:// checkpoints in place and marks a finished step with this file.
_GCS_COMMIT_FILE = "commit_success.txt"


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


def resolve_workdir(workdir: str | os.PathLike[str]) -> str:
    """A URL (``gs://...``) as given; a local path with ``~`` expanded, made absolute."""
    from mosaic_jax import atomic_files

    workdir = os.fspath(workdir)
    if atomic_files.is_remote(workdir):
        return workdir
    return os.path.abspath(os.path.expanduser(workdir))


def checkpoint_steps(workdir: str | os.PathLike[str]) -> list[int]:
    """Sorted steps of the finished checkpoints in ``workdir/checkpoints`` (may be empty).

    Orbax names a finished step's folder by the bare integer (unfinished ones carry a temporary
    suffix; on ``gs://``, where it writes in place, a finished one holds ``commit_success.txt``),
    and the folder must hold the ``state`` item.
    """
    workdir = resolve_workdir(workdir)
    root = epath.Path(workdir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    in_place = workdir.startswith("gs://")
    steps = []
    for child in root.iterdir():
        if (child.name.isdigit() and (child / "state").is_dir()
                and (not in_place or (child / _GCS_COMMIT_FILE).exists())):
            steps.append(int(child.name))
    return sorted(steps)


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
    import ml_collections

    workdir = resolve_workdir(workdir)
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"workdir {workdir!r} has no {CONFIG_FILE} (is it a mosaic_jax training workdir?)")
    saved = json.loads(path.read_text())
    # Keys added to the config since the run was written take their defaults.
    from mosaic_jax import configuration, objectives

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
    import jax
    import orbax.checkpoint as ocp

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


def class_names(dataset: str, num_classes: int) -> list[str]:
    """Class names of ``dataset`` in label order; ``class i`` when the builder is unavailable."""
    names: tuple[str, ...] | None = None
    try:
        if dataset == "bigearthnet_v2":
            from data_builders.bigearthnet_v2 import CLASS_NAMES as names
        elif dataset == "sen12ms":
            from data_builders.sen12ms import SIMPLIFIED_CLASSES as names
    except ImportError:
        names = None
    if names is None or len(names) != num_classes:
        return [f"class {i}" for i in range(num_classes)]
    return list(names)


# Config keys that decide the checkpoint's tree (parameters and optimizer state): a workdir whose
# checkpoint was written with other values cannot be resumed with this config.
STRUCTURE_KEYS = ("objective", "train_mode", "data.num_classes", "optimizer.name", "model.kind",
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
    if not checkpoint_steps(workdir) or not (epath.Path(workdir) / CONFIG_FILE).is_file():
        return
    diffs = structure_differences(load_config(workdir), config)
    if diffs:
        listed = ", ".join(f"{k} {old!r} there, {new!r} here" for k, old, new in diffs)
        raise ValueError(f"workdir {workdir} holds a checkpoint of another model ({listed}); "
                         "choose a new --workdir for this config (or rerun that workdir's own "
                         "config to resume it)")
