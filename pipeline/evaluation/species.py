"""Species classification accuracy: overall accuracy, per-class precision/recall/F1, macro-F1, confusion.

Pure numpy (no torch). Labels are class names; predictions may include ``"unknown"`` (below the model's
threshold), which counts as wrong for every reference class and gets its own confusion-matrix column.
Macro-F1 is the unweighted mean of per-class F1 over the reference classes (a class with no reference and
no prediction is left out).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path

UNKNOWN = "unknown"


@dataclass(frozen=True)
class SpeciesMetrics:
    """Accuracy figures of one evaluation. ``confusion[i][j]``: reference ``classes[i]`` predicted as
    ``columns[j]`` (``columns`` = ``classes`` plus ``"unknown"``)."""

    n: int
    accuracy: float
    macro_f1: float
    unknown_rate: float
    classes: list[str]
    columns: list[str]
    precision: dict[str, float]
    recall: dict[str, float]
    f1: dict[str, float]
    support: dict[str, int]
    confusion: list[list[int]]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> dict[str, float]:
        """The short form stored in model metadata (``validation_metrics``)."""
        return {
            "n": self.n,
            "accuracy": round(self.accuracy, 4),
            "macro_f1": round(self.macro_f1, 4),
            "unknown_rate": round(self.unknown_rate, 4),
        }


def species_metrics(
    truth: Sequence[str], pred: Sequence[str], classes: Sequence[str] | None = None
) -> SpeciesMetrics:
    """Metrics of predicted vs reference species names (same order). ``classes`` defaults to the sorted
    reference and predicted names (without ``"unknown"``)."""
    truth = [str(t) for t in truth]
    pred = [str(p) for p in pred]
    if len(truth) != len(pred):
        raise ValueError(f"{len(truth)} reference labels but {len(pred)} predictions")
    if classes is None:
        classes = sorted((set(truth) | set(pred)) - {UNKNOWN})
    classes = [str(c) for c in classes]
    columns = classes + [UNKNOWN]
    col_of = {c: i for i, c in enumerate(columns)}
    k = len(classes)
    cm = np.zeros((k, k + 1), dtype=np.int64)
    for t, p in zip(truth, pred, strict=True):
        if t not in col_of or t == UNKNOWN:
            raise ValueError(f"reference label {t!r} is not one of the classes {classes}")
        cm[col_of[t], col_of.get(p, k)] += 1
    tp = np.diag(cm[:, :k]).astype(float)
    support = cm.sum(axis=1)
    predicted = cm[:, :k].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (support > 0) | (predicted > 0)
    n = int(cm.sum())
    return SpeciesMetrics(
        n=n,
        accuracy=float(tp.sum() / n) if n else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        unknown_rate=float(cm[:, k].sum() / n) if n else 0.0,
        classes=classes,
        columns=columns,
        precision={c: float(v) for c, v in zip(classes, precision, strict=True)},
        recall={c: float(v) for c, v in zip(classes, recall, strict=True)},
        f1={c: float(v) for c, v in zip(classes, f1, strict=True)},
        support={c: int(v) for c, v in zip(classes, support, strict=True)},
        confusion=cm.tolist(),
    )


def metrics_markdown(m: SpeciesMetrics, title: str = "Species classification") -> str:
    """A markdown report: headline figures, per-class table and the confusion matrix."""
    lines = [
        f"### {title}",
        "",
        f"n = {m.n}, accuracy = {m.accuracy:.3f}, macro-F1 = {m.macro_f1:.3f}, "
        f"unknown = {m.unknown_rate:.1%}",
        "",
        "| species | precision | recall | F1 | n |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in m.classes:
        lines.append(f"| {c} | {m.precision[c]:.3f} | {m.recall[c]:.3f} | {m.f1[c]:.3f} | {m.support[c]} |")
    lines += [
        "",
        "Confusion matrix (rows: reference, columns: predicted):",
        "",
        "| reference \\ predicted | " + " | ".join(m.columns) + " |",
        "|---|" + "---:|" * len(m.columns),
    ]
    for c, row in zip(m.classes, m.confusion, strict=True):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_species_report(
    m: SpeciesMetrics,
    json_path: str | os.PathLike,
    md_path: str | os.PathLike | None = None,
    extra: dict | None = None,
) -> None:
    """Write the metrics as JSON (plus ``extra`` keys, e.g. the command) and optionally as markdown."""
    payload = dict(extra or {})
    payload["species"] = m.to_dict()
    with atomic_path(Path(json_path)) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    if md_path is not None:
        with atomic_path(Path(md_path)) as tmp:
            tmp.write_text(metrics_markdown(m))
