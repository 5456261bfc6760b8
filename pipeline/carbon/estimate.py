"""Per-tree carbon chain and its Monte Carlo: ``estimate_carbon(trees, config, groups) -> CarbonResult``.

Chain per tree (every factor is written to the tree table):
  CD = 2 sqrt(A / pi) -> H (CHM; without one, an H-D model iterated with Jucker's DBH model, flagged low
  confidence) -> D = Jucker 2017 (H, CD) -> AGB = Chave 2014 eq. 4 (rho, D, H) [or Jucker's direct H-CD model]
  -> BGB = R AGB -> C = CF (AGB + BGB) -> CO2e = C 44/12.
Units: kg per tree, t per group; lengths in m, D in cm, rho in g/cm³.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.carbon import allometry as al
from pipeline.carbon import factors as fc
from pipeline.carbon import standards
from pipeline.carbon.montecarlo import McInputs, SharedFactors, interval_stats, run_monte_carlo
from pipeline.carbon.wood_density import WoodDensityTable, plant_group_of
from pipeline.errors import InputError
from pipeline.memory import compact_labels

log = logging.getLogger(__name__)

AGB_MODELS = ("chave2014_eq4", "jucker2017_hcd")
REPORTING_N_DRAWS = 10_000  # draws for reported numbers (ART-TREES asks for 10,000); 1,000 by default
MC_COMPONENTS = frozenset({"measurement", "parameters", "residuals", "wood_density", "species", "factors",
                           "systematic", "detection"})


@dataclass(frozen=True)
class ParamError:
    """Shared error of an allometric model's parameters (one draw per iteration, all trees):
    ln y += d_a + d_b (ln x - centre_log), d_a ~ N(0, intercept_sd), d_b ~ N(0, slope_sd).

    The defaults below are ASSUMPTIONS (about 2% on the intercept): the published posteriors are not
    distributed with this tool. Replace them with a model's own parameter covariance when available.
    """

    intercept_sd: float
    slope_sd: float
    centre_log: float


@dataclass
class CarbonConfig:
    """Every parameter of the carbon chain and its Monte Carlo (units in the names)."""

    agb_model: str = "chave2014_eq4"  # or "jucker2017_hcd"
    jucker_biome: str = "temperate"  # generic names use Jucker's global fit; see allometry.JUCKER_BIOMES
    hd_model: str = "chave2014_eq6a"  # H-D model for trees without a CHM height ("local": see hd_local)
    hd_environmental_stress_e: float | None = None  # Chave 2014 E of the site; None: not set (E 0, SD 0.5)
    hd_e_sd: float | None = None  # SD of E (shared); None: 0.5 when E is not set, 0.1 when it is
    hd_local: dict[str, float] | None = None  # local H-D: a, b, c, rse, intercept_sd (ln H, H m, D cm)
    hd_calibrate: bool = True  # neither E nor a local fit given: shift the H-D curve to the measured trees
    wood_density_csv: str | None = None  # user table; its rows replace the built-in ones
    wood_density_region: str = "global"  # regional default when neither taxon nor stand resolves
    ecozone: str = fc.DEFAULT_ECOZONE
    root_shoot_ratio: float | None = None  # overrides the ecozone table
    root_shoot_rel_sd: float = 0.25  # assumption: IPCC gives wide ranges, not SDs
    area_ha: float | None = None  # stand area: selects the AGB-density class of the R table
    carbon_fraction: dict[str, float] = field(default_factory=lambda: dict(fc.DEFAULT_CARBON_FRACTION))
    carbon_fraction_sd: float = fc.CARBON_FRACTION_SD
    height_rel_sd: float = 0.05  # CHM height error per tree (UAV SfM RMSE 2-13%: Krause 2019,
    # Panagiotidis 2017)
    crown_diameter_rel_sd: float = 0.10  # crown diameter error per tree (Panagiotidis 2017: RMSE 14-19%)
    height_bias_rel_sd: float = 0.05  # systematic CHM height bias of the run (shared; see METHOD.md)
    crown_diameter_bias_rel_sd: float = 0.05  # systematic crown-diameter bias of the segmentation (shared)
    wood_density_tree_rel_sd: float = 0.10  # tree-to-tree wood density within a taxon (independent)
    wood_density_shared: bool = True  # the table value's error shared by a taxon's trees (False: per tree)
    jucker_dbh_residual_sd: float = math.sqrt(al.JUCKER_DBH_RESIDUAL_VAR)  # 0.237 (sigma² = 0.056)
    chave_param: ParamError = ParamError(0.02, 0.005, 9.3)
    jucker_dbh_param: ParamError = ParamError(0.02, 0.005, 5.0)
    jucker_agb_param: ParamError = ParamError(0.03, 0.01, 5.0)
    detection_calibration: dict[str, Any] | None = None  # crown model's `detection_calibration` (JSON)
    components: frozenset[str] = MC_COMPONENTS  # error sources in the Monte Carlo
    n_draws: int = 1000  # 10,000 for reporting (ART-TREES)
    seed: int = 0
    threads: int | None = None
    species_probs: np.ndarray | None = None  # [n_trees, K] classifier probabilities
    species_classes: list[str] | None = None  # K species names

    def __post_init__(self) -> None:
        # values from JSON/CLI: plain dicts and lists
        for name in ("chave_param", "jucker_dbh_param", "jucker_agb_param"):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, ParamError(**value))
            elif isinstance(value, list | tuple):
                setattr(self, name, ParamError(*value))
        self.components = frozenset(self.components)
        self.carbon_fraction = {**fc.DEFAULT_CARBON_FRACTION, **dict(self.carbon_fraction)}
        if self.agb_model not in AGB_MODELS:
            raise InputError(f"unknown AGB model {self.agb_model!r}; use {' or '.join(AGB_MODELS)}")
        unknown = set(self.components) - MC_COMPONENTS
        if unknown:
            raise InputError(f"unknown Monte Carlo components {sorted(unknown)}; use {sorted(MC_COMPONENTS)}")
        if self.n_draws < 2:
            raise InputError("n_draws must be at least 2 (1000 by default, 10000 for reporting)")
        for group in al.PLANT_GROUPS:
            if not 0.3 <= self.carbon_fraction.get(group, -1.0) <= 0.6:
                raise InputError(f"carbon_fraction for {group} must be given and lie in 0.3-0.6")
        if self.detection_calibration is not None:
            from pipeline.carbon.detection import validate_detection_calibration

            self.detection_calibration = validate_detection_calibration(self.detection_calibration)

    def hd(self) -> al.HeightDiameterModel:
        """The height-diameter model of trees without a measured height."""
        return al.height_diameter_model(self.hd_model, self.hd_environmental_stress_e, self.hd_e_sd,
                                        self.hd_local)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able parameters (without the probability matrix)."""
        d = asdict(self)
        d.pop("species_probs")
        d["components"] = sorted(self.components)
        return d


