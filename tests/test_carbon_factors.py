"""Factor values checked in the METHOD.md "Verification" section (pipeline/carbon/METHOD.md)."""

import math

import pytest

from pipeline.carbon import allometry as al
from pipeline.carbon import factors as fc
from pipeline.carbon import standards as st


@pytest.mark.parametrize("density", [None, 10.0, 125.0, 126.0, 400.0])
def test_tropical_mountain_has_one_value(density):
    # IPCC 2006 Table 4.4 (as transcribed by three independent secondary sources): 0.27, no AGB classes.
    assert fc.ROOT_SHOOT_TABLE["tropical_mountain"] == ((math.inf, 0.27),)
    assert fc.root_shoot_ratio("tropical_mountain", density)[0] == 0.27


@pytest.mark.parametrize("zone, density, r", [
    ("tropical_rainforest", 300.0, 0.37),
    ("tropical_moist_deciduous", 100.0, 0.20),
    ("tropical_moist_deciduous", 200.0, 0.24),
    ("tropical_dry", 10.0, 0.56),
    ("tropical_dry", 50.0, 0.28),
    ("tropical_shrubland", 30.0, 0.40),
    ("temperate_broadleaf", 50.0, 0.46),
    ("temperate_broadleaf", 100.0, 0.23),
    ("temperate_broadleaf", 200.0, 0.24),
    ("boreal", 50.0, 0.39),
    ("boreal", 100.0, 0.24),
])
def test_root_shoot_rows_agreeing_with_secondary_transcriptions(zone, density, r):
    assert fc.root_shoot_ratio(zone, density)[0] == r


def test_carbon_fraction_default():
    assert fc.DEFAULT_CARBON_FRACTION == {"angiosperm": 0.47, "gymnosperm": 0.47}


def test_jucker_sets_match_itcsegment_table():
    # itcSegment R/dbh.R coefficient table: global set with 0.056, biome sets with no bias factor. The 0.056
    # and 0.204 are residual variances (sigma²), see METHOD.md.
    g = al.jucker_dbh_coefficients("global")
    assert (g.alpha, g.beta, g.sigma2) == (0.557, 0.809, 0.056)
    s = al.jucker_dbh_coefficients("palearctic_boreal", "gymnosperm")
    assert (s.alpha, s.beta, s.sigma2) == (1.430, 0.649, 0.0)
    assert al.JUCKER_AGB_BASE == (0.016, 2.013)
    assert al.JUCKER_AGB_GYMNO_OFFSET == (0.093, -0.223)
    assert al.JUCKER_AGB_RESIDUAL_VAR == 0.204


def test_art_trees_factor():
    # UA = 0.524417 x HW90% / 1.645006: a 20% half-width gives 6.376% deduction.
    rule = st.art_trees_deduction(100.0, 20.0)
    assert rule["deduction_pct"] == pytest.approx(0.524417 * 20.0 / 1.645006, rel=1e-12)
