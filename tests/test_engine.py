"""The inventory engine end to end with tiny ONNX models (tests/tiny_models.py) on generated scenes."""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
from affine import Affine
from rasterio.warp import Resampling, calculate_default_transform, reproject
from typer.testing import CliRunner

from pipeline import export, inventory
from pipeline.errors import InputError
from pipeline.onnx_model import OnnxModel
from tests.tiny_models import crown_model_proto, write_crown_model, write_species_model

UTM = "EPSG:32617"
GSD = 0.1
T = Affine(GSD, 0, 500000.0, 0, -GSD, 4000000.0)
# tiles of 128 px with 56 px overlap: cores change at 100, 172, 244, 316 px -> discs straddle them
CENTRES = [30, 100, 172, 244, 316, 372]
SUMMARY_KEYS = {"n_trees", "area_ha", "trees_per_ha", "agb_t", "carbon_t", "co2e_t", "co2e_t_ci90", "crs",
                "gsd_m", "models", "elapsed_s", "version"}
OUTPUTS = ["crowns.geojson", "inventory.gpkg", "crowns.csv", "crown_mask.tif", "quicklook.png",
           "quicklook.wld", "summary.json", "report.html"]


def scene_discs(seed=0):
    rng = np.random.default_rng(seed)
    discs = []
    for i, r in enumerate(CENTRES):
        for j, c in enumerate(CENTRES):
            colour = (230, 120, 100) if (i + j) % 2 else (100, 230, 120)
            discs.append((r, c, int(rng.integers(12, 21)), colour))
    return discs


@pytest.fixture
def models(tmp_path):
    # brightness threshold halfway between background (0.13) and crowns (0.59): resampling is unbiased
    return (write_crown_model(tmp_path / "crowns.onnx", tile_size=128, overlap_px=56,
                              brightness_threshold=0.36),
            write_species_model(tmp_path / "species.onnx", chip_size=32, gsd_m=0.2))


@pytest.fixture
def scene(tmp_path, write_geotiff, disc_scene):
    discs = scene_discs()
    path = write_geotiff(tmp_path / "ortho.tif", disc_scene(400, discs), T, UTM)
    return path, discs


def config(ortho, out, models, **kw):
    crown, species = models
    kw.setdefault("carbon", {"n_draws": 200})
    return inventory.InventoryConfig(ortho=ortho, out_dir=out, crown_model=crown, species_model=species,
                                     threads=1, **kw)


def run_groups(plan):
    return [inventory.infer_group(plan, g) for g in range(len(plan.groups))]


def match_discs(crowns, discs, transform=T):
    """tree rows matched to each disc by centroid (m); returns the list of matched row counts and areas."""
    counts, areas = [], []
    for r, c, rad, _ in discs:
        x, y = transform @ (c + 0.5, r + 0.5)
        d = np.hypot(crowns["x"] - x, crowns["y"] - y)
        hit = crowns[d < 0.5]
        counts.append(len(hit))
        areas.append((hit["crown_area_m2"].sum(), np.pi * rad ** 2 * GSD ** 2))
    return counts, areas


