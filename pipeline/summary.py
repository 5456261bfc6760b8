"""``summary.json``: the run's headline numbers (contract keys first), built from the run plan and the
carbon result; masses in t, areas in ha, coordinates in the working CRS."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import pipeline
from pipeline.crowns import DEFAULTS as CROWN_DEFAULTS

if TYPE_CHECKING:  # the plan type only; pipeline.inventory imports this module
    from pipeline.inventory import RunPlan


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
        "crown_model": {"path": str(plan.crown_model_path), "version": plan.crown_meta.model_version,
                        "postprocess": {**CROWN_DEFAULTS, **plan.postprocess}},
        "species_model": None if plan.species_meta is None else
        {"path": str(plan.species_model_path), "version": plan.species_meta.model_version},
        "seed": plan.config.seed,
    }
    if standards is not None:
        summary["standards"] = jsonable(standards)
    uncertainty = getattr(result, "uncertainty", None) or {}
    summary["warnings"] = list(getattr(result, "warnings", None) or [])
    summary["detection_error"] = jsonable(uncertainty.get("detection", {"included": False}))
    if uncertainty.get("total_with_detection"):
        summary["total_with_detection"] = jsonable(uncertainty["total_with_detection"])
    if callable(getattr(result, "summary", None)):
        carbon = jsonable(result.summary())
        carbon.pop("total", None)
        summary["carbon"] = carbon
    return summary
