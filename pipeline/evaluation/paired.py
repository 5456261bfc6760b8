"""Paired comparison of two crown models on one reference: the F1 difference with a spatial block bootstrap.

One orthomosaic with a few dozen reference crowns gives an F1 whose sampling error is larger than the
differences a compression study looks for (one crown of 61 is ~1.6 F1 points). Both models are matched to
the same references once (``match_crowns``, Hungarian on IoU); every true positive, false positive and
reference is then counted in the square block (``block_m``, CRS units, metres for a projected CRS) holding
its centroid (a true positive in its reference's block). Resampling blocks with replacement, the same
blocks for both models, gives the distribution of F1(b) - F1(a) that keeps the spatial correlation of
errors within a block and the pairing of the two models on the same trees (Künsch's block bootstrap).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from shapely.geometry.base import BaseGeometry

from pipeline.evaluation.crowns import match_crowns


@dataclass(frozen=True)
class BlockCounts:
    """Per-block counts of one model against the reference (arrays over the same blocks)."""

    tp: np.ndarray
    n_pred: np.ndarray
    n_truth: np.ndarray

    def f1(self, weights: np.ndarray | None = None) -> np.ndarray | float:
        """F1 = 2 TP / (predictions + references), over blocks weighted by ``weights`` [n_boot, n_blocks]
        (each row one resample) or over all blocks once."""
        if weights is None:
            den = self.n_pred.sum() + self.n_truth.sum()
            return float(2 * self.tp.sum() / den) if den else 0.0
        den = weights @ (self.n_pred + self.n_truth)
        return np.divide(2 * (weights @ self.tp), den, out=np.zeros(len(weights)), where=den > 0)


def _block_of(geoms: Sequence[BaseGeometry], origin: tuple[float, float], block_m: float) -> list[tuple]:
    cs = [g.centroid for g in geoms]
    return [(int((c.x - origin[0]) // block_m), int((c.y - origin[1]) // block_m)) for c in cs]


def block_counts(
    preds: Sequence[Sequence[BaseGeometry]],
    truth: Sequence[BaseGeometry],
    block_m: float,
    iou_threshold: float = 0.4,
) -> tuple[list[BlockCounts], list[tuple[int, int]]]:
    """Counts of each prediction set in the blocks holding any prediction or reference -> (counts, blocks)."""
    allg = [g for p in preds for g in p] + list(truth)
    if not allg:
        return [BlockCounts(np.zeros(0), np.zeros(0), np.zeros(0)) for _ in preds], []
    origin = (min(g.bounds[0] for g in allg), min(g.bounds[1] for g in allg))
    truth_blocks = _block_of(truth, origin, block_m)
    pred_blocks = [_block_of(p, origin, block_m) for p in preds]
    blocks = sorted(set(truth_blocks).union(*pred_blocks))
    index = {b: i for i, b in enumerate(blocks)}
    n_truth = np.bincount([index[b] for b in truth_blocks], minlength=len(blocks)).astype(float)
    out = []
    for p, pb in zip(preds, pred_blocks, strict=True):
        _, ti, vals = match_crowns(list(p), list(truth))
        tp_blocks = [index[truth_blocks[j]] for j in ti[vals >= iou_threshold]]
        out.append(
            BlockCounts(
                tp=np.bincount(tp_blocks, minlength=len(blocks)).astype(float),
                n_pred=np.bincount([index[b] for b in pb], minlength=len(blocks)).astype(float),
                n_truth=n_truth,
            )
        )
    return out, blocks


@dataclass(frozen=True)
class PairedF1:
    """F1 of models a and b on one reference, the difference b - a in F1 points, its bootstrap interval,
    and the bootstrap share of resamples where b is within ``tolerance_points`` of a (or better)."""

    f1_a: float
    f1_b: float
    delta_points: float
    ci_points: tuple[float, float]
    ci_level: float
    share_within_tolerance: float
    tolerance_points: float
    n_blocks: int
    block_m: float
    n_boot: int
    iou_threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_f1_difference(
    pred_a: Sequence[BaseGeometry],
    pred_b: Sequence[BaseGeometry],
    truth: Sequence[BaseGeometry],
    block_m: float = 10.0,
    iou_threshold: float = 0.4,
    n_boot: int = 4000,
    ci_level: float = 0.9,
    tolerance_points: float = 1.0,
    seed: int = 0,
) -> PairedF1:
    """F1(b) - F1(a) at ``iou_threshold`` with a paired spatial block bootstrap (module docstring).

    Geometries share one projected CRS; ``block_m`` is the block side in its units (m).
    """
    (a, b), _ = block_counts([pred_a, pred_b], truth, block_m, iou_threshold)
    return paired_from_counts(a, b, block_m, iou_threshold, n_boot, ci_level, tolerance_points, seed)


def paired_from_counts(
    a: BlockCounts,
    b: BlockCounts,
    block_m: float,
    iou_threshold: float = 0.4,
    n_boot: int = 4000,
    ci_level: float = 0.9,
    tolerance_points: float = 1.0,
    seed: int = 0,
) -> PairedF1:
    """F1(b) - F1(a) with its paired bootstrap over the blocks of ``a`` and ``b`` (the same blocks: map
    squares of ``block_m``, or whole plots of a multi-image evaluation, recorded with ``block_m`` 0)."""
    rng = np.random.default_rng(seed)
    n = len(a.tp)
    if n:
        draws = rng.integers(0, n, size=(n_boot, n))
        weights = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(float)
        delta = 100.0 * (b.f1(weights) - a.f1(weights))
    else:
        delta = np.zeros(n_boot)
    tail = (1.0 - ci_level) / 2.0
    lo, hi = np.quantile(delta, [tail, 1.0 - tail])
    return PairedF1(
        f1_a=a.f1(),
        f1_b=b.f1(),
        delta_points=100.0 * (b.f1() - a.f1()),
        ci_points=(float(lo), float(hi)),
        ci_level=ci_level,
        share_within_tolerance=float(np.mean(delta >= -tolerance_points)),
        tolerance_points=tolerance_points,
        n_blocks=n,
        block_m=block_m,
        n_boot=n_boot,
        iou_threshold=iou_threshold,
    )


def paired_markdown(p: dict) -> str:
    """Markdown section of a paired comparison (``PairedF1.to_dict()`` plus ``baseline_model``)."""
    lo, hi = p["ci_points"]
    return (
        f"## Against the baseline `{p.get('baseline_model', 'a')}`\n\n"
        f"F1@{p['iou_threshold']:g}: {p['f1_b']:.3f} against {p['f1_a']:.3f}, a difference of "
        f"{p['delta_points']:+.1f} F1 points ({100 * p['ci_level']:.0f} % interval {lo:+.1f} to {hi:+.1f}; "
        f"paired block bootstrap, {p['n_blocks']} blocks of {p['block_m']:g} m, {p['n_boot']} resamples). "
        f"Within {p['tolerance_points']:g} point of the baseline or better in "
        f"{100 * p['share_within_tolerance']:.0f} % of resamples.\n"
    )
