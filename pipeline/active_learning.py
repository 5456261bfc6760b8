"""Which tiles are worth annotating: informativeness experts combined by sleeping experts (issue 21).

Pure numpy; no torch. A *tile* is any image region the user could label (a 51.2 m tile of a flight, a
40 m NEON plot). Each *expert* is one informativeness measure; it gives a raw score per tile or abstains
("sleeps", ``NaN``) on tiles where it has nothing to say (no second model, too few crowns to count, no
training-set features to compare with, a mostly empty tile).

Combination (prediction with sleeping experts, the specialists' multiplicative update): an expert's raw
scores are turned into percentiles among the tiles where it is awake (``[0, 1]``, 1 = most informative by
that measure). A tile's combined score is the weighted mean of its awake experts' percentiles. After a
tile has been labelled, the model's error on it ``y`` in ``[0, 1]`` (1 − F1@0.4 of the crowns) is revealed;
every expert awake on that tile suffers the absolute loss ``|s_i − y|`` (it claimed the tile was
informative with confidence ``s_i``), and the awake experts' weights are multiplied by ``exp(−eta ·
loss)`` and renormalised so that their total is unchanged. Sleeping experts keep their weight: an expert
is judged only on the tiles where it spoke. With ``eta ~ sqrt(8 ln N / T)`` this update has regret
``O(sqrt(T log N))`` against the best expert on the rounds it is awake, whatever the sequence (robust
on adversarial sequences); on easy sequences, where one expert is reliably right, its weight quickly
dominates.

Selection (:func:`select_tiles`): greedy on the combined score, one tile at a time, with an update after
each revealed label when a ``reveal`` callback is given (the experiment), or on the prior weights (the
``suggest`` command before any labels). Baselines: one expert alone (``greedy``) and ``uniform`` random.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

EXPERTS = ("entropy", "tta_disagreement", "model_disagreement", "count_instability", "novelty")
MIN_VALID_FRACTION = 0.2  # an expert sleeps on tiles with less valid (unmasked) area than this
MIN_CROWNS = 2.0  # count instability sleeps below this mean crown count per view


# ------------------------------------------------------------------------------------------ experts


def _foreground(probs: np.ndarray) -> np.ndarray:
    """Crown probability (interior + boundary) [h, w] of a [3, h, w] softmax."""
    return probs[1] + probs[2]


def predictive_entropy(probs: np.ndarray, valid: np.ndarray) -> float:
    """Mean entropy of the class probabilities [C, h, w] over valid pixels, in units of log(C) (0..1);
    NaN (asleep) below :data:`MIN_VALID_FRACTION` valid pixels."""
    if valid.mean() < MIN_VALID_FRACTION:
        return float("nan")
    p = np.clip(probs[:, valid], 1e-7, 1.0)
    return float(np.mean(-(p * np.log(p)).sum(0)) / np.log(probs.shape[0]))


def view_disagreement(view_probs: Sequence[np.ndarray], valid: np.ndarray) -> float:
    """Mean absolute difference of the crown probability between each view and the views' mean (0..1),
    over valid pixels; views are e.g. the TTA views mapped back to the tile grid, or a dense and a
    compressed model. NaN with fewer than two views or too little valid area."""
    if len(view_probs) < 2 or valid.mean() < MIN_VALID_FRACTION:
        return float("nan")
    fg = np.stack([_foreground(p)[valid] for p in view_probs])
    return float(np.mean(np.abs(fg - fg.mean(0))))


def count_instability(counts: Sequence[float]) -> float:
    """Coefficient of variation of the crown counts of several views (std / mean); NaN (asleep) when the
    mean count is under :data:`MIN_CROWNS` (too few crowns for a ratio to mean anything)."""
    c = np.asarray(counts, float)
    if c.size < 2 or c.mean() < MIN_CROWNS:
        return float("nan")
    return float(c.std() / c.mean())


def tile_features(rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Appearance features of a tile (uint8 [3, h, w]): per band mean, std, 10th/90th percentiles (0..1),
    excess-green mean, gradient-magnitude mean and the dark-pixel share. 15 floats; NaN if no valid pixel."""
    if not valid.any():
        return np.full(15, np.nan)
    x = rgb.astype(np.float32) / 255.0
    px = x[:, valid]
    feats = [px.mean(1), px.std(1), np.percentile(px, 10, axis=1), np.percentile(px, 90, axis=1)]
    r, g, b = px
    grey = x.mean(0)
    gy, gx = np.gradient(grey)
    grad = np.hypot(gx, gy)[valid]
    extra = [float(np.mean(2 * g - r - b)), float(grad.mean()), float(np.mean(grey[valid] < 0.2))]
    return np.concatenate([np.concatenate(feats), extra]).astype(np.float64)


