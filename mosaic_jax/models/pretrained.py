"""Start an encoder from published weights: TorchGeo / SSL4EO-S12 / timm / torchvision files.

A tower whose config key ``model.s1_init`` / ``model.s2_init`` (two towers) or ``model.init``
(one tower) names a state dict with torchvision/timm names (``conv1.weight``,
``layer1.0.bn1.running_var``, ... for ResNet-18/34/50; ``stem.0.weight``,
``stages.0.blocks.0.conv_dw.weight``, ... for ConvNeXt-V2) starts from it:

- reading: ``.safetensors`` without torch; ``.pth``/``.pt`` with torch when it is installed (a
  checkpoint that wraps the state dict, e.g. ``{"state_dict": {"model.conv1.weight": ...}}``,
  is unwrapped); local paths and ``gs://`` URLs;
- bands: the file's input channels are ``model.<m>_init_bands`` (a preset of
  `mosaic_jax.data.input_norm.PRESETS`, or band names separated by commas; "" = the run's own
  bands). The first
  convolution keeps the columns of the run's bands in the run's order; file bands the run does
  not use are dropped (which equals feeding them zeros: B10 for BigEarthNet v2's L2A). A run band
  the file lacks is an error unless ``model.init_band_fill`` is ``"zeros"`` (a zero column: the
  band starts ignored) or ``"repeat"`` (timm's ``adapt_input_conv``: column k is the file's
  column k mod C_file, all scaled by C_file / C; one run band: the sum of the columns);
- weights: the exact inverse of the export converters (`mosaic_jax.export.torchvision_resnet`,
  `mosaic_jax.export.timm_convnext`); projection heads and the classifier keep their fresh
  initialisation; ``num_batches_tracked`` and the ImageNet classifier (``fc``/``head.fc``) are
  ignored; anything else that does not match the configured encoder stops the run naming the
  tensor.

Imports happen once, before the first step of a new run (`import_weights`); a resumed run
restores its checkpoint instead. `mosaic_jax.data.input_norm` normalises the tower's inputs as
the file expects.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from mosaic_jax.data import bands as bands_lib
from mosaic_jax.data import input_norm
from mosaic_jax.export.timm_convnext import convnext_params_from_state_dict
from mosaic_jax.export.torchvision_resnet import resnet_params_from_state_dict
from mosaic_jax.models.convnext import VARIANTS as CONVNEXT_VARIANTS
from mosaic_jax.models.towers import CONVNEXT_NAMES, RESNET_DEPTHS

FILLS = ("error", "zeros", "repeat")
IMPORTED_WEIGHTS_FILE = "imported_weights.json"  # a run's records of what it imported
STEM_TENSOR = {"resnet": "conv1.weight", "convnext": "stem.0.weight"}
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
NAME_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


@dataclasses.dataclass(frozen=True)
class TowerInit:
    """One tower that starts from a file.

    Attributes:
      key, bands_key: its config keys (``model.s2_init``, ``model.s2_init_bands``).
      module: the encoder's params subtree (``enc_s2``, ``enc``).
      encoder: the configured encoder name (``resnet50``).
      path: the weight file.
      file_bands: the file's input channels, in order.
      run_bands: the tower's input channels (the run's ``data.*_bands``; S1 then S2 for early
        fusion).
    """

    key: str
    bands_key: str
    module: str
    encoder: str
    path: str
    file_bands: tuple[str, ...]
    run_bands: tuple[str, ...]


def _run_bands(config: Any, modalities: Sequence[str]) -> tuple[str, ...]:
    d = config.data
    return tuple(b for m in modalities
                 for b in bands_lib.resolve_bands(d[f"{m}_bands"], d.name, m))


def file_bands(setting: str, run_bands: Sequence[str], bands_key: str) -> tuple[str, ...]:
    """The file's channel names from a ``*_init_bands`` setting: "" (the run's bands), a preset
    name, or band names separated by commas ("B04,B03,B02"). ValueError naming the key."""
    if not isinstance(setting, str):
        raise ValueError(f"config key '{bands_key}': must be a preset name or comma-separated "
                         f"band names, got {setting!r}")
    if setting == "":
        return tuple(run_bands)
    if setting in input_norm.PRESETS:
        return input_norm.PRESETS[setting].bands
    names = tuple(b.strip() for b in setting.split(","))
    for b in names:
        try:
            bands_lib.modality_of(b)
        except ValueError:
            raise ValueError(f"config key '{bands_key}': {b!r} is neither a preset ("
                             f"{', '.join(input_norm.PRESETS)}) nor a Sentinel band name (VV, "
                             f"VH, B01..B12, B8A)") from None
    if len(set(names)) != len(names):
        raise ValueError(f"config key '{bands_key}': a band is named twice in {setting!r}")
    return names


def tower_inits(config: Any) -> list[TowerInit]:
    """The towers of `config` that start from a weight file (none: [])."""
    m = config.model
    if m.kind == "two_tower":
        towers = [(f"model.{x}_init", f"model.{x}_init_bands", f"enc_{x}", m[f"{x}_encoder"],
                   (x,)) for x in ("s1", "s2")]
    else:
        modalities = ("s1", "s2") if m.inputs == "s1s2" else (m.inputs,)
        towers = [("model.init", "model.init_bands", "enc", m.encoder, modalities)]
    out = []
    for key, bands_key, module, encoder, modalities in towers:
        path = m[key.split(".")[1]]
        if not path:
            continue
        run = _run_bands(config, modalities)
        out.append(TowerInit(key, bands_key, module, encoder, path,
                             file_bands(m[bands_key.split(".")[1]], run, bands_key), run))
    return out


def validate_init(config: Any) -> None:
    """ValueError naming the key for a bad weight-file setting (checked before any compile)."""
    m = config.model
    for key in ("s1_init", "s2_init", "init"):
        if not isinstance(m[key], str):
            raise ValueError(f"config key 'model.{key}': must be a file path or '', "
                             f"got {m[key]!r}")
    if m.init_band_fill not in FILLS:
        raise ValueError(f"config key 'model.init_band_fill': {m.init_band_fill!r} is not one "
                         f"of {', '.join(FILLS)}")
    for tower in tower_inits(config):
        if tower.encoder in RESNET_DEPTHS and m.stem != "standard":
            raise ValueError(f"config key 'model.stem': {tower.key} holds a torchvision/timm "
                             f"ResNet, whose stem has the 3x3/2 max-pool: set "
                             f"model.stem='standard' (got {m.stem!r})")
    input_norm.validate_norm(config)


def unwrap_state_dict(obj: Any, source: str) -> dict[str, Any]:
    """The tensor mapping inside a loaded file: `obj` itself, or the state dict a checkpoint
    wraps (under ``state_dict``, ``model_state_dict``, ``model`` or ``net``), with a prefix all
    names share (``module.``, ``model.``, ``backbone.``, ``encoder.``) removed.

    ValueError naming `source` when no mapping of names to arrays is found.
    """
    for _ in range(4):
        if isinstance(obj, Mapping) and obj and all(
                isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, Mapping) and
                      isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            what = (f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping)
                    else f"a {type(obj).__name__}")
            raise ValueError(f"{source} is not a state dict (tensor names -> tensors): it holds "
                             f"{what}")
        obj = inner
    tensors = dict(obj)
    for prefix in NAME_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _torch_tensors(data: bytes, source: str) -> dict[str, np.ndarray]:
    """A ``.pth``/``.pt`` file's state dict as numpy arrays (needs torch)."""
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading {source} (a PyTorch file) needs torch: pip install torch, or "
                         "convert the file to .safetensors") from None
    try:  # weights_only: a file cannot run code while it is read
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle and zip errors of several types
        raise ValueError(f"torch.load(weights_only=True) cannot read {source} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         ) from None
    out = {}
    for name, value in unwrap_state_dict(obj, source).items():
        value = value.detach().cpu()
        out[name] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def read_state_dict(path: str, key: str = "model.init") -> dict[str, np.ndarray]:
    """name -> numpy array of a ``.safetensors``, ``.pth`` or ``.pt`` file (local or ``gs://``).

    FileNotFoundError / ValueError with one line naming `key` and what to fix.
    """
    file = epath.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config key '{key}': no such file {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"config key '{key}': {path!r} is neither .safetensors nor .pth/.pt")
    data = file.read_bytes()
    if suffix == ".safetensors":
        import safetensors.numpy
        try:
            return unwrap_state_dict(safetensors.numpy.load(data), path)
        except Exception as e:  # safetensors raises its own error types for a bad header
            if isinstance(e, ValueError) and "is not a state dict" in str(e):
                raise ValueError(f"config key '{key}': {e}") from None
            raise ValueError(f"config key '{key}': {path} is not a safetensors file "
                             f"({type(e).__name__}: {e})") from None
    try:
        return _torch_tensors(data, path)
    except ValueError as e:
        raise ValueError(f"config key '{key}': {e}") from None


def check_files(config: Any) -> None:
    """FileNotFoundError naming the key of the first weight file that does not exist (a run
    checks before compiling anything)."""
    for tower in tower_inits(config):
        if not epath.Path(tower.path).is_file():
            raise FileNotFoundError(f"config key '{tower.key}': no such file {tower.path!r}")


def map_first_conv(weight: np.ndarray, file_bands: Sequence[str], run_bands: Sequence[str],
                   fill: str) -> tuple[np.ndarray, dict[str, str]]:
    """The first convolution [O, C_file, kh, kw] mapped to the run's bands: [O, C_run, kh, kw].

    Returns the weight and, per run band, where its column came from. ValueError naming the
    first run band the file lacks when `fill` is "error".
    """
    w = np.asarray(weight, np.float32)
    cf, c = len(file_bands), len(run_bands)
    missing = [b for b in run_bands if b not in file_bands]
    if not missing:
        idx = [file_bands.index(b) for b in run_bands]
        return np.ascontiguousarray(w[:, idx]), {b: b for b in run_bands}
    if fill == "repeat":
        if c == 1:
            return w.sum(axis=1, keepdims=True), {run_bands[0]: "sum of " + "+".join(file_bands)}
        idx = [k % cf for k in range(c)]
        rule = f" x {cf}/{c}"
        return (np.ascontiguousarray(w[:, idx] * np.float32(cf / c)),
                {b: file_bands[k % cf] + rule for k, b in enumerate(run_bands)})
    if fill == "zeros":
        cols = [w[:, file_bands.index(b)] if b in file_bands else np.zeros_like(w[:, 0])
                for b in run_bands]
        return (np.ascontiguousarray(np.stack(cols, axis=1)),
                {b: b if b in file_bands else "zeros" for b in run_bands})
    raise ValueError(f"band {missing[0]} of the run is not among the file's bands "
                     f"({' '.join(file_bands)}): drop it from the run's data bands, or set "
                     f"model.init_band_fill to 'zeros' or 'repeat'")


def file_architecture(tensors: Mapping[str, Any]) -> str | None:
    """The encoder name a torchvision/timm state dict implies (``resnet50``, ``convnextv2_tiny``;
    None when neither), from its block counts: ResNet-50 has ``conv3`` in its blocks, ResNet-18
    two blocks in ``layer3``; ConvNeXt-V2 variants differ in their stage depths."""
    def blocks(prefix: str) -> int:
        return len({n[len(prefix):].split(".")[0] for n in tensors if n.startswith(prefix)})

    if "conv1.weight" in tensors:
        if "layer1.0.conv3.weight" in tensors:
            return "resnet50"
        return "resnet18" if blocks("layer3.") == 2 else "resnet34"
    if "stem.0.weight" in tensors:
        depths = tuple(blocks(f"stages.{i}.blocks.") for i in range(4))
        for name, variant in CONVNEXT_NAMES.items():
            if CONVNEXT_VARIANTS[variant][0] == depths:
                return name
        return f"a ConvNeXt with stage depths {depths}"
    return None


def import_tower(tower: TowerInit, tensors: Mapping[str, np.ndarray],
                 params_like: Mapping[str, Any], batch_stats_like: Mapping[str, Any] | None,
                 fill: str) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """(params, batch_stats or None, record) of one tower's encoder from its file's tensors."""
    family = "resnet" if tower.encoder in RESNET_DEPTHS else "convnext"
    stem = STEM_TENSOR[family]
    tensors = dict(tensors)
    try:
        implied = file_architecture(tensors)
        if implied is not None and implied != tower.encoder:
            raise ValueError(f"it holds a {implied}, but the tower's encoder is {tower.encoder}")
        mapping: dict[str, str] = {}
        if stem in tensors:
            shape = np.shape(tensors[stem])
            if len(shape) != 4 or shape[1] != len(tower.file_bands):
                raise ValueError(
                    f"its first convolution {stem} has {shape[1] if len(shape) == 4 else '?'} "
                    f"input channels {tuple(shape)}, but {tower.bands_key} names "
                    f"{len(tower.file_bands)} bands ({' '.join(tower.file_bands)})")
            tensors[stem], mapping = map_first_conv(tensors[stem], tower.file_bands,
                                                    tower.run_bands, fill)
        if family == "resnet":
            params, stats = resnet_params_from_state_dict(
                tensors, params_like, batch_stats_like or {}, architecture=tower.encoder)
        else:
            params, stats = convnext_params_from_state_dict(
                tensors, params_like, architecture=tower.encoder), None
    except ValueError as e:
        raise ValueError(f"config key '{tower.key}': {tower.path}: {e}") from None
    ignored = sorted(set(tensors) - _used_names(family, tensors))
    record = {"key": tower.key, "file": tower.path, "encoder": tower.encoder,
              "module": tower.module, "tensors": len(tensors) - len(ignored),
              "ignored": ignored, "file_bands": list(tower.file_bands),
              "bands": mapping, "dropped_bands": [b for b in tower.file_bands
                                                  if b not in tower.run_bands],
              "band_fill": fill}
    return params, stats, record


def _used_names(family: str, tensors: Mapping[str, Any]) -> set[str]:
    """Names of `tensors` an import read (all but counters and classifier)."""
    skip = (("fc.weight", "fc.bias") if family == "resnet" else ("head.fc.weight", "head.fc.bias"))
    return {n for n in tensors if n not in skip and not n.endswith(".num_batches_tracked")}


def import_weights(config: Any, params: Mapping[str, Any], batch_stats: Mapping[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """`params`/`batch_stats` (a fresh model's) with every file-initialised tower replaced.

    Returns (params, batch_stats, records): one record per tower (file, tensors read, ignored
    names, band mapping, normalisation) for the run's ``imported_weights.json``.
    """
    params, batch_stats = dict(params), dict(batch_stats)
    records = []
    for tower in tower_inits(config):
        tensors = read_state_dict(tower.path, tower.key)
        new_params, new_stats, record = import_tower(
            tower, tensors, params[tower.module], batch_stats.get(tower.module),
            config.model.init_band_fill)
        params[tower.module] = new_params
        if new_stats is not None:
            batch_stats[tower.module] = new_stats
        modalities = {bands_lib.modality_of(b) for b in tower.run_bands}
        record["normalisation"] = {m: input_norm.norm_name(config, m) for m in sorted(modalities)}
        records.append(record)
    return params, batch_stats, records


def describe(record: Mapping[str, Any]) -> str:
    """One line of what an import loaded, for the run's console."""
    bands = ", ".join(f"{b}<-{s}" if b != s else b for b, s in record["bands"].items())
    dropped = (f"; dropped from the file: {' '.join(record['dropped_bands'])}"
               if record["dropped_bands"] else "")
    norm = ", ".join(f"{m} {n}" for m, n in record["normalisation"].items())
    ignored = f", ignored {len(record['ignored'])}" if record["ignored"] else ""
    return (f"Imported {record['key']}={record['file']}: {record['tensors']} tensors into "
            f"{record['module']} ({record['encoder']}{ignored}); bands {bands}{dropped}; "
            f"normalisation {norm}.")

