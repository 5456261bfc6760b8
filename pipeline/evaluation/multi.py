"""Crown evaluation over many images: a multi-image DeepForest CSV scored per image, per site and pooled.

The CSV has ``image_path,xmin,ymin,xmax,ymax`` (``label`` optional), boxes in pixel coordinates of their
image (origin top-left), image paths relative to the CSV's folder, and optionally ``site`` and ``plot``
columns (rows without a site count under ``unknown``; without a plot, the image's file stem is its plot).
A row with empty box columns is an image with no reference crown.

Each image goes through the engine's crown stages (:func:`pipeline.evaluation.run.predict_crowns_on_image`,
the ``forest-inventory run`` code path); the predicted crowns are mapped back to the image's pixel grid
with the inverse of its geotransform (the same transform ``reference.py`` uses the other way) and their
envelopes are matched to the reference boxes (Hungarian on IoU, :func:`crown_metrics`). Per-site and pooled
precision / recall / F1 sum TP, FP and FN over the images (micro-average), so an image with many crowns
weighs more than one with few.

With a baseline model (``compare_to``) the pooled F1@0.4 difference gets a paired bootstrap interval that
resamples plots (both flights of a plot together), :func:`pipeline.evaluation.paired.paired_from_counts`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from shapely.affinity import affine_transform
from shapely.geometry import box as shapely_box

from pipeline.errors import InputError
from pipeline.evaluation.crowns import DEFAULT_THRESHOLDS, crown_metrics, write_metrics
from pipeline.evaluation.paired import BlockCounts, paired_from_counts

BOX_COLUMNS = ["xmin", "ymin", "xmax", "ymax"]
UNKNOWN_SITE = "unknown"
SUBSETS = ("validation", "train")


@dataclass
class ImageBoxes:
    """Reference boxes of one image: ``boxes`` [n, 4] xmin, ymin, xmax, ymax in pixels (origin top-left)."""

    image: Path
    site: str
    plot: str
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))


def _text(value: Any, default: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return default
    return str(value).strip()


def read_box_table(csv: str | os.PathLike) -> list[ImageBoxes]:
    """Images of a multi-image DeepForest CSV with their boxes, site and plot, in first-seen order."""
    csv = Path(csv)
    if not csv.is_file():
        raise InputError(f"{csv}: reference CSV not found; pass a DeepForest CSV "
                         "(image_path,xmin,ymin,xmax,ymax[,label,site,plot]) to --truth")
    try:
        df = pd.read_csv(csv)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{csv}: cannot read the CSV ({str(exc).splitlines()[0]}); expected columns "
                         "image_path,xmin,ymin,xmax,ymax[,label,site,plot]") from None
    missing = [c for c in ["image_path", *BOX_COLUMNS] if c not in df.columns]
    if missing:
        raise InputError(f"{csv}: missing column(s) {', '.join(missing)}; a DeepForest CSV needs "
                         "image_path,xmin,ymin,xmax,ymax (label, site, plot optional)")
    try:
        coords = df[BOX_COLUMNS].apply(pd.to_numeric, errors="raise").to_numpy(float)
    except (ValueError, TypeError):
        raise InputError(f"{csv}: xmin,ymin,xmax,ymax must be numbers (pixel coordinates); fix the "
                         "non-numeric rows") from None
    out: dict[str, ImageBoxes] = {}
    boxes: dict[str, list[np.ndarray]] = {}
    for i, row in enumerate(df.itertuples(index=False)):
        name = _text(row.image_path, "")
        if not name:
            raise InputError(f"{csv}: row {i + 2} has an empty image_path; give every row its image")
        if name not in out:
            site = _text(getattr(row, "site", None), UNKNOWN_SITE)
            plot = _text(getattr(row, "plot", None), Path(name).stem)
            out[name] = ImageBoxes(csv.parent / name, site, plot)
            boxes[name] = []
        b = coords[i]
        if np.all(np.isfinite(b)) and b[2] > b[0] and b[3] > b[1]:
            boxes[name].append(b)
    for name, ib in out.items():
        if boxes[name]:
            ib.boxes = np.stack(boxes[name])
    return list(out.values())


def read_split(path: str | os.PathLike, subset: str = "validation") -> list[str]:
    """Plot ids of ``subset`` in a split file: JSON ``{"validation": [plot, ...], "train": [...]}``."""
    path = Path(path)
    if subset not in SUBSETS:
        raise InputError(f"--subset {subset!r}: use one of {', '.join(SUBSETS)}")
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: split file not found; pass the committed split JSON to --split") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON split file ({exc}); expected "
                         '{"validation": [plot ids], "train": [plot ids]}') from None
    plots = split.get(subset) if isinstance(split, dict) else None
    if not isinstance(plots, list) or not all(isinstance(p, str) for p in plots):
        raise InputError(f'{path}: no list of plot ids under "{subset}"; expected '
                         '{"validation": [plot ids], "train": [plot ids]}')
    return plots


def select_images(
    images: Sequence[ImageBoxes], plots: Iterable[str] | None, source: str | os.PathLike
) -> tuple[list[ImageBoxes], list[str]]:
    """Images whose plot (or image file stem) is in ``plots`` (all when None) -> (images, plots not found).

    ``source`` (the CSV) names the file in the error when nothing matches."""
    if plots is None:
        return list(images), []
    wanted = list(dict.fromkeys(plots))
    keys = set(wanted)
    chosen = [im for im in images if im.plot in keys or im.image.stem in keys]
    found = {im.plot for im in chosen} | {im.image.stem for im in chosen}
    if not chosen:
        raise InputError(f"{source}: none of the {len(wanted)} selected plots ({', '.join(wanted[:5])}"
                         f"{', ...' if len(wanted) > 5 else ''}) is in its plot column or image names; "
                         "check the split file or --plots against the CSV")
    return chosen, [p for p in wanted if p not in found]


def _image_grid(image: str | os.PathLike):
    """(affine transform, CRS) of ``image`` (pixel grid, origin top-left; CRS None when not georeferenced)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(image) as ds:
            return ds.transform, ds.crs


