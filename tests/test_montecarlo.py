"""Monte Carlo: centring, reproducibility, shrinking intervals, correlated parameter error, standards."""

import numpy as np
import pandas as pd
import pytest

from pipeline.carbon import CarbonConfig, agb_chave2014_eq4_kg, estimate_carbon
from pipeline.carbon import standards as st
from pipeline.carbon.montecarlo import McInputs, SharedFactors, run_monte_carlo
from pipeline.errors import InputError

CONTRACT_COLUMNS = ["dbh_cm", "wood_density", "wood_density_level", "dbh_model", "agb_model", "agb_kg",
                    "agb_kg_sd", "agb_kg_p5", "agb_kg_p95", "bgb_kg", "carbon_kg", "co2e_kg", "height_m",
                    "height_source"]
GROUP_COLUMNS = ["n_trees", "agb_t", "agb_t_sd", "carbon_t", "co2e_t", "co2e_t_sd", "co2e_t_ci90_low",
                 "co2e_t_ci90_high", "co2e_t_ci95_low", "co2e_t_ci95_high", "co2e_halfwidth90_pct"]


def _trees(n, seed=0, species=("Pinus palustris", "Quercus laevis", "Acer rubrum"), chm=True):
    rng = np.random.default_rng(seed)
    h = rng.uniform(8, 28, n) if chm else np.full(n, np.nan)
    return pd.DataFrame({"tree_id": np.arange(n), "crown_area_m2": rng.uniform(5, 80, n), "height_m": h,
                         "height_source": "chm" if chm else "none", "species": rng.choice(species, n),
                         "species_prob": 0.9})


def test_acceptance_tree_through_estimate(tmp_path):
    wd = tmp_path / "wd.csv"
    wd.write_text("taxon,wood_density_gcm3\nTestus arboreus,0.6\n")
    trees = pd.DataFrame({"tree_id": [1], "crown_diameter_m": [10.0], "height_m": [25.0],
                          "height_source": ["chm"], "species": ["Testus arboreus"], "species_prob": [1.0]})
    res = estimate_carbon(trees, CarbonConfig(wood_density_csv=str(wd), n_draws=2000))
    row = res.trees.iloc[0]
    assert row["dbh_cm"] == pytest.approx(49.88, abs=0.01)  # Jucker with sigma² = 0.056 (test_allometry)
    assert row["agb_kg"] / 1000 == pytest.approx(1.95, abs=0.005)
    assert row["agb_model"] == "chave2014_eq4" and row["dbh_model"] == "jucker2017_global"
    assert row["agb_kg_p5"] < row["agb_kg"] < row["agb_kg_p95"]
    assert row["bgb_kg"] == pytest.approx(0.20 * row["agb_kg"])  # default ecozone, smallest class R
    assert row["co2e_kg"] == pytest.approx(0.47 * 1.2 * row["agb_kg"] * 44 / 12)


def test_mc_mean_equals_point_estimate_and_contract_columns():
    res = estimate_carbon(_trees(300), CarbonConfig(n_draws=500))
    t = res.trees
    for col in CONTRACT_COLUMNS:
        assert col in t.columns, col
    point = agb_chave2014_eq4_kg(t["wood_density"], t["dbh_cm"], t["height_m"])
    np.testing.assert_allclose(t["agb_kg"], point, rtol=1e-5)
    assert "agb_mc_centring" not in t.columns  # the draws are no longer rescaled to the point
    assert (t["agb_kg_p5"] < t["agb_kg"]).all() and (t["agb_kg"] < t["agb_kg_p95"]).all()
    assert res.total["agb_t"] == pytest.approx(point.sum() / 1000, rel=1e-9)
    # measurement and shared errors are median-centred on the point (the measured value is the truth's
    # median), the allometric residuals and wood density mean-centred on the quantity they belong to: the
    # Jucker DBH residual enters ln AGB with k = 2 * 0.976, so the draws' mean lies exp((k² - k) 0.056 / 2)
    # = 1.053 above the plug-in point (Chave's own residual, k = 1, adds nothing)
    only_residuals = estimate_carbon(_trees(300), CarbonConfig(n_draws=4000, components={"residuals"}))
    k = 2 * 0.976
    ratio = only_residuals.total_co2e_draws_t.mean() / only_residuals.total["co2e_t"]
    assert ratio == pytest.approx(np.exp((k * k - k) * 0.056 / 2), rel=0.01)
    # with measurement noise too (+2 %: uncentred, convex) the median of the total sits there as well
    assert np.median(res.total_co2e_draws_t) / res.total["co2e_t"] == pytest.approx(1.053 * 1.02, rel=0.03)


