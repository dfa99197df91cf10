"""Embedding a whole split with the exported embedder."""

import json
import os

import numpy as np
import pytest

from mosaic_jax import export
from mosaic_jax.data import bands, input_pipeline
from mosaic_jax.evaluation.metrics import multilabel_metrics
from mosaic_jax.inference import embed

pytestmark = pytest.mark.slow  # the integration tier: whole-program runs


@pytest.fixture(scope="module")
def out(exported_dir):
    return exported_dir


@pytest.fixture(scope="module")
def data_dir(prepared_fake):
    return prepared_fake


def test_embed_writes_one_row_per_patch_of_the_split(out, data_dir, tmp_path, capsys):
    path = tmp_path / "sub" / "emb.npz"
    embed.main(["--export", out, "--dataset", "bigearthnet_v2", "--split", "test",
                "--data_dir", data_dir, "--output", str(path), "--batch_size", "3"])
    assert f"to {path}" in capsys.readouterr().out
    assert os.listdir(path.parent) == ["emb.npz"]  # no temp file left
    got = np.load(path)
    source = input_pipeline.open_source("bigearthnet_v2", "test", data_dir)
    n = len(source)
    assert n == 8  # 3 batches of 3, the last one padded
    info = export.load_model_info(out)
    for key in info["embedding_keys"]:
        width = info["embedder"]["outputs"][key]["shape"][1]
        assert got[key].shape == (n, width) and got[key].dtype == np.float32, key
    np.testing.assert_array_equal(got["index"], np.arange(n))
    np.testing.assert_array_equal(got["labels"], np.stack([source[i]["labels"] for i in range(n)]))
    assert list(got["patch_id"]) == input_pipeline.read_patch_ids(source)
    assert list(got["class_names"]) == info["class_names"]
    # Rows are the embedder's outputs on the normalised patches, in source order.
    s1 = np.stack([bands.normalize(source[i]["s1"], "bigearthnet_v2", "s1",
                                   info["inputs"]["s1"]["bands"]) for i in (6, 7)])
    s2 = np.stack([bands.normalize(source[i]["s2"], "bigearthnet_v2", "s2",
                                   info["inputs"]["s2"]["bands"]) for i in (6, 7)])
    direct = export.load_embedder(out)(s1, s2)
    np.testing.assert_allclose(got["embedding"][6:], direct["embedding"], rtol=1e-5, atol=1e-6)


def test_embedded_probabilities_reproduce_the_training_evaluation(out, data_dir,
                                                                  trained_workdir):
    workdir = trained_workdir[0]
    arrays = embed.embed_split(out, split="validation", data_dir=data_dir, batch_size=16,
                               patch_ids=False, progress=False)
    with open(os.path.join(workdir, "metrics_validation.json")) as f:
        recorded = json.load(f)
    metrics = multilabel_metrics(arrays["probs"], arrays["labels"])
    assert metrics["num_samples"] == recorded["num_samples"] == len(arrays["index"])
    for key in ("macro_ap", "micro_ap", "macro_f1", "micro_f1"):
        assert metrics[key] == pytest.approx(recorded[key], abs=1e-6), key
    assert "patch_id" not in arrays


def test_embed_refuses_another_dataset(out, data_dir):
    with pytest.raises(ValueError, match="trained on 'bigearthnet_v2', not 'sen12ms'"):
        embed.embed_split(out, split="test", data_dir=data_dir, dataset="sen12ms")
