"""ResNet encoders as torchvision-named state dicts (``conv1.weight`` OIHW, ``bn1.running_var``).

timm's ResNets use the same names, so TorchGeo and timm users load these files strictly.
`flatten_tree` is shared with the timm ConvNeXt-V2 converter (`timm_convnext`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
