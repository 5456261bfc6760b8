"""Published allometric equations against hand-computed values."""

import math

import numpy as np
import pytest

from pipeline.carbon import allometry as al
from pipeline.errors import InputError


def test_crown_diameter_from_area():
    assert al.crown_diameter_from_area_m(math.pi * 25.0) == pytest.approx(10.0)


def test_jucker_dbh_acceptance_value():
    # 0.056 is the residual VARIANCE of the log fit (METHOD.md): bias factor exp(0.056 / 2).
    # By hand: 250^0.809 = exp(0.809 * 5.52146) = 87.08; 0.557 * 87.08 = 48.50; * exp(0.028) = 49.88 cm
    d = al.dbh_jucker2017_cm(25.0, 10.0, "angiosperm")
    assert d == pytest.approx(0.557 * 250**0.809 * math.exp(0.056 / 2), rel=1e-12)
    assert d == pytest.approx(49.88, abs=0.01)
    assert al.JUCKER_DBH_RESIDUAL_VAR == 0.056


def test_chave_eq4_acceptance_value_and_no_double_bias():
    d = al.dbh_jucker2017_cm(25.0, 10.0, "angiosperm")
    agb = al.agb_chave2014_eq4_kg(0.6, d, 25.0)
    # by hand: 0.6 * 49.88² * 25 = 37,320; ^0.976 = 28,960; * 0.0673 = 1,949 kg
    assert agb / 1000 == pytest.approx(1.95, abs=0.005)
    # the intercept equals exp(-2.7616) * exp(0.357²/2): the bias correction is inside it, once
    assert math.exp(-2.7616) * math.exp(0.3574**2 / 2) == pytest.approx(al.CHAVE_EQ4_INTERCEPT, rel=2e-3)
    assert agb == pytest.approx(0.0673 * (0.6 * d * d * 25.0) ** 0.976, rel=1e-12)


def test_jucker_direct_agb_route_b():
    # 0.204 is the residual VARIANCE: 0.016 * 250^2.013 = 1,074.6 kg; * exp(0.102) = 1,190 kg
    assert al.agb_jucker2017_hcd_kg(25.0, 10.0, "angiosperm") / 1000 == pytest.approx(1.19, abs=0.005)
    gym = al.agb_jucker2017_hcd_kg(25.0, 10.0, "gymnosperm")
    assert gym == pytest.approx(0.109 * 250**1.790 * math.exp(0.204 / 2), rel=1e-12)


def test_biome_sets_and_fallback():
    nearctic = al.dbh_jucker2017_cm(25.0, 10.0, "gymnosperm", "nearctic_temperate_coniferous")
    assert nearctic == pytest.approx(0.589 * 250**0.817, rel=1e-12)
    assert al.jucker_dbh_model_name("nearctic_temperate_coniferous", "gymnosperm").endswith("gymnosperm")
    # no Neotropic gymnosperm fit: global set
    assert al.jucker_dbh_model_name("neotropic_tropical_forests", "gymnosperm") == "jucker2017_global"
    with pytest.raises(InputError):
        al.dbh_jucker2017_cm(25.0, 10.0, "angiosperm", "mars")
    with pytest.raises(InputError):
        al.dbh_jucker2017_cm(25.0, 10.0, "fern")


def test_vectorised():
    h = np.array([10.0, 20.0, 30.0])
    cd = np.array([3.0, 6.0, 9.0])
    d = al.dbh_jucker2017_cm(h, cd)
    assert d.shape == (3,) and np.all(np.diff(d) > 0)


def test_height_from_crown_is_fixed_point():
    hd = al.height_diameter_model("chave2014_eq6a")
    cd = np.array([2.0, 5.0, 9.0])
    h, d = al.height_from_crown_m(cd, hd)
    np.testing.assert_allclose(al.dbh_jucker2017_cm(h, cd), d, rtol=1e-6)
    np.testing.assert_allclose(hd.height_m(d), h, rtol=1e-9)
    assert np.all(np.diff(h) > 0)
    # Feldpausch 2012 pantropical at D = 30 cm: 50.874 (1 - exp(-0.042 * 30^0.784))
    feld = al.height_diameter_model("feldpausch2012_pantropical")
    assert feld.height_m(30.0) == pytest.approx(50.874 * (1 - math.exp(-0.042 * 30**0.784)))


def test_bgb_carbon_co2e():
    agb = 1000.0
    bgb = al.bgb_kg(agb, 0.2)
    c = al.carbon_kg(agb, bgb, 0.47)
    assert c == pytest.approx(564.0)
    assert al.co2e_kg(c) == pytest.approx(564.0 * 44 / 12)


def test_root_shoot_table_and_config_values():
    from pipeline.carbon import CarbonConfig
    from pipeline.carbon.factors import DEFAULT_ECOZONE, root_shoot_ratio

    assert root_shoot_ratio("temperate_conifer", 30.0)[0] == 0.40
    assert root_shoot_ratio("temperate_conifer", 100.0)[0] == 0.29
    assert root_shoot_ratio("temperate_conifer", 400.0)[0] == 0.20
    assert root_shoot_ratio("temperate_conifer")[0] == 0.20  # unknown density: smallest R
    assert root_shoot_ratio(DEFAULT_ECOZONE, 60.0) == (0.20, "subtropical_humid_forest, AGB 0-125 t/ha")
    with pytest.raises(InputError):
        root_shoot_ratio("moon")
    cfg = CarbonConfig(carbon_fraction={"gymnosperm": 0.51}, chave_param={"intercept_sd": 0.0,
                       "slope_sd": 0.0, "centre_log": 9.3}, components=["residuals"])
    assert cfg.carbon_fraction == {"angiosperm": 0.47, "gymnosperm": 0.51}
    assert cfg.chave_param.intercept_sd == 0.0 and cfg.components == frozenset({"residuals"})
    with pytest.raises(InputError):
        CarbonConfig(carbon_fraction={"angiosperm": 0.9})
    with pytest.raises(InputError):
        CarbonConfig(components={"vibes"})


def test_hd_shift_calibrated_on_measured_trees_known_answer():
    # measured heights made by the fixed point at E = 0.4: the calibrated shift of the E = 0 curve is -0.4
    # on ln H (eq. 6a: ln H = 0.893 - E + ...), and trees without a height then get the E = 0.4 heights
    rng = np.random.default_rng(1)
    cd = rng.uniform(3, 12, 60)
    true_hd = al.height_diameter_model("chave2014_eq6a", environmental_stress_e=0.4)
    h, _ = al.height_from_crown_m(cd, true_hd)
    pg = np.zeros(cd.size, dtype=int)
    model, record = al.calibrate_hd_shift(h, cd, pg, al.height_diameter_model("chave2014_eq6a"))
    assert record["log_shift"] == pytest.approx(-0.4, abs=1e-6)
    assert record["sd"] == pytest.approx(al.HD_CALIBRATION_MIN_SD)  # no scatter: the floor
    new_cd = np.array([4.0, 9.0])
    np.testing.assert_allclose(al.height_from_crown_m(new_cd, model)[0],
                               al.height_from_crown_m(new_cd, true_hd)[0], rtol=1e-6)