@dataclass
class CarbonResult:
    """Per-tree table, per-group tables, total, standards' conservative CO2e and the factors used."""

    trees: pd.DataFrame
    groups: dict[str, pd.DataFrame]
    total: dict[str, float]
    standards: list[dict[str, Any]]
    factors: dict[str, Any]
    sensitivity: dict[str, Any]
    total_co2e_draws_t: np.ndarray
    config: CarbonConfig
    uncertainty: dict[str, Any] = field(default_factory=dict)  # what the interval includes, what it does not
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary: total, standards, factors, sensitivity and the Monte Carlo settings."""
        return {"total": self.total, "standards": self.standards, "factors": self.factors,
                "sensitivity": self.sensitivity,
                "monte_carlo": {"n_draws": self.config.n_draws, "seed": self.config.seed,
                                "components": sorted(self.config.components),
                                "convention": TOTALS_CONVENTION},
                "uncertainty": self.uncertainty, "warnings": list(self.warnings),
                "carbon_config": self.config.as_dict()}


TOTALS_CONVENTION = ("totals and tables are sums of the per-tree point estimates (they reconcile with "
                     "crowns.csv to the kilogram); the Monte Carlo gives the SDs and intervals only")
ALLOMETRIC_HEIGHT_WARNING = ("HEIGHTS ARE ALLOMETRIC for {n} of {total} trees (no CHM or DSM height): "
                             "estimated from crown size with {model}; the interval includes the H-D "
                             "residual and the site's {shared}, but pass --chm or --dsm for usable numbers")


REQUIRED_COLUMNS = ("tree_id", "species")


def _prepare(trees: pd.DataFrame, config: CarbonConfig) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in trees.columns]
    if "crown_diameter_m" not in trees.columns and "crown_area_m2" not in trees.columns:
        missing.append("crown_area_m2")
    if missing:
        raise InputError(f"tree table lacks columns {missing}; give tree_id, species and crown_area_m2")
    out = trees.copy()
    cd = pd.to_numeric(out.get("crown_diameter_m", pd.Series(np.nan, index=out.index)), errors="coerce")
    cd = cd.to_numpy(dtype=float)
    if "crown_area_m2" in out.columns:
        from_area = al.crown_diameter_from_area_m(pd.to_numeric(out["crown_area_m2"], errors="coerce"))
        cd = np.where(np.isfinite(cd) & (cd > 0), cd, from_area)
    bad = ~(np.isfinite(cd) & (cd > 0))
    if bad.any():
        raise InputError(f"{int(bad.sum())} crowns have no positive crown_area_m2/crown_diameter_m; "
                         "drop them before the carbon step")
    out["crown_diameter_m"] = cd
    if "height_m" not in out.columns:
        out["height_m"] = np.nan
    if "height_source" not in out.columns:
        out["height_source"] = "none"
    out["species"] = out["species"].astype(object).where(out["species"].notna(), "unknown")
    return out


def _jucker_by_group(h: np.ndarray, cd: np.ndarray, pg: np.ndarray, biome: str) -> tuple[np.ndarray, list]:
    """DBH (cm) and per-tree model names with the plant-group coefficient sets."""
    d = np.empty_like(h)
    names = np.empty(h.shape[0], dtype=object)
    for gi, group in enumerate(al.PLANT_GROUPS):
        m = pg == gi
        if m.any():
            d[m] = al.dbh_jucker2017_cm(h[m], cd[m], group, biome)
            names[m] = al.jucker_dbh_model_name(biome, group)
    return d, names


def _point_chain(h_in: np.ndarray, has_h: np.ndarray, cd: np.ndarray, rho: np.ndarray, pg: np.ndarray,
                 hd: al.HeightDiameterModel, config: CarbonConfig, model: str, dh: float = 0.0,
                 dcd: float = 0.0, dd: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Height (m), DBH (cm) and AGB (kg) per tree, with optional log shifts of the measured height or the
    H-D model (``dh``), the crown diameter (``dcd``) and Jucker's DBH (``dd``) for the error propagation."""
    cd_s = cd * math.exp(dcd)
    h = np.where(has_h, h_in * math.exp(dh), np.nan)
    d = np.empty_like(cd)
    for gi, group in enumerate(al.PLANT_GROUPS):
        m = (pg == gi) & has_h
        if m.any():
            d[m] = al.dbh_jucker2017_cm(h[m], cd_s[m], group, config.jucker_biome) * math.exp(dd)
        m = (pg == gi) & ~has_h
        if m.any():
            h[m], d[m] = al.height_from_crown_m(cd_s[m], hd, group, config.jucker_biome, height_log_shift=dh,
                                                dbh_log_shift=dd)
    if model == "chave2014_eq4":
        agb = al.agb_chave2014_eq4_kg(rho, d, h)
    else:
        agb = np.empty_like(h)
        for gi, group in enumerate(al.PLANT_GROUPS):
            m = pg == gi
            if m.any():
                agb[m] = al.agb_jucker2017_hcd_kg(h[m], cd_s[m], group)
    return h, d, agb


