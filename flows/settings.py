"""Prefect state and runtime settings for the flows: per-project home, offline-safe, bounded workers.

Call :func:`configure` before the first Prefect client call (the CLI does it before importing the flow
modules). Variables the user has already set in the environment always win: nothing here overrides a
choice the user made. Prefect's global settings are refreshed when Prefect is already imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _default_workers() -> int:
    """2 task threads on machines with 4+ cores, else 1.

    ONNX Runtime already spreads one tile batch over all cores; a second worker thread overlaps reading,
    watershed and polygonising with inference, which pays only when there are cores to spare (measured on a
    loaded 2-core machine: 2 workers made the inference stage slower than 1). Prefect's own default is
    unbounded (sys.maxsize).
    """
    from pipeline.options import available_cores

    return 2 if available_cores() >= 4 else 1


#: Thread workers of the default task runner (``--workers`` overrides).
DEFAULT_THREAD_WORKERS = _default_workers()

#: Seconds to wait for the ephemeral (embedded) API server; Prefect's default of 20 s is too short for a
#: first start (database migrations) on a slow field laptop.
EPHEMERAL_STARTUP_TIMEOUT_S = 90

TASK_RUNNERS = ("threads", "dask")

# values configure() wrote, so a later call may replace them while a user's own value always wins
_SET_BY_US: dict[str, str] = {}


def prefect_home_for(project_dir: str | os.PathLike | None) -> Path:
    """Prefect home folder of a project: ``$PREFECT_HOME`` if the user set it, else ``<project>/.prefect``.

    With no project folder the current working directory is the project.
    """
    user_home = os.environ.get("PREFECT_HOME")
    if user_home and _SET_BY_US.get("PREFECT_HOME") != user_home:
        return Path(user_home).expanduser()
    return _project_home(project_dir)


def _project_home(project_dir: str | os.PathLike | None) -> Path:
    base = Path(project_dir) if project_dir is not None else Path.cwd()
    return base.expanduser().resolve() / ".prefect"


def results_home() -> Path:
    """Root of the flows' task results: ``$FOREST_INVENTORY_RESULTS``, else
    ``$XDG_CACHE_HOME/forest-inventory/prefect-results`` (``~/.cache/...``). Not the Prefect home: batch and
    serve put that inside their output folder."""
    explicit = os.environ.get("FOREST_INVENTORY_RESULTS")
    if explicit:
        return Path(explicit).expanduser().resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return (cache / "forest-inventory" / "prefect-results").resolve()


def result_dir(kind: str, out: str | os.PathLike) -> Path:
    """Where a flow's task results (Prefect pickles them) live: under :func:`results_home`, never inside the
    output folder ``out`` (a tampered or shared output folder must hold nothing that runs code on load):
    ``<results_home>/<kind>/<sha256 of the resolved output path, 16 hex>``."""
    import hashlib

    out_path = Path(out).expanduser().resolve()
    home = results_home()
    folder = home / kind / hashlib.sha256(str(out_path).encode()).hexdigest()[:16]
    if folder == out_path or out_path in folder.parents:
        from pipeline.errors import InputError

        raise InputError(f"{out}: the output folder holds the flows' result store ({home}); pass another "
                         "output folder or set FOREST_INVENTORY_RESULTS elsewhere")
    return folder


def default_environment(project_dir: str | os.PathLike | None = None,
                        thread_workers: int = DEFAULT_THREAD_WORKERS,
                        log_to_api: bool = True) -> dict[str, str]:
    """The Prefect variables the flows want, before the user's own environment is applied."""
    return {
        "PREFECT_HOME": str(_project_home(project_dir)),
        # no telemetry: offline runs otherwise log an ERROR per start
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(EPHEMERAL_STARTUP_TIMEOUT_S),
        # bound any thread pool Prefect creates with its defaults
        "PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS": str(thread_workers),
        # a local server listens on loopback only
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        # logs become database rows: send them in few, large batches; library loggers stay local
        "PREFECT_LOGGING_TO_API_ENABLED": "true" if log_to_api else "false",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "5",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        # no hub downloads from anywhere in the process
        "HF_HUB_OFFLINE": "1",
    }


