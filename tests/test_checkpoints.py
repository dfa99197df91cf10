"""A workdir's checkpoints and config (mosaic_jax/training/checkpoints.py)."""

import importlib
import json

import pytest
from conftest import error_lines, run_python

from mosaic_jax.training import checkpoints


def _workdir_with_checkpoint(root, config):
    workdir = root / "mosaic1_run"
    (workdir / "checkpoints" / "3" / "state").mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json())
    return workdir


def test_workdir_of_another_model_is_refused(tmp_path):
    mosaic1 = importlib.import_module("configs.mosaic1").get_config("demo")
    supervised = importlib.import_module("configs.supervised").get_config("demo")
    workdir = _workdir_with_checkpoint(tmp_path, mosaic1)
    checkpoints.check_workdir_matches(workdir, mosaic1)  # same model: resumes
    diffs = dict((k, (a, b)) for k, a, b in checkpoints.structure_differences(
        json.loads(mosaic1.to_json()), supervised))
    assert diffs["objective"] == ("mosaic1", "supervised")
    assert diffs["model.kind"] == ("two_tower", "single_tower")
    with pytest.raises(ValueError, match="holds a checkpoint of another model .*objective "
                       "'mosaic1' there, 'supervised' here.*choose a new --workdir"):
        checkpoints.check_workdir_matches(workdir, supervised)
    # A compute-only change (dtype) keeps the checkpoint's tree: no complaint.
    other_dtype = importlib.import_module("configs.mosaic1").get_config("demo")
    other_dtype.model.dtype = "bfloat16"
    checkpoints.check_workdir_matches(workdir, other_dtype)


@pytest.mark.slow
def test_main_refuses_workdir_of_another_model_before_compiling(tmp_path):
    workdir = _workdir_with_checkpoint(
        tmp_path, importlib.import_module("configs.mosaic1").get_config("demo"))
    result = run_python(["-m", "mosaic_jax.main", "--config=configs/supervised.py:demo",
                         f"--workdir={workdir}"], timeout=300,
                        MOSAIC_JAX_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "partial_restore" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert f"workdir {workdir} holds a checkpoint of another model" in line
    assert not (tmp_path / "cache").exists()  # refused before the demo data, before compiling