def novelty(features: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Distance of each tile's features [n, d] to the nearest reference feature row [m, d] (e.g. the
    training set), in units of the reference's per-feature SD; NaN (asleep) without a reference."""
    features = np.atleast_2d(np.asarray(features, float))
    if reference is None or len(reference) == 0:
        return np.full(len(features), np.nan)
    ref = np.atleast_2d(np.asarray(reference, float))
    sd = ref.std(0)
    sd = np.where(sd > 1e-9, sd, 1.0)
    mu = ref.mean(0)
    a, b = (features - mu) / sd, (ref - mu) / sd
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(1)
    return np.where(np.isfinite(features).all(1), d, np.nan)


# ------------------------------------------------------------------------------------------ combination


def percentile_scores(raw: np.ndarray) -> np.ndarray:
    """Raw scores [n_tiles, n_experts] (NaN = asleep) -> percentiles among each expert's awake tiles, in
    [0, 1] (ties share their mean rank; a single awake tile gets 0.5); NaN stays NaN."""
    raw = np.asarray(raw, float)
    out = np.full(raw.shape, np.nan)
    for j in range(raw.shape[1]):
        awake = np.isfinite(raw[:, j])
        n = int(awake.sum())
        if n == 0:
            continue
        if n == 1:
            out[awake, j] = 0.5
            continue
        ranks = rankdata(raw[awake, j], method="average") - 1.0  # 0-based; ties: mean rank
        out[awake, j] = ranks / (n - 1)
    return out


