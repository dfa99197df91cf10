"""Label-efficiency curves and the label sweep; the report's retrieval table."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from launch import label_sweep
from mosaic_jax.evaluation import label_efficiency, report, retrieval

REPO = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(objective, train_fraction=1.0, label_fraction=1.0, **extra):
    return {"objective": objective, "init_from": "", "train_mode": "full",
            "data": {"name": "bigearthnet_v2", "train_fraction": train_fraction,
                     "label_fraction": label_fraction}, **extra}


def _workdir(root, name, config, macro_ap, micro_ap):
    """A workdir with config.json and a metrics_validation.json of 3 classes."""
    workdir = root / name
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(config))
    metrics = {"macro_ap": macro_ap, "micro_ap": micro_ap, "macro_f1": 0.1, "micro_f1": 0.2,
               "hamming_loss_per_class": [0.1] * 19, "brier_per_class": [0.2] * 19,
               "ap_per_class": [macro_ap] * 19, "step": 5, "num_samples": 30}
    (workdir / "metrics_validation.json").write_text(json.dumps(metrics))
    return str(workdir)


def test_runs_are_placed_by_the_labels_they_used(tmp_path):
    row = label_efficiency.run_point(_config("mosaic1", 0.1, 0.5), {"macro_ap": 0.3},
                                     dataset="d", workdir="w")
    assert row["line"] == "mosaic1" and row["protocol"] == "pretraining"
    assert row["labelled_fraction"] == pytest.approx(0.05) and row["micro_ap"] is None
    probe = _config("supervised", 0.1, 0.2, init_from="runs/simclr_run",
                    train_mode="linear_probe")
    row = label_efficiency.run_point(probe, {}, dataset="d", workdir="w",
                                     pretraining={"objective": "simclr"})
    assert (row["line"], row["objective"]) == ("simclr, linear probe", "simclr")
    assert row["labelled_fraction"] == pytest.approx(0.02)
    row = label_efficiency.run_point(_config("supervised", init_from="runs/x/"), {},
                                     dataset="d", workdir="w")
    assert row["line"] == "x, fine-tune"


def test_report_draws_one_line_per_objective_when_fractions_differ(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    workdirs, expected = [], {}
    for objective, base in (("mosaic1", 0.5), ("supervised", 0.3)):
        for f in (0.1, 0.3, 1.0):
            ap = base + 0.2 * f
            workdirs.append(_workdir(runs, f"{objective}_{f}", _config(objective, 1.0, f),
                                     ap, ap + 0.05))
            expected[objective, f] = ap
    # A second supervised run at 0.3: the line shows the mean of the two.
    workdirs.append(_workdir(runs, "supervised_0.3_b", _config("supervised", 1.0, 0.3), 0.9,
                             0.9))
    pretrain = _workdir(runs, "simclr", _config("simclr", 1.0, 1.0), 0.1, 0.1)
    probe = _config("supervised", 0.5, 1.0, init_from=pretrain, train_mode="linear_probe")
    workdirs.append(_workdir(runs, "probe", probe, 0.4, 0.45))
    out = tmp_path / "report"
    report.write_report(workdirs, str(out))
    with open(out / label_efficiency.CSV_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    by_line = {}
    for r in rows:
        by_line.setdefault(r["line"], []).append(float(r["labelled_fraction"]))
    assert by_line == {"mosaic1": [0.1, 0.3, 1.0], "supervised": [0.1, 0.3, 0.3, 1.0],
                       "simclr, linear probe": [0.5]}
    row = next(r for r in rows if r["workdir"].endswith("mosaic1_0.3"))
    assert float(row["macro_ap"]) == expected["mosaic1", 0.3]
    assert float(row["micro_ap"]) == pytest.approx(expected["mosaic1", 0.3] + 0.05)
    lines = label_efficiency.lines(label_efficiency.curve_rows(report.load_run(w)
                                                               for w in workdirs), "macro_ap")
    key = ("supervised", "bigearthnet_v2")
    assert lines[key][1] == (0.3, pytest.approx((expected["supervised", 0.3] + 0.9) / 2))
    assert (out / label_efficiency.PNG_FILE).read_bytes().startswith(PNG_MAGIC)
    assert "## Label efficiency" in (out / "report.md").read_text()
    # Runs at one fraction: no curve.
    out2 = tmp_path / "report2"
    report.write_report(workdirs[:1] + workdirs[3:4], str(out2))
    assert not (out2 / label_efficiency.CSV_FILE).exists()
    assert "Label efficiency" not in (out2 / "report.md").read_text()


def test_report_shows_the_retrieval_results_of_workdirs_that_have_them(tmp_path):
    rng = np.random.default_rng(0)
    data = {"embedding": rng.normal(size=(40, 6)), "h_s1": rng.normal(size=(40, 3)),
            "labels": rng.random((40, 19)) < 0.2, "index": np.arange(40)}
    result = retrieval.evaluate(data, data, modes=["fused", "s1"], ks=[5, 10],
                                exclude_self=True)
    with_results = _workdir(tmp_path, "a", _config("mosaic1"), 0.5, 0.5)
    retrieval.write_results(result, os.path.join(with_results, "retrieval"))
    without = _workdir(tmp_path, "b", _config("supervised"), 0.4, 0.4)
    out = tmp_path / "report"
    report.write_report([with_results, without], str(out))
    with open(out / "retrieval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["mode"]) for r in rows] == [("mosaic1", "fused"), ("mosaic1", "s1")]
    for r in rows:
        for key, value in result["modes"][r["mode"]]["overall"].items():
            assert float(r[key]) == value
    assert "## Retrieval" in (out / "report.md").read_text()
    report.write_report([without], str(tmp_path / "report2"))
    assert not (tmp_path / "report2" / "retrieval.csv").exists()


def test_sweep_dry_run_lists_one_run_per_fraction(capsys):
    assert label_sweep.main(["--config=configs/mosaic1.py:demo", "--root=runs/sw",
                             "--fractions", "0.05", "1", "--override", "num_train_steps=60",
                             "--data_dir", "/d", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    h = label_sweep.settings_hash("configs/mosaic1.py:demo", "/d",
                                  ["--config.num_train_steps=60"])
    assert lines == [
        "python -m mosaic_jax.main --config=configs/mosaic1.py:demo "
        f"--workdir=runs/sw/mosaic1_label0.05_{h} --config.data.data_dir=/d "
        "--config.num_train_steps=60 --config.data.label_fraction=0.05",
        "python -m mosaic_jax.main --config=configs/mosaic1.py:demo "
        f"--workdir=runs/sw/mosaic1_label1.0_{h} --config.data.data_dir=/d "
        "--config.num_train_steps=60 --config.data.label_fraction=1.0"]
    label_sweep.main(["--config=c/supervised.py", "--root=r", "--key=train_fraction",
                      "--fractions", "0.5", "--name=sup", "--dry-run"])
    h = label_sweep.settings_hash("c/supervised.py", None, [])
    assert capsys.readouterr().out.split() == [
        "python", "-m", "mosaic_jax.main", "--config=c/supervised.py",
        f"--workdir=r/sup_train0.5_{h}", "--config.data.train_fraction=0.5"]


def _workdirs(argv):
    args = label_sweep.build_parser().parse_args(argv)
    return [w for w, _ in label_sweep.sweep_commands(
        args.config, args.root, args.fractions, key=args.key, name="n",
        data_dir=args.data_dir, overrides=args.override)]


def test_sweep_workdirs_of_distinct_settings_never_collide():
    base = ["--config=configs/mosaic1.py:demo", "--root=r"]
    # Fractions that print alike with few digits.
    close = _workdirs([*base, "--fractions", "0.1234567", "0.1234568"])
    assert len(set(close)) == 2 and "0.1234567_" in close[0] and "0.1234568_" in close[1]
    one = _workdirs([*base, "--fractions", "0.5"])
    # Other overrides, another config argument, another data_dir: other workdirs.
    assert one != _workdirs([*base, "--fractions", "0.5", "--override", "num_train_steps=7"])
    assert one != _workdirs(["--config=configs/mosaic1.py", "--root=r", "--fractions", "0.5"])
    assert one != _workdirs([*base, "--fractions", "0.5", "--data_dir", "/x"])
    # The override order does not matter.
    assert _workdirs([*base, "--fractions", "0.5", "--override", "seed=1", "--override",
                      "batch_size=8"]) == _workdirs([*base, "--fractions", "0.5", "--override",
                                                     "batch_size=8", "--override", "seed=1"])


def _config_json(flags):
    """config.json of a run of these --config flags (launch/resolved_config.py, as the sweep
    runs it)."""
    return json.dumps(label_sweep.expected_config(["python", "-m", "mosaic_jax.main", *flags]))


def _finished_run(argv, config_json):
    """The sweep's first workdir, holding `config_json` and a metrics file."""
    args = label_sweep.build_parser().parse_args(argv)
    workdir, _ = label_sweep.sweep_commands(
        args.config, args.root, args.fractions, key=args.key,
        name=label_sweep.config_name(args.config), data_dir=args.data_dir,
        overrides=args.override)[0]
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_json)
    with open(os.path.join(workdir, "metrics_validation.json"), "w") as f:
        f.write("{}")
    return workdir


