"""Per-tree carbon chain and its Monte Carlo: ``estimate_carbon(trees, config, groups) -> CarbonResult``.

Chain per tree (every factor is written to the tree table):
  CD = 2 sqrt(A / pi) -> H (CHM; without one, an H-D model iterated with Jucker's DBH model, flagged low
  confidence) -> D = Jucker 2017 (H, CD) -> AGB = Chave 2014 eq. 4 (rho, D, H) [or Jucker's direct H-CD model]
  -> BGB = R AGB -> C = CF (AGB + BGB) -> CO2e = C 44/12.
Units: kg per tree, t per group; lengths in m, D in cm, rho in g/cm³.
"""

from __future__ import annotations

import math
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

AGB_MODELS = ("chave2014_eq4", "jucker2017_hcd")
REPORTING_N_DRAWS = 10_000  # draws for reported numbers (ART-TREES asks for 10,000); 1,000 by default
MC_COMPONENTS = frozenset({"measurement", "parameters", "residuals", "wood_density", "species", "factors"})


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
    hd_model: str = "chave2014_eq6a"  # H-D model for trees without a CHM height
    hd_environmental_stress_e: float = 0.0  # Chave 2014 E for eq. 6a (0 = mid-range; set it for the site)
    wood_density_csv: str | None = None  # user table; its rows replace the built-in ones
    wood_density_region: str = "global"  # regional default when neither taxon nor stand resolves
    ecozone: str = fc.DEFAULT_ECOZONE
    root_shoot_ratio: float | None = None  # overrides the ecozone table
    root_shoot_rel_sd: float = 0.25  # assumption: IPCC gives wide ranges, not SDs
    area_ha: float | None = None  # stand area: selects the AGB-density class of the R table
    carbon_fraction: dict[str, float] = field(default_factory=lambda: dict(fc.DEFAULT_CARBON_FRACTION))
    carbon_fraction_sd: float = fc.CARBON_FRACTION_SD
    height_rel_sd: float = 0.05  # CHM height error (UAV SfM RMSE 2-13%: Krause 2019, Panagiotidis 2017)
    crown_diameter_rel_sd: float = 0.10  # crown diameter error (Panagiotidis 2017: RMSE 14-19%)
    jucker_dbh_residual_sd: float = 0.056
    chave_param: ParamError = ParamError(0.02, 0.005, 9.3)
    jucker_dbh_param: ParamError = ParamError(0.02, 0.005, 5.0)
    jucker_agb_param: ParamError = ParamError(0.03, 0.01, 5.0)
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

    def summary(self) -> dict[str, Any]:
        """JSON-able summary: total, standards, factors, sensitivity and the Monte Carlo settings."""
        return {"total": self.total, "standards": self.standards, "factors": self.factors,
                "sensitivity": self.sensitivity,
                "monte_carlo": {"n_draws": self.config.n_draws, "seed": self.config.seed,
                                "components": sorted(self.config.components)},
                "carbon_config": self.config.as_dict()}


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


