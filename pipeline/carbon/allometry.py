"""Allometric equations of the carbon chain with their sources (D cm, H and CD m, rho g/cm³, AGB kg).

Every function is vectorised over numpy arrays and pure. The coefficients are module constants so that the
report can print them next to the equation.

Sources
- Jucker, T. et al. (2017) Allometric equations for integrating remote sensing imagery into forest
  monitoring programmes. Global Change Biology 23(1):177-190. doi:10.1111/gcb.13388.
  Coefficient sets as distributed in the R package itcSegment (Dalponte), functions ``dbh`` and ``agb``.
  The numbers 0.056 (DBH model) and 0.204 (direct AGB model) are read as the residual VARIANCE sigma² of
  the log-scale fits, not as sigma (issue 17; reasons and sources in METHOD.md, "Jucker's 0.056 and
  0.204"): bias factors exp(sigma²/2) = exp(0.028) and exp(0.102), residual SDs 0.237 and 0.452.
- Chave, J. et al. (2014) Improved allometric models to estimate the aboveground biomass of tropical trees.
  Global Change Biology 20(10):3177-3190. doi:10.1111/gcb.12629. Eq. 4: AGB = 0.0673 (rho D² H)^0.976,
  RSE 0.357 on the log scale. The intercept 0.0673 = exp(-2.7616) exp(0.357²/2) ALREADY contains the
  log-bias correction (BIOMASS ``computeAGB``); it must not be applied again.
- Chave 2014 Eq. 6a (height from diameter): ln H = 0.893 - E + 0.760 ln D - 0.0340 (ln D)², RSE 0.243.
- Feldpausch, T. R. et al. (2012) Tree height integrated into pantropical forest biomass estimates.
  Biogeosciences 9:3381-3403. H = a (1 - exp(-b D^c)); pantropical a=50.874, b=0.0420, c=0.784 (RSE 5.48 m);
  SE Asia a=57.122, b=0.0332, c=0.8468 (values as in BIOMASS ``feldCoef``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pipeline.errors import InputError

ArrayLike = float | np.ndarray

PLANT_GROUPS = ("angiosperm", "gymnosperm")


# ---------------------------------------------------------------------------------------------- crowns
def crown_diameter_from_area_m(crown_area_m2: ArrayLike) -> np.ndarray:
    """Crown diameter (m) of the circle with the crown's projected area (m²): CD = 2 sqrt(A / pi)."""
    return 2.0 * np.sqrt(np.asarray(crown_area_m2, dtype=float) / math.pi)


# ---------------------------------------------------------------------------------- Jucker 2017, DBH
@dataclass(frozen=True)
class JuckerDbhCoefficients:
    """D = alpha (H CD)^beta exp(sigma2/2); ``sigma2`` (residual variance, log scale) is 0 where itcSegment
    applies no bias factor."""

    key: str
    alpha: float
    beta: float
    sigma2: float
    realm: str
    biome: str
    plant_group: str | None  # None: applies to both groups (global fit)


def _jset(key: str, alpha: float, beta: float, realm: str, biome: str, group: str | None,
          sigma2: float = 0.0) -> JuckerDbhCoefficients:
    return JuckerDbhCoefficients(key, alpha, beta, sigma2, realm, biome, group)


# Residual variance of the global log-scale DBH fit (Jucker et al. 2017; read as sigma², see METHOD.md).
JUCKER_DBH_RESIDUAL_VAR = 0.056

