"""Exporters: RFC 7946 GeoJSON, GeoPackage layers + QGIS style, COG crown mask, quicklook, atomicity."""

import json
import sqlite3

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
from affine import Affine
from shapely.geometry import Point, box

from pipeline import export

UTM = "EPSG:32617"
T = Affine(0.1, 0, 500000.0, 0, -0.1, 4000000.0)


@pytest.fixture
def crowns():
    centres = [(5.0, 5.0, 2.0), (15.0, 8.0, 3.0), (25.0, 20.0, 1.5)]
    geoms = [Point(500000 + x, 4000000 - y).buffer(r) for x, y, r in centres]
    n = len(geoms)
    df = gpd.GeoDataFrame({
        "tree_id": np.arange(1, n + 1), "species": ["Pinus palustris", "unknown", "Quercus laevis"],
        "species_prob": [0.9, 0.3, 0.8], "score": [0.9, 0.8, 0.7],
        "crown_area_m2": [g.area for g in geoms], "crown_diameter_m": [4.0, 6.0, 3.0],
        "height_m": [12.0, np.nan, 8.0], "height_source": ["chm", "allometry", "chm"],
        "dbh_cm": [20.0, 30.0, 10.0], "agb_kg": [100.0, 300.0, 30.0], "agb_kg_sd": [10.0, 30.0, 3.0],
        "carbon_kg": [50.0, 150.0, 15.0], "co2e_kg": [183.0, 550.0, 55.0],
        "x": [500000 + c[0] for c in centres], "y": [4000000 - c[1] for c in centres],
        "junk": [np.zeros(2)] * n,  # array column: not storable, dropped
    }, geometry=geoms, crs=UTM)
    return df


def test_geojson_is_rfc7946(tmp_path, crowns):
    path = export.write_geojson(tmp_path / "crowns.geojson", crowns)
    doc = json.loads(path.read_text())
    assert "crs" not in doc and doc["type"] == "FeatureCollection" and len(doc["features"]) == 3
    props = doc["features"][0]["properties"]
    assert set(export.CROWN_PROPERTIES) <= set(props)
    lon, lat = doc["features"][0]["geometry"]["coordinates"][0][0]
    assert -82 < lon < -80 and 36 < lat < 37  # UTM 17N easting 500 km -> lon -81
    assert props["height_m"] == 12.0 and doc["features"][1]["properties"]["height_m"] is None


def test_gpkg_layers_crs_and_style(tmp_path, crowns):
    cell = box(500000, 3999900, 500100, 4000000)
    grid = gpd.GeoDataFrame({"cell_id": [0], "n_trees": [3]}, geometry=[cell], crs=UTM)
    species = pd.DataFrame({"species": ["Pinus palustris"], "n_trees": [1]})
    path = export.write_gpkg(tmp_path / "inventory.gpkg", crowns, grid, species, {"n_trees": 3, "crs": UTM})
    layers = {name for name, _ in pyogrio.list_layers(path)}
    assert {"crowns", "grid", "species", "summary", "layer_styles"} <= layers
    back = gpd.read_file(path, layer="crowns")
    assert back.crs.to_epsg() == 32617 and len(back) == 3 and "junk" not in back
    assert back.geometry.area.sum() == pytest.approx(crowns.geometry.area.sum(), rel=1e-6)
    with sqlite3.connect(path) as con:
        row = con.execute("select f_table_name, styleQML, useAsDefault from layer_styles").fetchone()
    name, qml, default = row
    assert name == "crowns" and default == 1 and "categorizedSymbol" in qml and "Pinus palustris" in qml
    summary = pyogrio.read_dataframe(path, layer="summary")
    assert len(summary) == 1 and summary["n_trees"].item() == 3 and summary["crs"].item() == UTM


def test_csv_one_row_per_tree(tmp_path, crowns):
    path = export.write_csv(tmp_path / "crowns.csv", crowns)
    df = pd.read_csv(path)
    assert len(df) == 3 and "geometry" not in df and df["tree_id"].tolist() == [1, 2, 3]
    assert df["y"].tolist() == pytest.approx(crowns["y"].tolist(), abs=1e-3)  # full map coordinates


def test_crown_mask_is_cog_with_labels(tmp_path, crowns):
    path = export.write_crown_mask(tmp_path / "crown_mask.tif", crowns, 320, 260, T, UTM, block_px=128)
    with rasterio.open(path) as src:
        assert src.dtypes[0] == "uint32" and src.nodata == 0 and src.crs.to_epsg() == 32617
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        data = src.read(1)
    for tid, x, y in zip(crowns["tree_id"], crowns["x"], crowns["y"], strict=True):
        col, row = ~T @ (x, y)
        assert data[int(row), int(col)] == tid
    assert (data > 0).sum() * 0.01 == pytest.approx(crowns.geometry.area.sum(), rel=0.03)
    assert not list(tmp_path.glob(".*"))  # no staging leftovers


def test_quicklook_with_world_file(tmp_path, crowns):
    rgb = np.full((3, 130, 160), 80, np.uint8)
    qt = T @ Affine.scale(2)
    path = export.write_quicklook(tmp_path / "quicklook.png", rgb, np.ones((130, 160), bool), qt, UTM, crowns,
                                  min_px=1)
    wld = [float(v) for v in (tmp_path / "quicklook.wld").read_text().split()]
    assert wld[0] == pytest.approx(0.2) and wld[3] == pytest.approx(-0.2)
    assert wld[4] == pytest.approx(500000.1)
    with rasterio.open(path) as src:  # GDAL reads the world file and the .aux.xml CRS
        assert src.crs.to_epsg() == 32617 and src.transform.c == pytest.approx(500000.0)
        img = src.read()
    assert (img != 80).any()  # outlines drawn


def test_failed_write_leaves_nothing(tmp_path, crowns):
    bad = crowns.copy()
    bad["tree_id"] = "not a number"
    with pytest.raises(ValueError):
        export.write_crown_mask(tmp_path / "crown_mask.tif", bad, 100, 100, T, UTM)
    assert list(tmp_path.iterdir()) == []


def test_small_quicklook_is_enlarged(tmp_path, crowns):
    rgb = np.full((3, 130, 160), 80, np.uint8)
    valid = np.ones((130, 160), bool)
    path = export.write_quicklook(tmp_path / "q.png", rgb, valid, T @ Affine.scale(2), UTM, crowns)
    with rasterio.open(path) as src:  # 1024 // 160 = 6 times larger, same footprint
        assert src.width == 960 and src.transform.a == pytest.approx(0.2 / 6)