def _chain(h: np.ndarray, cd: np.ndarray, rho: np.ndarray, rho_sd: np.ndarray, pg: np.ndarray,
           sigma_h: np.ndarray, config: CarbonConfig, model: str) -> dict[str, np.ndarray]:
    """Point estimates and Monte Carlo terms for one AGB model (arrays per tree)."""
    comp = config.components
    d, dbh_names = _jucker_by_group(h, cd, pg, config.jucker_biome)
    beta_j = np.array([al.jucker_dbh_coefficients(config.jucker_biome, g).beta for g in al.PLANT_GROUPS])[pg]
    x_j = np.log(h * cd)
    s_h2 = sigma_h**2 if "measurement" in comp else np.zeros_like(h)
    s_cd2 = config.crown_diameter_rel_sd**2 if "measurement" in comp else 0.0
    n = h.shape[0]
    loadings = np.zeros((n, 4))
    if model == "chave2014_eq4":
        agb = al.agb_chave2014_eq4_kg(rho, d, h)
        b = al.CHAVE_EQ4_EXPONENT
        s_j2 = config.jucker_dbh_residual_sd**2 if "residuals" in comp else 0.0
        s_c2 = al.CHAVE_EQ4_RSE**2 if "residuals" in comp else 0.0
        s_rho2 = (rho_sd / rho) ** 2 if "wood_density" in comp else np.zeros_like(h)
        var = b**2 * ((2 * beta_j + 1) ** 2 * s_h2 + 4 * beta_j**2 * s_cd2 + 4 * s_j2 + s_rho2) + s_c2
        x_c = np.log(rho * d * d * h)
        loadings[:, 0] = 1.0
        loadings[:, 1] = x_c - config.chave_param.centre_log
        loadings[:, 2] = 2 * b
        loadings[:, 3] = 2 * b * (x_j - config.jucker_dbh_param.centre_log)
        sds = [config.chave_param.intercept_sd, config.chave_param.slope_sd,
               config.jucker_dbh_param.intercept_sd, config.jucker_dbh_param.slope_sd]
    else:
        agb = np.empty_like(h)
        b_a = np.empty_like(h)
        for gi, group in enumerate(al.PLANT_GROUPS):
            m = pg == gi
            agb[m] = al.agb_jucker2017_hcd_kg(h[m], cd[m], group)
            b_a[m] = al.jucker_agb_coefficients(group)[1]
        s_a2 = al.JUCKER_AGB_SIGMA**2 if "residuals" in comp else 0.0
        var = b_a**2 * (s_h2 + s_cd2) + s_a2
        loadings[:, 0] = 1.0
        loadings[:, 1] = x_j - config.jucker_agb_param.centre_log
        sds = [config.jucker_agb_param.intercept_sd, config.jucker_agb_param.slope_sd, 0.0, 0.0]
    if "parameters" not in comp:
        sds = [0.0] * 4
    return {"dbh_cm": d, "dbh_model": dbh_names, "agb_kg": agb, "noise_var": np.asarray(var, dtype=float),
            "loadings": loadings, "param_sd": np.asarray(sds, dtype=float)}