def combine(weights: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Combined score per tile: the weighted mean of the awake experts' scores [n_tiles, n_experts]; NaN
    where every expert sleeps."""
    scores = np.asarray(scores, float)
    awake = np.isfinite(scores)
    w = np.where(awake, np.asarray(weights, float)[None, :], 0.0)
    tot = w.sum(1)
    num = np.where(awake, scores, 0.0) * w
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, num.sum(1) / tot, np.nan)


def sleeping_update(weights: np.ndarray, scores: np.ndarray, outcome: float, eta: float) -> np.ndarray:
    """One round of the sleeping-experts update on a labelled tile.

    ``scores`` [n_experts]: the experts' scores of that tile in [0, 1] (NaN = asleep); ``outcome`` in
    [0, 1]: the model's revealed error on it. Awake experts lose ``|score - outcome|`` and are reweighted by
    ``exp(-eta * loss)``, rescaled so that the awake experts' total weight is unchanged; asleep experts keep
    their weight. Returns the new weights (the input is not changed)."""
    w = np.asarray(weights, float).copy()
    s = np.asarray(scores, float)
    awake = np.isfinite(s)
    if not awake.any():
        return w
    y = float(np.clip(outcome, 0.0, 1.0))
    loss = np.abs(s[awake] - y)
    new = w[awake] * np.exp(-eta * loss)
    w[awake] = new * (w[awake].sum() / new.sum())
    return w


def default_eta(n_experts: int, rounds: int) -> float:
    """The regret-optimal learning rate of the multiplicative update for ``rounds`` rounds of ``n_experts``
    experts with losses in [0, 1]: ``sqrt(8 ln N / T)``."""
    return float(np.sqrt(8.0 * np.log(max(n_experts, 2)) / max(rounds, 1)))


@dataclass
class Selection:
    """Tiles chosen in order, with each round's combined scores and the weights after each update."""

    order: list[int]
    combined: list[float]  # combined score of each chosen tile when it was chosen
    weights: list[list[float]] = field(default_factory=list)  # weights after each round (round 0: prior)
    outcomes: list[float] = field(default_factory=list)  # revealed errors (reveal given)


def select_tiles(
    raw_scores: np.ndarray,
    k: int,
    method: str = "sleeping",
    reveal: Callable[[int], float] | None = None,
    prior: np.ndarray | None = None,
    eta: float | None = None,
    expert: int = 0,
    seed: int = 0,
    exclude: Callable[[int, int], bool] | None = None,
) -> Selection:
    """Choose ``k`` tiles from raw expert scores [n_tiles, n_experts] (NaN = asleep).

    ``method``: ``sleeping`` (combined score, weights updated after each revealed label), ``greedy`` (the
    raw score of expert column ``expert`` alone; tiles where it sleeps come last, in random order) or
    ``uniform`` (random, seeded). ``reveal(tile) -> error in [0, 1]`` is called after each choice when
    given (only ``sleeping`` uses it for the weights). ``exclude(candidate, chosen)``: True to skip a
    candidate next to an already chosen tile (spatial spread); skipped tiles come back if nothing else is
    left."""
    raw = np.asarray(raw_scores, float)
    n, m = raw.shape
    k = min(k, n)
    rng = np.random.default_rng([seed, 2121])
    pct = percentile_scores(raw)
    w = np.ones(m) / m if prior is None else np.asarray(prior, float) / np.sum(prior)
    eta = default_eta(m, max(k, 1)) if eta is None else eta
    sel = Selection([], [], [w.tolist()])
    if method == "uniform":
        base = rng.random(n)
    elif method == "greedy":
        col = raw[:, expert]
        base = np.where(np.isfinite(col), col, -np.inf)
        tie = rng.random(n) * 1e-9
        base = base + tie
    elif method != "sleeping":
        raise ValueError(f"unknown selection method {method!r}: sleeping, greedy or uniform")
    chosen: set[int] = set()
    for _ in range(k):
        score = combine(w, pct) if method == "sleeping" else base
        score = np.where(np.isfinite(score), score, -np.inf)
        cand = [i for i in np.argsort(-score, kind="mergesort") if i not in chosen]
        if exclude is not None:
            spread = [i for i in cand if not any(exclude(int(i), j) for j in chosen)]
            cand = spread or cand
        t = int(cand[0])
        chosen.add(t)
        sel.order.append(t)
        sel.combined.append(float(score[t]) if np.isfinite(score[t]) else float("nan"))
        if reveal is not None:
            y = float(reveal(t))
            sel.outcomes.append(y)
            if method == "sleeping":
                w = sleeping_update(w, pct[t], y, eta)
        sel.weights.append(w.tolist())
    return sel


def expert_scores(
    view_probs: Sequence[np.ndarray],
    valid: np.ndarray,
    view_counts: Sequence[float],
    second_model_probs: np.ndarray | None = None,
) -> dict[str, float]:
    """Raw scores of one tile for the probability-based experts (novelty is scored over all tiles at once,
    :func:`novelty`): ``view_probs`` the model's softmax [3, h, w] of each TTA view mapped back to the tile
    grid (the first is the identity view), ``view_counts`` the crowns found in each view,
    ``second_model_probs`` a compressed (or other) model's identity-view softmax, or None (that expert
    sleeps)."""
    mean = np.mean(np.stack(view_probs), 0)
    return {
        "entropy": predictive_entropy(mean, valid),
        "tta_disagreement": view_disagreement(view_probs, valid),
        "model_disagreement": (view_disagreement([view_probs[0], second_model_probs], valid)
                               if second_model_probs is not None else float("nan")),
        "count_instability": count_instability(view_counts),
    }
