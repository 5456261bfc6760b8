"""Ortho ingest: masks (alpha, nodata, internal, NaN), one global stretch, CRS and GSD handling."""

import numpy as np
import pytest
from affine import Affine
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.windows import Window

from pipeline.errors import InputError
from pipeline.raster import compute_stretch, open_ortho

UTM = "EPSG:32617"
T = Affine(0.1, 0, 500000.0, 0, -0.1, 4000000.0)


def test_rgba_alpha_becomes_mask(tmp_path, write_geotiff, disc_scene):
    img = disc_scene(200, [(100, 100, 30)])
    alpha = np.full((200, 200), 255, np.uint8)
    alpha[:, :50] = 0
    path = write_geotiff(tmp_path / "rgba.tif", img, T, UTM, alpha=alpha)
    with open_ortho(path) as ortho:
        assert not ortho.warped and ortho.gsd_m == pytest.approx(0.1)
        rgb, valid = ortho.read(Window(-20, -20, 128, 128))  # boundless: padded, invalid outside
        assert rgb.dtype == np.uint8 and rgb.shape == (3, 128, 128)
        assert not valid[:20].any() and not valid[:, :70].any() and valid[20:, 70:].all()
        assert (rgb[:, ~valid] == 0).all()
        assert ortho.valid_area_m2() == pytest.approx(150 * 200 * 0.01)


def test_uint16_one_stretch_for_all_tiles(tmp_path, write_geotiff):
    rng = np.random.default_rng(1)
    data = rng.integers(1000, 30000, size=(3, 256, 256)).astype(np.uint16)
    data[:, :, 128:] += 20000  # the right half is brighter: a per-tile stretch would differ
    data[:, 10, 10] = 12345
    data[:, 10, 200] = 12345
    path = write_geotiff(tmp_path / "u16.tif", data, T, UTM, nodata=0)
    with open_ortho(path) as ortho:
        left, _ = ortho.read(Window(0, 0, 128, 128))
        right, _ = ortho.read(Window(128, 0, 128, 128))
        assert left[:, 10, 10].tolist() == right[:, 10, 72].tolist()  # same value, same uint8 everywhere
        assert not ortho.stretch.identity
        full, valid = ortho.read(Window(0, 0, 256, 256))
        assert valid.all() and full.min() == 0 and full.max() == 255


def test_uint16_with_8bit_range_and_uint8_pass_through():
    sample = np.array([[[0, 100, 255]]] * 3, dtype=np.uint16)
    assert compute_stretch(sample, np.ones((1, 3), bool), "uint16").identity
    assert compute_stretch(sample.astype(np.uint8), np.ones((1, 3), bool), "uint8").identity


def test_float_nan_masked_and_unit_range_scaled(tmp_path, write_geotiff):
    data = np.full((3, 64, 64), 0.5, np.float32)
    data[:, :8, :8] = np.nan
    path = write_geotiff(tmp_path / "f.tif", data, T, UTM)
    with open_ortho(path) as ortho:
        rgb, valid = ortho.read(Window(0, 0, 64, 64))
    assert not valid[:8, :8].any() and valid.sum() == 64 * 64 - 64
    assert rgb[0, 20, 20] == 127


def test_internal_mask_and_nodata(tmp_path, write_geotiff, disc_scene):
    img = disc_scene(100, [])
    mask = np.ones((100, 100), bool)
    mask[60:] = False
    path = write_geotiff(tmp_path / "m.tif", img, T, UTM, mask=mask)
    with open_ortho(path) as ortho:
        _, valid = ortho.read(Window(0, 0, 100, 100))
    assert valid[:60].all() and not valid[60:].any()
    img2 = img.copy()
    img2[:, :, :30] = 255
    path2 = write_geotiff(tmp_path / "nd.tif", img2, T, UTM, nodata=255)
    with open_ortho(path2) as ortho:
        _, valid = ortho.read(Window(0, 0, 100, 100))
    assert not valid[:, :30].any() and valid[:, 30:].all()


