"""Load an export of a trained run: the embedder and its ``model.json``.

An export folder (written by ``python -m mosaic_jax export``, see `mosaic_jax.export.exporter`)
holds ``model.json`` (bands, normalisation, outputs), ``params.msgpack``, the serialized
``jax.export`` embedder and safetensors encoders. This module is the light side: it imports
nothing but the standard library, numpy and jax, so a process that only loads an export needs
nothing else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1
MODEL_FILE = "model.json"
PARAMS_FILE = "params.msgpack"
EMBEDDER_FILE = "embedder.jax_export"
# The keys of model.json that loading an export relies on (a key path per entry).
REQUIRED_KEYS = ("dataset", "input_size", "class_names", "inputs.s1.bands", "inputs.s1.mean",
                 "inputs.s1.std", "inputs.s2.bands", "inputs.s2.mean", "inputs.s2.std")


def _missing_keys(info: Any) -> list[str]:
    """The entries of REQUIRED_KEYS that the parsed model.json `info` lacks."""
    missing = []
    for path in REQUIRED_KEYS:
        node = info
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            missing.append(path)
    return missing


def load_model_info(export_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``model.json`` of an export folder as a dict; ValueError naming the file when it is
    not JSON or lacks a key of REQUIRED_KEYS."""
    path = os.path.join(os.fspath(export_dir), MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(export_dir)!r} has no {MODEL_FILE}; is it the "
                                "output of python -m mosaic_jax export?")
    with open(path) as f:
        try:
            info = json.load(f)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise ValueError(f"{path} is not valid JSON ({e}): export the run again with "
                             "python -m mosaic_jax export") from e
    missing = _missing_keys(info)
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a complete model.json of "
                         "python -m mosaic_jax export; export the run again")
    return info


def load_embedder(export_dir: str | os.PathLike[str]
                  ) -> Callable[..., dict[str, jax.Array]]:
    """Loads ``embedder.jax_export`` as a jitted ``embed(s1, s2, present=None) -> dict``.

    ``s1``: float32 [b, S, S, c1] and ``s2``: float32 [b, S, S, c2], normalised per band as
    ``model.json`` says; any batch size ``b >= 1``. Returns jax arrays ``[b, ...]`` (see
    ``model.json["embedder"]["outputs"]``). Needs only jax and numpy; it runs on the default
    jax backend, which must be one of the platforms the export was made for
    (``embed.exported.platforms``).

    Missing modalities: ``embed(None, s2)`` / ``embed(s1, None)`` for a batch without S1 / S2,
    or ``present`` bool [b, 2] (S1, S2) per sample. The embedder of a two-tower model then
    feeds zeros in place of the absent arrays (nothing of them is read), its fused outputs come
    from the present modality alone and the absent modality's own outputs are zeros; every
    sample needs one modality. An export without the ``present`` input (made before it existed)
    refuses None for a modality its model reads.
    """
    path = os.path.join(os.fspath(export_dir), EMBEDDER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(export_dir)!r} has no {EMBEDDER_FILE}; is it the "
                                "output of python -m mosaic_jax export?")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    try:
        exported = jax.export.deserialize(data)
    except Exception as e:  # noqa: BLE001 (flatbuffers raises anything on truncated bytes)
        raise ValueError(f"{path} ({len(data)} bytes) is not a readable jax.export embedder "
                         f"(truncated or damaged: {type(e).__name__}); export the run again "
                         "with python -m mosaic_jax export") from e
    call = jax.jit(exported.call)
    avals = exported.in_avals
    takes_present = len(avals) == 3
    used = _used_modalities(export_dir)

    def embed(s1: Any, s2: Any, present: Any = None) -> dict[str, jax.Array]:
        arrays = _check_inputs({"s1": s1, "s2": s2}, avals)
        b = next(x.shape[0] for x in arrays.values() if x is not None)
        given = np.stack([np.full(b, arrays[m] is not None) for m in ("s1", "s2")], axis=-1)
        if present is not None:
            present = np.asarray(present, dtype=bool)
            if present.shape != (b, 2):
                raise ValueError(f"present must be bool [b, 2] = [{b}, 2]; got {present.shape}")
            given &= present
        if not given.any(axis=-1).all():
            rows = np.flatnonzero(~given.any(axis=-1))[:10].tolist()
            raise ValueError(f"sample(s) {rows} have neither S1 nor S2; every sample needs one")
        args = [arrays[m] if arrays[m] is not None else jnp.zeros((b, *aval.shape[1:]), aval.dtype)
                for m, aval in zip(("s1", "s2"), avals, strict=False)]
        if takes_present:
            return call(*args, jnp.asarray(given))
        absent = [m for i, m in enumerate(("s1", "s2")) if not given[:, i].all() and m in used]
        if absent:
            raise ValueError(f"this export needs {' and '.join(absent).upper()}: its embedder has "
                             "no presence input (exported before missing-modality support, or "
                             "a single-tower model that reads it); re-export the run with "
                             "python -m mosaic_jax export")
        return call(*args)

    # A diverged model must not silently produce NaN maps or embeddings: one probe sample of
    # band means (zeros after normalisation) reaches every parameter and statistic.
    probe = embed(*(jnp.zeros((1, *aval.shape[1:]), aval.dtype) for aval in avals[:2]))
    bad = [k for k, v in probe.items() if not np.isfinite(np.asarray(v)).all()]
    if bad:
        raise ValueError(f"the model in {os.fspath(export_dir)!r} gives non-finite {', '.join(bad)}"
                         " for a plain input: its parameters are not finite (a diverged run); "
                         "export an earlier checkpoint with python -m mosaic_jax export --step")
    embed.exported = exported  # type: ignore[attr-defined]
    embed.takes_present = takes_present  # type: ignore[attr-defined]
    return embed