def test_onnx_model_errors_and_sha(tmp_path, models):
    model = OnnxModel(models[0], threads=1)
    assert model.meta.tile_size == 128 and model.meta.overlap_px == 56
    assert model.sha256 == hashlib.sha256(Path(models[0]).read_bytes()).hexdigest()
    with pytest.raises(InputError, match="not found"):
        OnnxModel(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01garbage" * 10)
    with pytest.raises(InputError, match="not a loadable ONNX model"):
        OnnxModel(junk)
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a loadable"):
        OnnxModel(text)
    import onnx

    bare = crown_model_proto()
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(InputError, match="metadata is missing"):
        OnnxModel(tmp_path / "bare.onnx")
    with pytest.raises(InputError, match="task"):
        OnnxModel(models[1], expected_task="crown_segmentation")


def test_end_to_end_every_crown_once_and_outputs(tmp_path, scene, models):
    ortho, discs = scene
    out = tmp_path / "out"
    summary = inventory.run_inventory(config(ortho, out, models))
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp*"))
    assert SUMMARY_KEYS <= set(summary)
    assert summary["n_trees"] == len(discs)
    assert summary["area_ha"] == pytest.approx(0.16)
    assert summary["co2e_t"] > 0 and summary["co2e_t_ci90"][0] < summary["co2e_t"] < summary["co2e_t_ci90"][1]
    assert set(summary["models"]) == {"crowns", "species"}
    crowns = gpd.read_file(out / "inventory.gpkg", layer="crowns")
    counts, areas = match_discs(crowns, discs)
    assert counts == [1] * len(discs)  # every crown, also those straddling tile cores, exactly once
    for got, want in areas:
        assert got == pytest.approx(want, rel=0.08)
    # species from the tiny model: red-dominant crowns are class 0, green ones class 1
    reds = [d for d in discs if d[3][0] > d[3][1]]
    assert (crowns["species"] == "Pinus palustris").sum() == len(reds)
    doc = json.loads((out / "crowns.geojson").read_text())
    assert "crs" not in doc and len(doc["features"]) == len(discs)
    lon, lat = doc["features"][0]["geometry"]["coordinates"][0][0]
    assert -82 < lon < -80 and 36 < lat < 37
    carbon_contract = {"wood_density", "wood_density_level", "dbh_model", "agb_model", "bgb_kg", "agb_kg_p5",
                       "agb_kg_p95"}
    for feature in doc["features"]:  # both contracts on every Feature (issues 2 and 5)
        props = feature["properties"]
        assert set(export.CROWN_PROPERTIES) | carbon_contract <= set(props)
        assert props["agb_kg_p5"] <= props["agb_kg"] <= props["agb_kg_p95"]
        assert props["agb_model"] == "chave2014_eq4" and 0.2 < props["wood_density"] < 1.2
    layers = {name for name, _ in pyogrio.list_layers(out / "inventory.gpkg")}
    assert {"crowns", "grid", "species", "summary", "layer_styles"} <= layers
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["n_trees"] == len(discs) and on_disk["crs"] == "EPSG:32617"


def test_fully_masked_tiles_are_skipped(tmp_path, write_geotiff, disc_scene, models):
    discs = scene_discs()
    alpha = np.zeros((400, 400), np.uint8)
    alpha[:, 300:] = 255  # only the right quarter is valid
    ortho = write_geotiff(tmp_path / "rgba.tif", disc_scene(400, discs), T, UTM, alpha=alpha)
    plan = inventory.validate(config(ortho, tmp_path / "out", models, batch_size=1))
    model = plan.crown_model()
    calls = model.calls
    paths = run_groups(plan)
    expected = [t for t in plan.tiles if t.window.col_off + t.window.width > 300]
    assert model.calls - calls == len(expected) < len(plan.tiles)
    stats = inventory.group_stats(plan)
    assert stats["n_skipped"] == len(plan.tiles) - len(expected)
    assert stats["valid_area_m2"] == pytest.approx(100 * 400 * GSD ** 2)
    crowns = inventory.collect_crowns(plan, paths)
    assert (crowns["x"] > 500000 + 29.0).all()
    plan.close()


def test_uint16_rgba_input(tmp_path, write_geotiff, disc_scene, models):
    discs = scene_discs()
    img = disc_scene(400, discs).astype(np.uint16) * 250  # 16-bit export with a global stretch
    ortho = write_geotiff(tmp_path / "u16.tif", img, T, UTM, alpha=np.full((400, 400), 65535, np.uint16))
    plan = inventory.validate(config(ortho, tmp_path / "out", models))
    crowns = inventory.collect_crowns(plan, run_groups(plan))
    counts, _ = match_discs(crowns, discs)
    assert counts == [1] * len(discs)
    plan.close()


def test_geographic_and_utm_give_the_same_areas(tmp_path, scene, write_geotiff, models):
    ortho, discs = scene
    import rasterio

    with rasterio.open(ortho) as src:
        img = src.read()
    dst_t, w, h = calculate_default_transform(UTM, "EPSG:4326", 400, 400, 500000, 3999960, 500040, 4000000)
    geo = np.zeros((3, h, w), np.uint8)
    reproject(img, geo, src_transform=T, src_crs=UTM, dst_transform=dst_t, dst_crs="EPSG:4326",
              resampling=Resampling.nearest)
    alpha = np.zeros((h, w), np.uint8)
    reproject(np.full((400, 400), 255, np.uint8), alpha, src_transform=T, src_crs=UTM, dst_transform=dst_t,
              dst_crs="EPSG:4326", resampling=Resampling.nearest)
    geo_path = write_geotiff(tmp_path / "geo.tif", geo, dst_t, "EPSG:4326", alpha=alpha)
    areas = {}
    for name, path in (("utm", ortho), ("geo", geo_path)):
        plan = inventory.validate(config(path, tmp_path / name, models))
        crowns = inventory.collect_crowns(plan, run_groups(plan))
        assert plan.crs_name == "EPSG:32617" and len(crowns) == len(discs)
        areas[name] = crowns["crown_area_m2"].sum()
        plan.close()
    print(f"crown area EPSG:4326 {areas['geo']:.2f} m2 vs UTM {areas['utm']:.2f} m2")
    assert areas["geo"] == pytest.approx(areas["utm"], rel=0.01)


def test_chm_heights_in_engine(tmp_path, scene, write_geotiff, models):
    ortho, discs = scene
    yy, xx = np.mgrid[:400, :400]
    chm = np.zeros((400, 400), np.float32)
    for k, (r, c, rad, _) in enumerate(discs):
        chm[(yy - r) ** 2 + (xx - c) ** 2 <= (rad + 3) ** 2] = 10.0 + k * 0.5
    dst_t, w, h = calculate_default_transform(UTM, "EPSG:32616", 400, 400, 500000, 3999960, 500040, 4000000,
                                              resolution=0.25)
    other = np.full((1, h, w), -9999, np.float32)
    reproject(chm, other[0], src_transform=T, src_crs=UTM, dst_transform=dst_t, dst_crs="EPSG:32616",
              resampling=Resampling.average, dst_nodata=-9999)
    chm_path = write_geotiff(tmp_path / "chm.tif", other, dst_t, "EPSG:32616", nodata=-9999)
    plan = inventory.validate(config(ortho, tmp_path / "out", models, chm=chm_path))
    crowns = inventory.collect_crowns(plan, run_groups(plan))
    trees = inventory.add_attributes(plan, crowns).table  # polygons went to disk; the table has the rest
    plan.close()
    assert (trees["height_source"] == "chm").all()
    for k, (r, c, _, _) in enumerate(discs):
        x, y = T @ (c + 0.5, r + 0.5)
        row = trees.iloc[int(np.argmin(np.hypot(trees["x"] - x, trees["y"] - y)))]
        assert row["height_m"] == pytest.approx(10.0 + k * 0.5, abs=0.3)


def test_failing_run_leaves_no_partial_outputs(tmp_path, scene, models, monkeypatch):
    from pipeline import export

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_gpkg", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        inventory.run_inventory(config(scene[0], out, models))
    assert [p.name for p in out.iterdir() if p.name != ".work"] == []
    assert not (out / ".work" / "stage").exists()


def test_resume_reuses_finished_groups(tmp_path, scene, models):
    cfg = config(scene[0], tmp_path / "out", models, tiles_per_group=10)
    plan = inventory.validate(cfg)
    first = inventory.infer_group(plan, 0)
    mtime = first.stat().st_mtime_ns
    plan.close()
    plan2 = inventory.validate(cfg)  # same inputs: same fingerprint, the group file is kept
    calls = plan2.crown_model().calls
    assert inventory.infer_group(plan2, 0) == first and first.stat().st_mtime_ns == mtime
    assert plan2.crown_model().calls == calls
    plan2.close()
    changed = config(scene[0], tmp_path / "out", models, tiles_per_group=10, postprocess={"min_area_m2": 3.0})
    inventory.validate(changed).close()  # other parameters: stale groups are discarded
    assert not first.exists()


def test_resume_fingerprint_holds_the_code(tmp_path, scene, models, monkeypatch):
    # issue 17, item 8: a code change (another source hash) discards the finished groups
    cfg = config(scene[0], tmp_path / "out", models, tiles_per_group=10)
    plan = inventory.validate(cfg)
    first = inventory.infer_group(plan, 0)
    plan.close()
    assert len(inventory.source_sha256()) == 64
    assert inventory.source_sha256() == inventory.source_sha256()  # memoised, stable
    monkeypatch.setattr(inventory, "source_sha256", lambda roots=None: "0" * 64)
    inventory.validate(cfg).close()
    assert not first.exists()


def test_cli_run_and_bad_input(tmp_path, scene, models):
    from forest_inventory.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["run", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o"),
                              "--crown-model", str(models[0])])
    assert res.exit_code == 2
    assert "error:" in res.output and "Traceback" not in res.output
    args = ["run", str(scene[0]), "--out", str(tmp_path / "o"), "--crown-model", str(models[0]),
            "--species-model", str(models[1]), "--threads", "1"]
    res = runner.invoke(app, args + ["--bands", "1,2"])
    assert res.exit_code == 2 and "--bands" in res.output
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "CO2e" in res.output and f"{len(scene[1])}" in res.output
    assert (tmp_path / "o" / "summary.json").is_file()


