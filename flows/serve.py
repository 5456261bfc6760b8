"""Serve the inventory deployments against a real local Prefect server (``prefect server start``).

Deployments (served by this process; runs execute in child processes of it):
- ``inventory/<name>``: one orthomosaic (parameters ``ortho``, ``out``, ``chm``, ``options``); trigger it from
  the UI, ``prefect deployment run 'inventory/<name>' -p ortho=... -p out=...`` or the API.
- ``batch/<name>``: every new orthomosaic of the watched folder, on a cron schedule (``--cron``); needs the
  server's scheduler service (on by default in ``prefect server start``).
- ``--watch``: this process polls the folder and triggers ``inventory/<name>`` for each new orthomosaic once
  its size has stopped changing (a copy in progress is not picked up).

The ephemeral server cannot schedule (Prefect only warns), so serving refuses to start without a reachable
``PREFECT_API_URL``.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from pipeline.errors import InputError

SERVER_HINT = ("start one with `prefect server start --host 127.0.0.1 --port 4200` and set "
               "PREFECT_API_URL=http://127.0.0.1:4200/api")

log = logging.getLogger(__name__)


def require_server() -> str:
    """The API URL of a reachable Prefect server; InputError when none is configured or it is down."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise InputError(f"serve needs a running Prefect server (PREFECT_API_URL is not set): {SERVER_HINT}")
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        raise InputError(f"cannot reach the Prefect server at {url} ({type(problem).__name__}): "
                         f"{SERVER_HINT}")
    return url


class FolderWatcher:
    """Polls ``folder`` every ``interval_s`` and triggers the inventory deployment for each new orthomosaic.

    A file is new when its output folder is not done and it was not triggered by this watcher before; it is
    triggered once its size and mtime are unchanged between two polls.
    """

    def __init__(self, folder: str | Path, out: str | Path, deployment: str, interval_s: float = 30.0,
                 options: dict[str, Any] | None = None):
        self.folder, self.out = Path(folder), Path(out)
        self.deployment, self.interval_s, self.options = deployment, float(interval_s), options
        self.triggered: dict[str, str] = {}  # ortho path -> flow run id
        self._seen: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> list[str]:
        """One scan; returns the flow run ids it created."""
        from flows.batch import find_orthomosaics, is_done, ortho_options, output_folder

        ready = []
        for ortho in find_orthomosaics(self.folder):
            key = str(ortho.resolve())
            if key in self.triggered or is_done(output_folder(self.out, ortho)):
                continue
            st = ortho.stat()
            signature = (st.st_size, st.st_mtime_ns)
            if self._seen.get(key) == signature:
                ready.append(ortho)
            self._seen[key] = signature
        if not ready:
            return []
        from prefect.client.orchestration import get_client

        created = []
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(self.deployment)
            for ortho in ready:
                params = {"ortho": str(ortho), "out": str(output_folder(self.out, ortho)),
                          "chm": None, "options": ortho_options(ortho, self.options)}
                run = client.create_flow_run_from_deployment(deployment.id, parameters=params,
                                                             tags=["watch"])
                self.triggered[str(ortho.resolve())] = str(run.id)
                created.append(str(run.id))
                log.info("new orthomosaic %s: flow run %s", ortho.name, run.id)
        return created

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - keep watching; the server may be restarting
                log.exception("watching %s failed; retrying in %.0f s", self.folder, self.interval_s)

    def start(self) -> None:
        self.poll_once()
        self._thread = threading.Thread(target=self._loop, name="folder-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def build_deployments(out: str | Path, name: str = "forest-inventory", folder: str | Path | None = None,
                      cron: str | None = None, options: dict[str, Any] | None = None) -> list[Any]:
    """The RunnerDeployments to serve: ``inventory/<name>`` always, ``batch/<name>`` with ``folder``.

    The batch deployment carries the cron schedule; ``cron`` without ``folder`` is a usage error.
    """
    from prefect.deployments.runner import EntrypointType

    from flows.batch import batch_flow
    from flows.inventory import inventory_flow

    if cron and folder is None:
        raise InputError("--cron needs --folder FOLDER: the schedule runs a batch over that folder")
    deployments = [inventory_flow.to_deployment(
        name=name, entrypoint_type=EntrypointType.MODULE_PATH, tags=["forest-inventory"],
        description="One orthomosaic to a forest-carbon inventory (parameters ortho, out, chm, options).")]
    if folder is not None:
        deployments.append(batch_flow.to_deployment(
            name=name, cron=cron, entrypoint_type=EntrypointType.MODULE_PATH, tags=["forest-inventory"],
            parameters={"folder": str(Path(folder).resolve()), "out": str(Path(out).resolve()),
                        "options": options},
            description="Every new orthomosaic of the watched folder (those already done are skipped)."))
    return deployments


def serve(out: str | Path, folder: str | Path | None = None, cron: str | None = None, watch: bool = False,
          watch_interval_s: float = 30.0, name: str = "forest-inventory",
          options: dict[str, Any] | None = None, task_runner: str = "threads", workers: int | None = None,
          dask_address: str | None = None,
          limit: int | None = None) -> None:
    """Serve the deployments until interrupted (Ctrl-C). See the module docstring."""
    from flows.settings import (
        DASK_ADDRESS_ENV,
        DEFAULT_THREAD_WORKERS,
        TASK_RUNNER_ENV,
        WORKERS_ENV,
        make_task_runner,
    )

    workers = workers or DEFAULT_THREAD_WORKERS

    if watch and folder is None:
        raise InputError("--watch needs --folder FOLDER: name the folder to watch")
    make_task_runner(task_runner, workers=workers, dask_address=dask_address)  # fail early on bad choices
    # flow runs start in child processes that import the flow modules again: the runner choice travels in
    # the environment
    os.environ[TASK_RUNNER_ENV] = task_runner
    os.environ[WORKERS_ENV] = str(workers)
    if dask_address:
        os.environ[DASK_ADDRESS_ENV] = dask_address
    require_server()
    from prefect import serve as prefect_serve

    deployments = build_deployments(out, name=name, folder=folder, cron=cron, options=options)
    watcher = None
    if watch:
        watcher = FolderWatcher(folder, out, deployment=f"inventory/{name}", interval_s=watch_interval_s,
                                options=options)
        # the deployment must exist before the first trigger: register now, serve() updates it
        for deployment in deployments:
            deployment.apply()
        watcher.start()
    try:
        prefect_serve(*deployments, limit=limit, print_starting_message=True)
    finally:
        if watcher is not None:
            watcher.stop()
