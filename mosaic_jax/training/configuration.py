"""Configuration defaults shared by every file in `configs/`, and their validation.

`base_config(objective)` holds every key a user may turn, with defaults for the full
BigEarthNet v2 recipe; the files in `configs/` change what their method needs.
`validate_config` rejects unknown keys (typos in a config file) and invalid values with a
message that names the key. Unknown keys given on the command line (`--config.foo=1`) are
already rejected by ml_collections' config flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import jax
import ml_collections

from data_builders import datasets
from mosaic_jax import objectives
from mosaic_jax.data import augment, bands
from mosaic_jax.models import ENCODER_NAMES


def base_config(objective: str = "mosaic1") -> ml_collections.ConfigDict:
    """Defaults: two ResNet-18 towers on BigEarthNet v2, 10 % of the training split."""
    c = ml_collections.ConfigDict()
    c.objective = objective
    c.seed = 0
    c.batch_size = 256                   # global, over all devices and processes
    c.num_train_steps = 9300             # ~100 epochs of 10 % of BigEarthNet v2 train
    c.log_every_steps = 50
    c.eval_every_steps = 1000            # 0: evaluate only at the end
    c.eval_batch_size = 256
    c.eval_max_batches = 0               # 0: the whole evaluation split
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.tsne_points = 2000                 # 0: no t-SNE picture
    c.init_from = ""                     # a pretraining workdir: start from its encoders/heads
    c.train_mode = "full"                # or "linear_probe": train the classifier only

    c.data = ml_collections.ConfigDict()
    c.data.name = "bigearthnet_v2"
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    # VV, VH and B02 B03 B04 B05 B06 B07 B08 B8A B11 B12 (the official recipe)
    c.data.s1_bands = datasets.get(c.data.name).default_bands["s1"]
    c.data.s2_bands = datasets.get(c.data.name).default_bands["s2"]
    c.data.train_fraction = 0.1          # the paper's low-data protocol
    c.data.label_fraction = 1.0          # of the kept training patches, those with labels
    c.data.subset_seed = 0
    c.data.worker_count = 0
    c.data.prefetch_buffer = 2
    c.data.demo = False                  # write and prepare a small synthetic dataset
    c.data.demo_num_patches = 600
    c.data.demo_seed = 0
    c.data.demo_cache_dir = ""           # "": $MOSAIC_JAX_CACHE, else ~/.cache/mosaic_jax
    # Input normalisation per modality (mosaic_jax.data.input_norm): "auto" (the preset of a
    # tower's weight file, else the dataset's statistics), "dataset", "custom" or a preset.
    c.data.s1_norm = "auto"
    c.data.s2_norm = "auto"
    c.data.s1_norm_mean = ()             # "custom": one value per band, stored units (dB, DN)
    c.data.s1_norm_std = ()
    c.data.s2_norm_mean = ()
    c.data.s2_norm_std = ()

    # The AugmentConfig defaults (sar_std_db comes from the dataset's statistics).
    c.augment = ml_collections.ConfigDict(
        {f.name: f.default for f in dataclasses.fields(augment.AugmentConfig)
         if f.name != "sar_std_db"})

    c.model = model_defaults()
    c.loss = loss_defaults(objective)
    c.optimizer = optimizer_defaults()
    return c


def model_defaults() -> ml_collections.ConfigDict:
    """The `model` section: towers, heads, compute, pretrained weights, fusion."""
    m = ml_collections.ConfigDict()
    m.kind = "two_tower"                 # or "single_tower"
    m.s1_encoder = "resnet18"
    m.s2_encoder = "resnet18"
    m.encoder = "resnet18"               # single tower only
    m.inputs = "s1s2"                    # single tower: "s1", "s2" or "s1s2" (early fusion)
    m.width_multiplier = 1.0
    m.stem = "iai"                       # 7x7/2 conv without max-pool (120 px inputs)
    m.proj_hidden_dim = 512
    m.proj_dim = 128
    m.sync_bn = True
    m.bn_momentum = 0.9
    m.drop_path_rate = 0.0
    m.remat = False                      # recompute encoder blocks in backward: less memory
    m.dtype = "float32"                  # compute dtype; "bfloat16" on accelerators
    # Start towers from published weights (mosaic_jax.models.pretrained): a .safetensors or
    # .pth file with torchvision/timm names; its input channels: a preset or band names.
    m.s1_init = ""
    m.s2_init = ""
    m.init = ""                          # single tower
    m.s1_init_bands = ""                 # "": the run's own bands; "ssl4eo_s1", ...
    m.s2_init_bands = ""                 # "ssl4eo_s2_l1c", "imagenet_rgb" or band names
    m.init_bands = ""
    m.init_band_fill = "error"           # a run band the file lacks: "zeros" or "repeat" (timm)
    fusion_defaults(m)
    return m


def loss_defaults(objective: str) -> ml_collections.ConfigDict:
    """The `loss` section: a weight per term of `objective`, temperatures, memory layout."""
    loss = ml_collections.ConfigDict()
    loss.weights = ml_collections.ConfigDict(
        {term: 1.0 for term in objectives.OBJECTIVES[objective]})
    loss.t_intra = 0.5
    loss.t_inter = 0.5
    loss.t_sup = 0.1
    loss.mulsupcon_weighting = "mean"
    loss.block_size = 0                  # > 0: blockwise losses, O(batch * block) memory
    # Views the inter-modal term reads: "shared" (views a and b: two forward passes per sample)
    # or "third" (a separate third view: three passes, as IaI-SimCLR published).
    loss.inter_view = "shared"
    return loss


def optimizer_defaults() -> ml_collections.ConfigDict:
    """The `optimizer` section: AdamW by default; SGD and LARS keys."""
    opt = ml_collections.ConfigDict()
    opt.name = "adamw"                   # or "sgd" (with momentum) or "lars"
    opt.learning_rate = 1e-3             # peak, after warmup
    opt.warmup_steps = 500
    opt.weight_decay = 1e-4
    opt.b1 = 0.9
    opt.b2 = 0.999
    opt.momentum = 0.9                   # SGD and LARS
    opt.trust_coefficient = 0.001
    opt.grad_clip_norm = 0.0             # 0: no clipping
    return opt


def fusion_defaults(model: ml_collections.ConfigDict) -> None:
    """The two-tower fusion keys of the `model` section (README "Fusion and missing
    modalities"): how h_fused is made, and modality dropout."""
    model.fusion = "concat"            # or "cross_attention" (joint layers over both grids)
    model.fusion_dim = 512             # cross-attention: token width
    model.fusion_heads = 8             # cross-attention: heads (must divide fusion_dim)
    model.fusion_layers = 2            # cross-attention: joint layers
    model.modality_dropout = 0.0       # per-sample probability that fusion sees one modality


COMMON_ARGS = ("demo", "sen12ms")
SEN12MS_DEMO_PATCHES = 120


def parse_args(arg: str | None, valid: tuple[str, ...]) -> tuple[str, ...]:
    """Splits a config file's `:ARGS` suffix ("demo,sen12ms") and checks every word."""
    args = tuple(a for a in (arg or "").split(",") if a)
    for a in args:
        if a not in valid:
            close = difflib.get_close_matches(a, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config argument {a!r}{hint} (valid: {', '.join(valid)})")
    return args


def apply_args(c: ml_collections.ConfigDict, args: tuple[str, ...]) -> ml_collections.ConfigDict:
    """Applies the common arguments: `sen12ms` switches the dataset, `demo` the demo sizes
    (with `sen12ms`: a synthetic SEN12MS prepared by the real builder)."""
    if "sen12ms" in args:
        c.data.name = "sen12ms"
        c.data.eval_split = "validation"
        c.augment.out_size = 128         # random crops of the 256 px patches
    if "demo" in args:
        demo_overrides(c)
        if "sen12ms" in args:  # 256 px patches: fewer of them (~210 MB prepared)
            c.data.demo_num_patches = SEN12MS_DEMO_PATCHES
    return c


def downstream_config(train_mode: str, args: tuple[str, ...]) -> ml_collections.ConfigDict:
    """A downstream protocol of a pretraining run (`init_from`): BCE on the labelled data,
    either a linear probe of the frozen encoders or full fine-tuning."""
    c = base_config("supervised")
    c.train_mode = train_mode
    c.num_train_steps = 2000
    c.optimizer.warmup_steps = 100
    c.optimizer.learning_rate = 1e-3 if train_mode == "linear_probe" else 1e-4
    c.optimizer.weight_decay = 0.0 if train_mode == "linear_probe" else 1e-4
    c.augment.crop_scale = (0.8, 1.0)
    return apply_args(c, args)


def demo_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The embedded demo: synthetic BigEarthNet v2 data, tiny model, ~2 minutes on 2 CPU cores."""
    c.data.demo = True
    c.data.train_fraction = 1.0
    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_train_steps = 160
    c.log_every_steps = 20
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 80
    c.tsne_points = 500
    c.augment.out_size = 48
    c.augment.crop_scale = (0.5, 1.0)
    c.model.width_multiplier = 0.125
    c.model.proj_hidden_dim = 64
    c.model.proj_dim = 32
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 10
    return c


def cross_attention_overrides(c: ml_collections.ConfigDict, *, demo: bool = False
                              ) -> ml_collections.ConfigDict:
    """Cross-attention fusion with modality dropout 0.3 (a config file's `xattn` argument); the
    demo's tiny towers (64 features) get a 64-wide, 4-head fusion block."""
    c.model.fusion = "cross_attention"
    c.model.modality_dropout = 0.3
    if demo:
        c.model.fusion_dim = 64
        c.model.fusion_heads = 4
    return c


def _walk(config: ml_collections.ConfigDict, prefix: str = ""):
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _walk(value, path + ".")
        else:
            yield path, value


class ConfigError(ValueError):
    """An unknown or invalid config key; the message names it."""


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"config key '{key}': {message}")


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises ValueError naming the first unknown or invalid key. Batch sizes must divide by
    `device_count` (default: this process's `jax.device_count()`).

    The sections are checked in this order: keys and loss weights, numbers, the downstream
    protocol, choices, model against objective, fusion, bands and augmentations, batch sizes."""
    objective = config.get("objective")
    if objective not in objectives.OBJECTIVES:
        _fail("objective", f"unknown objective {objective!r}; valid: "
              f"{', '.join(objectives.OBJECTIVES)}")
    values = _validate_keys(config, objective)
    _validate_numbers(config, values)
    _validate_protocol(config, objective)
    _validate_choices(config, values, objective)
    _validate_model_for_objective(config, objective)
    validate_fusion(config)
    _validate_bands_and_augment(config, values)
    _validate_batch_sizes(config, device_count)


def _validate_keys(config: ml_collections.ConfigDict, objective: str) -> dict[str, Any]:
    """No unknown or missing key, booleans where the defaults have them, loss weights only for
    the objective's terms. Returns the config's leaves by dotted key."""
    reference = dict(_walk(base_config(objective)))
    values = dict(_walk(config))
    for key in values:
        if key not in reference and not key.startswith("loss.weights."):
            _fail(key, "unknown key (typo?)")
    for key in reference:
        if key not in values and not key.startswith("loss.weights."):
            _fail(key, "missing key; start config files from mosaic_jax.training.configuration."
                  "base_config()")
        if isinstance(reference[key], bool) and not isinstance(values.get(key), bool):
            _fail(key, f"must be True or False, got {values.get(key)!r}")
    terms = objectives.OBJECTIVES[objective]
    for key, weight in config.loss.weights.items():
        if key not in terms:
            _fail(f"loss.weights.{key}", f"objective {objective} has no term {key!r}; its "
                  f"terms: {', '.join(terms)}")
        _number(f"loss.weights.{key}", weight, minimum=0.0)
    return values


def _validate_numbers(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    """Counts, sizes, rates and fractions in their ranges."""
    for key in ("batch_size", "eval_batch_size", "log_every_steps",
                "keep_checkpoints", "model.proj_hidden_dim",
                "model.proj_dim", "data.demo_num_patches"):
        _integer(key, values[key], minimum=1)
    for key in ("num_train_steps", "eval_every_steps", "eval_max_batches",
                "checkpoint_every_steps",
                "tsne_points", "data.worker_count", "data.prefetch_buffer",
                "optimizer.warmup_steps", "loss.block_size", "seed", "data.subset_seed"):
        _integer(key, values[key], minimum=0)
    for key in ("loss.t_intra", "loss.t_inter", "loss.t_sup", "optimizer.learning_rate",
                "model.width_multiplier"):
        _number(key, values[key], minimum=0.0, strict=True)
    for key in ("optimizer.weight_decay", "optimizer.grad_clip_norm", "model.drop_path_rate"):
        _number(key, values[key], minimum=0.0)
    for key in ("optimizer.b1", "optimizer.b2", "optimizer.momentum", "model.bn_momentum"):
        _number(key, values[key], minimum=0.0, maximum=1.0)
    for key in ("data.train_fraction", "data.label_fraction"):
        _number(key, values[key], minimum=0.0, maximum=1.0)
    if config.data.train_fraction == 0:
        _fail("data.train_fraction", "must be > 0")


def _validate_protocol(config: ml_collections.ConfigDict, objective: str) -> None:
    """``train_mode`` and ``init_from`` (a linear probe needs a pretraining workdir)."""
    _choice("train_mode", config.train_mode, ("full", "linear_probe"))
    if config.train_mode == "linear_probe":
        if not config.init_from:
            _fail("init_from", "train_mode='linear_probe' needs a pretraining workdir")
        if objective != "supervised":
            _fail("train_mode", "a linear probe trains the classifier with objective "
                  "'supervised'")
    if not isinstance(config.data.demo_cache_dir, str):
        _fail("data.demo_cache_dir", f"must be a folder path or '', got "
              f"{config.data.demo_cache_dir!r}")
    if not isinstance(config.init_from, str):
        _fail("init_from", f"must be a workdir path or '', got {config.init_from!r}")


def _validate_choices(config: ml_collections.ConfigDict, values: dict[str, Any],
                      objective: str) -> None:
    """Names from their fixed sets (dataset, model, encoders, optimizer, loss options)."""
    terms = objectives.OBJECTIVES[objective]
    _choice("data.name", config.data.name, datasets.DATASETS)
    _choice("model.kind", config.model.kind, ("two_tower", "single_tower"))
    _choice("model.inputs", config.model.inputs, ("s1", "s2", "s1s2"))
    _choice("model.stem", config.model.stem, ("standard", "iai"))
    _choice("model.dtype", config.model.dtype, ("float32", "bfloat16", "float16"))
    _choice("optimizer.name", config.optimizer.name, ("adamw", "sgd", "lars"))
    _choice("loss.mulsupcon_weighting", config.loss.mulsupcon_weighting, ("mean", "per_sample"))
    _choice("loss.inter_view", config.loss.inter_view, ("shared", "third"))
    if config.loss.inter_view == "third" and "inter" not in terms:
        _fail("loss.inter_view", f"'third' feeds the inter-modal term, which objective "
              f"{objective} does not have; use 'shared'")
    for key in ("model.s1_encoder", "model.s2_encoder", "model.encoder"):
        _choice(key, values[key], ENCODER_NAMES)
    if config.model.stem == "iai":
        for key in ("model.s1_encoder", "model.s2_encoder", "model.encoder"):
            if not values[key].startswith("resnet") and (
                    config.model.kind == "two_tower") == (key != "model.encoder"):
                _fail("model.stem", f"'iai' applies to ResNets only, but {key} is "
                      f"{values[key]!r}; use stem='standard'")


def _validate_model_for_objective(config: ml_collections.ConfigDict, objective: str) -> None:
    """The model kind the objective's terms need, and labels for supervised objectives."""
    terms = objectives.OBJECTIVES[objective]
    single = config.model.kind == "single_tower"
    if objective in objectives.SINGLE_TOWER_ONLY and not single:
        _fail("model.kind", f"objective {objective} needs model.kind='single_tower'")
    if single and any(t not in ("simclr", "bce") for t in terms):
        _fail("model.kind", f"objective {objective} needs model.kind='two_tower'")
    if objective in objectives.SUPERVISED and config.data.label_fraction == 0:
        _fail("data.label_fraction", f"objective {objective} needs labels (> 0)")


def _validate_bands_and_augment(config: ml_collections.ConfigDict,
                                values: dict[str, Any]) -> None:
    """Bands the dataset has statistics for; augmentations `AugmentConfig` accepts."""
    for key, modality in (("data.s1_bands", "s1"), ("data.s2_bands", "s2")):
        try:
            if _dataset_norm(config, modality):  # else a weight file's: any stored band
                bands.band_stats(config.data.name, modality, values[key])
            bands.resolve_bands(values[key], config.data.name, modality)
        except ValueError as e:
            _fail(key, str(e))
    _validate_pretrained(config)
    try:
        augment.AugmentConfig(**config.augment)
    except ValueError as e:  # its messages start with the field's name
        _fail(f"augment.{str(e).split()[0]}", str(e))


def _validate_batch_sizes(config: ml_collections.ConfigDict, device_count: int | None) -> None:
    """Train and eval batch sizes divisible by the device count."""
    devices = jax.device_count() if device_count is None else device_count
    if config.batch_size % devices:
        _fail("batch_size", f"{config.batch_size} is not divisible by the {devices} devices")
    if config.eval_batch_size % devices:
        _fail("eval_batch_size", f"{config.eval_batch_size} is not divisible by the "
              f"{devices} devices")


def _dataset_norm(config: ml_collections.ConfigDict, modality: str) -> bool:
    """Whether `modality`'s inputs are normalised with the dataset's statistics."""
    from mosaic_jax.data import input_norm
    return input_norm.norm_name(config, modality) == "dataset"


def _validate_pretrained(config: ml_collections.ConfigDict) -> None:
    """Weight files and input normalisation (`mosaic_jax.models.pretrained.validate_init`)."""
    from mosaic_jax.models import pretrained  # reads files; imported when validating only
    try:
        pretrained.validate_init(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_fusion(config: ml_collections.ConfigDict) -> None:
    """The fusion and missing-modality keys of `config.model` (two towers only)."""
    m = config.model
    _choice("model.fusion", m.fusion, ("concat", "cross_attention"))
    for key in ("fusion_dim", "fusion_heads", "fusion_layers"):
        _integer(f"model.{key}", m[key], minimum=1)
    if m.fusion_dim % m.fusion_heads:
        _fail("model.fusion_dim", f"{m.fusion_dim} is not divisible by model.fusion_heads="
              f"{m.fusion_heads}")
    _number("model.modality_dropout", m.modality_dropout, minimum=0.0, maximum=1.0)
    if m.kind != "two_tower" and (m.fusion != "concat" or m.modality_dropout):
        key = "model.fusion" if m.fusion != "concat" else "model.modality_dropout"
        _fail(key, "fuses the two towers of model.kind='two_tower'; a single tower has none")


def _integer(key: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, f"must be an integer >= {minimum}, got {value!r}")


def _number(key: str, value: Any, *, minimum: float, maximum: float | None = None,
            strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and not math.isfinite(value):
        _fail(key, f"must be a finite number, got {value!r}")
    ok = ok and (value > minimum if strict else value >= minimum)
    ok = ok and (maximum is None or value <= maximum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        bound += f" and <= {maximum}" if maximum is not None else ""
        _fail(key, f"must be a number {bound}, got {value!r}")


def _choice(key: str, value: Any, valid) -> None:
    if value not in valid:
        _fail(key, f"{value!r} is not one of {', '.join(map(str, valid))}")


def num_classes(config: ml_collections.ConfigDict) -> int:
    """Number of classes of the config's dataset (`data.name`), from the dataset registry."""
    return datasets.get(config.data.name).num_classes
