"""The quiet console (data_builders/console.py): library chatter off, our lines on."""

import logging

from data_builders import console


def _record(level, path, msg):
    return logging.LogRecord("absl", level, path, 1, msg, None, None)


def test_console_filter_drops_library_chatter_only():
    site = "/venv/lib/python3.11/site-packages"
    assert console.is_noise(_record(logging.INFO, f"{site}/jax/_src/xla_bridge.py",
                                    "Unable to initialize backend 'tpu'"))
    assert console.is_noise(_record(logging.WARNING,
                                    f"{site}/tensorflow_datasets/core/utils/file_utils.py",
                                    "Variant folder /d/bigearthnet_v2/default/1.0.0 has no "
                                    "dataset_info.json"))
    assert console.is_noise(_record(logging.INFO, f"{site}/matplotlib/font_manager.py", "x"))
    assert not console.is_noise(_record(logging.WARNING, f"{site}/orbax/checkpoint/x.py", "w"))
    assert not console.is_noise(_record(logging.INFO, f"{site}/clu/metric_writers/x.py",
                                        "[20] train/loss=1"))
    assert not console.is_noise(
        _record(logging.INFO, "/repo/mosaic_jax/training/train.py", "Resumed"))


def test_quiet_console_filters_jax_own_logger(caplog):
    console.quiet_console()
    logger = logging.getLogger("jax._src.xla_bridge")
    with caplog.at_level(logging.INFO):
        logger.info("Unable to initialize backend 'tpu'")
        logger.warning("a real warning")
    messages = [r.getMessage() for r in caplog.records]
    assert "a real warning" in messages and "Unable to initialize backend 'tpu'" not in messages