def _group_frame(name: str, ids: np.ndarray, agb_draws: np.ndarray, co2e_draws: np.ndarray,
                 labels: dict[int, str] | None = None) -> pd.DataFrame:
    n_trees = np.bincount(ids[ids >= 0], minlength=agb_draws.shape[0])
    present = np.flatnonzero(n_trees > 0)
    a = interval_stats(agb_draws[present])
    c = interval_stats(co2e_draws[present])
    frame = pd.DataFrame({
        "group_id": present, "n_trees": n_trees[present],
        "agb_t": a["mean"], "agb_t_sd": a["sd"], "agb_t_ci90_low": a["ci90_low"],
        "agb_t_ci90_high": a["ci90_high"], "carbon_t": c["mean"] / al.CO2_PER_C,
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
    h = pd.to_numeric(t["height_m"], errors="coerce").to_numpy(dtype=float, copy=True)
    has_h = np.isfinite(h) & (h > 0)
    hd = al.height_diameter_model(config.hd_model, config.hd_environmental_stress_e)
    source = t["height_source"].astype(object).to_numpy()
    for gi, group in enumerate(al.PLANT_GROUPS):
        m = (~has_h) & (pg == gi)
        if m.any():
            h[m], _ = al.height_from_crown_m(cd[m], hd, group, config.jucker_biome)
    source = np.where(has_h, source, "allometry")
    sigma_h = np.where(has_h, config.height_rel_sd, hd.rse_log)

    main = _chain(h, cd, rho, rho_sd, pg, sigma_h, config, config.agb_model)
    alt_model = next(m for m in AGB_MODELS if m != config.agb_model)
    alt_agb = _chain(h, cd, rho, rho_sd, pg, sigma_h, config, alt_model)["agb_kg"]  # only its point values

    # species drawn from the classifier's probabilities
    probs_k = ln_k = var_k = None
    if "species" in config.components and config.species_probs is not None:
        probs_k = np.asarray(config.species_probs, dtype=float)
        classes = list(config.species_classes or [])
        if probs_k.shape != (n, len(classes)):
            raise InputError(f"species_probs has shape {probs_k.shape}, expected ({n}, {len(classes)}) "
                             "matching the trees and species_classes")
        stand = table.lookup_many(list(species) + classes, region=config.wood_density_region).iloc[n:]
        ln_k = np.empty((n, len(classes)))
        var_k = np.empty((n, len(classes)))
        for k, cls in enumerate(classes):
            pg_k = np.full(n, al.PLANT_GROUPS.index(plant_group_of(cls)))
            rho_k = np.full(n, stand["wood_density"].iloc[k])
            sd_k = np.full(n, stand["wood_density_sd"].iloc[k])
            ck = _chain(h, cd, rho_k, sd_k, pg_k, sigma_h, config, config.agb_model)
            ln_k[:, k], var_k[:, k] = np.log(ck["agb_kg"]), ck["noise_var"]

    # stand factors
    point_total_t = float(main["agb_kg"].sum()) / 1000.0
    if config.root_shoot_ratio is not None:
        r, r_label = float(config.root_shoot_ratio), "user value"
    else:
        density = point_total_t / config.area_ha if config.area_ha else None
        r, r_label = fc.root_shoot_ratio(config.ecozone, density)
    use_f = "factors" in config.components
    shared = SharedFactors(root_shoot=r, root_shoot_sd=r * config.root_shoot_rel_sd if use_f else 0.0,
                           carbon_fraction=(config.carbon_fraction["angiosperm"],
                                            config.carbon_fraction["gymnosperm"]),
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

    mc = run_monte_carlo(
        McInputs(ln_point=np.log(main["agb_kg"]), noise_var=main["noise_var"], loadings=main["loadings"],
                 param_sd=main["param_sd"], plant_group=pg, species_probs=probs_k, ln_point_k=ln_k,
                 noise_var_k=var_k),
        shared, groups, n_draws=config.n_draws, seed=config.seed, threads=config.threads)
    del probs_k, ln_k, var_k, main["loadings"], main["noise_var"]  # the draws are done: ~170 B a tree back

    cf_tree = np.where(pg == 1, config.carbon_fraction["gymnosperm"], config.carbon_fraction["angiosperm"])
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
    out["agb_kg"] = mc.agb_mean
    out["agb_kg_sd"] = mc.agb_sd
    out["agb_kg_p5"] = mc.agb_p5
    out["agb_kg_p95"] = mc.agb_p95
    out["agb_mc_centring"] = mc.centring
    out[f"agb_{alt_model}_kg"] = alt_agb
    out["root_shoot_ratio"] = r
    out["bgb_kg"] = al.bgb_kg(out["agb_kg"].to_numpy(), r)
    out["carbon_fraction"] = cf_tree
    out["carbon_kg"] = al.carbon_kg(out["agb_kg"].to_numpy(), out["bgb_kg"].to_numpy(), cf_tree)
    out["co2e_kg"] = al.co2e_kg(out["carbon_kg"].to_numpy())
    compact_labels(out)  # repeated labels (sources, models, levels) as categoricals: ~70 B a tree and column

    group_frames = {}
    for name, ids in groups.items():
        group_frames[name] = _group_frame(name, ids, mc.group_agb[name], mc.group_co2e[name],
                                          species_labels if name == "species" else None)
    a = interval_stats(mc.total_agb)
    c = interval_stats(mc.total_co2e)
    total = {"n_trees": n, "agb_t": float(a["mean"]), "agb_t_sd": float(a["sd"]),
             "agb_t_ci90_low": float(a["ci90_low"]), "agb_t_ci90_high": float(a["ci90_high"]),
             "bgb_t": float(out["bgb_kg"].sum() / 1000), "carbon_t": float(c["mean"] / al.CO2_PER_C),
             "co2e_t": float(c["mean"]), "co2e_t_sd": float(c["sd"]),
             "co2e_t_ci90_low": float(c["ci90_low"]), "co2e_t_ci90_high": float(c["ci90_high"]),
             "co2e_t_ci95_low": float(c["ci95_low"]), "co2e_t_ci95_high": float(c["ci95_high"]),
             "co2e_halfwidth90_pct": float(c["halfwidth90_pct"]),
             "co2e_halfwidth95_pct": float(c["halfwidth95_pct"]),
             "n_height_allometry": int((~has_h).sum())}
    if config.area_ha:
        total["area_ha"] = float(config.area_ha)
        total["agb_t_per_ha"] = total["agb_t"] / config.area_ha
        total["co2e_t_per_ha"] = total["co2e_t"] / config.area_ha
    rules = standards.conservative_estimates(total["co2e_t"], total["co2e_halfwidth90_pct"],
                                             total["co2e_halfwidth95_pct"])
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
        "jucker_biome": config.jucker_biome,
        "wood_density_table": str(config.wood_density_csv or Path("pipeline/carbon/data/wood_density.csv")),
        "wood_density_levels": {str(k): int(v) for k, v in wd["wood_density_level"].value_counts().items()},
        "parameter_error_note": ParamError.__doc__.split("\n\n")[1].strip(),
    }
    return CarbonResult(trees=out, groups=group_frames, total=total, standards=rules, factors=factor_info,
                        sensitivity=sensitivity, total_co2e_draws_t=mc.total_co2e / 1000.0, config=config)
