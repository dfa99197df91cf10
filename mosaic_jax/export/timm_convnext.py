"""A ConvNeXt-V2 encoder's variables as a timm ``convnextv2_*`` state dict (PyTorch names and
layouts), for `mosaic_jax.export`.

`mosaic_jax.models.convnext.ConvNeXtV2` has the module tree of timm's ConvNeXt with
``use_grn=True, ls_init_value=None`` (the ``convnextv2_*`` models) one to one:

| Flax (NHWC)                          | timm                                          |
|---|---|
| ``stem_conv`` / ``stem_norm``         | ``stem.0`` / ``stem.1``                       |
| ``downsample{i}_norm`` / ``_conv``    | ``stages.{i}.downsample.0`` / ``.1`` (i >= 1)  |
| ``stage{i}_{j}/dwconv``, ``norm``     | ``stages.{i}.blocks.{j}.conv_dw``, ``.norm``  |
| ``stage{i}_{j}/pwconv1``, ``pwconv2`` | ``stages.{i}.blocks.{j}.mlp.fc1``, ``.mlp.fc2`` |
| ``stage{i}_{j}/grn`` gamma, beta      | ``stages.{i}.blocks.{j}.mlp.grn.weight``, ``.bias`` |
| ``norm`` (after global pooling)      | ``head.norm``                                 |
| classifier (single tower)            | ``head.fc``                                   |

Layouts: conv kernels [kh, kw, in, out] -> [out, in, kh, kw] (depthwise: [out, 1, 7, 7]);
LayerNorm scale/bias -> weight/bias [C]; GRN gamma/beta [C] -> weight/bias [C]. timm builds the
MLP of ``convnextv2_atto``/``femto``/``pico``/``nano`` from 1x1 convolutions (``conv_mlp=True``,
weights [out, in, 1, 1]) and that of ``tiny``/``base``/``large`` from linear layers ([out, in]).
Both compute the same as our Dense layers; LayerNorm eps is 1e-6 in both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mosaic_jax.export.torchvision_resnet import (
    check_tensor_names,
    flatten_tree,
    torch_shape,
    unflatten_tree,
)
from mosaic_jax.models.convnext import VARIANTS
from mosaic_jax.models.towers import CONVNEXT_NAMES

__all__ = ["CONV_MLP_VARIANTS", "timm_state_dict", "convnext_params_from_state_dict",
           "timm_create_model_call", "encoder_info"]

# timm's convnextv2 variants whose block MLPs are 1x1 convolutions (conv_mlp=True).
CONV_MLP_VARIANTS = frozenset({"atto", "femto", "pico", "nano"})

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "gamma": "weight",
         "beta": "bias"}


def _module_name(module: Sequence[str]) -> str:
    """Flax module path of the ConvNeXtV2 tree -> timm module name; ValueError otherwise."""
    path = "/".join(module)
    if len(module) == 1:
        head = module[0]
        fixed = {"stem_conv": "stem.0", "stem_norm": "stem.1", "norm": "head.norm"}
        if head in fixed:
            return fixed[head]
        for suffix, index in (("_norm", 0), ("_conv", 1)):
            stage = head.removeprefix("downsample").removesuffix(suffix)
            if head.startswith("downsample") and head.endswith(suffix) and stage.isdigit():
                return f"stages.{stage}.downsample.{index}"
    elif len(module) == 2 and module[0].startswith("stage"):
        stage, _, block = module[0].removeprefix("stage").partition("_")
        inner = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1",
                 "pwconv2": "mlp.fc2", "grn": "mlp.grn"}.get(module[1])
        if stage.isdigit() and block.isdigit() and inner:
            return f"stages.{stage}.blocks.{block}.{inner}"
    raise ValueError(f"not a timm ConvNeXt-V2 parameter: {path}")


def timm_state_dict(params: Mapping[str, Any], *, conv_mlp: bool,
                    classifier: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """A `ConvNeXtV2`'s params as a timm ``ConvNeXt.state_dict()`` (float32, C-contiguous).

    Args:
      params: the encoder's own subtree (e.g. ``params["enc_s2"]``).
      conv_mlp: write the block MLPs as 1x1 convolutions [out, in, 1, 1] (timm's atto, femto,
        pico, nano) instead of linear layers [out, in].
      classifier: optional ``nn.Dense`` params ``{"kernel" [F, C], "bias" [C]}`` written as
        ``head.fc.weight`` [C, F] / ``head.fc.bias`` [C].

    Returns:
      name -> array; ValueError naming a variable that has no timm counterpart (e.g. a ResNet's).
    """
    out: dict[str, np.ndarray] = {}
    for path, value in sorted(flatten_tree(params).items()):
        *module, leaf = path
        if leaf not in _LEAF or not module:
            raise ValueError(f"not a timm ConvNeXt-V2 parameter: {'/'.join(path)}")
        name = _module_name(module)
        value = np.asarray(value, dtype=np.float32)
        if leaf == "kernel":
            if value.ndim == 4:  # conv [kh, kw, in, out] -> [out, in, kh, kw]
                value = value.transpose(3, 2, 0, 1)
            elif value.ndim == 2:  # Dense [in, out] -> Linear [out, in] (or 1x1 conv)
                value = value.T
                if conv_mlp:
                    value = value[:, :, None, None]
            else:
                raise ValueError(f"unexpected kernel shape {value.shape}: {'/'.join(path)}")
        out[f"{name}.{_LEAF[leaf]}"] = np.ascontiguousarray(value)
    if classifier is not None:
        out["head.fc.weight"] = np.ascontiguousarray(np.asarray(classifier["kernel"], np.float32).T)
        out["head.fc.bias"] = np.ascontiguousarray(np.asarray(classifier["bias"], np.float32))
    return out


def timm_create_model_call(name: str, in_chans: int, num_classes: int,
                           dims: Sequence[int]) -> str:
    """The ``timm.create_model(...)`` call whose model loads the state dict of encoder `name`
    (e.g. ``convnextv2_tiny``) built with `dims` (``dims=`` is passed only when it differs from
    the variant's, e.g. after a width multiplier)."""
    variant = CONVNEXT_NAMES[name]
    extra = "" if tuple(dims) == VARIANTS[variant][1] else f", dims={tuple(int(d) for d in dims)}"
    return (f"timm.create_model({name!r}, pretrained=False, in_chans={in_chans}, "
            f"num_classes={num_classes}{extra})")


def encoder_info(name: str, tensors: Mapping[str, np.ndarray], *, filename: str,
                 bands: Sequence[str], input_size: int) -> dict[str, Any]:
    """``model.json["encoders"][modality]`` of a ConvNeXt-V2 encoder written as `tensors`."""
    variant = CONVNEXT_NAMES[name]
    depths = VARIANTS[variant][0]
    dims = [int(tensors[f"stages.{i}.blocks.0.norm.weight"].shape[0]) for i in range(len(depths))]
    in_chans = int(tensors["stem.0.weight"].shape[1])
    num_classes = int(tensors["head.fc.weight"].shape[0]) if "head.fc.weight" in tensors else 0
    return {
        "file": filename, "architecture": name, "format": "timm", "depths": list(depths),
        "dims": dims, "in_channels": in_chans, "num_features": dims[-1],
        "fc": num_classes > 0, "bands": list(bands), "input_size": int(input_size),
        "timm_create_model": timm_create_model_call(name, in_chans, num_classes, dims),
        "load": "model.load_state_dict(safetensors.torch.load_file(file)); model.eval(); "
                "features = model(x_nchw) (global average pool + LayerNorm: head.norm)",
    }


def _ignored_timm_tensor(name: str) -> bool:
    """Tensors an import skips: the ImageNet classifier."""
    return name in ("head.fc.weight", "head.fc.bias")


def convnext_params_from_state_dict(tensors: Mapping[str, Any], params_like: Mapping[str, Any],
                                    *, architecture: str = "ConvNeXt-V2") -> dict[str, Any]:
    """The inverse of `timm_state_dict`: a timm ``convnextv2_*`` state dict as Flax params.

    Args:
      tensors: name -> array in PyTorch layout; block MLPs as linear [out, in] or 1x1 conv
        [out, in, 1, 1] weights (both timm layouts are accepted).
      params_like: the encoder's subtree of a freshly initialised model (paths and shapes).
      architecture: the encoder's name, for messages.

    Returns:
      float32 numpy params with the structure of `params_like`. ``head.fc.*`` is ignored; any
      other missing, unexpected or differently shaped tensor raises ValueError naming it.
    """
    wanted: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
    for path, like in flatten_tree(params_like).items():
        *module, leaf = path
        wanted[f"{_module_name(module)}.{_LEAF[leaf]}"] = (path, tuple(like.shape))
    check_tensor_names(tensors, list(wanted), ignored=_ignored_timm_tensor,
                       architecture=architecture)
    out: dict[tuple[str, ...], np.ndarray] = {}
    for name, (path, shape) in wanted.items():
        value = np.asarray(tensors[name], dtype=np.float32)
        if len(shape) == 2:  # Dense [in, out] <- Linear [out, in] or 1x1 conv [out, in, 1, 1]
            need = (shape[1], shape[0])
            if value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        else:
            need = torch_shape(shape)
        if value.shape != need:
            raise ValueError(f"tensor {name!r} has shape {tuple(np.shape(tensors[name]))} in "
                             f"the file, but {architecture} needs {need}")
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
        out[path] = np.ascontiguousarray(value)
    return unflatten_tree(out)
