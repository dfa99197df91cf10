"""Tests of mosaic_jax.evaluation.metrics and mosaic_jax.evaluation.tsne_plot against independent
loop references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mosaic_jax.evaluation.metrics import (
    average_precision_per_class,
    format_metrics_markdown,
    multilabel_metrics,
)


# ---------------------------------------------------------------- plain-Python references
def ref_ap(scores: list[float], labels: list[bool]) -> float:
    """AP = sum over distinct thresholds (descending) of (R_n - R_{n-1}) * P_n."""
    n_pos = sum(labels)
    if n_pos == 0:
        return math.nan
    ap = 0.0
    prev_recall = 0.0
    for t in sorted(set(scores), reverse=True):
        tp = sum(1 for s, y in zip(scores, labels, strict=True) if s >= t and y)
        k = sum(1 for s in scores if s >= t)
        recall = tp / n_pos
        ap += (recall - prev_recall) * (tp / k)
        prev_recall = recall
    return ap


def ref_f1(pred: list[bool], labels: list[bool]) -> float:
    tp = sum(p and y for p, y in zip(pred, labels, strict=True))
    fp = sum(p and not y for p, y in zip(pred, labels, strict=True))
    fn = sum(y and not p for p, y in zip(pred, labels, strict=True))
    return 0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def random_case(seed: int, n: int = 60, c: int = 5, levels: int = 7):
    """Quantised probabilities (many ties); class 1 has no positives, class 2 all positive."""
    rng = np.random.default_rng(seed)
    labels = rng.random((n, c)) < 0.3
    labels[:, 1] = False
    labels[:, 2] = True
    noise = rng.random((n, c))
    scores = np.round((0.5 * noise + 0.5 * labels) * (levels - 1)) / (levels - 1)
    return scores.astype(np.float32), labels


# ---------------------------------------------------------------- average precision
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_matches_loop_reference_with_ties(seed):
    scores, labels = random_case(seed)
    ap = average_precision_per_class(scores, labels)
    assert ap.shape == (scores.shape[1],) and ap.dtype == np.float64
    for k in range(scores.shape[1]):
        want = ref_ap(scores[:, k].tolist(), labels[:, k].tolist())
        if math.isnan(want):
            assert math.isnan(ap[k])
        else:
            assert ap[k] == pytest.approx(want, abs=1e-12)
    assert math.isnan(ap[1])
    assert ap[2] == pytest.approx(1.0)


def test_ap_matches_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for levels in (3, 11, 1000):
        scores, labels = random_case(int(rng.integers(1 << 30)), n=200, c=6, levels=levels)
        ap = average_precision_per_class(scores, labels)
        for k in range(scores.shape[1]):
            if labels[:, k].any():
                assert ap[k] == pytest.approx(
                    skm.average_precision_score(labels[:, k], scores[:, k]), abs=1e-12
                )


def test_ap_perfect_and_constant_predictors():
    rng = np.random.default_rng(4)
    labels = rng.random((100, 4)) < 0.25
    labels[0] = True
    perfect = labels.astype(float) * 0.9 + 0.05
    assert np.allclose(average_precision_per_class(perfect, labels), 1.0)
    constant = np.full(labels.shape, 0.3)
    assert np.allclose(average_precision_per_class(constant, labels), labels.mean(axis=0))


def test_ap_accepts_logits_and_large_inputs():
    rng = np.random.default_rng(5)
    labels = rng.random((120_000, 19)) < 0.1
    logits = rng.normal(size=labels.shape) + 2.0 * labels
    ap = average_precision_per_class(logits.astype(np.float32), labels)
    assert ap.shape == (19,) and np.all((ap > 0.1) & (ap <= 1.0))


# ---------------------------------------------------------------- multilabel_metrics
def test_multilabel_metrics_against_loops_and_sklearn():
    scores, labels = random_case(6, n=80, c=5)
    m = multilabel_metrics(scores, labels)
    n, c = labels.shape
    pred = scores >= 0.5

    aps = [ref_ap(scores[:, k].tolist(), labels[:, k].tolist()) for k in range(c)]
    defined = [a for a in aps if not math.isnan(a)]
    assert m["macro_ap"] == pytest.approx(sum(defined) / len(defined), abs=1e-12)
    assert m["micro_ap"] == pytest.approx(
        ref_ap(scores.ravel().tolist(), labels.ravel().tolist()), abs=1e-12
    )
    assert m["ap_per_class"][1] is None
    f1s = [ref_f1(pred[:, k].tolist(), labels[:, k].tolist()) for k in range(c)]
    assert m["f1_per_class"] == pytest.approx(f1s)
    assert m["macro_f1"] == pytest.approx(sum(f1s) / c)
    assert m["micro_f1"] == pytest.approx(ref_f1(pred.ravel().tolist(), labels.ravel().tolist()))
    for k in range(c):
        ham = sum(bool(pred[i, k]) != bool(labels[i, k]) for i in range(n)) / n
        bri = sum((float(scores[i, k]) - float(labels[i, k])) ** 2 for i in range(n)) / n
        assert m["hamming_loss_per_class"][k] == pytest.approx(ham)
        assert m["brier_per_class"][k] == pytest.approx(bri)
    assert m["hamming_loss"] == pytest.approx(np.mean(m["hamming_loss_per_class"]))
    assert m["brier"] == pytest.approx(np.mean(m["brier_per_class"]))
    assert m["num_samples"] == n

    skm = pytest.importorskip("sklearn.metrics")
    assert m["micro_ap"] == pytest.approx(
        skm.average_precision_score(labels, scores, average="micro"), abs=1e-12
    )
    assert m["macro_f1"] == pytest.approx(
        skm.f1_score(labels, pred, average="macro", zero_division=0)
    )
    assert m["micro_f1"] == pytest.approx(
        skm.f1_score(labels, pred, average="micro", zero_division=0)
    )
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(labels, pred))
    for k in range(c):
        assert m["brier_per_class"][k] == pytest.approx(
            skm.brier_score_loss(labels[:, k], scores[:, k], pos_label=True)
        )
    json.dumps(m, allow_nan=False)  # strictly JSON-serialisable


def test_no_samples_is_an_error():
    scores, labels = random_case(7, n=50)
    with pytest.raises(ValueError, match="no samples"):
        multilabel_metrics(scores[:0], labels[:0])


def test_chance_reference_is_constant_predictor_macro_ap():
    scores, labels = random_case(8, n=90)
    m = multilabel_metrics(scores, labels)
    constant = multilabel_metrics(np.full(scores.shape, 0.4), labels)
    assert constant["macro_ap"] == pytest.approx(m["label_frequency_macro_ap"])
    assert constant["label_frequency_macro_ap"] == pytest.approx(m["label_frequency_macro_ap"])
    has_pos = labels.any(axis=0)
    assert m["label_frequency_macro_ap"] == pytest.approx(labels.mean(axis=0)[has_pos].mean())


def test_perfect_predictor():
    labels = np.random.default_rng(9).random((40, 3)) < 0.5
    labels[0] = True
    m = multilabel_metrics(labels.astype(np.float32), labels)
    assert m["macro_ap"] == 1.0 and m["micro_ap"] == 1.0
    assert m["macro_f1"] == 1.0 and m["micro_f1"] == 1.0
    assert m["hamming_loss"] == 0.0 and m["brier"] == 0.0


@pytest.mark.parametrize(
    "scores_shape, labels_shape, name",
    [
        ((10,), (10,), "scores"),
        ((10, 3), (10, 4), "labels"),
        ((10, 3), (9, 3), "labels"),
    ],
)
def test_shape_errors_name_the_argument(scores_shape, labels_shape, name):
    scores = np.zeros(scores_shape)
    labels = np.zeros(labels_shape, bool)
    with pytest.raises(ValueError, match=name) as err:
        multilabel_metrics(scores, labels)
    assert str(scores_shape) in str(err.value)
    with pytest.raises(ValueError, match=name):
        average_precision_per_class(scores, labels)


def test_value_errors():
    labels = np.zeros((4, 2), bool)
    with pytest.raises(ValueError, match="probabilities"):
        multilabel_metrics(np.full((4, 2), 3.0), labels)
    with pytest.raises(ValueError, match="NaN"):
        average_precision_per_class(np.full((4, 2), np.nan), labels)
    with pytest.raises(ValueError, match="labels"):
        average_precision_per_class(np.zeros((4, 2)), np.full((4, 2), 2))


def test_markdown_contains_numbers():
    scores, labels = random_case(10, n=30, c=5)
    names = ["forest", "no|pos", "water", "urban", "crops"]
    m = multilabel_metrics(scores, labels)
    md = format_metrics_markdown(m, names)
    for key in (
        "macro_ap",
        "micro_ap",
        "macro_f1",
        "micro_f1",
        "hamming_loss",
        "brier",
        "label_frequency_macro_ap",
    ):
        assert f"{m[key]:.4f}" in md
    for k, name in enumerate(names):
        cell = name.replace("|", "\\|")
        row = next(line for line in md.splitlines() if line.startswith(f"| {cell} |"))
        assert f"{m['f1_per_class'][k]:.4f}" in row
        assert f"{m['brier_per_class'][k]:.4f}" in row
        assert ("n/a" if m["ap_per_class"][k] is None else f"{m['ap_per_class'][k]:.4f}") in row
    with pytest.raises(ValueError, match="class_names"):
        format_metrics_markdown(m, names[:2])


# ---------------------------------------------------------------- t-SNE plot
@pytest.mark.parametrize("n", [20, 200])
def test_plot_tsne_writes_png(tmp_path, n):
    pytest.importorskip("sklearn")
    mpimg = pytest.importorskip("matplotlib.image")
    from mosaic_jax.evaluation.tsne_plot import plot_tsne

    rng = np.random.default_rng(n)
    labels = rng.random((n, 4)) < 0.3
    emb = rng.normal(size=(n, 16)) + 3.0 * labels[:, :1]
    path = tmp_path / "sub" / "tsne.png"
    plot_tsne(emb, labels, ["a", "b", "c", "d"], path, max_points=150, seed=1, title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["tsne.png"]  # no temp file left


def test_dominant_label():
    from mosaic_jax.evaluation.tsne_plot import dominant_label

    labels = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 1]], bool)
    # Frequencies: class 0 -> 2, class 1 -> 2, class 2 -> 2; ties go to the lower index.
    assert dominant_label(labels).tolist() == [0, 1, 2, -1, 0]
    labels[3, 2] = True  # class 2 now most frequent
    assert dominant_label(labels).tolist() == [0, 1, 2, 2, 2]