# Jucker et al. 2017 (via itcSegment ``dbh``, biome codes 0..24). Keys: "<realm>_<biome>" + plant group.
_JUCKER_DBH_SETS: tuple[JuckerDbhCoefficients, ...] = (
    _jset("global", 0.557, 0.809, "global", "global", None, sigma2=JUCKER_DBH_RESIDUAL_VAR),
    _jset("afrotropic_tropical_forests", 0.428, 0.821, "afrotropic", "tropical_forests", "angiosperm"),
    _jset("afrotropic_woodlands_savannas", 1.268, 0.750, "afrotropic", "woodlands_savannas", "angiosperm"),
    _jset("australasia_temperate_mixed", 0.769, 0.811, "australasia", "temperate_mixed", "angiosperm"),
    _jset("australasia_temperate_mixed", 0.603, 0.891, "australasia", "temperate_mixed", "gymnosperm"),
    _jset("australasia_woodlands_savannas", 0.519, 0.890, "australasia", "woodlands_savannas", "angiosperm"),
    _jset("indomalaya_tropical_forests", 0.486, 0.802, "indomalaya", "tropical_forests", "angiosperm"),
    _jset("nearctic_boreal", 0.286, 0.865, "nearctic", "boreal", "angiosperm"),
    _jset("nearctic_boreal", 0.815, 0.771, "nearctic", "boreal", "gymnosperm"),
    _jset("nearctic_temperate_coniferous", 0.343, 0.844, "nearctic", "temperate_coniferous", "angiosperm"),
    _jset("nearctic_temperate_coniferous", 0.589, 0.817, "nearctic", "temperate_coniferous", "gymnosperm"),
    _jset("nearctic_temperate_mixed", 0.367, 0.887, "nearctic", "temperate_mixed", "angiosperm"),
    _jset("nearctic_temperate_mixed", 0.861, 0.755, "nearctic", "temperate_mixed", "gymnosperm"),
    _jset("nearctic_woodlands_savannas", 0.617, 0.790, "nearctic", "woodlands_savannas", "angiosperm"),
    _jset("nearctic_woodlands_savannas", 1.133, 0.745, "nearctic", "woodlands_savannas", "gymnosperm"),
    _jset("neotropic_tropical_forests", 0.591, 0.781, "neotropic", "tropical_forests", "angiosperm"),
    _jset("palearctic_boreal", 0.467, 0.839, "palearctic", "boreal", "angiosperm"),
    _jset("palearctic_boreal", 1.430, 0.649, "palearctic", "boreal", "gymnosperm"),
    _jset("palearctic_temperate_coniferous", 0.273, 0.927, "palearctic", "temperate_coniferous",
          "angiosperm"),
    _jset("palearctic_temperate_coniferous", 0.974, 0.748, "palearctic", "temperate_coniferous",
          "gymnosperm"),
    _jset("palearctic_temperate_mixed", 0.694, 0.730, "palearctic", "temperate_mixed", "angiosperm"),
    _jset("palearctic_temperate_mixed", 1.004, 0.730, "palearctic", "temperate_mixed", "gymnosperm"),
    _jset("palearctic_tropical_forests", 0.540, 0.791, "palearctic", "tropical_forests", "angiosperm"),
    _jset("palearctic_woodlands_savannas", 0.910, 0.738, "palearctic", "woodlands_savannas", "angiosperm"),
    _jset("palearctic_woodlands_savannas", 1.373, 0.717, "palearctic", "woodlands_savannas", "gymnosperm"),
)

# Generic biome names without a biogeographic realm use the global fit (the realm-specific sets were fitted
# per realm; "temperate" alone does not say which).
GENERIC_BIOMES = ("global", "temperate", "tropical", "boreal")

JUCKER_BIOMES: tuple[str, ...] = tuple(sorted({s.key for s in _JUCKER_DBH_SETS} | set(GENERIC_BIOMES)))


def jucker_dbh_coefficients(biome: str = "temperate",
                            plant_group: str = "angiosperm") -> JuckerDbhCoefficients:
    """Coefficient set for a biome key (see ``JUCKER_BIOMES``) and plant group.

    A realm-specific biome without a fit for this plant group (e.g. Neotropic gymnosperms) falls back to the
    global fit; the returned ``key`` says which set was used.
    """
    _check_group(plant_group)
    b = biome.strip().lower()
    if b in GENERIC_BIOMES:
        return _JUCKER_DBH_SETS[0]
    matches = [s for s in _JUCKER_DBH_SETS if s.key == b]
    if not matches:
        raise InputError(f"unknown Jucker 2017 biome {biome!r}; use one of {', '.join(JUCKER_BIOMES)}")
    for s in matches:
        if s.plant_group == plant_group:
            return s
    return _JUCKER_DBH_SETS[0]


