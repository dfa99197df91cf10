"""Reading the prepared datasets from one's own code: README's "Use the datasets in your own
code" example runs as written, and a `--file_format tfrecord` preparation read by `tfds.load`
holds the same examples as the array_record one."""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTION = "## Use the datasets in your own code"


def readme_section_code():
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:len(SECTION)] + section[len(SECTION):].split("\n## ", 1)[0]  # may be last
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


@pytest.mark.slow
def test_readme_dataset_example_runs_on_a_prepared_dataset(prepared_fake, tmp_path):
    """The code as written, outside the repository (no builder code importable), with TFDS's
    default data_dir pointing at the prepared fake BigEarthNet v2."""
    script = tmp_path / "read_dataset.py"
    script.write_text(readme_section_code())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TFDS_DATA_DIR"] = prepared_fake
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import tensorflow_datasets as tfds

    n = tfds.builder_from_directory(
        str(pathlib.Path(prepared_fake) / "bigearthnet_v2/default/1.0.0")).info.splits[
        "train"].num_examples
    assert result.stdout.startswith(f"{n} examples; s2: Sentinel-2 L2A reflectance x 10000, "
                                    "bands B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12")
    batches = [line for line in result.stdout.splitlines() if line[:2] in ("0 ", "1 ", "2 ")]
    assert [b.split(" (")[1].split(")")[0] for b in batches] == ["8, 120, 120, 3"] * 3


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="TensorFlow is not installed (tfrecord preparation and tfds.load "
                           "need it)")
def test_tfrecord_preparation_loads_with_tfds_load_and_equals_array_record(prepared_fake,
                                                                           tmp_path):
    import tensorflow_datasets as tfds

    from data_builders import prepare
    from mosaic_jax.data import input_pipeline

    raw = pathlib.Path(prepared_fake).parent / "raw"  # what prepared_fake was prepared from
    data_dir = str(tmp_path / "tfds_tfrecord")
    assert prepare.main(["bigearthnet_v2", "--manual_dir", str(raw), "--data_dir", data_dir,
                         "--file_format", "tfrecord", "--skip_checksums"]) == 0  # fake metadata
    for split in ("train", "validation"):
        array_record = input_pipeline.open_source("bigearthnet_v2", split, prepared_fake)
        by_id = {input_pipeline._to_str(array_record[i]["patch_id"]): array_record[i]
                 for i in range(len(array_record))}
        loaded = list(tfds.as_numpy(tfds.load("bigearthnet_v2", split=split,
                                              data_dir=data_dir)))
        assert len(loaded) == len(by_id) > 0
        for ex in loaded:
            want = by_id[ex["patch_id"].decode()]
            for key in ("s1", "s2", "labels"):
                assert ex[key].dtype == want[key].dtype and ex[key].shape == want[key].shape
                np.testing.assert_array_equal(ex[key], want[key])


def test_unknown_file_format_is_rejected(tmp_path, capsys):
    from data_builders import prepare

    with pytest.raises(SystemExit):
        prepare.main(["bigearthnet_v2", "--manual_dir", str(tmp_path), "--data_dir",
                      str(tmp_path), "--file_format", "parquet"])
    assert "--file_format: invalid choice: 'parquet'" in capsys.readouterr().err
    with pytest.raises(prepare.UsageError, match="unknown file format 'parquet'"):
        prepare.prepare("bigearthnet_v2", tmp_path, tmp_path, file_format="parquet")
