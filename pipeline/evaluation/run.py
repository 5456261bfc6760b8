"""``forest-inventory evaluate``: run the engine's crown stages on an image, score against references.

The crowns come from the same code path as ``forest-inventory run`` (``pipeline.inventory.validate``,
``infer_group``, ``collect_crowns``), so the figures measure what users get. Species and carbon are not
needed to score crowns and are skipped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from shapely.geometry import box as shapely_box

from pipeline.atomic import atomic_path
from pipeline.errors import InputError
from pipeline.evaluation.crowns import crown_metrics, metrics_markdown, write_metrics
from pipeline.evaluation.paired import paired_f1_difference, paired_markdown
from pipeline.evaluation.reference import read_reference


def predict_crowns_on_image(
    image: str | os.PathLike,
    work_dir: str | os.PathLike,
    crown_model: str | os.PathLike | None = None,
    threads: int | None = None,
    bands: tuple[int, int, int] = (1, 2, 3),
    postprocess: dict[str, float] | None = None,
    tta: bool = False,
):
    """Crown polygons of ``image`` from the engine's crown stages (intermediate tiles under ``work_dir``)
    -> (GeoDataFrame in the image CRS, a record of the model, GSD (m), postprocess, TTA, seconds, CRS)."""
    from pipeline.inventory import InventoryConfig, collect_crowns, infer_group, validate

    t0 = time.time()
    cfg = InventoryConfig(
        ortho=Path(image),
        out_dir=Path(work_dir),
        crown_model=Path(crown_model) if crown_model else None,
        use_species_model=False,
        threads=threads,
        bands=bands,
        postprocess=postprocess or {},
        tta=tta,
        overwrite=True,  # the work folder is scratch, not an inventory: any image may reuse it
    )
    plan = validate(cfg)
    try:
        paths = [infer_group(plan, gi) for gi in range(len(plan.groups))]
        crowns = collect_crowns(plan, paths)
    finally:
        plan.close()
    return crowns, {
        "crown_model": str(plan.crown_model_path),
        "crown_model_version": plan.crown_meta.model_version,
        "crown_model_sha256": plan.models.get(plan.crown_model_path.stem),
        "gsd_m": plan.gsd_m,
        "postprocess": plan.postprocess,
        "tta": tta,
        "seconds": round(time.time() - t0, 2),
        "crs": plan.crs,
    }


def check_truth_overlap(truth: str | os.PathLike, image: str | os.PathLike) -> str | None:
    """Reference crowns must lie on the image: none on it is an InputError (scoring would print F1 0 and
    exit 0); some off it give a warning (returned): they count as missed crowns. Compared in the image's
    own CRS, before any segmentation."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    from pipeline.raster import georeference_hint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(image) as ds:
                crs, bounds, no_georef = ds.crs, ds.bounds, ds.transform.is_identity and not ds.gcps[0]
        except rasterio.errors.RasterioIOError:
            return None  # the engine's own check names the unreadable image
    if no_georef:
        raise InputError(georeference_hint(Path(image)))
    if crs is None:
        return None
    refs, _ = read_reference(truth, image, crs, shape="box")
    if not refs:
        return None
    frame = shapely_box(*bounds)
    on = sum(1 for g in refs if g.intersects(frame))
    if on == 0:
        raise InputError(f"{truth}: none of its {len(refs)} reference crowns overlap the image "
                         f"{Path(image).name}; pass the references of this image (check their CRS or, for "
                         "boxes, the image_path)")
    if on < len(refs):
        return (f"{len(refs) - on} of {len(refs)} reference crowns in {Path(truth).name} lie outside the "
                f"image {Path(image).name}: they count as missed crowns")
    return None