def jucker_dbh_model_name(biome: str = "temperate", plant_group: str = "angiosperm") -> str:
    """Per-tree ``dbh_model`` label, e.g. ``jucker2017_global``, ``jucker2017_nearctic_boreal_gymnosperm``."""
    s = jucker_dbh_coefficients(biome, plant_group)
    return "jucker2017_global" if s.plant_group is None else f"jucker2017_{s.key}_{s.plant_group}"


def dbh_jucker2017_cm(height_m: ArrayLike, crown_diameter_m: ArrayLike, plant_group: str = "angiosperm",
                      biome: str = "temperate") -> np.ndarray:
    """Stem diameter at breast height (cm) from tree height H (m) and crown diameter CD (m).

    Jucker et al. 2017: D = alpha (H CD)^beta exp(sigma²/2); global fit alpha 0.557, beta 0.809, residual
    variance sigma² 0.056. Example: H = 25 m, CD = 10 m gives D = 0.557 * 250^0.809 * exp(0.028) = 49.9 cm.
    """
    s = jucker_dbh_coefficients(biome, plant_group)
    hcd = np.asarray(height_m, dtype=float) * np.asarray(crown_diameter_m, dtype=float)
    return s.alpha * np.power(hcd, s.beta) * math.exp(s.sigma2 / 2.0)


# ---------------------------------------------------------------------------------- Jucker 2017, AGB
JUCKER_AGB_BASE = (0.016, 2.013)  # angiosperm intercept and exponent
JUCKER_AGB_GYMNO_OFFSET = (0.093, -0.223)  # added for gymnosperms
JUCKER_AGB_RESIDUAL_VAR = 0.204  # residual variance sigma² of the log-scale fit (see METHOD.md)


def jucker_agb_coefficients(plant_group: str) -> tuple[float, float]:
    """(a, b) of AGB = a (H CD)^b exp(0.204/2) for a plant group."""
    _check_group(plant_group)
    a, b = JUCKER_AGB_BASE
    if plant_group == "gymnosperm":
        a, b = a + JUCKER_AGB_GYMNO_OFFSET[0], b + JUCKER_AGB_GYMNO_OFFSET[1]
    return a, b


def agb_jucker2017_hcd_kg(height_m: ArrayLike, crown_diameter_m: ArrayLike,
                          plant_group: str = "angiosperm") -> np.ndarray:
    """Aboveground biomass (kg) directly from H (m) and CD (m), Jucker et al. 2017 (no wood density).

    Angiosperms 0.016 (H CD)^2.013, gymnosperms 0.109 (H CD)^1.790, both times exp(sigma²/2) with the
    residual variance sigma² = 0.204.
    """
    a, b = jucker_agb_coefficients(plant_group)
    hcd = np.asarray(height_m, dtype=float) * np.asarray(crown_diameter_m, dtype=float)
    return a * np.power(hcd, b) * math.exp(JUCKER_AGB_RESIDUAL_VAR / 2.0)


# ------------------------------------------------------------------------------------ Chave 2014
CHAVE_EQ4_INTERCEPT = 0.0673  # includes exp(RSE²/2)
CHAVE_EQ4_EXPONENT = 0.976
CHAVE_EQ4_RSE = 0.357


def agb_chave2014_eq4_kg(wood_density_gcm3: ArrayLike, dbh_cm: ArrayLike, height_m: ArrayLike) -> np.ndarray:
    """Aboveground biomass (kg), Chave et al. 2014 eq. 4: 0.0673 (rho D² H)^0.976.

    rho in g/cm³, D in cm, H in m. The intercept already includes the log-bias correction.
    Example: rho 0.6, D 49.9 cm, H 25 m gives about 1,950 kg.
    """
    rho = np.asarray(wood_density_gcm3, dtype=float)
    d = np.asarray(dbh_cm, dtype=float)
    h = np.asarray(height_m, dtype=float)
    return CHAVE_EQ4_INTERCEPT * np.power(rho * d * d * h, CHAVE_EQ4_EXPONENT)


