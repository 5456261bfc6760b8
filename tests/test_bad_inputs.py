"""The bad-input matrix of issue 7, each case through the ``forest-inventory run`` CLI.

A bad input gets exit code 2 (input or usage) or 1 (internal), exactly one ``error:`` line on stderr that
names the offending file and says what to do, no traceback unless ``--debug``, and no partial output files.
Legitimate unusual inputs (RGBA, uint16, geographic CRS, rotated geotransform, multispectral with ``--bands``,
float with NaN, an image smaller than one tile, a CHM in another CRS) succeed.
All rasters and models are generated here (a few hundred pixels each; the tiny ONNX models of tiny_models.py).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import rasterio
from affine import Affine
from rasterio.transform import from_origin
from rasterio.warp import Resampling, calculate_default_transform, reproject
from typer.testing import CliRunner

from forest_inventory.cli import app
from pipeline.inventory import OUTPUT_NAMES
from tests.conftest import _disc_scene, _write_geotiff
from tests.tiny_models import crown_model_proto, write_crown_model

UTM = "EPSG:32617"
T = from_origin(500000.0, 4000000.0, 0.1, 0.1)  # 10 cm, the tiny model's GSD
DISCS = [(50, 50, 14), (60, 150, 18), (150, 60, 16), (150, 150, 12)]  # (row, col, radius px): 4 crowns
SIZE = 200
CLI = Path(sys.executable).with_name("forest-inventory")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {"crown": write_crown_model(d / "crowns.onnx", tile_size=128, overlap_px=48)}


def rgb_scene() -> np.ndarray:
    return _disc_scene(SIZE, DISCS)


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """Run ``forest-inventory`` in-process; (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def run_args(ortho: Path, out: Path, models: dict[str, Path], *extra: str) -> list[str]:
    return ["run", str(ortho), "--out", str(out), "--crown-model", str(models["crown"]), "--no-species",
            "--threads", "1", *extra]


def output_files(out: Path) -> list[str]:
    """Everything in ``out`` except the hidden resume state folder ``.work``."""
    if not out.exists():
        return []
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.is_file() and p.relative_to(out).parts[0] != ".work")


def assert_fails(args: list[str], out: Path, names: str | tuple[str, ...], code: int = 2,
                 hint: str | tuple[str, ...] = ()) -> str:
    """Exit ``code``, one ``error:`` line naming ``names`` (any of) and ``hint`` (any of), no traceback,
    no output file in ``out``. Returns the error line."""
    rc, stdout, stderr = run_cli(args)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == code, (rc, stdout, stderr)
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr + stdout
    names = (names,) if isinstance(names, str) else names
    assert any(n in errors[0] for n in names), errors[0]
    hints = (hint,) if isinstance(hint, str) else hint
    if hints:
        assert any(h in errors[0] for h in hints), errors[0]
    assert output_files(out) == [], output_files(out)
    return errors[0]


def assert_succeeds(args: list[str], out: Path) -> dict:
    rc, stdout, stderr = run_cli(args)
    assert rc == 0, (stdout, stderr)
    assert "error:" not in stderr
    for name in ("crowns.geojson", "inventory.gpkg", "crowns.csv", "crown_mask.tif", "quicklook.png",
                 "summary.json"):
        assert (out / name).is_file(), name
    return json.loads((out / "summary.json").read_text())


# --- the orthomosaic file itself ------------------------------------------------------------------------


def test_not_a_raster(tmp_path, models):
    path = tmp_path / "notes.tif"
    path.write_text("this is a field note, not an image\n")
    assert_fails(run_args(path, tmp_path / "out", models), tmp_path / "out", "notes.tif",
                 hint=("GeoTIFF", "raster"))


def test_empty_file(tmp_path, models):
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    assert_fails(run_args(path, tmp_path / "out", models), tmp_path / "out", "empty.tif", hint="GeoTIFF")


def test_missing_file(tmp_path, models):
    assert_fails(run_args(tmp_path / "nowhere.tif", tmp_path / "out", models), tmp_path / "out",
                 "nowhere.tif", hint="existing")


def _noisy_tiff(path: Path) -> bytes:
    """A tiled deflate GeoTIFF whose tile data fill most of the file; returns its bytes."""
    data = np.random.default_rng(0).integers(0, 255, (3, 384, 384), dtype=np.uint8)
    _write_geotiff(path, data, T, UTM)
    return path.read_bytes()