def untrained_absence_note(info: dict[str, Any], missing: str) -> str:
    """A warning line when a two-tower export runs with the modality ``missing`` ("s1" or
    "s2") absent although it was trained with both always present (``model.modality_dropout``
    0): its fused outputs then come from inputs it never learned from. "" otherwise."""
    model = info.get("model", {})
    if model.get("kind") != "two_tower" or model.get("modality_dropout", 0):
        return ""
    return (f"warning: {missing.upper()} is missing, but this model was trained with both "
            "modalities (model.modality_dropout=0): its outputs from one modality are "
            "untested; train with modality dropout for missing data")


def _used_modalities(export_dir: str | os.PathLike[str]) -> set[str]:
    """The modalities the exported model reads (``model.json``; both when it does not say)."""
    try:
        inputs = load_model_info(export_dir).get("inputs", {})
    except (FileNotFoundError, ValueError):
        return {"s1", "s2"}
    return {m for m in ("s1", "s2") if inputs.get(m, {}).get("used_by_model", True)}


def _check_inputs(arrays: dict[str, Any], avals: Any) -> dict[str, jax.Array | None]:
    """The S1/S2 inputs as arrays of the embedder's dtype (None kept); ValueError naming the
    input for a wrong shape, both None, or different batch sizes."""
    out: dict[str, jax.Array | None] = {}
    for (name, x), aval in zip(arrays.items(), avals, strict=False):
        if x is None:
            out[name] = None
            continue
        x = jnp.asarray(x, dtype=aval.dtype)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(aval.shape[1:]) or x.shape[0] < 1:
            want = ", ".join(map(str, aval.shape[1:]))
            raise ValueError(f"{name} must have shape [b, {want}] with b >= 1 (normalised, "
                             f"NHWC); got {tuple(x.shape)}")
        out[name] = x
    sizes = [x.shape[0] for x in out.values() if x is not None]
    if not sizes:
        raise ValueError("s1 and s2 are both None; give at least one modality")
    if len(set(sizes)) > 1:
        raise ValueError(f"s1 and s2 have different batch sizes: {sizes[0]} and {sizes[1]}")
    return out
