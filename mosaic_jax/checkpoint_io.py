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

import jax
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
