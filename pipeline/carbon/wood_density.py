"""Wood density (oven-dry mass / green volume, g/cm³) by species, genus and family, with fallbacks.

Fallback order (as BIOMASS ``getWoodDensity``): species -> genus -> family -> stand mean (SD among the
stand's resolved trees) -> regional default. The level used is returned per tree.

Table: ``pipeline/carbon/data/wood_density.csv`` (columns taxon, level, genus, family, wood_density_gcm3,
wood_density_sd_gcm3, source, note). Genus and family means that are not rows of the table are the means of
the table's species (and genus rows) in that genus / family. Users pass their own CSV (same columns; only
taxon and wood_density_gcm3 are required) and its rows replace the built-in ones.

The values were transcribed from the sources below; check them against the originals (and prefer the Global
Wood Density Database, Zanne et al. 2009 / Fischer et al. GWDD v2, or local measurements) before a verified
inventory. Rows with source PROXY are not measurements (see their note).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from pipeline.errors import InputError

DATA_CSV = Path(__file__).with_name("data") / "wood_density.csv"

SOURCES: dict[str, str] = {
    "WH2010": "USDA Forest Products Laboratory (2010) Wood Handbook, FPL-GTR-190, Table 5-3: specific "
              "gravity based on green volume and oven-dry mass",
    "IPCC2006_T4.14": "IPCC (2006) Guidelines Vol. 4 Ch. 4 Table 4.14: basic wood density of temperate and "
                      "boreal tree species",
    "IPCC2006_T4.13": "IPCC (2006) Guidelines Vol. 4 Ch. 4 Table 4.13: basic wood density of tropical "
                      "species",
    "PROXY": "not a measurement: value of a close relative in this table (see the row's note)",
    "derived": "mean of this table's rows in the taxon",
    "stand": "mean of the stand's trees resolved at species/genus/family level (SD among them, at least "
             "the family-level SD)",
    "regional": "regional default: tropical America 0.60, Africa 0.58, tropical Asia 0.57 (Reyes et al. "
                "1992, via IPCC); global 0.613 SD 0.176, North America 0.540, Europe 0.525 (GWDD v1 means, "
                "BIOMASS wdData)",
    "user": "user-supplied wood density table",
}

# SD used when a row has none: BIOMASS v2 getWoodDensity fixed SDs per level.
LEVEL_SD_GCM3 = {"species": 0.0708, "genus": 0.0941, "family": 0.1234}

GLOBAL_SD_GCM3 = 0.176
REGIONAL_DEFAULTS_GCM3: dict[str, float] = {
    "global": 0.613,
    "tropical_america": 0.60,
    "africa": 0.58,
    "tropical_asia": 0.57,
    "north_america": 0.540,
    "europe": 0.525,
}

# Plant group (Jucker's coefficient sets): gymnosperm families and genera; everything else is angiosperm.
GYMNOSPERM_FAMILIES = frozenset({
    "pinaceae", "cupressaceae", "taxaceae", "podocarpaceae", "araucariaceae", "taxodiaceae",
    "cephalotaxaceae", "sciadopityaceae", "ginkgoaceae", "cycadaceae", "zamiaceae", "gnetaceae",
    "ephedraceae", "welwitschiaceae",
})
GYMNOSPERM_GENERA = frozenset({
    "pinus", "picea", "abies", "larix", "pseudotsuga", "tsuga", "cedrus", "keteleeria", "juniperus", "thuja",
    "cupressus", "taxodium", "sequoia", "sequoiadendron", "chamaecyparis", "calocedrus", "cryptomeria",
    "cunninghamia", "metasequoia", "callitris", "widdringtonia", "taxus", "torreya", "podocarpus",
    "afrocarpus", "dacrydium", "dacrycarpus", "araucaria", "agathis", "wollemia", "ginkgo", "sciadopitys",
    "cephalotaxus", "platycladus", "glyptostrobus", "fitzroya", "austrocedrus", "libocedrus",
})

_UNKNOWN_NAMES = frozenset({"", "unknown", "none", "nan", "na", "n/a", "other", "background"})


def _clean(name: object) -> tuple[str, str]:
    """(binomial, genus) in lower case from a taxon string; ('', '') for unknown."""
    if name is None or (isinstance(name, float) and np.isnan(name)):
        return "", ""
    words = str(name).replace("_", " ").strip().split()
    if not words or words[0].lower() in _UNKNOWN_NAMES:
        return "", ""
    genus = words[0].lower()
    if len(words) >= 2 and words[1].lower() not in {"sp", "sp.", "spp", "spp."}:
        return f"{genus} {words[1].lower()}", genus
    return "", genus


def plant_group_of(species: str | None, family: str | None = None) -> str:
    """'gymnosperm' or 'angiosperm' from the family (if given) or the genus of a taxon name.

    Unknown taxa are treated as angiosperms (most tree species are).
    """
    if family and str(family).strip().lower() in GYMNOSPERM_FAMILIES:
        return "gymnosperm"
    _, genus = _clean(species)
    if genus in GYMNOSPERM_GENERA:
        return "gymnosperm"
    fam = WoodDensityTable.default().family_of(species)
    return "gymnosperm" if fam and fam.lower() in GYMNOSPERM_FAMILIES else "angiosperm"


@dataclass
class WoodDensityTable:
    """Lookup table: taxon (lower case) -> (mean g/cm³, SD g/cm³, source) per level, plus genus -> family."""

    species: dict[str, tuple[float, float, str]] = field(default_factory=dict)
    genera: dict[str, tuple[float, float, str]] = field(default_factory=dict)
    families: dict[str, tuple[float, float, str]] = field(default_factory=dict)
    genus_family: dict[str, str] = field(default_factory=dict)

    _default: ClassVar[WoodDensityTable | None] = None  # cache of the built-in table

    # ------------------------------------------------------------------ construction
    @classmethod
    def default(cls) -> WoodDensityTable:
        """The built-in table (cached)."""
        if cls._default is None:
            cls._default = cls.from_frame(pd.read_csv(DATA_CSV), default_source="table")
        return cls._default

    @classmethod
    def from_csv(cls, path: str | os.PathLike, base: WoodDensityTable | None = None) -> WoodDensityTable:
        """A user CSV (columns taxon, wood_density_gcm3; optional level, genus, family, wood_density_sd_gcm3,
        source) whose rows replace those of ``base`` (the built-in table by default)."""
        try:
            frame = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read wood density table {path}: {exc}; pass a CSV file") from exc
        if "source" not in frame.columns:
            frame["source"] = "user"
        user = cls.from_frame(frame, default_source="user", path=str(path))
        merged = base if base is not None else cls.default()
        return merged.merged_with(user)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, default_source: str = "table", path: str = "<table>"
                   ) -> WoodDensityTable:
        missing = {"taxon", "wood_density_gcm3"} - set(frame.columns)
        if missing:
            raise InputError(f"wood density table {path} lacks columns {sorted(missing)}; "
                             "add taxon and wood_density_gcm3 (g/cm³)")
        rho = pd.to_numeric(frame["wood_density_gcm3"], errors="coerce")
        if rho.isna().any() or ((rho < 0.05) | (rho > 1.5)).any():
            raise InputError(f"wood density table {path} has missing or implausible wood_density_gcm3 "
                             "(expected 0.05-1.5 g/cm³); fix those rows")
        table = cls()
        for i, row in frame.reset_index(drop=True).iterrows():
            binomial, genus = _clean(row["taxon"])
            level = str(row.get("level", "") or "").strip().lower()
            if level not in LEVEL_SD_GCM3:
                if binomial:
                    level = "species"
                else:  # one word: a family (…aceae) or a genus
                    level = "family" if genus.endswith("aceae") else "genus"
            sd = pd.to_numeric(pd.Series([row.get("wood_density_sd_gcm3", np.nan)]), errors="coerce").iloc[0]
            sd = float(sd) if np.isfinite(sd) and sd > 0 else LEVEL_SD_GCM3[level]
            src = str(row.get("source", default_source) or default_source)
            entry = (float(rho.iloc[i]), sd, src)
            fam = row.get("family", None)
            fam = str(fam).strip().lower() if isinstance(fam, str) and fam.strip() else None
            if level == "family":
                table.families[str(row["taxon"]).strip().lower()] = entry
                continue
            g_col = row.get("genus")
            g = (g_col.strip().lower() if isinstance(g_col, str) else "") or genus
            if fam and g:
                table.genus_family[g] = fam
            if level == "species" and binomial:
                table.species[binomial] = entry
            elif level == "genus" and g:
                table.genera[g] = entry
        table._derive_means()
        return table

    def merged_with(self, other: WoodDensityTable) -> WoodDensityTable:
        """A new table: ``other``'s rows replace this table's."""
        out = WoodDensityTable(
            species={**self.species, **other.species},
            genera={k: v for k, v in self.genera.items() if v[2] != "derived"},
            families={k: v for k, v in self.families.items() if v[2] != "derived"},
            genus_family={**self.genus_family, **other.genus_family},
        )
        out.genera.update({k: v for k, v in other.genera.items() if v[2] != "derived"})
        out.families.update({k: v for k, v in other.families.items() if v[2] != "derived"})
        out._derive_means()
        return out

    def _derive_means(self) -> None:
        """Genus and family means from the species (and genus) rows where the table has no explicit row."""
        by_genus: dict[str, list[float]] = {}
        for binomial, (rho, _, _) in self.species.items():
            by_genus.setdefault(binomial.split()[0], []).append(rho)
        for g, values in by_genus.items():
            if g not in self.genera:
                self.genera[g] = (float(np.mean(values)), LEVEL_SD_GCM3["genus"], "derived")
        by_family: dict[str, list[float]] = {}
        for g, (rho, _, _) in self.genera.items():
            fam = self.genus_family.get(g)
            if fam:
                by_family.setdefault(fam, []).append(rho)
        for fam, values in by_family.items():
            if fam not in self.families:
                self.families[fam] = (float(np.mean(values)), LEVEL_SD_GCM3["family"], "derived")

    # ------------------------------------------------------------------ lookup
    def family_of(self, species: str | None) -> str | None:
        _, genus = _clean(species)
        return self.genus_family.get(genus)

    def resolve(self, species: str | None, family: str | None = None
                ) -> tuple[float, float, str, str] | None:
        """(mean, sd, level, source) at species, genus or family level, or None when unresolved."""
        binomial, genus = _clean(species)
        if binomial and binomial in self.species:
            return (*self.species[binomial][:2], "species", self.species[binomial][2])
        if genus and genus in self.genera:
            return (*self.genera[genus][:2], "genus", self.genera[genus][2])
        fam = (str(family).strip().lower() if family else None) or self.genus_family.get(genus)
        if fam and fam in self.families:
            return (*self.families[fam][:2], "family", self.families[fam][2])
        return None

    def lookup(self, species: str | None, region: str = "global") -> tuple[float, float, str]:
        """(mean g/cm³, sd g/cm³, level) for one taxon; level in species, genus, family, regional."""
        hit = self.resolve(species)
        if hit is not None:
            return hit[0], hit[1], hit[2]
        mean, sd = regional_default(region)
        return mean, sd, "regional"

    def lookup_many(self, species: list[str] | np.ndarray | pd.Series, region: str = "global",
                    min_stand_trees: int = 1) -> pd.DataFrame:
        """Per-tree wood density with the stand fallback.

        Returns columns ``wood_density`` (g/cm³), ``wood_density_sd``, ``wood_density_level`` and
        ``wood_density_source``. Trees whose taxon is not in the table get the stand mean (and the SD among
        resolved trees) when at least ``min_stand_trees`` trees resolved, else the regional default.
        """
        names = list(pd.Series(species, dtype=object))
        uniq = {n: self.resolve(n) for n in set(map(str, names))}
        rows = [uniq[str(n)] for n in names]
        resolved = np.array([r[0] for r in rows if r is not None], dtype=float)
        mean = np.empty(len(rows))
        sd = np.empty(len(rows))
        level = np.empty(len(rows), dtype=object)
        source = np.empty(len(rows), dtype=object)
        if resolved.size >= max(min_stand_trees, 1):
            # SD among the stand's trees, floored at the family-level SD (a one-species stand has SD 0).
            spread = float(resolved.std()) if resolved.size > 1 else 0.0
            stand = (float(resolved.mean()), max(spread, LEVEL_SD_GCM3["family"]), "stand", "stand")
        else:
            m, s = regional_default(region)
            stand = (m, s, "regional", "regional")
        for i, r in enumerate(rows):
            mean[i], sd[i], level[i], source[i] = r if r is not None else stand
        return pd.DataFrame({"wood_density": mean, "wood_density_sd": sd, "wood_density_level": level,
                             "wood_density_source": source})


def regional_default(region: str = "global") -> tuple[float, float]:
    """(mean, sd) regional default wood density (g/cm³); SD is the GWDD global SD 0.176."""
    key = region.strip().lower()
    if key not in REGIONAL_DEFAULTS_GCM3:
        raise InputError(f"unknown wood density region {region!r}; use one of "
                         f"{', '.join(REGIONAL_DEFAULTS_GCM3)}")
    return REGIONAL_DEFAULTS_GCM3[key], GLOBAL_SD_GCM3
