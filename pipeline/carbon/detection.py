"""Crown detection error (missed, false, merged and split crowns) as a shared factor of the whole run.

A crown model's validation plots give, per plot, a reference quantity (AGB or crown area of the reference
trees) and the same quantity from the detected crowns. ``calibrate_detection_error`` turns them into the
ratio reference / detected with its uncertainty; the crown model's ONNX metadata carries the result under
``detection_calibration`` (JSON, schema below and in ARCHITECTURE.md) and ``apply_detection`` multiplies every
Monte Carlo draw of the run's total by one draw of the factor (shared by all trees: it does not average
out). Without a calibration nothing is applied and the summary and report say so.

Schema (``schema`` 1): ``quantity`` ("agb" or "crown_area"), ``ratio_mean`` (> 0, pooled sum of the
reference over the sum of the detected), ``ln_sd`` (>= 0, SD of ln factor for a new site), ``n_plots``
(>= 2), optional ``ratio_ci90`` [low, high] (bootstrap of the pooled ratio), ``method``, ``source``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from pipeline.errors import InputError

SCHEMA_VERSION = 1
QUANTITIES = ("agb", "crown_area")
NOT_INCLUDED_NOTE = ("DETECTION ERROR NOT INCLUDED: the crown model has no detection_calibration, so missed, "
                     "false and merged crowns are outside the interval; check the model with "
                     "`forest-inventory evaluate` on reference plots")


def calibrate_detection_error(reference_per_plot: np.ndarray | list[float],
                              detected_per_plot: np.ndarray | list[float], quantity: str = "agb",
                              n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Detection factor from validation plots: reference and detected totals per plot (same units, e.g.
    kg AGB or m² crown area).

    ``ratio_mean`` = sum(reference) / sum(detected) (pooled); ``ln_sd`` = sqrt(s_boot² + s_plot²) with
    s_boot the bootstrap SD (plots resampled) of ln ratio_mean and s_plot the SD of the per-plot ln ratios
    (plots with both values > 0): the factor of a new site varies like a plot's, which is conservative.
    """
    ref = np.asarray(reference_per_plot, dtype=float).ravel()
    det = np.asarray(detected_per_plot, dtype=float).ravel()
    if quantity not in QUANTITIES:
        raise InputError(f"detection quantity {quantity!r} unknown; use one of {', '.join(QUANTITIES)}")
    if ref.shape != det.shape or ref.size < 2:
        raise InputError("calibrate_detection_error needs the same number (>= 2) of reference and detected "
                         "plot totals")
    if not (np.isfinite(ref).all() and np.isfinite(det).all()) or (ref < 0).any() or (det < 0).any():
        raise InputError("calibrate_detection_error: plot totals must be finite and >= 0")
    if det.sum() <= 0 or ref.sum() <= 0:
        raise InputError("calibrate_detection_error: the detected and reference totals must be > 0")
    pooled = float(ref.sum() / det.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, ref.size, size=(n_boot, ref.size))
    r_b, d_b = ref[idx].sum(axis=1), det[idx].sum(axis=1)
    ok = (d_b > 0) & (r_b > 0)
    ln_b = np.log(r_b[ok] / d_b[ok])
    s_boot = float(ln_b.std(ddof=1)) if ln_b.size > 1 else 0.0
    both = (ref > 0) & (det > 0)
    ln_p = np.log(ref[both] / det[both])
    s_plot = float(ln_p.std(ddof=1)) if ln_p.size > 1 else 0.0
    lo, hi = (np.exp(np.quantile(ln_b, [0.05, 0.95])) if ln_b.size else (pooled, pooled))
    return {"schema": SCHEMA_VERSION, "quantity": quantity, "ratio_mean": pooled,
            "ln_sd": math.hypot(s_boot, s_plot), "n_plots": int(ref.size),
            "n_plots_without_detections": int(((det == 0) & (ref > 0)).sum()),
            "ratio_ci90": [float(lo), float(hi)], "ln_sd_bootstrap": s_boot, "ln_sd_between_plots": s_plot,
            "method": "pooled ratio reference/detected; ln_sd = sqrt(bootstrap SD² + between-plot SD²)"}


