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


def load_model_info(export_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``model.json`` of an export folder as a dict."""
    path = os.path.join(os.fspath(export_dir), MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(export_dir)!r} has no {MODEL_FILE}; is it the "
                                "output of python -m mosaic_jax export?")
    with open(path) as f:
        return json.load(f)


def load_embedder(export_dir: str | os.PathLike[str]
                  ) -> Callable[[Any, Any], dict[str, jax.Array]]:
    """Loads ``embedder.jax_export`` as a jitted ``embed(s1, s2) -> dict of arrays``.

    ``s1``: float32 [b, S, S, c1] and ``s2``: float32 [b, S, S, c2], normalised per band as
    ``model.json`` says; any batch size ``b >= 1``. Returns jax arrays ``[b, ...]`` (see
    ``model.json["embedder"]["outputs"]``). Needs only jax and numpy; it runs on the default
    jax backend, which must be one of the platforms the export was made for
    (``embed.exported.platforms``).
    """
    path = os.path.join(os.fspath(export_dir), EMBEDDER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(export_dir)!r} has no {EMBEDDER_FILE}; is it the "
                                "output of python -m mosaic_jax export?")
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    call = jax.jit(exported.call)
    avals = exported.in_avals

    def embed(s1: Any, s2: Any) -> dict[str, jax.Array]:
        args = []
        for name, x, aval in (("s1", s1, avals[0]), ("s2", s2, avals[1])):
            x = jnp.asarray(x, dtype=aval.dtype)
            if x.ndim != 4 or tuple(x.shape[1:]) != tuple(aval.shape[1:]) or x.shape[0] < 1:
                want = ", ".join(map(str, aval.shape[1:]))
                raise ValueError(f"{name} must have shape [b, {want}] with b >= 1 (normalised, "
                                 f"NHWC); got {tuple(x.shape)}")
            args.append(x)
        if args[0].shape[0] != args[1].shape[0]:
            raise ValueError(f"s1 and s2 have different batch sizes: {args[0].shape[0]} and "
                             f"{args[1].shape[0]}")
        return call(*args)

    # A diverged model must not silently produce NaN maps or embeddings: one probe sample of
    # band means (zeros after normalisation) reaches every parameter and statistic.
    probe = call(*(jnp.zeros((1, *aval.shape[1:]), aval.dtype) for aval in avals))
    bad = [k for k, v in probe.items() if not np.isfinite(np.asarray(v)).all()]
    if bad:
        raise ValueError(f"the model in {os.fspath(export_dir)!r} gives non-finite {', '.join(bad)}"
                         " for a plain input: its parameters are not finite (a diverged run); "
                         "export an earlier checkpoint with python -m mosaic_jax export --step")
    embed.exported = exported  # type: ignore[attr-defined]
    return embed
