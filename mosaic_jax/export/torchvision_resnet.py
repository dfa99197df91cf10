"""ResNet encoders as torchvision-named state dicts (``conv1.weight`` OIHW, ``bn1.running_var``).

timm's ResNets use the same names, so TorchGeo and timm users load these files strictly.
`flatten_tree` is shared with the timm ConvNeXt-V2 converter (`timm_convnext`).
`resnet_params_from_state_dict` is the inverse (importing pretrained weights); it derives every
name from the same table, so export and import cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

_DOWNSAMPLE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
         "var": "running_var"}
RUNNING_VAR_NOTE = (
    "running_var holds Flax's running average of the *biased* batch variance (PyTorch's is "
    "unbiased, larger by n/(n-1) per batch of n values); in eval mode both frameworks normalise "
    "with (x - running_mean) / sqrt(running_var + 1e-5), so the stored values reproduce the "
    "trained network exactly. num_batches_tracked holds the training step of the checkpoint.")


def _torch_module_name(path: Sequence[str]) -> str:
    """Flax module path (``layer2_0``, ``downsample_bn``) -> torchvision name."""
    out = []
    for part in path:
        if part in _DOWNSAMPLE:
            out.append(_DOWNSAMPLE[part])
        elif part.startswith("layer") and "_" in part:
            stage, block = part[len("layer"):].split("_", 1)
            if not (stage.isdigit() and block.isdigit()):
                raise ValueError(f"unexpected ResNet module {part!r}")
            out.append(f"layer{stage}.{block}")
        else:
            out.append(part)
    return ".".join(out)


def flatten_tree(tree: Mapping[str, Any],
                 prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dicts of arrays -> {(key, ..., leaf key): array} (parameter paths as tuples)."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_tree(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def resnet_state_dict(params: Mapping[str, Any], batch_stats: Mapping[str, Any], *,
                      num_batches_tracked: int = 0,
                      classifier: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """A `mosaic_jax.models.ResNet`'s variables as a torchvision ``ResNet.state_dict()``.

    Args:
      params, batch_stats: the encoder's own subtrees (e.g. ``params["enc_s1"]``).
      num_batches_tracked: value of every BN's ``num_batches_tracked`` (int64 scalar).
      classifier: optional ``nn.Dense`` params ``{"kernel" [F, C], "bias" [C]}`` written as
        ``fc.weight`` [C, F] / ``fc.bias``.

    Returns:
      name -> C-contiguous numpy array: conv ``weight`` [out, in, kh, kw] (Flax: [kh, kw, in,
      out]); BN ``weight``/``bias``/``running_mean``/``running_var`` float32 [C] and
      ``num_batches_tracked`` int64 []. See `RUNNING_VAR_NOTE` for what ``running_var`` holds.
      ValueError for a variable that has no torchvision counterpart (e.g. a ConvNeXt).
    """
    out: dict[str, np.ndarray] = {}
    bn_modules: set[str] = set()
    for path, value in sorted(flatten_tree(params).items()):
        *module, leaf = path
        if leaf not in ("kernel", "scale", "bias") or not module:
            raise ValueError(f"not a torchvision ResNet parameter: {'/'.join(path)}")
        name = _torch_module_name(module)
        value = np.asarray(value, dtype=np.float32)
        if leaf == "kernel":
            if value.ndim != 4:
                raise ValueError(f"not a ResNet conv kernel: {'/'.join(path)} {value.shape}")
            value = value.transpose(3, 2, 0, 1)
        else:
            bn_modules.add(name)
        out[f"{name}.{_LEAF[leaf]}"] = np.ascontiguousarray(value)
    stats = flatten_tree(batch_stats)
    for path, value in sorted(stats.items()):
        *module, leaf = path
        name = _torch_module_name(module)
        if leaf not in ("mean", "var") or name not in bn_modules:
            raise ValueError(f"not a torchvision ResNet BatchNorm statistic: {'/'.join(path)}")
        out[f"{name}.{_LEAF[leaf]}"] = np.ascontiguousarray(np.asarray(value, np.float32))
    for name in sorted(bn_modules):
        if f"{name}.running_mean" not in out or f"{name}.running_var" not in out:
            raise ValueError(f"BatchNorm {name} has no running statistics in batch_stats")
        out[f"{name}.num_batches_tracked"] = np.asarray(num_batches_tracked, dtype=np.int64)
    if classifier is not None:
        out["fc.weight"] = np.ascontiguousarray(np.asarray(classifier["kernel"], np.float32).T)
        out["fc.bias"] = np.ascontiguousarray(np.asarray(classifier["bias"], np.float32))
    return out


def unflatten_tree(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """Inverse of `flatten_tree`: {(key, ..., leaf key): array} -> nested dicts."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def torch_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
    """PyTorch layout of a Flax shape: conv [kh, kw, in, out] -> [out, in, kh, kw]; others as is
    (Dense kernels are handled by their converter)."""
    s = tuple(int(d) for d in flax_shape)
    return (s[3], s[2], s[0], s[1]) if len(s) == 4 else s