def test_no_crs_error_and_override(tmp_path, write_geotiff, disc_scene):
    path = write_geotiff(tmp_path / "nocrs.tif", disc_scene(64, []), T, None)
    with pytest.raises(InputError, match="--crs"):
        open_ortho(path)
    with open_ortho(path, crs="EPSG:32617") as ortho:
        assert ortho.crs.to_epsg() == 32617 and ortho.read(Window(0, 0, 64, 64))[1].all()
    with open_ortho(path, crs="32617") as ortho:  # a bare EPSG code
        assert ortho.crs.to_epsg() == 32617
    with pytest.raises(InputError, match="--crs"):
        open_ortho(path, crs="EPSG:notacode")


def test_geographic_input_is_worked_in_utm(tmp_path, write_geotiff, disc_scene):
    img = disc_scene(300, [(150, 150, 40)])
    dst_t, w, h = calculate_default_transform(UTM, "EPSG:4326", 300, 300, 500000, 3999970, 500030, 4000000)
    geo = np.zeros((3, h, w), np.uint8)
    reproject(img, geo, src_transform=T, src_crs=UTM, dst_transform=dst_t, dst_crs="EPSG:4326",
              resampling=Resampling.nearest, dst_nodata=0)
    path = write_geotiff(tmp_path / "geo.tif", geo, dst_t, "EPSG:4326", nodata=0)
    with open_ortho(path) as ortho:
        assert ortho.warped and ortho.crs.to_epsg() == 32617
        assert ortho.gsd_m == pytest.approx(0.1, rel=0.02)
        assert ortho.valid_area_m2() == pytest.approx(900.0, rel=0.02)
        rgb, valid = ortho.read(Window(0, 0, ortho.width, ortho.height))
        crown_m2 = (rgb[1] > 150).sum() * ortho.gsd_m ** 2
        assert crown_m2 == pytest.approx(np.pi * 4.0 ** 2, rel=0.02)


def test_gsd_resampling_threshold(tmp_path, write_geotiff, disc_scene):
    fine = Affine(0.05, 0, 500000.0, 0, -0.05, 4000000.0)
    path = write_geotiff(tmp_path / "fine.tif", disc_scene(400, [(200, 200, 80)]), fine, UTM)
    with open_ortho(path, target_gsd_m=0.1) as ortho:
        assert ortho.warped and ortho.gsd_m == pytest.approx(0.1) and ortho.width == 200
        rgb, _ = ortho.read(Window(0, 0, 200, 200))
        assert (rgb[1] > 150).sum() * 0.01 == pytest.approx(np.pi * 4.0 ** 2, rel=0.03)
    with open_ortho(path, target_gsd_m=0.054) as ortho:  # within 10 %: native grid
        assert not ortho.warped and ortho.gsd_m == pytest.approx(0.05)


def test_rotated_transform_is_warped_north_up(tmp_path, write_geotiff, disc_scene):
    rot = T @ Affine.rotation(20)
    path = write_geotiff(tmp_path / "rot.tif", disc_scene(200, [(100, 100, 40)]), rot, UTM)
    with open_ortho(path) as ortho:
        assert ortho.warped and ortho.transform.b == 0 and ortho.transform.d == 0
        rgb, valid = ortho.read(Window(0, 0, ortho.width, ortho.height))
        assert valid.sum() * ortho.gsd_m ** 2 == pytest.approx(400.0, rel=0.03)
        assert (rgb[1] > 150).sum() * ortho.gsd_m ** 2 == pytest.approx(np.pi * 16, rel=0.03)


def test_band_selection_and_errors(tmp_path, write_geotiff):
    data = np.stack([np.full((32, 32), v, np.uint8) for v in (10, 20, 30, 40, 50)])
    path = write_geotiff(tmp_path / "multi.tif", data, T, UTM)
    with open_ortho(path, bands=(5, 3, 1)) as ortho:
        rgb, _ = ortho.read(Window(0, 0, 32, 32))
    assert rgb[:, 0, 0].tolist() == [50, 30, 10]
    with pytest.raises(InputError, match="5 band"):
        open_ortho(path, bands=(1, 2, 6))
    bad = tmp_path / "x.tif"
    bad.write_text("not a raster")
    with pytest.raises(InputError, match="not a readable raster"):
        open_ortho(bad)
    with pytest.raises(InputError, match="not found"):
        open_ortho(tmp_path / "missing.tif")
