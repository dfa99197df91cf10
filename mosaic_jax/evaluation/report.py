"""The results report: the paper's comparison of methods over several training runs.

``python -m mosaic_jax report --workdirs A B C --output DIR [--split validation]`` reads each
workdir's ``config.json`` and ``metrics_<split>.json`` (written by
`mosaic_jax.training.train.train_and_evaluate`) and writes to ``DIR``:

- ``comparison.md`` / ``comparison.csv``: one row per method x dataset with macro/micro AP and
  macro/micro F1 (and the label-frequency chance level of macro AP); the markdown marks the best
  value of each dataset in bold; when a run is a two-tower model, also its macro AP with one
  modality missing ("macro AP, S1 only (S2 missing)", "macro AP, S2 only (S1 missing)": the
  fused classifier fed one modality, see README "Fusion and missing modalities");
- ``hamming_loss_per_class.md``, ``brier_per_class.md``, ``ap_per_class.md``: per-class tables
  (rows: classes with their number of positives in the evaluated split, columns: methods), one
  section per dataset, and the same as ``<metric>_per_class_<dataset>.csv``;
- ``ap_per_class_<dataset>.png``: grouped bar chart of the AP of every class for every method,
  each class labelled with its number of positives (``n=``);
- ``tsne/<method>_<dataset>.png``: a copy of each run's t-SNE picture (when it has one);
- ``retrieval.md`` / ``retrieval.csv``: precision, mAP and NDCG at k per run and mode, when
  workdirs hold ``retrieval/retrieval.json`` (`mosaic_jax.evaluation.retrieval`);
- ``label_efficiency.png`` / ``.csv``: macro and micro AP against the labelled fraction, when
  the runs differ in it (`mosaic_jax.evaluation.label_efficiency`);
- ``report.md``: all of the above on one page.

A method is named after the run's objective (the workdir's name when it has no config); a
downstream run (``init_from``) after the pretraining it started from and its protocol
("mosaic1, linear probe", "mosaic1, fine-tune"). A run whose towers started from weight files
(``model.s2_init``, ...) is named after the files: "ssl4eo_s2_moco" when it trained no step (the
probe of the imported encoder reads "ssl4eo_s2_moco, linear probe"), "mosaic1 from
ssl4eo_s2_moco" otherwise. Runs of the same dataset with the same name get
their workdir's name appended, and ``--names`` overrides all names. A run whose objective has no
BCE term never trained its classifier: its AP and F1 are an untrained head's, so the comparison
shows ``untrained`` in those columns (the CSV keeps the values and says so in
``classifier_trained``) and its name says "(classifier untrained)".
Numbers in the CSV files are the JSON values unchanged (``repr``), in the markdown
rounded to 4 decimals; undefined values (AP of a class without positives) are empty in
CSV and ``n/a`` in markdown. Every file is written atomically (temp file, then rename).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_builders import atomic_files, cli, console, datasets
from mosaic_jax.evaluation import label_efficiency, retrieval
from mosaic_jax.evaluation.metrics import MISSING_MODALITY
from mosaic_jax.evaluation.tables import markdown_table
from mosaic_jax.training import workdir as workdir_files

HEADLINE = (("macro_ap", "macro AP"), ("micro_ap", "micro AP"), ("macro_f1", "macro F1"),
            ("micro_f1", "micro F1"))
# metrics of two-tower runs with one modality missing (mosaic_jax.evaluation.metrics)
MISSING_MODALITY_COLUMNS = tuple(
    (f"{prefix}_macro_ap", f"macro AP, {label}") for prefix, label in MISSING_MODALITY.items())
PER_CLASS = (("hamming_loss_per_class", "hamming_loss", "Hamming loss (lower is better)"),
             ("brier_per_class", "brier", "Brier score (lower is better)"),
             ("ap_per_class", "ap", "average precision (higher is better)"))


@dataclasses.dataclass
class Run:
    """One workdir's evaluation: what the report shows of it."""

    workdir: str
    method: str
    dataset: str
    split: str
    metrics: dict[str, Any]
    class_names: list[str]
    tsne: str | None
    objective: str | None
    classifier_trained: bool = True


