# ruff: noqa: E501 - the HLO excerpt keeps the long lines of XLA's text format
"""mosaic_jax.training.aot: HLO collective parsing, the fits decision, the libtpu error (quick); a tiny
config compiled for v5e:2x2, the CLI and the TPU launcher's --aot_check (slow, with libtpu)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import pathlib
import subprocess
import sys
import types

import jax
import pytest
from conftest import hide_packages_source, tiny

from benchmarks import aot_sweep
from benchmarks.aot_sweep import aot_command, chips_of, largest_fitting
from mosaic_jax.training import aot

REPO = pathlib.Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed "
                                  "(pip install \"jax[tpu]==<jax version>\")")

# A small optimised-HLO excerpt in XLA's text format (layouts, metadata, async pairs, a loop).
HLO = """\
HloModule jit_per_device, entry_computation_layout={()->()}

%body.1 (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %x = f32[8,4]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %all-reduce.9 = f32[8,4]{1,0:T(8,128)} all-reduce(%x), channel_id=9, replica_groups={{0,1,2,3}}, to_apply=%add, metadata={op_name="jit(per_device)/shard_map/jvp()/psum"}
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %all-reduce.9)
}

ENTRY %main.1 (a: bf16[4,8]) -> f32[] {
  %all-gather.1 = bf16[16,8]{1,0:T(8,128)(2,1)} all-gather(%a), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}, metadata={op_name="jit(per_device)/shard_map/jvp()/all_gather" stack_frame_id=3}
  %all-gather-start.2 = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%a), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}, metadata={op_name="jit(per_device)/shard_map/jvp()/all_gather"}
  %all-gather-done.2 = bf16[16,8]{1,0} all-gather-done(%all-gather-start.2)
  %all-reduce.3 = (f32[2,64]{1,0:T(2,128)S(1)}, f32[2,64]{1,0:T(2,128)S(1)}) all-reduce(%s, %t), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add, metadata={op_name="jit(per_device)/shard_map/jvp(TwoTower)/enc_s1/layer1_0/downsample_bn/psum_invariant"}
  %all-reduce.4 = (f32[7,7,2,64]{3,2,1,0}, f32[64]{0}, /*index=2*/f32[1,1,1,64]{3,2,1,0}) all-reduce(%g1, %g2, %g3), channel_id=4, replica_groups={{0,1,2,3}}, to_apply=%add, metadata={op_name="jit(per_device)/shard_map/transpose(jvp(TwoTower))/classifier/psum_invariant"}
  %all-reduce-start.5 = f32[1000]{0} all-reduce-start(%g4), channel_id=5, replica_groups=[1,4]<=[4], to_apply=%add, metadata={op_name="jit(per_device)/shard_map/transpose(jvp(TwoTower))/enc_s2/conv1/psum_invariant"}
  %all-reduce-done.5 = f32[1000]{0} all-reduce-done(%all-reduce-start.5)
  %reduce-scatter.6 = f32[4,8]{1,0} reduce-scatter(%c), channel_id=6, replica_groups={{0,1},{2,3}}, dimensions={0}, metadata={op_name="jit(per_device)/shard_map/transpose(jvp())/all_gather"}
  %all-reduce.7 = u32[1,1,128]{2,1,0} all-reduce(%r), channel_id=7, replica_groups={{0,1,2,3}}, to_apply=%add
  %w = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %out = f32[] constant(0)
}
"""


def test_shape_bytes():
    assert aot.shape_bytes("f32[2,3]{1,0:T(8,128)}") == 24
    assert aot.shape_bytes("(f32[2,3]{1,0}, bf16[4]{0}, /*index=2*/pred[])") == 24 + 8 + 1
    assert aot.shape_bytes("s32[]") == 4


def test_parse_collectives_kinds_purposes_bytes():
    rows = {(r["kind"], r["purpose"]): (r["count"], r["bytes"])
            for r in aot.parse_collectives(HLO)}
    # Two all-gathers of bf16[16,8] (one sync, one async pair counted once at -start).
    assert rows[("all-gather", aot.LOSS_GATHER)] == (2, 2 * 16 * 8 * 2)
    # BatchNorm: one combined all-reduce of two f32[2,64].
    assert rows[("all-reduce", aot.BATCHNORM)] == (1, 2 * 2 * 64 * 4)
    # Gradients: the combined tuple plus the async all-reduce of f32[1000].
    assert rows[("all-reduce", aot.GRADIENTS)] == (2, (7 * 7 * 2 * 64 + 64 + 64 + 1000) * 4)
    # Reduce-scatter: input = output f32[4,8] x group size 2.
    assert rows[("reduce-scatter", aot.LOSS_GATHER)] == (1, 4 * 8 * 4 * 2)
    # Other: the u32 all-reduce once, the loop's f32[8,4] all-reduce 5 times.
    assert rows[("all-reduce", aot.OTHER)] == (1 + 5, 128 * 4 + 5 * 8 * 4 * 4)
    assert len(rows) == 5


def test_classify_collective():
    assert aot.classify_collective("all-reduce", "a/transpose(jvp(M))/enc/bn1/psum") == \
        aot.BATCHNORM
    assert aot.classify_collective("all-reduce", "a/jvp(M)/enc/layer2_0/downsample_bn/psum") \
        == aot.BATCHNORM
    assert aot.classify_collective("all-reduce", "a/transpose(jvp(M))/enc/conv1/psum") == \
        aot.GRADIENTS
    assert aot.classify_collective("all-reduce", "a/jvp()/psum") == aot.OTHER
    assert aot.classify_collective("all-gather", "") == aot.LOSS_GATHER


def test_memory_report_and_fits():
    stats = types.SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=90,
                                  alias_size_in_bytes=80, temp_size_in_bytes=1000,
                                  generated_code_size_in_bytes=10)
    mem = aot.memory_report(stats)
    assert mem["total"] == 100 + 90 - 80 + 1000 + 10
    assert aot.fits(mem["total"], 1120) is True
    assert aot.fits(mem["total"], 1119) is False
    assert aot.fits(mem["total"], None) is None
    assert aot.hbm_bytes("TPU v5 lite") == 16 * 1024**3
    assert aot.hbm_bytes("TPU v5") == 95 * 1024**3
    assert aot.hbm_bytes("Some future chip") is None


def test_a_program_xla_refuses_for_memory_does_not_fit_and_other_errors_propagate():
    class Lowered:
        def __init__(self, message):
            self.message = message

        def compile(self):
            raise RuntimeError(self.message)

    report = aot._program_report(Lowered("RESOURCE_EXHAUSTED: Ran out of memory in memory "
                                         "space hbm. Used 20.1G of 15.75G hbm."), 16 * 1024**3)
    assert report["fits"] is False and report["memory_bytes"] is None
    assert report["compile_error"].startswith("RESOURCE_EXHAUSTED: Ran out of memory")
    with pytest.raises(RuntimeError, match="INTERNAL: something else"):
        aot._program_report(Lowered("INTERNAL: something else"), 16 * 1024**3)


def test_missing_libtpu_error_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(aot.LibtpuMissingError) as e:
        aot.require_libtpu()
    message = str(e.value)
    assert "\n" not in message
    assert f'pip install "jax[tpu]=={jax.__version__}"' in message


def test_bad_topology_name_is_named():
    with pytest.raises(ValueError, match="--topology 'v5e-8'"):
        aot.topology_devices("v5e-8")


def test_largest_fitting_doubles_then_bisects():
    tried = []

    def fits_at(b):
        tried.append(b)
        return b <= 300

    assert largest_fitting(fits_at, 64, 32, 2048) == (288, 320)
    assert tried == [64, 128, 256, 512, 384, 320, 288]
    assert largest_fitting(lambda b: True, 64, 32, 256) == (256, None)
    assert largest_fitting(lambda b: b <= 40, 64, 16, 2048) == (32, 48)


def test_sweep_command_is_weak_scaling():
    argv = aot_command("iai_256", "v5e:4x4", 64, chips_of("v5e:4x4"), output="r.json")
    assert chips_of("v5e:4x4") == 16 and chips_of("v4:2x2x2") == 8
    assert argv[1:4] == ["-m", "mosaic_jax", "aot"]
    assert "--config.batch_size=1024" in argv and "--config.augment.out_size=256" in argv
    assert "--config.model.dtype=bfloat16" in argv and "--topology=v5e:4x4" in argv
    # The sweep (no jax) names the purposes as mosaic_jax.training.aot does.
    assert (aot_sweep.LOSS_GATHER, aot_sweep.GRADIENTS, aot_sweep.BATCHNORM) == \
        (aot.LOSS_GATHER, aot.GRADIENTS, aot.BATCHNORM)


def test_sweep_keeps_results_and_compiles_a_timed_out_row_again(tmp_path, monkeypatch):
    key = {"topology": "v5e:2x2", "per_chip_batch": 64, "remat": False, "loss_block_size": 0}
    output = tmp_path / "sweep.json"
    output.write_text(json.dumps({"rows": [
        {"workload": "iai_120", **key, "status": "fits", "wall_s": 10},
        {"workload": "iai_256", **key, "status": "timeout", "wall_s": 3600}]}))
    calls = []

    real_run = subprocess.run

    def fake_run(argv, **kwargs):  # a compile that fails before writing its report
        if argv[1:4] != ["-m", "mosaic_jax", "aot"]:
            return real_run(argv, **kwargs)  # machine_info's uname and git
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1, "", "RuntimeError: boom\n")

    monkeypatch.setattr(aot_sweep.subprocess, "run", fake_run)
    sweep = aot_sweep.Sweep(output, quick=True, timeout=5)
    assert sweep.row("iai_120", "v5e:2x2", 64, part="weak")["status"] == "fits"
    assert not calls  # a row with a result is not compiled again
    again = sweep.row("iai_256", "v5e:2x2", 64, part="weak")
    assert len(calls) == 1 and again["status"] == "error" and "boom" in again["error"]
    rows = json.loads(output.read_text())["rows"]
    assert [(r["workload"], r["status"]) for r in rows] == [("iai_120", "fits"),
                                                           ("iai_256", "error")]


# ----------------------------------------------------------------------------- with libtpu


def _tiny_config():
    config = tiny(importlib.import_module("configs.mosaic1").get_config())
    config.model.dtype = "bfloat16"
    return config


@pytest.mark.slow
@needs_libtpu
def test_compile_tiny_config_for_v5e_2x2():
    config = _tiny_config()
    report = aot.compile_for_topology(config, "v5e:2x2")
    assert (report["chips"], report["device_kind"]) == (4, "TPU v5 lite")
    assert (report["global_batch"], report["per_chip_batch"]) == (16, 4)
    assert report["hbm_bytes_per_chip"] == 16 * 1024**3
    assert report["fits"] is True
    train_step = report["train_step"]
    mem = train_step["memory_bytes"]
    # The replicated state is an argument of the step: every parameter is on every chip.
    state = jax.eval_shape(lambda: aot.train.init_state(
        config, aot.models.create_model(config), aot.train.create_optimizer(config)))
    state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert mem["arguments"] >= state_bytes
    assert train_step["flops_per_chip"] > 0
    rows = {(c["kind"], c["purpose"]): c for c in train_step["collectives"]}
    assert rows[("all-gather", aot.LOSS_GATHER)]["count"] >= 1
    # Every parameter's gradient is all-reduced once per step (BatchNorm sums ride along); in
    # bf16 compute XLA may reduce the bf16 cotangents before their cast, so >= 2 bytes each.
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    all_reduce = sum(c["bytes"] for c in train_step["collectives"] if c["kind"] == "all-reduce")
    assert all_reduce >= 2 * num_params
    assert report["eval_step"]["fits"] is True
    assert "train_step" in aot.format_report(report)


TINY_OVERRIDES = ["--config.batch_size=16", "--config.eval_batch_size=16",
                  "--config.augment.out_size=16", "--config.model.width_multiplier=0.03125",
                  "--config.model.proj_hidden_dim=16", "--config.model.proj_dim=8"]


@pytest.mark.slow
@needs_libtpu
def test_cli_writes_json_and_rejects_indivisible_batch(tmp_path):
    out = tmp_path / "aot.json"
    run = subprocess.run([sys.executable, "-m", "mosaic_jax", "aot",
                          "--config=configs/mosaic1.py", "--topology=v5e:2x2", "--noeval_step",
                          f"--output={out}", *TINY_OVERRIDES], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["fits"] is True and report["chips"] == 4 and "eval_step" not in report
    assert "| train_step" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "mosaic_jax", "aot",
                          "--config=configs/mosaic1.py", "--topology=v5e:2x2",
                          *TINY_OVERRIDES, "--config.batch_size=18"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "config key 'batch_size': 18 is not divisible by the 4 devices" in bad.stderr


def _hide_libtpu(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(hide_packages_source(("libtpu",)))
    return {**__import__("os").environ, "PYTHONPATH": f"{site}:{REPO}"}


@pytest.mark.slow
def test_cli_without_libtpu_fails_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mosaic_jax", "aot", "--config=configs/mosaic1.py",
                          "--topology=v5e:2x2"], cwd=REPO, capture_output=True, text=True,
                         env=_hide_libtpu(tmp_path), timeout=300)
    assert run.returncode == 1
    [line] = [x for x in run.stderr.splitlines() if x.startswith("error:")]
    assert f'pip install "jax[tpu]=={jax.__version__}"' in line


TPU_ARGS = ["-m", "launch.tpu_pod", "--name=mosaic-v5e", "--zone=us-west4-a",
            "--accelerator_type=v5litepod-4", "--workdir=gs://bucket/runs/m1", "--dry-run"]


@pytest.mark.slow
@needs_libtpu
def test_tpu_launcher_aot_check_then_dry_run():
    run = subprocess.run([sys.executable, *TPU_ARGS, "--aot_check=v5e:2x2",
                          *(f"--override={o.removeprefix('--config.')}" for o in TINY_OVERRIDES)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "-m mosaic_jax aot" in run.stderr and "| train_step" in run.stderr
    assert run.stdout.splitlines()[0].startswith("gcloud compute tpus tpu-vm create")


@pytest.mark.slow
def test_tpu_launcher_stops_when_the_aot_check_fails(tmp_path):
    run = subprocess.run([sys.executable, *TPU_ARGS, "--aot_check=v5e:2x2"], cwd=REPO,
                         capture_output=True, text=True, env=_hide_libtpu(tmp_path),
                         timeout=300)
    assert run.returncode == 1
    assert run.stdout == ""  # nothing printed to run, nothing started
    assert "error: the ahead-of-time check failed (exit status 1)" in run.stderr


def test_tpu_launcher_rejects_a_bad_topology():
    run = subprocess.run([sys.executable, *TPU_ARGS, "--aot_check=v5litepod-4"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "expected a TPU topology" in run.stderr
