"""The inventory as a Prefect flow: the ``pipeline.inventory`` stages as cached, retried, resumable tasks.

Orchestration only. Every task calls one ``pipeline.inventory`` stage (the same stages that
``pipeline.inventory.run_inventory`` chains for ``forest-inventory run``), so the flow and the plain CLI
give identical outputs.

- Cache: each task's key is the run identity (input files by path + size + mtime, ONNX models by sha256,
  every other parameter by value, the package version and a sha256 of the source and data files of
  ``pipeline/`` and ``flows/``, so a code change recomputes) plus the stage name, never a hash of gigabytes
  of imagery. Prefect persists task results with pickle, so they live OUTSIDE the output folder
  (``flows.settings.result_dir``: ``~/.cache/forest-inventory/prefect-results/inventory/<hash of the output
  path>``, or under ``$FOREST_INVENTORY_RESULTS``): a tampered or shared output folder holds no pickle to
  load. A cached stage whose files have gone is run again.
- Resume: ``infer_group`` persists each group's crowns under ``<out>/.work/groups/`` and reuses an existing
  file, so a killed run picks up from the groups it finished (the state is in the output folder, not in
  Prefect's database).
- Retries: transient I/O errors only (exponential backoff); bad input (``InputError``) fails at once.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.tasks import exponential_backoff
from prefect.utilities.annotations import quote

from flows.settings import DEFAULT_THREAD_WORKERS, make_task_runner, result_dir, task_runner_from_env
from pipeline import inventory as stages
from pipeline.errors import InventoryError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------
# run identity (cache keys)

#: errno values of I/O failures worth retrying (network file systems, busy devices, interrupted calls)
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT,
                              errno.ESTALE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENETDOWN,
                              errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOLCK})
#: OSErrors that retrying cannot fix
_PERMANENT_OSERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                       FileExistsError)

_SHA_MEMO: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("forest-inventory")
    except Exception:  # noqa: BLE001 - not installed: source checkout
        return "source"


def model_sha256(path: str | os.PathLike) -> str:
    """sha256 of a model file, memoised by (path, size, mtime) so a rerun does not read it again."""
    from pipeline.onnx_model import file_sha256

    p = Path(path).resolve()
    st = p.stat()
    memo_key = (str(p), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if memo_key in _SHA_MEMO:
            return _SHA_MEMO[memo_key]
    digest = file_sha256(p)
    with _SHA_LOCK:
        _SHA_MEMO[memo_key] = digest
    return digest


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Identity of an input file without reading it: resolved path, size in bytes, mtime in ns.

    ONNX models are identified by their sha256 instead (small, and the model is what the result depends on).
    """
    p = Path(path).expanduser()
    if not p.is_file():  # a folder (the output folder) or a missing file (validate will say so): by name
        return {"path": str(p.resolve())}
    if p.suffix.lower() == ".onnx":
        return {"model_sha256": model_sha256(p)}
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _identity_of(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return file_identity(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _identity_of(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _identity_of(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_identity_of(v) for v in value]
    if isinstance(value, str) and _looks_like_file(value):
        return file_identity(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _looks_like_file(text: str) -> bool:
    if not text or len(text) > 4096:
        return False
    return os.sep in text or Path(text).suffix.lower() in _FILE_SUFFIXES


_FILE_SUFFIXES = {".tif", ".tiff", ".vrt", ".onnx", ".gpkg", ".geojson", ".json", ".shp", ".csv", ".parquet"}


def code_identity() -> str:
    """sha256 of the source and data files of ``pipeline/`` and ``flows/`` (see
    ``pipeline.inventory.source_sha256``)."""
    import pipeline

    return stages.source_sha256((Path(pipeline.__file__).resolve().parent, Path(__file__).resolve().parent))


def run_identity(config: Any) -> str:
    """Hex digest naming one inventory run: input identities, model sha256s, parameters, code version and
    the hash of the code itself."""
    doc = {"config": _identity_of(config), "version": _package_version(), "code": code_identity()}
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: stage name + run identity (+ group index for the mapped stage)."""
    group = parameters.get("group_index")
    suffix = "" if group is None else f"-g{int(group):05d}"
    return f"{context.task.name}-{parameters['run_key']}{suffix}"


# ----------------------------------------------------------------------------------------------------------
# retries


def is_transient_io_error(exc: BaseException | None) -> bool:
    """True for I/O failures a retry may fix; never for bad input or missing/forbidden files."""
    if exc is None or isinstance(exc, InventoryError):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, BlockingIOError, InterruptedError)):
        return True
    if isinstance(exc, _PERMANENT_OSERRORS):
        return False
    try:
        from rasterio.errors import RasterioIOError

        if isinstance(exc, RasterioIOError):  # a read that failed mid-file (e.g. on a network share)
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, OSError):
        return exc.errno in TRANSIENT_ERRNOS
    return False


def retry_on_transient_io(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient I/O errors (InputError never)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as inner:  # noqa: BLE001 - whatever the result store raises is the cause
            exc = inner
    return is_transient_io_error(exc if isinstance(exc, BaseException) else None)


RETRIES = 3
RETRY_BACKOFF_S = 2.0

_TASK_OPTIONS: dict[str, Any] = {
    "cache_key_fn": stage_cache_key,
    "persist_result": True,
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=RETRY_BACKOFF_S),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_on_transient_io,
}

# ----------------------------------------------------------------------------------------------------------
# tasks: one per stage. The RunPlan is plain, picklable data (open handles are per thread inside it), so it
# travels to thread or Dask workers and into the result cache.


def cache_dir(out: str | os.PathLike) -> Path:
    """Where the flow's task results (pickles) live: ``flows.settings.result_dir("inventory", out)``, never
    inside ``out``."""
    return result_dir("inventory", out)


@task(name="validate", **_TASK_OPTIONS)
def validate_task(config: Any, run_key: str) -> Any:
    """Open and check the inputs and models, plan tiles and tile groups: ``pipeline.inventory.validate``."""
    return stages.validate(config)


@task(name="infer-group", **_TASK_OPTIONS)
def infer_group_task(plan: Any, group_index: int, run_key: str) -> str:
    """Segment one group of tiles and persist its crowns (``<out>/.work/groups/``); returns the file."""
    return str(stages.infer_group(plan, group_index))


@task(name="collect-crowns", **_TASK_OPTIONS)
def collect_task(plan: Any, group_paths: list[str], run_key: str) -> Any:
    """All groups' crowns as one GeoDataFrame (working CRS)."""
    return stages.collect_crowns(plan, [Path(p) for p in group_paths])


@task(name="attributes", **_TASK_OPTIONS)
def attributes_task(plan: Any, crowns: Any, run_key: str) -> Any:
    """Species and height per crown."""
    return stages.add_attributes(plan, crowns)


@task(name="carbon", **_TASK_OPTIONS)
def carbon_task(plan: Any, trees: Any, run_key: str) -> Any:
    """Per-tree and aggregated carbon with Monte Carlo uncertainty."""
    return stages.add_carbon(plan, trees)


@task(name="exports", **_TASK_OPTIONS)
def exports_task(plan: Any, result: Any, run_key: str) -> Any:
    """Write every output file (staged, then moved in together); returns the summary."""
    return stages.write_outputs(plan, result)


# ----------------------------------------------------------------------------------------------------------
# flow


def build_config(ortho: str, out: str, chm: str | None = None, options: dict[str, Any] | None = None) -> Any:
    """``pipeline.inventory.InventoryConfig`` from the flow's (JSON-able) parameters: ``options`` are run
    options of ``pipeline.options`` (flat, or nested in ``carbon``/``postprocess``), checked there."""
    from pipeline.options import make_config

    values = dict(options or {})
    if chm:
        values["chm"] = chm
    return make_config({**values, "ortho": ortho, "out_dir": out}, "flow options")


#: progress callback of the flow runs in this process, (stage, done, total): "tiles" advances by ``done``
#: tiles, "files" is absolute (batch). Set by ``flows.batch.run_batch``; not a flow parameter (not JSON).
_PROGRESS: list[Callable[[str, int, int], None] | None] = [None]


def set_progress(callback: Callable[[str, int, int], None] | None) -> None:
    """Report the progress of flow runs started in this process to ``callback`` (None: stop)."""
    _PROGRESS[0] = callback


def report_progress(stage: str, done: int, total: int) -> None:
    """Send one progress event to the callback of :func:`set_progress`, if any; never raises."""
    callback = _PROGRESS[0]
    if callback is not None:
        try:
            callback(stage, done, total)
        except Exception:  # noqa: BLE001 - a display failure must not fail the inventory
            log.debug("progress callback failed", exc_info=True)


def summary_as_dict(summary: Any) -> dict[str, Any]:
    """The stage's summary as a plain dict (what run_inventory returns)."""
    if isinstance(summary, dict):
        return summary
    if dataclasses.is_dataclass(summary):
        return dataclasses.asdict(summary)
    to_dict = getattr(summary, "to_dict", None)
    return to_dict() if callable(to_dict) else {"summary": summary}


def outputs_present(out: str | os.PathLike) -> bool:
    """True when the output folder still holds the files the last export wrote."""
    summary = Path(out) / "summary.json"
    if not summary.is_file():
        return False
    try:
        doc = json.loads(summary.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files = doc.get("outputs") or doc.get("files") or {}
    names = files.values() if isinstance(files, dict) else files
    return all((Path(out) / str(name)).exists() for name in names if isinstance(name, str))


@flow(name="inventory", task_runner=task_runner_from_env(), validate_parameters=True)
def inventory_flow(ortho: str, out: str, chm: str | None = None,
                   options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One orthomosaic to an inventory in ``out`` (same outputs as ``forest-inventory run``).

    ``options``: further ``pipeline.inventory.InventoryConfig`` fields by name (JSON values).
    """
    config = build_config(ortho, out, chm, options)
    run_key = run_identity(config)
    storage = cache_dir(config.out_dir)
    opts = {"result_storage": storage}

    # quote(): the plan, crowns and trees are large; Prefect would walk them looking for futures on every
    # task call (measured ~5 ms per walk of a 144-tile plan). The stages run in this order anyway. Not for
    # the mapped stage: a quoted value sent to a Dask worker arrives there still wrapped (a plain tuple).
    plan = validate_task.with_options(**opts)(config, run_key)
    infer = infer_group_task.with_options(**opts)
    futures = infer.map(unmapped(plan), list(range(len(plan.groups))), unmapped(run_key))
    group_paths = []
    for gi, future in enumerate(futures):
        group_paths.append(future.result())
        report_progress("tiles", len(plan.groups[gi]), len(plan.tiles))
    for i, path in enumerate(group_paths):  # a cached group whose file was deleted: compute it again
        if not Path(path).exists():
            group_paths[i] = infer.with_options(refresh_cache=True)(quote(plan), i, run_key)

    crowns = collect_task.with_options(**opts)(quote(plan), group_paths, run_key)
    trees = attributes_task.with_options(**opts)(quote(plan), quote(crowns), run_key)
    result = carbon_task.with_options(**opts)(quote(plan), quote(trees), run_key)
    exports = exports_task.with_options(**opts, refresh_cache=not outputs_present(config.out_dir))
    summary = exports(quote(plan), quote(result), run_key)
    plan.close()  # this thread's orthomosaic handle (worker threads' handles close with their threads)
    return summary_as_dict(summary)


def run_inventory_flow(ortho: str, out: str, chm: str | None = None, options: dict[str, Any] | None = None,
                       task_runner: str = "threads", workers: int = DEFAULT_THREAD_WORKERS,
                       dask_address: str | None = None) -> dict[str, Any]:
    """Run :func:`inventory_flow` in this process with the chosen task runner (``threads`` or ``dask``)."""
    from flows.settings import local_run, share_api_with_workers

    runner = make_task_runner(task_runner, workers=workers, dask_address=dask_address)
    if task_runner == "dask" and not dask_address:
        share_api_with_workers()  # the temporary cluster's workers inherit the environment
    with local_run():
        return inventory_flow.with_options(task_runner=runner)(ortho=str(ortho), out=str(out),
                                                               chm=str(chm) if chm else None, options=options)