def test_engine_runs_without_torch(tmp_path, scene, models):
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "segmentation_models_pytorch", "onnx"):
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, NoTorch())
        from pipeline.inventory import InventoryConfig, run_inventory
        s = run_inventory(InventoryConfig(ortho={str(scene[0])!r}, out_dir={str(tmp_path / 'nt')!r},
                                          crown_model={str(models[0])!r}, species_model={str(models[1])!r},
                                          threads=1, carbon={{"n_draws": 50}}))
        assert "torch" not in sys.modules and "onnx" not in sys.modules
        print("trees", s["n_trees"])
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"trees {len(scene[1])}" in res.stdout


def test_plots_get_their_own_totals(tmp_path, scene, models):
    from shapely.geometry import box

    cells = [box(500000, 3999980, 500020, 4000000), box(600000, 0, 600010, 10)]
    plots = gpd.GeoDataFrame({"name": ["north-west", "elsewhere"]}, geometry=cells, crs=UTM)
    plots.to_file(tmp_path / "plots.gpkg", driver="GPKG")
    out = tmp_path / "out"
    inventory.run_inventory(config(scene[0], out, models, plots=tmp_path / "plots.gpkg"))
    table = gpd.read_file(out / "inventory.gpkg", layer="plots")
    crowns = gpd.read_file(out / "inventory.gpkg", layer="crowns")
    inside = ((crowns["x"] < 500020) & (crowns["y"] > 3999980)).sum()
    assert table.loc[table["name"] == "north-west", "n_trees"].item() == inside > 0
    assert table.loc[table["name"] == "elsewhere", "n_trees"].item() == 0