def test_per_tree_intervals_match_the_draws():
    # one tree in its own group: the group draws are the tree's draws
    n = 1
    inp = McInputs(ln_point=np.log([1000.0]), noise_var=np.array([0.2]), loadings=np.ones((n, 1)),
                   param_sd=np.array([0.05]), plant_group=np.zeros(n, dtype=int))
    res = run_monte_carlo(inp, SharedFactors(0.2, 0.0, (0.47, 0.47), 0.0), {"g": np.zeros(n, dtype=int)},
                          n_draws=20000, seed=3)
    draws = res.group_agb["g"][0]
    assert draws.mean() == pytest.approx(1000.0, rel=0.01)  # centred draws, no rescaling
    assert np.quantile(draws, 0.05) == pytest.approx(res.agb_p5[0], rel=0.03)
    assert np.quantile(draws, 0.95) == pytest.approx(res.agb_p95[0], rel=0.03)
    assert draws.std() == pytest.approx(res.agb_sd[0], rel=0.05)


def test_same_seed_same_numbers_any_thread_count():
    trees = _trees(3000, seed=1)
    groups = {"cell": np.arange(3000) % 7}
    a = estimate_carbon(trees, CarbonConfig(seed=5, n_draws=400, threads=1), groups)
    b = estimate_carbon(trees, CarbonConfig(seed=5, n_draws=400, threads=2), groups)
    c = estimate_carbon(trees, CarbonConfig(seed=6, n_draws=400), groups)
    assert a.total == b.total
    pd.testing.assert_frame_equal(a.groups["cell"], b.groups["cell"])
    pd.testing.assert_frame_equal(a.trees, b.trees)
    assert a.total["co2e_t_ci90_low"] != c.total["co2e_t_ci90_low"]


def _halfwidth(n, components):
    rng = np.random.default_rng(0)
    trees = pd.DataFrame({"tree_id": np.arange(n), "crown_diameter_m": rng.uniform(6, 8, n),
                          "height_m": rng.uniform(18, 22, n), "height_source": "chm",
                          "species": "Pinus palustris", "species_prob": 1.0})
    res = estimate_carbon(trees, CarbonConfig(components=frozenset(components), n_draws=2000, seed=2))
    return res.total["co2e_halfwidth90_pct"]


def test_intervals_shrink_as_trees_are_added():
    independent = {"measurement", "residuals"}
    hw = [_halfwidth(n, independent) for n in (10, 100, 1000)]
    assert hw[0] > hw[1] > hw[2]
    assert hw[0] / hw[2] == pytest.approx(np.sqrt(100), rel=0.25)


def test_shared_errors_do_not_shrink():
    # the run's height and crown-diameter biases and each species' wood-density error are drawn once per
    # iteration: with 1,000 trees of one species they still give (nearly) the interval of 10 trees
    for comp in ({"systematic"}, {"wood_density"}):
        hw = [_halfwidth(n, comp) for n in (10, 1000)]
        assert hw[1] == pytest.approx(hw[0], rel=0.15), comp
        assert hw[1] > 5.0, comp
    # by hand, wood density: SD of ln rho = 0.0708 / 0.54 (species level) shared, tree-to-tree 10 %
    # independent (gone at 1,000 trees); loading 0.976 -> 90 % half-width ~ 1.645 * 0.976 * 0.1311 = 21 %
    assert _halfwidth(1000, {"wood_density"}) == pytest.approx(100 * 1.645 * 0.976 * 0.0708 / 0.54, rel=0.1)


def test_correlated_parameter_error_does_not_shrink():
    hw = [_halfwidth(n, {"parameters"}) for n in (10, 1000)]
    assert hw[0] > 2.0
    assert hw[1] == pytest.approx(hw[0], rel=0.1)