@pytest.mark.parametrize("value", ["0", "1.5", "abc"])
def test_sweep_refuses_fractions_outside_0_1(value, capsys):
    with pytest.raises(SystemExit):
        label_sweep.main(["--config=c.py", "--root=r", "--dry-run", "--fractions", value])
    assert f"{value!r}: a fraction must be a number in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--fractions", "0.1", "0.1"], "repeats a value"),
    (["--override", "data.label_fraction=0.2"], "data.label_fraction is what the sweep sets"),
])
def test_sweep_bad_arguments_fail_clearly(args, message, capsys):
    assert label_sweep.main(["--config=c.py", "--root=r", "--dry-run", *args]) == 2
    assert message in capsys.readouterr().err


def test_sweep_skips_finished_runs_of_its_own_config(tmp_path, capsys):
    argv = ["--config=configs/mosaic1.py:demo", f"--root={tmp_path}", "--fractions", "0.5",
            "--override", "num_train_steps=7"]
    own = _config_json(["--config=configs/mosaic1.py:demo", "--config.num_train_steps=7",
                        "--config.data.label_fraction=0.5"])
    _finished_run(argv, own)
    assert label_sweep.main(argv) == 0
    assert "has finished already; skipped" in capsys.readouterr().out


def test_sweep_refuses_a_run_of_other_settings_under_its_name(tmp_path, capsys):
    argv = ["--config=configs/mosaic1.py:demo", f"--root={tmp_path}", "--fractions", "0.5"]
    other = _config_json(["--config=configs/supervised.py:demo",
                          "--config.data.label_fraction=0.25"])
    workdir = _finished_run(argv, other)
    assert label_sweep.main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: {workdir} holds a run of other settings than this sweep's (" in err
    assert "objective: 'supervised' there, 'mosaic1' here" in err
    assert "data.label_fraction: 0.25 there, 0.5 here" in err
    assert "move it away or choose another --root" in err


