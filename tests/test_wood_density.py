"""Wood density table and its fallbacks."""

import pytest

from pipeline.carbon.wood_density import (
    LEVEL_SD_GCM3,
    WoodDensityTable,
    plant_group_of,
    regional_default,
)
from pipeline.errors import InputError

SCENE_SPECIES = ["Pinus palustris", "Pinus taeda", "Pinus elliottii", "Quercus laevis", "Quercus virginiana",
                 "Quercus geminata", "Acer rubrum", "Liquidambar styraciflua"]


def test_scene_species_resolve_at_species_level():
    table = WoodDensityTable.default()
    for name in SCENE_SPECIES:
        mean, sd, level = table.lookup(name)
        assert level == "species", name
        assert 0.3 < mean < 0.9 and sd > 0
    assert table.lookup("Pinus palustris")[0] == pytest.approx(0.54)
    assert table.lookup("Quercus virginiana")[0] == pytest.approx(0.80)


def test_fallback_levels():
    table = WoodDensityTable.default()
    mean, sd, level = table.lookup("Pinus clausa")
    assert level == "genus" and sd == LEVEL_SD_GCM3["genus"]
    assert table.lookup("Quercus incana")[0] == pytest.approx(0.58)  # explicit IPCC genus row
    assert table.lookup("Pinus sp.")[2] == "genus"
    assert table.lookup("Nothing known")[:3] == (0.613, 0.176, "regional")
    assert table.lookup(None, region="africa")[:2] == (0.58, 0.176)
    assert table.resolve("Castanea sativa", family="Fagaceae")[2] == "genus"
    assert table.resolve("Lithocarpus densiflorus", family="Fagaceae")[2] == "family"
    with pytest.raises(InputError):
        regional_default("atlantis")


def test_stand_mean_fallback():
    table = WoodDensityTable.default()
    frame = table.lookup_many(["Pinus palustris", "Quercus virginiana", "unknown", "Foo bar"])
    assert list(frame["wood_density_level"]) == ["species", "species", "stand", "stand"]
    assert frame["wood_density"].iloc[2] == pytest.approx((0.54 + 0.80) / 2)
    assert frame["wood_density_sd"].iloc[2] >= LEVEL_SD_GCM3["family"]
    only_unknown = table.lookup_many(["unknown", "x y"], region="tropical_america")
    assert list(only_unknown["wood_density_level"]) == ["regional", "regional"]
    assert only_unknown["wood_density"].iloc[0] == pytest.approx(0.60)


def test_user_csv_overrides(tmp_path):
    path = tmp_path / "wd.csv"
    path.write_text("taxon,wood_density_gcm3,wood_density_sd_gcm3\nPinus palustris,0.61,0.05\n"
                    "Eucalyptus grandis,0.49,\nMyrtaceae,0.70,\n")
    table = WoodDensityTable.from_csv(path)
    assert table.lookup("Pinus palustris") == (0.61, 0.05, "species")
    assert table.lookup("Eucalyptus grandis") == (0.49, LEVEL_SD_GCM3["species"], "species")
    assert table.lookup("Eucalyptus saligna")[2] == "genus"
    assert table.lookup("Acer rubrum")[0] == pytest.approx(0.49)  # built-in rows kept
    fam = table.resolve("Syzygium cumini", family="Myrtaceae")
    assert fam[:3] == (0.70, LEVEL_SD_GCM3["family"], "family")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,rho\nx,1\n")
    with pytest.raises(InputError, match="bad.csv"):
        WoodDensityTable.from_csv(bad)
    with pytest.raises(InputError):
        WoodDensityTable.from_csv(tmp_path / "missing.csv")


def test_plant_group_of():
    assert plant_group_of("Pinus palustris") == "gymnosperm"
    assert plant_group_of("Taxodium distichum") == "gymnosperm"
    assert plant_group_of("Wollemia nobilis") == "gymnosperm"
    assert plant_group_of("Whatever x", family="Podocarpaceae") == "gymnosperm"
    assert plant_group_of("Quercus laevis") == "angiosperm"
    assert plant_group_of("unknown") == "angiosperm"
    assert plant_group_of(None) == "angiosperm"