def configure(project_dir: str | os.PathLike | None = None, *,
              thread_workers: int = DEFAULT_THREAD_WORKERS,
              log_to_api: bool = True) -> dict[str, str]:
    """Apply :func:`default_environment` to ``os.environ`` where the user has not set a value.

    Returns the variables that are now in effect. Creates the Prefect home folder. Safe to call again
    (e.g. with another project folder): values this function set earlier are replaced, the user's are not.
    """
    wanted = default_environment(project_dir, thread_workers, log_to_api)
    applied: dict[str, str] = {}
    for key, value in wanted.items():
        current = os.environ.get(key)
        if current is None or _SET_BY_US.get(key) == current:
            os.environ[key] = value
            _SET_BY_US[key] = value
        applied[key] = os.environ[key]
    Path(applied["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    if "prefect.context" in sys.modules:  # Prefect read its settings at import: make it read them again
        import prefect.context

        prefect.context.refresh_global_settings_context()
    return applied


def make_task_runner(kind: str = "threads", *, workers: int = DEFAULT_THREAD_WORKERS,
                     dask_address: str | None = None) -> Any:
    """Task runner for ``--task-runner``: bounded threads, or Dask (a temporary LocalCluster, or the
    existing scheduler at ``dask_address``, e.g. ``tcp://10.0.0.5:8786``).

    Dask workers on other machines need this project installed and a reachable ``PREFECT_API_URL``
    (a real ``prefect server start``, not the ephemeral one).
    """
    from pipeline.errors import InputError

    if kind == "threads":
        if dask_address:
            raise InputError("--dask-address needs --task-runner dask: add it, or drop the address")
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=max(1, int(workers)))
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ModuleNotFoundError:
            raise InputError("--task-runner dask needs prefect-dask: install the dask extra "
                             "(pip install '.[dask]')") from None
        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": max(1, int(workers)), "threads_per_worker": 1,
                                              "processes": True, "host": "127.0.0.1",
                                              "dashboard_address": None})
    raise InputError(f"--task-runner {kind!r} is not known: use one of {', '.join(TASK_RUNNERS)}")


#: environment variables that choose the task runner of flows started by a served deployment (the runner
#: imports the flow module in a fresh process, so the choice travels in the environment)
TASK_RUNNER_ENV = "FOREST_INVENTORY_TASK_RUNNER"
DASK_ADDRESS_ENV = "FOREST_INVENTORY_DASK_ADDRESS"
WORKERS_ENV = "FOREST_INVENTORY_WORKERS"


def task_runner_from_env() -> Any:
    """The task runner named by ``FOREST_INVENTORY_TASK_RUNNER`` (default: bounded threads)."""
    return make_task_runner(os.environ.get(TASK_RUNNER_ENV, "threads"),
                            workers=int(os.environ.get(WORKERS_ENV, DEFAULT_THREAD_WORKERS)),
                            dask_address=os.environ.get(DASK_ADDRESS_ENV) or None)


@contextlib.contextmanager
def local_run() -> Iterator[None]:
    """Settings for a flow run started in this process (CLI, batch, tests): no run heartbeats.

    Heartbeats let a server mark crashed runs of a served deployment; a process that runs its own flow
    needs none, and Prefect's heartbeat thread otherwise adds about a second to the end of every flow run.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def temporary_server_notice() -> str | None:
    """The line a command prints first when it is about to start Prefect's temporary (ephemeral) server:
    what it costs and how to keep a server running instead; None when ``PREFECT_API_URL`` names one."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    return ("starting a temporary Prefect server (no PREFECT_API_URL): about 10-40 s before the first "
            "inventory on 2 cores, once per command; to skip it, keep one running with `prefect server start "
            "--host 127.0.0.1` and set PREFECT_API_URL=http://127.0.0.1:4200/api")


def share_api_with_workers() -> str:
    """Put the API URL this process uses into ``os.environ``, so that worker processes it spawns (a local
    Dask cluster) report to the same server instead of each starting an ephemeral server of its own.

    Without ``PREFECT_API_URL`` this starts the ephemeral server now (what the first flow run would do).
    Returns the URL.
    """
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the process-wide instance the client would start
        server.start(timeout=EPHEMERAL_STARTUP_TIMEOUT_S)
        url = server.api_url
    if os.environ.get("PREFECT_API_URL") != url:
        os.environ["PREFECT_API_URL"] = url
        import prefect.context

        prefect.context.refresh_global_settings_context()
    return url