# ------------------------------------------------------------------------ height-diameter models
@dataclass(frozen=True)
class HeightDiameterModel:
    """A height-diameter model H(D) with its log-scale residual SD (for the Monte Carlo)."""

    name: str
    kind: str  # "weibull" (Feldpausch form), "chave_eq6a" or "loglog" (local ln H = a + b ln D + c (ln D)²)
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    environmental_stress_e: float = 0.0
    rse_log: float = 0.0
    source: str = ""
    shared_sd_log: float = 0.0  # SD of the site-level shift of ln H (E unknown, or the local intercept)
    site_log_shift: float = 0.0  # calibrated shift of ln H for the site (see calibrate_hd_shift)

    def height_m(self, dbh_cm: ArrayLike, log_shift: float = 0.0) -> np.ndarray:
        """Height (m) for diameter (cm); ``log_shift`` is added to ln H (error propagation)."""
        d = np.maximum(np.asarray(dbh_cm, dtype=float), 0.1)
        log_shift = log_shift + self.site_log_shift
        if self.kind == "weibull":
            return self.a * (1.0 - np.exp(-self.b * np.power(d, self.c))) * math.exp(log_shift)
        ld = np.log(d)
        if self.kind == "chave_eq6a":
            return np.exp(0.893 - self.environmental_stress_e + 0.760 * ld - 0.0340 * ld * ld
                          + self.rse_log**2 / 2.0 + log_shift)
        if self.kind == "loglog":
            return np.exp(self.a + self.b * ld + self.c * ld * ld + self.rse_log**2 / 2.0 + log_shift)
        raise InputError(f"unknown height-diameter model kind {self.kind!r}; use 'weibull', 'chave_eq6a' "
                         "or 'loglog'")


# E unknown for the site: E = 0 with this SD (an assumption: E varies by more than one unit between the
# world's forest sites on the Chave et al. 2014 E map), a large height error shared by the whole run.
HD_E_SD_UNKNOWN = 0.5
# E given for the site (from the Chave 2014 E raster): residual site-level uncertainty, an assumption.
HD_E_SD_GIVEN = 0.1
# Local H-D coefficients without their own intercept SD: an assumption (a local fit on tens of trees).
HD_LOCAL_INTERCEPT_SD = 0.05


#: names of :func:`height_diameter_model` (``local`` needs the coefficients)
HD_MODELS = ("chave2014_eq6a", "feldpausch2012_pantropical", "feldpausch2012_seasia", "local")


def height_diameter_model(name: str = "feldpausch2012_pantropical",
                          environmental_stress_e: float | None = None, e_sd: float | None = None,
                          local: dict | None = None) -> HeightDiameterModel:
    """Named H-D models: ``feldpausch2012_pantropical``, ``feldpausch2012_seasia``, ``chave2014_eq6a``,
    ``local`` (``local`` = {"a", "b", "c" (0), "rse" (log scale), "intercept_sd" (optional)}:
    ln H = a + b ln D + c (ln D)², H in m, D in cm).

    The Feldpausch RSE (5.48 m, absolute) is turned into a log-scale SD of 0.25 for the Monte Carlo
    (about 5.5 m at 22 m height); Chave eq. 6a has RSE 0.243 on the log scale and needs E (environmental
    stress, from the Chave 2014 raster) for the site: unset (None), E = 0 with SD 0.5 (``HD_E_SD_UNKNOWN``),
    a shared error of every allometric height; given, SD ``e_sd`` (default 0.1).
    """
    if local is not None or name == "local":
        if not local or "a" not in local or "b" not in local or "rse" not in local:
            raise InputError("local height-diameter coefficients need a, b and rse (c optional): "
                             "ln H = a + b ln D + c (ln D)^2, e.g. --hd-local 0.9,0.7,0,0.2")
        sd = float(local.get("intercept_sd", HD_LOCAL_INTERCEPT_SD))
        return HeightDiameterModel("local", "loglog", float(local["a"]), float(local["b"]),
                                   float(local.get("c", 0.0)), rse_log=float(local["rse"]),
                                   source="local H-D coefficients (user)", shared_sd_log=sd)
    if name == "feldpausch2012_pantropical":
        return HeightDiameterModel(name, "weibull", 50.874, 0.0420, 0.784, rse_log=0.25,
                                   source="Feldpausch et al. 2012, pantropical (RSE 5.48 m)",
                                   shared_sd_log=HD_E_SD_UNKNOWN if e_sd is None else e_sd)
    if name == "feldpausch2012_seasia":
        return HeightDiameterModel(name, "weibull", 57.122, 0.0332, 0.8468, rse_log=0.25,
                                   source="Feldpausch et al. 2012, SE Asia",
                                   shared_sd_log=HD_E_SD_UNKNOWN if e_sd is None else e_sd)
    if name == "chave2014_eq6a":
        e = 0.0 if environmental_stress_e is None else float(environmental_stress_e)
        if e_sd is not None:
            sd = float(e_sd)
        else:
            sd = HD_E_SD_UNKNOWN if environmental_stress_e is None else HD_E_SD_GIVEN
        label = f"E not set: 0 +- {sd:g}" if environmental_stress_e is None else f"E = {e:g} +- {sd:g}"
        return HeightDiameterModel(name, "chave_eq6a", environmental_stress_e=e, rse_log=0.243,
                                   source=f"Chave et al. 2014 eq. 6a (RSE 0.243; {label})", shared_sd_log=sd)
    raise InputError(f"unknown height-diameter model {name!r}; use {', '.join(HD_MODELS)}")


