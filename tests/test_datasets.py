"""Training-data adapters on tiny fixtures generated in code: boxes (CSV, VOC), polygons, chips, splits."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.windows import Window
from shapely.geometry import Point

from models.datasets import BOUNDARY, CROWN, block_split, read_boxes, read_polygons
from models.datasets.boxes import boxes_to_crown_mask, boxes_to_polygons
from models.datasets.chips import IGNORE, load_box_scene, load_polygon_scene, read_chip, sample_chip
from models.datasets.polygons import polygons_to_crown_mask
from models.datasets.savanna import crown_bank, savanna_chip
from pipeline.errors import InputError

VOC = """<annotation><filename>img.png</filename><size><width>64</width><height>48</height></size>
<object><name>Tree</name><bndbox><xmin>4</xmin><ymin>4</ymin><xmax>24</xmax><ymax>20</ymax></bndbox></object>
<object><name>Dead</name><bndbox><xmin>30</xmin><ymin>10</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
</annotation>"""


@pytest.fixture
def png_scene(tmp_path):
    rgb = np.full((48, 64, 3), 40, np.uint8)
    rgb[4:20, 4:24] = 200
    Image.fromarray(rgb).save(tmp_path / "img.png")
    (tmp_path / "img.xml").write_text(VOC)
    (tmp_path / "boxes.csv").write_text(
        "image_path,xmin,ymin,xmax,ymax,label\nimg.png,4,4,24,20,Tree\n"
        "img.png,30,10,50,40,Dead\nother.png,1,1,5,5,Tree\n"
    )
    return tmp_path


def test_voc_and_csv_agree(png_scene):
    voc = read_boxes(png_scene / "img.xml")
    csv = read_boxes(png_scene / "boxes.csv")
    assert len(voc) == 1 and len(csv) == 2
    assert voc[0].image_path == png_scene / "img.png"
    img = [s for s in csv if s.image_path.name == "img.png"][0]
    np.testing.assert_allclose(
        voc[0].boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy(),
        img.boxes[["xmin", "ymin", "xmax", "ymax"]].to_numpy(),
    )
    assert list(voc[0].boxes["label"]) == ["Tree", "Dead"]


def test_bad_box_files_raise_input_error(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="missing column"):
        read_boxes(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="not found"):
        read_boxes(tmp_path / "nope.xml")


def test_ellipse_mask_inscribed_with_ring_and_core(png_scene):
    boxes = read_boxes(png_scene / "img.xml")[0].boxes
    mask = boxes_to_crown_mask(boxes, 48, 64, interior_ratio=0.7)
    assert set(np.unique(mask)) == {0, CROWN, BOUNDARY}
    # box corners are outside the inscribed ellipse; the box centre is interior
    assert mask[4, 4] == 0 and mask[19, 23] == 0
    assert mask[12, 14] == CROWN and mask[25, 40] == CROWN
    # crown area close to the ellipse area pi*a*b
    first = mask[:, :28] > 0
    assert first.sum() == pytest.approx(np.pi * 10 * 8, rel=0.08)
    # ellipse polygons: area pi*a*b, inside the box
    poly = boxes_to_polygons(boxes)[0]
    assert poly.area == pytest.approx(np.pi * 10 * 8, rel=0.01)
    assert poly.bounds == pytest.approx((4, 4, 24, 20), abs=1e-6)


def test_touching_crowns_keep_separate_interiors():
    import pandas as pd
    from scipy import ndimage

    boxes = pd.DataFrame(
        {"xmin": [0, 16], "ymin": [0, 0], "xmax": [20, 36], "ymax": [20, 20], "label": "Tree"}
    )
    mask = boxes_to_crown_mask(boxes, 20, 36)
    _, n = ndimage.label(mask == CROWN)
    assert n == 2
    assert mask[10, 18] == BOUNDARY  # the overlap is boundary


def test_polygons_over_geotiff(tmp_path):
    import geopandas as gpd

    transform = Affine(0.1, 0, 500000, 0, -0.1, 4000000)
    with rasterio.open(
        tmp_path / "o.tif",
        "w",
        driver="GTiff",
        width=50,
        height=40,
        count=3,
        dtype="uint8",
        crs="EPSG:32617",
        transform=transform,
    ) as ds:
        ds.write(np.full((3, 40, 50), 90, np.uint8))
    geom = Point(500002.5, 3999998.0).buffer(1.0)  # centre col 25, row 20, radius 10 px
    gdf = gpd.GeoDataFrame({"species": ["Pinus palustris"]}, geometry=[geom], crs="EPSG:32617")
    gdf.to_crs("EPSG:4326").to_file(tmp_path / "c.geojson", driver="GeoJSON")
    ps = read_polygons(tmp_path / "c.geojson", tmp_path / "o.tif", species_column="species")
    assert ps.species == ["Pinus palustris"]
    mask = polygons_to_crown_mask(ps.gdf.geometry, transform, 40, 50)
    assert (mask > 0).sum() == pytest.approx(np.pi * 100, rel=0.08)
    assert mask[20, 25] == CROWN and mask[20, 16] == BOUNDARY
    scene = load_polygon_scene(ps)
    assert scene.target.shape == (40, 50) and len(scene.instances) == 1
    with pytest.raises(InputError, match="no column"):
        read_polygons(tmp_path / "c.geojson", tmp_path / "o.tif", species_column="genus")


def test_block_split_is_spatial_seeded_and_sized():
    a = block_split(100, 130, 32, 0.25, seed=3)
    b = block_split(100, 130, 32, 0.25, seed=3)
    assert a.val_blocks == b.val_blocks
    n_blocks = 4 * 5
    assert len(a.val_blocks) == round(0.25 * n_blocks)
    m = a.val_mask()
    r, c = next(iter(a.val_blocks))
    assert m[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32][: 100 - r * 32, : 130 - c * 32].all()
    assert a.is_val(np.array([c * 32 + 1]), np.array([r * 32 + 1]))[0]
    assert 0 < m.mean() < 0.5


def test_scene_ignore_val_blocks_and_chips(png_scene):
    bs = read_boxes(png_scene / "img.xml")[0]
    split = block_split(48, 64, 32, 0.25, seed=0)
    scene = load_box_scene(bs, split)
    assert np.all(scene.target[split.val_mask()] == IGNORE)
    rng = np.random.default_rng(0)
    rgb, tgt = sample_chip(scene, rng, 32, scale=1.25)
    assert rgb.shape == (3, 32, 32) and rgb.dtype == np.uint8 and tgt.shape == (32, 32)
    assert set(np.unique(tgt)) <= {0, 1, 2, IGNORE}
    half = load_box_scene(bs, None, scale=0.5)
    assert half.rgb.shape == (3, 24, 32)
    assert half.boxes["xmax"].iloc[0] == pytest.approx(12)


def test_read_chip_window_is_boundless_with_nodata(tmp_path):
    path = tmp_path / "n.tif"
    data = np.full((3, 20, 20), 100, np.uint8)
    data[:, :5, :5] = 255
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=20,
        height=20,
        count=3,
        dtype="uint8",
        nodata=255,
        crs="EPSG:32617",
        transform=Affine(0.1, 0, 0, 0, -0.1, 0),
    ) as ds:
        ds.write(data)
    rgb, valid = read_chip(path, Window(-4, -4, 12, 12))
    assert rgb.shape == (3, 12, 12)
    assert not valid[:4].any() and not valid[4:9, 4:9].any() and valid[10, 10]


def test_savanna_chips_are_deterministic_with_crowns(png_scene):
    scene = load_box_scene(read_boxes(png_scene / "img.xml")[0])
    bank = crown_bank([scene])
    assert len(bank) == 2
    a = savanna_chip(np.random.default_rng(5), bank, 64)
    b = savanna_chip(np.random.default_rng(5), bank, 64)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    found = any((savanna_chip(np.random.default_rng(s), bank, 64)[1] == CROWN).any() for s in range(6))
    assert found
