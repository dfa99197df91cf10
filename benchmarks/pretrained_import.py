"""What starting a tower from a weight file costs: TorchGeo's S2 ResNet-50 layout (13 bands,
width 64, ImageNet-size fc), imported into the S2 tower of a two-tower config on BigEarthNet v2's
12 bands.

  python -m benchmarks.pretrained_import [--output benchmarks/results/pretrained_import.json]

Writes a random state dict in torchvision's exact layout as ``.safetensors`` (not timed), then
times, best of three: reading the file (`mosaic_jax.models.pretrained.read_state_dict`), mapping
the first convolution and converting every tensor (`import_tower`, with the model's shapes from
``jax.eval_shape``: nothing compiled). Peak memory is the process's peak RSS (after the imports
of jax and flax) and its growth over the measurement.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from data_builders import cli


def resnet50_state_dict(in_chans: int, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """Random tensors with torchvision ``resnet50(num_classes=...)`` names and shapes."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}

    def conv(name: str, o: int, i: int, k: int) -> None:
        out[name] = (rng.normal(size=(o, i, k, k)) / np.sqrt(i * k * k)).astype(np.float32)

    def bn(name: str, c: int) -> None:
        out.update({f"{name}.weight": rng.uniform(0.5, 1.5, c).astype(np.float32),
                    f"{name}.bias": rng.normal(size=c).astype(np.float32) * 0.1,
                    f"{name}.running_mean": rng.normal(size=c).astype(np.float32) * 0.1,
                    f"{name}.running_var": rng.uniform(0.5, 1.5, c).astype(np.float32),
                    f"{name}.num_batches_tracked": np.asarray(1000, np.int64)})

    conv("conv1.weight", 64, in_chans, 7)
    bn("bn1", 64)
    cin = 64
    for i, n in enumerate((3, 4, 6, 3)):
        f = 64 * 2 ** i
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            for k, (o, c, kk) in enumerate([(f, cin, 1), (f, f, 3), (4 * f, f, 1)], start=1):
                conv(f"{p}.conv{k}.weight", o, c, kk)
                bn(f"{p}.bn{k}", o)
            if j == 0:
                conv(f"{p}.downsample.0.weight", 4 * f, cin, 1)
                bn(f"{p}.downsample.1", 4 * f)
            cin = 4 * f
    out["fc.weight"] = rng.normal(size=(num_classes, cin)).astype(np.float32) * 0.01
    out["fc.bias"] = np.zeros(num_classes, np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = cli.new_parser("python -m benchmarks.pretrained_import", __doc__)
    parser.add_argument("--output", default=str(common.RESULTS_DIR / "pretrained_import.json"))
    args = parser.parse_args(argv)

    import jax
    import safetensors.numpy

    from mosaic_jax import models
    from mosaic_jax.models import pretrained
    from mosaic_jax.training import configuration

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "ssl4eo_s2_resnet50.safetensors")
        safetensors.numpy.save_file(resnet50_state_dict(13, 1000, seed=0), path)
        size = Path(path).stat().st_size
        config = configuration.base_config("mosaic1")
        config.model.s2_encoder = "resnet50"
        config.model.stem = "standard"
        config.model.s2_init = path
        config.model.s2_init_bands = "ssl4eo_s2_l1c"
        config.data.s2_bands = "s2_all"
        configuration.validate_config(config, jax.device_count())
        model = models.create_model(config)
        like = jax.eval_shape(lambda: models.init_variables(
            config, model, params_rng=jax.random.key(0), dropout_rng=jax.random.key(1)))
        (tower,) = pretrained.tower_inits(config)
        rss_before = common.peak_rss_bytes()
        reads, converts = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            tensors = pretrained.read_state_dict(path, tower.key)
            t1 = time.perf_counter()
            _, _, record = pretrained.import_tower(
                tower, tensors, like["params"]["enc_s2"], like["batch_stats"]["enc_s2"],
                config.model.init_band_fill)
            converts.append(time.perf_counter() - t1)
            reads.append(t1 - t0)
            del tensors
        rss_after = common.peak_rss_bytes()
    result = {
        "machine": common.machine_info(),
        "note": "2-core shared VM, loaded by other jobs: seconds depend on the load",
        "file": {"format": "safetensors", "bytes": size, "tensors": record["tensors"],
                 "ignored": len(record["ignored"])},
        "read_seconds_best_of_3": min(reads),
        "convert_seconds_best_of_3": min(converts),
        "import_seconds_best_of_3": min(r + c for r, c in zip(reads, converts, strict=True)),
        "peak_rss_bytes": rss_after,
        "peak_rss_growth_bytes": rss_after - rss_before,
    }
    common.write_json(args.output, result)
    print(common.describe_machine(result["machine"]))
    print(common.format_table(
        ["file MB", "tensors", "read s", "convert s", "import s", "peak RSS GiB",
         "RSS growth MB"],
        [[f"{size / 1e6:.1f}", record["tensors"], f"{min(reads):.3f}", f"{min(converts):.3f}",
          f"{result['import_seconds_best_of_3']:.3f}", f"{rss_after / common.GIB:.2f}",
          f"{(rss_after - rss_before) / 1e6:.0f}"]]))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
