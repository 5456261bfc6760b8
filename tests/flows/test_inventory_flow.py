"""The inventory flow on the sample orthomosaic: same outputs as run_inventory, reruns are cache hits,
transient I/O errors are retried and bad input is not."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

import flows.inventory as flow_module
from flows.inventory import inventory_flow
from pipeline import inventory as stages
from pipeline.errors import InputError
from tests.flows.conftest import SAMPLE_ORTHO, output_digest

pytestmark = pytest.mark.prefect

TILES_PER_GROUP = 4


def task_states(flow_run_id, expected: int, timeout_s: float = 30.0) -> dict[str, list[str]]:
    """Task name -> state names of a flow run's task runs, read back from the API (task run states reach
    the database asynchronously, so poll until all ``expected`` runs are final)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            runs = client.read_task_runs(flow_run_filter=run_filter)
            final = [r for r in runs if r.state is not None and r.state.is_final()]
            if len(final) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    states: dict[str, list[str]] = {}
    for run in final:
        states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)  # "infer-group-91a"
    return states


def test_flow_equals_run_inventory_and_a_rerun_is_all_cache_hits(prefect_api, tmp_path, flow_options):
    options = dict(flow_options, tiles_per_group=TILES_PER_GROUP)
    flow_out, direct_out = tmp_path / "flow", tmp_path / "direct"

    start = time.perf_counter()
    state = inventory_flow(ortho=str(SAMPLE_ORTHO), out=str(flow_out), options=options, return_state=True)
    first_s = time.perf_counter() - start
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["n_trees"] > 0

    # one code path: `forest-inventory run` calls run_inventory, which chains the same stages
    direct = stages.run_inventory(stages.InventoryConfig(ortho=SAMPLE_ORTHO, out_dir=direct_out, **options))
    assert direct["n_trees"] == summary["n_trees"]
    assert direct["co2e_t"] == pytest.approx(summary["co2e_t"], rel=0, abs=0)
    flow_digest = output_digest(flow_out)
    assert {"crowns.geojson", "crowns.csv", "summary.json", "crown_mask.tif"} <= set(flow_digest)
    assert flow_digest == output_digest(direct_out)

    n_groups = -(-summary["n_tiles"] // TILES_PER_GROUP)
    assert n_groups > 1
    mtimes = {p: p.stat().st_mtime_ns for p in flow_out.iterdir() if p.is_file()}

    start = time.perf_counter()
    again = inventory_flow(ortho=str(SAMPLE_ORTHO), out=str(flow_out), options=options, return_state=True)
    second_s = time.perf_counter() - start
    assert again.is_completed()
    states = task_states(again.state_details.flow_run_id, expected=n_groups + 5)
    print(f"\nflow run 1: {first_s:.2f} s, run 2 (cached): {second_s:.2f} s, "
          f"speed-up {first_s / second_s:.1f}x; task states: {states}")
    assert set(states) == {"validate", "infer-group", "collect-crowns", "attributes", "carbon", "exports"}
    assert len(states["infer-group"]) == n_groups
    assert all(name == "Cached" for names in states.values() for name in names), states
    assert again.result()["n_trees"] == summary["n_trees"]
    assert output_digest(flow_out) == flow_digest
    assert {p: p.stat().st_mtime_ns for p in flow_out.iterdir() if p.is_file()} == mtimes  # nothing rewritten

    # deleted outputs are written again from the cached results
    (flow_out / "crowns.geojson").unlink()
    third = inventory_flow(ortho=str(SAMPLE_ORTHO), out=str(flow_out), options=options, return_state=True)
    assert third.is_completed()
    assert output_digest(flow_out) == flow_digest


def test_transient_io_errors_are_retried(prefect_api, tmp_path, flow_options, monkeypatch):
    calls: list[int] = []
    real = stages.infer_group

    def flaky(plan, group_index, progress=None):
        calls.append(group_index)
        if calls.count(group_index) == 1 and group_index == 0:
            raise OSError(errno.EIO, "Input/output error", "network share")
        return real(plan, group_index, progress)

    monkeypatch.setattr(stages, "infer_group", flaky)
    quick = flow_module.infer_group_task.with_options(retry_delay_seconds=0, retry_jitter_factor=0)
    monkeypatch.setattr(flow_module, "infer_group_task", quick)
    state = inventory_flow(ortho=str(SAMPLE_ORTHO), out=str(tmp_path / "out"),
                           options=dict(flow_options, tiles_per_group=TILES_PER_GROUP), return_state=True)
    assert state.is_completed(), state.message
    assert calls.count(0) == 2  # failed once, retried once
    assert (tmp_path / "out" / "summary.json").is_file()


def test_invalid_input_fails_at_once_without_retries(prefect_api, tmp_path, flow_options, monkeypatch):
    calls = []
    real = stages.validate

    def counting(config):
        calls.append(config)
        return real(config)

    monkeypatch.setattr(stages, "validate", counting)
    bad = tmp_path / "not-a-raster.tif"
    bad.write_text("this is not a GeoTIFF")
    start = time.perf_counter()
    with pytest.raises(InputError, match="not-a-raster.tif"):
        inventory_flow(ortho=str(bad), out=str(tmp_path / "out"), options=flow_options)
    assert len(calls) == 1
    assert time.perf_counter() - start < flow_module.RETRY_BACKOFF_S + 5
    assert not Path(tmp_path / "out" / "summary.json").exists()


def test_code_change_recomputes_and_no_pickle_under_out(prefect_api, tmp_path, flow_options, monkeypatch):
    # issue 17, item 8: the cache key holds a hash of the code; the Chave intercept doubled in-process and
    # the code hash changed: the rerun into the same --out recomputes (AGB doubles) instead of returning
    # the cached result. Prefect's pickled results are kept out of --out.
    from pipeline.carbon import allometry as al

    out = tmp_path / "out"
    first = inventory_flow(ortho=str(SAMPLE_ORTHO), out=str(out), options=flow_options)
    monkeypatch.setattr(al, "CHAVE_EQ4_INTERCEPT", 2 * al.CHAVE_EQ4_INTERCEPT)
    cached = inventory_flow(ortho=str(SAMPLE_ORTHO), out=str(out), options=flow_options)
    assert cached["agb_t"] == first["agb_t"]  # same code hash: a cache hit (the in-process change unseen)
    monkeypatch.setattr(flow_module, "code_identity", lambda: "f" * 64)  # as after editing a source file
    fresh = inventory_flow(ortho=str(SAMPLE_ORTHO), out=str(out), options=flow_options)
    assert fresh["agb_t"] == pytest.approx(2 * first["agb_t"], rel=1e-9)
    for path in out.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:4096]
            assert not head.startswith(b"\x80") and b"pickle" not in head, path
    assert any(flow_module.cache_dir(out).rglob("*"))  # the results are there instead