def validate_detection_calibration(value: dict[str, Any] | str) -> dict[str, Any]:
    """The calibration as a dict (from JSON text or a dict), checked against the schema."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError("detection_calibration is not valid JSON; re-export the crown model") from None
    if not isinstance(value, dict):
        raise InputError("detection_calibration must be a JSON object (see ARCHITECTURE.md)")
    try:
        ratio, ln_sd = float(value["ratio_mean"]), float(value["ln_sd"])
        n_plots = int(value["n_plots"])
    except (KeyError, TypeError, ValueError):
        raise InputError("detection_calibration needs ratio_mean, ln_sd and n_plots (see ARCHITECTURE.md)") \
            from None
    if int(value.get("schema", SCHEMA_VERSION)) != SCHEMA_VERSION:
        raise InputError(f"detection_calibration schema {value.get('schema')} unknown; this version reads "
                         f"{SCHEMA_VERSION}")
    if not (math.isfinite(ratio) and ratio > 0 and math.isfinite(ln_sd) and ln_sd >= 0 and n_plots >= 2):
        raise InputError("detection_calibration: ratio_mean must be > 0, ln_sd >= 0 and n_plots >= 2")
    if value.get("quantity", "agb") not in QUANTITIES:
        raise InputError(f"detection_calibration quantity must be one of {', '.join(QUANTITIES)}")
    return {**value, "ratio_mean": ratio, "ln_sd": ln_sd, "n_plots": n_plots}


def detection_factor_draws(calibration: dict[str, Any], n_draws: int, seed: int) -> np.ndarray:
    """Log-normal draws of the factor with mean ``ratio_mean`` and log SD ``ln_sd`` (own seeded stream)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,)))
    s = float(calibration["ln_sd"])
    return float(calibration["ratio_mean"]) * np.exp(s * rng.standard_normal(n_draws) - s * s / 2.0)


def apply_detection(calibration: dict[str, Any] | None, total_agb_draws_kg: np.ndarray,
                    total_co2e_draws_kg: np.ndarray, agb_point_kg: float, co2e_point_kg: float,
                    seed: int) -> dict[str, Any]:
    """The detection-adjusted total (t) and its interval, or a record saying it is not included."""
    from pipeline.carbon.montecarlo import interval_stats

    if calibration is None:
        return {"included": False, "source": "none", "note": NOT_INCLUDED_NOTE}
    f = detection_factor_draws(calibration, np.asarray(total_co2e_draws_kg).shape[-1], seed)
    ratio = float(calibration["ratio_mean"])
    agb = np.asarray(total_agb_draws_kg) * f
    co2e = np.asarray(total_co2e_draws_kg) * f
    a = interval_stats(agb, agb_point_kg * ratio)
    c = interval_stats(co2e, co2e_point_kg * ratio)
    total = {"agb_t": float(a["mean"]), "agb_t_ci90_low": float(a["ci90_low"]),
             "agb_t_ci90_high": float(a["ci90_high"]), "co2e_t": float(c["mean"]),
             "co2e_t_sd": float(c["sd"]),
             "co2e_t_ci90_low": float(c["ci90_low"]), "co2e_t_ci90_high": float(c["ci90_high"]),
             "co2e_t_ci95_low": float(c["ci95_low"]), "co2e_t_ci95_high": float(c["ci95_high"]),
             "co2e_halfwidth90_pct": float(c["halfwidth90_pct"]),
             "co2e_halfwidth95_pct": float(c["halfwidth95_pct"])}
    return {"included": True, "source": calibration.get("source", "crown model metadata"),
            "quantity": calibration.get("quantity", "agb"), "ratio_mean": ratio,
            "ln_sd": float(calibration["ln_sd"]), "n_plots": int(calibration["n_plots"]),
            "note": f"detection factor {ratio:.3g} (log SD {float(calibration['ln_sd']):.3g}, "
                    f"{int(calibration['n_plots'])} validation plots) applied to the total",
            "total": total, "co2e_draws_kg": co2e}
