"""Label-efficiency curves: macro and micro AP against the fraction of training labels used.

A run's *labelled fraction* is ``data.train_fraction * data.label_fraction`` from its
``config.json``: the share of the training split whose labels the run read (the labelled
subsets are nested, see `mosaic_jax.data.input_pipeline`). Linear-probe and fine-tune runs are
placed by their own config, i.e. the labels the downstream training used, and drawn as lines
of their own, named as the report names runs ("mosaic1, linear probe": the pretraining run's
objective when its ``config.json`` is readable; `mosaic_jax.training.workdir.run_name`).

`curve_rows` (pure: run descriptions in, rows out) is what `mosaic_jax.evaluation.report`
calls through `report_files` when the given workdirs differ in labelled fraction; it then writes
``label_efficiency.csv`` (one row per run) and ``label_efficiency.png`` (one line per
objective and protocol, the mean of runs at the same fraction, log-scale x axis; a dashed
reference line at the AP a constant predictor of the label frequencies gets, the chance level
the training run prints at its end, and the y axis from 0).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from mosaic_jax.training import workdir as workdir_files

CSV_FILE = "label_efficiency.csv"
PNG_FILE = "label_efficiency.png"
COLUMNS = ("line", "objective", "protocol", "dataset", "labelled_fraction", "train_fraction",
           "label_fraction", "macro_ap", "micro_ap", "label_frequency_macro_ap",
           "label_frequency_micro_ap", "workdir")


def label_frequency_micro_ap(metrics: Mapping[str, Any]) -> float | None:
    """The micro AP of a constant predictor: the share of positive (patch, class) pairs in
    the evaluated split (None when the metrics lack ``positives_per_class``)."""
    positives, n = metrics.get("positives_per_class"), metrics.get("num_samples")
    if not positives or not n:
        return None
    return float(sum(positives)) / (float(n) * len(positives))


def run_point(config: Mapping[str, Any], metrics: Mapping[str, Any], *, dataset: str,
              workdir: str, pretraining: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One run's row: its line, labelled fraction and APs.

    ``config``: the run's ``config.json``; ``pretraining``: the ``config.json`` of its
    ``init_from`` run, when it has one and it is readable (names the line).
    """
    data = config.get("data", {})
    train_fraction = float(data.get("train_fraction", 1.0))
    label_fraction = float(data.get("label_fraction", 1.0))
    init_from = config.get("init_from") or ""
    objective = str(config.get("objective", "unknown"))
    if not init_from:
        protocol, line = "pretraining", objective
    else:
        protocol = workdir_files.protocol_name(config.get("train_mode") or "full")
        objective = workdir_files.pretraining_name(init_from, pretraining)
        line = workdir_files.run_name(config, workdir, pretraining)
    return {"line": line, "objective": objective, "protocol": protocol, "dataset": dataset,
            "labelled_fraction": train_fraction * label_fraction,
            "train_fraction": train_fraction, "label_fraction": label_fraction,
            "macro_ap": metrics.get("macro_ap"), "micro_ap": metrics.get("micro_ap"),
            "label_frequency_macro_ap": metrics.get("label_frequency_macro_ap"),
            "label_frequency_micro_ap": label_frequency_micro_ap(metrics),
            "workdir": workdir}


def curve_rows(runs: Sequence[Any]) -> list[dict[str, Any]]:
    """Rows of `run_point` for report runs (``workdir``, ``dataset``, ``metrics``) that have a
    ``config.json``, sorted by line, dataset and fraction."""
    rows = []
    for run in runs:
        config = workdir_files.read_config(run.workdir)
        if config is None:
            continue
        rows.append(run_point(config, run.metrics, dataset=run.dataset, workdir=run.workdir,
                              pretraining=workdir_files.read_pretraining(config)))
    return sorted(rows, key=lambda r: (r["line"], r["dataset"], r["labelled_fraction"]))


def differ(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the runs differ in labelled fraction (the curve means something)."""
    return len({r["labelled_fraction"] for r in rows}) > 1


def lines(rows: Sequence[Mapping[str, Any]], metric: str
          ) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(line, dataset) -> [(labelled fraction, mean metric of its runs)], by fraction."""
    groups: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in rows:
        if r[metric] is None:
            continue
        groups.setdefault((r["line"], r["dataset"]), {}).setdefault(
            r["labelled_fraction"], []).append(float(r[metric]))
    return {key: [(f, sum(v) / len(v)) for f, v in sorted(points.items())]
            for key, points in groups.items()}


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per run; numbers as ``repr``, undefined values empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(["" if r[c] is None else repr(r[c]) if isinstance(r[c], float)
                         else r[c] for c in COLUMNS])
    return buf.getvalue()


def chance_levels(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, float]:
    """dataset -> the label-frequency AP of ``metric`` ("macro_ap" or "micro_ap"): what a
    constant predictor of the label frequencies scores, the mean over the dataset's runs (one
    evaluation split: equal unless runs evaluated different numbers of patches)."""
    values: dict[str, list[float]] = {}
    for r in rows:
        if r.get(f"label_frequency_{metric}") is not None:
            values.setdefault(r["dataset"], []).append(float(r[f"label_frequency_{metric}"]))
    return {d: sum(v) / len(v) for d, v in values.items()}


def plot_png(rows: Sequence[Mapping[str, Any]], title: str) -> bytes:
    """Macro AP and micro AP (two panels) against labelled fraction, log x; PNG bytes."""
    fig = curve_figure(rows, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def curve_figure(rows: Sequence[Mapping[str, Any]], title: str) -> Any:
    """The matplotlib Figure of `plot_png`: per panel one line per (line, dataset), a dashed
    reference line at each dataset's label-frequency AP, the y axis from 0."""
    from matplotlib import colormaps  # matplotlib: heavy, only for the picture
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    several = len({r["dataset"] for r in rows}) > 1
    fractions = sorted({r["labelled_fraction"] for r in rows})
    fig = Figure(figsize=(11.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    colors = colormaps["tab10"]
    for p, (metric, label) in enumerate((("macro_ap", "macro AP"), ("micro_ap", "micro AP"))):
        ax = fig.add_subplot(1, 2, p + 1)
        for j, ((line, dataset), points) in enumerate(sorted(lines(rows, metric).items())):
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", color=colors(j % 10),
                    label=f"{line} ({dataset})" if several else line)
        for k, (dataset, level) in enumerate(sorted(chance_levels(rows, metric).items())):
            ax.axhline(level, linestyle=("--", ":", "-.")[k % 3], color="0.45", linewidth=1.0,
                       label=f"label frequencies{f' ({dataset})' if several else ''}: "
                             f"{level:.2f}")
        ax.set_ylim(bottom=0.0)
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{100 * x:g} %"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
        ax.set_xlabel("labelled fraction of the training split")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def report_files(runs: Sequence[Any], split: str) -> tuple[dict[str, str | bytes], str | None]:
    """({file name: content}, report.md section) for `mosaic_jax.evaluation.report`; nothing when
    the runs do not differ in labelled fraction."""
    rows = curve_rows(runs)
    if not differ(rows):
        return {}, None
    files: dict[str, str | bytes] = {
        CSV_FILE: to_csv(rows),
        PNG_FILE: plot_png(rows, f"Label efficiency ({split} split)"),
    }
    section = (f"## Label efficiency\n\nMacro and micro AP against the labelled fraction "
               f"(train_fraction x label_fraction) of each run; the dashed line is the AP that "
               f"label frequencies alone give (a constant predictor); data in `{CSV_FILE}`.\n\n"
               f"![label efficiency]({PNG_FILE})\n")
    return files, section