@pytest.mark.slow
def test_sweep_of_two_objectives_gives_two_curves(prepared_fake, tmp_path):
    """Three fractions for mosaic1 and the supervised baseline, tiny runs, then the report."""
    tiny = ["data.demo=False", "num_train_steps=2", "log_every_steps=1", "tsne_points=0",
            "checkpoint_every_steps=2", "batch_size=16", "eval_batch_size=16",
            "augment.out_size=16", "model.width_multiplier=0.03125",
            "model.proj_hidden_dim=16", "model.proj_dim=8"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    root = tmp_path / "sweep"
    for config in ("configs/mosaic1.py:demo", "configs/supervised.py:demo"):
        args = [sys.executable, "-m", "launch.label_sweep", f"--config={config}",
                f"--root={root}", "--data_dir", prepared_fake, "--fractions", "0.25", "0.5",
                "1.0", *(x for o in tiny for x in ("--override", o))]
        result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
    workdirs = sorted(str(p) for p in root.iterdir())
    assert len(workdirs) == 6
    out = tmp_path / "report"
    report.main(["--workdirs", *workdirs, "--output", str(out)])
    with open(out / label_efficiency.CSV_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["line"], float(r["labelled_fraction"])) for r in rows) == [
        (line, f) for line in ("mosaic1", "supervised") for f in (0.25, 0.5, 1.0)]
    for r in rows:
        with open(os.path.join(r["workdir"], "metrics_validation.json")) as f:
            metrics = json.load(f)
        assert float(r["macro_ap"]) == metrics["macro_ap"]
        assert float(r["micro_ap"]) == metrics["micro_ap"]
    assert (out / label_efficiency.PNG_FILE).read_bytes().startswith(PNG_MAGIC)


