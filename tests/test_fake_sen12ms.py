"""The synthetic SEN12MS (data_builders/fake_sen12ms.py)."""

import numpy as np


def test_learnable_sen12ms_pixels_follow_their_class():
    from data_builders.fake_sen12ms import learnable_triplet

    arrays = learnable_triplet(np.random.default_rng(0), size=64)
    igbp = arrays["lc"][..., 0]
    s2 = arrays["s2"].astype(float)
    classes = np.unique(igbp)
    # Between-class spread of the mean spectrum dominates the within-class spread.
    means = np.stack([s2[igbp == k].mean(0) for k in classes])
    within = np.mean([s2[igbp == k].std(0).mean() for k in classes])
    assert len(classes) >= 2 and means.std(0).mean() > within
    assert arrays["s1"].dtype == np.float32 and arrays["s2"].dtype == np.uint16

