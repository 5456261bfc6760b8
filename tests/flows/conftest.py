"""Fixtures of the flow tests: ONE Prefect test harness per session (this directory only), tiny models.

The harness starts a throw-away API server with a temporary database; flows run against it with no run
heartbeats (``flows.settings.local_run``). Tests that run a flow request ``prefect_api``; task logic is
tested through ``.fn`` without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLE_ORTHO = REPO / "sample_data" / "OSBS_029.tif"

#: keys of summary.json that describe the run (time, where) rather than the inventory
VOLATILE_KEYS = {"created", "created_utc", "elapsed_s", "runtime_s", "seconds", "timing", "timings",
                 "started", "finished", "out", "output_dir", "outputs", "files", "run_seconds", "wall_s",
                 "generated", "generated_utc", "timestamp"}


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A session-wide Prefect test harness; yields the API URL (subprocesses can use it too)."""
    saved = dict(os.environ)
    from flows.settings import configure, local_run

    # the flows' pickled task results (flows.settings.result_dir) go to a throw-away folder, not ~/.cache
    os.environ["FOREST_INVENTORY_RESULTS"] = str(tmp_path_factory.mktemp("flow-results"))

    configure(tmp_path_factory.mktemp("prefect-project"))
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120), local_run():
        yield get_current_settings().api.url
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(crown model, species model) paths: the tiny ONNX models of tests/tiny_models.py."""
    from tests.tiny_models import write_crown_model, write_species_model

    folder = tmp_path_factory.mktemp("models")
    return (write_crown_model(folder / "crowns-tiny.onnx"),
            write_species_model(folder / "species-tiny.onnx"))


@pytest.fixture(scope="session")
def flow_options(tiny_models):
    """Inventory options (JSON-able flow parameters) that use the tiny models."""
    crown, species = tiny_models
    return {"crown_model": str(crown), "species_model": str(species)}


def output_digest(out: Path) -> dict[str, str]:
    """sha256 of every output file (not the .work/ folder); summary.json compared without volatile keys."""
    digests = {}
    for path in sorted(Path(out).rglob("*")):
        rel = path.relative_to(out)
        if not path.is_file() or rel.parts[0] in {".work", ".prefect"}:
            continue
        if path.name == "summary.json":
            data = _strip(json.loads(path.read_text()))
            digests[str(rel)] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        elif path.suffix == ".geojson":
            # the FeatureCollection "name" is the temp file name of the atomic write (export.write_geojson
            # does not name the layer); compare the features
            data = json.loads(path.read_text())
            data.pop("name", None)
            digests[str(rel)] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        elif path.suffix == ".html":  # the report states when it was written
            text = re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d)?( ?UTC)?", "<time>", path.read_text())
            digests[str(rel)] = hashlib.sha256(text.encode()).hexdigest()
        elif path.suffix == ".gpkg":  # GeoPackages carry write times: compare their tables
            digests.update(_gpkg_digests(path, str(rel)))
        else:
            digests[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def _gpkg_digests(path: Path, rel: str) -> dict[str, str]:
    import pyogrio

    out = {}
    for layer, _ in pyogrio.list_layers(path):
        frame = pyogrio.read_dataframe(path, layer=layer)
        if layer == "summary":  # one row of typed columns: the run's time is not the inventory
            frame = frame.drop(columns=[c for c in frame.columns if c in VOLATILE_KEYS])
        frame = frame.drop(columns=[c for c in ("update_time",) if c in frame])
        if "geometry" in frame:
            frame = frame.assign(geometry=frame.geometry.to_wkb(hex=True))
        out[f"{rel}:{layer}"] = hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()
    return out


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value
