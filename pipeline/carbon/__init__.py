"""Carbon accounting: allometry, wood density, Monte Carlo uncertainty and the standards' deductions.

Public entry: ``estimate_carbon(trees, config, groups) -> CarbonResult`` (see ARCHITECTURE.md).
"""

from pipeline.carbon.allometry import (
    agb_chave2014_eq4_kg,
    agb_jucker2017_hcd_kg,
    crown_diameter_from_area_m,
    dbh_jucker2017_cm,
)
from pipeline.carbon.estimate import CarbonConfig, CarbonResult, ParamError, estimate_carbon
from pipeline.carbon.wood_density import WoodDensityTable, plant_group_of

__all__ = [
    "CarbonConfig",
    "CarbonResult",
    "ParamError",
    "WoodDensityTable",
    "agb_chave2014_eq4_kg",
    "agb_jucker2017_hcd_kg",
    "crown_diameter_from_area_m",
    "dbh_jucker2017_cm",
    "estimate_carbon",
    "plant_group_of",
]