N_SHARED = 7  # shared error columns: chave a, b | jucker a, b (DBH or direct AGB) | height bias, CD bias, H-D


def _chain(h_in: np.ndarray, has_h: np.ndarray, cd: np.ndarray, rho: np.ndarray, rho_sd: np.ndarray,
           pg: np.ndarray, hd: al.HeightDiameterModel, config: CarbonConfig, model: str) -> dict[str, Any]:
    """Point estimates and Monte Carlo terms for one AGB model (arrays per tree).

    The sensitivities of ln AGB to a log shift of the height, the crown diameter and Jucker's DBH come from
    finite differences of the whole chain, so that allometric heights (fixed point of the H-D and DBH
    models) carry their feedback correctly.
    """
    comp = config.components
    h, d, agb = _point_chain(h_in, has_h, cd, rho, pg, hd, config, model)
    ln0 = np.log(agb)
    eps = 1e-3
    g_h = (np.log(_point_chain(h_in, has_h, cd, rho, pg, hd, config, model, dh=eps)[2]) - ln0) / eps
    g_cd = (np.log(_point_chain(h_in, has_h, cd, rho, pg, hd, config, model, dcd=eps)[2]) - ln0) / eps
    g_d = (np.log(_point_chain(h_in, has_h, cd, rho, pg, hd, config, model, dd=eps)[2]) - ln0) / eps
    _, dbh_names = _jucker_by_group(h, cd, pg, config.jucker_biome)
    meas = "measurement" in comp
    resid = "residuals" in comp
    sys_on = "systematic" in comp
    sigma_h = np.where(has_h, config.height_rel_sd if meas else 0.0, hd.rse_log if resid else 0.0)
    s_cd = config.crown_diameter_rel_sd if meas else 0.0
    n = h.shape[0]
    loadings = np.zeros((n, N_SHARED))
    x_j = np.log(h * cd)
    if model == "chave2014_eq4":
        b_rho = al.CHAVE_EQ4_EXPONENT
        s_res2 = al.CHAVE_EQ4_RSE**2 if resid else 0.0
        s_j2 = config.jucker_dbh_residual_sd**2 if resid else 0.0
        x_c = np.log(rho * d * d * h)
        loadings[:, 0] = 1.0
        loadings[:, 1] = x_c - config.chave_param.centre_log
        loadings[:, 2] = g_d
        loadings[:, 3] = g_d * (x_j - config.jucker_dbh_param.centre_log)
        sds = [config.chave_param.intercept_sd, config.chave_param.slope_sd,
               config.jucker_dbh_param.intercept_sd, config.jucker_dbh_param.slope_sd]
    else:
        b_rho = 0.0
        s_res2 = al.JUCKER_AGB_RESIDUAL_VAR if resid else 0.0
        s_j2 = 0.0
        loadings[:, 0] = 1.0
        loadings[:, 1] = x_j - config.jucker_agb_param.centre_log
        sds = [config.jucker_agb_param.intercept_sd, config.jucker_agb_param.slope_sd, 0.0, 0.0]
    if "parameters" not in comp:
        sds = [0.0] * 4
    wd_on = "wood_density" in comp
    s_rho_tree2 = config.wood_density_tree_rel_sd**2 if wd_on else np.zeros(n)
    if wd_on and not config.wood_density_shared:  # before issue 17: the level SD drawn per tree
        s_rho_tree2 = s_rho_tree2 + np.where(rho > 0, rho_sd / rho, 0.0) ** 2
    # independent per-tree variance; the residual and wood-density part is centred (its point is a mean)
    # (loading k times sigma², see pipeline.carbon.montecarlo: the draws keep the chain's convexity). The
    # H-D residual of an allometric height is centred on AGB (k² sigma²): through the fixed point with
    # Jucker's DBH its loading is ~4.8, and a mean-preserving H would put the whole interval above the
    # point (x1.7 at RSE 0.243); the chained no-CHM estimate is taken as mean-unbiased for AGB instead
    rse2 = (hd.rse_log if resid else 0.0) ** 2
    centre = np.where(has_h, 0.0, g_h**2 * rse2) + g_d * s_j2 + b_rho * s_rho_tree2 + s_res2
    var = (g_h * sigma_h) ** 2 + (g_cd * s_cd) ** 2 + g_d**2 * s_j2 + b_rho**2 * s_rho_tree2 + s_res2
    # shared (per-run) systematic terms: CHM height bias (measured heights), segmentation crown-diameter
    # bias (all trees), the site shift of the H-D model (allometric heights: E unknown or local intercept)
    loadings[:, 4] = np.where(has_h, g_h, 0.0)
    loadings[:, 5] = g_cd
    loadings[:, 6] = np.where(has_h, 0.0, g_h)
    shared_sds = [config.height_bias_rel_sd, config.crown_diameter_bias_rel_sd, hd.shared_sd_log]
    sds += [v if sys_on else 0.0 for v in shared_sds]
    wd_ln_sd = np.where(rho > 0, rho_sd / rho, 0.0) if wd_on and config.wood_density_shared else np.zeros(n)
    return {"height_m": h, "dbh_cm": d, "dbh_model": dbh_names, "agb_kg": agb,
            "noise_var": np.asarray(var, dtype=float), "centre_var": np.asarray(centre, dtype=float),
            "loadings": loadings,
            "param_sd": np.asarray(sds, dtype=float), "wd_loading": b_rho, "wd_ln_sd": wd_ln_sd}


