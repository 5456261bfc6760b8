"""Batch mode: every orthomosaic of a folder as a subflow, finished ones skipped, a summary table; and the
`forest-inventory batch` command."""

from __future__ import annotations

import csv
import os
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
