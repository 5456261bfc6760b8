"""``summary.json``: the run's headline numbers (contract keys first), built from the run plan and the
carbon result; masses in t, areas in ha, coordinates in the working CRS.

Also the one place for what the outputs say about the models (``model_record``: names, versions, compression,
validation scores, the accuracy caveat), about the grids (``gsd_note``) and for the GeoPackage ``summary``
layer's typed columns (``SUMMARY_COLUMNS``, ``summary_row``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import pipeline
from pipeline.crowns import DEFAULTS as CROWN_DEFAULTS

if TYPE_CHECKING:  # the plan type only; pipeline.inventory imports this module
    from pipeline.inventory import RunPlan
    from pipeline.onnx_model import ModelMeta

# A crown model whose pooled validation F1 at IoU 0.4 is below this gets an explicit caveat in the outputs:
# its crown counts, and so the biomass and carbon, are uncertain.
CROWN_F1_CAVEAT = 0.6
MODEL_CARDS = {"crown_segmentation": "CROWNS_MODEL_CARD.md",
               "species_classification": "SPECIES_MODEL_CARD.md"}


def _pick(metrics: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def crown_accuracy(metrics: dict[str, Any]) -> dict[str, Any]:
    """Pooled and per-site crown detection scores from a crown model's ``validation_metrics``.

    Keys written by the training code: ``real_f1_iou0.4`` (pooled over the validation plots), with
    ``real_precision_iou0.4``, ``real_recall_iou0.4``, ``real_n_truth`` and ``site_<SITE>_f1_iou0.4``;
    older or custom models may carry a bare ``f1_iou0.4``. Missing scores are None."""
    sites = {}
    for key in metrics:
        if key.startswith("site_") and key.endswith("_f1_iou0.4"):
            site = key[len("site_"):-len("_f1_iou0.4")]
            sites[site] = {"f1_iou0.4": _pick(metrics, key),
                           "n_truth": _pick(metrics, f"site_{site}_n_truth")}
    return {"f1_iou0.4": _pick(metrics, "real_f1_iou0.4", "f1_iou0.4"),
            "precision_iou0.4": _pick(metrics, "real_precision_iou0.4", "precision_iou0.4"),
            "recall_iou0.4": _pick(metrics, "real_recall_iou0.4", "recall_iou0.4"),
            "n_truth": _pick(metrics, "real_n_truth", "n_truth"),
            "sites": dict(sorted(sites.items()))}


def model_card_path(model_path: Path, task: str) -> Path | None:
    """The model card beside a model file (``CROWNS_MODEL_CARD.md`` / ``SPECIES_MODEL_CARD.md``), if any."""
    card = Path(model_path).parent / MODEL_CARDS.get(task, "MODEL_CARD.md")
    return card if card.is_file() else None


def _compression_text(record: dict[str, Any] | None) -> str:
    if not record:
        return "none (dense)"
    parts = [str(record.get("method", "?"))]
    ratio = _pick(record, "achieved_ratio", "target_ratio")
    if ratio is not None:
        parts.append(f"{ratio * 100:.0f} % of the {record.get('budget', 'macs')} removed")
    before, after = _pick(record, "params_before"), _pick(record, "params_after")
    if before and after:
        parts.append(f"parameters {before:,.0f} -> {after:,.0f}")
    if isinstance(record.get("finetune"), dict) and record["finetune"].get("distillation"):
        parts.append("distilled")
    return ", ".join(parts)


def model_record(path: Path, meta: ModelMeta, sha256: str | None = None) -> dict[str, Any]:
    """What the outputs say about one model: ``name``, ``path``, ``version``, ``sha256``, ``gsd_m``,
    ``training_data``, ``compression`` (the metadata's record, or None for a dense model) and its one-line
    ``compression_text``, ``validation_metrics`` (as in the metadata), ``card`` (path or None) and, for a
    crown model, ``accuracy`` (``crown_accuracy``) and ``caveat`` (a sentence, or None when the pooled
    validation F1@0.4 is at least ``CROWN_F1_CAVEAT``)."""
    card = model_card_path(path, meta.task)
    label = f"{Path(path).name} ({meta.model_version})"
    record: dict[str, Any] = {
        "name": Path(path).stem, "path": str(path), "version": meta.model_version, "sha256": sha256,
        "task": meta.task, "gsd_m": meta.gsd_m, "training_data": meta.training_data,
        "compression": meta.compression or None, "compression_text": _compression_text(meta.compression),
        "validation_metrics": dict(meta.validation_metrics or {}),
        "card": str(card) if card else None,
    }
    if meta.task == "crown_segmentation":
        acc = crown_accuracy(record["validation_metrics"])
        record["accuracy"] = acc
        where = f"see {card}" if card else "see the model's card"
        f1 = acc["f1_iou0.4"]
        if f1 is None:
            record["caveat"] = (f"The crown model {label} carries no validation F1: its accuracy "
                                "is unknown, so the crown counts and the carbon are unverified; "
                                f"{where} and check it with forest-inventory evaluate on reference plots.")
        elif f1 < CROWN_F1_CAVEAT:
            record["caveat"] = (f"The crown model {label} finds crowns with a pooled validation "
                                f"F1 of {f1:.2f} at IoU 0.4 (below {CROWN_F1_CAVEAT:g}): the crown counts, "
                                f"and so the biomass and carbon, are uncertain; {where} and check it with "
                                "forest-inventory evaluate on reference plots of this site.")
        else:
            record["caveat"] = None
    elif "synthetic" in meta.training_data.lower():
        record["caveat"] = (f"The species model {label} was trained and validated on synthetic "
                            "scenes "
                            "only: the species of real crowns, and the wood densities that follow, are "
                            "unverified.")
    else:
        record["caveat"] = None
    return record


def gsd_note(summary: dict[str, Any]) -> str:
    """One line on the grids: input GSD, the crown model's GSD and whether the image was resampled or
    reprojected for segmentation, e.g. "input 0.050 m, crown model 0.100 m: resampled to 0.100 m"."""
    inp, model, work = (summary.get(k) for k in ("input_gsd_m", "model_gsd_m", "gsd_m"))
    if inp is None or model is None:
        return f"{work:.3f} m" if isinstance(work, int | float) else "?"
    text = f"input {inp:.3f} m, crown model {model:.3f} m"
    if summary.get("resampled_or_reprojected"):
        return f"{text}: segmented on a {work:.3f} m grid (resampled or reprojected)"
    return f"{text}: segmented on the input grid"


def jsonable(obj: Any) -> Any:
    """``obj`` with frames, series, numpy scalars and dataclasses turned into JSON-ready values."""
    if isinstance(obj, pd.DataFrame):
        return json.loads(obj.to_json(orient="records"))
    if isinstance(obj, pd.Series):
        return json.loads(obj.to_json())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "__dataclass_fields__"):
        return jsonable(asdict(obj))
    return obj


def _row(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, pd.DataFrame):
        return obj.iloc[0].to_dict() if len(obj) else {}
    if isinstance(obj, pd.Series):
        return obj.to_dict()
    if isinstance(obj, dict):
        return dict(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return dict(vars(obj))


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def build_summary(plan: RunPlan, stats: dict[str, float], result: Any, n_trees: int) -> dict[str, Any]:
    """summary.json content: ``stats`` from ``group_stats`` (valid area, tiles), ``result`` a
    ``CarbonResult`` (totals, groups, standards, uncertainty)."""
    area_ha = stats["valid_area_m2"] / 10_000.0
    total = _row(getattr(result, "total", None))
    standards = getattr(result, "standards", None)
    summary = {
        "n_trees": int(n_trees),
        "area_ha": area_ha,
        "trees_per_ha": n_trees / area_ha if area_ha > 0 else float("nan"),
        "agb_t": _num(total.get("agb_t")),
        "carbon_t": _num(total.get("carbon_t")),
        "co2e_t": _num(total.get("co2e_t")),
        "co2e_t_ci90": [_num(total.get("co2e_t_ci90_low")), _num(total.get("co2e_t_ci90_high"))],
        "crs": plan.crs_name,
        "gsd_m": plan.gsd_m,
        "models": dict(plan.models),
        "elapsed_s": time.time() - plan.started,
        "version": pipeline.__version__,
        "agb_t_sd": _num(total.get("agb_t_sd")),
        "agb_t_ci90": [_num(total.get("agb_t_ci90_low")), _num(total.get("agb_t_ci90_high"))],
        "co2e_t_sd": _num(total.get("co2e_t_sd")),
        "co2e_t_ci95": [_num(total.get("co2e_t_ci95_low")), _num(total.get("co2e_t_ci95_high"))],
        "co2e_halfwidth90_pct": _num(total.get("co2e_halfwidth90_pct")),
        "input": str(plan.config.ortho),
        "bands": list(plan.config.bands),
        "resampled_or_reprojected": bool(plan.warped),
        "n_tiles": int(stats["n_tiles"]),
        "n_tiles_skipped": int(stats["n_skipped"]),  # fully masked, or no canopy by the heights
        "n_tiles_no_canopy": int(stats.get("n_no_canopy", 0)),
        "height_inputs": {k: str(v) for k, v in (("chm", plan.config.chm), ("dsm", plan.config.dsm),
                                                 ("dtm", plan.config.dtm)) if v is not None},
        "input_gsd_m": plan.input_gsd_m,
        "model_gsd_m": plan.crown_meta.gsd_m,
        "crown_mask_grid": plan.output_grid_note,
        "crown_model": {**model_record(plan.crown_model_path, plan.crown_meta,
                                       plan.models.get(plan.crown_model_path.stem)),
                        "postprocess": {**CROWN_DEFAULTS, **plan.postprocess}},
        "species_model": None if plan.species_meta is None else
        model_record(plan.species_model_path, plan.species_meta,
                     plan.models.get(plan.species_model_path.stem)),
        "seed": plan.config.seed,
    }
    if standards is not None:
        summary["standards"] = jsonable(standards)
    uncertainty = getattr(result, "uncertainty", None) or {}
    caveat = summary["crown_model"].get("caveat")
    summary["warnings"] = [*([caveat] if caveat else []), *plan.warnings,
                           *(getattr(result, "warnings", None) or [])]
    summary["detection_error"] = jsonable(uncertainty.get("detection", {"included": False}))
    if uncertainty.get("total_with_detection"):
        summary["total_with_detection"] = jsonable(uncertainty["total_with_detection"])
    if callable(getattr(result, "summary", None)):
        carbon = jsonable(result.summary())
        carbon.pop("total", None)
        summary["carbon"] = carbon
    return summary


# The GeoPackage ``summary`` layer: one row, one typed column per headline number (the whole document stays in
# summary.json). (column, type, meaning); masses in t, areas in ha, GSDs in m.
SUMMARY_COLUMNS: list[tuple[str, type, str]] = [
    ("input", str, "orthomosaic path"),
    ("n_trees", int, "trees (crowns) found"),
    ("area_ha", float, "valid (unmasked) area, ha"),
    ("trees_per_ha", float, "trees per ha"),
    ("agb_t", float, "aboveground biomass, t"),
    ("agb_t_sd", float, "its Monte Carlo SD, t"),
    ("carbon_t", float, "carbon, t C"),
    ("co2e_t", float, "CO2e, t"),
    ("co2e_t_sd", float, "its Monte Carlo SD, t"),
    ("co2e_t_ci90_low", float, "CO2e 90 % interval, low, t"),
    ("co2e_t_ci90_high", float, "CO2e 90 % interval, high, t"),
    ("co2e_t_ci95_low", float, "CO2e 95 % interval, low, t"),
    ("co2e_t_ci95_high", float, "CO2e 95 % interval, high, t"),
    ("co2e_halfwidth90_pct", float, "90 % half-width, % of CO2e"),
    ("detection_error_included", bool, "crown detection error in the interval"),
    ("crs", str, "working CRS"),
    ("input_gsd_m", float, "input GSD, m"),
    ("model_gsd_m", float, "crown model GSD, m"),
    ("gsd_m", float, "GSD of the grid the crowns were found on, m"),
    ("resampled_or_reprojected", bool, "the input was resampled or reprojected for segmentation"),
    ("crown_mask_grid", str, "grid of crown_mask.tif and quicklook.png: 'input' or the CRS used"),
    ("crown_model", str, "crown model file name"),
    ("crown_model_version", str, "crown model version"),
    ("crown_model_f1_iou0_4", float, "crown model pooled validation F1 at IoU 0.4 (NULL: unknown)"),
    ("species_model", str, "species model file name (NULL: none)"),
    ("species_model_version", str, "species model version"),
    ("n_warnings", int, "warnings (texts in summary.json and report.html)"),
    ("seed", int, "Monte Carlo seed"),
    ("version", str, "forest-inventory version"),
    ("elapsed_s", float, "run time, s"),
]


def summary_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``summary`` layer's one row from the summary dict: ``SUMMARY_COLUMNS`` in order, typed; a value
    that is missing (or NaN) is None (NULL in the GeoPackage)."""
    crown = summary.get("crown_model") or {}
    species = summary.get("species_model") or {}
    ci90 = summary.get("co2e_t_ci90") or [None, None]
    ci95 = summary.get("co2e_t_ci95") or [None, None]
    values = {
        **summary,
        "co2e_t_ci90_low": ci90[0], "co2e_t_ci90_high": ci90[1],
        "co2e_t_ci95_low": ci95[0], "co2e_t_ci95_high": ci95[1],
        "detection_error_included": bool((summary.get("detection_error") or {}).get("included", False)),
        "crown_model": crown.get("name") or (Path(crown["path"]).stem if crown.get("path") else None),
        "crown_model_version": crown.get("version"),
        "crown_model_f1_iou0_4": (crown.get("accuracy") or {}).get("f1_iou0.4"),
        "species_model": species.get("name") or (Path(species["path"]).stem if species.get("path") else None),
        "species_model_version": species.get("version"),
        "n_warnings": len(summary.get("warnings") or []),
    }
    row: dict[str, Any] = {}
    for name, kind, _ in SUMMARY_COLUMNS:
        value = values.get(name)
        if isinstance(value, np.generic):
            value = value.item()
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            row[name] = None
        elif kind is str:
            row[name] = str(value)
        else:
            try:
                row[name] = kind(value)
            except (TypeError, ValueError):
                row[name] = None
    return row
