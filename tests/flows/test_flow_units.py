"""Flow logic without a Prefect server: cache keys, retry rule, settings, runners, tasks through ``.fn``."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows import settings
from flows.batch import chm_for, find_orthomosaics, is_done
from flows.inventory import (
    attributes_task,
    build_config,
    collect_task,
    file_identity,
    infer_group_task,
    is_transient_io_error,
    retry_on_transient_io,
    run_identity,
    stage_cache_key,
    validate_task,
)
from pipeline.errors import InputError
from tests.flows.conftest import SAMPLE_ORTHO


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def test_run_identity_tracks_file_identity_model_bytes_and_parameters(tmp_path, tiny_models):
    crown, species = tiny_models
    ortho = _copy(SAMPLE_ORTHO, tmp_path / "a.tif")
    opts = {"crown_model": str(crown), "species_model": str(species)}
    key = run_identity(build_config(str(ortho), str(tmp_path / "out"), options=opts))
    assert key == run_identity(build_config(str(ortho), str(tmp_path / "out"), options=opts))
    # the orthomosaic is identified by path, size and mtime (never by reading its pixels)
    ident = file_identity(ortho)
    assert set(ident) == {"path", "size", "mtime_ns"} and ident["size"] == ortho.stat().st_size
    st = ortho.stat()
    os.utime(ortho, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = run_identity(build_config(str(ortho), str(tmp_path / "out"), options=opts))
    assert touched != key
    # a parameter changes the key
    assert run_identity(build_config(str(ortho), str(tmp_path / "out"),
                                     options={**opts, "tiles_per_group": 3})) != touched
    # the model is identified by its sha256: same bytes elsewhere -> same key, other bytes -> other key
    twin = _copy(Path(crown), tmp_path / "crowns-copy.onnx")
    assert file_identity(twin) == file_identity(crown)
    from tests.tiny_models import write_crown_model

    other = write_crown_model(tmp_path / "other.onnx", brightness_threshold=0.5)
    assert file_identity(other) != file_identity(crown)
    assert run_identity(build_config(str(ortho), str(tmp_path / "out"),
                                     options={**opts, "crown_model": str(other)})) != touched


def test_stage_cache_key_names_stage_run_and_group():
    ctx = SimpleNamespace(task=SimpleNamespace(name="infer-group"))
    assert stage_cache_key(ctx, {"run_key": "abc", "group_index": 7}) == "infer-group-abc-g00007"
    ctx.task.name = "carbon"
    assert stage_cache_key(ctx, {"run_key": "abc", "trees": object()}) == "carbon-abc"


@pytest.mark.parametrize("exc, transient", [
    (InputError("bad.tif: not a raster; pass a GeoTIFF"), False),
    (FileNotFoundError(errno.ENOENT, "gone"), False),
    (PermissionError(errno.EACCES, "no"), False),
    (OSError(errno.EIO, "I/O error"), True),
    (OSError(errno.ESTALE, "stale NFS handle"), True),
    (TimeoutError("timed out"), True),
    (ConnectionResetError("reset"), True),
    (ValueError("a bug"), False),
    (None, False),
])
def test_only_transient_io_errors_are_retried(exc, transient):
    assert is_transient_io_error(exc) is transient
    state = SimpleNamespace(data=exc, result=lambda raise_on_failure=False: exc)
    assert retry_on_transient_io(None, None, state) is transient


def test_rasterio_read_errors_are_transient():
    from rasterio.errors import RasterioIOError

    assert is_transient_io_error(RasterioIOError("read failed at block 12"))


def test_configure_isolates_prefect_home_and_respects_the_user(tmp_path, monkeypatch):
    import prefect.context

    for key in settings.default_environment(tmp_path):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(settings, "_SET_BY_US", {})
    # configure() refreshes Prefect's process-global settings; put them back afterwards
    monkeypatch.setattr(prefect.context, "GLOBAL_SETTINGS_CONTEXT", prefect.context.GLOBAL_SETTINGS_CONTEXT)
    applied = settings.configure(tmp_path / "project")
    assert applied["PREFECT_HOME"] == str((tmp_path / "project" / ".prefect").resolve())
    assert Path(applied["PREFECT_HOME"]).is_dir()
    assert applied["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert int(applied["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]) >= 60
    assert applied["PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS"] == str(settings.DEFAULT_THREAD_WORKERS)
    # Prefect's global settings now point there (a test harness, when active, overrides them per context)
    assert prefect.context.GLOBAL_SETTINGS_CONTEXT.settings.home == Path(applied["PREFECT_HOME"])
    # a second project replaces our own values ...
    assert settings.configure(tmp_path / "other")["PREFECT_HOME"].endswith(os.path.join("other", ".prefect"))
    # ... but never a value the user set
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "mine"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    applied = settings.configure(tmp_path / "project")
    assert applied["PREFECT_HOME"] == str(tmp_path / "mine")
    assert applied["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
    assert settings.prefect_home_for(tmp_path / "project") == tmp_path / "mine"


def test_task_runners_are_bounded_or_dask():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    threads = settings.make_task_runner("threads", workers=3)
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    remote = settings.make_task_runner("dask", dask_address="tcp://127.0.0.1:8786")
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"
    local = settings.make_task_runner("dask", workers=2)
    assert local.address is None and local.cluster_kwargs["n_workers"] == 2
    with pytest.raises(InputError, match="--task-runner"):
        settings.make_task_runner("ray")
    with pytest.raises(InputError, match="--dask-address"):
        settings.make_task_runner("threads", dask_address="tcp://127.0.0.1:8786")


def test_tasks_through_fn_call_the_pipeline_stages(tmp_path, tiny_models):
    crown, species = tiny_models
    config = build_config(str(SAMPLE_ORTHO), str(tmp_path / "out"),
                          options={"crown_model": str(crown), "species_model": str(species),
                                   "tiles_per_group": 8})
    key = run_identity(config)
    plan = validate_task.fn(config, key)
    assert len(plan.groups) == -(-len(plan.tiles) // 8)
    paths = [infer_group_task.fn(plan, i, key) for i in range(len(plan.groups))]
    assert all(Path(p).is_file() for p in paths)
    assert Path(paths[0]).parent == tmp_path / "out" / ".work" / "groups"
    crowns = collect_task.fn(plan, paths, key)
    assert len(crowns) > 0 and list(crowns["tree_id"]) == list(range(1, len(crowns) + 1))
    trees = attributes_task.fn(plan, crowns, key)
    assert {"species", "species_prob", "height_m"} <= set(trees.columns)
    plan.close()


def test_bad_input_is_an_input_error_through_fn(tmp_path, tiny_models):
    crown, _ = tiny_models
    config = build_config(str(tmp_path / "missing.tif"), str(tmp_path / "out"),
                          options={"crown_model": str(crown)})
    with pytest.raises(InputError, match="missing.tif"):
        validate_task.fn(config, run_identity(config))
    with pytest.raises(InputError, match="unknown option .tile_sise.*tiles_per_group"):
        build_config(str(SAMPLE_ORTHO), str(tmp_path / "out"), options={"tile_sise": 3})


def test_batch_finds_orthomosaics_and_their_chms(tmp_path):
    for name in ("b.tif", "a.tiff", "a_chm.tif", "c_dsm.tif", "notes.txt", ".hidden.tif"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in find_orthomosaics(tmp_path)] == ["a.tiff", "b.tif"]
    assert chm_for(tmp_path / "a.tiff") == tmp_path / "a_chm.tif"
    assert chm_for(tmp_path / "b.tif") is None
    assert not is_done(tmp_path / "nothing")
    with pytest.raises(InputError, match="not a folder"):
        find_orthomosaics(tmp_path / "b.tif")