def test_species_drawn_from_probabilities_widen_interval():
    n = 200
    trees = _trees(n, seed=4, species=("Pinus palustris",))
    classes = ["Pinus palustris", "Pinus palustris"]  # the same species twice: the mixture is the species
    probs = np.tile([0.5, 0.5], (n, 1))
    fixed = estimate_carbon(trees, CarbonConfig(n_draws=800))
    mixed = estimate_carbon(trees, CarbonConfig(n_draws=800, species_probs=probs, species_classes=classes))
    np.testing.assert_allclose(mixed.trees["agb_kg"], fixed.trees["agb_kg"], rtol=1e-9)
    classes = ["Pinus palustris", "Quercus virginiana"]
    mixed = estimate_carbon(trees, CarbonConfig(n_draws=800, species_probs=probs, species_classes=classes))
    assert (mixed.trees["agb_kg_p95"] > fixed.trees["agb_kg_p95"]).mean() > 0.8
    with pytest.raises(InputError):
        estimate_carbon(trees, CarbonConfig(species_probs=probs[:5], species_classes=classes))


def _mixture_case(probs_row, n_draws=2000):
    """The issue-17 case: 200 trees, classifier 50/50 (or given) Pinus palustris / Quercus virginiana.

    The trees are identical (H 20 m, CD 7.414 m) so the answer is computable by hand:
    D = 0.557 (20 * 7.414)^0.809 exp(0.056 / 2) = 0.557 * 148.28^0.809 * 1.0284 = 32.69 cm;
    pine (rho 0.54): 0.0673 (0.54 * 32.69² * 20)^0.976 = 620.56 kg -> 200 trees 124.11 t;
    oak (rho 0.80): 0.0673 (0.80 * 32.69² * 20)^0.976 = 910.72 kg -> 182.14 t; 50/50 mixture: 153.13 t.
    """
    n = 200
    trees = pd.DataFrame({"tree_id": np.arange(n), "crown_diameter_m": 7.414, "height_m": 20.0,
                          "height_source": "chm", "species": "Pinus palustris", "species_prob": 0.5})
    classes = ["Pinus palustris", "Quercus virginiana"]
    probs = np.tile(probs_row, (n, 1))
    return estimate_carbon(trees, CarbonConfig(n_draws=n_draws, seed=1, species_probs=probs,
                                               species_classes=classes)), trees


def test_species_mixture_known_answer_153t():
    # Known answer (issue 17): pine only 124.1 t, oak only 182.2 t, a 50/50 classifier -> 153.1 t (the
    # Monte Carlo used to rescale every draw to the top species and report 124.1 t with [110.8, 137.5]).
    pine, trees = _mixture_case([1.0, 0.0])
    oak, _ = _mixture_case([0.0, 1.0])
    mix, _ = _mixture_case([0.5, 0.5], n_draws=4000)
    pine_t, oak_t, mix_t = pine.total["agb_t"], oak.total["agb_t"], mix.total["agb_t"]
    assert oak_t / pine_t == pytest.approx((0.80 / 0.54) ** 0.976, rel=1e-9)  # Chave: AGB ~ rho^0.976
    assert pine_t == pytest.approx(124.11, abs=0.01) and oak_t == pytest.approx(182.14, abs=0.01)
    assert mix_t == pytest.approx(153.13, abs=0.01)
    assert mix.total["agb_t_ci90_low"] < 153.1 < mix.total["agb_t_ci90_high"]
    mix_width = mix.total["agb_t_ci90_high"] - mix.total["agb_t_ci90_low"]
    assert mix_width > pine.total["agb_t_ci90_high"] - pine.total["agb_t_ci90_low"]
    # per tree: the expectation over the species, between the two single-species values
    np.testing.assert_allclose(mix.trees["agb_kg"], (620.56 + 910.72) / 2, atol=0.01)
    np.testing.assert_allclose(mix.trees["agb_recorded_species_kg"], 620.56, atol=0.01)  # audit column
    # the Monte Carlo agrees with the expectation (no rescaling to the top species): drawing only the
    # species, its mean is the mixture's point estimate
    trees = mix.trees[["tree_id", "crown_diameter_m", "height_m", "height_source", "species", "species_prob"]]
    only = estimate_carbon(trees, CarbonConfig(n_draws=4000, seed=1, components={"species"},
                                               species_probs=np.tile([0.5, 0.5], (200, 1)),
                                               species_classes=["Pinus palustris", "Quercus virginiana"]))
    assert only.total_co2e_draws_t.mean() == pytest.approx(mix.total["co2e_t"], rel=0.005)


