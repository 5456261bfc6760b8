"""Sleeping experts (issue 21): the update on known-answer sequences, the experts, tile selection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.active_learning import (
    combine,
    count_instability,
    default_eta,
    novelty,
    percentile_scores,
    predictive_entropy,
    select_tiles,
    sleeping_update,
    tile_features,
    view_disagreement,
)

NAN = float("nan")


def test_update_known_answer_with_a_sleeping_expert():
    # eta = ln 2: an awake expert's weight is halved per unit of loss, then the awake total is restored
    w = sleeping_update([0.5, 0.25, 0.25], [0.8, NAN, 0.2], outcome=0.8, eta=math.log(2))
    a, c = 0.5 * 2 ** -0.0, 0.25 * 2 ** -0.6  # losses |0.8-0.8| = 0, |0.2-0.8| = 0.6
    scale = 0.75 / (a + c)
    assert w == pytest.approx([a * scale, 0.25, c * scale], abs=1e-12)
    assert w == pytest.approx([0.563962, 0.25, 0.186038], abs=1e-6)
    assert w[1] == 0.25  # the sleeping expert is neither rewarded nor punished
    assert sum(w) == pytest.approx(1.0)


def test_update_sequence_rewards_the_expert_that_predicts_the_error():
    # expert 0 always says what the error will be, expert 1 the opposite, expert 2 sleeps every other round
    w = np.ones(3) / 3
    outcomes = [0.9, 0.1, 0.8, 0.2, 1.0, 0.0]
    for t, y in enumerate(outcomes):
        scores = [y, 1 - y, NAN if t % 2 else 0.5]
        w = sleeping_update(w, scores, y, eta=1.0)
    # expert 0: never any loss; expert 1: losses 0.8, 0.8, 0.6, 0.6, 1.0, 1.0
    assert w[0] > w[2] > w[1]
    ratio = w[1] / w[0]  # both awake every round: their ratio is exp(-eta * (sum of loss differences))
    assert ratio == pytest.approx(math.exp(-(0.8 + 0.8 + 0.6 + 0.6 + 1.0 + 1.0)), rel=1e-9)
    # a round where everyone sleeps changes nothing
    assert sleeping_update(w, [NAN, NAN, NAN], 0.5, 1.0) == pytest.approx(w)


def test_percentiles_and_combination_ignore_sleeping_experts():
    raw = np.array([[1.0, NAN], [3.0, 5.0], [2.0, NAN], [2.0, 1.0]])
    pct = percentile_scores(raw)
    assert pct[:, 0] == pytest.approx([0.0, 1.0, 0.5, 0.5])  # ties share their mean rank
    assert np.isnan(pct[0, 1]) and pct[1, 1] == 1.0 and pct[3, 1] == 0.0
    comb = combine([0.75, 0.25], pct)
    assert comb[0] == pytest.approx(0.0)  # only expert 0 awake: its score alone
    assert comb[1] == pytest.approx(1.0)
    assert comb[3] == pytest.approx(0.75 * 0.5 + 0.25 * 0.0)
    assert np.isnan(combine([1, 1], np.array([[NAN, NAN]])))[0]


def test_default_eta():
    assert default_eta(4, 8) == pytest.approx(math.sqrt(8 * math.log(4) / 8))


def test_selection_learns_from_revealed_labels():
    rng = np.random.default_rng(0)
    n = 40
    error = rng.random(n)
    raw = np.stack([error + 0.01 * rng.random(n),  # expert 0 ranks the tiles by the true error
                    1 - error,  # expert 1 ranks them backwards
                    np.where(np.arange(n) % 2 == 0, rng.random(n), NAN)], 1)  # expert 2: noise, half asleep
    sel = select_tiles(raw, 6, "sleeping", reveal=lambda i: float(error[i]), prior=[0.1, 0.8, 0.1], eta=4.0)
    w = np.array(sel.weights)
    assert w.shape == (7, 3) and sel.outcomes == pytest.approx([error[i] for i in sel.order])
    assert w[-1, 0] > w[0, 0] and w[-1, 1] < w[0, 1]  # trust moved from the wrong to the right expert
    assert np.mean(error[sel.order[3:]]) > np.mean(error)  # later picks are the high-error tiles
    assert len(set(sel.order)) == 6
    g = select_tiles(raw, 3, "greedy", expert=0)
    assert g.order == list(np.argsort(-raw[:, 0])[:3])
    u1, u2 = select_tiles(raw, 5, "uniform", seed=3), select_tiles(raw, 5, "uniform", seed=3)
    assert u1.order == u2.order and select_tiles(raw, 5, "uniform", seed=4).order != u1.order
    with pytest.raises(ValueError):
        select_tiles(raw, 2, "best")


def test_selection_spreads_over_neighbours_while_it_can():
    raw = np.array([[0.9], [0.8], [0.1], [0.0]])
    near = {(0, 1), (1, 0)}
    sel = select_tiles(raw, 3, "greedy", exclude=lambda a, b: (a, b) in near)
    assert sel.order == [0, 2, 3]
    sel = select_tiles(raw, 4, "greedy", exclude=lambda a, b: (a, b) in near)
    assert sel.order == [0, 2, 3, 1]  # nothing else left: the neighbour comes back


def test_experts_on_known_probabilities():
    valid = np.ones((4, 4), bool)
    certain = np.zeros((3, 4, 4))
    certain[0] = 1.0
    uniform = np.full((3, 4, 4), 1 / 3)
    assert predictive_entropy(certain, valid) == pytest.approx(0.0, abs=1e-5)
    assert predictive_entropy(uniform, valid) == pytest.approx(1.0)
    assert np.isnan(predictive_entropy(uniform, np.zeros((4, 4), bool)))  # asleep: nothing valid
    crown = np.zeros((3, 4, 4))
    crown[1] = 1.0
    assert view_disagreement([certain, crown], valid) == pytest.approx(0.5)
    assert np.isnan(view_disagreement([certain], valid))
    assert count_instability([10, 10, 10, 10]) == 0.0
    assert count_instability([4, 6]) == pytest.approx(0.2)
    assert np.isnan(count_instability([1, 0, 1, 0]))  # too few crowns to count: asleep


def test_novelty_against_a_reference_set():
    ref = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    d = novelty(np.array([[0.0, 0.0], [3.0, 0.0]]), ref)
    assert d[0] == 0.0 and d[1] == pytest.approx(4.0)  # 2 units away, reference SD 0.5
    assert np.isnan(novelty(np.array([[0.0, 0.0]]), None)).all()
    rgb = np.zeros((3, 8, 8), np.uint8)
    rgb[1] = 200
    f = tile_features(rgb, np.ones((8, 8), bool))
    assert f.shape == (15,) and f[1] == pytest.approx(200 / 255) and f[12] == pytest.approx(2 * 200 / 255)
