"""The results report: tables equal to the runs' JSON, charts, t-SNE copies, clear errors."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from mosaic_jax.evaluation import report
from mosaic_jax.evaluation.metrics import multilabel_metrics
from mosaic_jax.training import configuration

pytestmark = pytest.mark.slow  # the integration tier: whole-program runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(root, name, base_config, *, objective, dataset, num_classes, seed, tsne=False):
    """A workdir with config.json and metrics_validation.json (and a t-SNE PNG) only."""
    workdir = root / name
    workdir.mkdir()
    config = json.loads(json.dumps(base_config))
    config["objective"] = objective
    config["data"]["name"] = dataset
    config["data"]["num_classes"] = num_classes
    (workdir / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    labels = rng.random((30, num_classes)) < 0.3
    labels[:, 1] = False  # a class without positives: AP undefined
    probs = np.clip(0.5 * labels + 0.6 * rng.random(labels.shape), 0, 1)
    metrics = {"step": 10 + seed, "split": "validation", **multilabel_metrics(probs, labels)}
    (workdir / "metrics_validation.json").write_text(json.dumps(metrics))
    if tsne:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(1, 1))
        FigureCanvasAgg(fig)
        fig.savefig(workdir / "tsne_validation.png", format="png")
    return str(workdir)


@pytest.fixture(scope="module")
def runs(trained_workdir, tmp_path_factory):
    trained = trained_workdir[0]
    with open(os.path.join(trained, "config.json")) as f:
        base = json.load(f)
    root = tmp_path_factory.mktemp("report_runs")
    return [
        trained,
        _fake_run(root, "sup", base, objective="supervised", dataset="bigearthnet_v2",
                  num_classes=19, seed=1, tsne=True),
        _fake_run(root, "m1_sen", base, objective="mosaic1", dataset="sen12ms",
                  num_classes=10, seed=2, tsne=True),
        _fake_run(root, "m1_again", base, objective="mosaic1", dataset="bigearthnet_v2",
                  num_classes=19, seed=3),
    ]


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    report.main(["--workdirs", *runs, "--output", str(out)])
    return str(out)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics_validation.json")) as f:
        return json.load(f)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _md_rows(path, first_cell):
    """Cells of the markdown table rows whose first cell is `first_cell` (bold removed)."""
    rows = []
    with open(path) as f:
        for line in f:
            cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
            if line.startswith("|") and cells[0] == first_cell:
                rows.append(cells)
    return rows


def _fmt(v):
    return "n/a" if v is None else f"{v:.4f}"


def test_methods_are_named_by_objective_and_made_unique(written, runs):
    rows = _csv(os.path.join(written, "comparison.csv"))
    trained_name = os.path.basename(runs[0])
    assert [(r["method"], r["dataset"]) for r in rows] == [
        (f"mosaic1 ({trained_name})", "bigearthnet_v2"), ("supervised", "bigearthnet_v2"),
        ("mosaic1", "sen12ms"), ("mosaic1 (m1_again)", "bigearthnet_v2")]
    assert [r["workdir"] for r in rows] == runs


def test_comparison_tables_match_the_runs_json(written, runs):
    rows = _csv(os.path.join(written, "comparison.csv"))
    keys = ("macro_ap", "micro_ap", "macro_f1", "micro_f1")
    for row, workdir in zip(rows, runs, strict=True):
        m = _metrics(workdir)
        for key in (*keys, "label_frequency_macro_ap"):
            assert float(row[key]) == m[key], (workdir, key)
        assert int(row["step"]) == m["step"] and int(row["samples"]) == m["num_samples"]
        md = _md_rows(os.path.join(written, "comparison.md"), row["method"])
        md = [r for r in md if r[1] == row["dataset"]]
        assert len(md) == 1
        assert md[0][3:7] == [_fmt(m[k]) for k in keys], workdir
    # The best value of each dataset is bold (three BigEarthNet runs).
    text = open(os.path.join(written, "comparison.md")).read()
    ben = [r for r, w in zip(rows, runs, strict=True) if r["dataset"] == "bigearthnet_v2"]
    best = max(ben, key=lambda r: float(r["macro_ap"]))
    assert f"**{_fmt(float(best['macro_ap']))}**" in text


@pytest.mark.parametrize("short, key", [("hamming_loss", "hamming_loss_per_class"),
                                        ("brier", "brier_per_class"), ("ap", "ap_per_class")])
def test_per_class_tables_match_the_runs_json(written, runs, short, key):
    methods = [r["method"] for r in _csv(os.path.join(written, "comparison.csv"))]
    for dataset, idx in (("bigearthnet_v2", (0, 1, 3)), ("sen12ms", (2,))):
        rows = _csv(os.path.join(written, f"{short}_per_class_{dataset}.csv"))
        num_classes = 19 if dataset == "bigearthnet_v2" else 10
        assert len(rows) == num_classes
        assert list(rows[0]) == ["class", "positives", *(methods[i] for i in idx)]
        for i in idx:
            values = _metrics(runs[i])[key]
            got = [None if r[methods[i]] == "" else float(r[methods[i]]) for r in rows]
            assert got == values, (dataset, methods[i])
        # The positives of every class in the evaluated split, one count per distinct value.
        for c, row in enumerate(rows):
            counts = list(dict.fromkeys(_metrics(runs[i])["positives_per_class"][c]
                                        for i in idx))
            assert row["positives"] == " / ".join(map(str, counts)), (dataset, c)
        md_path = os.path.join(written, f"{short}_per_class.md")
        for c, row in enumerate(rows):
            md = _md_rows(md_path, row["class"])
            assert any(cells[1:] == [row["positives"],
                                     *(_fmt(_metrics(runs[i])[key][c]) for i in idx)]
                       for cells in md), (dataset, row["class"])
    sen = _csv(os.path.join(written, f"{short}_per_class_sen12ms.csv"))
    assert sen[0]["class"] == "Forest"
    ben = _csv(os.path.join(written, f"{short}_per_class_bigearthnet_v2.csv"))
    assert ben[0]["class"] == "Urban fabric"


def test_charts_and_tsne_pictures(written, runs):
    for dataset in ("bigearthnet_v2", "sen12ms"):
        with open(os.path.join(written, f"ap_per_class_{dataset}.png"), "rb") as f:
            assert f.read(8) == PNG_MAGIC
    copies = sorted(os.listdir(os.path.join(written, "tsne")))
    assert copies == ["mosaic1_sen12ms.png", "supervised_bigearthnet_v2.png"]
    with open(os.path.join(runs[1], "tsne_validation.png"), "rb") as f:
        original = f.read()
    with open(os.path.join(written, "tsne", "supervised_bigearthnet_v2.png"), "rb") as f:
        assert f.read() == original
    page = open(os.path.join(written, "report.md")).read()
    assert "![t-SNE supervised](tsne/supervised_bigearthnet_v2.png)" in page
    assert f"(no tsne_validation.png in {runs[0]})" in page
    assert "![AP per class, sen12ms](ap_per_class_sen12ms.png)" in page
    assert not [n for n in os.listdir(written) if n.startswith(".")]  # no temp file left


def test_a_workdir_without_metrics_is_named(runs, tmp_path, capsys):
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(os.path.join(runs[1], "config.json"), untrained / "config.json")
    with pytest.raises(FileNotFoundError, match=f"workdir '{untrained}' has no "
                                                "metrics_validation.json"):
        report.write_report([runs[1], str(untrained)], str(tmp_path / "rep"))
    with pytest.raises(SystemExit) as e:
        report.main(["--workdirs", runs[1], "--output", str(tmp_path / "rep"), "--split",
                     "test"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and runs[1] in err and "split(s) validation" in err


def test_names_override_and_two_identical_names_are_refused(runs, tmp_path):
    result = report.write_report(runs[:2], str(tmp_path / "rep"), names=["A", "B"])
    assert [r.method for r in result["runs"]] == ["A", "B"]
    with pytest.raises(ValueError, match="both named"):
        report.write_report([runs[1], runs[1]], str(tmp_path / "rep2"))


def _demo_metrics(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random((30, 19)) < 0.3
    probs = np.clip(0.5 * labels + 0.6 * rng.random(labels.shape), 0, 1)
    return {"step": 10, "split": "validation", **multilabel_metrics(probs, labels)}


def _config_run_dir(root, name, objective, **config_keys):
    config = json.loads(configuration.base_config(objective).to_json())
    config.update(config_keys)
    workdir = root / name
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(config))
    (workdir / "metrics_validation.json").write_text(json.dumps(_demo_metrics(len(name))))
    return str(workdir)


def test_report_names_downstream_runs_and_marks_untrained_classifiers(tmp_path):
    pre = _config_run_dir(tmp_path, "demo", "mosaic1")
    probe = _config_run_dir(tmp_path, "demo_probe", "supervised", init_from=pre,
                            train_mode="linear_probe")
    tune = _config_run_dir(tmp_path, "demo_ft", "supervised", init_from=pre,
                           train_mode="full")
    simclr = _config_run_dir(tmp_path, "dual", "dual_simclr")
    result = report.write_report([pre, probe, tune, simclr], str(tmp_path / "out"))
    names = [r.method for r in result["runs"]]
    assert names == ["mosaic1", "mosaic1, linear probe", "mosaic1, fine-tune",
                     "dual_simclr (classifier untrained)"]
    md = (tmp_path / "out" / "comparison.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| dual_simclr"))
    assert row.count("untrained") == 5  # the name and the four AP / F1 columns
    assert "supervised" not in md
    with open(tmp_path / "out" / "comparison.csv") as f:
        trained = {r["method"]: r["classifier_trained"] for r in csv.DictReader(f)}
    assert trained["dual_simclr (classifier untrained)"] == "False"
    assert trained["mosaic1, linear probe"] == "True"



def test_ap_chart_labels_each_class_with_its_positives(runs):
    loaded = [report.load_run(w) for w in runs[1:2]]
    fig = report.ap_per_class_figure(loaded, "t")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    counts = _metrics(runs[1])["positives_per_class"]
    assert counts[1] == 0  # the fake run's class without positives
    assert labels[0] == f"Urban fabric (n={counts[0]})"
    assert labels[1].endswith(" (n=0)")
    old = dict(loaded[0].metrics)
    del old["positives_per_class"]  # metrics written before the counts existed
    loaded[0].metrics = old
    assert report.positives(loaded) == [None] * 19
    labels = [t.get_text() for t in report.ap_per_class_figure(loaded, "t").axes[0]
              .get_yticklabels()]
    assert labels[0] == "Urban fabric (n=?)"