def test_carbon_fraction_follows_the_drawn_species():
    # gymnosperm CF 0.51, angiosperm 0.47; a 50/50 pine/oak mixture: CF of the expected mixture
    n = 100
    trees = _trees(n, seed=4, species=("Pinus palustris",))
    classes = ["Pinus palustris", "Quercus virginiana"]
    probs = np.tile([0.5, 0.5], (n, 1))
    cfg = dict(n_draws=3000, seed=2, carbon_fraction={"gymnosperm": 0.51, "angiosperm": 0.47},
               species_classes=classes)
    pine = estimate_carbon(trees, CarbonConfig(species_probs=np.tile([1.0, 0.0], (n, 1)), **cfg))
    oak = estimate_carbon(trees, CarbonConfig(species_probs=np.tile([0.0, 1.0], (n, 1)), **cfg))
    mix = estimate_carbon(trees, CarbonConfig(species_probs=probs, **cfg))
    expected = (pine.total["carbon_t"] + oak.total["carbon_t"]) / 2
    assert mix.total["carbon_t"] == pytest.approx(expected, rel=1e-9)
    t = pine.trees
    assert t["carbon_kg"].sum() == pytest.approx(0.51 * (t["agb_kg"] + t["bgb_kg"]).sum(), rel=1e-9)
    cf = mix.trees["carbon_fraction"]
    assert ((cf > 0.47) & (cf < 0.51)).all()
    # the Monte Carlo carries the per-draw CF too: with only the species and the stand factors drawn, its
    # mean CO2e is the point estimate (the expectation over the species)
    only = estimate_carbon(trees, CarbonConfig(species_probs=probs, components={"species", "factors"}, **cfg))
    assert only.total_co2e_draws_t.mean() == pytest.approx(mix.total["co2e_t"], rel=0.01)


def test_groups_and_allometry_heights():
    trees = _trees(400, seed=2, chm=False)
    cell = np.arange(400) % 5 - 1  # -1: outside the grid
    res = estimate_carbon(trees, CarbonConfig(n_draws=300), {"cell": cell})
    g = res.groups["cell"]
    for col in GROUP_COLUMNS:
        assert col in g.columns, col
    assert list(g.index) == [0, 1, 2, 3] and g["n_trees"].sum() == 320
    assert (g["co2e_t_ci90_low"] < g["co2e_t"]).all() and (g["co2e_t"] < g["co2e_t_ci90_high"]).all()
    assert (g["co2e_t_ci95_low"] <= g["co2e_t_ci90_low"]).all()
    sp = res.groups["species"]
    assert set(sp["species"]) == set(trees["species"]) and sp["n_trees"].sum() == 400
    assert (res.trees["height_source"] == "allometry").all()
    assert (res.trees["height_confidence"] == "low").all()
    assert res.total["n_height_allometry"] == 400
    # group totals add up to the total (same draws)
    assert sp["agb_t"].sum() == pytest.approx(res.total["agb_t"], rel=1e-6)


def test_jucker_direct_model_selectable_and_sensitivity():
    trees = _trees(50)
    res = estimate_carbon(trees, CarbonConfig(agb_model="jucker2017_hcd", n_draws=200))
    assert (res.trees["agb_model"] == "jucker2017_hcd").all()
    assert res.sensitivity["alternative_model"] == "chave2014_eq4"
    assert res.sensitivity["alternative_agb_t"] == pytest.approx(
        res.trees["agb_chave2014_eq4_kg"].sum() / 1000)
    with pytest.raises(InputError):
        CarbonConfig(agb_model="magic")