def test_totals_reconcile_across_outputs_to_the_kilogram(tmp_path, scene, models):
    # issue 17, item 6: one convention everywhere (totals and tables are sums of the per-tree point
    # estimates; the Monte Carlo only gives SDs and intervals), so every output file adds up to the kilogram
    import pandas as pd

    out = tmp_path / "out"
    summary = inventory.run_inventory(config(scene[0], out, models))
    on_disk = json.loads((out / "summary.json").read_text())
    csv = pd.read_csv(out / "crowns.csv")
    gpkg = pyogrio.read_dataframe(out / "inventory.gpkg", layer="crowns")
    grid = pyogrio.read_dataframe(out / "inventory.gpkg", layer="grid")
    species = pyogrio.read_dataframe(out / "inventory.gpkg", layer="species")
    layer = pyogrio.read_dataframe(out / "inventory.gpkg", layer="summary").iloc[0]  # one row, typed
    doc = json.loads((out / "crowns.geojson").read_text())
    geo = pd.DataFrame([f["properties"] for f in doc["features"]])
    for key, col in (("agb_t", "agb_kg"), ("carbon_t", "carbon_kg"), ("co2e_t", "co2e_kg")):
        total_kg = on_disk[key] * 1000.0
        assert total_kg > 0
        assert summary[key] == on_disk[key] == pytest.approx(float(layer[key]), abs=1e-6)
        for frame in (csv, gpkg, geo):
            assert frame[col].sum() == pytest.approx(total_kg, abs=1.0), (key, col)
        assert grid[key].sum() * 1000.0 == pytest.approx(total_kg, abs=1.0), key
        assert species[key].sum() * 1000.0 == pytest.approx(total_kg, abs=1.0), key
    # per tree: carbon = CF (AGB + BGB), CO2e = carbon 44/12
    np.testing.assert_allclose(gpkg["carbon_kg"], gpkg["carbon_fraction"] * (gpkg["agb_kg"] + gpkg["bgb_kg"]),
                               rtol=1e-9)
    np.testing.assert_allclose(gpkg["co2e_kg"], gpkg["carbon_kg"] * 44 / 12, rtol=1e-9)
    lo, hi = on_disk["co2e_t_ci90"]
    assert lo < on_disk["co2e_t"] < hi


