"""The workdir contract: what a training run leaves in its workdir and how every tool reads it.

A workdir written by `mosaic_jax.training.train.train_and_evaluate` holds

- ``config.json``: the run's config (`CONFIG_FILE`; written by `checkpoints.write_config`);
- ``metrics_<split>.json`` and ``metrics_<split>.md``: the last evaluation of ``split``;
- ``eval_history.jsonl``: one JSON line per evaluation;
- ``parameters.txt``: the model's parameter table (names, shapes, sizes; `PARAMETERS_FILE`);
- ``tsne_<split>.png``: the t-SNE picture of the last evaluation (when one was drawn);
- ``checkpoints/<step>/``: the Orbax checkpoints (`mosaic_jax.training.checkpoints`).

Training writes these names; report, label efficiency, export and the downstream protocols
(``init_from``) read them through this module. `read_config` is the one reader of
``config.json`` (local paths and URLs such as ``gs://bucket/runs/x``, through ``etils.epath``).

Runs are named here too: a run after its objective, a linear probe or fine-tune after the
objective of the run it started from and its protocol ("mosaic1, linear probe",
"mosaic1, fine-tune"), and `classifier_trained` says whether a run's AP and F1 are those of a
trained classifier (its objective has a BCE term of weight > 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from etils import epath

from data_builders import atomic_files
from mosaic_jax import objectives

CONFIG_FILE = "config.json"
EVAL_HISTORY_FILE = "eval_history.jsonl"
PARAMETERS_FILE = "parameters.txt"
_METRICS_PREFIX, _METRICS_SUFFIX = "metrics_", ".json"

# config.train_mode -> how reports and console lines call the downstream protocol.
PROTOCOLS = {"linear_probe": "linear probe", "full": "fine-tune"}


def resolve_workdir(workdir: str | os.PathLike[str]) -> str:
    """A URL (``gs://...``) as given; a local path with ``~`` expanded, made absolute."""
    workdir = os.fspath(workdir)
    if atomic_files.is_remote(workdir):
        return workdir
    return os.path.abspath(os.path.expanduser(workdir))


def metrics_file(split: str) -> str:
    """File name of a split's evaluation metrics (JSON)."""
    return f"{_METRICS_PREFIX}{split}{_METRICS_SUFFIX}"


def metrics_markdown_file(split: str) -> str:
    """File name of a split's evaluation metrics as a markdown table."""
    return f"{_METRICS_PREFIX}{split}.md"


def tsne_file(split: str) -> str:
    """File name of a split's t-SNE picture."""
    return f"tsne_{split}.png"


def metrics_splits(file_names: Iterable[str]) -> list[str]:
    """The splits that have a metrics JSON among `file_names` (a workdir listing), sorted."""
    return sorted(n[len(_METRICS_PREFIX):-len(_METRICS_SUFFIX)] for n in file_names
                  if n.startswith(_METRICS_PREFIX) and n.endswith(_METRICS_SUFFIX))


def config_path(workdir: str | os.PathLike[str]) -> epath.Path:
    """``workdir/config.json`` (local or URL)."""
    return epath.Path(resolve_workdir(workdir)) / CONFIG_FILE


def read_config(workdir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's ``config.json`` as written (nested dicts); None when the workdir has none.

    ValueError naming the file when it is not a JSON object."""
    path = config_path(workdir)
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not a config object")
    return config


def protocol_name(train_mode: str) -> str:
    """"linear probe" or "fine-tune" for a config's ``train_mode``."""
    return PROTOCOLS.get(train_mode, train_mode)


def weights_name(config: Mapping[str, Any]) -> str | None:
    """The weight files a run's towers started from (``model.s1_init``, ``s2_init``, ``init``)
    by file name without extension, joined by " + "; None when it started from random weights.
    """
    model = config.get("model") or {}
    files = [model.get(k) for k in ("s1_init", "s2_init", "init") if model.get(k)]
    if not files:
        return None
    return " + ".join(os.path.splitext(os.path.basename(str(f)))[0] for f in files)


def objective_name(config: Mapping[str, Any]) -> str | None:
    """The objective; after imported weights, the files' names when the run trained no step
    (their frozen features), "<objective> from <files>" otherwise."""
    objective, weights = config.get("objective"), weights_name(config)
    if weights is None:
        return objective
    return weights if config.get("num_train_steps") == 0 else f"{objective} from {weights}"


def pretraining_name(init_from: str, pretraining: Mapping[str, Any] | None) -> str:
    """The name of the run a downstream run started from: `objective_name` of its config
    (`pretraining`, None when unreadable), else its folder name."""
    name = objective_name(pretraining) if pretraining else None
    return str(name or os.path.basename(os.path.normpath(init_from)))


def read_pretraining(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``config.json`` of the run ``config["init_from"]`` names; None when the run has no
    ``init_from`` or that config is missing or unreadable (the name falls back to the folder)."""
    init_from = config.get("init_from") or ""
    if not init_from:
        return None
    try:
        return read_config(init_from)
    except (OSError, ValueError):
        return None


def run_name(config: Mapping[str, Any], workdir: str,
             pretraining: Mapping[str, Any] | None = None) -> str:
    """A run's name: its objective (the workdir's folder name without one); a downstream run
    (``init_from``) "<pretraining name>, <protocol>". `pretraining`: see `read_pretraining`."""
    init_from = config.get("init_from") or ""
    if init_from:
        protocol = protocol_name(config.get("train_mode") or "full")
        return f"{pretraining_name(init_from, pretraining)}, {protocol}"
    return str(objective_name(config) or os.path.basename(os.path.normpath(workdir)))


def classifier_trained(config: Mapping[str, Any]) -> bool:
    """Whether the run's objective trains the classifier (has a BCE term of weight > 0); True
    when the objective is unknown (nothing to say against its numbers). `config`: the nested
    dicts of ``config.json`` (or ``ConfigDict.to_dict()``)."""
    objective = config.get("objective")
    if objective not in objectives.OBJECTIVES:
        return True
    weight = (config.get("loss") or {}).get("weights", {}).get("bce", 1.0)
    return "bce" in objectives.terms_of(objective) and weight > 0