def method_name(config: dict[str, Any], workdir: str) -> str:
    """A run's method name from its config.json contents (see the module docstring)."""
    name = workdir_files.run_name(config, workdir, workdir_files.read_pretraining(config))
    if config.get("init_from") or workdir_files.classifier_trained(config):
        return name
    return f"{name} (classifier untrained)"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def load_run(workdir: str, split: str = "validation") -> Run:
    """Reads a workdir's metrics (and config when present); FileNotFoundError naming it."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    name = workdir_files.metrics_file(split)
    path = os.path.join(workdir, name)
    if not os.path.isfile(path):
        found = workdir_files.metrics_splits(os.listdir(workdir))
        hint = (f"it has metrics for split(s) {', '.join(found)}; pass --split" if found else
                "has the run finished its evaluation?")
        raise FileNotFoundError(f"workdir {workdir!r} has no {name} ({hint})")
    with open(path) as f:
        metrics = json.load(f)
    missing = [k for k, _ in HEADLINE if k not in metrics]
    missing += [k for k, _, _ in PER_CLASS if k not in metrics]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a mosaic_jax metrics file?")
    num_classes = len(metrics["ap_per_class"])
    objective = None
    dataset = "unknown dataset"
    config = workdir_files.read_config(workdir) or {}
    if config:
        objective = config.get("objective")
        data = config.get("data", {})
        dataset = data.get("name", dataset)
        if data.get("demo"):
            dataset += " (demo)"
    facts = datasets.DATASETS.get(dataset.split(" ")[0])
    names = (list(facts.class_names) if facts and facts.num_classes == num_classes
             else [f"class {i}" for i in range(num_classes)])
    tsne = os.path.join(workdir, workdir_files.tsne_file(split))
    return Run(workdir=workdir, method=method_name(config, workdir), dataset=dataset,
               split=split, metrics=metrics, class_names=names,
               tsne=tsne if os.path.isfile(tsne) else None, objective=objective,
               classifier_trained=workdir_files.classifier_trained(config))


def _name_runs(runs: list[Run], names: Sequence[str] | None) -> None:
    """Makes every (method, dataset) pair unique (see the module docstring)."""
    if names:
        if len(names) != len(runs):
            raise ValueError(f"{len(names)} names for {len(runs)} workdirs")
        for run, name in zip(runs, names, strict=True):
            run.method = name
    keys = [(r.method, r.dataset) for r in runs]
    for run in runs:
        if keys.count((run.method, run.dataset)) > 1:
            run.method = f"{run.method} ({os.path.basename(run.workdir)})"
    keys = [(r.method, r.dataset) for r in runs]
    for i, key in enumerate(keys):
        if keys.count(key) > 1:
            raise ValueError(f"two runs are both named {key[0]!r} on {key[1]}: "
                             f"{runs[i].workdir}; pass --names")


def _cell(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.{digits}f}"


def _csv_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _to_csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_value(v) for v in row])
    return buf.getvalue()


def _datasets(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(r.dataset for r in runs))


def comparison_table(runs: list[Run]) -> tuple[str, str]:
    """(markdown, csv) of the method x dataset comparison."""
    keys = [k for k, _ in HEADLINE]
    header = ["method", "dataset", "split", "step", "samples", *keys,
              "label_frequency_macro_ap", "classifier_trained", "workdir"]
    rows = [[r.method, r.dataset, r.split, r.metrics.get("step"), r.metrics.get("num_samples"),
             *(r.metrics[k] for k in keys), r.metrics.get("label_frequency_macro_ap"),
             r.classifier_trained, r.workdir] for r in runs]
    best = {}
    for dataset in _datasets(runs):
        for k in keys:
            values = [r.metrics[k] for r in runs if r.dataset == dataset
                      and r.metrics[k] is not None and r.classifier_trained]
            best[dataset, k] = max(values) if values else None
    md_rows = []
    for r in runs:
        cells = [r.method, r.dataset, _cell(r.metrics.get("num_samples"))]
        for k in keys:
            text = _cell(r.metrics[k]) if r.classifier_trained else "untrained"
            if r.classifier_trained and len([x for x in runs if x.dataset == r.dataset]) > 1 and (
                    r.metrics[k] is not None and r.metrics[k] == best[r.dataset, k]):
                text = f"**{text}**"
            cells.append(text)
        cells.append(_cell(r.metrics.get("label_frequency_macro_ap")))
        md_rows.append(cells)
    md_header = ["method", "dataset", "samples", *(label for _, label in HEADLINE),
                 "chance macro AP"]
    missing = [(k, label) for k, label in MISSING_MODALITY_COLUMNS
               if any(k in r.metrics for r in runs)]
    for k, label in missing:  # two-tower runs evaluated with one modality missing
        header.insert(-2, k)
        md_header.append(label)
        for r, row, md_row in zip(runs, rows, md_rows, strict=True):
            row.insert(-2, r.metrics.get(k))
            md_row.append(_cell(r.metrics.get(k)) if r.classifier_trained or k not in r.metrics
                          else "untrained")
    md = markdown_table(md_header, md_rows,
                        ["left", "left", "right", *["right"] * (len(keys) + 1 + len(missing))])
    return md, _to_csv(header, rows)


def positives(group: list[Run]) -> list[int | str | None]:
    """Per class, the number of positives in the evaluated split (``positives_per_class``):
    one count when the runs agree, ``"a / b"`` (in run order, distinct values) when they
    evaluated different patches, None when no run has the counts."""
    counts = [r.metrics["positives_per_class"] for r in group
              if r.metrics.get("positives_per_class") is not None]
    out: list[int | str | None] = []
    for c in range(len(group[0].class_names)):
        values = list(dict.fromkeys(int(v[c]) for v in counts if c < len(v)))
        out.append(None if not values else values[0] if len(values) == 1 else
                   " / ".join(map(str, values)))
    return out


def per_class_tables(runs: list[Run], key: str) -> tuple[str, dict[str, str]]:
    """(markdown with one section per dataset, {dataset: csv}) of a per-class metric, with each
    class's number of positives in the evaluated split (an AP from a handful of positives is
    not a result)."""
    md_parts, csvs = [], {}
    for dataset in _datasets(runs):
        group = [r for r in runs if r.dataset == dataset]
        names = group[0].class_names
        for r in group:
            if len(r.metrics[key]) != len(names):
                raise ValueError(f"{r.workdir} has {len(r.metrics[key])} classes, other "
                                 f"{dataset} runs have {len(names)}")
        header = ["class", "positives", *(r.method for r in group)]
        rows = [[name, count, *(r.metrics[key][i] for r in group)]
                for i, (name, count) in enumerate(zip(names, positives(group), strict=True))]
        csvs[dataset] = _to_csv(header, rows)
        md_rows = [[row[0], row[1] if isinstance(row[1], str) else _cell(row[1]),
                    *(_cell(v) for v in row[2:])] for row in rows]
        md_parts.append(f"### {dataset}\n\n"
                        + markdown_table(header, md_rows,
                                         ["left", "right", *["right"] * len(group)]))
    return "\n".join(md_parts), csvs


def plot_ap_per_class(runs: list[Run], path: str, title: str) -> None:
    """Writes `ap_per_class_figure` as a PNG to ``path``, atomically."""
    buf = io.BytesIO()
    ap_per_class_figure(runs, title).savefig(buf, format="png")
    atomic_files.write_atomic(path, buf.getvalue())


def ap_per_class_figure(runs: list[Run], title: str) -> Any:
    """Horizontal grouped bars: one group per class, one bar per run (AP; n/a drawn as 0); each
    class labelled with its number of positives in the evaluated split (``n=``)."""
    from matplotlib import colormaps  # matplotlib: heavy, only for the charts
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = runs[0].class_names
    c, m = len(names), len(runs)
    fig = Figure(figsize=(10.0, 1.5 + 0.25 * c * max(1.0, m / 2)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    height = 0.8 / m
    colors = colormaps["tab10"](np.arange(m) % 10)
    y = np.arange(c)
    for j, run in enumerate(runs):
        ap = np.array([np.nan if v is None else v for v in run.metrics["ap_per_class"]], float)
        pos = y - 0.4 + height * (j + 0.5)
        ax.barh(pos, np.nan_to_num(ap), height=height, color=colors[j], label=run.method)
        for k in np.flatnonzero(np.isnan(ap)):
            ax.text(0.005, pos[k], "n/a", va="center", fontsize=5, color=colors[j])
    counts = positives(runs)
    labels = [f"{n if len(n) <= 42 else n[:40] + '...'} "
              f"(n={'?' if count is None else count})" for n, count in zip(names, counts,
                                                                          strict=True)]
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("average precision")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def write_report(workdirs: Sequence[str], output: str, *, split: str = "validation",
                 names: Sequence[str] | None = None) -> dict[str, Any]:
    """Writes the report of ``workdirs`` to ``output``; returns {"runs", "files"}."""
    if not workdirs:
        raise ValueError("no workdirs given")
    runs = [load_run(w, split) for w in workdirs]
    _name_runs(runs, names)
    output = os.path.abspath(os.path.expanduser(output))
    os.makedirs(output, exist_ok=True)
    files: list[str] = []

    def put(name: str, data: str | bytes) -> None:
        atomic_files.write_atomic(os.path.join(output, name), data)
        files.append(name)

    md, table = comparison_table(runs)
    put("comparison.md", f"# Comparison on the {split} split\n\n{md}")
    put("comparison.csv", table)
    sections = {}
    for key, short, title in PER_CLASS:
        md_part, csvs = per_class_tables(runs, key)
        sections[key] = (title, md_part)
        put(f"{short}_per_class.md", f"# Per-class {title}, {split} split\n\n{md_part}")
        for dataset, text in csvs.items():
            put(f"{short}_per_class_{_slug(dataset)}.csv", text)
    charts = []
    for dataset in _datasets(runs):
        name = f"ap_per_class_{_slug(dataset)}.png"
        plot_ap_per_class([r for r in runs if r.dataset == dataset], os.path.join(output, name),
                          f"AP per class, {dataset}, {split} split")
        files.append(name)
        charts.append((dataset, name))
    pictures = []
    for r in runs:
        if r.tsne is None:
            pictures.append((r, None))
            continue
        name = f"tsne/{_slug(r.method)}_{_slug(r.dataset)}.png"
        with open(r.tsne, "rb") as f:
            put(name, f.read())
        pictures.append((r, name))

    extra = []  # retrieval table and label-efficiency curve, when the runs have them
    for more, section in (retrieval.report_files(runs),
                          label_efficiency.report_files(runs, split)):
        for name, data in more.items():
            put(name, data)
        extra += [section] if section else []

    lines = [f"# Results report ({split} split)", "", "Runs:", ""]
    for r in runs:
        lines.append(f"- **{r.method}** on {r.dataset}: `{r.workdir}`, step "
                     f"{r.metrics.get('step')}, {r.metrics.get('num_samples')} patches")
    lines += ["", "## Comparison", "", md, "## Per-class metrics", ""]
    for key, _, _ in PER_CLASS:
        title, md_part = sections[key]
        lines += [f"### {title[0].upper()}{title[1:]}", "",
                  re.sub(r"^### ", "#### ", md_part, flags=re.M), ""]
    lines += ["## AP per class", ""]
    lines += [f"![AP per class, {d}]({n})\n" for d, n in charts]
    lines += ["## t-SNE of the embeddings", ""]
    for r, name in pictures:
        lines.append(f"### {r.method}, {r.dataset}\n")
        lines.append(f"![t-SNE {r.method}]({name})\n" if name else
                     f"(no tsne_{split}.png in {r.workdir})\n")
    put("report.md", "\n".join(lines + extra))
    return {"runs": runs, "files": files}


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.new_parser("python -m mosaic_jax report", __doc__)
    parser.add_argument("--workdirs", nargs="+", required=True, help="training workdirs")
    parser.add_argument("--output", required=True, help="report folder (created)")
    parser.add_argument("--split", default="validation", help="evaluation split to compare")
    parser.add_argument("--names", nargs="+", default=None,
                        help="method names, one per workdir (default: objectives)")
    args = parser.parse_args(argv)

    def work() -> dict[str, Any]:
        cli.check_output(args.output, folder=True)
        return write_report(args.workdirs, args.output, split=args.split, names=args.names)

    result = cli.run(work, argv, paths=[args.output])
    print(f"Report of {len(result['runs'])} runs in {os.path.abspath(args.output)}: "
          f"{os.path.join(os.path.abspath(args.output), 'report.md')}")


if __name__ == "__main__":
    console.quiet_console()
    main()

