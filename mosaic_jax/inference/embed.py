"""Embeddings of a whole dataset split with an exported embedder (``mosaic_jax.export``).

``python -m mosaic_jax embed --export OUT --dataset bigearthnet_v2 --split test --data_dir D
--output emb.npz [--batch_size 256]`` reads the prepared split with the evaluation pipeline of
training (`mosaic_jax.data.input_pipeline.make_eval_dataset`: the export's bands, normalised with
the mean and std its ``model.json`` records), runs ``OUT/embedder.jax_export`` on every batch
and writes one ``.npz`` (atomically: temp file, then rename) with, for the N patches of the
split in source order:

- one float32 [N, ...] array per embedder output (``embedding``, ``h_s1``, ``h_s2``,
  ``inter_s1``, ``inter_s2``, ``probs``; see the export's ``model.json``);
- ``labels`` bool [N, C], ``index`` int64 [N] (position in the split), ``patch_id`` str [N]
  (unless ``--no_patch_ids``) and ``class_names`` str [C].

``--only s1`` (or ``s2``) embeds with that modality alone, the other treated as missing
(`mosaic_jax.export.load_embedder`'s ``embed(s1, None)``): the fused ``embedding`` and ``probs``
come from S1 alone and the S2 outputs are zeros.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from data_builders import atomic_files, cli, console
from mosaic_jax.data import input_pipeline
from mosaic_jax.export import load_embedder, load_model_info, untrained_absence_note


def export_norm_stats(info: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per modality (mean, std) float32 of an export's ``model.json["inputs"]``: the
    normalisation its model was trained with (the dataset's, or a pretrained encoder's)."""
    return {m: (np.asarray(info["inputs"][m]["mean"], np.float32),
                np.asarray(info["inputs"][m]["std"], np.float32)) for m in ("s1", "s2")}


def embed_split(export_dir: str, *, split: str, data_dir: str, dataset: str | None = None,
                batch_size: int = 256, patch_ids: bool = True, max_batches: int = 0,
                progress: bool = True, only: str | None = None) -> dict[str, np.ndarray]:
    """Embeds every patch of ``split``; returns the arrays `main` writes to the npz.

    Args:
      export_dir: folder written by ``python -m mosaic_jax export``.
      split: TFDS split spec ("test", "validation[:1000]", ...).
      data_dir: TFDS data directory the dataset was prepared into.
      dataset: TFDS name, default the export's; it must be the export's dataset (band layout
        and statistics), optionally with a config/version ("bigearthnet_v2/default:1.0.0").
      batch_size: patches per embedder call (the last batch is padded, padding dropped).
      patch_ids: also return ``patch_id`` (reads the split's ids once more).
      max_batches: > 0 stops after that many batches (quick looks; N is then smaller).
      progress: show a tqdm progress bar on stderr.
      only: "s1" or "s2": embed with that modality alone (the other one missing).
    """
    info = load_model_info(export_dir)
    name = dataset or info["dataset"]
    base = name.partition(":")[0].partition("/")[0]
    if base != info["dataset"]:
        raise ValueError(f"the export in {export_dir!r} was trained on {info['dataset']!r}, not "
                         f"{base!r}: its bands and normalisation are those of {info['dataset']}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if only not in (None, "s1", "s2"):
        raise ValueError(f"only must be 's1', 's2' or None, got {only!r}")
    embed = load_embedder(export_dir)
    note = untrained_absence_note(info, "s2" if only == "s1" else "s1") if only else ""
    if note:
        print(note, flush=True)
    source = input_pipeline.open_source(name, split, os.path.expanduser(data_dir))
    n = len(source)
    ds = input_pipeline.make_eval_dataset(
        source, dataset=info["dataset"], global_batch_size=batch_size,
        s1_bands=info["inputs"]["s1"]["bands"], s2_bands=info["inputs"]["s2"]["bands"],
        process_index=0, process_count=1, norm_stats=export_norm_stats(info))
    num_batches = -(-n // batch_size)
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    size = int(info["input_size"])
    parts: dict[str, list[np.ndarray]] = {}
    it = iter(ds)
    for _ in tqdm(range(num_batches), desc=f"embedding {name} {split}", unit="batch",
                  disable=not progress):
        batch = next(it)
        if batch["s1"].shape[1:3] != (size, size):
            raise ValueError(f"the export expects {size} x {size} patches, {name} gives "
                             f"{batch['s1'].shape[1]} x {batch['s1'].shape[2]}; re-export with "
                             f"--input_size={batch['s1'].shape[1]}")
        out = embed(None if only == "s2" else batch["s1"], None if only == "s1" else batch["s2"])
        valid = np.asarray(batch["valid"])
        for key, value in out.items():
            parts.setdefault(key, []).append(np.asarray(value)[valid])
        parts.setdefault("labels", []).append(np.asarray(batch["labels"])[valid] > 0)
        parts.setdefault("index", []).append(np.asarray(batch["index"])[valid].astype(np.int64))
    result = {k: np.concatenate(v) for k, v in parts.items()}
    if patch_ids:
        ids = input_pipeline.read_patch_ids(source)
        result["patch_id"] = np.asarray([ids[i] for i in result["index"]], dtype=str)
    result["class_names"] = np.asarray(info["class_names"], dtype=str)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.new_parser("python -m mosaic_jax embed", __doc__)
    parser.add_argument("--export", required=True, help="folder written by mosaic_jax.export")
    parser.add_argument("--dataset", default=None,
                        help="TFDS dataset name (default: the export's dataset)")
    parser.add_argument("--split", required=True, help="TFDS split, e.g. test")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets",
                        help="TFDS data directory of the prepared dataset")
    parser.add_argument("--output", required=True, help="output .npz file")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--max_batches", type=int, default=0,
                        help="stop after this many batches (0: the whole split)")
    parser.add_argument("--no_patch_ids", action="store_true", help="do not store patch ids")
    parser.add_argument("--only", choices=("s1", "s2"), default=None,
                        help="embed with this modality alone, the other one treated as missing")
    args = parser.parse_args(argv)

    def work() -> dict[str, np.ndarray]:
        cli.check_output(args.output)
        arrays = embed_split(args.export, split=args.split, data_dir=args.data_dir,
                             dataset=args.dataset, batch_size=args.batch_size,
                             patch_ids=not args.no_patch_ids, max_batches=args.max_batches,
                             only=args.only)
        with atomic_files.open_atomic(args.output) as f:
            np.savez(f, **arrays)
        return arrays

    arrays = cli.run(work, argv, paths=[args.output])
    shapes = ", ".join(f"{k} {v.shape}" for k, v in arrays.items())
    print(f"Wrote {len(arrays['index'])} rows to {os.path.abspath(args.output)}: {shapes}")


if __name__ == "__main__":
    console.quiet_console()
    main()
