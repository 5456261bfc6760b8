"""Issue 17: the nominal 90 % interval under misspecification (truth drawn from the stated uncertainties
plus each scenario's departure) and the detection-error term."""

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.carbon import CarbonConfig, estimate_carbon
from pipeline.carbon.coverage import SCENARIOS, coverage
from pipeline.carbon.detection import (
    apply_detection,
    calibrate_detection_error,
    validate_detection_calibration,
)
from pipeline.carbon.estimate import MC_COMPONENTS
from pipeline.errors import InputError

BY_NAME = {s.name[0]: s for s in SCENARIOS}


def test_heights_5pct_low_covered_only_with_shared_height_bias():
    # every height 5 % low: with the run's systematic height bias drawn once per iteration the interval
    # still holds the truth; drawn independently per tree (the old model) it does not
    with_shared = coverage(BY_NAME["b"], replicates=40, n_draws=400)
    without = coverage(BY_NAME["b"], replicates=40, n_draws=400,
                       config=CarbonConfig(components=MC_COMPONENTS - {"systematic"}))
    assert with_shared["coverage90"] >= 0.85
    assert without["coverage90"] < 0.75
    assert with_shared["median_halfwidth90_pct"] > without["median_halfwidth90_pct"]


def test_wood_density_off_by_one_sd_covered_only_with_the_shared_taxon_error():
    # 500 Pinus palustris whose true wood density is one table SD above the table (0.54 + 0.0708): the
    # truth is (0.6108 / 0.54)^0.976 = 1.128 x the estimate. Shared by the species, the error gives a 90 %
    # half-width of about 1.645 * 0.976 * 0.0708 / 0.54 = 21 % and holds it; drawn per tree (before issue
    # 17) it averages out to about 1 % and misses it
    trees = _pines(500, seed=3, crown_m=(4, 9), height_m=(12, 24))
    truth_factor = ((0.54 + 0.0708) / 0.54) ** 0.976
    for shared, holds in ((True, True), (False, False)):
        res = estimate_carbon(trees, CarbonConfig(n_draws=2000, components={"wood_density"},
                                                  wood_density_shared=shared))
        truth = res.total["agb_t"] * truth_factor
        assert (res.total["agb_t_ci90_low"] <= truth <= res.total["agb_t_ci90_high"]) is holds
    hw = (res.total["agb_t_ci90_high"] - res.total["agb_t_ci90_low"]) / 2 / res.total["agb_t"]
    assert hw < 0.02


@pytest.mark.parametrize("key", ["a", "c"])
def test_model_as_assumed_and_species_mixture_coverage(key):
    assert coverage(BY_NAME[key], replicates=40, n_draws=400)["coverage90"] >= 0.85


def test_no_chm_interval_covers_and_warns():
    res = coverage(BY_NAME["d"], replicates=20, n_draws=300)
    assert res["coverage90"] >= 0.85
    assert res["median_halfwidth90_pct"] > 100  # allometric heights with E unknown: honest, unusable
    trees = pd.DataFrame({"tree_id": [1, 2], "crown_diameter_m": [5.0, 7.0], "height_m": np.nan,
                          "height_source": "none", "species": "Pinus palustris", "species_prob": 1.0})
    out = estimate_carbon(trees, CarbonConfig(n_draws=100))
    assert any("HEIGHTS ARE ALLOMETRIC for 2 of 2 trees" in w for w in out.warnings)


def test_detection_error_coverage():
    assert coverage(BY_NAME["f"], replicates=20, n_draws=300)["coverage90"] >= 0.85


