"""The embedded demo dataset: synthetic BigEarthNet v2 in the official layout, prepared by the
real `bigearthnet_v2` builder, so the demo exercises the same code as a real run.

Classes are learnable from spectra and texture, and S1 and S2 agree (see
`data_builders.fake_bigearthnet`). Everything is written under one root; a finished
preparation is reused, an interrupted one is redone (TFDS writes atomically).
"""

from __future__ import annotations

import os


def prepare_demo_dataset(root: str, *, num_patches: int = 600, seed: int = 0) -> str:
    """Writes the raw files under `root/raw` and prepares them into `root/tfds`.

    Returns the TFDS data_dir to read the `bigearthnet_v2` dataset from.
    """
    import tensorflow_datasets as tfds

    import data_builders.bigearthnet_v2  # noqa: F401  (registers the builder)
    from data_builders.fake_bigearthnet import write_fake_bigearthnet

    raw = os.path.join(root, "raw")
    data_dir = os.path.join(root, "tfds")
    done = os.path.join(raw, f".complete_{num_patches}_{seed}")
    if not os.path.exists(done):
        print(f"Writing {num_patches} synthetic BigEarthNet v2 patches to {raw} ...", flush=True)
        write_fake_bigearthnet(raw, num_patches, seed=seed)
        open(done, "w").close()
    builder = tfds.builder("bigearthnet_v2", data_dir=data_dir, file_format="array_record",
                           skip_checksums=True)  # synthetic metadata
    if not builder.is_prepared():
        print(f"Preparing them with the bigearthnet_v2 builder into {data_dir} ...", flush=True)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=raw))
    return data_dir
