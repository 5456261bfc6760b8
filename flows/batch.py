"""Every orthomosaic in a folder, each as an inventory subflow, skipping those already done (field laptop).

Works on Prefect's embedded ephemeral server: nothing to start. Output layout: ``<out>/<stem>/`` per
orthomosaic (the same files as ``forest-inventory run``) and ``<out>/batch_summary.csv``.
A CHM, DSM or DTM next to an orthomosaic named ``<stem>_chm.tif``, ``<stem>_dsm.tif``, ``<stem>_dtm.tif`` is
used for its heights (it wins over a site-wide one in ``options``). A failing orthomosaic is one row with
status ``failed`` and a one-line message; its traceback goes to the log (``flows.batch`` logger) only.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import flow

from flows.inventory import inventory_flow, outputs_present, report_progress, set_progress
from flows.settings import DEFAULT_THREAD_WORKERS, make_task_runner, share_api_with_workers
from pipeline.atomic import atomic_path
from pipeline.errors import InputError

log = logging.getLogger(__name__)

ORTHO_SUFFIXES = (".tif", ".tiff", ".vrt")
#: rasters that accompany an orthomosaic and are not orthomosaics themselves
AUXILIARY_SUFFIXES = ("_chm", "_dsm", "_dtm", "_mask")

SUMMARY_COLUMNS = ("name", "status", "n_trees", "co2e_t", "co2e_t_ci90_low", "co2e_t_ci90_high",
                   "seconds", "out", "message")


def find_orthomosaics(folder: str | Path) -> list[Path]:
    """The orthomosaics in ``folder`` (not recursive), sorted by name; CHM/DSM/DTM side files excluded."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder; pass the folder that holds the orthomosaics")
    found = []
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in ORTHO_SUFFIXES:
            continue
        if path.stem.lower().endswith(AUXILIARY_SUFFIXES):
            continue
        found.append(path)
    return found


def chm_for(ortho: Path) -> Path | None:
    """``<stem>_chm.tif`` (or .tiff) next to the orthomosaic, if present."""
    return side_files(ortho).get("chm")


def side_files(ortho: Path) -> dict[str, Path]:
    """The height rasters found next to an orthomosaic: ``{"chm"|"dsm"|"dtm": <stem>_<kind>.tif(f)}``."""
    found = {}
    for kind in ("chm", "dsm", "dtm"):
        for suffix in (".tif", ".tiff"):
            candidate = ortho.with_name(f"{ortho.stem}_{kind}{suffix}")
            if candidate.is_file():
                found[kind] = candidate
                break
    return found


def ortho_options(ortho: Path, options: dict | None) -> dict:
    """The run options of one orthomosaic in a folder: ``options`` with its side files (``side_files``) as
    its height rasters (paths as strings: flow parameters)."""
    return {**(options or {}), **{k: str(v) for k, v in side_files(ortho).items()}}


def output_folder(out: str | Path, ortho: Path) -> Path:
    """``<out>/<stem>``: where one orthomosaic's inventory goes."""
    return Path(out) / ortho.stem


def is_done(out_dir: str | Path) -> bool:
    """An inventory is done when its summary and the files it lists are all there."""
    return outputs_present(out_dir)


def _summary_row(name: str, status: str, out_dir: Path, seconds: float, summary: dict[str, Any] | None,
                 message: str = "") -> dict[str, Any]:
    """One row of batch_summary.csv from an inventory's summary (summary.json keys: ``co2e_t_ci90`` is
    [low, high])."""
    summary = summary or {}
    ci = summary.get("co2e_t_ci90") or [None, None]
    row = {"name": name, "status": status, "out": str(out_dir), "seconds": round(seconds, 2),
           "message": message, "n_trees": summary.get("n_trees"), "co2e_t": summary.get("co2e_t"),
           "co2e_t_ci90_low": ci[0], "co2e_t_ci90_high": ci[1]}
    return row


