"""Crown polygons kept on disk between stages (pipeline.crown_store) and the writers reading them back."""

import json
import pickle

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from affine import Affine

from pipeline import export
from pipeline.crown_store import CrownStore, StoredCrowns, crown_source
from pipeline.crowns import simplify_keeping_area

UTM = "EPSG:32617"


def _crowns(n: int = 60, seed: int = 0) -> gpd.GeoDataFrame:
    rng = np.random.default_rng(seed)
    x = 500_000 + rng.uniform(2, 48, n)
    y = 4_000_000 + rng.uniform(2, 48, n)
    r = rng.uniform(0.5, 2.0, n)
    geoms = [shapely.Point(a, b).buffer(c, quad_segs=int(rng.integers(2, 12)))
             for a, b, c in zip(x, y, r, strict=True)]
    frame = gpd.GeoDataFrame({"tree_id": np.arange(1, n + 1), "species": rng.choice(["Pinus", "Quercus"], n),
                              "score": rng.uniform(0.5, 1, n), "x": x, "y": y}, geometry=geoms, crs=UTM)
    frame["crown_area_m2"] = frame.geometry.area
    return frame


def test_store_reads_back_every_polygon_by_range_and_index(tmp_path):
    crowns = _crowns(300)
    store = CrownStore.write(tmp_path, crowns.geometry.to_numpy())
    assert len(store) == 300 and store.path.exists()
    assert all(shapely.equals_exact(store.read_range(0, 300), crowns.geometry.to_numpy(), 0))
    idx = np.array([299, 3, 150, 4, 3, 0, 298])  # unsorted, repeated, far apart
    assert all(shapely.equals_exact(store.read(idx), crowns.geometry.to_numpy()[idx], 0))
    np.testing.assert_allclose(store.bounds, crowns.geometry.bounds.to_numpy())
    assert len(store.read(np.array([], dtype=int))) == 0


def test_pickled_store_carries_its_polygons_and_a_removed_file_is_a_clear_error(tmp_path):
    crowns = _crowns(20)
    stored = StoredCrowns.spill(crowns, tmp_path)
    copy = pickle.loads(pickle.dumps(stored))
    stored.store.remove()
    assert all(shapely.equals_exact(copy.geometries(np.arange(20)), crowns.geometry.to_numpy(), 0))
    with pytest.raises(FileNotFoundError, match="run it again"):
        stored.geometries(np.array([1]))


def test_spilled_crowns_keep_table_attrs_and_chunks_match_the_frame(tmp_path):
    crowns = _crowns(45)
    crowns.attrs["species_classes"] = ["Pinus", "Quercus"]
    stored = StoredCrowns.spill(crowns, tmp_path)
    assert "geometry" not in stored.table.columns
    assert stored.table.attrs["species_classes"] == ["Pinus", "Quercus"]
    parts = list(stored.chunks(10))
    assert [len(p) for p in parts] == [10, 10, 10, 10, 5]
    back = pd.concat(parts)
    assert back.crs == crowns.crs
    assert all(shapely.equals_exact(back.geometry.to_numpy(), crowns.geometry.to_numpy(), 0))
    assert crown_source(crowns).to_geodataframe() is not None
    with pytest.raises(TypeError):
        crown_source([1, 2])


def test_writers_give_the_same_files_from_disk_and_from_memory(tmp_path):
    crowns = _crowns(80)
    stored = StoredCrowns.spill(crowns, tmp_path / "work")
    transform = Affine(0.1, 0, 500_000, 0, -0.1, 4_000_050)
    for name, src in (("mem", crowns), ("disk", stored)):
        out = tmp_path / name
        out.mkdir()
        export.write_geojson(out / "c.geojson", src, chunk=7)
        export.write_csv(out / "c.csv", src, chunk=9)
        export.write_gpkg(out / "i.gpkg", src, None, None, {"n_trees": 80}, chunk=11)
        export.write_crown_mask(out / "m.tif", src, 500, 500, transform, UTM, block_px=128)
        rgb, valid = np.full((3, 500, 500), 90, np.uint8), np.ones((500, 500), bool)
        export.write_quicklook(out / "q.png", rgb, valid, transform, UTM, src, strip_px=37)
    mem, disk = tmp_path / "mem", tmp_path / "disk"
    assert (mem / "c.geojson").read_bytes() == (disk / "c.geojson").read_bytes()
    assert len(json.loads((disk / "c.geojson").read_text())["features"]) == 80
    assert (mem / "c.csv").read_bytes() == (disk / "c.csv").read_bytes()
    layer = gpd.read_file(disk / "i.gpkg", layer="crowns")
    assert len(layer) == 80 and layer["tree_id"].tolist() == list(range(1, 81))
    with rasterio.open(mem / "m.tif") as a, rasterio.open(disk / "m.tif") as b:
        labels = b.read(1)
        np.testing.assert_array_equal(a.read(1), labels)
    assert set(np.unique(labels)) - {0} <= set(range(1, 81)) and len(np.unique(labels)) > 60
    from PIL import Image
    a, b = np.asarray(Image.open(mem / "q.png")), np.asarray(Image.open(disk / "q.png"))
    np.testing.assert_array_equal(a, b)


def test_quicklook_strips_draw_what_one_pass_draws(tmp_path):
    crowns = _crowns(120, seed=3)
    transform = Affine(0.1, 0, 500_000, 0, -0.1, 4_000_050)
    rgb = np.full((3, 500, 500), 90, np.uint8)
    valid = np.ones((500, 500), bool)
    export.write_quicklook(tmp_path / "a.png", rgb, valid, transform, UTM, crowns, strip_px=1000)
    export.write_quicklook(tmp_path / "b.png", rgb, valid, transform, UTM, crowns, strip_px=23)
    from PIL import Image
    a, b = np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    assert (a != 90).any()
    np.testing.assert_array_equal(a, b)


def test_simplified_outlines_keep_their_area_and_stay_close():
    yy, xx = np.mgrid[0:60, 0:60]
    disc = ((yy - 30) ** 2 + (xx - 30) ** 2 <= 18 ** 2).astype(np.uint8)
    from rasterio.features import shapes
    poly = shapely.geometry.shape(next(g for g, v in shapes(disc, mask=disc > 0)))
    (simple,) = simplify_keeping_area(np.array([poly], dtype=object), 1.5)
    assert simple.area == pytest.approx(poly.area, rel=1e-9)
    assert shapely.get_num_coordinates(simple) < shapely.get_num_coordinates(poly) / 2
    assert shapely.hausdorff_distance(simple, poly) < 1.5 + 0.5
    assert simple.is_valid
