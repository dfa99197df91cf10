"""Test setup: 8 forced CPU devices for the sharding tests (set before jax is imported), cheap
XLA CPU compilation, and a per-session persistent compilation cache so that identical programs
compile once."""

import atexit
import os
import shutil
import tempfile

# XLA's CPU backend spends most of these tests' time in LLVM (the initialisers' threefry
# especially); tests check values, not speed, so they compile with its cheap settings.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + FAST_COMPILE
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mosaic_jax_xla_cache_")
    # Removed when this process (pytest's main one; workers and subprocesses inherit it) ends.
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


import pytest  # noqa: E402
from absl import flags  # noqa: E402

# pytest is this program's entry point, not an absl app: absl's flags keep their defaults, as
# the input pipeline's Grain worker processes need them parsed (mosaic_jax.data.input_pipeline).
flags.FLAGS.mark_as_parsed()


def hide_packages_source(names: tuple[str, ...]) -> str:
    """Python source that, run first in a process, makes the top-level packages `names`
    unimportable (find_spec gives None, import raises ModuleNotFoundError), exactly as when they
    are not installed: every meta-path finder is wrapped."""
    return f"""\
import sys


class _HidePackages:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {tuple(names)!r}:
            return None
        return self.finder.find_spec(name, path, target)

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [_HidePackages(finder) for finder in sys.meta_path]
"""


def tiny(config):
    """Shrinks a config to test size (16 px inputs, width 1/32, tiny heads)."""
    config.batch_size = 16
    config.eval_batch_size = 16
    config.augment.out_size = 16
    config.model.width_multiplier = 1 / 32
    config.model.proj_hidden_dim = 16
    config.model.proj_dim = 8
    return config


def program_config(data_dir):
    """Tiny MoSAiC-1 on the prepared fake data: 6 steps, checkpoints at steps 3 and 6."""
    import importlib

    config = tiny(importlib.import_module("configs.mosaic1").get_config("demo"))
    config.data.demo = False
    config.data.data_dir = data_dir
    config.num_train_steps = 6
    config.checkpoint_every_steps = 3
    config.log_every_steps = 2
    config.tsne_points = 0  # the t-SNE picture has its own tests (test_metrics.py)
    return config


@pytest.fixture(scope="session")
def prepared_fake(tmp_path_factory):
    """TFDS data_dir holding a prepared 40-patch fake BigEarthNet v2 (official layout)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import data_builders.bigearthnet_v2  # noqa: F401  (registers the builder)
    from data_builders.fake_bigearthnet import write_fake_bigearthnet

    root = tmp_path_factory.mktemp("fake_bigearthnet")
    write_fake_bigearthnet(root / "raw", 40, seed=1)
    tfds.builder("bigearthnet_v2", data_dir=str(root / "tfds"), file_format="array_record",
                 skip_checksums=True).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root / "raw")))
    return str(root / "tfds")


@pytest.fixture(scope="session")
def trained_workdir(prepared_fake, tmp_path_factory):
    """(workdir, final metrics) of one uninterrupted `program_config` run, shared by the
    training, export, embedding and report tests."""
    from mosaic_jax.training import train

    workdir = str(tmp_path_factory.mktemp("trained") / "mosaic1_run")
    return workdir, train.train_and_evaluate(program_config(prepared_fake), workdir)


@pytest.fixture(scope="session")
def exported_dir(trained_workdir, tmp_path_factory):
    """`exporter.export_workdir` of the trained workdir (latest step, default platforms)."""
    from mosaic_jax.export import exporter

    out = str(tmp_path_factory.mktemp("export_out") / "export")
    exporter.export_workdir(trained_workdir[0], out)
    return out


# ---------------------------------------------------------------------------------------------
# Entry points run as a person runs them (a subprocess on the CPU, this checkout first on the path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra):
    """The environment of a subprocess run: CPU only, this checkout first on the path."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path, **extra)


def run_python(args, timeout=600, **env):
    """``python ARGS`` in the repository root; the CompletedProcess with text output."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr):
    """The ``error:`` lines of an entry point's stderr (data_builders/cli.py)."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]
