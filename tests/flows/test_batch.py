"""Batch mode: every orthomosaic of a folder as a subflow, finished ones skipped, a summary table; and the
`forest-inventory batch` command."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.batch import batch_flow
from tests.flows.conftest import SAMPLE_ORTHO

pytestmark = pytest.mark.prefect


def test_batch_runs_each_orthomosaic_once_and_reports_failures(prefect_api, tmp_path, flow_options):
    folder, out = tmp_path / "flights", tmp_path / "out"
    folder.mkdir()
    shutil.copy(SAMPLE_ORTHO, folder / "a.tif")
    shutil.copy(SAMPLE_ORTHO, folder / "b.tif")
    (folder / "c.tif").write_text("not a raster")

    rows = batch_flow(folder=str(folder), out=str(out), options=flow_options)
    status = {r["name"]: r["status"] for r in rows}
    assert status == {"a": "done", "b": "done", "c": "failed"}
    by_name = {r["name"]: r for r in rows}
    assert by_name["a"]["n_trees"] == by_name["b"]["n_trees"] > 0  # same pixels, same inventory
    assert "c.tif" in by_name["c"]["message"]
    assert (out / "a" / "summary.json").is_file() and (out / "b" / "crowns.geojson").is_file()
    mtime = (out / "a" / "summary.json").stat().st_mtime_ns

    again = batch_flow(folder=str(folder), out=str(out), options=flow_options)
    assert {r["name"]: r["status"] for r in again} == {"a": "skipped", "b": "skipped", "c": "failed"}
    assert {r["name"]: r["n_trees"] for r in again if r["status"] == "skipped"} == \
        {"a": by_name["a"]["n_trees"], "b": by_name["b"]["n_trees"]}
    assert (out / "a" / "summary.json").stat().st_mtime_ns == mtime
    with open(out / "batch_summary.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["name"], r["status"]) for r in table] == [("a", "skipped"), ("b", "skipped"), ("c", "failed")]


def test_batch_command(prefect_api, tmp_path, tiny_models):
    crown, species = tiny_models
    folder, out = tmp_path / "flights", tmp_path / "out"
    folder.mkdir()
    shutil.copy(SAMPLE_ORTHO, folder / "site1.tif")
    env = dict(os.environ, PREFECT_API_URL=prefect_api)  # the session's test server: nothing to start
    env.pop("PREFECT_HOME", None)  # as for a user who has not chosen one
    cli = Path(sys.executable).parent / "forest-inventory"
    done = subprocess.run([str(cli), "batch", str(folder), "--out", str(out), "--crown-model", str(crown),
                           "--species-model", str(species)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "site1" in done.stdout and "done" in done.stdout
    assert (out / "site1" / "summary.json").is_file()
    assert (out / "batch_summary.csv").is_file()
    assert (out / ".prefect").is_dir()  # Prefect state kept with the project, not in ~/.prefect

    bad = subprocess.run([str(cli), "batch", str(tmp_path / "nowhere"), "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nowhere" in bad.stderr


def _multiband_flight(scene_dir: Path, seed: int, path: Path) -> Path:
    """A generated scene written as a 5-band (blue, green, red, red edge, NIR) GeoTIFF without a CRS: what
    a multispectral camera's stitching may give; it needs --bands 3,2,1 and --crs."""
    import numpy as np
    import rasterio

    from pipeline.synthetic import generate_scene
    from tests.conftest import _write_geotiff

    files = generate_scene(scene_dir, size_m=40, seed=seed)
    with rasterio.open(files.ortho) as src:
        rgb, transform = src.read(), src.transform
    nir = (255 - rgb[1] // 2).astype(np.uint8)
    return _write_geotiff(path, np.stack([rgb[2], rgb[1], rgb[0], rgb[1] // 2 + rgb[0] // 2, nir]), transform,
                          crs=None)


def test_batch_three_flights_one_corrupt(prefect_api, tmp_path, tiny_models):
    """Issue 18 acceptance: two multiband CRS-less flights and a corrupt file through `forest-inventory
    batch` with run options: two inventories, one error line about the third, exit code 3, batch_summary.csv
    with the 90 % interval columns filled, rounded numbers on the console, the traceback in the log file."""
    crown, species = tiny_models
    folder, out, log_file = tmp_path / "flights", tmp_path / "out", tmp_path / "batch.log"
    folder.mkdir()
    _multiband_flight(tmp_path / "scene1", 1, folder / "a.tif")
    _multiband_flight(tmp_path / "scene2", 2, folder / "b.tif")
    (folder / "c.tif").write_bytes((folder / "a.tif").read_bytes()[:3000])  # a truncated copy
    env = dict(os.environ, PREFECT_API_URL=prefect_api, COLUMNS="150")
    env.pop("PREFECT_HOME", None)
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "forest_inventory.cli", "batch", str(folder),
                           "--out", str(out), "--crown-model", str(crown), "--species-model", str(species),
                           "--bands", "3,2,1",
                           "--crs", "EPSG:32617", "--threads", "1", "--seed", "4", "--n-draws", "60",
                           "--log-file", str(log_file)],
                          env=env, cwd=repo, capture_output=True, text=True, timeout=600)
    console = done.stdout + done.stderr
    assert done.returncode == 3, console[-3000:]
    assert "Traceback" not in console
    about_c = [line for line in console.splitlines() if "c.tif" in line]
    assert len(about_c) == 1 and about_c[0].startswith("error: ") and "corrupt" in about_c[0], console[-3000:]
    assert not re.search(r"\d\.\d{4,}", done.stdout), done.stdout  # rounded numbers, not 6.206273614964034
    with open(out / "batch_summary.csv", newline="") as fh:
        table = {row["name"]: row for row in csv.DictReader(fh)}
    assert {k: r["status"] for k, r in table.items()} == {"a": "done", "b": "done", "c": "failed"}
    for name in ("a", "b"):
        row = table[name]
        low, mid, high = (float(row[k]) for k in ("co2e_t_ci90_low", "co2e_t", "co2e_t_ci90_high"))
        assert 0 < low < mid < high
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["co2e_t_ci90"] == [low, high]
        assert summary["bands"] == [3, 2, 1] and summary["seed"] == 4
        assert summary["carbon"]["carbon_config"]["n_draws"] == 60
    assert table["c"]["co2e_t_ci90_low"] == "" and "c.tif" in table["c"]["message"]
    assert "orthomosaics" in done.stderr and "3/3" in done.stderr  # the overall progress bar
    logged = log_file.read_text()
    assert "Traceback" in logged and "c.tif" in logged  # the traceback went to the log file only


def test_batch_reports_files_and_tiles_progress(prefect_api, tmp_path, flow_options):
    from flows.batch import run_batch
    from pipeline.synthetic import generate_scene

    folder = tmp_path / "flights"
    folder.mkdir()
    shutil.copy(generate_scene(tmp_path / "s", size_m=30, seed=2).ortho, folder / "one.tif")
    events: list[tuple[str, int, int]] = []
    rows = run_batch(folder, tmp_path / "out", options=dict(flow_options, threads=1, n_draws=20),
                     progress=lambda stage, done, total: events.append((stage, done, total)))
    assert [r["status"] for r in rows] == ["done"]
    files = [e for e in events if e[0] == "files"]
    assert files[0] == ("files", 0, 1) and files[-1] == ("files", 1, 1)
    tiles = [e for e in events if e[0] == "tiles"]
    summary = json.loads((tmp_path / "out" / "one" / "summary.json").read_text())
    assert tiles and sum(done for _, done, _ in tiles) == tiles[0][2] == summary["n_tiles"]
