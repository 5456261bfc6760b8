"""Faults (issue 7): a run SIGKILLed at any moment resumes on rerun and ends with the same outputs as an
uninterrupted run; finished tile groups are reused, not recomputed; transient read errors are retried.

The scene (600 x 600 px, 625 small crowns, tiny 64 px crown model) has 169 tiles in 6 resumable groups of 32.
Runs are real ``forest-inventory run`` processes; the test polls the run's work folder to kill it at chosen
moments (after some groups, while the outputs are written) and at seeded random times.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from rasterio.errors import RasterioIOError
from rasterio.transform import from_origin

from tests.conftest import _disc_scene, _write_geotiff
from tests.tiny_models import write_crown_model

CLI = Path(sys.executable).with_name("forest-inventory")
SIZE = 600
BYTE_EQUAL = ("crowns.geojson", "crowns.csv", "crown_mask.tif", "quicklook.png", "quicklook.wld")
N_GROUPS = 6


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(5)
    centres = range(12, SIZE - 6, 24)
    discs = [(r, c, int(rng.integers(4, 8))) for r in centres for c in centres]
    ortho = _write_geotiff(root / "ortho.tif", _disc_scene(SIZE, discs),
                           from_origin(500000, 4000000, 0.1, 0.1), "EPSG:32617")
    model = write_crown_model(root / "crowns64.onnx", tile_size=64, overlap_px=16)
    return {"root": root, "ortho": ortho, "model": model}


def _cmd(scene: dict[str, Path], out: Path) -> list[str]:
    return [str(CLI), "run", str(scene["ortho"]), "--out", str(out), "--crown-model", str(scene["model"]),
            "--no-species", "--threads", "1", "--seed", "1"]


def _run(scene, out: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(_cmd(scene, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def _groups(out: Path) -> list[Path]:
    return sorted((out / ".work" / "groups").glob("group_*.gpkg"))


def _start_and_kill(scene, out: Path, ready, timeout_s: float = 120.0) -> bool:
    """Start a run, SIGKILL it as soon as ``ready()`` is true; False when the run finished first."""
    proc = subprocess.Popen(_cmd(scene, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _assert_same_outputs(ref: Path, out: Path) -> None:
    for name in BYTE_EQUAL:
        if (ref / name).exists():
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    if (ref / "report.html").exists():  # equal but for the time it was generated
        strip = [re.sub(r"generated: [^<·]*", "", (d / "report.html").read_text()) for d in (ref, out)]
        assert strip[0] == strip[1]
    left, right = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
    for summary in (left, right):
        summary.pop("elapsed_s")
    assert left == right
    for layer in ("crowns", "grid", "species"):
        a = pyogrio.read_dataframe(ref / "inventory.gpkg", layer=layer)
        b = pyogrio.read_dataframe(out / "inventory.gpkg", layer=layer)
        assert a.equals(b), layer
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == sorted(p.name for p in ref.iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def reference(scene) -> Path:
    out = scene["root"] / "reference"
    _run(scene, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_tiles"] == 169 and summary["n_trees"] >= 200
    return out


def test_killed_runs_resume_to_the_same_outputs(scene, reference):
    out = scene["root"] / "killed"
    # 0: killed as soon as the run has planned its work, before any group is finished
    assert _start_and_kill(scene, out, lambda: (out / ".work" / "plan.json").exists())
    assert [p.name for p in out.iterdir()] == [".work"]
    # 1: killed after two finished groups; nothing is visible in out/ yet
    assert _start_and_kill(scene, out, lambda: len(_groups(out)) >= 2)
    first = {p.name: p.stat().st_mtime_ns for p in _groups(out)}
    assert 2 <= len(first) < N_GROUPS
    assert [p.name for p in out.iterdir()] == [".work"]
    # 2: the rerun reuses those groups (never rewrites them) and is killed after one more
    assert _start_and_kill(scene, out, lambda: len(_groups(out)) > len(first))
    again = {p.name: p.stat().st_mtime_ns for p in _groups(out)}
    assert all(again[name] == mtime for name, mtime in first.items())
    # 3: killed while the outputs are being written (after every group is done)
    stage = out / ".work" / "stage"
    assert _start_and_kill(scene, out, stage.exists)
    assert len(_groups(out)) == N_GROUPS
    # 4: killed at a seeded random moment
    rng = np.random.default_rng(7)
    for delay in rng.uniform(0.3, 2.5, size=1):
        t0 = time.monotonic()
        _start_and_kill(scene, out, lambda d=delay, t0=t0: time.monotonic() - t0 > d)
    # the final rerun completes with the uninterrupted run's outputs
    _run(scene, out)
    _assert_same_outputs(reference, out)
    assert not (out / ".work" / "groups").exists() and not stage.exists()
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_changed_input_invalidates_finished_groups(scene, reference, tmp_path):
    """Resume is keyed by the inputs: groups of another orthomosaic version are never reused."""
    ortho = tmp_path / "ortho.tif"
    ortho.write_bytes(scene["ortho"].read_bytes())
    other = dict(scene, ortho=ortho)
    out = tmp_path / "out"
    assert _start_and_kill(other, out, lambda: len(_groups(out)) >= 2)
    img = _disc_scene(SIZE, [(300, 300, 7)])  # a different scene under the same file name
    _write_geotiff(ortho, img, from_origin(500000, 4000000, 0.1, 0.1), "EPSG:32617")
    os.utime(ortho, (time.time() + 5, time.time() + 5))
    _run(other, out)
    assert json.loads((out / "summary.json").read_text())["n_trees"] == 1


def test_transient_read_error_is_retried(scene, reference, tmp_path, monkeypatch):
    """A read that fails once (a network-drive hiccup) is retried; the run completes with the same crowns."""
    import rasterio.io
    from typer.testing import CliRunner

    import pipeline.raster
    from forest_inventory.cli import app

    monkeypatch.setattr(pipeline.raster, "READ_BACKOFF_S", 0.01)
    original = rasterio.io.DatasetReader.read
    calls = {"n": 0, "failed": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (5, 40):  # two tile reads, in different groups
            calls["failed"] += 1
            raise RasterioIOError("Read failed. (simulated transient I/O error)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", flaky)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, _cmd(scene, out)[1:])
    assert result.exit_code == 0, result.stderr
    assert calls["failed"] == 2
    assert (out / "crowns.geojson").read_bytes() == (reference / "crowns.geojson").read_bytes()


def test_persistent_read_error_is_one_line(scene, tmp_path, monkeypatch):
    import rasterio.io
    from typer.testing import CliRunner

    import pipeline.raster
    from forest_inventory.cli import app

    monkeypatch.setattr(pipeline.raster, "READ_BACKOFF_S", 0.01)
    original = rasterio.io.DatasetReader.read
    calls = {"n": 0}

    def broken(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 5:  # the disk went away after the run started
            raise RasterioIOError("Read failed. (simulated I/O error)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", broken)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, _cmd(scene, out)[1:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.stderr
    assert "ortho.tif" in errors[0] and "Traceback" not in result.stderr
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]