def test_resolved_config_is_what_training_writes(tmp_path):
    """Overrides applied; with init_from, the model section of the pretraining run (as
    training's adopt_pretrained_model does)."""
    from launch import resolved_config

    plain = json.loads(resolved_config.resolved_config_json(
        ["--config=configs/mosaic1.py:demo", "--config.num_train_steps=7",
         "--config.model.width_multiplier=0.5"]))
    assert plain["objective"] == "mosaic1" and plain["num_train_steps"] == 7
    assert plain["model"]["width_multiplier"] == 0.5
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "config.json").write_text(json.dumps(plain))
    probe = json.loads(resolved_config.resolved_config_json(
        ["--config=configs/linear_probe.py:demo", f"--config.init_from={pre}"]))
    assert probe["model"] == plain["model"] and probe["init_from"] == str(pre)


def test_the_curve_has_the_label_frequency_ap_as_its_reference_line(tmp_path):
    rows = []
    for f, ap in ((0.1, 0.4), (1.0, 0.6)):
        metrics = {"macro_ap": ap, "micro_ap": ap + 0.1, "label_frequency_macro_ap": 0.11,
                   "positives_per_class": [3, 1, 0, 2], "num_samples": 10}
        rows.append(label_efficiency.run_point(_config("mosaic1", 1.0, f), metrics,
                                               dataset="d", workdir=f"w{f}"))
    # Micro: 6 positive (patch, class) pairs of 40.
    assert rows[0]["label_frequency_micro_ap"] == pytest.approx(6 / 40)
    assert rows[0]["label_frequency_macro_ap"] == 0.11
    assert label_efficiency.chance_levels(rows, "macro_ap") == {"d": 0.11}
    fig = label_efficiency.curve_figure(rows, "t")
    for ax, level in zip(fig.axes, (0.11, 6 / 40), strict=True):
        refs = [line for line in ax.get_lines()
                if line.get_label().startswith("label frequencies")]
        assert len(refs) == 1 and refs[0].get_ydata()[0] == pytest.approx(level)
        assert ax.get_ylim()[0] == 0.0  # not zoomed to the data
    header = label_efficiency.to_csv(rows).splitlines()[0].split(",")
    assert "label_frequency_macro_ap" in header and "label_frequency_micro_ap" in header


def test_sweep_with_a_config_that_cannot_be_built_says_why(tmp_path, capsys):
    argv = ["--config=configs/mosaic1.py:demo", f"--root={tmp_path}", "--fractions", "0.5",
            "--override", "no_such_key=1"]
    _finished_run(argv, json.dumps({"objective": "mosaic1"}))
    assert label_sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot build the config of python -m mosaic_jax.main ")
    assert "no_such_key" in err.splitlines()[-1] and "['" not in err
