"""Export a trained run for use outside this project, and load the exported embedder.

``python -m mosaic_jax export --workdir DIR --output OUT`` writes, from the latest checkpoint of
a training workdir (or ``--step``):

- ``OUT/params.msgpack``: ``flax.serialization.to_bytes({"params", "batch_stats"})``; read it
  back with ``flax.serialization.msgpack_restore`` (nested dicts of arrays).
- ``OUT/model.json``: what is needed to rebuild and feed the model: the config's ``model``
  section, dataset, class names, the input bands of S1 and S2 in channel order with their
  normalisation mean/std, the input size, the embedder's outputs and the encoder files.
- ``OUT/embedder.jax_export``: a serialized ``jax.export`` of
  ``(s1 [b, S, S, c1], s2 [b, S, S, c2]) -> {"embedding", "h_s1", "h_s2", "inter_s1",
  "inter_s2", "probs"}`` (two towers; single tower: ``{"embedding", "probs"}``), inputs
  normalised as in ``model.json`` (``(x - mean) / std`` per band) and ``S`` = ``input_size``
  (the dataset's patch size by default). It centre-resizes to the training resolution itself,
  exactly like the evaluation of the training program, and has the parameters baked in: the
  batch size ``b`` is symbolic and only jax is needed to run it (`load_embedder`). A two-tower
  embedder takes a third input ``present`` bool [b, 2] (S1, S2): an absent modality's array is
  replaced by zeros before the model sees it, the fused outputs come from the present one alone
  and that modality's own outputs are zeros (`load_embedder`'s ``embed(None, s2)``). A
  single-tower model ignores the modality it was not trained on.
- for ResNet encoders, ``OUT/encoder_s1.safetensors`` and ``OUT/encoder_s2.safetensors`` (single
  tower: ``OUT/encoder.safetensors``) with torchvision names and layouts (see
  `resnet_state_dict`), loadable by PyTorch / TorchGeo users, e.g.::

      m = torchvision.models.resnet18()
      m.conv1 = torch.nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
      m.maxpool = torch.nn.Identity()      # only for stem "iai" (model.json: "maxpool": false)
      m.fc = torch.nn.Identity()           # two-tower encoders have no classifier
      m.load_state_dict(safetensors.torch.load_file("encoder_s2.safetensors"))
      m.eval()                              # features = m(x_nchw)  (global average pooled)

Everything is written to a temporary folder next to ``OUT`` and renamed into place at the end,
so ``OUT`` is either the previous export or the complete new one.

The loader (`load_embedder`, `load_model_info`) is the package `mosaic_jax.export` itself and
imports nothing but the standard library, numpy and jax; this module is the heavy side.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp

from data_builders import cli, console, datasets
from mosaic_jax import models
from mosaic_jax.data import augment, bands, input_norm
from mosaic_jax.export import EMBEDDER_FILE, FORMAT_VERSION, MODEL_FILE, PARAMS_FILE, timm_convnext
from mosaic_jax.export.torchvision_resnet import RUNNING_VAR_NOTE, resnet_state_dict
from mosaic_jax.models.towers import CONVNEXT_NAMES, RESNET_DEPTHS, encoder_num_features
from mosaic_jax.training import checkpoints
from mosaic_jax.training import workdir as workdir_files


def _input_spec(config: Any) -> dict[str, Any]:
    """Bands, normalisation and units of both modalities (``model.json["inputs"]``)."""
    facts = datasets.get(config.data.name)
    d, m = config.data, config.model
    used = {"s1", "s2"} if m.kind == "two_tower" or m.inputs == "s1s2" else {m.inputs}
    spec = {}
    for modality, setting in (("s1", d.s1_bands), ("s2", d.s2_bands)):
        names = bands.resolve_bands(setting, d.name, modality)
        # The published values (not float32 roundings), or those of data.<m>_norm.
        mean, std, norm = input_norm.input_stats(config, modality)
        clip = facts.s1_clip_db if modality == "s1" else None
        units = ("dB (backscatter)" if modality == "s1" else
                 "L2A reflectance x 10000" if d.name == "bigearthnet_v2" else
                 "L1C reflectance x 10000")
        spec[modality] = {"bands": list(names), "mean": mean, "std": std, "norm": norm,
                          "units": units,
                          "clip_db": list(clip) if clip else None,
                          "used_by_model": modality in used}
    return spec


def _encoder_entries(config: Any, names: Any = None) -> dict[str, tuple[str, str, str]]:
    """modality key -> (params subtree, encoder name, file name) of the encoders whose name is
    in `names` (default: the ResNets)."""
    names = RESNET_DEPTHS if names is None else names
    m = config.model
    if m.kind == "two_tower":
        items = {"s1": ("enc_s1", m.s1_encoder, "encoder_s1.safetensors"),
                 "s2": ("enc_s2", m.s2_encoder, "encoder_s2.safetensors")}
    else:
        items = {m.inputs: ("enc", m.encoder, "encoder.safetensors")}
    return {k: v for k, v in items.items() if v[1] in names}


def make_embed_fn(config: Any, variables: Mapping[str, Any], input_size: int
                  ) -> tuple[Callable[..., dict[str, jax.Array]], dict[str, str]]:
    """The function the embedder exports, and a description of each of its outputs.

    ``fn(s1 [b, S, S, c1], s2 [b, S, S, c2])`` (normalised, ``S = input_size``) centre-resizes
    both to ``config.augment.out_size`` and applies the model in eval mode with ``variables``
    closed over (so they become constants when traced). A two-tower model's function also takes
    ``present`` bool [b, 2] (S1, S2): see `missing_modality_inputs`.
    """
    model = models.create_model(config)
    size = int(config.augment.out_size)
    two = config.model.kind == "two_tower"
    if two:
        fused = ("fused encoder features h_fused = [h_s1, h_s2] (S1 first)"
                 if config.model.get("fusion", "concat") == "concat" else
                 "fused features h_fused: pooled joint tokens of the cross-attention fusion")
        described = {"embedding": fused,
                     "h_s1": "S1 encoder features (global average pool)",
                     "h_s2": "S2 encoder features (global average pool)",
                     "inter_s1": "S1 inter-modal projection (the space the inter-modal term "
                                 "aligns with inter_s2; cross-modal retrieval)",
                     "inter_s2": "S2 inter-modal projection (aligned with inter_s1)",
                     "probs": "sigmoid of the classifier logits, one per class"}
        described = {k: v + ABSENT_NOTE[k[-2:] if k[-2:] in ("s1", "s2") else "fused"]
                     for k, v in described.items()}
    else:
        described = {"embedding": f"encoder features h of the {config.model.inputs} input",
                     "probs": "sigmoid of the classifier logits, one per class"}

    def fn(s1: jax.Array, s2: jax.Array, present: jax.Array | None = None
           ) -> dict[str, jax.Array]:
        if s1.shape[1:3] != (input_size, input_size) or s2.shape[1:3] != s1.shape[1:3]:
            raise ValueError(f"inputs must be {input_size} x {input_size} pixels")
        if two and present is not None:
            s1, s2 = missing_modality_inputs(s1, s2, present)
        s1 = augment.center_resize(s1, size)
        s2 = augment.center_resize(s2, size)
        kw = {"present": present} if two and present is not None else {}
        out, _ = models.apply_model(model, variables, config, s1, s2, train=False, **kw)
        probs = jax.nn.sigmoid(out["logits"].astype(jnp.float32))
        if two:
            result = {"embedding": out["h_fused"], "h_s1": out["h_s1"], "h_s2": out["h_s2"],
                      "inter_s1": out["inter_s1"], "inter_s2": out["inter_s2"], "probs": probs}
            return result if present is None else zero_absent_outputs(result, present)
        return {"embedding": out["h"], "probs": probs}

    return fn, described


# What the embedder's outputs are when a modality is absent (model.json's descriptions).
ABSENT_NOTE = {"s1": "; zeros for samples without S1", "s2": "; zeros for samples without S2",
               "fused": "; from the present modality alone when one is absent (present input)"}


def missing_modality_inputs(s1: jax.Array, s2: jax.Array, present: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
    """Zeros (the band means) in place of each absent modality's sample (``present`` bool
    [b, 2]), selected with `jnp.where` so that nothing of the absent array (NaN included)
    reaches the encoders."""
    zero = jnp.zeros((), s1.dtype)
    return (jnp.where(present[:, 0, None, None, None], s1, zero),
            jnp.where(present[:, 1, None, None, None], s2, zero))


def zero_absent_outputs(out: dict[str, jax.Array], present: jax.Array) -> dict[str, jax.Array]:
    """The per-modality outputs (``*_s1``, ``*_s2``) set to zero where that modality is absent."""
    def select(key: str, value: jax.Array) -> jax.Array:
        col = {"s1": 0, "s2": 1}.get(key[-2:])
        if col is None:
            return value
        return jnp.where(present[:, col, None], value, jnp.zeros((), value.dtype))

    return {k: select(k, v) for k, v in out.items()}


def export_embedder(config: Any, variables: Mapping[str, Any], input_size: int,
                    platforms: Sequence[str] = ("cpu", "cuda", "tpu")
                    ) -> tuple[jax.export.Exported, dict[str, str]]:
    """``jax.export`` of `make_embed_fn` with a symbolic batch size ``b`` (two towers: with the
    ``present`` bool [b, 2] input)."""
    platforms = check_platforms(platforms)
    fn, described = make_embed_fn(config, variables, input_size)
    (_, _, c1), (_, _, c2) = models.input_shapes(config)
    (b,) = jax.export.symbolic_shape("b")
    args = (jax.ShapeDtypeStruct((b, input_size, input_size, c1), jnp.float32),
            jax.ShapeDtypeStruct((b, input_size, input_size, c2), jnp.float32))
    if config.model.kind == "two_tower":
        args += (jax.ShapeDtypeStruct((b, 2), jnp.bool_),)
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)
    return exported, described


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
"""The platforms `jax.export` lowers for (jax backends' names); the embedder loads on each."""


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    """``platforms`` as a tuple; ValueError naming the valid ones when one is unknown (jax
    would serialise an embedder for it that no backend can load), repeated, or none is given."""
    platforms = tuple(platforms)
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms or len(set(platforms)) != len(platforms):
        what = (f"unknown platform(s) {', '.join(map(repr, unknown))}" if unknown else
                "no platform" if not platforms else f"repeated platforms in {list(platforms)}")
        raise ValueError(f"--platforms: {what}; valid: {', '.join(PLATFORMS)} (comma-separated, "
                         "e.g. cpu,cuda,tpu)")
    return platforms


def _check_output_dir(output: str) -> None:
    """Refuses to replace anything but an empty folder or a previous export."""
    if not os.path.lexists(output):
        return
    if not os.path.isdir(output):
        raise FileExistsError(f"output {output!r} exists and is not a folder")
    if os.listdir(output) and not os.path.isfile(os.path.join(output, MODEL_FILE)):
        raise FileExistsError(f"output {output!r} is a non-empty folder that is not a previous "
                              "export (no model.json); choose another --output")


def _move_into_place(tmp: str, output: str) -> None:
    """Renames the finished temp folder to ``output``, replacing a previous export.

    The temp folder (and files some writers create private) get the usual umask permissions.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    if os.path.lexists(output):
        old = f"{output}.old-{os.getpid()}"
        os.rename(output, old)
        os.rename(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, output)


def _write_embedder(tmp: str, config: Any, variables: Mapping[str, Any], size: int,
                    platforms: Sequence[str]) -> tuple[jax.export.Exported, dict[str, Any]]:
    """Writes ``embedder.jax_export``; returns it and ``model.json``'s description of its
    outputs (shape with the symbolic batch ``b``, dtype, description)."""
    exported, described = export_embedder(config, variables, size, platforms)
    with open(os.path.join(tmp, EMBEDDER_FILE), "wb") as f:
        f.write(exported.serialize())
    out_avals = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    outputs = {k: {"shape": ["b", *(int(s) for s in aval.shape[1:])],
                   "dtype": str(aval.dtype), "description": described[k]}
               for k, aval in out_avals.items()}
    return exported, outputs


def _save_encoder(tmp: str, filename: str, tensors: dict[str, Any], info: dict[str, Any]
                  ) -> None:
    """One safetensors file, `info` as its metadata (non-strings JSON-encoded)."""
    import safetensors.numpy

    metadata = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in info.items()}
    metadata["format"] = "pt"
    safetensors.numpy.save_file(tensors, os.path.join(tmp, filename), metadata=metadata)


def _resnet_encoder(config: Any, variables: Mapping[str, Any], inputs: Mapping[str, Any],
                    step: int, entry: tuple[str, str, str], modality: str
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(torchvision-named tensors, ``model.json`` entry) of one ResNet encoder."""
    subtree, name, filename = entry
    m = config.model
    classifier = variables["params"]["classifier"] if m.kind == "single_tower" else None
    tensors = resnet_state_dict(variables["params"][subtree],
                                variables["batch_stats"].get(subtree, {}),
                                num_batches_tracked=step, classifier=classifier)
    width = int(tensors["conv1.weight"].shape[0])
    depth = RESNET_DEPTHS[name]
    info = {
        "file": filename, "architecture": name, "depth": depth,
        "block": "Bottleneck" if depth == 50 else "BasicBlock",
        "width": width, "in_channels": int(tensors["conv1.weight"].shape[1]), "stem": m.stem,
        "maxpool": m.stem == "standard",
        "num_features": encoder_num_features(name, m.width_multiplier),
        "fc": classifier is not None,
        "bands": _encoder_bands(inputs, modality),
        "input_size": int(config.augment.out_size),
        "torchvision_compatible": width == 64,
        "running_var": RUNNING_VAR_NOTE,
    }
    return tensors, info


def _convnext_encoder(config: Any, variables: Mapping[str, Any], inputs: Mapping[str, Any],
                      entry: tuple[str, str, str], modality: str
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(timm-named tensors, ``model.json`` entry) of one ConvNeXt-V2 encoder."""
    subtree, name, filename = entry
    tensors = timm_convnext.timm_state_dict(
        variables["params"][subtree],
        conv_mlp=CONVNEXT_NAMES[name] in timm_convnext.CONV_MLP_VARIANTS,
        classifier=(variables["params"]["classifier"] if config.model.kind == "single_tower"
                    else None))
    info = timm_convnext.encoder_info(name, tensors, filename=filename,
                                      bands=_encoder_bands(inputs, modality),
                                      input_size=int(config.augment.out_size))
    return tensors, info


def _encoder_bands(inputs: Mapping[str, Any], modality: str) -> list[str]:
    """The input bands of an encoder in channel order (``s1s2``: S1's, then S2's)."""
    if modality == "s1s2":
        return inputs["s1"]["bands"] + inputs["s2"]["bands"]
    return inputs[modality]["bands"]


def _write_encoders(tmp: str, config: Any, variables: Mapping[str, Any],
                    inputs: Mapping[str, Any], step: int) -> dict[str, Any]:
    """Writes the safetensors encoders (ResNet: torchvision names, ConvNeXt-V2: timm names);
    returns ``model.json["encoders"]`` (modality -> entry)."""
    entries = _encoder_entries(config)
    convnext_entries = _encoder_entries(config, CONVNEXT_NAMES)
    if entries or convnext_entries:
        try:
            import safetensors.numpy  # noqa: F401  (optional: only for the encoder files)
        except ImportError as e:
            raise ImportError("writing the encoders needs the safetensors package: "
                              "pip install safetensors") from e
    encoders = {}
    for modality, entry in entries.items():
        tensors, info = _resnet_encoder(config, variables, inputs, step, entry, modality)
        _save_encoder(tmp, entry[2], tensors, info)
        encoders[modality] = info
    for modality, entry in convnext_entries.items():
        tensors, info = _convnext_encoder(config, variables, inputs, entry, modality)
        _save_encoder(tmp, entry[2], tensors, info)
        encoders[modality] = info
    return encoders


def _model_info(run: checkpoints.RestoredRun, size: int, inputs: dict[str, Any],
                exported: jax.export.Exported, outputs: dict[str, Any],
                encoders: dict[str, Any]) -> dict[str, Any]:
    """``model.json``: the source run, the model, its inputs and every file of the export."""
    config = run.config
    d, m = config.data, config.model
    facts = datasets.get(d.name)
    present_arg = ["present"] if m.kind == "two_tower" else []  # `missing_modality_inputs`
    return {
        "format_version": FORMAT_VERSION,
        "source": {"workdir": run.workdir, "step": run.step},
        "objective": config.objective,
        "dataset": d.name,
        "demo_data": bool(d.get("demo", False)),
        "num_classes": facts.num_classes,
        "class_names": list(facts.class_names),
        "model": m.to_dict(),
        "inputs": inputs,
        "normalization": "x_normalised = (clip(x) - mean) / std per band, in the units "
                         "given; clip only where clip_db is set (S1 dB range)",
        "layout": "NHWC float32",
        "input_size": size,
        "model_input_size": int(config.augment.out_size),
        "resize": "central square crop of the full patch, bilinear resize to "
                  "model_input_size (mosaic_jax.data.augment.center_resize); done inside the "
                  "embedder",
        "embedder": {"file": EMBEDDER_FILE, "args": ["s1", "s2", *present_arg],
                     "arg_shapes": [["b", size, size, len(inputs["s1"]["bands"])],
                                    ["b", size, size, len(inputs["s2"]["bands"])],
                                    *(["b", 2] for _ in present_arg)],
                     "outputs": outputs, "platforms": list(exported.platforms),
                     "jax_version": jax.__version__,
                     "loader": "mosaic_jax.export.load_embedder(export_dir)"},
        "embedding_key": "embedding",
        "embedding_keys": sorted(outputs),
        "params": {"file": PARAMS_FILE, "keys": ["params", "batch_stats"],
                   "format": "flax.serialization.to_bytes (msgpack)",
                   "rebuild": "mosaic_jax.models.create_model(ml_collections.ConfigDict("
                              "config.json)) with the same config"},
        "encoders": encoders,
    }


def export_workdir(workdir: str, output: str, *, step: int | None = None,
                   input_size: int | None = None,
                   platforms: Sequence[str] = ("cpu", "cuda", "tpu")) -> dict[str, Any]:
    """Writes the export of ``workdir``'s checkpoint (default: latest) to ``output``.

    Returns the ``model.json`` dict. FileNotFoundError naming the workdir when it has no
    checkpoint; FileExistsError when ``output`` is something other than a previous export;
    ValueError for a platform outside `PLATFORMS`, before any work.
    """
    platforms = check_platforms(platforms)
    output = os.path.abspath(os.path.expanduser(output))
    _check_output_dir(output)
    run = checkpoints.restore_variables(workdir, step)
    checkpoints.require_finite(run)
    size = int(input_size or datasets.get(run.config.data.name).patch_size)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    try:
        variables = {"params": run.variables["params"],
                     "batch_stats": run.variables.get("batch_stats", {})}
        with open(os.path.join(tmp, PARAMS_FILE), "wb") as f:
            f.write(flax.serialization.to_bytes(variables))
        exported, outputs = _write_embedder(tmp, run.config, variables, size, platforms)
        inputs = _input_spec(run.config)
        encoders = _write_encoders(tmp, run.config, variables, inputs, run.step)
        info = _model_info(run, size, inputs, exported, outputs, encoders)
        # The run's config.json byte for byte (local or gs://).
        with open(os.path.join(tmp, workdir_files.CONFIG_FILE), "wb") as f:
            f.write(workdir_files.config_path(run.workdir).read_bytes())
        with open(os.path.join(tmp, MODEL_FILE), "w") as f:
            json.dump(info, f, indent=1)
        _move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.new_parser("python -m mosaic_jax export", __doc__)
    parser.add_argument("--workdir", required=True, help="training workdir")
    parser.add_argument("--output", required=True, help="export folder (created or replaced)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--input_size", type=int, default=None,
                        help="side of the embedder's input patches (default: the dataset's)")
    parser.add_argument("--platforms", default="cpu,cuda,tpu",
                        help=f"comma-separated jax.export platforms, of {', '.join(PLATFORMS)}")
    args = parser.parse_args(argv)

    def work() -> dict:
        try:  # a wrong flag value: status 2, before anything is read
            platforms = check_platforms([p for p in args.platforms.split(",") if p])
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
        cli.check_output(args.output, folder=True)
        return export_workdir(args.workdir, args.output, step=args.step,
                              input_size=args.input_size, platforms=platforms)

    info = cli.run(work, argv, paths=[args.output])
    files = sorted(os.listdir(os.path.abspath(args.output)))
    print(f"Exported step {info['source']['step']} of {info['source']['workdir']} "
          f"({info['objective']}, {info['dataset']}) to {os.path.abspath(args.output)}: "
          f"{', '.join(files)}")


if __name__ == "__main__":
    console.quiet_console()
    main()
