"""Multi-label evaluation metrics for the linear-probe / fine-tune evaluation.

Pure NumPy, evaluated on the whole evaluation set at once (not averaged over batches), so the
ranking metrics (average precision) are exact. Conventions follow scikit-learn:

* Average precision (AP) is ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score thresholds,
  highest first, with equal scores forming one threshold (no interpolation). A class with no
  positive sample has undefined AP (NaN here) and is left out of the macro mean.
* F1 uses ``zero_division=0``: a class with no positives *and* no predicted positives has
  F1 = 0, and it still counts in the macro F1 mean (as in ``f1_score(average="macro")``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mosaic_jax.evaluation.tables import markdown_table

__all__ = [
    "average_precision_per_class",
    "multilabel_metrics",
    "format_metrics_markdown",
    "missing_modality_metrics",
    "missing_modality_summary",
]

# Evaluation of a two-tower model with one modality missing: prefix -> what it means.
MISSING_MODALITY = {"s1_only": "S1 only (S2 missing)", "s2_only": "S2 only (S1 missing)"}
MISSING_MODALITY_KEYS = ("macro_ap", "micro_ap", "macro_f1", "micro_f1", "ap_per_class")

# Probabilities a little outside [0, 1] (float round-off from a sigmoid) are tolerated.
_PROB_TOL = 1e-6
# A class is predicted present when its probability is >= THRESHOLD (F1, Hamming loss).
THRESHOLD = 0.5


def _check_scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Converts to ``float64 [N, C]`` scores and ``bool [N, C]`` labels, or raises ValueError."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [N, C]; got shape {scores.shape}")
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels must have the same shape as scores; got labels {labels.shape}, "
            f"scores {scores.shape}"
        )
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise ValueError(f"scores must be numeric; got dtype {scores.dtype}")
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be boolean or 0/1")
        labels = labels.astype(bool)
    # float32 -> float64 is exact, so ties and orderings are preserved.
    scores = scores.astype(np.float64, copy=False)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return scores, labels


def _average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP per column of already-validated ``float64 [N, C]`` scores and ``bool [N, C]`` labels.

    One sort per column, everything else vectorised: AP is the mean, over the positive samples,
    of the precision at the *end* of the tie group that sample falls in (the lowest threshold
    that still admits it), which equals ``sum_n (R_n - R_{n-1}) P_n``.
    """
    n, c = scores.shape
    if n == 0:
        return np.full(c, np.nan)
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    y = np.take_along_axis(labels, order, axis=0)
    tp = np.cumsum(y, axis=0, dtype=np.int64)
    precision = tp / np.arange(1, n + 1, dtype=np.float64)[:, None]
    # Position i ends a tie group if the next score differs (or it is the last row).
    group_end = np.ones((n, c), dtype=bool)
    group_end[:-1] = s[:-1] != s[1:]
    # Index of the end of the group containing each position: the next group end at or below.
    end_idx = np.where(group_end, np.arange(n)[:, None], n)
    end_idx = np.minimum.accumulate(end_idx[::-1], axis=0)[::-1]
    precision_at_end = np.take_along_axis(precision, end_idx, axis=0)
    n_pos = tp[-1]
    total = np.sum(np.where(y, precision_at_end, 0.0), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(n_pos > 0, total / np.maximum(n_pos, 1), np.nan)
    return ap.astype(np.float64)


def average_precision_per_class(scores: Any, labels: Any) -> np.ndarray:
    """Average precision of each class.

    Args:
      scores: ``[N, C]`` real-valued scores (any monotone scale: logits or probabilities).
      labels: ``[N, C]`` bool (or 0/1) ground truth.

    Returns:
      ``[C]`` float64 AP, NaN for a class without positive samples.
    """
    scores, labels = _check_scores_labels(scores, labels)
    return _average_precision(scores, labels)


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    """JSON-safe list: NaN becomes None (strict JSON has no NaN)."""
    return [None if math.isnan(v) else float(v) for v in values.tolist()]


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 where ``den == 0`` (sklearn's ``zero_division=0``)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def multilabel_metrics(scores: Any, labels: Any) -> dict[str, Any]:
    """Headline and per-class multi-label metrics of predicted probabilities.

    Args:
      scores: ``[N, C]`` probabilities in ``[0, 1]`` (sigmoid outputs).
      labels: ``[N, C]`` bool (or 0/1) ground truth.

    Returns:
      A JSON-serialisable dict of Python floats / ints / lists:
      ``macro_ap`` (mean AP over classes with >= 1 positive), ``micro_ap`` (AP of the flattened
      arrays), ``macro_f1`` (mean per-class F1 over all classes, ``zero_division=0``),
      ``micro_f1``, ``hamming_loss`` / ``hamming_loss_per_class`` (fraction of wrong 0/1
      decisions), ``brier`` / ``brier_per_class`` (mean squared error of the probability),
      ``label_frequency_macro_ap`` (the macro AP of a constant predictor, i.e. the mean class
      prevalence over classes with positives: the chance reference for ``macro_ap``),
      ``ap_per_class`` / ``f1_per_class`` / ``positives_per_class`` / ``prevalence_per_class``,
      ``num_samples``, ``num_classes`` and ``num_classes_with_positives``. Undefined values
      (AP of a class without positives) are None.
    """
    scores, labels = _check_scores_labels(scores, labels)
    n, c = scores.shape
    if n == 0:
        raise ValueError("no samples to evaluate: scores has 0 rows")
    if scores.min() < -_PROB_TOL or scores.max() > 1 + _PROB_TOL:
        raise ValueError(
            f"scores must be probabilities in [0, 1]; got range "
            f"[{scores.min():.6g}, {scores.max():.6g}]"
        )

    ap = _average_precision(scores, labels)
    micro_ap = float(_average_precision(scores.reshape(-1, 1), labels.reshape(-1, 1))[0])
    has_pos = labels.any(axis=0)
    macro_ap = float(np.mean(ap[has_pos])) if has_pos.any() else math.nan

    pred = scores >= THRESHOLD
    tp = np.sum(pred & labels, axis=0)
    fp = np.sum(pred & ~labels, axis=0)
    fn = np.sum(~pred & labels, axis=0)
    f1 = _safe_ratio(2 * tp, 2 * tp + fp + fn)
    micro_f1 = float(_safe_ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()))

    hamming = np.mean(pred != labels, axis=0)
    brier = np.mean((scores - labels) ** 2, axis=0)
    positives = labels.sum(axis=0)
    prevalence = positives / n
    chance = float(np.mean(prevalence[has_pos])) if has_pos.any() else math.nan

    def _f(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    return {
        "num_samples": int(n),
        "num_classes": int(c),
        "num_classes_with_positives": int(has_pos.sum()),
        "threshold": THRESHOLD,
        "macro_ap": _f(macro_ap),
        "micro_ap": _f(micro_ap),
        "macro_f1": float(np.mean(f1)),
        "micro_f1": micro_f1,
        "hamming_loss": float(np.mean(hamming)),
        "brier": float(np.mean(brier)),
        "label_frequency_macro_ap": _f(chance),
        "ap_per_class": _nan_to_none(ap),
        "f1_per_class": [float(v) for v in f1],
        "hamming_loss_per_class": [float(v) for v in hamming],
        "brier_per_class": [float(v) for v in brier],
        "positives_per_class": [int(v) for v in positives],
        "prevalence_per_class": [float(v) for v in prevalence],
    }


def missing_modality_metrics(variant_scores: dict[str, Any], labels: Any) -> dict[str, Any]:
    """``{prefix}_{key}`` metrics of the same samples scored with one modality missing.

    ``variant_scores`` maps ``s1_only`` / ``s2_only`` to ``[N, C]`` probabilities (the fused
    classifier fed one modality, the other treated as absent as in training); keys are
    ``MISSING_MODALITY_KEYS`` of `multilabel_metrics`, e.g. ``s1_only_macro_ap``. Empty for
    no variants (a single-tower model).
    """
    out: dict[str, Any] = {}
    for prefix in MISSING_MODALITY:
        if prefix in variant_scores:
            full = multilabel_metrics(variant_scores[prefix], labels)
            out.update({f"{prefix}_{k}": full[k] for k in MISSING_MODALITY_KEYS})
    return out


def missing_modality_summary(metrics: dict[str, Any]) -> str:
    """``"; S1 only (S2 missing) macro AP 0.61, S2 only ..."`` for a log line ("" if none)."""
    parts = [f"{label} macro AP {_fmt(metrics[f'{prefix}_macro_ap'])}"
             for prefix, label in MISSING_MODALITY.items() if f"{prefix}_macro_ap" in metrics]
    return "; " + ", ".join(parts) if parts else ""


def _fmt(value: Any, digits: int = 4) -> str:
    """A number for a markdown cell; None / NaN become ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def format_metrics_markdown(metrics: dict[str, Any], class_names: Sequence[str]) -> str:
    """Markdown report: a headline table, then a per-class table (AP, F1, Hamming, Brier).

    Args:
      metrics: the dict returned by :func:`multilabel_metrics`.
      class_names: ``C`` class names, in the column order of the scores.
    """
    num_classes = len(metrics["ap_per_class"])
    if len(class_names) != num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} names but metrics has {num_classes} classes"
        )
    headline = [
        ("samples", "num_samples"),
        ("macro AP", "macro_ap"),
        ("micro AP", "micro_ap"),
        ("chance macro AP (label frequency)", "label_frequency_macro_ap"),
        ("macro F1", "macro_f1"),
        ("micro F1", "micro_f1"),
        ("Hamming loss", "hamming_loss"),
        ("Brier score", "brier"),
    ]
    rows = [(label, _fmt(metrics[key])) for label, key in headline if key in metrics]
    if "threshold" in metrics:
        rows.append(("decision threshold", _fmt(metrics["threshold"], 2)))
    for prefix, label in MISSING_MODALITY.items():
        for key, name in (("macro_ap", "macro AP"), ("micro_ap", "micro AP"),
                          ("macro_f1", "macro F1"), ("micro_f1", "micro F1")):
            if f"{prefix}_{key}" in metrics:
                rows.append((f"{name}, {label}", _fmt(metrics[f"{prefix}_{key}"])))
    positives = metrics.get("positives_per_class", [None] * num_classes)
    per_class = [
        (name, _fmt(positives[i]), _fmt(metrics["ap_per_class"][i]),
         _fmt(metrics["f1_per_class"][i]), _fmt(metrics["hamming_loss_per_class"][i]),
         _fmt(metrics["brier_per_class"][i]))
        for i, name in enumerate(class_names)]
    return (markdown_table(("metric", "value"), rows, ("left", "right")) + "\n"
            + markdown_table(("class", "positives", "AP", "F1", "Hamming", "Brier"), per_class,
                             ("left", *["right"] * 5)))
