"""Crown detection accuracy: Hungarian matching on IoU (the NeonTreeEvaluation convention).

Predicted and reference crowns are shapely polygons in one CRS. The one-to-one assignment maximising total
IoU is found with ``scipy.optimize.linear_sum_assignment``; an assigned pair is a true positive when its
IoU is >= the threshold. Precision = TP / predictions, recall = TP / references, F1 their harmonic mean.
Crown-area error is computed over the true positives at the first threshold (relative error of predicted
vs reference area); pixel IoU compares the union of predicted crowns with the union of reference crowns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from shapely import STRtree
from shapely.geometry.base import BaseGeometry
from shapely.ops import unary_union

from pipeline.atomic import atomic_path

DEFAULT_THRESHOLDS = (0.4, 0.5)


def iou_matrix(pred: Sequence[BaseGeometry], truth: Sequence[BaseGeometry]) -> np.ndarray:
    """IoU [n_pred, n_truth] of every intersecting pair (0 elsewhere), via an STRtree."""
    m = np.zeros((len(pred), len(truth)))
    if not len(pred) or not len(truth):
        return m
    tree = STRtree(list(truth))
    for i, p in enumerate(pred):
        if p.is_empty:
            continue
        for j in tree.query(p, predicate="intersects"):
            t = truth[int(j)]
            inter = p.intersection(t).area
            if inter > 0:
                m[i, int(j)] = inter / (p.area + t.area - inter)
    return m


def match_crowns(
    pred: Sequence[BaseGeometry], truth: Sequence[BaseGeometry], ious: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one assignment maximising total IoU -> (pred_index, truth_index, iou) of pairs with IoU > 0."""
    ious = iou_matrix(pred, truth) if ious is None else ious
    if ious.size == 0:
        e = np.zeros(0, int)
        return e, e, np.zeros(0)
    rows, cols = linear_sum_assignment(-ious)
    vals = ious[rows, cols]
    keep = vals > 0
    return rows[keep], cols[keep], vals[keep]


def _prf(tp: int, n_pred: int, n_truth: int) -> dict[str, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_truth if n_truth else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"tp": tp, "fp": n_pred - tp, "fn": n_truth - tp, "precision": p, "recall": r, "f1": f1}


def crown_metrics(
    pred: Sequence[BaseGeometry],
    truth: Sequence[BaseGeometry],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, Any]:
    """Detection metrics at each IoU threshold, area error of matched crowns, and pixel IoU.

    Areas are in the polygons' CRS units squared (m² for projected CRSs).
    """
    pred, truth = list(pred), list(truth)
    ious = iou_matrix(pred, truth)
    pi, ti, vals = match_crowns(pred, truth, ious)
    out: dict[str, Any] = {"n_pred": len(pred), "n_truth": len(truth), "thresholds": {}}
    for thr in thresholds:
        tp = int(np.sum(vals >= thr))
        d = _prf(tp, len(pred), len(truth))
        d["mean_iou_tp"] = float(vals[vals >= thr].mean()) if tp else 0.0
        out["thresholds"][f"{thr:g}"] = d
    thr0 = thresholds[0] if thresholds else 0.4
    sel = vals >= thr0
    if sel.any():
        pa = np.array([pred[i].area for i in pi[sel]])
        ta = np.array([truth[j].area for j in ti[sel]])
        rel = (pa - ta) / ta
        out["area_error"] = {
            "iou_threshold": thr0,
            "n": int(sel.sum()),
            "mean_rel": float(rel.mean()),
            "mean_abs_rel": float(np.abs(rel).mean()),
            "median_rel": float(np.median(rel)),
        }
    else:
        out["area_error"] = {
            "iou_threshold": thr0,
            "n": 0,
            "mean_rel": None,
            "mean_abs_rel": None,
            "median_rel": None,
        }
    tot_p = float(sum(g.area for g in pred))
    tot_t = float(sum(g.area for g in truth))
    out["total_area"] = {
        "pred": tot_p,
        "truth": tot_t,
        "rel_error": (tot_p - tot_t) / tot_t if tot_t else None,
    }
    out["pixel_iou"] = pixel_iou(pred, truth)
    return out


def pixel_iou(pred: Sequence[BaseGeometry] | np.ndarray, truth: Sequence[BaseGeometry] | np.ndarray) -> float:
    """IoU of crown cover: boolean masks of equal shape, or polygon lists (union areas)."""
    if isinstance(pred, np.ndarray) and isinstance(truth, np.ndarray):
        inter = np.logical_and(pred, truth).sum()
        union = np.logical_or(pred, truth).sum()
        return float(inter / union) if union else 0.0
    up, ut = unary_union(list(pred)), unary_union(list(truth))
    union = up.union(ut).area
    return float(up.intersection(ut).area / union) if union else 0.0


def metrics_markdown(metrics: dict[str, Any], title: str = "Crown detection") -> str:
    """A small markdown table of the metrics from :func:`crown_metrics`."""
    lines = [
        f"### {title}",
        "",
        f"{metrics['n_pred']} predicted crowns, {metrics['n_truth']} reference crowns.",
        "",
        "| IoU threshold | TP | FP | FN | precision | recall | F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for thr, d in metrics["thresholds"].items():
        lines.append(
            f"| {thr} | {d['tp']} | {d['fp']} | {d['fn']} | {d['precision']:.3f} | {d['recall']:.3f} "
            f"| {d['f1']:.3f} |"
        )
    ae = metrics.get("area_error", {})
    lines.append("")
    if ae.get("n"):
        lines.append(
            f"Crown-area error of the {ae['n']} matches at IoU {ae['iou_threshold']:g}: mean "
            f"{ae['mean_rel']:+.1%}, mean absolute {ae['mean_abs_rel']:.1%}, median {ae['median_rel']:+.1%}."
        )
    ta = metrics.get("total_area", {})
    if ta.get("rel_error") is not None:
        lines.append(
            f"Total crown area: predicted {ta['pred']:.1f}, reference {ta['truth']:.1f} "
            f"({ta['rel_error']:+.1%})."
        )
    lines.append(f"Pixel IoU of crown cover: {metrics['pixel_iou']:.3f}.")
    return "\n".join(lines) + "\n"


def write_metrics(
    metrics: dict[str, Any],
    out_dir: str | os.PathLike,
    stem: str = "crown_metrics",
    markdown: str | None = None,
) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jp, mp = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    with atomic_path(jp) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, default=float))
    with atomic_path(mp) as tmp:
        tmp.write_text(markdown if markdown is not None else metrics_markdown(metrics))
    return jp, mp
