"""Attach a crown model's detection-error calibration (missed, false, merged crowns) and its validation scores
to its ONNX metadata.

Input: the ``crown_metrics.json`` that ``forest-inventory evaluate --truth CSV --split SPLIT --subset
validation --crown-model M.onnx`` wrote for THIS model on its validation plots. Per plot (the images of a
plot, e.g. two flights, summed), the reference crown area (ellipses inscribed in the reference boxes) and the
area of the detected crown polygons give :func:`pipeline.carbon.detection.calibrate_detection_error`
(quantity ``crown_area``); the result goes into the model's ``detection_calibration`` key, which the carbon
stage applies as one shared factor of the run.

With ``--validation-metrics`` the same evaluate result also becomes the model's ``validation_metrics``
(pooled and per-site P/R/F1 at IoU 0.4 and 0.5, as the engine scores them), so that the report and the
model card quote one figure; the scores the training run stored are kept as ``training_validation_metrics``.

    python -m models.detection_calibration out/eval_val/crown_metrics.json M.onnx --out M.onnx \
        --validation-metrics
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.carbon.detection import calibrate_detection_error
from pipeline.errors import InputError


def plot_crown_areas(metrics: dict[str, Any]) -> tuple[list[str], list[float], list[float]]:
    """(plots, reference m², detected m²) summed per plot from an evaluate result's per-image records."""
    ref: dict[str, float] = {}
    det: dict[str, float] = {}
    for rec in metrics.get("images", []):
        if "truth_crown_area_m2" not in rec or "pred_crown_area_m2" not in rec:
            raise InputError("crown_metrics.json has no crown areas per image; rerun forest-inventory "
                             "evaluate with a multi-image --truth CSV")
        plot = rec.get("plot") or Path(rec["image"]).stem
        ref[plot] = ref.get(plot, 0.0) + float(rec["truth_crown_area_m2"])
        det[plot] = det.get(plot, 0.0) + float(rec["pred_crown_area_m2"])
    plots = sorted(ref)
    return plots, [ref[p] for p in plots], [det[p] for p in plots]


def detection_calibration_from_metrics(metrics: dict[str, Any], source: str = "") -> dict[str, Any]:
    """The ``detection_calibration`` dict of a model from its validation evaluate result."""
    plots, ref, det = plot_crown_areas(metrics)
    cal = calibrate_detection_error(ref, det, quantity="crown_area")
    cal["source"] = source or f"{len(plots)} validation plots: {', '.join(plots)}"
    return cal


def validation_metrics_from_evaluate(metrics: dict[str, Any], command: str = "") -> dict[str, Any]:
    """Flat ``validation_metrics`` (``real_f1_iou0.4``, ``site_HARV_f1_iou0.4``, ...) from an evaluate result
    on the validation plots, with where the figures come from."""
    out: dict[str, Any] = {}

    def put(prefix: str, block: dict[str, Any]) -> None:
        for thr, s in block.get("thresholds", {}).items():
            for key in ("f1", "precision", "recall"):
                out[f"{prefix}_{key}_iou{thr}"] = round(float(s[key]), 4)
        out[f"{prefix}_n_truth"] = int(block.get("n_truth", 0))

    put("real", metrics["pooled"])
    for site, block in sorted(metrics.get("sites", {}).items()):
        put(f"site_{site}", block)
    out["iou"] = "box (predicted crown envelope vs reference box)"
    out["source"] = command or (f"forest-inventory evaluate --truth {metrics.get('truth', '?')} "
                                f"({metrics.get('selection', 'validation plots')}), the engine's tiling and "
                                "seam rule")
    out["postprocess"] = metrics.get("postprocess", {})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", help="crown_metrics.json of `evaluate` on the model's validation plots")
    ap.add_argument("onnx", help="the crown model that was evaluated")
    ap.add_argument("--out", required=True, help="ONNX to write (may be the input)")
    ap.add_argument("--validation-metrics", action="store_true",
                    help="also store the evaluate scores as the model's validation_metrics")
    a = ap.parse_args(argv)
    from models.export import copy_with_metadata

    metrics = json.loads(Path(a.metrics).read_text())
    evaluated = Path(str(metrics.get("crown_model", ""))).name
    if evaluated and evaluated != Path(a.onnx).name:
        raise InputError(f"{a.metrics}: scores {evaluated}, not {Path(a.onnx).name}; evaluate this model "
                         "first")
    cal = detection_calibration_from_metrics(metrics)
    update = {"detection_calibration": json.dumps(cal)}
    if a.validation_metrics:
        from models.export import read_metadata

        old = read_metadata(a.onnx)
        if "validation_metrics" in old and "training_validation_metrics" not in old:
            update["training_validation_metrics"] = old["validation_metrics"]
        update["validation_metrics"] = json.dumps(validation_metrics_from_evaluate(metrics))
    copy_with_metadata(a.onnx, a.out, update)
    print(json.dumps(cal, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
