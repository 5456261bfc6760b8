"""Expansion factors: root-to-shoot ratio by ecozone and carbon fraction by plant group, with sources.

Root-to-shoot ratios R = BGB / AGB from IPCC (2006) Guidelines for National Greenhouse Gas Inventories,
Vol. 4 (AFOLU), Ch. 4, Table 4.4, by ecological zone and above-ground biomass class (t d.m./ha). These were
transcribed from a secondary source and the 2019 Refinement revises some of them: check the table in force.
Verification status per row: pipeline/carbon/METHOD.md, section "Verification". Tropical mountain systems
carry one value, 0.27, with no AGB classes, as the three secondary transcriptions of the table found give it
(an earlier 0.28 above 125 t/ha was in none of them).

Carbon fraction: IPCC 2006 default 0.47 (Vol. 4 Ch. 4 Table 4.3); Thomas & Martin (2012, Forests 3:332)
report conifers 0.508 +- 0.007 and angiosperms 0.477 +- 0.003; BIOMASS draws CF ~ N(0.4713, 0.0206).
"""

from __future__ import annotations

import math

from pipeline.errors import InputError

# ecozone -> ((upper AGB bound of the class, t/ha, R), ...) in increasing order of the bound.
ROOT_SHOOT_TABLE: dict[str, tuple[tuple[float, float], ...]] = {
    "tropical_rainforest": ((math.inf, 0.37),),
    "tropical_moist_deciduous": ((125.0, 0.20), (math.inf, 0.24)),
    "tropical_dry": ((20.0, 0.56), (math.inf, 0.28)),
    "tropical_shrubland": ((math.inf, 0.40),),
    "tropical_mountain": ((math.inf, 0.27),),
    "subtropical_humid_forest": ((125.0, 0.20), (math.inf, 0.24)),
    "subtropical_dry_forest": ((20.0, 0.56), (math.inf, 0.28)),
    "subtropical_steppe": ((20.0, 0.32), (math.inf, 0.27)),
    "temperate_conifer": ((50.0, 0.40), (150.0, 0.29), (math.inf, 0.20)),
    "temperate_broadleaf": ((75.0, 0.46), (150.0, 0.23), (math.inf, 0.24)),
    "boreal": ((75.0, 0.39), (math.inf, 0.24)),
}

# Default: the FAO Global Ecological Zone of the demo site (Ordway-Swisher, north-central Florida, longleaf
# pine sandhill) is "subtropical humid forest". It also gives the lower (more conservative) R of the two
# plausible rows for a pine savanna (temperate conifer < 50 t/ha would give 0.40).
DEFAULT_ECOZONE = "subtropical_humid_forest"

ROOT_SHOOT_SOURCE = "IPCC 2006 GL Vol. 4 Ch. 4 Table 4.4 (check the 2019 Refinement)"
DEFAULT_CARBON_FRACTION = {"angiosperm": 0.47, "gymnosperm": 0.47}
CARBON_FRACTION_SD = 0.0206
CARBON_FRACTION_SOURCE = ("IPCC 2006 GL Vol. 4 Ch. 4 default 0.47; SD 0.0206 as BIOMASS (Thomas & Martin "
                          "2012)")


def root_shoot_ratio(ecozone: str = DEFAULT_ECOZONE, agb_t_per_ha: float | None = None) -> tuple[float, str]:
    """(R, class label) for an ecozone and stand AGB density (t/ha).

    Without the AGB density the zone's smallest R is used (conservative: it credits the least roots).
    """
    key = ecozone.strip().lower()
    if key not in ROOT_SHOOT_TABLE:
        raise InputError(f"unknown ecozone {ecozone!r} for the root-to-shoot ratio; use one of "
                         f"{', '.join(ROOT_SHOOT_TABLE)} or set root_shoot_ratio")
    rows = ROOT_SHOOT_TABLE[key]
    if agb_t_per_ha is None or not math.isfinite(agb_t_per_ha):
        r = min(v for _, v in rows)
        return r, f"{key}, AGB density unknown: smallest R of the zone"
    lower = 0.0
    for upper, r in rows:
        if agb_t_per_ha <= upper:
            if math.isfinite(upper):
                return r, f"{key}, AGB {lower:g}-{upper:g} t/ha"
            return r, f"{key}, AGB > {lower:g} t/ha"
        lower = upper
    raise AssertionError("unreachable: the last class is unbounded")
