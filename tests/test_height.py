"""Crown heights: 95th percentile inside each crown from a CHM (or DSM - DTM) in another CRS/resolution."""

import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from rasterio.warp import Resampling, calculate_default_transform, reproject
from shapely.geometry import Point

from pipeline.errors import InputError
from pipeline.height import crown_heights, labelled_percentile

UTM = "EPSG:32617"
X0, Y0 = 500000.0, 4000000.0
CROWNS = [(10.0, 10.0, 3.0, 12.0), (25.0, 12.0, 4.0, 18.5), (18.0, 30.0, 2.0, 25.0)]  # x, y, radius, height


def plateau_chm(gsd=0.05, size_m=40.0):
    n = int(size_m / gsd)
    yy, xx = np.mgrid[:n, :n]
    x = X0 + (xx + 0.5) * gsd
    y = Y0 - (yy + 0.5) * gsd
    chm = np.zeros((n, n), np.float32)
    for cx, cy, r, h in CROWNS:
        chm[(x - X0 - cx) ** 2 + (Y0 - y - cy) ** 2 <= (r + 0.5) ** 2] = h
    return chm, Affine(gsd, 0, X0, 0, -gsd, Y0)


def crowns_gdf():
    geoms = [Point(X0 + cx, Y0 - cy).buffer(r) for cx, cy, r, _ in CROWNS]
    return gpd.GeoDataFrame({"tree_id": [1, 2, 3]}, geometry=geoms, crs=UTM)


def to_other_crs(data, transform, dst_crs, res):
    h, w = data.shape
    left, top = transform.c, transform.f
    dst_t, dw, dh = calculate_default_transform(UTM, dst_crs, w, h, left, top + transform.e * h,
                                                left + transform.a * w, top, resolution=res)
    out = np.full((dh, dw), -9999, np.float32)
    reproject(data, out, src_transform=transform, src_crs=UTM, dst_transform=dst_t, dst_crs=dst_crs,
              resampling=Resampling.average, dst_nodata=-9999)
    return out[None], dst_t


def test_labelled_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=1000)
    values = rng.normal(size=1000)
    values[::17] = np.nan
    got = labelled_percentile(labels, values, 5)
    for k in range(1, 5):
        v = values[(labels == k) & np.isfinite(values)]
        assert got[k - 1] == pytest.approx(np.percentile(v, 95))
    assert np.isnan(labelled_percentile(labels, values, 6)[5])


def test_chm_in_other_crs_and_resolution(tmp_path, write_geotiff):
    chm, t = plateau_chm()
    data, dst_t = to_other_crs(chm, t, "EPSG:4326", 3e-6)  # ~0.3 m pixels, lon/lat
    path = write_geotiff(tmp_path / "chm4326.tif", data, dst_t, "EPSG:4326", nodata=-9999)
    heights, source = crown_heights(crowns_gdf(), chm=path)
    assert source == "chm"
    assert heights == pytest.approx([h for *_, h in CROWNS], abs=0.3)


def test_chm_in_neighbouring_utm_zone(tmp_path, write_geotiff):
    chm, t = plateau_chm()
    data, dst_t = to_other_crs(chm, t, "EPSG:32616", 0.5)  # coarser and in another zone
    path = write_geotiff(tmp_path / "chm16.tif", data, dst_t, "EPSG:32616", nodata=-9999)
    heights, _ = crown_heights(crowns_gdf(), chm=path)
    assert heights == pytest.approx([h for *_, h in CROWNS], abs=0.5)


def test_dsm_minus_dtm_on_slope(tmp_path, write_geotiff):
    chm, t = plateau_chm(gsd=0.1)
    ground = (100.0 + np.linspace(0, 20, chm.shape[1])[None, :] * np.ones_like(chm)).astype(np.float32)
    dsm = write_geotiff(tmp_path / "dsm.tif", (ground + chm)[None], t, UTM)
    dtm = write_geotiff(tmp_path / "dtm.tif", ground[None], t, UTM)
    heights, source = crown_heights(crowns_gdf(), dsm=dsm, dtm=dtm)
    assert source == "dsm-dtm"
    assert heights == pytest.approx([h for *_, h in CROWNS], abs=0.3)


def test_dsm_alone_ground_from_the_gaps_on_relief(tmp_path, write_geotiff):
    # issue 17: a DSM without a DTM; ground = DSM minima, opening wider than the crowns, gaps interpolated
    chm, t = plateau_chm(gsd=0.1, size_m=60.0)
    n = chm.shape[0]
    yy, xx = np.mgrid[:n, :n] * 0.1
    ground = (100.0 + 0.10 * xx + 1.5 * np.sin(2 * np.pi * yy / 50.0)).astype(np.float32)  # 10 % + waves
    dsm = write_geotiff(tmp_path / "dsm.tif", (ground + chm)[None], t, UTM)
    heights, source = crown_heights(crowns_gdf(), dsm=dsm)
    assert source == "dsm-ground"
    assert heights == pytest.approx([h for *_, h in CROWNS], abs=0.4)


def test_ground_from_dsm_known_answer():
    from pipeline.height import ground_from_dsm

    # a 5 % plane with one 6 m wide, 20 m tall block (a crown): the ground under it is the plane
    rows, cols = np.mgrid[:60, :60].astype(float)
    plane = 50.0 + 0.05 * cols
    dsm = plane.copy()
    dsm[20:26, 30:36] += 20.0
    ground = ground_from_dsm(dsm, cell_m=1.0, window_m=15.0)
    np.testing.assert_allclose(ground, plane, atol=1e-9)
    dsm[0, 0] = np.nan  # no data stays out of the ground cells
    assert np.isfinite(ground_from_dsm(dsm)).all()


def test_no_height_inputs_and_errors(tmp_path, write_geotiff):
    heights, source = crown_heights(crowns_gdf())
    assert source == "none" and np.isnan(heights).all()
    with pytest.raises(InputError, match="--dsm"):
        crown_heights(crowns_gdf(), dtm=tmp_path / "dtm.tif")
    with pytest.raises(InputError, match="DSM not found"):
        crown_heights(crowns_gdf(), dsm=tmp_path / "dsm.tif")
    chm, t = plateau_chm(gsd=0.5)
    nocrs = write_geotiff(tmp_path / "nocrs.tif", chm[None], t, None)
    with pytest.raises(InputError, match="no CRS"):
        crown_heights(crowns_gdf(), chm=nocrs)


def test_crown_off_the_chm_is_nan(tmp_path, write_geotiff):
    chm, t = plateau_chm(gsd=0.5)
    path = write_geotiff(tmp_path / "chm.tif", chm[None], t, UTM, nodata=-9999)
    far = gpd.GeoDataFrame({"tree_id": [1]}, geometry=[Point(X0 + 500, Y0 - 500).buffer(2)], crs=UTM)
    heights, _ = crown_heights(far, chm=path)
    assert np.isnan(heights[0])