def test_calibrate_detection_error_known_answer():
    # every plot: reference twice the detected -> pooled ratio 2, no spread -> ln SD 0
    cal = calibrate_detection_error([10.0, 20.0, 30.0], [5.0, 10.0, 15.0])
    assert cal["ratio_mean"] == pytest.approx(2.0) and cal["ln_sd"] == pytest.approx(0.0, abs=1e-12)
    assert cal["n_plots"] == 3 and cal["quantity"] == "agb" and cal["schema"] == 1
    # pooled ratio sum(ref) / sum(det) = 60 / 40 = 1.5; per-plot ln ratios ln 1, ln 2, ln 1.5 -> SD 0.3466
    cal = calibrate_detection_error([10.0, 20.0, 30.0], [10.0, 10.0, 20.0], n_boot=4000)
    assert cal["ratio_mean"] == pytest.approx(1.5)
    assert cal["ln_sd_between_plots"] == pytest.approx(np.std(np.log([1.0, 2.0, 1.5]), ddof=1))
    assert cal["ln_sd"] == pytest.approx(math.hypot(cal["ln_sd_bootstrap"], cal["ln_sd_between_plots"]))
    assert cal["ratio_ci90"][0] <= 1.5 <= cal["ratio_ci90"][1]
    # a plot where nothing was detected counts in the pooled ratio
    cal = calibrate_detection_error([10.0, 10.0, 20.0], [10.0, 0.0, 20.0])
    assert cal["ratio_mean"] == pytest.approx(40 / 30) and cal["n_plots_without_detections"] == 1
    with pytest.raises(InputError):
        calibrate_detection_error([1.0], [1.0])
    with pytest.raises(InputError):
        calibrate_detection_error([1.0, 2.0], [0.0, 0.0])
    ok = validate_detection_calibration('{"ratio_mean": 1.2, "ln_sd": 0.1, "n_plots": 5}')
    assert ok["ratio_mean"] == 1.2
    for bad in ('{"ratio_mean": 0, "ln_sd": 0.1, "n_plots": 5}', "not json", '{"ln_sd": 0.1}'):
        with pytest.raises(InputError):
            validate_detection_calibration(bad)


def test_detection_factor_applied_to_the_total_and_the_deductions():
    trees = _pines(50, seed=0, crown_m=(4, 8), height_m=(10, 20))
    plain = estimate_carbon(trees, CarbonConfig(n_draws=500))
    cal = {"ratio_mean": 2.0, "ln_sd": 0.0, "n_plots": 4}
    doubled = estimate_carbon(trees, CarbonConfig(n_draws=500, detection_calibration=cal))
    adj = doubled.uncertainty["total_with_detection"]
    assert doubled.total["co2e_t"] == plain.total["co2e_t"]  # the detected trees' own sum is unchanged
    assert adj["co2e_t"] == pytest.approx(2 * plain.total["co2e_t"])
    assert adj["co2e_t_ci90_low"] == pytest.approx(2 * plain.total["co2e_t_ci90_low"])
    assert doubled.standards[0]["conservative_co2e_t"] == pytest.approx(2 * plain.standards[0]
                                                                        ["conservative_co2e_t"])
    assert doubled.uncertainty["detection"]["included"] and not plain.uncertainty["detection"]["included"]
    assert any("DETECTION ERROR NOT INCLUDED" in w for w in plain.warnings)
    # a spread widens the interval of the total
    wide = estimate_carbon(trees, CarbonConfig(n_draws=500, detection_calibration={**cal, "ln_sd": 0.3}))
    w = wide.uncertainty["total_with_detection"]
    assert w["co2e_halfwidth90_pct"] > adj["co2e_halfwidth90_pct"] + 20
    # by hand: log SD 0.3 alone gives a 90 % half-width near 1.645 * 0.3 = 49 % on the log scale
    d = apply_detection({**cal, "ln_sd": 0.3}, np.full(20000, 1000.0), np.full(20000, 1000.0), 1000.0,
                        1000.0, seed=1)
    lo, hi = d["total"]["co2e_t_ci90_low"], d["total"]["co2e_t_ci90_high"]
    assert math.log(hi / lo) / 2 == pytest.approx(1.645 * 0.3, rel=0.03)


def _pines(n: int, seed: int, crown_m: tuple[float, float], height_m: tuple[float, float]) -> pd.DataFrame:
    """``n`` Pinus palustris with CHM heights, crown diameters and heights uniform in the given ranges."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"tree_id": np.arange(n), "crown_diameter_m": rng.uniform(*crown_m, n),
                         "height_m": rng.uniform(*height_m, n), "height_source": "chm",
                         "species": "Pinus palustris", "species_prob": 1.0})
