"""The served deployment on a REAL local Prefect server (`prefect server start`, SQLite, 127.0.0.1).

Starts the server on a free loopback port with a temporary PREFECT_HOME, runs `forest-inventory serve
--watch --cron` in a subprocess, triggers an inventory run through the API, lets the folder watcher pick up
the flight in the watched folder, checks both outputs, shuts everything down. Waits are bounded and poll;
this test does not use the session harness.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flows.conftest import SAMPLE_ORTHO

pytestmark = pytest.mark.prefect

SERVER_START_S = 120
RUN_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, procs=()):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc, log in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: a process exited early ({proc.returncode}):\n"
                                     + Path(log).read_text()[-3000:])
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _stop(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def test_served_deployment_runs_on_a_real_local_server(tmp_path, tiny_models):
    crown, species = tiny_models
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
               PREFECT_RUNNER_POLL_FREQUENCY="1", HF_HUB_OFFLINE="1")
    bindir = Path(sys.executable).parent
    folder, elsewhere, out = tmp_path / "flights", tmp_path / "elsewhere", tmp_path / "out"
    folder.mkdir()
    elsewhere.mkdir()
    shutil.copy(SAMPLE_ORTHO, folder / "flight1.tif")  # picked up by the watcher
    shutil.copy(SAMPLE_ORTHO, elsewhere / "flight2.tif")  # triggered through the API

    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = subprocess.Popen([str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                               str(port), "--no-services"], env=env, stdout=open(server_log, "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        import httpx

        def healthy():
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        t0 = time.monotonic()
        _wait(healthy, SERVER_START_S, "the Prefect server", [(server, server_log)])
        print(f"server up in {time.monotonic() - t0:.1f} s")
        serve = subprocess.Popen(
            [str(bindir / "forest-inventory"), "serve", "--out", str(out), "--folder", str(folder),
             "--cron", "0 2 * * *", "--watch", "--watch-interval", "1", "--crown-model", str(crown),
             "--species-model", str(species)],
            env=env, stdout=open(serve_log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
            cwd=tmp_path)

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            def deployment(name):
                try:
                    return client.read_deployment_by_name(name)
                except Exception:  # noqa: BLE001 - not registered yet
                    return None

            inventory = _wait(lambda: deployment("inventory/forest-inventory"), RUN_S,
                              "the served deployment", [(serve, serve_log), (server, server_log)])
            batch = _wait(lambda: deployment("batch/forest-inventory"), RUN_S, "the batch deployment",
                          [(serve, serve_log)])
            assert [s.schedule.cron for s in batch.schedules] == ["0 2 * * *"]

            target = out / "flight2"
            options = {"crown_model": str(crown), "species_model": str(species)}
            run = client.create_flow_run_from_deployment(
                inventory.id, parameters={"ortho": str(elsewhere / "flight2.tif"), "out": str(target),
                                          "options": options})

            def finished():
                state = client.read_flow_run(run.id).state
                return state if state is not None and state.is_final() else None

            state = _wait(finished, RUN_S, "the triggered flow run", [(serve, serve_log)])
            assert state.is_completed(), state.message + "\n" + serve_log.read_text()[-3000:]
            print(f"triggered run completed {time.monotonic() - t0:.1f} s after the server start")
            watched = out / "flight1" / "summary.json"
            _wait(watched.is_file, RUN_S, "the watcher's run of flight1", [(serve, serve_log)])
            watch_runs = [r for r in client.read_flow_runs() if "watch" in r.tags]
            assert len(watch_runs) == 1, "the watcher creates one run per new flight, through the API"

        summary = json.loads((target / "summary.json").read_text())
        assert summary["n_trees"] > 0
        assert json.loads(watched.read_text())["n_trees"] == summary["n_trees"]  # same pixels
        assert (target / "crowns.geojson").is_file()
        geo = json.loads((target / "crowns.geojson").read_text())
        assert geo["type"] == "FeatureCollection"
    finally:
        if serve is not None:
            _stop(serve, signal.SIGINT)
        _stop(server, signal.SIGTERM)
    assert server.poll() is not None and (serve is None or serve.poll() is not None)