def test_empty_and_bad_input():
    res = estimate_carbon(_trees(0), CarbonConfig(n_draws=50))
    assert res.total["n_trees"] == 0 and res.total["agb_t"] == 0
    assert all(r["conservative_co2e_t"] == 0 for r in res.standards)
    bad = _trees(3)
    bad.loc[0, "crown_area_m2"] = 0
    with pytest.raises(InputError, match="crown_area_m2"):
        estimate_carbon(bad)


def test_standards_rules():
    vmd = st.vmd0017_deduction(100.0, 12.0)
    assert vmd["deduction_pct"] == 0 and vmd["conservative_co2e_t"] == 100.0
    assert st.vmd0017_deduction(100.0, 25.0)["conservative_co2e_t"] == pytest.approx(90.0)
    art = st.art_trees_deduction(100.0, 20.0)
    assert art["deduction_pct"] == pytest.approx(0.524417 * 20 / 1.645006)
    assert st.vm0047_deduction(100.0, 8.0)["conservative_co2e_t"] == pytest.approx(92.0)
    assert st.vm0047_deduction(100.0, 120.0)["conservative_co2e_t"] == 0.0
    for rule in st.conservative_estimates(100.0, 10.0, 12.0):
        assert rule["source"] and "version in force" in rule["note"]


def test_carbon_fraction_by_plant_group():
    trees = _trees(400, seed=7, species=("Pinus palustris", "Acer rubrum"))
    res = estimate_carbon(trees, CarbonConfig(n_draws=1000, carbon_fraction={"gymnosperm": 0.51}))
    t = res.trees
    cf = np.where(t["plant_group"] == "gymnosperm", 0.51, 0.47)
    np.testing.assert_allclose(t["carbon_fraction"], cf)
    expected_t = (t["agb_kg"] * (1 + t["root_shoot_ratio"]) * cf * 44 / 12).sum() / 1000
    assert t["co2e_kg"].sum() / 1000 == pytest.approx(expected_t)
    assert res.total["co2e_t"] == pytest.approx(expected_t, rel=1e-12)  # totals are point sums
    # the chain's convexity over the Jucker DBH residual puts the draws above the plug-in point by
    # exp((k² - k) 0.056 / 2) = 1.053 (k = 2 * 0.976), measurement noise by about 2 % more
    assert np.median(res.total_co2e_draws_t) / expected_t == pytest.approx(1.053 * 1.02, rel=0.03)
    sp = res.groups["species"].set_index("species")
    pine = t[t["species"] == "Pinus palustris"]
    assert sp.loc["Pinus palustris", "co2e_t"] == pytest.approx(pine["co2e_kg"].sum() / 1000, rel=1e-12)


def test_trees_the_chm_missed_use_the_site_hd_shift():
    # 200 trees with CHM heights made at E = 0.4, 20 without: the missing ones get E = 0.4 heights (the H-D
    # curve calibrated on the measured trees), not the E = 0 heights, and the interval stays usable
    from pipeline.carbon import allometry as al

    rng = np.random.default_rng(2)
    cd = rng.uniform(3, 12, 220)
    h, _ = al.height_from_crown_m(cd, al.height_diameter_model("chave2014_eq6a", environmental_stress_e=0.4))
    h_in = h.copy()
    h_in[200:] = np.nan
    trees = pd.DataFrame({"tree_id": np.arange(220), "crown_diameter_m": cd, "height_m": h_in,
                          "height_source": np.where(np.isnan(h_in), "none", "chm"),
                          "species": "Quercus laevis", "species_prob": 1.0})
    res = estimate_carbon(trees, CarbonConfig(n_draws=500))
    np.testing.assert_allclose(res.trees["height_m"].to_numpy()[200:], h[200:], rtol=1e-5)
    cal = res.factors["height_diameter_calibration"]
    assert cal["n_trees"] == 200 and cal["log_shift"] == pytest.approx(-0.4, abs=1e-5)
    assert res.total["co2e_halfwidth90_pct"] < 60
    off = estimate_carbon(trees, CarbonConfig(n_draws=500, hd_calibrate=False))  # E = 0, SD 0.5
    assert off.factors["height_diameter_calibration"] is None
    assert off.total["co2e_halfwidth90_pct"] > res.total["co2e_halfwidth90_pct"]