def _group_frame(name: str, ids: np.ndarray, agb_draws: np.ndarray, co2e_draws: np.ndarray,
                 point: dict[str, np.ndarray], labels: dict[int, str] | None = None) -> pd.DataFrame:
    """Per-group table: point sums of the trees (t) with the Monte Carlo SDs and intervals."""
    keep = ids >= 0
    size = agb_draws.shape[0]
    n_trees = np.bincount(ids[keep], minlength=size)
    present = np.flatnonzero(n_trees > 0)
    sums = {k: np.bincount(ids[keep], weights=v[keep], minlength=size)[present] for k, v in point.items()}
    a = interval_stats(agb_draws[present], sums["agb_kg"])
    c = interval_stats(co2e_draws[present], sums["co2e_kg"])
    frame = pd.DataFrame({
        "group_id": present, "n_trees": n_trees[present],
        "agb_t": a["mean"], "agb_t_sd": a["sd"], "agb_t_ci90_low": a["ci90_low"],
        "agb_t_ci90_high": a["ci90_high"], "bgb_t": sums["bgb_kg"] / 1000.0,
        "carbon_t": sums["carbon_kg"] / 1000.0,
        "co2e_t": c["mean"], "co2e_t_sd": c["sd"],
        "co2e_t_ci90_low": c["ci90_low"], "co2e_t_ci90_high": c["ci90_high"],
        "co2e_t_ci95_low": c["ci95_low"], "co2e_t_ci95_high": c["ci95_high"],
        "co2e_halfwidth90_pct": c["halfwidth90_pct"], "co2e_halfwidth95_pct": c["halfwidth95_pct"],
    }, index=pd.Index(present, name=name))
    if labels is not None:
        frame.insert(1, name, [labels.get(int(i), "") for i in present])
    return frame


