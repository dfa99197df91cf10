"""t-SNE picture of learned embeddings, coloured by class (as in the MoSAiC paper's figures).

Multi-label colouring: each point gets the colour of the *most frequent class it carries*
(frequency counted over the plotted subset), so the large, common classes form the visible
structure and every labelled point gets exactly one colour. Points with no label are
translucent black. Legend counts are the points drawn in each colour.

Uses matplotlib's object-oriented API on an Agg canvas (no pyplot, no display, no global
backend switch), and writes the PNG atomically (`data_builders.atomic_files`: local paths and
gs:// URLs), so a reader never sees a half-written picture. The figure says what it shows
(the title names the embedding; a caption the colouring), and `plot_tsne` returns the picture
as an [H, W, 3] uint8 array for TensorBoard.

Palette: Kelly's 20 colours of maximum contrast (K. L. Kelly, "Twenty-two colors of maximum
contrast", Color Engineering 3, 1965; white and black left out), in his order, so that classes
with neighbouring indices get clearly different colours (tab20's pale/dark pairs do not).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_builders import atomic_files

__all__ = ["plot_tsne", "dominant_label"]

# Translucent black: distinct from every colour of the palette.
_NO_LABEL_COLOR = (0.0, 0.0, 0.0, 0.35)
KELLY_COLORS = ("#FFB300", "#803E75", "#FF6800", "#A6BDD7", "#C10020", "#CEA262", "#817066",
                "#007D34", "#F6768E", "#00538A", "#FF7A5C", "#53377A", "#FF8E00", "#B32851",
                "#F4C800", "#7F180D", "#93AA00", "#593315", "#F13A13", "#232C16")
CAPTION = ("Colour: each point's most frequent label (the label it carries that is most "
           "frequent among the plotted points); translucent black: no label.")


def dominant_label(labels: np.ndarray) -> np.ndarray:
    """Per-point class index used for colouring: the most frequent class the point carries.

    Args:
      labels: ``[N, C]`` bool.

    Returns:
      ``[N]`` int, ``-1`` for a point with no label. Ties in frequency go to the lower index.
    """
    labels = np.asarray(labels, dtype=bool)
    counts = labels.sum(axis=0)
    # Rank classes by frequency (descending, stable), then take the best-ranked present class.
    rank = np.empty_like(counts)
    rank[np.argsort(-counts, kind="stable")] = np.arange(labels.shape[1])
    masked_rank = np.where(labels, rank[None, :], labels.shape[1])
    best = np.argmin(masked_rank, axis=1)
    return np.where(labels.any(axis=1), best, -1)


def _class_colors(num_classes: int) -> np.ndarray:
    """``[C, 4]`` RGBA: Kelly's colours up to 20 classes, evenly spaced turbo hues beyond."""
    from matplotlib import colormaps  # matplotlib, sklearn: heavy, only to draw
    from matplotlib.colors import to_rgba_array

    if num_classes <= len(KELLY_COLORS):
        return to_rgba_array(KELLY_COLORS[:num_classes])
    return colormaps["turbo"](np.linspace(0.0, 1.0, num_classes))


def plot_tsne(
    embeddings: Any,
    labels: Any,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    max_points: int = 2000,
    seed: int = 0,
    title: str | None = None,
) -> np.ndarray:
    """Saves a 2-D t-SNE scatter of (a random subset of) the embeddings as a PNG and returns
    the picture as ``[H, W, 3]`` uint8 (for TensorBoard).

    Args:
      embeddings: ``[N, d]`` float features (N >= 2).
      labels: ``[N, C]`` bool (or 0/1) multi-hot labels.
      class_names: ``C`` names for the legend.
      path: output ``.png`` path; parent folders are created.
      max_points: at most this many points (sampled without replacement with ``seed``).
      seed: seed of the subset and of t-SNE.
      title: figure title, naming the embedding (default: "t-SNE of N embeddings"); a
        caption under the plot says how points are coloured.
    """
    embeddings, labels = _checked_inputs(embeddings, labels, class_names, max_points)
    rng = np.random.default_rng(seed)
    n_total = embeddings.shape[0]
    if n_total > max_points:
        idx = np.sort(rng.choice(n_total, size=max_points, replace=False))
    else:
        idx = np.arange(n_total)
    x = embeddings[idx]
    y = labels[idx].astype(bool)
    xy = _tsne_2d(x, seed)
    fig = _scatter_figure(xy, dominant_label(y), class_names,
                          title or f"t-SNE of {x.shape[0]} embeddings")
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    with atomic_files.open_atomic(path) as f:
        fig.savefig(f, format="png")
    return image


