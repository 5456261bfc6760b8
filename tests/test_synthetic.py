"""Synthetic scene generator: determinism, window/block consistency, truth allometry, CRS and GSD."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize
from typer.testing import CliRunner

from forest_inventory.cli import app
from pipeline.carbon.allometry import agb_chave2014_eq4_kg, dbh_jucker2017_cm
from pipeline.carbon.wood_density import WoodDensityTable, plant_group_of
from pipeline.errors import InputError
from pipeline.synthetic import SPECIES_NAMES, generate_scene, place_trees


def _read(files):
    with rasterio.open(files.ortho) as o, rasterio.open(files.chm) as c:
        return o.read(), c.read(1), o.profile, c.profile


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return generate_scene(tmp_path_factory.mktemp("a"), size_m=60, gsd_m=0.1, seed=3, window_px=256)


def test_same_seed_same_scene_and_different_seed_differs(scene, tmp_path):
    again = generate_scene(tmp_path / "b", size_m=60, gsd_m=0.1, seed=3, window_px=256)
    other = generate_scene(tmp_path / "c", size_m=60, gsd_m=0.1, seed=4, window_px=256)
    a, b, o = _read(scene), _read(again), _read(other)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], o[0])
    ta, tb = gpd.read_file(scene.truth), gpd.read_file(again.truth)
    assert ta.drop(columns="geometry").equals(tb.drop(columns="geometry"))
    assert ta.geometry.geom_equals_exact(tb.geometry, 1e-9).all()


def test_window_size_does_not_change_pixels(scene, tmp_path):
    """Crowns spanning window borders (256 vs 512 vs 1024 px windows) are drawn identically."""
    a = _read(scene)
    for win in (512, 1024):
        b = _read(generate_scene(tmp_path / f"w{win}", size_m=60, gsd_m=0.1, seed=3, window_px=win))
        assert np.array_equal(a[0], b[0])
        assert np.array_equal(a[1], b[1])


def test_block_placement_is_local_and_order_independent():
    """Trees of block (0, 0) are the same whether the scene is 150 m or 300 m wide (more, later blocks)."""
    origin = (400000.0, 3285000.0)
    small = place_trees(7, 150.0, origin)
    large = place_trees(7, 300.0, origin)
    in_small = (small.uid[:, 0] == 0) & (small.uid[:, 1] == 0)
    in_large = (large.uid[:, 0] == 0) & (large.uid[:, 1] == 0)
    assert in_small.sum() > 5
    assert np.array_equal(small.x[in_small], large.x[in_large])
    assert np.array_equal(small.height_m[in_small], large.height_m[in_large])


def test_truth_agb_is_the_carbon_allometry(scene):
    truth = gpd.read_file(scene.truth)
    assert len(truth) == scene.n_trees > 20
    assert set(truth["species"]) <= set(SPECIES_NAMES) and truth["species"].nunique() >= 3
    table = WoodDensityTable.default()
    for _, t in truth.sample(10, random_state=0).iterrows():
        wd = table.lookup(t["species"])[0]
        dbh = float(dbh_jucker2017_cm(t["height_m"], t["crown_diameter_m"], plant_group_of(t["species"]),
                                      "temperate"))
        assert t["wood_density"] == pytest.approx(wd)
        assert t["dbh_cm"] == pytest.approx(dbh, rel=1e-9)
        assert t["agb_kg"] == pytest.approx(float(agb_chave2014_eq4_kg(wd, dbh, t["height_m"])), rel=1e-9)
    # visible part: never more than the outline; the tallest crown of an overlapping pair is fully visible
    assert (truth["visible_area_m2"] <= truth["crown_area_m2"] + 1e-6).all()
    assert truth["visible_fraction"].between(0, 1 + 1e-9).all() and (truth["visible_fraction"] < 0.99).any()
    # crown diameter is the area-equivalent diameter of the (unclipped) outline
    np.testing.assert_allclose(truth["crown_diameter_m"], 2 * np.sqrt(truth["crown_area_m2"] / np.pi))


def test_chm_reaches_each_tree_height_inside_its_crown(scene):
    truth = gpd.read_file(scene.truth)
    ortho, chm, prof, _ = _read(scene)
    ids = rasterize(((g, i + 1) for i, g in enumerate(truth.geometry)), out_shape=chm.shape,
                    transform=prof["transform"], dtype="int32")
    # a crown top is never lower than the tree (a taller neighbour can only cover it)
    for i, h in enumerate(truth["height_m"]):
        inside = chm[ids == i + 1]
        if inside.size:
            assert inside.max() >= h - 0.02
    # outside the truth outlines: ground, grass and logs (up to a rim pixel of the 48-vertex outlines)
    tall_outside = (chm > 1.0) & (ids == 0)
    assert tall_outside.sum() < 0.01 * (ids > 0).sum()
    assert ortho.dtype == np.uint8 and ortho.shape[0] == 3


def test_crs_gsd_tiling_and_compression(tmp_path):
    files = generate_scene(tmp_path, size_m=40, gsd_m=0.2, seed=1, crs="EPSG:32633", origin=(500000, 5000000),
                           compress="jpeg")
    with rasterio.open(files.ortho) as o, rasterio.open(files.chm) as c:
        assert o.crs.to_epsg() == 32633 and c.crs == o.crs
        assert o.res == pytest.approx((0.2, 0.2)) and (o.width, o.height) == (200, 200)
        assert o.bounds.left == 500000 and o.bounds.top == 5000000
        assert o.profile["tiled"] and o.compression.name.lower() == "jpeg"
        assert c.dtypes[0] == "float32" and c.transform == o.transform
    truth = gpd.read_file(files.truth)
    assert truth.crs.to_epsg() == 32633
    assert truth.total_bounds[0] >= 500000 - 1e-6 and truth.total_bounds[3] <= 5000000 + 1e-6


def test_bad_arguments_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="projected"):
        generate_scene(tmp_path, size_m=20, crs="EPSG:4326")
    with pytest.raises(InputError, match="positive"):
        generate_scene(tmp_path, size_m=-5)


def test_cli_synth(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--out", str(tmp_path / "s"), "--size-m", "30", "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s" / "ortho.tif").exists() and (tmp_path / "s" / "truth.gpkg").exists()
    assert (tmp_path / "s" / "dsm.tif").exists() and "dsm.tif" in res.output
    bad = runner.invoke(app, ["synth", "--out", str(tmp_path / "t"), "--size-m", "30", "--crs", "EPSG:4326"])
    assert bad.exit_code == 2 and "projected" in bad.output


@pytest.fixture(scope="module")
def clumped(tmp_path_factory):
    return generate_scene(tmp_path_factory.mktemp("clumped"), size_m=60, gsd_m=0.1, seed=3, window_px=256,
                          crown_style="clumped")


def test_clumped_style_keeps_the_truth_and_is_deterministic(scene, clumped, tmp_path):
    """The crown look changes the pixels only: same trees, same truth table and outlines, same per-window
    independence; the same seed gives the same pixels."""
    ta, tb = gpd.read_file(scene.truth), gpd.read_file(clumped.truth)
    assert ta.drop(columns="geometry").equals(tb.drop(columns="geometry"))
    assert ta.geometry.geom_equals_exact(tb.geometry, 1e-9).all()
    smooth_px, clumped_px = _read(scene)[0], _read(clumped)[0]
    assert not np.array_equal(smooth_px, clumped_px)
    again = generate_scene(tmp_path / "w", size_m=60, gsd_m=0.1, seed=3, window_px=512, crown_style="clumped")
    assert np.array_equal(_read(again)[0], clumped_px) and np.array_equal(_read(again)[1], _read(clumped)[1])


def _crown_ids(files):
    truth = gpd.read_file(files.truth)
    ortho, chm, prof, _ = _read(files)
    # the inner 70 % of each outline, so that rim pixels and neighbours' overlap count little
    cores = truth.geometry.scale(0.7, 0.7, origin="centroid")
    ids = rasterize(((g, i + 1) for i, g in enumerate(cores)), out_shape=chm.shape,
                    transform=prof["transform"], dtype="int32")
    return truth, ortho, chm, ids


def test_clumped_pines_show_ground_between_tufts_and_dense_crowns_have_gaps(scene, clumped):
    """Tufted pine crowns let the ground through between needle clumps (CHM near the ground inside the
    outline), smooth ones never do; dense broadleaf crowns stay closed but gain shaded gaps (more
    within-crown brightness contrast)."""
    stats = {}
    for name, files in (("smooth", scene), ("clumped", clumped)):
        truth, ortho, chm, ids = _crown_ids(files)
        lum = ortho.astype(np.float64).mean(axis=0)
        pine_ground, broad_cv, broad_ground = [], [], []
        for i, sp in enumerate(truth["species"]):
            px = ids == i + 1
            if px.sum() < 50 or truth["visible_fraction"].iloc[i] < 0.99:
                continue
            if sp == "Pinus palustris":
                pine_ground.append((chm[px] < 1.0).mean())
            else:
                broad_ground.append((chm[px] < 1.0).mean())
                broad_cv.append(lum[px].std() / lum[px].mean())
        stats[name] = (np.mean(pine_ground), np.mean(broad_ground), np.mean(broad_cv), len(pine_ground))
    assert stats["smooth"][3] >= 2 and stats["smooth"][0] == 0.0 and stats["smooth"][1] == 0.0
    assert stats["clumped"][0] > 0.05  # ground seen through open pine crowns
    assert stats["clumped"][1] < 0.01  # broadleaf crowns stay closed
    assert stats["clumped"][2] > 1.2 * stats["smooth"][2]  # sunlit clumps and shaded gaps


def test_crown_style_is_checked(tmp_path):
    with pytest.raises(InputError, match="crown-style"):
        generate_scene(tmp_path, size_m=20, crown_style="cartoon")
    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "s"), "--size-m", "20", "--seed", "2",
                                   "--crown-style", "clumped"])
    assert res.exit_code == 0, res.output
    assert '"crown_style": "clumped"' in (tmp_path / "s" / "scene.json").read_text()


def test_dsm_alone_gives_the_truth_heights(scene):
    # issue 17: synth writes dsm.tif (ground with relief + canopy); heights from the DSM alone, ground from
    # its gaps, against the truth heights of the trees that are mostly visible
    from pipeline.height import crown_heights
    from pipeline.synthetic import ground_elevation_m

    assert scene.dsm is not None and scene.dsm.is_file()
    with rasterio.open(scene.dsm) as d, rasterio.open(scene.chm) as c:
        dsm, chm = d.read(1), c.read(1)
        t = d.transform
    rows, cols = np.mgrid[: dsm.shape[0], : dsm.shape[1]]
    xs, ys = t.c + (cols + 0.5) * t.a, t.f + (rows + 0.5) * t.e
    ground = ground_elevation_m(xs, ys, 3, (t.c, t.f))
    np.testing.assert_allclose(dsm - chm, ground, atol=1e-3)
    assert np.ptp(ground) > 1.0  # relief
    truth = gpd.read_file(scene.truth)
    visible = truth[truth["visible_fraction"] > 0.8]
    heights, source = crown_heights(visible, dsm=scene.dsm)
    from_chm, _ = crown_heights(visible, chm=scene.chm)
    assert source == "dsm-ground" and len(visible) > 10
    ground_err = heights - from_chm  # the derived ground's error alone
    assert np.median(np.abs(ground_err)) < 0.3 and np.abs(ground_err).max() < 1.5
    err = heights - visible["height_m"].to_numpy()  # plus the 95th percentile below the apex
    assert np.median(np.abs(err)) < 1.0
    print(f"DSM-only heights: median ground error {np.median(ground_err):+.2f} m, "
          f"median error against truth {np.median(err):+.2f} m ({len(visible)} trees)")
