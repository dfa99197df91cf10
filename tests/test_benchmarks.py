"""The loss-memory and train-step benchmarks run end to end (`--quick`) and report what they say."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hide_packages_source

from benchmarks import common, loss_memory, train_step

REPO = Path(__file__).resolve().parents[1]

MACHINE_KEYS = ("platform", "cpu_model", "usable_cores", "memory_gib", "jax_version",
                "device_kind", "backend")


# A bare GPU image (jax, flax, optax, numpy, etils, absl, PyYAML; ml_collections installed from a
# wheel by benchmarks/gpu_session.sh --wheels) lacks these: the train-step benchmark must run
# without them.
NOT_ON_GPU_IMAGE = ("grain", "tensorflow_datasets", "tensorflow", "clu", "array_record")
HIDE_PACKAGES = hide_packages_source(NOT_ON_GPU_IMAGE)


def _env(hide_dir: Path | None = None) -> dict[str, str]:
    """The test environment on one CPU device (conftest forces 8 for the sharding tests), with
    conftest's cheap compile settings; with `hide_dir`, a sitecustomize there hides the
    packages the GPU image lacks."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    if hide_dir is not None:
        hide_dir.mkdir(parents=True, exist_ok=True)
        (hide_dir / "sitecustomize.py").write_text(HIDE_PACKAGES)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hide_dir),
                                                          env.get("PYTHONPATH")]))
    return env