def test_detection_calibration_from_the_crown_model_and_warnings(tmp_path, scene, models):
    # issue 17, item 5: the crown model's `detection_calibration` metadata (ARCHITECTURE.md) enters the
    # total's interval and the deductions; without it the summary says loudly that it is not included
    cal = {"schema": 1, "quantity": "agb", "ratio_mean": 1.5, "ln_sd": 0.2, "n_plots": 6}
    crown = write_crown_model(tmp_path / "crowns_cal.onnx", tile_size=128, overlap_px=56,
                              brightness_threshold=0.36, metadata={"detection_calibration": json.dumps(cal)})
    with_cal = inventory.run_inventory(config(scene[0], tmp_path / "a", (crown, models[1])))
    plain = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert plain["detection_error"]["included"] and plain["detection_error"]["ratio_mean"] == 1.5
    adj = with_cal["total_with_detection"]
    assert adj["co2e_t"] == pytest.approx(1.5 * with_cal["co2e_t"])
    assert adj["co2e_t_ci90_low"] < adj["co2e_t"] < adj["co2e_t_ci90_high"]
    assert "detection factor 1.5" in (tmp_path / "a" / "report.html").read_text()
    without = inventory.run_inventory(config(scene[0], tmp_path / "b", models))
    assert not without["detection_error"]["included"]
    assert any("DETECTION ERROR NOT INCLUDED" in w for w in without["warnings"])
    assert any("HEIGHTS ARE ALLOMETRIC" in w for w in without["warnings"])  # no CHM in this scene
    bad = write_crown_model(tmp_path / "crowns_bad.onnx", tile_size=128, overlap_px=56,
                            metadata={"detection_calibration": '{"ratio_mean": -1}'})
    with pytest.raises(InputError, match="crowns_bad.onnx"):
        inventory.validate(config(scene[0], tmp_path / "c", (bad, models[1])))


def test_cli_sets_the_site_height_diameter_relation(tmp_path, scene, models):
    from forest_inventory.cli import app
    from pipeline.options import check_options

    assert check_options({"hd_environmental_stress_e": 0.3}) == {"hd_environmental_stress_e": 0.3}
    assert check_options({"hd_local": "0.9,0.7,0,0.2"})["hd_local"] == {"a": 0.9, "b": 0.7, "c": 0.0,
                                                                         "rse": 0.2}
    runner = CliRunner()
    args = ["run", str(scene[0]), "--crown-model", str(models[0]), "--species-model", str(models[1]),
            "--threads", "1"]
    res = runner.invoke(app, args + ["--out", str(tmp_path / "x"), "--hd-local", "1,2"])
    assert res.exit_code == 2 and "--hd-local" in res.output
    res = runner.invoke(app, args + ["--out", str(tmp_path / "e"), "--hd-e", "0.4"])
    assert res.exit_code == 0, res.output
    assert "HEIGHTS ARE ALLOMETRIC" in res.output  # loud on the CLI, in the table and below it
    assert "ALLOMETRIC (no CHM/DSM)" in res.output
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["carbon"]["carbon_config"]["hd_environmental_stress_e"] == 0.4
    assert "E = 0.4" in summary["carbon"]["factors"]["height_diameter_source"]