def evaluate_crowns_on_image(
    image: str | os.PathLike,
    truth: str | os.PathLike,
    out_dir: str | os.PathLike,
    crown_model: str | os.PathLike | None = None,
    threads: int | None = None,
    bands: tuple[int, int, int] = (1, 2, 3),
    postprocess: dict[str, float] | None = None,
    tta: bool = False,
    compare_to: str | os.PathLike | None = None,
    block_m: float = 10.0,
) -> dict[str, Any]:
    """Segment ``image`` with the crown model, match crowns to ``truth``, write crown_metrics.json/.md and
    predicted_crowns.geojson into ``out_dir``; return the metrics dict.

    With ``compare_to`` (a baseline crown model, e.g. the dense one beside a compressed one), the headline
    F1@0.4 of this model minus the baseline's is added as ``paired``, with a spatial block bootstrap
    interval over ``block_m`` (m) blocks (``pipeline.evaluation.paired``).

    Box references are scored twice: predicted crown envelopes vs boxes (``box``, the NeonTreeEvaluation
    convention and the headline) and predicted polygons vs the boxes' inscribed ellipses (``ellipse``).
    """
    out_dir = Path(out_dir)
    warning = check_truth_overlap(truth, image)
    crowns, result = predict_crowns_on_image(image, out_dir, crown_model, threads, bands, postprocess, tta)
    seconds = result["seconds"]
    pred = list(crowns.geometry)
    result = {"image": str(image), "truth": str(truth), **result, "scores": {},
              "warnings": [warning] if warning else []}
    crs = result.pop("crs")
    is_boxes = Path(truth).suffix.lower() in {".csv", ".xml"}
    md = []
    if is_boxes:
        ref_box, _ = read_reference(truth, image, crs, shape="box")
        envelopes = [shapely_box(*g.bounds) for g in pred]
        head_pred, head_ref = envelopes, ref_box
        result["scores"]["box"] = crown_metrics(envelopes, ref_box)
        md.append(
            metrics_markdown(
                result["scores"]["box"],
                "Crowns vs reference boxes (predicted envelopes, NeonTreeEvaluation convention)",
            )
        )
        ref_ell, _ = read_reference(truth, image, crs, shape="ellipse")
        result["scores"]["ellipse"] = crown_metrics(pred, ref_ell)
        md.append(
            metrics_markdown(result["scores"]["ellipse"], "Crown polygons vs ellipses inscribed in the boxes")
        )
        result["headline"] = "box"
    else:
        ref, _ = read_reference(truth, image, crs)
        head_pred, head_ref = pred, ref
        result["scores"]["polygon"] = crown_metrics(pred, ref)
        md.append(metrics_markdown(result["scores"]["polygon"], "Crown polygons vs reference polygons"))
        result["headline"] = "polygon"
    head = result["scores"][result["headline"]]["thresholds"]
    result["f1_iou0.4"] = head["0.4"]["f1"]
    result["f1_iou0.5"] = head["0.5"]["f1"]
    if compare_to is not None:
        base, _ = predict_crowns_on_image(image, out_dir, compare_to, threads, bands, postprocess, tta)
        base_pred = list(base.geometry)
        if result["headline"] == "box":
            base_pred = [shapely_box(*g.bounds) for g in base_pred]
        paired = paired_f1_difference(base_pred, head_pred, head_ref, block_m=block_m).to_dict()
        result["paired"] = {"baseline_model": str(compare_to), **paired}
        md.append(paired_markdown(result["paired"]))
    header = (
        f"# Crown evaluation\n\nImage `{Path(image).name}`, reference `{Path(truth).name}`, model "
        f"`{Path(result['crown_model']).name}` ({result['crown_model_version']}) at {result['gsd_m']:g} m; "
        f"segmentation + extraction {seconds:.1f} s"
        f"{' (test-time augmentation: 4 views a tile)' if tta else ''}.\n\n"
    )
    write_metrics(result, out_dir, "crown_metrics", header + "\n".join(md))
    if len(crowns):
        with atomic_path(out_dir / "predicted_crowns.geojson") as tmp:
            crowns[["geometry"]].to_crs("EPSG:4326").to_file(tmp, driver="GeoJSON")
    return json.loads(json.dumps(result, default=float))