def estimate_carbon(trees: pd.DataFrame, config: CarbonConfig | None = None,
                    groups: dict[str, np.ndarray] | None = None) -> CarbonResult:
    """Carbon per tree, per group and in total with Monte Carlo intervals (see module docstring).

    ``trees``: tree_id, crown_area_m2 (or crown_diameter_m), height_m (NaN where unknown), height_source,
    species, species_prob. ``groups``: name -> int group id per tree (-1 = none); a ``species`` grouping is
    added from the species names when absent.

    Convention: ``agb_kg``, ``carbon_kg``, ``co2e_kg`` per tree are point estimates (the expectation over
    the classifier's species probabilities when they are given), every group and total is their sum, and
    the Monte Carlo supplies the SDs and intervals.
    """
    config = config or CarbonConfig()
    t = _prepare(trees, config)
    n = len(t)
    table = (WoodDensityTable.from_csv(config.wood_density_csv) if config.wood_density_csv
             else WoodDensityTable.default())
    species = t["species"].astype(str).to_numpy()
    wd = table.lookup_many(species, region=config.wood_density_region)
    rho = wd["wood_density"].to_numpy()
    rho_sd = wd["wood_density_sd"].to_numpy()
    pg_names = {s: plant_group_of(s) for s in set(species)}
    pg = np.array([al.PLANT_GROUPS.index(pg_names[s]) for s in species], dtype=np.int64)

    # height: CHM where available, else the H-D model iterated with the crown allometry (low confidence)
    cd = t["crown_diameter_m"].to_numpy(dtype=float, copy=True)
    h_in = pd.to_numeric(t["height_m"], errors="coerce").to_numpy(dtype=float, copy=True)
    has_h = np.isfinite(h_in) & (h_in > 0)
    hd = config.hd()
    hd_calibration = None
    if (config.hd_calibrate and config.hd_environmental_stress_e is None and config.hd_local is None
            and (~has_h).any() and has_h.sum() >= al.HD_CALIBRATION_MIN_TREES):
        # a CHM for most trees: the site's H-D relation from them, for the trees the CHM missed
        hd, hd_calibration = al.calibrate_hd_shift(h_in[has_h], cd[has_h], pg[has_h], hd, config.jucker_biome)
    source = np.where(has_h, t["height_source"].astype(object).to_numpy(), "allometry")

    main = _chain(h_in, has_h, cd, rho, rho_sd, pg, hd, config, config.agb_model)
    h = main["height_m"]
    alt_model = next(m for m in AGB_MODELS if m != config.agb_model)
    alt_agb = _point_chain(h_in, has_h, cd, rho, pg, hd, config, alt_model)[2]  # only its point values

    cf_group = np.array([config.carbon_fraction["angiosperm"], config.carbon_fraction["gymnosperm"]])

    # species drawn from the classifier's probabilities: the point estimate is the expectation over them
    probs_k = ln_k = var_k = cvar_k = pg_k = None
    agb_point = main["agb_kg"].copy()
    carbon_point_factor = agb_point * cf_group[pg]  # sum over species of p_k AGB_k CF_k
    taxon, taxon_k = None, None
    probs_k_used = "species" in config.components and config.species_probs is not None
    if probs_k_used:
        probs_k = np.asarray(config.species_probs, dtype=float)
        classes = list(config.species_classes or [])
        if probs_k.shape != (n, len(classes)):
            raise InputError(f"species_probs has shape {probs_k.shape}, expected ({n}, {len(classes)}) "
                             "matching the trees and species_classes")
        row_sum = probs_k.sum(axis=1, keepdims=True)
        safe = np.where(row_sum > 0, row_sum, 1.0)
        probs_k = np.where(row_sum > 0, probs_k / safe, 1.0 / max(len(classes), 1))
        stand = table.lookup_many(list(species) + classes, region=config.wood_density_region).iloc[n:]
        ln_k = np.empty((n, len(classes)))
        var_k = np.empty((n, len(classes)))
        cvar_k = np.empty((n, len(classes)))
        pg_k = np.array([al.PLANT_GROUPS.index(plant_group_of(c)) for c in classes], dtype=np.int64)
        taxon_sd = np.zeros(len(classes))
        agb_point = np.zeros(n)
        carbon_point_factor = np.zeros(n)
        for k in range(len(classes)):
            rho_k = np.full(n, stand["wood_density"].iloc[k])
            sd_k = np.full(n, stand["wood_density_sd"].iloc[k])
            ck = _chain(h_in, has_h, cd, rho_k, sd_k, np.full(n, pg_k[k]), hd, config, config.agb_model)
            ln_k[:, k], var_k[:, k] = np.log(ck["agb_kg"]), ck["noise_var"]
            cvar_k[:, k] = ck["centre_var"]
            taxon_sd[k] = float(ck["wd_ln_sd"][0]) if n else 0.0
            agb_point += probs_k[:, k] * ck["agb_kg"]
            carbon_point_factor += probs_k[:, k] * ck["agb_kg"] * cf_group[pg_k[k]]
        taxon_k = np.arange(len(classes))
    else:
        codes, uniq = pd.factorize(pd.Series(species))
        taxon = codes.astype(np.int64)
        taxon_sd = np.zeros(len(uniq))
        if n:
            taxon_sd[taxon] = main["wd_ln_sd"]  # one value per species name (same lookup for all its trees)
    # stand factors (R from the stand's AGB density: the point estimate, species expectation included)
    point_total_t = float(agb_point.sum()) / 1000.0
    if config.root_shoot_ratio is not None:
        r, r_label = float(config.root_shoot_ratio), "user value"
    else:
        density = point_total_t / config.area_ha if config.area_ha else None
        r, r_label = fc.root_shoot_ratio(config.ecozone, density)
    use_f = "factors" in config.components
    shared = SharedFactors(root_shoot=r, root_shoot_sd=r * config.root_shoot_rel_sd if use_f else 0.0,
                           carbon_fraction=(cf_group[0], cf_group[1]),
                           carbon_fraction_sd=config.carbon_fraction_sd if use_f else 0.0)

    groups = {k: np.asarray(v, dtype=np.int64) for k, v in (groups or {}).items()}
    for k, v in groups.items():
        if v.shape != (n,):
            raise InputError(f"group array {k!r} has shape {v.shape}, expected ({n},)")
    species_labels = None
    if "species" not in groups:
        codes, uniq = pd.factorize(pd.Series(species))
        groups["species"] = codes.astype(np.int64)
        species_labels = {i: str(s) for i, s in enumerate(uniq)}
    else:
        ids = groups["species"]
        species_labels = {int(i): str(species[np.flatnonzero(ids == i)[0]]) for i in np.unique(ids[ids >= 0])}

    started = time.perf_counter()
    mc = run_monte_carlo(
        McInputs(ln_point=np.log(main["agb_kg"]), noise_var=main["noise_var"], loadings=main["loadings"],
                 param_sd=main["param_sd"], plant_group=pg, species_probs=probs_k, ln_point_k=ln_k,
                 noise_var_k=var_k, centre_var_k=cvar_k, plant_group_k=pg_k, taxon=taxon, taxon_k=taxon_k,
                 taxon_ln_sd=taxon_sd, wd_loading=main["wd_loading"], centre_var=main["centre_var"]),
        shared, groups, n_draws=config.n_draws, seed=config.seed, threads=config.threads)
    log.debug("Monte Carlo: %d trees x %d draws in %.2f s", len(t), config.n_draws,
              time.perf_counter() - started)
    del probs_k, ln_k, var_k, cvar_k, main["loadings"], main["noise_var"]  # the draws are done

    # point estimates per tree: carbon fraction of the expected species mixture (= the group's CF when fixed)
    with np.errstate(invalid="ignore", divide="ignore"):
        cf_tree = np.where(agb_point > 0, carbon_point_factor / agb_point, cf_group[pg])
    out = t
    out["height_m"] = h
    out["height_source"] = source
    out["height_confidence"] = np.where(has_h, "normal", "low")
    out["plant_group"] = np.array(al.PLANT_GROUPS)[pg]
    out["dbh_cm"] = main["dbh_cm"]
    out["dbh_model"] = main["dbh_model"]
    for col in ("wood_density", "wood_density_sd", "wood_density_level", "wood_density_source"):
        out[col] = wd[col].to_numpy()
    out["agb_model"] = config.agb_model
    out["agb_kg"] = agb_point
    out["agb_kg_sd"] = mc.agb_sd
    out["agb_kg_p5"] = mc.agb_p5
    out["agb_kg_p95"] = mc.agb_p95
    if probs_k_used:
        out["agb_recorded_species_kg"] = main["agb_kg"]  # the chain at the recorded (top) species
    out[f"agb_{alt_model}_kg"] = alt_agb
    out["root_shoot_ratio"] = r
    out["bgb_kg"] = al.bgb_kg(agb_point, r)
    out["carbon_fraction"] = cf_tree
    out["carbon_kg"] = al.carbon_kg(agb_point, out["bgb_kg"].to_numpy(), cf_tree)
    out["co2e_kg"] = al.co2e_kg(out["carbon_kg"].to_numpy())
    compact_labels(out)  # repeated labels (sources, models, levels) as categoricals: ~70 B a tree and column

    point_cols = {k: out[k].to_numpy(dtype=float) for k in ("agb_kg", "bgb_kg", "carbon_kg", "co2e_kg")}
    group_frames = {}
    for name, ids in groups.items():
        group_frames[name] = _group_frame(name, ids, mc.group_agb[name], mc.group_co2e[name], point_cols,
                                          species_labels if name == "species" else None)
    sums = {k: float(v.sum()) for k, v in point_cols.items()}
    a = interval_stats(mc.total_agb, sums["agb_kg"])
    c = interval_stats(mc.total_co2e, sums["co2e_kg"])
    total = {"n_trees": n, "agb_t": sums["agb_kg"] / 1000, "agb_t_sd": float(a["sd"]),
             "agb_t_ci90_low": float(a["ci90_low"]), "agb_t_ci90_high": float(a["ci90_high"]),
             "bgb_t": sums["bgb_kg"] / 1000, "carbon_t": sums["carbon_kg"] / 1000,
             "co2e_t": sums["co2e_kg"] / 1000, "co2e_t_sd": float(c["sd"]),
             "co2e_t_ci90_low": float(c["ci90_low"]), "co2e_t_ci90_high": float(c["ci90_high"]),
             "co2e_t_ci95_low": float(c["ci95_low"]), "co2e_t_ci95_high": float(c["ci95_high"]),
             "co2e_halfwidth90_pct": float(c["halfwidth90_pct"]),
             "co2e_halfwidth95_pct": float(c["halfwidth95_pct"]),
             "n_height_allometry": int((~has_h).sum())}
    if config.area_ha:
        total["area_ha"] = float(config.area_ha)
        total["agb_t_per_ha"] = total["agb_t"] / config.area_ha
        total["co2e_t_per_ha"] = total["co2e_t"] / config.area_ha

    # detection error: a shared multiplicative factor on the whole run (crown model's calibration)
    from pipeline.carbon.detection import apply_detection

    detection = apply_detection(config.detection_calibration if "detection" in config.components else None,
                                mc.total_agb, mc.total_co2e, sums["agb_kg"], sums["co2e_kg"], config.seed)
    basis = detection.get("total") or total
    rules = standards.conservative_estimates(basis["co2e_t"], basis["co2e_halfwidth90_pct"],
                                             basis["co2e_halfwidth95_pct"], config.n_draws)
    total_draws = detection.pop("co2e_draws_kg", mc.total_co2e)
    alt_total_t = float(alt_agb.sum() / 1000)
    sensitivity = {"agb_model": config.agb_model, "alternative_model": alt_model,
                   "agb_t": total["agb_t"], "alternative_agb_t": alt_total_t,
                   "alternative_minus_main_pct": (alt_total_t / total["agb_t"] - 1) * 100
                   if total["agb_t"] > 0 else math.nan}
    factor_info = {
        "equations": al.EQUATIONS,
        "root_shoot_ratio": r, "root_shoot_class": r_label, "root_shoot_source": fc.ROOT_SHOOT_SOURCE
        if config.root_shoot_ratio is None else "user value",
        "root_shoot_rel_sd": config.root_shoot_rel_sd,
        "carbon_fraction": dict(config.carbon_fraction), "carbon_fraction_sd": config.carbon_fraction_sd,
        "carbon_fraction_source": fc.CARBON_FRACTION_SOURCE,
        "height_diameter_model": hd.name, "height_diameter_source": hd.source,
        "height_diameter_calibration": hd_calibration,
        "jucker_biome": config.jucker_biome,
        "wood_density_table": str(config.wood_density_csv or Path("pipeline/carbon/data/wood_density.csv")),
        "wood_density_levels": {str(k): int(v) for k, v in wd["wood_density_level"].value_counts().items()},
        "parameter_error_note": ParamError.__doc__.split("\n\n")[1].strip(),
    }
    warnings = []
    n_allo = int((~has_h).sum())
    if n_allo:
        shared_label = (f"H-D intercept error (SD {hd.shared_sd_log:g} on ln H)" if hd.kind == "loglog"
                        else f"E uncertainty (SD {hd.shared_sd_log:g})")
        warnings.append(ALLOMETRIC_HEIGHT_WARNING.format(n=n_allo, total=n, model=hd.source,
                                                         shared=shared_label))
    if not detection.get("included"):
        warnings.append(detection["note"])
    uncertainty = _uncertainty_statement(config, hd, n_allo, n, detection)
    return CarbonResult(trees=out, groups=group_frames, total=total, standards=rules, factors=factor_info,
                        sensitivity=sensitivity, total_co2e_draws_t=np.asarray(total_draws) / 1000.0,
                        config=config, uncertainty=uncertainty, warnings=warnings)