def height_from_crown_m(crown_diameter_m: ArrayLike, hd_model: HeightDiameterModel,
                        plant_group: str = "angiosperm", biome: str = "temperate",
                        iterations: int = 100, tol_cm: float = 1e-6, height_log_shift: float = 0.0,
                        dbh_log_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Height (m) and DBH (cm) without a CHM: iterate D_{k+1} = Jucker(H(D_k), CD) to its fixed point.

    Returns (height_m, dbh_cm). Low confidence: flag such trees ``height_source = "allometry"``. The log
    shifts (added to ln H of the H-D model and to ln D of Jucker's model) serve the error propagation.
    """
    cd = np.asarray(crown_diameter_m, dtype=float)
    f = math.exp(dbh_log_shift)
    d = dbh_jucker2017_cm(np.full_like(cd, 15.0), cd, plant_group, biome) * f
    for _ in range(iterations):
        d_new = dbh_jucker2017_cm(hd_model.height_m(d, height_log_shift), cd, plant_group, biome) * f
        done = np.nanmax(np.abs(d_new - d)) < tol_cm if d.size else True
        d = d_new
        if done:
            break
    return hd_model.height_m(d, height_log_shift), d


HD_CALIBRATION_MIN_TREES = 20  # measured heights needed to calibrate the site's H-D shift
HD_CALIBRATION_MIN_SD = 0.02  # floor of the calibrated shift's SD (log scale)
HD_CALIBRATION_MAX_TREES = 4000  # larger sets are subsampled evenly


def calibrate_hd_shift(height_m: np.ndarray, crown_diameter_m: np.ndarray, plant_group: np.ndarray,
                       hd_model: HeightDiameterModel, biome: str = "temperate"
                       ) -> tuple[HeightDiameterModel, dict]:
    """The site's H-D shift from trees with a measured height (m) and crown diameter (m).

    Finds the log shift of the H-D curve whose fixed-point heights (``height_from_crown_m``) have a median
    log ratio of 0 to the measured ones (bisection), and its SD: the standard error of that median
    (1.2533 s / sqrt(n)) over the fixed point's amplification, floored at 0.02. Returns the shifted model
    (``site_log_shift``, ``shared_sd_log``, ``source`` updated) and a record of the calibration.
    """
    h = np.asarray(height_m, dtype=float)
    cd = np.asarray(crown_diameter_m, dtype=float)
    pg = np.asarray(plant_group)
    n_all = h.size
    if n_all > HD_CALIBRATION_MAX_TREES:  # an even subsample: the median needs no more (and stays cheap)
        keep = np.linspace(0, n_all - 1, HD_CALIBRATION_MAX_TREES).astype(np.int64)
        h, cd, pg = h[keep], cd[keep], pg[keep]
    base = replace(hd_model, site_log_shift=0.0)

    def fixed_point(shift: float) -> np.ndarray:
        out = np.empty_like(h)
        for gi, group in enumerate(PLANT_GROUPS):
            m = pg == gi
            if m.any():
                out[m] = height_from_crown_m(cd[m], base, group, biome, height_log_shift=shift)[0]
        return out

    def gap(shift: float) -> float:
        return float(np.median(np.log(h) - np.log(fixed_point(shift))))

    lo, hi = -3.0, 3.0
    for _ in range(32):
        mid = (lo + hi) / 2.0
        if gap(mid) > 0:
            lo = mid
        else:
            hi = mid
    shift = (lo + hi) / 2.0
    resid = np.log(h) - np.log(fixed_point(shift))
    amplification = float(np.median((np.log(fixed_point(shift + 1e-3)) - np.log(fixed_point(shift))) / 1e-3))
    s = float(resid.std(ddof=1)) if h.size > 1 else 0.0
    sd = max(1.2533 * s / math.sqrt(max(n_all, 1)) / max(amplification, 1e-9), HD_CALIBRATION_MIN_SD)
    model = replace(hd_model, site_log_shift=shift, shared_sd_log=sd,
                    source=f"{hd_model.source}; site shift {shift:+.3f} on ln H (SD {sd:.3f}) calibrated on "
                           f"{n_all} measured trees")
    return model, {"n_trees": int(n_all), "log_shift": shift, "sd": sd, "residual_sd_log": s,
                   "amplification": amplification}


# --------------------------------------------------------------------------- BGB, carbon, CO2e
CO2_PER_C = 44.0 / 12.0


def bgb_kg(agb_kg: ArrayLike, root_shoot_ratio: ArrayLike) -> np.ndarray:
    """Belowground biomass (kg) = R AGB."""
    return np.asarray(root_shoot_ratio, dtype=float) * np.asarray(agb_kg, dtype=float)


def carbon_kg(agb_kg: ArrayLike, bgb: ArrayLike, carbon_fraction: ArrayLike) -> np.ndarray:
    """Carbon (kg) = CF (AGB + BGB)."""
    return np.asarray(carbon_fraction, dtype=float) * (np.asarray(agb_kg, dtype=float) + np.asarray(bgb))


def co2e_kg(carbon: ArrayLike) -> np.ndarray:
    """CO2 equivalent (kg) = C 44/12."""
    return np.asarray(carbon, dtype=float) * CO2_PER_C


def _check_group(plant_group: str) -> None:
    if plant_group not in PLANT_GROUPS:
        raise InputError(f"unknown plant group {plant_group!r}; use 'angiosperm' or 'gymnosperm'")


# Equations as printed in the report (name -> (formula, source)).
EQUATIONS: dict[str, tuple[str, str]] = {
    "crown_diameter": ("CD = 2 √(A / π)", "circle of equal area"),
    "jucker2017_dbh": ("D = α (H·CD)^β · exp(σ²/2); global α = 0.557, β = 0.809, σ² = 0.056 (residual "
                       "variance, log scale)",
                       "Jucker et al. 2017, Glob. Change Biol. 23:177 (coefficients as in itcSegment)"),
    "chave2014_eq4": ("AGB = 0.0673 (ρ D² H)^0.976 (bias correction included; RSE 0.357)",
                      "Chave et al. 2014, Glob. Change Biol. 20:3177, eq. 4"),
    "jucker2017_hcd": ("AGB = 0.016 (H·CD)^2.013 (angiosperms), 0.109 (H·CD)^1.790 (gymnosperms), "
                       "× exp(σ²/2), σ² = 0.204 (residual variance, log scale)", "Jucker et al. 2017"),
    "height_diameter": ("H = a (1 − exp(−b D^c)) (Feldpausch), "
                        "ln H = 0.893 − E + 0.760 ln D − 0.0340 (ln D)² (Chave eq. 6a) or a local "
                        "ln H = a + b ln D + c (ln D)²",
                        "Feldpausch et al. 2012; Chave et al. 2014 eq. 6a; local fit"),
    "bgb": ("BGB = R · AGB", "IPCC 2006 GL Vol. 4 Ch. 4 Table 4.4 (root-to-shoot ratio by ecozone)"),
    "carbon": ("C = CF · (AGB + BGB)", "IPCC 2006 GL Vol. 4 Ch. 4 (CF default 0.47)"),
    "co2e": ("CO2e = C · 44/12", "molar mass ratio CO2 / C"),
}
