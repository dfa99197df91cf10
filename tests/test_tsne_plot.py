"""The t-SNE picture (mosaic_jax/evaluation/tsne_plot.py)."""

import numpy as np


def test_tsne_palette_tells_neighbouring_classes_apart():
    from matplotlib.colors import to_rgb

    from mosaic_jax.evaluation.tsne_plot import KELLY_COLORS, _class_colors

    colors = _class_colors(19)[:, :3]
    assert np.allclose(colors, [to_rgb(c) for c in KELLY_COLORS[:19]])
    gaps = np.linalg.norm(np.diff(colors, axis=0), axis=1)
    assert gaps.min() > 0.25  # tab20's pale/dark pairs are ~0.2 apart
    assert len({tuple(np.round(c, 3)) for c in colors}) == 19


def test_tsne_returns_the_picture_for_tensorboard(tmp_path):
    from mosaic_jax.evaluation.tsne_plot import plot_tsne

    rng = np.random.default_rng(0)
    labels = rng.random((60, 4)) < 0.4
    emb = rng.normal(size=(60, 8)) + 3 * labels[:, :1]
    image = plot_tsne(emb, labels, list("abcd"), tmp_path / "t.png", title="t-SNE of h_fused")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[:2] == (650, 900)
    from matplotlib.image import imread

    assert imread(tmp_path / "t.png").shape[:2] == image.shape[:2]