def _uncertainty_statement(config: CarbonConfig, hd: al.HeightDiameterModel, n_allo: int, n: int,
                           detection: dict[str, Any]) -> dict[str, Any]:
    """What the interval includes and what it does not (summary.json, report.html)."""
    comp = config.components
    inc = []
    measured = n - n_allo
    if "measurement" in comp:
        height = f"per-tree height ({config.height_rel_sd:.0%}) and " if measured else "per-tree "
        inc.append(f"{height}crown-diameter ({config.crown_diameter_rel_sd:.0%}) measurement error")
    if "systematic" in comp:
        height = "a systematic "
        if measured:
            height = f"a systematic height bias of the run (SD {config.height_bias_rel_sd:.0%}) and "
        cd_sd = config.crown_diameter_bias_rel_sd
        inc.append(f"{height}crown-diameter bias of the segmentation (SD {cd_sd:.0%}), shared by all trees")
        if n_allo:
            inc.append(f"the site's height-diameter shift for allometric heights (SD {hd.shared_sd_log:g} on "
                       "ln H), shared")
    if "residuals" in comp:
        hd_part = f", H-D RSE {hd.rse_log:.3g}" if n_allo else ""
        inc.append("allometric residuals (Jucker DBH sigma² 0.056, Chave eq. 4 RSE 0.357 or Jucker AGB "
                   f"sigma² 0.204{hd_part})")
    if "parameters" in comp:
        inc.append("allometric parameter error (assumed SDs, shared)")
    if "wood_density" in comp:
        inc.append("wood-density error of each taxon's table value (shared by its trees) and tree-to-tree "
                   f"variation ({config.wood_density_tree_rel_sd:.0%})")
    if "species" in comp and config.species_probs is not None:
        inc.append("species drawn from the classifier's probabilities (wood density and carbon fraction "
                   "follow the drawn species)")
    if "factors" in comp:
        inc.append("root-to-shoot ratio and carbon fraction (shared)")
    if detection.get("included"):
        inc.append("crown detection error (missed, false and merged crowns) from the crown model's "
                   "validation plots, a shared factor on the total")
    exc = ["sampling error (the whole area is mapped; plots are not a sample design)",
           "errors of the equations' form beyond their published residuals (model selection)",
           "permanence, leakage and baseline (not part of a stock estimate)"]
    if not detection.get("included"):
        exc.insert(0, "crown detection error (missed, false, merged and split crowns): the crown model "
                   "carries no detection calibration")
    else:
        exc.insert(0, "crown detection error in the per-cell, per-plot and per-species tables (it is "
                   "applied to the run's total only)")
    return {"includes": inc, "excludes": exc, "detection": {k: v for k, v in detection.items()
                                                            if k not in ("total",)},
            "total_with_detection": detection.get("total")}
