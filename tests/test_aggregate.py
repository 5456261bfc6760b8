"""Grid cells, point-in-cell/plot assignment and metric areas."""

import geopandas as gpd
import numpy as np
import pytest
import shapely

from pipeline.aggregate import assign_cells, assign_plots, grid_cells, plot_areas_ha, read_plots
from pipeline.errors import InputError

UTM17 = "EPSG:32617"


def test_grid_cells_cover_bounds_with_metric_areas():
    grid = grid_cells((400050.0, 3280000.0, 400250.0, 3280150.0), UTM17, cell_m=100.0)
    # x from 400000 (aligned) to 400300 -> 3 columns; y from 3280000 to 3280200 -> 2 rows
    assert len(grid) == 6
    assert grid["area_ha"].sum() == pytest.approx(200 * 150 / 1e4)
    assert grid.geometry.union_all().equals(shapely.box(400050, 3280000, 400250, 3280150))
    assert grid["area_ha"].max() == pytest.approx(1.0)
    assert grid.crs.to_epsg() == 32617


def test_assign_cells_arithmetic_matches_geometry():
    grid = grid_cells((0.0, 0.0, 250.0, 180.0), UTM17, cell_m=50.0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-20, 270, 2000)
    y = rng.uniform(-20, 200, 2000)
    fast = assign_cells(x, y, grid)
    plain = grid.copy()
    plain.attrs = {}
    slow = assign_cells(x, y, plain)
    inside = (x > 0) & (x < 250) & (y > 0) & (y < 180)
    # away from cell edges both methods agree exactly
    off_edge = ((x % 50) > 1e-6) & ((y % 50) > 1e-6)
    assert np.array_equal(fast[off_edge], slow[off_edge])
    assert (fast[~inside & ((x < 0) | (x > 250) | (y < 0) | (y > 180))] == -1).all()
    assert (fast[inside] >= 0).all()
    pt = assign_cells(np.array([10.0]), np.array([175.0]), grid)[0]  # top-left cell: row 0, col 0
    assert grid.loc[pt, "row"] == 0 and grid.loc[pt, "col"] == 0


def test_geographic_crs_rejected():
    with pytest.raises(InputError, match="metres"):
        grid_cells((-82.0, 29.6, -81.9, 29.7), "EPSG:4326")
    with pytest.raises(InputError):
        grid_cells((0, 0, 10, 10), UTM17, cell_m=0)


def test_assign_plots_and_areas(tmp_path):
    x0, y0 = 400000.0, 3280000.0
    plots = gpd.GeoDataFrame({"name": ["a", "b"]},
                             geometry=[shapely.box(x0, y0, x0 + 100, y0 + 100),
                                       shapely.Point(x0 + 300, y0 + 300).buffer(50, quad_segs=64)],
                             crs=UTM17)
    ids = assign_plots(x0 + np.array([50.0, 300.0, 500.0]), y0 + np.array([50.0, 310.0, 500.0]), plots)
    assert list(ids) == [0, 1, -1]
    areas = plot_areas_ha(plots)
    assert areas[0] == pytest.approx(1.0)
    assert areas[1] == pytest.approx(np.pi * 50**2 / 1e4, rel=1e-3)
    # the same plots in geographic coordinates: areas computed in UTM
    geo = plots.to_crs("EPSG:4326")
    np.testing.assert_allclose(plot_areas_ha(geo), areas, rtol=1e-3)
    path = tmp_path / "plots.gpkg"
    geo.to_file(path)
    back = read_plots(path, target_crs=UTM17)
    assert list(back["plot_id"]) == ["a", "b"]
    np.testing.assert_allclose(back["area_ha"], areas, rtol=1e-3)
    pts = gpd.GeoDataFrame(geometry=[shapely.Point(x0, y0)], crs=UTM17)
    pts.to_file(tmp_path / "pts.gpkg")
    with pytest.raises(InputError, match="polygons"):
        read_plots(tmp_path / "pts.gpkg")