def crowns_to_pixel_boxes(crowns, image: str | os.PathLike) -> list:
    """Envelopes (shapely boxes) of predicted crowns in the pixel grid of ``image`` (origin top-left).

    ``crowns`` is a GeoDataFrame; it is brought to the image's CRS, then through the inverse geotransform."""
    transform, crs = _image_grid(image)
    if not len(crowns):
        return []
    if crs is not None and crowns.crs is not None and not crowns.crs.equals(crs):
        crowns = crowns.to_crs(crs)
    inv = ~transform
    coeffs = [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f]
    return [shapely_box(*affine_transform(g, coeffs).bounds) for g in crowns.geometry if not g.is_empty]


def truth_boxes(boxes: np.ndarray) -> list:
    """Reference boxes [n, 4] (pixels) as shapely boxes."""
    return [shapely_box(*b) for b in np.asarray(boxes, float).reshape(-1, 4)]


def score_boxes(
    pred: Sequence, truth: Sequence, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[str, dict[str, float]]:
    """TP / FP / FN and P / R / F1 at each IoU threshold of one image's boxes (``{"0.4": {...}, ...}``)."""
    m = crown_metrics(pred, truth, thresholds)
    return {k: {c: v[c] for c in ("tp", "fp", "fn", "precision", "recall", "f1")}
            for k, v in m["thresholds"].items()}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0}