def test_dsm_alone_heights_in_engine(tmp_path, scene, write_geotiff, models):
    # issue 17: --dsm without --dtm: the ground comes from the DSM's gaps (5 % slope here)
    ortho, discs = scene
    yy, xx = np.mgrid[:400, :400]
    dsm = (200.0 + 0.05 * xx * GSD).astype(np.float32)
    for k, (r, c, rad, _) in enumerate(discs):
        dsm[(yy - r) ** 2 + (xx - c) ** 2 <= (rad + 3) ** 2] += 10.0 + k * 0.5
    path = write_geotiff(tmp_path / "dsm.tif", dsm[None], T, UTM)
    plan = inventory.validate(config(ortho, tmp_path / "out", models, dsm=path))
    crowns = inventory.collect_crowns(plan, run_groups(plan))
    trees = inventory.add_attributes(plan, crowns).table
    plan.close()
    assert (trees["height_source"] == "dsm-ground").all()
    for k, (r, c, _, _) in enumerate(discs):
        x, y = T @ (c + 0.5, r + 0.5)
        row = trees.iloc[int(np.argmin(np.hypot(trees["x"] - x, trees["y"] - y)))]
        assert row["height_m"] == pytest.approx(10.0 + k * 0.5, abs=0.4)
    with pytest.raises(InputError, match="--dsm"):
        inventory.validate(config(ortho, tmp_path / "o2", models, dtm=path))


def test_fine_input_keeps_its_grid_for_mask_and_quicklook(tmp_path, write_geotiff, disc_scene, models):
    """Issue 18: a 0.05 m input with a 0.10 m model is segmented on the model's grid, but crown_mask.tif and
    quicklook.png are on the input's own grid, and the summary says both GSDs and that it resampled."""
    import rasterio

    from forest_inventory.cli import app

    fine = Affine(0.05, 0, 500000.0, 0, -0.05, 4000000.0)
    discs = [(2 * r, 2 * c, 2 * rad, colour) for r, c, rad, colour in scene_discs()[:4]]  # same crowns in m
    path = write_geotiff(tmp_path / "fine.tif", disc_scene(600, discs), fine, UTM)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--crown-model", str(models[0]),
                                   "--species-model", str(models[1]), "--threads", "1"],
                               env={"COLUMNS": "220"})  # rich wraps table cells to the terminal width
    assert res.exit_code == 0, res.output
    assert "input 0.050 m, crown model 0.100 m: segmented on a 0.100 m grid (resampled" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_gsd_m"] == pytest.approx(0.05) and summary["model_gsd_m"] == pytest.approx(0.1)
    assert summary["gsd_m"] == pytest.approx(0.1) and summary["resampled_or_reprojected"] is True
    assert summary["crown_mask_grid"] == "input"
    with rasterio.open(out / "crown_mask.tif") as mask, rasterio.open(path) as src:
        assert (mask.width, mask.height) == (src.width, src.height) and mask.transform == src.transform
        labels = mask.read(1)
    crowns = gpd.read_file(out / "inventory.gpkg", layer="crowns")
    for tid, x, y in zip(crowns["tree_id"], crowns["x"], crowns["y"], strict=True):
        col, row = ~fine @ (x, y)
        assert labels[int(row), int(col)] == tid
    with rasterio.open(out / "quicklook.png") as ql:  # the input's 0.05 m pixels, not the model's 0.10 m
        assert ql.width == 600 and ql.transform.a == pytest.approx(0.05) and ql.crs.to_epsg() == 32617
    layer = pyogrio.read_dataframe(out / "inventory.gpkg", layer="summary")
    assert len(layer) == 1 and layer["input_gsd_m"].item() == pytest.approx(0.05)
    assert layer["n_trees"].item() == len(crowns) and str(layer["n_trees"].dtype).startswith("int")
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2>Models and their accuracy</h2>" in report and "data:image/jpeg;base64," in report
    assert "carries no validation F1" in report  # the test model has no scores: said, not hidden
