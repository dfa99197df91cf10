"""README.md's Python examples run as written."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE

pytestmark = pytest.mark.slow  # the integration tier: the examples run in subprocesses

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    for i, code in enumerate(blocks):
        if "import" not in code.split("\n", 3)[-1] and "=" not in code:
            continue  # an import listing, not an example
        if "tfds.data_source(" in code:
            continue  # reads a prepared dataset: run by tests/test_dataset_reading.py
        script = tmp_path / f"example_{i}.py"
        script.write_text(code)
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
        result = subprocess.run([sys.executable, str(script)], env=env, cwd=README.parent,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