def aggregate_scores(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-site and pooled scores from per-image records (``site``, ``n_pred``, ``n_truth``, ``thresholds``
    as from :func:`score_boxes`): TP, FP and FN are summed over the images, then P / R / F1 computed.

    Returns ``{"sites": {site: summary}, "pooled": summary}``; a summary has ``n_images``, ``n_pred``,
    ``n_truth`` and ``thresholds`` (``{"0.4": {tp, fp, fn, precision, recall, f1}, ...}``)."""

    def summary(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        thr = list(rs[0]["thresholds"]) if rs else [f"{t:g}" for t in DEFAULT_THRESHOLDS]
        tot = {t: [sum(int(r["thresholds"][t][c]) for r in rs) for c in ("tp", "fp", "fn")] for t in thr}
        return {"n_images": len(rs), "n_pred": sum(int(r["n_pred"]) for r in rs),
                "n_truth": sum(int(r["n_truth"]) for r in rs),
                "thresholds": {t: _prf(*tot[t]) for t in thr}}

    sites: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        sites.setdefault(str(r.get("site") or UNKNOWN_SITE), []).append(r)
    return {"sites": {s: summary(rs) for s, rs in sorted(sites.items())}, "pooled": summary(list(records))}


def _work_name(i: int, image: Path) -> str:
    return f"{i:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', image.stem)}"


def predict_boxes_on_images(
    images: Sequence[ImageBoxes],
    work_dir: str | os.PathLike,
    crown_model: str | os.PathLike | None = None,
    threads: int | None = None,
    bands: tuple[int, int, int] | None = None,
    postprocess: dict[str, float] | None = None,
    tta: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[list[list], dict[str, Any], list[float]]:
    """Predicted crown envelopes (pixel boxes) of every image, each through the engine in its own folder
    under ``work_dir`` -> (boxes per image, the model record of the first image, the predicted crown
    polygons' area per image in m²)."""
    from pipeline.evaluation.run import predict_crowns_on_image

    out, model, areas = [], {}, []
    for i, im in enumerate(images):
        if progress:
            progress(i, len(images), im.image.name)
        crowns, rec = predict_crowns_on_image(im.image, Path(work_dir) / _work_name(i, im.image), crown_model,
                                              threads, bands, postprocess, tta)
        out.append(crowns_to_pixel_boxes(crowns, im.image))
        areas.append(float(crowns.geometry.area.sum()) if len(crowns) else 0.0)
        model = model or {k: v for k, v in rec.items() if k not in ("crs", "seconds")}
        model["seconds"] = round(model.get("seconds", 0.0) + rec["seconds"], 2)
    if progress:
        progress(len(images), len(images), "")
    return out, model, areas


def reference_crown_area_m2(image: str | os.PathLike, boxes: np.ndarray) -> float:
    """Area (m²) of the ellipses inscribed in an image's reference boxes (pixels): the crowns the boxes
    stand for, in the units of the image's projected CRS."""
    t, _ = _image_grid(image)
    px_area = abs(t.a * t.e - t.b * t.d)
    b = np.asarray(boxes, float).reshape(-1, 4)
    return float(np.pi / 4 * ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sum() * px_area)


def score_images(
    images: Sequence[ImageBoxes], preds: Sequence[Sequence], thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[str, Any]:
    """Per-image, per-site and pooled scores of predicted pixel boxes against each image's references."""
    records = []
    for im, pred in zip(images, preds, strict=True):
        records.append({"image": str(im.image), "site": im.site, "plot": im.plot, "n_pred": len(pred),
                        "n_truth": len(im.boxes),
                        "thresholds": score_boxes(pred, truth_boxes(im.boxes), thresholds)})
    return {"images": records, **aggregate_scores(records)}


def _plot_counts(images: Sequence[ImageBoxes], preds: Sequence[Sequence], iou: float) -> BlockCounts:
    """TP / predictions / references per plot (plots in first-seen order) at IoU ``iou``."""
    plots = list(dict.fromkeys(im.plot for im in images))
    index = {p: i for i, p in enumerate(plots)}
    tp, n_pred, n_truth = (np.zeros(len(plots)) for _ in range(3))
    key = f"{iou:g}"
    for im, pred in zip(images, preds, strict=True):
        s = score_boxes(pred, truth_boxes(im.boxes), (iou,))[key]
        j = index[im.plot]
        tp[j] += s["tp"]
        n_pred[j] += len(pred)
        n_truth[j] += len(im.boxes)
    return BlockCounts(tp=tp, n_pred=n_pred, n_truth=n_truth)


def evaluate_crowns_on_csv(
    csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    crown_model: str | os.PathLike | None = None,
    plots: Iterable[str] | None = None,
    threads: int | None = None,
    bands: tuple[int, int, int] | None = None,
    postprocess: dict[str, float] | None = None,
    tta: bool = False,
    compare_to: str | os.PathLike | None = None,
    selection: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Score the crown model on every image of a multi-image DeepForest CSV (or the images of ``plots``).

    Writes ``crown_metrics.json`` / ``.md`` into ``out_dir`` (engine work files under ``out_dir/images``)
    and returns the metrics: ``images`` (per image), ``sites`` (per site), ``pooled``, the headline
    ``f1_iou0.4`` / ``f1_iou0.5`` (pooled), ``missing_plots`` (selected plots not in the CSV) and, with
    ``compare_to``, ``baseline`` (the same figures for that model) and ``paired`` (pooled F1@0.4 difference,
    plot bootstrap). ``selection`` is a free-text note of how the plots were chosen (recorded)."""
    csv = Path(csv)
    images, missing = select_images(read_box_table(csv), plots, csv)
    if not images:
        raise InputError(f"{csv}: no rows; give one row per reference box (image_path,xmin,ymin,xmax,ymax)")
    absent = [str(im.image) for im in images if not im.image.is_file()]
    if absent:
        raise InputError(f"{csv}: {len(absent)} image(s) not found, e.g. {absent[0]}; image_path is "
                         "relative to the CSV's folder")
    out_dir = Path(out_dir)
    preds, model, areas = predict_boxes_on_images(images, out_dir / "images", crown_model, threads, bands,
                                                  postprocess, tta, progress)
    result: dict[str, Any] = {"truth": str(csv), "selection": selection, "missing_plots": missing,
                              **model, "headline": "box", **score_images(images, preds)}
    for rec, im, area in zip(result["images"], images, areas, strict=True):  # detection-error calibration
        rec["pred_crown_area_m2"] = area
        rec["truth_crown_area_m2"] = reference_crown_area_m2(im.image, im.boxes)
    result["f1_iou0.4"] = result["pooled"]["thresholds"]["0.4"]["f1"]
    result["f1_iou0.5"] = result["pooled"]["thresholds"]["0.5"]["f1"]
    if compare_to is not None:
        base_preds, base_model, _ = predict_boxes_on_images(images, out_dir / "baseline", compare_to, threads,
                                                         bands, postprocess, tta, progress)
        base = score_images(images, base_preds)
        result["baseline"] = {"crown_model": base_model["crown_model"],
                              "crown_model_version": base_model["crown_model_version"],
                              "sites": base["sites"], "pooled": base["pooled"]}
        paired = paired_from_counts(_plot_counts(images, base_preds, 0.4), _plot_counts(images, preds, 0.4),
                                    block_m=0.0, iou_threshold=0.4).to_dict()
        result["paired"] = {"baseline_model": str(compare_to), "blocks": "plots", **paired}
    result = json.loads(json.dumps(result, default=float))
    write_metrics(result, out_dir, "crown_metrics", multi_markdown(result))
    return result


def multi_markdown(result: dict[str, Any]) -> str:
    """Markdown report of :func:`evaluate_crowns_on_csv`: per-site and pooled table, then per image."""
    lines = [
        "# Crown evaluation over images",
        "",
        f"Reference `{Path(result['truth']).name}`"
        + (f" ({result['selection']})" if result.get("selection") else "")
        + f", model `{Path(result['crown_model']).name}` ({result['crown_model_version']}) at "
        f"{result['gsd_m']:g} m{', test-time augmentation' if result.get('tta') else ''}; predicted crown "
        "envelopes vs reference boxes in each image's pixel grid, Hungarian matching; per-site and pooled "
        "figures sum TP / FP / FN over the images.",
        "",
        "| site | images | predicted | reference | P@0.4 | R@0.4 | F1@0.4 | P@0.5 | R@0.5 | F1@0.5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [*result["sites"].items(), ("**pooled**", result["pooled"])]
    for site, s in rows:
        t4, t5 = s["thresholds"]["0.4"], s["thresholds"]["0.5"]
        lines.append(
            f"| {site} | {s['n_images']} | {s['n_pred']} | {s['n_truth']} | {t4['precision']:.3f} | "
            f"{t4['recall']:.3f} | {t4['f1']:.3f} | {t5['precision']:.3f} | {t5['recall']:.3f} | "
            f"{t5['f1']:.3f} |"
        )
    if result.get("missing_plots"):
        lines += ["", f"Selected plots not in the CSV: {', '.join(result['missing_plots'])}."]
    if "paired" in result:
        p = result["paired"]
        lo, hi = p["ci_points"]
        lines += ["", f"## Against the baseline `{p['baseline_model']}`", "",
                  f"Pooled F1@0.4: {p['f1_b']:.3f} against {p['f1_a']:.3f}, a difference of "
                  f"{p['delta_points']:+.1f} F1 points ({100 * p['ci_level']:.0f} % interval {lo:+.1f} to "
                  f"{hi:+.1f}; paired bootstrap over {p['n_blocks']} plots, {p['n_boot']} resamples)."]
    lines += ["", "## Per image", "", "| image | site | plot | predicted | reference | TP@0.4 | F1@0.4 |",
              "|---|---|---|---|---|---|---|"]
    for r in result["images"]:
        t4 = r["thresholds"]["0.4"]
        lines.append(f"| {Path(r['image']).name} | {r['site']} | {r['plot']} | {r['n_pred']} | "
                     f"{r['n_truth']} | {t4['tp']} | {t4['f1']:.3f} |")
    return "\n".join(lines) + "\n"