def test_truncated_geotiff(tmp_path, models):
    raw = _noisy_tiff(tmp_path / "full.tif")
    path = tmp_path / "truncated.tif"
    path.write_bytes(raw[: len(raw) * 6 // 10])  # an interrupted upload: header intact, tiles missing
    assert_fails(run_args(path, tmp_path / "out", models), tmp_path / "out", "truncated.tif",
                 hint=("truncated", "corrupt"))


def test_corrupt_geotiff(tmp_path, models):
    raw = bytearray(_noisy_tiff(tmp_path / "full.tif"))
    mid = len(raw) // 2
    raw[mid: mid + 4000] = np.random.default_rng(1).integers(0, 255, 4000, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.tif"
    path.write_bytes(bytes(raw))
    assert_fails(run_args(path, tmp_path / "out", models), tmp_path / "out", "corrupt.tif", hint="corrupt")


def _set_dimensions(src: Path, dst: Path, size: int) -> None:
    """Rewrite ImageWidth/ImageLength in the first IFD of a little-endian TIFF (a corrupt header)."""
    raw = bytearray(src.read_bytes())
    assert raw[:2] == b"II" and struct.unpack_from("<H", raw, 2)[0] == 42
    ifd = struct.unpack_from("<I", raw, 4)[0]
    for i in range(struct.unpack_from("<H", raw, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", raw, entry)[0] in (256, 257):
            struct.pack_into("<HHII", raw, entry, struct.unpack_from("<H", raw, entry)[0], 4, 1, size)
    dst.write_bytes(bytes(raw))


@pytest.mark.parametrize("size", [200_000, 3_000_000_000])
def test_absurd_dimensions_in_header(tmp_path, models, size):
    _noisy_tiff(tmp_path / "full.tif")
    path = tmp_path / "absurd.tif"
    _set_dimensions(tmp_path / "full.tif", path, size)
    assert_fails(run_args(path, tmp_path / "out", models), tmp_path / "out", "absurd.tif",
                 hint=("corrupt", "GeoTIFF"))


def test_no_crs_suggests_crs_flag(tmp_path, models):
    path = _write_geotiff(tmp_path / "nocrs.tif", rgb_scene(), T, None)
    assert_fails(run_args(path, tmp_path / "out", models), tmp_path / "out", "nocrs.tif", hint="--crs")


def test_no_crs_with_crs_flag_succeeds(tmp_path, models):
    path = _write_geotiff(tmp_path / "nocrs.tif", rgb_scene(), T, None)
    summary = assert_succeeds(run_args(path, tmp_path / "out", models, "--crs", UTM), tmp_path / "out")
    assert summary["n_trees"] == len(DISCS)


def test_bad_crs_flag(tmp_path, models):
    path = _write_geotiff(tmp_path / "nocrs.tif", rgb_scene(), T, None)
    assert_fails(run_args(path, tmp_path / "out", models, "--crs", "EPSG:999999"), tmp_path / "out",
                 "EPSG:999999", hint="--crs")


def test_no_georeferencing(tmp_path, models):
    path = _write_geotiff(tmp_path / "plain.tif", rgb_scene(), Affine.identity(), None)
    assert_fails(run_args(path, tmp_path / "out", models, "--crs", UTM), tmp_path / "out", "plain.tif",
                 hint="georef")


def test_geographic_crs_succeeds(tmp_path, models):
    utm = _write_geotiff(tmp_path / "utm.tif", rgb_scene(), T, UTM)
    with rasterio.open(utm) as src:
        dst_t, w, h = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        geo = np.zeros((3, h, w), dtype=np.uint8)
        reproject(rasterio.band(src, [1, 2, 3]), geo, dst_transform=dst_t, dst_crs="EPSG:4326",
                  resampling=Resampling.nearest)
    path = _write_geotiff(tmp_path / "lonlat.tif", geo, dst_t, "EPSG:4326")
    summary = assert_succeeds(run_args(path, tmp_path / "out", models), tmp_path / "out")
    assert summary["n_trees"] == len(DISCS)
    assert summary["crs"] == UTM  # metric work in the local UTM zone
    assert summary["resampled_or_reprojected"] is True


def test_rotated_geotransform_succeeds(tmp_path, models):
    """A rotated (and slightly sheared) north-not-up grid is warped onto a north-up UTM grid."""
    rotated = T * Affine.rotation(20.0) * Affine.shear(2.0, 0.0)
    path = _write_geotiff(tmp_path / "rotated.tif", rgb_scene(), rotated, UTM)
    summary = assert_succeeds(run_args(path, tmp_path / "out", models), tmp_path / "out")
    assert summary["n_trees"] == len(DISCS)
    assert summary["resampled_or_reprojected"] is True
    # the valid area is the image footprint (|det| of the transform per pixel), not the warped bounding box
    assert summary["area_ha"] == pytest.approx(SIZE * SIZE * abs(rotated.determinant) / 1e4, rel=0.03)


# --- bands and data types --------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bands", [1, 2])
def test_too_few_bands(tmp_path, models, n_bands):
    path = _write_geotiff(tmp_path / f"b{n_bands}.tif", rgb_scene()[:n_bands], T, UTM)
    assert_fails(run_args(path, tmp_path / "out", models), tmp_path / "out", path.name, hint="3 colour bands")


def test_rgba_succeeds_alpha_is_the_mask(tmp_path, models):
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    alpha[:, SIZE // 2:] = 0  # right half transparent: two of the four crowns are outside the mask
    path = _write_geotiff(tmp_path / "rgba.tif", rgb_scene(), T, UTM, alpha=alpha)
    summary = assert_succeeds(run_args(path, tmp_path / "out", models), tmp_path / "out")
    assert summary["n_trees"] == 2
    assert summary["area_ha"] == pytest.approx(SIZE * SIZE / 2 * 0.01 / 1e4, rel=0.01)


def test_alpha_band_chosen_as_colour(tmp_path, models):
    alpha = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    path = _write_geotiff(tmp_path / "rgba.tif", rgb_scene(), T, UTM, alpha=alpha)
    assert_fails(run_args(path, tmp_path / "out", models, "--bands", "1,2,4"), tmp_path / "out", "rgba.tif",
                 hint="--bands")


def _multispectral(tmp_path: Path) -> Path:
    """5 bands in the MicaSense order blue, green, red, red edge, NIR."""
    rgb = rgb_scene()
    nir = np.full((SIZE, SIZE), 90, dtype=np.uint8)
    data = np.stack([rgb[2], rgb[1], rgb[0], nir, nir])
    return _write_geotiff(tmp_path / "multispectral.tif", data, T, UTM)


def test_multispectral_with_bands_succeeds(tmp_path, models):
    out = tmp_path / "out"
    summary = assert_succeeds(run_args(_multispectral(tmp_path), out, models, "--bands", "3,2,1"), out)
    assert summary["n_trees"] == len(DISCS)
    assert summary["bands"] == [3, 2, 1]


def test_multispectral_band_out_of_range(tmp_path, models):
    assert_fails(run_args(_multispectral(tmp_path), tmp_path / "out", models, "--bands", "3,2,9"),
                 tmp_path / "out", "multispectral.tif", hint="--bands")


def test_multispectral_without_bands_asks_for_bands(tmp_path, models):
    assert_fails(run_args(_multispectral(tmp_path), tmp_path / "out", models), tmp_path / "out",
                 "multispectral.tif", hint="--bands")


@pytest.mark.parametrize("text", ["1,2", "r,g,b", "0,1,2"])
def test_malformed_bands_flag(tmp_path, models, text):
    path = _write_geotiff(tmp_path / "rgb.tif", rgb_scene(), T, UTM)
    assert_fails(run_args(path, tmp_path / "out", models, "--bands", text), tmp_path / "out", text,
                 hint="--bands")


def test_uint16_succeeds(tmp_path, models):
    data = rgb_scene().astype(np.uint16) * 257 + 3  # full 16-bit range as exported by Pix4D/Agisoft
    path = _write_geotiff(tmp_path / "u16.tif", data, T, UTM)
    summary = assert_succeeds(run_args(path, tmp_path / "out", models), tmp_path / "out")
    assert summary["n_trees"] == len(DISCS)


def test_float32_with_nan_succeeds_nan_is_nodata(tmp_path, models):
    data = rgb_scene().astype(np.float32) / 255.0  # reflectance-like floats in [0, 1]
    data[:, :, SIZE // 2:] = np.nan  # right half NaN: two crowns gone, half the area
    path = _write_geotiff(tmp_path / "f32.tif", data, T, UTM)
    summary = assert_succeeds(run_args(path, tmp_path / "out", models), tmp_path / "out")
    assert summary["n_trees"] == 2
    assert summary["area_ha"] == pytest.approx(SIZE * SIZE / 2 * 0.01 / 1e4, rel=0.01)


@pytest.mark.parametrize("kind", ["nodata", "nan", "alpha"])
def test_all_nodata(tmp_path, models, kind):
    if kind == "nodata":
        path = _write_geotiff(tmp_path / "void.tif", np.zeros((3, SIZE, SIZE), np.uint8), T, UTM, nodata=0)
    elif kind == "nan":
        path = _write_geotiff(tmp_path / "void.tif", np.full((3, SIZE, SIZE), np.nan, np.float32), T, UTM)
    else:
        path = _write_geotiff(tmp_path / "void.tif", rgb_scene(), T, UTM,
                              alpha=np.zeros((SIZE, SIZE), np.uint8))
    assert_fails(run_args(path, tmp_path / "out", models), tmp_path / "out", "void.tif", hint="nodata")


def test_image_smaller_than_one_tile_succeeds(tmp_path, models):
    img = _disc_scene(60, [(30, 30, 12)])  # 60 px < the model's 128 px tile: padded, one tile
    path = _write_geotiff(tmp_path / "small.tif", img, T, UTM)
    summary = assert_succeeds(run_args(path, tmp_path / "out", models), tmp_path / "out")
    assert summary["n_trees"] == 1
    assert summary["n_tiles"] == 1
    assert summary["area_ha"] == pytest.approx(60 * 60 * 0.01 / 1e4)


# --- height rasters -------------------------------------------------------------------------------------


def _chm_for(discs, transform, crs, size=SIZE) -> np.ndarray:
    chm = np.zeros((1, size, size), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    for k, (r, c, rad) in enumerate(discs):
        chm[0][(yy - r) ** 2 + (xx - c) ** 2 <= rad * rad] = 10.0 + 5.0 * k
    return chm


def test_chm_not_overlapping(tmp_path, models):
    ortho = _write_geotiff(tmp_path / "rgb.tif", rgb_scene(), T, UTM)
    far = from_origin(600000.0, 4100000.0, 0.1, 0.1)  # 100 km away
    chm = _write_geotiff(tmp_path / "chm_far.tif", _chm_for(DISCS, far, UTM), far, UTM)
    assert_fails(run_args(ortho, tmp_path / "out", models, "--chm", str(chm)), tmp_path / "out",
                 "chm_far.tif", hint="overlap")


def test_chm_in_another_crs_succeeds(tmp_path, models):
    ortho = _write_geotiff(tmp_path / "rgb.tif", rgb_scene(), T, UTM)
    chm_utm = _write_geotiff(tmp_path / "chm_utm.tif", _chm_for(DISCS, T, UTM), T, UTM)
    with rasterio.open(chm_utm) as src:  # the CHM in lon/lat at a coarser resolution
        dst_t, w, h = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds,
                                                  resolution=2.5e-6)
        geo = np.zeros((1, h, w), dtype=np.float32)
        reproject(rasterio.band(src, 1), geo[0], dst_transform=dst_t, dst_crs="EPSG:4326",
                  resampling=Resampling.nearest)
    chm = _write_geotiff(tmp_path / "chm_lonlat.tif", geo, dst_t, "EPSG:4326")
    out = tmp_path / "out"
    summary = assert_succeeds(run_args(ortho, out, models, "--chm", str(chm)), out)
    assert summary["n_trees"] == len(DISCS)
    crowns = json.loads((out / "crowns.geojson").read_text())["features"]
    heights = sorted(f["properties"]["height_m"] for f in crowns)
    assert heights == pytest.approx([10.0, 15.0, 20.0, 25.0], abs=0.6)
    assert {f["properties"]["height_source"] for f in crowns} == {"chm"}


def test_chm_not_a_raster(tmp_path, models):
    ortho = _write_geotiff(tmp_path / "rgb.tif", rgb_scene(), T, UTM)
    chm = tmp_path / "chm.tif"
    chm.write_text("not a raster")
    assert_fails(run_args(ortho, tmp_path / "out", models, "--chm", str(chm)), tmp_path / "out", "chm.tif",
                 hint="GeoTIFF")


# --- models ---------------------------------------------------------------------------------------------


def _rgb(tmp_path: Path) -> Path:
    return _write_geotiff(tmp_path / "rgb.tif", rgb_scene(), T, UTM)


def _model_args(tmp_path: Path, model: Path) -> list[str]:
    return ["run", str(_rgb(tmp_path)), "--out", str(tmp_path / "out"), "--crown-model", str(model),
            "--no-species", "--threads", "1"]


def test_model_missing(tmp_path):
    assert_fails(_model_args(tmp_path, tmp_path / "gone.onnx"), tmp_path / "out", "gone.onnx",
                 hint="--crown-model")


def test_model_corrupt(tmp_path, models):
    raw = models["crown"].read_bytes()
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(raw[: len(raw) // 2])
    assert_fails(_model_args(tmp_path, bad), tmp_path / "out", "corrupt.onnx", hint="ONNX")


@pytest.mark.parametrize("content", ["pickle", "text"])
def test_model_not_onnx(tmp_path, content):
    bad = tmp_path / "weights.onnx"
    if content == "pickle":  # e.g. a torch checkpoint renamed: it must never be unpickled
        bad.write_bytes(pickle.dumps({"state_dict": [1, 2, 3]}))
    else:
        bad.write_text("model: crowns\n")
    assert_fails(_model_args(tmp_path, bad), tmp_path / "out", "weights.onnx", hint="ONNX")


def test_model_expecting_other_bands(tmp_path):
    bad = tmp_path / "nir.onnx"
    write_crown_model(bad, metadata={"bands": json.dumps(["nir", "red", "green"])})
    assert_fails(_model_args(tmp_path, bad), tmp_path / "out", "nir.onnx", hint="red, green, blue")


def test_model_with_four_input_channels(tmp_path):
    proto = crown_model_proto()
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_value = 4  # a graph that wants RGB+NIR
    bad = tmp_path / "four.onnx"
    onnx.save(proto, str(bad))
    assert_fails(_model_args(tmp_path, bad), tmp_path / "out", "four.onnx", hint=("3", "uint8"))


def test_model_lacking_metadata(tmp_path):
    proto = crown_model_proto()
    del proto.metadata_props[:]
    bad = tmp_path / "bare.onnx"
    onnx.save(proto, str(bad))
    assert_fails(_model_args(tmp_path, bad), tmp_path / "out", "bare.onnx", hint="metadata")


def test_species_model_given_as_crown_model(tmp_path):
    from tests.tiny_models import write_species_model

    bad = write_species_model(tmp_path / "species.onnx")
    assert_fails(_model_args(tmp_path, bad), tmp_path / "out", "species.onnx", hint="--crown-model")


# --- outputs --------------------------------------------------------------------------------------------


def test_output_dir_under_a_file(tmp_path, models):
    blocker = tmp_path / "report.txt"
    blocker.write_text("a file where a folder is needed")
    out = blocker / "out"
    assert_fails(run_args(_rgb(tmp_path), out, models), out, "out", hint="--out")
    assert blocker.read_text() == "a file where a folder is needed"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_dir_not_writable(tmp_path, models):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert_fails(run_args(_rgb(tmp_path), out, models), out, "locked", hint="--out")
    finally:
        out.chmod(0o755)


def test_output_is_the_input_file(tmp_path, models):
    ortho = _rgb(tmp_path)
    before = ortho.read_bytes()
    assert_fails(run_args(ortho, ortho, models), tmp_path / "no-out", "rgb.tif", hint="--out")
    assert ortho.read_bytes() == before


@pytest.mark.parametrize("name", ["crown_mask.tif", "quicklook.png"])
def test_output_would_overwrite_the_input(tmp_path, models, name):
    """An input named like an output, inside --out, would be replaced by the run: refused."""
    out = tmp_path / "out"
    out.mkdir()
    ortho = _write_geotiff(out / name, rgb_scene(), T, UTM)
    before = ortho.read_bytes()
    rc, _, stderr = run_cli(run_args(ortho, out, models))
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, stderr
    assert name in errors[0] and "--out" in errors[0]
    assert ortho.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_chm_would_be_overwritten(tmp_path, models):
    out = tmp_path / "out"
    out.mkdir()
    chm = _write_geotiff(out / "crown_mask.tif", _chm_for(DISCS, T, UTM), T, UTM)
    rc, _, stderr = run_cli(run_args(_rgb(tmp_path), out, models, "--chm", str(chm)))
    assert rc == 2 and "crown_mask.tif" in stderr and "--out" in stderr, stderr
    assert sorted(p.name for p in out.iterdir()) == ["crown_mask.tif"]


def test_write_failure_midway_leaves_no_partial_outputs(tmp_path, models, monkeypatch):
    """The disk fills up while the GeoPackage is written (after the GeoJSON, CSV, mask and quicklook)."""
    import pipeline.export

    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline.export, "write_gpkg", disk_full)
    out = tmp_path / "out"
    line = assert_fails(run_args(_rgb(tmp_path), out, models), out, ("inventory.gpkg", "out"), code=1)
    assert "No space left" in line
    leftovers = [p for p in out.rglob("*") if p.is_file() and p.name != "plan.json"
                 and "groups" not in p.parts]
    assert leftovers == [], leftovers  # nothing staged is left behind either


def test_write_failure_keeps_previous_outputs_intact(tmp_path, models, monkeypatch):
    """A failed rerun must not mix new and old files: the earlier complete outputs stay as they were."""
    import pipeline.export

    out = tmp_path / "out"
    ortho = _rgb(tmp_path)
    assert_succeeds(run_args(ortho, out, models), out)
    before = {n: (out / n).read_bytes() for n in OUTPUT_NAMES if (out / n).exists()}

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline.export, "write_summary_json", disk_full)
    rc, _, stderr = run_cli(run_args(ortho, out, models, "--seed", "7"))
    assert rc == 1 and "Traceback" not in stderr
    assert {n: (out / n).read_bytes() for n in before} == before


# --- messages -------------------------------------------------------------------------------------------


def test_traceback_only_with_debug(tmp_path, models):
    path = _write_geotiff(tmp_path / "nocrs.tif", rgb_scene(), T, None)
    base = [str(CLI), *run_args(path, tmp_path / "out", models)]
    quiet = subprocess.run(base, capture_output=True, text=True, timeout=120)
    loud = subprocess.run([*base, "--debug"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [line for line in quiet.stderr.strip().splitlines()
                                                 if line.startswith("error:")]
    assert len(quiet.stderr.strip().splitlines()) == 1 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "InputError" in loud.stderr


# --- issue 18: georeferencing, overlap and --out ownership -------------------------------------------------


def _png(path: Path) -> Path:
    """A plain PNG (no CRS, no geotransform): what a photo editor exports."""
    from PIL import Image

    Image.fromarray(rgb_scene().transpose(1, 2, 0)).save(path)
    return path


def test_ungeoreferenced_png_gets_one_message_and_no_warning(tmp_path, models):
    png = _png(tmp_path / "plain.png")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "forest_inventory.cli", *run_args(png, out, models)],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "NotGeoreferencedWarning" not in proc.stderr + proc.stdout
    first = lines[0]
    assert "plain.png" in first and "no georeferencing" in first
    assert "gdal_translate -a_srs" in first and "-a_ullr" in first and "world file (plain.wld)" in first
    # with --crs: the same message, not a different one (no circular advice)
    again = assert_fails(run_args(png, out, models, "--crs", UTM), out, "plain.png")
    assert again == first
    # following the advice works: a world file beside it (pixel size, rotation, centre of the first pixel)
    (tmp_path / "plain.wld").write_text("0.1\n0\n0\n-0.1\n500000.05\n3999999.95\n")
    summary = assert_succeeds(run_args(png, out, models, "--crs", UTM), out)
    assert summary["n_trees"] == len(DISCS) and summary["input_gsd_m"] == pytest.approx(0.1)


def test_plots_that_miss_the_image(tmp_path, models):
    import geopandas as gpd
    from shapely.geometry import box

    ortho = _rgb(tmp_path)
    far = gpd.GeoDataFrame({"plot_id": ["F1", "F2"]}, crs=UTM, geometry=[
        box(600000, 4100000, 600020, 4100020), box(600100, 4100000, 600120, 4100020)])
    far.to_file(tmp_path / "far.gpkg")
    assert_fails(run_args(ortho, tmp_path / "out", models, "--plots", str(tmp_path / "far.gpkg")),
                 tmp_path / "out", "far.gpkg", hint="overlap")
    # one plot on the image, one off it: the run goes on, with a warning naming the plot that is off it
    some = gpd.GeoDataFrame({"plot_id": ["P1", "F1"]}, crs=UTM,
                            geometry=[box(500000, 3999990, 500010, 4000000), far.geometry[0]])
    some.to_file(tmp_path / "some.gpkg")
    args = run_args(ortho, tmp_path / "out", models, "--plots", str(tmp_path / "some.gpkg"))
    summary = assert_succeeds(args, tmp_path / "out")
    assert any("1 of 2 plot(s) in some.gpkg lie outside" in w and "F1" in w for w in summary["warnings"])
    report = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "<td>P1</td>" in report and "plot 0" not in report


def test_out_holding_another_image_needs_overwrite(tmp_path, models):
    out = tmp_path / "out"
    first = _rgb(tmp_path)
    assert_succeeds(run_args(first, out, models), out)
    before = {n: (out / n).read_bytes() for n in OUTPUT_NAMES if (out / n).exists()}
    other = _write_geotiff(tmp_path / "other.tif", _disc_scene(SIZE, DISCS[:2]), T, UTM)
    rc, stdout, stderr = run_cli(run_args(other, out, models))
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, stderr
    assert str(out) in errors[0] and "rgb.tif" in errors[0] and "--overwrite" in errors[0]
    assert {n: (out / n).read_bytes() for n in before} == before  # untouched
    # the same image again: resumes / overwrites as before, no flag needed
    assert assert_succeeds(run_args(first, out, models, "--seed", "3"), out)["n_trees"] == len(DISCS)
    # --overwrite replaces the other image's inventory
    assert assert_succeeds(run_args(other, out, models, "--overwrite"), out)["n_trees"] == 2


def _truth(path: Path, boxes: list[tuple[float, float, float, float]]) -> Path:
    import geopandas as gpd
    from shapely.geometry import box

    gpd.GeoDataFrame(geometry=[box(*b) for b in boxes], crs=UTM).to_file(path)
    return path


def test_evaluate_with_truth_off_the_image(tmp_path, models):
    image = _rgb(tmp_path)
    base = ["evaluate", str(image), "--crown-model", str(models["crown"]), "--threads", "1"]
    far = _truth(tmp_path / "far.gpkg", [(600000, 4100000, 600005, 4100005)])
    out = tmp_path / "eval"
    assert_fails([*base, "--truth", str(far), "--out", str(out)], out, "far.gpkg", hint="overlap")
    # half of the references off the image: scored, with a warning that they count as missed
    x0, y0 = T @ (40, 40)
    half = _truth(tmp_path / "half.gpkg", [(x0 - 1, y0 - 1, x0 + 1, y0 + 1),
                                           (600000, 4100000, 600005, 4100005)])
    rc, stdout, stderr = run_cli([*base, "--truth", str(half), "--out", str(out)])
    assert rc == 0, stderr
    assert "warning: 1 of 2 reference crowns in half.gpkg lie outside the image rgb.tif" in stderr
    assert json.loads((out / "crown_metrics.json").read_text())["warnings"]
    # evaluate's --out is scratch plus the metrics: another image may reuse it (no --overwrite needed)
    other = _write_geotiff(tmp_path / "other.tif", rgb_scene(), T, UTM)
    rc, _, stderr = run_cli(["evaluate", str(other), "--crown-model", str(models["crown"]), "--threads", "1",
                             "--truth", str(half), "--out", str(out)])
    assert rc == 0, stderr


def test_chm_without_georeferencing(tmp_path, models):
    chm = _write_geotiff(tmp_path / "chm_plain.tif", _chm_for(DISCS, T, UTM), Affine.identity(), None)
    assert_fails(run_args(_rgb(tmp_path), tmp_path / "out", models, "--chm", str(chm)), tmp_path / "out",
                 "chm_plain.tif", hint="no georeferencing")
