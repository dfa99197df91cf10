"""The workdir contract (mosaic_jax/training/workdir.py): file names, the config reader, run
names and whether a run's classifier trained."""

import json

import pytest

from mosaic_jax.training import workdir


def test_file_names_are_the_ones_training_writes():
    assert workdir.CONFIG_FILE == "config.json"
    assert workdir.metrics_file("validation") == "metrics_validation.json"
    assert workdir.metrics_markdown_file("test") == "metrics_test.md"
    assert workdir.tsne_file("validation") == "tsne_validation.png"
    names = ["metrics_test.json", "metrics_validation.md", "config.json",
             "metrics_validation.json", "tsne_validation.png"]
    assert workdir.metrics_splits(names) == ["test", "validation"]


def test_read_config_reads_config_json_and_says_what_is_wrong(tmp_path):
    assert workdir.read_config(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"objective": "mosaic1"}))
    assert workdir.read_config(str(tmp_path)) == {"objective": "mosaic1"}
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        workdir.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not a config object"):
        workdir.read_config(tmp_path)


def test_read_config_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"seed": 3}')
    assert workdir.read_config("~/run") == {"seed": 3}


def test_runs_are_named_after_objective_and_protocol(tmp_path):
    assert workdir.run_name({"objective": "mosaic1"}, "/runs/a") == "mosaic1"
    assert workdir.run_name({}, "/runs/a/") == "a"
    probe = {"objective": "supervised", "init_from": "/runs/pre/", "train_mode": "linear_probe"}
    assert workdir.run_name(probe, "/runs/p", {"objective": "mosaic1"}) == "mosaic1, linear probe"
    assert workdir.run_name(probe, "/runs/p") == "pre, linear probe"  # unreadable: folder name
    fine = {**probe, "train_mode": "full"}
    assert workdir.run_name(fine, "/runs/f", {"objective": "simclr"}) == "simclr, fine-tune"


def test_read_pretraining_reads_the_init_from_config_or_gives_none(tmp_path):
    pre = tmp_path / "pre"
    pre.mkdir()
    assert workdir.read_pretraining({"objective": "mosaic1"}) is None
    assert workdir.read_pretraining({"init_from": str(pre)}) is None  # no config.json
    (pre / "config.json").write_text("{broken")
    assert workdir.read_pretraining({"init_from": str(pre)}) is None
    (pre / "config.json").write_text('{"objective": "iai_simclr"}')
    assert workdir.read_pretraining({"init_from": str(pre)}) == {"objective": "iai_simclr"}


def test_classifier_trained_needs_a_bce_term_of_positive_weight():
    assert workdir.classifier_trained({"objective": "mosaic1"})
    assert not workdir.classifier_trained({"objective": "simclr"})
    assert not workdir.classifier_trained(
        {"objective": "mosaic1", "loss": {"weights": {"bce": 0.0}}})
    assert workdir.classifier_trained({"objective": "not an objective"})
    assert workdir.classifier_trained({})
