"""Paired block bootstrap of the F1 difference between two crown models (pipeline.evaluation.paired)."""

import numpy as np
import pytest
from shapely.geometry import box

from pipeline.evaluation.paired import block_counts, paired_f1_difference


def _trees(centres, half=1.5):
    return [box(x - half, y - half, x + half, y + half) for x, y in centres]


# four reference crowns, one in each 10 m block of a 20 m x 20 m plot (metres, projected CRS)
CENTRES = [(5, 5), (15, 5), (5, 15), (15, 15)]


def test_identical_models_differ_by_exactly_zero():
    truth = _trees(CENTRES)
    pred = _trees([(5.2, 5.1), (15, 5.3), (30, 30)])
    r = paired_f1_difference(pred, pred, truth, block_m=10.0, n_boot=500)
    assert r.f1_a == r.f1_b == pytest.approx(2 * 2 / (3 + 4))
    assert r.delta_points == 0.0 and r.ci_points == (0.0, 0.0) and r.share_within_tolerance == 1.0


def test_known_difference_and_the_share_of_resamples_within_tolerance():
    truth = _trees(CENTRES)
    a = _trees(CENTRES)  # finds all four: F1 1
    b = _trees(CENTRES[:2])  # misses the two upper crowns, no false positive: F1 2*2/(2+4)
    r = paired_f1_difference(a, b, truth, block_m=10.0, n_boot=8000, seed=3)
    assert r.f1_a == 1.0 and r.f1_b == pytest.approx(2 / 3)
    assert r.delta_points == pytest.approx(-100 / 3)
    assert r.n_blocks == 4
    # b equals a only in resamples that draw none of the two missed blocks: (2/4)^4 = 1/16
    assert r.share_within_tolerance == pytest.approx(1 / 16, abs=0.01)
    assert r.ci_points[0] == pytest.approx(-100.0) and r.ci_points[1] == 0.0
    assert r.to_dict()["ci_level"] == 0.9


def test_true_positives_count_in_their_reference_block_and_false_positives_in_their_own():
    truth = [box(8.0, 3.5, 11.0, 6.5)]  # centroid x 9.5: block (0, 0)
    match = box(8.8, 3.5, 11.8, 6.5)  # IoU 0.58 with it, centroid x 10.3: block (1, 0)
    false_pos = box(0.0, 0.0, 1.0, 1.0)  # block (0, 0); sets the origin at (0, 0)
    (c,), blocks = block_counts([[match, false_pos]], truth, block_m=10.0)
    assert blocks == [(0, 0), (1, 0)]
    assert c.tp.tolist() == [1.0, 0.0]  # the true positive sits in its reference's block
    assert c.n_pred.tolist() == [1.0, 1.0] and c.n_truth.tolist() == [1.0, 0.0]
    weights = np.array([[2.0, 0.0], [0.0, 2.0]])  # two resamples: block (0, 0) twice, block (1, 0) twice
    assert np.allclose(c.f1(weights), [2 * 2 / (2 + 2), 0.0])
    assert c.f1() == pytest.approx(2 * 1 / (2 + 1))


def test_no_crowns_at_all_gives_zero_without_failing():
    r = paired_f1_difference([], [], [], n_boot=10)
    assert (r.f1_a, r.f1_b, r.delta_points, r.n_blocks) == (0.0, 0.0, 0.0, 0)
