"""TensorBoard events without TensorFlow: what `mosaic_jax.training.tensorboard_writer` writes is
read back by TensorBoard's own event reader (tensorboard package, no TensorFlow), and a demo run
imports no TensorFlow module."""

import io
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import hide_packages_source
from PIL import Image

from mosaic_jax.training import tensorboard_writer

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

REPO = pathlib.Path(__file__).resolve().parents[1]


def read_events(logdir):
    """TensorBoard's reader over `logdir`, with every event kept."""
    acc = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
                                    event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def decoded(image_event):
    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)))


def test_scalars_images_texts_and_hparams_are_read_by_tensorboard(tmp_path):
    writer = tensorboard_writer.create_writer(str(tmp_path))
    writer.write_hparams({"lr": 0.1, "model": "resnet50", "nested": {"a": 1}})
    writer.write_scalars(3, {"train/loss": np.float32(1.5), "eval/ap": 0.25})
    writer.write_scalars(7, {"train/loss": 0.75})
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    writer.write_images(7, {"eval/tsne": rgb, "pair": np.stack([rgb, 255 - rgb])})
    writer.write_images(8, {"unit": np.full((2, 2, 1), 0.5, np.float32)})
    writer.write_texts(7, {"note": "hello"})
    writer.close()

    acc = read_events(tmp_path)
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(3, 1.5), (7, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/ap")] == [(3, 0.25)]
    (tsne,) = acc.Images("eval/tsne")
    assert (tsne.step, tsne.width, tsne.height) == (7, 5, 6)
    np.testing.assert_array_equal(decoded(tsne), rgb)  # PNG is lossless
    np.testing.assert_array_equal(decoded(acc.Images("pair/1")[0]), 255 - rgb)
    assert np.all(decoded(acc.Images("unit")[0]) == 128)  # 0.5 -> rint(127.5)
    assert "note/text_summary" in acc.Tags()["tensors"]  # tensorboardX names text tags so
    # The HPARAMS tab reads the session-start plugin data of this run (no sub-run folder).
    from tensorboard.plugins.hparams import metadata as hp_metadata

    start = hp_metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)[hp_metadata.SESSION_START_INFO_TAG])
    assert start.hparams["lr"].number_value == 0.1
    assert start.hparams["model"].string_value == "resnet50"
    assert start.hparams["nested"].string_value == "{'a': 1}"
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def test_just_logging_writes_no_file(tmp_path, caplog):
    writer = tensorboard_writer.create_writer(str(tmp_path), just_logging=True)
    with caplog.at_level("INFO"):
        writer.write_scalars(2, {"train/loss": 0.5})
    writer.write_images(2, {"x": np.zeros((2, 2, 3), np.uint8)})
    writer.write_hparams({"a": 1})
    writer.flush()
    writer.close()
    assert list(tmp_path.iterdir()) == []
    assert "[2] train/loss=0.5" in caplog.text


def test_bad_image_shape_names_the_tag(tmp_path):
    writer = tensorboard_writer.create_writer(str(tmp_path))
    with pytest.raises(ValueError, match="image 'eval/tsne'.*shape \\(4, 4\\)"):
        writer.write_images(1, {"eval/tsne": np.zeros((4, 4))})
    writer.close()


def test_scalars_with_an_event_file_stay_off_the_console(tmp_path, caplog):
    """The console gets one progress line per log step from the loop, not every scalar."""
    writer = tensorboard_writer.create_writer(str(tmp_path))
    with caplog.at_level("INFO"):
        writer.write_scalars(2, {"train/loss": 0.5, "train/grad_norm": 3.0})
    writer.close()
    assert caplog.text == ""
    assert [e.value for e in read_events(tmp_path).Scalars("train/grad_norm")] == [3.0]


def test_report_progress_writes_steps_per_second(tmp_path, caplog):
    writer = tensorboard_writer.create_writer(str(tmp_path))
    hook = tensorboard_writer.ReportProgress(num_train_steps=10, writer=writer, every_steps=2)
    assert hook.steps_per_sec is None
    with caplog.at_level("INFO"):
        for step in range(1, 7):
            hook(step)
    assert hook.steps_per_sec > 0 and caplog.text == ""
    writer.close()
    steps = [e.step for e in read_events(tmp_path).Scalars("steps_per_sec")]
    assert steps == [2, 4, 6]
    with pytest.raises(ValueError, match="every_steps"):
        tensorboard_writer.ReportProgress(num_train_steps=10, writer=writer, every_steps=0)


def read_png(path) -> np.ndarray:
    """[H, W, 3] uint8 pixels of a PNG file."""
    with open(path, "rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


LAUNCHER = hide_packages_source(("tensorflow",)) + textwrap.dedent("""\
    import importlib.util
    import sys

    assert importlib.util.find_spec("tensorflow") is None
    from mosaic_jax import main

    try:
        main.main()  # parses sys.argv itself (data_builders.cli.parse_absl)
    finally:
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] == "tensorflow")
        assert not loaded, loaded
        print("NO TENSORFLOW MODULE LOADED")
    """)


@pytest.mark.slow
def test_demo_run_without_tensorflow_writes_events_tensorboard_reads(tmp_path):
    """The demo (synthetic data prepared by the real builder, then training, evaluation and the
    t-SNE picture), shrunk, in a process where TensorFlow cannot be imported."""
    launcher = tmp_path / "run_without_tf.py"
    launcher.write_text(LAUNCHER)
    workdir = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    overrides = dict(num_train_steps=4, log_every_steps=2, eval_every_steps=0, batch_size=16,
                     eval_batch_size=16, tsne_points=40, **{
                         "data.demo_num_patches": 40, "augment.out_size": 16,
                         "model.width_multiplier": 1 / 32, "model.proj_hidden_dim": 16,
                         "model.proj_dim": 8})
    result = subprocess.run(
        [sys.executable, str(launcher), "--config=configs/mosaic1.py:demo",
         f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NO TENSORFLOW MODULE LOADED" in result.stdout
    acc = read_events(workdir)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    assert [e.step for e in acc.Scalars("eval/macro_ap")] == [4]
    (tsne,) = acc.Images("eval/tsne")
    np.testing.assert_array_equal(decoded(tsne)[..., :3],
                                  read_png(workdir / "tsne_validation.png"))
