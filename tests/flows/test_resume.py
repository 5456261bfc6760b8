"""A flow run killed midway resumes from the tile groups it finished, and ends with the same outputs as an
uninterrupted run. The run to kill is a real subprocess (SIGKILL: no cleanup of any kind), talking to the
session's test server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from flows.inventory import inventory_flow
from tests.flows.conftest import REPO, SAMPLE_ORTHO, output_digest
from tests.flows.test_inventory_flow import task_states

pytestmark = pytest.mark.prefect

TILES_PER_GROUP = 4
KILL_AFTER_GROUPS = 3

# The child runs the real flow with one worker thread; after group KILL_AFTER_GROUPS - 1 is persisted it
# parks, so the parent can kill it at a known point instead of racing it.
CHILD = textwrap.dedent("""
    import json, sys, time
    import pipeline.inventory as stages
    real = stages.infer_group
    def parking(plan, group_index, progress=None):
        path = real(plan, group_index, progress)
        if group_index >= {park}:
            time.sleep(600)
        return path
    stages.infer_group = parking
    from flows.inventory import inventory_flow
    from flows.settings import local_run
    with local_run():
        inventory_flow(ortho=sys.argv[1], out=sys.argv[2], options=json.loads(sys.argv[3]))
""")


def _group_files(out):
    """Persisted group crowns (not their .json stats; atomic temp files are hidden and not matched)."""
    return sorted(p for p in (out / ".work" / "groups").glob("group_*") if p.suffix != ".json")


def test_killed_run_resumes_and_equals_an_uninterrupted_run(prefect_api, tmp_path, flow_options):
    options = dict(flow_options, tiles_per_group=TILES_PER_GROUP)
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    env = dict(os.environ, PREFECT_API_URL=prefect_api, FOREST_INVENTORY_WORKERS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = CHILD.format(park=KILL_AFTER_GROUPS - 1)
    args = [sys.executable, "-c", code, str(SAMPLE_ORTHO), str(killed_out), json.dumps(options)]
    child = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(_group_files(killed_out)) < KILL_AFTER_GROUPS:
            assert child.poll() is None, child.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child made no progress"
            time.sleep(0.2)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    done_before = {p.name: p.stat().st_mtime_ns for p in _group_files(killed_out)}
    assert len(done_before) == KILL_AFTER_GROUPS
    assert not (killed_out / "summary.json").exists()

    state = inventory_flow(ortho=str(SAMPLE_ORTHO), out=str(killed_out), options=options, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    n_groups = -(-summary["n_tiles"] // TILES_PER_GROUP)
    assert n_groups > KILL_AFTER_GROUPS
    # the groups finished before the kill were reused, not recomputed
    assert {name: (killed_out / ".work" / "groups" / name).stat().st_mtime_ns for name in done_before} \
        == done_before
    states = task_states(state.state_details.flow_run_id, expected=n_groups + 5)
    print(f"\nresumed run task states: {states}")
    assert len(states["infer-group"]) == n_groups
    # groups whose task finished before the kill are cache hits; the parked one reran and reused its file
    assert states["infer-group"].count("Cached") == KILL_AFTER_GROUPS - 1

    inventory_flow(ortho=str(SAMPLE_ORTHO), out=str(clean_out), options=options)
    assert output_digest(killed_out) == output_digest(clean_out)