def _checked_inputs(embeddings: Any, labels: Any, class_names: Sequence[str],
                    max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """(float64 [N, d] embeddings, [N, C] labels); ValueError saying what does not fit."""
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, d]; got shape {embeddings.shape}")
    if labels.ndim != 2 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be [N, C] with N = embeddings.shape[0]; got labels {labels.shape}, "
            f"embeddings {embeddings.shape}"
        )
    if len(class_names) != labels.shape[1]:
        raise ValueError(
            f"class_names has {len(class_names)} names but labels has {labels.shape[1]} classes"
        )
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2; got {max_points}")
    if embeddings.shape[0] < 2:
        raise ValueError(f"t-SNE needs at least 2 points; got embeddings {embeddings.shape}")
    embeddings = embeddings.astype(np.float64, copy=False)
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return embeddings, labels


def _tsne_2d(x: np.ndarray, seed: int) -> np.ndarray:
    """``[n, 2]`` t-SNE coordinates of ``x [n, d]`` (perplexity at most 30, PCA start)."""
    from sklearn.manifold import TSNE  # heavy, only to draw

    n = x.shape[0]
    tsne = TSNE(
        n_components=2,
        perplexity=min(30.0, (n - 1) / 3.0),
        init="pca" if min(x.shape) >= 2 else "random",
        learning_rate="auto",
        random_state=seed,
    )
    return tsne.fit_transform(x)


def _scatter_figure(xy: np.ndarray, cls: np.ndarray, class_names: Sequence[str],
                    title: str) -> Any:
    """The drawn figure: points coloured by dominant class `cls` [n] (-1: no label), a legend
    of the classes present with their counts, `title` and the caption."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy, only to draw
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colors = _class_colors(len(class_names))
    fig = Figure(figsize=(9.0, 6.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    handles = []
    if (cls < 0).any():
        m = cls < 0
        ax.scatter(xy[m, 0], xy[m, 1], s=8, color=_NO_LABEL_COLOR, linewidths=0)
        handles.append(_legend_handle(Line2D, _NO_LABEL_COLOR, f"(no label) [{m.sum()}]"))
    # Draw frequent classes first so that rarer ones stay visible on top.
    present = [
        k
        for k in np.argsort(-np.bincount(cls[cls >= 0], minlength=len(class_names)))
        if (cls == k).any()
    ]
    for k in present:
        m = cls == k
        ax.scatter(xy[m, 0], xy[m, 1], s=8, color=colors[k], linewidths=0)
        name = class_names[k] if len(class_names[k]) <= 40 else class_names[k][:38] + "..."
        handles.append(_legend_handle(Line2D, colors[k], f"{name} [{m.sum()}]"))
    ax.set_xticks([])
    ax.set_yticks([])
    # A figure title (not the axes'), so that a long one is centred on the whole picture.
    fig.suptitle(title, fontsize=10)
    if handles:
        ax.legend(
            handles=handles,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            fontsize=7,
            frameon=False,
        )
    fig.tight_layout(rect=(0.0, 0.04, 1.0, 0.96))
    fig.text(0.01, 0.012, CAPTION, fontsize=7)
    fig.canvas.draw()
    return fig


def _legend_handle(line_cls: Any, color: Any, label: str) -> Any:
    """A round marker legend entry (one per class actually plotted)."""
    return line_cls([], [], marker="o", linestyle="", markersize=5, color=color, label=label)