def check_tensor_names(tensors: Mapping[str, Any], wanted: Sequence[str], *,
                       ignored: Callable[[str], bool], architecture: str) -> None:
    """ValueError unless `tensors` holds exactly the names `wanted` (plus `ignored` ones).

    The message names the first missing or unexpected tensor and what the mismatch suggests.
    """
    unexpected = [n for n in tensors if n not in set(wanted) and not ignored(n)]
    missing = [n for n in wanted if n not in tensors]
    if missing and unexpected:
        raise ValueError(
            f"the file is not a {architecture}: it lacks {len(missing)} tensor(s) the model "
            f"needs (first: {missing[0]!r}) and has {len(unexpected)} it does not have (first: "
            f"{unexpected[0]!r}); check the encoder name and width_multiplier of the tower")
    if missing:
        raise ValueError(f"the file lacks tensor {missing[0]!r} that {architecture} needs "
                         f"({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"the file has tensor {unexpected[0]!r} that {architecture} does not "
                         f"have ({len(unexpected)} unexpected in all)")


def _ignored_resnet_tensor(name: str) -> bool:
    """Tensors an import skips: BN step counters and the ImageNet classifier."""
    return name.endswith(".num_batches_tracked") or name in ("fc.weight", "fc.bias")


def resnet_params_from_state_dict(tensors: Mapping[str, Any], params_like: Mapping[str, Any],
                                  batch_stats_like: Mapping[str, Any], *,
                                  architecture: str = "ResNet"
                                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inverse of `resnet_state_dict`: a torchvision/timm ResNet state dict as Flax variables.

    Args:
      tensors: name -> array in PyTorch layout (conv ``weight`` [out, in, kh, kw]).
      params_like, batch_stats_like: the encoder's subtrees of a freshly initialised model (their
        paths and shapes say which tensors are needed; their values are not used).
      architecture: the encoder's name, for messages.

    Returns:
      (params, batch_stats) float32 numpy trees with the structure of the templates.
      ``num_batches_tracked`` and ``fc.*`` are ignored; any other missing, unexpected or
      differently shaped tensor raises ValueError naming it (with both shapes).
    """
    wanted: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {}
    for collection, tree in (("params", params_like), ("batch_stats", batch_stats_like)):
        for path, like in flatten_tree(tree).items():
            *module, leaf = path
            name = f"{_torch_module_name(module)}.{_LEAF[leaf]}"
            wanted[name] = (collection, path, tuple(like.shape))
    check_tensor_names(tensors, list(wanted), ignored=_ignored_resnet_tensor,
                       architecture=architecture)
    out: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    for name, (collection, path, shape) in wanted.items():
        value = np.asarray(tensors[name], dtype=np.float32)
        if value.shape != torch_shape(shape):
            raise ValueError(f"tensor {name!r} has shape {value.shape} in the file, but "
                             f"{architecture} needs {torch_shape(shape)}")
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        out[collection][path] = np.ascontiguousarray(value)
    return unflatten_tree(out["params"]), unflatten_tree(out["batch_stats"])