def _run(script: str, *args: str, timeout: float = 300, hide_dir: Path | None = None
         ) -> subprocess.CompletedProcess:
    module = "benchmarks." + script.removesuffix(".py")  # run as the commands in RESULTS.md
    proc = subprocess.run([sys.executable, "-m", module, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=_env(hide_dir))
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_helpers(monkeypatch):
    assert loss_memory.logits_bytes("nt_xent", 65_536) == 16 * common.GIB
    assert loss_memory.logits_bytes("cross_modal_infonce", 65_536) == 8 * common.GIB
    # The throughput table is looked up by a case-insensitive substring of jax's device_kind.
    monkeypatch.setattr(train_step, "MEASURED_BF16_MATMUL_FLOPS", (("H100", 1e12), ("X9", 2e12)))
    assert train_step.measured_bf16_matmul_flops("NVIDIA h100 80GB HBM3") == 1e12
    assert train_step.measured_bf16_matmul_flops("Acme X9 Pro") == 2e12
    assert train_step.measured_bf16_matmul_flops("cpu") is None
    table = common.format_table(["a", "bb"], [[1, "x"], ["long", 2]])
    assert table.splitlines()[0] == "| a    | bb |"
    assert len({len(line) for line in table.splitlines()}) == 1


@pytest.mark.slow
def test_loss_memory_quick(tmp_path: Path):
    out = tmp_path / "loss_memory.json"
    proc = _run("loss_memory.py", "--quick", "--output", str(out))
    text = proc.stdout
    assert "| loss " in text and "peak RSS GiB" in text and "loss+grad s" in text
    for loss in loss_memory.LOSSES:
        assert re.search(rf"check {loss} at 2,048 views .*: ok$", text, re.M), text
    assert "target: loss + gradient for 65,536 views" in text

    data = json.loads(out.read_text())
    assert data["benchmark"] == "loss_memory" and data["quick"] is True
    for key in MACHINE_KEYS:
        assert data["machine"].get(key) is not None, key
    cases = data["cases"]
    assert len(cases) == 2 * len(loss_memory.LOSSES)
    for case in cases:
        assert "error" not in case, case
        assert case["finite"] and case["time_s"] > 0 and case["views"] == 2048
        assert 0 < case["rss_before_run_gib"] <= case["peak_rss_gib"] < 2.0
    for loss in loss_memory.LOSSES:
        by_path = {c["path"]: c for c in cases if c["loss"] == loss}
        assert by_path["blockwise"]["block_size"] == 256 and by_path["plain"]["block_size"] is None
        # The blockwise run equals the plain one (separate processes, same inputs) ...
        assert by_path["blockwise"]["value"] == pytest.approx(by_path["plain"]["value"],
                                                              rel=1e-5)
        # ... and the in-process check of value and gradient agrees.
        check = data["checks"][loss]
        assert check["ok"] and check["rel_diff"] < 1e-5 and check["grad_rel_diff"] < 1e-3


@pytest.mark.slow
def test_train_step_quick(tmp_path: Path):
    out = tmp_path / "train_step.json"
    # As on the GPU machine: without grain, TFDS, TensorFlow, clu.
    proc = _run("train_step.py", "--quick", "--output", str(out), "--profile",
                str(tmp_path / "profile"), "--profile-steps", "2",
                hide_dir=tmp_path / "gpu_image")
    text = proc.stdout
    assert "| workload " in text and "samples/s" in text and "TFLOP/s (XLA)" in text
    assert re.search(r"^\| iai_120 .*\| n/a ", text, re.M), text

    data = json.loads(out.read_text())
    assert data["benchmark"] == "train_step" and data["quick"] is True
    for key in MACHINE_KEYS:
        assert data["machine"].get(key) is not None, key
    assert data["bf16_peak_tflops"] is None  # a CPU has no entry in the peak table
    (r,) = data["results"]
    assert r["workload"] == "iai_120" and r["encoders"] == ["resnet18", "resnet18"]
    assert (r["image"], r["batch"], r["dtype"]) == (32, 16, "float32")
    assert r["inter_view"] == "third" and r["remat"] is False  # IaI as published: 3 views
    assert r["loss_finite"] and r["samples_per_s"] > 0 and r["step_ms"] > 0
    assert len(r["step_times_s"]) == r["steps"] == 2
    assert r["gflop_per_sample_xla"] > 0 and r["tflops_xla"] > 0
    assert r["fraction_of_bf16_peak_xla"] is None
    prof = r["profile"]
    assert prof["steps"] == 2 and prof["source"].startswith("host")
    assert prof["top_ops"] and prof["busy_ms_per_step"] > 0
    assert "iai_120: top ops" in text


def _trace(path: Path, events: list) -> None:
    import gzip

    folder = path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_trace_summary_reads_the_device_op_line_only(tmp_path: Path):
    from benchmarks import trace_summary

    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "XLA Modules"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 2, "args": {"name": "XLA Ops"}},
    ]
    ops = [  # two steps; times in microseconds
        {"ph": "X", "pid": 2, "tid": 2, "name": "convolution.1", "dur": 3000.0},
        {"ph": "X", "pid": 2, "tid": 2, "name": "fusion.7", "dur": 1000.0},
        {"ph": "X", "pid": 2, "tid": 2, "name": "convolution.1", "dur": 3000.0},
        {"ph": "X", "pid": 2, "tid": 2, "name": "fusion.7", "dur": 1000.0},
        {"ph": "X", "pid": 2, "tid": 1, "name": "jit_step", "dur": 8000.0},  # the module again
        {"ph": "X", "pid": 1, "tid": 9, "name": "PjitFunction(step)", "dur": 9000.0},
    ]
    _trace(tmp_path, meta + ops)
    got = trace_summary.summarise(str(tmp_path), steps=2)
    assert got["source"] == "device XLA Ops"
    assert got["busy_ms_per_step"] == pytest.approx(4.0)
    assert [(o["name"], o["ms_per_step"], o["share"]) for o in got["top_ops"]] == [
        ("convolution.1", pytest.approx(3.0), pytest.approx(0.75)),
        ("fusion.7", pytest.approx(1.0), pytest.approx(0.25))]


def test_trace_summary_names_a_folder_without_trace(tmp_path: Path):
    from benchmarks import trace_summary

    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        trace_summary.summarise(str(tmp_path), steps=1)


def test_anchor_is_imported_by_path(tmp_path: Path):
    stub = tmp_path / "stub_anchor.py"
    stub.write_text("def run(bs, img, dtype, iters=20):\n"
                    "    return {'bs': bs, 'img': img, 'dtype': str(dtype), 'iters': iters,\n"
                    "            'samples_per_s': 100.0}\n")
    record = {"image": 120, "batch": 256, "dtype": "bfloat16", "samples_per_s": 250.0}
    result = train_step.run_anchor(str(stub), record, steps=5)
    assert (result["bs"], result["img"], result["iters"]) == (256, 120, 5)
    assert "bfloat16" in result["dtype"]
    assert result["ratio_samples_per_s"] == pytest.approx(2.5)
    assert "error" in train_step.run_anchor(str(stub), {**record, "image": 32}, steps=5)


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--anchor", "no_such_file.py"], "--anchor no_such_file.py is not a file"),
    (["--wheels", "."], "--wheels . holds no .whl file"),
])
def test_gpu_session_rejects_bad_arguments_before_doing_anything(tmp_path, args, message):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), *args],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