def _read_summary(out_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_batch_summary(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """``batch_summary.csv``: one row per orthomosaic (written atomically)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS})
    return path


@flow(name="batch", validate_parameters=True)
def batch_flow(folder: str, out: str, options: dict[str, Any] | None = None, force: bool = False,
               task_runner: str = "threads", workers: int = DEFAULT_THREAD_WORKERS,
               dask_address: str | None = None) -> list[dict[str, Any]]:
    """Inventory every orthomosaic in ``folder`` into ``out/<stem>/``; returns the summary rows.

    Orthomosaics whose outputs are complete are skipped unless ``force``. A failing orthomosaic is recorded
    in the summary (status ``failed`` and its one-line message) and the batch goes on.
    ``task_runner``/``workers``/``dask_address``: as ``forest-inventory batch --task-runner``.
    """
    orthos = find_orthomosaics(folder)
    if not orthos:
        raise InputError(f"{folder}: no orthomosaics (*.tif, *.tiff, *.vrt) found; pass the folder that "
                         "holds them")
    runner = make_task_runner(task_runner, workers=workers, dask_address=dask_address)
    subflow = inventory_flow.with_options(task_runner=runner)
    rows = []
    for index, ortho in enumerate(orthos):
        report_progress("files", index, len(orthos))
        out_dir = output_folder(out, ortho)
        if not force and is_done(out_dir):
            rows.append(_summary_row(ortho.stem, "skipped", out_dir, 0.0, _read_summary(out_dir),
                                     "already done"))
            continue
        flow_options = ortho_options(ortho, options)
        start = time.perf_counter()
        state = subflow(ortho=str(ortho), out=str(out_dir), chm=None, options=flow_options, return_state=True)
        seconds = time.perf_counter() - start
        if state.is_completed():
            rows.append(_summary_row(ortho.stem, "done", out_dir, seconds, state.result()))
            log.info("%s: done in %.1f s", ortho.name, seconds)
        else:
            exc = state.result(raise_on_failure=False)
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            rows.append(_summary_row(ortho.stem, "failed", out_dir, seconds, None, message))
            # one line on the console (forest_inventory.logs); the traceback in the log file
            log.error("%s", message if ortho.name in message else f"{ortho.name}: {message}",
                      exc_info=exc if isinstance(exc, BaseException) else None)
    report_progress("files", len(orthos), len(orthos))
    write_batch_summary(Path(out) / "batch_summary.csv", rows)
    return rows


@contextlib.contextmanager
def dask_cluster(workers: int) -> Iterator[str]:
    """A temporary loopback Dask LocalCluster for the whole batch; yields its scheduler address."""
    try:
        from distributed import LocalCluster
    except ModuleNotFoundError:
        raise InputError("--task-runner dask needs distributed: install the dask extra "
                         "(pip install '.[dask]')") from None
    with LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def run_batch(folder: str | Path, out: str | Path, options: dict[str, Any] | None = None, force: bool = False,
              task_runner: str = "threads", workers: int | None = None,
              dask_address: str | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> list[dict[str, Any]]:
    """Run :func:`batch_flow` in this process. With Dask and no address, one temporary LocalCluster serves
    every orthomosaic (instead of one cluster per subflow). ``progress(stage, done, total)``: "files"
    (absolute) and "tiles" (advance; with the threads runner) events."""
    from flows.settings import local_run

    workers = workers or DEFAULT_THREAD_WORKERS
    # bad usage fails here, before any Prefect machinery starts
    make_task_runner(task_runner, workers=workers, dask_address=dask_address)
    if not find_orthomosaics(folder):
        raise InputError(f"{folder}: no orthomosaics (*.tif, *.tiff, *.vrt) found; pass the folder that "
                         "holds them")
    with contextlib.ExitStack() as stack:
        stack.enter_context(local_run())
        set_progress(progress)
        stack.callback(set_progress, None)
        if task_runner == "dask" and not dask_address:
            share_api_with_workers()  # before the workers are spawned: they inherit the environment
            dask_address = stack.enter_context(dask_cluster(workers))
        return batch_flow(folder=str(folder), out=str(out), options=options, force=force,
                          task_runner=task_runner, workers=workers, dask_address=dask_address)
